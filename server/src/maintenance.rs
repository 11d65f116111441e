//! Maintenance from the server's side: the `Maintain` call, the schedule from the
//! config key `maintenanceInterval`, and the publication of this server's oldest running
//! backup session (so that maintenance on any replica keeps what it relies on). A run
//! also aborts the multipart uploads older than `s3UploadMaxAge`: the S3 gateway's and
//! those edge devices started and abandoned (edge sync's upload records).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use datamover_repo::objects::ObjectStore;
use datamover_repo::store::StoreError;
use datamover_repo::{MaintenanceOptions, MaintenanceReport, RepoError, Repository};
use futures::StreamExt as _;

use crate::metrics::Metrics;
use crate::service::Sessions;
use crate::sync::state::{UPLOADS_ROOT, UploadRecord, upload_key};

/// How often a server with running backups republishes their start time.
const PUBLISH_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct MaintenanceSettings {
    /// Run maintenance this often (none: only when an admin asks).
    pub interval: Option<Duration>,
    /// See [`MaintenanceOptions::grace`].
    pub grace: Duration,
    /// Multipart uploads of the S3 gateway, and edge sync's that no part was added to
    /// for this long, are aborted (none: never), config key `s3UploadMaxAge`.
    pub s3_upload_max_age: Option<Duration>,
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        MaintenanceSettings {
            interval: None,
            grace: Duration::from_secs(24 * 3600),
            s3_upload_max_age: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

/// Runs maintenance for this server.
#[derive(Clone)]
pub struct Maintainer {
    repo: Arc<Repository>,
    sessions: Sessions,
    settings: MaintenanceSettings,
    metrics: Arc<Metrics>,
    /// The plain-object store, where the S3 gateway and edge sync record their
    /// multipart uploads.
    objects: Option<Arc<dyn ObjectStore>>,
    /// This server process, in locks and session records.
    instance: String,
}

impl Maintainer {
    pub fn new(
        repo: Arc<Repository>,
        sessions: Sessions,
        settings: MaintenanceSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "server".into());
        let mut nonce = [0u8; 4];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        let instance: String = format!("{host}-{}", hex::encode(nonce))
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Maintainer {
            repo,
            sessions,
            settings,
            metrics,
            objects: None,
            instance,
        }
    }

    /// Also aborts the abandoned multipart uploads in `objects`: the S3 gateway's and
    /// edge sync's.
    pub fn with_gateway_uploads(mut self, objects: Arc<dyn ObjectStore>) -> Self {
        self.objects = Some(objects);
        self
    }

    /// Aborts the gateway's and edge sync's multipart uploads older than the set age; a
    /// failure is logged and retried at the next run. Returns how many of each (that
    /// would be, with `dry_run`).
    async fn expire_uploads(&self, dry_run: bool) -> (usize, usize) {
        let (Some(objects), Some(max_age)) = (&self.objects, self.settings.s3_upload_max_age)
        else {
            return (0, 0);
        };
        let s3 = self
            .expire_gateway_uploads(objects.as_ref(), max_age, dry_run)
            .await;
        let sync = match expire_sync_uploads(objects.as_ref(), max_age, dry_run, SystemTime::now())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "aborting abandoned edge-sync uploads failed");
                0
            }
        };
        match sync {
            0 => {}
            n if dry_run => tracing::info!(
                uploads = n,
                max_age = %humantime::format_duration(max_age),
                "edge-sync uploads without a new part for longer than s3UploadMaxAge found (dry run: none aborted)"
            ),
            n => tracing::info!(
                uploads = n,
                max_age = %humantime::format_duration(max_age),
                "edge-sync uploads without a new part for longer than s3UploadMaxAge aborted"
            ),
        }
        (s3, sync)
    }

    async fn expire_gateway_uploads(
        &self,
        objects: &dyn ObjectStore,
        max_age: Duration,
        dry_run: bool,
    ) -> usize {
        match crate::s3::uploads::expire(objects, max_age, dry_run).await {
            Ok(0) => 0,
            Ok(n) if dry_run => {
                tracing::info!(
                    uploads = n,
                    max_age = %humantime::format_duration(max_age),
                    "S3 multipart uploads older than s3UploadMaxAge found (dry run: none aborted)"
                );
                n
            }
            Ok(n) => {
                tracing::info!(
                    uploads = n,
                    max_age = %humantime::format_duration(max_age),
                    "S3 multipart uploads older than s3UploadMaxAge aborted"
                );
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "aborting old S3 multipart uploads failed; retried at the next maintenance");
                0
            }
        }
    }

    pub async fn run(&self, dry_run: bool) -> Result<MaintenanceReport, RepoError> {
        let opts = MaintenanceOptions {
            grace: self.settings.grace,
            dry_run,
            oldest_local_session_unix: crate::service::oldest_session_start(&self.sessions),
            owner: self.instance.clone(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let (s3_uploads, sync_uploads) = self.expire_uploads(dry_run).await;
        let result = self.repo.maintain(&opts).await;
        self.metrics.op("maintenance", result.is_ok());
        if let Ok(r) = &result {
            self.metrics.maintenance_bytes_freed.inc_by(r.bytes_freed);
            tracing::info!(
                dry_run,
                seconds = started.elapsed().as_secs_f64(),
                condemned = r.chunks_condemned,
                removed = r.chunks_removed,
                packs_deleted = r.packs_deleted,
                packs_repacked = r.packs_repacked,
                s3_uploads_expired = s3_uploads,
                sync_uploads_expired = sync_uploads,
                "maintenance finished"
            );
        }
        result
    }

    /// Starts the background tasks: session publication and the schedule.
    pub fn spawn(self) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut published = false;
            let mut tick = tokio::time::interval(PUBLISH_EVERY);
            loop {
                tick.tick().await;
                let oldest = crate::service::oldest_session_start(&me.sessions);
                if oldest.is_none() && !published {
                    continue;
                }
                match me.repo.publish_sessions(&me.instance, oldest).await {
                    Ok(()) => published = oldest.is_some(),
                    Err(e) => tracing::warn!(error = %e, "could not publish running sessions"),
                }
            }
        });
        if let Some(every) = self.settings.interval {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    if let Err(e) = self.run(false).await {
                        tracing::warn!(error = %e, "scheduled maintenance failed; retried at the next interval");
                    }
                }
            });
        }
    }
}

/// Edge-sync upload records one maintenance run looks at, at most; the rest wait for
/// the next runs.
const MAX_SYNC_UPLOADS_PER_RUN: usize = 10_000;
/// The largest upload record read (one lists its parts: 10,000 at most, ~70 bytes each).
const MAX_SYNC_RECORD: u64 = 4 * 1024 * 1024;

/// Why abandoned edge-sync uploads could not be looked at.
#[derive(Debug, thiserror::Error)]
pub enum SyncUploadsError {
    #[error(
        "listing edge sync's upload records ({UPLOADS_ROOT}) failed: {0}; check that the store is reachable, maintenance tries again at its next run"
    )]
    List(StoreError),
}

/// An upload record's contents, read with a size cap; `Ok(None)` when it is gone.
async fn read_sync_record(
    objects: &dyn ObjectStore,
    key: &str,
) -> Result<Option<(Option<SystemTime>, Vec<u8>)>, StoreError> {
    let (head, mut body) = match objects.get(key, 0).await {
        Ok(got) => got,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    if head.size > MAX_SYNC_RECORD {
        return Ok(Some((head.modified, Vec::new())));
    }
    let mut out = Vec::with_capacity(head.size as usize);
    while let Some(piece) = body.next().await {
        let piece = piece?;
        if (out.len() + piece.len()) as u64 > MAX_SYNC_RECORD {
            return Ok(Some((head.modified, Vec::new())));
        }
        out.extend_from_slice(&piece);
    }
    Ok(Some((head.modified, out)))
}

/// A store's upload id we may hand back to it: a name, never a path.
fn plausible_upload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && !id.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

/// Aborts the multipart uploads edge devices started and left: those whose upload
/// record (written again at every part stored) was last written more than `max_age`
/// before `now`. Their parts go with them, then their records. A record that cannot
/// be read (damaged, too large, or not at the place its object key gives) is removed
/// alone, as the sync service would start that upload afresh anyway. Returns how many
/// (that would be, with `dry_run`). Looks at [`MAX_SYNC_UPLOADS_PER_RUN`] records at
/// most; a failure on one is logged and retried at the next run.
pub async fn expire_sync_uploads(
    objects: &dyn ObjectStore,
    max_age: Duration,
    dry_run: bool,
    now: SystemTime,
) -> Result<usize, SyncUploadsError> {
    // Unknown or future times count as young: never abort what might be in use.
    let old = |modified: Option<SystemTime>| {
        modified
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > max_age)
    };
    let mut candidates: Vec<_> = objects
        .list(UPLOADS_ROOT)
        .await
        .map_err(SyncUploadsError::List)?
        .into_iter()
        .filter(|o| o.key.ends_with(".json") && old(o.modified))
        .collect();
    if candidates.len() > MAX_SYNC_UPLOADS_PER_RUN {
        tracing::warn!(
            records = candidates.len(),
            cap = MAX_SYNC_UPLOADS_PER_RUN,
            "more abandoned edge-sync uploads than one maintenance run looks at: the rest wait for the next runs"
        );
        candidates.truncate(MAX_SYNC_UPLOADS_PER_RUN);
    }
    let mut expired = 0;
    for o in candidates {
        let (modified, bytes) = match read_sync_record(objects, &o.key).await {
            Ok(Some(got)) => got,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(record = %o.key, error = %e, "reading an edge-sync upload record failed: retried at the next maintenance");
                continue;
            }
        };
        // A device resumed since the listing: the upload is in use again.
        if !old(modified) {
            continue;
        }
        let age_s = modified
            .and_then(|m| now.duration_since(m).ok())
            .map_or(0, |d| d.as_secs());
        let record = serde_json::from_slice::<UploadRecord>(&bytes)
            .ok()
            .filter(|r| plausible_upload_id(&r.upload_id));
        expired += 1;
        if dry_run {
            continue;
        }
        match &record {
            Some(r) if !r.key.is_empty() && upload_key(&r.key) == o.key => {
                match objects.abort_multipart(&r.key, &r.upload_id).await {
                    Ok(()) | Err(StoreError::NotFound(_)) => {}
                    Err(e) => {
                        tracing::warn!(object = %r.key, error = %e, "aborting an abandoned edge-sync upload failed: retried at the next maintenance");
                        continue;
                    }
                }
            }
            Some(r) if r.key.is_empty() => tracing::warn!(
                record = %o.key,
                "an abandoned edge-sync upload recorded before records named their object: its record is removed, its parts are not (an S3 lifecycle rule AbortIncompleteMultipartUpload removes them; on the filesystem store they are under .datamover/multipart/ of the sync root)"
            ),
            _ => tracing::warn!(
                record = %o.key,
                "an unreadable edge-sync upload record is removed (the device sends that file again from the start)"
            ),
        }
        if let Err(e) = objects.delete(&o.key).await {
            tracing::warn!(record = %o.key, error = %e, "removing an abandoned edge-sync upload record failed: retried at the next maintenance");
            continue;
        }
        tracing::info!(
            object = record.as_ref().map_or("", |r| r.key.as_str()),
            age_s,
            "abandoned edge-sync upload aborted"
        );
    }
    Ok(expired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use datamover_repo::objects::{FileMeta, FsObjects};

    async fn interrupted(objects: &dyn ObjectStore, key: &str) -> UploadRecord {
        let meta = FileMeta::default();
        let upload_id = objects.create_multipart(key, meta).await.unwrap();
        let etag = objects
            .upload_part(key, &upload_id, 1, Bytes::from(vec![7u8; 5 << 20]))
            .await
            .unwrap();
        let rec = UploadRecord {
            upload_id,
            key: key.to_string(),
            size: 20 << 20,
            hash: [1; 32],
            part_size: 5 << 20,
            parts: vec![(1, etag)],
        };
        objects
            .put(
                &upload_key(key),
                Bytes::from(serde_json::to_vec(&rec).unwrap()),
                None,
            )
            .await
            .unwrap();
        rec
    }

    #[tokio::test]
    async fn abandoned_sync_uploads_are_aborted_young_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let objects = FsObjects::new(dir.path());
        let rec = interrupted(&objects, "dev/t/big.bin").await;
        let parts = dir.path().join(".datamover/multipart").join(&rec.upload_id);
        assert!(parts.is_dir());
        // A damaged record, and one of an older server without its object key.
        objects
            .put(&upload_key("dev/t/bad"), Bytes::from_static(b"{"), None)
            .await
            .unwrap();
        let mut legacy = serde_json::to_value(&rec).unwrap();
        legacy.as_object_mut().unwrap().remove("key");
        objects
            .put(
                &upload_key("dev/t/old"),
                Bytes::from(serde_json::to_vec(&legacy).unwrap()),
                None,
            )
            .await
            .unwrap();
        let hour = Duration::from_secs(3600);
        let now = SystemTime::now();

        // Young: untouched, also by a dry run that would count the old ones.
        assert_eq!(
            expire_sync_uploads(&objects, hour, false, now)
                .await
                .unwrap(),
            0
        );
        let later = now + 2 * hour;
        assert_eq!(
            expire_sync_uploads(&objects, hour, true, later)
                .await
                .unwrap(),
            3
        );
        assert!(parts.is_dir());
        assert_eq!(objects.list(UPLOADS_ROOT).await.unwrap().len(), 3);

        assert_eq!(
            expire_sync_uploads(&objects, hour, false, later)
                .await
                .unwrap(),
            3
        );
        assert!(!parts.exists(), "the parts are gone");
        assert!(objects.list(UPLOADS_ROOT).await.unwrap().is_empty());
        assert_eq!(
            expire_sync_uploads(&objects, hour, false, later)
                .await
                .unwrap(),
            0
        );
    }

    #[test]
    fn upload_ids_are_names() {
        assert!(plausible_upload_id("a1b2c3"));
        assert!(plausible_upload_id("VXBsb2FkIElE.x_y-z"));
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", "a\0b"] {
            assert!(!plausible_upload_id(bad), "{bad:?}");
        }
    }
}
