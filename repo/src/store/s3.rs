//! A repository in an S3 bucket (AWS S3, MinIO, Ceph RGW, Garage, NooBaa OBCs).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;

use super::{FileType, Store, StoreError};

/// Preallocation for a body whose length the server announced (more is grown into).
const MAX_PREALLOCATED: i64 = 64 * 1024 * 1024;

/// A response body in `buf` (emptied first), grown once to the announced length if it
/// is smaller: no second copy and no intermediate segments (a pack is read whole,
/// several at once).
async fn collect(
    mut body: ByteStream,
    announced: i64,
    buf: &mut Vec<u8>,
) -> Result<(), aws_sdk_s3::primitives::ByteStreamError> {
    crate::memory::make_room(buf, announced.clamp(0, MAX_PREALLOCATED) as usize);
    // Bounded by the body: each step consumes a piece of it.
    while let Some(piece) = body.try_next().await? {
        buf.extend_from_slice(&piece);
    }
    Ok(())
}

/// Everything needed to reach a bucket. `Debug` omits the secret.
#[derive(Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/` needed).
    pub prefix: String,
    pub region: Option<String>,
    /// `http(s)://host:port` of an S3-compatible server; `None` for AWS.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); the default with a custom endpoint.
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// PEM bundle of extra CAs to trust for the endpoint.
    pub ca_pem: Option<Vec<u8>>,
    /// Attempts per request, with exponential backoff and jitter between them.
    pub max_attempts: u32,
    /// Uploads without a SHA-256 of their payload (`UNSIGNED-PAYLOAD`); `None`: only
    /// over TLS (`https://` endpoints and AWS).
    pub unsigned_payload: Option<bool>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("ca", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Attempts at downloading an object whose body breaks off.
const BODY_ATTEMPTS: u32 = 4;

#[derive(Clone)]
pub struct S3Store {
    pub(crate) client: aws_sdk_s3::Client,
    pub(crate) bucket: String,
    pub(crate) prefix: String,
    pub(crate) location: String,
    /// Over TLS, uploads are not signed over their payload (`UNSIGNED-PAYLOAD`): TLS and
    /// the CRC32 checksum the SDK sends already protect the bytes, and every object is
    /// sealed (AEAD) anyway, so hashing each pack with SHA-256 twice (here and in the S3
    /// server) buys nothing. Over plain HTTP the payload stays signed.
    pub(crate) unsigned_payload: bool,
}

impl S3Store {
    pub fn new(opts: S3Options) -> Result<Self, StoreError> {
        let location = format!(
            "s3:{}/{}/{}",
            opts.endpoint.as_deref().unwrap_or("aws"),
            opts.bucket,
            opts.prefix
        );
        let creds = Credentials::new(
            opts.access_key_id.clone(),
            opts.secret_access_key.clone(),
            opts.session_token.clone(),
            None,
            "datamover-storage-secret",
        );
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(
                opts.region
                    .clone()
                    .unwrap_or_else(|| "us-east-1".to_string()),
            ))
            .credentials_provider(creds)
            .force_path_style(opts.path_style)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(opts.max_attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            );
        if let Some(ep) = &opts.endpoint {
            builder = builder.endpoint_url(ep);
        }
        if let Some(pem) = &opts.ca_pem {
            use aws_smithy_http_client::tls;
            let trust = tls::TrustStore::default().with_pem_certificate(pem.clone());
            let ctx = tls::TlsContext::builder()
                .with_trust_store(trust)
                .build()
                .map_err(|e| StoreError::Other {
                    what: "ca.crt".into(),
                    detail: format!("{e}: check the CA bundle is PEM"),
                })?;
            let http = aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .tls_context(ctx)
                .build_https();
            builder = builder.http_client(http);
        }
        let prefix = opts.prefix.trim_matches('/').to_string();
        let unsigned_payload = opts.unsigned_payload.unwrap_or_else(|| {
            opts.endpoint
                .as_deref()
                .is_none_or(|e| e.to_ascii_lowercase().starts_with("https://"))
        });
        Ok(S3Store {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: opts.bucket,
            prefix,
            location,
            unsigned_payload,
        })
    }

    fn key(&self, ft: FileType, name: &str) -> String {
        let k = ft.key(name);
        if self.prefix.is_empty() {
            k
        } else {
            format!("{}/{k}", self.prefix)
        }
    }

    pub(crate) fn map<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        e: SdkError<E>,
        what: &str,
    ) -> StoreError {
        let status = e.raw_response().map(|r| r.status().as_u16());
        let code = e.code().unwrap_or("").to_string();
        let detail = match &e {
            SdkError::ServiceError(se) => format!("{} {}", code, se.err().message().unwrap_or(""))
                .trim()
                .to_string(),
            other => {
                // Walk the source chain: the useful part (connection refused, DNS) is deep.
                let mut msg = other.to_string();
                let mut src = std::error::Error::source(other);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                msg
            }
        };
        let what = format!("s3://{}/{what}", self.bucket);
        match (status, code.as_str()) {
            (Some(404), "NoSuchBucket") | (_, "NoSuchBucket") => StoreError::Unreachable {
                location: self.location.clone(),
                detail: format!("bucket {} does not exist", self.bucket),
            },
            (Some(404), _) | (_, "NoSuchKey") => StoreError::NotFound(what),
            (Some(401) | Some(403), _)
            | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
                StoreError::AccessDenied { what, detail }
            }
            (Some(507), _) | (_, "QuotaExceeded" | "EntityTooLarge" | "InsufficientStorage") => {
                StoreError::NoSpace(what)
            }
            (None, _) => StoreError::Unreachable {
                location: self.location.clone(),
                detail,
            },
            _ => StoreError::Other { what, detail },
        }
    }
}

#[async_trait]
impl Store for S3Store {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| match self.map(e, "") {
                StoreError::NotFound(_) => StoreError::Unreachable {
                    location: self.location.clone(),
                    detail: format!("bucket {} does not exist", self.bucket),
                },
                other => other,
            })?;
        Ok(())
    }

    async fn list(&self, ft: FileType) -> Result<Vec<String>, StoreError> {
        let prefix = match ft {
            FileType::Config => self.key(ft, ""),
            _ if self.prefix.is_empty() => format!("{}/", ft.dir()),
            _ => format!("{}/{}/", self.prefix, ft.dir()),
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .into_paginator()
            .send();
        // Bounded: one page per 1000 objects, ends when S3 reports no continuation.
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.map(e, &prefix))?;
            for obj in page.contents() {
                if let Some(k) = obj.key() {
                    let name = k.rsplit('/').next().unwrap_or(k);
                    if !name.is_empty() {
                        out.push(name.to_string());
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn read(&self, ft: FileType, name: &str) -> Result<Bytes, StoreError> {
        let mut buf = Vec::new();
        self.read_into(ft, name, &mut buf).await?;
        Ok(Bytes::from(buf))
    }

    async fn read_into(
        &self,
        ft: FileType,
        name: &str,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let key = self.key(ft, name);
        // The SDK retries requests; a body cut off while streaming is retried here.
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| self.map(e, &key))?;
            let len = out.content_length().unwrap_or(0);
            match collect(out.body, len, buf).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < BODY_ATTEMPTS => {
                    tracing::warn!(key = %key, error = %e, attempt, "download cut off: retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => {
                    return Err(StoreError::Unreachable {
                        location: self.location.clone(),
                        detail: format!("reading {key}: {e}"),
                    });
                }
            }
        }
    }

    async fn read_range(
        &self,
        ft: FileType,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StoreError> {
        let key = self.key(ft, name);
        if length == 0 {
            return Ok(Bytes::new());
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .range(format!("bytes={}-{}", offset, offset + length - 1))
            .send()
            .await
            .map_err(|e| self.map(e, &key))?;
        let announced = out.content_length().unwrap_or(0);
        let mut data = Vec::new();
        collect(out.body, announced, &mut data)
            .await
            .map_err(|e| StoreError::Unreachable {
                location: self.location.clone(),
                detail: format!("reading {key}: {e}"),
            })?;
        if data.len() as u64 != length {
            return Err(StoreError::Other {
                what: key,
                detail: format!("short read: {} of {length} bytes", data.len()),
            });
        }
        Ok(Bytes::from(data))
    }

    async fn write(&self, ft: FileType, name: &str, data: Bytes) -> Result<(), StoreError> {
        let key = self.key(ft, name);
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .body(ByteStream::from(data));
        if self.unsigned_payload {
            put.customize().disable_payload_signing().send().await
        } else {
            put.send().await
        }
        .map_err(|e| self.map(e, &key))?;
        Ok(())
    }

    async fn remove(&self, ft: FileType, name: &str) -> Result<(), StoreError> {
        let key = self.key(ft, name);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.map(e, &key))?;
        Ok(())
    }
}
