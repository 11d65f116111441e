//! One page of a bucket listing: keys after a marker, grouped by a delimiter.
//!
//! The store lists every object under a directory; this sorts them, keeps those with the
//! requested prefix, folds keys that share a part up to the delimiter into one common
//! prefix, and cuts the page after `max` entries. The continuation is the last entry of
//! the page (a key or a common prefix), so the next page starts after it.

use std::time::SystemTime;

/// One object of a page, its key relative to the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub modified: Option<SystemTime>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub objects: Vec<Listed>,
    pub prefixes: Vec<String>,
    /// The last entry of a truncated page, to continue after.
    pub next: Option<String>,
}

/// Selects one page from `all` (any order).
pub fn page(
    mut all: Vec<Listed>,
    prefix: &str,
    delimiter: Option<&str>,
    after: Option<&str>,
    max: usize,
) -> Page {
    all.retain(|o| o.key.starts_with(prefix));
    all.sort_by(|a, b| a.key.cmp(&b.key));
    let delimiter = delimiter.filter(|d| !d.is_empty());
    let mut out = Page::default();
    let mut last: Option<String> = None;
    for o in all {
        if let Some(a) = after {
            // After a common prefix, none of the keys it stands for comes again.
            let folded = delimiter.is_some_and(|d| a.ends_with(d)) && o.key.starts_with(a);
            if o.key.as_str() <= a || folded {
                continue;
            }
        }
        let common = delimiter.and_then(|d| {
            o.key[prefix.len()..]
                .find(d)
                .map(|i| o.key[..prefix.len() + i + d.len()].to_string())
        });
        if let Some(c) = &common
            && out.prefixes.last() == Some(c)
        {
            continue;
        }
        if out.objects.len() + out.prefixes.len() >= max {
            out.next = last;
            break;
        }
        match common {
            Some(c) => {
                last = Some(c.clone());
                out.prefixes.push(c);
            }
            None => {
                last = Some(o.key.clone());
                out.objects.push(o);
            }
        }
    }
    out
}

/// The bucket names among a tenant's object keys (relative to `<tenant>/`).
pub fn buckets<'a>(
    keys: impl Iterator<Item = (&'a str, Option<SystemTime>)>,
) -> Vec<(String, Option<SystemTime>)> {
    let mut out: std::collections::BTreeMap<String, Option<SystemTime>> = Default::default();
    for (key, modified) in keys {
        let Some((bucket, _)) = key.split_once('/') else {
            continue;
        };
        let slot = out.entry(bucket.to_string()).or_insert(modified);
        if let (Some(s), Some(m)) = (*slot, modified)
            && m < s
        {
            *slot = Some(m);
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objs(keys: &[&str]) -> Vec<Listed> {
        keys.iter()
            .map(|k| Listed {
                key: (*k).to_string(),
                size: 1,
                etag: "e".into(),
                modified: None,
            })
            .collect()
    }

    fn keys(p: &Page) -> Vec<&str> {
        p.objects.iter().map(|o| o.key.as_str()).collect()
    }

    #[test]
    fn pages_with_and_without_delimiter() {
        let all = objs(&["b", "a/2", "a/1", "c/x/y", "d"]);
        let p = page(all.clone(), "", None, None, 2);
        assert_eq!(keys(&p), ["a/1", "a/2"]);
        assert_eq!(p.next.as_deref(), Some("a/2"));
        let p = page(all.clone(), "", None, Some("a/2"), 10);
        assert_eq!(keys(&p), ["b", "c/x/y", "d"]);
        assert_eq!(p.next, None);

        let p = page(all.clone(), "", Some("/"), None, 2);
        assert_eq!(p.prefixes, ["a/"]);
        assert_eq!(keys(&p), ["b"]);
        assert_eq!(p.next.as_deref(), Some("b"));
        let p = page(all.clone(), "", Some("/"), Some("a/"), 10);
        assert_eq!(keys(&p), ["b", "d"]);
        assert_eq!(p.prefixes, ["c/"]);

        let p = page(all.clone(), "c/", Some("/"), None, 10);
        assert_eq!(p.prefixes, ["c/x/"]);
        assert!(p.objects.is_empty());
        let p = page(all, "a", None, None, 10);
        assert_eq!(keys(&p), ["a/1", "a/2"]);
    }

    #[test]
    fn bucket_names() {
        let b = buckets(
            [
                ("x/1", None),
                ("x/2", None),
                ("y/a/b", None),
                ("loose", None),
            ]
            .into_iter(),
        );
        let names: Vec<&str> = b.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x", "y"]);
    }
}
