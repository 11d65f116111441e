//! Multipart uploads in progress, recorded in the store so that every replica and a
//! restarted server know them:
//!
//! - `.datamover/s3/uploads/<bucket>/<h>/upload.json`: the upload (its id, tenant, key, the
//!   store key it completes into, when it started), where `<h>` is a hash of the upload id;
//! - `.datamover/s3/uploads/<bucket>/<h>/part-<n>-<size>-<etag in hex>`: one empty object
//!   per part received, so one listing tells every part (no reads).
//!
//! Maintenance aborts uploads older than a set age ([`expire`]): the store's upload and its
//! parts go, and so do the records.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use datamover_repo::objects::ObjectStore;
use datamover_repo::store::StoreError;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};

use super::error::{GatewayError, GatewayResult};
use super::owners::{MAX_RECORD, now_unix, read_small};

const ROOT: &str = ".datamover/s3/uploads/";
const RECORD: &str = "upload.json";
/// Upload records read at once.
const READS_AT_ONCE: usize = 16;
/// Uploads of one bucket a listing reads at most.
pub const MAX_UPLOADS_SCANNED: usize = 10_000;

/// An upload in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadRecord {
    pub upload_id: String,
    pub tenant: String,
    pub bucket: String,
    /// The S3 key, relative to the bucket.
    pub key: String,
    /// The store's key the upload completes into.
    pub store_key: String,
    pub created_unix: u64,
}

/// A part received.
#[derive(Debug, Clone)]
pub struct PartInfo {
    pub etag: String,
    pub size: u64,
    pub at: Option<SystemTime>,
}

fn dir(bucket: &str, upload_id: &str) -> String {
    let h = blake3::hash(upload_id.as_bytes()).to_hex();
    format!("{ROOT}{bucket}/{}/", &h[..32])
}

fn no_such_upload(id: &str) -> GatewayError {
    GatewayError::NoSuchUpload(id.chars().take(200).collect())
}

/// Records a new upload.
pub async fn start(objects: &dyn ObjectStore, record: &UploadRecord) -> GatewayResult<()> {
    let bytes = serde_json::to_vec(record).map_err(|e| GatewayError::Body(e.to_string()))?;
    objects
        .put(
            &format!("{}{RECORD}", dir(&record.bucket, &record.upload_id)),
            Bytes::from(bytes),
            None,
        )
        .await?;
    Ok(())
}

/// The upload `upload_id` of `tenant`'s `key` in `bucket`.
pub async fn find(
    objects: &dyn ObjectStore,
    tenant: &str,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> GatewayResult<UploadRecord> {
    let at = format!("{}{RECORD}", dir(bucket, upload_id));
    let bytes = read_small(objects, &at, MAX_RECORD)
        .await?
        .ok_or_else(|| no_such_upload(upload_id))?;
    let record: UploadRecord =
        serde_json::from_slice(&bytes).map_err(|_| no_such_upload(upload_id))?;
    if record.upload_id != upload_id || record.tenant != tenant || record.key != key {
        return Err(no_such_upload(upload_id));
    }
    Ok(record)
}

/// Records a part received (replacing an earlier part of that number).
pub async fn add_part(
    objects: &dyn ObjectStore,
    record: &UploadRecord,
    number: i32,
    etag: &str,
    size: u64,
) -> GatewayResult<()> {
    let base = dir(&record.bucket, &record.upload_id);
    let name = format!("part-{number}-{size}-{}", hex::encode(etag));
    objects
        .put(&format!("{base}{name}"), Bytes::new(), None)
        .await?;
    // (The store lists directories, not name prefixes: the upload's entries, then its own.)
    for o in objects.list(&base).await? {
        let Some(rest) = o.key.strip_prefix(&base) else {
            continue;
        };
        if rest != name && parse_part(rest).is_some_and(|(n, _)| n == number) {
            objects.delete(&o.key).await?;
        }
    }
    Ok(())
}

/// `part-<n>-<size>-<etag hex>` → (n, size, etag).
fn parse_part(name: &str) -> Option<(i32, (u64, String))> {
    let rest = name.strip_prefix("part-")?;
    let mut it = rest.splitn(3, '-');
    let n = it.next()?.parse().ok()?;
    let size = it.next()?.parse().ok()?;
    let etag = String::from_utf8(hex::decode(it.next()?).ok()?).ok()?;
    Some((n, (size, etag)))
}

/// The parts received, by number (the newest of a number when it was sent twice).
pub async fn parts(
    objects: &dyn ObjectStore,
    record: &UploadRecord,
) -> GatewayResult<BTreeMap<i32, PartInfo>> {
    let base = dir(&record.bucket, &record.upload_id);
    let mut out: BTreeMap<i32, PartInfo> = BTreeMap::new();
    for o in objects.list(&base).await? {
        let Some((n, (size, etag))) = o.key.strip_prefix(&base).and_then(parse_part) else {
            continue;
        };
        let newer = out.get(&n).is_none_or(|p| p.at <= o.modified);
        if newer {
            out.insert(
                n,
                PartInfo {
                    etag,
                    size,
                    at: o.modified,
                },
            );
        }
    }
    Ok(out)
}

/// Removes an upload's records (after it was completed or aborted).
pub async fn remove(objects: &dyn ObjectStore, bucket: &str, upload_id: &str) -> GatewayResult<()> {
    let base = dir(bucket, upload_id);
    let mut keys: Vec<String> = objects
        .list(&base)
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    // The upload record last: until it goes, the upload can still be aborted again.
    keys.sort_by_key(|k| k.ends_with(RECORD));
    for k in keys {
        objects.delete(&k).await?;
    }
    Ok(())
}

/// The uploads in progress in `bucket` (at most [`MAX_UPLOADS_SCANNED`]).
pub async fn in_bucket(
    objects: &dyn ObjectStore,
    bucket: &str,
) -> GatewayResult<Vec<UploadRecord>> {
    let keys: Vec<String> = objects
        .list(&format!("{ROOT}{bucket}/"))
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(&format!("/{RECORD}")))
        .take(MAX_UPLOADS_SCANNED)
        .collect();
    read_records(objects, keys).await
}

async fn read_records(
    objects: &dyn ObjectStore,
    keys: Vec<String>,
) -> GatewayResult<Vec<UploadRecord>> {
    futures::stream::iter(keys)
        .map(|k| async move {
            let bytes = read_small(objects, &k, MAX_RECORD).await?;
            Ok::<_, GatewayError>(bytes.and_then(|b| match serde_json::from_slice(&b) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "unreadable S3 upload record: left for maintenance");
                    None
                }
            }))
        })
        .buffer_unordered(READS_AT_ONCE)
        .try_filter_map(|r| async move { Ok(r) })
        .try_collect()
        .await
}

/// Aborts the uploads started more than `max_age` ago (their parts go with them) and
/// removes their records; returns how many (that would be, with `dry_run`).
pub async fn expire(
    objects: &dyn ObjectStore,
    max_age: Duration,
    dry_run: bool,
) -> GatewayResult<usize> {
    let now = now_unix();
    let limit = now.saturating_sub(max_age.as_secs());
    let listed = objects.list(ROOT).await?;
    let old: Vec<String> = listed
        .into_iter()
        .filter(|o| o.key.ends_with(&format!("/{RECORD}")))
        .filter(|o| {
            o.modified
                .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                .is_none_or(|d| d.as_secs() < limit)
        })
        .map(|o| o.key)
        .collect();
    let mut expired = 0;
    for record in read_records(objects, old).await? {
        if record.created_unix >= limit {
            continue;
        }
        expired += 1;
        if dry_run {
            continue;
        }
        match objects
            .abort_multipart(&record.store_key, &record.upload_id)
            .await
        {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(bucket = %record.bucket, error = %e, "aborting an expired S3 multipart upload failed: retried at the next maintenance");
                continue;
            }
        }
        remove(objects, &record.bucket, &record.upload_id).await?;
        tracing::info!(tenant = %record.tenant, bucket = %record.bucket, age_s = now.saturating_sub(record.created_unix), "expired S3 multipart upload aborted");
    }
    Ok(expired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names() {
        let name = format!("part-12-5242880-{}", hex::encode("\"ab-c\""));
        assert_eq!(
            parse_part(&name),
            Some((12, (5_242_880, "\"ab-c\"".to_string())))
        );
        assert_eq!(parse_part("upload.json"), None);
        assert_eq!(parse_part("part-x-1-00"), None);
    }
}
