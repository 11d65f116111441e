//! Maintenance from the server's side: the `Maintain` call, the schedule from the
//! config key `maintenanceInterval`, and the publication of this server's oldest running
//! backup session (so that maintenance on any replica keeps what it relies on).

use std::sync::Arc;
use std::time::Duration;

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
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        MaintenanceSettings {
            interval: None,
            grace: Duration::from_secs(24 * 3600),
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
            instance,
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
