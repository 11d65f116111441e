//! The local on-disk index: every chunk's location, in a redb file under the index cache
//! directory, built from the bucket's `index/` objects (which stay the source of truth).
//!
//! **Why redb** (rather than fjall): lookups dominate (FindMissing, restores), and redb's
//! B-tree answers random reads several times faster than an LSM tree and needs no
//! background compaction threads; one file, no journal directory. Every write is a
//! transaction that records the `index/` objects it holds together with their entries, so
//! the file always says exactly which objects it reflects, even after a crash.
//! Entries are inserted in sorted batches, which keeps bulk loading fast enough.
//!
//! A rebuild does not insert its entries into the B-tree: it writes them, merged in id
//! order, to a sorted immutable file beside it ([`super::base`]), one sequential pass
//! (100 million inserts took 190 s; the sequential write takes a fraction of that). The
//! `chunks` table then holds only what was added since (the delta): a lookup asks the
//! delta first, then the base file.
//!
//! Tables: `chunks` (id → pack number, offset, length, raw length, tenant number),
//! `pack_names` / `pack_nos` (pack number ↔ name), `tenants` (number → name), `files`
//! (the `index/` objects loaded) and `meta` (format version, repository id, the base
//! file's stamp, and how many base entries the delta shadows: a file of another
//! repository or format, or whose base file is missing or not its own, is rebuilt).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

use datamover_core::chunk::ChunkId;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redb::{ReadOnlyTable, TableDefinition};

use super::base::{BaseFile, BaseWriter};
use super::filter::{self, MemFilter};
use super::runs::Runs;
use super::{FlatFile, Loc};

const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const PACK_NAMES: TableDefinition<u32, &str> = TableDefinition::new("pack_names");
const PACK_NOS: TableDefinition<&str, u32> = TableDefinition::new("pack_nos");
const TENANTS: TableDefinition<u32, &str> = TableDefinition::new("tenants");
const FILES: TableDefinition<&str, u64> = TableDefinition::new("files");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Bumped whenever the tables change meaning: an older file is rebuilt.
const FORMAT: &str = "2";
/// The page cache redb keeps in memory (part of the server's resident memory).
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Bytes of one stored location.
const LOC_BYTES: usize = 20;

/// Errors of the local index cache. The cache can always be rebuilt from the bucket.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "the local index cache {path} cannot be used ({detail}): check that the directory \
         is writable and has free space (DATAMOVER_INDEX_CACHE chooses it); deleting it is \
         safe, it is rebuilt from the bucket"
    )]
    Cache { path: String, detail: String },
}

/// The on-disk index of one repository.
pub(crate) struct DiskIndex {
    db: Database,
    path: PathBuf,
    /// A private file (another process holds the shared one): removed when dropped.
    private: bool,
    /// Tenant names by number (few; also on disk).
    tenants: RwLock<Vec<String>>,
    /// The entries a rebuild wrote (set once: at open, or by the rebuild's merge).
    base: OnceLock<BaseFile>,
}

impl Drop for DiskIndex {
    fn drop(&mut self) {
        if self.private {
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_file(base_path(&self.path));
        }
    }
}

/// Where the base file of the redb file at `path` is.
fn base_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".base");
    path.with_file_name(name)
}

/// Removes a file that may not exist.
fn remove_if_there(path: &Path) -> Result<(), DiskError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(fail(path, e)),
        _ => Ok(()),
    }
}

fn fail(path: &Path, detail: impl ToString) -> DiskError {
    DiskError::Cache {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

fn encode(l: &Loc) -> [u8; LOC_BYTES] {
    let mut b = [0u8; LOC_BYTES];
    for (i, v) in [l.pack, l.offset, l.length, l.raw_length, l.tenant]
        .into_iter()
        .enumerate()
    {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn decode(b: &[u8]) -> Option<Loc> {
    if b.len() != LOC_BYTES {
        return None;
    }
    let at = |i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            b.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    Some(Loc {
        pack: at(0)?,
        offset: at(1)?,
        length: at(2)?,
        raw_length: at(3)?,
        tenant: at(4)?,
    })
}

/// A chunk read from the `index/` objects, before it gets its numbers.
struct NewEntry {
    id: ChunkId,
    pack: u32,
    loc: Loc,
}

impl DiskIndex {
    /// Opens (or creates) the index of repository `repo_id` in `dir`. A file that does
    /// not open, or belongs to another repository or format, is deleted and started
    /// afresh (it is then rebuilt from the bucket); if another process holds it, a
    /// private file beside it is used instead.
    pub fn open(dir: &Path, repo_id: &str) -> Result<DiskIndex, DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
        clean_stale(dir, repo_id);
        let path = dir.join(format!("index-{repo_id}.redb"));
        match Self::open_file(&path, repo_id, false) {
            Ok(d) => Ok(d),
            Err(Opened::Busy) => {
                let private = dir.join(format!(
                    "index-{repo_id}.{}-{:08x}.redb",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                tracing::info!(shared = %path.display(), private = %private.display(), "the local index cache is in use by another server: using a private one");
                Self::open_file(&private, repo_id, true).map_err(|e| e.into_error(&private))
            }
            Err(Opened::Unusable(why)) => {
                tracing::warn!(path = %path.display(), %why, "local index cache unusable: rebuilding it from the bucket");
                remove_if_there(&path)?;
                remove_if_there(&base_path(&path))?;
                Self::open_file(&path, repo_id, false).map_err(|e| e.into_error(&path))
            }
        }
    }

    /// A new, empty index in a file of its own beside `path`'s (a rebuild), to be
    /// [`DiskIndex::adopt`]ed over it once complete.
    pub fn fresh(dir: &Path, repo_id: &str) -> Result<DiskIndex, DiskError> {
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
        let path = dir.join(format!(
            "index-{repo_id}.build-{}-{:08x}.redb",
            std::process::id(),
            rand::random::<u32>()
        ));
        Self::open_file(&path, repo_id, true).map_err(|e| e.into_error(&path))
    }

    /// Moves a complete rebuild (from [`DiskIndex::fresh`]) over `old`'s file, unless
    /// `old` is a private file (then the rebuild stays private too).
    pub fn adopt(mut self, old: &DiskIndex) -> DiskIndex {
        if !old.private && std::fs::rename(&self.path, &old.path).is_ok() {
            let base = base_path(&self.path);
            if base.exists()
                && let Err(e) = std::fs::rename(&base, base_path(&old.path))
            {
                // The file in use stays open; the next start finds no base file of
                // this stamp and rebuilds.
                tracing::warn!(path = %base.display(), error = %e, "could not move the rebuilt index's base file: the next start rebuilds the local index");
            }
            self.path = old.path.clone();
            self.private = false;
        }
        self
    }

    fn open_file(path: &Path, repo_id: &str, private: bool) -> Result<DiskIndex, Opened> {
        let db = match Database::builder().set_cache_size(CACHE_BYTES).create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(Opened::Busy),
            // Unreadable, torn, not a database: started afresh (and if the directory is
            // the problem, that attempt says so).
            Err(e) => return Err(Opened::Unusable(e.to_string())),
        };
        let d = DiskIndex {
            db,
            path: path.to_path_buf(),
            private,
            tenants: RwLock::new(Vec::new()),
            base: OnceLock::new(),
        };
        d.init(repo_id).map_err(Opened::Unusable)?;
        Ok(d)
    }

    /// Creates the tables of an empty file, checks the format and repository of an
    /// existing one, and loads the tenant names.
    fn init(&self, repo_id: &str) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            let format = meta
                .get("format")
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_string());
            let repo = meta
                .get("repository")
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_string());
            match (format.as_deref(), repo.as_deref()) {
                (None, None) => {
                    meta.insert("format", FORMAT).map_err(|e| e.to_string())?;
                    meta.insert("repository", repo_id)
                        .map_err(|e| e.to_string())?;
                }
                (Some(FORMAT), Some(r)) if r == repo_id => {
                    let stamp = meta
                        .get("base_stamp")
                        .map_err(|e| e.to_string())?
                        .map(|v| v.value().to_string());
                    if let Some(stamp) = stamp {
                        let stamp: u64 = stamp.parse().map_err(|_| "a torn base stamp")?;
                        let base = BaseFile::open(&base_path(&self.path), stamp)?;
                        let _ = self.base.set(base);
                    }
                }
                (f, r) => {
                    return Err(format!(
                        "written for repository {r:?} in format {f:?}, not {repo_id} in format {FORMAT}"
                    ));
                }
            }
            txn.open_table(CHUNKS).map_err(|e| e.to_string())?;
            txn.open_table(PACK_NAMES).map_err(|e| e.to_string())?;
            txn.open_table(PACK_NOS).map_err(|e| e.to_string())?;
            txn.open_table(FILES).map_err(|e| e.to_string())?;
            let tenants = txn.open_table(TENANTS).map_err(|e| e.to_string())?;
            let mut names = Vec::new();
            for row in tenants.iter().map_err(|e| e.to_string())? {
                let (k, v) = row.map_err(|e| e.to_string())?;
                if k.value() as usize != names.len() {
                    return Err("tenant numbers are not contiguous".into());
                }
                names.push(v.value().to_string());
            }
            *self.tenants.write().map_err(|_| "a lock was poisoned")? = names;
        }
        txn.commit().map_err(|e| e.to_string())
    }

    fn err(&self, e: impl ToString) -> DiskError {
        fail(&self.path, e.to_string())
    }

    /// The `index/` objects this file holds.
    pub fn loaded_names(&self) -> Result<HashSet<String>, DiskError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let files = txn.open_table(FILES).map_err(|e| self.err(e))?;
        let mut out = HashSet::new();
        for row in files.iter().map_err(|e| self.err(e))? {
            let (k, _) = row.map_err(|e| self.err(e))?;
            out.insert(k.value().to_string());
        }
        Ok(out)
    }

    /// Chunks held.
    pub fn len(&self) -> Result<u64, DiskError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let shadowed = read_count(&meta, "shadowed").map_err(|e| self.err(e))?;
        let base = self.base.get().map_or(0, BaseFile::count);
        Ok((t.len().map_err(|e| self.err(e))? + base).saturating_sub(shadowed))
    }

    /// A read view for many lookups.
    pub fn reader(&self) -> Result<Reader<'_>, DiskError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let chunks = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
        let pack_names = txn.open_table(PACK_NAMES).map_err(|e| self.err(e))?;
        let pack_nos = txn.open_table(PACK_NOS).map_err(|e| self.err(e))?;
        Ok(Reader {
            disk: self,
            chunks,
            pack_names,
            pack_nos,
        })
    }

    pub fn tenant_is(&self, no: u32, tenant: &str) -> bool {
        self.tenants
            .read()
            .ok()
            .is_some_and(|t| t.get(no as usize).map(String::as_str) == Some(tenant))
    }

    pub fn tenant_name(&self, no: u32) -> Option<String> {
        self.tenants.read().ok()?.get(no as usize).cloned()
    }

    /// The filter keys of the chunks whose id begins with byte `p` (not sorted).
    pub fn partition_keys(&self, p: u8) -> Result<Vec<u64>, DiskError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
        let lo = [p];
        let mut out = Vec::new();
        let rows = if p == u8::MAX {
            t.range(&lo[..]..)
        } else {
            let hi = [p + 1];
            t.range(&lo[..]..&hi[..])
        }
        .map_err(|e| self.err(e))?;
        for row in rows {
            let (k, _) = row.map_err(|e| self.err(e))?;
            let k = k.value();
            if let Some(b) = k.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                out.push(u64::from_be_bytes(b));
            }
        }
        // (an id in both, a condemned base copy replaced, is deduplicated by the filter)
        if let Some(base) = self.base.get() {
            base.scan_first_byte(p, |id| out.push(filter::key(&ChunkId(*id))))?;
        }
        Ok(out)
    }

    /// Adds the entries of `files` (named `index/` objects not loaded yet; others are
    /// skipped) in one transaction. A chunk already held keeps its copy unless that copy
    /// is condemned (`condemned`: chunk → pack of the condemned copy). Returns the ids
    /// added (not those only moved to another copy). The commit is on disk when this
    /// returns.
    #[cfg(test)]
    pub fn ingest(
        &self,
        files: &[(String, super::IndexFile)],
        condemned: &HashMap<ChunkId, String>,
    ) -> Result<Vec<ChunkId>, DiskError> {
        let flat: Vec<(String, FlatFile)> = files
            .iter()
            .map(|(n, f)| (n.clone(), FlatFile::from_index(f)))
            .collect();
        self.ingest_to(&flat, condemned, None)
    }

    /// [`DiskIndex::ingest`], or with `runs`, the entries go to sorted runs instead of
    /// the tree (a rebuild; [`DiskIndex::merge_runs`] then writes them, and only its
    /// commit is synced to disk).
    pub fn ingest_to(
        &self,
        files: &[(String, FlatFile)],
        condemned: &HashMap<ChunkId, String>,
        mut runs: Option<&mut Runs>,
    ) -> Result<Vec<ChunkId>, DiskError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        // A rebuild's file is used only once its merge commits (durably); until then a
        // crash leaves a file that is removed at the next start, so its batches need no
        // sync of their own.
        let durability = match &runs {
            Some(_) => Durability::None,
            None => Durability::Immediate,
        };
        txn.set_durability(durability).map_err(|e| self.err(e))?;
        let mut added = Vec::new();
        {
            let mut loaded = txn.open_table(FILES).map_err(|e| self.err(e))?;
            let mut chunks = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
            let mut pack_names = txn.open_table(PACK_NAMES).map_err(|e| self.err(e))?;
            let mut pack_nos = txn.open_table(PACK_NOS).map_err(|e| self.err(e))?;
            let mut tenant_table = txn.open_table(TENANTS).map_err(|e| self.err(e))?;
            let mut tenants = self
                .tenants
                .write()
                .map_err(|_| self.err("a lock was poisoned"))?;
            let mut tenant_nos: HashMap<String, u32> = tenants
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u32))
                .collect();
            let mut next_pack = pack_names.len().map_err(|e| self.err(e))? as u32;
            let mut entries: Vec<NewEntry> = Vec::new();
            for (name, file) in files {
                if loaded
                    .get(name.as_str())
                    .map_err(|e| self.err(e))?
                    .is_some()
                {
                    continue;
                }
                // The object's tenants by number, as this file numbers them.
                let mut file_tenants = Vec::with_capacity(file.tenants.len());
                for t in &file.tenants {
                    let no = match tenant_nos.get(t) {
                        Some(no) => *no,
                        None => {
                            let no = tenants.len() as u32;
                            tenant_table
                                .insert(no, t.as_str())
                                .map_err(|e| self.err(e))?;
                            tenants.push(t.clone());
                            tenant_nos.insert(t.clone(), no);
                            no
                        }
                    };
                    file_tenants.push(no);
                }
                let mut count = 0u64;
                for p in &file.packs {
                    let known = pack_nos
                        .get(p.name.as_str())
                        .map_err(|e| self.err(e))?
                        .map(|v| v.value());
                    let pack = match known {
                        Some(n) => n,
                        None => {
                            let n = next_pack;
                            next_pack += 1;
                            pack_nos
                                .insert(p.name.as_str(), n)
                                .map_err(|e| self.err(e))?;
                            pack_names
                                .insert(n, p.name.as_str())
                                .map_err(|e| self.err(e))?;
                            n
                        }
                    };
                    for b in &p.blobs {
                        let Some(&tenant) = file_tenants.get(b.tenant as usize) else {
                            continue;
                        };
                        let loc = Loc {
                            pack,
                            offset: b.offset,
                            length: b.length,
                            raw_length: b.raw_length,
                            tenant,
                        };
                        match runs.as_deref_mut() {
                            Some(r) => r.push(&b.id, encode(&loc))?,
                            None => entries.push(NewEntry {
                                id: b.id,
                                pack,
                                loc,
                            }),
                        }
                        count += 1;
                    }
                }
                loaded
                    .insert(name.as_str(), count)
                    .map_err(|e| self.err(e))?;
            }
            // Sorted, the inserts walk the tree once, in order (stable: within one id,
            // the order of the objects stays, so the first copy is the one kept). (A
            // rebuild's entries went to the runs, in the same order.)
            entries.sort_by_key(|e| e.id);
            let base = self.base.get();
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let shadowed_before = read_count(&meta, "shadowed").map_err(|e| self.err(e))?;
            let mut shadowed = shadowed_before;
            for e in &entries {
                let in_delta = chunks
                    .get(&e.id.0[..])
                    .map_err(|x| self.err(x))?
                    .map(|v| v.value().to_vec());
                // `in_base`: the copy held is the base file's (a new one shadows it).
                let (old, in_base) = match (in_delta, base) {
                    (Some(o), _) => (Some(o), false),
                    (None, Some(b)) => {
                        let o = b.get(&e.id.0)?.map(|l| l.to_vec());
                        let found = o.is_some();
                        (o, found)
                    }
                    (None, None) => (None, false),
                };
                let replace = match old.as_deref().map(decode) {
                    None => {
                        added.push(e.id);
                        true
                    }
                    // unreadable: the new copy replaces it
                    Some(None) => true,
                    Some(Some(old_loc)) if old_loc.pack == e.pack => false,
                    // A live copy wins over a condemned one; otherwise the first copy
                    // stays.
                    Some(Some(old_loc)) => match condemned.get(&e.id) {
                        Some(cp) => pack_names
                            .get(old_loc.pack)
                            .map_err(|x| self.err(x))?
                            .is_some_and(|n| n.value() == cp.as_str()),
                        None => false,
                    },
                };
                if replace {
                    chunks
                        .insert(&e.id.0[..], &encode(&e.loc)[..])
                        .map_err(|x| self.err(x))?;
                    if in_base {
                        shadowed += 1;
                    }
                }
            }
            if shadowed != shadowed_before {
                meta.insert("shadowed", shadowed.to_string().as_str())
                    .map_err(|x| self.err(x))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(added)
    }

    /// Writes the entries of a rebuild's runs, in id order, to this (fresh) index's base
    /// file: of several copies of a chunk the first stays, unless it is condemned and
    /// another is not. Returns the filter of what it wrote, built on the way (one
    /// partition's keys in memory at a time). The base file is on disk, and named by the
    /// redb file, when this returns.
    pub fn merge_runs(
        &self,
        runs: Runs,
        condemned: &HashMap<ChunkId, String>,
    ) -> Result<MemFilter, DiskError> {
        if self.base.get().is_some() {
            return Err(self.err("a rebuild's merge ran twice"));
        }
        let stamp = rand::random::<u64>();
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.err(e))?;
        // The filter's partitions are built on a second thread as the merge completes
        // them (a partition's keys at a time in memory, one more waiting).
        let (base, filter) = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(u8, Vec<u64>)>(1);
            let builder = scope.spawn(move || {
                let mut filter = MemFilter::default();
                for (p, keys) in rx {
                    filter.set_partition(p, keys);
                }
                filter
            });
            let base = self.write_base(&txn, runs, condemned, stamp, tx);
            let filter = builder
                .join()
                .map_err(|_| self.err("building the filter failed"))?;
            Ok::<_, DiskError>((base?, filter))
        })?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("base_stamp", stamp.to_string().as_str())
                .map_err(|e| self.err(e))?;
            meta.insert("shadowed", "0").map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        let _ = self.base.set(base);
        Ok(filter)
    }

    /// [`DiskIndex::merge_runs`]'s merge: writes the base file, sends each partition's
    /// filter keys to `keys` once complete.
    fn write_base(
        &self,
        txn: &redb::WriteTransaction,
        runs: Runs,
        condemned: &HashMap<ChunkId, String>,
        stamp: u64,
        keys: std::sync::mpsc::SyncSender<(u8, Vec<u64>)>,
    ) -> Result<BaseFile, DiskError> {
        let mut out = BaseWriter::create(&base_path(&self.path), stamp)?;
        let pack_names = txn.open_table(PACK_NAMES).map_err(|e| self.err(e))?;
        let condemned_at = |id: &[u8; 32], loc: &[u8; 20]| -> Result<bool, DiskError> {
            let Some(cp) = condemned.get(&ChunkId(*id)) else {
                return Ok(false);
            };
            let Some(l) = decode(loc) else {
                return Ok(true);
            };
            Ok(pack_names
                .get(l.pack)
                .map_err(|e| self.err(e))?
                .is_some_and(|n| n.value() == cp.as_str()))
        };
        // The keys of the partition being written.
        let mut part: (u8, Vec<u64>) = (0, Vec::new());
        let send = |part: &mut (u8, Vec<u64>)| {
            keys.send((part.0, std::mem::take(&mut part.1)))
                .map_err(|_| self.err("building the filter failed"))
        };
        // The copy chosen so far for the id being merged.
        let mut current: Option<([u8; 32], [u8; 20])> = None;
        let mut put = |c: &([u8; 32], [u8; 20])| -> Result<(), DiskError> {
            out.push(&c.0, &c.1)?;
            let id = ChunkId(c.0);
            let p = filter::partition(&id);
            if p != part.0 {
                send(&mut part)?;
                part.0 = p;
            }
            part.1.push(filter::key(&id));
            Ok(())
        };
        runs.merge(|e| {
            match &current {
                Some((id, loc)) if *id == e.id => {
                    if condemned_at(id, loc)? && !condemned_at(&e.id, &e.loc)? {
                        current = Some((e.id, e.loc));
                    }
                }
                _ => {
                    if let Some(c) = current.take() {
                        put(&c)?;
                    }
                    current = Some((e.id, e.loc));
                }
            }
            Ok(())
        })?;
        if let Some(c) = current.take() {
            put(&c)?;
        }
        send(&mut part)?;
        out.finish()
    }

    /// Where a rebuild's runs go (beside the file).
    pub fn runs_dir(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".runs");
        self.path.with_file_name(name)
    }

    /// An index in memory (for the fuzz harnesses).
    #[cfg(test)]
    pub fn in_memory() -> DiskIndex {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory database");
        let d = DiskIndex {
            db,
            path: PathBuf::from("(memory)"),
            private: false,
            tenants: RwLock::new(Vec::new()),
            base: OnceLock::new(),
        };
        d.init("memory").expect("tables");
        d
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A count kept in the `meta` table (0 when absent).
fn read_count(
    meta: &impl ReadableTable<&'static str, &'static str>,
    key: &str,
) -> Result<u64, String> {
    match meta.get(key).map_err(|e| e.to_string())? {
        Some(v) => v
            .value()
            .parse()
            .map_err(|_| format!("meta {key} is not a number")),
        None => Ok(0),
    }
}

/// The names of maintenance's and verify's working directories in the index cache
/// directory begin with this (then the process id).
pub(crate) const WORK_PREFIX: &str = "maintenance-";

/// Removes what a process that died left in the index cache directory: rebuilds of this
/// repository's file (`index-<id>.build-<pid>-<n>.redb` and its `.runs`) and working
/// directories of maintenance (`maintenance-<pid>-<n>.runs`) whose process is gone, or is
/// this one (nothing of this process runs yet when its index opens; in a container every
/// incarnation may have the same pid). At most [`MAX_STALE`] entries looked at.
pub(crate) fn clean_stale(dir: &Path, repo_id: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let build = format!("index-{repo_id}.build-");
    let me = std::process::id();
    for e in entries.take(MAX_STALE).flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let rest = match name.strip_prefix(&build) {
            Some(r)
                if r.ends_with(".redb")
                    || r.ends_with(".redb.runs")
                    || r.ends_with(".redb.base") =>
            {
                r
            }
            _ => match name.strip_prefix(WORK_PREFIX) {
                Some(r) if r.ends_with(".runs") => r,
                _ => continue,
            },
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if !pid.is_some_and(|p| p == me || !Path::new(&format!("/proc/{p}")).exists()) {
            continue;
        }
        let path = e.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed what an interrupted rebuild or maintenance left in the index cache")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a leftover of an interrupted rebuild or maintenance: remove it by hand")
            }
        }
    }
}

/// Entries of the index cache directory looked at for leftovers at one start.
const MAX_STALE: usize = 10_000;

enum Opened {
    Busy,
    Unusable(String),
}

impl Opened {
    fn into_error(self, path: &Path) -> DiskError {
        match self {
            Opened::Busy => fail(path, "the file is in use by another process"),
            Opened::Unusable(why) => fail(path, why),
        }
    }
}

/// A consistent read view of the on-disk index.
pub(crate) struct Reader<'a> {
    disk: &'a DiskIndex,
    chunks: ReadOnlyTable<&'static [u8], &'static [u8]>,
    pack_names: ReadOnlyTable<u32, &'static str>,
    pack_nos: ReadOnlyTable<&'static str, u32>,
}

impl Reader<'_> {
    /// The delta first (it holds what replaced a condemned base copy), then the base.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Loc>, DiskError> {
        let v = self.chunks.get(&id.0[..]).map_err(|e| self.disk.err(e))?;
        if let Some(v) = v {
            return Ok(decode(v.value()));
        }
        match self.disk.base.get() {
            Some(b) => Ok(b.get(&id.0)?.and_then(|l| decode(&l))),
            None => Ok(None),
        }
    }

    pub fn pack_name(&self, no: u32) -> Result<Option<String>, DiskError> {
        let v = self.pack_names.get(no).map_err(|e| self.disk.err(e))?;
        Ok(v.map(|v| v.value().to_string()))
    }

    pub fn pack_no(&self, name: &str) -> Result<Option<u32>, DiskError> {
        let v = self.pack_nos.get(name).map_err(|e| self.disk.err(e))?;
        Ok(v.map(|v| v.value()))
    }

    pub fn has_pack(&self, name: &str) -> Result<bool, DiskError> {
        Ok(self
            .pack_nos
            .get(name)
            .map_err(|e| self.disk.err(e))?
            .is_some())
    }
}
