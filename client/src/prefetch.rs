//! Warms the kernel's caches ahead of a directory walk (a backup's, an edge sync's scan).
//! With a cold cache, a walk waits on the disk for every directory's blocks and inode
//! tables, one directory after the other; other tools walk several directories at once.
//! The walk stays sequential (the catalog is in walk order) but hands each subdirectory
//! it meets to a few threads that list it and read its entries' metadata, results
//! dropped, so that when the walk gets there the kernel answers from memory. Only a
//! hint: a full queue drops directories, and nothing here can fail the walk.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

/// Threads reading ahead. They wait on the disk, not on a core, so there are more of
/// them than cores: the disk serves concurrent reads at once.
const THREADS: usize = 8;
/// Directories queued at most (a path each); beyond that, hints are dropped.
const QUEUE: usize = 4096;
/// Entries read ahead in one directory at most.
const MAX_ENTRIES: usize = 100_000;

pub(crate) struct Prefetch {
    tx: SyncSender<PathBuf>,
}

impl Prefetch {
    /// Starts the threads; they end when this is dropped and the queue is drained.
    pub(crate) fn start() -> Option<Prefetch> {
        let (tx, rx) = sync_channel::<PathBuf>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("walk-prefetch-{i}"))
                .spawn(move || worker(&rx));
            if spawned.is_err() {
                // Without threads the walk just runs at the cache's pace.
                return (i > 0).then_some(Prefetch { tx });
            }
        }
        Some(Prefetch { tx })
    }

    /// Asks for `dir` to be read ahead (dropped when the queue is full).
    pub(crate) fn dir(&self, dir: &Path) {
        // Full: the hint is dropped; disconnected cannot happen while `self` lives.
        let _ = self.tx.try_send(dir.to_path_buf());
    }
}

/// Bounded by the queue: ends when every sender is gone and the queue is empty.
fn worker(rx: &Mutex<Receiver<PathBuf>>) {
    loop {
        let next = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(dir) = next else { return };
        warm(&dir);
    }
}

/// Lists `dir` and reads each entry's metadata (without following symlinks).
fn warm(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.take(MAX_ENTRIES).flatten() {
        // DirEntry::metadata does not follow a symlink.
        let _ = e.metadata();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ahead_and_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("a")).expect("mkdir");
        std::fs::write(dir.path().join("a/f"), b"x").expect("write");
        let p = Prefetch::start().expect("threads");
        for _ in 0..(QUEUE * 2) {
            // More hints than the queue holds: the extra ones are dropped, never block.
            p.dir(&dir.path().join("a"));
        }
        p.dir(&dir.path().join("missing"));
        drop(p);
    }
}
