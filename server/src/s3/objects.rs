//! Object operations: head, get (with a range), put, copy, delete.

use std::time::SystemTime;

use datamover_repo::store::StoreError;
use s3s::dto::{
    CopyObjectInput, CopyObjectOutput, CopyObjectResult, CopySource, DeleteObjectInput,
    DeleteObjectOutput, DeleteObjectsInput, DeleteObjectsOutput, DeletedObject, ETag,
    ETagCondition, GetObjectInput, GetObjectOutput, HeadObjectInput, HeadObjectOutput,
    PutObjectInput, PutObjectOutput, Timestamp,
};

use super::body::{PART, read_stream, write_stream};
use super::error::{GatewayError, GatewayResult};
use super::names::object_key;
use super::{Gateway, MIB};
use crate::access::Op;
use crate::credentials::Identity;

fn no_such_key(bucket: &str, key: &str) -> GatewayError {
    GatewayError::NoSuchKey {
        bucket: bucket.to_string(),
        key: key.chars().take(200).collect(),
    }
}

/// If-Match and If-None-Match of a read, against the object's current etag.
fn check_read(
    etag: &str,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
) -> GatewayResult<()> {
    if let Some(ETagCondition::ETag(e)) = if_match
        && e.value() != etag
    {
        return Err(GatewayError::PreconditionFailed(format!(
            "the object's ETag is \"{etag}\", not the one of If-Match: it was replaced; read it again"
        )));
    }
    match if_none_match {
        Some(ETagCondition::Any) => Err(GatewayError::NotModified),
        Some(ETagCondition::ETag(e)) if e.value() == etag => Err(GatewayError::NotModified),
        _ => Ok(()),
    }
}

fn size_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Gateway {
    pub(super) async fn head_object(
        &self,
        id: &Identity,
        input: HeadObjectInput,
    ) -> GatewayResult<HeadObjectOutput> {
        // What a listing shows (size, etag, time): every role may see it.
        self.require(id, Op::List)?;
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        let head = self
            .objects
            .head(&key)
            .await?
            .ok_or_else(|| no_such_key(&input.bucket, &input.key))?;
        check_read(
            &head.etag,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
        )?;
        Ok(HeadObjectOutput {
            accept_ranges: Some("bytes".into()),
            content_length: Some(size_i64(head.size)),
            e_tag: Some(ETag::Strong(head.etag)),
            last_modified: head.modified.map(Timestamp::from),
            ..Default::default()
        })
    }

    pub(super) async fn get_object(
        &self,
        id: &Identity,
        input: GetObjectInput,
    ) -> GatewayResult<GetObjectOutput> {
        self.require(id, Op::Restore)?;
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        let missing = |e: StoreError| match e {
            StoreError::NotFound(_) => no_such_key(&input.bucket, &input.key),
            other => other.into(),
        };
        let Some(range) = input.range else {
            let (head, body) = self.objects.get(&key, 0).await.map_err(missing)?;
            check_read(
                &head.etag,
                input.if_match.as_ref(),
                input.if_none_match.as_ref(),
            )?;
            return Ok(GetObjectOutput {
                accept_ranges: Some("bytes".into()),
                content_length: Some(size_i64(head.size)),
                e_tag: Some(ETag::Strong(head.etag)),
                last_modified: head.modified.map(Timestamp::from),
                body: Some(read_stream(body, head.size)),
                ..Default::default()
            });
        };
        let head = self
            .objects
            .head(&key)
            .await?
            .ok_or_else(|| no_such_key(&input.bucket, &input.key))?;
        check_read(
            &head.etag,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
        )?;
        let r = range
            .check(head.size)
            .map_err(|_| GatewayError::InvalidRange(head.size))?;
        let len = r.end - r.start;
        let (got, body) = self.objects.get(&key, r.start).await.map_err(missing)?;
        if got.etag != head.etag {
            // Replaced between the two requests: the range was computed on the old one.
            return Err(GatewayError::Store(StoreError::Other {
                what: "a ranged read".into(),
                detail: "the object changed while it was read".into(),
            }));
        }
        Ok(GetObjectOutput {
            accept_ranges: Some("bytes".into()),
            content_length: Some(size_i64(len)),
            content_range: Some(format!(
                "bytes {}-{}/{}",
                r.start,
                r.end.saturating_sub(1),
                head.size
            )),
            e_tag: Some(ETag::Strong(got.etag)),
            last_modified: got.modified.map(Timestamp::from),
            body: Some(read_stream(body, len)),
            ..Default::default()
        })
    }

    pub(super) async fn put_object(
        &self,
        id: &Identity,
        input: PutObjectInput,
    ) -> GatewayResult<PutObjectOutput> {
        self.require(id, Op::Backup)?;
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        self.no_overwrite(id, &key).await?;
        if input.if_match.is_some() || input.if_none_match.is_some() {
            let current = self.objects.head(&key).await?.map(|h| h.etag);
            match (&input.if_none_match, &input.if_match, &current) {
                (Some(ETagCondition::Any), _, Some(_)) => {
                    return Err(GatewayError::PreconditionFailed(
                        "the object exists and If-None-Match: * asks to create it only: use another key".into(),
                    ));
                }
                (_, Some(ETagCondition::ETag(e)), Some(c)) if e.value() != c => {
                    return Err(GatewayError::PreconditionFailed(format!(
                        "the object's ETag is \"{c}\", not the one of If-Match: it was replaced; read it again"
                    )));
                }
                (_, Some(_), None) => return Err(no_such_key(&input.bucket, &input.key)),
                _ => {}
            }
        }
        let declared = input.content_length.and_then(|l| u64::try_from(l).ok());
        let _budget = self.memory(PART as u64 + MIB).await?;
        let (etag, size) = match input.body {
            Some(body) => write_stream(self.objects.as_ref(), &key, body, declared).await?,
            None => {
                let empty = futures::stream::empty::<Result<bytes::Bytes, std::io::Error>>();
                write_stream(self.objects.as_ref(), &key, empty, declared).await?
            }
        };
        tracing::debug!(client = %id.client_id, bucket = %input.bucket, bytes = size, "S3 object stored");
        Ok(PutObjectOutput {
            e_tag: Some(ETag::Strong(etag)),
            size: Some(size_i64(size)),
            ..Default::default()
        })
    }

    pub(super) async fn copy_object(
        &self,
        id: &Identity,
        input: CopyObjectInput,
    ) -> GatewayResult<CopyObjectOutput> {
        self.require(id, Op::Restore)?;
        self.require(id, Op::Backup)?;
        let CopySource::Bucket {
            bucket: src_bucket,
            key: src_key,
            version_id: None,
        } = &input.copy_source
        else {
            return Err(GatewayError::Denied(
                "only copies from a bucket of the same tenant, without a version id, are supported"
                    .into(),
            ));
        };
        if src_bucket.as_ref() != input.bucket.as_str() {
            self.bucket(id, src_bucket, super::owners::Intent::Read)
                .await?;
        }
        let src = object_key(&id.tenant, src_bucket, src_key)?;
        let dst = object_key(&id.tenant, &input.bucket, &input.key)?;
        self.no_overwrite(id, &dst).await?;
        let _budget = self.memory(PART as u64 + MIB).await?;
        let (head, body) = self.objects.get(&src, 0).await.map_err(|e| match e {
            StoreError::NotFound(_) => no_such_key(src_bucket, src_key),
            other => other.into(),
        })?;
        let (etag, _) = write_stream(self.objects.as_ref(), &dst, body, Some(head.size)).await?;
        Ok(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(ETag::Strong(etag)),
                last_modified: Some(Timestamp::from(SystemTime::now())),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub(super) async fn delete_object(
        &self,
        id: &Identity,
        input: DeleteObjectInput,
    ) -> GatewayResult<DeleteObjectOutput> {
        self.require(id, Op::Delete)?;
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        self.objects.delete(&key).await?;
        tracing::debug!(client = %id.client_id, bucket = %input.bucket, "S3 object deleted");
        Ok(DeleteObjectOutput::default())
    }

    pub(super) async fn delete_objects(
        &self,
        id: &Identity,
        input: DeleteObjectsInput,
    ) -> GatewayResult<DeleteObjectsOutput> {
        self.require(id, Op::Delete)?;
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for o in input.delete.objects {
            let done = match object_key(&id.tenant, &input.bucket, &o.key) {
                Ok(key) => self.objects.delete(&key).await.map_err(GatewayError::from),
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => deleted.push(DeletedObject {
                    key: Some(o.key),
                    ..Default::default()
                }),
                Err(e) => {
                    let e = s3s::S3Error::from(e);
                    errors.push(s3s::dto::Error {
                        code: Some(e.code().as_str().to_string()),
                        key: Some(o.key),
                        message: e.message().map(str::to_string),
                        ..Default::default()
                    });
                }
            }
        }
        tracing::debug!(client = %id.client_id, bucket = %input.bucket, deleted = deleted.len(), "S3 objects deleted");
        let quiet = input.delete.quiet.unwrap_or(false);
        Ok(DeleteObjectsOutput {
            deleted: Some(if quiet { Vec::new() } else { deleted }),
            errors: Some(errors),
            ..Default::default()
        })
    }
}
