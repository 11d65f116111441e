//! kopia, the datamover Kanister ships, where `KOPIA_BIN` names a kopia binary (kopia is
//! not built by this project; see bench/RESULTS.md for how the figures were made). Two
//! rows: `kopia-server`, a repository server on the bench's Garage with a client connected
//! to it over TLS (how Kanister runs it, and the exact peer of our server), and `kopia`,
//! a client straight on the S3 repository. Both repositories use zstd compression, like
//! ours, so the rows compare like for like.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Bench, Res, Sample, measured, with_server};

/// The environment variable naming the kopia binary.
pub(crate) const KOPIA_BIN: &str = "KOPIA_BIN";

/// The kopia binary named by `KOPIA_BIN`, if it runs.
pub(crate) fn binary() -> Option<PathBuf> {
    let bin = PathBuf::from(std::env::var_os(KOPIA_BIN)?);
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bin)
}

/// kopia's version line, for the report.
pub(crate) fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            let v = String::from_utf8_lossy(&o.stdout);
            format!("kopia {}", v.split_whitespace().next().unwrap_or("?"))
        })
        .unwrap_or_default()
}

const REPO_PASSWORD: &str = "bench-password";
const USER: &str = "bench";
const HOST: &str = "benchhost";
const USER_PASSWORD: &str = "bench-user-password";
/// How long the repository server may take to start listening.
const SERVER_START: Duration = Duration::from_secs(60);

/// One kopia repository under a prefix of the bench's bucket, and, for the server row,
/// the repository server in front of it with a client connected to it.
pub(crate) struct Kopia {
    bin: PathBuf,
    dir: PathBuf,
    /// The repository's prefix in the bucket (for the bytes uploaded).
    pub(crate) prefix: String,
    /// The configuration the measured commands use: the server's client, or the
    /// repository's own.
    client_config: PathBuf,
    server: Option<Child>,
}

impl Drop for Kopia {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

impl Kopia {
    /// Creates the repository under `prefix` (zstd compression for every path) and, with
    /// `server`, starts a repository server on it and connects a client.
    pub(crate) fn create(b: &Bench, bin: &Path, prefix: &str, server: bool) -> Res<Kopia> {
        let dir = b.work.join(format!("kopia-{prefix}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut k = Kopia {
            bin: bin.to_path_buf(),
            prefix: prefix.to_string(),
            client_config: dir.join("repository.config"),
            dir,
            server: None,
        };
        let endpoint = b
            .garage
            .endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let cache = k.dir.join("cache");
        let mut c = k.raw("repository.config", REPO_PASSWORD);
        c.args(["repository", "create", "s3", "--no-check-for-updates"])
            .arg(format!("--bucket={}", b.garage.bucket))
            .arg(format!("--prefix={prefix}/"))
            .arg(format!("--endpoint={endpoint}"))
            .arg("--disable-tls")
            .arg(format!("--region={}", b.garage.region))
            .arg(format!("--cache-directory={}", cache.display()))
            .env("AWS_ACCESS_KEY_ID", &b.garage.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &b.garage.secret_key);
        measured(c, "kopia repository create")?;
        let mut c = k.raw("repository.config", REPO_PASSWORD);
        c.args(["policy", "set", "--global", "--compression=zstd"]);
        measured(c, "kopia policy set --compression=zstd")?;
        if server {
            k.start_server()?;
        }
        Ok(k)
    }

    /// kopia with the given configuration file of this repository's directory.
    fn raw(&self, config: &str, password: &str) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg(format!("--config-file={}", self.dir.join(config).display()))
            .arg(format!("--log-dir={}", self.dir.join("logs").display()))
            .env("KOPIA_PASSWORD", password)
            .env("KOPIA_CHECK_FOR_UPDATES", "false")
            .env_remove("AWS_CA_BUNDLE")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }

    /// Adds the bench's user, starts `kopia server start` over TLS (a certificate it
    /// generates) and connects a client pinned to that certificate's fingerprint.
    fn start_server(&mut self) -> Res<()> {
        let mut c = self.raw("repository.config", REPO_PASSWORD);
        c.args(["server", "user", "add", &format!("{USER}@{HOST}")])
            .arg(format!("--user-password={USER_PASSWORD}"));
        measured(c, "kopia server user add")?;
        let port = datamover_tests::free_port();
        let url = format!("https://127.0.0.1:{port}");
        let mut c = self.raw("repository.config", REPO_PASSWORD);
        c.args(["server", "start", "--no-ui", "--tls-generate-cert"])
            .arg("--tls-generate-rsa-key-size=2048")
            .arg(format!("--address={url}"))
            .arg(format!(
                "--tls-cert-file={}",
                self.dir.join("server.crt").display()
            ))
            .arg(format!(
                "--tls-key-file={}",
                self.dir.join("server.key").display()
            ))
            .arg("--server-control-password=bench-control")
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| format!("kopia server start: {e}"))?;
        let stderr = child.stderr.take().ok_or("kopia server start: no stderr")?;
        self.server = Some(child);
        // The fingerprint line comes once the certificate is made; the listener follows.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Bounded by the server's stderr: it ends when the server exits.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(fp) = line.strip_prefix("SERVER CERT SHA256: ") {
                    let _ = tx.send(fp.trim().to_string());
                }
            }
        });
        let fingerprint = rx.recv_timeout(SERVER_START).map_err(|_| {
            format!(
                "kopia server start printed no certificate fingerprint within {} s: see its logs in {}",
                SERVER_START.as_secs(),
                self.dir.join("logs").display()
            )
        })?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > SERVER_START {
                return Err(format!(
                    "kopia server did not listen on {url} within {} s",
                    SERVER_START.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut c = self.raw("client.config", USER_PASSWORD);
        c.args(["repository", "connect", "server", "--no-check-for-updates"])
            .arg(format!("--url={url}"))
            .arg(format!("--server-cert-fingerprint={fingerprint}"))
            .arg(format!("--override-username={USER}"))
            .arg(format!("--override-hostname={HOST}"))
            .arg(format!(
                "--cache-directory={}",
                self.dir.join("client-cache").display()
            ));
        measured(c, "kopia repository connect server")?;
        self.client_config = self.dir.join("client.config");
        Ok(())
    }

    /// A measured kopia command, as the server's client or straight on the repository.
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let password = if self.server.is_some() {
            USER_PASSWORD
        } else {
            REPO_PASSWORD
        };
        let config = self
            .client_config
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("repository.config")
            .to_string();
        let mut c = self.raw(&config, password);
        c.args(args);
        c
    }

    /// The root object of the newest snapshot of `source` (the stream's snapshot is of
    /// the directory the command ran in), for `kopia show <root>/<file>`.
    pub(crate) fn latest_root(&self, source: &Path) -> Res<String> {
        let mut c = self.command(&["snapshot", "list", "--json"]);
        c.arg(source).stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = c
            .output()
            .map_err(|e| format!("kopia snapshot list: {e}"))?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "kopia snapshot list: {e}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        list.as_array()
            .and_then(|v| v.last())
            .and_then(|s| s["rootEntry"]["obj"].as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("kopia has no snapshot of {}", source.display()))
    }

    /// The directory kopia's stream snapshots are made in (their source path).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs a measured command; for the server row, adds the server's CPU and peak RSS
    /// during the run, as for ours.
    pub(crate) fn run(&self, b: &Bench, cmd: Command, what: &str) -> Res<Sample> {
        let pid = self.server.as_ref().map(Child::id);
        with_server(b, &self.prefix, pid, cmd, what)
    }
}
