//! A server with the S3 gateway on (`PROTOCOLS=datamover-v1:<port>;s3:<port>`) behind a
//! certificate signed by a CA of its own, as a cluster's cert-manager would make, for the
//! gateway's tests and its benchmark.

use aws_sdk_s3::Client as S3Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use crate::{Server, Storage, free_port, write};

/// A CA and a server certificate for 127.0.0.1 signed by it.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a CA and a server certificate (panics if rcgen cannot: a test harness).
pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "datamover test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("server params");
    // Another name than the CA's, or OpenSSL takes the certificate for self-signed.
    leaf.distinguished_name
        .push(DnType::CommonName, "datamover test server");
    let cert = leaf
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The server, the gateway's port and the CA that signed its certificate.
pub struct S3Gateway {
    pub server: Server,
    pub s3_port: u16,
    pub ca_pem: String,
}

impl S3Gateway {
    /// Starts the server with `etc/config` keys `config`, the gateway on a port of its own.
    pub fn start(
        storage: Storage<'_>,
        clients: &[(&str, &str)],
        config: &[(&str, &str)],
    ) -> S3Gateway {
        Self::start_with_env(storage, clients, config, &[])
    }

    /// Like [`S3Gateway::start`], with extra environment for the server process.
    pub fn start_with_env(
        storage: Storage<'_>,
        clients: &[(&str, &str)],
        config: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> S3Gateway {
        let root = tempfile::tempdir().expect("server root");
        for (k, v) in config {
            write(&root.path().join("etc/config").join(k), v.as_bytes());
        }
        let pki = pki();
        write(
            &root.path().join("etc/secrets/tls/tls.crt"),
            pki.cert_pem.as_bytes(),
        );
        write(
            &root.path().join("etc/secrets/tls/tls.key"),
            pki.key_pem.as_bytes(),
        );
        let grpc = free_port();
        let s3_port = free_port();
        let protocols = format!("datamover-v1:{grpc};s3:{s3_port}");
        let mut all_env = vec![("PROTOCOLS", protocols.as_str())];
        all_env.extend_from_slice(env);
        let mut server = Server::start_in_with_env(root, storage, clients, &all_env);
        server.port = grpc;
        S3Gateway {
            server,
            s3_port,
            ca_pem: pki.ca_pem,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.s3_port)
    }
}

/// The S3 profile `datamover-client s3-credentials` prints for a client.
pub fn profile(server: &Server, id: &str, credential: &str) -> Result<String, String> {
    let r = server.client(id, credential).run(&["s3-credentials"]);
    if r.success() {
        Ok(r.stdout)
    } else {
        Err(format!("s3-credentials failed: {}", r.stderr))
    }
}

/// The S3 secret of a client whose credential file holds `credential`.
pub fn secret(server: &Server, id: &str, credential: &str) -> Result<String, String> {
    let profile = profile(server, id, credential)?;
    profile
        .lines()
        .find_map(|l| l.strip_prefix("aws_secret_access_key = "))
        .map(str::to_string)
        .ok_or_else(|| format!("no secret in the profile:\n{profile}"))
}

/// A server with the S3 gateway on, and a runtime to drive aws-sdk-s3 clients of it
/// from a test (the server's fields are reached through it: `g.server`, `g.s3_port`).
pub struct Gateway {
    gateway: S3Gateway,
    pub rt: tokio::runtime::Runtime,
}

impl std::ops::Deref for Gateway {
    type Target = S3Gateway;
    fn deref(&self) -> &S3Gateway {
        &self.gateway
    }
}

impl std::ops::DerefMut for Gateway {
    fn deref_mut(&mut self) -> &mut S3Gateway {
        &mut self.gateway
    }
}

impl Gateway {
    pub fn start(
        storage: Storage<'_>,
        clients: &[(&str, &str)],
        config: &[(&str, &str)],
    ) -> Gateway {
        Self::start_with_env(storage, clients, config, &[])
    }

    /// Like [`Gateway::start`], with extra environment for the server process.
    pub fn start_with_env(
        storage: Storage<'_>,
        clients: &[(&str, &str)],
        config: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Gateway {
        Gateway {
            gateway: S3Gateway::start_with_env(storage, clients, config, env),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    /// The S3 profile `datamover-client s3-credentials` prints for a client.
    pub fn profile(&self, id: &str, credential: &str) -> String {
        profile(&self.server, id, credential).unwrap()
    }

    /// The S3 secret of a client whose credential file holds `credential`.
    pub fn secret(&self, id: &str, credential: &str) -> String {
        secret(&self.server, id, credential).unwrap()
    }

    /// An aws-sdk-s3 client signing as `id` with `secret`, trusting the test CA.
    pub fn client_with_secret(&self, id: &str, secret: &str) -> S3Client {
        use aws_smithy_http_client::tls;
        let trust = tls::TrustStore::empty().with_pem_certificate(self.ca_pem.as_bytes().to_vec());
        let ctx = tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .unwrap();
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .tls_context(ctx)
            .build_https();
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                id, secret, None, None, "test",
            ))
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .http_client(http)
            .build();
        S3Client::from_conf(conf)
    }

    pub fn client(&self, id: &str, credential: &str) -> S3Client {
        self.client_with_secret(id, &self.secret(id, credential))
    }

    pub fn put(
        &self,
        c: &S3Client,
        bucket: &str,
        key: &str,
        data: &[u8],
    ) -> Result<String, String> {
        self.rt.block_on(async {
            c.put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(data.to_vec()))
                .send()
                .await
                .map(|o| o.e_tag().unwrap_or_default().to_string())
                .map_err(code)
        })
    }

    pub fn get(
        &self,
        c: &S3Client,
        bucket: &str,
        key: &str,
        range: Option<&str>,
    ) -> Result<Vec<u8>, String> {
        self.rt.block_on(async {
            let mut req = c.get_object().bucket(bucket).key(key);
            if let Some(r) = range {
                req = req.range(r);
            }
            let out = req.send().await.map_err(code)?;
            let body = out.body.collect().await.map_err(|e| e.to_string())?;
            Ok(body.into_bytes().to_vec())
        })
    }

    pub fn keys(&self, c: &S3Client, bucket: &str, prefix: &str) -> Result<Vec<String>, String> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut pages = c
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .max_keys(2)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(code)?;
                out.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_string)),
                );
            }
            Ok(out)
        })
    }

    pub fn create_bucket(&self, c: &S3Client, bucket: &str) -> Result<(), String> {
        self.rt.block_on(async {
            c.create_bucket()
                .bucket(bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(code)
        })
    }

    /// The names of the buckets `c` sees.
    pub fn buckets(&self, c: &S3Client) -> Result<Vec<String>, String> {
        self.rt.block_on(async {
            let out = c.list_buckets().send().await.map_err(code)?;
            Ok(out
                .buckets()
                .iter()
                .filter_map(|b| b.name().map(str::to_string))
                .collect())
        })
    }

    /// Starts a multipart upload; its id.
    pub fn create_upload(&self, c: &S3Client, bucket: &str, key: &str) -> Result<String, String> {
        self.rt.block_on(async {
            let up = c
                .create_multipart_upload()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(code)?;
            up.upload_id()
                .map(str::to_string)
                .ok_or_else(|| "no upload id in the answer".to_string())
        })
    }

    /// Uploads part `n` of an upload; its etag.
    pub fn upload_part(
        &self,
        c: &S3Client,
        (bucket, key, id): (&str, &str, &str),
        n: i32,
        data: &[u8],
    ) -> Result<String, String> {
        self.rt.block_on(async {
            let out = c
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .part_number(n)
                .body(ByteStream::from(data.to_vec()))
                .send()
                .await
                .map_err(code)?;
            Ok(out.e_tag().unwrap_or_default().to_string())
        })
    }

    /// The parts of an upload as ListParts gives them: (number, size).
    pub fn parts(
        &self,
        c: &S3Client,
        (bucket, key, id): (&str, &str, &str),
    ) -> Result<Vec<(i32, i64)>, String> {
        self.rt.block_on(async {
            let out = c
                .list_parts()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await
                .map_err(code)?;
            Ok(out
                .parts()
                .iter()
                .map(|p| (p.part_number().unwrap_or(0), p.size().unwrap_or(-1)))
                .collect())
        })
    }

    /// Completes an upload from its parts' (number, etag).
    pub fn complete_upload(
        &self,
        c: &S3Client,
        (bucket, key, id): (&str, &str, &str),
        parts: &[(i32, String)],
    ) -> Result<(), String> {
        let parts = parts
            .iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(*n).e_tag(etag).build())
            .collect();
        self.rt.block_on(async {
            c.complete_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(code)
        })
    }

    pub fn abort_upload(
        &self,
        c: &S3Client,
        (bucket, key, id): (&str, &str, &str),
    ) -> Result<(), String> {
        self.rt.block_on(async {
            c.abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await
                .map(|_| ())
                .map_err(code)
        })
    }

    /// The unfinished uploads of a bucket: (key, upload id).
    pub fn uploads(&self, c: &S3Client, bucket: &str) -> Result<Vec<(String, String)>, String> {
        self.rt.block_on(async {
            let out = c
                .list_multipart_uploads()
                .bucket(bucket)
                .send()
                .await
                .map_err(code)?;
            Ok(out
                .uploads()
                .iter()
                .map(|u| {
                    (
                        u.key().unwrap_or_default().to_string(),
                        u.upload_id().unwrap_or_default().to_string(),
                    )
                })
                .collect())
        })
    }

    pub fn delete(&self, c: &S3Client, bucket: &str, key: &str) -> Result<(), String> {
        self.rt.block_on(async {
            c.delete_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map(|_| ())
                .map_err(code)
        })
    }
}

/// The S3 error code of a failed call (or its description when there is none).
pub fn code<E: ProvideErrorMetadata + std::fmt::Debug>(
    e: aws_sdk_s3::error::SdkError<E>,
) -> String {
    match e.as_service_error().and_then(|s| s.code()) {
        Some(c) => c.to_string(),
        None => format!("{e:?}"),
    }
}

/// A command-line S3 client: from `S3_CLIENTS_BIN_DIR` (scripts/ensure-s3-clients.sh, which
/// the test command runs) or the PATH; `None` (the test skips) when missing, a failure
/// under CI.
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    let dirs = std::env::var_os("S3_CLIENTS_BIN_DIR")
        .into_iter()
        .chain(std::env::var_os("PATH"))
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{name} is not installed: the test command installs it (scripts/ensure-s3-clients.sh)"
    );
    eprintln!("SKIPPED: {name} is not installed; run scripts/ensure-s3-clients.sh");
    None
}
