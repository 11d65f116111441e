//! Which paths of a snapshot a partial restore (or a `find`) selects.
//!
//! A glob without `/` matches a name at any depth (`*.conf`, `logs`); a glob with `/`
//! matches the path from the snapshot's root (`etc/*.conf`, `var/lib/**`; a leading `/`
//! is ignored). `*` and `?` never cross a `/`; `**` does. A node is selected when it or
//! one of its ancestors matches an include (all nodes when there is none), and neither it
//! nor an ancestor matches an exclude: selecting a directory selects its tree.
//! Globs and paths with `..` or `.` components are refused: they could only mislead.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use thiserror::Error;

use crate::paths::{components, safe_relative};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectError {
    #[error(
        "bad glob {pattern:?}: {reason}; use * ? [..] and ** (see the README, \"File-level restore\")"
    )]
    BadGlob { pattern: String, reason: String },
    #[error(
        "bad path {path:?} inside the snapshot: {why}; give a relative path of plain names, such as etc/app"
    )]
    BadPath { path: String, why: String },
}

/// A set of globs, as described in the module documentation.
#[derive(Debug, Clone)]
pub struct Globs {
    /// Globs with a `/`: against the whole path.
    paths: GlobSet,
    /// Globs without: against each name.
    names: GlobSet,
    count: usize,
}

impl Globs {
    pub fn new(patterns: &[String]) -> Result<Globs, SelectError> {
        let mut paths = GlobSetBuilder::new();
        let mut names = GlobSetBuilder::new();
        for p in patterns {
            let bad = |reason: &str| SelectError::BadGlob {
                pattern: p.clone(),
                reason: reason.to_string(),
            };
            let trimmed = p.strip_prefix('/').unwrap_or(p).trim_end_matches('/');
            if trimmed.is_empty() {
                return Err(bad("it is empty"));
            }
            if trimmed.contains('\0') {
                return Err(bad("it holds a NUL byte"));
            }
            if trimmed
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            {
                return Err(bad("'.', '..' and empty components are not allowed"));
            }
            let glob = GlobBuilder::new(trimmed)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| bad(&e.kind().to_string()))?;
            if trimmed.contains('/') {
                paths.add(glob);
            } else {
                names.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| SelectError::BadGlob {
                pattern: patterns.join(" "),
                reason: e.to_string(),
            })
        };
        Ok(Globs {
            paths: build(paths)?,
            names: build(names)?,
            count: patterns.len(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether `path` itself matches.
    pub fn matches(&self, path: &[u8]) -> bool {
        let name = path.rsplit(|b| *b == b'/').next().unwrap_or_default();
        self.names.is_match(as_path(name)) || self.paths.is_match(as_path(path))
    }

    /// Whether `path` or one of its ancestors matches.
    pub fn matches_within(&self, path: &[u8]) -> bool {
        if components(path).any(|c| self.names.is_match(as_path(c))) {
            return true;
        }
        if self.paths.is_empty() {
            return false;
        }
        path.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(|(i, _)| &path[..i])
            .chain(std::iter::once(path))
            .any(|p| self.paths.is_match(as_path(p)))
    }
}

fn as_path(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// Whether `path` is `dir` or lies under it (everything lies under the empty path).
pub fn is_within(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty()
        || path == dir
        || (path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/')
}

/// A subtree, include and exclude globs.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The subtree (empty: the whole snapshot).
    pub path: Vec<u8>,
    include: Globs,
    exclude: Globs,
}

impl Selection {
    pub fn new(
        path: &[u8],
        include: &[String],
        exclude: &[String],
    ) -> Result<Selection, SelectError> {
        let path = path.strip_prefix(b"/").unwrap_or(path);
        let path = path.strip_suffix(b"/").unwrap_or(path);
        if !path.is_empty() {
            safe_relative(path).map_err(|e| SelectError::BadPath {
                path: e.path,
                why: e.why.to_string(),
            })?;
        }
        Ok(Selection {
            path: path.to_vec(),
            include: Globs::new(include)?,
            exclude: Globs::new(exclude)?,
        })
    }

    /// Whether it selects everything (a plain restore).
    pub fn is_everything(&self) -> bool {
        self.path.is_empty() && self.include.is_empty() && self.exclude.is_empty()
    }

    /// Whether the node at `path` is selected.
    pub fn selects(&self, path: &[u8]) -> bool {
        is_within(path, &self.path)
            && (self.include.is_empty() || self.include.matches_within(path))
            && !self.exclude.matches_within(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(p: &[&str]) -> Globs {
        Globs::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("valid")
    }

    #[test]
    fn names_match_at_any_depth_and_paths_from_the_root() {
        let g = globs(&["*.conf", "etc/app/*.yaml", "/var/lib/**"]);
        assert!(g.matches(b"a.conf"));
        assert!(g.matches(b"x/y/a.conf"));
        assert!(g.matches(b"etc/app/x.yaml"));
        assert!(!g.matches(b"etc/app/sub/x.yaml"), "* does not cross /");
        assert!(!g.matches(b"other/etc/app/x.yaml"));
        assert!(g.matches(b"var/lib/a/b/c"));
        assert!(!g.matches(b"a.conf.bak"));
    }

    #[test]
    fn a_selected_directory_selects_its_tree() {
        let s = Selection::new(b"", &["logs".into()], &["*.tmp".into()]).expect("valid");
        assert!(s.selects(b"srv/logs"));
        assert!(s.selects(b"srv/logs/day-1"));
        assert!(!s.selects(b"srv/logs/day-1.tmp"));
        assert!(!s.selects(b"srv/data"));
        let s = Selection::new(b"etc/app/", &[], &[]).expect("valid");
        assert_eq!(s.path, b"etc/app");
        assert!(s.selects(b"etc/app") && s.selects(b"etc/app/x"));
        assert!(!s.selects(b"etc/application") && !s.selects(b"etc"));
        assert!(
            Selection::new(b"", &[], &[])
                .expect("valid")
                .is_everything()
        );
    }

    #[test]
    fn dot_dot_and_bad_globs_are_refused_with_a_reason() {
        for bad in ["../x", "a/../b", "", "/", "a//b", "[z-a]"] {
            let e = Globs::new(&[bad.to_string()]).expect_err(bad);
            assert!(e.to_string().contains("bad glob"), "{e}");
        }
        let e = Selection::new(b"a/../../etc", &[], &[]).expect_err("..");
        assert!(e.to_string().contains("'.' or '..'"), "{e}");
    }

    #[test]
    fn within() {
        assert!(is_within(b"a/b", b"a") && is_within(b"a", b"a") && is_within(b"x", b""));
        assert!(!is_within(b"ab", b"a") && !is_within(b"a", b"a/b"));
    }
}
