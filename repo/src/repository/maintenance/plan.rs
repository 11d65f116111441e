//! Maintenance's plan over every index entry without holding them all in memory.
//!
//! The decisions need, for every copy of every chunk, whether a snapshot refers to the
//! chunk; the copies are grouped by pack in `index/` and the references come from the
//! snapshots' trees in another order. Both are brought to the same order by sorting on
//! local disk ([`Sorted`]: at most a batch of records in memory, the rest in sorted runs):
//!
//! 1. every chunk id the snapshots refer to is sorted ([`Planner::reference`]);
//! 2. one read of the `index/` objects sorts every copy by chunk id with what the copy
//!    is apart from references (young, not the copy reads use, condemned and due, ...),
//!    and every pack listing by name (a pack listed twice is planned once: its first
//!    listing) ([`Planner::classify`]);
//! 3. a merge of the two sorted streams gives each copy its outcome, sorted again by
//!    its place (listing, position) ([`Planner::join`]);
//! 4. a second read of the same objects, in the same order, takes each pack's outcomes
//!    from that stream ([`Planner::decide`]) so the caller writes the compacted index and
//!    the rewritten packs as it goes.
//!
//! A listing's place is (object number in the listing of `index/`, pack position), so an
//! object that disappears between the two reads shifts nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use datamover_core::chunk::ChunkId;

use super::{CondemnedEntry, Fate};
use crate::RepoError;
use crate::index::{DiskError, IndexFile, Merged, PackEntries, Record, Sorted, WORK_PREFIX};

/// How a copy stands apart from references.
const YOUNG: u8 = 0;
const NOT_CANONICAL: u8 = 1;
const CANONICAL: u8 = 2;
const CANONICAL_DUE: u8 = 3;
const CANONICAL_WAITING: u8 = 4;

/// What happens to a copy.
const KEEP: u8 = 0;
const DEAD_COPY: u8 = 1;
const RESCUED: u8 = 2;
const REMOVED: u8 = 3;
const WAITING: u8 = 4;
const CONDEMN: u8 = 5;
const KEEP_REFERENCED: u8 = 6;

/// The outcome of a copy given its class and whether a snapshot refers to its chunk
/// (the order of the checks is the plan's: young, another copy, referenced, due,
/// waiting, else condemned now).
fn outcome(class: u8, referenced: bool) -> u8 {
    match class {
        YOUNG => KEEP,
        NOT_CANONICAL => DEAD_COPY,
        CANONICAL_DUE | CANONICAL_WAITING if referenced => RESCUED,
        _ if referenced => KEEP_REFERENCED,
        CANONICAL_DUE => REMOVED,
        CANONICAL_WAITING => WAITING,
        _ => CONDEMN,
    }
}

/// A chunk id a snapshot refers to.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Id([u8; 32]);

impl Record for Id {
    const BYTES: usize = 32;
    fn put(&self, out: &mut [u8]) {
        out[..32].copy_from_slice(&self.0);
    }
    fn get(b: &[u8]) -> Self {
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        Id(id)
    }
}

/// Where a pack is listed: object number << 32 | position in the object.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct At(u64);

impl Record for At {
    const BYTES: usize = 8;
    fn put(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.0.to_be_bytes());
    }
    fn get(b: &[u8]) -> Self {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[..8]);
        At(u64::from_be_bytes(v))
    }
}

/// A pack listing by name (its name's hash, fixed size), then place.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Listing {
    name: [u8; 32],
    at: u64,
}

impl Record for Listing {
    const BYTES: usize = 40;
    fn put(&self, out: &mut [u8]) {
        out[..32].copy_from_slice(&self.name);
        out[32..40].copy_from_slice(&self.at.to_be_bytes());
    }
    fn get(b: &[u8]) -> Self {
        let mut l = Listing {
            name: [0; 32],
            at: 0,
        };
        l.name.copy_from_slice(&b[..32]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[32..40]);
        l.at = u64::from_be_bytes(v);
        l
    }
}

/// A copy by chunk id: where it is listed, and its class.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ById {
    id: [u8; 32],
    at: u64,
    k: u32,
    class: u8,
}

impl Record for ById {
    const BYTES: usize = 45;
    fn put(&self, out: &mut [u8]) {
        out[..32].copy_from_slice(&self.id);
        out[32..40].copy_from_slice(&self.at.to_be_bytes());
        out[40..44].copy_from_slice(&self.k.to_be_bytes());
        out[44] = self.class;
    }
    fn get(b: &[u8]) -> Self {
        let mut r = ById {
            id: [0; 32],
            at: 0,
            k: 0,
            class: 0,
        };
        r.id.copy_from_slice(&b[..32]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[32..40]);
        r.at = u64::from_be_bytes(v);
        let mut k = [0u8; 4];
        k.copy_from_slice(&b[40..44]);
        r.k = u32::from_be_bytes(k);
        r.class = b[44];
        r
    }
}

/// A copy's outcome by place.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ByPlace {
    at: u64,
    k: u32,
    outcome: u8,
}

impl Record for ByPlace {
    const BYTES: usize = 13;
    fn put(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.at.to_be_bytes());
        out[8..12].copy_from_slice(&self.k.to_be_bytes());
        out[12] = self.outcome;
    }
    fn get(b: &[u8]) -> Self {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[..8]);
        let mut k = [0u8; 4];
        k.copy_from_slice(&b[8..12]);
        ByPlace {
            at: u64::from_be_bytes(v),
            k: u32::from_be_bytes(k),
            outcome: b[12],
        }
    }
}

fn at(object: usize, position: usize) -> Result<u64, RepoError> {
    let (o, p) = (u32::try_from(object), u32::try_from(position));
    match (o, p) {
        (Ok(o), Ok(p)) => Ok(u64::from(o) << 32 | u64::from(p)),
        _ => Err(RepoError::Task(
            "more index objects or packs in one object than maintenance plans".into(),
        )),
    }
}

/// A directory of this run's sorts under the index cache directory, removed when done
/// (and, if the process died, at the next start).
pub(in crate::repository) struct WorkDir(PathBuf);

impl WorkDir {
    pub fn new(parent: &Path) -> Result<WorkDir, RepoError> {
        let dir = parent.join(format!(
            "{WORK_PREFIX}{}-{:08x}.runs",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| {
            RepoError::from(DiskError::Cache {
                path: dir.display().to_string(),
                detail: e.to_string(),
            })
        })?;
        Ok(WorkDir(dir))
    }

    fn sorted<R: Record>(&self, what: &str, batch: usize) -> Result<Sorted<R>, RepoError> {
        Ok(Sorted::new(self.0.join(what), batch)?)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The plan for one pack.
pub(in crate::repository) struct PackPlan {
    pub fates: Vec<Fate>,
    pub live: u64,
    pub dead: u64,
    /// Copies condemned now.
    pub condemn: Vec<CondemnedEntry>,
    /// Copies whose condemnation stands.
    pub still: Vec<CondemnedEntry>,
}

/// Counts of the plan, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub(in crate::repository) struct Tally {
    pub packs: u64,
    pub chunks_referenced: u64,
    pub chunks_rescued: u64,
    pub chunks_removed: u64,
    pub chunks_waiting: u64,
    pub chunks_condemned: u64,
    /// The most records the plan held in memory at once.
    pub peak_records: usize,
    /// Records that went through a sort.
    pub sorted_records: u64,
}

/// The sorts of one plan (see the module docs).
pub(in crate::repository) struct Planner {
    work: WorkDir,
    batch: usize,
    referenced: Option<Sorted<Id>>,
    listings: Option<Sorted<Listing>>,
    by_id: Option<Sorted<ById>>,
    dups: Option<Merged<At>>,
    outcomes: Option<Merged<ByPlace>>,
    pub tally: Tally,
}

impl Planner {
    /// A plan sorting in `work`, `batch` records in memory per sort (at least 1024).
    pub fn new(work: WorkDir, batch: usize) -> Result<Planner, RepoError> {
        let batch = batch.max(1024);
        Ok(Planner {
            referenced: Some(work.sorted("referenced", batch)?),
            listings: Some(work.sorted("listings", batch)?),
            by_id: Some(work.sorted("by-id", batch)?),
            work,
            batch,
            dups: None,
            outcomes: None,
            tally: Tally::default(),
        })
    }

    fn observe(&mut self) {
        let held = self.referenced.as_ref().map_or(0, Sorted::buffered)
            + self.listings.as_ref().map_or(0, Sorted::buffered)
            + self.by_id.as_ref().map_or(0, Sorted::buffered);
        self.tally.peak_records = self.tally.peak_records.max(held);
    }

    /// Notes chunks a snapshot refers to.
    pub fn reference(&mut self, ids: impl IntoIterator<Item = ChunkId>) -> Result<(), RepoError> {
        let Some(s) = self.referenced.as_mut() else {
            return Err(RepoError::Task("references noted after the join".into()));
        };
        for id in ids {
            s.push(Id(id.0))?;
        }
        self.observe();
        Ok(())
    }

    /// Notes the copies of index object number `object`. `class` gives each copy's
    /// class: `canonical(pack, ids)` says which ids have their copy read in `pack`,
    /// `due` and `waiting` whether a condemnation of the copy may be swept or stands.
    pub fn classify(
        &mut self,
        object: usize,
        file: &IndexFile,
        young: impl Fn(&PackEntries) -> bool,
        canonical: impl Fn(&str, &[ChunkId]) -> Vec<bool>,
        condemned: impl Fn(&ChunkId, &str) -> (bool, bool),
    ) -> Result<(), RepoError> {
        let (Some(listings), Some(by_id)) = (self.listings.as_mut(), self.by_id.as_mut()) else {
            return Err(RepoError::Task("copies noted after the join".into()));
        };
        for (j, p) in file.packs.iter().enumerate() {
            let at = at(object, j)?;
            listings.push(Listing {
                name: *blake3::hash(p.name.as_bytes()).as_bytes(),
                at,
            })?;
            let young = young(p);
            let ids: Vec<(u32, ChunkId)> = p
                .blobs
                .iter()
                .enumerate()
                .filter_map(|(k, b)| {
                    Some((u32::try_from(k).ok()?, ChunkId::from_slice(&b.id).ok()?))
                })
                .collect();
            let here = if young {
                Vec::new()
            } else {
                canonical(&p.name, &ids.iter().map(|(_, id)| *id).collect::<Vec<_>>())
            };
            for (n, (k, id)) in ids.iter().enumerate() {
                let class = if young {
                    YOUNG
                } else if !here.get(n).copied().unwrap_or(false) {
                    NOT_CANONICAL
                } else {
                    match condemned(id, &p.name) {
                        (true, _) => CANONICAL_DUE,
                        (false, true) => CANONICAL_WAITING,
                        (false, false) => CANONICAL,
                    }
                };
                by_id.push(ById {
                    id: id.0,
                    at,
                    k: *k,
                    class,
                })?;
            }
        }
        self.observe();
        Ok(())
    }

    /// Merges references and copies: every copy's outcome, and which listings repeat a
    /// pack listed before. Call once, after every reference and copy.
    pub fn join(&mut self) -> Result<(), RepoError> {
        let (Some(referenced), Some(listings), Some(by_id)) = (
            self.referenced.take(),
            self.listings.take(),
            self.by_id.take(),
        ) else {
            return Err(RepoError::Task("the plan was joined twice".into()));
        };
        self.tally.sorted_records += referenced.pushed() + listings.pushed() + by_id.pushed();
        // Repeated listings: all but the first of each name.
        let mut dups: Sorted<At> = self.work.sorted("dups", self.batch)?;
        let mut listings = listings.merged()?;
        let mut last: Option<[u8; 32]> = None;
        // Bounded: each call takes one record.
        while let Some(l) = listings.next()? {
            if last == Some(l.name) {
                dups.push(At(l.at))?;
            } else {
                self.tally.packs += 1;
                last = Some(l.name);
            }
        }
        drop(listings);
        self.tally.sorted_records += dups.pushed();
        self.dups = Some(dups.merged()?);

        let mut outcomes: Sorted<ByPlace> = self.work.sorted("outcomes", self.batch)?;
        let mut refs = referenced.merged()?;
        let mut copies = by_id.merged()?;
        let mut head = refs.next()?;
        let mut last_ref: Option<[u8; 32]> = None;
        let mut distinct = 0u64;
        let mut count = |id: &Id| {
            if last_ref != Some(id.0) {
                distinct += 1;
                last_ref = Some(id.0);
            }
        };
        // Bounded: each turn takes one copy; the inner loop takes one reference a turn.
        while let Some(c) = copies.next()? {
            while let Some(h) = head.filter(|h| h.0 < c.id) {
                count(&h);
                head = refs.next()?;
            }
            let referenced = head.is_some_and(|h| h.0 == c.id);
            outcomes.push(ByPlace {
                at: c.at,
                k: c.k,
                outcome: outcome(c.class, referenced),
            })?;
        }
        while let Some(h) = head {
            count(&h);
            head = refs.next()?;
        }
        self.tally.chunks_referenced = distinct;
        self.tally.sorted_records += outcomes.pushed();
        self.outcomes = Some(outcomes.merged()?);
        Ok(())
    }

    /// The plan of pack `position` of object `object` (read again, in the order of
    /// [`Planner::classify`]), or `None` if an earlier listing of the pack is planned.
    pub fn decide(
        &mut self,
        object: usize,
        position: usize,
        pack: &PackEntries,
    ) -> Result<Option<PackPlan>, RepoError> {
        let (Some(dups), Some(outcomes)) = (self.dups.as_mut(), self.outcomes.as_mut()) else {
            return Err(RepoError::Task("a pack decided before the join".into()));
        };
        let at = at(object, position)?;
        let mut dup = false;
        // Listings before this one that were not read again are passed over.
        while let Some(d) = dups.next_upto(&At(at))? {
            dup |= d.0 == at;
        }
        if dup {
            return Ok(None);
        }
        let mut plan = PackPlan {
            fates: Vec::with_capacity(pack.blobs.len()),
            live: 0,
            dead: 0,
            condemn: Vec::new(),
            still: Vec::new(),
        };
        for (k, b) in pack.blobs.iter().enumerate() {
            let k = u32::try_from(k).unwrap_or(u32::MAX);
            let bound = ByPlace {
                at,
                k,
                outcome: u8::MAX,
            };
            let mut found = None;
            // Bounded by the records up to this copy's place.
            while let Some(r) = outcomes.next_upto(&bound)? {
                if r.at == at && r.k == k {
                    found = Some(r.outcome);
                }
            }
            let Some(o) = found else {
                // Not a chunk id: kept as it is, counted nowhere.
                plan.fates.push(Fate::Keep);
                continue;
            };
            let entry = || CondemnedEntry {
                id: b.id.clone(),
                pack: pack.name.clone(),
            };
            let fate = match o {
                DEAD_COPY => Fate::Dead,
                REMOVED => {
                    self.tally.chunks_removed += 1;
                    Fate::Dead
                }
                RESCUED => {
                    self.tally.chunks_rescued += 1;
                    Fate::Keep
                }
                WAITING => {
                    self.tally.chunks_waiting += 1;
                    plan.still.push(entry());
                    Fate::Keep
                }
                CONDEMN => {
                    self.tally.chunks_condemned += 1;
                    plan.condemn.push(entry());
                    Fate::Keep
                }
                _ => Fate::Keep,
            };
            match fate {
                Fate::Keep => plan.live += u64::from(b.length),
                Fate::Dead => plan.dead += u64::from(b.length),
            }
            plan.fates.push(fate);
        }
        Ok(Some(plan))
    }
}

/// Which packs of `files` are listed earlier (by name), for verify: `(object, position)`
/// of every repeated listing, streaming, with at most `batch` records in memory.
pub(in crate::repository) struct Repeats {
    listings: Option<Sorted<Listing>>,
    dups: Option<Merged<At>>,
    work: WorkDir,
    batch: usize,
}

impl Repeats {
    pub fn new(work: WorkDir, batch: usize) -> Result<Repeats, RepoError> {
        let batch = batch.max(1024);
        Ok(Repeats {
            listings: Some(work.sorted("listings", batch)?),
            dups: None,
            work,
            batch,
        })
    }

    /// Notes the packs of object number `object`.
    pub fn note(&mut self, object: usize, file: &IndexFile) -> Result<(), RepoError> {
        let Some(l) = self.listings.as_mut() else {
            return Err(RepoError::Task("packs noted after the merge".into()));
        };
        for (j, p) in file.packs.iter().enumerate() {
            l.push(Listing {
                name: *blake3::hash(p.name.as_bytes()).as_bytes(),
                at: at(object, j)?,
            })?;
        }
        Ok(())
    }

    /// Is pack `position` of object `object` listed earlier? Asked in order.
    pub fn repeated(&mut self, object: usize, position: usize) -> Result<bool, RepoError> {
        if let Some(listings) = self.listings.take() {
            let mut dups: Sorted<At> = self.work.sorted("dups", self.batch)?;
            let mut m = listings.merged()?;
            let mut last: Option<[u8; 32]> = None;
            // Bounded: each call takes one record.
            while let Some(l) = m.next()? {
                if last == Some(l.name) {
                    dups.push(At(l.at))?;
                }
                last = Some(l.name);
            }
            self.dups = Some(dups.merged()?);
        }
        let Some(dups) = self.dups.as_mut() else {
            return Ok(false);
        };
        let at = at(object, position)?;
        let mut dup = false;
        while let Some(d) = dups.next_upto(&At(at))? {
            dup |= d.0 == at;
        }
        Ok(dup)
    }
}

/// Condemnations as the plan sees them: (chunk, pack) pairs that may be swept now and
/// those that wait.
pub(in crate::repository) struct Condemnations {
    pub due: HashSet<(ChunkId, String)>,
    pub waiting: HashSet<(ChunkId, String)>,
}

impl Condemnations {
    pub fn of(&self, id: &ChunkId, pack: &str) -> (bool, bool) {
        if self.due.is_empty() && self.waiting.is_empty() {
            return (false, false);
        }
        let key = (*id, pack.to_string());
        (self.due.contains(&key), self.waiting.contains(&key))
    }
}

/// Names written to a file in a [`WorkDir`] and read back in order: the packs a run
/// deletes once everything is written, without holding their names.
pub(in crate::repository) struct NameLog {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

fn io_fail(path: &Path, e: std::io::Error) -> RepoError {
    RepoError::from(DiskError::Cache {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// The longest name a [`NameLog`] takes (object names are 64 hex digits).
const MAX_NAME: usize = 1024;

impl NameLog {
    pub fn new(work: &WorkDir, what: &str) -> Result<NameLog, RepoError> {
        let path = work.0.join(what);
        let f = std::fs::File::create(&path).map_err(|e| io_fail(&path, e))?;
        Ok(NameLog {
            out: std::io::BufWriter::with_capacity(1 << 16, f),
            path,
        })
    }

    pub fn add(&mut self, name: &str) -> Result<(), RepoError> {
        use std::io::Write;
        if name.len() > MAX_NAME || name.contains('\n') {
            return Err(RepoError::corrupt(
                "index",
                format!("a pack name of {} bytes", name.len()),
            ));
        }
        self.out
            .write_all(name.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|e| io_fail(&self.path, e))
    }

    /// The names in the order written.
    pub fn read(mut self) -> Result<NameReader, RepoError> {
        use std::io::Write;
        self.out.flush().map_err(|e| io_fail(&self.path, e))?;
        let f = std::fs::File::open(&self.path).map_err(|e| io_fail(&self.path, e))?;
        Ok(NameReader {
            input: std::io::BufReader::with_capacity(1 << 16, f),
            path: self.path,
        })
    }
}

pub(in crate::repository) struct NameReader {
    input: std::io::BufReader<std::fs::File>,
    path: PathBuf,
}

impl NameReader {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<String>, RepoError> {
        use std::io::{BufRead, Read};
        let mut line = String::new();
        let n = (&mut self.input)
            .take(MAX_NAME as u64 + 1)
            .read_line(&mut line)
            .map_err(|e| io_fail(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(line.trim_end_matches('\n').to_string()))
    }
}

/// Runs `f`, which reads or writes local files, without holding up other tasks of a
/// multi-threaded runtime.
pub(in crate::repository) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
