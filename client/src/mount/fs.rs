//! The FUSE file system: `/<tag>/<time>/…` per snapshot, `/<tag>/latest` a symlink to the
//! newest one. Snapshot trees are read from their catalogs when a directory is opened or
//! a name looked up, never whole; listings are cached up to a bound of entries.
//!
//! FUSE calls arrive on fuser's threads (a fixed few) and run their async part with
//! `Handle::block_on` on the client's runtime, so no more calls are in flight than there
//! are threads.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use datamover_core::paths::walk_order;
use datamover_core::select::is_within;
use datamover_proto::v1::{self, Node, NodeType};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    Request,
};
use lru::LruCache;

use super::data::{Layout, OpenFile, Reader};
use crate::ClientError;
use crate::browse::catalog::Catalog;
use crate::connect::Api;

/// How long the kernel may keep what a snapshot holds (it never changes).
const SNAPSHOT_TTL: Duration = Duration::from_secs(60);
/// How long it may keep the tags and snapshot lists (new backups appear).
const LIST_TTL: Duration = Duration::from_secs(1);
/// The snapshot list is asked for again at most this often.
const REFRESH: Duration = Duration::from_secs(5);
/// Directory entries kept in listings at most (a listing larger than that is kept alone).
const LISTING_ENTRIES: usize = 400_000;
/// The name of the newest snapshot of a tag.
pub const LATEST: &str = "latest";

/// Counters for the result line.
#[derive(Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub dirs_listed: AtomicU64,
    pub errors: AtomicU64,
}

/// A snapshot as mounted.
pub struct Snap {
    pub snapshot: v1::Snapshot,
    /// Its directory's name under its tag.
    pub dir: String,
    pub time: SystemTime,
}

/// The snapshots of one tag, oldest first.
pub struct TagDir {
    pub snaps: Vec<Arc<Snap>>,
}

/// Tags by directory name.
pub type Tags = BTreeMap<String, TagDir>;

/// A tag as a directory name: `/` and `%` escaped, `.` and `..` too.
pub fn tag_dir(tag: &str) -> String {
    match tag {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => tag.replace('%', "%25").replace('/', "%2F"),
    }
}

/// Groups snapshots by tag and names each one by its time (UTC, to the second); two of a
/// tag in the same second get the older's name and the newer's with `-<id prefix>`.
pub fn group(list: Vec<v1::Snapshot>) -> Tags {
    let mut tags: Tags = BTreeMap::new();
    let mut list: Vec<(SystemTime, v1::Snapshot)> = list
        .into_iter()
        .map(|s| {
            let t = humantime::parse_rfc3339_weak(&s.time).unwrap_or(UNIX_EPOCH);
            (t, s)
        })
        .collect();
    list.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
    for (time, s) in list {
        let entry = tags
            .entry(tag_dir(&s.tag))
            .or_insert(TagDir { snaps: Vec::new() });
        let mut dir = if time == UNIX_EPOCH {
            s.id.clone()
        } else {
            humantime::format_rfc3339_seconds(time).to_string()
        };
        if entry.snaps.iter().any(|o| o.dir == dir) {
            dir = format!("{dir}-{}", s.id.get(..12).unwrap_or(&s.id));
        }
        entry.snaps.push(Arc::new(Snap {
            snapshot: s,
            dir,
            time,
        }));
    }
    tags
}

#[derive(Clone, Hash, PartialEq, Eq)]
enum Key {
    Tag(String),
    Latest(String),
    Snapshot(String),
    Entry(String, Bytes),
}

#[derive(Clone)]
enum What {
    Root,
    Tag(String),
    Latest(String),
    Snapshot(Arc<Snap>),
    Entry(Arc<Snap>, Arc<OpenFile>),
}

struct Inode {
    key: Option<Key>,
    what: What,
    lookups: u64,
}

struct State {
    tags: Tags,
    refreshed: Instant,
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<Key, u64>,
}

/// A directory's entries (sorted by name), cached.
type Listing = Arc<Vec<Arc<Node>>>;

struct Listings {
    lru: LruCache<(String, Bytes), Listing>,
    entries: usize,
}

pub struct MountFs {
    rt: tokio::runtime::Handle,
    api: Api,
    reader: Arc<Reader>,
    state: Mutex<State>,
    catalogs: Mutex<HashMap<String, Arc<Catalog>>>,
    listings: Mutex<Listings>,
    mounted: SystemTime,
    uid: u32,
    gid: u32,
    pub stats: Arc<Stats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The inode number of a key: a hash, so that `readdir` gives entries the numbers a
/// later lookup gives them (unless two collide, which a lookup resolves).
fn hashed(key: &Key) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() >> 1).max(2)
}

fn name_of(path: &[u8]) -> &[u8] {
    path.rsplit(|b| *b == b'/').next().unwrap_or(path)
}

fn join(dir: &[u8], name: &[u8]) -> Bytes {
    if dir.is_empty() {
        return Bytes::copy_from_slice(name);
    }
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    Bytes::from(p)
}

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn kind_of(t: i32) -> FileType {
    match NodeType::try_from(t) {
        Ok(NodeType::Dir) => FileType::Directory,
        Ok(NodeType::Symlink) => FileType::Symlink,
        Ok(NodeType::Fifo) => FileType::NamedPipe,
        _ => FileType::RegularFile,
    }
}

fn errno(e: &ClientError) -> Errno {
    match e {
        ClientError::NotFound(_) => Errno::ENOENT,
        ClientError::Auth(_) => Errno::EACCES,
        ClientError::Unreachable(_) => Errno::from_i32(libc::ENOTCONN),
        _ => Errno::EIO,
    }
}

/// The entries of directory `dir` of a snapshot (`""`: its top), or `None` when the
/// snapshot has no directory there. Starts at the nearest mark and jumps over the trees
/// of the subdirectories.
async fn list_dir(catalog: &Catalog, dir: &[u8]) -> Result<Option<Vec<Node>>, ClientError> {
    let mut out = Vec::new();
    let mut cursor = if dir.is_empty() {
        catalog.cursor()
    } else {
        let mut c = catalog.cursor_at(dir);
        loop {
            match c.next().await? {
                Some(n) if walk_order(&n.path, dir).is_lt() => continue,
                Some(n) if n.path.as_ref() == dir && n.r#type == NodeType::Dir as i32 => break,
                _ => return Ok(None),
            }
        }
        c
    };
    while let Some(n) = cursor.next().await? {
        if !is_within(&n.path, dir) {
            break;
        }
        if n.r#type == NodeType::Dir as i32 {
            cursor.skip_tree(&n.path);
        }
        out.push(n);
    }
    out.sort_by(|a, b| name_of(&a.path).cmp(name_of(&b.path)));
    Ok(Some(out))
}

impl MountFs {
    pub fn new(
        rt: tokio::runtime::Handle,
        api: Api,
        reader: Arc<Reader>,
        snapshots: Vec<v1::Snapshot>,
    ) -> MountFs {
        let mut inodes = HashMap::new();
        inodes.insert(
            1,
            Inode {
                key: None,
                what: What::Root,
                lookups: 1,
            },
        );
        MountFs {
            rt,
            api,
            reader,
            state: Mutex::new(State {
                tags: group(snapshots),
                refreshed: Instant::now(),
                inodes,
                by_key: HashMap::new(),
            }),
            catalogs: Mutex::new(HashMap::new()),
            listings: Mutex::new(Listings {
                lru: LruCache::unbounded(),
                entries: 0,
            }),
            mounted: SystemTime::now(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            stats: Arc::new(Stats::default()),
        }
    }

    /// Tags and snapshot counts.
    pub fn counts(&self) -> (usize, usize) {
        let s = lock(&self.state);
        (s.tags.len(), s.tags.values().map(|t| t.snaps.len()).sum())
    }

    /// Asks for the snapshot list again when the last answer is older than [`REFRESH`].
    fn refresh(&self) {
        if lock(&self.state).refreshed.elapsed() < REFRESH {
            return;
        }
        let mut api = self.api.clone();
        let r = self.rt.block_on(async move {
            api.list_snapshots(v1::ListSnapshotsRequest { tag: String::new() })
                .await
        });
        let mut s = lock(&self.state);
        s.refreshed = Instant::now();
        match r {
            Ok(r) => s.tags = group(r.into_inner().snapshots),
            Err(e) => tracing::warn!(error = %e, "cannot list snapshots; showing the last list"),
        }
    }

    /// The inode of `key` (made when new), counting a lookup when `lookup`.
    fn inode(&self, key: Key, what: What, lookup: bool) -> u64 {
        let mut s = lock(&self.state);
        let ino = match s.by_key.get(&key) {
            Some(i) => *i,
            None => {
                let mut ino = hashed(&key);
                while s.inodes.contains_key(&ino) {
                    ino = ino.wrapping_add(1).max(2);
                }
                s.by_key.insert(key.clone(), ino);
                s.inodes.insert(
                    ino,
                    Inode {
                        key: Some(key),
                        what,
                        lookups: 0,
                    },
                );
                ino
            }
        };
        if lookup && let Some(i) = s.inodes.get_mut(&ino) {
            i.lookups += 1;
        }
        ino
    }

    /// The number `readdir` reports for `key`: its inode's, or the one it will get.
    fn readdir_ino(&self, key: &Key) -> u64 {
        lock(&self.state)
            .by_key
            .get(key)
            .copied()
            .unwrap_or_else(|| hashed(key))
    }

    fn what(&self, ino: INodeNo) -> Option<What> {
        lock(&self.state).inodes.get(&ino.0).map(|i| i.what.clone())
    }

    fn catalog(&self, snap: &Snap) -> Result<Arc<Catalog>, ClientError> {
        let id = &snap.snapshot.id;
        if let Some(c) = lock(&self.catalogs).get(id) {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(self.rt.block_on(Catalog::open(&self.api, id))?);
        lock(&self.catalogs).insert(id.clone(), Arc::clone(&c));
        Ok(c)
    }

    fn listing(&self, snap: &Snap, dir: &Bytes) -> Result<Option<Listing>, ClientError> {
        let key = (snap.snapshot.id.clone(), dir.clone());
        if let Some(l) = lock(&self.listings).lru.get(&key) {
            return Ok(Some(Arc::clone(l)));
        }
        let catalog = self.catalog(snap)?;
        let Some(nodes) = self.rt.block_on(list_dir(&catalog, dir))? else {
            return Ok(None);
        };
        self.stats.dirs_listed.fetch_add(1, Ordering::Relaxed);
        let listing: Listing = Arc::new(nodes.into_iter().map(Arc::new).collect());
        let mut cache = lock(&self.listings);
        cache.entries += listing.len();
        if let Some(old) = cache.lru.put(key, Arc::clone(&listing)) {
            cache.entries -= old.len();
        }
        while cache.entries > LISTING_ENTRIES && cache.lru.len() > 1 {
            match cache.lru.pop_lru() {
                Some((_, old)) => cache.entries -= old.len(),
                None => break,
            }
        }
        Ok(Some(listing))
    }

    /// The node at `path` of a snapshot: from its directory's listing when cached, else
    /// sought in the catalog.
    fn find(&self, snap: &Snap, dir: &[u8], name: &[u8]) -> Result<Option<Node>, ClientError> {
        let key = (snap.snapshot.id.clone(), Bytes::copy_from_slice(dir));
        if let Some(l) = lock(&self.listings).lru.get(&key) {
            return Ok(l
                .binary_search_by(|n| name_of(&n.path).cmp(name))
                .ok()
                .and_then(|i| l.get(i))
                .map(|n| Node::clone(n)));
        }
        let catalog = self.catalog(snap)?;
        let path = join(dir, name);
        self.rt.block_on(catalog.find(&path))
    }

    fn dir_attr(&self, ino: u64, mtime: SystemTime, ttl_list: bool) -> (FileAttr, Duration) {
        let attr = FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        (attr, if ttl_list { LIST_TTL } else { SNAPSHOT_TTL })
    }

    fn node_attr(&self, ino: u64, n: &Node) -> FileAttr {
        let kind = kind_of(n.r#type);
        let size = match kind {
            FileType::Symlink => n.link_target.len() as u64,
            FileType::RegularFile => n.size,
            _ => 0,
        };
        let mtime = time_of(n.mtime_ns);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (n.mode & 0o7777) as u16,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            blksize: 128 * 1024,
            flags: 0,
        }
    }

    fn latest_of(&self, tag: &str) -> Option<Arc<Snap>> {
        lock(&self.state)
            .tags
            .get(tag)
            .and_then(|t| t.snaps.last().cloned())
    }

    fn attr(&self, ino: u64, what: &What) -> (FileAttr, Duration) {
        match what {
            What::Root => {
                let newest = lock(&self.state)
                    .tags
                    .values()
                    .filter_map(|t| t.snaps.last().map(|s| s.time))
                    .max()
                    .unwrap_or(self.mounted);
                self.dir_attr(ino, newest, true)
            }
            What::Tag(tag) => {
                let t = self.latest_of(tag).map_or(self.mounted, |s| s.time);
                self.dir_attr(ino, t, true)
            }
            What::Latest(tag) => {
                let (target, t) = self
                    .latest_of(tag)
                    .map_or((String::new(), self.mounted), |s| (s.dir.clone(), s.time));
                let (mut attr, ttl) = self.dir_attr(ino, t, true);
                attr.kind = FileType::Symlink;
                attr.perm = 0o777;
                attr.nlink = 1;
                attr.size = target.len() as u64;
                (attr, ttl)
            }
            What::Snapshot(snap) => match &snap.snapshot.root {
                Some(root) => {
                    let mut attr = self.node_attr(ino, root);
                    attr.kind = FileType::Directory;
                    attr.nlink = 2;
                    attr.size = 0;
                    (attr, SNAPSHOT_TTL)
                }
                None => self.dir_attr(ino, snap.time, false),
            },
            What::Entry(_, f) => (self.node_attr(ino, &f.node), SNAPSHOT_TTL),
        }
    }

    /// A snapshot's directory (its top, or a directory node in it) as (snapshot, path).
    fn as_dir(what: &What) -> Option<(Arc<Snap>, Bytes)> {
        match what {
            What::Snapshot(s) => Some((Arc::clone(s), Bytes::new())),
            What::Entry(s, f) if f.node.r#type == NodeType::Dir as i32 => {
                Some((Arc::clone(s), f.node.path.clone()))
            }
            _ => None,
        }
    }

    fn entry_what(snap: &Arc<Snap>, node: Node) -> (Key, What) {
        let key = Key::Entry(snap.snapshot.id.clone(), node.path.clone());
        let what = What::Entry(
            Arc::clone(snap),
            Arc::new(OpenFile {
                node: Arc::new(node),
                layout: Mutex::new(Layout::default()),
            }),
        );
        (key, what)
    }

    fn do_lookup(&self, parent: INodeNo, name: &[u8]) -> Result<(Key, What), Errno> {
        let parent = self.what(parent).ok_or(Errno::ENOENT)?;
        let name_str = std::str::from_utf8(name).map_err(|_| Errno::ENOENT);
        match &parent {
            What::Root => {
                self.refresh();
                let name = name_str?;
                if lock(&self.state).tags.contains_key(name) {
                    Ok((Key::Tag(name.into()), What::Tag(name.into())))
                } else {
                    Err(Errno::ENOENT)
                }
            }
            What::Tag(tag) => {
                self.refresh();
                let name = name_str?;
                if name == LATEST {
                    return match self.latest_of(tag) {
                        Some(_) => Ok((Key::Latest(tag.clone()), What::Latest(tag.clone()))),
                        None => Err(Errno::ENOENT),
                    };
                }
                let s = lock(&self.state);
                let snap = s
                    .tags
                    .get(tag)
                    .and_then(|t| t.snaps.iter().find(|s| s.dir == name))
                    .cloned()
                    .ok_or(Errno::ENOENT)?;
                Ok((
                    Key::Snapshot(snap.snapshot.id.clone()),
                    What::Snapshot(snap),
                ))
            }
            other => {
                let (snap, dir) = Self::as_dir(other).ok_or(Errno::ENOTDIR)?;
                match self.find(&snap, &dir, name) {
                    Ok(Some(node)) => Ok(Self::entry_what(&snap, node)),
                    Ok(None) => Err(Errno::ENOENT),
                    Err(e) => Err(self.failed("look up", name, &e)),
                }
            }
        }
    }

    fn failed(&self, what: &str, name: &[u8], e: &ClientError) -> Errno {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let n = errno(e);
        if n != Errno::ENOENT {
            tracing::warn!(error = %e, path = %String::from_utf8_lossy(name), "cannot {what}");
        }
        n
    }

    /// The entries of a directory inode from index `from` on: (ino, kind, name).
    fn entries(
        &self,
        what: &What,
        from: usize,
        mut add: impl FnMut(u64, FileType, &[u8]) -> bool,
    ) -> Result<(), Errno> {
        match what {
            What::Root => {
                self.refresh();
                let tags: Vec<String> = lock(&self.state).tags.keys().cloned().collect();
                for t in tags.iter().skip(from) {
                    let key = Key::Tag(t.clone());
                    if add(self.readdir_ino(&key), FileType::Directory, t.as_bytes()) {
                        break;
                    }
                }
            }
            What::Tag(tag) => {
                self.refresh();
                let snaps: Vec<Arc<Snap>> = lock(&self.state)
                    .tags
                    .get(tag)
                    .map(|t| t.snaps.clone())
                    .unwrap_or_default();
                let mut items: Vec<(Key, FileType, Vec<u8>)> = snaps
                    .iter()
                    .map(|s| {
                        (
                            Key::Snapshot(s.snapshot.id.clone()),
                            FileType::Directory,
                            s.dir.as_bytes().to_vec(),
                        )
                    })
                    .collect();
                if !snaps.is_empty() {
                    items.push((
                        Key::Latest(tag.clone()),
                        FileType::Symlink,
                        LATEST.as_bytes().to_vec(),
                    ));
                }
                for (key, kind, name) in items.iter().skip(from) {
                    if add(self.readdir_ino(key), *kind, name) {
                        break;
                    }
                }
            }
            other => {
                let (snap, dir) = Self::as_dir(other).ok_or(Errno::ENOTDIR)?;
                let listing = match self.listing(&snap, &dir) {
                    Ok(Some(l)) => l,
                    Ok(None) => return Err(Errno::ENOENT),
                    Err(e) => return Err(self.failed("list", &dir, &e)),
                };
                for n in listing.iter().skip(from) {
                    let key = Key::Entry(snap.snapshot.id.clone(), n.path.clone());
                    if add(self.readdir_ino(&key), kind_of(n.r#type), name_of(&n.path)) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

impl fuser::Filesystem for MountFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger reads ahead for sequential readers; the kernel caps it to what it allows.
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name.as_bytes()) {
            Ok((key, what)) => {
                let ino = self.inode(key, what.clone(), true);
                // The inode may be older than this lookup's answer: describe what it holds.
                let what = self.what(INodeNo(ino)).unwrap_or(what);
                let (attr, ttl) = self.attr(ino, &what);
                reply.entry(&ttl, &attr, Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut s = lock(&self.state);
        let Some(i) = s.inodes.get_mut(&ino.0) else {
            return;
        };
        i.lookups = i.lookups.saturating_sub(nlookup);
        // Entries of snapshots come and go; tags and snapshots are few and stay.
        if i.lookups == 0
            && matches!(i.what, What::Entry(..))
            && let Some(i) = s.inodes.remove(&ino.0)
            && let Some(k) = i.key
        {
            s.by_key.remove(&k);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.what(ino) {
            Some(what) => {
                let (attr, ttl) = self.attr(ino.0, &what);
                reply.attr(&ttl, &attr);
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.what(ino) {
            Some(What::Latest(tag)) => match self.latest_of(&tag) {
                Some(s) => reply.data(s.dir.as_bytes()),
                None => reply.error(Errno::ENOENT),
            },
            Some(What::Entry(_, f)) if f.node.r#type == NodeType::Symlink as i32 => {
                reply.data(&f.node.link_target)
            }
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        match self.what(ino) {
            Some(What::Entry(..)) => {
                // Snapshots do not change: the kernel may keep what it read.
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(What::Entry(_, f)) = self.what(ino) else {
            reply.error(Errno::EISDIR);
            return;
        };
        if f.node.r#type != NodeType::File as i32 {
            reply.error(Errno::EINVAL);
            return;
        }
        match self
            .rt
            .block_on(self.reader.read(&f.node, &f.layout, offset, size))
        {
            Ok(data) => {
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.data(&data);
            }
            Err(e) => reply.error(self.failed("read", &f.node.path, &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        match self.what(ino) {
            Some(What::Entry(_, f)) if f.node.r#type != NodeType::Dir as i32 => {
                reply.error(Errno::ENOTDIR)
            }
            Some(What::Latest(_)) => reply.error(Errno::ENOTDIR),
            // The tags and their snapshots change with new backups: listed anew.
            Some(What::Root | What::Tag(_)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(what) = self.what(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        // Offsets: 1 after ".", 2 after "..", 2 + i + 1 after entry i.
        let mut next = offset;
        if next == 0 {
            if reply.add(ino, 1, FileType::Directory, ".") {
                reply.ok();
                return;
            }
            next = 1;
        }
        if next == 1 {
            // The parent's number is not tracked; the kernel fills in the right one.
            if reply.add(INodeNo(1), 2, FileType::Directory, "..") {
                reply.ok();
                return;
            }
            next = 2;
        }
        let from = (next - 2) as usize;
        let mut index = from as u64;
        let r = self.entries(&what, from, |ino, kind, name| {
            index += 1;
            reply.add(INodeNo(ino), 2 + index, kind, OsStr::from_bytes(name))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        let (_, snapshots) = self.counts();
        reply.statfs(0, 0, 0, snapshots as u64, 0, 4096, 255, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, tag: &str, time: &str) -> v1::Snapshot {
        v1::Snapshot {
            id: id.into(),
            tag: tag.into(),
            time: time.into(),
            ..Default::default()
        }
    }

    #[test]
    fn snapshots_are_named_by_tag_and_time() {
        let tags = group(vec![
            snap("bbbbbbbbbbbbbbbb", "db", "2026-01-02T03:04:05.9Z"),
            snap("aaaaaaaaaaaaaaaa", "db", "2026-01-02T03:04:05.1Z"),
            snap("cccccccccccccccc", "a/b", "2026-01-01T00:00:00Z"),
            snap("dddddddddddddddd", "..", "not a time"),
        ]);
        let names: Vec<&str> = tags.keys().map(String::as_str).collect();
        assert_eq!(names, ["%2E%2E", "a%2Fb", "db"]);
        let db: Vec<&str> = tags["db"].snaps.iter().map(|s| s.dir.as_str()).collect();
        assert_eq!(
            db,
            ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05Z-bbbbbbbbbbbb"]
        );
        assert_eq!(tags["%2E%2E"].snaps[0].dir, "dddddddddddddddd");
    }

    #[test]
    fn paths_and_names() {
        assert_eq!(name_of(b"a/b/c"), b"c");
        assert_eq!(name_of(b"c"), b"c");
        assert_eq!(join(b"", b"x"), Bytes::from_static(b"x"));
        assert_eq!(join(b"a/b", b"x"), Bytes::from_static(b"a/b/x"));
        assert_eq!(
            time_of(-1_500_000_000),
            UNIX_EPOCH - Duration::from_millis(1500)
        );
    }
}
