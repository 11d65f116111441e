//! Sorting more entries than memory should hold: entries are sorted in runs of a bounded
//! batch ([`RUN_ENTRIES`] unless told) on local disk, then merged in order, reading a
//! 64 KiB buffer a run. A rebuild of the local index writes its base file this way (in
//! one sequential pass), and maintenance and verify plan over every index entry this way
//! without holding them all.
//!
//! [`Sorted`] is the general form over any fixed-size [`Record`]; [`Runs`] is the
//! rebuild's (id, order of arrival, location).

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datamover_core::chunk::ChunkId;

use super::disk::DiskError;

/// Entries sorted in memory before they are written as one run (about 30 MiB of the
/// rebuild's entries).
pub(crate) const RUN_ENTRIES: usize = 500_000;
/// The most runs of one sort (at [`RUN_ENTRIES`] each, 5 billion entries).
const MAX_RUNS: usize = 10_000;
/// The largest record.
const MAX_RECORD_BYTES: usize = 256;

/// A fixed-size entry that can be sorted on disk.
pub(crate) trait Record: Ord + Copy {
    /// Bytes of one record on disk.
    const BYTES: usize;
    fn put(&self, out: &mut [u8]);
    fn get(b: &[u8]) -> Self;
}

/// One entry of a rebuild: the id, its order of arrival (the first copy wins), the
/// location. Ordered by id, then arrival, then location.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunEntry {
    pub id: [u8; 32],
    pub seq: u32,
    pub loc: [u8; 20],
}

impl Ord for RunEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Ids are hashes: their first 8 bytes, compared as one number, almost always
        // decide (sorting and merging 100 million entries spent a sixth of their time
        // in byte-wise comparisons).
        let head = |id: &[u8; 32]| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&id[..8]);
            u64::from_be_bytes(b)
        };
        head(&self.id)
            .cmp(&head(&other.id))
            .then_with(|| self.id.cmp(&other.id))
            .then_with(|| self.seq.cmp(&other.seq))
            .then_with(|| self.loc.cmp(&other.loc))
    }
}

impl PartialOrd for RunEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Record for RunEntry {
    const BYTES: usize = 32 + 4 + 20;

    fn put(&self, out: &mut [u8]) {
        out[..32].copy_from_slice(&self.id);
        out[32..36].copy_from_slice(&self.seq.to_be_bytes());
        out[36..56].copy_from_slice(&self.loc);
    }

    fn get(b: &[u8]) -> Self {
        let mut e = RunEntry {
            id: [0; 32],
            seq: 0,
            loc: [0; 20],
        };
        e.id.copy_from_slice(&b[..32]);
        let mut seq = [0u8; 4];
        seq.copy_from_slice(&b[32..36]);
        e.seq = u32::from_be_bytes(seq);
        e.loc.copy_from_slice(&b[36..56]);
        e
    }
}

fn fail(path: &Path, e: impl ToString) -> DiskError {
    DiskError::Cache {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// A directory of runs, removed when the last user is gone.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Records being sorted: at most `batch` in memory, the rest in sorted runs on disk.
pub(crate) struct Sorted<R: Record> {
    dir: Arc<RunDir>,
    buf: Vec<R>,
    batch: usize,
    files: Vec<PathBuf>,
    pushed: u64,
}

impl<R: Record> Sorted<R> {
    /// A sort in `dir` (created; removed with everything in it once the sort and its
    /// merge are dropped) holding at most `batch` records in memory (at least 1).
    pub fn new(dir: PathBuf, batch: usize) -> Result<Sorted<R>, DiskError> {
        std::fs::create_dir_all(&dir).map_err(|e| fail(&dir, e))?;
        Ok(Sorted {
            dir: Arc::new(RunDir(dir)),
            buf: Vec::new(),
            batch: batch.max(1),
            files: Vec::new(),
            pushed: 0,
        })
    }

    pub fn push(&mut self, r: R) -> Result<(), DiskError> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.batch.min(RUN_ENTRIES));
        }
        self.buf.push(r);
        self.pushed += 1;
        if self.buf.len() >= self.batch {
            self.spill()?;
        }
        Ok(())
    }

    /// Records pushed so far.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Records held in memory now (never more than the batch).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn spill(&mut self) -> Result<(), DiskError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let dir = &self.dir.0;
        if self.files.len() >= MAX_RUNS {
            return Err(fail(dir, "more entries than one sort handles"));
        }
        self.buf.sort_unstable();
        let path = dir.join(format!("run-{}", self.files.len()));
        let f = File::create(&path).map_err(|e| fail(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 16, f);
        let mut b = [0u8; MAX_RECORD_BYTES];
        let b = &mut b[..R::BYTES.min(MAX_RECORD_BYTES)];
        for e in &self.buf {
            e.put(b);
            w.write_all(b).map_err(|x| fail(&path, x))?;
        }
        w.flush().map_err(|e| fail(&path, e))?;
        self.files.push(path);
        self.buf.clear();
        Ok(())
    }

    /// Every record in order, streaming. Records held in memory: the last partial batch
    /// (when nothing was spilled) or one a run.
    pub fn merged(mut self) -> Result<Merged<R>, DiskError> {
        if self.files.is_empty() {
            // Everything fits one batch: no file needed.
            self.buf.sort_unstable();
            let mut buf = std::mem::take(&mut self.buf);
            buf.reverse();
            return Ok(Merged {
                _dir: Arc::clone(&self.dir),
                source: Source::Memory(buf),
            });
        }
        self.spill()?;
        self.buf = Vec::new();
        let mut readers = Vec::with_capacity(self.files.len());
        for p in &self.files {
            let f = File::open(p).map_err(|e| fail(p, e))?;
            readers.push((BufReader::with_capacity(1 << 16, f), p.clone()));
        }
        let mut heap = BinaryHeap::with_capacity(readers.len());
        for (i, (r, p)) in readers.iter_mut().enumerate() {
            if let Some(e) = read_record::<R>(r, p)? {
                heap.push(std::cmp::Reverse((e, i)));
            }
        }
        Ok(Merged {
            _dir: Arc::clone(&self.dir),
            source: Source::Runs { readers, heap },
        })
    }
}

enum Source<R: Record> {
    /// Sorted, reversed (popped from the end).
    Memory(Vec<R>),
    Runs {
        readers: Vec<(BufReader<File>, PathBuf)>,
        heap: BinaryHeap<std::cmp::Reverse<(R, usize)>>,
    },
}

/// The records of a [`Sorted`] in order.
pub(crate) struct Merged<R: Record> {
    _dir: Arc<RunDir>,
    source: Source<R>,
}

impl<R: Record> Merged<R> {
    /// The next record, or `None` at the end. Bounded: each call takes one record and
    /// reads at most one.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<R>, DiskError> {
        match &mut self.source {
            Source::Memory(v) => Ok(v.pop()),
            Source::Runs { readers, heap } => {
                let Some(std::cmp::Reverse((e, i))) = heap.pop() else {
                    return Ok(None);
                };
                if let Some((r, p)) = readers.get_mut(i)
                    && let Some(next) = read_record::<R>(r, p)?
                {
                    heap.push(std::cmp::Reverse((next, i)));
                }
                Ok(Some(e))
            }
        }
    }

    /// The next record if it is at most `bound` (then taken), else `None` (left).
    pub fn next_upto(&mut self, bound: &R) -> Result<Option<R>, DiskError> {
        let head = match &self.source {
            Source::Memory(v) => v.last().copied(),
            Source::Runs { heap, .. } => heap.peek().map(|r| r.0.0),
        };
        match head {
            Some(h) if h <= *bound => self.next(),
            _ => Ok(None),
        }
    }
}

fn read_record<R: Record>(r: &mut BufReader<File>, path: &Path) -> Result<Option<R>, DiskError> {
    let mut b = [0u8; MAX_RECORD_BYTES];
    let b = &mut b[..R::BYTES.min(MAX_RECORD_BYTES)];
    match r.read_exact(b) {
        Ok(()) => Ok(Some(R::get(b))),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(fail(path, e)),
    }
}

/// A rebuild's entries being sorted (see the module docs).
pub(crate) struct Runs {
    sorted: Sorted<RunEntry>,
    seq: u32,
}

impl Runs {
    pub fn new(dir: PathBuf) -> Result<Runs, DiskError> {
        Ok(Runs {
            sorted: Sorted::new(dir, RUN_ENTRIES)?,
            seq: 0,
        })
    }

    pub fn push(&mut self, id: &ChunkId, loc: [u8; 20]) -> Result<(), DiskError> {
        let e = RunEntry {
            id: id.0,
            seq: self.seq,
            loc,
        };
        self.seq = self.seq.wrapping_add(1);
        self.sorted.push(e)
    }

    /// Every entry in id order (then arrival order), through `each`.
    pub fn merge(
        self,
        mut each: impl FnMut(&RunEntry) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let mut m = self.sorted.merged()?;
        // Bounded by the entries written: each call takes one.
        while let Some(e) = m.next()? {
            each(&e)?;
        }
        Ok(())
    }
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

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
    struct U(u64);

    impl Record for U {
        const BYTES: usize = 8;
        fn put(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.0.to_be_bytes());
        }
        fn get(b: &[u8]) -> Self {
            U(u64::from_be_bytes(b.try_into().unwrap()))
        }
    }

    #[test]
    fn a_small_batch_spills_and_merges_everything_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (n, batch) in [(0u64, 7usize), (5, 7), (7, 7), (1000, 7), (1000, 1)] {
            let run_dir = dir.path().join(format!("s-{n}-{batch}"));
            let mut s = Sorted::new(run_dir.clone(), batch).unwrap();
            let mut want = Vec::new();
            for i in 0..n {
                let v = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 500;
                want.push(v);
                s.push(U(v)).unwrap();
                assert!(s.buffered() < batch.max(1), "never more than a batch held");
            }
            want.sort_unstable();
            let mut m = s.merged().unwrap();
            let mut got = Vec::new();
            if let Some(&first) = want.first()
                && first > 0
            {
                assert_eq!(m.next_upto(&U(first - 1)).unwrap(), None);
            }
            while let Some(U(v)) = m.next().unwrap() {
                got.push(v);
            }
            assert_eq!(got, want, "n {n} batch {batch}");
            drop(m);
            assert!(!run_dir.exists(), "removed once merged and dropped");
        }
    }
}
