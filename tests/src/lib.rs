//! # datamover-tests: end-to-end tests of the real binaries
//!
//! Support code for `tests/tests/*.rs` (and the benchmarks): start a real
//! `datamover-server` process on loopback with its `/etc` tree under a temporary
//! `DATAMOVER_ROOT`, on the filesystem store or on a real Garage ([`garage`]), and run the
//! real `datamover-client` binary against it with a per-client credential.
//!
//! The binaries are taken from the cargo target directory this test binary was built
//! into, so `cargo build --workspace --bins` must run first (the test command does).

pub mod blueprint;
pub mod cluster;
pub mod crafted;
pub mod edge;
pub mod faults;
pub mod garage;
pub mod gateway;
pub mod hostile;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use garage::Garage;

/// The directory holding the workspace binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("DATAMOVER_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the test command does)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Writes a file, creating its parent directories.
pub fn write(path: &Path, content: &[u8]) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(path, content).expect("write");
}

/// Where the server keeps its repository.
pub enum Storage<'a> {
    Filesystem,
    S3 {
        garage: &'a Garage,
        bucket: &'a str,
        prefix: &'a str,
    },
}

/// A running `datamover-server`.
pub struct Server {
    pub root: tempfile::TempDir,
    pub port: u16,
    pub http_port: u16,
    pub fingerprint: String,
    /// Extra environment of the server process (kept across restarts).
    pub env: Vec<(String, String)>,
    /// How long [`Server::spawn`] waits for the server to be ready (90 s unless set).
    pub ready_within: Duration,
    child: Option<Child>,
}

impl Server {
    /// Starts a server with a fresh root and the given storage; `clients` are
    /// (id, credential-file content) pairs.
    pub fn start(storage: Storage<'_>, clients: &[(&str, &str)]) -> Server {
        let root = tempfile::tempdir().expect("tempdir");
        Self::start_in(root, storage, clients)
    }

    /// Like [`Server::start`], with `/etc/config/<key>` files.
    pub fn start_configured(
        storage: Storage<'_>,
        clients: &[(&str, &str)],
        config: &[(&str, &str)],
    ) -> Server {
        let root = tempfile::tempdir().expect("tempdir");
        for (k, v) in config {
            write(&root.path().join("etc/config").join(k), v.as_bytes());
        }
        Self::start_in(root, storage, clients)
    }

    pub fn start_in(
        root: tempfile::TempDir,
        storage: Storage<'_>,
        clients: &[(&str, &str)],
    ) -> Server {
        Self::start_in_with_env(root, storage, clients, &[])
    }

    /// Like [`Server::start_in`], with extra environment for the server process.
    pub fn start_in_with_env(
        root: tempfile::TempDir,
        storage: Storage<'_>,
        clients: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Server {
        Self::start_in_within(root, storage, clients, env, Duration::from_secs(90))
    }

    /// Like [`Server::start_in_with_env`], waiting up to `ready_within` for the server to
    /// be ready (at this start and every restart), e.g. for many clients or a large index.
    pub fn start_in_within(
        root: tempfile::TempDir,
        storage: Storage<'_>,
        clients: &[(&str, &str)],
        env: &[(&str, &str)],
        ready_within: Duration,
    ) -> Server {
        let r = root.path();
        write(
            &r.join("etc/secrets/repo/repo-password"),
            b"correct horse battery staple",
        );
        match storage {
            Storage::Filesystem => {}
            Storage::S3 {
                garage,
                bucket,
                prefix,
            } => {
                // Keys the caller configured (an endpoint through a proxy, say) stay.
                for (key, value) in [
                    ("type", "s3"),
                    ("bucket", bucket),
                    ("prefix", prefix),
                    ("endpoint", garage.endpoint.as_str()),
                    ("region", garage.region.as_str()),
                ] {
                    let p = r.join("etc/config").join(key);
                    if !p.exists() {
                        write(&p, value.as_bytes());
                    }
                }
                write(
                    &r.join("etc/secrets/s3/AWS_ACCESS_KEY_ID"),
                    garage.access_key.as_bytes(),
                );
                write(
                    &r.join("etc/secrets/s3/AWS_SECRET_ACCESS_KEY"),
                    garage.secret_key.as_bytes(),
                );
            }
        }
        for (id, cred) in clients {
            write(&r.join("etc/client_credentials").join(id), cred.as_bytes());
        }
        std::fs::create_dir_all(r.join("etc/client_credentials")).expect("mkdir");
        let mut s = Server {
            root,
            port: 0,
            http_port: 0,
            fingerprint: String::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ready_within,
            child: None,
        };
        s.spawn();
        s
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// (Re)starts the process on fresh ports and waits until it is ready.
    pub fn spawn(&mut self) {
        self.port = free_port();
        self.http_port = free_port();
        let data = self.root.path().join("etc/server/data");
        let _ = std::fs::remove_file(&data);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let child = Command::new(bin("datamover-server"))
            .env("DATAMOVER_ROOT", self.root.path())
            .env("PROTOCOLS", format!("datamover-v1:{}", self.port))
            .env("DATAMOVER_LISTEN_HOST", "127.0.0.1")
            .env(
                "DATAMOVER_HTTP_ADDR",
                format!("127.0.0.1:{}", self.http_port),
            )
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn datamover-server");
        self.child = Some(child);
        let deadline = Instant::now() + self.ready_within;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("datamover-server exited with {status}:\n{}", self.log());
            }
            if let Ok(fp) = std::fs::read_to_string(&data)
                && fp.len() == 64
                && self
                    .http_get("/readyz")
                    .is_some_and(|(code, _)| code == 200)
            {
                self.fingerprint = fp;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not ready in {} s:\n{}",
                self.ready_within.as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A plain HTTP GET on the probe port: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let code = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((code, body))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal and waits for the process to end.
    pub fn stop(&mut self, signal: nix::sys::signal::Signal) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn set_client(&self, id: &str, credential: &str) {
        write(
            &self.root.path().join("etc/client_credentials").join(id),
            credential.as_bytes(),
        );
    }

    /// Settings for connecting to this server in-process (pinned to its certificate),
    /// for tests that speak the protocol directly.
    pub fn client_settings(
        &self,
        id: &str,
        credential: &str,
    ) -> datamover_client::settings::ClientSettings {
        datamover_client::settings::ClientSettings {
            host: "127.0.0.1".into(),
            port: self.port,
            pinned: Some(
                datamover_proto::fingerprint::Fingerprint::parse(&self.fingerprint)
                    .expect("the server's fingerprint"),
            ),
            client_id: id.into(),
            credential: credential.into(),
            token_file: None,
            ca_pem: None,
            hostname: "test".into(),
            root: None,
        }
    }

    /// A client environment with credential `credential` for `id`, pinned to this server.
    pub fn client(&self, id: &str, credential: &str) -> Client {
        Client::new(self, id, credential)
    }

    /// The repository directory of a filesystem-store server.
    pub fn repo_dir(&self) -> PathBuf {
        self.root.path().join("var/lib/datamover")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The environment of one client: its own root with `/etc/client-secret/<id>`.
pub struct Client {
    pub root: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Client {
    pub fn new(server: &Server, id: &str, credential: &str) -> Client {
        let root = tempfile::tempdir().expect("tempdir");
        write(
            &root.path().join("etc/client-secret").join(id),
            credential.as_bytes(),
        );
        let env = vec![
            (
                "DATAMOVER_ROOT".to_string(),
                root.path().display().to_string(),
            ),
            (
                "SERVER_URL".to_string(),
                format!("127.0.0.1:{}", server.port),
            ),
            (
                "PROTOCOLS".to_string(),
                format!("datamover-v1:{}", server.port),
            ),
            ("SERVER_DATA".to_string(), server.fingerprint.clone()),
            ("DATAMOVER_PROGRESS".to_string(), "0".to_string()),
            ("DATAMOVER_CONNECT_ATTEMPTS".to_string(), "1".to_string()),
        ];
        Client { root, env }
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("datamover-client"));
        c.args(args).env_clear();
        if let Ok(path) = std::env::var("PATH") {
            c.env("PATH", path);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs the client to completion with no stdin.
    pub fn run(&self, args: &[&str]) -> Run {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run datamover-client");
        Run::from(out)
    }

    /// Runs and asserts success; returns the JSON result.
    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        let r = self.run(args);
        assert!(
            r.success(),
            "datamover-client {args:?} failed: {}\n{}",
            r.code,
            r.stderr
        );
        r.json()
    }
}

/// A finished client run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// The JSON result: the last stdout line.
    pub fn json(&self) -> serde_json::Value {
        let line = self.stdout.lines().last().unwrap_or("");
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line:?}\n{}", self.stderr))
    }
}

/// Makes a named pipe.
pub fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// Starts `sh -c <script>` (e.g. a writer into a named pipe).
pub fn sh(script: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .spawn()
        .expect("sh")
}

/// Total size of the regular files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Compares two trees: same entries, types, contents, modes, mtimes and symlink targets.
pub fn assert_same_tree(a: &Path, b: &Path) {
    use std::os::unix::fs::MetadataExt;
    let list = |root: &Path| -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
                let p = e.path();
                out.push(p.strip_prefix(root).expect("prefix").to_path_buf());
                if e.file_type().expect("type").is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    };
    let la = list(a);
    let lb = list(b);
    assert_eq!(la, lb, "different entries");
    for rel in la {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&pa).expect("lstat"),
            std::fs::symlink_metadata(&pb).expect("lstat"),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", rel.display());
        if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&pa).ok(),
                std::fs::read_link(&pb).ok(),
                "{}",
                rel.display()
            );
            continue;
        }
        assert_eq!(
            ma.mode() & 0o7777,
            mb.mode() & 0o7777,
            "mode of {}",
            rel.display()
        );
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", rel.display());
        assert_eq!(
            ma.mtime_nsec(),
            mb.mtime_nsec(),
            "mtime ns of {}",
            rel.display()
        );
        if ma.is_file() {
            assert!(
                std::fs::read(&pa).ok() == std::fs::read(&pb).ok(),
                "content of {}",
                rel.display()
            );
        }
    }
}
