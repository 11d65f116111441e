//! Scenario `index-scale` (issue 29): the chunk index at N chunks.
//!
//! For each N: a generator writes `index/` objects for N synthetic chunks (no data)
//! straight into a filesystem repository with the repository crate's own writer
//! ([`datamover_repo::Repository::write_synthetic_index`]); then our real server
//! (`datamover-server` of the build the bench runs from) starts on it and the bench
//! measures
//!
//! - the time from spawning the server to `/readyz` answering 200: *cold* (first start,
//!   no local index cache) and *warm* (a restart, with the local cache the first start
//!   left);
//! - the server's RSS once ready, and its peak (`VmHWM`) during start;
//! - FindMissing throughput: ids a second over batches of 1024 ids, half present and
//!   half absent, from a few concurrent sessions; every answer is checked (exactly the
//!   absent half is missing). The cold-started server's answers are checked too, for a
//!   second, before its restart.
//!
//! The generated repository is removed after each N.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use datamover_proto::v1;
use datamover_repo::store::{FsStore, Store};
use datamover_repo::{Repository, RepositoryOptions, synthetic_chunk_id};
use datamover_tests::{Server, Storage};

use crate::Res;
use crate::measure::{proc_hwm_mib, proc_rss_mib};

/// The password the test server support (datamover-tests) gives every server.
const PASSWORD: &[u8] = b"correct horse battery staple";
const CLIENT: (&str, &str) = ("bench", "bench-token");
/// Ids per FindMissing call.
const BATCH: usize = 1024;
/// Chunks per synthetic pack (8 MiB packs of 256 KiB chunks).
const CHUNKS_PER_PACK: u32 = 32;

/// The figures of one N.
#[derive(Debug, Clone, Default)]
pub struct IndexFigures {
    pub chunks: u64,
    pub generate_s: f64,
    pub index_objects: u64,
    pub index_mib: f64,
    pub cold_ready_s: f64,
    pub cold_hwm_mib: f64,
    pub warm_ready_s: f64,
    pub warm_hwm_mib: f64,
    pub rss_ready_mib: f64,
    pub rss_after_mib: f64,
    pub ids_per_s: f64,
    pub cache_mib: f64,
}

/// Options of the scenario.
pub struct IndexScaleOptions {
    pub chunks: Vec<u64>,
    pub seconds: f64,
    pub sessions: usize,
    /// How long to wait for the server to be ready after each start.
    pub ready_within: Duration,
}

fn dir_mib(p: &Path) -> f64 {
    datamover_tests::dir_bytes(p) as f64 / 1048576.0
}

/// Runs every N in turn, printing each result as it comes; returns them all.
pub fn run(work: &Path, opts: &IndexScaleOptions) -> Res<Vec<IndexFigures>> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio runtime: {e}"))?;
    let mut all = Vec::new();
    for &n in &opts.chunks {
        let f = one(&rt, work, n, opts)?;
        eprintln!("index-scale: {f:?}");
        all.push(f);
    }
    Ok(all)
}

fn one(
    rt: &tokio::runtime::Runtime,
    work: &Path,
    n: u64,
    opts: &IndexScaleOptions,
) -> Res<IndexFigures> {
    let root = tempfile::tempdir_in(work).map_err(|e| format!("temp dir in {work:?}: {e}"))?;
    let repo_dir = root.path().join("var/lib/datamover");
    let mut f = IndexFigures {
        chunks: n,
        ..Default::default()
    };
    eprintln!("index-scale: generating index objects for {n} chunks");
    let t = Instant::now();
    f.index_objects = rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(FsStore::new(&repo_dir));
        let repo = Repository::open(store, PASSWORD, RepositoryOptions::default())
            .await
            .map_err(|e| format!("opening the bench repository: {e}"))?;
        repo.write_synthetic_index(CLIENT.0, n, CHUNKS_PER_PACK)
            .await
            .map_err(|e| format!("writing synthetic index objects: {e}"))
    })?;
    f.generate_s = t.elapsed().as_secs_f64();
    f.index_mib = dir_mib(&repo_dir.join("index"));
    sync_disks();

    eprintln!("index-scale: cold start on {n} chunks");
    let t = Instant::now();
    // The per-client call rate is lifted: the bench measures the index, not the limit.
    let env = [("DATAMOVER_CLIENT_RATE", "1000000")];
    let mut server = Server::start_in_within(
        root,
        Storage::Filesystem,
        &[CLIENT],
        &env,
        opts.ready_within,
    );
    f.cold_ready_s = t.elapsed().as_secs_f64();
    let pid = server.pid().ok_or("the server has no process")?;
    f.cold_hwm_mib = proc_hwm_mib(pid);
    // The index a cold start built answers right (checked, not timed).
    rt.block_on(find_missing_rate(&server, n, 1.0, 1))?;

    eprintln!("index-scale: warm restart");
    server.stop(nix::sys::signal::Signal::SIGTERM);
    sync_disks();
    let t = Instant::now();
    server.spawn();
    f.warm_ready_s = t.elapsed().as_secs_f64();
    let pid = server.pid().ok_or("the server has no process")?;
    f.warm_hwm_mib = proc_hwm_mib(pid);
    f.rss_ready_mib = proc_rss_mib(pid);
    f.cache_mib = dir_mib(&server.root.path().join("var/cache"));

    eprintln!("index-scale: FindMissing for {} s", opts.seconds);
    f.ids_per_s = rt.block_on(find_missing_rate(&server, n, opts.seconds, opts.sessions))?;
    f.rss_after_mib = proc_rss_mib(pid);
    drop(server);
    Ok(f)
}

fn sync_disks() {
    // SAFETY: sync(2) has no arguments and no failure mode.
    unsafe { libc::sync() };
}

/// FindMissing from `opts.sessions` concurrent sessions for `opts.seconds`: ids a second.
async fn find_missing_rate(server: &Server, n: u64, seconds: f64, sessions: usize) -> Res<f64> {
    let settings = server.client_settings(CLIENT.0, CLIENT.1);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..sessions.max(1) {
        let settings = settings.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = datamover_client::connect::connect(&settings)
                .await
                .map_err(|e| format!("connecting to the server: {e}"))?;
            let session = conn
                .api
                .begin_backup(v1::BeginBackupRequest {
                    tag: "index-scale".into(),
                    kind: v1::SnapshotKind::Files as i32,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("BeginBackup: {e}"))?
                .into_inner()
                .session_id;
            // A different walk through the ids per session (a xorshift), so sessions
            // do not ask for the same ids.
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (s as u64 + 1);
            let mut ids_done = 0u64;
            // Bounded: by the deadline, and by a generous number of calls.
            for _ in 0..10_000_000u64 {
                if Instant::now() >= deadline {
                    break;
                }
                let mut ids = Vec::with_capacity(BATCH);
                for k in 0..BATCH {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Even positions present (i < n), odd ones absent (i >= n).
                    let i = if k % 2 == 0 { x % n.max(1) } else { n + x % (1 << 40) };
                    ids.push(Bytes::copy_from_slice(&synthetic_chunk_id(i).0));
                }
                let missing = conn
                    .api
                    .find_missing(v1::FindMissingRequest {
                        session_id: session.clone(),
                        ids,
                    })
                    .await
                    .map_err(|e| format!("FindMissing: {e}"))?
                    .into_inner()
                    .missing;
                let expected = (0..BATCH as u32).filter(|k| k % 2 == 1);
                if n > 0 && !missing.iter().copied().eq(expected) {
                    return Err(format!(
                        "FindMissing answered {} missing of {BATCH}, expected exactly the {} absent ids",
                        missing.len(),
                        BATCH / 2
                    ));
                }
                ids_done += BATCH as u64;
            }
            Ok::<u64, String>(ids_done)
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t
            .await
            .map_err(|e| format!("a FindMissing task failed: {e}"))??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The report section: one row per N.
pub fn report(figures: &[IndexFigures], label: &str) -> String {
    let mut s = format!(
        "### index-scale ({label})\n\n| chunks | index objects (MiB) | generate s | cold Ready s | cold peak RSS MiB | warm Ready s | warm peak RSS MiB | RSS ready MiB | RSS after MiB | FindMissing ids/s | local cache MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for f in figures {
        s.push_str(&format!(
            "| {} | {} ({:.0}) | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            f.chunks,
            f.index_objects,
            f.index_mib,
            f.generate_s,
            f.cold_ready_s,
            f.cold_hwm_mib,
            f.warm_ready_s,
            f.warm_hwm_mib,
            f.rss_ready_mib,
            f.rss_after_mib,
            f.ids_per_s,
            f.cache_mib,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scenario end to end at a small N: the index objects are written, the server
    /// starts cold and warm on them, every FindMissing answer is checked, and the figures
    /// are filled in.
    #[test]
    fn a_small_index_is_generated_served_and_measured() {
        let work = tempfile::tempdir().expect("a work directory");
        let opts = IndexScaleOptions {
            chunks: vec![20_000],
            seconds: 1.0,
            sessions: 2,
            ready_within: Duration::from_secs(90),
        };
        let all = run(work.path(), &opts).expect("index-scale runs");
        let f = &all[0];
        assert_eq!(f.chunks, 20_000);
        assert!(f.index_objects >= 1 && f.index_mib > 0.0, "{f:?}");
        assert!(f.cold_ready_s > 0.0 && f.warm_ready_s > 0.0, "{f:?}");
        assert!(f.ids_per_s > 0.0, "{f:?}");
        assert!(f.cache_mib > 0.0, "a local index file: {f:?}");
        assert!(report(&all, "test").contains("| 20000 |"));
    }
}
