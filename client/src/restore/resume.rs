//! Resuming a restore whose connection dropped (the network, a proxy, or the server
//! restarting). The stream's items are counted as they arrive: nodes, and the data items
//! (each one whole chunk) of the last node. After a drop the client connects again (a
//! bounded number of times, with backoff), asks for the same snapshot by id from that
//! point, and the items that follow go to the same writer, which never noticed: files
//! already written are not fetched again, the file being written continues after its
//! last chunk (a stream at the byte after the last one written to its pipe), and nothing
//! is written twice. A file being written keeps its temporary name until it is complete.

use std::time::Duration;

use datamover_proto::v1::{self, restore_item::Item};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Code;

use super::PartialRestore;
use crate::ClientError;
use crate::connect::{self, Conn};

/// Reconnections in a row that may fail before the restore gives up (with the backoff
/// below, about a minute: long enough for a server to restart).
const ATTEMPTS_IN_A_ROW: u32 = 7;
/// Resumes of one restore at most, however much each got through.
const MAX_RESUMES: u32 = 64;
const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(15);

/// How far into the restore stream the client is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Position {
    /// Nodes received.
    pub nodes: u64,
    /// Data items (whole chunks) received of the last node.
    pub chunks: u64,
}

impl Position {
    pub fn advance(&mut self, items: &[v1::RestoreItem]) {
        for i in items {
            match &i.item {
                Some(Item::Node(_)) => {
                    self.nodes += 1;
                    self.chunks = 0;
                }
                Some(Item::Data(_) | Item::Packed(_)) => self.chunks += 1,
                None => {}
            }
        }
    }
}

/// What a restore asks for, to ask again from where it stopped.
pub(super) struct Resumable<'a> {
    /// The snapshot the restore began with (resumed by its id: a tag could have moved).
    pub snapshot: &'a v1::Snapshot,
    pub accept_packed: bool,
    pub part: &'a PartialRestore,
    /// The command that runs this restore again, for messages.
    pub rerun: String,
}

/// Is this error a lost connection (rather than the server refusing)?
fn lost(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Cancelled)
        || ClientError::from_status(s.clone()).is_connection_lost()
}

/// Opens the restore stream at `at` and checks that it is the snapshot asked for, from
/// that point. Returns the first message's items and the stream.
pub(super) async fn open_at(
    conn: &mut Conn,
    spec: &str,
    accept_packed: bool,
    part: &PartialRestore,
    at: Position,
) -> Result<
    (
        v1::Snapshot,
        Vec<v1::RestoreItem>,
        tonic::Streaming<v1::RestoreResponse>,
    ),
    tonic::Status,
> {
    let mut stream = conn
        .api
        .restore(v1::RestoreRequest {
            snapshot: spec.to_string(),
            accept_packed,
            path: part.path.clone().into(),
            include: part.include.clone(),
            exclude: part.exclude.clone(),
            resume_nodes: at.nodes,
            resume_chunks: at.chunks,
        })
        .await?
        .into_inner();
    let first = stream
        .next()
        .await
        .ok_or_else(|| tonic::Status::unavailable("the server sent an empty restore"))??;
    let snapshot = first.snapshot.ok_or_else(|| {
        tonic::Status::internal("the server's restore did not start with the snapshot")
    })?;
    if (first.resumed_nodes, first.resumed_chunks) != (at.nodes, at.chunks) {
        return Err(tonic::Status::failed_precondition(format!(
            "the server sent the restore from node {} chunk {}, not from node {} chunk {} as asked: it does not resume restores (upgrade it)",
            first.resumed_nodes, first.resumed_chunks, at.nodes, at.chunks
        )));
    }
    Ok((snapshot, first.items, stream))
}

/// Feeds the stream's messages to a blocking consumer through a bounded queue, resuming
/// after a dropped connection.
pub(super) async fn pump(
    conn: &mut Conn,
    what: &Resumable<'_>,
    first: Vec<v1::RestoreItem>,
    mut stream: tonic::Streaming<v1::RestoreResponse>,
    tx: mpsc::Sender<Vec<v1::RestoreItem>>,
) -> Result<(), ClientError> {
    let mut at = Position::default();
    at.advance(&first);
    let mut pending = first;
    let mut resumes = 0u32;
    loop {
        if !pending.is_empty() && tx.send(std::mem::take(&mut pending)).await.is_err() {
            return Ok(()); // the writer stopped; its error is reported
        }
        match stream.next().await {
            Some(Ok(m)) => {
                at.advance(&m.items);
                pending = m.items;
            }
            None => return Ok(()),
            Some(Err(s)) if lost(&s) => {
                resumes += 1;
                if resumes > MAX_RESUMES {
                    return Err(ClientError::Unreachable(format!(
                        "lost the connection to the server {MAX_RESUMES} times during this restore of snapshot {} (last: {}): check the network and the server, then rerun `{}`",
                        what.snapshot.id,
                        s.message(),
                        what.rerun
                    )));
                }
                let (items, next) = reconnect(conn, what, at, &s).await?;
                at.advance(&items);
                pending = items;
                stream = next;
            }
            Some(Err(s)) => return Err(s.into()),
        }
    }
}

/// Connects again and opens the restore at `at`, up to [`ATTEMPTS_IN_A_ROW`] times.
async fn reconnect(
    conn: &mut Conn,
    what: &Resumable<'_>,
    at: Position,
    cause: &tonic::Status,
) -> Result<(Vec<v1::RestoreItem>, tonic::Streaming<v1::RestoreResponse>), ClientError> {
    let id = &what.snapshot.id;
    tracing::warn!(
        snapshot = %id,
        nodes = at.nodes,
        chunks = at.chunks,
        error = %cause.message(),
        "restore: lost the connection to the server; reconnecting to resume where it stopped"
    );
    let mut delay = FIRST_DELAY;
    let mut last = cause.message().to_string();
    for attempt in 1..=ATTEMPTS_IN_A_ROW {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
        let fresh = match connect::connect(&conn.settings).await {
            Ok(c) => c,
            Err(e @ (ClientError::Unreachable(_) | ClientError::Server(_))) => {
                tracing::warn!(attempt, of = ATTEMPTS_IN_A_ROW, error = %e, "restore: reconnecting failed; trying again");
                last = e.to_string();
                continue;
            }
            Err(e) => return Err(e),
        };
        if fresh.hello.chunk_id_key != conn.hello.chunk_id_key {
            return Err(ClientError::Server(format!(
                "the server answering after the connection dropped has another key for this client's chunks (another repository?): snapshot {id} was not restored completely; check SERVER_URL, then rerun `{}`",
                what.rerun
            )));
        }
        *conn = fresh;
        match open_at(conn, id, what.accept_packed, what.part, at).await {
            Ok((snapshot, items, stream)) if snapshot.id == *id => {
                tracing::info!(
                    snapshot = %id,
                    nodes = at.nodes,
                    chunks = at.chunks,
                    attempt,
                    "restore: reconnected; resuming where the connection dropped"
                );
                return Ok((items, stream));
            }
            Ok((snapshot, _, _)) => {
                return Err(ClientError::Server(format!(
                    "asked to resume snapshot {id}, the server sent snapshot {}: the restore is incomplete; rerun `{}`",
                    snapshot.id, what.rerun
                )));
            }
            Err(s) if s.code() == Code::NotFound => {
                return Err(ClientError::NotFound(format!(
                    "snapshot {id} ({}) can no longer be found on the server after the connection dropped (deleted, or the server now serves another repository), so the restore is incomplete: files not restored completely were left out; rerun `{}` with a snapshot that exists (`datamover-client list`)",
                    what.snapshot.tag, what.rerun
                )));
            }
            Err(s) if lost(&s) => {
                tracing::warn!(attempt, of = ATTEMPTS_IN_A_ROW, error = %s.message(), "restore: resuming failed; trying again");
                last = s.message().to_string();
            }
            Err(s) => {
                let e = ClientError::from_status(s);
                return Err(ClientError::Server(format!(
                    "resuming the restore of snapshot {id} after a dropped connection failed ({e}); rerun `{}`",
                    what.rerun
                )));
            }
        }
    }
    Err(ClientError::Unreachable(format!(
        "lost the connection to the server while restoring snapshot {id} and could not resume in {ATTEMPTS_IN_A_ROW} attempts ({last}): check the server is running, then rerun `{}`",
        what.rerun
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> v1::RestoreItem {
        v1::RestoreItem {
            item: Some(Item::Node(v1::Node::default())),
        }
    }

    fn data() -> v1::RestoreItem {
        v1::RestoreItem {
            item: Some(Item::Data(bytes::Bytes::from_static(b"x"))),
        }
    }

    #[test]
    fn the_position_counts_nodes_and_the_last_nodes_chunks() {
        let mut at = Position::default();
        at.advance(&[node(), data(), data(), node()]);
        assert_eq!(
            at,
            Position {
                nodes: 2,
                chunks: 0
            }
        );
        at.advance(&[data(), data(), data()]);
        assert_eq!(
            at,
            Position {
                nodes: 2,
                chunks: 3
            }
        );
        at.advance(&[node()]);
        assert_eq!(
            at,
            Position {
                nodes: 3,
                chunks: 0
            }
        );
    }

    #[test]
    fn dropped_connections_are_lost_and_refusals_are_not() {
        assert!(lost(&tonic::Status::unknown(
            "h2 protocol error: error reading a body from connection"
        )));
        assert!(lost(&tonic::Status::unavailable("connection reset")));
        assert!(!lost(&tonic::Status::not_found("no snapshot")));
        assert!(!lost(&tonic::Status::data_loss("chunk missing")));
    }
}
