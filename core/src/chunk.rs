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

/// Content-defined chunking state kept across inputs: the cut masks and one read buffer,
/// so cutting many files allocates nothing but the chunks themselves. The cuts are
/// exactly FastCDC's (v2020, normalization level 1, as `fastcdc::v2020::StreamCDC`), so
/// data chunked before and after dedups.
pub struct ChunkBuffer {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    /// Twice the maximal chunk: a full window always fits after `start` without moving
    /// data more often than once per maximal chunk consumed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl ChunkBuffer {
    pub fn new(params: ChunkerParams) -> Result<Self, ChunkError> {
        use fastcdc::v2020::{MASKS, Normalization, logarithm2};
        params.validate()?;
        let bits = logarithm2(params.avg_size) as usize;
        let norm = Normalization::Level1.bits() as usize;
        Ok(ChunkBuffer {
            params,
            mask_s: MASKS[bits + norm],
            mask_l: MASKS[bits - norm],
            buf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
        })
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// The chunks of `reader`, in order. A small input (up to the minimum chunk size)
    /// is one chunk without running the cut search.
    pub fn chunks<R: Read>(&mut self, reader: R) -> Chunks<'_, R> {
        self.start = 0;
        self.end = 0;
        self.eof = false;
        Chunks { buf: self, reader }
    }

    /// Reads until a full window (the maximal chunk) is buffered or the input ends.
    fn fill(&mut self, reader: &mut impl Read) -> std::io::Result<()> {
        let max = self.params.max_size as usize;
        if self.buf.is_empty() {
            self.buf = vec![0; 2 * max];
        }
        if self.start + max > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while !self.eof && self.end - self.start < max {
            match reader.read(&mut self.buf[self.end..self.start + max]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn next_chunk(&mut self, reader: &mut impl Read) -> Result<Option<Vec<u8>>, ChunkError> {
        self.fill(reader)?;
        let window = &self.buf[self.start..self.end];
        if window.is_empty() {
            return Ok(None);
        }
        let p = self.params;
        let len = if window.len() <= p.min_size as usize {
            window.len()
        } else {
            fastcdc::v2020::cut(
                window,
                p.min_size as usize,
                p.avg_size as usize,
                p.max_size as usize,
                self.mask_s,
                self.mask_l,
                self.mask_s << 1,
                self.mask_l << 1,
            )
            .1
        };
        // FastCDC never cuts an empty chunk from a non-empty window; guard anyway.
        let len = len.clamp(1, window.len());
        let chunk = window[..len].to_vec();
        self.start += len;
        Ok(Some(chunk))
    }
}

/// The chunks of one input, borrowing a [`ChunkBuffer`].
pub struct Chunks<'a, R: Read> {
    buf: &'a mut ChunkBuffer,
    reader: R,
}

impl<R: Read> Iterator for Chunks<'_, R> {
    type Item = Result<Vec<u8>, ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.buf.next_chunk(&mut self.reader).transpose()
    }
}

/// Cuts a byte stream into content-defined chunks (owning its buffer; for many inputs,
/// reuse one [`ChunkBuffer`] instead).
pub struct Chunker<R: Read> {
    buf: ChunkBuffer,
    reader: R,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R, params: ChunkerParams) -> Result<Self, ChunkError> {
        Ok(Chunker {
            buf: ChunkBuffer::new(params)?,
            reader,
        })
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = Result<Vec<u8>, ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.buf.next_chunk(&mut self.reader).transpose()
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

    /// Reads at most `step` bytes per call, like a pipe.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn cuts_match_fastcdc_stream_and_buffer_is_reusable() {
        let mut data = vec![0u8; 9 * 1024 * 1024 + 77];
        rand::rngs::StdRng::seed_from_u64(11).fill_bytes(&mut data);
        // Half compressible, so some chunks reach the maximum size.
        for b in data[2 * 1024 * 1024..5 * 1024 * 1024].iter_mut() {
            *b = 0;
        }
        let p = ChunkerParams::DEFAULT;
        let expected: Vec<Vec<u8>> =
            fastcdc::v2020::StreamCDC::new(&data[..], p.min_size, p.avg_size, p.max_size)
                .map(|c| c.unwrap().data)
                .collect();
        let mut buf = ChunkBuffer::new(p).unwrap();
        for step in [usize::MAX, 65536, 4093] {
            let got: Vec<Vec<u8>> = buf
                .chunks(Trickle(&data, step))
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(got, expected, "read step {step}");
            // small inputs in between: one chunk each, none for an empty one
            let small: Vec<Vec<u8>> = buf.chunks(&data[..300]).collect::<Result<_, _>>().unwrap();
            assert_eq!(small, vec![data[..300].to_vec()]);
            assert_eq!(buf.chunks(&[][..]).count(), 0);
            let at_min: Vec<Vec<u8>> = buf
                .chunks(&data[..p.min_size as usize])
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(at_min.len(), 1);
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
