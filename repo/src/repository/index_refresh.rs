//! The local index kept up to date with the bucket: `index/` and `condemned/` objects
//! read into the on-disk index, incrementally, or by a complete rebuild (sorted runs
//! merged into a fresh base file, the filter built on the way) when an object it holds is
//! gone.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use datamover_core::chunk::ChunkId;
use futures::StreamExt;
use prost::Message;

use super::maintenance::CondemnedFile;
use super::{Repository, poisoned};
use crate::RepoError;
use crate::crypto;
use crate::index::{DiskIndex, FlatFile, IndexFile, Runs, build_filter};
use crate::store::FileType;

/// Entries of `index/` objects read before they are written into the local index at
/// once (about 13 MiB of them decoded in memory).
const INGEST_BATCH_CHUNKS: usize = 100_000;
/// `index/` objects read and decoded at once (in order) while a refresh reads many:
/// about 6 MiB decoded each.
const READ_AHEAD: usize = 3;
/// Decoded `index/` objects waiting for the batch being written.
const READ_QUEUE: usize = 2;

/// A batch of `index/` objects being written into the local index (see
/// `Repository::start_ingest`).
type Ingesting = tokio::task::JoinHandle<
    Result<(Vec<(String, FlatFile)>, Vec<ChunkId>, Option<Runs>), RepoError>,
>;

impl Repository {
    pub(super) async fn read_index_file(&self, name: &str) -> Result<Option<IndexFile>, RepoError> {
        self.open_index_file(name, |raw, what| {
            IndexFile::decode(raw).map_err(|e| RepoError::corrupt(what, e))
        })
        .await
    }

    /// An `index/` object as the local index loads it ([`FlatFile`]: no allocation an
    /// entry).
    async fn read_index_flat(&self, name: &str) -> Result<Option<FlatFile>, RepoError> {
        self.open_index_file(name, |raw, what| {
            FlatFile::decode(raw).map_err(|e| RepoError::corrupt(what, e))
        })
        .await
    }

    /// Reads `index/<name>` (`None` if it is gone), opens and decodes it with `decode`.
    async fn open_index_file<T: Send + 'static>(
        &self,
        name: &str,
        decode: fn(&[u8], &str) -> Result<T, RepoError>,
    ) -> Result<Option<T>, RepoError> {
        let sealed = match self.store.read(FileType::Index, name).await {
            Ok(s) => s,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Decrypting, decompressing and decoding take a core: off the async threads, and
        // several at once when a rebuild reads ahead.
        let keys = Arc::clone(&self.keys);
        let what = format!("index/{name}");
        tokio::task::spawn_blocking(move || {
            let raw = crypto::unpack_blob(&keys, &sealed, 0, &what)?;
            decode(raw.as_slice(), &what).map(Some)
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))?
    }

    pub(crate) async fn write_index_file(&self, file: &IndexFile) -> Result<String, RepoError> {
        let sealed = crypto::pack_blob(&self.keys, &file.encode_to_vec(), 3);
        let name = blake3::hash(&sealed).to_hex().to_string();
        self.store
            .write(FileType::Index, &name, Bytes::from(sealed))
            .await?;
        Ok(name)
    }

    /// Loads what `index/` and `condemned/` hold now into the local index, reading only
    /// the objects it does not hold yet. If an object it holds is gone (maintenance
    /// replaced it), the local index is rebuilt beside the current one and swapped in.
    pub async fn refresh_index(&self) -> Result<(), RepoError> {
        let _one = self.refreshing.lock().await;
        let names = self.store.list(FileType::Index).await?;
        let listed: HashSet<&str> = names.iter().map(String::as_str).collect();
        let disk = self.index.read().map_err(poisoned)?.disk();
        let loaded = disk.loaded_names()?;
        // A first load (an empty cache) is a rebuild too: its bulk load is faster.
        let reload = loaded.iter().any(|n| !listed.contains(n.as_str()))
            || (loaded.is_empty() && names.len() > 1);
        // Condemnations first, so that a reload prefers live copies.
        self.refresh_condemned(reload).await?;
        if !reload {
            let todo: Vec<&String> = names.iter().filter(|n| !loaded.contains(*n)).collect();
            self.read_into(&disk, &todo, None).await?;
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (dir, id) = (self.index_dir.path().to_path_buf(), self.repo_id.clone());
        let fresh = Arc::new(
            tokio::task::spawn_blocking(move || DiskIndex::fresh(&dir, &id))
                .await
                .map_err(|e| RepoError::Task(e.to_string()))??,
        );
        let todo: Vec<&String> = names.iter().collect();
        // Entries go to sorted runs, then in order to the base file, one sequential
        // pass that also builds the filter, a partition at a time.
        let runs = Runs::new(fresh.runs_dir())?;
        let runs = self.read_into(&fresh, &todo, Some(runs)).await?;
        let read = started.elapsed();
        // What the read freed would otherwise stay resident under the filter built next.
        crate::memory::return_free_memory();
        let condemned = self.index.read().map_err(poisoned)?.condemned().clone();
        let (built, old) = (Arc::clone(&fresh), Arc::clone(&disk));
        drop(fresh);
        let (disk, filter, merge) = tokio::task::spawn_blocking(move || {
            let merging = std::time::Instant::now();
            let filter = match runs {
                Some(r) => built.merge_runs(r, &condemned)?,
                None => build_filter(&built)?,
            };
            let merge = merging.elapsed();
            let disk = match Arc::try_unwrap(built) {
                Ok(d) => Arc::new(d.adopt(&old)),
                Err(shared) => shared,
            };
            Ok::<_, RepoError>((disk, filter, merge))
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))??;
        let mut ix = self.index.write().map_err(poisoned)?;
        ix.replace(disk, filter);
        // Packs this server uploaded but has not indexed yet stay known.
        ix.reset_own(self.unindexed.lock().map_err(poisoned)?.iter());
        tracing::info!(
            objects = names.len(),
            chunks = ix.len(),
            elapsed = ?started.elapsed(),
            read_and_sort = ?read,
            merge_and_filter = ?merge,
            "local index rebuilt from the bucket"
        );
        Ok(())
    }

    /// Reads the `index/` objects `names` into `disk`, a batch of about
    /// [`INGEST_BATCH_CHUNKS`] entries at a time. Without `runs`, `disk` is the one in
    /// use (its filter learns the new chunks, own packs now listed leave memory); with
    /// them (a rebuild), the entries go there, returned for the merge.
    ///
    /// Reading and decoding the next batch overlaps writing the last one, and
    /// [`READ_AHEAD`] objects are read and decoded at once (every core at work on a
    /// rebuild); the batches are written in order, one at a time.
    async fn read_into(
        &self,
        disk: &Arc<DiskIndex>,
        names: &[&String],
        runs: Option<Runs>,
    ) -> Result<Option<Runs>, RepoError> {
        // Two loops at once in this task: one reads and decodes (several objects at a
        // time, in order) into a short queue, the other takes them from it in batches and
        // writes them, so the reading goes on while a batch is written.
        let (tx, mut rx) = tokio::sync::mpsc::channel(READ_QUEUE);
        let owned: Vec<String> = names.iter().map(|n| (*n).clone()).collect();
        let produce = async move {
            let mut reads = futures::stream::iter(owned)
                .map(|n| async move { self.read_index_flat(&n).await.map(|f| (n, f)) })
                .buffered(READ_AHEAD);
            while let Some(read) = reads.next().await {
                let failed = read.is_err();
                if tx.send(read).await.is_err() || failed {
                    break;
                }
            }
        };
        let consume = async move {
            let mut runs = runs;
            let mut batch = Vec::new();
            let mut chunks = 0usize;
            let mut writing: Option<Ingesting> = None;
            // Bounded by the objects named: the producer sends one message each at most.
            loop {
                let read = rx.recv().await;
                let (name, file) = match read {
                    Some(Ok(read)) => read,
                    Some(Err(e)) => {
                        // The batch being written is finished first: what it wrote to
                        // the index in use must reach the filter too.
                        if let Some(w) = writing.take() {
                            self.ingested(w).await?;
                        }
                        return Err(e);
                    }
                    None => break,
                };
                if let Some(file) = file {
                    chunks += file.len();
                    batch.push((name, file));
                }
                if chunks >= INGEST_BATCH_CHUNKS {
                    if let Some(w) = writing.take() {
                        runs = self.ingested(w).await?;
                    }
                    writing =
                        Some(self.start_ingest(disk, std::mem::take(&mut batch), runs.take())?);
                    chunks = 0;
                }
            }
            if !batch.is_empty() {
                if let Some(w) = writing.take() {
                    runs = self.ingested(w).await?;
                }
                writing = Some(self.start_ingest(disk, batch, runs.take())?);
            }
            if let Some(w) = writing.take() {
                runs = self.ingested(w).await?;
            }
            Ok(runs)
        };
        let ((), outcome) = tokio::join!(produce, consume);
        outcome
    }

    /// Writes index objects (this server's, just written) into the local index in use.
    pub(crate) async fn ingest(&self, files: Vec<(String, IndexFile)>) -> Result<(), RepoError> {
        let files = files
            .iter()
            .map(|(n, f)| (n.clone(), FlatFile::from_index(f)))
            .collect();
        let disk = self.index.read().map_err(poisoned)?.disk();
        let w = self.start_ingest(&disk, files, None)?;
        self.ingested(w).await?;
        Ok(())
    }

    /// Starts writing `files` into `disk` (or into `runs`) on a blocking thread.
    fn start_ingest(
        &self,
        disk: &Arc<DiskIndex>,
        files: Vec<(String, FlatFile)>,
        mut runs: Option<Runs>,
    ) -> Result<Ingesting, RepoError> {
        let condemned = self.index.read().map_err(poisoned)?.condemned().clone();
        let d = Arc::clone(disk);
        Ok(tokio::task::spawn_blocking(move || {
            let added = d.ingest_to(&files, &condemned, runs.as_mut())?;
            // A rebuild needs the objects no more: freed here, not on an async thread.
            let files = if runs.is_some() { Vec::new() } else { files };
            Ok::<_, RepoError>((files, added, runs))
        }))
    }

    /// Waits for a write [`Self::start_ingest`] began; the index in use learns what it
    /// added. Returns the runs (a rebuild's).
    async fn ingested(&self, writing: Ingesting) -> Result<Option<Runs>, RepoError> {
        let (files, added, runs) = writing
            .await
            .map_err(|e| RepoError::Task(e.to_string()))??;
        if runs.is_none() {
            let mut ix = self.index.write().map_err(poisoned)?;
            ix.note_added(&added)?;
            for (_, f) in &files {
                ix.own_packs_indexed(f);
            }
        }
        Ok(runs)
    }

    pub(super) async fn read_condemned(&self) -> Result<Vec<(String, CondemnedFile)>, RepoError> {
        let mut out = Vec::new();
        for name in self.store.list(FileType::Condemned).await? {
            let sealed = match self.store.read(FileType::Condemned, &name).await {
                Ok(s) => s,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let what = format!("condemned/{name}");
            let raw = crypto::unpack_blob(&self.keys, &sealed, 0, &what)?;
            let file =
                CondemnedFile::decode(raw.as_slice()).map_err(|e| RepoError::corrupt(&what, e))?;
            out.push((name, file));
        }
        Ok(out)
    }

    pub(super) async fn refresh_condemned(&self, reload: bool) -> Result<(), RepoError> {
        let records = self.read_condemned().await?;
        let names: HashSet<String> = records.iter().map(|(n, _)| n.clone()).collect();
        let mut loaded = self.condemned_files.lock().map_err(poisoned)?;
        let mut ix = self.index.write().map_err(poisoned)?;
        let full = reload || loaded.iter().any(|n| !names.contains(n));
        if full {
            ix.clear_condemned();
            loaded.clear();
        }
        for (name, file) in records {
            if loaded.contains(&name) {
                continue;
            }
            for e in &file.entries {
                if let Ok(id) = ChunkId::from_slice(&e.id) {
                    ix.condemn(id, &e.pack);
                }
            }
            loaded.insert(name);
        }
        Ok(())
    }
}
