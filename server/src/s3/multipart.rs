//! Multipart uploads of S3 clients, on top of the store's multipart uploads.
//!
//! The store's upload id is handed to the client. The gateway remembers, in memory, which
//! tenant and key each upload belongs to and the parts received (for ListParts and to
//! check CompleteMultipartUpload); an upload started before a restart of the server is
//! unknown afterwards and has to be started again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use s3s::dto::{
    AbortMultipartUploadInput, AbortMultipartUploadOutput, CompleteMultipartUploadInput,
    CompleteMultipartUploadOutput, CreateMultipartUploadInput, CreateMultipartUploadOutput, ETag,
    ListPartsInput, ListPartsOutput, Part, Timestamp, UploadPartInput, UploadPartOutput,
};

use super::body::{collect, meta_for};
use super::error::{GatewayError, GatewayResult};
use super::names::object_key;
use super::{Gateway, MIB};
use crate::access::Op;
use crate::credentials::Identity;

/// The largest part the gateway accepts (it holds one part in memory while storing it).
pub const MAX_PART: u64 = 64 * MIB;
/// Parts per ListParts page at most.
const MAX_LIST_PARTS: usize = 1000;

#[derive(Debug, Clone)]
struct PartInfo {
    etag: String,
    size: u64,
    at: SystemTime,
}

#[derive(Debug)]
struct Upload {
    tenant: String,
    key: String,
    parts: BTreeMap<i32, PartInfo>,
}

/// Uploads in progress, by upload id.
#[derive(Default)]
pub struct Uploads(Mutex<HashMap<String, Upload>>);

impl Uploads {
    fn with<T>(
        &self,
        id: &str,
        tenant: &str,
        key: &str,
        f: impl FnOnce(&mut Upload) -> T,
    ) -> GatewayResult<T> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(id) {
            Some(u) if u.tenant == tenant && u.key == key => Ok(f(u)),
            _ => Err(GatewayError::NoSuchUpload(id.chars().take(200).collect())),
        }
    }

    fn start(&self, id: String, tenant: &str, key: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            id,
            Upload {
                tenant: tenant.to_string(),
                key: key.to_string(),
                parts: BTreeMap::new(),
            },
        );
    }

    fn remove(&self, id: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }
}

impl Gateway {
    pub(super) async fn create_upload(
        &self,
        id: &Identity,
        input: CreateMultipartUploadInput,
    ) -> GatewayResult<CreateMultipartUploadOutput> {
        self.require(id, Op::Backup)?;
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        self.no_overwrite(id, &key).await?;
        let upload_id = self.objects.create_multipart(&key, meta_for(None)).await?;
        self.uploads.start(upload_id.clone(), &id.tenant, &key);
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
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        self.uploads
            .with(&input.upload_id, &id.tenant, &key, |_| ())?;
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
        self.uploads.with(&input.upload_id, &id.tenant, &key, |u| {
            u.parts.insert(
                input.part_number,
                PartInfo {
                    etag: etag.clone(),
                    size,
                    at: SystemTime::now(),
                },
            );
        })?;
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
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        let known = self
            .uploads
            .with(&input.upload_id, &id.tenant, &key, |u| u.parts.clone())?;
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
        self.uploads.remove(&input.upload_id);
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
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        self.uploads
            .with(&input.upload_id, &id.tenant, &key, |_| ())?;
        self.objects.abort_multipart(&key, &input.upload_id).await?;
        self.uploads.remove(&input.upload_id);
        Ok(AbortMultipartUploadOutput::default())
    }

    pub(super) async fn list_parts(
        &self,
        id: &Identity,
        input: ListPartsInput,
    ) -> GatewayResult<ListPartsOutput> {
        self.require(id, Op::List)?;
        let key = object_key(&id.tenant, &input.bucket, &input.key)?;
        let known = self
            .uploads
            .with(&input.upload_id, &id.tenant, &key, |u| u.parts.clone())?;
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
                last_modified: Some(Timestamp::from(p.at)),
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
