//! The in-memory chunk index and its on-storage form.

use std::collections::{HashMap, HashSet};

use datamover_core::chunk::ChunkId;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Location {
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
    tenant: u32,
}

/// One stored chunk in the sorted table: 52 bytes.
#[derive(Clone, Copy)]
struct Entry {
    id: ChunkId,
    loc: Location,
}

/// Recent additions are merged into the sorted table once they are this many, or an
/// eighth of the table, whichever is more.
const MERGE_MIN: usize = 8192;
/// Ids are located in the sorted table by their first 16 bits, then a binary search.
const PREFIX_BITS: u32 = 16;

fn prefix(id: &ChunkId) -> usize {
    usize::from(u16::from_be_bytes([id.0[0], id.0[1]]))
}

/// The stored chunks, compact: a sorted array of fixed-size entries with a prefix table
/// (about 52 bytes per chunk, where a hash map needs two to three times that), and a
/// small hash map of the chunks added since the last merge. An id is in one or the
/// other, never both.
#[derive(Default)]
struct ChunkTable {
    sorted: Vec<Entry>,
    /// `starts[p]..starts[p + 1]` are the entries whose id begins with prefix `p`
    /// (empty while `sorted` is).
    starts: Vec<u32>,
    recent: HashMap<ChunkId, Location>,
}

impl ChunkTable {
    fn position(&self, id: &ChunkId) -> Option<usize> {
        if self.sorted.is_empty() {
            return None;
        }
        let p = prefix(id);
        let (lo, hi) = match (self.starts.get(p), self.starts.get(p + 1)) {
            (Some(&lo), Some(&hi)) => (lo as usize, hi as usize),
            _ => (0, self.sorted.len()),
        };
        let range = self.sorted.get(lo..hi)?;
        range
            .binary_search_by(|e| e.id.cmp(id))
            .ok()
            .map(|i| lo + i)
    }

    fn get(&self, id: &ChunkId) -> Option<&Location> {
        match self.recent.get(id) {
            Some(l) => Some(l),
            None => self.position(id).map(|i| &self.sorted[i].loc),
        }
    }

    /// Adds the chunk, or replaces where it is.
    fn insert(&mut self, id: ChunkId, loc: Location) {
        if let Some(i) = self.position(&id) {
            self.sorted[i].loc = loc;
            return;
        }
        self.recent.insert(id, loc);
        if self.recent.len() >= MERGE_MIN.max(self.sorted.len() / 8) {
            self.merge();
        }
    }

    /// Moves the recent additions into the sorted table, merging in place from the end.
    fn merge(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        let mut new: Vec<Entry> = self
            .recent
            .drain()
            .map(|(id, loc)| Entry { id, loc })
            .collect();
        new.sort_unstable_by_key(|e| e.id);
        let old_len = self.sorted.len();
        let Some(&filler) = new.first() else {
            return;
        };
        // Exactly what is needed (merges come every eighth of the table, so this stays
        // amortised): doubling would hold up to twice the table, 52 MiB more per million
        // chunks, for nothing.
        self.sorted.reserve_exact(new.len());
        self.sorted.resize(old_len + new.len(), filler);
        let (mut i, mut j, mut k) = (old_len, new.len(), old_len + new.len());
        while j > 0 {
            k -= 1;
            if i > 0 && self.sorted[i - 1].id > new[j - 1].id {
                self.sorted[k] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k] = new[j - 1];
                j -= 1;
            }
        }
        if self.recent.capacity() > 4 * MERGE_MIN.max(self.sorted.len() / 8) {
            self.recent.shrink_to_fit();
        }
        self.rebuild_starts();
    }

    fn rebuild_starts(&mut self) {
        let buckets = 1usize << PREFIX_BITS;
        self.starts.clear();
        self.starts.reserve_exact(buckets + 1);
        let mut at = 0usize;
        for p in 0..buckets {
            while at < self.sorted.len() && prefix(&self.sorted[at].id) < p {
                at += 1;
            }
            self.starts.push(at as u32);
        }
        self.starts.push(self.sorted.len() as u32);
    }

    fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    fn clear(&mut self) {
        *self = ChunkTable::default();
    }
}

/// Where a chunk is.
pub(crate) struct Found {
    pub pack: String,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
}

/// Chunks stored (in a pack on storage) or pending (accepted, not yet written).
#[derive(Default)]
pub(crate) struct Index {
    packs: Vec<String>,
    pack_ids: HashMap<String, u32>,
    tenants: Vec<String>,
    tenant_ids: HashMap<String, u32>,
    chunks: ChunkTable,
    pending: HashMap<ChunkId, u32>,
    /// Chunks condemned by maintenance, with the pack holding the condemned copy: that
    /// copy counts as absent, so a backup that needs the chunk stores it again.
    condemned: HashMap<ChunkId, String>,
    pub loaded_files: HashSet<String>,
}

impl Index {
    fn tenant_id(&mut self, tenant: &str) -> u32 {
        if let Some(id) = self.tenant_ids.get(tenant) {
            return *id;
        }
        let id = self.tenants.len() as u32;
        self.tenants.push(tenant.to_string());
        self.tenant_ids.insert(tenant.to_string(), id);
        id
    }

    fn same_tenant(&self, stored: u32, tenant: &str) -> bool {
        self.tenants.get(stored as usize).map(String::as_str) == Some(tenant)
    }

    /// Adds a pack's chunks as stored.
    pub fn add_pack(&mut self, pack: &PackEntries) {
        // A pack listed by two index objects (after a crash, say) is one pack.
        let pack_no = match self.pack_ids.get(&pack.name) {
            Some(n) => *n,
            None => {
                let n = self.packs.len() as u32;
                self.packs.push(pack.name.clone());
                self.pack_ids.insert(pack.name.clone(), n);
                n
            }
        };
        for b in &pack.blobs {
            let Ok(id) = ChunkId::from_slice(&b.id) else {
                continue;
            };
            let tenant = self.tenant_id(&b.tenant);
            self.pending.remove(&id);
            let loc = Location {
                pack: pack_no,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
                tenant,
            };
            // A live copy wins over a condemned one; otherwise the first copy stays.
            let replace = match self.chunks.get(&id) {
                Some(old) => self.is_condemned_at(&id, old.pack),
                None => true,
            };
            if replace {
                self.chunks.insert(id, loc);
            }
        }
    }

    fn is_condemned_at(&self, id: &ChunkId, pack: u32) -> bool {
        self.condemned
            .get(id)
            .is_some_and(|p| self.packs.get(pack as usize) == Some(p))
    }

    /// Marks a chunk's copy in `pack` as condemned.
    pub fn condemn(&mut self, id: ChunkId, pack: &str) {
        self.condemned.insert(id, pack.to_string());
    }

    pub fn clear_condemned(&mut self) {
        self.condemned.clear();
    }

    /// Is the chunk stored (and not condemned) for this tenant?
    pub fn is_stored(&self, tenant: &str, id: &ChunkId) -> bool {
        self.chunks.get(id).is_some_and(|l| {
            self.same_tenant(l.tenant, tenant) && !self.is_condemned_at(id, l.pack)
        })
    }

    /// Does any chunk of this tenant count as absent because its copy is condemned?
    pub fn has_condemned(&self, tenant: &str) -> bool {
        self.condemned.keys().any(|id| {
            self.chunks.get(id).is_some_and(|l| {
                self.same_tenant(l.tenant, tenant) && self.is_condemned_at(id, l.pack)
            })
        })
    }

    /// A condemned chunk of this tenant that is still readable (so it can be rescued).
    pub fn condemned_copy(&self, tenant: &str, id: &ChunkId) -> Option<Found> {
        let l = *self.chunks.get(id)?;
        if !self.same_tenant(l.tenant, tenant) || !self.is_condemned_at(id, l.pack) {
            return None;
        }
        self.found(&l)
    }

    /// The pack holding the copy of a chunk that reads use, with its tenant.
    pub fn canonical(&self, id: &ChunkId) -> Option<(&str, &str)> {
        let l = self.chunks.get(id)?;
        Some((
            self.packs.get(l.pack as usize)?.as_str(),
            self.tenants.get(l.tenant as usize)?.as_str(),
        ))
    }

    /// Forgets every stored chunk (keeping reservations and condemnations), before a
    /// reload from the index objects.
    pub fn clear_stored(&mut self) {
        self.packs.clear();
        self.pack_ids.clear();
        self.chunks.clear();
        self.loaded_files.clear();
    }

    pub fn is_pending(&self, tenant: &str, id: &ChunkId) -> bool {
        self.pending
            .get(id)
            .is_some_and(|t| self.same_tenant(*t, tenant))
    }

    /// Reserves a chunk for writing; false if it is stored or already reserved.
    pub fn reserve(&mut self, tenant: &str, id: ChunkId) -> bool {
        if self.is_stored(tenant, &id) || self.pending.contains_key(&id) {
            return false;
        }
        let t = self.tenant_id(tenant);
        self.pending.insert(id, t);
        true
    }

    pub fn unreserve(&mut self, id: &ChunkId) {
        self.pending.remove(id);
    }

    pub fn find(&self, tenant: &str, id: &ChunkId) -> Option<Found> {
        let l = self.chunks.get(id)?;
        if !self.same_tenant(l.tenant, tenant) {
            return None;
        }
        self.found(l)
    }

    fn found(&self, l: &Location) -> Option<Found> {
        Some(Found {
            pack: self.packs.get(l.pack as usize)?.clone(),
            offset: l.offset,
            length: l.length,
            raw_length: l.raw_length,
        })
    }

    pub fn has_pack(&self, name: &str) -> bool {
        self.pack_ids.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_separate() {
        let mut ix = Index::default();
        let id = ChunkId([1; 32]);
        assert!(ix.reserve("a", id));
        assert!(!ix.reserve("a", id));
        assert!(ix.is_pending("a", &id));
        assert!(!ix.is_pending("b", &id));
        ix.add_pack(&pack("p", id));
        assert!(ix.is_stored("a", &id));
        assert!(!ix.is_stored("b", &id));
        assert!(ix.find("b", &id).is_none());
        assert_eq!(ix.find("a", &id).unwrap().pack, "p");
    }

    fn pack(name: &str, id: ChunkId) -> PackEntries {
        PackEntries {
            name: name.into(),
            blobs: vec![BlobEntry {
                id: id.0.to_vec(),
                offset: 0,
                length: 10,
                raw_length: 5,
                tenant: "a".into(),
            }],
            created_unix: 0,
        }
    }

    #[test]
    fn condemned_copy_counts_as_absent_until_stored_again() {
        let mut ix = Index::default();
        let id = ChunkId([2; 32]);
        ix.add_pack(&pack("old", id));
        ix.condemn(id, "old");
        assert!(!ix.is_stored("a", &id));
        assert!(ix.has_condemned("a"));
        assert!(
            !ix.has_condemned("b"),
            "another tenant's condemnations are not ours"
        );
        assert_eq!(ix.condemned_copy("a", &id).unwrap().pack, "old");
        // a backup may store it again: the new copy is the one reads use
        assert!(ix.reserve("a", id));
        ix.add_pack(&pack("new", id));
        assert!(ix.is_stored("a", &id));
        assert_eq!(ix.find("a", &id).unwrap().pack, "new");
        assert!(ix.condemned_copy("a", &id).is_none());
        assert!(
            !ix.has_condemned("a"),
            "the live copy is the one that counts"
        );
        // a condemnation of the old copy does not touch the new one
        ix.add_pack(&pack("third", id));
        assert_eq!(ix.find("a", &id).unwrap().pack, "new");
    }

    fn loc(n: u32) -> Location {
        Location {
            pack: n % 7,
            offset: n,
            length: n.wrapping_mul(3),
            raw_length: n ^ 0x5555,
            tenant: 0,
        }
    }

    fn id_of(n: u32) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    #[test]
    fn chunk_table_finds_every_chunk_across_merges() {
        let mut t = ChunkTable::default();
        let n = 5 * MERGE_MIN as u32 + 123;
        for i in 0..n {
            t.insert(id_of(i), loc(i));
            // every few, check one inserted earlier (in the table or still recent)
            if i % 997 == 0 {
                let j = i / 2;
                assert_eq!(t.get(&id_of(j)), Some(&loc(j)));
            }
        }
        assert!(!t.sorted.is_empty(), "merged at least once");
        assert_eq!(t.len(), n as usize);
        assert!(t.sorted.windows(2).all(|w| w[0].id < w[1].id));
        for i in 0..n {
            assert_eq!(t.get(&id_of(i)), Some(&loc(i)), "chunk {i}");
        }
        for i in n..n + 1000 {
            assert_eq!(t.get(&id_of(i)), None);
        }
        // extremes of the prefix table
        for id in [ChunkId([0; 32]), ChunkId([0xff; 32])] {
            assert_eq!(t.get(&id), None);
            t.insert(id, loc(1));
            assert_eq!(t.get(&id), Some(&loc(1)));
        }
        // replacing keeps one entry, wherever it is
        t.merge();
        t.insert(id_of(5), loc(99));
        t.insert(ChunkId([0xff; 32]), loc(98));
        assert_eq!(t.get(&id_of(5)), Some(&loc(99)));
        assert_eq!(t.get(&ChunkId([0xff; 32])), Some(&loc(98)));
        assert_eq!(t.len(), n as usize + 2);
        t.clear();
        assert_eq!(t.len(), 0);
        assert_eq!(t.get(&id_of(5)), None);
    }

    #[test]
    fn index_of_many_packs_keeps_first_live_copy() {
        let mut ix = Index::default();
        let per_pack = 3000u32;
        for p in 0..10u32 {
            let blobs = (0..per_pack)
                .map(|i| BlobEntry {
                    id: id_of(p * per_pack + i).0.to_vec(),
                    offset: i,
                    length: 1,
                    raw_length: 1,
                    tenant: "a".into(),
                })
                .collect();
            ix.add_pack(&PackEntries {
                name: format!("p{p}"),
                blobs,
                created_unix: 0,
            });
        }
        assert_eq!(ix.len(), 10 * per_pack as usize);
        let id = id_of(4 * per_pack + 17);
        assert_eq!(ix.find("a", &id).unwrap().pack, "p4");
        assert_eq!(ix.find("a", &id).unwrap().offset, 17);
        // a second copy elsewhere does not replace a live one
        ix.add_pack(&pack("dup", id));
        assert_eq!(ix.find("a", &id).unwrap().pack, "p4");
        // once the first copy is condemned, the new copy is the one reads use
        ix.condemn(id, "p4");
        assert!(!ix.is_stored("a", &id));
        ix.add_pack(&pack("dup2", id));
        assert_eq!(ix.find("a", &id).unwrap().pack, "dup2");
        assert!(ix.is_stored("a", &id));
        ix.clear_stored();
        assert_eq!(ix.len(), 0);
        assert!(!ix.is_stored("a", &id));
    }
}
