//! The `datamover-v1` gRPC service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use datamover_core::chunk::ChunkId;
use datamover_core::select::Selection;
use datamover_proto::v1::datamover_server::Datamover;
use datamover_proto::v1::{self, restore_item::Item};
use datamover_repo::retention::{self, Policy};
use datamover_repo::{
    AddResult, CatalogMark, ChunkData, RepoError, Repository, RootMeta, SnapshotFile,
    SnapshotKindName, VerifyOptions,
};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rand::RngCore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Op;
use crate::browse;
use crate::credentials::{CredentialStore, Identity};
use crate::error::status;
use crate::maintenance::Maintainer;
use crate::metrics::Metrics;

/// Backup sessions idle longer than this are dropped.
const SESSION_IDLE: Duration = Duration::from_secs(6 * 3600);
/// At most this many open sessions; the oldest idle one goes first.
const MAX_SESSIONS: usize = 4096;
/// A session used within this long counts against its client's session limit.
const SESSION_ACTIVE: Duration = Duration::from_secs(15 * 60);
/// Messages queued towards one streaming client.
const STREAM_QUEUE: usize = 4;
/// Catalog chunks read ahead of the one being sent.
const CATALOG_READ_AHEAD: usize = 2;
/// Restore messages queued towards the client (each about
/// [`datamover_proto::BATCH_BYTES`] in memory).
const RESTORE_QUEUE: usize = 2;
/// Memory a restore item takes besides its bytes (the item and its share of the vector).
const ITEM_BYTES: usize = 2 * std::mem::size_of::<v1::RestoreItem>();
/// Chunk bytes a restore reads ahead of what it sends.
const RESTORE_READ_AHEAD_BYTES: usize = 24 * 1024 * 1024;
/// Nodes and chunks queued between a restore's planner, reader and sender.
const RESTORE_WORK_QUEUE: usize = 4096;
/// Packs a restore downloads before its reader reaches them.
const RESTORE_PACKS_AHEAD: usize = 2;
/// `PutChunks` batches of one upload sealed at once.
const PUT_BATCHES_IN_FLIGHT: usize = 3;

pub struct Session {
    identity: Identity,
    /// Unix seconds when the session began (maintenance keeps what it may rely on).
    started_unix: u64,
    tag: String,
    kind: SnapshotKindName,
    source: String,
    hostname: String,
    /// The catalog of the snapshot this backup follows (empty if none): a commit of the
    /// same catalog need not read it back.
    parent_catalog: Vec<ChunkId>,
    last_used: Instant,
}

/// Open backup sessions by id, shared with [`Maintainer`].
pub type Sessions = Arc<Mutex<HashMap<String, Session>>>;

/// When the oldest open backup session began.
pub fn oldest_session_start(sessions: &Sessions) -> Option<u64> {
    sessions
        .lock()
        .ok()
        .and_then(|s| s.values().map(|x| x.started_unix).min())
}

pub struct DatamoverService {
    repo: Arc<Repository>,
    creds: Arc<CredentialStore>,
    metrics: Arc<Metrics>,
    sessions: Sessions,
    maintainer: Maintainer,
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
    /// The gRPC service, taking and sending messages up to
    /// [`datamover_proto::MAX_MESSAGE_BYTES`].
    pub fn into_server(self) -> datamover_proto::v1::datamover_server::DatamoverServer<Self> {
        datamover_proto::v1::datamover_server::DatamoverServer::new(self)
            .max_decoding_message_size(datamover_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(datamover_proto::MAX_MESSAGE_BYTES)
    }

    pub fn new(
        repo: Arc<Repository>,
        creds: Arc<CredentialStore>,
        metrics: Arc<Metrics>,
        sessions: Sessions,
        maintainer: Maintainer,
    ) -> Self {
        DatamoverService {
            repo,
            creds,
            metrics,
            sessions,
            maintainer,
        }
    }

    async fn auth(
        &self,
        meta: &tonic::metadata::MetadataMap,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Identity, Status> {
        let id = self.creds.authenticate(meta, peer).await?;
        crate::limits::global().admit(&id.client_id)?;
        Ok(id)
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
            // Sessions used lately count against the client's limit (abandoned ones stop
            // counting after a while, long before they are dropped).
            let open = s
                .values()
                .filter(|v| {
                    v.identity.client_id == id.client_id && v.last_used.elapsed() < SESSION_ACTIVE
                })
                .count();
            crate::limits::global().check_sessions(&id.client_id, open)?;
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
                    parent_catalog: parent
                        .as_ref()
                        .and_then(|p| p.catalog_ids().ok())
                        .unwrap_or_default(),
                    started_unix: SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
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
        // Batches are sealed concurrently (on the blocking pool), a few at a time, while
        // the next ones arrive; their order does not matter.
        let mut sealing: FuturesUnordered<BoxFuture<'_, Result<AddResult, RepoError>>> =
            FuturesUnordered::new();
        let mut ended = false;
        // A stream that breaks (the client gone, the connection cut) still has its
        // batches already received stored before the error is returned: they were
        // checked against their ids, and a client that reconnects then finds them
        // present instead of sending them again. At most PUT_BATCHES_IN_FLIGHT of them.
        let mut broken: Option<Status> = None;
        while !ended || !sealing.is_empty() {
            // A revoked or rotated credential ends the upload at once.
            tokio::select! {
                Some(added) = sealing.next(), if !sealing.is_empty() => {
                    let added = added.map_err(status)?;
                    self.metrics.chunks_stored.inc_by(added.stored);
                    self.metrics.bytes_stored.inc_by(added.stored_bytes);
                    self.metrics.chunks_deduplicated.inc_by(added.already_present);
                    out.chunks_stored += added.stored;
                    out.bytes_stored += added.stored_bytes;
                    out.chunks_already_present += added.already_present;
                }
                next = stream.next(), if !ended && sealing.len() < PUT_BATCHES_IN_FLIGHT => {
                    let msg = match next {
                        Some(Ok(msg)) => msg,
                        Some(Err(e)) => {
                            tracing::debug!(client = %id.client_id, error = %e, "upload stream broken: storing the batches already received");
                            broken = Some(e);
                            ended = true;
                            continue;
                        }
                        None => {
                            ended = true;
                            continue;
                        }
                    };
                    crate::limits::global().check_put(msg.chunks.len())?;
                    self.touch(&id, &msg.session_id)?;
                    let mut chunks = Vec::with_capacity(msg.chunks.len());
                    for c in msg.chunks {
                        let cid = ChunkId::from_slice(&c.id)
                            .map_err(|e| Status::invalid_argument(e.to_string()))?;
                        self.metrics.bytes_received.inc_by(c.data.len() as u64);
                        chunks.push((cid, c.data));
                    }
                    sealing.push(Box::pin(self.repo.add_chunks(&id.tenant, chunks)));
                }
                _ = self.creds.revoked(&id) => {
                    tracing::warn!(client = %id.client_id, "credential revoked during an upload: aborted");
                    return Err(Status::unauthenticated(
                        "this client's credential was revoked during the backup; nothing was committed",
                    ));
                }
            }
        }
        if let Some(e) = broken {
            return Err(e);
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
        crate::limits::global().check_catalog(r.catalog.len())?;
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
            // An empty catalog is the snapshot of an empty directory.
            let catalog = parse_ids(&r.catalog)?;
            let catalog_marks = CatalogMark::from_proto(
                &r.catalog_marks,
                catalog.len(),
                self.repo.chunker_params().max_size,
            )
            .map_err(|e| Status::invalid_argument(format!("{e}; the client is broken or outdated")))?;
            // Everything referenced must be stored before the snapshot names it. What
            // maintenance did meanwhile (on any replica) is loaded first; chunks it
            // condemned are copied back; chunks another session is still writing may
            // need a moment.
            let started = std::time::Instant::now();
            self.repo.refresh_index().await.map_err(status)?;
            tracing::debug!(elapsed = ?started.elapsed(), "commit: index refreshed");
            let mut missing = Vec::new();
            for attempt in 0..10u32 {
                self.repo.flush().await.map_err(status)?;
                missing = self
                    .repo
                    .missing_references(&id.tenant, &catalog, &session.parent_catalog)
                    .await
                    .map_err(status)?;
                if missing.is_empty() {
                    break;
                }
                let rescued = self
                    .repo
                    .rescue_condemned(&id.tenant, &missing)
                    .await
                    .map_err(status)?;
                if rescued > 0 {
                    continue;
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
            tracing::debug!(elapsed = ?started.elapsed(), "commit: references checked");
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
                // Only for a tree: a stream has no top directory.
                root: r
                    .root
                    .as_ref()
                    .filter(|_| session.kind == SnapshotKindName::Files)
                    .and_then(RootMeta::from_node),
                catalog_marks,
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
        let r = req.into_inner();
        // A part of a catalog is for browsing it (ls, find, cat, mount): a read.
        if r.first_chunk > 0 || r.chunk_count > 0 {
            id.require(Op::Restore)?;
        }
        let snap = self.find_snapshot(&id, &r.snapshot_id).await?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let repo = Arc::clone(&self.repo);
        tokio::spawn(async move {
            let result = if r.encoded {
                let range = (r.first_chunk as usize, r.chunk_count as usize);
                send_encoded_catalog(&repo, &id.tenant, &snap, range, &tx).await
            } else {
                send_catalog_nodes(&repo, &id.tenant, &snap, &tx).await
            };
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

    async fn verify(
        &self,
        req: Request<v1::VerifyRequest>,
    ) -> Result<Response<v1::VerifyResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Verify)?;
        let r = req.into_inner();
        if r.all_tenants {
            id.require(Op::Admin)?;
        }
        if !(0.0..=1.0).contains(&r.read_data) {
            return Err(Status::invalid_argument(
                "read_data is a fraction of packs between 0 and 1",
            ));
        }
        let opts = VerifyOptions {
            read_data: r.read_data,
            tenant: (!r.all_tenants).then(|| id.tenant.clone()),
        };
        let result = self.repo.verify(&opts).await;
        self.metrics.op(
            "verify",
            result.as_ref().is_ok_and(|r| r.problems.is_empty()),
        );
        let report = result.map_err(status)?;
        tracing::info!(client = %id.client_id, snapshots = report.snapshots, problems = report.problems.len(), "verify done");
        Ok(Response::new(v1::VerifyResponse {
            snapshots: report.snapshots,
            files: report.files,
            chunks: report.chunks,
            packs_read: report.packs_read,
            bytes_read: report.bytes_read,
            problems: report
                .problems
                .into_iter()
                .map(|p| v1::VerifyProblem {
                    snapshot_id: p.snapshot_id,
                    tag: p.tag,
                    path: Bytes::from(p.path),
                    message: p.message,
                })
                .collect(),
        }))
    }

    async fn maintain(
        &self,
        req: Request<v1::MaintainRequest>,
    ) -> Result<Response<v1::MaintainResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Admin)?;
        let dry_run = req.into_inner().dry_run;
        tracing::info!(client = %id.client_id, dry_run, "maintenance requested");
        let report = self.maintainer.run(dry_run).await.map_err(status)?;
        let report_json =
            serde_json::to_string(&report).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::MaintainResponse { report_json }))
    }

    async fn restore(
        &self,
        req: Request<v1::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Restore)?;
        let req = req.into_inner();
        let packed = req.accept_packed;
        crate::limits::check_selection(&req.path, &req.include, &req.exclude)?;
        let selection = Selection::new(&req.path, &req.include, &req.exclude)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let what = describe_selection(&req);
        let snap = self.find_snapshot(&id, &req.snapshot).await?;
        let resume = Resume {
            nodes: req.resume_nodes,
            chunks: req.resume_chunks,
        };
        if resume.is_start() {
            tracing::info!(client = %id.client_id, snapshot = %snap.id, tag = %snap.tag, packed, selection = %what, "restore started");
        } else {
            tracing::info!(client = %id.client_id, snapshot = %snap.id, tag = %snap.tag, packed, selection = %what, resume_nodes = resume.nodes, resume_chunks = resume.chunks, "restore resumed");
        }
        let plan = RestorePlan {
            snapshot: snap.to_proto(),
            nodes: browse::selected_nodes(&self.repo, &id.tenant, &snap, selection, what)?,
            packed,
            resume,
        };
        let (tx, rx) = mpsc::channel(RESTORE_QUEUE);
        let repo = Arc::clone(&self.repo);
        let metrics = Arc::clone(&self.metrics);
        let creds = Arc::clone(&self.creds);
        tokio::spawn(async move {
            let result = restore_stream(&repo, &creds, &id, plan, &tx, &metrics).await;
            repo.release_pack_buffers();
            metrics.op("restore", result.is_ok());
            if let Err(e) = result {
                tracing::warn!(client = %id.client_id, error = %e.message(), "restore failed");
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn catalog_index(
        &self,
        req: Request<v1::CatalogIndexRequest>,
    ) -> Result<Response<v1::CatalogIndexResponse>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Restore)?;
        let snap = self.find_snapshot(&id, &req.into_inner().snapshot).await?;
        Ok(Response::new(browse::index_response(&snap)?))
    }

    type ReadChunksStream = ReceiverStream<Result<v1::ReadChunksResponse, Status>>;

    async fn read_chunks(
        &self,
        req: Request<v1::ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let id = self.auth(req.metadata(), peer(&req)).await?;
        id.require(Op::Restore)?;
        let rx = browse::read_chunks(&self.repo, &id.tenant, &req.into_inner().ids)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A partial restore's selection, for logs and messages.
fn describe_selection(req: &v1::RestoreRequest) -> String {
    let mut parts = Vec::new();
    if !req.path.is_empty() {
        parts.push(format!("path {:?}", String::from_utf8_lossy(&req.path)));
    }
    if !req.include.is_empty() {
        parts.push(format!("--include {}", req.include.join(" ")));
    }
    if !req.exclude.is_empty() {
        parts.push(format!("--exclude {}", req.exclude.join(" ")));
    }
    if parts.is_empty() {
        "everything".to_string()
    } else {
        parts.join(", ")
    }
}

type CatalogSender = mpsc::Sender<Result<v1::ReadCatalogResponse, Status>>;

/// A snapshot's catalog as stored: one message per catalog chunk, read a few ahead.
/// `range`: the first chunk and how many (0: to the end).
async fn send_encoded_catalog(
    repo: &Arc<Repository>,
    tenant: &str,
    snap: &SnapshotFile,
    (first, count): (usize, usize),
    tx: &CatalogSender,
) -> Result<(), Status> {
    let all = snap.catalog_ids().map_err(status)?;
    if first > all.len() {
        return Err(Status::out_of_range(format!(
            "the catalog of snapshot {} has {} chunks, not {first}",
            snap.id,
            all.len()
        )));
    }
    let end = if count == 0 {
        all.len()
    } else {
        first.saturating_add(count).min(all.len())
    };
    let catalog = all[first..end].to_vec();
    let reads = futures::StreamExt::buffered(
        futures::StreamExt::map(futures::stream::iter(catalog), |cid| {
            let repo = Arc::clone(repo);
            let tenant = tenant.to_string();
            async move { repo.read_chunk(&tenant, &cid).await }
        }),
        CATALOG_READ_AHEAD,
    );
    let mut reads = std::pin::pin!(reads);
    while let Some(data) = reads.next().await {
        let msg = v1::ReadCatalogResponse {
            nodes: Vec::new(),
            encoded: data.map_err(status)?,
        };
        if tx.send(Ok(msg)).await.is_err() {
            return Ok(()); // the client went away
        }
    }
    Ok(())
}

/// A snapshot's catalog as decoded nodes, in messages of about
/// [`datamover_proto::BATCH_BYTES`] (for clients that do not ask for it encoded).
async fn send_catalog_nodes(
    repo: &Arc<Repository>,
    tenant: &str,
    snap: &SnapshotFile,
    tx: &CatalogSender,
) -> Result<(), Status> {
    let mut msg = v1::ReadCatalogResponse::default();
    let mut size = 0usize;
    let catalog = snap.catalog_ids().map_err(status)?;
    let mut nodes = repo.catalog_nodes(tenant, catalog);
    while let Some(node) = nodes.recv().await {
        let node = node.map_err(status)?;
        size += node.path.len() + 32 * node.chunks.len() + 64;
        msg.nodes.push(node);
        if size >= datamover_proto::BATCH_BYTES {
            size = 0;
            if tx.send(Ok(std::mem::take(&mut msg))).await.is_err() {
                return Ok(());
            }
        }
    }
    if !msg.nodes.is_empty() {
        let _ = tx.send(Ok(msg)).await;
    }
    Ok(())
}

/// Where a restore starts: after the first `nodes` nodes, of the last of them after its
/// first `chunks` chunks (a resumed restore; both 0 from the start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Resume {
    nodes: u64,
    chunks: u64,
}

impl Resume {
    fn is_start(&self) -> bool {
        self.nodes == 0 && self.chunks == 0
    }
}

/// What the restore planner hands to the reader, in snapshot order.
enum Planned {
    Node(v1::Node),
    /// The node a resumed restore continues inside of: not sent again (its path names
    /// it in messages).
    Continue(Bytes),
    /// A chunk, its share of the read-ahead budget (its size as it will be held), and
    /// (for the first chunk of a pack being prefetched) the pack's place in the
    /// prefetch window, given back when the chunk is read.
    Chunk(ChunkId, u32, Option<OwnedSemaphorePermit>),
}

/// What the restore reader hands to the sender, in snapshot order.
enum Work {
    Node(v1::Node),
    Continue(Bytes),
    /// A chunk (its id) being read (concurrently), and its share of the read-ahead
    /// budget.
    Data(
        ChunkId,
        tokio::task::JoinHandle<Result<ChunkData, RepoError>>,
        OwnedSemaphorePermit,
    ),
}

/// Packs the planner saw last, as many as the repository's pack cache holds: a chunk in
/// one of them needs no prefetch.
struct RecentPacks {
    packs: std::collections::VecDeque<String>,
    capacity: usize,
}

impl RecentPacks {
    fn new(capacity: usize) -> RecentPacks {
        let capacity = capacity.max(1);
        RecentPacks {
            packs: std::collections::VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Notes `pack`; whether it is new.
    fn note(&mut self, pack: &str) -> bool {
        if self.packs.iter().any(|p| p == pack) {
            return false;
        }
        if self.packs.len() >= self.capacity {
            self.packs.pop_front();
        }
        self.packs.push_back(pack.to_string());
        true
    }
}

/// Walks the catalog ahead of the reader and starts downloading each pack the restore
/// will need, up to [`RESTORE_PACKS_AHEAD`] packs before the reader reaches them, so
/// pack downloads do not wait for the reader's (plaintext) read-ahead budget.
fn plan_restore(
    repo: &Arc<Repository>,
    tenant: String,
    mut nodes: browse::Nodes,
    packed: bool,
    resume: Resume,
) -> (
    mpsc::Receiver<Planned>,
    tokio::task::JoinHandle<Result<(), Status>>,
) {
    let (tx, rx) = mpsc::channel::<Planned>(RESTORE_WORK_QUEUE);
    let repo = Arc::clone(repo);
    let planner = tokio::spawn(async move {
        let window = Arc::new(Semaphore::new(RESTORE_PACKS_AHEAD));
        let mut recent = RecentPacks::new(repo.pack_cache_packs());
        // Nodes of the selection seen so far (a resumed restore skips what the client has).
        let mut seen = 0u64;
        while let Some(node) = nodes.recv().await {
            let mut node = node?;
            seen += 1;
            let chunks = std::mem::take(&mut node.chunks);
            let skip_chunks = match seen.cmp(&resume.nodes) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => {
                    if tx.send(Planned::Continue(node.path)).await.is_err() {
                        return Ok(());
                    }
                    usize::try_from(resume.chunks).unwrap_or(usize::MAX)
                }
                std::cmp::Ordering::Greater => {
                    if tx.send(Planned::Node(node)).await.is_err() {
                        return Ok(());
                    }
                    0
                }
            };
            for c in chunks.into_iter().skip(skip_chunks) {
                let cid = ChunkId::from_slice(&c).map_err(|e| Status::data_loss(e.to_string()))?;
                let place = repo
                    .chunk_place(&tenant, &cid)
                    .await
                    .map_err(status)?
                    .ok_or_else(|| status(RepoError::MissingChunk(cid.to_hex())))?;
                let slot = if recent.note(&place.pack) {
                    let slot = Arc::clone(&window)
                        .acquire_owned()
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?;
                    repo.prefetch_pack(&place.pack);
                    Some(slot)
                } else {
                    None
                };
                // Sent as stored, a chunk is held compressed (and sealed, a few bytes more).
                let held = if packed { place.stored } else { place.raw };
                if tx.send(Planned::Chunk(cid, held, slot)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    });
    (rx, planner)
}

/// What a restore sends: the snapshot (in the first message), its nodes as selected,
/// and whether file contents go as stored.
struct RestorePlan {
    snapshot: v1::Snapshot,
    nodes: browse::Nodes,
    packed: bool,
    resume: Resume,
}

/// Sends the snapshot's nodes, each file node followed by its contents, in messages of
/// about [`datamover_proto::BATCH_BYTES`]. A planner starts pack downloads ahead
/// ([`plan_restore`]); a reader task starts chunk reads up to
/// [`RESTORE_READ_AHEAD_BYTES`] ahead, so pack downloads, decryption and sending
/// overlap; the sender takes them in order.
async fn restore_stream(
    repo: &Arc<Repository>,
    creds: &CredentialStore,
    id: &Identity,
    plan: RestorePlan,
    tx: &mpsc::Sender<Result<v1::RestoreResponse, Status>>,
    metrics: &Metrics,
) -> Result<(), Status> {
    let RestorePlan {
        snapshot,
        nodes,
        packed,
        resume,
    } = plan;
    let (work_tx, mut work_rx) = mpsc::channel::<Work>(RESTORE_WORK_QUEUE);
    let (mut planned, planner) = plan_restore(repo, id.tenant.clone(), nodes, packed, resume);
    let reader = {
        let repo = Arc::clone(repo);
        let tenant = id.tenant.clone();
        tokio::spawn(async move {
            let budget = Arc::new(Semaphore::new(RESTORE_READ_AHEAD_BYTES));
            while let Some(next) = planned.recv().await {
                let work = match next {
                    Planned::Node(node) => Work::Node(node),
                    Planned::Continue(path) => Work::Continue(path),
                    Planned::Chunk(cid, held, slot) => {
                        let share = held.clamp(1, RESTORE_READ_AHEAD_BYTES as u32);
                        let permit = Arc::clone(&budget)
                            .acquire_many_owned(share)
                            .await
                            .map_err(|e| Status::internal(e.to_string()))?;
                        // The reader has reached this pack: the planner may fetch another.
                        drop(slot);
                        let repo = Arc::clone(&repo);
                        let tenant = tenant.clone();
                        let read = tokio::spawn(async move {
                            if packed {
                                repo.read_chunk_packed(&tenant, &cid).await
                            } else {
                                repo.read_chunk(&tenant, &cid).await.map(ChunkData::Plain)
                            }
                        });
                        Work::Data(cid, read, permit)
                    }
                };
                if work_tx.send(work).await.is_err() {
                    return Ok(());
                }
            }
            // The plan ends when the planner is done: its outcome says whether it is whole.
            planner.await.map_err(|e| Status::internal(e.to_string()))?
        })
    };
    let mut msg = v1::RestoreResponse {
        snapshot: Some(snapshot),
        items: Vec::new(),
        resumed_nodes: resume.nodes,
        resumed_chunks: resume.chunks,
    };
    let mut size = 0usize;
    // The file being sent, to name it when its data cannot be read.
    let mut current = Bytes::new();
    while let Some(work) = work_rx.recv().await {
        let (item, len) = match work {
            Work::Continue(path) => {
                current = path;
                continue;
            }
            Work::Node(node) => {
                // What the item holds in memory, not only its payload: with tiny files
                // the items themselves are most of a message.
                let len = ITEM_BYTES + node.path.len() + node.link_target.len();
                current = node.path.clone();
                (Item::Node(node), len)
            }
            Work::Data(cid, read, _permit) => {
                let data = read
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| {
                        let s = status(e);
                        Status::new(
                            s.code(),
                            format!(
                                "file {}: {}",
                                String::from_utf8_lossy(&current),
                                s.message()
                            ),
                        )
                    })?;
                match data {
                    ChunkData::Plain(data) => {
                        metrics.bytes_restored.inc_by(data.len() as u64);
                        let len = ITEM_BYTES + data.len();
                        (Item::Data(data), len)
                    }
                    ChunkData::Zstd { data, raw } => {
                        metrics.bytes_restored.inc_by(u64::from(raw));
                        let len = ITEM_BYTES + data.len();
                        let packed = v1::PackedData {
                            zstd: data,
                            raw_length: raw,
                            id: Bytes::copy_from_slice(&cid.0),
                        };
                        (Item::Packed(packed), len)
                    }
                }
            }
        };
        msg.items.push(v1::RestoreItem { item: Some(item) });
        size += len;
        if size >= datamover_proto::BATCH_BYTES {
            size = 0;
            creds.still_valid(id)?;
            if tx.send(Ok(std::mem::take(&mut msg))).await.is_err() {
                return Ok(()); // the client went away
            }
        }
    }
    // The queue ends when the reader is done: its outcome says whether all was sent.
    reader
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
    if !msg.items.is_empty() || msg.snapshot.is_some() {
        let _ = tx.send(Ok(msg)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::RecentPacks;

    #[test]
    fn recent_packs_remember_as_many_as_the_cache() {
        let mut r = RecentPacks::new(2);
        assert!(r.note("a"));
        assert!(!r.note("a"));
        assert!(r.note("b"));
        assert!(r.note("c")); // "a" is forgotten, as the cache would evict it
        assert!(r.note("a"));
        assert!(!r.note("c"));
        let mut one = RecentPacks::new(0);
        assert!(one.note("x"));
        assert!(!one.note("x"));
        assert!(one.note("y"));
        assert!(one.note("x"));
    }
}
