//! A piece of a restored file's contents as it arrives: whole, or compressed as stored.
//! A compressed piece is decompressed and checked against its id by the writer thread
//! that writes it, so that work runs on every core and the server sends (and encrypts
//! for TLS) only the compressed bytes.

use bytes::Bytes;
use datamover_core::chunk::{ChunkId, ChunkIdKey};
use datamover_proto::v1::PackedData;

use crate::ClientError;

/// File contents as received.
pub(crate) enum Piece {
    /// Checked by the server.
    Plain(Bytes),
    /// Compressed; checked against its id once decompressed.
    Packed(PackedData),
}

impl Piece {
    /// Its size once decompressed.
    pub(crate) fn len(&self) -> usize {
        match self {
            Piece::Plain(b) => b.len(),
            Piece::Packed(p) => p.raw_length as usize,
        }
    }
}

/// Opens pieces: one per writer thread (it keeps a decompression context and buffer).
pub(crate) struct Unpacker {
    key: ChunkIdKey,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    buf: Vec<u8>,
}

impl Unpacker {
    pub(crate) fn new(key: ChunkIdKey) -> Self {
        Unpacker {
            key,
            zstd: None,
            buf: Vec::new(),
        }
    }

    /// The contents of `piece` (of a file `what`): a compressed one decompressed and
    /// checked against its id.
    pub(crate) fn open<'a>(
        &'a mut self,
        piece: &'a Piece,
        what: &dyn Fn() -> String,
    ) -> Result<&'a [u8], ClientError> {
        let p = match piece {
            Piece::Plain(b) => return Ok(b),
            Piece::Packed(p) => p,
        };
        let corrupt = |why: String| {
            ClientError::Corrupt(format!(
                "{}: {why}; nothing was written under its name: run verify on the server's repository, then restore again",
                what()
            ))
        };
        let raw = p.raw_length as usize;
        if raw > datamover_proto::MAX_MESSAGE_BYTES {
            return Err(corrupt(format!(
                "the server sent a chunk of {raw} bytes, more than any chunk holds"
            )));
        }
        let id = ChunkId::from_slice(&p.id)
            .map_err(|e| corrupt(format!("the server sent a bad chunk id: {e}")))?;
        let zstd = match &mut self.zstd {
            Some(z) => z,
            None => self.zstd.insert(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| ClientError::Io(format!("cannot start zstd: {e}")))?,
            ),
        };
        self.buf.clear();
        self.buf.reserve(raw);
        let n = zstd
            .decompress_to_buffer(&p.zstd[..], &mut self.buf)
            .map_err(|e| corrupt(format!("chunk {id} does not decompress: {e}")))?;
        if n != raw {
            return Err(corrupt(format!(
                "chunk {id} decompresses to {n} bytes, not {raw}"
            )));
        }
        if self.key.id(&self.buf) != id {
            return Err(corrupt(format!("chunk {id} does not match its id")));
        }
        Ok(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(key: &ChunkIdKey, data: &[u8]) -> PackedData {
        PackedData {
            zstd: Bytes::from(zstd::bulk::compress(data, 3).expect("compress")),
            raw_length: data.len() as u32,
            id: Bytes::copy_from_slice(&key.id(data).0),
        }
    }

    #[test]
    fn opens_and_checks_packed_pieces() {
        let key = ChunkIdKey::new([3; 32]);
        let data = b"restored restored restored restored".repeat(300);
        let mut u = Unpacker::new(key.clone());
        let what = || "f".to_string();

        let good = Piece::Packed(packed(&key, &data));
        assert_eq!(good.len(), data.len());
        assert_eq!(u.open(&good, &what).expect("opens"), &data[..]);

        // Another tenant's id: the content does not match.
        let mut wrong_id = packed(&key, &data);
        wrong_id.id = Bytes::copy_from_slice(&ChunkIdKey::new([4; 32]).id(&data).0);
        let e = u
            .open(&Piece::Packed(wrong_id), &what)
            .expect_err("refused");
        assert!(
            matches!(&e, ClientError::Corrupt(m) if m.contains("does not match its id")),
            "{e}"
        );

        // A length that is not what the data decompresses to.
        let mut wrong_len = packed(&key, &data);
        wrong_len.raw_length -= 1;
        assert!(matches!(
            u.open(&Piece::Packed(wrong_len), &what),
            Err(ClientError::Corrupt(_))
        ));

        // Damaged compressed bytes.
        let mut damaged = packed(&key, &data);
        damaged.zstd = Bytes::from(vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
        assert!(matches!(
            u.open(&Piece::Packed(damaged), &what),
            Err(ClientError::Corrupt(_))
        ));

        // A size no chunk has: refused before anything is allocated.
        let mut huge = packed(&key, &data);
        huge.raw_length = u32::MAX;
        assert!(matches!(
            u.open(&Piece::Packed(huge), &what),
            Err(ClientError::Corrupt(_))
        ));

        // Still works after the failures.
        assert_eq!(u.open(&good, &what).expect("opens"), &data[..]);
        let plain = Piece::Plain(Bytes::from_static(b"as is"));
        assert_eq!(u.open(&plain, &what).expect("plain"), b"as is");
    }
}
