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
    /// The top directory's own metadata (absent in older snapshots, streams and
    /// single files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<RootMeta>,
    /// Where nodes begin in the catalog's chunks (empty in older snapshots): what makes
    /// a path seekable without reading the whole catalog.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catalog_marks: Vec<CatalogMark>,
}

/// The first node that begins in catalog chunk `chunk`, at byte `offset`, and its path
/// (hex of the raw bytes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CatalogMark {
    pub chunk: u32,
    pub offset: u32,
    pub path: String,
}

/// Longest path a mark may carry (Linux's PATH_MAX).
pub const MAX_MARK_PATH: usize = 4096;

impl CatalogMark {
    /// Marks as a client sent them, checked against a catalog of `chunks` chunks of at
    /// most `max_chunk` bytes: in strictly increasing chunk order, inside their chunk,
    /// paths of bounded length in walk order. Anything else is refused as a whole.
    pub fn from_proto(
        marks: &[v1::CatalogMark],
        chunks: usize,
        max_chunk: u32,
    ) -> Result<Vec<CatalogMark>, String> {
        let mut out = Vec::with_capacity(marks.len().min(chunks));
        for (i, m) in marks.iter().enumerate() {
            if m.chunk as usize >= chunks {
                return Err(format!(
                    "catalog mark {i} names chunk {} of {chunks}",
                    m.chunk
                ));
            }
            if m.offset >= max_chunk {
                return Err(format!(
                    "catalog mark {i} has offset {} beyond a chunk",
                    m.offset
                ));
            }
            if m.path.is_empty() || m.path.len() > MAX_MARK_PATH {
                return Err(format!(
                    "catalog mark {i} has a path of {} bytes",
                    m.path.len()
                ));
            }
            if i > 0 {
                let prev = &marks[i - 1];
                if prev.chunk >= m.chunk
                    || datamover_core::paths::walk_order(&prev.path, &m.path)
                        != std::cmp::Ordering::Less
                {
                    return Err(format!("catalog mark {i} is out of order"));
                }
            }
            out.push(CatalogMark {
                chunk: m.chunk,
                offset: m.offset,
                path: hex::encode(&m.path),
            });
        }
        Ok(out)
    }

    pub fn to_proto(&self) -> Result<v1::CatalogMark, RepoError> {
        Ok(v1::CatalogMark {
            chunk: self.chunk,
            offset: self.offset,
            path: hex::decode(&self.path)
                .map_err(|_| RepoError::corrupt("snapshot catalog mark", "bad path"))?
                .into(),
        })
    }
}

/// A snapshot's top directory: what a restore gives back to its target directory.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootMeta {
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub mtime_ns: i64,
    pub uid: u32,
    pub gid: u32,
}

impl RootMeta {
    /// From a backup's root node: a directory, or nothing.
    pub fn from_node(node: &v1::Node) -> Option<RootMeta> {
        (node.r#type == v1::NodeType::Dir as i32).then_some(RootMeta {
            mode: node.mode & 0o7777,
            mtime_ns: node.mtime_ns,
            uid: node.uid,
            gid: node.gid,
        })
    }

    pub fn to_node(self) -> v1::Node {
        v1::Node {
            r#type: v1::NodeType::Dir as i32,
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            uid: self.uid,
            gid: self.gid,
            ..Default::default()
        }
    }
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
            root: self.root.map(RootMeta::to_node),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_optional_and_round_trips() {
        // A snapshot written before the root (and the marks) was recorded loads, without.
        let old = r#"{"tag":"t","time":"2024-01-01T00:00:00Z","client_id":"c","tenant":"c",
            "hostname":"h","source":"/d","kind":"files","stats":{"files":0,"dirs":0,
            "other":0,"bytes":0,"bytes_sent":0,"chunks":0,"chunks_sent":0,
            "files_unchanged":0},"catalog":[]}"#;
        let mut snap: SnapshotFile = serde_json::from_str(old).expect("old snapshot");
        assert_eq!(snap.root, None);
        assert!(snap.catalog_marks.is_empty());
        assert!(snap.to_proto().root.is_none());
        assert!(!serde_json::to_string(&snap).expect("json").contains("root"));

        let node = v1::Node {
            r#type: v1::NodeType::Dir as i32,
            mode: 0o40750,
            mtime_ns: -1_500,
            uid: 7,
            gid: 8,
            ..Default::default()
        };
        snap.root = RootMeta::from_node(&node);
        let back: SnapshotFile =
            serde_json::from_str(&serde_json::to_string(&snap).expect("json")).expect("load");
        let root = back.to_proto().root.expect("root");
        assert_eq!(
            (root.r#type, root.mode, root.mtime_ns, root.uid, root.gid),
            (v1::NodeType::Dir as i32, 0o750, -1_500, 7, 8)
        );
        // Only a directory is a root.
        let file = v1::Node {
            r#type: v1::NodeType::File as i32,
            ..node
        };
        assert_eq!(RootMeta::from_node(&file), None);
    }
}

#[cfg(test)]
mod mark_tests {
    use super::*;

    fn mark(chunk: u32, offset: u32, path: &str) -> v1::CatalogMark {
        v1::CatalogMark {
            chunk,
            offset,
            path: path.as_bytes().to_vec().into(),
        }
    }

    #[test]
    fn marks_are_checked_and_round_trip() {
        let good = [mark(0, 0, "a"), mark(2, 17, "a/b"), mark(3, 5, "b")];
        let stored = CatalogMark::from_proto(&good, 4, 1 << 20).expect("valid");
        assert_eq!(stored[1].path, hex::encode("a/b"));
        assert_eq!(stored[1].to_proto().expect("decodes"), good[1]);
        for (bad, why) in [
            (vec![mark(4, 0, "a")], "names chunk"),
            (vec![mark(0, 1 << 20, "a")], "offset"),
            (vec![mark(0, 0, "")], "path of 0"),
            (vec![mark(1, 0, "b"), mark(1, 9, "c")], "out of order"),
            (vec![mark(0, 0, "b"), mark(1, 0, "a")], "out of order"),
            (vec![mark(0, 0, "a.txt"), mark(1, 0, "a/b")], "out of order"),
        ] {
            let e = CatalogMark::from_proto(&bad, 4, 1 << 20).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
    }
}
