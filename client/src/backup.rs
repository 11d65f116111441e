//! Backups: a producer (the directory walk, or a stream) cuts data into chunks and
//! catalog nodes on a blocking thread; an uploader asks the server which chunks it lacks,
//! in batches, and streams only those. Both are joined by bounded queues, so memory stays
//! flat whatever the data size; the snapshot is committed only when everything arrived.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use datamover_core::catalog::CatalogDecoder;
use datamover_core::chunk::{ChunkBuffer, ChunkError, ChunkId, ChunkIdKey, ChunkerParams};
use datamover_core::paths::walk_order;
use datamover_proto::v1::{self, Node, NodeType, SnapshotKind};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

mod catalog_writer;

use crate::ClientError;
use crate::connect::{Api, Conn};
use crate::prefetch::Prefetch;
use crate::progress::{Counters, Reporter};
use catalog_writer::CatalogWriter;

/// Batches of chunks queued between the producer and the uploader.
const CHUNK_QUEUE: usize = 8;
/// A batch is handed over once it holds this many chunks or bytes (so small files do
/// not cost a thread hand-off each; at most about 2 MiB per batch).
const HANDOFF_CHUNKS: usize = 256;
const HANDOFF_BYTES: usize = 1024 * 1024;
/// Chunk ids asked about in one FindMissing call.
const QUERY_BATCH: usize = 1024;
/// Chunk ids this backup already queued, remembered up to this many (then forgotten at
/// once): the server answers for older ones (stored or being stored), so the client's
/// memory does not grow with the number of files.
const SEEN_LIMIT: usize = 64 * 1024;

/// What a finished backup reports.
#[derive(Debug, Clone)]
pub struct BackupResult {
    pub snapshot: v1::Snapshot,
    pub stats: v1::BackupStats,
    pub duration: Duration,
}

/// What the producer made: the catalog's chunks and marks, the statistics and the
/// backed-up directory's own node.
struct Produced {
    catalog: Vec<ChunkId>,
    marks: Vec<v1::CatalogMark>,
    stats: v1::BackupStats,
    root: Option<Node>,
}

/// Hands chunks to the uploader and collects the catalog.
pub struct Emitter {
    key: ChunkIdKey,
    params: ChunkerParams,
    /// One chunking buffer for every file of the backup.
    chunker: ChunkBuffer,
    tx: Handoff,
    catalog: CatalogWriter,
    counters: Arc<Counters>,
    pub stats: v1::BackupStats,
    /// The backed-up directory's own metadata, for the commit.
    root: Option<Node>,
}

type ChunkBatch = Vec<(ChunkId, Bytes)>;

/// Chunks on their way to the uploader, handed over in batches.
struct Handoff {
    tx: mpsc::Sender<ChunkBatch>,
    batch: ChunkBatch,
    bytes: usize,
}

impl Handoff {
    fn push(&mut self, id: ChunkId, data: Bytes) -> Result<(), ClientError> {
        self.bytes += data.len();
        self.batch.push((id, data));
        if self.batch.len() >= HANDOFF_CHUNKS || self.bytes >= HANDOFF_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(HANDOFF_CHUNKS));
        self.tx
            .blocking_send(batch)
            .map_err(|_| ClientError::Server("the upload stopped".into()))
    }
}

fn send_chunk(key: &ChunkIdKey, tx: &mut Handoff, data: Vec<u8>) -> Result<ChunkId, ClientError> {
    let id = key.id(&data);
    tx.push(id, Bytes::from(data))?;
    Ok(id)
}

impl Emitter {
    fn send(&mut self, data: Vec<u8>) -> Result<ChunkId, ClientError> {
        send_chunk(&self.key, &mut self.tx, data)
    }

    /// Chunks everything `reader` yields; returns the ids and the byte count.
    pub fn chunk_reader(
        &mut self,
        reader: impl Read,
    ) -> Result<(Vec<ChunkId>, u64), std::io::Error> {
        let mut ids = Vec::new();
        let mut total = 0u64;
        let Emitter {
            key,
            chunker,
            tx,
            counters,
            stats,
            ..
        } = self;
        for chunk in chunker.chunks(reader) {
            let data = chunk.map_err(|e| match e {
                ChunkError::Io(io) => io,
                other => std::io::Error::other(other),
            })?;
            total += data.len() as u64;
            counters.add_bytes(data.len() as u64);
            stats.chunks += 1;
            let id = send_chunk(key, tx, data)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e.to_string()))?;
            ids.push(id);
        }
        Ok((ids, total))
    }

    fn node(&mut self, node: &Node) -> Result<(), ClientError> {
        for data in self.catalog.add(node, self.params) {
            self.stats.chunks += 1;
            let id = self.send(data)?;
            self.catalog.ids.push(id);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Produced, ClientError> {
        for data in self.catalog.finish(self.params) {
            self.stats.chunks += 1;
            let id = self.send(data)?;
            self.catalog.ids.push(id);
        }
        self.tx.flush()?;
        Ok(Produced {
            catalog: self.catalog.ids,
            marks: self.catalog.marks,
            stats: self.stats,
            root: self.root,
        })
    }
}

/// The previous snapshot's nodes, in walk order, read as the walk advances.
pub struct PrevCatalog {
    rx: mpsc::Receiver<Vec<Node>>,
    batch: std::vec::IntoIter<Node>,
    peeked: Option<Node>,
}

impl PrevCatalog {
    /// The previous node at `path`, if any (nodes before it are skipped).
    fn find(&mut self, path: &[u8]) -> Option<Node> {
        loop {
            if self.peeked.is_none() {
                self.peeked = match self.batch.next() {
                    Some(n) => Some(n),
                    None => {
                        self.batch = self.rx.blocking_recv()?.into_iter();
                        self.batch.next()
                    }
                };
            }
            let p = self.peeked.as_ref()?;
            match walk_order(&p.path, path) {
                std::cmp::Ordering::Less => self.peeked = None,
                std::cmp::Ordering::Equal => return self.peeked.take(),
                std::cmp::Ordering::Greater => return None,
            }
        }
    }
}

fn mtime_ns(secs: i64, nsecs: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

/// What a backup keeps of an entry's `lstat`.
#[derive(Clone, Copy, Debug)]
struct Meta {
    /// `st_mode`: the file type and the permission bits.
    mode: u32,
    ino: u64,
    dev: u64,
    size: u64,
    mtime_ns: i64,
    uid: u32,
    gid: u32,
}

impl Meta {
    fn of_std(m: &std::fs::Metadata) -> Meta {
        Meta {
            mode: m.mode(),
            ino: m.ino(),
            dev: m.dev(),
            size: m.size(),
            mtime_ns: mtime_ns(m.mtime(), m.mtime_nsec()),
            uid: m.uid(),
            gid: m.gid(),
        }
    }

    fn of_stat(st: &libc::stat) -> Meta {
        Meta {
            mode: st.st_mode,
            ino: st.st_ino,
            dev: st.st_dev,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: mtime_ns(st.st_mtime, st.st_mtime_nsec),
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }

    fn is(&self, format: libc::mode_t) -> bool {
        self.mode & libc::S_IFMT == format
    }
    fn is_dir(&self) -> bool {
        self.is(libc::S_IFDIR)
    }
    fn is_file(&self) -> bool {
        self.is(libc::S_IFREG)
    }
    fn is_symlink(&self) -> bool {
        self.is(libc::S_IFLNK)
    }
    fn is_fifo(&self) -> bool {
        self.is(libc::S_IFIFO)
    }
}

fn node_from(path: Vec<u8>, m: &Meta, ty: NodeType) -> Node {
    Node {
        path: path.into(),
        r#type: ty as i32,
        mode: m.mode & 0o7777,
        mtime_ns: m.mtime_ns,
        uid: m.uid,
        gid: m.gid,
        size: if ty == NodeType::File { m.size } else { 0 },
        inode: m.ino,
        dev: m.dev,
        link_target: Default::default(),
        chunks: Vec::new(),
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<std::ffi::OsString>, ClientError> {
    let rd = std::fs::read_dir(dir).map_err(|e| ClientError::io(dir.display(), e))?;
    let mut names = Vec::new();
    for e in rd {
        names.push(
            e.map_err(|e| ClientError::io(dir.display(), e))?
                .file_name(),
        );
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Files opened ahead of the one being read, each with a read-ahead hint, so the disk
/// works on the next files while this one is chunked (small files would otherwise cost
/// one disk round trip each, one after another).
const LOOKAHEAD_FILES: usize = 64;
/// Entries of the walk held ahead at most (files, directories, symlinks).
const LOOKAHEAD_ENTRIES: usize = 1024;
/// How much of each file ahead is hinted.
const LOOKAHEAD_BYTES: u64 = 4 * 1024 * 1024;

/// One entry of the walk, with what was prepared for it ahead of time.
struct Entry {
    abs: PathBuf,
    rel: Vec<u8>,
    meta: Meta,
    prep: Prep,
}

enum Prep {
    /// Not a regular file.
    None,
    /// A file unchanged since the previous snapshot: its node there.
    Unchanged(Node),
    /// A file to read, opened (and hinted).
    Open(File),
    /// A file that could not be opened: reported when its turn comes.
    Failed(std::io::Error),
}

impl Entry {
    fn new(abs: PathBuf, rel: Vec<u8>, meta: Meta) -> Entry {
        Entry {
            abs,
            rel,
            meta,
            prep: Prep::None,
        }
    }

    /// For a regular file: finds it in the previous snapshot (in walk order), or opens
    /// it and asks the kernel to start reading it. Returns whether it opened a file.
    fn prepare(&mut self, prev: &mut Option<PrevCatalog>) -> bool {
        if !self.meta.is_file() {
            return false;
        }
        let m = &self.meta;
        let unchanged = prev.as_mut().and_then(|p| p.find(&self.rel)).filter(|p| {
            p.r#type == NodeType::File as i32
                && p.size == m.size
                && p.mtime_ns == m.mtime_ns
                && p.inode == m.ino
        });
        if let Some(p) = unchanged {
            self.prep = Prep::Unchanged(p);
            return false;
        }
        match File::open(&self.abs) {
            Ok(f) => {
                let len = m.size.min(LOOKAHEAD_BYTES) as libc::off_t;
                // SAFETY: the fd is open for the duration of the call. Only a hint:
                // its result does not matter.
                unsafe {
                    libc::posix_fadvise(f.as_raw_fd(), 0, len, libc::POSIX_FADV_WILLNEED);
                }
                self.prep = Prep::Open(f);
                true
            }
            Err(e) => {
                self.prep = Prep::Failed(e);
                false
            }
        }
    }
}

/// Names of a directory whose metadata is read at once, split over [`stat_threads`]
/// threads. With a cold cache, most of a walk is the kernel looking each name up and
/// loading its inode (CPU, not waiting on the disk), so this spreads it over the cores.
const STAT_BATCH: usize = 256;
/// Smaller batches are read on the walk's own thread (a thread costs more than a few
/// cached lookups).
const STAT_PARALLEL_MIN: usize = 32;

/// Threads that read one batch of metadata (the walk's own included).
fn stat_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

/// A name of a directory, its path, and its metadata (or why it could not be read).
type Stat = (std::ffi::OsString, PathBuf, std::io::Result<Meta>);

/// Directory levels the walk holds open (see [`open_dir`]); entries deeper than this are
/// looked up by their full path, so a tree of any depth stays far inside the open-file
/// limit (1,024 by default) beside the files read ahead.
const HELD_DIR_LEVELS: usize = 64;

/// A directory of the walk, opened to look its names up in (`O_PATH`: nothing is read
/// through it), so each `lstat` resolves one name instead of every component of the
/// path again (about 1 µs per entry on deep trees).
fn open_dir(dir: &Path) -> Result<File, ClientError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| ClientError::io(dir.display(), e))
}

/// `lstat` of `name` in the directory open as `dir`.
fn lstat_at(dir: &File, name: &std::ffi::OsStr) -> std::io::Result<Meta> {
    let name = std::ffi::CString::new(name.as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a file name holds a NUL byte",
        )
    })?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated and outlives the call, `st` is writable, and the
    // fd is open for the call's duration.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful fstatat filled `st`.
    Ok(Meta::of_stat(unsafe { st.assume_init_ref() }))
}

/// `lstat` of `dir/name` for each name, in order, over up to `threads` threads; `fd` is
/// `dir` opened by [`open_dir`], if it is held open.
fn stat_batch(
    dir: &Path,
    fd: Option<&File>,
    names: Vec<std::ffi::OsString>,
    threads: usize,
) -> Vec<Stat> {
    let stat = |names: &[std::ffi::OsString]| -> Vec<(PathBuf, std::io::Result<Meta>)> {
        names
            .iter()
            .map(|n| {
                let abs = dir.join(n);
                let meta = match fd {
                    Some(fd) => lstat_at(fd, n),
                    None => std::fs::symlink_metadata(&abs).map(|m| Meta::of_std(&m)),
                };
                (abs, meta)
            })
            .collect()
    };
    let stats = if threads < 2 || names.len() < STAT_PARALLEL_MIN {
        stat(&names)
    } else {
        let part = names.len().div_ceil(threads);
        std::thread::scope(|s| {
            let mut parts = names.chunks(part);
            let mine = parts.next().unwrap_or_default();
            let others: Vec<_> = parts.map(|p| s.spawn(move || stat(p))).collect();
            let mut stats = stat(mine);
            for (h, p) in others.into_iter().zip(names.chunks(part).skip(1)) {
                match h.join() {
                    Ok(m) => stats.extend(m),
                    // A panicking lstat cannot happen; should it, the walk stops cleanly.
                    Err(_) => stats.extend(p.iter().map(|n| {
                        (
                            dir.join(n),
                            Err(std::io::Error::other("metadata thread failed")),
                        )
                    })),
                }
            }
            stats
        })
    };
    names
        .into_iter()
        .zip(stats)
        .map(|(name, (abs, meta))| (name, abs, meta))
        .collect()
}

/// One directory of the walk being visited.
struct Level {
    dir: PathBuf,
    /// `dir`, opened by [`open_dir`] in the first [`HELD_DIR_LEVELS`] levels.
    fd: Option<File>,
    rel: Vec<u8>,
    /// Its remaining sorted names.
    names: std::vec::IntoIter<std::ffi::OsString>,
    /// The next names, with their metadata already read.
    ready: std::collections::VecDeque<Stat>,
}

/// The walk: depth-first, each directory's names in byte order (the catalog's order).
struct Walker {
    /// Depth is bounded by the file system.
    stack: Vec<Level>,
    threads: usize,
    /// Reads subdirectories ahead of the walk (see [`crate::prefetch`]).
    prefetch: Option<Prefetch>,
}

impl Walker {
    fn new(root: &Path) -> Result<Walker, ClientError> {
        Ok(Walker {
            stack: vec![Level {
                fd: Some(open_dir(root)?),
                dir: root.to_path_buf(),
                rel: Vec::new(),
                names: sorted_entries(root)?.into_iter(),
                ready: Default::default(),
            }],
            threads: stat_threads(),
            prefetch: Prefetch::start(),
        })
    }

    /// The next entry; a directory's names are listed when it is returned.
    fn next(&mut self) -> Result<Option<Entry>, ClientError> {
        // Bounded by the tree: every turn consumes a name, reads a batch or pops a level.
        while let Some(level) = self.stack.last_mut() {
            let Some((name, abs, meta)) = level.ready.pop_front() else {
                let batch: Vec<_> = level.names.by_ref().take(STAT_BATCH).collect();
                if batch.is_empty() {
                    self.stack.pop();
                } else {
                    level.ready =
                        stat_batch(&level.dir, level.fd.as_ref(), batch, self.threads).into();
                    if let Some(p) = &self.prefetch {
                        for (_, abs, meta) in &level.ready {
                            if meta.as_ref().is_ok_and(Meta::is_dir) {
                                p.dir(abs);
                            }
                        }
                    }
                }
                continue;
            };
            let mut rel = level.rel.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            let meta = match meta {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
                Err(e) => return Err(ClientError::io(abs.display(), e)),
            };
            if meta.is_dir() {
                let fd = if self.stack.len() < HELD_DIR_LEVELS {
                    Some(open_dir(&abs)?)
                } else {
                    None
                };
                let names = sorted_entries(&abs)?;
                self.stack.push(Level {
                    fd,
                    dir: abs.clone(),
                    rel: rel.clone(),
                    names: names.into_iter(),
                    ready: Default::default(),
                });
            }
            return Ok(Some(Entry::new(abs, rel, meta)));
        }
        Ok(None)
    }
}

/// Backs up one entry (and records it in the catalog).
fn visit(em: &mut Emitter, entry: Entry) -> Result<(), ClientError> {
    let Entry {
        abs,
        rel,
        meta: m,
        prep,
    } = entry;
    if m.is_dir() {
        em.stats.dirs += 1;
        let node = node_from(rel, &m, NodeType::Dir);
        return em.node(&node);
    }
    if m.is_symlink() {
        let target = std::fs::read_link(&abs).map_err(|e| ClientError::io(abs.display(), e))?;
        let mut node = node_from(rel, &m, NodeType::Symlink);
        node.link_target = Bytes::copy_from_slice(target.as_os_str().as_bytes());
        em.stats.other += 1;
        return em.node(&node);
    }
    if m.is_fifo() {
        em.stats.other += 1;
        let node = node_from(rel, &m, NodeType::Fifo);
        return em.node(&node);
    }
    if !m.is_file() {
        tracing::warn!(path = %abs.display(), "skipping a socket or device file");
        return Ok(());
    }
    let mut node = node_from(rel, &m, NodeType::File);
    em.stats.files += 1;
    em.counters.add_file();
    let f = match prep {
        Prep::Unchanged(p) => {
            node.chunks = p.chunks;
            em.stats.files_unchanged += 1;
            em.stats.bytes += node.size;
            return em.node(&node);
        }
        Prep::Open(f) => f,
        Prep::Failed(e) => return Err(ClientError::io(abs.display(), e)),
        Prep::None => File::open(&abs).map_err(|e| ClientError::io(abs.display(), e))?,
    };
    let (ids, total) = em
        .chunk_reader(f)
        .map_err(|e| ClientError::io(abs.display(), e))?;
    if total != node.size {
        tracing::warn!(path = %abs.display(), "file changed while it was read; stored as read");
    }
    node.size = total;
    node.chunks = ids.iter().map(|id| Bytes::copy_from_slice(&id.0)).collect();
    em.stats.bytes += total;
    em.node(&node)
}

/// Walks `root` in the catalog's order, preparing up to [`LOOKAHEAD_FILES`] files ahead.
fn walk(root: &Path, em: &mut Emitter, mut prev: Option<PrevCatalog>) -> Result<(), ClientError> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| ClientError::io(root.display(), e))?;
    let meta = Meta::of_std(&meta);
    if !meta.is_dir() {
        let name = root
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_else(|| b"file".to_vec());
        let mut entry = Entry::new(root.to_path_buf(), name, meta);
        entry.prepare(&mut prev);
        return visit(em, entry);
    }
    // The directory itself is not in the catalog (its paths are relative to it): its
    // metadata goes with the commit, for a restore to give its target back.
    em.root = Some(node_from(Vec::new(), &meta, NodeType::Dir));
    let mut walker = Walker::new(root)?;
    let mut ahead: std::collections::VecDeque<Entry> = Default::default();
    let mut open = 0usize;
    let mut walked_all = false;
    // Bounded by the tree: every turn visits one entry.
    loop {
        while !walked_all && open < LOOKAHEAD_FILES && ahead.len() < LOOKAHEAD_ENTRIES {
            match walker.next()? {
                Some(mut e) => {
                    if e.prepare(&mut prev) {
                        open += 1;
                    }
                    ahead.push_back(e);
                }
                None => walked_all = true,
            }
        }
        let Some(entry) = ahead.pop_front() else {
            return Ok(());
        };
        if matches!(entry.prep, Prep::Open(_)) {
            open -= 1;
        }
        visit(em, entry)?;
    }
}

/// Sends chunks the server lacks; returns (chunks sent, bytes sent).
async fn upload(
    mut api: Api,
    session: String,
    mut rx: mpsc::Receiver<ChunkBatch>,
    counters: Arc<Counters>,
) -> Result<(u64, u64), ClientError> {
    let (ptx, prx) = mpsc::channel::<v1::PutChunksRequest>(4);
    let mut put_api = api.clone();
    let mut put = tokio::spawn(async move { put_api.put_chunks(ReceiverStream::new(prx)).await });
    // The server may end the upload at any time (revocation, shutdown, error): watch
    // for that while waiting for chunks, so a stalled input cannot hide it.
    let mut put_done = None;
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let (mut chunks_sent, mut bytes_sent) = (0u64, 0u64);
    let mut stream_closed = false;
    let mut inbox = ChunkBatch::new().into_iter();
    'outer: loop {
        let mut batch: Vec<(ChunkId, Bytes)> = Vec::new();
        let mut batch_bytes = 0usize;
        while batch.len() < QUERY_BATCH && batch_bytes < datamover_proto::BATCH_BYTES {
            if let Some(item) = inbox.next() {
                if seen.len() >= SEEN_LIMIT {
                    seen.clear();
                }
                if seen.insert(item.0) {
                    batch_bytes += item.1.len();
                    batch.push(item);
                }
                continue;
            }
            let next = if batch.is_empty() {
                tokio::select! {
                    item = rx.recv() => item,
                    res = &mut put => {
                        put_done = Some(res);
                        break 'outer;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(v) => Some(v),
                    Err(_) => break,
                }
            };
            match next {
                Some(v) => inbox = v.into_iter(),
                // The producer is done: send what is batched, then stop.
                None if batch.is_empty() => break 'outer,
                None => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let ids = batch
            .iter()
            .map(|(id, _)| Bytes::copy_from_slice(&id.0))
            .collect();
        let missing = api
            .find_missing(v1::FindMissingRequest {
                session_id: session.clone(),
                ids,
            })
            .await?
            .into_inner()
            .missing;
        let mut msg = v1::PutChunksRequest {
            session_id: session.clone(),
            chunks: Vec::new(),
        };
        let mut msg_bytes = 0usize;
        for i in missing {
            let Some((id, data)) = batch.get(i as usize) else {
                return Err(ClientError::Server(
                    "server named a chunk that was not asked about".into(),
                ));
            };
            msg_bytes += data.len();
            chunks_sent += 1;
            bytes_sent += data.len() as u64;
            counters.add_sent(data.len() as u64);
            msg.chunks.push(v1::Chunk {
                id: Bytes::copy_from_slice(&id.0),
                data: data.clone(),
            });
            if msg_bytes >= datamover_proto::BATCH_BYTES {
                msg_bytes = 0;
                if ptx
                    .send(std::mem::replace(
                        &mut msg,
                        v1::PutChunksRequest {
                            session_id: session.clone(),
                            chunks: Vec::new(),
                        },
                    ))
                    .await
                    .is_err()
                {
                    stream_closed = true;
                    break 'outer;
                }
            }
        }
        if !msg.chunks.is_empty() && ptx.send(msg).await.is_err() {
            stream_closed = true;
            break;
        }
    }
    drop(ptx);
    let finished = match put_done {
        Some(res) => {
            stream_closed = true;
            res
        }
        None => put.await,
    };
    match finished {
        Ok(Ok(_)) if !stream_closed => Ok((chunks_sent, bytes_sent)),
        Ok(Ok(_)) => Err(ClientError::Server(
            "the server closed the upload early".into(),
        )),
        Ok(Err(status)) => Err(status.into()),
        Err(e) => Err(ClientError::Server(format!("upload task failed: {e}"))),
    }
}

/// Pieces of the previous snapshot's catalog queued towards the walk (each a catalog
/// chunk's worth of nodes, up to about 1 MiB encoded).
const PREV_CATALOG_QUEUE: usize = 4;

/// Reads the previous snapshot's catalog in the background: as stored (decoded here, so
/// the server holds a piece at a time), or as nodes from a server that sends those.
fn prev_catalog(api: &Api, snapshot_id: String) -> PrevCatalog {
    let (tx, rx) = mpsc::channel::<Vec<Node>>(PREV_CATALOG_QUEUE);
    let mut api = api.clone();
    tokio::spawn(async move {
        let stream = api
            .read_catalog(v1::ReadCatalogRequest {
                snapshot_id,
                encoded: true,
                ..Default::default()
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot read the previous snapshot; reading every file");
                return;
            }
        };
        let mut decoder = CatalogDecoder::new();
        while let Some(msg) = stream.next().await {
            let Ok(msg) = msg else {
                tracing::warn!(
                    "previous snapshot catalog ended early; reading the remaining files"
                );
                return;
            };
            let mut nodes = msg.nodes;
            decoder.push(&msg.encoded);
            loop {
                match decoder.next_node() {
                    Ok(Some(n)) => nodes.push(n),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "the previous snapshot's catalog is unreadable; reading the remaining files");
                        return;
                    }
                }
            }
            // A full queue waits for the walk to catch up; a finished walk ends it.
            if !nodes.is_empty() && tx.send(nodes).await.is_err() {
                return;
            }
        }
    });
    PrevCatalog {
        rx,
        batch: Vec::new().into_iter(),
        peeked: None,
    }
}

/// A pipe's buffer while a stream is read from it (Linux allows unprivileged processes
/// up to 1 MiB): the writer (a database dump) and the chunker then trade a chunk's worth
/// of data per wake-up instead of 64 KiB.
const PIPE_BYTES: libc::c_int = 1024 * 1024;

/// Enlarges the buffer of `fd` if it is a pipe (a FIFO or piped stdin); only a hint.
fn widen_pipe(fd: &impl AsRawFd) {
    let fd = fd.as_raw_fd();
    // SAFETY: fstat fills a plain struct for an open fd; F_SETPIPE_SZ takes an int and
    // fails harmlessly on anything but a pipe.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_BYTES);
        }
    }
}

enum Input {
    Tree(PathBuf),
    Stream { file: Option<PathBuf>, name: String },
}

async fn run(conn: &mut Conn, tag: &str, input: Input) -> Result<BackupResult, ClientError> {
    let started = Instant::now();
    let (kind, source) = match &input {
        Input::Tree(p) => (SnapshotKind::Files, p.display().to_string()),
        Input::Stream { file, .. } => (
            SnapshotKind::Stream,
            file.as_ref()
                .map_or("-".to_string(), |f| f.display().to_string()),
        ),
    };
    let begin = conn
        .api
        .begin_backup(v1::BeginBackupRequest {
            tag: tag.to_string(),
            kind: kind as i32,
            source: source.clone(),
            hostname: conn.settings.hostname.clone(),
        })
        .await?
        .into_inner();
    tracing::debug!(elapsed = ?started.elapsed(), "backup session begun");
    let prev = match (&input, begin.parent) {
        (Input::Tree(_), Some(p)) => Some(prev_catalog(&conn.api, p.id)),
        _ => None,
    };
    let counters = Arc::new(Counters::default());
    let _progress = Reporter::start("backup", Arc::clone(&counters));
    let (tx, rx) = mpsc::channel(CHUNK_QUEUE);
    let uploader = tokio::spawn(upload(
        conn.api.clone(),
        begin.session_id.clone(),
        rx,
        Arc::clone(&counters),
    ));
    let chunker = ChunkBuffer::new(conn.chunker)
        .map_err(|e| ClientError::Server(format!("the server's chunker parameters: {e}")))?;
    let mut em = Emitter {
        key: conn.key.clone(),
        params: conn.chunker,
        chunker,
        tx: Handoff {
            tx,
            batch: Vec::with_capacity(HANDOFF_CHUNKS),
            bytes: 0,
        },
        catalog: CatalogWriter::default(),
        counters,
        stats: v1::BackupStats::default(),
        root: None,
    };
    let mut producer = tokio::task::spawn_blocking(move || {
        match input {
            Input::Tree(root) => walk(&root, &mut em, prev)?,
            Input::Stream { file, name } => {
                let reader: Box<dyn Read> = match &file {
                    None => {
                        let stdin = std::io::stdin().lock();
                        widen_pipe(&stdin);
                        Box::new(stdin)
                    }
                    Some(p) => {
                        let f = File::open(p).map_err(|e| ClientError::io(p.display(), e))?;
                        widen_pipe(&f);
                        Box::new(f)
                    }
                };
                let what = file
                    .as_ref()
                    .map_or("stdin".to_string(), |f| f.display().to_string());
                let (ids, total) = em
                    .chunk_reader(reader)
                    .map_err(|e| ClientError::io(&what, e))?;
                em.stats.files = 1;
                em.stats.bytes = total;
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                let node = Node {
                    path: name.into_bytes().into(),
                    r#type: NodeType::File as i32,
                    mode: 0o600,
                    mtime_ns: now.as_nanos() as i64,
                    size: total,
                    chunks: ids.iter().map(|id| Bytes::copy_from_slice(&id.0)).collect(),
                    ..Default::default()
                };
                em.node(&node)?;
            }
        }
        em.finish()
    });
    let mut uploader = uploader;
    // An upload that fails (server error, revocation) ends the backup at once, even while
    // the producer waits for input (a stalled pipe); the producer's thread is abandoned.
    let (produced, uploaded) = tokio::select! {
        u = &mut uploader => {
            let u = u.map_err(|e| ClientError::Server(format!("upload task failed: {e}")))?;
            if let Err(e) = u {
                return Err(e);
            }
            (producer.await, u)
        }
        p = &mut producer => {
            let u = uploader
                .await
                .map_err(|e| ClientError::Server(format!("upload task failed: {e}")))?;
            (p, u)
        }
    };
    // The uploader's error (server side) explains a producer stopped by a closed queue.
    let (chunks_sent, bytes_sent) = uploaded?;
    let Produced {
        catalog,
        marks,
        mut stats,
        root,
    } = produced.map_err(|e| ClientError::Io(format!("backup worker failed: {e}")))??;
    stats.chunks_sent = chunks_sent;
    stats.bytes_sent = bytes_sent;
    tracing::debug!(elapsed = ?started.elapsed(), chunks_sent, "walk and upload done; committing");
    let snapshot = conn
        .api
        .commit_backup(v1::CommitBackupRequest {
            session_id: begin.session_id,
            catalog: catalog
                .iter()
                .map(|id| Bytes::copy_from_slice(&id.0))
                .collect(),
            stats: Some(stats),
            root,
            catalog_marks: marks,
        })
        .await
        .map_err(|s| {
            let e = ClientError::from(s);
            if e.is_connection_lost() {
                // The server may have committed it before the connection went.
                ClientError::Unreachable(format!(
                    "{COMMIT_LOST} the snapshot of tag {tag} ({e}): it may be committed; run `datamover-client list {tag}` to see, and back up again if it is not there"
                ))
            } else {
                e
            }
        })?
        .into_inner()
        .snapshot
        .ok_or_else(|| ClientError::Server("the server committed no snapshot".into()))?;
    Ok(BackupResult {
        snapshot,
        stats,
        duration: started.elapsed(),
    })
}

/// `backup_files <path> <tag>`.
pub async fn backup_files(
    conn: &mut Conn,
    path: &Path,
    tag: &str,
) -> Result<BackupResult, ClientError> {
    std::fs::symlink_metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ClientError::NotFound(format!(
                "{} does not exist: give the directory to back up",
                path.display()
            ))
        } else {
            ClientError::io(path.display(), e)
        }
    })?;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    run(conn, tag, Input::Tree(abs)).await
}

/// `backup_stream <filename|-> [tag]`.
pub async fn backup_stream(
    conn: &mut Conn,
    input: &str,
    tag: &str,
) -> Result<BackupResult, ClientError> {
    let file = (input != "-").then(|| PathBuf::from(input));
    if let Some(f) = &file
        && !f.exists()
    {
        return Err(ClientError::NotFound(format!(
            "{} does not exist: create the named pipe (mkfifo) or give a file, or - for stdin",
            f.display()
        )));
    }
    let name = file
        .as_ref()
        .and_then(|f| f.file_name())
        .map_or("stdin".to_string(), |n| n.to_string_lossy().into_owned());
    run(conn, tag, Input::Stream { file, name })
        .await
        .map_err(|e| stream_interrupted(e, input, tag))
}

/// How a lost connection while committing begins (the snapshot may exist then).
const COMMIT_LOST: &str = "lost the connection to the server while it committed";

/// A stream cannot be read again, so a stream backup whose connection was lost (the
/// network, or the server restarting) is not resumed: it fails saying that nothing was
/// committed and what to run again (the dump feeding it too). What the server stored
/// already is found by the rerun and not sent again.
fn stream_interrupted(e: ClientError, input: &str, tag: &str) -> ClientError {
    if !e.is_connection_lost() || e.to_string().starts_with(COMMIT_LOST) {
        return e;
    }
    let source = if input == "-" {
        "stdin".to_string()
    } else {
        input.to_string()
    };
    ClientError::Unreachable(format!(
        "backup_stream of {source} (tag {tag}) was interrupted by the server side ({e}); the snapshot was not committed and a stream cannot be read again: run the dump into {source} again together with `datamover-client backup_stream {input} {tag}` (chunks the server already stored are not sent again)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lstat_at_reads_the_entry_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("d")).expect("mkdir");
        std::fs::write(dir.path().join("d/f"), b"12345").expect("write");
        std::os::unix::fs::symlink("d", dir.path().join("l")).expect("symlink");
        let fd = open_dir(dir.path()).expect("open");
        let link = lstat_at(&fd, "l".as_ref()).expect("lstat l");
        assert!(link.is_symlink() && !link.is_dir());
        assert!(lstat_at(&fd, "d".as_ref()).expect("lstat d").is_dir());
        let sub = open_dir(&dir.path().join("d")).expect("open d");
        let f = lstat_at(&sub, "f".as_ref()).expect("lstat f");
        let std_meta = std::fs::symlink_metadata(dir.path().join("d/f")).expect("metadata");
        let want = Meta::of_std(&std_meta);
        assert!(f.is_file() && !f.is_fifo());
        assert_eq!(
            (f.mode, f.ino, f.dev, f.size, f.mtime_ns, f.uid, f.gid),
            (
                want.mode,
                want.ino,
                want.dev,
                5,
                want.mtime_ns,
                want.uid,
                want.gid
            )
        );
        let missing = lstat_at(&fd, "missing".as_ref()).expect_err("missing");
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn walk_reads_batches_in_order_over_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Sizes tell the entries apart; 600 files make a full batch split over threads
        // and a partial one, and a nested directory comes back in walk order.
        for i in 0..600u64 {
            std::fs::write(dir.path().join(format!("f{i:04}")), vec![0u8; i as usize])
                .expect("write");
        }
        std::fs::create_dir(dir.path().join("f0100x")).expect("mkdir");
        std::fs::write(dir.path().join("f0100x/inner"), b"abc").expect("write");
        let names: Vec<_> = (0..STAT_BATCH)
            .map(|i| std::ffi::OsString::from(format!("f{i:04}")))
            .chain([std::ffi::OsString::from("missing")])
            .collect();
        let fd = open_dir(dir.path()).expect("open");
        let got = stat_batch(dir.path(), Some(&fd), names.clone(), 3);
        assert_eq!(got.len(), names.len());
        // Below the levels held open, the same names are looked up by path alike.
        let by_path = stat_batch(dir.path(), None, names.clone(), 3);
        let view = |v: &[Stat]| -> Vec<_> {
            v.iter()
                .map(|(n, a, m)| {
                    let m = m.as_ref().ok().map(|m| (m.mode, m.ino, m.size, m.mtime_ns));
                    (n.clone(), a.clone(), m)
                })
                .collect()
        };
        assert_eq!(view(&got), view(&by_path));
        for (i, (name, abs, meta)) in got.iter().enumerate().take(STAT_BATCH) {
            assert_eq!(name, &names[i]);
            assert_eq!(abs, &dir.path().join(name));
            assert_eq!(meta.as_ref().expect("stat").size, i as u64);
        }
        let last = got.last().expect("last");
        assert_eq!(
            last.2.as_ref().map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::NotFound)
        );

        let mut walker = Walker::new(dir.path()).expect("walker");
        let mut seen = Vec::new();
        while let Some(e) = walker.next().expect("next") {
            if e.meta.is_file() && e.rel.starts_with(b"f") && e.rel.len() == 5 {
                let i: u64 = std::str::from_utf8(&e.rel[1..])
                    .expect("utf8")
                    .parse()
                    .expect("n");
                assert_eq!(e.meta.size, i);
            }
            seen.push(String::from_utf8(e.rel).expect("utf8"));
        }
        assert_eq!(seen.len(), 602);
        let at = seen.iter().position(|p| p == "f0100x").expect("dir");
        assert_eq!(seen[at + 1], "f0100x/inner");
        assert_eq!(seen[at + 2], "f0101");
    }
}
