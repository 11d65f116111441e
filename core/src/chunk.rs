//! Content-defined chunking and chunk ids.

use std::fmt;
use std::io::Read;

use thiserror::Error;

/// FastCDC sizes. Small enough that a one-byte change re-sends well under 1 MiB, large
/// enough that the index of a terabyte stays in memory (4 M entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl ChunkerParams {
    pub const DEFAULT: ChunkerParams = ChunkerParams {
        min_size: 64 * 1024,
        avg_size: 256 * 1024,
        max_size: 1024 * 1024,
    };

    /// Checks the bounds FastCDC accepts.
    pub fn validate(&self) -> Result<(), ChunkError> {
        let ok = (fastcdc::v2020::MINIMUM_MIN..=fastcdc::v2020::MINIMUM_MAX)
            .contains(&self.min_size)
            && (fastcdc::v2020::AVERAGE_MIN..=fastcdc::v2020::AVERAGE_MAX).contains(&self.avg_size)
            && (fastcdc::v2020::MAXIMUM_MIN..=fastcdc::v2020::MAXIMUM_MAX).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size;
        if ok {
            Ok(())
        } else {
            Err(ChunkError::BadParams(*self))
        }
    }
}

#[derive(Debug, Error)]
pub enum ChunkError {
    #[error("invalid chunker parameters {0:?}")]
    BadParams(ChunkerParams),
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
    #[error("a chunk id must be 32 bytes, got {0}")]
    BadIdLength(usize),
}

/// A chunk id: BLAKE3 keyed with the tenant's chunk-id key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ChunkError> {
        <[u8; 32]>::try_from(bytes)
            .map(ChunkId)
            .map_err(|_| ChunkError::BadIdLength(bytes.len()))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The per-tenant key of chunk ids.
#[derive(Clone)]
pub struct ChunkIdKey([u8; 32]);

impl ChunkIdKey {
    pub fn new(key: [u8; 32]) -> Self {
        ChunkIdKey(key)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, ChunkError> {
        <[u8; 32]>::try_from(bytes)
            .map(ChunkIdKey)
            .map_err(|_| ChunkError::BadIdLength(bytes.len()))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id of `data` for this tenant.
    pub fn id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.0, data).as_bytes())
    }
}

impl fmt::Debug for ChunkIdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkIdKey(..)")
    }
}

/// Cuts a byte stream into content-defined chunks.
pub struct Chunker<R: Read> {
    inner: fastcdc::v2020::StreamCDC<R>,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R, params: ChunkerParams) -> Result<Self, ChunkError> {
        params.validate()?;
        Ok(Chunker {
            inner: fastcdc::v2020::StreamCDC::new(
                reader,
                params.min_size,
                params.avg_size,
                params.max_size,
            ),
        })
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = Result<Vec<u8>, ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(|r| {
            r.map(|c| c.data).map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => ChunkError::Io(io),
                other => ChunkError::Io(std::io::Error::other(other.to_string())),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn chunks_concatenate_to_input_and_are_bounded() {
        let mut data = vec![0u8; 5 * 1024 * 1024 + 123];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
        let p = ChunkerParams::DEFAULT;
        let chunks: Vec<Vec<u8>> = Chunker::new(&data[..], p)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(chunks.len() > 5);
        assert_eq!(chunks.concat(), data);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= p.min_size as usize && c.len() <= p.max_size as usize);
        }
    }

    #[test]
    fn ids_are_keyed() {
        let a = ChunkIdKey::new([1; 32]);
        let b = ChunkIdKey::new([2; 32]);
        assert_ne!(a.id(b"x"), b.id(b"x"));
        assert_eq!(a.id(b"x"), a.id(b"x"));
    }

    #[test]
    fn one_byte_change_touches_few_chunks() {
        let mut data = vec![0u8; 8 * 1024 * 1024];
        rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut data);
        let key = ChunkIdKey::new([0; 32]);
        let ids = |d: &[u8]| -> Vec<(ChunkId, usize)> {
            Chunker::new(d, ChunkerParams::DEFAULT)
                .unwrap()
                .map(|c| {
                    let c = c.unwrap();
                    (key.id(&c), c.len())
                })
                .collect()
        };
        let before = ids(&data);
        data[4 * 1024 * 1024] ^= 0xff;
        let after = ids(&data);
        let changed: usize = after
            .iter()
            .filter(|c| !before.iter().any(|b| b.0 == c.0))
            .map(|c| c.1)
            .sum();
        assert!(changed <= 2 * 1024 * 1024, "changed {changed}");
    }
}
