//! The narrow storage trait and its implementations.
//!
//! A store holds named objects of a few [`FileType`]s. It knows nothing of encryption,
//! packs or snapshots: that makes each implementation small, and lets wrappers (caching,
//! fault injection, metrics) stack on the trait.

use async_trait::async_trait;
use bytes::Bytes;

pub(crate) mod fs;
pub(crate) mod s3;

pub use fs::FsStore;
pub use s3::{S3Options, S3Store};

/// The kinds of objects in a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// The single `config` object (name ignored).
    Config,
    /// A pack of chunks: `data/<first two hex digits>/<name>`.
    Pack,
    /// `index/<name>`.
    Index,
    /// `snapshots/<name>`.
    Snapshot,
    /// `condemned/<name>`: chunks maintenance found unreferenced, deleted a grace period
    /// later unless a snapshot refers to them again.
    Condemned,
    /// `locks/<name>`: who runs maintenance.
    Lock,
}

impl FileType {
    pub fn dir(self) -> &'static str {
        match self {
            FileType::Config => "",
            FileType::Pack => "data",
            FileType::Index => "index",
            FileType::Snapshot => "snapshots",
            FileType::Condemned => "condemned",
            FileType::Lock => "locks",
        }
    }

    /// The object's key relative to the repository root.
    pub fn key(self, name: &str) -> String {
        match self {
            FileType::Config => "config".to_string(),
            FileType::Pack => {
                let shard = name.get(..2).unwrap_or("00");
                format!("data/{shard}/{name}")
            }
            other => format!("{}/{name}", other.dir()),
        }
    }
}

/// Storage errors. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} does not exist in the store")]
    NotFound(String),
    #[error(
        "the storage is full while writing {0}: free space or grow the volume/bucket quota, then retry"
    )]
    NoSpace(String),
    #[error(
        "the storage denied access to {what} ({detail}): check the storage credentials and their permissions on the bucket or directory"
    )]
    AccessDenied { what: String, detail: String },
    #[error(
        "the storage at {location} is unreachable ({detail}): check the endpoint, network and that the bucket exists"
    )]
    Unreachable { location: String, detail: String },
    #[error("storage error on {what}: {detail}")]
    Other { what: String, detail: String },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound(_))
    }
}

/// The storage trait: list, read (whole or a range), write, remove.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A human-readable location for logs and errors (never a credential).
    fn location(&self) -> String;
    /// Checks the store can be reached and written (creating it where that makes sense).
    async fn check(&self) -> Result<(), StoreError>;
    /// Names of all objects of a type.
    async fn list(&self, ft: FileType) -> Result<Vec<String>, StoreError>;
    async fn read(&self, ft: FileType, name: &str) -> Result<Bytes, StoreError>;
    /// Reads a whole object into `buf` (emptied first), reusing its memory: packs are
    /// read into buffers kept from earlier packs, so their pages are not faulted in and
    /// zeroed again for every pack. Stores that cannot fill a buffer directly copy.
    async fn read_into(
        &self,
        ft: FileType,
        name: &str,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let data = self.read(ft, name).await?;
        buf.clear();
        buf.extend_from_slice(&data);
        Ok(())
    }
    async fn read_range(
        &self,
        ft: FileType,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StoreError>;
    /// Writes an object completely or not at all.
    async fn write(&self, ft: FileType, name: &str, data: Bytes) -> Result<(), StoreError>;
    async fn remove(&self, ft: FileType, name: &str) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(FileType::Config.key("x"), "config");
        assert_eq!(FileType::Pack.key("abcd"), "data/ab/abcd");
        assert_eq!(FileType::Snapshot.key("s1"), "snapshots/s1");
    }
}
