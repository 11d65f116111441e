//! The manifests in memory: loaded on use, written back incrementally by the flusher
//! ([`super::manifest_store`]), and dropped again so that memory stays bounded whatever
//! the number of targets:
//!
//! - a manifest not used for [`ManifestLimits::idle`] (config key `syncManifestIdle`,
//!   default 2 minutes) with nothing left to write is dropped;
//! - when the entries of all resident manifests pass [`ManifestLimits::max_entries`]
//!   (config key `syncManifestEntries`, default 1,000,000, about 200 MB), the least
//!   recently used ones with nothing left to write are dropped until 90% of it remain;
//!   ones with changes are written first (the flusher runs every few seconds).
//!
//! A dropped manifest is loaded again on its next use. Nothing is lost between a flush and
//! an eviction: a manifest is dropped only while the map's lock is held, no request or
//! flush holds it (the map's reference is the only one, and a new one is only handed out
//! under that lock), and it has no unwritten change.
//!
//! Gauges `datamover_sync_manifests_resident` and `datamover_sync_manifest_entries_resident`
//! and the counter `datamover_sync_manifest_evictions_total` show it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datamover_repo::objects::ObjectStore;
use prometheus::{IntCounter, IntGauge};

use super::manifest_store::{self as store, Stamper, Stored};
use super::record;
use super::state::{Entry, Manifest};
use crate::metrics::Metrics;

/// How long a manifest may stay unused, and how many entries may be resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestLimits {
    pub idle: Duration,
    pub max_entries: usize,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        ManifestLimits {
            idle: Duration::from_secs(120),
            max_entries: 1_000_000,
        }
    }
}

impl ManifestLimits {
    /// From the server's config keys `syncManifestIdle` (a duration such as `2m`) and
    /// `syncManifestEntries` (a count).
    pub fn from_config(config: &BTreeMap<String, String>) -> Result<ManifestLimits, String> {
        let mut l = ManifestLimits::default();
        if let Some(v) = config.get("syncManifestIdle").filter(|v| !v.is_empty()) {
            l.idle = humantime::parse_duration(v).map_err(|e| {
                format!("config key syncManifestIdle = '{v}' is not a duration ({e}); write e.g. 2m or 30s")
            })?;
        }
        if let Some(v) = config.get("syncManifestEntries").filter(|v| !v.is_empty()) {
            l.max_entries = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                format!("config key syncManifestEntries = '{v}' is not a positive count; write e.g. 1000000")
            })?;
        }
        Ok(l)
    }
}

/// A loaded manifest and what changed in it since it was last written.
pub struct Loaded {
    pub manifest: Manifest,
    /// Paths set (`Some`) or removed (`None`) since the last write.
    pending: HashMap<String, Option<Entry>>,
    stored: Stored,
}

impl Loaded {
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.manifest.entries.get(path)
    }

    pub fn set(&mut self, path: String, e: Entry) {
        if self.manifest.entries.get(&path) == Some(&e) {
            return;
        }
        self.pending.insert(path.clone(), Some(e.clone()));
        self.manifest.entries.insert(path, e);
    }

    pub fn remove(&mut self, path: &str) {
        if self.manifest.entries.remove(path).is_some() {
            self.pending.insert(path.to_string(), None);
        }
    }

    /// Keeps only the paths `keep` accepts; whether any went.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) -> bool {
        let gone: Vec<String> = self
            .manifest
            .entries
            .keys()
            .filter(|k| !keep(k))
            .cloned()
            .collect();
        for k in &gone {
            self.remove(k);
        }
        !gone.is_empty()
    }

    fn has_changes(&self) -> bool {
        !self.pending.is_empty() || self.stored.needs_base
    }
}

/// One manifest's place in memory.
pub struct Slot {
    pub data: tokio::sync::Mutex<Option<Loaded>>,
    /// Milliseconds since the cache started, at the last use.
    last_used: AtomicU64,
    entries: AtomicUsize,
}

impl Slot {
    /// Records the entry count after a change (under the data lock).
    pub fn note_len(&self, l: &Loaded) {
        self.entries
            .store(l.manifest.entries.len(), Ordering::Relaxed);
    }
}

struct Gauges {
    resident: IntGauge,
    entries: IntGauge,
    evictions: IntCounter,
}

impl Gauges {
    fn new(metrics: &Metrics) -> Gauges {
        let g = Gauges {
            resident: IntGauge::new(
                "datamover_sync_manifests_resident",
                "Edge-sync manifests held in memory",
            )
            .expect("a valid metric name"),
            entries: IntGauge::new(
                "datamover_sync_manifest_entries_resident",
                "Entries of the edge-sync manifests held in memory",
            )
            .expect("a valid metric name"),
            evictions: IntCounter::new(
                "datamover_sync_manifest_evictions_total",
                "Edge-sync manifests dropped from memory (idle, or over syncManifestEntries)",
            )
            .expect("a valid metric name"),
        };
        for c in [
            Box::new(g.resident.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(g.entries.clone()),
            Box::new(g.evictions.clone()),
        ] {
            if let Err(e) = metrics.registry.register(c) {
                tracing::debug!(error = %e, "sync manifest metric not registered");
            }
        }
        g
    }
}

/// The resident manifests.
pub struct Manifests {
    objects: Arc<dyn ObjectStore>,
    metrics: Arc<Metrics>,
    limits: ManifestLimits,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    dirty: Mutex<HashSet<String>>,
    /// One flush at a time (the flusher's and the one at shutdown).
    flushing: tokio::sync::Mutex<()>,
    stamper: Stamper,
    started: Instant,
    gauges: Gauges,
}

impl Manifests {
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        metrics: Arc<Metrics>,
        limits: ManifestLimits,
    ) -> Manifests {
        let gauges = Gauges::new(&metrics);
        Manifests {
            objects,
            metrics,
            limits,
            slots: Mutex::default(),
            dirty: Mutex::default(),
            flushing: tokio::sync::Mutex::new(()),
            stamper: Stamper::default(),
            started: Instant::now(),
            gauges,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The slot of manifest `key` (its old JSON key), created empty if it is not resident
    /// (the caller loads it: [`Manifests::ensure_loaded`]).
    pub fn slot(&self, key: &str) -> Arc<Slot> {
        let now = self.now_ms();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(key) {
            s.last_used.store(now, Ordering::Relaxed);
            return Arc::clone(s);
        }
        let s = Arc::new(Slot {
            data: tokio::sync::Mutex::new(None),
            last_used: AtomicU64::new(now),
            entries: AtomicUsize::new(0),
        });
        slots.insert(key.to_string(), Arc::clone(&s));
        // Over the cap: make room now rather than at the next sweep.
        let total: usize = slots
            .values()
            .map(|s| s.entries.load(Ordering::Relaxed))
            .sum();
        if total > self.limits.max_entries {
            self.evict_locked(&mut slots, None);
        }
        self.gauges.resident.set(slots.len() as i64);
        s
    }

    /// Loads the manifest into `data` if it is not there yet.
    pub async fn ensure_loaded(
        &self,
        key: &str,
        slot: &Slot,
        data: &mut Option<Loaded>,
    ) -> Result<(), datamover_repo::store::StoreError> {
        if data.is_some() {
            return Ok(());
        }
        let t = Instant::now();
        let loaded = store::load(self.objects.as_ref(), key).await;
        self.metrics
            .store_seconds
            .with_label_values(&["get"])
            .observe(t.elapsed().as_secs_f64());
        let l = loaded.inspect_err(|_| {
            self.metrics
                .store_requests
                .with_label_values(&["get", "sync-state", "error"])
                .inc();
        })?;
        self.metrics
            .store_requests
            .with_label_values(&["list", "sync-state", "ok"])
            .inc();
        self.metrics
            .store_requests
            .with_label_values(&["get", "sync-state", "ok"])
            .inc_by(l.reads);
        let loaded = Loaded {
            manifest: l.manifest,
            pending: HashMap::new(),
            stored: l.stored,
        };
        slot.note_len(&loaded);
        // An old JSON manifest, or a damaged one: written anew at the next flush.
        let rewrite = loaded.stored.needs_base;
        *data = Some(loaded);
        if rewrite {
            self.mark_dirty(key);
        }
        Ok(())
    }

    pub fn mark_dirty(&self, key: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
    }

    fn take_dirty(&self) -> Vec<String> {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }

    /// Writes what changed in every manifest marked dirty: a delta, or a new base when
    /// the deltas have grown. Failed writes are retried at the next flush.
    pub async fn flush(&self) {
        let _one = self.flushing.lock().await;
        for key in self.take_dirty() {
            let slot = {
                let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
                match slots.get(&key) {
                    Some(s) => Arc::clone(s),
                    None => continue,
                }
            };
            self.flush_one(&key, &slot).await;
        }
        self.update_gauges();
    }

    async fn flush_one(&self, key: &str, slot: &Slot) {
        let stamp = self.stamper.next();
        let (bytes, base, taken) = {
            let mut data = slot.data.lock().await;
            let Some(l) = data.as_mut() else { return };
            if !l.has_changes() {
                return;
            }
            let taken = std::mem::take(&mut l.pending);
            let delta = store::encode_delta(&taken);
            if l.stored.fold_due(delta.len() as u64) {
                (store::encode_base(&l.manifest), true, taken)
            } else {
                (delta, false, taken)
            }
        };
        let okey = store::object_key(key, base, &stamp);
        let len = bytes.len() as u64;
        let put = record(
            &self.metrics,
            "put",
            "sync-state",
            self.objects.put(&okey, Bytes::from(bytes), None),
        )
        .await;
        if let Err(e) = put {
            tracing::warn!(error = %e, "writing a sync manifest failed: retried shortly");
            let mut data = slot.data.lock().await;
            if let Some(l) = data.as_mut() {
                // Changes made since win over the ones taken.
                for (p, v) in taken {
                    l.pending.entry(p).or_insert(v);
                }
            }
            self.mark_dirty(key);
            return;
        }
        {
            let mut data = slot.data.lock().await;
            if let Some(l) = data.as_mut() {
                if base {
                    l.stored = Stored {
                        base: Some(okey),
                        base_bytes: len,
                        ..Stored::default()
                    };
                } else {
                    l.stored.deltas += 1;
                    l.stored.delta_bytes += len;
                }
            }
        }
        if base {
            let t = Instant::now();
            match store::remove_before(self.objects.as_ref(), key, &stamp).await {
                Ok(n) => {
                    self.metrics
                        .store_requests
                        .with_label_values(&["delete", "sync-state", "ok"])
                        .inc_by(n + 1);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "older sync manifest objects not removed: the next base removes them")
                }
            }
            self.metrics
                .store_seconds
                .with_label_values(&["delete"])
                .observe(t.elapsed().as_secs_f64());
        }
    }

    /// Flushes, then drops idle manifests and, over the cap, the least recently used.
    pub async fn sweep(&self) {
        self.flush().await;
        let now = self.now_ms();
        let idle = self.limits.idle.as_millis() as u64;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        self.evict_locked(&mut slots, Some(now.saturating_sub(idle)));
        self.gauges.resident.set(slots.len() as i64);
    }

    /// Drops evictable manifests last used before `idle_before`, then, while the
    /// entries pass the cap, the least recently used evictable ones.
    fn evict_locked(&self, slots: &mut HashMap<String, Arc<Slot>>, idle_before: Option<u64>) {
        let dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let evictable = |k: &str, s: &Arc<Slot>| {
            // Only the map holds it (no request, no flush), and nothing is unwritten.
            Arc::strong_count(s) == 1
                && !dirty.contains(k)
                && s.data
                    .try_lock()
                    .is_ok_and(|d| d.as_ref().is_none_or(|l| !l.has_changes()))
        };
        let before = slots.len();
        if let Some(cut) = idle_before {
            slots.retain(|k, s| {
                s.last_used.load(Ordering::Relaxed) >= cut || !evictable(k.as_str(), s)
            });
        }
        let mut total: usize = slots
            .values()
            .map(|s| s.entries.load(Ordering::Relaxed))
            .sum();
        if total > self.limits.max_entries {
            let goal = self.limits.max_entries - self.limits.max_entries / 10;
            let mut by_age: Vec<(u64, String)> = slots
                .iter()
                .map(|(k, s)| (s.last_used.load(Ordering::Relaxed), k.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, k) in by_age {
                if total <= goal {
                    break;
                }
                if let Some(s) = slots.get(&k)
                    && evictable(k.as_str(), s)
                {
                    total -= s.entries.load(Ordering::Relaxed);
                    slots.remove(&k);
                }
            }
        }
        let evicted = before - slots.len();
        if evicted > 0 {
            self.gauges.evictions.inc_by(evicted as u64);
            tracing::debug!(
                evicted,
                resident = slots.len(),
                "sync manifests dropped from memory"
            );
        }
        self.gauges.entries.set(
            slots
                .values()
                .map(|s| s.entries.load(Ordering::Relaxed))
                .sum::<usize>() as i64,
        );
    }

    fn update_gauges(&self) {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        self.gauges.resident.set(slots.len() as i64);
        self.gauges.entries.set(
            slots
                .values()
                .map(|s| s.entries.load(Ordering::Relaxed))
                .sum::<usize>() as i64,
        );
    }

    /// Manifests resident now.
    pub fn resident(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datamover_repo::objects::FsObjects;

    fn entry(i: u64) -> Entry {
        Entry {
            etag: format!("\"e{i}\""),
            size: i,
            hash: [7; 32],
            mtime_ns: 1,
            mode: 0o644,
        }
    }

    fn cache(dir: &std::path::Path, limits: ManifestLimits) -> Manifests {
        Manifests::new(
            Arc::new(FsObjects::new(dir)),
            Arc::new(Metrics::new().unwrap()),
            limits,
        )
    }

    async fn set(m: &Manifests, key: &str, path: &str, e: Entry) {
        let slot = m.slot(key);
        let mut data = slot.data.lock().await;
        m.ensure_loaded(key, &slot, &mut data).await.unwrap();
        let l = data.as_mut().unwrap();
        l.set(path.to_string(), e);
        slot.note_len(l);
        drop(data);
        m.mark_dirty(key);
    }

    async fn entries(m: &Manifests, key: &str) -> HashMap<String, Entry> {
        let slot = m.slot(key);
        let mut data = slot.data.lock().await;
        m.ensure_loaded(key, &slot, &mut data).await.unwrap();
        data.as_ref().unwrap().manifest.entries.clone()
    }

    fn stored_bytes(dir: &std::path::Path) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let root = dir.join(".datamover/manifests");
        for d in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if d.path().is_dir() {
                for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if !name.starts_with('.') {
                        out.push((name, f.metadata().unwrap().len()));
                    }
                }
            } else {
                out.push((
                    d.file_name().to_string_lossy().into_owned(),
                    d.metadata().unwrap().len(),
                ));
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn flushes_write_deltas_then_fold_and_a_new_process_reads_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let key = ".datamover/manifests/aa.json";
        let m = cache(dir.path(), ManifestLimits::default());
        for i in 0..2000 {
            set(&m, key, &format!("dir/file-{i:05}"), entry(i)).await;
        }
        m.flush().await;
        let after_base = stored_bytes(dir.path());
        assert_eq!(after_base.len(), 1, "one base: {after_base:?}");
        assert!(after_base[0].0.starts_with("b-") && after_base[0].1 > 100_000);
        // One change: a delta of about a hundred bytes, not the whole manifest again.
        set(&m, key, "dir/file-00007", entry(99_999)).await;
        m.flush().await;
        let after_delta = stored_bytes(dir.path());
        let new: Vec<_> = after_delta
            .iter()
            .filter(|o| !after_base.contains(o))
            .collect();
        assert_eq!(new.len(), 1, "{new:?}");
        assert!(new[0].0.starts_with("d-") && new[0].1 < 200, "{new:?}");
        // A removal is a delta too; another process sees both.
        {
            let slot = m.slot(key);
            let mut data = slot.data.lock().await;
            data.as_mut().unwrap().remove("dir/file-00008");
        }
        m.mark_dirty(key);
        m.flush().await;
        let want = entries(&m, key).await;
        assert_eq!(want.len(), 1999);
        let other = cache(dir.path(), ManifestLimits::default());
        assert_eq!(entries(&other, key).await, want);
        // Past FOLD_DELTAS deltas a flush writes a base and removes what it replaces.
        for i in 0..(store::FOLD_DELTAS as u64 + 1) {
            set(&m, key, "dir/file-00009", entry(200_000 + i)).await;
            m.flush().await;
        }
        // 19 deltas written since the first base: one fold happened, the first base and
        // the deltas before the new one are gone, and the deltas since stay below the cap.
        let folded = stored_bytes(dir.path());
        let bases: Vec<_> = folded.iter().filter(|o| o.0.starts_with("b-")).collect();
        assert_eq!(bases.len(), 1, "{folded:?}");
        assert_ne!(bases[0], &after_base[0], "{folded:?}");
        assert!(folded.len() <= store::FOLD_DELTAS, "{folded:?}");
        let again = cache(dir.path(), ManifestLimits::default());
        assert_eq!(entries(&again, key).await, entries(&m, key).await);
    }

    #[tokio::test]
    async fn old_json_manifests_load_and_are_replaced_by_a_base() {
        let dir = tempfile::tempdir().unwrap();
        let key = ".datamover/manifests/bb.json";
        let mut old = Manifest::default();
        old.entries.insert("a.txt".into(), entry(1));
        let p = dir.path().join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, serde_json::to_vec(&old).unwrap()).unwrap();
        let m = cache(dir.path(), ManifestLimits::default());
        assert_eq!(entries(&m, key).await, old.entries);
        // Loaded from the old format: the next flush writes a base, the JSON goes.
        m.mark_dirty(key);
        m.flush().await;
        let objs = stored_bytes(dir.path());
        assert_eq!(objs.len(), 1, "{objs:?}");
        assert!(objs[0].0.starts_with("b-"), "{objs:?}");
        let other = cache(dir.path(), ManifestLimits::default());
        assert_eq!(entries(&other, key).await, old.entries);
    }

    #[tokio::test]
    async fn idle_and_over_cap_manifests_leave_memory_but_never_with_changes() {
        let dir = tempfile::tempdir().unwrap();
        let m = cache(
            dir.path(),
            ManifestLimits {
                idle: Duration::from_millis(200),
                max_entries: 25,
            },
        );
        for t in 0..3 {
            for i in 0..10 {
                set(
                    &m,
                    &format!(".datamover/manifests/{t}.json"),
                    &format!("f{i}"),
                    entry(i),
                )
                .await;
            }
        }
        // Over the cap with changes unwritten: nothing is dropped before the flush.
        assert_eq!(m.resident(), 3);
        m.evict_locked(&mut m.slots.lock().unwrap(), None);
        assert_eq!(m.resident(), 3, "unwritten manifests stay");
        m.sweep().await;
        assert_eq!(m.resident(), 2, "the least recently used goes once written");
        // A manifest in use (its slot held) stays however idle.
        let held = m.slot(".datamover/manifests/2.json");
        tokio::time::sleep(Duration::from_millis(300)).await;
        m.sweep().await;
        assert_eq!(m.resident(), 1);
        drop(held);
        m.sweep().await;
        assert_eq!(m.resident(), 0);
        assert_eq!(m.gauges.evictions.get(), 3);
        // Loaded again with everything.
        assert_eq!(entries(&m, ".datamover/manifests/0.json").await.len(), 10);
    }

    #[tokio::test]
    async fn concurrent_changes_while_flushing_and_evicting_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(cache(
            dir.path(),
            ManifestLimits {
                idle: Duration::ZERO,
                max_entries: 1,
            },
        ));
        let key = ".datamover/manifests/cc.json";
        let writer = {
            let m = Arc::clone(&m);
            tokio::spawn(async move {
                for i in 0..300u64 {
                    set(&m, key, &format!("f{i}"), entry(i)).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        // Bounded: until the writer is done.
        while !writer.is_finished() {
            m.sweep().await;
            tokio::task::yield_now().await;
        }
        writer.await.unwrap();
        m.sweep().await;
        assert_eq!(m.resident(), 0);
        let fresh = cache(dir.path(), ManifestLimits::default());
        assert_eq!(entries(&fresh, key).await.len(), 300);
    }

    #[test]
    fn limits_from_config() {
        let mut c = BTreeMap::new();
        assert_eq!(
            ManifestLimits::from_config(&c).unwrap(),
            ManifestLimits::default()
        );
        c.insert("syncManifestIdle".to_string(), "30s".to_string());
        c.insert("syncManifestEntries".to_string(), "5000".to_string());
        let l = ManifestLimits::from_config(&c).unwrap();
        assert_eq!((l.idle, l.max_entries), (Duration::from_secs(30), 5000));
        c.insert("syncManifestEntries".to_string(), "0".to_string());
        assert!(ManifestLimits::from_config(&c).is_err());
        c.insert("syncManifestEntries".to_string(), "1".to_string());
        c.insert("syncManifestIdle".to_string(), "soon".to_string());
        assert!(ManifestLimits::from_config(&c).is_err());
    }
}
