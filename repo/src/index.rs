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

#[derive(Clone, Copy)]
struct Location {
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
    tenant: u32,
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
    chunks: HashMap<ChunkId, Location>,
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
            match self.chunks.get(&id) {
                Some(old) if !self.is_condemned_at(&id, old.pack) => {}
                _ => {
                    self.chunks.insert(id, loc);
                }
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

    /// A condemned chunk of this tenant that is still readable (so it can be rescued).
    pub fn condemned_copy(&self, tenant: &str, id: &ChunkId) -> Option<Found> {
        let l = self.chunks.get(id)?;
        if !self.same_tenant(l.tenant, tenant) || !self.is_condemned_at(id, l.pack) {
            return None;
        }
        self.found(l)
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
        assert_eq!(ix.condemned_copy("a", &id).unwrap().pack, "old");
        // a backup may store it again: the new copy is the one reads use
        assert!(ix.reserve("a", id));
        ix.add_pack(&pack("new", id));
        assert!(ix.is_stored("a", &id));
        assert_eq!(ix.find("a", &id).unwrap().pack, "new");
        assert!(ix.condemned_copy("a", &id).is_none());
        // a condemnation of the old copy does not touch the new one
        ix.add_pack(&pack("third", id));
        assert_eq!(ix.find("a", &id).unwrap().pack, "new");
    }
}
