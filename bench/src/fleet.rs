//! Scenario `fleet` (issue 29, item 3): many edge devices syncing to one server.
//!
//! N simulated devices, each with its own client credential (a file in the server's
//! `etc/client_credentials/`), its own directory of small files and its own sync state,
//! run in this process as tokio tasks with the client library's egress pass
//! (`datamover_client::sync::egress_pass`), each over its own TLS connection, as a
//! device running `sync_egress` continuously would. Every cycle a device rewrites a few
//! of its files and syncs; device `i` starts at `i/N` of the interval, so the passes are
//! spread evenly. Against our server on Garage for M minutes; then the same with two
//! replicas on one bucket, the devices split between their two ports (device `i` talks to
//! replica `i mod 2`).
//!
//! Measured: latency of each pass after a device's first (p50, p99, max), passes that
//! failed, the server's peak RSS (VmHWM) and its CPU seconds per pass over the steady
//! part (after the first interval), Garage's and this process's CPU beside it, and the
//! manifests resident at the end.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datamover_client::progress::Counters;
use datamover_client::sync::{Direction, SyncOptions, egress_pass};
use datamover_tests::{Garage, Server, Storage};

use crate::Res;
use crate::measure::{proc_cpu, proc_hwm_mib};

/// Connections opened at once while the devices start.
const CONNECT_AT_ONCE: usize = 64;
/// Files a device sends at once (a device's own `--transfers`).
const TRANSFERS: usize = 2;
/// Open files this process keeps free for the passes beside one connection per device.
/// The devices share this process's open-file limit (a real fleet does not): the passes
/// in flight at once are capped so that their files fit, and the time a pass waits for
/// its turn counts in its latency.
fn passes_at_once(nofile: u64, devices: usize) -> usize {
    let spare = nofile.saturating_sub(devices as u64 + 512);
    usize::try_from(spare / (TRANSFERS as u64 + 2)).map_or(devices, |n| n.clamp(1, devices))
}

/// Options of the scenario.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub devices: usize,
    pub minutes: f64,
    pub interval: Duration,
    /// Files per device, and how many of them change each cycle.
    pub files: usize,
    pub changed: usize,
    pub file_bytes: usize,
    /// Replica counts to run (1, 2).
    pub replicas: Vec<usize>,
}

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub struct FleetFigures {
    pub replicas: usize,
    pub seconds: f64,
    pub connect_s: f64,
    pub passes: u64,
    pub steady_passes: u64,
    /// Pass slots skipped because the previous pass was still running past them (a
    /// device syncs again right after a late pass, it does not queue the missed ones).
    pub missed: u64,
    /// Passes this process ran at once at most (see [`passes_at_once`]).
    pub passes_at_once: usize,
    pub errors: u64,
    pub first_error: Option<String>,
    pub first_pass_p50_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Peak RSS of each replica.
    pub server_hwm_mib: Vec<f64>,
    pub server_cpu_s: f64,
    pub server_cpu_ms_per_pass: f64,
    pub garage_cpu_s: f64,
    pub bench_cpu_s: f64,
    pub resident_manifests: u64,
    pub manifest_puts: u64,
}

/// Raises this process's open-file limit to its hard limit (the servers it starts
/// inherit it); returns the limit now in force.
fn raise_nofile() -> u64 {
    // SAFETY: plain data in and out.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max;
        let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        let mut now: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut now);
        now.rlim_cur
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A metric's value summed over the label sets that have all of `labels`, from a
/// `/metrics` page (the exposition sorts labels by name).
fn metric(page: &str, name: &str, labels: &[&str]) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn client_id(i: usize) -> String {
    format!("dev-{i:05}")
}

fn token(i: usize) -> String {
    format!(
        "fleet-token-{i:05}-{:08x}",
        blake3::hash(&i.to_le_bytes()).as_bytes()[0]
    )
}

fn write_file(dir: &Path, f: usize, cycle: u64, bytes: usize) -> std::io::Result<()> {
    let mut data = vec![0u8; bytes];
    let seed = blake3::hash(format!("{}/{f}/{cycle}", dir.display()).as_bytes());
    let mut x = u64::from_le_bytes(seed.as_bytes()[..8].try_into().unwrap_or([1; 8])) | 1;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(dir.join(format!("file-{f:03}.dat")), data)
}

/// Runs each replica count in turn against one Garage.
pub fn run(work: &Path, opts: &FleetOptions) -> Res<Vec<FleetFigures>> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let nofile = raise_nofile();
    let needed = opts.devices as u64 + 1024 + 64 * (TRANSFERS as u64 + 2);
    eprintln!("fleet: open-file limit {nofile} (each device holds a connection)");
    if nofile < needed {
        return Err(format!(
            "the open-file limit is {nofile}; {} devices need about {needed}: raise it (ulimit -n) and run again",
            opts.devices
        ));
    }
    let garage = Garage::start().map_err(|e| format!("starting Garage: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let mut all = Vec::new();
    for (n, &replicas) in opts.replicas.iter().enumerate() {
        let f = one(
            &rt,
            work,
            &garage,
            opts,
            replicas,
            passes_at_once(nofile, opts.devices),
            &format!("fleet{n}"),
        )?;
        eprintln!("fleet: {f:?}");
        all.push(f);
    }
    Ok(all)
}

fn one(
    rt: &tokio::runtime::Runtime,
    work: &Path,
    garage: &Garage,
    opts: &FleetOptions,
    replicas: usize,
    at_once: usize,
    prefix: &str,
) -> Res<FleetFigures> {
    let dir = tempfile::tempdir_in(work).map_err(|e| format!("temp dir in {work:?}: {e}"))?;
    let ids: Vec<(String, String)> = (0..opts.devices)
        .map(|i| (client_id(i), token(i)))
        .collect();
    let pairs: Vec<(&str, &str)> = ids.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    eprintln!(
        "fleet: {replicas} replica(s), {} devices: writing their files",
        opts.devices
    );
    let mut devices = Vec::with_capacity(opts.devices);
    for i in 0..opts.devices {
        let d = dir.path().join(format!("dev/{i:05}"));
        let data = d.join("data");
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        for f in 0..opts.files {
            write_file(&data, f, 0, opts.file_bytes)
                .map_err(|e| format!("{}: {e}", data.display()))?;
        }
        devices.push(d);
    }
    let env = [("RUST_LOG", "warn")];
    let servers: Vec<Server> = (0..replicas)
        .map(|_| {
            let root = tempfile::tempdir_in(work).expect("a server root");
            Server::start_in_within(
                root,
                Storage::S3 {
                    garage,
                    bucket: &garage.bucket,
                    prefix,
                },
                &pairs,
                &env,
                Duration::from_secs(300),
            )
        })
        .collect();
    let pids: Vec<u32> = servers.iter().filter_map(Server::pid).collect();
    let garage_pid = garage.pid().unwrap_or(0);
    let mut f = FleetFigures {
        replicas,
        ..Default::default()
    };

    eprintln!("fleet: connecting {} devices", opts.devices);
    let t = Instant::now();
    let settings: Vec<_> = (0..opts.devices)
        .map(|i| servers[i % replicas].client_settings(&ids[i].0, &ids[i].1))
        .collect();
    let apis = rt.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_AT_ONCE));
        let handles: Vec<_> = settings
            .into_iter()
            .map(|s| {
                let gate = Arc::clone(&gate);
                tokio::spawn(async move {
                    let _turn = gate.acquire_owned().await;
                    datamover_client::connect::connect(&s).await
                })
            })
            .collect();
        let mut apis = Vec::with_capacity(handles.len());
        for (i, h) in handles.into_iter().enumerate() {
            let c = h.await.map_err(|e| format!("device {i}: {e}"))?;
            apis.push(
                c.map_err(|e| format!("device {i} cannot connect: {e}"))?
                    .sync,
            );
        }
        Ok::<_, String>(apis)
    })?;
    f.connect_s = t.elapsed().as_secs_f64();

    let seconds = opts.minutes * 60.0;
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let first = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let passes = Arc::new(AtomicU64::new(0));
    let steady_passes = Arc::new(AtomicU64::new(0));
    let missed = Arc::new(AtomicU64::new(0));
    let turns = Arc::new(tokio::sync::Semaphore::new(at_once));
    f.passes_at_once = at_once;
    let counters = Arc::new(Counters::default());
    let start = tokio::time::Instant::now() + Duration::from_millis(500);
    let steady_from = start + opts.interval;
    let end = start + Duration::from_secs_f64(seconds);
    let cpu_at = |pids: &[u32]| pids.iter().map(|p| proc_cpu(*p)).sum::<f64>();
    let bench_pid = std::process::id();

    eprintln!("fleet: running for {seconds} s");
    let (server_cpu0, garage_cpu0, bench_cpu0) = rt.block_on(async {
        let mut tasks = Vec::with_capacity(opts.devices);
        for (i, (api, d)) in apis.into_iter().zip(&devices).enumerate() {
            let mut o = SyncOptions::new(Direction::Egress, d.join("data"), "data".into());
            o.once = true;
            o.transfers = TRANSFERS;
            let turns = Arc::clone(&turns);
            o.state_dir = Some(d.join("state"));
            let data = d.join("data");
            let missed = Arc::clone(&missed);
            let (latencies, first, errors, first_error, passes, steady_passes, counters) = (
                Arc::clone(&latencies),
                Arc::clone(&first),
                Arc::clone(&errors),
                Arc::clone(&first_error),
                Arc::clone(&passes),
                Arc::clone(&steady_passes),
                Arc::clone(&counters),
            );
            let offset = opts.interval.mul_f64(i as f64 / opts.devices as f64);
            let opts = opts.clone();
            tasks.push(tokio::spawn(async move {
                let mut next = start + offset;
                let mut cycle = 0u64;
                // Bounded by `end`: one pass an interval.
                while next < end {
                    tokio::time::sleep_until(next).await;
                    if cycle > 0 {
                        for k in 0..opts.changed {
                            let file = (cycle as usize * opts.changed + k) % opts.files.max(1);
                            let _ = write_file(&data, file, cycle, opts.file_bytes);
                        }
                    }
                    let t = Instant::now();
                    let r = match turns.acquire().await {
                        Ok(_turn) => egress_pass(&api, &o, &counters)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    passes.fetch_add(1, Ordering::Relaxed);
                    let failed = match r {
                        Ok(p) if p.files_failed == 0 => None,
                        Ok(p) => Some(p.first_failure.unwrap_or_else(|| "a file failed".into())),
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(e) = failed {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let mut fe = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        fe.get_or_insert(e);
                    }
                    if cycle == 0 {
                        first.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                    } else {
                        latencies.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                        if next >= steady_from {
                            steady_passes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    cycle += 1;
                    next += opts.interval;
                    // A late pass: the slots it overran are skipped, not made up.
                    let now = tokio::time::Instant::now();
                    while next < now && next < end {
                        next += opts.interval;
                        missed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep_until(steady_from).await;
        let at = (cpu_at(&pids), proc_cpu(garage_pid), proc_cpu(bench_pid));
        for t in tasks {
            let _ = t.await;
        }
        at
    });
    f.seconds = seconds;
    f.server_cpu_s = cpu_at(&pids) - server_cpu0;
    f.garage_cpu_s = proc_cpu(garage_pid) - garage_cpu0;
    f.bench_cpu_s = proc_cpu(bench_pid) - bench_cpu0;
    f.passes = passes.load(Ordering::Relaxed);
    f.steady_passes = steady_passes.load(Ordering::Relaxed);
    f.missed = missed.load(Ordering::Relaxed);
    f.server_cpu_ms_per_pass = f.server_cpu_s * 1000.0 / f.steady_passes.max(1) as f64;
    f.errors = errors.load(Ordering::Relaxed);
    f.first_error = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    let mut l = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    l.sort_by(|a, b| a.total_cmp(b));
    f.p50_ms = percentile(&l, 0.5);
    f.p99_ms = percentile(&l, 0.99);
    f.max_ms = l.last().copied().unwrap_or(f64::NAN);
    let mut fl = std::mem::take(&mut *first.lock().unwrap_or_else(|p| p.into_inner()));
    fl.sort_by(|a, b| a.total_cmp(b));
    f.first_pass_p50_ms = percentile(&fl, 0.5);
    f.server_hwm_mib = pids.iter().map(|p| proc_hwm_mib(*p)).collect();
    for s in &servers {
        if let Some((_, page)) = s.http_get("/metrics") {
            f.resident_manifests += metric(&page, "datamover_sync_manifests_resident", &[]);
            f.manifest_puts += metric(
                &page,
                "datamover_store_requests_total",
                &["operation=\"put\"", "type=\"sync-state\""],
            );
        }
    }
    drop(servers);
    Ok(f)
}

/// The Markdown report of the runs.
pub fn report(all: &[FleetFigures], opts: &FleetOptions, machine: &str) -> String {
    let mut out = format!(
        "fleet: {} devices, {} files of {} B each, {} changed per cycle, one pass every {} s, {} min, {TRANSFERS} files at once per device, at most {} passes at once in the bench process (its open-file limit); {machine}\n\n",
        opts.devices,
        opts.files,
        opts.file_bytes,
        opts.changed,
        opts.interval.as_secs_f64(),
        opts.minutes,
        all.first().map_or(0, |f| f.passes_at_once),
    );
    out.push_str("| replicas | passes (steady) | slots missed | errors | p50 ms | p99 ms | max ms | first pass p50 ms | server peak RSS MiB | server CPU ms / pass | server CPU s | Garage CPU s | bench CPU s | connect s | manifests resident | manifest writes |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for f in all {
        let rss: Vec<String> = f.server_hwm_mib.iter().map(|m| format!("{m:.0}")).collect();
        out.push_str(&format!(
            "| {} | {} ({}) | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
            f.replicas,
            f.passes,
            f.steady_passes,
            f.missed,
            f.errors,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            f.first_pass_p50_ms,
            rss.join(" + "),
            f.server_cpu_ms_per_pass,
            f.server_cpu_s,
            f.garage_cpu_s,
            f.bench_cpu_s,
            f.connect_s,
            f.resident_manifests,
            f.manifest_puts,
        ));
    }
    for f in all {
        if let Some(e) = &f.first_error {
            out.push_str(&format!("\n{} replica(s), first error: {e}\n", f.replicas));
        }
    }
    out
}

/// Runs the scenario as the command line asks and prints (and writes) its report.
pub fn from_cli(cli: &crate::cli::Cli) -> Res<()> {
    let Some(crate::cli::Scenario::Fleet {
        devices,
        minutes,
        interval,
        files,
        changed,
        file_bytes,
        replicas,
        note,
    }) = &cli.command
    else {
        return Err("not the fleet scenario".into());
    };
    crate::measure::use_binaries_beside_this_one();
    if !(*interval > 0.0 && *minutes > 0.0) || *files == 0 || *changed > *files {
        return Err(
            "fleet needs a positive --interval and --minutes, and --changed at most --files".into(),
        );
    }
    let opts = FleetOptions {
        devices: *devices as usize,
        minutes: *minutes,
        interval: Duration::from_secs_f64(*interval),
        files: *files,
        changed: *changed,
        file_bytes: *file_bytes,
        replicas: replicas.iter().map(|r| *r as usize).collect(),
    };
    let work = cli.work.clone().unwrap_or_else(std::env::temp_dir);
    let figures = run(&work, &opts)?;
    let text = report(&figures, &opts, &crate::measure::machine(note));
    println!("{text}");
    if let Some(o) = &cli.output {
        std::fs::write(o, &text).map_err(|e| format!("writing {}: {e}", o.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scenario end to end, small: a few devices for a few seconds on one replica and
    /// on two; every pass succeeds and the figures are filled in.
    #[test]
    fn a_small_fleet_syncs_on_one_and_two_replicas() {
        if datamover_tests::garage::garage_binary().is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "garage is not installed: the test command installs it (scripts/ensure-garage.sh)"
            );
            eprintln!("SKIPPED: garage is not installed; run scripts/ensure-garage.sh");
            return;
        }
        let work = tempfile::tempdir().expect("a work directory");
        let opts = FleetOptions {
            devices: 6,
            minutes: 0.1,
            interval: Duration::from_secs(2),
            files: 3,
            changed: 1,
            file_bytes: 512,
            replicas: vec![1, 2],
        };
        let all = run(work.path(), &opts).expect("the fleet runs");
        assert_eq!(all.len(), 2);
        for f in &all {
            assert_eq!((f.errors, &f.first_error), (0, &None), "{f:?}");
            assert!(f.passes >= 12, "two passes or more a device: {f:?}");
            assert!(f.p99_ms.is_finite() && f.p99_ms > 0.0, "{f:?}");
            assert_eq!(f.resident_manifests, 6, "one manifest a device: {f:?}");
            assert_eq!(f.server_hwm_mib.len(), f.replicas, "{f:?}");
            assert!(f.server_hwm_mib.iter().all(|m| *m > 0.0), "{f:?}");
        }
        let text = report(&all, &opts, "test machine");
        assert!(
            text.contains("6 devices") && text.contains("| 2 |"),
            "{text}"
        );
    }
}
