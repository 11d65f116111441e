//! Packs: many sealed chunks in one object, with a sealed trailer listing them so the
//! index can be rebuilt from the packs alone.
//!
//! Layout: `blob* || sealed(PackEntries) || u32 LE length of the sealed trailer`.

use bytes::Bytes;
use datamover_core::chunk::ChunkId;
use prost::Message;

use crate::crypto::{self, Keys};
use crate::index::{BlobEntry, PackEntries};

#[derive(Default)]
pub(crate) struct PackBuilder {
    buf: Vec<u8>,
    blobs: Vec<BlobEntry>,
}

impl PackBuilder {
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.blobs
            .iter()
            .filter_map(|b| ChunkId::from_slice(&b.id).ok())
    }

    pub fn add(&mut self, id: &ChunkId, tenant: &str, sealed: &[u8], raw_length: usize) {
        self.blobs.push(BlobEntry {
            id: id.0.to_vec(),
            offset: self.buf.len() as u32,
            length: sealed.len() as u32,
            raw_length: raw_length as u32,
            tenant: tenant.to_string(),
        });
        self.buf.extend_from_slice(sealed);
    }

    /// Finishes the pack: its name, bytes and entries.
    pub fn finish(self, keys: &Keys) -> (String, Bytes, PackEntries) {
        let mut entries = PackEntries {
            name: String::new(),
            blobs: self.blobs,
        };
        let mut buf = self.buf;
        let trailer = crypto::pack_blob(keys, &entries.encode_to_vec(), 3);
        buf.extend_from_slice(&trailer);
        buf.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        let name = blake3::hash(&buf).to_hex().to_string();
        entries.name = name.clone();
        (name, Bytes::from(buf), entries)
    }
}
