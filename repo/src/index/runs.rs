//! Bulk loading of a rebuild: entries are sorted in runs of [`RUN_ENTRIES`] on local
//! disk, then merged into the B-tree in id order, so each of its pages is written once
//! (random inserts in batches rewrite most of the tree every batch). Memory: one run
//! being filled (about 30 MiB) while reading, a 64 KiB buffer a run while merging.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use datamover_core::chunk::ChunkId;

use super::disk::DiskError;

/// Entries sorted in memory before they are written as one run.
pub(crate) const RUN_ENTRIES: usize = 500_000;
/// The most runs (at [`RUN_ENTRIES`] each, 5 billion chunks).
const MAX_RUNS: usize = 10_000;
/// Bytes of one entry in a run: id, sequence, location.
const ENTRY_BYTES: usize = 32 + 4 + 20;

/// One entry: the id, its order of arrival (the first copy wins), the location.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RunEntry {
    pub id: [u8; 32],
    pub seq: u32,
    pub loc: [u8; 20],
}

fn fail(path: &Path, e: impl ToString) -> DiskError {
    DiskError::Cache {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Runs being written, in a directory of their own (removed when dropped).
pub(crate) struct Runs {
    dir: PathBuf,
    buf: Vec<RunEntry>,
    files: Vec<PathBuf>,
    seq: u32,
}

impl Drop for Runs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Runs {
    pub fn new(dir: PathBuf) -> Result<Runs, DiskError> {
        std::fs::create_dir_all(&dir).map_err(|e| fail(&dir, e))?;
        Ok(Runs {
            dir,
            buf: Vec::new(),
            files: Vec::new(),
            seq: 0,
        })
    }

    pub fn push(&mut self, id: &ChunkId, loc: [u8; 20]) -> Result<(), DiskError> {
        self.buf.push(RunEntry {
            id: id.0,
            seq: self.seq,
            loc,
        });
        self.seq = self.seq.wrapping_add(1);
        if self.buf.len() >= RUN_ENTRIES {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<(), DiskError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.files.len() >= MAX_RUNS {
            return Err(fail(&self.dir, "more index entries than a rebuild handles"));
        }
        self.buf.sort_unstable();
        let path = self.dir.join(format!("run-{}", self.files.len()));
        let f = File::create(&path).map_err(|e| fail(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 16, f);
        for e in &self.buf {
            w.write_all(&e.id).map_err(|x| fail(&path, x))?;
            w.write_all(&e.seq.to_be_bytes())
                .map_err(|x| fail(&path, x))?;
            w.write_all(&e.loc).map_err(|x| fail(&path, x))?;
        }
        w.flush().map_err(|e| fail(&path, e))?;
        self.files.push(path);
        self.buf = Vec::new();
        Ok(())
    }

    /// Every entry in id order (then arrival order), through `each`.
    pub fn merge(
        mut self,
        mut each: impl FnMut(&RunEntry) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        if self.files.is_empty() {
            // Everything fits one run: no file needed.
            self.buf.sort_unstable();
            for e in &self.buf {
                each(e)?;
            }
            return Ok(());
        }
        self.spill()?;
        let mut readers = Vec::with_capacity(self.files.len());
        for p in &self.files {
            let f = File::open(p).map_err(|e| fail(p, e))?;
            readers.push((BufReader::with_capacity(1 << 16, f), p.clone()));
        }
        let mut heap = BinaryHeap::new();
        for (i, (r, p)) in readers.iter_mut().enumerate() {
            if let Some(e) = read_entry(r, p)? {
                heap.push(std::cmp::Reverse((e, i)));
            }
        }
        // Bounded by the entries written: each pops one and pushes at most one.
        while let Some(std::cmp::Reverse((e, i))) = heap.pop() {
            each(&e)?;
            if let Some((r, p)) = readers.get_mut(i)
                && let Some(next) = read_entry(r, p)?
            {
                heap.push(std::cmp::Reverse((next, i)));
            }
        }
        Ok(())
    }
}

fn read_entry(r: &mut BufReader<File>, path: &Path) -> Result<Option<RunEntry>, DiskError> {
    let mut b = [0u8; ENTRY_BYTES];
    match r.read_exact(&mut b) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(fail(path, e)),
    }
    let mut e = RunEntry {
        id: [0; 32],
        seq: 0,
        loc: [0; 20],
    };
    e.id.copy_from_slice(&b[..32]);
    let mut seq = [0u8; 4];
    seq.copy_from_slice(&b[32..36]);
    e.seq = u32::from_be_bytes(seq);
    e.loc.copy_from_slice(&b[36..]);
    Ok(Some(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_runs_in_id_then_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Runs::new(dir.path().join("runs")).unwrap();
        let n = RUN_ENTRIES as u32 * 2 + 10;
        for i in 0..n {
            let id = ChunkId(*blake3::hash(&(i % (n - 5)).to_le_bytes()).as_bytes());
            runs.push(&id, [i as u8; 20]).unwrap();
        }
        let mut last: Option<RunEntry> = None;
        let mut count = 0u32;
        runs.merge(|e| {
            if let Some(l) = &last {
                assert!((l.id, l.seq) < (e.id, e.seq));
            }
            last = Some(*e);
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(count, n);
        assert!(!dir.path().join("runs").exists(), "removed after the merge");
    }
}
