//! Restores. The server streams the snapshot's nodes, each file followed by its contents.
//! A blocking thread follows the stream in order and hands files to writer threads
//! ([`files`]), so file creation uses every core:
//!
//! - every snapshot path goes through [`safe_relative`]: `..`, absolute paths and the like
//!   are skipped, never written (the restore then fails, once everything else is restored);
//! - parents are checked with `lstat` and never followed if they are symlinks; the
//!   snapshot's own symlinks are created last, so none can redirect a later write;
//! - a file gets its name only once it is complete and checked (created unnamed and
//!   linked, or written under a temporary name and renamed);
//! - a directory's mode and mtime are set once the walk has left it and its files are
//!   written (after the symlinks, if it holds any); the target directory's own, from the
//!   snapshot's root, last of all.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datamover_core::chunk::ChunkIdKey;
use datamover_core::paths::{components, safe_relative};
use datamover_proto::v1::{self, Node, NodeType, restore_item::Item};
use tokio::sync::mpsc;

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
    /// Why the first of them was not restored.
    pub first_skipped: Option<String>,
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

mod files;
pub(crate) mod piece;
mod resume;

use files::{FileJob, FilePool, SMALL_FILE, Stopped};
use piece::{Piece, Unpacker};

/// A stream restore's output file, written under a temporary name until complete.
struct OpenFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
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

/// Directories whose mode and mtime are set once the walk has left them and their files
/// are written, at most this many waiting (then the walk waits for the writers).
const MAX_WAITING_DIRS: usize = 4096;

/// A directory being restored.
struct OpenDir {
    path: PathBuf,
    rel: Vec<u8>,
    node: Node,
    /// A symlink is to be created inside it (symlinks come last, so its metadata waits).
    holds_symlink: bool,
}

/// The file whose data is arriving.
enum Incoming {
    /// Small so far: gathered, and handed to a writer whole when the next node arrives.
    Gathering {
        node: Node,
        dest: PathBuf,
        data: Vec<Piece>,
        len: usize,
    },
    /// Large: handed to a writer, its data following.
    Streaming,
}

/// Writes a restore stream under a target directory: this thread walks the stream in
/// order (directories, FIFOs, checks of every path) and hands files to writer threads.
struct TreeWriter {
    target: PathBuf,
    pool: Option<FilePool>,
    incoming: Option<Incoming>,
    skip_data: bool,
    /// Directories being restored, outermost first.
    dirs: Vec<OpenDir>,
    /// Directories left by the walk, with the number of files handed out by then: their
    /// metadata is set once those files are done.
    left: std::collections::VecDeque<(u64, PathBuf, Node)>,
    /// Directories whose metadata waits for the symlinks.
    after_symlinks: Vec<(PathBuf, Node)>,
    symlinks: Vec<(PathBuf, Node)>,
    parent_ok: Option<Vec<u8>>,
    root: bool,
    result: RestoreResult,
}

impl TreeWriter {
    fn new(
        target: PathBuf,
        counters: Arc<Counters>,
        key: &ChunkIdKey,
    ) -> Result<Self, ClientError> {
        Ok(TreeWriter {
            pool: Some(FilePool::start(
                &target,
                files::writer_threads(),
                counters,
                key,
            )?),
            target,
            incoming: None,
            skip_data: false,
            dirs: Vec::new(),
            left: Default::default(),
            after_symlinks: Vec::new(),
            symlinks: Vec::new(),
            parent_ok: None,
            root: is_root(),
            result: RestoreResult::default(),
        })
    }

    fn pool(&mut self) -> Result<&mut FilePool, ClientError> {
        self.pool
            .as_mut()
            .ok_or_else(|| ClientError::Io("the restore writers are already stopped".into()))
    }

    /// The writers stopped: their error.
    fn stopped(&mut self) -> ClientError {
        match self.pool.take().map(FilePool::finish) {
            Some(Err(e)) => e,
            _ => ClientError::Io("the restore writers stopped".into()),
        }
    }

    fn send(
        &mut self,
        f: impl FnOnce(&mut FilePool) -> Result<(), Stopped>,
    ) -> Result<(), ClientError> {
        let pool = self.pool()?;
        match f(pool) {
            Ok(()) => Ok(()),
            Err(Stopped) => Err(self.stopped()),
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

    /// Hands the file whose data was arriving to the writers, complete.
    fn end_file(&mut self) -> Result<(), ClientError> {
        match self.incoming.take() {
            None => Ok(()),
            Some(Incoming::Streaming) => self.send(FilePool::close),
            Some(Incoming::Gathering {
                node, dest, data, ..
            }) => self.send(|p| {
                p.file(FileJob {
                    node,
                    dest,
                    data,
                    more: false,
                })
            }),
        }
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
        while let Some(d) = self.dirs.last() {
            let inside = rel.is_some_and(|r| {
                r.len() > d.rel.len() && r.starts_with(&d.rel) && r[d.rel.len()] == b'/'
            });
            if inside {
                break;
            }
            let Some(d) = self.dirs.pop() else { break };
            if d.holds_symlink {
                self.after_symlinks.push((d.path, d.node));
            } else {
                let seq = self.pool()?.next_seq();
                self.left.push_back((seq, d.path, d.node));
            }
        }
        self.set_left_dirs()
    }

    /// Sets the metadata of the directories left whose files are all written (waiting
    /// for the writers when too many directories are waiting).
    fn set_left_dirs(&mut self) -> Result<(), ClientError> {
        while let Some((seq, _, _)) = self.left.front() {
            let seq = *seq;
            if self.left.len() > MAX_WAITING_DIRS {
                self.send(|p| p.wait_all_before(seq))?;
            } else if !self.pool()?.all_before(seq) {
                return Ok(());
            }
            if let Some((_, path, node)) = self.left.pop_front() {
                self.set_dir_meta(&path, &node)?;
            }
        }
        Ok(())
    }

    /// An entry of the snapshot is not restored.
    fn skip(&mut self, why: String) {
        self.result.skipped += 1;
        self.result.first_skipped.get_or_insert(why);
    }

    fn node(&mut self, node: Node) -> Result<(), ClientError> {
        self.end_file()?;
        self.skip_data = true;
        self.leave_dirs(Some(&node.path))?;
        let rel = match safe_relative(&node.path) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{e}: skipped");
                self.skip(e.to_string());
                return Ok(());
            }
        };
        if !self.ensure_parents(&node.path)? {
            self.skip(format!(
                "{}: below a symlink or file in the target",
                String::from_utf8_lossy(&node.path)
            ));
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
                self.dirs.push(OpenDir {
                    path: dest,
                    rel: node.path.to_vec(),
                    node,
                    holds_symlink: false,
                });
            }
            NodeType::File => {
                self.skip_data = false;
                self.incoming = Some(Incoming::Gathering {
                    node,
                    dest,
                    data: Vec::new(),
                    len: 0,
                });
            }
            NodeType::Symlink => {
                self.result.other += 1;
                // Its directory, and theirs, get their metadata after it is created.
                for d in &mut self.dirs {
                    d.holds_symlink = true;
                }
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
                self.skip(format!("{what}: unknown entry type {}", node.r#type));
            }
        }
        Ok(())
    }

    fn data(&mut self, data: Piece) -> Result<(), ClientError> {
        if self.skip_data {
            return Ok(());
        }
        match self.incoming.as_mut() {
            None => Err(ClientError::Corrupt(
                "file data without a file in the restore stream".into(),
            )),
            Some(Incoming::Streaming) => self.send(|p| p.data(data)),
            Some(Incoming::Gathering { data: got, len, .. }) => {
                *len += data.len();
                got.push(data);
                if *len <= SMALL_FILE {
                    return Ok(());
                }
                // Large: hand it over now and stream the rest.
                let Some(Incoming::Gathering {
                    node, dest, data, ..
                }) = self.incoming.replace(Incoming::Streaming)
                else {
                    return Ok(());
                };
                self.send(|p| {
                    p.file(FileJob {
                        node,
                        dest,
                        data,
                        more: true,
                    })
                })
            }
        }
    }

    fn finish(mut self) -> Result<RestoreResult, ClientError> {
        self.end_file()?;
        self.leave_dirs(None)?;
        let written = match self.pool.take() {
            Some(pool) => pool.finish()?,
            None => return Err(ClientError::Io("the restore writers stopped".into())),
        };
        self.result.files = written.files;
        self.result.bytes = written.bytes;
        // Every file is written: the directories left can all be finished.
        for (_, path, node) in std::mem::take(&mut self.left) {
            self.set_dir_meta(&path, &node)?;
        }
        for (dest, node) in std::mem::take(&mut self.symlinks) {
            self.parent_ok = None;
            if !self.ensure_parents(&node.path)? {
                self.skip(format!(
                    "symlink {}: below a symlink or file in the target",
                    dest.display()
                ));
                continue;
            }
            let what = dest.display().to_string();
            if let Ok(m) = std::fs::symlink_metadata(&dest) {
                if m.is_dir() {
                    tracing::warn!(path = %what, "a directory is in the way of a symlink: skipped");
                    self.skip(format!("symlink {what}: a directory is in the way"));
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
        // Innermost first, as they were left.
        for (path, node) in std::mem::take(&mut self.after_symlinks) {
            self.set_dir_meta(&path, &node)?;
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
        tmp,
        dest,
        file: Some(file),
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

/// Messages of the restore stream queued towards the blocking consumer (each holds
/// about [`datamover_proto::BATCH_BYTES`]; whole messages, so the consumer is woken
/// once per message rather than once per item).
const STREAM_QUEUE: usize = 3;

/// What part of a snapshot `restore_files` restores (all of it by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialRestore {
    /// A path inside the snapshot: only its tree.
    pub path: Vec<u8>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl PartialRestore {
    pub fn is_everything(&self) -> bool {
        self.path.is_empty() && self.include.is_empty() && self.exclude.is_empty()
    }
}

/// Opens the restore stream; fails before anything is written if the snapshot is unknown.
async fn open(
    conn: &mut Conn,
    spec: &str,
    accept_packed: bool,
    part: &PartialRestore,
) -> Result<
    (
        v1::Snapshot,
        Vec<v1::RestoreItem>,
        tonic::Streaming<v1::RestoreResponse>,
    ),
    ClientError,
> {
    resume::open_at(conn, spec, accept_packed, part, resume::Position::default())
        .await
        .map_err(|s| match s.code() {
            // The snapshot is there but the selection matches nothing: the server's own
            // message says so.
            tonic::Code::NotFound if s.message().starts_with("nothing in snapshot") => {
                ClientError::from_status(s)
            }
            tonic::Code::NotFound => ClientError::NotFound(format!(
                "no snapshot with tag or id '{spec}' for client {}: run `datamover-client list` to see what there is; nothing was restored",
                conn.settings.client_id
            )),
            _ => ClientError::from_status(s),
        })
}

/// A command line argument as it would be typed (quoted when it needs to be).
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@%+=,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `restore_files <path> <tag|id> [--path P] [--include G]... [--exclude G]...`.
pub async fn restore_files(
    conn: &mut Conn,
    target: &Path,
    spec: &str,
    part: &PartialRestore,
) -> Result<RestoreResult, ClientError> {
    let started = Instant::now();
    if std::fs::metadata(target).is_ok_and(|m| !m.is_dir()) {
        return Err(ClientError::Usage(format!(
            "the restore target {} exists and is not a directory: give a directory (made if missing); nothing was restored",
            target.display()
        )));
    }
    let (snapshot, first, stream) = open(conn, spec, true, part).await?;
    std::fs::create_dir_all(target).map_err(|e| ClientError::io(target.display(), e))?;
    let counters = Arc::new(Counters::default());
    let _progress = Reporter::start("restore", Arc::clone(&counters));
    let (tx, mut rx) = mpsc::channel::<Vec<v1::RestoreItem>>(STREAM_QUEUE);
    let mut writer = TreeWriter::new(target.to_path_buf(), counters, &conn.key)?;
    let worker = tokio::task::spawn_blocking(move || {
        while let Some(items) = rx.blocking_recv() {
            for item in items {
                match item.item {
                    Some(Item::Node(n)) => writer.node(n)?,
                    Some(Item::Data(d)) => writer.data(Piece::Plain(d))?,
                    Some(Item::Packed(p)) => writer.data(Piece::Packed(p))?,
                    None => {}
                }
            }
        }
        Ok::<_, ClientError>(writer)
    });
    let mut rerun = format!(
        "datamover-client restore_files {} {}",
        shell_word(&target.display().to_string()),
        shell_word(spec)
    );
    if !part.path.is_empty() {
        rerun += &format!(
            " --path {}",
            shell_word(&String::from_utf8_lossy(&part.path))
        );
    }
    for g in &part.include {
        rerun += &format!(" --include {}", shell_word(g));
    }
    for g in &part.exclude {
        rerun += &format!(" --exclude {}", shell_word(g));
    }
    let what = resume::Resumable {
        snapshot: &snapshot,
        accept_packed: true,
        part,
        rerun,
    };
    let pumped = resume::pump(conn, &what, first, stream, tx).await;
    drop(what);
    let worked = worker
        .await
        .map_err(|e| ClientError::Io(format!("restore worker failed: {e}")))?;
    pumped?;
    let writer = worked?;
    let mut result = writer.finish()?;
    // A partial restore leaves the target's own metadata as it is.
    if let Some(root) = snapshot.root.as_ref().filter(|_| part.is_everything()) {
        set_target_meta(target, root, is_root())?;
    }
    if result.skipped > 0 {
        // Everything else is in place, but the restore is not what the snapshot holds.
        return Err(ClientError::Corrupt(format!(
            "{} entries of snapshot {} were not restored, as they would be written outside {} or through a symlink (first: {}); the rest is restored: check the snapshot with `datamover-client ls`, and the server, which sent these paths",
            result.skipped,
            snapshot.id,
            target.display(),
            result.first_skipped.as_deref().unwrap_or("?")
        )));
    }
    result.snapshot = snapshot;
    result.duration = started.elapsed();
    Ok(result)
}

/// Gives the target the mode, mtime (and, as root, the owner) of the snapshot's top
/// directory, last, as every directory of the tree gets its own once written. A target
/// the client may not change (a mount point of another user) keeps its own, with a
/// warning: the files in it are restored all the same.
fn set_target_meta(target: &Path, root: &Node, as_root: bool) -> Result<(), ClientError> {
    let set = || -> std::io::Result<()> {
        if as_root {
            std::os::unix::fs::lchown(target, Some(root.uid), Some(root.gid))?;
        }
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(root.mode & 0o7777))?;
        let t = mtime(root.mtime_ns);
        filetime::set_symlink_file_times(target, t, t)
    };
    match set() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!(
                path = %target.display(),
                error = %e,
                "the restore target keeps its own mode and mtime"
            );
            Ok(())
        }
        Err(e) => Err(ClientError::io(target.display(), e)),
    }
}

/// Refuses stream data beyond the size the stream's node declared (or before it), so a
/// server sending without end cannot fill the disk.
fn too_much(
    expected: Option<u64>,
    written: u64,
    more: usize,
    output: &str,
) -> Result<(), ClientError> {
    let Some(size) = expected else {
        return Err(ClientError::Corrupt(format!(
            "the server sent stream data before the stream's entry; {output} is not restored: check the server"
        )));
    };
    if written.saturating_add(more as u64) > size {
        return Err(ClientError::Corrupt(format!(
            "the server sent more than the stream's {size} bytes; {output} is not restored: run verify on the server's repository"
        )));
    }
    Ok(())
}

/// `restore_stream <filename|-> [tag|id]`.
pub async fn restore_stream(
    conn: &mut Conn,
    output: &str,
    spec: &str,
) -> Result<RestoreResult, ClientError> {
    let started = Instant::now();
    let (snapshot, first, stream) = open(conn, spec, true, &PartialRestore::default()).await?;
    if snapshot.kind != v1::SnapshotKind::Stream as i32 {
        return Err(ClientError::Usage(format!(
            "snapshot {} ({}) is a file backup, not a stream: use restore_files",
            snapshot.id, snapshot.tag
        )));
    }
    let counters = Arc::new(Counters::default());
    let _progress = Reporter::start("restore", Arc::clone(&counters));
    let (tx, mut rx) = mpsc::channel::<Vec<v1::RestoreItem>>(STREAM_QUEUE);
    let output_name = output.to_string();
    let mut unpacker = Unpacker::new(conn.key.clone());
    let worker = tokio::task::spawn_blocking(move || {
        let mut sink = open_sink(&output_name)?;
        let mut expected = None;
        let mut written = 0u64;
        while let Some(items) = rx.blocking_recv() {
            for item in items {
                match item.item {
                    Some(Item::Node(n)) if expected.is_none() => expected = Some(n.size),
                    Some(Item::Node(_)) => {
                        return Err(ClientError::Corrupt(
                            "a stream snapshot holds more than one stream".into(),
                        ));
                    }
                    Some(Item::Data(d)) => {
                        too_much(expected, written, d.len(), &output_name)?;
                        sink.write(&d)
                            .map_err(|e| ClientError::io(&output_name, e))?;
                        written += d.len() as u64;
                        counters.add_bytes(d.len() as u64);
                    }
                    Some(Item::Packed(p)) => {
                        let piece = Piece::Packed(p);
                        too_much(expected, written, piece.len(), &output_name)?;
                        let d = unpacker.open(&piece, &|| output_name.clone())?;
                        sink.write(d)
                            .map_err(|e| ClientError::io(&output_name, e))?;
                        written += d.len() as u64;
                        counters.add_bytes(d.len() as u64);
                    }
                    None => {}
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
    let whole = PartialRestore::default();
    let what = resume::Resumable {
        snapshot: &snapshot,
        accept_packed: true,
        part: &whole,
        rerun: format!(
            "datamover-client restore_stream {} {}",
            shell_word(output),
            shell_word(spec)
        ),
    };
    let pumped = resume::pump(conn, &what, first, stream, tx).await;
    drop(what);
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
