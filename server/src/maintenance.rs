//! Maintenance from the server's side: the `Maintain` call, the schedule from the
//! config key `maintenanceInterval`, and the publication of this server's oldest running
//! backup session (so that maintenance on any replica keeps what it relies on). A run
//! also aborts the S3 gateway's multipart uploads older than `s3UploadMaxAge`.

use std::sync::Arc;
use std::time::Duration;

use datamover_repo::objects::ObjectStore;
use datamover_repo::{MaintenanceOptions, MaintenanceReport, RepoError, Repository};

use crate::metrics::Metrics;
use crate::service::Sessions;

/// How often a server with running backups republishes their start time.
const PUBLISH_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct MaintenanceSettings {
    /// Run maintenance this often (none: only when an admin asks).
    pub interval: Option<Duration>,
    /// See [`MaintenanceOptions::grace`].
    pub grace: Duration,
    /// S3 gateway multipart uploads older than this are aborted (none: never), config
    /// key `s3UploadMaxAge`.
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
    /// The plain-object store, where the S3 gateway records its multipart uploads.
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

    /// Also aborts the S3 gateway's abandoned multipart uploads in `objects`.
    pub fn with_gateway_uploads(mut self, objects: Arc<dyn ObjectStore>) -> Self {
        self.objects = Some(objects);
        self
    }

    /// Aborts the gateway's multipart uploads older than the set age; a failure is
    /// logged and retried at the next run.
    async fn expire_uploads(&self, dry_run: bool) {
        let (Some(objects), Some(max_age)) = (&self.objects, self.settings.s3_upload_max_age)
        else {
            return;
        };
        match crate::s3::uploads::expire(objects.as_ref(), max_age, dry_run).await {
            Ok(0) => {}
            Ok(n) if dry_run => tracing::info!(
                uploads = n,
                max_age = %humantime::format_duration(max_age),
                "S3 multipart uploads older than s3UploadMaxAge found (dry run: none aborted)"
            ),
            Ok(n) => tracing::info!(
                uploads = n,
                max_age = %humantime::format_duration(max_age),
                "S3 multipart uploads older than s3UploadMaxAge aborted"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "aborting old S3 multipart uploads failed; retried at the next maintenance")
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
        self.expire_uploads(dry_run).await;
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
