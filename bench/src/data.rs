//! The data sets, deterministic from a seed, and what the scenarios do to them.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, RngCore, SeedableRng};

use crate::Res;

const WORDS: &[&str] = &[
    "backup", "restore", "chunk", "server", "client", "tenant", "volume", "kanister", "pod",
    "storage", "object", "bucket", "snapshot", "stream", "pipe", "index", "pack", "the", "of",
    "and", "to", "data", "device", "edge", "sync", "error", "retry", "metrics", "config",
];

pub(crate) fn text(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
        out.push(if rng.gen_bool(0.1) { b'\n' } else { b' ' });
        if rng.gen_bool(0.05) {
            out.extend_from_slice(format!("{}", rng.r#gen::<u32>()).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Half compressible: alternating 64 KiB of text and of random bytes.
pub(crate) fn half_compressible(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(64 * 1024);
        if (out.len() / (64 * 1024)) % 2 == 0 {
            out.extend(text(rng, n));
        } else {
            let mut b = vec![0u8; n];
            rng.fill_bytes(&mut b);
            out.extend(b);
        }
    }
    out
}

/// (a) About 1 GiB: 20,000 small text files, 300 medium, 3 large half-compressible.
pub(crate) fn make_mixed(root: &Path, seed: u64, scale: f64) -> Res<Vec<PathBuf>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut files = Vec::new();
    let small = (20_000.0 * scale) as usize;
    for i in 0..small {
        let dir = root.join(format!("small/d{:03}", i % 200));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let p = dir.join(format!("f{i:05}.txt"));
        let len = rng.gen_range(512..10_000);
        std::fs::write(&p, text(&mut rng, len)).map_err(|e| e.to_string())?;
        files.push(p);
    }
    std::fs::create_dir_all(root.join("medium")).map_err(|e| e.to_string())?;
    for i in 0..((300.0 * scale) as usize).max(1) {
        let p = root.join(format!("medium/m{i:03}.bin"));
        let len = rng.gen_range(512 * 1024..2 * 1024 * 1024);
        std::fs::write(&p, half_compressible(&mut rng, len)).map_err(|e| e.to_string())?;
        files.push(p);
    }
    std::fs::create_dir_all(root.join("large")).map_err(|e| e.to_string())?;
    for i in 0..3 {
        let p = root.join(format!("large/l{i}.img"));
        let len = (180.0 * 1024.0 * 1024.0 * scale) as usize;
        std::fs::write(&p, half_compressible(&mut rng, len)).map_err(|e| e.to_string())?;
        files.push(p);
    }
    Ok(files)
}

/// Data set (d): `n` small files (50 to 300 bytes of text) in directories of 1000.
pub(crate) fn make_many(root: &Path, seed: u64, n: usize) -> Res<Vec<PathBuf>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut files = Vec::with_capacity(n);
    for i in 0..n {
        let dir = root.join(format!("d{:04}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        }
        let p = dir.join(format!("f{i:07}"));
        let len = rng.gen_range(50..300);
        std::fs::write(&p, text(&mut rng, len)).map_err(|e| e.to_string())?;
        files.push(p);
    }
    Ok(files)
}

/// Changes 1% of the files: a line appended to each.
pub(crate) fn change_one_percent(files: &[PathBuf], seed: u64) -> Res<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = (files.len() / 100).max(1);
    for _ in 0..n {
        let p = &files[rng.gen_range(0..files.len())];
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(p)
            .map_err(|e| e.to_string())?;
        writeln!(f, "changed {}", rng.r#gen::<u64>()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub(crate) fn list_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

pub(crate) fn du_bytes(root: &Path) -> u64 {
    list_files(root)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}
