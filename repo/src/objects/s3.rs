//! Plain objects in an S3 bucket, under a prefix of their own.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{ByteStream, FileMeta, ObjectHead, ObjectInfo, ObjectStore, Part};
use crate::store::{S3Store, StoreError};

/// Plain objects under `root` in the bucket of an [`S3Store`] (same client, endpoint and
/// credentials as the repository).
pub struct S3Objects {
    s3: S3Store,
    root: String,
}

fn etag(e: Option<&str>) -> String {
    e.unwrap_or("").trim_matches('"').to_string()
}

fn system_time(t: Option<&aws_smithy_types::DateTime>) -> Option<std::time::SystemTime> {
    t.and_then(|t| std::time::SystemTime::try_from(*t).ok())
}

impl S3Objects {
    /// `root` is a key prefix relative to the bucket (the repository's own prefix is not
    /// added).
    pub fn new(s3: &S3Store, root: &str) -> Self {
        S3Objects {
            s3: s3.clone(),
            root: root.trim_matches('/').to_string(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.root.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.root)
        }
    }

    fn head_of(
        size: Option<i64>,
        e: Option<&str>,
        modified: Option<&aws_smithy_types::DateTime>,
        meta: Option<&std::collections::HashMap<String, String>>,
    ) -> ObjectHead {
        ObjectHead {
            size: size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            etag: etag(e),
            modified: system_time(modified),
            meta: meta.and_then(|m| FileMeta::from_lookup(|k| m.get(k).cloned())),
        }
    }

    fn info(&self, obj: &aws_sdk_s3::types::Object) -> Option<ObjectInfo> {
        let strip = if self.root.is_empty() {
            0
        } else {
            self.root.len() + 1
        };
        let rel = obj.key()?.get(strip..)?;
        Some(ObjectInfo {
            key: rel.to_string(),
            size: obj.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            etag: etag(obj.e_tag()),
            modified: system_time(obj.last_modified()),
        })
    }

    /// The keys under `full` (a bucket key prefix) after `after` and up to and including
    /// `upto`, in order.
    async fn list_range(
        &self,
        full: &str,
        after: Option<String>,
        upto: Option<String>,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = Vec::new();
        let mut pages = self
            .s3
            .client
            .list_objects_v2()
            .bucket(&self.s3.bucket)
            .prefix(full)
            .set_start_after(after)
            .into_paginator()
            .send();
        // Bounded: one page per 1000 objects; ends past `upto` or when S3 reports no
        // continuation.
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.s3.map(e, full))?;
            for obj in page.contents() {
                let end = match (&upto, obj.key()) {
                    (Some(upto), Some(k)) if k > upto.as_str() => return Ok(out),
                    (Some(upto), Some(k)) => k == upto.as_str(),
                    _ => false,
                };
                out.extend(self.info(obj));
                // The range's last key: no need to ask for another page.
                if end {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}

/// Ranges of one split listing requested at once.
const LIST_CONCURRENCY: usize = 8;

#[async_trait]
impl ObjectStore for S3Objects {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.s3.bucket, self.root)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.list_range(&self.key(prefix), None, None).await
    }

    async fn list_split(
        &self,
        prefix: &str,
        bounds: &[String],
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut bounds: Vec<&String> = bounds.iter().filter(|b| b.starts_with(prefix)).collect();
        bounds.sort();
        bounds.dedup();
        if bounds.is_empty() {
            return self.list(prefix).await;
        }
        let full = self.key(prefix);
        let full_bounds: Vec<String> = bounds.iter().map(|b| self.key(b)).collect();
        // Range i holds the keys after bound i-1 up to and including bound i; the last
        // one runs to the end of the prefix. Together they are the whole listing, once.
        let ranges = (0..=full_bounds.len()).map(|i| {
            let after = i.checked_sub(1).and_then(|j| full_bounds.get(j)).cloned();
            let upto = full_bounds.get(i).cloned();
            let full = full.clone();
            async move { self.list_range(&full, after, upto).await }
        });
        let parts: Vec<Vec<ObjectInfo>> = futures::stream::iter(ranges)
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectHead>, StoreError> {
        let full = self.key(key);
        match self
            .s3
            .client
            .head_object()
            .bucket(&self.s3.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(o) => Ok(Some(Self::head_of(
                o.content_length(),
                o.e_tag(),
                o.last_modified(),
                o.metadata(),
            ))),
            Err(e) => match self.s3.map(e, &full) {
                StoreError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn get(&self, key: &str, offset: u64) -> Result<(ObjectHead, ByteStream), StoreError> {
        let full = self.key(key);
        let mut req = self
            .s3
            .client
            .get_object()
            .bucket(&self.s3.bucket)
            .key(&full);
        if offset > 0 {
            req = req.range(format!("bytes={offset}-"));
        }
        let out = req.send().await.map_err(|e| self.s3.map(e, &full))?;
        let mut head = Self::head_of(
            out.content_length(),
            out.e_tag(),
            out.last_modified(),
            out.metadata(),
        );
        // With a range, the length is the rest; the total follows the '/' of the range.
        head.size = match out.content_range().and_then(|r| r.rsplit('/').next()) {
            Some(total) => total.parse().unwrap_or(head.size + offset),
            None => head.size + offset,
        };
        let location = self.location();
        let body = futures::stream::unfold(Some(out.body), move |body| {
            let location = location.clone();
            let full = full.clone();
            async move {
                let mut body: S3Body = body?;
                match body.next().await {
                    None => None,
                    Some(Ok(b)) => Some((Ok(b), Some(body))),
                    Some(Err(e)) => Some((
                        Err(StoreError::Unreachable {
                            location,
                            detail: format!("reading {full}: {e}"),
                        }),
                        None,
                    )),
                }
            }
        });
        Ok((head, Box::pin(body)))
    }

    async fn put(
        &self,
        key: &str,
        data: Bytes,
        meta: Option<FileMeta>,
    ) -> Result<String, StoreError> {
        let full = self.key(key);
        let mut req = self
            .s3
            .client
            .put_object()
            .bucket(&self.s3.bucket)
            .key(&full);
        for (k, v) in meta.map(FileMeta::to_pairs).into_iter().flatten() {
            req = req.metadata(k, v);
        }
        let out = req
            .body(S3Body::from(data))
            .send()
            .await
            .map_err(|e| self.s3.map(e, &full))?;
        Ok(etag(out.e_tag()))
    }

    async fn create_multipart(&self, key: &str, meta: FileMeta) -> Result<String, StoreError> {
        let full = self.key(key);
        let mut req = self
            .s3
            .client
            .create_multipart_upload()
            .bucket(&self.s3.bucket)
            .key(&full);
        for (k, v) in meta.to_pairs() {
            req = req.metadata(k, v);
        }
        let out = req.send().await.map_err(|e| self.s3.map(e, &full))?;
        out.upload_id()
            .map(str::to_string)
            .ok_or_else(|| StoreError::Other {
                what: full,
                detail: "the storage returned no upload id".into(),
            })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> Result<String, StoreError> {
        let full = self.key(key);
        let out = self
            .s3
            .client
            .upload_part()
            .bucket(&self.s3.bucket)
            .key(&full)
            .upload_id(upload_id)
            .part_number(number)
            .body(S3Body::from(data))
            .send()
            .await
            .map_err(|e| self.s3.map(e, &full))?;
        Ok(etag(out.e_tag()))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[Part],
    ) -> Result<String, StoreError> {
        let full = self.key(key);
        let parts = parts
            .iter()
            .map(|(n, e)| {
                CompletedPart::builder()
                    .part_number(*n)
                    .e_tag(format!("\"{e}\""))
                    .build()
            })
            .collect();
        let out = self
            .s3
            .client
            .complete_multipart_upload()
            .bucket(&self.s3.bucket)
            .key(&full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.s3.map(e, &full))?;
        Ok(etag(out.e_tag()))
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let full = self.key(key);
        match self
            .s3
            .client
            .abort_multipart_upload()
            .bucket(&self.s3.bucket)
            .key(&full)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.s3.map(e, &full) {
                StoreError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.key(key);
        self.s3
            .client
            .delete_object()
            .bucket(&self.s3.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.s3.map(e, &full))?;
        Ok(())
    }
}
