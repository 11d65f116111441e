//! How a manifest is kept in the store: written incrementally, a **base** (every entry)
//! plus **deltas** (the entries set or removed since), each a small binary object under
//! the manifest's own prefix `.datamover/manifests/<h>/`:
//!
//! - `b-<stamp>`: a base; `d-<stamp>`: a delta. A stamp is the writer's clock in
//!   milliseconds, a random number of the writing process and a counter, in fixed-width
//!   hex, so names sort in the order they were written (per replica; across replicas as
//!   far as their clocks agree).
//! - Loading reads the newest base and applies, in stamp order, the deltas stamped after
//!   it. A flush writes one delta with what changed; once the deltas grow past
//!   [`FOLD_DELTAS`] objects or the size of the base, a flush writes a new base instead and
//!   removes the bases and deltas stamped before it.
//! - Old manifests (one JSON object `.datamover/manifests/<h>.json`) still load when the
//!   prefix holds nothing; the first flush then writes a base and removes the JSON.
//!
//! The manifest stays a cache (see [`super::state`]): an entry only counts while the
//! object's etag matches. Two replicas write deltas and bases of their own names at once;
//! what one of them removes or misses (a delta stamped before the other's base) costs
//! lookups, never a wrong answer.
//!
//! Every length read back is checked against what is left and a fixed cap before anything
//! is allocated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use datamover_repo::objects::ObjectStore;
use datamover_repo::store::StoreError;
use futures::StreamExt as _;
use thiserror::Error;

use super::state::{Entry, Manifest};

/// Deltas on top of a base before a flush writes a new base.
pub const FOLD_DELTAS: usize = 16;
/// Deltas a load reads at most (the newest; more only come from replicas racing).
const MAX_DELTAS_READ: usize = 256;
/// Deltas read at once.
const READ_CONCURRENCY: usize = 8;
/// The largest base object read back.
pub const MAX_BASE_BYTES: u64 = 512 * 1024 * 1024;
/// The largest delta object read back.
pub const MAX_DELTA_BYTES: u64 = 64 * 1024 * 1024;
/// Longest path and etag in a record (a checked path is at most 1024 characters).
const MAX_PATH_BYTES: usize = 4096;
const MAX_ETAG_BYTES: usize = 1024;
/// The format's magic and version.
const MAGIC: &[u8; 4] = b"DMM1";
/// The smallest record: a removal of a one-byte path.
const MIN_RECORD: usize = 1 + 2 + 1;

/// A base holds every entry; a delta what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Base,
    Delta,
}

/// What a decoded object says: each path set to an entry or removed (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub kind: Kind,
    pub records: Vec<(String, Option<Entry>)>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a manifest object (bad magic or kind)")]
    Header,
    #[error("the object ends inside a record")]
    Truncated,
    #[error("a {0} longer than allowed")]
    TooLong(&'static str),
    #[error("a path or etag that is not UTF-8")]
    NotUtf8,
    #[error("an empty path")]
    EmptyPath,
    #[error("an unknown record tag {0}")]
    Tag(u8),
}

/// Encodes a base: every entry of `m`.
pub fn encode_base(m: &Manifest) -> Vec<u8> {
    encode(
        Kind::Base,
        m.entries.len(),
        m.entries.iter().map(|(p, e)| (p.as_str(), Some(e))),
    )
}

/// Encodes a delta: the paths set or removed.
pub fn encode_delta(changes: &HashMap<String, Option<Entry>>) -> Vec<u8> {
    encode(
        Kind::Delta,
        changes.len(),
        changes.iter().map(|(p, e)| (p.as_str(), e.as_ref())),
    )
}

fn encode<'a>(
    kind: Kind,
    n: usize,
    records: impl Iterator<Item = (&'a str, Option<&'a Entry>)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + n * 100);
    out.extend_from_slice(MAGIC);
    out.push(match kind {
        Kind::Base => b'B',
        Kind::Delta => b'D',
    });
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut count = 0u32;
    for (path, e) in records {
        // Never written: paths are checked on the way in; skipped rather than unreadable.
        let etag_len = e.map_or(0, |e| e.etag.len());
        if path.is_empty() || path.len() > MAX_PATH_BYTES || etag_len > MAX_ETAG_BYTES {
            continue;
        }
        out.push(u8::from(e.is_some()));
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        if let Some(e) = e {
            out.extend_from_slice(&(e.etag.len() as u16).to_le_bytes());
            out.extend_from_slice(e.etag.as_bytes());
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(&e.hash);
            out.extend_from_slice(&e.mtime_ns.to_le_bytes());
            out.extend_from_slice(&e.mode.to_le_bytes());
        }
        count += 1;
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    out
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.b.len() < n {
            return Err(FormatError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn text(&mut self, max: usize, what: &'static str) -> Result<String, FormatError> {
        let len = usize::from(u16::from_le_bytes(self.array()?));
        if len > max {
            return Err(FormatError::TooLong(what));
        }
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(str::to_string)
            .map_err(|_| FormatError::NotUtf8)
    }
}

/// Decodes a base or a delta.
pub fn decode(bytes: &[u8]) -> Result<Decoded, FormatError> {
    let mut r = Reader { b: bytes };
    if r.take(4)? != MAGIC {
        return Err(FormatError::Header);
    }
    let kind = match r.array::<1>()?[0] {
        b'B' => Kind::Base,
        b'D' => Kind::Delta,
        _ => return Err(FormatError::Header),
    };
    let count = u32::from_le_bytes(r.array()?) as usize;
    // Never more room than the bytes left could fill.
    let mut records = Vec::with_capacity(count.min(r.b.len() / MIN_RECORD));
    for _ in 0..count {
        let tag = r.array::<1>()?[0];
        let path = r.text(MAX_PATH_BYTES, "path")?;
        if path.is_empty() {
            return Err(FormatError::EmptyPath);
        }
        let entry = match tag {
            0 => None,
            1 => {
                let etag = r.text(MAX_ETAG_BYTES, "etag")?;
                Some(Entry {
                    etag,
                    size: u64::from_le_bytes(r.array()?),
                    hash: r.array()?,
                    mtime_ns: i64::from_le_bytes(r.array()?),
                    mode: u32::from_le_bytes(r.array()?),
                })
            }
            t => return Err(FormatError::Tag(t)),
        };
        records.push((path, entry));
    }
    Ok(Decoded { kind, records })
}

/// What the fuzz harness (`sync_state` in server/tests/fuzz.rs) checks of any input:
/// decoding never panics nor allocates past the input, and what decodes encodes to an
/// object that decodes to the same records.
pub fn fuzz_check(input: &[u8]) {
    let Ok(d) = decode(input) else { return };
    let changes: HashMap<String, Option<Entry>> = d.records.iter().cloned().collect();
    let again = decode(&encode_delta(&changes));
    assert_eq!(
        again.map(|a| a.records.into_iter().collect::<HashMap<_, _>>()),
        Ok(changes)
    );
}

/// The prefix a manifest's objects live under.
pub fn prefix_of(legacy_key: &str) -> String {
    format!("{}/", legacy_key.trim_end_matches(".json"))
}

/// Where a manifest's objects are: its bases and deltas by name, newest base first.
#[derive(Debug, Default, Clone)]
pub struct Stored {
    /// The base it was loaded from or last written (full key).
    pub base: Option<String>,
    pub base_bytes: u64,
    /// Deltas on top of the base, read or written here.
    pub deltas: usize,
    pub delta_bytes: u64,
    /// Loaded from an old JSON object, or damaged: the next flush writes a base.
    pub needs_base: bool,
}

impl Stored {
    /// Whether a flush adding `next` delta bytes should write a base instead.
    pub fn fold_due(&self, next: u64) -> bool {
        self.needs_base
            || self.base.is_none()
            || self.deltas >= FOLD_DELTAS
            || self.delta_bytes + next > self.base_bytes.max(64 * 1024)
    }
}

/// Unique, ordered names of the objects this process writes.
pub struct Stamper {
    process: u32,
    seq: AtomicU32,
}

impl Default for Stamper {
    fn default() -> Self {
        Stamper {
            process: rand::random(),
            seq: AtomicU32::new(0),
        }
    }
}

impl Stamper {
    pub fn next(&self) -> String {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{ms:012x}-{:08x}-{seq:08x}", self.process)
    }
}

/// The stamp of an object name under a manifest's prefix, and whether it is a base.
fn parse_name(name: &str) -> Option<(bool, &str)> {
    let (kind, stamp) = name.split_at_checked(2)?;
    let base = match kind {
        "b-" => true,
        "d-" => false,
        _ => return None,
    };
    (stamp.len() == 30 && stamp.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .then_some((base, stamp))
}

/// Reads a whole object of at most `cap` bytes.
async fn read_capped(objects: &dyn ObjectStore, key: &str, cap: u64) -> Result<Bytes, ReadError> {
    let (head, mut body) = objects.get(key, 0).await.map_err(ReadError::Store)?;
    if head.size > cap {
        return Err(ReadError::TooBig(head.size));
    }
    let mut out = BytesMut::with_capacity(head.size as usize);
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(ReadError::Store)?;
        if (out.len() + piece.len()) as u64 > cap {
            return Err(ReadError::TooBig(cap));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out.freeze())
}

enum ReadError {
    Store(StoreError),
    TooBig(u64),
}

/// A manifest as loaded, with where it is stored.
pub struct Load {
    pub manifest: Manifest,
    pub stored: Stored,
    /// Objects read (for the metrics).
    pub reads: u64,
}

/// Loads the manifest whose old JSON object is `legacy_key`.
pub async fn load(objects: &dyn ObjectStore, legacy_key: &str) -> Result<Load, StoreError> {
    let prefix = prefix_of(legacy_key);
    let listed = objects.list(&prefix).await?;
    let mut bases = Vec::new();
    let mut deltas = Vec::new();
    for o in &listed {
        let Some(name) = o.key.strip_prefix(&prefix) else {
            continue;
        };
        match parse_name(name) {
            Some((true, stamp)) => bases.push((stamp.to_string(), o.key.clone(), o.size)),
            Some((false, stamp)) => deltas.push((stamp.to_string(), o.key.clone(), o.size)),
            None => {}
        }
    }
    let mut out = Load {
        manifest: Manifest::default(),
        stored: Stored::default(),
        reads: 0,
    };
    if bases.is_empty() && deltas.is_empty() {
        return load_legacy(objects, legacy_key, out).await;
    }
    bases.sort();
    deltas.sort();
    if let Some((stamp, key, size)) = bases.pop() {
        out.reads += 1;
        match read_capped(objects, &key, MAX_BASE_BYTES).await {
            Ok(b) => match decode(&b) {
                Ok(d) if d.kind == Kind::Base => {
                    out.manifest.entries.reserve(d.records.len());
                    for (p, e) in d.records {
                        if let Some(e) = e {
                            out.manifest.entries.insert(p, e);
                        }
                    }
                    out.stored.base = Some(key);
                    out.stored.base_bytes = size;
                }
                other => {
                    let why = other.err().map_or("not a base".into(), |e| e.to_string());
                    tracing::warn!(key, error = %why, "unreadable sync manifest base: objects are looked up again");
                    out.stored.needs_base = true;
                }
            },
            Err(ReadError::Store(StoreError::NotFound(_))) => out.stored.needs_base = true,
            Err(ReadError::Store(e)) => return Err(e),
            Err(ReadError::TooBig(n)) => {
                tracing::warn!(
                    key,
                    bytes = n,
                    "sync manifest base too large to read: objects are looked up again"
                );
                out.stored.needs_base = true;
            }
        }
        deltas.retain(|(s, _, _)| *s > stamp);
    }
    if deltas.len() > MAX_DELTAS_READ {
        // Only racing replicas leave this many; the oldest are left out (a cache).
        deltas.drain(..deltas.len() - MAX_DELTAS_READ);
        out.stored.needs_base = true;
    }
    let read: Vec<_> =
        futures::stream::iter(deltas.into_iter().map(|(stamp, key, size)| async move {
            let got = read_capped(objects, &key, MAX_DELTA_BYTES).await;
            (stamp, key, size, got)
        }))
        .buffered(READ_CONCURRENCY)
        .collect()
        .await;
    for (_, key, size, got) in read {
        out.reads += 1;
        let decoded = match got {
            Ok(b) => decode(&b).map_err(|e| e.to_string()),
            // Removed by a replica's fold since the listing: that base has it.
            Err(ReadError::Store(StoreError::NotFound(_))) => continue,
            Err(ReadError::Store(e)) => return Err(e),
            Err(ReadError::TooBig(n)) => Err(format!("{n} bytes, more than allowed")),
        };
        match decoded {
            Ok(d) if d.kind == Kind::Delta => {
                for (p, e) in d.records {
                    match e {
                        Some(e) => out.manifest.entries.insert(p, e),
                        None => out.manifest.entries.remove(&p),
                    };
                }
                out.stored.deltas += 1;
                out.stored.delta_bytes += size;
            }
            other => {
                let why = other.err().unwrap_or_else(|| "not a delta".into());
                tracing::warn!(key, error = %why, "unreadable sync manifest delta: skipped (objects are looked up again)");
                out.stored.needs_base = true;
            }
        }
    }
    Ok(out)
}

async fn load_legacy(
    objects: &dyn ObjectStore,
    legacy_key: &str,
    mut out: Load,
) -> Result<Load, StoreError> {
    out.reads += 1;
    match read_capped(objects, legacy_key, MAX_BASE_BYTES).await {
        Ok(b) => match serde_json::from_slice::<Manifest>(&b) {
            Ok(m) => {
                out.manifest = m;
                out.stored.needs_base = true;
            }
            Err(e) => {
                tracing::warn!(key = legacy_key, error = %e, "unreadable sync manifest: starting a new one (objects are looked up again)");
            }
        },
        Err(ReadError::Store(StoreError::NotFound(_))) => {}
        Err(ReadError::Store(e)) => return Err(e),
        Err(ReadError::TooBig(n)) => {
            tracing::warn!(
                key = legacy_key,
                bytes = n,
                "sync manifest too large to read: starting a new one"
            );
        }
    }
    Ok(out)
}

/// After a base stamped `stamp` is written: removes the bases and deltas stamped before
/// it and the old JSON object. Returns the objects removed.
pub async fn remove_before(
    objects: &dyn ObjectStore,
    legacy_key: &str,
    stamp: &str,
) -> Result<u64, StoreError> {
    let prefix = prefix_of(legacy_key);
    let mut removed = 0;
    for o in objects.list(&prefix).await? {
        let Some(name) = o.key.strip_prefix(&prefix) else {
            continue;
        };
        if parse_name(name).is_some_and(|(_, s)| s < stamp) {
            match objects.delete(&o.key).await {
                Ok(()) | Err(StoreError::NotFound(_)) => removed += 1,
                Err(e) => return Err(e),
            }
        }
    }
    match objects.delete(legacy_key).await {
        Ok(()) | Err(StoreError::NotFound(_)) => Ok(removed),
        Err(e) => Err(e),
    }
}

/// The key of a new base or delta.
pub fn object_key(legacy_key: &str, base: bool, stamp: &str) -> String {
    format!(
        "{}{}-{stamp}",
        prefix_of(legacy_key),
        if base { "b" } else { "d" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Entry {
        Entry {
            etag: format!("\"etag-{i}\""),
            size: i,
            hash: [i as u8; 32],
            mtime_ns: -(i as i64),
            mode: 0o644,
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let mut m = Manifest::default();
        for i in 0..50 {
            m.entries.insert(format!("dir/f-{i}"), entry(i));
        }
        let b = encode_base(&m);
        let d = decode(&b).unwrap();
        assert_eq!(d.kind, Kind::Base);
        let back: HashMap<_, _> = d
            .records
            .into_iter()
            .map(|(p, e)| (p, e.unwrap()))
            .collect();
        assert_eq!(back, m.entries);

        let mut changes = HashMap::new();
        changes.insert("a".to_string(), Some(entry(1)));
        changes.insert("gone".to_string(), None);
        let dl = encode_delta(&changes);
        let d = decode(&dl).unwrap();
        assert_eq!(d.kind, Kind::Delta);
        assert_eq!(d.records.into_iter().collect::<HashMap<_, _>>(), changes);
        // A delta of one entry is small whatever the manifest holds.
        let one: HashMap<_, _> = [("dir/f-1".to_string(), Some(entry(1)))].into();
        assert!(
            encode_delta(&one).len() < 120,
            "{}",
            encode_delta(&one).len()
        );

        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err(), "truncated at {cut}");
        }
        let mut huge_count = b.clone();
        huge_count[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge_count), Err(FormatError::Truncated));
        assert_eq!(decode(b"JSON{}"), Err(FormatError::Header));
    }

    #[test]
    fn names_sort_by_stamp() {
        let s = Stamper::default();
        let a = s.next();
        let b = s.next();
        assert!(a < b);
        assert_eq!(parse_name(&format!("b-{a}")), Some((true, a.as_str())));
        assert_eq!(parse_name(&format!("d-{b}")), Some((false, b.as_str())));
        assert_eq!(parse_name("x-1"), None);
        assert_eq!(parse_name("d-zz"), None);
        let k = object_key(".datamover/manifests/abc.json", false, &a);
        assert_eq!(k, format!(".datamover/manifests/abc/d-{a}"));
    }
}
