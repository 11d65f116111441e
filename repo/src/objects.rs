//! Plain objects: the second store layout, used by edge sync.
//!
//! Unlike the repository (packs of sealed chunks), an [`ObjectStore`] holds ordinary
//! objects under arbitrary keys, readable by any S3 tool: a synced file is one object,
//! its content hash, mtime and mode kept as object metadata. Large objects are written by
//! multipart upload, so an interrupted upload can go on where it stopped.
//!
//! Keys are relative to the store's root (a prefix inside the bucket, or a directory) and
//! are checked by the caller: the store joins them as given.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::store::StoreError;

mod fs;
mod s3;

pub use fs::FsObjects;
pub use s3::S3Objects;

/// Metadata keys (S3 lower-cases them; the `x-amz-meta-` prefix is added by S3).
pub const META_HASH: &str = "dm-blake3";
pub const META_MTIME: &str = "dm-mtime-ns";
pub const META_MODE: &str = "dm-mode";

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Relative to the store's root.
    pub key: String,
    pub size: u64,
    /// Changes whenever the object's contents change (S3's ETag, a stat signature on a
    /// directory).
    pub etag: String,
    /// When the object was last written, when the store says.
    pub modified: Option<std::time::SystemTime>,
}

/// What we keep about a synced file, as object metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileMeta {
    /// BLAKE3 of the contents.
    pub hash: [u8; 32],
    pub mtime_ns: i64,
    pub mode: u32,
}

impl FileMeta {
    pub(crate) fn to_pairs(self) -> [(&'static str, String); 3] {
        [
            (META_HASH, hex::encode(self.hash)),
            (META_MTIME, self.mtime_ns.to_string()),
            (META_MODE, self.mode.to_string()),
        ]
    }

    /// Reads our metadata back; `None` when the object was not written by us.
    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Option<FileMeta> {
        let hash = hex::decode(get(META_HASH)?).ok()?.try_into().ok()?;
        Some(FileMeta {
            hash,
            mtime_ns: get(META_MTIME).and_then(|v| v.parse().ok()).unwrap_or(0),
            mode: get(META_MODE).and_then(|v| v.parse().ok()).unwrap_or(0o644),
        })
    }
}

/// An object's size, etag and (when written by us) metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHead {
    pub size: u64,
    pub etag: String,
    /// When the object was last written, when the store says.
    pub modified: Option<std::time::SystemTime>,
    pub meta: Option<FileMeta>,
}

/// An object's bytes, in pieces as they arrive.
pub type ByteStream = BoxStream<'static, Result<Bytes, StoreError>>;

/// A part of a multipart upload: its number (from 1) and etag.
pub type Part = (i32, String);

#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// A human-readable location for logs (never a credential).
    fn location(&self) -> String;
    /// Every object whose key starts with `prefix`, recursively.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    /// The same listing as [`list`](Self::list), sorted by key, with `bounds` (keys under
    /// `prefix` the caller expects, e.g. every thousandth of the last listing) as hints:
    /// a store whose listing comes in pages lists the ranges between them at once.
    /// Wrong or stale hints cost time, never correctness.
    async fn list_split(
        &self,
        prefix: &str,
        bounds: &[String],
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let _ = bounds;
        let mut out = self.list(prefix).await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
    /// `None` if there is no such object.
    async fn head(&self, key: &str) -> Result<Option<ObjectHead>, StoreError>;
    /// The object's head and its bytes from `offset` on.
    async fn get(&self, key: &str, offset: u64) -> Result<(ObjectHead, ByteStream), StoreError>;
    /// Writes a whole object (all or nothing); returns its etag.
    async fn put(
        &self,
        key: &str,
        data: Bytes,
        meta: Option<FileMeta>,
    ) -> Result<String, StoreError>;
    /// Starts a multipart upload; returns its id.
    async fn create_multipart(&self, key: &str, meta: FileMeta) -> Result<String, StoreError>;
    /// Uploads part `number` (from 1); every part but the last must be at least 5 MiB.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> Result<String, StoreError>;
    /// Makes the object visible from its parts; returns its etag.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[Part],
    ) -> Result<String, StoreError>;
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError>;
    /// Removes an object; removing a missing one is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
}
