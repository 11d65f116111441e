//! Restores. The server streams the snapshot's nodes, each file followed by its contents;
//! a blocking writer thread puts them on disk:
//!
//! - every snapshot path goes through [`safe_relative`]: `..`, absolute paths and the like
//!   are skipped, never written;
//! - parents are checked with `lstat` and never followed if they are symlinks; the
//!   snapshot's own symlinks are created last, so none can redirect a later write;
//! - files are written under a temporary name and renamed once complete and checked;
//! - directory modes and times are set when the walk leaves them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use datamover_core::paths::{components, safe_relative};
use datamover_proto::v1::{self, Node, NodeType, restore_item::Item};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::ClientError;
use crate::connect::Conn;
use crate::progress::{Counters, Reporter};

#[derive(Debug, Clone, Default)]
pub struct RestoreResult {
    pub snapshot: v1::Snapshot,
    pub files: u64,
    pub dirs: u64,
    pub other: u64,
    pub bytes: u64,
    /// Snapshot entries not restored because their path was unsafe.
    pub skipped: u64,
    pub duration: Duration,
}

fn mtime(ns: i64) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

struct OpenFile {
    node: Node,
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
    written: u64,
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            // Not completed: leave nothing that looks restored.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn tmp_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.dm-tmp-{:08x}", rand::random::<u32>()))
}

/// Writes a restore stream under a target directory.
struct TreeWriter {
    target: PathBuf,
    current: Option<OpenFile>,
    skip_data: bool,
    /// Directories being restored, outermost first: (path, node).
    dirs: Vec<(PathBuf, Vec<u8>, Node)>,
    symlinks: Vec<(PathBuf, Node)>,
    parent_ok: Option<Vec<u8>>,
    root: bool,
    result: RestoreResult,
    counters: Arc<Counters>,
}

impl TreeWriter {
    fn new(target: PathBuf, counters: Arc<Counters>) -> Self {
        TreeWriter {
            target,
            current: None,
            skip_data: false,
            dirs: Vec::new(),
            symlinks: Vec::new(),
            parent_ok: None,
            root: is_root(),
            result: RestoreResult::default(),
            counters,
        }
    }

    /// Makes sure every parent of `rel` is a real directory inside the target.
    fn ensure_parents(&mut self, rel: &[u8]) -> Result<bool, ClientError> {
        let Some(parent) = datamover_core::paths::parent(rel) else {
            return Ok(true);
        };
        if self.parent_ok.as_deref() == Some(parent) {
            return Ok(true);
        }
        let mut path = self.target.clone();
        for c in components(parent) {
            path.push(std::ffi::OsStr::from_bytes(c));
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "not restoring below a symlink or file in the target");
                    return Ok(false);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&path).map_err(|e| ClientError::io(path.display(), e))?;
                }
                Err(e) => return Err(ClientError::io(path.display(), e)),
            }
        }
        self.parent_ok = Some(parent.to_vec());
        Ok(true)
    }

    fn finish_file(&mut self) -> Result<(), ClientError> {
        let Some(mut f) = self.current.take() else {
            return Ok(());
        };
        let file = f
            .file
            .as_ref()
            .ok_or_else(|| ClientError::Io("file already closed".into()))?;
        if f.written != f.node.size {
            return Err(ClientError::Corrupt(format!(
                "{}: the snapshot holds {} bytes but {} were received; run verify on the repository",
                f.dest.display(),
                f.node.size,
                f.written
            )));
        }
        let what = f.dest.display().to_string();
        file.set_permissions(std::fs::Permissions::from_mode(f.node.mode & 0o7777))
            .map_err(|e| ClientError::io(&what, e))?;
        if self.root {
            std::os::unix::fs::fchown(file, Some(f.node.uid), Some(f.node.gid))
                .map_err(|e| ClientError::io(&what, e))?;
        }
        filetime::set_file_handle_times(file, None, Some(mtime(f.node.mtime_ns)))
            .map_err(|e| ClientError::io(&what, e))?;
        std::fs::rename(&f.tmp, &f.dest).map_err(|e| ClientError::io(&what, e))?;
        f.file = None;
        self.result.files += 1;
        self.counters.add_file();
        Ok(())
    }

    fn set_dir_meta(&self, path: &Path, node: &Node) -> Result<(), ClientError> {
        let what = path.display().to_string();
        if self.root {
            std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid))
                .map_err(|e| ClientError::io(&what, e))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(node.mode & 0o7777))
            .map_err(|e| ClientError::io(&what, e))?;
        // utimensat without opening: opening a FIFO would wait for a peer.
        let t = mtime(node.mtime_ns);
        filetime::set_symlink_file_times(path, t, t).map_err(|e| ClientError::io(&what, e))
    }

    /// Leaves the directories that `rel` is not inside of.
    fn leave_dirs(&mut self, rel: Option<&[u8]>) -> Result<(), ClientError> {
        while let Some((_, dir_rel, _)) = self.dirs.last() {
            let inside = rel.is_some_and(|r| {
                r.len() > dir_rel.len() && r.starts_with(dir_rel) && r[dir_rel.len()] == b'/'
            });
            if inside {
                break;
            }
            if let Some((path, _, node)) = self.dirs.pop() {
                self.set_dir_meta(&path, &node)?;
            }
        }
        Ok(())
    }

    fn node(&mut self, node: Node) -> Result<(), ClientError> {
        self.finish_file()?;
        self.skip_data = true;
        self.leave_dirs(Some(&node.path))?;
        let rel = match safe_relative(&node.path) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{e}: skipped");
                self.result.skipped += 1;
                return Ok(());
            }
        };
        if !self.ensure_parents(&node.path)? {
            self.result.skipped += 1;
            return Ok(());
        }
        let dest = self.target.join(&rel);
        let what = dest.display().to_string();
        match NodeType::try_from(node.r#type).unwrap_or(NodeType::Unspecified) {
            NodeType::Dir => {
                match std::fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        std::fs::remove_file(&dest).map_err(|e| ClientError::io(&what, e))?;
                        std::fs::create_dir(&dest).map_err(|e| ClientError::io(&what, e))?;
                    }
                    Err(_) => std::fs::create_dir(&dest).map_err(|e| ClientError::io(&what, e))?,
                }
                self.result.dirs += 1;
                self.dirs.push((dest, node.path.to_vec(), node));
            }
            NodeType::File => {
                let tmp = tmp_name(&dest);
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| ClientError::io(&what, e))?;
                self.skip_data = false;
                self.current = Some(OpenFile {
                    node,
                    tmp,
                    dest,
                    file: Some(file),
                    written: 0,
                });
            }
            NodeType::Symlink => {
                self.result.other += 1;
                self.symlinks.push((dest, node));
            }
            NodeType::Fifo => {
                if std::fs::symlink_metadata(&dest).is_ok() {
                    std::fs::remove_file(&dest).map_err(|e| ClientError::io(&what, e))?;
                }
                nix::unistd::mkfifo(
                    &dest,
                    nix::sys::stat::Mode::from_bits_truncate(node.mode & 0o777),
                )
                .map_err(|e| ClientError::io(&what, std::io::Error::from(e)))?;
                self.set_dir_meta(&dest, &node)?;
                self.result.other += 1;
            }
            NodeType::Unspecified => {
                tracing::warn!(path = %what, "unknown entry type in snapshot: skipped");
                self.result.skipped += 1;
            }
        }
        Ok(())
    }

    fn data(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if self.skip_data {
            return Ok(());
        }
        let f = self.current.as_mut().ok_or_else(|| {
            ClientError::Corrupt("file data without a file in the restore stream".into())
        })?;
        let file = f
            .file
            .as_mut()
            .ok_or_else(|| ClientError::Io("file already closed".into()))?;
        file.write_all(data)
            .map_err(|e| ClientError::io(f.dest.display(), e))?;
        f.written += data.len() as u64;
        self.result.bytes += data.len() as u64;
        self.counters.add_bytes(data.len() as u64);
        Ok(())
    }

    fn finish(mut self) -> Result<RestoreResult, ClientError> {
        self.finish_file()?;
        self.leave_dirs(None)?;
        for (dest, node) in std::mem::take(&mut self.symlinks) {
            self.parent_ok = None;
            if !self.ensure_parents(&node.path)? {
                self.result.skipped += 1;
                continue;
            }
            let what = dest.display().to_string();
            if let Ok(m) = std::fs::symlink_metadata(&dest) {
                if m.is_dir() {
                    tracing::warn!(path = %what, "a directory is in the way of a symlink: skipped");
                    self.result.skipped += 1;
                    continue;
                }
                std::fs::remove_file(&dest).map_err(|e| ClientError::io(&what, e))?;
            }
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&node.link_target), &dest)
                .map_err(|e| ClientError::io(&what, e))?;
            if self.root {
                let _ = std::os::unix::fs::lchown(&dest, Some(node.uid), Some(node.gid));
            }
            let t = mtime(node.mtime_ns);
            let _ = filetime::set_symlink_file_times(&dest, t, t);
        }
        Ok(self.result)
    }
}

/// Where a stream restore writes.
enum StreamSink {
    Stdout(std::io::Stdout),
    /// A FIFO or character device: written directly.
    Direct(File),
    /// A regular file: written under a temporary name, renamed when complete.
    Atomic(OpenFile),
}

fn open_sink(output: &str) -> Result<StreamSink, ClientError> {
    if output == "-" {
        return Ok(StreamSink::Stdout(std::io::stdout()));
    }
    let dest = PathBuf::from(output);
    if let Ok(m) = std::fs::metadata(&dest) {
        let ft = m.file_type();
        if ft.is_fifo() || ft.is_char_device() {
            // Opening a FIFO waits for its reader, as a writer process would.
            let f = OpenOptions::new()
                .write(true)
                .open(&dest)
                .map_err(|e| ClientError::io(output, e))?;
            return Ok(StreamSink::Direct(f));
        }
        if ft.is_dir() {
            return Err(ClientError::Usage(format!(
                "{output} is a directory: restore_stream writes a named pipe, a file or - (stdout)"
            )));
        }
    }
    let tmp = tmp_name(&dest);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ClientError::io(output, e))?;
    Ok(StreamSink::Atomic(OpenFile {
        node: Node::default(),
        tmp,
        dest,
        file: Some(file),
        written: 0,
    }))
}

impl StreamSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            StreamSink::Stdout(s) => s.lock().write_all(data),
            StreamSink::Direct(f) => f.write_all(data),
            StreamSink::Atomic(f) => match f.file.as_mut() {
                Some(file) => file.write_all(data),
                None => Err(std::io::Error::other("closed")),
            },
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            StreamSink::Stdout(s) => s.lock().flush(),
            StreamSink::Direct(mut f) => f.flush(),
            StreamSink::Atomic(mut f) => {
                if let Some(file) = f.file.as_mut() {
                    file.flush()?;
                    file.sync_all()?;
                }
                std::fs::rename(&f.tmp, &f.dest)?;
                f.file = None;
                Ok(())
            }
        }
    }
}

enum Msg {
    Node(Node),
    Data(Bytes),
}

/// Opens the restore stream; fails before anything is written if the snapshot is unknown.
async fn open(
    conn: &mut Conn,
    spec: &str,
) -> Result<
    (
        v1::Snapshot,
        Vec<v1::RestoreItem>,
        tonic::Streaming<v1::RestoreResponse>,
    ),
    ClientError,
> {
    let mut stream = conn
        .api
        .restore(v1::RestoreRequest {
            snapshot: spec.to_string(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => ClientError::NotFound(format!(
                "no snapshot with tag or id '{spec}' for client {}: run `datamover-client list` to see what there is; nothing was restored",
                conn.settings.client_id
            )),
            _ => ClientError::from_status(s),
        })?
        .into_inner();
    let first = stream
        .next()
        .await
        .ok_or_else(|| ClientError::Server("the server sent an empty restore".into()))??;
    let snapshot = first.snapshot.ok_or_else(|| {
        ClientError::Server("the server's restore did not start with the snapshot".into())
    })?;
    Ok((snapshot, first.items, stream))
}

/// Feeds the stream's items to a blocking consumer through a bounded queue.
async fn pump(
    first: Vec<v1::RestoreItem>,
    mut stream: tonic::Streaming<v1::RestoreResponse>,
    tx: mpsc::Sender<Msg>,
) -> Result<(), ClientError> {
    let mut pending = first;
    loop {
        for item in pending.drain(..) {
            let msg = match item.item {
                Some(Item::Node(n)) => Msg::Node(n),
                Some(Item::Data(d)) => Msg::Data(d),
                None => continue,
            };
            if tx.send(msg).await.is_err() {
                return Ok(()); // the writer stopped; its error is reported
            }
        }
        match stream.next().await {
            Some(Ok(m)) => pending = m.items,
            Some(Err(s)) => return Err(s.into()),
            None => return Ok(()),
        }
    }
}

/// `restore_files <path> <tag|id>`.
pub async fn restore_files(
    conn: &mut Conn,
    target: &Path,
    spec: &str,
) -> Result<RestoreResult, ClientError> {
    let started = Instant::now();
    let (snapshot, first, stream) = open(conn, spec).await?;
    std::fs::create_dir_all(target).map_err(|e| ClientError::io(target.display(), e))?;
    let counters = Arc::new(Counters::default());
    let _progress = Reporter::start("restore", Arc::clone(&counters));
    let (tx, mut rx) = mpsc::channel::<Msg>(64);
    let mut writer = TreeWriter::new(target.to_path_buf(), counters);
    let worker = tokio::task::spawn_blocking(move || {
        while let Some(m) = rx.blocking_recv() {
            match m {
                Msg::Node(n) => writer.node(n)?,
                Msg::Data(d) => writer.data(&d)?,
            }
        }
        Ok::<_, ClientError>(writer)
    });
    let pumped = pump(first, stream, tx).await;
    let worked = worker
        .await
        .map_err(|e| ClientError::Io(format!("restore worker failed: {e}")))?;
    pumped?;
    let writer = worked?;
    let mut result = writer.finish()?;
    result.snapshot = snapshot;
    result.duration = started.elapsed();
    Ok(result)
}

/// `restore_stream <filename|-> [tag|id]`.
pub async fn restore_stream(
    conn: &mut Conn,
    output: &str,
    spec: &str,
) -> Result<RestoreResult, ClientError> {
    let started = Instant::now();
    let (snapshot, first, stream) = open(conn, spec).await?;
    if snapshot.kind != v1::SnapshotKind::Stream as i32 {
        return Err(ClientError::Usage(format!(
            "snapshot {} ({}) is a file backup, not a stream: use restore_files",
            snapshot.id, snapshot.tag
        )));
    }
    let counters = Arc::new(Counters::default());
    let _progress = Reporter::start("restore", Arc::clone(&counters));
    let (tx, mut rx) = mpsc::channel::<Msg>(64);
    let output_name = output.to_string();
    let worker = tokio::task::spawn_blocking(move || {
        let mut sink = open_sink(&output_name)?;
        let mut expected = None;
        let mut written = 0u64;
        while let Some(m) = rx.blocking_recv() {
            match m {
                Msg::Node(n) if expected.is_none() => expected = Some(n.size),
                Msg::Node(_) => {
                    return Err(ClientError::Corrupt(
                        "a stream snapshot holds more than one stream".into(),
                    ));
                }
                Msg::Data(d) => {
                    sink.write(&d)
                        .map_err(|e| ClientError::io(&output_name, e))?;
                    written += d.len() as u64;
                    counters.add_bytes(d.len() as u64);
                }
            }
        }
        if expected != Some(written) {
            return Err(ClientError::Corrupt(format!(
                "the stream ended after {written} of {} bytes; {output_name} is incomplete",
                expected.unwrap_or(0)
            )));
        }
        sink.finish()
            .map_err(|e| ClientError::io(&output_name, e))?;
        Ok(written)
    });
    let pumped = pump(first, stream, tx).await;
    let worked = worker
        .await
        .map_err(|e| ClientError::Io(format!("restore worker failed: {e}")))?;
    pumped?;
    let bytes = worked?;
    Ok(RestoreResult {
        snapshot,
        files: 1,
        bytes,
        duration: started.elapsed(),
        ..Default::default()
    })
}
