//! An `index/` object decoded for loading into the local index: the same protobuf as
//! [`IndexFile`](super::IndexFile), read without an allocation per entry. A rebuild reads
//! every entry of the repository (100 million at 25 TiB); decoded with prost, each one
//! cost two allocations (its id and its tenant's name) and their frees on another
//! thread, a fifth of the rebuild's time. Here an entry is 48 bytes in its pack's vector
//! and names its tenant by number in the object's own list.
//!
//! The reading follows protobuf's rules as prost does: fields in any order, unknown
//! fields skipped, a repeated message field appended, strings checked to be UTF-8, a
//! `uint32` taken from the low 32 bits of its varint. An entry whose id is not 32 bytes
//! is left out (the prost path skips it too).

use std::collections::HashMap;

use datamover_core::chunk::ChunkId;

use super::{IndexFile, PackEntries};

/// One entry of a [`FlatPack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlatBlob {
    pub id: ChunkId,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    /// The tenant's number in [`FlatFile::tenants`].
    pub tenant: u32,
}

/// The entries of one pack.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FlatPack {
    pub name: String,
    pub blobs: Vec<FlatBlob>,
}

/// An `index/` object: its packs, and the tenants its entries name.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FlatFile {
    pub packs: Vec<FlatPack>,
    pub tenants: Vec<String>,
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// A protobuf reader over one message's bytes.
struct Wire<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Wire<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Wire { buf, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        // At most 10 bytes.
        for i in 0..10 {
            let b = *self.buf.get(self.at).ok_or("a varint runs past the end")?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    /// The next field's number and wire type.
    fn key(&mut self) -> Result<(u64, u8), String> {
        let k = self.varint()?;
        Ok((k >> 3, (k & 7) as u8))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = usize::try_from(self.varint()?).map_err(|_| "a length too large")?;
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or("a field runs past the end")?;
        let b = &self.buf[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "a string is not UTF-8".to_string())
    }

    fn skip(&mut self, wire: u8) -> Result<(), String> {
        let n = match wire {
            VARINT => return self.varint().map(|_| ()),
            LEN => return self.bytes().map(|_| ()),
            I64 => 8,
            I32 => 4,
            w => return Err(format!("wire type {w} is not used by index objects")),
        };
        if self.buf.len() - self.at < n {
            return Err("a field runs past the end".into());
        }
        self.at += n;
        Ok(())
    }
}

impl FlatFile {
    /// Decodes an `index/` object's plain bytes.
    pub fn decode(buf: &[u8]) -> Result<FlatFile, String> {
        let mut out = FlatFile::default();
        let mut tenants: HashMap<&str, u32> = HashMap::new();
        let mut w = Wire::new(buf);
        // Bounded by the bytes: every step moves forward.
        while !w.done() {
            match w.key()? {
                (1, LEN) => {
                    let pack = decode_pack(w.bytes()?, &mut tenants, &mut out.tenants)?;
                    out.packs.push(pack);
                }
                (_, wire) => w.skip(wire)?,
            }
        }
        Ok(out)
    }

    /// The entries of a decoded [`IndexFile`] (this server's own, just written).
    pub fn from_index(file: &IndexFile) -> FlatFile {
        let mut out = FlatFile::default();
        let mut tenants: HashMap<&str, u32> = HashMap::new();
        for p in &file.packs {
            out.packs.push(flat_pack(p, &mut tenants, &mut out.tenants));
        }
        out
    }

    /// Entries in all packs.
    pub fn len(&self) -> usize {
        self.packs.iter().map(|p| p.blobs.len()).sum()
    }
}

fn tenant_no<'a>(name: &'a str, known: &mut HashMap<&'a str, u32>, list: &mut Vec<String>) -> u32 {
    if let Some(n) = known.get(name) {
        return *n;
    }
    let n = list.len() as u32;
    list.push(name.to_string());
    known.insert(name, n);
    n
}

fn flat_pack<'a>(
    p: &'a PackEntries,
    known: &mut HashMap<&'a str, u32>,
    list: &mut Vec<String>,
) -> FlatPack {
    let blobs = p
        .blobs
        .iter()
        .filter_map(|b| {
            Some(FlatBlob {
                id: ChunkId::from_slice(&b.id).ok()?,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
                tenant: tenant_no(&b.tenant, known, list),
            })
        })
        .collect();
    FlatPack {
        name: p.name.clone(),
        blobs,
    }
}

fn decode_pack<'a>(
    buf: &'a [u8],
    known: &mut HashMap<&'a str, u32>,
    list: &mut Vec<String>,
) -> Result<FlatPack, String> {
    let mut name = "";
    let mut blobs = Vec::new();
    let mut w = Wire::new(buf);
    while !w.done() {
        match w.key()? {
            (1, LEN) => name = w.str()?,
            (2, LEN) => {
                if let Some(b) = decode_blob(w.bytes()?, known, list)? {
                    blobs.push(b);
                }
            }
            (_, wire) => w.skip(wire)?,
        }
    }
    Ok(FlatPack {
        name: name.to_string(),
        blobs,
    })
}

fn decode_blob<'a>(
    buf: &'a [u8],
    known: &mut HashMap<&'a str, u32>,
    list: &mut Vec<String>,
) -> Result<Option<FlatBlob>, String> {
    let mut id: &[u8] = &[];
    let (mut offset, mut length, mut raw_length) = (0u32, 0u32, 0u32);
    let mut tenant = "";
    let mut w = Wire::new(buf);
    while !w.done() {
        match w.key()? {
            (1, LEN) => id = w.bytes()?,
            (2, VARINT) => offset = w.varint()? as u32,
            (3, VARINT) => length = w.varint()? as u32,
            (4, VARINT) => raw_length = w.varint()? as u32,
            (5, LEN) => tenant = w.str()?,
            (_, wire) => w.skip(wire)?,
        }
    }
    let Ok(id) = ChunkId::from_slice(id) else {
        return Ok(None);
    };
    Ok(Some(FlatBlob {
        id,
        offset,
        length,
        raw_length,
        tenant: tenant_no(tenant, known, list),
    }))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::index::BlobEntry;

    fn sample() -> IndexFile {
        let blob = |i: u8, tenant: &str| BlobEntry {
            id: vec![i; 32],
            offset: u32::from(i) * 1000,
            length: 70_000 + u32::from(i),
            raw_length: u32::MAX - u32::from(i),
            tenant: tenant.into(),
        };
        IndexFile {
            packs: vec![
                PackEntries {
                    name: "pack-a".into(),
                    blobs: vec![blob(1, "t"), blob(2, "u"), blob(3, "t")],
                    created_unix: 1_700_000_000,
                },
                PackEntries {
                    name: "pack-b".into(),
                    blobs: vec![
                        blob(4, "ü"),
                        BlobEntry {
                            id: vec![9; 31],
                            ..blob(5, "t")
                        },
                    ],
                    created_unix: 0,
                },
                PackEntries {
                    name: String::new(),
                    blobs: vec![],
                    created_unix: 5,
                },
            ],
        }
    }

    #[test]
    fn decodes_what_prost_encodes_as_prost_reads_it() {
        let file = sample();
        let flat = FlatFile::decode(&file.encode_to_vec()).unwrap();
        assert_eq!(flat, FlatFile::from_index(&file));
        assert_eq!(flat.tenants, vec!["t", "u", "ü"]);
        assert_eq!(flat.len(), 4, "the entry with a 31-byte id is left out");
        assert_eq!(flat.packs[0].blobs[1].tenant, 1);
        assert_eq!(flat.packs[0].blobs[2].raw_length, u32::MAX - 3);
        assert_eq!(FlatFile::decode(&[]).unwrap(), FlatFile::default());
    }

    #[test]
    fn unknown_fields_are_skipped_and_damage_is_an_error() {
        let mut raw = sample().encode_to_vec();
        // An unknown field of each wire type in front: field 15 as varint, i64, len, i32.
        let mut prefixed = vec![15 << 3, 0x96, 0x01];
        prefixed.extend([(15 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        prefixed.extend([(15 << 3) | 2, 2, b'h', b'i']);
        prefixed.extend([(15 << 3) | 5, 1, 2, 3, 4]);
        prefixed.extend(&raw);
        assert_eq!(
            FlatFile::decode(&prefixed).unwrap(),
            FlatFile::decode(&raw).unwrap()
        );
        // Every truncation is refused or decodes a prefix, never panics.
        for cut in 0..raw.len() {
            let _ = FlatFile::decode(&raw[..cut]);
        }
        raw.truncate(raw.len() - 1);
        assert!(FlatFile::decode(&raw).is_err());
        assert!(FlatFile::decode(&[0x0b]).is_err(), "a group");
        assert!(FlatFile::decode(&[0xff; 11]).is_err(), "a varint too long");
        // a string that is not UTF-8
        let bad = PackEntries {
            name: "x".into(),
            blobs: vec![],
            created_unix: 0,
        };
        let mut enc = IndexFile { packs: vec![bad] }.encode_to_vec();
        let at = enc.len() - 1;
        enc[at] = 0xff;
        assert!(FlatFile::decode(&enc).is_err());
        assert!(IndexFile::decode(enc.as_slice()).is_err(), "prost agrees");
    }
}
