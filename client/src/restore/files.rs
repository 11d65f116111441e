//! The restore's file writers: a few threads that create, fill and name restored files,
//! so that file creation (most of the cost of restoring small files, spent in the
//! kernel) runs on every core while the restore stream keeps arriving in order.
//!
//! Where the file system allows it, a file is created unnamed (`O_TMPFILE`, which also
//! lets several threads allocate inodes in one directory at once) and linked under its
//! name once its contents, mode, owner and mtime are set; elsewhere it is written under
//! a temporary name and renamed. Either way nothing incomplete ever has the file's name,
//! and an interrupted restore leaves no partial file behind.
//!
//! Files are numbered as they are handed out; [`Done`] tells the caller when every file
//! before a given number is finished, so a directory's mode and mtime are set only after
//! all of its files are in place.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use datamover_core::chunk::ChunkIdKey;
use datamover_proto::v1::Node;

use super::piece::{Piece, Unpacker};
use super::{mtime, tmp_name};
use crate::ClientError;
use crate::progress::Counters;

/// Jobs queued towards one writer thread. A job holds one chunk of a large file (up to
/// the chunker's maximum, 1 MiB) or a batch of small files (about [`BATCH_BYTES`]), so
/// the queues hold a bounded amount of data.
const WRITER_QUEUE: usize = 4;
/// Files up to this size are handed to a writer whole; larger ones stream to one writer.
pub(super) const SMALL_FILE: usize = 256 * 1024;
/// Small files are handed out in batches of this many files or bytes (a hand-off
/// wakes a thread: once per file would cost more than creating a small file).
const BATCH_FILES: usize = 64;
const BATCH_BYTES: usize = 1024 * 1024;

/// Writer threads: `DATAMOVER_RESTORE_WRITERS` (1 to 64), else two per core (2 to 8):
/// file creation is CPU work in the kernel, and a writer also waits for the disk.
pub(super) fn writer_threads() -> usize {
    if let Some(n) = std::env::var("DATAMOVER_RESTORE_WRITERS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return n.clamp(1, 64);
    }
    std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .clamp(2, 8)
}

/// A file to write: its node (mode, owner, mtime, size), where it goes, and its data
/// so far. With `more`, the rest follows as [`Job::Data`] and ends with [`Job::Close`].
pub(super) struct FileJob {
    pub node: Node,
    pub dest: PathBuf,
    pub data: Vec<Piece>,
    pub more: bool,
}

enum Job {
    /// Small files, each complete.
    Files(Vec<(u64, FileJob)>),
    /// A large file; its data follows.
    Open(u64, FileJob),
    Data(Piece),
    Close,
}

/// Which handed-out files are not finished yet.
#[derive(Default)]
pub(super) struct Done {
    outstanding: Mutex<BTreeSet<u64>>,
    changed: Condvar,
    /// A writer failed: nobody will finish its files.
    failed: AtomicBool,
}

impl Done {
    fn start(&self, seq: u64) {
        if let Ok(mut o) = self.outstanding.lock() {
            o.insert(seq);
        }
    }

    fn finish(&self, seq: u64) {
        if let Ok(mut o) = self.outstanding.lock() {
            o.remove(&seq);
        }
        self.changed.notify_all();
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Whether every file numbered below `seq` is finished.
    fn all_before(&self, seq: u64) -> bool {
        self.outstanding
            .lock()
            .map(|o| o.first().is_none_or(|&first| first >= seq))
            .unwrap_or(false)
    }

    /// Waits until every file numbered below `seq` is finished; false if a writer
    /// failed first (its error is reported by [`FilePool::finish`]).
    fn wait_all_before(&self, seq: u64) -> bool {
        let Ok(mut o) = self.outstanding.lock() else {
            return false;
        };
        // Bounded by the writers: each wakes this up when it finishes a file or fails.
        loop {
            if self.failed.load(Ordering::SeqCst) {
                return false;
            }
            if o.first().is_none_or(|&first| first >= seq) {
                return true;
            }
            o = match self.changed.wait_timeout(o, Duration::from_millis(100)) {
                Ok((guard, _)) => guard,
                Err(_) => return false,
            };
        }
    }
}

/// The writer threads, fed in turn.
pub(super) struct FilePool {
    senders: Vec<SyncSender<Job>>,
    handles: Vec<std::thread::JoinHandle<Result<Written, ClientError>>>,
    /// The next writer to try.
    next: usize,
    /// The writer receiving the data of a large file.
    streaming: Option<usize>,
    next_seq: u64,
    /// Small files not handed out yet, and their bytes.
    batch: Vec<(u64, FileJob)>,
    batch_bytes: usize,
    done: Arc<Done>,
}

/// What one writer restored.
#[derive(Default, Clone, Copy)]
pub(super) struct Written {
    pub files: u64,
    pub bytes: u64,
}

/// The writers stopped (one failed); [`FilePool::finish`] says why.
pub(super) struct Stopped;

impl FilePool {
    pub(super) fn start(
        target: &Path,
        threads: usize,
        counters: Arc<Counters>,
        key: &ChunkIdKey,
    ) -> Result<Self, ClientError> {
        let done = Arc::new(Done::default());
        let how = probe_link(target);
        tracing::debug!(?how, "restored files are named");
        let unnamed = Arc::new(AtomicBool::new(how != Link::Named));
        let by_proc = Arc::new(AtomicBool::new(how == Link::Proc));
        let root = nix::unistd::geteuid().is_root();
        let mut senders = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let (tx, rx) = sync_channel(WRITER_QUEUE);
            let w = Writer {
                root,
                unnamed: Arc::clone(&unnamed),
                by_proc: Arc::clone(&by_proc),
                counters: Arc::clone(&counters),
                done: Arc::clone(&done),
                key: key.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("dm-restore-{i}"))
                .spawn(move || {
                    let r = w.run(rx);
                    if r.is_err() {
                        w.done.fail();
                    }
                    r
                })
                .map_err(|e| ClientError::Io(format!("cannot start a restore writer: {e}")))?;
            senders.push(tx);
            handles.push(handle);
        }
        Ok(FilePool {
            senders,
            handles,
            next: 0,
            streaming: None,
            next_seq: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            done,
        })
    }

    /// The number the next file will get: files handed out so far are numbered below.
    pub(super) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether every file numbered below `seq` is finished.
    pub(super) fn all_before(&self, seq: u64) -> bool {
        self.done.all_before(seq)
    }

    /// Waits until every file numbered below `seq` is finished.
    pub(super) fn wait_all_before(&mut self, seq: u64) -> Result<(), Stopped> {
        self.flush()?;
        if self.done.wait_all_before(seq) {
            Ok(())
        } else {
            Err(Stopped)
        }
    }

    /// Hands out a file: small ones in batches, a large one at once (its data follows).
    pub(super) fn file(&mut self, job: FileJob) -> Result<(), Stopped> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.done.start(seq);
        if !job.more {
            self.batch_bytes += job.data.iter().map(Piece::len).sum::<usize>();
            self.batch.push((seq, job));
            if self.batch.len() >= BATCH_FILES || self.batch_bytes >= BATCH_BYTES {
                self.flush()?;
            }
            return Ok(());
        }
        self.flush()?;
        let i = self.send(Job::Open(seq, job))?;
        self.streaming = Some(i);
        Ok(())
    }

    /// Hands out the batch of small files.
    fn flush(&mut self) -> Result<(), Stopped> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch_bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        self.send(Job::Files(batch)).map(|_| ())
    }

    /// Sends a job to the first writer with room, starting with the next in turn;
    /// returns which one.
    fn send(&mut self, job: Job) -> Result<usize, Stopped> {
        let n = self.senders.len();
        let mut job = Some(job);
        for k in 0..n {
            let i = (self.next + k) % n;
            let Some(j) = job.take() else { break };
            match self.senders[i].try_send(j) {
                Ok(()) => {
                    self.next = (i + 1) % n;
                    return Ok(i);
                }
                Err(TrySendError::Full(j)) => job = Some(j),
                Err(TrySendError::Disconnected(_)) => return Err(Stopped),
            }
        }
        // Everyone is busy: wait for the next in turn.
        let i = self.next % n;
        let j = job.ok_or(Stopped)?;
        self.senders[i].send(j).map_err(|_| Stopped)?;
        self.next = (i + 1) % n;
        Ok(i)
    }

    /// More data of the large file handed out last.
    pub(super) fn data(&mut self, data: Piece) -> Result<(), Stopped> {
        match self.streaming {
            Some(i) => self.senders[i].send(Job::Data(data)).map_err(|_| Stopped),
            None => Err(Stopped),
        }
    }

    /// The large file handed out last is complete.
    pub(super) fn close(&mut self) -> Result<(), Stopped> {
        match self.streaming.take() {
            Some(i) => self.senders[i].send(Job::Close).map_err(|_| Stopped),
            None => Ok(()),
        }
    }

    /// Lets the writers finish what they hold; the first error of any writer, else what
    /// they restored.
    pub(super) fn finish(mut self) -> Result<Written, ClientError> {
        let flushed = self.flush();
        drop(self.senders);
        let mut total = Written::default();
        let mut first_err = None;
        for h in self.handles {
            match h.join() {
                Ok(Ok(w)) => {
                    total.files += w.files;
                    total.bytes += w.bytes;
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(ClientError::Io("a restore writer panicked".into()));
                }
            }
        }
        match (first_err, flushed) {
            (Some(e), _) => Err(e),
            (None, Err(Stopped)) => Err(ClientError::Io("the restore writers stopped".into())),
            (None, Ok(())) => Ok(total),
        }
    }
}

struct Writer {
    root: bool,
    /// Files are created unnamed (until that fails once: then under temporary names).
    unnamed: Arc<AtomicBool>,
    /// Unnamed files are linked through `/proc/self/fd` (`AT_EMPTY_PATH` was refused).
    by_proc: Arc<AtomicBool>,
    counters: Arc<Counters>,
    done: Arc<Done>,
    /// Checks the pieces that arrive compressed.
    key: ChunkIdKey,
}

/// A file being written, unnamed or under a temporary name. Dropped before it is
/// complete, it leaves nothing behind.
struct NewFile {
    seq: u64,
    file: File,
    node: Node,
    dest: PathBuf,
    /// The temporary name, if the file has one.
    tmp: Option<PathBuf>,
    written: u64,
    named: bool,
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.named
            && let Some(tmp) = &self.tmp
        {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))
}

impl Writer {
    fn run(&self, rx: Receiver<Job>) -> Result<Written, ClientError> {
        let mut out = Written::default();
        let mut current: Option<NewFile> = None;
        let mut unpacker = Unpacker::new(self.key.clone());
        // Ends when the dispatcher is done (or gone); a file still open then was not
        // completed and is dropped, leaving nothing.
        while let Ok(job) = rx.recv() {
            match job {
                Job::Files(files) => {
                    for (seq, job) in files {
                        let mut f = self.create(seq, job.node, job.dest)?;
                        for d in &job.data {
                            self.write(&mut f, d, &mut unpacker)?;
                        }
                        self.complete(f, &mut out)?;
                    }
                }
                Job::Open(seq, job) => {
                    let mut f = self.create(seq, job.node, job.dest)?;
                    for d in &job.data {
                        self.write(&mut f, d, &mut unpacker)?;
                    }
                    if job.more {
                        current = Some(f);
                    } else {
                        self.complete(f, &mut out)?;
                    }
                }
                Job::Data(d) => {
                    let f = current.as_mut().ok_or_else(|| {
                        ClientError::Corrupt("file data without a file in the restore".into())
                    })?;
                    self.write(f, &d, &mut unpacker)?;
                }
                Job::Close => {
                    if let Some(f) = current.take() {
                        self.complete(f, &mut out)?;
                    }
                }
            }
        }
        Ok(out)
    }

    fn create(&self, seq: u64, node: Node, dest: PathBuf) -> Result<NewFile, ClientError> {
        let what = || dest.display().to_string();
        // Created with its permission bits (the umask may take some away: checked when
        // it is completed), so most files need no chmod.
        let mode = node.mode & 0o777;
        if self.unnamed.load(Ordering::Relaxed) {
            let dir = dest.parent().unwrap_or(Path::new("."));
            match OpenOptions::new()
                .write(true)
                .mode(mode)
                .custom_flags(libc::O_TMPFILE)
                .open(dir)
            {
                Ok(file) => {
                    return Ok(NewFile {
                        seq,
                        file,
                        node,
                        dest,
                        tmp: None,
                        written: 0,
                        named: false,
                    });
                }
                // Not supported by this file system (or kernel): use names from now on.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                    ) =>
                {
                    self.unnamed.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(ClientError::io(what(), e)),
            }
        }
        let tmp = tmp_name(&dest);
        // Only its owner may open it while it is written under a temporary name.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o700)
            .open(&tmp)
            .map_err(|e| ClientError::io(what(), e))?;
        Ok(NewFile {
            seq,
            file,
            node,
            dest,
            tmp: Some(tmp),
            written: 0,
            named: false,
        })
    }

    fn write(
        &self,
        f: &mut NewFile,
        piece: &Piece,
        unpacker: &mut Unpacker,
    ) -> Result<(), ClientError> {
        // More than the file's size: refused before it is written (or decompressed), so
        // a server that sends without end cannot fill the disk.
        if f.written.saturating_add(piece.len() as u64) > f.node.size {
            return Err(ClientError::Corrupt(format!(
                "{}: the server sent more than the file's {} bytes; nothing was written under its name: run verify on the server's repository",
                f.dest.display(),
                f.node.size
            )));
        }
        let data = unpacker.open(piece, &|| f.dest.display().to_string())?;
        f.file
            .write_all(data)
            .map_err(|e| ClientError::io(f.dest.display(), e))?;
        f.written += data.len() as u64;
        self.counters.add_bytes(data.len() as u64);
        Ok(())
    }

    /// Checks the size, sets mode, owner and mtime, then gives the file its name.
    fn complete(&self, mut f: NewFile, out: &mut Written) -> Result<(), ClientError> {
        if f.written != f.node.size {
            return Err(ClientError::Corrupt(format!(
                "{}: the snapshot holds {} bytes but {} were received; run verify on the repository",
                f.dest.display(),
                f.node.size,
                f.written
            )));
        }
        let what = f.dest.display().to_string();
        // Owner first (a chown clears set-id bits), then the mode, each only if the file
        // does not have it already.
        let meta = f.file.metadata().map_err(|e| ClientError::io(&what, e))?;
        let mut mode_now = meta.permissions().mode() & 0o7777;
        if self.root && (meta.uid() != f.node.uid || meta.gid() != f.node.gid) {
            std::os::unix::fs::fchown(&f.file, Some(f.node.uid), Some(f.node.gid))
                .map_err(|e| ClientError::io(&what, e))?;
            mode_now = u32::MAX;
        }
        let mode = f.node.mode & 0o7777;
        if mode_now != mode {
            f.file
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| ClientError::io(&what, e))?;
        }
        filetime::set_file_handle_times(&f.file, None, Some(mtime(f.node.mtime_ns)))
            .map_err(|e| ClientError::io(&what, e))?;
        match &f.tmp {
            Some(tmp) => std::fs::rename(tmp, &f.dest).map_err(|e| ClientError::io(&what, e))?,
            None => self
                .link_unnamed(&f.file, &f.dest)
                .map_err(|e| ClientError::io(&what, e))?,
        }
        f.named = true;
        out.files += 1;
        out.bytes += f.written;
        self.counters.add_file();
        self.done.finish(f.seq);
        Ok(())
    }
}

/// How an unnamed file gets its name here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// `linkat(fd, "", AT_EMPTY_PATH)`.
    EmptyPath,
    /// `linkat` of `/proc/self/fd/<fd>`.
    Proc,
    /// No unnamed files: temporary names and rename.
    Named,
}

/// Tries each way once in `dir` (with a file that is removed again).
fn probe_link(dir: &Path) -> Link {
    let Ok(file) = OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    else {
        return Link::Named;
    };
    let name = tmp_name(&dir.join("link-probe"));
    for (how, by_proc) in [(Link::EmptyPath, false), (Link::Proc, true)] {
        if link_fd(&file, &name, by_proc).is_ok() {
            let _ = std::fs::remove_file(&name);
            return how;
        }
    }
    Link::Named
}

/// Gives the unnamed file `file` the name `to`: through `/proc/self/fd` when `by_proc`,
/// else with `AT_EMPTY_PATH`.
fn link_fd(file: &File, to: &Path, by_proc: bool) -> std::io::Result<()> {
    let to = cstring(to)?;
    let r = if by_proc {
        let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|_| std::io::Error::other("fd path"))?;
        // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
        unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        }
    } else {
        // SAFETY: the empty path and `to` are valid NUL-terminated strings that outlive
        // the call; the fd is open.
        unsafe {
            libc::linkat(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Writer {
    /// Names an unnamed file `dest`, replacing what is there (as a rename would: linked
    /// under a temporary name first, then renamed over it, so `dest` is never missing or
    /// partial).
    fn link_unnamed(&self, file: &File, dest: &Path) -> std::io::Result<()> {
        match self.link(file, dest) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let tmp = tmp_name(dest);
                self.link(file, &tmp)?;
                std::fs::rename(&tmp, dest).inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })
            }
            other => other,
        }
    }

    /// Links an unnamed file the way [`probe_link`] found to work.
    fn link(&self, file: &File, dest: &Path) -> std::io::Result<()> {
        link_fd(file, dest, self.by_proc.load(Ordering::Relaxed))
    }
}
