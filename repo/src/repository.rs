//! The repository: chunks in packs, the index, snapshots.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use datamover_core::catalog::CatalogDecoder;
use datamover_core::chunk::{ChunkId, ChunkIdKey, ChunkerParams};
use datamover_proto::v1::Node;
use futures::StreamExt;
use prost::Message;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, Semaphore, mpsc};

use crate::RepoError;
use crate::crypto::{self, KdfParams, Keys};
use crate::index::{DiskIndex, Index, IndexFile, PackEntries, PrivateDir};
use crate::memory::PackBuffers;
use crate::pack::PackBuilder;
use crate::snapshot::SnapshotFile;
use crate::store::{FileType, Store};

const KEY_CHECK: &[u8] = b"datamover repository key check v1";
/// Catalog nodes queued towards their reader.
const CATALOG_NODE_QUEUE: usize = 1024;
/// Catalog chunks read ahead of the one being decoded.
const CATALOG_READ_AHEAD: usize = 4;
/// Sealed chunks up to this size are opened on the calling task.
const INLINE_OPEN_BYTES: usize = 16 * 1024;

/// Where a chunk is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkPlace {
    /// The pack holding it.
    pub pack: String,
    /// Its size in the pack (compressed and sealed).
    pub stored: u32,
    /// Its size.
    pub raw: u32,
}

/// A chunk read for a restore.
#[derive(Debug, Clone)]
pub enum ChunkData {
    /// Its contents, checked against its id.
    Plain(Bytes),
    /// Its contents compressed by zstd, as stored: `raw` bytes once decompressed, not
    /// yet checked against its id.
    Zstd { data: Bytes, raw: u32 },
}

/// Tuning of a repository.
#[derive(Debug, Clone)]
pub struct RepositoryOptions {
    /// A pack is written once it holds this many bytes.
    pub pack_size: usize,
    pub compression_level: i32,
    /// Packs kept in memory for reads (restores read packs mostly in order).
    pub pack_cache_packs: usize,
    /// Argon2id memory for a new repository.
    pub kdf_memory_kib: u32,
    /// An index object is written after this many packs even before a commit.
    pub packs_per_index: usize,
    /// ... or once the packs not yet indexed hold this many chunks (so the entries
    /// waiting for an index object stay few whatever the chunk size).
    pub chunks_per_index: usize,
    /// Packs uploaded at once in the background (each holds one pack in memory).
    pub upload_concurrency: usize,
    /// Where the local on-disk index lives (one file per repository, rebuilt from the
    /// bucket when missing or unusable). `None`: a directory of this process under the
    /// temp dir, removed when the repository is dropped.
    pub index_cache_dir: Option<PathBuf>,
    /// Index entries maintenance and verify sort in memory at once (per sort); the
    /// rest wait in sorted runs in the index cache directory.
    pub maintenance_batch: usize,
}

impl Default for RepositoryOptions {
    fn default() -> Self {
        RepositoryOptions {
            pack_size: 8 * 1024 * 1024,
            compression_level: 3,
            pack_cache_packs: 6,
            kdf_memory_kib: 64 * 1024,
            packs_per_index: 32,
            chunks_per_index: 50_000,
            upload_concurrency: 4,
            index_cache_dir: None,
            maintenance_batch: 500_000,
        }
    }
}

/// The `config` object: plain JSON, since it holds what is needed to derive the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RepoConfig {
    version: u32,
    id: String,
    kdf: KdfParams,
    chunker_min: u32,
    chunker_avg: u32,
    chunker_max: u32,
    /// Sealed [`KEY_CHECK`], hex: opening it proves the password.
    key_check: String,
}

/// The open pack, filled by every session. Full packs are uploaded in the background.
struct Writer {
    pack: PackBuilder,
}

/// Chunks reserved by one `add_chunks` call; released on drop unless it succeeded.
struct Reservation<'a> {
    repo: &'a Repository,
    tenant: &'a str,
    ids: Vec<ChunkId>,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(mut ix) = self.repo.index.write() {
            for id in &self.ids {
                if !ix.is_stored(self.tenant, id) {
                    ix.unreserve(id);
                }
            }
        }
    }
}

/// What [`Repository::add_chunks`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct AddResult {
    pub stored: u64,
    pub stored_bytes: u64,
    pub already_present: u64,
}

pub struct Repository {
    store: Arc<dyn Store>,
    /// Shared with the blocking threads that open objects.
    keys: Arc<Keys>,
    opts: RepositoryOptions,
    chunker: ChunkerParams,
    index: RwLock<Index>,
    /// The directory of the local index.
    index_dir: IndexDir,
    /// The repository's id (names its local index file).
    repo_id: String,
    /// One refresh of the index at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// Held by a maintenance run of this process: two never overlap, even under one
    /// owner (the bucket's lock object only keeps other servers out).
    maintaining: tokio::sync::Mutex<()>,
    writer: tokio::sync::Mutex<Writer>,
    /// One permit per pack upload in flight; holding them all means none is in flight.
    uploads: Arc<Semaphore>,
    /// Packs uploaded whose entries are not yet in an index object.
    unindexed: Mutex<Vec<PackEntries>>,
    /// The first background upload failure since the last flush.
    upload_error: Mutex<Option<RepoError>>,
    /// `condemned/` objects applied to the index.
    condemned_files: Mutex<HashSet<String>>,
    snapshots: Mutex<HashMap<String, SnapshotFile>>,
    /// Packs read recently or being read: concurrent readers of one pack share one GET.
    pack_cache: Mutex<lru::LruCache<String, Arc<OnceCell<Bytes>>>>,
    /// Memory of packs already uploaded, kept for the next packs.
    pack_buffers: PackBuffers,
}

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod fuzz_tests;
mod index_refresh;
mod maintenance;
mod synthetic;

pub use maintenance::{
    MaintenanceOptions, MaintenanceReport, Problem, VerifyOptions, VerifyReport,
};
pub use synthetic::synthetic_chunk_id;

/// Where the local index lives.
enum IndexDir {
    Given(PathBuf),
    Private(PrivateDir),
}

impl IndexDir {
    fn path(&self) -> &std::path::Path {
        match self {
            IndexDir::Given(p) => p,
            IndexDir::Private(d) => d.path(),
        }
    }
}

fn poisoned<T>(_: T) -> RepoError {
    RepoError::Task("a lock was poisoned by a panic".into())
}

impl Repository {
    /// Opens the repository in `store`, creating it if the store is empty.
    pub async fn open(
        store: Arc<dyn Store>,
        password: &[u8],
        opts: RepositoryOptions,
    ) -> Result<Arc<Repository>, RepoError> {
        store.check().await?;
        let config = match store.read(FileType::Config, "").await {
            Ok(bytes) => serde_json::from_slice::<RepoConfig>(&bytes)
                .map_err(|e| RepoError::BadConfig(e.to_string()))?,
            Err(e) if e.is_not_found() => Self::init(&store, password, &opts).await?,
            Err(e) => return Err(e.into()),
        };
        let kdf = config.kdf.clone();
        let pw = password.to_vec();
        let keys = tokio::task::spawn_blocking(move || Keys::derive(&pw, &kdf))
            .await
            .map_err(|e| RepoError::Task(e.to_string()))??;
        let check =
            hex::decode(&config.key_check).map_err(|e| RepoError::BadConfig(e.to_string()))?;
        match keys.open(&check, "config") {
            Ok(v) if v == KEY_CHECK => {}
            _ => return Err(RepoError::WrongPassword),
        }
        let chunker = ChunkerParams {
            min_size: config.chunker_min,
            avg_size: config.chunker_avg,
            max_size: config.chunker_max,
        };
        chunker
            .validate()
            .map_err(|e| RepoError::BadConfig(e.to_string()))?;
        let cache = NonZeroUsize::new(opts.pack_cache_packs.max(1)).unwrap_or(NonZeroUsize::MIN);
        let uploads = Arc::new(Semaphore::new(opts.upload_concurrency.max(1)));
        let pack_buffers = PackBuffers::default();
        let index_dir = match &opts.index_cache_dir {
            Some(p) => IndexDir::Given(p.clone()),
            None => IndexDir::Private(PrivateDir::new()?),
        };
        let (dir, id) = (index_dir.path().to_path_buf(), config.id.clone());
        let started = std::time::Instant::now();
        let index = tokio::task::spawn_blocking(move || Index::new(DiskIndex::open(&dir, &id)?))
            .await
            .map_err(|e| RepoError::Task(e.to_string()))??;
        tracing::info!(
            dir = %index_dir.path().display(),
            chunks = index.len(),
            filter_bytes = index.filter_bytes(),
            elapsed = ?started.elapsed(),
            "local index opened"
        );
        let repo = Arc::new(Repository {
            store,
            keys: Arc::new(keys),
            opts,
            chunker,
            index: RwLock::new(index),
            index_dir,
            repo_id: config.id.clone(),
            refreshing: tokio::sync::Mutex::new(()),
            maintaining: tokio::sync::Mutex::new(()),
            writer: tokio::sync::Mutex::new(Writer {
                pack: PackBuilder::new(pack_buffers.clone()),
            }),
            uploads,
            unindexed: Mutex::new(Vec::new()),
            upload_error: Mutex::new(None),
            condemned_files: Mutex::new(HashSet::new()),
            snapshots: Mutex::new(HashMap::new()),
            pack_cache: Mutex::new(lru::LruCache::new(cache)),
            pack_buffers,
        });
        repo.refresh_index().await?;
        repo.adopt_orphan_packs_unless_maintained().await?;
        tracing::info!(
            location = %repo.store.location(),
            repository = %config.id,
            chunks = repo.index.read().map_err(poisoned)?.len(),
            "repository open"
        );
        Ok(repo)
    }

    async fn init(
        store: &Arc<dyn Store>,
        password: &[u8],
        opts: &RepositoryOptions,
    ) -> Result<RepoConfig, RepoError> {
        let kdf = KdfParams {
            memory_kib: opts.kdf_memory_kib,
            ..KdfParams::new_random()
        };
        let k2 = kdf.clone();
        let pw = password.to_vec();
        let keys = tokio::task::spawn_blocking(move || Keys::derive(&pw, &k2))
            .await
            .map_err(|e| RepoError::Task(e.to_string()))??;
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        let p = ChunkerParams::DEFAULT;
        let config = RepoConfig {
            version: 1,
            id: hex::encode(id),
            kdf,
            chunker_min: p.min_size,
            chunker_avg: p.avg_size,
            chunker_max: p.max_size,
            key_check: hex::encode(keys.seal(KEY_CHECK)),
        };
        let json =
            serde_json::to_vec_pretty(&config).map_err(|e| RepoError::BadConfig(e.to_string()))?;
        store.write(FileType::Config, "", Bytes::from(json)).await?;
        // Two servers may initialise at once: whatever config won is the one to use.
        let bytes = store.read(FileType::Config, "").await?;
        let stored: RepoConfig =
            serde_json::from_slice(&bytes).map_err(|e| RepoError::BadConfig(e.to_string()))?;
        tracing::info!(location = %store.location(), repository = %stored.id, "repository created");
        Ok(stored)
    }

    pub fn location(&self) -> String {
        self.store.location()
    }

    /// Checks the store answers (for readiness).
    pub async fn check(&self) -> Result<(), RepoError> {
        self.store.check().await.map_err(Into::into)
    }

    /// Frees the pack buffers kept for reuse (after a restore: an idle server holds no
    /// pack memory beyond its pack cache).
    pub fn release_pack_buffers(&self) {
        self.pack_buffers.release();
    }

    /// Packs the pack cache holds (at least one).
    pub fn pack_cache_packs(&self) -> usize {
        self.opts.pack_cache_packs.max(1)
    }

    pub fn chunker_params(&self) -> ChunkerParams {
        self.chunker
    }

    pub fn chunk_id_key(&self, tenant: &str) -> ChunkIdKey {
        self.keys.chunk_id_key(tenant)
    }

    /// Indexes (into `ids`) of the chunks this tenant must send.
    pub fn find_missing(&self, tenant: &str, ids: &[ChunkId]) -> Result<Vec<u32>, RepoError> {
        Ok(self.index.read().map_err(poisoned)?.missing(tenant, ids))
    }

    /// Verifies, compresses, encrypts and packs chunks. Idempotent: a chunk stored or being
    /// stored (by any session) is skipped, so racing writers store it once.
    pub async fn add_chunks(
        self: &Arc<Self>,
        tenant: &str,
        chunks: Vec<(ChunkId, Bytes)>,
    ) -> Result<AddResult, RepoError> {
        let mut result = AddResult::default();
        let mut todo = Vec::with_capacity(chunks.len());
        {
            let mut ix = self.index.write().map_err(poisoned)?;
            for (id, data) in chunks {
                if ix.reserve(tenant, id) {
                    todo.push((id, data));
                } else {
                    result.already_present += 1;
                }
            }
        }
        if todo.is_empty() {
            return Ok(result);
        }
        // Whatever does not reach a pack (an error, or the caller gone mid-way) is freed
        // for another attempt; otherwise FindMissing would keep calling it pending.
        let mut reservation = Reservation {
            repo: self,
            tenant,
            ids: todo.iter().map(|(id, _)| *id).collect(),
            armed: true,
        };
        self.seal_and_pack(tenant, todo, &mut result).await?;
        reservation.armed = false;
        Ok(result)
    }

    async fn seal_and_pack(
        self: &Arc<Self>,
        tenant: &str,
        todo: Vec<(ChunkId, Bytes)>,
        result: &mut AddResult,
    ) -> Result<(), RepoError> {
        let key = self.keys.chunk_id_key(tenant);
        let me = Arc::clone(self);
        let level = self.opts.compression_level;
        let sealed = tokio::task::spawn_blocking(move || {
            todo.into_iter()
                .map(|(id, data)| {
                    if key.id(&data) != id {
                        return Err(RepoError::ChunkMismatch(id.to_hex()));
                    }
                    Ok((id, crypto::pack_blob(&me.keys, &data, level), data.len()))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))??;
        let mut w = self.writer.lock().await;
        for (id, blob, raw) in sealed {
            w.pack.add(&id, tenant, &blob, raw);
            result.stored += 1;
            result.stored_bytes += blob.len() as u64;
            if w.pack.len() >= self.opts.pack_size {
                self.write_pack(&mut w).await?;
            }
        }
        let due = {
            let u = self.unindexed.lock().map_err(poisoned)?;
            u.len() >= self.opts.packs_per_index
                || u.iter().map(|p| p.blobs.len()).sum::<usize>() >= self.opts.chunks_per_index
        };
        if due {
            self.write_index().await?;
        }
        Ok(())
    }

    /// Seals the open pack and uploads it in the background (at most
    /// `upload_concurrency` at once, so a full pipeline waits here). Its chunks stay
    /// pending until the upload is done, then become stored; a failed upload frees them
    /// and is reported by the next call that writes a pack, and by [`Self::flush`].
    async fn write_pack(self: &Arc<Self>, w: &mut Writer) -> Result<(), RepoError> {
        self.take_upload_error()?;
        if w.pack.is_empty() {
            return Ok(());
        }
        let permit = Arc::clone(&self.uploads)
            .acquire_owned()
            .await
            .map_err(|e| RepoError::Task(e.to_string()))?;
        let pack = w.pack.take();
        let ids: Vec<ChunkId> = pack.ids().collect();
        let (name, bytes, entries) = pack.finish(&self.keys);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let len = bytes.len();
            let outcome = me.store.write(FileType::Pack, &name, bytes).await;
            // Poisoned locks only follow a panic elsewhere; the permit is released anyway.
            match outcome {
                Ok(()) => {
                    tracing::debug!(pack = %name, bytes = len, chunks = ids.len(), "pack written");
                    if let Ok(mut ix) = me.index.write() {
                        ix.add_own_pack(&entries);
                    }
                    if let Ok(mut u) = me.unindexed.lock() {
                        u.push(entries);
                    }
                }
                Err(e) => {
                    tracing::warn!(pack = %name, error = %e, "pack upload failed");
                    if let Ok(mut ix) = me.index.write() {
                        for id in &ids {
                            ix.unreserve(id);
                        }
                    }
                    if let Ok(mut slot) = me.upload_error.lock() {
                        slot.get_or_insert(e.into());
                    }
                }
            }
            drop(permit);
        });
        Ok(())
    }

    fn take_upload_error(&self) -> Result<(), RepoError> {
        match self.upload_error.lock().map_err(poisoned)?.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until no pack upload is in flight.
    async fn wait_for_uploads(&self) -> Result<(), RepoError> {
        let all = u32::try_from(self.opts.upload_concurrency.max(1)).unwrap_or(u32::MAX);
        let permits = self
            .uploads
            .acquire_many(all)
            .await
            .map_err(|e| RepoError::Task(e.to_string()))?;
        drop(permits);
        self.take_upload_error()
    }

    async fn write_index(&self) -> Result<(), RepoError> {
        let packs = std::mem::take(&mut *self.unindexed.lock().map_err(poisoned)?);
        if packs.is_empty() {
            return Ok(());
        }
        let file = IndexFile { packs };
        let plain = file.encode_to_vec();
        let sealed = crypto::pack_blob(&self.keys, &plain, 3);
        let name = blake3::hash(&sealed).to_hex().to_string();
        if let Err(e) = self
            .store
            .write(FileType::Index, &name, Bytes::from(sealed))
            .await
        {
            self.unindexed.lock().map_err(poisoned)?.extend(file.packs);
            return Err(e.into());
        }
        // Into the local index now, so the entries leave memory.
        self.ingest(Vec::from([(name, file)])).await
    }

    /// Writes the open pack, waits for every upload, and writes an index object for
    /// every pack uploaded so far. After it returns, every chunk accepted before the
    /// call is stored (or the call failed).
    pub async fn flush(self: &Arc<Self>) -> Result<(), RepoError> {
        let mut w = self.writer.lock().await;
        self.write_pack(&mut w).await?;
        self.wait_for_uploads().await?;
        // The kept pack buffers are freed between backups; the next one's first packs
        // fault their memory in again.
        self.pack_buffers.release();
        self.write_index().await
    }

    async fn pack_bytes(&self, name: &str) -> Result<Bytes, RepoError> {
        let cell = {
            let mut cache = self.pack_cache.lock().map_err(poisoned)?;
            Arc::clone(cache.get_or_insert(name.to_string(), || Arc::new(OnceCell::new())))
        };
        cell.get_or_try_init(|| async {
            // Into a buffer kept from a pack dropped earlier (an evicted download, an
            // upload done), which comes back to the pool once this pack is dropped too.
            let mut buf = self.pack_buffers.take(0);
            self.store
                .read_into(FileType::Pack, name, &mut buf)
                .await
                .map_err(RepoError::from)?;
            Ok::<_, RepoError>(self.pack_buffers.share(buf))
        })
        .await
        .cloned()
    }

    /// Where a chunk is stored, if this tenant has it (looking at index objects other
    /// servers wrote if it is not known here).
    pub async fn chunk_place(
        &self,
        tenant: &str,
        id: &ChunkId,
    ) -> Result<Option<ChunkPlace>, RepoError> {
        let known = |me: &Self| -> Result<Option<ChunkPlace>, RepoError> {
            Ok(me
                .index
                .read()
                .map_err(poisoned)?
                .find(tenant, id)
                .map(|f| ChunkPlace {
                    pack: f.pack,
                    stored: f.length,
                    raw: f.raw_length,
                }))
        };
        if let Some(place) = known(self)? {
            return Ok(Some(place));
        }
        self.refresh_index().await?;
        known(self)
    }

    /// Starts downloading a pack into the pack cache, so the chunk reads that follow
    /// find it there. A failure is left for those reads to report.
    pub fn prefetch_pack(self: &Arc<Self>, name: &str) {
        let me = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move {
            if let Err(e) = me.pack_bytes(&name).await {
                tracing::debug!(pack = %name, error = %e, "prefetching a pack failed");
            }
        });
    }

    /// Reads a chunk and checks it against its id. Decryption and decompression run on
    /// the blocking pool, so many reads can proceed at once.
    pub async fn read_chunk(
        self: &Arc<Self>,
        tenant: &str,
        id: &ChunkId,
    ) -> Result<Bytes, RepoError> {
        match self.read_chunk_as(tenant, id, false).await? {
            ChunkData::Plain(data) => Ok(data),
            ChunkData::Zstd { .. } => Err(RepoError::Task(
                "a chunk was left compressed when it was asked for whole".into(),
            )),
        }
    }

    /// Reads a chunk as it is stored: a compressed chunk is only decrypted, and left for
    /// the reader to decompress and check against its id; a chunk stored uncompressed is
    /// checked here.
    pub async fn read_chunk_packed(
        self: &Arc<Self>,
        tenant: &str,
        id: &ChunkId,
    ) -> Result<ChunkData, RepoError> {
        self.read_chunk_as(tenant, id, true).await
    }

    async fn read_chunk_as(
        self: &Arc<Self>,
        tenant: &str,
        id: &ChunkId,
        packed: bool,
    ) -> Result<ChunkData, RepoError> {
        match self.read_chunk_once(tenant, id, packed).await {
            // Another replica may have stored the chunk, or maintenance on another
            // server may have rewritten its pack: reload what the store says, retry.
            Err(RepoError::Store(e)) if e.is_not_found() => {
                self.pack_cache.lock().map_err(poisoned)?.clear();
                self.refresh_index().await?;
                self.read_chunk_once(tenant, id, packed).await
            }
            Err(RepoError::MissingChunk(_)) => {
                self.refresh_index().await?;
                self.read_chunk_once(tenant, id, packed).await
            }
            other => other,
        }
    }

    async fn read_chunk_once(
        self: &Arc<Self>,
        tenant: &str,
        id: &ChunkId,
        packed: bool,
    ) -> Result<ChunkData, RepoError> {
        let found = self
            .index
            .read()
            .map_err(poisoned)?
            .find(tenant, id)
            .ok_or_else(|| RepoError::MissingChunk(id.to_hex()))?;
        let pack = self.pack_bytes(&found.pack).await?;
        let (start, end) = (
            found.offset as usize,
            found.offset as usize + found.length as usize,
        );
        if pack.len() < end {
            return Err(RepoError::corrupt(
                format!("chunk {} in pack {}", id.to_hex(), found.pack),
                "pack is shorter than its index says",
            ));
        }
        let sealed = pack.slice(start..end);
        let key = self.keys.chunk_id_key(tenant);
        let id = *id;
        let raw = found.raw_length;
        let open = move |keys: &Keys| {
            if packed {
                let z = Bytes::from(keys.open(&sealed, "")?);
                match z.first() {
                    Some(1) => {
                        return Ok(ChunkData::Zstd {
                            data: z.slice(1..),
                            raw,
                        });
                    }
                    Some(0) => {
                        let data = z.slice(1..);
                        if key.id(&data) != id {
                            return Err(RepoError::corrupt("", "content does not match its id"));
                        }
                        return Ok(ChunkData::Plain(data));
                    }
                    _ => return Err(RepoError::corrupt("", "unknown compression")),
                }
            }
            let data = crypto::unpack_blob_bytes(keys, &sealed, raw as usize, "")?;
            if key.id(&data) != id {
                return Err(RepoError::corrupt("", "content does not match its id"));
            }
            Ok(ChunkData::Plain(data))
        };
        let named = |e: RepoError| match e {
            RepoError::Corrupt { why, .. } => {
                RepoError::corrupt(format!("chunk {} in pack {}", id.to_hex(), found.pack), why)
            }
            other => other,
        };
        // A small chunk is opened where it is (a hand-off to the blocking pool would
        // cost more); larger ones on the blocking pool, so many reads proceed at once.
        if (found.length as usize) <= INLINE_OPEN_BYTES {
            return open(&self.keys).map_err(named);
        }
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || open(&me.keys))
            .await
            .map_err(|e| RepoError::Task(e.to_string()))?
            .map_err(named)
    }

    /// Streams the nodes of a catalog in order, reading its chunks a few ahead. The
    /// channel is bounded; dropping the receiver stops the reader.
    pub fn catalog_nodes(
        self: &Arc<Self>,
        tenant: &str,
        catalog: Vec<ChunkId>,
    ) -> mpsc::Receiver<Result<Node, RepoError>> {
        self.catalog_nodes_at(tenant, catalog, 0)
    }

    /// [`Repository::catalog_nodes`] from byte `offset` of the catalog's first chunk,
    /// where a node begins (a catalog mark): `catalog` is then the rest of the catalog
    /// from that chunk on.
    pub fn catalog_nodes_at(
        self: &Arc<Self>,
        tenant: &str,
        catalog: Vec<ChunkId>,
        offset: usize,
    ) -> mpsc::Receiver<Result<Node, RepoError>> {
        let (tx, rx) = mpsc::channel(CATALOG_NODE_QUEUE);
        let me = Arc::clone(self);
        let tenant = tenant.to_string();
        tokio::spawn(async move {
            let reads = futures::stream::iter(catalog)
                .map(|cid| {
                    let me = Arc::clone(&me);
                    let tenant = tenant.clone();
                    async move { me.read_chunk(&tenant, &cid).await }
                })
                .buffered(CATALOG_READ_AHEAD);
            futures::pin_mut!(reads);
            let mut decoder = CatalogDecoder::new();
            let corrupt = |e| RepoError::corrupt("snapshot catalog", e);
            let mut skip = offset;
            let outcome = async {
                while let Some(data) = reads.next().await {
                    let data = data?;
                    if skip > data.len() {
                        return Err(RepoError::corrupt(
                            "snapshot catalog",
                            "a catalog mark lies beyond its chunk",
                        ));
                    }
                    decoder.push(&data[std::mem::take(&mut skip)..]);
                    while let Some(node) = decoder.next_node().map_err(corrupt)? {
                        if tx.send(Ok(node)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                decoder.finish().map_err(corrupt)
            }
            .await;
            if let Err(e) = outcome {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    /// The chunk ids a catalog refers to (catalog chunks included) that are not stored.
    ///
    /// `committed` is the catalog of a snapshot of this tenant that existed when the
    /// backup began (its parent), or empty. When the new catalog is the same and none of
    /// the tenant's chunks is condemned, the catalog is not read back: every chunk it
    /// names was checked when that snapshot was committed, and cannot have gone since
    /// (a sweep deletes only condemned copies that no snapshot names, and not while a
    /// backup that began before their condemnation runs). An unchanged re-backup of a
    /// large tree then costs no catalog download at commit.
    pub async fn missing_references(
        self: &Arc<Self>,
        tenant: &str,
        catalog: &[ChunkId],
        committed: &[ChunkId],
    ) -> Result<Vec<ChunkId>, RepoError> {
        let (absent, condemned) = {
            let ix = self.index.read().map_err(poisoned)?;
            let absent: Vec<ChunkId> = catalog
                .iter()
                .filter(|c| !ix.is_stored(tenant, c))
                .copied()
                .collect();
            (absent, ix.has_condemned(tenant))
        };
        if !absent.is_empty() {
            return Ok(absent);
        }
        if catalog == committed && !condemned {
            return Ok(Vec::new());
        }
        let mut missing = Vec::new();
        let mut nodes = self.catalog_nodes(tenant, catalog.to_vec());
        while let Some(node) = nodes.recv().await {
            let node = node?;
            let ix = self.index.read().map_err(poisoned)?;
            for c in &node.chunks {
                let id = ChunkId::from_slice(c).map_err(|e| RepoError::corrupt("catalog", e))?;
                if !ix.is_stored(tenant, &id) {
                    missing.push(id);
                }
            }
        }
        Ok(missing)
    }

    /// Writes a snapshot record; returns it with its id.
    pub async fn save_snapshot(&self, mut snap: SnapshotFile) -> Result<SnapshotFile, RepoError> {
        let json = serde_json::to_vec(&snap).map_err(|e| RepoError::Task(e.to_string()))?;
        let name = blake3::hash(&json).to_hex().to_string();
        let sealed = crypto::pack_blob(&self.keys, &json, 3);
        self.store
            .write(FileType::Snapshot, &name, Bytes::from(sealed))
            .await?;
        snap.id = name.clone();
        self.snapshots
            .lock()
            .map_err(poisoned)?
            .insert(name, snap.clone());
        Ok(snap)
    }

    /// All snapshots of a tenant, oldest first.
    pub async fn list_snapshots(&self, tenant: &str) -> Result<Vec<SnapshotFile>, RepoError> {
        self.load_snapshots(|s| s.tenant == tenant).await
    }

    /// The snapshots `keep` accepts, oldest first (records are cached once read).
    async fn load_snapshots(
        &self,
        keep: impl Fn(&SnapshotFile) -> bool,
    ) -> Result<Vec<SnapshotFile>, RepoError> {
        let names = self.store.list(FileType::Snapshot).await?;
        let mut out = Vec::new();
        for name in names {
            let cached = self.snapshots.lock().map_err(poisoned)?.get(&name).cloned();
            let snap = match cached {
                Some(s) => s,
                None => {
                    let sealed = match self.store.read(FileType::Snapshot, &name).await {
                        Ok(s) => s,
                        Err(e) if e.is_not_found() => continue, // deleted meanwhile
                        Err(e) => return Err(e.into()),
                    };
                    let what = format!("snapshots/{name}");
                    let json = crypto::unpack_blob(&self.keys, &sealed, 0, &what)?;
                    let mut s: SnapshotFile =
                        serde_json::from_slice(&json).map_err(|e| RepoError::corrupt(&what, e))?;
                    s.id = name.clone();
                    self.snapshots
                        .lock()
                        .map_err(poisoned)?
                        .insert(name.clone(), s.clone());
                    s
                }
            };
            if keep(&snap) {
                out.push(snap);
            }
        }
        out.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The latest snapshot with tag `spec`, or the snapshot whose id starts with `spec`.
    pub async fn find_snapshot(&self, tenant: &str, spec: &str) -> Result<SnapshotFile, RepoError> {
        let all = self.list_snapshots(tenant).await?;
        if let Some(s) = all.iter().rev().find(|s| s.tag == spec) {
            return Ok(s.clone());
        }
        find_by_id(&all, spec)
    }

    /// Deletes a snapshot of `tenant` given its id or a unique prefix (never a tag).
    pub async fn delete_snapshot(
        &self,
        tenant: &str,
        id_prefix: &str,
    ) -> Result<SnapshotFile, RepoError> {
        let all = self.list_snapshots(tenant).await?;
        let snap = find_by_id(&all, id_prefix)?;
        self.store.remove(FileType::Snapshot, &snap.id).await?;
        self.snapshots.lock().map_err(poisoned)?.remove(&snap.id);
        Ok(snap)
    }
}

/// The snapshot whose id starts with `spec` (at least 6 hex digits, unique).
fn find_by_id(all: &[SnapshotFile], spec: &str) -> Result<SnapshotFile, RepoError> {
    if spec.len() >= 6 && spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        let spec = spec.to_ascii_lowercase();
        let matches: Vec<&SnapshotFile> = all.iter().filter(|s| s.id.starts_with(&spec)).collect();
        match matches.len() {
            1 => return Ok(matches[0].clone()),
            0 => {}
            _ => return Err(RepoError::AmbiguousSnapshot(spec)),
        }
    }
    Err(RepoError::SnapshotNotFound(spec.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FsStore;
    use datamover_core::catalog::encode_node;
    use datamover_proto::v1::{Node, NodeType};

    fn options() -> RepositoryOptions {
        RepositoryOptions {
            kdf_memory_kib: 64,
            ..RepositoryOptions::default()
        }
    }

    /// Stores one file chunk and a one-chunk catalog naming it; returns both ids.
    async fn store_tree(repo: &Arc<Repository>) -> (ChunkId, ChunkId) {
        let key = repo.chunk_id_key("t");
        let data = Bytes::from_static(b"the contents of a file");
        let file = key.id(&data);
        let mut catalog = Vec::new();
        let node = Node {
            path: Bytes::from_static(b"a"),
            r#type: NodeType::File as i32,
            size: data.len() as u64,
            chunks: vec![Bytes::copy_from_slice(&file.0)],
            ..Default::default()
        };
        encode_node(&node, &mut catalog);
        let catalog = Bytes::from(catalog);
        let cat = key.id(&catalog);
        repo.add_chunks("t", vec![(file, data), (cat, catalog)])
            .await
            .unwrap();
        repo.flush().await.unwrap();
        (file, cat)
    }

    #[tokio::test]
    async fn packs_reuse_their_buffers_during_a_backup_and_free_them_after() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FsStore::new(dir.path()));
        let opts = RepositoryOptions {
            pack_size: 64 * 1024,
            upload_concurrency: 1,
            ..options()
        };
        let repo = Repository::open(Arc::clone(&store), b"pw", opts)
            .await
            .unwrap();
        let key = repo.chunk_id_key("t");
        let mut ids = Vec::new();
        // Incompressible chunks, so every pack fills up: eight packs, one at a time.
        for i in 0..32u64 {
            let mut data = vec![0u8; 20 * 1024];
            let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for b in &mut data {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let data = Bytes::from(data);
            let id = key.id(&data);
            ids.push(id);
            repo.add_chunks("t", vec![(id, data)]).await.unwrap();
        }
        // With one upload at a time, the pack being filled finds the last uploaded
        // pack's buffer kept.
        assert!(repo.pack_buffers.kept() >= 1);
        repo.flush().await.unwrap();
        assert_eq!(
            repo.pack_buffers.kept(),
            0,
            "freed once the backup is flushed"
        );
        // Every chunk reads back whole from the packs built in reused buffers. With a
        // pack cache of one, each pack read evicts the previous one, whose buffer comes
        // back to the pool for the next download.
        let reopened = Repository::open(
            store,
            b"pw",
            RepositoryOptions {
                pack_cache_packs: 1,
                ..options()
            },
        )
        .await
        .unwrap();
        for id in &ids {
            let data = reopened.read_chunk("t", id).await.unwrap();
            assert_eq!(key.id(&data), *id);
        }
        // Every download but the first went into the buffer of the pack it evicted.
        let packs = reopened.store.list(FileType::Pack).await.unwrap().len();
        assert!(packs >= 4, "{packs} packs");
        assert!(
            reopened.pack_buffers.reused() >= packs - 1,
            "downloads reuse buffers: {} of {packs}",
            reopened.pack_buffers.reused()
        );
        reopened.pack_cache.lock().unwrap().clear();
        assert_eq!(
            reopened.pack_buffers.kept(),
            1,
            "the last pack's buffer is kept"
        );
        reopened.release_pack_buffers();
        assert_eq!(reopened.pack_buffers.kept(), 0, "freed after a restore");
    }

    #[tokio::test]
    async fn a_commit_of_the_parents_catalog_is_not_read_back_unless_something_is_condemned() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FsStore::new(dir.path()));
        let repo = Repository::open(Arc::clone(&store), b"pw", options())
            .await
            .unwrap();
        let (file, cat) = store_tree(&repo).await;
        let catalog = [cat];

        // Read back: everything is stored.
        assert!(
            repo.missing_references("t", &catalog, &[])
                .await
                .unwrap()
                .is_empty()
        );
        // A condemned file chunk is found by reading the catalog back, even when the
        // catalog is the parent's, so the commit rescues it.
        let pack = repo
            .index
            .read()
            .unwrap()
            .canonical(&file)
            .unwrap()
            .0
            .to_string();
        repo.index.write().unwrap().condemn(file, &pack);
        assert_eq!(
            repo.missing_references("t", &catalog, &catalog)
                .await
                .unwrap(),
            vec![file]
        );
        repo.index.write().unwrap().clear_condemned();

        // With the pack gone from the store (and a fresh cache), a read-back fails; the
        // parent's catalog with nothing condemned is not read at all.
        drop(repo);
        std::fs::remove_file(dir.path().join(FileType::Pack.key(&pack))).unwrap();
        let repo = Repository::open(store, b"pw", options()).await.unwrap();
        repo.refresh_index().await.unwrap();
        assert!(
            repo.missing_references("t", &catalog, &catalog)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(repo.missing_references("t", &catalog, &[]).await.is_err());
        let other = [cat, cat];
        assert!(
            repo.missing_references("t", &other, &catalog)
                .await
                .is_err(),
            "a different catalog is read back"
        );
    }
}
