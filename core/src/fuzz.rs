//! A small mutation fuzzer for the decoders of untrusted bytes, run by the crates' own
//! tests on the stable toolchain (`cargo test … fuzz_`), so CI runs every harness.
//!
//! Each harness gives seeds (valid encodings, plus the files under
//! `fuzz/corpus/<harness>/` if any) and a check that must not panic. Inputs are the seeds
//! mutated: bit flips, interesting bytes, 4- and 8-byte length fields set to extremes,
//! truncation, random runs inserted, slices duplicated, and seeds spliced together.
//! A plain `cargo test` runs [`DEFAULT_RUNS`] inputs per harness; with
//! `DATAMOVER_FUZZ_SECONDS=<n>` (what `scripts/fuzz.sh <n>` sets) each harness runs for
//! that long. `DATAMOVER_FUZZ_SEED` picks another sequence of inputs.
//!
//! [`LargestAlloc`] is a global allocator for test binaries that records the largest
//! allocation each thread made, so a harness can check that no input makes a decoder
//! allocate far more than the input's size (a length read from the input and trusted).
//!
//! A failing input is written to `target/fuzz-failures/<harness>-<hash>` (to be copied
//! into the corpus once fixed) before the panic is passed on.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Inputs per harness in a plain test run.
pub const DEFAULT_RUNS: u64 = 4000;

/// No input of a harness may make one allocation larger than this plus 64 times the
/// input's length.
pub const ALLOC_SLACK: usize = 8 * 1024 * 1024;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, recording the largest allocation of each thread.
pub struct LargestAlloc;

impl LargestAlloc {
    fn note(size: usize) {
        let _ = LARGEST.try_with(|l| {
            if size > l.get() {
                l.set(size);
            }
        });
    }

    /// The largest allocation of this thread since the last call.
    pub fn take() -> usize {
        LARGEST.try_with(|l| l.replace(0)).unwrap_or(0)
    }
}

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for LargestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// A xorshift generator: deterministic, no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, b'/', b'.'];

/// One to four mutations of `input`, some mixing in `other`.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(9) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if v.len() >= 4 => {
                // A length field, little- or big-endian, set to an extreme.
                let i = rng.below(v.len() - 3);
                let value: u32 = [u32::MAX, 0x7fff_ffff, 0x0100_0000, 0][rng.below(4)];
                let bytes = if rng.below(2) == 0 {
                    value.to_le_bytes()
                } else {
                    value.to_be_bytes()
                };
                v[i..i + 4].copy_from_slice(&bytes);
            }
            3 => {
                // A varint as large as it gets (protobuf lengths).
                let i = rng.below(v.len() + 1);
                let big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
                let n = 1 + rng.below(big.len());
                v.splice(i..i, big[big.len() - n..].iter().copied());
            }
            4 if !v.is_empty() => {
                let keep = rng.below(v.len());
                v.truncate(keep);
            }
            5 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let run: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(i..i, run);
            }
            6 if !v.is_empty() => {
                let a = rng.below(v.len());
                let b = (a + 1 + rng.below(64)).min(v.len());
                let piece = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, piece);
            }
            7 if !other.is_empty() => {
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = rng.below(v.len() - i + 1);
                v.drain(i..i + n);
            }
            _ => v.push(rng.next_u64() as u8),
        }
    }
    v
}

/// The corpus files of `harness` under the workspace's `fuzz/corpus/`.
fn corpus(harness: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(harness);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Writes a failing input where it can be found again.
fn keep_failure(harness: &str, input: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in input {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    let path = dir.join(format!("{harness}-{h:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

/// Runs `check` on the seeds, then on mutations of them, for [`DEFAULT_RUNS`] inputs or
/// `DATAMOVER_FUZZ_SECONDS`. Panics (after saving the input) if `check` panics or makes
/// an allocation larger than [`ALLOC_SLACK`] plus 64 times the input. Returns the number
/// of inputs run.
pub fn run(harness: &str, seeds: &[Vec<u8>], mut check: impl FnMut(&[u8])) -> u64 {
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    pool.extend(corpus(harness));
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let seconds = std::env::var("DATAMOVER_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let seed = std::env::var("DATAMOVER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0x5eed);
    let mut rng = Rng::new(
        seed ^ harness
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
    );
    let started = Instant::now();
    let mut runs = 0u64;
    let mut one = |input: &[u8]| {
        LargestAlloc::take();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(input)));
        let largest = LargestAlloc::take();
        let limit = ALLOC_SLACK + 64 * input.len();
        if r.is_err() || largest > limit {
            let path = keep_failure(harness, input);
            if let Err(p) = r {
                eprintln!("{harness}: input saved as {}", path.display());
                std::panic::resume_unwind(p);
            }
            panic!(
                "{harness}: an input of {} bytes made an allocation of {largest} bytes; input saved as {}",
                input.len(),
                path.display()
            );
        }
    };
    for s in pool.clone() {
        one(&s);
        runs += 1;
    }
    loop {
        match seconds {
            Some(s) if started.elapsed() >= Duration::from_secs(s) => break,
            None if runs >= DEFAULT_RUNS => break,
            _ => {}
        }
        let a = &pool[rng.below(pool.len())];
        let b = &pool[rng.below(pool.len())];
        let input = mutate(&mut rng, a, b);
        one(&input);
        runs += 1;
        // Mutations of mutations, now and then, reach deeper.
        if rng.below(8) == 0 && pool.len() < 256 {
            pool.push(input);
        }
    }
    runs
}
