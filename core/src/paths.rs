//! Snapshot paths: their order, and turning them into safe local paths.
//!
//! A snapshot path is relative, its components joined by `/`. Whatever a snapshot holds
//! (`..`, absolute paths, empty or `.` components, NUL bytes), [`safe_relative`] accepts
//! only plain names, so joining the result to a restore target stays inside it. Symlinks
//! in the path are the restorer's concern: it creates snapshot symlinks last and never
//! follows a symlink when creating parents.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unsafe path in snapshot: {path:?} ({why})")]
pub struct UnsafePath {
    pub path: String,
    pub why: &'static str,
}

/// The components of a snapshot path.
pub fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|b| *b == b'/')
}

/// Walk order: depth-first, entries of a directory sorted bytewise. Comparing component by
/// component gives exactly that order (a directory sorts before its contents, and
/// `a/b` before `a.txt`).
pub fn walk_order(a: &[u8], b: &[u8]) -> Ordering {
    components(a).cmp(components(b))
}

/// Checks a snapshot path and returns it as a relative local path of plain names.
pub fn safe_relative(path: &[u8]) -> Result<PathBuf, UnsafePath> {
    let fail = |why| UnsafePath {
        path: String::from_utf8_lossy(path).into_owned(),
        why,
    };
    if path.is_empty() {
        return Err(fail("empty path"));
    }
    if path.contains(&0) {
        return Err(fail("NUL byte"));
    }
    if path[0] == b'/' {
        return Err(fail("absolute path"));
    }
    let mut out = PathBuf::new();
    for c in components(path) {
        match c {
            b"" => return Err(fail("empty component")),
            b"." | b".." => return Err(fail("'.' or '..' component")),
            name => out.push(OsStr::from_bytes(name)),
        }
    }
    Ok(out)
}

/// The parent of a snapshot path (`None` at the top).
pub fn parent(path: &[u8]) -> Option<&[u8]> {
    path.iter().rposition(|b| *b == b'/').map(|i| &path[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_depth_first() {
        let mut v: Vec<&[u8]> = vec![b"a.txt", b"a/b", b"a", b"b", b"a/b/c", b"a/a"];
        v.sort_by(|x, y| walk_order(x, y));
        assert_eq!(v, vec![&b"a"[..], b"a/a", b"a/b", b"a/b/c", b"a.txt", b"b"]);
    }

    #[test]
    fn rejects_escapes() {
        for bad in [
            &b"../x"[..],
            b"/etc/x",
            b"a/../../x",
            b"",
            b"a//b",
            b"./a",
            b"a/\0",
            b"..",
        ] {
            assert!(safe_relative(bad).is_err(), "{bad:?}");
        }
        assert_eq!(safe_relative(b"a/b c/d").unwrap(), PathBuf::from("a/b c/d"));
    }

    #[test]
    fn parents() {
        assert_eq!(parent(b"a/b/c"), Some(&b"a/b"[..]));
        assert_eq!(parent(b"a"), None);
    }
}
