//! The `datamover-v1` gRPC service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use datamover_core::catalog::CatalogDecoder;
use datamover_core::chunk::ChunkId;
use datamover_proto::v1::datamover_server::Datamover;
use datamover_proto::v1::{self, restore_item::Item};
use datamover_repo::retention::{self, Policy};
use datamover_repo::{RepoError, Repository, SnapshotFile, SnapshotKindName};
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Op;
use crate::credentials::{CredentialStore, Identity};
use crate::error::status;
use crate::metrics::Metrics;

/// Backup sessions idle longer than this are dropped.
const SESSION_IDLE: Duration = Duration::from_secs(6 * 3600);
/// At most this many open sessions; the oldest idle one goes first.
const MAX_SESSIONS: usize = 4096;
/// Messages queued towards one streaming client.
const STREAM_QUEUE: usize = 4;

struct Session {
    identity: Identity,
    tag: String,
    kind: SnapshotKindName,
    source: String,
    hostname: String,
    last_used: Instant,
}

pub struct DatamoverService {
    repo: Arc<Repository>,
    creds: Arc<CredentialStore>,
    metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<String, Session>>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

fn peer<T>(req: &Request<T>) -> Option<std::net::IpAddr> {
    req.remote_addr().map(|a| a.ip())
}

fn parse_ids(ids: &[Bytes]) -> Result<Vec<ChunkId>, Status> {
    ids.iter()
        .map(|b| ChunkId::from_slice(b).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect()
}

fn check_tag(tag: &str) -> Result<(), Status> {
    if tag.is_empty() || tag.len() > 256 || tag.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "a tag must be 1 to 256 printable characters",
        ));
    }
    Ok(())
}

impl DatamoverService {
    pub fn new(repo: Arc<Repository>, creds: Arc<CredentialStore>, metrics: Arc<Metrics>) -> Self {
        DatamoverService {
            repo,
            creds,
            metrics,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    async fn auth(
        &self,
        meta: &tonic::metadata::MetadataMap,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Identity, Status> {
        self.creds.authenticate(meta, peer).await
    }

    fn sessions(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Session>>, Status> {
        self.sessions
            .lock()
            .map_err(|_| Status::internal("session table poisoned"))
    }

    /// Looks up the caller's session and marks it used.
    fn touch(&self, id: &Identity, session_id: &str) -> Result<(), Status> {
        let mut s = self.sessions()?;
        match s.get_mut(session_id) {
            Some(sess) if sess.identity.client_id == id.client_id => {
                sess.last_used = Instant::now();
                Ok(())
            }
            _ => Err(Status::not_found(
                "no such backup session (it expired or the server restarted): run the backup again",
            )),
        }
    }

    fn still_authorized(&self, id: &Identity) -> Result<(), Status> {
        self.creds.still_valid(id)
    }

    async fn find_snapshot(&self, id: &Identity, spec: &str) -> Result<SnapshotFile, Status> {
        self.repo
            .find_snapshot(&id.tenant, spec)
            .await
            .map_err(status)
    }
}

#[tonic::async_trait]
impl Datamover for DatamoverService {
    async fn hello(
        &self,
        req: Request<v1::HelloRequest>,
    ) -> Result<Response<v1::HelloResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        let p = self.repo.chunker_params();
        Ok(Response::new(v1::HelloResponse {
            server_version: env!("CARGO_PKG_VERSION").to_string(),
            client_id: id.client_id.clone(),
            tenant: id.tenant.clone(),
            role: id.role.to_string(),
            chunk_id_key: Bytes::copy_from_slice(self.repo.chunk_id_key(&id.tenant).as_bytes()),
            chunker: Some(v1::ChunkerParams {
                min_size: p.min_size,
                avg_size: p.avg_size,
                max_size: p.max_size,
            }),
            max_message_bytes: datamover_proto::MAX_MESSAGE_BYTES as u32,
        }))
    }

    async fn begin_backup(
        &self,
        req: Request<v1::BeginBackupRequest>,
    ) -> Result<Response<v1::BeginBackupResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Backup)?;
        let r = req.into_inner();
        check_tag(&r.tag)?;
        let kind = match v1::SnapshotKind::try_from(r.kind) {
            Ok(v1::SnapshotKind::Files) => SnapshotKindName::Files,
            Ok(v1::SnapshotKind::Stream) => SnapshotKindName::Stream,
            _ => {
                return Err(Status::invalid_argument(
                    "snapshot kind must be files or stream",
                ));
            }
        };
        let parent = self
            .repo
            .list_snapshots(&id.tenant)
            .await
            .map_err(status)?
            .into_iter()
            .rev()
            .find(|s| s.tag == r.tag && s.kind == kind);
        let mut raw = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut raw);
        let session_id = hex::encode(raw);
        {
            let mut s = self.sessions()?;
            s.retain(|_, v| v.last_used.elapsed() < SESSION_IDLE);
            if s.len() >= MAX_SESSIONS
                && let Some(oldest) = s
                    .iter()
                    .min_by_key(|(_, v)| v.last_used)
                    .map(|(k, _)| k.clone())
            {
                s.remove(&oldest);
            }
            s.insert(
                session_id.clone(),
                Session {
                    identity: id.clone(),
                    tag: r.tag.clone(),
                    kind,
                    source: r.source,
                    hostname: r.hostname,
                    last_used: Instant::now(),
                },
            );
            self.metrics.active_sessions.set(s.len() as i64);
        }
        tracing::info!(client = %id.client_id, tag = %r.tag, session = %session_id, "backup started");
        Ok(Response::new(v1::BeginBackupResponse {
            session_id,
            parent: parent.map(|p| p.to_proto()),
        }))
    }

    async fn find_missing(
        &self,
        req: Request<v1::FindMissingRequest>,
    ) -> Result<Response<v1::FindMissingResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Backup)?;
        let r = req.into_inner();
        self.touch(&id, &r.session_id)?;
        let ids = parse_ids(&r.ids)?;
        let missing = self.repo.find_missing(&id.tenant, &ids).map_err(status)?;
        Ok(Response::new(v1::FindMissingResponse { missing }))
    }

    async fn put_chunks(
        &self,
        req: Request<Streaming<v1::PutChunksRequest>>,
    ) -> Result<Response<v1::PutChunksResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Backup)?;
        let mut stream = req.into_inner();
        let mut out = v1::PutChunksResponse::default();
        loop {
            // A revoked or rotated credential ends the upload at once.
            let next = tokio::select! {
                m = stream.next() => m,
                _ = self.creds.revoked(&id) => {
                    tracing::warn!(client = %id.client_id, "credential revoked during an upload: aborted");
                    return Err(Status::unauthenticated(
                        "this client's credential was revoked during the backup; nothing was committed",
                    ));
                }
            };
            let Some(msg) = next else { break };
            let msg = msg?;
            self.touch(&id, &msg.session_id)?;
            let mut chunks = Vec::with_capacity(msg.chunks.len());
            for c in msg.chunks {
                let cid = ChunkId::from_slice(&c.id)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                self.metrics.bytes_received.inc_by(c.data.len() as u64);
                chunks.push((cid, c.data));
            }
            let added = self
                .repo
                .add_chunks(&id.tenant, chunks)
                .await
                .map_err(status)?;
            self.metrics.chunks_stored.inc_by(added.stored);
            self.metrics.bytes_stored.inc_by(added.stored_bytes);
            self.metrics
                .chunks_deduplicated
                .inc_by(added.already_present);
            out.chunks_stored += added.stored;
            out.bytes_stored += added.stored_bytes;
            out.chunks_already_present += added.already_present;
        }
        Ok(Response::new(out))
    }

    async fn commit_backup(
        &self,
        req: Request<v1::CommitBackupRequest>,
    ) -> Result<Response<v1::CommitBackupResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Backup)?;
        let r = req.into_inner();
        self.touch(&id, &r.session_id)?;
        let session = {
            let mut s = self.sessions()?;
            let sess = s.remove(&r.session_id);
            self.metrics.active_sessions.set(s.len() as i64);
            sess
        }
        .ok_or_else(|| Status::not_found("no such backup session"))?;
        let result = async {
            self.still_authorized(&id)?;
            let catalog = parse_ids(&r.catalog)?;
            if catalog.is_empty() {
                return Err(Status::invalid_argument("a snapshot needs a catalog"));
            }
            // Everything referenced must be stored before the snapshot names it. Chunks
            // another session is still writing may need a moment.
            let mut missing = Vec::new();
            for attempt in 0..10u32 {
                self.repo.flush().await.map_err(status)?;
                missing = self
                    .repo
                    .missing_references(&id.tenant, &catalog)
                    .await
                    .map_err(status)?;
                if missing.is_empty() {
                    break;
                }
                self.repo.refresh_index().await.map_err(status)?;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt + 1))).await;
            }
            if !missing.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "{} chunks this snapshot refers to are not stored (first: {}); run the backup again",
                    missing.len(),
                    missing[0]
                )));
            }
            self.still_authorized(&id)?;
            let snap = SnapshotFile {
                id: String::new(),
                tag: session.tag.clone(),
                time: now_rfc3339(),
                client_id: id.client_id.clone(),
                tenant: id.tenant.clone(),
                hostname: session.hostname.clone(),
                source: session.source.clone(),
                kind: session.kind,
                stats: r.stats.as_ref().map(Into::into).unwrap_or_default(),
                catalog: catalog.iter().map(ChunkId::to_hex).collect(),
            };
            self.repo.save_snapshot(snap).await.map_err(status)
        }
        .await;
        self.metrics.op("backup", result.is_ok());
        let snap = result?;
        tracing::info!(client = %id.client_id, tag = %snap.tag, snapshot = %snap.id, "snapshot committed");
        Ok(Response::new(v1::CommitBackupResponse {
            snapshot: Some(snap.to_proto()),
        }))
    }

    async fn list_snapshots(
        &self,
        req: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::List)?;
        let tag = req.into_inner().tag;
        let snapshots = self
            .repo
            .list_snapshots(&id.tenant)
            .await
            .map_err(status)?
            .iter()
            .filter(|s| tag.is_empty() || s.tag == tag)
            .map(SnapshotFile::to_proto)
            .collect();
        Ok(Response::new(v1::ListSnapshotsResponse { snapshots }))
    }

    type ReadCatalogStream = ReceiverStream<Result<v1::ReadCatalogResponse, Status>>;

    async fn read_catalog(
        &self,
        req: Request<v1::ReadCatalogRequest>,
    ) -> Result<Response<Self::ReadCatalogStream>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        if id.require(Op::Backup).is_err() {
            id.require(Op::Restore)?;
        }
        let spec = req.into_inner().snapshot_id;
        let snap = self.find_snapshot(&id, &spec).await?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let repo = Arc::clone(&self.repo);
        tokio::spawn(async move {
            let result = async {
                let mut msg = v1::ReadCatalogResponse::default();
                let mut size = 0usize;
                let mut decoder = CatalogDecoder::new();
                for cid in catalog_ids(&snap)? {
                    let data = repo.read_chunk(&id.tenant, &cid).await.map_err(status)?;
                    decoder.push(&data);
                    while let Some(node) = decoder.next_node().map_err(corrupt)? {
                        size += node.path.len() + 32 * node.chunks.len() + 64;
                        msg.nodes.push(node);
                        if size >= datamover_proto::BATCH_BYTES {
                            size = 0;
                            if tx.send(Ok(std::mem::take(&mut msg))).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                decoder.finish().map_err(corrupt)?;
                if !msg.nodes.is_empty() {
                    let _ = tx.send(Ok(msg)).await;
                }
                Ok::<(), Status>(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delete_snapshot(
        &self,
        req: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Delete)?;
        let spec = req.into_inner().snapshot_id;
        if spec.len() < 8 {
            return Err(Status::invalid_argument(
                "give the snapshot id (at least 8 characters) to delete; tags are not accepted, so a typo cannot delete the wrong snapshot",
            ));
        }
        let result = self.repo.delete_snapshot(&id.tenant, &spec).await;
        self.metrics.op("delete", result.is_ok());
        let snap = result.map_err(status)?;
        tracing::info!(client = %id.client_id, snapshot = %snap.id, tag = %snap.tag, "snapshot deleted");
        Ok(Response::new(v1::DeleteSnapshotResponse {
            snapshot: Some(snap.to_proto()),
        }))
    }

    async fn forget(
        &self,
        req: Request<v1::ForgetRequest>,
    ) -> Result<Response<v1::ForgetResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Delete)?;
        let r = req.into_inner();
        let policy = Policy {
            keep_last: r.keep_last,
            keep_hourly: r.keep_hourly,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
            keep_monthly: r.keep_monthly,
        };
        if policy.is_empty() {
            return Err(Status::invalid_argument(
                "give at least one --keep-* option: an empty policy would remove every snapshot",
            ));
        }
        let all = self.repo.list_snapshots(&id.tenant).await.map_err(status)?;
        let mut tags: Vec<String> = all
            .iter()
            .map(|s| s.tag.clone())
            .filter(|t| r.tag.is_empty() || *t == r.tag)
            .collect();
        tags.sort();
        tags.dedup();
        let mut out = v1::ForgetResponse::default();
        for tag in tags {
            let group: Vec<SnapshotFile> = all.iter().filter(|s| s.tag == tag).cloned().collect();
            let times: Vec<&str> = group.iter().map(|s| s.time.as_str()).collect();
            let keep = retention::keep(&times, &policy);
            for (i, s) in group.iter().enumerate() {
                if keep.contains(&i) {
                    out.kept.push(s.to_proto());
                    continue;
                }
                if !r.dry_run {
                    self.repo
                        .delete_snapshot(&id.tenant, &s.id)
                        .await
                        .map_err(status)?;
                    tracing::info!(client = %id.client_id, snapshot = %s.id, tag = %s.tag, "snapshot forgotten");
                }
                out.removed.push(s.to_proto());
            }
        }
        self.metrics.op("forget", true);
        Ok(Response::new(out))
    }

    type RestoreStream = ReceiverStream<Result<v1::RestoreResponse, Status>>;

    async fn restore(
        &self,
        req: Request<v1::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Restore)?;
        let spec = req.into_inner().snapshot;
        let snap = self.find_snapshot(&id, &spec).await?;
        tracing::info!(client = %id.client_id, snapshot = %snap.id, tag = %snap.tag, "restore started");
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let repo = Arc::clone(&self.repo);
        let metrics = Arc::clone(&self.metrics);
        let creds = Arc::clone(&self.creds);
        tokio::spawn(async move {
            let result = restore_stream(&repo, &creds, &id, &snap, &tx, &metrics).await;
            metrics.op("restore", result.is_ok());
            if let Err(e) = result {
                tracing::warn!(client = %id.client_id, error = %e.message(), "restore failed");
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn corrupt(e: datamover_core::catalog::CatalogError) -> Status {
    status(RepoError::Corrupt {
        what: "snapshot catalog".into(),
        why: e.to_string(),
    })
}

fn catalog_ids(snap: &SnapshotFile) -> Result<Vec<ChunkId>, Status> {
    snap.catalog
        .iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|b| ChunkId::from_slice(&b).ok())
                .ok_or_else(|| {
                    status(RepoError::Corrupt {
                        what: format!("snapshot {}", snap.id),
                        why: "bad catalog id".into(),
                    })
                })
        })
        .collect()
}

/// Sends the snapshot's nodes, each file node followed by its contents, in messages of
/// about [`datamover_proto::BATCH_BYTES`].
async fn restore_stream(
    repo: &Repository,
    creds: &CredentialStore,
    id: &Identity,
    snap: &SnapshotFile,
    tx: &mpsc::Sender<Result<v1::RestoreResponse, Status>>,
    metrics: &Metrics,
) -> Result<(), Status> {
    let mut msg = v1::RestoreResponse {
        snapshot: Some(snap.to_proto()),
        items: Vec::new(),
    };
    let mut size = 0usize;
    let mut decoder = CatalogDecoder::new();
    macro_rules! push {
        ($item:expr, $len:expr) => {{
            msg.items.push(v1::RestoreItem { item: Some($item) });
            size += $len;
            if size >= datamover_proto::BATCH_BYTES {
                size = 0;
                creds.still_valid(id)?;
                if tx.send(Ok(std::mem::take(&mut msg))).await.is_err() {
                    return Ok(()); // the client went away
                }
            }
        }};
    }
    for cid in catalog_ids(snap)? {
        let data = repo.read_chunk(&id.tenant, &cid).await.map_err(status)?;
        decoder.push(&data);
        while let Some(mut node) = decoder.next_node().map_err(corrupt)? {
            let chunks = std::mem::take(&mut node.chunks);
            let len = node.path.len() + 64;
            push!(Item::Node(node), len);
            for c in chunks {
                let cid = ChunkId::from_slice(&c).map_err(|e| Status::data_loss(e.to_string()))?;
                let data = repo.read_chunk(&id.tenant, &cid).await.map_err(status)?;
                metrics.bytes_restored.inc_by(data.len() as u64);
                let len = data.len();
                push!(Item::Data(data), len);
            }
        }
    }
    decoder.finish().map_err(corrupt)?;
    if !msg.items.is_empty() || msg.snapshot.is_some() {
        let _ = tx.send(Ok(msg)).await;
    }
    Ok(())
}
