//! `diff <a> <b>`: what changed between two snapshots, from their catalogs alone (no file
//! data is read): both are walked side by side in walk order.

use std::cmp::Ordering;

use datamover_core::paths::walk_order;
use datamover_proto::v1::Node;
use serde_json::{Value, json};

use super::catalog::Catalog;
use super::{Lines, node_json};
use crate::ClientError;
use crate::connect::Conn;

/// How a path differs between the two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Removed,
    /// Another type, size or content (chunk ids), or another symlink target.
    Modified,
    /// Only mode, mtime or owner.
    Metadata,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Modified => "modified",
            Change::Metadata => "metadata",
        }
    }
}

/// How `b` differs from `a` at the same path, if it does.
pub fn compare(a: &Node, b: &Node) -> Option<Change> {
    if a.r#type != b.r#type
        || a.size != b.size
        || a.chunks != b.chunks
        || a.link_target != b.link_target
    {
        return Some(Change::Modified);
    }
    if a.mode != b.mode || a.mtime_ns != b.mtime_ns || a.uid != b.uid || a.gid != b.gid {
        return Some(Change::Metadata);
    }
    None
}

pub async fn diff(conn: &mut Conn, a: &str, b: &str) -> Result<Value, ClientError> {
    let ca = Catalog::open(&conn.api, a).await?;
    let cb = Catalog::open(&conn.api, b).await?;
    let (mut ra, mut rb) = (ca.cursor(), cb.cursor());
    let mut out = Lines::new();
    let mut counts = [0u64; 4];
    let (mut na, mut nb) = (ra.next().await?, rb.next().await?);
    loop {
        let (change, node) = match (na.take(), nb.take()) {
            (None, None) => break,
            (Some(x), None) => {
                na = ra.next().await?;
                (Change::Removed, x)
            }
            (None, Some(y)) => {
                nb = rb.next().await?;
                (Change::Added, y)
            }
            (Some(x), Some(y)) => match walk_order(&x.path, &y.path) {
                Ordering::Less => {
                    na = ra.next().await?;
                    nb = Some(y);
                    (Change::Removed, x)
                }
                Ordering::Greater => {
                    nb = rb.next().await?;
                    na = Some(x);
                    (Change::Added, y)
                }
                Ordering::Equal => {
                    na = ra.next().await?;
                    nb = rb.next().await?;
                    match compare(&x, &y) {
                        Some(c) => (c, y),
                        None => continue,
                    }
                }
            },
        };
        counts[change as usize] += 1;
        let mut v = node_json(&node);
        v["change"] = json!(change.as_str());
        out.put(&v)?;
    }
    out.flush()?;
    Ok(json!({
        "mode": "diff",
        "a": ca.snapshot.id,
        "b": cb.snapshot.id,
        "added": counts[Change::Added as usize],
        "removed": counts[Change::Removed as usize],
        "modified": counts[Change::Modified as usize],
        "metadata": counts[Change::Metadata as usize],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_and_target_are_modifications_times_and_modes_metadata() {
        let a = Node {
            path: "f".into(),
            size: 3,
            mode: 0o644,
            mtime_ns: 1,
            ..Default::default()
        };
        assert_eq!(compare(&a, &a.clone()), None);
        let mut b = a.clone();
        b.mtime_ns = 2;
        assert_eq!(compare(&a, &b), Some(Change::Metadata));
        b.chunks = vec![vec![1u8; 32].into()];
        assert_eq!(compare(&a, &b), Some(Change::Modified));
        let mut c = a.clone();
        c.mode = 0o600;
        assert_eq!(compare(&a, &c), Some(Change::Metadata));
        c.link_target = "x".into();
        assert_eq!(compare(&a, &c), Some(Change::Modified));
    }
}
