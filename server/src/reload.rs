//! Live reload of client credentials, tenants and roles, and allowed ServiceAccounts.
//!
//! `/etc/client_credentials` (and the `tenants`/`roles` keys of `/etc/config`, and
//! `/etc/serviceaccount_clients`) are watched with inotify (notify) and also re-read every
//! second, so a change takes effect within
//! a second even when a watch cannot be set up (the directory appears later, or the file
//! system does not support it). Kubelet updates a Secret volume by writing a new
//! timestamped directory and swapping the `..data` symlink; the key files are symlinks
//! through `..data`, so reading them again always sees the whole new set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::access::Access;
use crate::credentials::{CredentialStore, load_dir};
use crate::metrics::Metrics;
use crate::sa_clients::ServiceAccountClients;
use crate::settings::read_mount;

const RESCAN: Duration = Duration::from_secs(1);
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Reads the access rules from a config mount.
pub fn load_access(config_dir: &Path) -> Access {
    let config: BTreeMap<String, String> = read_mount(config_dir)
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "tenants" | "roles" | "defaultRole"))
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    Access::from_config(&config)
}

fn watch(
    dirs: &[&Path],
    tx: tokio::sync::mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, String> {
    let mut w = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.try_send(());
    })
    .map_err(|e| e.to_string())?;
    for d in dirs {
        w.watch(d, RecursiveMode::NonRecursive)
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(w)
}

fn dir_identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// The watched directories.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// `/etc/client_credentials`
    pub credentials: PathBuf,
    /// `/etc/config`
    pub config: PathBuf,
    /// `/etc/serviceaccount_clients`
    pub service_accounts: PathBuf,
}

/// Reloads once; logs and counts what changed.
pub fn reload(creds: &CredentialStore, dirs: &Dirs, metrics: &Metrics) {
    let accounts = ServiceAccountClients::load(&dirs.service_accounts);
    let (entries, audience) = (accounts.entries.len(), accounts.audience.clone());
    if creds.replace_service_accounts(accounts) {
        metrics.credential_reloads.inc();
        tracing::info!(
            entries,
            audience = audience.as_deref().unwrap_or("(none)"),
            "allowed ServiceAccounts reloaded"
        );
    }
    let changes = creds.replace(load_dir(&dirs.credentials), load_access(&dirs.config));
    if !changes.is_empty() {
        metrics.credential_reloads.inc();
        metrics.clients.set(creds.len() as i64);
        tracing::info!(
            added = ?changes.added,
            removed = ?changes.removed,
            rotated = ?changes.rotated,
            access_changed = changes.access_changed,
            "client credentials reloaded"
        );
    }
}

/// Watches and rescans until the process ends.
pub fn spawn(creds: Arc<CredentialStore>, dirs: Dirs, metrics: Arc<Metrics>) {
    let cred_dir = dirs.credentials.clone();
    tokio::spawn(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher: Option<(notify::RecommendedWatcher, Option<(u64, u64)>)> = None;
        let mut warned = false;
        loop {
            // (Re)establish the watch when missing or when the directory was replaced.
            let ident = dir_identity(&cred_dir);
            if watcher.as_ref().is_none_or(|(_, id)| *id != ident) {
                let watched: Vec<&Path> = [
                    cred_dir.as_path(),
                    dirs.config.as_path(),
                    dirs.service_accounts.as_path(),
                ]
                .into_iter()
                .filter(|d| d.is_dir())
                .collect();
                match watch(&watched, tx.clone()) {
                    Ok(w) if ident.is_some() => {
                        tracing::info!(dir = %cred_dir.display(), "watching client credentials");
                        watcher = Some((w, ident));
                        warned = false;
                    }
                    Ok(_) => watcher = None,
                    Err(e) => {
                        watcher = None;
                        if !warned {
                            tracing::warn!(error = %e, "cannot watch the credentials; rescanning every second instead");
                            warned = true;
                        }
                    }
                }
                if ident.is_none() && !warned {
                    tracing::warn!(dir = %cred_dir.display(), "credentials directory missing; rescanning every second until it appears");
                    warned = true;
                }
            }
            tokio::select! {
                _ = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(RESCAN) => {}
            }
            let (c, d, m) = (Arc::clone(&creds), dirs.clone(), Arc::clone(&metrics));
            let _ = tokio::task::spawn_blocking(move || reload(&c, &d, &m)).await;
        }
    });
}
