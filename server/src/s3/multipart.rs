//! Multipart uploads of S3 clients, on top of the store's multipart uploads.
//!
//! The store's upload id is handed to the client. Which tenant and key each upload belongs
//! to, and the parts received (for ListParts, ListMultipartUploads and to check
//! CompleteMultipartUpload), are recorded in the store ([`super::uploads`]), so an upload
//! goes on across replicas and restarts; maintenance aborts the abandoned ones.

use s3s::dto::{
    AbortMultipartUploadInput, AbortMultipartUploadOutput, CommonPrefix,
    CompleteMultipartUploadInput, CompleteMultipartUploadOutput, CreateMultipartUploadInput,
    CreateMultipartUploadOutput, ETag, ListMultipartUploadsInput, ListMultipartUploadsOutput,
    ListPartsInput, ListPartsOutput, MultipartUpload, Part, Timestamp, UploadPartInput,
    UploadPartOutput,
};

use super::body::{collect, meta_for};
use super::error::{GatewayError, GatewayResult};
use super::names::object_key;
use super::owners::now_unix;
use super::uploads::{self, PartInfo, UploadRecord};
use super::{Gateway, MIB};
use crate::access::Op;
use crate::credentials::Identity;

/// The largest part the gateway accepts (it holds one part in memory while storing it).
pub const MAX_PART: u64 = 64 * MIB;
/// Parts per ListParts page at most, uploads per ListMultipartUploads page at most.
const MAX_LIST_PARTS: usize = 1000;

impl Gateway {
    /// The caller's upload `upload_id` of `key` in `bucket`.
    async fn upload(
        &self,
        id: &Identity,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> GatewayResult<UploadRecord> {
        object_key(&id.tenant, bucket, key)?;
        uploads::find(self.objects.as_ref(), &id.tenant, bucket, key, upload_id).await
    }

    /// ListMultipartUploads: the uploads in progress in a bucket, by key then upload id,
    /// after the markers, folded by the delimiter.
    pub(super) async fn list_uploads(
        &self,
        id: &Identity,
        input: ListMultipartUploadsInput,
    ) -> GatewayResult<ListMultipartUploadsOutput> {
        self.require(id, Op::List)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let mut all: Vec<UploadRecord> = uploads::in_bucket(self.objects.as_ref(), &input.bucket)
            .await?
            .into_iter()
            .filter(|u| u.tenant == id.tenant && u.key.starts_with(&prefix))
            .collect();
        all.sort_by(|a, b| (&a.key, &a.upload_id).cmp(&(&b.key, &b.upload_id)));
        let key_marker = input.key_marker.clone().unwrap_or_default();
        let id_marker = input.upload_id_marker.clone();
        let after = all.into_iter().filter(|u| match &id_marker {
            Some(m) if u.key == key_marker => u.upload_id > *m,
            _ => u.key > key_marker,
        });
        let max = input
            .max_uploads
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(MAX_LIST_PARTS)
            .clamp(1, MAX_LIST_PARTS);
        let mut listed = Vec::new();
        let mut common: Vec<String> = Vec::new();
        let mut truncated = false;
        let mut last: Option<(String, String)> = None;
        for u in after {
            if listed.len() + common.len() >= max {
                truncated = true;
                break;
            }
            if let Some(d) = &delimiter
                && let Some(i) = u.key[prefix.len()..].find(d.as_str())
            {
                let p = u.key[..prefix.len() + i + d.len()].to_string();
                if common.last() != Some(&p) {
                    common.push(p);
                }
                last = Some((u.key.clone(), u.upload_id.clone()));
                continue;
            }
            last = Some((u.key.clone(), u.upload_id.clone()));
            listed.push(MultipartUpload {
                key: Some(u.key),
                upload_id: Some(u.upload_id),
                initiated: Some(Timestamp::from(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(u.created_unix),
                )),
                ..Default::default()
            });
        }
        let (next_key, next_id) = match (truncated, last) {
            (true, Some((k, i))) => (Some(k), Some(i)),
            _ => (None, None),
        };
        Ok(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            is_truncated: Some(truncated),
            next_key_marker: next_key,
            next_upload_id_marker: next_id,
            uploads: Some(listed),
            common_prefixes: Some(
                common
                    .into_iter()
                    .map(|p| CommonPrefix { prefix: Some(p) })
                    .collect(),
            ),
            ..Default::default()
        })
    }

    pub(super) async fn create_upload(
        &self,
        id: &Identity,
        input: CreateMultipartUploadInput,
    ) -> GatewayResult<CreateMultipartUploadOutput> {
        self.require(id, Op::Backup)?;
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        self.no_overwrite(id, &key).await?;
        let upload_id = self.objects.create_multipart(&key, meta_for(None)).await?;
        let record = UploadRecord {
            upload_id: upload_id.clone(),
            tenant: id.tenant.clone(),
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            store_key: key,
            created_unix: now_unix(),
        };
        if let Err(e) = uploads::start(self.objects.as_ref(), &record).await {
            let _ = self
                .objects
                .abort_multipart(&record.store_key, &upload_id)
                .await;
            return Err(e);
        }
        tracing::debug!(client = %id.client_id, bucket = %input.bucket, "S3 multipart upload started");
        Ok(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload_id),
            ..Default::default()
        })
    }

    pub(super) async fn upload_part(
        &self,
        id: &Identity,
        input: UploadPartInput,
    ) -> GatewayResult<UploadPartOutput> {
        self.require(id, Op::Backup)?;
        let record = self
            .upload(id, &input.bucket, &input.key, &input.upload_id)
            .await?;
        let key = record.store_key.clone();
        if !(1..=10_000).contains(&input.part_number) {
            return Err(GatewayError::InvalidPart(format!(
                "part number {} is outside 1 to 10000",
                input.part_number
            )));
        }
        let declared = input.content_length.and_then(|l| u64::try_from(l).ok());
        if declared.is_some_and(|d| d > MAX_PART) {
            return Err(GatewayError::TooLarge(format!(
                "a part may hold at most {} MiB: use smaller parts (for example 8 MiB)",
                MAX_PART / MIB
            )));
        }
        let _budget = self
            .memory(declared.unwrap_or(MAX_PART).min(MAX_PART))
            .await?;
        let data = match input.body {
            Some(body) => collect(body, declared, MAX_PART).await?,
            None => bytes::Bytes::new(),
        };
        let size = data.len() as u64;
        let etag = self
            .objects
            .upload_part(&key, &input.upload_id, input.part_number, data)
            .await?;
        uploads::add_part(
            self.objects.as_ref(),
            &record,
            input.part_number,
            &etag,
            size,
        )
        .await?;
        Ok(UploadPartOutput {
            e_tag: Some(ETag::Strong(etag)),
            ..Default::default()
        })
    }

    pub(super) async fn complete_upload(
        &self,
        id: &Identity,
        input: CompleteMultipartUploadInput,
    ) -> GatewayResult<CompleteMultipartUploadOutput> {
        self.require(id, Op::Backup)?;
        let record = self
            .upload(id, &input.bucket, &input.key, &input.upload_id)
            .await?;
        let key = record.store_key.clone();
        let known = uploads::parts(self.objects.as_ref(), &record).await?;
        let asked = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        if asked.is_empty() {
            return Err(GatewayError::InvalidPart(
                "CompleteMultipartUpload lists no parts: list every uploaded part with its number and ETag".into(),
            ));
        }
        let mut parts = Vec::with_capacity(asked.len());
        let mut previous = 0;
        for p in asked {
            let number = p.part_number.unwrap_or(0);
            let Some(info) = known.get(&number) else {
                return Err(GatewayError::InvalidPart(format!(
                    "part {number} was not uploaded: upload it, or leave it out of the list"
                )));
            };
            if let Some(e) = p.e_tag
                && e.value() != info.etag
            {
                return Err(GatewayError::InvalidPart(format!(
                    "part {number} has ETag \"{}\", not the one given: list the ETag UploadPart returned",
                    info.etag
                )));
            }
            if number <= previous {
                return Err(GatewayError::InvalidPart(
                    "parts must be listed in ascending order of their numbers".into(),
                ));
            }
            previous = number;
            parts.push((number, info.etag.clone()));
        }
        self.no_overwrite(id, &key).await?;
        let etag = self
            .objects
            .complete_multipart(&key, &input.upload_id, &parts)
            .await?;
        uploads::remove(self.objects.as_ref(), &input.bucket, &input.upload_id).await?;
        tracing::debug!(client = %id.client_id, bucket = %input.bucket, parts = parts.len(), "S3 multipart upload completed");
        Ok(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            e_tag: Some(ETag::Strong(etag)),
            ..Default::default()
        })
    }

    pub(super) async fn abort_upload(
        &self,
        id: &Identity,
        input: AbortMultipartUploadInput,
    ) -> GatewayResult<AbortMultipartUploadOutput> {
        self.require(id, Op::Backup)?;
        let record = self
            .upload(id, &input.bucket, &input.key, &input.upload_id)
            .await?;
        match self
            .objects
            .abort_multipart(&record.store_key, &input.upload_id)
            .await
        {
            Ok(()) | Err(datamover_repo::store::StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        uploads::remove(self.objects.as_ref(), &input.bucket, &input.upload_id).await?;
        Ok(AbortMultipartUploadOutput::default())
    }

    pub(super) async fn list_parts(
        &self,
        id: &Identity,
        input: ListPartsInput,
    ) -> GatewayResult<ListPartsOutput> {
        self.require(id, Op::List)?;
        let record = self
            .upload(id, &input.bucket, &input.key, &input.upload_id)
            .await?;
        let known = uploads::parts(self.objects.as_ref(), &record).await?;
        let marker = input.part_number_marker.unwrap_or(0);
        let max = input
            .max_parts
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(MAX_LIST_PARTS)
            .min(MAX_LIST_PARTS);
        let after: Vec<(i32, PartInfo)> = known.into_iter().filter(|(n, _)| *n > marker).collect();
        let truncated = after.len() > max;
        let page: Vec<Part> = after
            .into_iter()
            .take(max)
            .map(|(n, p)| Part {
                e_tag: Some(ETag::Strong(p.etag)),
                last_modified: p.at.map(Timestamp::from),
                part_number: Some(n),
                size: Some(i64::try_from(p.size).unwrap_or(i64::MAX)),
                ..Default::default()
            })
            .collect();
        Ok(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            is_truncated: Some(truncated),
            next_part_number_marker: page
                .last()
                .and_then(|p| p.part_number)
                .filter(|_| truncated),
            part_number_marker: Some(marker),
            max_parts: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            parts: Some(page),
            ..Default::default()
        })
    }
}
