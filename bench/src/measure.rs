//! Measuring one run of a tool: wall time, CPU time from `wait4`, the peak RSS sampled
//! from `/proc`, and the run's log kept on request.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::Res;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Spawns `cmd`, waits with `wait4`, returns (wall s, cpu s, max rss MiB).
pub(crate) fn measured(mut cmd: Command, what: &str) -> Res<(f64, f64, f64)> {
    let log = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    if cmd.get_program() != "sh" {
        cmd.stderr(log.reopen().map_err(|e| e.to_string())?);
    }
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    let pid = child.id() as libc::pid_t;
    // ru_maxrss keeps the pre-exec high-water mark of the (v)forked parent, so the peak is
    // sampled from the child's own VmHWM (reset by exec) until it exits.
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = std::sync::Arc::clone(&peak);
        let pid = pid as u32;
        std::thread::spawn(move || {
            // Bounded by the child's life: /proc/<pid> goes away when it is reaped.
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let kib = (proc_hwm_mib(pid) * 1024.0) as u64;
                peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed().as_secs_f64();
    let _ = sampler.join();
    if r < 0 {
        return Err(format!("{what}: wait4 failed"));
    }
    std::mem::forget(child);
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let err = std::fs::read_to_string(log.path()).unwrap_or_default();
        return Err(format!(
            "{what} failed ({status}): {}",
            err.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ));
    }
    keep_log(log.path(), what);
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let peak_mib = peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    Ok((wall, tv(ru.ru_utime) + tv(ru.ru_stime), peak_mib))
}

/// With `BENCH_KEEP_LOGS=<dir>`, keeps each run's stderr there (numbered, in run order),
/// for timelines: `RUST_LOG=debug` then applies to the clients and the server.
pub(crate) fn keep_log(log: &Path, what: &str) {
    let Some(dir) = keep_logs_dir() else {
        return;
    };
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name: String = what
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(60)
        .collect();
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::copy(log, dir.join(format!("{n:03}-{name}.log")));
}

/// Where run logs are kept, if `BENCH_KEEP_LOGS` asks for them.
pub(crate) fn keep_logs_dir() -> Option<PathBuf> {
    std::env::var_os("BENCH_KEEP_LOGS").map(PathBuf::from)
}

pub(crate) fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; index 11 and 12 after the ')' and state.
    (ticks(11) + ticks(12)) / 100.0
}

pub(crate) fn proc_hwm_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmHWM:")
}

/// The process's resident memory now.
pub(crate) fn proc_rss_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmRSS:")
}

fn proc_status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0)
}

pub(crate) fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The machine: CPU model and count, memory, load, the commit, and the note.
pub(crate) fn machine(note: &str) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut s = format!(
        "Machine: {cpus} × {model}, {mem_gib:.0} GiB; load average at the start {}; {} binaries of {commit}.",
        load.join(" "),
        if cfg!(debug_assertions) {
            "dev-profile"
        } else {
            "release"
        }
    );
    if !note.is_empty() {
        s += " ";
        s += note;
    }
    s
}

/// Points the test harness at the server and client built beside this program (unless
/// `DATAMOVER_BIN_DIR` says otherwise): `target/<profile>/`, not the `deps/` of a test.
/// Call it while the program has one thread (it sets an environment variable).
pub(crate) fn use_binaries_beside_this_one() {
    if std::env::var_os("DATAMOVER_BIN_DIR").is_none()
        && let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.to_path_buf()))
    {
        // SAFETY: still one thread: nothing else reads the environment yet.
        unsafe { std::env::set_var("DATAMOVER_BIN_DIR", dir) };
    }
}
