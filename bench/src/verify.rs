//! Checks, outside the timed runs, that each tool's restore gave the source back: every
//! regular file's bytes and every symbolic link's target, by path relative to the tree's
//! root. Directories and metadata are not compared (rclone keeps neither empty
//! directories nor modes); the test suite checks those for datamover.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What is compared of one entry.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file: its size and the BLAKE3 of its bytes.
    File(u64, [u8; 32]),
    /// A symbolic link: its target.
    Link(Vec<u8>),
}

/// A tree's files and links by relative path.
pub type Tree = BTreeMap<Vec<u8>, Entry>;

/// Size and BLAKE3 of everything `r` yields.
pub fn hash(r: impl Read) -> std::io::Result<(u64, [u8; 32])> {
    let mut h = blake3::Hasher::new();
    h.update_reader(r)?;
    Ok((h.count(), *h.finalize().as_bytes()))
}

/// The files and links under `root`.
pub fn digest(root: &Path) -> Result<Tree, String> {
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let mut out = Tree::new();
    let mut stack = vec![root.to_path_buf()];
    // Bounded by the tree: every directory is pushed once.
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(|e| err(&dir, e))? {
            let e = e.map_err(|e| err(&dir, e))?;
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .map_err(|e| e.to_string())?
                .as_os_str()
                .as_bytes()
                .to_vec();
            let t = e.file_type().map_err(|e| err(&path, e))?;
            if t.is_dir() {
                stack.push(path);
            } else if t.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| err(&path, e))?;
                out.insert(rel, Entry::Link(target.as_os_str().as_bytes().to_vec()));
            } else if t.is_file() {
                let f = std::fs::File::open(&path).map_err(|e| err(&path, e))?;
                let (size, h) = hash(f).map_err(|e| err(&path, e))?;
                out.insert(rel, Entry::File(size, h));
            }
        }
    }
    Ok(out)
}

/// Where a tool put the restored tree under `out`: restic (and rustic) restore a
/// snapshot under the source's absolute path, datamover and rclone into `out` itself.
pub fn restored_root(out: &Path, src: &Path) -> PathBuf {
    let nested = out.join(src.strip_prefix("/").unwrap_or(src));
    if nested.is_dir() {
        nested
    } else {
        out.to_path_buf()
    }
}

/// `Ok(entries)` if `got` is `want`; otherwise what differs, with the first path.
pub fn compare(want: &Tree, got: &Tree) -> Result<usize, String> {
    let (mut missing, mut differ) = (0usize, 0usize);
    let mut first: Option<&[u8]> = None;
    for (path, entry) in want {
        match got.get(path) {
            None => missing += 1,
            Some(g) if g != entry => differ += 1,
            Some(_) => continue,
        }
        first.get_or_insert(path);
    }
    let mut extra = 0usize;
    for path in got.keys().filter(|p| !want.contains_key(*p)) {
        extra += 1;
        first.get_or_insert(path);
    }
    match first {
        None => Ok(want.len()),
        Some(p) => Err(format!(
            "{missing} missing, {differ} different, {extra} extra (first: {})",
            String::from_utf8_lossy(p)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_missing_or_extra_entry_is_found() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        for root in [a.path(), b.path()] {
            std::fs::create_dir_all(root.join("d/e")).expect("mkdir");
            std::fs::write(root.join("d/e/f"), b"same bytes").expect("write");
            std::os::unix::fs::symlink("e/f", root.join("d/link")).expect("symlink");
        }
        let want = digest(a.path()).expect("digest");
        assert_eq!(compare(&want, &digest(b.path()).expect("digest")), Ok(2));
        std::fs::write(b.path().join("d/e/f"), b"same bytez").expect("write");
        let e = compare(&want, &digest(b.path()).expect("digest")).expect_err("differs");
        assert!(e.starts_with("0 missing, 1 different, 0 extra"), "{e}");
        std::fs::remove_file(b.path().join("d/link")).expect("rm");
        std::fs::write(b.path().join("new"), b"").expect("write");
        let e = compare(&want, &digest(b.path()).expect("digest")).expect_err("differs");
        assert!(e.starts_with("1 missing, 1 different, 1 extra"), "{e}");
    }

    #[test]
    fn a_nested_restore_is_found_under_the_source_path() {
        let out = tempfile::tempdir().expect("tempdir");
        let src = Path::new("/data/set");
        assert_eq!(restored_root(out.path(), src), out.path());
        std::fs::create_dir_all(out.path().join("data/set")).expect("mkdir");
        assert_eq!(restored_root(out.path(), src), out.path().join("data/set"));
    }
}
