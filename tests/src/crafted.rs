//! Snapshots committed by hand over the protocol, as an older, buggy or malicious client
//! could: the catalog's nodes, the file contents and the catalog marks are the caller's.

use bytes::Bytes;
use datamover_client::connect::Conn;
use datamover_core::catalog::encode_node;
use datamover_proto::v1::{self, Node};

/// Stores `contents` and a one-chunk catalog of `nodes`, then commits it with `marks`;
/// the server's answer to the commit.
pub async fn commit(
    conn: &mut Conn,
    tag: &str,
    nodes: &[Node],
    contents: &[Bytes],
    marks: Vec<v1::CatalogMark>,
) -> Result<v1::Snapshot, tonic::Status> {
    let begin = conn
        .api
        .begin_backup(v1::BeginBackupRequest {
            tag: tag.into(),
            kind: v1::SnapshotKind::Files as i32,
            source: "/crafted".into(),
            hostname: "crafted".into(),
        })
        .await?
        .into_inner();
    let mut catalog = Vec::new();
    for n in nodes {
        encode_node(n, &mut catalog);
    }
    let catalog = Bytes::from(catalog);
    let catalog_id = conn.key.id(&catalog);
    let mut chunks: Vec<v1::Chunk> = contents
        .iter()
        .map(|c| v1::Chunk {
            id: Bytes::copy_from_slice(&conn.key.id(c).0),
            data: c.clone(),
        })
        .collect();
    chunks.push(v1::Chunk {
        id: Bytes::copy_from_slice(&catalog_id.0),
        data: catalog,
    });
    conn.api
        .put_chunks(tokio_stream::iter(vec![v1::PutChunksRequest {
            session_id: begin.session_id.clone(),
            chunks,
        }]))
        .await?;
    let r = conn
        .api
        .commit_backup(v1::CommitBackupRequest {
            session_id: begin.session_id,
            catalog: vec![Bytes::copy_from_slice(&catalog_id.0)],
            stats: None,
            root: None,
            catalog_marks: marks,
        })
        .await?
        .into_inner();
    r.snapshot
        .ok_or_else(|| tonic::Status::internal("the server committed no snapshot"))
}
