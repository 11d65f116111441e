//! What the sync service remembers beside the plain objects, itself stored as small
//! objects under `.datamover/` of the sync root:
//!
//! - a **manifest** per tenant and target (kept as a base and deltas: see
//!   [`super::manifest_store`]; in memory only while used: [`super::manifests`]): for every object the etag it had when we last
//!   saw it, with its size, content hash, mtime and mode. A listing is checked against it
//!   by etag, so an unchanged pass costs one listing and no request per object; objects
//!   written or changed by other tools are looked up once (HEAD) and remembered. It is a
//!   cache: losing it (or two replicas overwriting each other's) costs lookups, never a
//!   wrong answer, because an entry only counts while the etag matches.
//! - an **upload record** per unfinished multipart upload: its id, the declared size and
//!   hash, and the parts stored so far, so an interrupted upload goes on where it stopped,
//!   also after a restart of the server. Maintenance aborts the ones a device abandoned
//!   (`crate::maintenance`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use datamover_repo::objects::{FileMeta, Part};
use serde::{Deserialize, Serialize};

/// One object as the manifest remembers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    #[serde(rename = "e")]
    pub etag: String,
    #[serde(rename = "s")]
    pub size: u64,
    #[serde(rename = "h", with = "hex_hash")]
    pub hash: [u8; 32],
    #[serde(rename = "m", default)]
    pub mtime_ns: i64,
    #[serde(rename = "o", default)]
    pub mode: u32,
}

impl Entry {
    pub fn new(etag: String, size: u64, meta: FileMeta) -> Entry {
        Entry {
            etag,
            size,
            hash: meta.hash,
            mtime_ns: meta.mtime_ns,
            mode: meta.mode,
        }
    }
}

mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(&s)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("bad hash"))
    }
}

/// The manifest of one tenant's target: object path (relative to the target) → entry.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: HashMap<String, Entry>,
}

/// An unfinished multipart upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadRecord {
    pub upload_id: String,
    /// The object key the upload completes into, which maintenance needs to abort it
    /// (empty in records written before it was recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    pub size: u64,
    #[serde(with = "hex_hash")]
    pub hash: [u8; 32],
    pub part_size: u64,
    pub parts: Vec<Part>,
}

impl UploadRecord {
    /// Bytes stored so far (every stored part is full); 0 (start over) for a record
    /// whose parts would hold more than the object, as a damaged one could.
    pub fn offset(&self) -> u64 {
        (self.parts.len() as u64)
            .checked_mul(self.part_size)
            .filter(|o| *o <= self.size)
            .unwrap_or(0)
    }
}

/// The internal key of a tenant's target's manifest: its old single JSON object, beside
/// the prefix its base and deltas are under now.
pub fn manifest_key(tenant: &str, target: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(tenant.as_bytes());
    h.update(&[0]);
    h.update(target.as_bytes());
    format!(".datamover/manifests/{}.json", h.finalize().to_hex())
}

/// Where the upload records are, one object each (listed by maintenance).
pub const UPLOADS_ROOT: &str = ".datamover/uploads/";

/// The internal key of the upload record of an object key.
pub fn upload_key(object_key: &str) -> String {
    format!(
        "{UPLOADS_ROOT}{}.json",
        blake3::hash(object_key.as_bytes()).to_hex()
    )
}

/// Which keys are being uploaded (the manifests are in [`super::manifests`]).
#[derive(Default)]
pub struct SyncState {
    uploading: Mutex<HashSet<String>>,
}

/// Marks an object key as being uploaded until dropped.
pub struct UploadGuard {
    state: Arc<SyncState>,
    key: String,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if let Ok(mut u) = self.state.uploading.lock() {
            u.remove(&self.key);
        }
    }
}

impl SyncState {
    /// Claims `key` for one upload at a time; `None` if another one is running.
    pub fn begin_upload(self: &Arc<Self>, key: &str) -> Option<UploadGuard> {
        let mut u = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        u.insert(key.to_string()).then(|| UploadGuard {
            state: Arc::clone(self),
            key: key.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trip() {
        let mut m = Manifest::default();
        m.entries.insert(
            "a/b.txt".into(),
            Entry::new(
                "etag".into(),
                3,
                FileMeta {
                    hash: [7; 32],
                    mtime_ns: 5,
                    mode: 0o600,
                },
            ),
        );
        let json = serde_json::to_vec(&m).unwrap();
        let back: Manifest = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.entries, m.entries);
    }

    #[test]
    fn keys_differ_by_tenant_and_target() {
        assert_ne!(manifest_key("a", "b/c"), manifest_key("a/b", "c"));
        assert_ne!(manifest_key("a", "x"), manifest_key("b", "x"));
        assert!(upload_key("t/x/y").starts_with(".datamover/uploads/"));
    }

    #[test]
    fn one_upload_per_key() {
        let s = Arc::new(SyncState::default());
        let g = s.begin_upload("k");
        assert!(g.is_some());
        assert!(s.begin_upload("k").is_none());
        drop(g);
        assert!(s.begin_upload("k").is_some());
    }
}
