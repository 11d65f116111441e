//! File contents of a mounted snapshot, read by range.
//!
//! A file node lists its chunk ids but not their sizes, so where each chunk begins is
//! learnt as chunks are read ([`Layout`]): a read inside the known part fetches only the
//! chunks it covers (and a few after them, for the next sequential read); a read past it
//! fetches the chunks in between once. Decoded chunks are kept in a [`ChunkCache`] bounded
//! in bytes, shared by every file (a chunk that several files hold is fetched once).
//! After each read, the chunks that follow it are fetched in the background
//! ([`Reader::prefetch`]), so a sequential reader finds them cached instead of waiting.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use datamover_core::chunk::ChunkIdKey;
use datamover_proto::v1::Node;
use lru::LruCache;

use crate::ClientError;
use crate::browse::read_chunks;
use crate::connect::Api;

/// Chunks fetched in one call beyond the first one a read needs (about 2 MiB at the
/// default chunk size), so that sequential reads mostly find their chunks cached.
const READ_AHEAD: usize = 8;
/// Chunks after a read that the background prefetch keeps cached (about 8 MiB at the
/// default chunk size); it starts once a quarter of them are missing.
const PREFETCH: usize = 32;
/// Chunks being prefetched at once, across files.
const PREFETCH_INFLIGHT: usize = 64;

/// Decoded chunks by id, at most `capacity` bytes of them.
pub struct ChunkCache {
    chunks: LruCache<Bytes, Bytes>,
    bytes: usize,
    capacity: usize,
}

impl ChunkCache {
    pub fn new(capacity: usize) -> ChunkCache {
        ChunkCache {
            chunks: LruCache::unbounded(),
            bytes: 0,
            capacity,
        }
    }

    fn get(&mut self, id: &Bytes) -> Option<Bytes> {
        self.chunks.get(id).cloned()
    }

    /// Whether it holds `id` (without making it the most recently used).
    fn contains(&self, id: &Bytes) -> bool {
        self.chunks.contains(id)
    }

    fn put(&mut self, id: Bytes, data: Bytes) {
        self.bytes += data.len();
        if let Some(old) = self.chunks.put(id, data) {
            self.bytes -= old.len();
        }
        while self.bytes > self.capacity {
            match self.chunks.pop_lru() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// Bytes held.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Where a file's chunks end, for the chunks read so far from its start.
#[derive(Default)]
pub struct Layout {
    /// `ends[i]`: the offset just past chunk `i`; known for a prefix of the chunks.
    ends: Vec<u64>,
}

impl Layout {
    /// The chunk holding `pos` and where it starts, if known.
    fn locate(&self, pos: u64) -> Option<(usize, u64)> {
        if self.ends.last().is_none_or(|e| pos >= *e) {
            return None;
        }
        let i = self.ends.partition_point(|e| *e <= pos);
        Some((i, self.start(i)))
    }

    fn start(&self, i: usize) -> u64 {
        i.checked_sub(1)
            .and_then(|j| self.ends.get(j))
            .copied()
            .unwrap_or(0)
    }

    /// Records chunk `i`'s length when it is the first chunk of unknown extent.
    fn learn(&mut self, i: usize, len: usize) {
        if i == self.ends.len() {
            let start = self.start(i);
            self.ends.push(start + len as u64);
        }
    }
}

/// Reads file contents through the server, with a shared cache.
pub struct Reader {
    pub api: Api,
    pub key: ChunkIdKey,
    pub cache: Mutex<ChunkCache>,
    /// Chunk ids the background prefetch is fetching.
    pub prefetching: Mutex<HashSet<Bytes>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves a consistent cache or layout: keep using it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reader {
    /// `size` bytes of `node` from `offset` (fewer at its end).
    pub async fn read(
        self: &Arc<Self>,
        node: &Node,
        layout: &Mutex<Layout>,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let end = node.size.min(offset.saturating_add(u64::from(size)));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        let mut i = {
            let l = lock(layout);
            l.locate(pos).map_or(l.ends.len(), |(i, _)| i)
        };
        while pos < end {
            let data = self.chunk(node, layout, i).await?;
            let start = lock(layout).start(i);
            let chunk_end = start + data.len() as u64;
            if pos < chunk_end {
                let to = end.min(chunk_end);
                let (a, b) = ((pos - start) as usize, (to - start) as usize);
                out.extend_from_slice(data.get(a..b).unwrap_or_default());
                pos = to;
            }
            i += 1;
        }
        self.prefetch(node, i);
        Ok(out)
    }

    /// Fetches in the background the chunks of `node` from `from` on (up to
    /// [`PREFETCH`]) that are neither cached nor being fetched, once a quarter of them are
    /// missing. Their lengths are learnt when a read takes them from the cache.
    fn prefetch(self: &Arc<Self>, node: &Node, from: usize) {
        let last = node.chunks.len().min(from.saturating_add(PREFETCH));
        let Some(window) = node.chunks.get(from..last) else {
            return;
        };
        let ids: Vec<Bytes> = {
            let cache = lock(&self.cache);
            let mut inflight = lock(&self.prefetching);
            let missing: Vec<Bytes> = window
                .iter()
                .filter(|id| !cache.contains(id) && !inflight.contains(*id))
                .cloned()
                .collect();
            if missing.len() < PREFETCH / 4 && last < node.chunks.len()
                || missing.is_empty()
                || inflight.len() + missing.len() > PREFETCH_INFLIGHT
            {
                return;
            }
            inflight.extend(missing.iter().cloned());
            missing
        };
        let me = Arc::clone(self);
        let path = String::from_utf8_lossy(&node.path).into_owned();
        tokio::spawn(async move {
            let mut got = Vec::with_capacity(ids.len());
            let what = || format!("file {path}");
            let r = read_chunks(&me.api, &me.key, &ids, &what, |d| {
                got.push(Bytes::copy_from_slice(d));
                Ok(())
            })
            .await;
            if let Err(e) = &r {
                // The read that needs these chunks fetches them itself and reports it.
                tracing::debug!(error = %e, "prefetch failed");
            }
            if r.is_ok() && got.len() == ids.len() {
                let mut cache = lock(&me.cache);
                for (id, d) in ids.iter().zip(got) {
                    cache.put(id.clone(), d);
                }
            }
            let mut inflight = lock(&me.prefetching);
            for id in &ids {
                inflight.remove(id);
            }
        });
    }

    /// Chunk `i` of `node`, from the cache or fetched with the few after it; the layout
    /// learns the length of every chunk fetched in order.
    async fn chunk(
        &self,
        node: &Node,
        layout: &Mutex<Layout>,
        i: usize,
    ) -> Result<Bytes, ClientError> {
        let what = || format!("file {}", String::from_utf8_lossy(&node.path));
        let Some(id) = node.chunks.get(i) else {
            return Err(ClientError::Corrupt(format!(
                "{}: its chunks hold less than its size, {} bytes: run verify on the server's repository",
                what(),
                node.size
            )));
        };
        if let Some(data) = lock(&self.cache).get(id) {
            lock(layout).learn(i, data.len());
            return Ok(data);
        }
        let last = node.chunks.len().min(i + 1 + READ_AHEAD);
        // The chunks after the first: cached ones as they are now, the others fetched.
        let (ids, after): (Vec<Bytes>, Vec<Option<Bytes>>) = {
            let mut cache = lock(&self.cache);
            let mut ids = vec![id.clone()];
            let after = node.chunks[i + 1..last]
                .iter()
                .map(|id| {
                    let cached = cache.get(id);
                    if cached.is_none() {
                        ids.push(id.clone());
                    }
                    cached
                })
                .collect();
            (ids, after)
        };
        let mut got = Vec::with_capacity(ids.len());
        read_chunks(&self.api, &self.key, &ids, &what, |d| {
            got.push(Bytes::copy_from_slice(d));
            Ok(())
        })
        .await?;
        if got.len() != ids.len() {
            return Err(ClientError::Server(format!(
                "{}: the server sent {} chunks of {}: retry",
                what(),
                got.len(),
                ids.len()
            )));
        }
        let mut fetched = ids.into_iter().zip(got);
        let Some((_, first)) = fetched.next() else {
            return Err(ClientError::Server(format!(
                "{}: the server sent no chunk: retry",
                what()
            )));
        };
        let mut cache = lock(&self.cache);
        let mut l = lock(layout);
        l.learn(i, first.len());
        cache.put(id.clone(), first.clone());
        for (j, cached) in (i + 1..last).zip(after) {
            let data = match cached {
                Some(d) => d,
                None => match fetched.next() {
                    Some((id, d)) => {
                        cache.put(id, d.clone());
                        d
                    }
                    None => break,
                },
            };
            l.learn(j, data.len());
        }
        // The chunk asked for stays reachable even if the cache is smaller than it.
        Ok(first)
    }
}

/// A file's node and what is known of its layout.
pub struct OpenFile {
    pub node: Arc<Node>,
    pub layout: Mutex<Layout>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_learns_in_order_and_locates() {
        let mut l = Layout::default();
        assert_eq!(l.locate(0), None);
        l.learn(0, 10);
        l.learn(2, 5); // not next: ignored
        l.learn(1, 20);
        assert_eq!(l.locate(0), Some((0, 0)));
        assert_eq!(l.locate(9), Some((0, 0)));
        assert_eq!(l.locate(10), Some((1, 10)));
        assert_eq!(l.locate(29), Some((1, 10)));
        assert_eq!(l.locate(30), None);
        l.learn(1, 99); // known already
        assert_eq!(l.ends, [10, 30]);
    }

    #[test]
    fn the_cache_keeps_to_its_bound() {
        let mut c = ChunkCache::new(10);
        c.put(Bytes::from_static(b"a"), Bytes::from_static(b"12345"));
        c.put(Bytes::from_static(b"b"), Bytes::from_static(b"12345"));
        assert_eq!(c.bytes(), 10);
        assert!(c.get(&Bytes::from_static(b"a")).is_some());
        c.put(Bytes::from_static(b"c"), Bytes::from_static(b"123"));
        // b was the least recently used.
        assert!(c.get(&Bytes::from_static(b"b")).is_none());
        assert_eq!(c.bytes(), 8);
        c.put(Bytes::from_static(b"d"), Bytes::from_static(b"12345678901"));
        assert_eq!(c.bytes(), 0, "a chunk larger than the cache is not kept");
    }
}
