//! Maintenance and verification.
//!
//! **Garbage collection runs in two phases**, so that it is safe while backups run, on
//! this server or on other replicas of the same bucket, without a global lock:
//!
//! 1. *Condemn*: a chunk that no snapshot refers to, in a pack older than the grace
//!    period, is written to a `condemned/` record (chunk id and the pack holding it).
//!    Every server treats a condemned copy as absent: `FindMissing` asks for it again and
//!    a commit that refers to it first copies it into a new pack ("rescue"). Commits
//!    reload `index/` and `condemned/` before they check their references.
//! 2. *Sweep*, in a later run: a condemned copy is deleted only when its record is older
//!    than the grace period **and** older than the oldest backup session still running
//!    on any server (each server publishes that time in `locks/`), and still no snapshot
//!    refers to it. A backup that found a chunk present before it was condemned
//!    therefore always finds it (or its rescued copy) at commit time.
//!
//! Packs whose every chunk is dead are deleted; packs mostly dead are rewritten with
//! their live chunks (sealed blobs are copied as they are). The index is then compacted
//! into one object and the old index objects removed; other servers notice the removal
//! and reload. Writes happen before deletions, so a crash mid-way leaves duplicates,
//! never a gap.
//!
//! **Verification** checks that every snapshot's catalog and chunks are indexed and,
//! with `read_data`, downloads packs (all or a sample) and checks every chunk against
//! its id, naming the files a bad chunk belongs to.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use datamover_core::chunk::ChunkId;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::{Repository, poisoned};
use crate::RepoError;
use crate::crypto;
use crate::index::{IndexFile, PackEntries};
use plan::{Condemnations, NameLog, Planner, WorkDir, blocking};

mod plan;
#[cfg(test)]
mod plan_tests;
mod verify;
use crate::pack::PackBuilder;
use crate::snapshot::SnapshotFile;
use crate::store::FileType;

/// A maintenance lock older than this is considered abandoned.
const LOCK_STALE: Duration = Duration::from_secs(3600);
/// A server's published session time older than this is ignored (the server is gone).
const SESSIONS_STALE: Duration = Duration::from_secs(180);
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One copy of a chunk condemned by maintenance.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub(crate) struct CondemnedEntry {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(string, tag = "2")]
    pub pack: String,
}

/// A `condemned/<id>` object.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CondemnedFile {
    #[prost(uint64, tag = "1")]
    pub created_unix: u64,
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<CondemnedEntry>,
}

/// `locks/maintenance` and `locks/sessions-<server>`: plain JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LockFile {
    owner: String,
    written_unix: u64,
    /// For session records: when the oldest running backup session began.
    #[serde(default)]
    oldest_session_unix: Option<u64>,
}

/// How a maintenance run behaves.
#[derive(Debug, Clone)]
pub struct MaintenanceOptions {
    /// How long a pack is left alone after it was written, and how long a chunk stays
    /// condemned before it is deleted.
    pub grace: Duration,
    /// Packs with less than this fraction of live bytes are rewritten.
    pub repack_below: f64,
    /// Only report what would be done.
    pub dry_run: bool,
    /// When this server's oldest running backup session began, if any.
    pub oldest_local_session_unix: Option<u64>,
    /// Who runs it (for the lock), e.g. the server's instance id.
    pub owner: String,
}

impl Default for MaintenanceOptions {
    fn default() -> Self {
        MaintenanceOptions {
            grace: Duration::from_secs(24 * 3600),
            repack_below: 0.5,
            dry_run: false,
            oldest_local_session_unix: None,
            owner: "datamover".into(),
        }
    }
}

/// What a maintenance run did (or, in a dry run, would do).
#[derive(Debug, Default, Clone, Serialize)]
pub struct MaintenanceReport {
    pub dry_run: bool,
    pub snapshots: u64,
    pub packs: u64,
    pub chunks_referenced: u64,
    /// Unreferenced chunks condemned by this run.
    pub chunks_condemned: u64,
    /// Condemned chunks a snapshot refers to again: kept.
    pub chunks_rescued: u64,
    /// Condemned chunks still waiting for their grace period or for a running backup.
    pub chunks_waiting: u64,
    pub chunks_removed: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_written: u64,
    pub bytes_freed: u64,
    pub index_objects_replaced: u64,
    pub orphan_packs_adopted: u64,
    /// The most index entries the run held in memory at once (the rest were sorted
    /// on local disk): bounded by the batch, whatever the repository's size.
    pub entries_in_memory_peak: u64,
    /// Records that went through its sorts on local disk.
    pub entries_sorted: u64,
}

/// How thoroughly verify reads data.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Fraction of packs (0 to 1) to download and check chunk by chunk.
    pub read_data: f64,
    /// Only this tenant's snapshots and chunks; `None` for all.
    pub tenant: Option<String>,
}

/// Something wrong that verify found.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub snapshot_id: String,
    pub tag: String,
    /// The file affected (empty for the snapshot as a whole).
    pub path: String,
    pub message: String,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    pub snapshots: u64,
    pub files: u64,
    pub chunks: u64,
    pub packs_read: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
}

/// What happens to one chunk copy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(in crate::repository) enum Fate {
    Keep,
    Dead,
}

impl Repository {
    /// All snapshots of all tenants, oldest first.
    pub async fn all_snapshots(&self) -> Result<Vec<SnapshotFile>, RepoError> {
        self.load_snapshots(|_| true).await
    }

    /// [`Self::adopt_orphan_packs`] at start, unless a maintenance run holds the bucket's
    /// lock: while it deletes, the packs it doomed are in no index object any more (the
    /// old objects go first) but still in `data/`, and adopting them would index chunks
    /// whose pack is about to disappear. The run adopts real orphans itself, under the
    /// lock, at its start.
    pub(crate) async fn adopt_orphan_packs_unless_maintained(&self) -> Result<u64, RepoError> {
        let now = unix_now();
        let locks = self.read_locks().await?;
        if let Some((_, l)) = locks
            .iter()
            .find(|(n, l)| n == "maintenance" && l.written_unix + LOCK_STALE.as_secs() > now)
        {
            tracing::info!(
                server = %l.owner,
                "maintenance is running: packs without an index are left for it to adopt"
            );
            return Ok(0);
        }
        self.adopt_orphan_packs().await
    }

    /// Indexes packs that are in `data/` but in no index object: what a server killed
    /// between uploading a pack and writing its index left behind. Returns how many.
    pub async fn adopt_orphan_packs(&self) -> Result<u64, RepoError> {
        let listed = self.store.list(FileType::Pack).await?;
        let known: HashSet<String> = {
            let ix = self.index.read().map_err(poisoned)?;
            listed.iter().filter(|n| ix.has_pack(n)).cloned().collect()
        };
        let mut adopted = Vec::new();
        for name in listed.iter().filter(|n| !known.contains(*n)) {
            let bytes = match self.store.read(FileType::Pack, name).await {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            if blake3::hash(&bytes).to_hex().as_str() != name {
                tracing::warn!(pack = %name, "unindexed pack is torn or corrupt: left for maintenance");
                continue;
            }
            match PackBuilder::read_trailer(&self.keys, name, &bytes) {
                Ok(entries) => adopted.push(entries),
                Err(e) => tracing::warn!(pack = %name, error = %e, "unindexed pack unreadable"),
            }
        }
        if adopted.is_empty() {
            return Ok(0);
        }
        let n = adopted.len() as u64;
        let file = IndexFile { packs: adopted };
        let name = self.write_index_file(&file).await?;
        self.ingest(Vec::from([(name, file)])).await?;
        tracing::info!(packs = n, "adopted packs that had no index");
        Ok(n)
    }

    /// Publishes when this server's oldest running backup began (or that none runs),
    /// so maintenance on any replica keeps what such a backup may rely on.
    pub async fn publish_sessions(
        &self,
        server: &str,
        oldest_session_unix: Option<u64>,
    ) -> Result<(), RepoError> {
        let name = format!("sessions-{server}");
        match oldest_session_unix {
            Some(t) => {
                let lock = LockFile {
                    owner: server.to_string(),
                    written_unix: unix_now(),
                    oldest_session_unix: Some(t),
                };
                let json = serde_json::to_vec(&lock).map_err(|e| RepoError::Task(e.to_string()))?;
                self.store
                    .write(FileType::Lock, &name, Bytes::from(json))
                    .await?;
            }
            None => match self.store.remove(FileType::Lock, &name).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }

    async fn read_locks(&self) -> Result<Vec<(String, LockFile)>, RepoError> {
        let mut out = Vec::new();
        for name in self.store.list(FileType::Lock).await? {
            match self.store.read(FileType::Lock, &name).await {
                Ok(b) => {
                    if let Ok(l) = serde_json::from_slice::<LockFile>(&b) {
                        out.push((name, l));
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Garbage collection, repacking and index compaction (see the module docs).
    pub async fn maintain(
        self: &Arc<Self>,
        opts: &MaintenanceOptions,
    ) -> Result<MaintenanceReport, RepoError> {
        let mut report = MaintenanceReport {
            dry_run: opts.dry_run,
            ..Default::default()
        };
        // One run at a time in this process, whatever its owner name.
        let Ok(_running) = self.maintaining.try_lock() else {
            return Err(RepoError::Busy(
                "maintenance is already running on this server; wait for it to finish".into(),
            ));
        };
        let now = unix_now();
        let grace = opts.grace.as_secs();
        // One maintenance at a time per bucket (best effort: objects have no compare
        // and swap everywhere; the two phases keep data safe even if two overlap).
        let locks = self.read_locks().await?;
        if let Some((_, l)) = locks.iter().find(|(n, l)| {
            n == "maintenance"
                && l.owner != opts.owner
                && l.written_unix + LOCK_STALE.as_secs() > now
        }) {
            return Err(RepoError::Busy(format!(
                "maintenance is already running on server {} (started at unix time {}); try again later",
                l.owner, l.written_unix
            )));
        }
        if !opts.dry_run {
            let lock = LockFile {
                owner: opts.owner.clone(),
                written_unix: now,
                oldest_session_unix: None,
            };
            let json = serde_json::to_vec(&lock).map_err(|e| RepoError::Task(e.to_string()))?;
            self.store
                .write(FileType::Lock, "maintenance", Bytes::from(json))
                .await?;
        }
        let outcome = self
            .maintain_locked(opts, now, grace, &locks, &mut report)
            .await;
        if !opts.dry_run {
            let _ = self.store.remove(FileType::Lock, "maintenance").await;
        }
        outcome.map(|()| report)
    }

    async fn maintain_locked(
        self: &Arc<Self>,
        opts: &MaintenanceOptions,
        now: u64,
        grace: u64,
        locks: &[(String, LockFile)],
        report: &mut MaintenanceReport,
    ) -> Result<(), RepoError> {
        // Everything indexed, and packs a crashed server left without an index.
        self.flush().await?;
        self.refresh_index().await?;
        if !opts.dry_run {
            report.orphan_packs_adopted = self.adopt_orphan_packs().await?;
        }
        let index_names = self.store.list(FileType::Index).await?;
        let mut planner = Planner::new(
            WorkDir::new(self.index_dir.path())?,
            self.opts.maintenance_batch,
        )?;

        // Every chunk any snapshot refers to, sorted on local disk. Any error stops the
        // run: nothing is deleted on an incomplete picture.
        let snaps = self.all_snapshots().await?;
        report.snapshots = snaps.len() as u64;
        for s in &snaps {
            let catalog = s.catalog_ids()?;
            blocking(|| planner.reference(catalog.iter().copied()))?;
            let mut nodes = self.catalog_nodes(&s.tenant, catalog);
            while let Some(node) = nodes.recv().await {
                let node = node?;
                let mut ids = Vec::with_capacity(node.chunks.len());
                for c in &node.chunks {
                    ids.push(
                        ChunkId::from_slice(c)
                            .map_err(|e| RepoError::corrupt(format!("snapshot {}", s.id), e))?,
                    );
                }
                blocking(|| planner.reference(ids))?;
            }
        }

        // Condemnations that may be swept: old enough, and older than every backup
        // session still running anywhere.
        let mut protect_from = opts.oldest_local_session_unix.unwrap_or(u64::MAX);
        for (name, l) in locks {
            if name.starts_with("sessions-")
                && l.written_unix + SESSIONS_STALE.as_secs() > now
                && let Some(t) = l.oldest_session_unix
            {
                protect_from = protect_from.min(t);
            }
        }
        let records = self.read_condemned().await?;
        let mut cond = Condemnations {
            due: HashSet::new(),
            waiting: HashSet::new(),
        };
        for (_, rec) in &records {
            let sweepable = rec.created_unix + grace <= now && rec.created_unix < protect_from;
            for e in &rec.entries {
                if let Ok(id) = ChunkId::from_slice(&e.id) {
                    if sweepable {
                        cond.due.insert((id, e.pack.clone()));
                    } else {
                        cond.waiting.insert((id, e.pack.clone()));
                    }
                }
            }
        }

        // Every copy of every chunk, classified and sorted by id (one object at a time).
        for (i, name) in index_names.iter().enumerate() {
            let Some(file) = self.read_index_file(name).await? else {
                continue;
            };
            let ix = self.index.read().map_err(poisoned)?;
            blocking(|| {
                planner.classify(
                    i,
                    &file,
                    |p| p.created_unix + grace > now,
                    |pack, ids| ix.canonical_in(pack, ids),
                    |id, pack| cond.of(id, pack),
                )
            })?;
        }
        blocking(|| planner.join())?;

        // The fate of every copy, pack by pack, in the order of the objects: writes go
        // as they are decided (the rewritten packs, the compacted index in objects of
        // about `chunks_per_index` chunks, new condemnations); deletions wait for the end.
        let work = WorkDir::new(self.index_dir.path())?;
        let mut doomed = NameLog::new(&work, "doomed")?;
        let mut written: HashSet<String> = HashSet::new();
        let mut group: Vec<PackEntries> = Vec::new();
        let mut group_chunks = 0usize;
        let mut new_condemned: Vec<CondemnedEntry> = Vec::new();
        let mut still_condemned: HashSet<CondemnedEntry> = HashSet::new();
        let mut builder = PackBuilder::new(self.pack_buffers.clone());
        let batch = self.opts.maintenance_batch.max(1024);
        for (i, name) in index_names.iter().enumerate() {
            let Some(file) = self.read_index_file(name).await? else {
                continue;
            };
            for (j, p) in file.packs.into_iter().enumerate() {
                let Some(plan) = blocking(|| planner.decide(i, j, &p))? else {
                    continue;
                };
                still_condemned.extend(plan.still);
                new_condemned.extend(plan.condemn);
                if !opts.dry_run && new_condemned.len() >= batch {
                    self.write_condemned(&CondemnedFile {
                        created_unix: now,
                        entries: std::mem::take(&mut new_condemned),
                    })
                    .await?;
                }
                let (live, dead) = (plan.live, plan.dead);
                let survives = if dead == 0 {
                    true
                } else if live == 0 {
                    report.packs_deleted += 1;
                    report.bytes_freed += dead;
                    false
                } else if (live as f64) < opts.repack_below * ((live + dead) as f64) {
                    report.packs_repacked += 1;
                    report.bytes_freed += dead;
                    if !opts.dry_run {
                        for done in self.repack(&p, &plan.fates, &mut builder).await? {
                            report.packs_written += 1;
                            group_chunks += done.blobs.len();
                            group.push(done);
                        }
                    }
                    false
                } else {
                    true
                };
                if opts.dry_run {
                    continue;
                }
                if survives {
                    group_chunks += p.blobs.len();
                    group.push(p);
                } else {
                    doomed.add(&p.name)?;
                }
                if group_chunks >= self.opts.chunks_per_index {
                    let packs = std::mem::take(&mut group);
                    written.insert(self.write_index_file(&IndexFile { packs }).await?);
                    group_chunks = 0;
                }
                report.entries_in_memory_peak = report
                    .entries_in_memory_peak
                    .max((group_chunks + new_condemned.len()) as u64);
            }
        }
        let tally = planner.tally;
        drop(planner);
        report.packs = tally.packs;
        report.chunks_referenced = tally.chunks_referenced;
        report.chunks_rescued = tally.chunks_rescued;
        report.chunks_removed = tally.chunks_removed;
        report.chunks_waiting = tally.chunks_waiting;
        report.chunks_condemned = tally.chunks_condemned;
        report.entries_in_memory_peak =
            report.entries_in_memory_peak.max(tally.peak_records as u64);
        report.entries_sorted = tally.sorted_records;
        if opts.dry_run {
            return Ok(());
        }
        if !builder.is_empty() {
            let done = self.write_whole_pack(builder).await?;
            report.packs_written += 1;
            group.push(done);
        }
        self.pack_buffers.release();
        if !group.is_empty() || written.is_empty() {
            let packs = std::mem::take(&mut group);
            written.insert(self.write_index_file(&IndexFile { packs }).await?);
        }
        // Condemnations: records keep their age; swept or rescued entries leave them.
        for (name, r) in &records {
            let kept: Vec<CondemnedEntry> = r
                .entries
                .iter()
                .filter(|e| still_condemned.contains(e))
                .cloned()
                .collect();
            if kept.len() == r.entries.len() {
                continue;
            }
            if !kept.is_empty() {
                self.write_condemned(&CondemnedFile {
                    created_unix: r.created_unix,
                    entries: kept,
                })
                .await?;
            }
            self.store.remove(FileType::Condemned, name).await?;
        }
        if !new_condemned.is_empty() {
            self.write_condemned(&CondemnedFile {
                created_unix: now,
                entries: new_condemned,
            })
            .await?;
        }
        // Then deletions: old index objects, dead and rewritten packs.
        for name in index_names.iter().filter(|n| !written.contains(*n)) {
            self.store.remove(FileType::Index, name).await?;
            report.index_objects_replaced += 1;
        }
        let mut doomed = doomed.read()?;
        // Bounded by the names written.
        while let Some(name) = doomed.next()? {
            match self.store.remove(FileType::Pack, &name).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        drop(work);
        self.pack_cache.lock().map_err(poisoned)?.clear();
        self.refresh_index().await?;
        tracing::info!(?report, "maintenance done");
        Ok(())
    }

    /// Copies the live chunks of `pack` into `builder`; returns the packs filled and
    /// written meanwhile.
    async fn repack(
        &self,
        pack: &PackEntries,
        fates: &[Fate],
        builder: &mut PackBuilder,
    ) -> Result<Vec<PackEntries>, RepoError> {
        let name = &pack.name;
        let bytes = self.store.read(FileType::Pack, name).await?;
        let mut done = Vec::new();
        for (b, fate) in pack.blobs.iter().zip(fates) {
            if *fate == Fate::Dead {
                continue;
            }
            let (start, end) = (b.offset as usize, b.offset as usize + b.length as usize);
            let sealed = bytes.get(start..end).ok_or_else(|| {
                RepoError::corrupt(format!("pack {name}"), "shorter than its index says")
            })?;
            let Ok(id) = ChunkId::from_slice(&b.id) else {
                continue;
            };
            builder.add(&id, &b.tenant, sealed, b.raw_length as usize);
            if builder.len() >= self.opts.pack_size {
                done.push(self.write_whole_pack(builder.take()).await?);
            }
        }
        Ok(done)
    }

    async fn write_condemned(&self, file: &CondemnedFile) -> Result<(), RepoError> {
        let sealed = crypto::pack_blob(&self.keys, &file.encode_to_vec(), 3);
        let name = blake3::hash(&sealed).to_hex().to_string();
        self.store
            .write(FileType::Condemned, &name, Bytes::from(sealed))
            .await?;
        Ok(())
    }

    async fn write_whole_pack(&self, builder: PackBuilder) -> Result<PackEntries, RepoError> {
        let (name, bytes, entries) = builder.finish(&self.keys);
        self.store.write(FileType::Pack, &name, bytes).await?;
        Ok(entries)
    }

    /// Copies condemned chunks a commit refers to into a new pack, so they stay. Returns
    /// how many were copied; the caller flushes.
    pub async fn rescue_condemned(
        self: &Arc<Self>,
        tenant: &str,
        ids: &[ChunkId],
    ) -> Result<u64, RepoError> {
        let mut rescued = 0;
        for id in ids {
            let Some(found) = self
                .index
                .read()
                .map_err(poisoned)?
                .condemned_copy(tenant, id)
            else {
                continue;
            };
            if !self.index.write().map_err(poisoned)?.reserve(tenant, *id) {
                continue; // being stored again already
            }
            let pack = match self.pack_bytes(&found.pack).await {
                Ok(p) => p,
                Err(e) => {
                    self.index.write().map_err(poisoned)?.unreserve(id);
                    return Err(e);
                }
            };
            let (start, end) = (
                found.offset as usize,
                found.offset as usize + found.length as usize,
            );
            let Some(sealed) = pack.get(start..end) else {
                self.index.write().map_err(poisoned)?.unreserve(id);
                continue;
            };
            let mut w = self.writer.lock().await;
            w.pack.add(id, tenant, sealed, found.raw_length as usize);
            if w.pack.len() >= self.opts.pack_size {
                self.write_pack(&mut w).await?;
            }
            rescued += 1;
        }
        if rescued > 0 {
            tracing::info!(
                tenant,
                chunks = rescued,
                "condemned chunks referenced again: kept"
            );
        }
        Ok(rescued)
    }
}

#[cfg(test)]
mod tests {
    use super::verify::sampled;

    #[test]
    fn sample_is_stable_and_proportional() {
        let names: Vec<String> = (0..1000u32)
            .map(|i| blake3::hash(&i.to_le_bytes()).to_hex().to_string())
            .collect();
        let n = names.iter().filter(|n| sampled(n, 0.25)).count();
        assert!((180..320).contains(&n), "{n}");
        assert!(names.iter().all(|n| sampled(n, 1.0)));
        assert!(!names.iter().any(|n| sampled(n, 0.0)));
    }
}
