//! The streaming plan against the plan as it was made in memory (every index entry and
//! every reference in hash maps), on random repositories with a small batch so that
//! every sort spills to runs on disk.

use std::collections::{HashMap, HashSet};

use datamover_core::chunk::ChunkId;

use super::plan::{Condemnations, Planner, WorkDir};
use super::{CondemnedEntry, Fate};
use crate::index::{BlobEntry, IndexFile, PackEntries};

/// A small xorshift, so every run sees the same repositories.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn id(i: u64) -> ChunkId {
    ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

struct Case {
    objects: Vec<IndexFile>,
    referenced: Vec<ChunkId>,
    canonical: HashMap<ChunkId, String>,
    cond: Condemnations,
    now: u64,
    grace: u64,
}

/// `packs` packs of up to 40 chunks drawn from a pool (so chunks have several copies),
/// spread over objects, some packs listed twice, some ids not ids at all.
fn case(seed: u64, packs: u64) -> Case {
    let mut r = Rng(seed | 1);
    let pool = packs * 12;
    let (now, grace) = (1_000_000u64, 100u64);
    let mut all: Vec<PackEntries> = Vec::new();
    for p in 0..packs {
        let n = 1 + r.below(40);
        let blobs = (0..n)
            .map(|k| BlobEntry {
                id: if r.below(200) == 0 {
                    vec![7; 5]
                } else {
                    id(r.below(pool)).0.to_vec()
                },
                offset: k as u32 * 100,
                length: 1 + r.below(1000) as u32,
                raw_length: 2000,
                tenant: "t".into(),
            })
            .collect();
        all.push(PackEntries {
            name: format!(
                "{:064x}",
                blake3::hash(&p.to_le_bytes()).as_bytes()[0] as u64 + p * 1000
            ),
            blobs,
            created_unix: if r.below(10) == 0 {
                now - 10
            } else {
                now - 1000
            },
        });
    }
    let mut objects: Vec<IndexFile> = Vec::new();
    for p in &all {
        if objects.is_empty() || r.below(30) == 0 {
            objects.push(IndexFile { packs: Vec::new() });
        }
        if let Some(o) = objects.last_mut() {
            o.packs.push(p.clone());
        }
        if r.below(25) == 0 {
            // Listed again by a later object (a repeat is planned once, as first listed).
            let again = r.below(all.len() as u64) as usize;
            let o = objects.len() - 1 - r.below(objects.len() as u64 / 2 + 1) as usize;
            let last = objects.len() - 1;
            objects[o.min(last)].packs.push(all[again].clone());
        }
    }
    // The copy reads use: one of the packs holding the chunk, or none.
    let mut holders: HashMap<ChunkId, Vec<String>> = HashMap::new();
    for p in &all {
        for b in &p.blobs {
            if let Ok(i) = ChunkId::from_slice(&b.id) {
                holders.entry(i).or_default().push(p.name.clone());
            }
        }
    }
    let mut canonical = HashMap::new();
    let mut cond = Condemnations {
        due: HashSet::new(),
        waiting: HashSet::new(),
    };
    let mut keys: Vec<&ChunkId> = holders.keys().collect();
    keys.sort();
    for i in keys {
        let h = &holders[i];
        if r.below(20) != 0 {
            canonical.insert(*i, h[r.below(h.len() as u64) as usize].clone());
        }
        for p in h {
            match r.below(8) {
                0 => {
                    cond.due.insert((*i, p.clone()));
                }
                1 => {
                    cond.waiting.insert((*i, p.clone()));
                }
                2 => {
                    cond.due.insert((*i, p.clone()));
                    cond.waiting.insert((*i, p.clone()));
                }
                _ => {}
            }
        }
    }
    let referenced = (0..pool * 2 / 3)
        .map(|_| id(r.below(pool + pool / 10)))
        .collect();
    Case {
        objects,
        referenced,
        canonical,
        cond,
        now,
        grace,
    }
}

/// What a plan decided: per pack (fates, live, dead), condemned now, still condemned,
/// and the counts (packs, referenced, rescued, removed, waiting, condemned).
#[derive(Debug, PartialEq)]
struct Outcome {
    packs: HashMap<String, (Vec<bool>, u64, u64)>,
    condemn: HashSet<CondemnedEntry>,
    still: HashSet<CondemnedEntry>,
    counts: [u64; 6],
}

/// The plan as maintenance made it before: every entry in memory.
fn in_memory(c: &Case) -> Outcome {
    let mut packs: HashMap<String, PackEntries> = HashMap::new();
    for f in &c.objects {
        for p in &f.packs {
            packs.entry(p.name.clone()).or_insert_with(|| p.clone());
        }
    }
    let referenced: HashSet<ChunkId> = c.referenced.iter().copied().collect();
    let mut out = Outcome {
        packs: HashMap::new(),
        condemn: HashSet::new(),
        still: HashSet::new(),
        counts: [packs.len() as u64, referenced.len() as u64, 0, 0, 0, 0],
    };
    for p in packs.values() {
        let young = p.created_unix + c.grace > c.now;
        let (mut fates, mut live, mut dead) = (Vec::new(), 0u64, 0u64);
        for b in &p.blobs {
            let Ok(id) = ChunkId::from_slice(&b.id) else {
                fates.push(true);
                continue;
            };
            let canonical_here = c.canonical.get(&id).is_some_and(|x| *x == p.name);
            let key = (id, p.name.clone());
            let entry = CondemnedEntry {
                id: id.0.to_vec(),
                pack: p.name.clone(),
            };
            let fate = if young {
                Fate::Keep
            } else if !canonical_here {
                Fate::Dead
            } else if referenced.contains(&id) {
                if c.cond.due.contains(&key) || c.cond.waiting.contains(&key) {
                    out.counts[2] += 1;
                }
                Fate::Keep
            } else if c.cond.due.contains(&key) {
                out.counts[3] += 1;
                Fate::Dead
            } else if c.cond.waiting.contains(&key) {
                out.counts[4] += 1;
                out.still.insert(entry);
                Fate::Keep
            } else {
                out.counts[5] += 1;
                out.condemn.insert(entry);
                Fate::Keep
            };
            match fate {
                Fate::Keep => live += u64::from(b.length),
                Fate::Dead => dead += u64::from(b.length),
            }
            fates.push(fate == Fate::Keep);
        }
        out.packs.insert(p.name.clone(), (fates, live, dead));
    }
    out
}

/// The streaming plan, `batch` records a sort in memory. Returns the outcome and the
/// most records it held at once.
fn streaming(c: &Case, batch: usize) -> (Outcome, usize, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Planner::new(WorkDir::new(dir.path()).unwrap(), batch).unwrap();
    for ids in c.referenced.chunks(100) {
        p.reference(ids.iter().copied()).unwrap();
    }
    for (i, f) in c.objects.iter().enumerate() {
        p.classify(
            i,
            f,
            |pack| pack.created_unix + c.grace > c.now,
            |pack, ids| {
                ids.iter()
                    .map(|id| c.canonical.get(id).is_some_and(|x| x == pack))
                    .collect()
            },
            |id, pack| c.cond.of(id, pack),
        )
        .unwrap();
    }
    p.join().unwrap();
    let mut out = Outcome {
        packs: HashMap::new(),
        condemn: HashSet::new(),
        still: HashSet::new(),
        counts: [0; 6],
    };
    for (i, f) in c.objects.iter().enumerate() {
        for (j, pack) in f.packs.iter().enumerate() {
            let Some(plan) = p.decide(i, j, pack).unwrap() else {
                continue;
            };
            let fates = plan.fates.iter().map(|f| *f == Fate::Keep).collect();
            let old = out
                .packs
                .insert(pack.name.clone(), (fates, plan.live, plan.dead));
            assert!(old.is_none(), "pack {} planned twice", pack.name);
            out.condemn.extend(plan.condemn);
            out.still.extend(plan.still);
        }
    }
    let t = p.tally;
    out.counts = [
        t.packs,
        t.chunks_referenced,
        t.chunks_rescued,
        t.chunks_removed,
        t.chunks_waiting,
        t.chunks_condemned,
    ];
    drop(p);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the sorts' runs are removed"
    );
    (out, t.peak_records, t.sorted_records)
}

#[test]
fn the_streaming_plan_decides_as_the_plan_in_memory_did() {
    for (seed, packs) in [(1u64, 1u64), (2, 30), (3, 600), (4, 1500)] {
        let c = case(seed, packs);
        let want = in_memory(&c);
        let (got, peak, sorted) = streaming(&c, 1024);
        assert_eq!(got.counts, want.counts, "seed {seed}");
        assert_eq!(got.packs.len(), want.packs.len(), "seed {seed}");
        for (name, w) in &want.packs {
            assert_eq!(got.packs.get(name), Some(w), "seed {seed} pack {name}");
        }
        assert_eq!(got.condemn, want.condemn, "seed {seed}");
        assert_eq!(got.still, want.still, "seed {seed}");
        let entries: u64 = c
            .objects
            .iter()
            .flat_map(|f| &f.packs)
            .map(|p| p.blobs.len() as u64)
            .sum();
        // Every sort holds at most its batch; three fill at once.
        assert!(peak <= 3 * 1024, "seed {seed}: {peak} records held at once");
        if packs >= 600 {
            // This plan did not fit the batch: it really went through runs on disk.
            assert!(entries > 10 * 1024, "seed {seed}: {entries} entries");
            assert!(sorted >= entries, "seed {seed}");
            // Every outcome is nontrivial in the larger cases.
            assert!(want.counts[2..].iter().all(|n| *n > 0), "{:?}", want.counts);
        }
    }
}

#[test]
fn the_plan_holds_a_batch_whatever_the_repository_size() {
    // The same batch over ten times the entries: the records held do not grow.
    let small = streaming(&case(9, 200), 1024).1;
    let large = streaming(&case(9, 2000), 1024).1;
    assert!(large <= 3 * 1024, "{large}");
    assert!(large <= small.max(1024) * 3, "{small} then {large}");
}
