//! Test helper: runs a throw-away single-node Garage (S3-compatible object
//! store, v2.x) on loopback ports, for integration tests of the S3 backend.
//!
//! Usage:
//! ```ignore
//! let g = garage::Garage::start()?;        // bucket "datamover" + a key
//! // talk S3 to g.endpoint with g.access_key / g.secret_key, region g.region
//! g.create_bucket("other")?;               // same key gets R/W/owner on it
//! ```
//! The server is killed (and its temp dir removed) when the `Garage` value is
//! dropped.
//!
//! The binary is found with [`garage_binary`] (env `GARAGE_BIN`, then `PATH`,
//! then `$CARGO_HOME/bin/garage`, then `~/.cargo/bin/garage`);
//! `scripts/ensure-garage.sh` installs it.
//!
//! Only std + `tempfile`; every wait is bounded. Unix only.
//!
//! Server log: `<tempdir>/garage.log` (`RUST_LOG` for it comes from
//! `GARAGE_RUST_LOG`, default `info`); start errors include an excerpt of it.
//!
//! CLI output formats relied upon (Garage v2.5):
//! * `garage node id -q` prints `<64 hex node id>@<rpc_public_addr>`;
//!   fallback: `garage status` prints a `==== HEALTHY NODES ====` table whose
//!   first column (after the `ID ...` header line) is the 16-hex node id prefix.
//! * `garage key create NAME` prints a table containing the lines
//!   `Key ID:      GK...` and `Secret key:  <64 hex>`;
//!   fallback: `garage key info <ID> --secret-key` prints only the secret.
//! * The other commands (`layout assign`, `layout apply --version 1`,
//!   `bucket create`, `bucket allow`) are only checked for exit status 0.

// Not every test binary uses every helper.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Max time for the server to accept CLI (RPC) connections after spawning.
const RPC_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Max time for the S3 API to answer once the cluster is configured.
const S3_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Max time for one setup step (a CLI command, retried while it fails).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Max time a single CLI invocation may run before it is killed.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// How many times `start` retries with fresh ports when the server fails to
/// bind (another process grabbed a port between picking and binding).
const START_ATTEMPTS: usize = 3;
const POLL: Duration = Duration::from_millis(100);
/// How much of the end of the server log is scanned for errors.
const LOG_SCAN_BYTES: u64 = 256 * 1024;
/// Lines of the server log tail included in error messages.
const LOG_TAIL_LINES: usize = 30;

pub const DEFAULT_BUCKET: &str = "datamover";
pub const REGION: &str = "garage";
const KEY_NAME: &str = "datamover-test-key";

pub struct Garage {
    /// `http://127.0.0.1:PORT` (S3 API, path-style addressing).
    pub endpoint: String,
    /// Always `"garage"`.
    pub region: String,
    /// `"datamover"`.
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    // Mutex (not RefCell) so `Garage` stays `Sync` (usable from a static).
    child: Mutex<Child>,
    config_path: PathBuf,
    binary: PathBuf,
    log_path: PathBuf,
    // Declared last so it's dropped (deleted) after the child is killed.
    dir: tempfile::TempDir,
}

/// Finds the garage binary: env `GARAGE_BIN`, then `PATH`, then
/// `$CARGO_HOME/bin/garage`, then `~/.cargo/bin/garage`.
pub fn garage_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GARAGE_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        // An explicit but wrong GARAGE_BIN is reported as "not found" rather
        // than silently replaced by another binary.
        return if is_executable(&p) { Some(p) } else { None };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("garage");
            if is_executable(&p) {
                return Some(p);
            }
        }
    }
    let mut candidates = Vec::new();
    if let Some(ch) = std::env::var_os("CARGO_HOME").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(ch).join("bin").join("garage"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|p| !p.is_empty()) {
        candidates.push(
            PathBuf::from(home)
                .join(".cargo")
                .join("bin")
                .join("garage"),
        );
    }
    candidates.into_iter().find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(p) {
        Ok(m) => m.is_file() && m.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    }
}

impl Garage {
    /// Starts a single-node Garage on free loopback ports (127.0.0.1 only) in
    /// a fresh temp dir (sqlite metadata engine, replication factor 1),
    /// applies a layout, creates bucket "datamover" and a key allowed
    /// read/write/owner on it, and waits (bounded) until the S3 API answers.
    pub fn start() -> Result<Garage, String> {
        let binary = garage_binary().ok_or_else(|| {
            let hint = match std::env::var_os("GARAGE_BIN") {
                Some(p) if !p.is_empty() => format!(
                    "GARAGE_BIN={} is not an executable file",
                    Path::new(&p).display()
                ),
                _ => "not in GARAGE_BIN, PATH or ~/.cargo/bin".to_string(),
            };
            format!("garage binary not found ({hint}); install it with scripts/ensure-garage.sh")
        })?;

        let mut last_err = String::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::start_once(&binary) {
                Ok(g) => return Ok(g),
                Err(StartError::PortClash(e)) if attempt < START_ATTEMPTS => {
                    last_err = e;
                    continue;
                }
                Err(StartError::PortClash(e)) | Err(StartError::Fatal(e)) => return Err(e),
            }
        }
        Err(last_err)
    }

    fn start_once(binary: &Path) -> Result<Garage, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("datamover-garage-")
            .tempdir()
            .map_err(|e| fatal(format!("garage: cannot create temp dir: {e}")))?;
        let root = dir.path();
        let meta_dir = root.join("meta");
        let data_dir = root.join("data");
        for d in [&meta_dir, &data_dir] {
            fs::create_dir_all(d)
                .map_err(|e| fatal(format!("garage: cannot create {}: {e}", d.display())))?;
        }

        let [rpc_port, s3_port] = free_ports::<2>().map_err(fatal)?;
        let rpc_secret = random_hex(32);
        let config_path = root.join("garage.toml");
        let config = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
api_bind_addr = "127.0.0.1:{s3_port}"
s3_region = "{REGION}"
"#,
            meta = toml_escape(&meta_dir),
            data = toml_escape(&data_dir),
        );
        write_private(&config_path, &config).map_err(fatal)?;

        let log_path = root.join("garage.log");
        let log = File::create(&log_path)
            .map_err(|e| fatal(format!("garage: cannot create {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| fatal(format!("garage: cannot dup log file handle: {e}")))?;

        let mut cmd = Command::new(binary);
        cmd.arg("-c")
            .arg(&config_path)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("GARAGE_RUST_LOG").unwrap_or_else(|_| "info".to_string()),
            );
        scrub_garage_env(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            fatal(format!(
                "garage: cannot spawn `{} server`: {e}",
                binary.display()
            ))
        })?;

        let mut g = Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region: REGION.to_string(),
            bucket: DEFAULT_BUCKET.to_string(),
            access_key: String::new(),
            secret_key: String::new(),
            child: Mutex::new(child),
            config_path,
            binary: binary.to_path_buf(),
            log_path,
            dir,
        };
        // On any error below `g` is dropped, which kills the server.
        g.setup(s3_port)?;
        Ok(g)
    }

    fn setup(&mut self, s3_port: u16) -> Result<(), StartError> {
        // 1. Wait until the server accepts CLI (RPC) connections.
        let deadline = Instant::now() + RPC_READY_TIMEOUT;
        loop {
            if let Some(e) = self.check_alive("while waiting for the RPC port") {
                return Err(e);
            }
            let last = match self.cli(&["status"]) {
                Ok(_) => break,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(fatal(self.with_log(format!(
                    "garage: server not reachable via `garage status` after {}s; last error: {last}",
                    RPC_READY_TIMEOUT.as_secs()
                ))));
            }
            sleep(Duration::from_millis(250));
        }

        // 2. Layout: give this node a role and apply layout version 1.
        let node_id = self.node_id().map_err(|e| fatal(self.with_log(e)))?;
        self.step(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id])?;
        self.step(&["layout", "apply", "--version", "1"])?;

        // 3. Bucket + key.
        self.step(&["bucket", "create", DEFAULT_BUCKET])?;
        let out = self.step(&["key", "create", KEY_NAME])?;
        let key_id = table_value(&out, "Key ID:")
            .filter(|v| v.starts_with("GK"))
            .ok_or_else(|| {
                fatal(format!(
                    "garage: cannot find `Key ID: GK...` in `garage key create` output:\n{out}"
                ))
            })?;
        let secret = match table_value(&out, "Secret key:")
            .filter(|v| !v.is_empty() && !v.starts_with('('))
        {
            Some(s) => s,
            None => {
                let s = self.step(&["key", "info", &key_id, "--secret-key"])?;
                let s = s.trim().to_string();
                if s.is_empty() || s.starts_with('(') || s.contains(char::is_whitespace) {
                    return Err(fatal(format!(
                        "garage: cannot get the secret of key {key_id}: \
                         `key info --secret-key` printed {s:?}"
                    )));
                }
                s
            }
        };
        self.access_key = key_id;
        self.secret_key = secret;
        self.allow(DEFAULT_BUCKET)?;

        // 4. Wait until the S3 API answers HTTP.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, s3_port));
        let deadline = Instant::now() + S3_READY_TIMEOUT;
        loop {
            if let Some(e) = self.check_alive("while waiting for the S3 API") {
                return Err(e);
            }
            let last = match http_probe(addr) {
                // Re-check the log: if Garage's S3 listener failed to bind,
                // whatever answered is another process.
                Ok(()) => match self.api_listener_failure() {
                    Some(e) => return Err(e),
                    None => return Ok(()),
                },
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(fatal(self.with_log(format!(
                    "garage: S3 API at {addr} did not answer within {}s: {last}",
                    S3_READY_TIMEOUT.as_secs()
                ))));
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// Starts Garage, or returns `None` (test skipped) when it is not installed; under CI
    /// a missing Garage is a failure, since the test command installs it.
    pub fn start_or_skip() -> Option<Garage> {
        if garage_binary().is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "garage is not installed: the test command installs it (scripts/ensure-garage.sh)"
            );
            eprintln!("SKIPPED: garage is not installed; run scripts/ensure-garage.sh");
            return None;
        }
        Some(Garage::start().expect("start garage"))
    }

    /// Creates another bucket, accessible (read/write/owner) by the same key.
    pub fn create_bucket(&self, name: &str) -> Result<(), String> {
        self.step(&["bucket", "create", name])
            .map_err(StartError::into_msg)?;
        self.allow(name).map_err(StartError::into_msg)
    }

    /// Path of the server's combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Excerpt of the server log for diagnostics: panic messages and ERROR
    /// lines, then the last lines.
    pub fn log_tail(&self) -> String {
        log_excerpt(&read_tail(&self.log_path, LOG_SCAN_BYTES))
    }

    /// Options of an S3 store on this Garage's bucket under `prefix` (3 attempts).
    pub fn s3_options(&self, prefix: &str) -> datamover_repo::store::S3Options {
        datamover_repo::store::S3Options {
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
            region: Some(self.region.clone()),
            endpoint: Some(self.endpoint.clone()),
            path_style: true,
            access_key_id: self.access_key.clone(),
            secret_access_key: self.secret_key.clone(),
            max_attempts: 3,
            ..Default::default()
        }
    }

    /// The Garage process id (for measuring its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().ok().map(|c| c.id())
    }

    /// Temp dir holding config, metadata, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn allow(&self, bucket: &str) -> Result<(), StartError> {
        let key = self.access_key.clone();
        self.step(&[
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", &key,
        ])
        .map(|_| ())
    }

    /// Node id: full hex id from `garage node id -q` (`<hex>@<addr>`), or the
    /// 16-hex prefix from the `garage status` table as a fallback.
    fn node_id(&self) -> Result<String, String> {
        let is_hex = |s: &str| s.len() >= 16 && s.chars().all(|c| c.is_ascii_hexdigit());
        let first_err = match self.cli(&["node", "id", "-q"]) {
            Ok(out) => {
                let id = out
                    .lines()
                    .map(str::trim)
                    .find_map(|l| l.split('@').next().filter(|s| is_hex(s)));
                match id {
                    Some(id) => return Ok(id.to_string()),
                    None => format!("unexpected `garage node id -q` output {out:?}"),
                }
            }
            Err(e) => e,
        };
        let out = self.cli(&["status"])?;
        let mut lines = out.lines().skip_while(|l| !l.contains("HEALTHY NODES"));
        let _banner = lines.next();
        let id = lines
            .filter(|l| !l.trim_start().starts_with("ID"))
            .find_map(|l| l.split_whitespace().next().filter(|s| is_hex(s)));
        id.map(str::to_string).ok_or_else(|| {
            format!(
                "garage: cannot determine the node id ({first_err}); `garage status` printed:\n{out}"
            )
        })
    }

    /// Runs a CLI command, retrying (bounded by STEP_TIMEOUT) while it fails,
    /// e.g. while the freshly applied layout propagates.
    fn step(&self, args: &[&str]) -> Result<String, StartError> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(e) = self.check_alive(&format!("during `garage {}`", args.join(" "))) {
                return Err(e);
            }
            let err = match self.cli(args) {
                Ok(out) => return Ok(out),
                Err(e) => e,
            };
            // Retrying can't fix these (and a retried create would hit them).
            let permanent = err.contains("already exists") || err.contains("USAGE");
            if permanent || Instant::now() >= deadline {
                return Err(fatal(err));
            }
            sleep(Duration::from_millis(500));
        }
    }

    /// Runs `garage -c <config> ARGS...` once with a timeout; returns stdout
    /// on exit status 0, otherwise an error with stdout+stderr.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let stamp = random_hex(4);
        let out_path = self.dir.path().join(format!("cli-{stamp}.out"));
        let err_path = self.dir.path().join(format!("cli-{stamp}.err"));
        let shown = format!("garage {}", args.join(" "));
        let result = (|| {
            let out = File::create(&out_path)
                .map_err(|e| format!("`{shown}`: cannot create {}: {e}", out_path.display()))?;
            let err = File::create(&err_path)
                .map_err(|e| format!("`{shown}`: cannot create {}: {e}", err_path.display()))?;
            let mut cmd = Command::new(&self.binary);
            cmd.arg("-c")
                .arg(&self.config_path)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "warn");
            scrub_garage_env(&mut cmd);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot run `{shown}` ({}): {e}", self.binary.display()))?;
            let deadline = Instant::now() + CLI_TIMEOUT;
            let status = loop {
                match child.try_wait() {
                    Ok(Some(st)) => break st,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!(
                            "`{shown}` timed out after {}s; stderr: {}",
                            CLI_TIMEOUT.as_secs(),
                            read_lossy(&err_path).trim()
                        ));
                    }
                    Ok(None) => sleep(POLL),
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!("`{shown}`: wait failed: {e}"));
                    }
                }
            };
            let stdout = read_lossy(&out_path);
            if status.success() {
                Ok(stdout)
            } else {
                Err(format!(
                    "`{shown}` failed ({status}); stdout: {}; stderr: {}",
                    stdout.trim(),
                    read_lossy(&err_path).trim()
                ))
            }
        })();
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&err_path);
        result
    }

    /// If the server process has exited, or its S3 listener failed, returns
    /// an error with a log excerpt.
    fn check_alive(&self, when: &str) -> Option<StartError> {
        if let Some(e) = self.api_listener_failure() {
            return Some(e);
        }
        let polled = self
            .child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .try_wait();
        let status = match polled {
            Ok(Some(st)) => st,
            Ok(None) => return None,
            Err(e) => return Some(fatal(format!("garage: cannot poll server process: {e}"))),
        };
        let log = read_tail(&self.log_path, LOG_SCAN_BYTES);
        let msg = format!(
            "garage server exited ({status}) {when}; log {}:\n{}",
            self.log_path.display(),
            log_excerpt(&log)
        );
        if is_addr_in_use(&log) {
            Some(StartError::PortClash(msg))
        } else {
            Some(fatal(msg))
        }
    }

    /// When the S3 listener can't start (e.g. the port was taken), Garage
    /// logs `ERROR garage::server: S3 API server exited with error: ...` and
    /// stops answering RPCs, but the process does not exit.
    fn api_listener_failure(&self) -> Option<StartError> {
        let log = read_tail(&self.log_path, LOG_SCAN_BYTES);
        let line = log
            .lines()
            .find(|l| l.contains("API server exited with error"))?;
        let msg = format!(
            "garage: API listener failed: {}\n--- garage log ({}) ---\n{}",
            line.trim(),
            self.log_path.display(),
            log_excerpt(&log)
        );
        if is_addr_in_use(line) {
            Some(StartError::PortClash(msg))
        } else {
            Some(fatal(msg))
        }
    }

    fn with_log(&self, msg: String) -> String {
        format!(
            "{msg}\n--- garage log ({}) ---\n{}",
            self.log_path.display(),
            self.log_tail()
        )
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

enum StartError {
    /// The server could not bind a port picked as free: retry with new ports.
    PortClash(String),
    Fatal(String),
}

impl StartError {
    fn into_msg(self) -> String {
        match self {
            StartError::PortClash(m) | StartError::Fatal(m) => m,
        }
    }
}

fn fatal(msg: String) -> StartError {
    StartError::Fatal(msg)
}

/// Picks N distinct free loopback ports (all listeners held at once, then
/// dropped).
fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for p in ports.iter_mut() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| format!("garage: cannot bind 127.0.0.1:0 to pick a port: {e}"))?;
        *p = l
            .local_addr()
            .map_err(|e| format!("garage: cannot read picked port: {e}"))?
            .port();
        listeners.push(l);
    }
    Ok(ports)
}

/// One unauthenticated `GET /` to the S3 port; Ok if any HTTP response comes
/// back (Garage answers 403 AccessDenied).
fn http_probe(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|_| s.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| format!("set timeout: {e}"))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 12];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if buf[..n].starts_with(b"HTTP/1.") {
        Ok(())
    } else {
        Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&buf[..n])
        ))
    }
}

/// Value of a `Label:   value` line in garage's `format_table` output.
fn table_value(out: &str, label: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(|v| v.trim().to_string())
}

/// Removes GARAGE_* variables (GARAGE_RPC_HOST, GARAGE_CONFIG_FILE,
/// GARAGE_RPC_SECRET, GARAGE_LOG_TO_SYSLOG, ...) that would override our config.
fn scrub_garage_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GARAGE_") {
            cmd.env_remove(&k);
        }
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("garage: cannot create {}: {e}", path.display()))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| format!("garage: cannot write {}: {e}", path.display()))
}

fn toml_escape(p: &Path) -> String {
    p.to_string_lossy()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

/// `n` random bytes as hex, from /dev/urandom (fallback: std's RandomState).
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !ok {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Last `max` bytes of a file, lossily decoded.
fn read_tail(p: &Path, max: u64) -> String {
    let mut f = match File::open(p) {
        Ok(f) => f,
        Err(e) => return format!("(cannot open {}: {e})", p.display()),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() || f.read_to_end(&mut buf).is_err()
    {
        return format!("(cannot read {})", p.display());
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Panic message lines and ERROR lines (which a panic backtrace would push
/// out of a plain tail), followed by the last LOG_TAIL_LINES lines.
fn log_excerpt(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut important = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.contains("panicked at") {
            important.extend(lines[i..(i + 2).min(lines.len())].iter().copied());
        } else if l.contains(" ERROR ") {
            important.push(l);
        }
    }
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    important.retain(|l| !tail.contains(l));
    important.truncate(20);
    let mut out = String::new();
    if !important.is_empty() {
        out.push_str(&important.join("\n"));
        out.push_str("\n[...]\n");
    }
    out.push_str(&tail.join("\n"));
    out
}

fn is_addr_in_use(text: &str) -> bool {
    text.contains("Address already in use") || text.contains("os error 98")
}
