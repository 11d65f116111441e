//! The membership filter kept in memory: which chunk ids the on-disk index may hold.
//!
//! 256 partitions by the id's first byte, each a binary fuse filter (`xorf`
//! `BinaryFuse8`: 1.35 bytes a chunk at a million chunks, 1.15 from about 50 million,
//! no false negatives, under 0.4 % false positives) plus a small delta of the ids added
//! since it was built (a hash set, about 16 bytes an id). A partition whose delta grows
//! past a 64th of it (or [`DELTA_MIN`]) is rebuilt from the on-disk
//! index's keys of that partition alone, so building never holds more than one
//! partition's keys (at 100 million chunks, about 3 MiB).
//!
//! Chunk ids are keyed hashes, so their first 8 bytes serve as the filter's key as they
//! are.

use std::collections::HashSet;

use datamover_core::chunk::ChunkId;
use xorf::{BinaryFuse8, Filter as _};

/// Partitions: one per value of the id's first byte.
pub(crate) const PARTITIONS: usize = 256;
/// A partition's delta may hold this many ids before it is rebuilt, or a 64th of the
/// partition, whichever is more: at most 4 MiB of deltas in all, or a quarter of a byte
/// a chunk.
pub(crate) const DELTA_MIN: usize = 1024;
/// The delta may grow to `built / DELTA_SHARE`.
const DELTA_SHARE: usize = 64;

pub(crate) fn key(id: &ChunkId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    u64::from_be_bytes(b)
}

pub(crate) fn partition(id: &ChunkId) -> u8 {
    id.0[0]
}

#[derive(Default)]
struct Part {
    fuse: Option<BinaryFuse8>,
    /// Keys the fuse filter was built from.
    built: usize,
    /// Keys added since (or all keys, if the fuse filter could not be built).
    delta: HashSet<u64>,
}

/// The partitioned filter.
pub(crate) struct MemFilter {
    parts: Vec<Part>,
}

impl Default for MemFilter {
    fn default() -> Self {
        MemFilter {
            parts: (0..PARTITIONS).map(|_| Part::default()).collect(),
        }
    }
}

impl MemFilter {
    /// False only if the chunk is certainly not in the on-disk index.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        let k = key(id);
        match self.parts.get(usize::from(partition(id))) {
            Some(p) => p.delta.contains(&k) || p.fuse.as_ref().is_some_and(|f| f.contains(&k)),
            None => true,
        }
    }

    /// Notes a chunk added to the on-disk index; true when its partition is due for a
    /// rebuild ([`MemFilter::set_partition`]).
    pub fn add(&mut self, id: &ChunkId) -> bool {
        let Some(p) = self.parts.get_mut(usize::from(partition(id))) else {
            return false;
        };
        p.delta.insert(key(id));
        p.fuse.is_some() && p.delta.len() > DELTA_MIN.max(p.built / DELTA_SHARE)
            || p.fuse.is_none() && p.delta.len() > DELTA_MIN
    }

    /// Replaces partition `p` with a filter of `keys` (every key of the partition).
    pub fn set_partition(&mut self, p: u8, mut keys: Vec<u64>) {
        let Some(part) = self.parts.get_mut(usize::from(p)) else {
            return;
        };
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            *part = Part::default();
            return;
        }
        match BinaryFuse8::try_from(&keys) {
            Ok(f) => {
                part.fuse = Some(f);
                part.built = keys.len();
                part.delta = HashSet::new();
            }
            Err(e) => {
                // Rare (the construction is randomised): the keys stay exact instead.
                tracing::warn!(
                    partition = p,
                    keys = keys.len(),
                    error = e,
                    "filter construction failed: keeping the keys"
                );
                part.fuse = None;
                part.built = 0;
                part.delta = keys.into_iter().collect();
            }
        }
    }

    /// Memory held: fingerprints, and the deltas (about 16 bytes a key in a hash set).
    pub fn bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.fuse.as_ref().map_or(0, |f| f.fingerprints.len()) + p.delta.capacity() * 16)
            .sum()
    }

    /// Keys the filter covers.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.built + p.delta.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    #[test]
    fn no_false_negatives_few_false_positives_and_a_byte_a_chunk() {
        let n = 1_000_000u64;
        let mut by_part: Vec<Vec<u64>> = vec![Vec::new(); PARTITIONS];
        for i in 0..n {
            let id = id_of(i);
            by_part[usize::from(partition(&id))].push(key(&id));
        }
        let mut f = MemFilter::default();
        for (p, keys) in by_part.into_iter().enumerate() {
            f.set_partition(p as u8, keys);
        }
        assert_eq!(f.len(), n as usize);
        let per_chunk = f.bytes() as f64 / n as f64;
        assert!(per_chunk < 1.4, "{per_chunk:.3} bytes a chunk");
        assert!((0..n).step_by(97).all(|i| f.may_contain(&id_of(i))));
        let false_pos = (n..n + 100_000)
            .filter(|i| f.may_contain(&id_of(*i)))
            .count();
        assert!(false_pos < 1000, "{false_pos} false positives in 100000");
        // additions go to the delta until the partition is due for a rebuild
        let extra = id_of(u64::MAX);
        assert!(!f.add(&extra));
        assert!(f.may_contain(&extra));
    }
}
