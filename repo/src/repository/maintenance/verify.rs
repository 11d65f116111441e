//! Verification: every snapshot's catalog and chunks are indexed; with `read_data`,
//! packs (all or a sample) are downloaded and every chunk checked against its id.
//!
//! The packs to read come from the `index/` objects one object at a time (a pack listed
//! by several objects is read once: repeats are found by a sort on local disk, as
//! maintenance does), so verify never holds every index entry in memory.

use std::collections::HashMap;
use std::sync::Arc;

use datamover_core::chunk::ChunkId;
use futures::StreamExt;

use super::plan::{Repeats, WorkDir, blocking};
use super::{Problem, Repository, VerifyOptions, VerifyReport, poisoned};
use crate::RepoError;
use crate::crypto;
use crate::index::PackEntries;
use crate::store::FileType;

/// Packs downloaded at once by verify.
const VERIFY_PARALLEL_PACKS: usize = 4;

/// What reading packs back found.
#[derive(Default)]
struct ReadBack {
    packs: u64,
    bytes: u64,
    /// Bad chunks, with the reason.
    bad: HashMap<ChunkId, String>,
}

impl Repository {
    /// Checks snapshots (see the module docs).
    pub async fn verify(self: &Arc<Self>, opts: &VerifyOptions) -> Result<VerifyReport, RepoError> {
        let mut report = VerifyReport::default();
        self.refresh_index().await?;
        let in_scope = |t: &str| opts.tenant.as_deref().is_none_or(|s| s == t);
        // Bad chunks found by reading packs back.
        let mut bad = ReadBack::default();
        if opts.read_data > 0.0 {
            bad = self.read_back(opts).await?;
            report.packs_read = bad.packs;
            report.bytes_read = bad.bytes;
        }
        let snaps = self.load_snapshots(|s| in_scope(&s.tenant)).await?;
        for s in &snaps {
            report.snapshots += 1;
            let problem = |path: &str, message: String| Problem {
                snapshot_id: s.id.clone(),
                tag: s.tag.clone(),
                path: path.to_string(),
                message,
            };
            let catalog = match s.catalog_ids() {
                Ok(c) => c,
                Err(e) => {
                    report.problems.push(problem("", e.to_string()));
                    continue;
                }
            };
            let mut nodes = self.catalog_nodes(&s.tenant, catalog);
            while let Some(node) = nodes.recv().await {
                let node = match node {
                    Ok(n) => n,
                    Err(e) => {
                        report.problems.push(problem(
                            "",
                            format!("the snapshot's tree is unreadable: {e}"),
                        ));
                        break;
                    }
                };
                if node.r#type == datamover_proto::v1::NodeType::File as i32 {
                    report.files += 1;
                }
                let mut missing = 0u64;
                let mut corrupt = 0u64;
                let mut first = String::new();
                for c in &node.chunks {
                    report.chunks += 1;
                    let Ok(id) = ChunkId::from_slice(c) else {
                        corrupt += 1;
                        continue;
                    };
                    let present = self
                        .index
                        .read()
                        .map_err(poisoned)?
                        .find(&s.tenant, &id)
                        .is_some();
                    if !present {
                        missing += 1;
                        if first.is_empty() {
                            first = format!("chunk {} is missing", id.to_hex());
                        }
                    } else if let Some(why) = bad.bad.get(&id) {
                        corrupt += 1;
                        if first.is_empty() {
                            first = format!("chunk {} is corrupt: {why}", id.to_hex());
                        }
                    }
                }
                if missing + corrupt > 0 {
                    report.problems.push(problem(
                        &String::from_utf8_lossy(&node.path),
                        format!(
                            "{} of {} chunks missing, {corrupt} corrupt ({first})",
                            missing,
                            node.chunks.len()
                        ),
                    ));
                }
            }
        }
        Ok(report)
    }

    /// Downloads a pack and checks its chunks (those of `tenant`, or all). Returns the
    /// bytes read and the bad chunks with the reason.
    async fn check_pack(
        self: &Arc<Self>,
        pack: PackEntries,
        tenant: Option<&str>,
    ) -> Result<(u64, Vec<(ChunkId, String)>), RepoError> {
        let bytes = match self.store.read(FileType::Pack, &pack.name).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                let why = format!("pack {} is missing", pack.name);
                return Ok((
                    0,
                    pack.blobs
                        .iter()
                        .filter_map(|b| ChunkId::from_slice(&b.id).ok())
                        .map(|id| (id, why.clone()))
                        .collect(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let me = Arc::clone(self);
        let tenant = tenant.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let mut bad = Vec::new();
            for b in &pack.blobs {
                if tenant.as_deref().is_some_and(|t| t != b.tenant) {
                    continue;
                }
                let Ok(id) = ChunkId::from_slice(&b.id) else {
                    continue;
                };
                let what = format!("chunk {} in pack {}", id.to_hex(), pack.name);
                let (start, end) = (b.offset as usize, b.offset as usize + b.length as usize);
                let outcome = bytes
                    .get(start..end)
                    .ok_or_else(|| RepoError::corrupt(&what, "pack is shorter than its index says"))
                    .and_then(|sealed| {
                        crypto::unpack_blob(&me.keys, sealed, b.raw_length as usize, &what)
                    })
                    .and_then(|data| {
                        if me.keys.chunk_id_key(&b.tenant).id(&data) == id {
                            Ok(())
                        } else {
                            Err(RepoError::corrupt(&what, "content does not match its id"))
                        }
                    });
                if let Err(e) = outcome {
                    bad.push((id, format!("in pack {}: {}", pack.name, short_reason(&e))));
                }
            }
            (bytes.len() as u64, bad)
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))
    }

    /// Downloads the sampled packs (of the tenant in scope) and checks their chunks.
    async fn read_back(self: &Arc<Self>, opts: &VerifyOptions) -> Result<ReadBack, RepoError> {
        let in_scope = |t: &str| opts.tenant.as_deref().is_none_or(|s| s == t);
        let names = self.store.list(FileType::Index).await?;
        let mut repeats = Repeats::new(
            WorkDir::new(self.index_dir.path())?,
            self.opts.maintenance_batch,
        )?;
        for (i, name) in names.iter().enumerate() {
            if let Some(file) = self.read_index_file(name).await? {
                blocking(|| repeats.note(i, &file))?;
            }
        }
        let mut out = ReadBack::default();
        let mut checks = futures::stream::FuturesUnordered::new();
        for (i, name) in names.iter().enumerate() {
            let Some(file) = self.read_index_file(name).await? else {
                continue;
            };
            for (j, p) in file.packs.into_iter().enumerate() {
                if blocking(|| repeats.repeated(i, j))?
                    || !p.blobs.iter().any(|b| in_scope(&b.tenant))
                    || !sampled(&p.name, opts.read_data)
                {
                    continue;
                }
                // At most VERIFY_PARALLEL_PACKS downloads at once.
                while checks.len() >= VERIFY_PARALLEL_PACKS {
                    if let Some(outcome) = checks.next().await {
                        out.add(outcome?);
                    }
                }
                let me = Arc::clone(self);
                let tenant = opts.tenant.clone();
                checks.push(async move { me.check_pack(p, tenant.as_deref()).await });
            }
        }
        while let Some(outcome) = checks.next().await {
            out.add(outcome?);
        }
        Ok(out)
    }
}

impl ReadBack {
    fn add(&mut self, (len, found): (u64, Vec<(ChunkId, String)>)) {
        self.packs += 1;
        self.bytes += len;
        self.bad.extend(found);
    }
}

fn short_reason(e: &RepoError) -> String {
    match e {
        RepoError::Corrupt { why, .. } => why.clone(),
        other => other.to_string(),
    }
}

/// Whether a pack is in a `fraction` sample (stable: by its name).
pub(super) fn sampled(name: &str, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let prefix = name.get(..8).and_then(|h| u32::from_str_radix(h, 16).ok());
    prefix.is_some_and(|v| (f64::from(v) / f64::from(u32::MAX)) < fraction)
}
