//! Whether a DatamoverServer's repository survives a pod restart.
//!
//! The server reads its store from the ConfigMap as `datamover-server` does: `type`
//! `filesystem` (also `fs`, `local`), or no `type` and no ObjectBucketClaim keys
//! (`BUCKET_NAME`, `BUCKET_HOST`), is the filesystem store at `path` (default
//! [`DEFAULT_STORE_PATH`]); anything else is object storage. A filesystem store is only
//! persistent when `spec.storageVolume` mounts a volume over its path; otherwise it lives
//! in the container's writable layer and every snapshot is lost when the pod goes.

use k8s_openapi::api::core::v1::ConfigMap;

use crate::types::{DatamoverServer, StorageVolume};

/// The condition type the controller maintains for this.
pub const STORAGE_CONDITION: &str = "StoragePersistent";
/// Where the server keeps its filesystem store without a `path` in the ConfigMap, and the
/// default `spec.storageVolume.mountPath`.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/datamover";

/// The store a ConfigMap selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Store {
    /// The filesystem store at this path (as written in the ConfigMap, trimmed).
    Filesystem(String),
    /// S3 or another object store: persistent by itself.
    Object(String),
}

/// The store the server will use with this ConfigMap.
pub fn store_of(config: &ConfigMap) -> Store {
    let data = config.data.as_ref();
    let get = |k: &str| {
        data.and_then(|d| d.get(k))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let obc = get("BUCKET_NAME").is_some() || get("BUCKET_HOST").is_some();
    let kind = get("type")
        .map(|t| t.to_ascii_lowercase())
        .unwrap_or_else(|| {
            if obc {
                "s3".into()
            } else {
                "filesystem".into()
            }
        });
    match kind.as_str() {
        "filesystem" | "fs" | "local" => {
            Store::Filesystem(get("path").unwrap_or_else(|| DEFAULT_STORE_PATH.into()))
        }
        other => Store::Object(other.to_string()),
    }
}

/// The `StoragePersistent` condition's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageCheck {
    pub persistent: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Whether `path` is `mount` or below it (both absolute; trailing slashes ignored).
fn covers(mount: &str, path: &str) -> bool {
    let mount = mount.trim_end_matches('/');
    let path = path.trim_end_matches('/');
    !mount.is_empty()
        && (path == mount || path.strip_prefix(mount).is_some_and(|r| r.starts_with('/')))
}

const ADVICE: &str = "set spec.storageVolume.persistentVolumeClaim.claimName to a \
    PersistentVolumeClaim (mounted at spec.storageVolume.mountPath, default \
    /var/lib/datamover, which must contain the ConfigMap's path), or use an S3 store";

/// Checks the store of `config` against `spec.storageVolume`.
pub fn check(dms: &DatamoverServer, config: &ConfigMap) -> StorageCheck {
    let path = match store_of(config) {
        Store::Object(kind) => {
            return StorageCheck {
                persistent: true,
                reason: "ObjectStore",
                message: format!("the repository is in object storage (type {kind})"),
            };
        }
        Store::Filesystem(path) => path,
    };
    let volume: Option<&StorageVolume> = dms.spec.storage_volume.as_ref();
    let lost = "every snapshot is lost whenever the server pod restarts or moves";
    match volume {
        _ if !path.starts_with('/') => StorageCheck {
            persistent: false,
            reason: "EphemeralFilesystemStore",
            message: format!(
                "the filesystem store's path {path:?} in ConfigMap {} is relative, so it is \
                 in the server container's own filesystem: {lost}. Give an absolute path and \
                 {ADVICE}",
                dms.spec.config
            ),
        },
        Some(v) if covers(&v.mount_path, &path) => StorageCheck {
            persistent: true,
            reason: "PersistentVolume",
            message: format!(
                "the filesystem store {path} is on PersistentVolumeClaim {} mounted at {}",
                v.persistent_volume_claim.claim_name, v.mount_path
            ),
        },
        Some(v) => StorageCheck {
            persistent: false,
            reason: "EphemeralFilesystemStore",
            message: format!(
                "the filesystem store {path} (ConfigMap {}) is not under \
                 spec.storageVolume.mountPath {}, so it is in the server container's own \
                 filesystem: {lost}. Set mountPath to {path} or a parent of it, or change the \
                 ConfigMap's path",
                dms.spec.config, v.mount_path
            ),
        },
        None => StorageCheck {
            persistent: false,
            reason: "EphemeralFilesystemStore",
            message: format!(
                "the filesystem store {path} (ConfigMap {}) is in the server container's own \
                 filesystem: {lost}. To keep it, {ADVICE}",
                dms.spec.config
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ClaimRef, DatamoverServerSpec};

    fn config(data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ConfigMap::default()
        }
    }

    fn server(volume: Option<(&str, &str)>) -> DatamoverServer {
        let spec: DatamoverServerSpec = serde_json::from_value(serde_json::json!({
            "image": "datamover/datamover-server:0.1.0",
            "config": "cfg",
            "clientSecretRef": {"secretName": "clients"},
            "secrets": [{"secretName": "repo"}],
        }))
        .expect("a valid spec");
        let mut dms = DatamoverServer::new("dms", spec);
        dms.spec.storage_volume = volume.map(|(claim, mount)| StorageVolume {
            persistent_volume_claim: ClaimRef {
                claim_name: claim.into(),
            },
            mount_path: mount.into(),
            sub_path: None,
        });
        dms
    }

    #[test]
    fn the_store_is_read_as_the_server_reads_it() {
        assert_eq!(
            store_of(&config(&[])),
            Store::Filesystem("/var/lib/datamover".into())
        );
        assert_eq!(
            store_of(&config(&[
                ("type", " Filesystem\n"),
                ("path", "/data/repo")
            ])),
            Store::Filesystem("/data/repo".into())
        );
        // A bucket key without a type is still the filesystem store, as in the server;
        // the ObjectBucketClaim keys imply s3.
        assert_eq!(
            store_of(&config(&[("bucket", "b")])),
            Store::Filesystem("/var/lib/datamover".into())
        );
        assert_eq!(
            store_of(&config(&[("BUCKET_NAME", "b")])),
            Store::Object("s3".into())
        );
        assert_eq!(
            store_of(&config(&[("type", "s3"), ("bucket", "b")])),
            Store::Object("s3".into())
        );
    }

    #[test]
    fn a_filesystem_store_needs_a_volume_over_its_path() {
        let fs = config(&[("type", "filesystem")]);
        let c = check(&server(None), &fs);
        assert!(!c.persistent);
        assert_eq!(c.reason, "EphemeralFilesystemStore");
        assert!(
            c.message.contains("lost whenever the server pod restarts"),
            "{}",
            c.message
        );
        assert!(c.message.contains("spec.storageVolume"), "{}", c.message);

        let c = check(&server(Some(("repo-pvc", "/var/lib/datamover"))), &fs);
        assert!(c.persistent, "{c:?}");
        assert_eq!(c.reason, "PersistentVolume");
        assert!(c.message.contains("repo-pvc"));

        let below = config(&[("type", "filesystem"), ("path", "/var/lib/datamover/repo")]);
        assert!(check(&server(Some(("p", "/var/lib/datamover/"))), &below).persistent);
        // A sibling with a common prefix is not covered.
        let sibling = config(&[("path", "/var/lib/datamover2")]);
        let c = check(&server(Some(("p", "/var/lib/datamover"))), &sibling);
        assert!(!c.persistent);
        assert!(
            c.message.contains("not under spec.storageVolume.mountPath"),
            "{}",
            c.message
        );
        let relative = config(&[("path", "repo")]);
        assert!(!check(&server(Some(("p", "/var/lib/datamover"))), &relative).persistent);

        let s3 = config(&[("type", "s3"), ("bucket", "b")]);
        let c = check(&server(None), &s3);
        assert!(c.persistent);
        assert_eq!(c.reason, "ObjectStore");
    }
}
