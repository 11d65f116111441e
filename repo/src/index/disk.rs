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
//! Tables: `chunks` (id → pack number, offset, length, raw length, tenant number),
//! `pack_names` / `pack_nos` (pack number ↔ name), `tenants` (number → name), `files`
//! (the `index/` objects loaded) and `meta` (format version and repository id: a file of
//! another repository or format is rebuilt).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use datamover_core::chunk::ChunkId;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redb::{ReadOnlyTable, TableDefinition};

use super::runs::Runs;
use super::{IndexFile, Loc};

const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const PACK_NAMES: TableDefinition<u32, &str> = TableDefinition::new("pack_names");
const PACK_NOS: TableDefinition<&str, u32> = TableDefinition::new("pack_nos");
const TENANTS: TableDefinition<u32, &str> = TableDefinition::new("tenants");
const FILES: TableDefinition<&str, u64> = TableDefinition::new("files");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Bumped whenever the tables change meaning: an older file is rebuilt.
const FORMAT: &str = "1";
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
}

impl Drop for DiskIndex {
    fn drop(&mut self) {
        if self.private {
            let _ = std::fs::remove_file(&self.path);
        }
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
                std::fs::remove_file(&path).map_err(|e| fail(&path, e))?;
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
                (Some(FORMAT), Some(r)) if r == repo_id => {}
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
        t.len().map_err(|e| self.err(e))
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

    /// The filter keys of the chunks whose id begins with byte `p`, in order.
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
        files: &[(String, IndexFile)],
        condemned: &HashMap<ChunkId, String>,
    ) -> Result<Vec<ChunkId>, DiskError> {
        self.ingest_to(files, condemned, None)
    }

    /// [`DiskIndex::ingest`], or with `runs`, the entries go to sorted runs instead of
    /// the tree (a rebuild; [`DiskIndex::merge_runs`] then writes them).
    pub fn ingest_to(
        &self,
        files: &[(String, IndexFile)],
        condemned: &HashMap<ChunkId, String>,
        runs: Option<&mut Runs>,
    ) -> Result<Vec<ChunkId>, DiskError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.err(e))?;
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
                        let Ok(id) = ChunkId::from_slice(&b.id) else {
                            continue;
                        };
                        let tenant = match tenant_nos.get(&b.tenant) {
                            Some(t) => *t,
                            None => {
                                let t = tenants.len() as u32;
                                tenant_table
                                    .insert(t, b.tenant.as_str())
                                    .map_err(|e| self.err(e))?;
                                tenants.push(b.tenant.clone());
                                tenant_nos.insert(b.tenant.clone(), t);
                                t
                            }
                        };
                        entries.push(NewEntry {
                            id,
                            pack,
                            loc: Loc {
                                pack,
                                offset: b.offset,
                                length: b.length,
                                raw_length: b.raw_length,
                                tenant,
                            },
                        });
                        count += 1;
                    }
                }
                loaded
                    .insert(name.as_str(), count)
                    .map_err(|e| self.err(e))?;
            }
            // Sorted, the inserts walk the tree once, in order (stable: within one id,
            // the order of the objects stays, so the first copy is the one kept).
            if let Some(runs) = runs {
                for e in &entries {
                    runs.push(&e.id, encode(&e.loc))?;
                }
                entries = Vec::new();
            }
            entries.sort_by_key(|e| e.id);
            for e in &entries {
                let old = chunks
                    .insert(&e.id.0[..], &encode(&e.loc)[..])
                    .map_err(|x| self.err(x))?
                    .map(|v| v.value().to_vec());
                let Some(old) = old else {
                    added.push(e.id);
                    continue;
                };
                let Some(old_loc) = decode(&old) else {
                    continue; // unreadable: the new copy replaces it
                };
                if old_loc.pack == e.pack {
                    continue;
                }
                // A live copy wins over a condemned one; otherwise the first copy stays.
                let old_condemned = match condemned.get(&e.id) {
                    Some(cp) => pack_names
                        .get(old_loc.pack)
                        .map_err(|x| self.err(x))?
                        .is_some_and(|n| n.value() == cp.as_str()),
                    None => false,
                };
                if !old_condemned {
                    chunks
                        .insert(&e.id.0[..], &old[..])
                        .map_err(|x| self.err(x))?;
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(added)
    }

    /// Writes the entries of a rebuild's runs into the tree, in id order: of several
    /// copies of a chunk the first stays, unless it is condemned and another is not.
    pub fn merge_runs(
        &self,
        runs: Runs,
        condemned: &HashMap<ChunkId, String>,
    ) -> Result<(), DiskError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.err(e))?;
        {
            let mut chunks = txn.open_table(CHUNKS).map_err(|e| self.err(e))?;
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
            // The copy chosen so far for the id being merged.
            let mut current: Option<([u8; 32], [u8; 20])> = None;
            let mut put = |c: &([u8; 32], [u8; 20])| -> Result<(), DiskError> {
                chunks.insert(&c.0[..], &c.1[..]).map_err(|e| self.err(e))?;
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
        }
        txn.commit().map_err(|e| self.err(e))
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
        };
        d.init("memory").expect("tables");
        d
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
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
            Some(r) if r.ends_with(".redb") || r.ends_with(".redb.runs") => r,
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
    pub fn get(&self, id: &ChunkId) -> Result<Option<Loc>, DiskError> {
        let v = self.chunks.get(&id.0[..]).map_err(|e| self.disk.err(e))?;
        Ok(v.and_then(|v| decode(v.value())))
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
