//! The S3 gateway: any S3 tool, with a per-client key, never the storage keys.
//!
//! `PROTOCOLS` entry `s3:<port>` serves the S3 API over TLS (the gRPC certificate) on that
//! port. The S3 protocol, SigV4 and XML come from the `s3s` library; this module maps its
//! operations onto the plain objects of edge sync:
//!
//! - [`auth`]: access key = client id, secret derived from the client's credential file;
//!   looked up through the live credential store on every request, so rotation and
//!   revocation apply at once.
//! - [`names`]: a tenant's bucket is a sync target, a key a path under it:
//!   `<sync prefix>/<tenant>/<bucket>/<key>`.
//! - [`listing`]: ListObjects(V2) pages with prefix, delimiter and continuation.
//! - [`objects`]: head, get (with a range), put (streamed), copy, delete.
//! - [`owners`]: bucket names are one namespace across tenants; a bucket is its creator's
//!   (recorded in the store), every other tenant gets AccessDenied.
//! - [`multipart`]: create, upload part, complete, abort, list parts, list uploads, on
//!   [`uploads`] recorded in the store (they survive restarts; maintenance aborts old ones).
//! - [`body`]: bodies in pieces between clients and the store.
//! - [`listener`]: the TLS listener.
//! - [`error`]: the gateway's errors and the S3 error each one answers.
//!
//! Roles: `append` may list and put but neither overwrite nor delete; `read` may list and
//! get; `full` and `admin` may do everything within their tenant. Everything else of the
//! S3 API answers NotImplemented. Every request takes from the client's rate limit
//! ([`crate::limits`]; over it: SlowDown), and refused signatures are answered more and
//! more slowly ([`listener`]).

use std::sync::Arc;

use datamover_repo::objects::ObjectStore;
use s3s::dto::{
    AbortMultipartUploadInput, AbortMultipartUploadOutput, Bucket, CommonPrefix,
    CompleteMultipartUploadInput, CompleteMultipartUploadOutput, CopyObjectInput, CopyObjectOutput,
    CreateBucketInput, CreateBucketOutput, CreateMultipartUploadInput, CreateMultipartUploadOutput,
    DeleteBucketInput, DeleteBucketOutput, DeleteObjectInput, DeleteObjectOutput,
    DeleteObjectsInput, DeleteObjectsOutput, ETag, GetBucketLocationInput, GetBucketLocationOutput,
    GetObjectInput, GetObjectOutput, HeadBucketInput, HeadBucketOutput, HeadObjectInput,
    HeadObjectOutput, ListBucketsInput, ListBucketsOutput, ListMultipartUploadsInput,
    ListMultipartUploadsOutput, ListObjectsInput, ListObjectsOutput, ListObjectsV2Input,
    ListObjectsV2Output, ListPartsInput, ListPartsOutput, Object, PutObjectInput, PutObjectOutput,
    Timestamp, UploadPartInput, UploadPartOutput,
};
use s3s::{S3, S3Request, S3Response, S3Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::access::{Op, Role};
use crate::credentials::{CredentialStore, Identity};
use crate::metrics::Metrics;

pub mod auth;
pub mod body;
pub mod error;
pub mod listener;
pub mod listing;
pub mod multipart;
pub mod names;
pub mod objects;
pub mod owners;
pub mod uploads;

use auth::{GatewayAuth, GatewayKey};
use error::{GatewayError, GatewayResult};
use listing::{Listed, page};
use names::{bucket_prefix, dir_of, tenant_prefix};
use owners::{Intent, Owned};

const MIB: u64 = 1024 * 1024;
/// Memory for request bodies in flight (parts being stored), in MiB.
const MEMORY_BUDGET_MIB: u32 = 160;
/// Keys per listing page at most, as in S3.
const MAX_KEYS: usize = 1000;

/// The S3 operations of the gateway.
pub struct Gateway {
    objects: Arc<dyn ObjectStore>,
    metrics: Arc<Metrics>,
    auth: GatewayAuth,
    owners: owners::Owners,
    budget: Arc<Semaphore>,
}

impl Gateway {
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        creds: Arc<CredentialStore>,
        key: GatewayKey,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gateway {
            objects,
            metrics,
            auth: GatewayAuth { creds, key },
            owners: owners::Owners::default(),
            budget: Arc::new(Semaphore::new(MEMORY_BUDGET_MIB as usize)),
        }
    }

    /// The signer's current identity: the S3 library has checked the signature with the
    /// secret of this access key already.
    fn caller<T>(&self, req: &S3Request<T>) -> GatewayResult<Identity> {
        let Some(c) = &req.credentials else {
            return Err(GatewayError::Denied(
                "anonymous requests are not served: sign requests with the client id as access key and its S3 secret".into(),
            ));
        };
        let id = self.auth.identity(&c.access_key)?;
        if let Some(r) = req.extensions.get::<listener::Reached>() {
            r.set();
        }
        crate::limits::global()
            .take(&id.client_id)
            .map_err(GatewayError::SlowDown)?;
        Ok(id)
    }

    /// The tenants of the clients with a credential file, but `tenant`.
    fn other_tenants(&self, tenant: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .auth
            .creds
            .client_ids()
            .into_iter()
            .filter_map(|c| self.auth.creds.lookup_derived(&c).map(|(id, _)| id.tenant))
            .filter(|t| t != tenant)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Checks that `bucket` is the caller's tenant's (or nobody's): another tenant's is
    /// AccessDenied. With [`Intent::Write`] a free name becomes the caller's.
    async fn bucket(&self, id: &Identity, bucket: &str, intent: Intent) -> GatewayResult<Owned> {
        let owned = self
            .owners
            .resolve(self.objects.as_ref(), &id.tenant, bucket, intent, || {
                self.other_tenants(&id.tenant)
            })
            .await?;
        if owned == Owned::Other {
            tracing::info!(client = %id.client_id, tenant = %id.tenant, bucket, "S3 request on another tenant's bucket refused");
            return Err(GatewayError::Denied(format!(
                "bucket '{bucket}' belongs to another tenant: client '{}' may use only its own tenant's buckets; choose another bucket name",
                id.client_id
            )));
        }
        Ok(owned)
    }

    fn require(&self, id: &Identity, op: Op) -> GatewayResult<()> {
        if id.role.allows(op) {
            return Ok(());
        }
        let (what, needs) = match op {
            Op::Backup => ("write objects", "append or full"),
            Op::Restore => ("read objects", "read or full"),
            Op::Delete => ("delete objects", "full"),
            _ => ("do this", "full"),
        };
        Err(GatewayError::Denied(format!(
            "client '{}' has role {} and may not {what}; ask the operator for role {needs} (config key 'roles' of the DatamoverServer)",
            id.client_id, id.role
        )))
    }

    /// A client with role append may add objects but not replace one.
    async fn no_overwrite(&self, id: &Identity, key: &str) -> GatewayResult<()> {
        if id.role == Role::Append && self.objects.head(key).await?.is_some() {
            return Err(GatewayError::Denied(format!(
                "client '{}' has role append and may not overwrite an existing object: write under a new key, or ask the operator for role full",
                id.client_id
            )));
        }
        Ok(())
    }

    /// Waits for `bytes` of the memory budget for bodies in flight.
    async fn memory(&self, bytes: u64) -> GatewayResult<OwnedSemaphorePermit> {
        let mib = u32::try_from(bytes.div_ceil(MIB).max(1))
            .unwrap_or(MEMORY_BUDGET_MIB)
            .min(MEMORY_BUDGET_MIB);
        Arc::clone(&self.budget)
            .acquire_many_owned(mib)
            .await
            .map_err(|_| GatewayError::Unavailable)
    }

    /// The objects of a bucket under the directory of `prefix`, keys relative to the bucket.
    async fn listed(
        &self,
        id: &Identity,
        bucket: &str,
        prefix: &str,
    ) -> GatewayResult<Vec<Listed>> {
        self.require(id, Op::List)?;
        let base = bucket_prefix(&id.tenant, bucket)?;
        let infos = self
            .objects
            .list(&format!("{base}{}", dir_of(prefix)))
            .await?;
        Ok(infos
            .into_iter()
            .filter_map(|o| {
                let key = o.key.strip_prefix(&base)?.to_string();
                names::check_key(&key).ok()?;
                Some(Listed {
                    key,
                    size: o.size,
                    etag: o.etag,
                    modified: o.modified,
                })
            })
            .collect())
    }

    /// The caller's tenant's buckets: the names holding objects in its namespace (sync
    /// targets included) and those it created, less any another tenant owns.
    async fn list_buckets(&self, id: &Identity) -> GatewayResult<ListBucketsOutput> {
        self.require(id, Op::List)?;
        let base = tenant_prefix(&id.tenant)?;
        let infos = self.objects.list(&base).await?;
        let mut found = listing::buckets(
            infos
                .iter()
                .filter_map(|o| Some((o.key.strip_prefix(&base)?, o.modified))),
        );
        for name in self
            .owners
            .entries(self.objects.as_ref(), &id.tenant)
            .await?
        {
            if !found.iter().any(|(n, _)| *n == name) {
                found.push((name, None));
            }
        }
        found.sort();
        let mut buckets = Vec::with_capacity(found.len());
        for (name, created) in found {
            if !owners::valid_bucket_name(&name) {
                continue;
            }
            let owned = self
                .owners
                .resolve(
                    self.objects.as_ref(),
                    &id.tenant,
                    &name,
                    Intent::Read,
                    || self.other_tenants(&id.tenant),
                )
                .await?;
            if owned == Owned::Mine {
                buckets.push(Bucket {
                    name: Some(name),
                    creation_date: created.map(Timestamp::from),
                    ..Default::default()
                });
            }
        }
        Ok(ListBucketsOutput {
            buckets: Some(buckets),
            ..Default::default()
        })
    }

    async fn list_v2(
        &self,
        id: &Identity,
        input: ListObjectsV2Input,
    ) -> GatewayResult<ListObjectsV2Output> {
        let prefix = input.prefix.clone().unwrap_or_default();
        let all = self.listed(id, &input.bucket, &prefix).await?;
        let after = input
            .continuation_token
            .as_deref()
            .map(decode_token)
            .transpose()?
            .or_else(|| input.start_after.clone());
        let max = max_keys(input.max_keys);
        let p = page(
            all,
            &prefix,
            input.delimiter.as_deref(),
            after.as_deref(),
            max,
        );
        let count = p.objects.len() + p.prefixes.len();
        Ok(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            max_keys: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            key_count: Some(i32::try_from(count).unwrap_or(i32::MAX)),
            continuation_token: input.continuation_token,
            start_after: input.start_after,
            is_truncated: Some(p.next.is_some()),
            next_continuation_token: p.next.as_deref().map(encode_token),
            contents: Some(p.objects.into_iter().map(object).collect()),
            common_prefixes: Some(prefixes(p.prefixes)),
            ..Default::default()
        })
    }

    async fn list_v1(
        &self,
        id: &Identity,
        input: ListObjectsInput,
    ) -> GatewayResult<ListObjectsOutput> {
        let prefix = input.prefix.clone().unwrap_or_default();
        let all = self.listed(id, &input.bucket, &prefix).await?;
        let max = max_keys(input.max_keys);
        let p = page(
            all,
            &prefix,
            input.delimiter.as_deref(),
            input.marker.as_deref(),
            max,
        );
        Ok(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            marker: input.marker,
            max_keys: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            is_truncated: Some(p.next.is_some()),
            next_marker: p.next,
            contents: Some(p.objects.into_iter().map(object).collect()),
            common_prefixes: Some(prefixes(p.prefixes)),
            ..Default::default()
        })
    }

    /// A bucket becomes the caller's tenant's, unless another tenant owns the name
    /// (BucketAlreadyExists); creating one's own bucket again succeeds.
    async fn create_bucket(
        &self,
        id: &Identity,
        bucket: &str,
    ) -> GatewayResult<CreateBucketOutput> {
        self.require(id, Op::Backup)?;
        bucket_prefix(&id.tenant, bucket)?;
        let owned = self
            .owners
            .resolve(
                self.objects.as_ref(),
                &id.tenant,
                bucket,
                Intent::Write,
                || self.other_tenants(&id.tenant),
            )
            .await?;
        if owned != Owned::Mine {
            return Err(GatewayError::BucketAlreadyExists(bucket.to_string()));
        }
        Ok(CreateBucketOutput::default())
    }

    /// An empty bucket's name is free again once its owner deletes it.
    async fn delete_bucket(
        &self,
        id: &Identity,
        bucket: &str,
    ) -> GatewayResult<DeleteBucketOutput> {
        self.require(id, Op::Delete)?;
        if !self.listed(id, bucket, "").await?.is_empty() {
            return Err(GatewayError::BucketNotEmpty(bucket.to_string()));
        }
        if !uploads::in_bucket(self.objects.as_ref(), bucket)
            .await?
            .is_empty()
        {
            return Err(GatewayError::BucketNotEmpty(bucket.to_string()));
        }
        self.owners
            .release(self.objects.as_ref(), &id.tenant, bucket)
            .await?;
        Ok(DeleteBucketOutput::default())
    }

    /// HeadBucket and GetBucketLocation: the bucket must be the caller's.
    async fn existing(&self, id: &Identity, bucket: &str) -> GatewayResult<()> {
        self.require(id, Op::List)?;
        bucket_prefix(&id.tenant, bucket)?;
        match self.bucket(id, bucket, Intent::Read).await? {
            Owned::Mine => Ok(()),
            _ => Err(GatewayError::NoSuchBucket(bucket.to_string())),
        }
    }
}

fn max_keys(asked: Option<i32>) -> usize {
    asked
        .and_then(|m| usize::try_from(m).ok())
        .unwrap_or(MAX_KEYS)
        .min(MAX_KEYS)
}

fn object(o: Listed) -> Object {
    Object {
        key: Some(o.key),
        size: Some(i64::try_from(o.size).unwrap_or(i64::MAX)),
        e_tag: Some(ETag::Strong(o.etag)),
        last_modified: o.modified.map(Timestamp::from),
        ..Default::default()
    }
}

fn prefixes(p: Vec<String>) -> Vec<CommonPrefix> {
    p.into_iter()
        .map(|p| CommonPrefix { prefix: Some(p) })
        .collect()
}

fn encode_token(after: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(after)
}

fn decode_token(token: &str) -> GatewayResult<String> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            GatewayError::BadKey("continuation token (pass the one the last page returned)".into())
        })
}

/// Runs one operation as its signer, and counts it; with `bucket: <intent>`, first checks
/// that the input's bucket is the caller's tenant's (see [`Gateway::bucket`]).
macro_rules! op {
    ($self:ident, $req:ident, $name:literal, bucket: $intent:expr, |$id:ident, $input:ident| $body:expr) => {{
        op!($self, $req, $name, |$id, $input| async {
            $self.bucket(&$id, &$input.bucket, $intent).await?;
            $body.await
        })
    }};
    ($self:ident, $req:ident, $name:literal, |$id:ident, $input:ident| $body:expr) => {{
        let result: GatewayResult<_> = async {
            let $id = $self.caller(&$req)?;
            let $input = $req.input;
            $body.await
        }
        .await;
        let result = result.map(S3Response::new).map_err(s3s::S3Error::from);
        $self.count($name, &result);
        result
    }};
}

impl Gateway {
    fn count<T>(&self, op: &'static str, result: &S3Result<T>) {
        let code = match result {
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        };
        self.metrics
            .s3_requests
            .with_label_values(&[op, code])
            .inc();
    }
}

#[async_trait::async_trait]
impl S3 for Gateway {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        op!(self, req, "list_buckets", |id, _input| self
            .list_buckets(&id))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        op!(self, req, "head_bucket", |id, input| async {
            self.existing(&id, &input.bucket).await?;
            Ok::<_, GatewayError>(HeadBucketOutput::default())
        })
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        op!(self, req, "create_bucket", |id, input| self
            .create_bucket(&id, &input.bucket))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        op!(self, req, "delete_bucket", bucket: Intent::Read, |id, input| self
            .delete_bucket(&id, &input.bucket))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        op!(self, req, "get_bucket_location", |id, input| async {
            self.existing(&id, &input.bucket).await?;
            Ok::<_, GatewayError>(GetBucketLocationOutput::default())
        })
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        op!(self, req, "list_objects_v2", bucket: Intent::Read, |id, input| self
            .list_v2(&id, input))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        op!(self, req, "list_objects", bucket: Intent::Read, |id, input| self
            .list_v1(&id, input))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        op!(self, req, "head_object", bucket: Intent::Read, |id, input| self
            .head_object(&id, input))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        op!(self, req, "get_object", bucket: Intent::Read, |id, input| self
            .get_object(&id, input))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        op!(self, req, "put_object", bucket: Intent::Write, |id, input| self
            .put_object(&id, input))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        op!(self, req, "copy_object", bucket: Intent::Write, |id, input| self
            .copy_object(&id, input))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        op!(self, req, "delete_object", bucket: Intent::Read, |id, input| self
            .delete_object(&id, input))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        op!(self, req, "delete_objects", bucket: Intent::Read, |id, input| self
            .delete_objects(&id, input))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        op!(self, req, "create_multipart_upload", bucket: Intent::Write, |id, input| self
            .create_upload(&id, input))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        op!(self, req, "upload_part", bucket: Intent::Write, |id, input| self
            .upload_part(&id, input))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        op!(self, req, "complete_multipart_upload", bucket: Intent::Write, |id, input| self
            .complete_upload(&id, input))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        op!(self, req, "abort_multipart_upload", bucket: Intent::Read, |id, input| self
            .abort_upload(&id, input))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        op!(self, req, "list_parts", bucket: Intent::Read, |id, input| self
            .list_parts(&id, input))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        op!(self, req, "list_multipart_uploads", bucket: Intent::Read, |id, input| self
            .list_uploads(&id, input))
    }
}
