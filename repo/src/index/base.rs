//! The bulk of the local index's chunk table: one sorted, immutable file that a rebuild
//! writes in a single sequential pass (no B-tree inserts), beside the redb file that
//! holds everything else and the chunks added since (the *delta*).
//!
//! Layout: a header (magic, format, stamp, count), then blocks of [`BLOCK`] bytes each
//! holding [`PER_BLOCK`] records (id, location) in id order, then a footer with the
//! first 8 bytes of each block's first id. Memory: the footer (8 bytes a block, about
//! 5 MiB at 100 million chunks). A lookup binary-searches the footer, reads one block
//! (`pread`, in the page cache once warm) and binary-searches it. The stamp is recorded
//! in the redb file's `meta` table by the same rebuild, so a file that does not belong to
//! the redb file beside it (torn, replaced, another rebuild's) is never used.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::disk::DiskError;

const MAGIC: &[u8; 8] = b"DMIXBASE";
const VERSION: u32 = 1;
/// Header: magic, version, stamp, count (padded).
const HEADER: u64 = 32;
/// One record: the id, then the location.
const RECORD: usize = 32 + 20;
/// Bytes of one block (a lookup reads one).
const BLOCK: usize = 8192;
/// Records in one block (the rest of it is padding).
const PER_BLOCK: usize = BLOCK / RECORD;
/// Blocks read at once by a scan (1 MiB).
const SCAN_BLOCKS: usize = 128;

fn fail(path: &Path, e: impl ToString) -> DiskError {
    DiskError::Cache {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

fn prefix(id: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id[..8]);
    u64::from_be_bytes(b)
}

/// Writes a base file, one record at a time in strictly increasing id order.
pub(crate) struct BaseWriter {
    out: BufWriter<File>,
    path: PathBuf,
    stamp: u64,
    count: u64,
    in_block: usize,
    firsts: Vec<u64>,
    last: Option<[u8; 32]>,
}

impl BaseWriter {
    pub fn create(path: &Path, stamp: u64) -> Result<BaseWriter, DiskError> {
        // Readable too: the finished file serves lookups through the same handle.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| fail(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        // The header is written last (a torn file has none).
        out.write_all(&[0u8; HEADER as usize])
            .map_err(|e| fail(path, e))?;
        Ok(BaseWriter {
            out,
            path: path.to_path_buf(),
            stamp,
            count: 0,
            in_block: 0,
            firsts: Vec::new(),
            last: None,
        })
    }

    pub fn push(&mut self, id: &[u8; 32], loc: &[u8; 20]) -> Result<(), DiskError> {
        if self.last.is_some_and(|l| l >= *id) {
            return Err(fail(&self.path, "entries written out of order"));
        }
        self.last = Some(*id);
        if self.in_block == 0 {
            self.firsts.push(prefix(id));
        }
        let mut rec = [0u8; RECORD];
        rec[..32].copy_from_slice(id);
        rec[32..].copy_from_slice(loc);
        self.out.write_all(&rec).map_err(|e| fail(&self.path, e))?;
        self.count += 1;
        self.in_block += 1;
        if self.in_block == PER_BLOCK {
            self.pad()?;
        }
        Ok(())
    }

    fn pad(&mut self) -> Result<(), DiskError> {
        let pad = BLOCK - self.in_block * RECORD;
        self.out
            .write_all(&[0u8; BLOCK][..pad])
            .map_err(|e| fail(&self.path, e))?;
        self.in_block = 0;
        Ok(())
    }

    /// Writes the footer and the header, and syncs the file to disk.
    pub fn finish(mut self) -> Result<BaseFile, DiskError> {
        if self.in_block > 0 {
            self.pad()?;
        }
        for f in &self.firsts {
            self.out
                .write_all(&f.to_le_bytes())
                .map_err(|e| fail(&self.path, e))?;
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| fail(&self.path, e.error()))?;
        file.write_all_at(&header(self.stamp, self.count), 0)
            .map_err(|e| fail(&self.path, e))?;
        file.sync_all().map_err(|e| fail(&self.path, e))?;
        Ok(BaseFile {
            file,
            path: self.path,
            count: self.count,
            firsts: self.firsts,
        })
    }
}

fn header(stamp: u64, count: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&stamp.to_le_bytes());
    h[20..28].copy_from_slice(&count.to_le_bytes());
    h
}

/// A base file, open for lookups and scans.
pub(crate) struct BaseFile {
    file: File,
    path: PathBuf,
    count: u64,
    /// The first 8 bytes of each block's first id.
    firsts: Vec<u64>,
}

impl BaseFile {
    /// Opens the base file at `path`, which must carry `stamp` and be whole.
    pub fn open(path: &Path, stamp: u64) -> Result<BaseFile, String> {
        let file = File::open(path).map_err(|e| format!("base file {}: {e}", path.display()))?;
        let mut h = [0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| format!("base file {}: {e}", path.display()))?;
        let count = u64::from_le_bytes(h[20..28].try_into().map_err(|_| "header")?);
        if h != header(stamp, count) {
            return Err(format!(
                "base file {} is not the one this index was built with",
                path.display()
            ));
        }
        let blocks = count.div_ceil(PER_BLOCK as u64);
        let len = file
            .metadata()
            .map_err(|e| format!("base file {}: {e}", path.display()))?
            .len();
        if len != HEADER + blocks * BLOCK as u64 + blocks * 8 {
            return Err(format!(
                "base file {} is {len} bytes, not what {count} entries take",
                path.display()
            ));
        }
        let mut raw = vec![0u8; blocks as usize * 8];
        file.read_exact_at(&mut raw, HEADER + blocks * BLOCK as u64)
            .map_err(|e| format!("base file {}: {e}", path.display()))?;
        let firsts = raw
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(BaseFile {
            file,
            path: path.to_path_buf(),
            count,
            firsts,
        })
    }

    /// Entries held.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Memory held (the footer), in bytes.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.firsts.len() * 8
    }

    /// Records in block `b`.
    fn in_block(&self, b: usize) -> usize {
        let start = b as u64 * PER_BLOCK as u64;
        (self.count.saturating_sub(start)).min(PER_BLOCK as u64) as usize
    }

    fn read_blocks(&self, first: usize, buf: &mut [u8]) -> Result<(), DiskError> {
        self.file
            .read_exact_at(buf, HEADER + (first * BLOCK) as u64)
            .map_err(|e| fail(&self.path, e))
    }

    /// The location of `id`, if the file holds it.
    pub fn get(&self, id: &[u8; 32]) -> Result<Option<[u8; 20]>, DiskError> {
        let p = prefix(id);
        let mut b = self.firsts.partition_point(|f| *f <= p);
        let mut buf = [0u8; BLOCK];
        // Bounded by the blocks: only ids sharing their first 8 bytes across a block's
        // edge send the search back more than one block.
        while b > 0 {
            b -= 1;
            self.read_blocks(b, &mut buf)?;
            let n = self.in_block(b);
            let rec = |i: usize| &buf[i * RECORD..(i + 1) * RECORD];
            let (mut lo, mut hi) = (0usize, n);
            while lo < hi {
                let mid = (lo + hi) / 2;
                match rec(mid)[..32].cmp(&id[..]) {
                    std::cmp::Ordering::Less => lo = mid + 1,
                    std::cmp::Ordering::Greater => hi = mid,
                    std::cmp::Ordering::Equal => {
                        let mut loc = [0u8; 20];
                        loc.copy_from_slice(&rec(mid)[32..]);
                        return Ok(Some(loc));
                    }
                }
            }
            // Before this block's first id: it can only be in the block before.
            if lo > 0 || n == 0 {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Calls `each` with every id whose first byte is `first`, in order.
    pub fn scan_first_byte(
        &self,
        first: u8,
        mut each: impl FnMut(&[u8; 32]),
    ) -> Result<(), DiskError> {
        let lo = u64::from(first) << 56;
        let start = self.firsts.partition_point(|f| *f < lo).saturating_sub(1);
        let blocks = self.firsts.len();
        let mut buf = vec![0u8; SCAN_BLOCKS * BLOCK];
        let mut b = start;
        // Bounded by the blocks.
        while b < blocks {
            let span = SCAN_BLOCKS.min(blocks - b);
            let buf = &mut buf[..span * BLOCK];
            self.read_blocks(b, buf)?;
            for k in 0..span {
                let n = self.in_block(b + k);
                for i in 0..n {
                    let at = k * BLOCK + i * RECORD;
                    let mut id = [0u8; 32];
                    id.copy_from_slice(&buf[at..at + 32]);
                    match id[0].cmp(&first) {
                        std::cmp::Ordering::Less => {}
                        std::cmp::Ordering::Equal => each(&id),
                        std::cmp::Ordering::Greater => return Ok(()),
                    }
                }
            }
            b += span;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> [u8; 32] {
        *blake3::hash(&n.to_le_bytes()).as_bytes()
    }

    #[test]
    fn finds_every_entry_and_nothing_else_and_scans_by_first_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        for n in [0u32, 1, PER_BLOCK as u32, PER_BLOCK as u32 + 1, 20_000] {
            let mut ids: Vec<[u8; 32]> = (0..n).map(id).collect();
            // ids that share their first 8 bytes, across a block's edge
            let mut twin = [7u8; 32];
            for k in 0..(PER_BLOCK as u8 + 3) {
                twin[31] = k;
                ids.push(twin);
            }
            ids.sort_unstable();
            let mut w = BaseWriter::create(&path, 42).unwrap();
            for (i, id) in ids.iter().enumerate() {
                w.push(id, &[(i % 251) as u8; 20]).unwrap();
            }
            assert!(w.push(&ids[0], &[0; 20]).is_err(), "out of order refused");
            let f = w.finish().unwrap();
            let f2 = BaseFile::open(&path, 42).unwrap();
            assert_eq!(f2.count(), ids.len() as u64);
            assert_eq!(f.bytes(), f2.bytes());
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(f2.get(id).unwrap(), Some([(i % 251) as u8; 20]), "n {n}");
                assert_eq!(
                    f.get(id).unwrap(),
                    Some([(i % 251) as u8; 20]),
                    "the writer's"
                );
            }
            for k in n..n + 500 {
                assert_eq!(f2.get(&id(k)).unwrap(), None);
            }
            assert_eq!(f2.get(&[0u8; 32]).unwrap(), None);
            assert_eq!(f2.get(&[0xff; 32]).unwrap(), None);
            let mut scanned = Vec::new();
            for b in 0..=255u8 {
                f2.scan_first_byte(b, |i| {
                    assert_eq!(i[0], b);
                    scanned.push(*i);
                })
                .unwrap();
            }
            assert_eq!(scanned, ids);
        }
    }

    #[test]
    fn a_torn_or_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let mut w = BaseWriter::create(&path, 1).unwrap();
        for n in 0..1000u32 {
            let mut i = [0u8; 32];
            i[..4].copy_from_slice(&n.to_be_bytes());
            w.push(&i, &[1; 20]).unwrap();
        }
        w.finish().unwrap();
        assert!(BaseFile::open(&path, 1).is_ok());
        assert!(BaseFile::open(&path, 2).is_err(), "another rebuild's");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 1).unwrap();
        assert!(BaseFile::open(&path, 1).is_err(), "torn");
        assert!(BaseFile::open(&dir.path().join("none"), 1).is_err());
    }
}
