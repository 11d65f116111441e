//! The chunk index: where every stored chunk is, without holding every chunk in memory.
//!
//! The bucket's `index/` objects are the source of truth. A server keeps
//!
//! - in memory, a compact membership filter ([`filter`]: a binary fuse filter per
//!   partition, about 1.1 bytes a chunk, plus a small delta of recent additions), the
//!   chunks of its own packs not yet listed by an `index/` object, the chunks reserved by
//!   running backups, and the condemned copies;
//! - on local disk, every chunk's location, built from the `index/` objects: a sorted
//!   immutable [`base`] file that a rebuild writes in one sequential pass, and a redb
//!   file ([`disk`]) with the packs, the tenants, the objects loaded and the chunks added
//!   since the rebuild (the delta), in the index cache directory
//!   (`DATAMOVER_INDEX_CACHE` for the server). A refresh reads only the objects the file
//!   does not hold yet, into the delta ([`flat`] decodes them without an allocation per
//!   entry). When an object it holds is gone (maintenance compacted `index/`), both
//!   files are rebuilt beside the old ones and swapped in, so readers never see a
//!   partial index. A file that does not open, belongs to another repository or lost its
//!   base file is rebuilt.
//!
//! A lookup asks the filter first: an absent chunk (half of what FindMissing sees) costs
//! no disk read; a present one costs a lookup in the (small) delta and one block read of
//! the base file, in the operating system's page cache once warm. Chunk ids are keyed
//! per tenant and every entry records its tenant: a chunk of another tenant is absent.

mod base;
mod disk;
mod filter;
mod flat;
mod runs;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use datamover_core::chunk::ChunkId;

pub(crate) use disk::{DiskError, DiskIndex, WORK_PREFIX};
pub(crate) use filter::MemFilter;
pub(crate) use flat::FlatFile;
pub(crate) use runs::{Merged, Record, Runs, Sorted};

/// One chunk inside a pack (also the pack trailer's and index files' entry).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct BlobEntry {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub offset: u32,
    #[prost(uint32, tag = "3")]
    pub length: u32,
    #[prost(uint32, tag = "4")]
    pub raw_length: u32,
    #[prost(string, tag = "5")]
    pub tenant: String,
}

/// The chunks of one pack.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PackEntries {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub blobs: Vec<BlobEntry>,
    /// When the pack was written (Unix seconds; 0 if unknown).
    #[prost(uint64, tag = "3")]
    pub created_unix: u64,
}

/// An `index/<id>` object: the contents of some packs.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct IndexFile {
    #[prost(message, repeated, tag = "1")]
    pub packs: Vec<PackEntries>,
}

/// A chunk's place in the on-disk index (pack and tenant by number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub pack: u32,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    pub tenant: u32,
}

/// A chunk of one of this server's packs that no `index/` object lists yet.
#[derive(Clone, Debug)]
struct OwnLoc {
    pack: Arc<str>,
    offset: u32,
    length: u32,
    raw_length: u32,
    tenant: Arc<str>,
}

/// Where a chunk is.
pub(crate) struct Found {
    pub pack: String,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

/// A chunk's stored copy, wherever it is known.
struct Copy {
    pack: String,
    offset: u32,
    length: u32,
    raw_length: u32,
    tenant: String,
}

impl Copy {
    fn found(self) -> Found {
        Found {
            pack: self.pack,
            offset: self.offset,
            length: self.length,
            raw_length: self.raw_length,
        }
    }
}

/// Chunks stored (in a pack on storage) or pending (accepted, not yet written).
pub(crate) struct Index {
    disk: Arc<DiskIndex>,
    filter: MemFilter,
    /// Chunks of this server's packs not yet in an `index/` object (bounded by the
    /// repository's `chunks_per_index` and the uploads in flight).
    own: HashMap<ChunkId, OwnLoc>,
    own_packs: HashSet<Arc<str>>,
    tenants: HashSet<Arc<str>>,
    pending: HashMap<ChunkId, Arc<str>>,
    /// Chunks condemned by maintenance, with the pack holding the condemned copy: that
    /// copy counts as absent, so a backup that needs the chunk stores it again.
    condemned: HashMap<ChunkId, String>,
}

impl From<DiskError> for crate::RepoError {
    fn from(e: DiskError) -> Self {
        crate::RepoError::IndexCache(e.to_string())
    }
}

/// Logs a failed read of the local index; the chunk then counts as absent, which is
/// safe (a client sends it again, a read refreshes and retries).
fn logged<T>(r: Result<Option<T>, DiskError>) -> Option<T> {
    r.unwrap_or_else(|e| {
        tracing::error!(error = %e, "reading the local index failed");
        None
    })
}

impl Index {
    /// An index over `disk`, with the filter built from it.
    pub fn new(disk: DiskIndex) -> Result<Index, DiskError> {
        let filter = build_filter(&disk)?;
        Ok(Index {
            disk: Arc::new(disk),
            filter,
            own: HashMap::new(),
            own_packs: HashSet::new(),
            tenants: HashSet::new(),
            pending: HashMap::new(),
            condemned: HashMap::new(),
        })
    }

    /// The on-disk index, for refreshes (which write it without holding this lock).
    pub fn disk(&self) -> Arc<DiskIndex> {
        Arc::clone(&self.disk)
    }

    /// Replaces the on-disk index and its filter by a complete rebuild.
    pub fn replace(&mut self, disk: Arc<DiskIndex>, filter: MemFilter) {
        self.disk = disk;
        self.filter = filter;
    }

    /// Notes chunks added to the on-disk index; rebuilds the filter partitions due.
    pub fn note_added(&mut self, ids: &[ChunkId]) -> Result<(), DiskError> {
        let mut due = [false; filter::PARTITIONS];
        for id in ids {
            if self.filter.add(id) {
                due[usize::from(filter::partition(id))] = true;
            }
        }
        for (p, _) in due.iter().enumerate().filter(|(_, d)| **d) {
            let p = p as u8;
            let keys = self.disk.partition_keys(p)?;
            self.filter.set_partition(p, keys);
        }
        Ok(())
    }

    fn tenant(&mut self, tenant: &str) -> Arc<str> {
        if let Some(t) = self.tenants.get(tenant) {
            return Arc::clone(t);
        }
        let t: Arc<str> = Arc::from(tenant);
        self.tenants.insert(Arc::clone(&t));
        t
    }

    /// Adds a pack this server wrote, before an `index/` object lists it.
    pub fn add_own_pack(&mut self, pack: &PackEntries) {
        let name: Arc<str> = Arc::from(pack.name.as_str());
        self.own_packs.insert(Arc::clone(&name));
        for b in &pack.blobs {
            let Ok(id) = ChunkId::from_slice(&b.id) else {
                continue;
            };
            self.pending.remove(&id);
            let tenant = self.tenant(&b.tenant);
            self.own.entry(id).or_insert(OwnLoc {
                pack: Arc::clone(&name),
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
                tenant,
            });
        }
    }

    /// After a rebuild: the own packs not yet indexed are exactly `unindexed`.
    pub fn reset_own<'a>(&mut self, unindexed: impl Iterator<Item = &'a PackEntries>) {
        self.own = HashMap::new();
        self.own_packs = HashSet::new();
        for p in unindexed {
            self.add_own_pack(p);
        }
    }

    /// Forgets own packs now listed by an `index/` object held on disk.
    pub fn own_packs_indexed(&mut self, file: &FlatFile) {
        for p in &file.packs {
            for b in &p.blobs {
                if self.own.get(&b.id).is_some_and(|o| *o.pack == *p.name) {
                    self.own.remove(&b.id);
                }
            }
            self.own_packs.remove(p.name.as_str());
        }
        if self.own.is_empty() {
            self.own = HashMap::new();
        }
    }

    /// The copy of a chunk reads use.
    fn copy(&self, id: &ChunkId) -> Option<Copy> {
        if let Some(o) = self.own.get(id) {
            return Some(Copy {
                pack: o.pack.to_string(),
                offset: o.offset,
                length: o.length,
                raw_length: o.raw_length,
                tenant: o.tenant.to_string(),
            });
        }
        if !self.filter.may_contain(id) {
            return None;
        }
        let r = logged(self.disk.reader().map(Some))?;
        let l = logged(r.get(id))?;
        Some(Copy {
            pack: logged(r.pack_name(l.pack))?,
            offset: l.offset,
            length: l.length,
            raw_length: l.raw_length,
            tenant: self.disk.tenant_name(l.tenant)?,
        })
    }

    fn condemned_at(&self, id: &ChunkId, pack: &str) -> bool {
        self.condemned.get(id).is_some_and(|p| p == pack)
    }

    /// For each id, whether `pack` holds the copy reads use (one read view for all).
    pub fn canonical_in(&self, pack: &str, ids: &[ChunkId]) -> Vec<bool> {
        let reader = logged(self.disk.reader().map(Some));
        let pack_no = reader.as_ref().and_then(|r| logged(r.pack_no(pack)));
        ids.iter()
            .map(|id| {
                if let Some(o) = self.own.get(id) {
                    return *o.pack == *pack;
                }
                let (Some(r), Some(no)) = (&reader, pack_no) else {
                    return false;
                };
                self.filter.may_contain(id) && logged(r.get(id)).is_some_and(|l| l.pack == no)
            })
            .collect()
    }

    /// Marks a chunk's copy in `pack` as condemned.
    pub fn condemn(&mut self, id: ChunkId, pack: &str) {
        self.condemned.insert(id, pack.to_string());
    }

    pub fn clear_condemned(&mut self) {
        self.condemned.clear();
    }

    pub fn condemned(&self) -> &HashMap<ChunkId, String> {
        &self.condemned
    }

    /// Is the chunk stored (and not condemned) for this tenant?
    pub fn is_stored(&self, tenant: &str, id: &ChunkId) -> bool {
        self.copy(id)
            .is_some_and(|c| c.tenant == tenant && !self.condemned_at(id, &c.pack))
    }

    /// For each id, whether this tenant must send it: neither stored (and not
    /// condemned) nor pending. One read view of the disk for the whole batch.
    pub fn missing(&self, tenant: &str, ids: &[ChunkId]) -> Vec<u32> {
        let reader = match self.disk.reader() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "reading the local index failed");
                None
            }
        };
        let on_disk = |id: &ChunkId| -> bool {
            let Some(r) = &reader else { return false };
            let Some(l) = logged(r.get(id)) else {
                return false;
            };
            if !self.disk.tenant_is(l.tenant, tenant) {
                return false;
            }
            match self.condemned.get(id) {
                None => true,
                Some(cp) => logged(r.pack_name(l.pack)).is_none_or(|p| p != *cp),
            }
        };
        ids.iter()
            .enumerate()
            .filter(|(_, id)| {
                if self.is_pending(tenant, id) {
                    return false;
                }
                if let Some(o) = self.own.get(id) {
                    return *o.tenant != *tenant || self.condemned_at(id, &o.pack);
                }
                !(self.filter.may_contain(id) && on_disk(id))
            })
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Does any chunk of this tenant count as absent because its copy is condemned?
    pub fn has_condemned(&self, tenant: &str) -> bool {
        self.condemned.iter().any(|(id, pack)| {
            self.copy(id)
                .is_some_and(|c| c.tenant == tenant && c.pack == *pack)
        })
    }

    /// A condemned chunk of this tenant that is still readable (so it can be rescued).
    pub fn condemned_copy(&self, tenant: &str, id: &ChunkId) -> Option<Found> {
        let c = self.copy(id)?;
        if c.tenant != tenant || !self.condemned_at(id, &c.pack) {
            return None;
        }
        Some(c.found())
    }

    /// The pack holding the copy of a chunk that reads use, with its tenant.
    #[cfg(test)]
    pub fn canonical(&self, id: &ChunkId) -> Option<(String, String)> {
        self.copy(id).map(|c| (c.pack, c.tenant))
    }

    pub fn is_pending(&self, tenant: &str, id: &ChunkId) -> bool {
        self.pending.get(id).is_some_and(|t| **t == *tenant)
    }

    /// Reserves a chunk for writing; false if it is stored or already reserved.
    pub fn reserve(&mut self, tenant: &str, id: ChunkId) -> bool {
        if self.pending.contains_key(&id) || self.is_stored(tenant, &id) {
            return false;
        }
        let t = self.tenant(tenant);
        self.pending.insert(id, t);
        true
    }

    pub fn unreserve(&mut self, id: &ChunkId) {
        self.pending.remove(id);
    }

    pub fn find(&self, tenant: &str, id: &ChunkId) -> Option<Found> {
        let c = self.copy(id)?;
        (c.tenant == tenant).then(|| c.found())
    }

    pub fn has_pack(&self, name: &str) -> bool {
        self.own_packs.contains(name)
            || logged(self.disk.reader().map(Some)).is_some_and(|r| {
                r.has_pack(name).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "reading the local index failed");
                    false
                })
            })
    }

    /// Chunks stored (on disk and in own packs not indexed yet).
    pub fn len(&self) -> usize {
        let on_disk = self.disk.len().unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading the local index failed");
            0
        });
        on_disk as usize + self.own.len()
    }

    /// Memory of the filter, in bytes.
    pub fn filter_bytes(&self) -> usize {
        self.filter.bytes()
    }
}

/// The filter of everything `disk` holds, one partition at a time.
pub(crate) fn build_filter(disk: &DiskIndex) -> Result<MemFilter, DiskError> {
    let mut f = MemFilter::default();
    for p in 0..filter::PARTITIONS {
        let p = p as u8;
        f.set_partition(p, disk.partition_keys(p)?);
    }
    Ok(f)
}

/// Where the index cache lives when the caller names none: a directory of this process
/// under the temp dir, removed with the repository.
pub(crate) struct PrivateDir(std::path::PathBuf);

impl PrivateDir {
    pub fn new() -> Result<PrivateDir, DiskError> {
        let dir = std::env::temp_dir().join(format!(
            "datamover-index-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| DiskError::Cache {
            path: dir.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(PrivateDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
