//! Snapshot records: `snapshots/<id>`, sealed JSON.

use datamover_core::chunk::ChunkId;
use datamover_proto::v1;

use crate::RepoError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKindName {
    Files,
    Stream,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub other: u64,
    pub bytes: u64,
    pub bytes_sent: u64,
    pub chunks: u64,
    pub chunks_sent: u64,
    pub files_unchanged: u64,
}

/// A snapshot as stored. The id is the name of its object, not part of the content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotFile {
    #[serde(skip)]
    pub id: String,
    pub tag: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub client_id: String,
    pub tenant: String,
    pub hostname: String,
    pub source: String,
    pub kind: SnapshotKindName,
    pub stats: Stats,
    /// Hex ids of the catalog's chunks, in order.
    pub catalog: Vec<String>,
}

impl SnapshotFile {
    /// The ids of the catalog's chunks.
    pub fn catalog_ids(&self) -> Result<Vec<ChunkId>, RepoError> {
        self.catalog
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| ChunkId::from_slice(&b).ok())
                    .ok_or_else(|| {
                        RepoError::corrupt(format!("snapshot {}", self.id), "bad catalog id")
                    })
            })
            .collect()
    }

    pub fn to_proto(&self) -> v1::Snapshot {
        v1::Snapshot {
            id: self.id.clone(),
            tag: self.tag.clone(),
            time: self.time.clone(),
            client_id: self.client_id.clone(),
            tenant: self.tenant.clone(),
            hostname: self.hostname.clone(),
            source: self.source.clone(),
            kind: match self.kind {
                SnapshotKindName::Files => v1::SnapshotKind::Files,
                SnapshotKindName::Stream => v1::SnapshotKind::Stream,
            } as i32,
            stats: Some(v1::BackupStats {
                files: self.stats.files,
                dirs: self.stats.dirs,
                bytes: self.stats.bytes,
                bytes_sent: self.stats.bytes_sent,
                chunks: self.stats.chunks,
                chunks_sent: self.stats.chunks_sent,
                files_unchanged: self.stats.files_unchanged,
                other: self.stats.other,
            }),
        }
    }
}

impl From<&v1::BackupStats> for Stats {
    fn from(s: &v1::BackupStats) -> Self {
        Stats {
            files: s.files,
            dirs: s.dirs,
            other: s.other,
            bytes: s.bytes,
            bytes_sent: s.bytes_sent,
            chunks: s.chunks,
            chunks_sent: s.chunks_sent,
            files_unchanged: s.files_unchanged,
        }
    }
}
