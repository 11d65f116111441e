//! Packs: many sealed chunks in one object, with a sealed trailer listing them so the
//! index can be rebuilt from the packs alone.
//!
//! Layout: `blob* || sealed(PackEntries) || u32 LE length of the sealed trailer`.

use bytes::Bytes;
use datamover_core::chunk::ChunkId;
use prost::Message;

use crate::RepoError;
use crate::crypto::{self, Keys};
use crate::index::{BlobEntry, PackEntries};
use crate::memory::PackBuffers;

pub(crate) struct PackBuilder {
    buf: Vec<u8>,
    blobs: Vec<BlobEntry>,
    buffers: PackBuffers,
}

/// Room for a full pack and its last chunk, so filling it never reallocates.
const PACK_CAPACITY: usize = 8 * 1024 * 1024 + 1024 * 1024 + 64 * 1024;

impl PackBuilder {
    /// An empty pack whose memory comes from (and goes back to) `buffers`.
    pub fn new(buffers: PackBuffers) -> PackBuilder {
        PackBuilder {
            buf: Vec::new(),
            blobs: Vec::new(),
            buffers,
        }
    }

    /// Takes the pack built so far, leaving an empty one on the same pool.
    pub fn take(&mut self) -> PackBuilder {
        let empty = PackBuilder::new(self.buffers.clone());
        std::mem::replace(self, empty)
    }

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

    /// Parses a pack's trailer: its entries (named `name`), checking the pack is whole.
    pub fn read_trailer(keys: &Keys, name: &str, pack: &[u8]) -> Result<PackEntries, RepoError> {
        let what = format!("pack {name}");
        let len_at = pack
            .len()
            .checked_sub(4)
            .ok_or_else(|| RepoError::corrupt(&what, "too short"))?;
        let mut len = [0u8; 4];
        len.copy_from_slice(&pack[len_at..]);
        let start = len_at
            .checked_sub(u32::from_le_bytes(len) as usize)
            .ok_or_else(|| RepoError::corrupt(&what, "trailer length out of range"))?;
        let plain = crypto::unpack_blob(keys, &pack[start..len_at], 0, &what)?;
        let mut entries =
            PackEntries::decode(plain.as_slice()).map_err(|e| RepoError::corrupt(&what, e))?;
        entries.name = name.to_string();
        Ok(entries)
    }

    pub fn add(&mut self, id: &ChunkId, tenant: &str, sealed: &[u8], raw_length: usize) {
        if self.buf.capacity() == 0 {
            self.buf = self.buffers.take(PACK_CAPACITY.max(sealed.len()));
        }
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
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut entries = PackEntries {
            name: String::new(),
            blobs: self.blobs,
            created_unix,
        };
        let mut buf = self.buf;
        let trailer = crypto::pack_blob(keys, &entries.encode_to_vec(), 3);
        buf.extend_from_slice(&trailer);
        buf.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        let name = blake3::hash(&buf).to_hex().to_string();
        entries.name = name.clone();
        (name, self.buffers.share(buf), entries)
    }
}
