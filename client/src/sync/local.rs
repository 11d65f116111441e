//! The device side of a sync: the directory's files, their hashes, and the state file
//! that remembers which hash each file had at which `stat`, so a pass re-reads only
//! files whose size, mtime, ctime or inode changed. Times are compared for equality only,
//! never for "newer": a device clock that runs ahead or behind cannot hide an edit.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ClientError;

/// The directory inside a synced directory that holds its state; never synced.
pub const STATE_DIR: &str = ".datamover-sync";
/// Suffix of files being downloaded; never synced.
pub const PARTIAL_SUFFIX: &str = ".datamover-partial";

/// What `stat` says about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub mode: u32,
}

impl Stat {
    pub fn of(m: &std::fs::Metadata) -> Stat {
        Stat {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            mode: m.mode() & 0o7777,
        }
    }
}

/// A regular file of the synced directory.
#[derive(Debug, Clone)]
pub struct LocalFile {
    /// Relative path, '/'-separated.
    pub rel: String,
    pub stat: Stat,
}

/// What was left out of a scan.
#[derive(Debug, Default, Clone, Copy)]
pub struct Skipped {
    pub symlinks: u64,
    pub special: u64,
    pub non_utf8: u64,
}

/// Lists the regular files under `root` (symlinks are not followed), sorted by path.
pub fn scan(root: &Path) -> Result<(Vec<LocalFile>, Skipped), ClientError> {
    let mut out = Vec::new();
    let mut skipped = Skipped::default();
    let mut dirs = vec![(root.to_path_buf(), String::new())];
    // Subdirectories are read ahead of the scan, in the order it pops them.
    let prefetch = crate::prefetch::Prefetch::start();
    // Bounded by the tree: each directory is pushed once.
    while let Some((dir, rel)) = dirs.pop() {
        let pushed = dirs.len();
        let rd = std::fs::read_dir(&dir).map_err(|e| ClientError::io(dir.display(), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| ClientError::io(dir.display(), e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                skipped.non_utf8 += 1;
                continue;
            };
            if rel.is_empty() && name == STATE_DIR {
                continue;
            }
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let m = match entry.metadata() {
                Ok(m) => m,
                // Removed since the listing: not there any more.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ClientError::io(entry.path().display(), e)),
            };
            let ty = m.file_type();
            if ty.is_dir() {
                dirs.push((entry.path(), child_rel));
            } else if ty.is_file() {
                if name.ends_with(PARTIAL_SUFFIX) {
                    continue;
                }
                out.push(LocalFile {
                    rel: child_rel,
                    stat: Stat::of(&m),
                });
            } else if ty.is_symlink() {
                skipped.symlinks += 1;
            } else {
                skipped.special += 1;
            }
        }
        if let Some(p) = &prefetch {
            for (d, _) in dirs[pushed..].iter().rev() {
                p.dir(d);
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((out, skipped))
}

/// Hashes a file; returns its hash and the `stat` taken when it was opened.
pub fn hash_file(path: &Path) -> Result<([u8; 32], Stat), ClientError> {
    let mut f = std::fs::File::open(path).map_err(|e| ClientError::io(path.display(), e))?;
    let stat = Stat::of(
        &f.metadata()
            .map_err(|e| ClientError::io(path.display(), e))?,
    );
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1024 * 1024];
    // Bounded by the file's length (a growing file is read to where it ends now).
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ClientError::io(path.display(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok((*h.finalize().as_bytes(), stat))
}

/// What the state file remembers of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEntry {
    pub stat: Stat,
    #[serde(with = "hexhash")]
    pub hash: [u8; 32],
    /// Ingress: the etag of the object the file was downloaded from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub etag: String,
    /// Recorded within [`RACY_NS`] of the file's last change: a change in the same clock
    /// tick would leave the same `stat`, so the file is hashed again next time.
    #[serde(default)]
    pub racy: bool,
}

/// File timestamps move in coarse ticks; a change this close to the recording is not
/// trusted to show in `stat` (the "racy git" problem).
pub const RACY_NS: i64 = 2_000_000_000;

impl StateEntry {
    pub fn new(stat: Stat, hash: [u8; 32], etag: String) -> StateEntry {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        StateEntry {
            stat,
            hash,
            etag,
            racy: now - stat.ctime_ns < RACY_NS,
        }
    }
}

mod hexhash {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(&s)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("bad hash"))
    }
}

/// The state of one mapping (direction, directory, target).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct State {
    pub entries: HashMap<String, StateEntry>,
}

impl State {
    /// The hash of a file whose `stat` is unchanged since it was recorded.
    pub fn known_hash(&self, f: &LocalFile) -> Option<[u8; 32]> {
        self.entries
            .get(&f.rel)
            .filter(|e| e.stat == f.stat && !e.racy)
            .map(|e| e.hash)
    }

    /// Reads a state file; a missing or unreadable one is an empty state (files are
    /// hashed again, nothing is lost).
    pub fn load(path: &Path) -> State {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable sync state: files are hashed again");
                State::default()
            }),
            Err(_) => State::default(),
        }
    }

    /// Writes the state file atomically. Failing to write it only costs hashing again.
    pub fn save(&self, path: &Path) {
        let result = (|| -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec(self).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the sync state: files are hashed again on the next pass");
        }
    }
}

/// Where the state of a mapping lives: `<state dir>/<direction>-<hash of target>.json`,
/// the state dir defaulting to `<directory>/.datamover-sync`.
pub fn state_path(root: &Path, state_dir: Option<&Path>, direction: &str, target: &str) -> PathBuf {
    let dir = state_dir.map_or_else(|| root.join(STATE_DIR), Path::to_path_buf);
    let h = blake3::hash(format!("{}\0{target}", root.display()).as_bytes()).to_hex();
    dir.join(format!("{direction}-{}.json", &h[..16]))
}

/// Makes sure every parent directory of `rel` under `root` is a real directory (never a
/// symlink), creating missing ones. Returns the full path of `rel`.
pub fn ensure_parents(root: &Path, rel: &Path) -> Result<PathBuf, ClientError> {
    let mut path = root.to_path_buf();
    let parent_count = rel.components().count().saturating_sub(1);
    for c in rel.components().take(parent_count) {
        path.push(c);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ClientError::Io(format!(
                    "{} is a symlink or file, not a directory: not writing below it; remove it or let the sync write elsewhere",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&path).map_err(|e| ClientError::io(path.display(), e))?;
            }
            Err(e) => return Err(ClientError::io(path.display(), e)),
        }
    }
    Ok(root.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_skips_state_partials_and_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::create_dir_all(d.path().join(STATE_DIR)).unwrap();
        std::fs::write(d.path().join("a/b/x"), b"x").unwrap();
        std::fs::write(d.path().join("top"), b"t").unwrap();
        std::fs::write(d.path().join(STATE_DIR).join("s.json"), b"{}").unwrap();
        std::fs::write(d.path().join(format!("a/.y{PARTIAL_SUFFIX}")), b"p").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        let (files, skipped) = scan(d.path()).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(names, ["a/b/x", "top"]);
        assert_eq!(skipped.symlinks, 1);
    }

    #[test]
    fn state_round_trip_and_change_detection() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        let (hash, stat) = hash_file(&p).unwrap();
        assert_eq!(hash, *blake3::hash(b"hello").as_bytes());
        let mut s = State::default();
        s.entries.insert(
            "f".into(),
            StateEntry {
                stat,
                hash,
                etag: String::new(),
                racy: false,
            },
        );
        assert!(
            StateEntry::new(stat, hash, String::new()).racy,
            "just written: not trusted"
        );
        let sp = state_path(d.path(), None, "egress", "t");
        s.save(&sp);
        let back = State::load(&sp);
        let f = LocalFile {
            rel: "f".into(),
            stat,
        };
        assert_eq!(back.known_hash(&f), Some(hash));
        // Same size, mtime set back to what it was: the ctime still tells.
        std::thread::sleep(std::time::Duration::from_millis(30));
        std::fs::write(&p, b"HELLO").unwrap();
        let old = filetime::FileTime::from_unix_time(
            stat.mtime_ns / 1_000_000_000,
            (stat.mtime_ns % 1_000_000_000) as u32,
        );
        filetime::set_file_mtime(&p, old).unwrap();
        let files = scan(d.path()).unwrap().0;
        let now = files.iter().find(|x| x.rel == "f").unwrap();
        assert_eq!(now.stat.mtime_ns, stat.mtime_ns);
        assert_eq!(
            back.known_hash(now),
            None,
            "an edit with the old mtime is still seen"
        );
    }

    #[test]
    fn parents_are_never_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("evil")).unwrap();
        assert!(ensure_parents(d.path(), Path::new("evil/x")).is_err());
        let p = ensure_parents(d.path(), Path::new("a/b/c")).unwrap();
        assert!(d.path().join("a/b").is_dir());
        assert_eq!(p, d.path().join("a/b/c"));
    }
}
