//! A small cache of answers with a deadline each and a bounded number of entries, keyed by
//! a keyed hash (BLAKE3 with a random per-process key) of what was asked, so a token is
//! never kept, not even as a plain hash that could be checked against a guess.
//!
//! It keeps TokenReview answers (a positive one for a few seconds, so a deleted
//! ServiceAccount or pod loses access within that bound; a negative one for less) and the
//! labels of ServiceAccounts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

/// Entries at most; when full, expired entries go first, then those expiring soonest.
pub const MAX_ENTRIES: usize = 4096;

pub type Key = [u8; 32];

pub struct TtlCache<V> {
    hash_key: [u8; 32],
    entries: Mutex<HashMap<Key, (Instant, V)>>,
    max: usize,
}

impl<V: Clone> TtlCache<V> {
    pub fn new(max: usize) -> Self {
        let mut hash_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut hash_key);
        TtlCache {
            hash_key,
            entries: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// The key of `parts` (each length-prefixed, so no two lists share a key).
    pub fn key(&self, parts: &[&[u8]]) -> Key {
        let mut h = blake3::Hasher::new_keyed(&self.hash_key);
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        *h.finalize().as_bytes()
    }

    /// The value under `key`, unless it expired.
    pub fn get(&self, key: &Key) -> Option<V> {
        let mut m = self.entries.lock().ok()?;
        match m.get(key) {
            Some((until, v)) if Instant::now() < *until => Some(v.clone()),
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `value` for `ttl` (not at all for a zero `ttl`).
    pub fn insert(&self, key: Key, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let Ok(mut m) = self.entries.lock() else {
            return;
        };
        let now = Instant::now();
        if m.len() >= self.max && !m.contains_key(&key) {
            m.retain(|_, (until, _)| *until > now);
            while m.len() >= self.max {
                let Some(soonest) = m
                    .iter()
                    .min_by_key(|(_, (until, _))| *until)
                    .map(|(k, _)| *k)
                else {
                    break;
                };
                m.remove(&soonest);
            }
        }
        m.insert(key, (now + ttl, value));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        if let Ok(mut m) = self.entries.lock() {
            m.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire() {
        let c = TtlCache::new(10);
        let k = c.key(&[b"aud", b"token"]);
        c.insert(k, 1, Duration::from_millis(30));
        assert_eq!(c.get(&k), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(c.get(&k), None);
        assert!(c.is_empty());
        c.insert(k, 2, Duration::ZERO);
        assert_eq!(c.get(&k), None, "a zero ttl keeps nothing");
    }

    #[test]
    fn keys_are_keyed_and_unambiguous() {
        let a = TtlCache::<u8>::new(1);
        let b = TtlCache::<u8>::new(1);
        assert_eq!(a.key(&[b"x", b"y"]), a.key(&[b"x", b"y"]));
        assert_ne!(
            a.key(&[b"x", b"y"]),
            b.key(&[b"x", b"y"]),
            "per-process key"
        );
        assert_ne!(a.key(&[b"xy", b""]), a.key(&[b"x", b"y"]));
        assert_ne!(a.key(&[b"x", b"y"]), *blake3::hash(b"y").as_bytes());
    }

    #[test]
    fn the_entry_count_is_bounded() {
        let c = TtlCache::new(3);
        let keys: Vec<Key> = (0u8..5).map(|i| c.key(&[&[i]])).collect();
        for (i, k) in keys.iter().enumerate() {
            // Later entries live longer: the soonest to expire are dropped first.
            c.insert(*k, i, Duration::from_secs(10 + i as u64));
        }
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&keys[0]), None);
        assert_eq!(c.get(&keys[1]), None);
        assert_eq!(c.get(&keys[4]), Some(4));
        // Replacing an entry of a full cache drops nothing.
        c.insert(keys[4], 40, Duration::from_secs(1));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&keys[4]), Some(40));
        c.clear();
        assert!(c.is_empty());
    }
}
