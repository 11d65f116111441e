//! Reading part of a snapshot: the catalog's index (`CatalogIndex`), catalog chunks by
//! range (`ReadCatalog` with `first_chunk`), file contents by chunk id (`ReadChunks`), and
//! the nodes a partial restore sends (`RestoreRequest.path`, `include`, `exclude`), found
//! by seeking with the catalog's marks instead of reading the catalog from its start.
//!
//! Snapshots taken before marks were recorded have none: every seek then starts at the
//! catalog's beginning, slower but the same result.

use std::cmp::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use datamover_core::chunk::ChunkId;
use datamover_core::paths::walk_order;
use datamover_core::select::{Selection, is_within};
use datamover_proto::v1::{self, Node, restore_item::Item};
use datamover_repo::{ChunkData, Repository, SnapshotFile};
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::status;

/// Most chunk ids one `ReadChunks` call may ask for.
pub const MAX_READ_CHUNKS: usize = 256;
/// Chunk reads of one `ReadChunks` call in flight.
const READ_AHEAD: usize = 4;
/// Nodes queued between the catalog reader and a restore.
const NODE_QUEUE: usize = 256;

pub type Nodes = mpsc::Receiver<Result<Node, Status>>;

/// `CatalogIndex`: the snapshot, its catalog's length and marks.
pub fn index_response(snap: &SnapshotFile) -> Result<v1::CatalogIndexResponse, Status> {
    let marks = snap
        .catalog_marks
        .iter()
        .map(|m| m.to_proto())
        .collect::<Result<Vec<_>, _>>()
        .map_err(status)?;
    Ok(v1::CatalogIndexResponse {
        snapshot: Some(snap.to_proto()),
        chunks: u32::try_from(snap.catalog.len()).unwrap_or(u32::MAX),
        marks,
    })
}

/// A mark as the seek uses it: chunk, offset, path.
type Mark = (usize, usize, Bytes);

fn marks(snap: &SnapshotFile) -> Result<Vec<Mark>, Status> {
    snap.catalog_marks
        .iter()
        .map(|m| {
            let p = m.to_proto().map_err(status)?;
            Ok((p.chunk as usize, p.offset as usize, p.path))
        })
        .collect()
}

/// Where to start reading to meet `path`: the last mark at or before it in walk order
/// (the catalog's start when there is none).
fn seek(marks: &[Mark], path: &[u8]) -> (usize, usize) {
    let i = marks.partition_point(|m| walk_order(&m.2, path) != Ordering::Greater);
    match i.checked_sub(1).and_then(|i| marks.get(i)) {
        Some(m) => (m.0, m.1),
        None => (0, 0),
    }
}

/// The catalog's nodes from the nearest mark before `path` on.
fn nodes_from(
    repo: &Arc<Repository>,
    tenant: &str,
    catalog: &[ChunkId],
    marks: &[Mark],
    path: &[u8],
) -> Result<mpsc::Receiver<Result<Node, datamover_repo::RepoError>>, Status> {
    let (chunk, offset) = seek(marks, path);
    let rest = catalog
        .get(chunk..)
        .ok_or_else(|| Status::data_loss("a catalog mark names a chunk beyond the catalog"))?;
    Ok(repo.catalog_nodes_at(tenant, rest.to_vec(), offset))
}

/// The nodes a restore of `snap` with `sel` sends, in walk order: every node for a whole
/// restore; otherwise the selected ones, each preceded by those of its ancestors not sent
/// yet (so restored parents get their own metadata). Only the part of the catalog under
/// `sel.path` is read. Nothing selected is an error that names the selection.
pub fn selected_nodes(
    repo: &Arc<Repository>,
    tenant: &str,
    snap: &SnapshotFile,
    sel: Selection,
    what: String,
) -> Result<Nodes, Status> {
    let catalog = snap.catalog_ids().map_err(status)?;
    let marks = marks(snap)?;
    let (tx, rx) = mpsc::channel(NODE_QUEUE);
    let repo = Arc::clone(repo);
    let tenant = tenant.to_string();
    let snapshot = snap.id.clone();
    tokio::spawn(async move {
        let outcome: Result<(), Status> = async {
            if sel.is_everything() {
                let mut nodes = repo.catalog_nodes(&tenant, catalog);
                while let Some(n) = nodes.recv().await {
                    if tx.send(n.map_err(status)).await.is_err() {
                        return Ok(());
                    }
                }
                return Ok(());
            }
            // The ancestors of the subtree, each found by a seek of its own: (node, sent).
            let mut chain: Vec<(Node, bool)> = Vec::new();
            let ancestors = sel
                .path
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'/')
                .map(|(i, _)| sel.path[..i].to_vec());
            for a in ancestors {
                let mut nodes = nodes_from(&repo, &tenant, &catalog, &marks, &a)?;
                while let Some(n) = nodes.recv().await {
                    let n = n.map_err(status)?;
                    match walk_order(&n.path, &a) {
                        Ordering::Less => continue,
                        Ordering::Equal => chain.push((n, false)),
                        Ordering::Greater => {}
                    }
                    break;
                }
            }
            let mut sent = 0u64;
            let mut nodes = nodes_from(&repo, &tenant, &catalog, &marks, &sel.path)?;
            while let Some(n) = nodes.recv().await {
                let n = n.map_err(status)?;
                if walk_order(&n.path, &sel.path) == Ordering::Less {
                    continue;
                }
                if !is_within(&n.path, &sel.path) {
                    break;
                }
                // Keep `chain` the directories above this node.
                while chain
                    .last()
                    .is_some_and(|(d, _)| d.path == n.path || !is_within(&n.path, &d.path))
                {
                    chain.pop();
                }
                let selected = sel.selects(&n.path);
                if selected {
                    for (d, done) in chain.iter_mut().filter(|(_, done)| !*done) {
                        *done = true;
                        if tx.send(Ok(d.clone())).await.is_err() {
                            return Ok(());
                        }
                    }
                    sent += 1;
                }
                if n.r#type == v1::NodeType::Dir as i32 {
                    let dir = (n.clone(), selected);
                    if selected && tx.send(Ok(n)).await.is_err() {
                        return Ok(());
                    }
                    chain.push(dir);
                } else if selected && tx.send(Ok(n)).await.is_err() {
                    return Ok(());
                }
            }
            if sent == 0 {
                return Err(Status::not_found(format!(
                    "nothing in snapshot {snapshot} matches {what}: check the path and globs with `datamover-client ls` or `find`"
                )));
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(rx)
}

/// `ReadChunks`: the chunks, as stored, in the order asked, in messages of about
/// [`datamover_proto::BATCH_BYTES`].
pub fn read_chunks(
    repo: &Arc<Repository>,
    tenant: &str,
    ids: &[Bytes],
) -> Result<mpsc::Receiver<Result<v1::ReadChunksResponse, Status>>, Status> {
    if ids.len() > MAX_READ_CHUNKS {
        return Err(Status::invalid_argument(format!(
            "ReadChunks asks for {} chunks; ask for at most {MAX_READ_CHUNKS} at a time",
            ids.len()
        )));
    }
    let ids = ids
        .iter()
        .map(|b| ChunkId::from_slice(b).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx) = mpsc::channel(2);
    let repo = Arc::clone(repo);
    let tenant = tenant.to_string();
    tokio::spawn(async move {
        let reads = futures::stream::iter(ids)
            .map(|cid| {
                let repo = Arc::clone(&repo);
                let tenant = tenant.clone();
                async move { (cid, repo.read_chunk_packed(&tenant, &cid).await) }
            })
            .buffered(READ_AHEAD);
        let mut reads = std::pin::pin!(reads);
        let mut msg = v1::ReadChunksResponse::default();
        let mut size = 0usize;
        while let Some((cid, data)) = reads.next().await {
            let item = match data {
                Ok(ChunkData::Plain(data)) => Item::Data(data),
                Ok(ChunkData::Zstd { data, raw }) => Item::Packed(v1::PackedData {
                    zstd: data,
                    raw_length: raw,
                    id: Bytes::copy_from_slice(&cid.0),
                }),
                Err(e) => {
                    let _ = tx.send(Err(status(e))).await;
                    return;
                }
            };
            size += match &item {
                Item::Data(d) => d.len(),
                Item::Packed(p) => p.zstd.len(),
                Item::Node(_) => 0,
            } + 64;
            msg.items.push(v1::RestoreItem { item: Some(item) });
            if size >= datamover_proto::BATCH_BYTES {
                size = 0;
                if tx.send(Ok(std::mem::take(&mut msg))).await.is_err() {
                    return;
                }
            }
        }
        if !msg.items.is_empty() {
            let _ = tx.send(Ok(msg)).await;
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seek_starts_at_the_last_mark_before_the_path() {
        let m = |c, o, p: &str| (c, o, Bytes::from(p.to_string()));
        let marks = vec![m(0, 0, "a"), m(3, 10, "b/c"), m(7, 2, "d")];
        assert_eq!(seek(&marks, b"a"), (0, 0));
        assert_eq!(seek(&marks, b"b"), (0, 0));
        assert_eq!(seek(&marks, b"b/c"), (3, 10));
        assert_eq!(seek(&marks, b"b/c/z"), (3, 10));
        assert_eq!(seek(&marks, b"c"), (3, 10));
        assert_eq!(seek(&marks, b"z"), (7, 2));
        assert_eq!(seek(&[], b"z"), (0, 0));
        // "a.txt" sorts after everything under "a/".
        let marks = vec![m(0, 0, "a/x"), m(5, 1, "a.txt")];
        assert_eq!(seek(&marks, b"a/zzz"), (0, 0));
        assert_eq!(seek(&marks, b"a.txt"), (5, 1));
    }
}
