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
    tenants: Vec<String>,
    tenant_ids: HashMap<String, u32>,
    chunks: HashMap<ChunkId, Location>,
    pending: HashMap<ChunkId, u32>,
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
        let pack_no = self.packs.len() as u32;
        self.packs.push(pack.name.clone());
        for b in &pack.blobs {
            let Ok(id) = ChunkId::from_slice(&b.id) else {
                continue;
            };
            let tenant = self.tenant_id(&b.tenant);
            self.pending.remove(&id);
            self.chunks.entry(id).or_insert(Location {
                pack: pack_no,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
                tenant,
            });
        }
    }

    /// Is the chunk stored for this tenant?
    pub fn is_stored(&self, tenant: &str, id: &ChunkId) -> bool {
        self.chunks
            .get(id)
            .is_some_and(|l| self.same_tenant(l.tenant, tenant))
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
        Some(Found {
            pack: self.packs.get(l.pack as usize)?.clone(),
            offset: l.offset,
            length: l.length,
            raw_length: l.raw_length,
        })
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
        ix.add_pack(&PackEntries {
            name: "p".into(),
            blobs: vec![BlobEntry {
                id: id.0.to_vec(),
                offset: 0,
                length: 10,
                raw_length: 5,
                tenant: "a".into(),
            }],
        });
        assert!(ix.is_stored("a", &id));
        assert!(!ix.is_stored("b", &id));
        assert!(ix.find("b", &id).is_none());
        assert_eq!(ix.find("a", &id).unwrap().pack, "p");
    }
}
