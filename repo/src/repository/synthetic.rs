//! Synthetic `index/` objects for benchmarks of the index at scale (the bench's
//! `index-scale` scenario): entries for chunks that have no data, written through the
//! repository's own index format and writer, so a server opening the repository loads
//! them like real ones.

use datamover_core::chunk::ChunkId;

use super::Repository;
use super::maintenance::unix_now;
use crate::RepoError;
use crate::index::{BlobEntry, IndexFile, PackEntries};

/// Most chunks one synthetic pack lists (a pack of 8 MiB holds about 32 chunks of
/// 256 KiB); at least one.
const MAX_CHUNKS_PER_PACK: u32 = 4096;

/// The id of synthetic chunk `i`: the same for every run, so a benchmark can ask for
/// chunks it knows are present (`i < n`) or absent (`i >= n`).
pub fn synthetic_chunk_id(i: u64) -> ChunkId {
    let mut h = blake3::Hasher::new();
    h.update(b"datamover synthetic chunk v1");
    h.update(&i.to_le_bytes());
    ChunkId(*h.finalize().as_bytes())
}

fn pack_name(p: u64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"datamover synthetic pack v1");
    h.update(&p.to_le_bytes());
    h.finalize().to_hex().to_string()
}

impl Repository {
    /// Writes `index/` objects listing synthetic chunks `0..n` of `tenant`, in packs of
    /// `chunks_per_pack` chunks (packs that do not exist in `data/`), in objects of about
    /// the repository's `chunks_per_index` chunks, as compaction writes them. Returns
    /// how many objects were written. For benchmarks only: reading such a chunk fails.
    pub async fn write_synthetic_index(
        &self,
        tenant: &str,
        n: u64,
        chunks_per_pack: u32,
    ) -> Result<u64, RepoError> {
        let per_pack = u64::from(chunks_per_pack.clamp(1, MAX_CHUNKS_PER_PACK));
        let per_object = (self.opts.chunks_per_index.max(1) as u64).div_ceil(per_pack) * per_pack;
        let now = unix_now();
        let mut objects = 0u64;
        let mut start = 0u64;
        while start < n {
            let end = (start + per_object).min(n);
            let mut packs = Vec::new();
            let mut i = start;
            while i < end {
                let pack_end = (i + per_pack).min(end);
                let blobs = (i..pack_end)
                    .map(|c| BlobEntry {
                        id: synthetic_chunk_id(c).0.to_vec(),
                        offset: ((c - i) * 200_000) as u32,
                        length: 200_000,
                        raw_length: 262_144,
                        tenant: tenant.to_string(),
                    })
                    .collect();
                packs.push(PackEntries {
                    name: pack_name(i / per_pack),
                    blobs,
                    created_unix: now,
                });
                i = pack_end;
            }
            self.write_index_file(&IndexFile { packs }).await?;
            objects += 1;
            start = end;
        }
        tracing::info!(chunks = n, objects, "synthetic index written");
        Ok(objects)
    }
}
