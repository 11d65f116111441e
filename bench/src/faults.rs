//! `datamover-bench faults` (issue 30, item 3): a long run of backups, restores,
//! retention, maintenance and verify while the storage connection misbehaves, not a
//! speed measurement but a correctness run that counts what happened.
//!
//! One Garage on loopback behind a [`proxy`] that cuts a share of the connections
//! (after a random number of bytes, half with a reset) and delays others; two server
//! replicas on the same bucket and prefix, both reaching Garage through the proxy; four
//! clients (one tenant), each in a loop: change a few files of its small data set, back
//! it up (`backup_files`), restore the latest snapshot into an empty directory and
//! compare every byte with the source as it was backed up; every third round a stream
//! (`backup_stream` / `restore_stream`), every fifth a `forget --keep-last 3`. An admin
//! runs `maintenance` (grace 60 s, so condemned chunks are also swept during the run)
//! and `verify --read-data --all-tenants` in turn. With `--kill-every`, a random replica
//! is killed with SIGKILL that often and started again (on new ports). A client command
//! that fails is run again (on the other replica first), at most [`ATTEMPTS`] times; a
//! command that runs longer than [`OP_TIMEOUT`] is killed and counted as a hang.
//!
//! At the end, with the faults still on, every client's latest snapshot is restored and
//! compared, and maintenance and verify run once more. Counted: operations, failed
//! attempts that were retried, the client's own reconnects, gave-ups, mismatches,
//! verify problems, hangs, the proxy's cuts, the servers' storage request errors.

pub mod proxy;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use datamover_tests::{Garage, Server, Storage};
use rand::{Rng, SeedableRng};

use crate::Res;
use crate::verify::{compare, digest};

/// Runs of one client command before it counts as a failure.
pub const ATTEMPTS: u32 = 6;
/// A client command running longer than this is killed and counted as a hang.
pub const OP_TIMEOUT: Duration = Duration::from_secs(300);
const ADMIN: (&str, &str) = ("ops", "ops-token");
/// Files of a client's data set (it varies between these).
const MIN_FILES: usize = 20;
const MAX_FILES: usize = 60;
/// Distinct error lines kept for the report.
const MAX_ERRORS: usize = 200;

/// Options of the scenario.
#[derive(Debug, Clone)]
pub struct FaultsOptions {
    pub minutes: f64,
    /// Kill a random replica with SIGKILL this often (none if `None`).
    pub kill_every: Option<Duration>,
    pub clients: usize,
    pub plan: proxy::Plan,
    /// Seconds between the admin's runs (maintenance, then verify, in turn).
    pub admin_every: Duration,
    pub seed: u64,
}

/// Counts of one kind of client command.
#[derive(Debug, Clone, Default)]
pub struct OpCount {
    /// Commands that finished (possibly after retries).
    pub ok: u64,
    /// Failed attempts that were run again.
    pub retried: u64,
    /// Commands that failed [`ATTEMPTS`] times (or with exit 8, data loss).
    pub failed: u64,
    /// The client's own reconnects (`reconnecting (attempt …)` on its stderr).
    pub reconnects: u64,
    /// Attempts killed after [`OP_TIMEOUT`].
    pub hangs: u64,
    /// Maintenance refused because another run holds the lock (not run again: the lock
    /// of a killed server holds for an hour).
    pub refused: u64,
}

/// What the run counted.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub elapsed_s: f64,
    pub ops: BTreeMap<&'static str, OpCount>,
    pub restores_compared: u64,
    pub restores_identical: u64,
    /// Restores that succeeded but differ from the source: the worst finding.
    pub mismatches: Vec<String>,
    pub verify_clean: u64,
    /// `verify` runs that reported problems (exit 8), with their report.
    pub verify_problems: Vec<String>,
    pub kills: u64,
    pub restart_s: Vec<f64>,
    pub restart_failures: u64,
    pub proxy_accepted: u64,
    pub proxy_cut: u64,
    pub proxy_reset: u64,
    pub proxy_delayed: u64,
    /// `datamover_store_requests_total{outcome="error"}` summed over every server
    /// process (read before each kill and at the end).
    pub store_errors: u64,
    pub store_requests: u64,
    /// Lines of the servers' logs that say they retry.
    pub server_retry_lines: u64,
    /// Final checks with the faults still on.
    pub final_restores_identical: u64,
    pub final_verify: String,
    /// First lines of the errors seen, with how often.
    pub errors: BTreeMap<String, u64>,
    pub events_log: PathBuf,
}

/// Where clients reach one replica now (`None` while it is down).
#[derive(Debug, Clone)]
struct Endpoint {
    port: u16,
    fingerprint: String,
}

struct Shared {
    endpoints: Vec<Mutex<Option<Endpoint>>>,
    figures: Mutex<Figures>,
    stop: AtomicBool,
    events: Mutex<std::fs::File>,
    bin: PathBuf,
    started: Instant,
    seq: AtomicU64,
}

impl Shared {
    fn event(&self, line: &str) {
        let t = self.started.elapsed().as_secs_f64();
        if let Ok(mut f) = self.events.lock() {
            let _ = writeln!(f, "[{t:8.1}s] {line}");
        }
    }

    fn count(&self, kind: &'static str, f: impl FnOnce(&mut OpCount)) {
        if let Ok(mut g) = self.figures.lock() {
            f(g.ops.entry(kind).or_default());
        }
    }

    fn error_line(&self, kind: &str, code: i32, stderr: &str) {
        let first = stderr
            .lines()
            .rev()
            .find(|l| l.contains("error"))
            .or_else(|| stderr.lines().last())
            .unwrap_or("")
            .chars()
            .take(240)
            .collect::<String>();
        let key = format!("{kind} exit {code}: {first}");
        if let Ok(mut g) = self.figures.lock()
            && (g.errors.len() < MAX_ERRORS || g.errors.contains_key(&key))
        {
            *g.errors.entry(key).or_default() += 1;
        }
    }
}

/// One client: its id, credential, and own root (`/etc/client-secret/<id>`).
struct ClientEnv {
    id: String,
    root: PathBuf,
    /// The replica it asks first.
    prefer: usize,
}

/// How a client command ended.
enum Outcome {
    Ok(String),
    /// Failed every attempt, or with data loss (exit 8).
    Failed(String),
}

fn run_client(shared: &Shared, c: &ClientEnv, kind: &'static str, args: &[&str]) -> Outcome {
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500 * u64::from(attempt.min(4))));
        }
        // The preferred replica first, then the other one, in turn; a replica that is
        // down is skipped.
        let n = shared.endpoints.len();
        let ep = (0..n)
            .map(|k| (c.prefer + attempt as usize + k) % n)
            .find_map(|i| {
                shared.endpoints[i]
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .map(|e| (i, e))
            });
        let Some((replica, ep)) = ep else {
            last = "no replica up".into();
            shared.count(kind, |o| o.retried += 1);
            std::thread::sleep(Duration::from_secs(2));
            continue;
        };
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        let out_path = c.root.join(format!("out-{seq}"));
        let err_path = c.root.join(format!("err-{seq}"));
        let (Ok(out), Ok(err)) = (
            std::fs::File::create(&out_path),
            std::fs::File::create(&err_path),
        ) else {
            return Outcome::Failed(format!("cannot create files in {}", c.root.display()));
        };
        let child = Command::new(&shared.bin)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATAMOVER_ROOT", &c.root)
            .env("SERVER_URL", format!("127.0.0.1:{}", ep.port))
            .env("PROTOCOLS", format!("datamover-v1:{}", ep.port))
            .env("SERVER_DATA", &ep.fingerprint)
            .env("DATAMOVER_PROGRESS", "0")
            .env("DATAMOVER_CONNECT_ATTEMPTS", "3")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn();
        let mut child = match child {
            Ok(ch) => ch,
            Err(e) => return Outcome::Failed(format!("spawn {}: {e}", shared.bin.display())),
        };
        let t = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if t.elapsed() > OP_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break None,
            }
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        let reconnects = stderr.matches("reconnecting (attempt").count() as u64;
        if reconnects > 0 {
            shared.count(kind, |o| o.reconnects += reconnects);
        }
        let Some(status) = status else {
            shared.count(kind, |o| {
                o.hangs += 1;
                o.retried += 1;
            });
            shared.event(&format!(
                "HANG {} {kind} {args:?} on replica {replica} (port {}): killed after {} s; stderr: {}",
                c.id,
                ep.port,
                OP_TIMEOUT.as_secs(),
                tail(&stderr)
            ));
            last = format!("hang after {} s", OP_TIMEOUT.as_secs());
            continue;
        };
        if status.success() {
            shared.count(kind, |o| o.ok += 1);
            return Outcome::Ok(stdout);
        }
        let code = status.code().unwrap_or(-1);
        shared.error_line(kind, code, &stderr);
        shared.event(&format!(
            "{} {kind} {args:?} on replica {replica} failed with exit {code} (attempt {}): {}",
            c.id,
            attempt + 1,
            tail(&stderr)
        ));
        last = format!("exit {code}: {}", tail(&stderr));
        if stderr.contains("maintenance is already running") {
            shared.count(kind, |o| o.refused += 1);
            return Outcome::Failed(last);
        }
        if code == 8 {
            // Data loss: never retried, a finding.
            shared.count(kind, |o| o.failed += 1);
            return Outcome::Failed(format!("{last}\n{stdout}"));
        }
        shared.count(kind, |o| o.retried += 1);
    }
    shared.count(kind, |o| o.failed += 1);
    shared.event(&format!(
        "GAVE UP {} {kind} {args:?} after {ATTEMPTS} attempts: {last}",
        c.id
    ));
    Outcome::Failed(last)
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Writes `n` random bytes (half of the files compress).
fn random_file(rng: &mut impl Rng, path: &Path, n: usize) -> Res<()> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    if rng.gen_bool(0.5) {
        for (i, b) in v.iter_mut().enumerate() {
            if i % 4 != 0 {
                *b = b'a' + (i % 26) as u8;
            }
        }
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::write(path, v).map_err(|e| format!("{}: {e}", path.display()))
}

fn file_size(rng: &mut impl Rng) -> usize {
    match rng.gen_range(0..10) {
        0 => rng.gen_range(1024 * 1024..3 * 1024 * 1024),
        1 => 0,
        _ => rng.gen_range(1..200 * 1024),
    }
}

/// The files of a data set, relative, sorted.
fn files_of(src: &Path) -> Vec<PathBuf> {
    crate::data::list_files(src)
        .into_iter()
        .filter_map(|p| p.strip_prefix(src).ok().map(Path::to_path_buf))
        .collect()
}

/// Changes a few files, adds one or two, removes one (keeping the count in bounds).
fn mutate(rng: &mut impl Rng, src: &Path, round: u64) -> Res<()> {
    let files = files_of(src);
    for _ in 0..3 {
        if let Some(f) = files.get(rng.gen_range(0..files.len().max(1))) {
            let n = file_size(rng);
            random_file(rng, &src.join(f), n)?;
        }
    }
    if files.len() < MAX_FILES {
        for k in 0..rng.gen_range(1..=2) {
            let dir = format!("d{}", rng.gen_range(0..5));
            let n = file_size(rng);
            random_file(rng, &src.join(dir).join(format!("r{round}-{k}")), n)?;
        }
    }
    if files.len() > MIN_FILES
        && let Some(f) = files.get(rng.gen_range(0..files.len()))
    {
        let _ = std::fs::remove_file(src.join(f));
    }
    Ok(())
}

fn client_loop(
    shared: &Shared,
    c: &ClientEnv,
    work: &Path,
    seed: u64,
) -> Res<Option<crate::verify::Tree>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let src = work.join("src");
    for i in 0..MIN_FILES + 10 {
        let n = file_size(&mut rng);
        random_file(
            &mut rng,
            &src.join(format!("d{}", i % 5)).join(format!("f{i}")),
            n,
        )?;
    }
    let tag = c.id.clone();
    let src_s = src.display().to_string();
    let mut backed_up: Option<crate::verify::Tree> = None;
    let mut round = 0u64;
    let mut changed = true;
    // After the time is up, a last backup that failed is tried again (a few rounds), so
    // that the final check knows what the latest snapshot holds.
    let mut extra = 0;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            if changed || extra >= 3 {
                break;
            }
            extra += 1;
        }
        round += 1;
        if !changed {
            // The last backup failed: back up the same state again (its snapshot may or
            // may not exist, so the latest one is this state either way once it works).
        } else if round > 1 {
            mutate(&mut rng, &src, round)?;
        }
        let want = digest(&src)?;
        if let Outcome::Failed(e) =
            run_client(shared, c, "backup_files", &["backup_files", &src_s, &tag])
        {
            shared.event(&format!("{} round {round}: backup failed: {e}", c.id));
            changed = false;
            continue;
        }
        changed = true;
        backed_up = Some(want.clone());
        restore_and_compare(shared, c, work, &tag, &want, "restore_files");
        if round.is_multiple_of(3) {
            stream_round(shared, c, work, &mut rng, round);
        }
        if round.is_multiple_of(5) {
            let _ = run_client(
                shared,
                c,
                "forget",
                &["forget", "--tag", &tag, "--keep-last", "3"],
            );
        }
    }
    if !changed {
        // The source may or may not be in the latest snapshot: nothing to check at the end.
        shared.event(&format!("{}: the last backup failed; no final check", c.id));
        return Ok(None);
    }
    Ok(backed_up)
}

/// Restores the latest snapshot of `tag` into an empty directory and compares it.
fn restore_and_compare(
    shared: &Shared,
    c: &ClientEnv,
    work: &Path,
    tag: &str,
    want: &crate::verify::Tree,
    kind: &'static str,
) -> bool {
    let out = work.join("restore");
    let _ = std::fs::remove_dir_all(&out);
    let out_s = out.display().to_string();
    let ok = match run_client(shared, c, kind, &["restore_files", &out_s, tag]) {
        Outcome::Failed(e) => {
            shared.event(&format!("{} restore of {tag} failed: {e}", c.id));
            if e.starts_with("exit 8") {
                record_mismatch(shared, format!("{} restore of {tag}: exit 8: {e}", c.id));
            }
            false
        }
        Outcome::Ok(_) => {
            let got = digest(&out);
            let r = got.and_then(|g| compare(want, &g));
            let mut f = shared.figures.lock().unwrap_or_else(|p| p.into_inner());
            f.restores_compared += 1;
            match r {
                Ok(_) => {
                    f.restores_identical += 1;
                    true
                }
                Err(e) => {
                    drop(f);
                    record_mismatch(shared, format!("{} restore of {tag}: {e}", c.id));
                    // Kept for a look.
                    let _ = std::fs::rename(
                        &out,
                        work.join(format!(
                            "mismatch-{}",
                            shared.seq.fetch_add(1, Ordering::Relaxed)
                        )),
                    );
                    false
                }
            }
        }
    };
    let _ = std::fs::remove_dir_all(&out);
    ok
}

fn record_mismatch(shared: &Shared, what: String) {
    shared.event(&format!("MISMATCH {what}"));
    if let Ok(mut f) = shared.figures.lock() {
        f.mismatches.push(what);
    }
}

/// A stream backed up from a file and restored into another, compared byte for byte.
fn stream_round(shared: &Shared, c: &ClientEnv, work: &Path, rng: &mut impl Rng, round: u64) {
    let input = work.join("stream.in");
    let output = work.join("stream.out");
    let n = rng.gen_range(512 * 1024..4 * 1024 * 1024);
    if random_file(rng, &input, n).is_err() {
        return;
    }
    let tag = format!("{}-stream", c.id);
    let (i, o) = (input.display().to_string(), output.display().to_string());
    if let Outcome::Failed(e) = run_client(shared, c, "backup_stream", &["backup_stream", &i, &tag])
    {
        shared.event(&format!(
            "{} round {round}: stream backup failed: {e}",
            c.id
        ));
        return;
    }
    let _ = std::fs::remove_file(&output);
    match run_client(shared, c, "restore_stream", &["restore_stream", &o, &tag]) {
        Outcome::Ok(_) => {
            let same = std::fs::read(&input).ok() == std::fs::read(&output).ok();
            let mut f = shared.figures.lock().unwrap_or_else(|p| p.into_inner());
            f.restores_compared += 1;
            if same {
                f.restores_identical += 1;
            } else {
                drop(f);
                record_mismatch(
                    shared,
                    format!("{} stream {tag} round {round}: bytes differ", c.id),
                );
            }
        }
        Outcome::Failed(e) => {
            shared.event(&format!(
                "{} round {round}: stream restore failed: {e}",
                c.id
            ));
            if e.starts_with("exit 8") {
                record_mismatch(shared, format!("{} stream {tag}: exit 8: {e}", c.id));
            }
        }
    }
}

/// `verify --read-data --all-tenants`: Ok, or the problems it reported.
fn verify(shared: &Shared, admin: &ClientEnv) -> Result<(), String> {
    match run_client(
        shared,
        admin,
        "verify",
        &["verify", "--read-data", "--all-tenants"],
    ) {
        Outcome::Ok(out) => {
            let line = out.lines().last().unwrap_or("");
            let problems = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["problems"].as_u64());
            if problems == Some(0) {
                if let Ok(mut f) = shared.figures.lock() {
                    f.verify_clean += 1;
                }
                Ok(())
            } else {
                let e = format!("verify exited 0 with {line}");
                if let Ok(mut f) = shared.figures.lock() {
                    f.verify_problems.push(e.clone());
                }
                Err(e)
            }
        }
        Outcome::Failed(e) => {
            if e.starts_with("exit 8")
                && let Ok(mut f) = shared.figures.lock()
            {
                f.verify_problems.push(e.chars().take(2000).collect());
            }
            Err(e)
        }
    }
}

fn admin_loop(shared: &Shared, admin: &ClientEnv, every: Duration) {
    let mut n = 0u64;
    while sleep_unless_stopped(shared, every) {
        n += 1;
        if n % 2 == 1 {
            let _ = run_client(shared, admin, "maintenance", &["maintenance"]);
        } else {
            let _ = verify(shared, admin);
        }
    }
}

/// Sleeps `d` in small steps; false once the run is stopping.
fn sleep_unless_stopped(shared: &Shared, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if shared.stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    !shared.stop.load(Ordering::Relaxed)
}

/// (requests, errors) of `datamover_store_requests_total` in a `/metrics` text.
fn store_counts(metrics: &str) -> (u64, u64) {
    let (mut all, mut errors) = (0u64, 0u64);
    for line in metrics.lines() {
        if !line.starts_with("datamover_store_requests_total{") {
            continue;
        }
        let n = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        all += n;
        // A missing object is an answer, not a failure.
        if !line.contains("outcome=\"ok\"") && !line.contains("outcome=\"not_found\"") {
            errors += n;
        }
    }
    (all, errors)
}

fn scrape(shared: &Shared, server: &Server) {
    if let Some((200, body)) = server.http_get("/metrics") {
        let (all, errors) = store_counts(&body);
        if let Ok(mut f) = shared.figures.lock() {
            f.store_requests += all;
            f.store_errors += errors;
        }
    }
}

fn endpoint(s: &Server) -> Endpoint {
    Endpoint {
        port: s.port,
        fingerprint: s.fingerprint.clone(),
    }
}

fn killer_loop(shared: &Shared, servers: &[Mutex<Server>], every: Duration, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while sleep_unless_stopped(shared, every) {
        let r = rng.gen_range(0..servers.len());
        let Ok(mut s) = servers[r].lock() else { return };
        scrape(shared, &s);
        if let Ok(mut e) = shared.endpoints[r].lock() {
            *e = None;
        }
        let pid = s.pid();
        s.stop(nix::sys::signal::Signal::SIGKILL);
        shared.event(&format!("killed replica {r} (pid {pid:?}) with SIGKILL"));
        std::thread::sleep(Duration::from_secs(rng.gen_range(1..=5)));
        let t = Instant::now();
        // Server::spawn panics when the server does not come up in 90 s; tried again.
        let mut up = false;
        for _ in 0..3 {
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.spawn()));
            if started.is_ok() {
                up = true;
                break;
            }
            // A process that did not become ready is not left behind.
            s.stop(nix::sys::signal::Signal::SIGKILL);
            if let Ok(mut f) = shared.figures.lock() {
                f.restart_failures += 1;
            }
            shared.event(&format!("replica {r} did not start again; retrying"));
        }
        let secs = t.elapsed().as_secs_f64();
        if let Ok(mut f) = shared.figures.lock() {
            f.kills += 1;
            if up {
                f.restart_s.push(secs);
            }
        }
        if up {
            shared.event(&format!(
                "replica {r} up again in {secs:.1} s on port {}",
                s.port
            ));
            if let Ok(mut e) = shared.endpoints[r].lock() {
                *e = Some(endpoint(&s));
            }
        }
    }
}

/// Runs the scenario in `work`.
pub fn run(work: &Path, opts: &FaultsOptions) -> Res<Figures> {
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let work = tempfile::Builder::new()
        .prefix("faults-")
        .tempdir_in(work)
        .map_err(|e| format!("temp dir in {}: {e}", work.display()))?;
    let events_log = work.path().join("events.log");
    let events = std::fs::File::create(&events_log).map_err(|e| e.to_string())?;
    let garage = Garage::start()?;
    let upstream = garage
        .endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let proxy = proxy::Proxy::start(&upstream, opts.plan, opts.seed)
        .map_err(|e| format!("starting the proxy: {e}"))?;
    let clients: Vec<(String, String)> = (0..opts.clients)
        .map(|i| (format!("c{i}"), format!("token-{i}")))
        .collect();
    let mut pairs: Vec<(&str, &str)> = clients
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    pairs.push(ADMIN);
    let tenants: String = pairs.iter().map(|(c, _)| format!("{c}=fleet\n")).collect();
    let roles: String = clients
        .iter()
        .map(|(c, _)| format!("{c}=full\n"))
        .chain([format!("{}=admin\n", ADMIN.0)])
        .collect();
    let proxied = format!("http://{}", proxy.addr());
    let config = [
        ("endpoint", proxied.as_str()),
        ("s3MaxAttempts", "10"),
        ("tenants", tenants.as_str()),
        ("roles", roles.as_str()),
        ("maintenanceGrace", "60s"),
    ];
    let storage = || Storage::S3 {
        garage: &garage,
        bucket: &garage.bucket,
        prefix: "faults",
    };
    eprintln!("faults: starting two replicas through the proxy on {proxied}");
    let servers: Vec<Mutex<Server>> = (0..2)
        .map(|_| Mutex::new(Server::start_configured(storage(), &pairs, &config)))
        .collect();
    let endpoints = servers
        .iter()
        .map(|s| Mutex::new(s.lock().ok().map(|s| endpoint(&s))))
        .collect();
    let shared = Shared {
        endpoints,
        figures: Mutex::new(Figures {
            events_log: events_log.clone(),
            ..Figures::default()
        }),
        stop: AtomicBool::new(false),
        events: Mutex::new(events),
        bin: datamover_tests::bin("datamover-client"),
        started: Instant::now(),
        seq: AtomicU64::new(0),
    };
    let make_env = |id: &str, cred: &str, prefer: usize| -> Res<ClientEnv> {
        let root = work.path().join(format!("root-{id}"));
        let secret = root.join("etc/client-secret").join(id);
        std::fs::create_dir_all(root.join("etc/client-secret")).map_err(|e| e.to_string())?;
        std::fs::write(&secret, cred).map_err(|e| e.to_string())?;
        Ok(ClientEnv {
            id: id.to_string(),
            root,
            prefer,
        })
    };
    let envs: Vec<ClientEnv> = clients
        .iter()
        .enumerate()
        .map(|(i, (id, cred))| make_env(id, cred, i % 2))
        .collect::<Res<_>>()?;
    let admin = make_env(ADMIN.0, ADMIN.1, 0)?;
    let duration = Duration::from_secs_f64(opts.minutes * 60.0);
    eprintln!(
        "faults: {} clients for {:.1} min, kills every {:?}; events in {}",
        opts.clients,
        opts.minutes,
        opts.kill_every,
        events_log.display()
    );
    let start = Instant::now();
    let finals: Vec<Res<Option<crate::verify::Tree>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = envs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let dir = work.path().join(format!("data-{}", c.id));
                let shared = &shared;
                let seed = opts.seed.wrapping_add(1000 + i as u64);
                scope.spawn(move || client_loop(shared, c, &dir, seed))
            })
            .collect();
        scope.spawn(|| admin_loop(&shared, &admin, opts.admin_every));
        if let Some(every) = opts.kill_every {
            let (shared, servers) = (&shared, &servers);
            let seed = opts.seed.wrapping_add(7);
            scope.spawn(move || killer_loop(shared, servers, every, seed));
        }
        let mut last_note = Instant::now();
        while start.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(500));
            if last_note.elapsed() > Duration::from_secs(60) {
                last_note = Instant::now();
                if let Ok(f) = shared.figures.lock() {
                    let ok: u64 = f.ops.values().map(|o| o.ok).sum();
                    let retried: u64 = f.ops.values().map(|o| o.retried).sum();
                    let failed: u64 = f.ops.values().map(|o| o.failed).sum();
                    eprintln!(
                        "faults: {:.0} s: {ok} ops ok, {retried} retried, {failed} failed, {} restores identical of {}, {} mismatches, {} kills",
                        start.elapsed().as_secs_f64(),
                        f.restores_identical,
                        f.restores_compared,
                        f.mismatches.len(),
                        f.kills
                    );
                }
            }
        }
        shared.stop.store(true, Ordering::Relaxed);
        eprintln!("faults: time is up; waiting for the running rounds to finish");
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a client thread panicked".into()))
            })
            .collect()
    });
    let elapsed_s = start.elapsed().as_secs_f64();
    // The end: every replica up, the faults still on. Every client's latest snapshot is
    // restored and compared; then maintenance, and verify must be clean.
    shared.stop.store(false, Ordering::Relaxed);
    for (r, s) in servers.iter().enumerate() {
        if let Ok(s) = s.lock()
            && let Ok(mut e) = shared.endpoints[r].lock()
            && e.is_none()
        {
            *e = Some(endpoint(&s));
        }
    }
    let mut final_identical = 0;
    for (c, want) in envs.iter().zip(&finals) {
        match want {
            Ok(Some(want)) => {
                let dir = work.path().join(format!("data-{}", c.id));
                if restore_and_compare(&shared, c, &dir, &c.id, want, "final restore") {
                    final_identical += 1;
                }
            }
            Ok(None) => shared.event(&format!("{}: no backup succeeded", c.id)),
            Err(e) => shared.event(&format!("{}: the client loop failed: {e}", c.id)),
        }
    }
    let _ = run_client(&shared, &admin, "maintenance", &["maintenance"]);
    let final_verify = match verify(&shared, &admin) {
        Ok(()) => "clean".to_string(),
        Err(e) => format!("NOT clean: {e}"),
    };
    let mut retry_lines = 0u64;
    for s in &servers {
        if let Ok(s) = s.lock() {
            scrape(&shared, &s);
            retry_lines += s
                .log()
                .lines()
                .filter(|l| l.contains("retrying") || l.contains("retry"))
                .count() as u64;
        }
    }
    let mut f = shared
        .figures
        .lock()
        .map_err(|_| "figures poisoned")?
        .clone();
    f.elapsed_s = elapsed_s;
    f.final_restores_identical = final_identical;
    f.final_verify = final_verify;
    f.server_retry_lines = retry_lines;
    let c = &proxy.counts;
    f.proxy_accepted = proxy::Counts::get(&c.accepted);
    f.proxy_cut = proxy::Counts::get(&c.cut);
    f.proxy_reset = proxy::Counts::get(&c.reset);
    f.proxy_delayed = proxy::Counts::get(&c.delayed);
    for (i, e) in finals.iter().enumerate() {
        if let Err(e) = e {
            f.errors.insert(format!("client c{i} loop: {e}"), 1);
        }
    }
    // Keep the events log (the work dir is removed).
    let kept = std::env::temp_dir().join(format!(
        "datamover-faults-events-{}.log",
        std::process::id()
    ));
    if std::fs::copy(&events_log, &kept).is_ok() {
        f.events_log = kept;
    }
    drop(servers);
    drop(garage);
    Ok(f)
}

/// `datamover-bench faults …`: runs, prints the report, and inserts it into `--results`.
pub fn from_cli(cli: &crate::cli::Cli) -> Res<()> {
    let Some(crate::cli::Scenario::Faults {
        minutes,
        kill_every,
        clients,
        drop_percent,
        delay_percent,
        admin_every,
        seed,
        results,
        note,
    }) = &cli.command
    else {
        return Err("not the faults scenario".into());
    };
    if !(minutes.is_finite() && *minutes > 0.0 && *minutes <= 24.0 * 60.0) {
        return Err(format!(
            "--minutes {minutes}: give a number of minutes between 0 and 1440"
        ));
    }
    crate::measure::use_binaries_beside_this_one();
    let opts = FaultsOptions {
        minutes: *minutes,
        kill_every: (*kill_every > 0).then(|| Duration::from_secs(*kill_every)),
        clients: usize::from(*clients),
        plan: proxy::Plan {
            drop_percent: *drop_percent,
            delay_percent: *delay_percent,
            ..proxy::Plan::default()
        },
        admin_every: Duration::from_secs(*admin_every),
        seed: *seed,
    };
    let work = cli.work.clone().unwrap_or_else(std::env::temp_dir);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = crate::measure::machine(note);
    let figures = run(&work, &opts)?;
    let text = report(&figures, &opts, &command, &machine);
    println!("{text}");
    eprintln!(
        "faults: events log kept in {}",
        figures.events_log.display()
    );
    if let Some(o) = &cli.output {
        std::fs::write(o, &text).map_err(|e| format!("writing {}: {e}", o.display()))?;
    }
    if let Some(r) = results {
        insert_into(r, &text)?;
    }
    let bad = figures.mismatches.len()
        + figures.verify_problems.len()
        + usize::from(figures.final_verify != "clean")
        + (opts.clients - figures.final_restores_identical as usize);
    if bad > 0 {
        return Err(format!(
            "the run found {bad} problems (mismatches, verify problems, final checks): see the report and {}",
            figures.events_log.display()
        ));
    }
    Ok(())
}

/// The Markdown section for bench/RESULTS.md.
pub fn report(f: &Figures, opts: &FaultsOptions, command: &str, machine: &str) -> String {
    let mut s = String::new();
    let kills = match opts.kill_every {
        Some(d) => format!(
            "a random replica killed with SIGKILL every {} s",
            d.as_secs()
        ),
        None => "no kills".into(),
    };
    s += &format!(
        "### {:.0} minutes, {kills}\n\n```sh\n{command}\n```\n\n{machine}\n\n",
        f.elapsed_s / 60.0
    );
    s += "| command | finished | failed attempts, run again | client's own reconnects | hangs (killed after 300 s) | refused: maintenance lock held | gave up |\n|---|---:|---:|---:|---:|---:|---:|\n";
    let mut total = OpCount::default();
    for (k, o) in &f.ops {
        s += &format!(
            "| {k} | {} | {} | {} | {} | {} | {} |\n",
            o.ok, o.retried, o.reconnects, o.hangs, o.refused, o.failed
        );
        total.refused += o.refused;
        total.ok += o.ok;
        total.retried += o.retried;
        total.reconnects += o.reconnects;
        total.hangs += o.hangs;
        total.failed += o.failed;
    }
    s += &format!(
        "| **all** | **{}** | **{}** | **{}** | **{}** | **{}** | **{}** |\n\n",
        total.ok, total.retried, total.reconnects, total.hangs, total.refused, total.failed
    );
    let restart = if f.restart_s.is_empty() {
        "—".to_string()
    } else {
        format!(
            "median {:.1} s",
            crate::measure::median(f.restart_s.clone())
        )
    };
    s += &format!(
        "| count | |\n|---|---:|\n\
         | restores compared (trees and streams) | {} |\n\
         | byte-identical | {} |\n\
         | **differing (a restore that succeeded with wrong data)** | **{}** |\n\
         | verify --read-data runs clean during the run | {} |\n\
         | verify runs that reported problems | {} |\n\
         | final restores of each client's latest snapshot, byte-identical | {} of {} |\n\
         | final maintenance + verify --read-data --all-tenants | {} |\n\
         | connections through the proxy | {} |\n\
         | cut by the proxy (of which with a reset) | {} ({}) |\n\
         | delayed by the proxy | {} |\n\
         | servers' storage requests (failed after the SDK's retries) | {} ({}) |\n\
         | servers' log lines about retrying | {} |\n\
         | replicas killed (restart to ready) | {} ({restart}) |\n\
         | restarts that failed | {} |\n\n",
        f.restores_compared,
        f.restores_identical,
        f.mismatches.len(),
        f.verify_clean,
        f.verify_problems.len(),
        f.final_restores_identical,
        opts.clients,
        f.final_verify,
        f.proxy_accepted,
        f.proxy_cut,
        f.proxy_reset,
        f.proxy_delayed,
        f.store_requests,
        f.store_errors,
        f.server_retry_lines,
        f.kills,
        f.restart_failures,
    );
    for m in f.mismatches.iter().take(10) {
        s += &format!("- mismatch: {m}\n");
    }
    for m in f.verify_problems.iter().take(5) {
        s += &format!("- verify: {}\n", m.replace('\n', " "));
    }
    if !f.errors.is_empty() {
        let mut errs: Vec<(&String, &u64)> = f.errors.iter().collect();
        errs.sort_by(|a, b| b.1.cmp(a.1));
        s += "\nThe failed attempts' most frequent errors (the last error line of the client):\n\n";
        for (e, n) in errs.into_iter().take(8) {
            s += &format!("- {n}× `{}`\n", e.replace('`', "'"));
        }
    }
    s += "\n";
    s
}

/// Inserts `section` into the results file after its first heading block (before its
/// first `## ` heading).
pub fn insert_into(results: &Path, section: &str) -> Res<()> {
    let text =
        std::fs::read_to_string(results).map_err(|e| format!("{}: {e}", results.display()))?;
    let at = text.find("\n## ").map_or(text.len(), |i| i + 1);
    let mut out = String::with_capacity(text.len() + section.len());
    out += &text[..at];
    out += section;
    out += &text[at..];
    std::fs::write(results, out).map_err(|e| format!("{}: {e}", results.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_are_the_requests_not_ok() {
        let m = "# HELP x\n\
            datamover_store_requests_total{operation=\"write\",type=\"data\",outcome=\"ok\"} 10\n\
            datamover_store_requests_total{operation=\"read\",type=\"index\",outcome=\"error\"} 3\n\
            datamover_store_requests_total{operation=\"list\",type=\"snapshot\",outcome=\"not_found\"} 2\n\
            datamover_store_request_seconds_count{operation=\"write\"} 99\n";
        assert_eq!(store_counts(m), (15, 3));
    }

    #[test]
    fn the_section_goes_after_the_title_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("R.md");
        std::fs::write(&p, "# Title\n\nintro\n\n## Old\n\nold text\n").unwrap();
        insert_into(&p, "## New\n\nnew\n\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "# Title\n\nintro\n\n## New\n\nnew\n\n## Old\n\nold text\n"
        );
    }
}
