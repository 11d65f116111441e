//! Edge sync: keeps a device directory and a target under the tenant's sync prefix in
//! step, through the server (the device holds no storage keys).
//!
//! - **Egress** (directory → target): files whose content hash differs from the object's
//!   are uploaded; a pass over an unchanged directory costs one listing (the [`local`]
//!   state says which files need hashing again: only those whose `stat` changed).
//! - **Ingress** (target → directory): objects whose hash differs from the local file are
//!   downloaded under a temporary name, checked and renamed; it stops at a disk budget.
//! - Deletions propagate only with `--delete`. A pass runs once or every `--interval`
//!   (15 s), egress also soon after file-system events. Timestamps are never compared
//!   across clocks, so a device whose clock is off neither re-sends nor misses an edit.
//! - [`workload`]: the mappings of a Flotta `EdgeWorkload` (`spec.data.egress/ingress`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datamover_proto::v1::{self, sync_put_request::Part as PutPart};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::ClientError;
use crate::connect::{self, Conn, SyncApi};
use crate::progress::{Counters, Reporter};
use crate::settings::ClientSettings;

pub mod local;
pub mod workload;

use local::{LocalFile, Stat, State, StateEntry};

/// Files up to this size go up in one request; larger ones resume after an interruption.
const SINGLE_PUT_MAX: u64 = 8 * 1024 * 1024;
/// Bytes per upload message.
const PIECE: usize = 1024 * 1024;
/// Attempts at a file that changes while it is being sent, within one pass.
const CHANGE_ATTEMPTS: u32 = 3;
/// Paths per delete request.
const DELETE_BATCH: usize = 1000;
/// Quiet time after a file-system event before an egress pass starts.
const DEBOUNCE: Duration = Duration::from_secs(2);
/// Free space ingress leaves on the device's file system, besides any budget.
const FREE_SPACE_RESERVE: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

/// One mapping and how to run it.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncOptions {
    pub direction: Direction,
    /// The device directory.
    pub local: PathBuf,
    /// The target under the tenant's sync prefix.
    pub target: String,
    pub once: bool,
    pub delete: bool,
    pub interval: Duration,
    /// Egress: each pass writes a full copy under `<target>/YYYY-MM-DD-HHMMSS/`.
    pub point_in_time: bool,
    /// Ingress: the most bytes the directory may hold.
    pub disk_budget: Option<u64>,
    /// Bytes per second for all transfers of this mapping.
    pub bwlimit: Option<u64>,
    /// Files moved at once (small files are bound by request latency, not bandwidth).
    pub transfers: usize,
    pub state_dir: Option<PathBuf>,
}

impl SyncOptions {
    pub fn new(direction: Direction, local: PathBuf, target: String) -> SyncOptions {
        SyncOptions {
            direction,
            local,
            target,
            once: false,
            delete: false,
            interval: Duration::from_secs(15),
            point_in_time: false,
            disk_budget: None,
            bwlimit: None,
            transfers: 16,
            state_dir: None,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone)]
pub struct PassResult {
    pub target: String,
    /// Files of the source side considered (local files for egress, objects for ingress).
    pub files: u64,
    pub bytes: u64,
    pub files_sent: u64,
    pub bytes_sent: u64,
    pub files_deleted: u64,
    pub files_failed: u64,
    pub first_failure: Option<String>,
    pub duration: Duration,
}

impl PassResult {
    pub fn to_json(&self, o: &SyncOptions) -> Value {
        json!({
            "direction": o.direction.as_str(),
            "path": o.local.display().to_string(),
            "target": self.target,
            "files": self.files,
            "bytes": self.bytes,
            "files_sent": self.files_sent,
            "bytes_sent": self.bytes_sent,
            "files_deleted": self.files_deleted,
            "files_failed": self.files_failed,
            "duration_s": (self.duration.as_secs_f64() * 1000.0).round() / 1000.0,
        })
    }
}

/// A shared bandwidth limit: transfers wait until their bytes fit the rate.
struct Limiter {
    bps: Option<u64>,
    start: Instant,
    sent: Mutex<u64>,
}

impl Limiter {
    fn new(bps: Option<u64>) -> Arc<Limiter> {
        Arc::new(Limiter {
            bps: bps.filter(|b| *b > 0),
            start: Instant::now(),
            sent: Mutex::new(0),
        })
    }

    async fn take(&self, n: usize) {
        let Some(bps) = self.bps else { return };
        let due = {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            *sent += n as u64;
            Duration::from_secs_f64(*sent as f64 / bps as f64)
        };
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// `YYYY-MM-DD-HHMMSS` (UTC) of now.
pub fn point_in_time_stamp() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    // 2026-11-22T06:01:22Z → 2026-11-22-060122
    let (date, time) = t.split_once('T').unwrap_or((&t, ""));
    format!("{date}-{}", time.trim_end_matches('Z').replace(':', ""))
}

/// Is this a "the file changed while it was sent" refusal (retried), or fatal?
fn is_changed(e: &tonic::Status) -> bool {
    e.code() == Code::Aborted
}

async fn list_remote(api: &mut SyncApi, target: &str) -> Result<Vec<v1::SyncObject>, ClientError> {
    let mut stream = api
        .list(v1::SyncListRequest {
            target: target.to_string(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend(msg.objects);
    }
    Ok(out)
}

/// Uploads one file (resuming an interrupted upload of the same content); returns the
/// bytes sent.
async fn upload(
    mut api: SyncApi,
    root: &Path,
    target: &str,
    file: &LocalFile,
    hash: [u8; 32],
    limiter: Arc<Limiter>,
    counters: Arc<Counters>,
) -> Result<u64, tonic::Status> {
    let object = v1::SyncObject {
        path: file.rel.clone(),
        size: file.stat.size,
        hash: Bytes::copy_from_slice(&hash),
        mtime_ns: file.stat.mtime_ns,
        mode: file.stat.mode,
        etag: String::new(),
    };
    let offset = if file.stat.size > SINGLE_PUT_MAX {
        api.put_offset(v1::SyncPutOffsetRequest {
            target: target.to_string(),
            object: Some(object.clone()),
        })
        .await?
        .into_inner()
        .offset
        .min(file.stat.size)
    } else {
        0
    };
    if offset > 0 {
        tracing::info!(path = %file.rel, offset, "resuming an interrupted upload");
    }
    let (tx, rx) = mpsc::channel::<v1::SyncPutRequest>(4);
    let path = root.join(&file.rel);
    let size = file.stat.size;
    let header = v1::SyncPutRequest {
        part: Some(PutPart::Header(v1::SyncPutHeader {
            target: target.to_string(),
            object: Some(object),
            offset,
        })),
    };
    // Reads the file: its first `offset` bytes only to hash them, then exactly `size`
    // bytes in all. A file that shrank ends early and the server refuses it.
    let reader = tokio::spawn(async move {
        let _ = tx.send(header).await;
        let mut f = tokio::fs::File::open(&path).await?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; PIECE];
        let mut pos = 0u64;
        // Bounded by `size`.
        while pos < size {
            let want = (size - pos).min(PIECE as u64) as usize;
            let n = f.read(&mut buf[..want]).await?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            let from = offset.saturating_sub(pos).min(n as u64) as usize;
            pos += n as u64;
            if from < n {
                limiter.take(n - from).await;
                counters.add_sent((n - from) as u64);
                let data = Bytes::copy_from_slice(&buf[from..n]);
                if tx
                    .send(v1::SyncPutRequest {
                        part: Some(PutPart::Data(data)),
                    })
                    .await
                    .is_err()
                {
                    return Ok::<(), std::io::Error>(());
                }
            }
        }
        let _ = tx
            .send(v1::SyncPutRequest {
                part: Some(PutPart::Trailer(v1::SyncPutTrailer {
                    hash: Bytes::copy_from_slice(h.finalize().as_bytes()),
                })),
            })
            .await;
        Ok(())
    });
    let result = api.put(ReceiverStream::new(rx)).await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(tonic::Status::aborted(format!(
                "{} was removed while it was sent",
                file.rel
            )));
        }
        Ok(Err(e)) => {
            return Err(tonic::Status::aborted(format!("reading {}: {e}", file.rel)));
        }
        Err(e) => return Err(tonic::Status::internal(e.to_string())),
    }
    Ok(result?.into_inner().bytes_received)
}

/// A file's new state entry and, if it was uploaded, the bytes sent.
type Synced = (StateEntry, Option<u64>);
/// A downloaded file's state entry and the bytes received.
type Downloaded = (StateEntry, u64);

/// One egress pass.
pub async fn egress_pass(
    api: &SyncApi,
    o: &SyncOptions,
    counters: &Arc<Counters>,
) -> Result<PassResult, ClientError> {
    let started = Instant::now();
    let target = if o.point_in_time {
        format!(
            "{}/{}",
            o.target.trim_end_matches('/'),
            point_in_time_stamp()
        )
    } else {
        o.target.clone()
    };
    let root = o.local.clone();
    let meta = std::fs::metadata(&root).map_err(|e| ClientError::io(root.display(), e))?;
    if !meta.is_dir() {
        return Err(ClientError::Usage(format!(
            "{} is not a directory: egress syncs a directory",
            root.display()
        )));
    }
    let state_path = local::state_path(&root, o.state_dir.as_deref(), "egress", &target);
    // The local side (the state and the scan) and the target's listing at once: an
    // unchanged pass is no more than the longer of the two.
    let scan_root = root.clone();
    let load_path = state_path.clone();
    let local_side =
        tokio::task::spawn_blocking(move || (State::load(&load_path), local::scan(&scan_root)));
    let mut api = api.clone();
    let (local_side, remote) = tokio::join!(local_side, list_remote(&mut api, &target));
    let (mut state, scanned) = local_side.map_err(|e| ClientError::Io(e.to_string()))?;
    let (files, skipped) = scanned?;
    let remote = remote?;
    if skipped.symlinks + skipped.special + skipped.non_utf8 > 0 {
        tracing::info!(
            symlinks = skipped.symlinks,
            special = skipped.special,
            non_utf8 = skipped.non_utf8,
            "not synced: symlinks, special files and names that are not UTF-8"
        );
    }
    let remote_hash: std::collections::HashMap<&str, &[u8]> = remote
        .iter()
        .map(|r| (r.path.as_str(), r.hash.as_ref()))
        .collect();

    let mut result = PassResult {
        target: target.clone(),
        files: files.len() as u64,
        bytes: files.iter().map(|f| f.stat.size).sum(),
        ..Default::default()
    };
    let limiter = Limiter::new(o.bwlimit);
    // Hash what changed, then send what differs; a file that changes while it is sent is
    // hashed and sent again (a few times), or left for the next pass.
    let outcomes: Vec<(LocalFile, Result<Option<Synced>, ClientError>)> =
        futures::stream::iter(files.iter().cloned().map(|f| {
            let known = state.known_hash(&f);
            let remote = remote_hash.get(f.rel.as_str()).map(|h| h.to_vec());
            let api = api.clone();
            let root = root.clone();
            let target = target.clone();
            let limiter = Arc::clone(&limiter);
            let counters = Arc::clone(counters);
            async move {
                let r =
                    sync_one_file(api, &root, &target, &f, known, remote, limiter, counters).await;
                (f, r)
            }
        }))
        .buffer_unordered(o.transfers.max(1))
        .collect()
        .await;
    let mut fresh = std::collections::HashMap::with_capacity(outcomes.len());
    for (f, r) in outcomes {
        counters.add_file();
        match r {
            Ok(Some((entry, sent))) => {
                if let Some(sent) = sent {
                    result.files_sent += 1;
                    result.bytes_sent += sent;
                }
                fresh.insert(f.rel, entry);
            }
            Ok(None) => {}
            Err(e)
                if matches!(
                    e,
                    ClientError::Auth(_) | ClientError::Unreachable(_) | ClientError::NoSpace(_)
                ) || e.is_connection_lost() =>
            {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(path = %f.rel, error = %e, "not synced this pass");
                result.files_failed += 1;
                result.first_failure.get_or_insert_with(|| e.to_string());
            }
        }
    }
    // An unchanged pass leaves the state as it was: nothing to write.
    if state.entries != fresh {
        state.entries = fresh;
        state.save(&state_path);
    }

    if o.delete {
        let local: std::collections::HashSet<&str> = files.iter().map(|f| f.rel.as_str()).collect();
        let gone: Vec<String> = remote
            .iter()
            .filter(|r| !local.contains(r.path.as_str()))
            .map(|r| r.path.clone())
            .collect();
        for batch in gone.chunks(DELETE_BATCH) {
            let r = api
                .delete(v1::SyncDeleteRequest {
                    target: target.clone(),
                    paths: batch.to_vec(),
                })
                .await?
                .into_inner();
            result.files_deleted += r.deleted;
        }
    }
    result.duration = started.elapsed();
    Ok(result)
}

/// Hashes a file if needed and uploads it if the target's copy differs. Returns the
/// state entry to remember and, if it was uploaded, the bytes sent (`None`: the file
/// vanished).
#[allow(clippy::too_many_arguments)]
async fn sync_one_file(
    api: SyncApi,
    root: &Path,
    target: &str,
    f: &LocalFile,
    known: Option<[u8; 32]>,
    remote: Option<Vec<u8>>,
    limiter: Arc<Limiter>,
    counters: Arc<Counters>,
) -> Result<Option<Synced>, ClientError> {
    let path = root.join(&f.rel);
    let mut current = f.clone();
    let mut hash = known;
    for attempt in 1..=CHANGE_ATTEMPTS {
        let h = match hash {
            Some(h) => h,
            None => {
                let p = path.clone();
                match tokio::task::spawn_blocking(move || local::hash_file(&p))
                    .await
                    .map_err(|e| ClientError::Io(e.to_string()))?
                {
                    Ok((h, stat)) => {
                        current.stat = stat;
                        h
                    }
                    Err(_) if !path.exists() => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
        };
        counters.add_bytes(current.stat.size);
        let entry = StateEntry::new(current.stat, h, String::new());
        if remote.as_deref() == Some(h.as_slice()) {
            return Ok(Some((entry, None)));
        }
        match upload(
            api.clone(),
            root,
            target,
            &current,
            h,
            Arc::clone(&limiter),
            Arc::clone(&counters),
        )
        .await
        {
            Ok(sent) => return Ok(Some((entry, Some(sent)))),
            Err(s) if is_changed(&s) && attempt < CHANGE_ATTEMPTS => {
                // The server's refusal (the bytes did not match the declared size and
                // hash: the file changed) or a local read error; each says which.
                eprintln!(
                    "datamover-client: {}: {}: reading it again (attempt {} of {CHANGE_ATTEMPTS})",
                    f.rel,
                    s.message(),
                    attempt + 1
                );
                hash = None;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(s) => return Err(ClientError::from_status(s)),
        }
    }
    Err(ClientError::Io(format!(
        "{} kept changing while it was sent: it is tried again on the next pass",
        f.rel
    )))
}

/// Free bytes on the file system of `dir` for an unprivileged writer.
fn free_space(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Downloads one object into `root` under a temporary name, checks it, renames it into
/// place. Returns the new state entry and the bytes received.
async fn download(
    mut api: SyncApi,
    root: &Path,
    target: &str,
    obj: &v1::SyncObject,
    limiter: Arc<Limiter>,
    counters: Arc<Counters>,
) -> Result<Downloaded, ClientError> {
    let rel = datamover_core::paths::safe_relative(obj.path.as_bytes())
        .map_err(|e| ClientError::Corrupt(format!("{e}: the object is not downloaded")))?;
    let dest = local::ensure_parents(root, &rel)?;
    let name = rel
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tag = if obj.hash.is_empty() {
        blake3::hash(obj.etag.as_bytes()).to_hex()[..16].to_string()
    } else {
        hex::encode(&obj.hash[..8])
    };
    let partial = dest.with_file_name(format!(".{name}.{tag}{}", local::PARTIAL_SUFFIX));
    let have = std::fs::symlink_metadata(&partial)
        .ok()
        .filter(|m| m.is_file())
        .map_or(0, |m| m.len());
    let offset = if have < obj.size { have } else { 0 };
    let mut hasher = blake3::Hasher::new();
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(offset == 0)
        .open(&partial)
        .await
        .map_err(|e| ClientError::io(partial.display(), e))?;
    if offset > 0 {
        // Resume: the bytes already here count towards the hash.
        let mut buf = vec![0u8; PIECE];
        let mut left = offset;
        while left > 0 {
            let n = file
                .read(&mut buf[..(left.min(PIECE as u64) as usize)])
                .await
                .map_err(|e| ClientError::io(partial.display(), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| ClientError::io(partial.display(), e))?;
        tracing::info!(path = %obj.path, offset, "resuming an interrupted download");
    }
    let fail = |partial: &Path, e: ClientError| {
        let _ = std::fs::remove_file(partial);
        e
    };
    let mut stream = api
        .get(v1::SyncGetRequest {
            target: target.to_string(),
            path: obj.path.clone(),
            offset,
        })
        .await?
        .into_inner();
    let mut received = 0u64;
    let mut total = offset;
    // Bounded by the object's size (the server stops at its end).
    while let Some(msg) = stream.message().await? {
        if let Some(head) = &msg.object
            && (head.size != obj.size || (!obj.hash.is_empty() && head.hash != obj.hash))
        {
            return Err(fail(
                &partial,
                ClientError::Io(format!(
                    "{} changed on the server since it was listed: it is fetched on the next pass",
                    obj.path
                )),
            ));
        }
        if msg.data.is_empty() {
            continue;
        }
        total += msg.data.len() as u64;
        if total > obj.size {
            return Err(fail(
                &partial,
                ClientError::Io(format!(
                    "{} grew on the server while it was read: fetched on the next pass",
                    obj.path
                )),
            ));
        }
        limiter.take(msg.data.len()).await;
        hasher.update(&msg.data);
        file.write_all(&msg.data)
            .await
            .map_err(|e| fail(&partial, ClientError::io(partial.display(), e)))?;
        received += msg.data.len() as u64;
        counters.add_sent(msg.data.len() as u64);
    }
    let hash = *hasher.finalize().as_bytes();
    if total != obj.size || (!obj.hash.is_empty() && hash.as_slice() != obj.hash.as_ref()) {
        return Err(fail(
            &partial,
            ClientError::Corrupt(format!(
                "{} arrived with {total} of {} bytes or a different hash: it was not written; the next pass fetches it again",
                obj.path, obj.size
            )),
        ));
    }
    file.flush()
        .await
        .map_err(|e| fail(&partial, ClientError::io(partial.display(), e)))?;
    drop(file);
    if obj.mode != 0 {
        use std::os::unix::fs::PermissionsExt;
        let _ =
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(obj.mode & 0o777));
    }
    if obj.mtime_ns != 0 {
        let t = filetime::FileTime::from_unix_time(
            obj.mtime_ns.div_euclid(1_000_000_000),
            obj.mtime_ns.rem_euclid(1_000_000_000) as u32,
        );
        let _ = filetime::set_file_mtime(&partial, t);
    }
    if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
        return Err(fail(
            &partial,
            ClientError::Io(format!(
                "{} is a directory on the device but a file in the target: remove one of them",
                dest.display()
            )),
        ));
    }
    std::fs::rename(&partial, &dest)
        .map_err(|e| fail(&partial, ClientError::io(dest.display(), e)))?;
    let stat = Stat::of(
        &std::fs::symlink_metadata(&dest).map_err(|e| ClientError::io(dest.display(), e))?,
    );
    Ok((StateEntry::new(stat, hash, obj.etag.clone()), received))
}

/// One ingress pass.
pub async fn ingress_pass(
    api: &SyncApi,
    o: &SyncOptions,
    counters: &Arc<Counters>,
) -> Result<PassResult, ClientError> {
    let started = Instant::now();
    let root = o.local.clone();
    std::fs::create_dir_all(&root).map_err(|e| ClientError::io(root.display(), e))?;
    let state_path = local::state_path(&root, o.state_dir.as_deref(), "ingress", &o.target);
    let mut state = State::load(&state_path);
    let mut api = api.clone();
    let remote = list_remote(&mut api, &o.target).await?;
    let scan_root = root.clone();
    let (files, _) = tokio::task::spawn_blocking(move || local::scan(&scan_root))
        .await
        .map_err(|e| ClientError::Io(e.to_string()))??;
    let mut result = PassResult {
        target: o.target.clone(),
        files: remote.len() as u64,
        bytes: remote.iter().map(|r| r.size).sum(),
        ..Default::default()
    };

    // Deletions first: they free room for what comes.
    let local_by_path: std::collections::HashMap<&str, &LocalFile> =
        files.iter().map(|f| (f.rel.as_str(), f)).collect();
    let mut usage: u64 = files.iter().map(|f| f.stat.size).sum();
    if o.delete {
        let wanted: std::collections::HashSet<&str> =
            remote.iter().map(|r| r.path.as_str()).collect();
        for f in &files {
            if !wanted.contains(f.rel.as_str()) {
                let p = root.join(&f.rel);
                match std::fs::remove_file(&p) {
                    Ok(()) => {
                        result.files_deleted += 1;
                        usage = usage.saturating_sub(f.stat.size);
                        state.entries.remove(&f.rel);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ClientError::io(p.display(), e)),
                }
            }
        }
    }

    // Which objects differ from the device's files.
    let mut todo = Vec::new();
    let mut fresh = std::collections::HashMap::new();
    for obj in &remote {
        let Some(f) = local_by_path.get(obj.path.as_str()) else {
            todo.push(obj.clone());
            continue;
        };
        let mut known = state
            .entries
            .get(&f.rel)
            .filter(|e| e.stat == f.stat)
            .cloned();
        if let Some(e) = known.take() {
            // Recorded in the same clock tick as the file's last change: check the content.
            known = if e.racy {
                let p = root.join(&f.rel);
                match tokio::task::spawn_blocking(move || local::hash_file(&p))
                    .await
                    .map_err(|e| ClientError::Io(e.to_string()))?
                {
                    Ok((h, stat)) if h == e.hash => Some(StateEntry::new(stat, h, e.etag)),
                    _ => None,
                }
            } else {
                Some(e)
            };
        }
        let same = match known {
            // Downloaded from this very object, untouched since.
            Some(e) if !obj.etag.is_empty() && e.etag == obj.etag => Some(e),
            Some(e) if !obj.hash.is_empty() && e.hash.as_slice() == obj.hash.as_ref() => {
                Some(StateEntry {
                    etag: obj.etag.clone(),
                    ..e
                })
            }
            Some(_) => None,
            None if !obj.hash.is_empty() && f.stat.size == obj.size => {
                let p = root.join(&f.rel);
                match tokio::task::spawn_blocking(move || local::hash_file(&p))
                    .await
                    .map_err(|e| ClientError::Io(e.to_string()))?
                {
                    Ok((h, stat)) if h.as_slice() == obj.hash.as_ref() => {
                        Some(StateEntry::new(stat, h, obj.etag.clone()))
                    }
                    _ => None,
                }
            }
            None => None,
        };
        match same {
            Some(e) => {
                fresh.insert(obj.path.clone(), e);
            }
            None => todo.push(obj.clone()),
        }
    }

    // The disk budget and the free space: download in order until the next file would
    // not fit, then stop with a clear error.
    let mut free = free_space(&root)
        .unwrap_or(u64::MAX)
        .saturating_sub(FREE_SPACE_RESERVE);
    let mut allowed = Vec::with_capacity(todo.len());
    let mut stopped: Option<String> = None;
    for obj in todo {
        let replaced = local_by_path
            .get(obj.path.as_str())
            .map_or(0, |f| f.stat.size);
        let after = usage.saturating_sub(replaced) + obj.size;
        if let Some(budget) = o.disk_budget
            && after > budget
        {
            stopped = Some(format!(
                "ingress stopped at the disk budget: {} would hold {after} bytes with {}, more than the budget of {budget} bytes; raise --disk-budget or free space on the device (files already synced are kept)",
                root.display(),
                obj.path
            ));
            break;
        }
        if obj.size > free {
            stopped = Some(format!(
                "ingress stopped: {} needs {} bytes but the device has only {free} bytes free (keeping {FREE_SPACE_RESERVE} in reserve); free space on the device",
                obj.path, obj.size
            ));
            break;
        }
        free -= obj.size;
        usage = after;
        allowed.push(obj);
    }

    let limiter = Limiter::new(o.bwlimit);
    let outcomes: Vec<(String, Result<Downloaded, ClientError>)> =
        futures::stream::iter(allowed.into_iter().map(|obj| {
            let api = api.clone();
            let root = root.clone();
            let target = o.target.clone();
            let limiter = Arc::clone(&limiter);
            let counters = Arc::clone(counters);
            async move {
                let r = download(api, &root, &target, &obj, limiter, counters).await;
                (obj.path, r)
            }
        }))
        .buffer_unordered(o.transfers.max(1))
        .collect()
        .await;
    for (path, r) in outcomes {
        counters.add_file();
        match r {
            Ok((entry, received)) => {
                result.files_sent += 1;
                result.bytes_sent += received;
                counters.add_bytes(entry.stat.size);
                fresh.insert(path, entry);
            }
            Err(
                e @ (ClientError::Auth(_) | ClientError::NoSpace(_) | ClientError::Unreachable(_)),
            ) => {
                state.entries = fresh;
                state.save(&state_path);
                return Err(e);
            }
            Err(e) if e.is_connection_lost() => {
                state.entries = fresh;
                state.save(&state_path);
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(path = %path, error = %e, "not synced this pass");
                result.files_failed += 1;
                result.first_failure.get_or_insert_with(|| e.to_string());
            }
        }
    }
    // One flush of the file system for the whole pass instead of one per file: a file a
    // crash left short or empty is not in the saved state, so the next pass hashes it,
    // sees it differ and downloads it again.
    if result.files_sent > 0 {
        let dir = root.clone();
        let _ = tokio::task::spawn_blocking(move || {
            std::fs::File::open(&dir)
                .map(|d| nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)))
        })
        .await;
    }
    state.entries = fresh;
    state.save(&state_path);
    result.duration = started.elapsed();
    if let Some(msg) = stopped {
        return Err(ClientError::NoSpace(msg));
    }
    Ok(result)
}

async fn pass(
    api: &SyncApi,
    o: &SyncOptions,
    counters: &Arc<Counters>,
) -> Result<PassResult, ClientError> {
    match o.direction {
        Direction::Egress => egress_pass(api, o, counters).await,
        Direction::Ingress => ingress_pass(api, o, counters).await,
    }
}

/// Runs every mapping once, side by side; the result sums them per direction.
pub async fn run_once(conn: &Conn, jobs: &[SyncOptions], mode: &str) -> Result<Value, ClientError> {
    let counters = Arc::new(Counters::default());
    let _progress = Reporter::start("sync", Arc::clone(&counters));
    let started = Instant::now();
    let results =
        futures::future::join_all(jobs.iter().map(|o| pass(&conn.sync, o, &counters))).await;
    let mut mappings = Vec::new();
    let mut first_err = None;
    let mut failed = 0u64;
    let mut first_failure = None;
    let mut totals = [PassResult::default(), PassResult::default()];
    for (o, r) in jobs.iter().zip(results) {
        match r {
            Ok(r) => {
                mappings.push(r.to_json(o));
                failed += r.files_failed;
                if first_failure.is_none() {
                    first_failure = r.first_failure.clone();
                }
                let t = &mut totals[usize::from(o.direction == Direction::Ingress)];
                t.files += r.files;
                t.bytes += r.bytes;
                t.files_sent += r.files_sent;
                t.bytes_sent += r.bytes_sent;
                t.files_deleted += r.files_deleted;
                t.files_failed += r.files_failed;
                t.duration = t.duration.max(r.duration);
            }
            Err(e) => {
                mappings.push(json!({"direction": o.direction.as_str(), "path": o.local.display().to_string(), "target": o.target, "error": e.to_string()}));
                first_err.get_or_insert(e);
            }
        }
    }
    let direction_json = |t: &PassResult| {
        json!({"files": t.files, "bytes": t.bytes, "files_sent": t.files_sent, "bytes_sent": t.bytes_sent,
               "files_deleted": t.files_deleted, "files_failed": t.files_failed,
               "duration_s": (t.duration.as_secs_f64() * 1000.0).round() / 1000.0})
    };
    let mut out = serde_json::Map::new();
    out.insert("mode".into(), json!(mode));
    if jobs.len() == 1 {
        if let Some(Value::Object(m)) = mappings.first() {
            out.extend(m.clone());
        }
    } else {
        out.insert("egress".into(), direction_json(&totals[0]));
        out.insert("ingress".into(), direction_json(&totals[1]));
        out.insert("mappings".into(), Value::Array(mappings));
    }
    out.insert(
        "duration_s".into(),
        json!((started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0),
    );
    let result = Value::Object(out);
    if let Some(e) = first_err {
        crate::modes::print_result(&result, false);
        return Err(e);
    }
    if failed > 0 {
        crate::modes::print_result(&result, false);
        return Err(ClientError::Io(format!(
            "{failed} file(s) were not synced (first: {}): run the sync again",
            first_failure.unwrap_or_default()
        )));
    }
    Ok(result)
}

/// Waits for SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Watches a directory; every burst of events becomes one (coalesced) notification.
fn watch(dir: &Path) -> Option<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    use notify::Watcher;
    let (tx, rx) = mpsc::channel(1);
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        let ours = ev.paths.iter().all(|p| {
            p.components().any(|c| c.as_os_str() == local::STATE_DIR)
                || p.to_string_lossy().ends_with(local::PARTIAL_SUFFIX)
        });
        if !ours && !ev.kind.is_access() {
            let _ = tx.try_send(());
        }
    })
    .ok()?;
    w.watch(dir, notify::RecursiveMode::Recursive).ok()?;
    Some((w, rx))
}

/// Runs one mapping continuously until stopped: a pass every interval, and for egress
/// also shortly after changes. Each pass prints one JSON line; errors are reported and
/// the next pass tries again (reconnecting if needed).
async fn run_mapping(
    settings: ClientSettings,
    o: SyncOptions,
    stop: tokio::sync::watch::Receiver<bool>,
) -> PassResult {
    let counters = Arc::new(Counters::default());
    let mut conn: Option<Conn> = None;
    let mut totals = PassResult {
        target: o.target.clone(),
        ..Default::default()
    };
    let mut watcher = if o.direction == Direction::Egress {
        watch(&o.local)
    } else {
        None
    };
    let mut stop = stop;
    // Runs until the stop signal; each iteration is one pass and one wait.
    loop {
        if conn.is_none() {
            match connect::connect(&settings).await {
                Ok(c) => conn = Some(c),
                Err(e) => eprintln!(
                    "datamover-client: sync {} {}: {e}; retrying in {:?}",
                    o.direction.as_str(),
                    o.target,
                    o.interval
                ),
            }
        }
        if let Some(c) = &conn {
            match pass(&c.sync, &o, &counters).await {
                Ok(r) => {
                    println!("{}", r.to_json(&o));
                    totals.files_sent += r.files_sent;
                    totals.bytes_sent += r.bytes_sent;
                    totals.files_deleted += r.files_deleted;
                    totals.files_failed += r.files_failed;
                    totals.files = r.files;
                    totals.bytes = r.bytes;
                }
                Err(e) => {
                    eprintln!(
                        "datamover-client: sync {} {}: {e}",
                        o.direction.as_str(),
                        o.target
                    );
                    if e.is_connection_lost()
                        || matches!(e, ClientError::Unreachable(_) | ClientError::Auth(_))
                    {
                        conn = None;
                    }
                }
            }
        }
        let changed = async {
            match watcher.as_mut() {
                Some((_, rx)) => {
                    if rx.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                    // Debounce: wait for a quiet moment, at most a few rounds.
                    for _ in 0..5 {
                        tokio::time::sleep(DEBOUNCE).await;
                        if rx.try_recv().is_err() {
                            break;
                        }
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(o.interval) => {},
            _ = changed => {},
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    totals
}

/// Runs every mapping continuously until SIGTERM or SIGINT; returns totals.
pub async fn run_continuous(
    settings: &ClientSettings,
    jobs: Vec<SyncOptions>,
    mode: &str,
) -> Result<Value, ClientError> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let tasks: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|o| tokio::spawn(run_mapping(settings.clone(), o, rx.clone())))
        .collect();
    stop_signal().await;
    eprintln!("datamover-client: stopping after the current pass");
    let _ = tx.send(true);
    let mut mappings = Vec::new();
    for (o, t) in jobs.iter().zip(tasks) {
        if let Ok(r) = t.await {
            mappings.push(r.to_json(o));
        }
    }
    Ok(json!({
        "mode": mode,
        "mappings": mappings,
        "duration_s": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    }))
}

/// Parses sizes such as `500M`, `10GiB`, `1048576`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches("/s");
    let digits = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    let v = n * mult as f64;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10"), Some(10));
        assert_eq!(parse_size("2MiB"), Some(2 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("8M/s"), Some(8 << 20));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn stamp_shape() {
        let s = point_in_time_stamp();
        assert_eq!(s.len(), "2026-11-22-060122".len(), "{s}");
        assert!(s.chars().all(|c| c.is_ascii_digit() || c == '-'));
    }
}
