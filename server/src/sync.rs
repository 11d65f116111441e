//! The `Sync` gRPC service: edge devices' directories as plain objects.
//!
//! Objects live under `<tenant>/<target>/<path>` in an [`ObjectStore`] (the sync root, a
//! prefix beside the repository). Callers name only a target and relative paths; the
//! tenant comes from their credential, so no device reaches another tenant's objects.
//! Uploads are checked against the declared size and BLAKE3 hash before an object is
//! replaced; large ones go through multipart uploads that survive an interrupted call.
//! See [`state`] for the manifest that makes an unchanged pass one listing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use datamover_proto::v1::sync_server::Sync;
use datamover_proto::v1::{self, sync_put_request::Part as PutPart};
use datamover_repo::RepoError;
use datamover_repo::objects::{FileMeta, ObjectHead, ObjectStore};
use datamover_repo::store::StoreError;
use futures::StreamExt as _;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Op;
use crate::credentials::{CredentialStore, Identity};
use crate::error::status;
use crate::metrics::Metrics;

pub mod manifest_store;
pub mod manifests;
pub mod state;
mod upload;

pub use manifests::ManifestLimits;
use manifests::{Manifests, Slot};
use state::{Entry, SyncState, manifest_key};

/// Files up to this size are sent in one PUT; larger ones by multipart upload.
pub const SINGLE_PUT_MAX: u64 = 8 * 1024 * 1024;
/// The smallest multipart part (S3 needs 5 MiB); parts grow for huge files so that a file
/// needs at most [`MAX_PARTS`] of them.
const MIN_PART: u64 = 8 * 1024 * 1024;
const MAX_PARTS: u64 = 9_000;
/// Largest data message sent to a downloading client.
const GET_PIECE: usize = 1024 * 1024;
/// Uploads handled at once (each holds up to one part in memory).
const UPLOAD_SLOTS: usize = 16;
/// Objects per listing message.
const LIST_BATCH: usize = 1000;
/// Lookups of objects the manifest does not know, at once.
const HEAD_CONCURRENCY: usize = 16;
/// How often changed manifests are written back.
const FLUSH_INTERVAL: Duration = Duration::from_secs(3);

/// The part size for a file of `size` bytes: 8 MiB, or more (whole MiB) for huge files.
pub fn part_size_for(size: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS);
    needed.div_ceil(1024 * 1024).max(1) * 1024 * 1024
}

fn part_size(size: u64) -> u64 {
    part_size_for(size).max(MIN_PART)
}

/// Checks a target or object path: relative, plain names joined by '/'.
fn check_rel(what: &str, s: &str) -> Result<String, Status> {
    if s.len() > 1024 || s.chars().any(char::is_control) || s.contains('\\') {
        return Err(Status::invalid_argument(format!(
            "{what} '{s}' is not allowed: use at most 1024 printable characters and '/' as separator"
        )));
    }
    datamover_core::paths::safe_relative(s.trim_end_matches('/').as_bytes()).map_err(|e| {
        Status::invalid_argument(format!(
            "{what} '{s}' is not allowed ({}): use a relative path without '.' or '..' components",
            e.why
        ))
    })?;
    Ok(s.trim_end_matches('/').to_string())
}

/// Objects a listing page holds; a split listing asks for one page a range.
const LIST_PAGE: usize = 1000;
/// The most ranges one listing is split into.
const MAX_LIST_RANGES: usize = 256;

/// Every [`LIST_PAGE`]th of the manifest's paths (in key order) as full keys: where a
/// listing of the target can be split.
fn split_points<'a>(paths: impl Iterator<Item = &'a String>, prefix: &str) -> Vec<String> {
    let mut paths: Vec<&String> = paths.collect();
    if paths.len() <= LIST_PAGE {
        return Vec::new();
    }
    paths.sort_unstable();
    let step = LIST_PAGE.max(paths.len().div_ceil(MAX_LIST_RANGES));
    paths
        .iter()
        .skip(step - 1)
        .step_by(step)
        .map(|p| format!("{prefix}{p}"))
        .collect()
}

fn store_status(e: StoreError) -> Status {
    status(RepoError::Store(e))
}

fn to_proto(path: String, size: u64, etag: &str, e: Option<&Entry>) -> v1::SyncObject {
    let e = e.filter(|e| e.hash != UNKNOWN_HASH);
    v1::SyncObject {
        path,
        size,
        hash: e
            .map(|e| Bytes::copy_from_slice(&e.hash))
            .unwrap_or_default(),
        mtime_ns: e.map_or(0, |e| e.mtime_ns),
        mode: e.map_or(0, |e| e.mode),
        etag: etag.to_string(),
    }
}

/// The manifest's hash of an object written by another tool (no metadata of ours).
const UNKNOWN_HASH: [u8; 32] = [0; 32];

/// One message of an upload after its header.
enum Piece {
    Data(Bytes),
    Trailer([u8; 32]),
}

async fn next_piece(stream: &mut Streaming<v1::SyncPutRequest>) -> Result<Piece, Status> {
    match stream.message().await? {
        Some(v1::SyncPutRequest {
            part: Some(PutPart::Data(d)),
        }) => Ok(Piece::Data(d)),
        Some(v1::SyncPutRequest {
            part: Some(PutPart::Trailer(t)),
        }) => {
            let h = t.hash.as_ref().try_into().map_err(|_| {
                Status::invalid_argument("the upload's trailer needs a 32-byte BLAKE3 hash")
            })?;
            Ok(Piece::Trailer(h))
        }
        Some(_) => Err(Status::invalid_argument(
            "unexpected message in an upload: send the header once, then data, then the trailer",
        )),
        None => Err(Status::cancelled(
            "the upload ended before its trailer: the file is sent again (an unfinished large upload resumes)",
        )),
    }
}

fn changed_while_sent(path: &str) -> Status {
    Status::aborted(format!(
        "{path} changed while it was being uploaded (its bytes no longer match the size and hash read before): the stored object was left as it was; the file is sent again on the next pass"
    ))
}

pub struct SyncService {
    objects: Arc<dyn ObjectStore>,
    creds: Arc<CredentialStore>,
    metrics: Arc<Metrics>,
    state: Arc<SyncState>,
    manifests: Arc<Manifests>,
    slots: Arc<Semaphore>,
    /// The S3 gateway's port and key, when it is on.
    s3: Option<(u16, crate::s3::auth::GatewayKey)>,
}

impl SyncService {
    /// The gRPC service, taking and sending messages up to
    /// [`datamover_proto::MAX_MESSAGE_BYTES`].
    pub fn into_server(self) -> datamover_proto::v1::sync_server::SyncServer<Self> {
        datamover_proto::v1::sync_server::SyncServer::new(self)
            .max_decoding_message_size(datamover_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(datamover_proto::MAX_MESSAGE_BYTES)
    }

    /// Hands out S3 gateway keys (the gateway serves on `port`).
    pub fn with_s3_gateway(mut self, port: u16, key: crate::s3::auth::GatewayKey) -> Self {
        self.s3 = Some((port, key));
        self
    }

    /// `limits`: how long unused manifests stay in memory and how many entries may.
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        creds: Arc<CredentialStore>,
        metrics: Arc<Metrics>,
        limits: ManifestLimits,
    ) -> Self {
        let manifests = Arc::new(Manifests::new(
            Arc::clone(&objects),
            Arc::clone(&metrics),
            limits,
        ));
        SyncService {
            objects,
            creds,
            metrics,
            state: Arc::default(),
            manifests,
            slots: Arc::new(Semaphore::new(UPLOAD_SLOTS)),
            s3: None,
        }
    }

    /// Writes changed manifests back every few seconds and drops idle ones from memory,
    /// for as long as the server runs.
    pub fn spawn_flusher(&self) -> Flusher {
        let flusher = Flusher {
            manifests: Arc::clone(&self.manifests),
        };
        let f = flusher.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                f.manifests.sweep().await;
            }
        });
        flusher
    }

    async fn auth(
        &self,
        (meta, peer): (tonic::metadata::MetadataMap, Option<std::net::IpAddr>),
        op: Op,
    ) -> Result<Identity, Status> {
        let id = self.creds.authenticate(&meta, peer).await?;
        id.require(op)?;
        if id.tenant.starts_with('.') || id.tenant.contains('/') {
            return Err(Status::permission_denied(
                "a tenant that syncs needs a name without '/' that does not begin with '.': rename it in the config key tenants",
            ));
        }
        Ok(id)
    }

    /// Times and counts one request to the object store.
    async fn req<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        record(&self.metrics, op, "sync", fut).await
    }

    /// The manifest of a tenant's target, loaded on first use; it stays in memory while
    /// the slot is held.
    async fn manifest(&self, tenant: &str, target: &str) -> Result<(String, Arc<Slot>), Status> {
        let key = manifest_key(tenant, target);
        let slot = self.manifests.slot(&key);
        {
            let mut data = slot.data.lock().await;
            if data.is_none() && self.s3.is_some() {
                // The target's name as an S3 bucket stays this tenant's.
                crate::s3::owners::note_sync_target(self.objects.as_ref(), tenant, target).await;
            }
            self.manifests
                .ensure_loaded(&key, &slot, &mut data)
                .await
                .map_err(store_status)?;
        }
        Ok((key, slot))
    }

    async fn remember(&self, tenant: &str, target: &str, rel: &str, entry: Entry) {
        if let Ok((key, slot)) = self.manifest(tenant, target).await {
            if let Some(l) = slot.data.lock().await.as_mut() {
                l.set(rel.to_string(), entry);
                slot.note_len(l);
            }
            self.manifests.mark_dirty(&key);
        }
    }
}

/// Counts one file moved in `direction`.
fn count_file(metrics: &Metrics, direction: &str, bytes: u64, started: Instant) {
    metrics.sync_files.with_label_values(&[direction]).inc();
    metrics
        .sync_bytes
        .with_label_values(&[direction])
        .inc_by(bytes);
    metrics
        .sync_seconds
        .with_label_values(&[direction])
        .observe(started.elapsed().as_secs_f64());
}

/// Who calls: the metadata with the credential, and the peer address.
fn caller<T>(req: &Request<T>) -> (tonic::metadata::MetadataMap, Option<std::net::IpAddr>) {
    (req.metadata().clone(), req.remote_addr().map(|a| a.ip()))
}

async fn record<T>(
    metrics: &Metrics,
    op: &'static str,
    ty: &'static str,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let t = Instant::now();
    let r = fut.await;
    metrics
        .store_requests
        .with_label_values(&[op, ty, if r.is_ok() { "ok" } else { "error" }])
        .inc();
    metrics
        .store_seconds
        .with_label_values(&[op])
        .observe(t.elapsed().as_secs_f64());
    r
}

async fn collect(mut body: datamover_repo::objects::ByteStream) -> Result<Bytes, StoreError> {
    let mut out = BytesMut::new();
    while let Some(piece) = body.next().await {
        out.extend_from_slice(&piece?);
    }
    Ok(out.freeze())
}

/// Writes changed manifests back (also at shutdown).
#[derive(Clone)]
pub struct Flusher {
    manifests: Arc<Manifests>,
}

impl Flusher {
    pub async fn flush(&self) {
        self.manifests.flush().await;
    }
}

#[tonic::async_trait]
impl Sync for SyncService {
    type ListStream = ReceiverStream<Result<v1::SyncListResponse, Status>>;
    type GetStream = ReceiverStream<Result<v1::SyncGetResponse, Status>>;

    async fn list(
        &self,
        req: Request<v1::SyncListRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let id = self.auth(caller(&req), Op::List).await?;
        let target = check_rel("target", &req.get_ref().target)?;
        let prefix = format!("{}/{target}/", id.tenant);
        let (mkey, slot) = self.manifest(&id.tenant, &target).await?;
        // The manifest knows roughly what the listing holds: split it there into ranges
        // the store lists at once (an unchanged pass is then one round trip, not one a
        // thousand objects).
        let bounds = {
            let guard = slot.data.lock().await;
            guard
                .as_ref()
                .map(|l| split_points(l.manifest.entries.keys(), &prefix))
                .unwrap_or_default()
        };
        let listed = self
            .req("list", self.objects.list_split(&prefix, &bounds))
            .await
            .map_err(store_status)?;
        let mut objects = Vec::with_capacity(listed.len());
        let mut unknown = Vec::new();
        let mut changed = false;
        {
            let mut guard = slot.data.lock().await;
            let Some(m) = guard.as_mut() else {
                return Err(Status::internal("the sync manifest was not loaded: retry"));
            };
            let mut seen = std::collections::HashSet::with_capacity(listed.len());
            for info in listed {
                let Some(rel) = info.key.strip_prefix(&prefix) else {
                    continue;
                };
                if check_rel("object path", rel).is_err() {
                    tracing::warn!(key = %info.key, "object with an unsafe path under a sync target: not listed");
                    continue;
                }
                seen.insert(rel.to_string());
                match m.get(rel) {
                    Some(e) if e.etag == info.etag && e.size == info.size => {
                        objects.push(to_proto(rel.to_string(), info.size, &info.etag, Some(e)));
                    }
                    _ => unknown.push((rel.to_string(), info)),
                }
            }
            changed |= m.retain(|k| seen.contains(k));
            slot.note_len(m);
        }
        // Objects written or changed by someone else: one lookup each, then remembered.
        let heads: Vec<(String, u64, Option<ObjectHead>)> =
            futures::stream::iter(unknown.into_iter().map(|(rel, info)| {
                let key = info.key.clone();
                async move {
                    let head = self.req("head", self.objects.head(&key)).await;
                    (rel, info.size, head)
                }
            }))
            .buffer_unordered(HEAD_CONCURRENCY)
            .map(|(rel, size, head)| head.map(|h| (rel, size, h)))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(store_status)?;
        {
            let mut guard = slot.data.lock().await;
            let Some(m) = guard.as_mut() else {
                return Err(Status::internal("the sync manifest was not loaded: retry"));
            };
            for (rel, size, head) in heads {
                let Some(head) = head else { continue };
                let meta = head.meta.unwrap_or(FileMeta {
                    hash: UNKNOWN_HASH,
                    mtime_ns: 0,
                    mode: 0,
                });
                let e = Entry::new(head.etag.clone(), head.size.max(size), meta);
                objects.push(to_proto(rel.clone(), e.size, &head.etag, Some(&e)));
                m.set(rel, e);
                changed = true;
            }
            slot.note_len(m);
        }
        if changed {
            self.manifests.mark_dirty(&mkey);
        }
        objects.sort_by(|a, b| a.path.cmp(&b.path));
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut it = objects.into_iter().peekable();
            // Bounded by the listing; an empty target still gets one (empty) message.
            loop {
                let batch: Vec<v1::SyncObject> = it.by_ref().take(LIST_BATCH).collect();
                let last = it.peek().is_none();
                if tx
                    .send(Ok(v1::SyncListResponse { objects: batch }))
                    .await
                    .is_err()
                    || last
                {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn put_offset(
        &self,
        req: Request<v1::SyncPutOffsetRequest>,
    ) -> Result<Response<v1::SyncPutOffsetResponse>, Status> {
        let id = self.auth(caller(&req), Op::Backup).await?;
        let r = req.into_inner();
        let target = check_rel("target", &r.target)?;
        let obj = r.object.unwrap_or_default();
        let path = check_rel("path", &obj.path)?;
        let key = format!("{}/{target}/{path}", id.tenant);
        let offset = if obj.size > SINGLE_PUT_MAX {
            self.load_upload(&key)
                .await?
                .filter(|rec| rec.size == obj.size && rec.hash.as_slice() == obj.hash.as_ref())
                .map_or(0, |rec| rec.offset())
        } else {
            0
        };
        Ok(Response::new(v1::SyncPutOffsetResponse { offset }))
    }

    async fn put(
        &self,
        req: Request<Streaming<v1::SyncPutRequest>>,
    ) -> Result<Response<v1::SyncPutResponse>, Status> {
        let id = self.auth(caller(&req), Op::Backup).await?;
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(v1::SyncPutRequest {
                part: Some(PutPart::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "an upload begins with its header (target, path, size, hash)",
                ));
            }
        };
        let target = check_rel("target", &header.target)?;
        let obj = header.object.unwrap_or_default();
        let path = check_rel("path", &obj.path)?;
        let hash: [u8; 32] = obj
            .hash
            .as_ref()
            .try_into()
            .map_err(|_| Status::invalid_argument("an upload needs the file's BLAKE3 hash"))?;
        let key = format!("{}/{target}/{path}", id.tenant);
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the server is shutting down: retry"))?;
        let Some(_guard) = self.state.begin_upload(&key) else {
            return Err(Status::aborted(format!(
                "another upload of {path} to {target} is running: it is retried on the next pass"
            )));
        };
        let started = Instant::now();
        let meta = FileMeta {
            hash,
            mtime_ns: obj.mtime_ns,
            mode: obj.mode,
        };
        let etag = if obj.size <= SINGLE_PUT_MAX {
            if header.offset != 0 {
                return Err(Status::invalid_argument(
                    "only uploads of more than 8 MiB resume from an offset",
                ));
            }
            let data = Self::receive_small(&mut stream, &path, obj.size, hash).await?;
            self.creds.still_valid(&id)?;
            self.req("put", self.objects.put(&key, data, Some(meta)))
                .await
                .map_err(store_status)?
        } else {
            self.receive_multipart(&id, &mut stream, &key, &path, meta, obj.size, header.offset)
                .await?
        };
        self.remember(&id.tenant, &target, &path, Entry::new(etag, obj.size, meta))
            .await;
        let sent = obj.size - header.offset;
        count_file(&self.metrics, "egress", sent, started);
        tracing::debug!(client = %id.client_id, %target, %path, bytes = sent, "synced file stored");
        Ok(Response::new(v1::SyncPutResponse {
            bytes_received: sent,
            offset: header.offset,
        }))
    }

    async fn get(
        &self,
        req: Request<v1::SyncGetRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let id = self.auth(caller(&req), Op::Restore).await?;
        let r = req.into_inner();
        let target = check_rel("target", &r.target)?;
        let path = check_rel("path", &r.path)?;
        let key = format!("{}/{target}/{path}", id.tenant);
        let (head, mut body) = self
            .req("get", self.objects.get(&key, r.offset))
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => Status::not_found(format!(
                    "{path} is no longer under {target} (removed since the listing): it is skipped; the next pass catches up"
                )),
                other => store_status(other),
            })?;
        let entry = match head.meta {
            Some(meta) => Some(Entry::new(head.etag.clone(), head.size, meta)),
            None => {
                let (_, slot) = self.manifest(&id.tenant, &target).await?;
                let m = slot.data.lock().await;
                m.as_ref()
                    .and_then(|l| l.get(&path))
                    .filter(|e| e.etag == head.etag)
                    .cloned()
            }
        };
        let first = to_proto(path, head.size, &head.etag, entry.as_ref());
        let metrics = Arc::clone(&self.metrics);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sent = 0u64;
            let mut object = Some(first);
            if tx
                .send(Ok(v1::SyncGetResponse {
                    object: object.take(),
                    data: Bytes::new(),
                }))
                .await
                .is_err()
            {
                return;
            }
            // Bounded by the object's size.
            while let Some(piece) = body.next().await {
                let mut piece = match piece {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(store_status(e))).await;
                        return;
                    }
                };
                while !piece.is_empty() {
                    let data = piece.split_to(piece.len().min(GET_PIECE));
                    sent += data.len() as u64;
                    if tx
                        .send(Ok(v1::SyncGetResponse { object: None, data }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            count_file(&metrics, "ingress", sent, started);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn s3_credentials(
        &self,
        req: Request<v1::S3CredentialsRequest>,
    ) -> Result<Response<v1::S3CredentialsResponse>, Status> {
        self.s3_key(req).await.map(Response::new)
    }

    async fn delete(
        &self,
        req: Request<v1::SyncDeleteRequest>,
    ) -> Result<Response<v1::SyncDeleteResponse>, Status> {
        let id = self.auth(caller(&req), Op::Delete).await?;
        let r = req.into_inner();
        let target = check_rel("target", &r.target)?;
        let paths = r
            .paths
            .iter()
            .map(|p| check_rel("path", p))
            .collect::<Result<Vec<_>, _>>()?;
        let (mkey, slot) = self.manifest(&id.tenant, &target).await?;
        let mut deleted = 0;
        for path in paths {
            let key = format!("{}/{target}/{path}", id.tenant);
            self.req("delete", self.objects.delete(&key))
                .await
                .map_err(store_status)?;
            if let Some(l) = slot.data.lock().await.as_mut() {
                l.remove(&path);
                slot.note_len(l);
            }
            deleted += 1;
        }
        self.manifests.mark_dirty(&mkey);
        tracing::info!(client = %id.client_id, %target, deleted, "synced objects deleted");
        Ok(Response::new(v1::SyncDeleteResponse { deleted }))
    }
}

impl SyncService {
    /// The caller's S3 gateway key: see the `S3Credentials` call of the proto.
    async fn s3_key(
        &self,
        req: Request<v1::S3CredentialsRequest>,
    ) -> Result<v1::S3CredentialsResponse, Status> {
        let id = self.auth(caller(&req), Op::List).await?;
        let Some((port, key)) = &self.s3 else {
            return Err(Status::failed_precondition(
                "this server does not serve the S3 gateway: add s3:<port> to its PROTOCOLS (spec.protocols of the DatamoverServer)",
            ));
        };
        let Some((_, fp)) = self.creds.lookup_derived(&id.client_id) else {
            return Err(Status::failed_precondition(
                "S3 keys derive from a client credential file: a client that signs in with a ServiceAccount token has none; ask the operator for a client credential",
            ));
        };
        tracing::info!(client = %id.client_id, "S3 gateway key handed out");
        Ok(v1::S3CredentialsResponse {
            access_key_id: id.client_id.clone(),
            secret_access_key: key.secret(&id.client_id, &fp),
            port: u32::from(*port),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_points_every_page() {
        let paths: Vec<String> = (0..2500).map(|i| format!("f{i:05}")).collect();
        let b = split_points(paths.iter(), "t/x/");
        assert_eq!(b, vec!["t/x/f00999".to_string(), "t/x/f01999".to_string()]);
        assert!(split_points(paths[..1000].iter(), "t/x/").is_empty());
        let many: Vec<String> = (0..1_000_000).map(|i| format!("{i:07}")).collect();
        assert!(split_points(many.iter(), "").len() <= MAX_LIST_RANGES);
    }

    #[test]
    fn part_sizes() {
        assert_eq!(part_size(9 * 1024 * 1024), MIN_PART);
        let huge = 200u64 * 1024 * 1024 * 1024;
        let p = part_size(huge);
        assert!(huge.div_ceil(p) <= MAX_PARTS);
        assert_eq!(p % (1024 * 1024), 0);
    }

    #[test]
    fn paths_are_checked() {
        assert!(check_rel("t", "a/b").is_ok());
        assert_eq!(check_rel("t", "a/b/").unwrap(), "a/b");
        for bad in ["", "/a", "a/../b", "..", "a//b", "./a", "a\\b", "a\nb"] {
            assert!(check_rel("t", bad).is_err(), "{bad:?} must be refused");
        }
    }
}
