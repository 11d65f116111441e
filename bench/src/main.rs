//! # datamover-bench
//!
//! Runs datamover, restic, rustic (where installed), rclone and kopia (where `KOPIA_BIN`
//! names it: [`kopia`]) side by side against one Garage on loopback, on the same
//! deterministic data, alternating the tools' order between repetitions, and prints
//! medians and ratios (ours / theirs). Started by `scripts/bench.sh`, which builds the
//! release binaries and installs the other tools and Garage when missing.
//!
//! Modules: [`cli`] (the command line), [`data`] (the data sets), [`measure`] (one run's
//! wall, CPU and memory), [`report`] (the tables), [`verify`] (each restore against its
//! source), [`sync`] (edge sync against rclone), [`browse`] (file-level access against
//! restic), [`kopia`] (kopia's two rows), [`gateway`] (rclone through our S3 gateway),
//! [`index_scale`] (the chunk index at millions of chunks, `datamover-bench index-scale`).
//!
//! Measured per run: wall time; CPU time (user + system, from `wait4`) of the tool's
//! process and, for datamover, of the server during the run; Garage's CPU time during
//! the run; peak RSS of each process (sampled `VmHWM`; for the long-running server,
//! reset before each run); bytes added to the bucket under the tool's prefix. Before
//! each run the bench flushes dirty data and waits until the file system creates files
//! at its normal speed ([`Bench::quiesce`]). After each timed restore, untimed, the
//! restored tree or stream is checked against its source ([`verify`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use datamover_tests::{Garage, Server, Storage};
use rand::SeedableRng;

mod browse;
mod cli;
mod data;
mod faults;
mod fleet;
mod gateway;
mod index_scale;
mod kopia;
mod measure;
mod report;
mod sync;
mod verify;

use data::{change_one_percent, du_bytes, half_compressible, list_files, make_many, make_mixed};
use measure::{keep_logs_dir, measured, median, proc_cpu, proc_hwm_mib, reset_hwm};
use report::report;

type Res<T> = Result<T, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tool {
    Datamover,
    Restic,
    Rustic,
    Rclone,
    /// kopia's repository server with a client connected to it.
    KopiaServer,
    /// kopia's client straight on the S3 repository.
    Kopia,
}

impl Tool {
    const ALL: [Tool; 6] = [
        Tool::Datamover,
        Tool::Restic,
        Tool::Rustic,
        Tool::Rclone,
        Tool::KopiaServer,
        Tool::Kopia,
    ];

    fn name(self) -> &'static str {
        match self {
            Tool::Datamover => "datamover",
            Tool::Restic => "restic",
            Tool::Rustic => "rustic",
            Tool::Rclone => "rclone",
            Tool::KopiaServer => "kopia-server",
            Tool::Kopia => "kopia",
        }
    }

    fn from_name(name: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the tool's runs also measure a server process (ours, kopia's).
    fn has_server(self) -> bool {
        matches!(self, Tool::Datamover | Tool::KopiaServer)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    First,
    Unchanged,
    Changed,
    Restore,
    StreamBackup,
    StreamRestore,
    SyncFirst,
    SyncUnchanged,
    SyncDownload,
    GatewayUpload,
    GatewayDownload,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::First => "first full backup",
            Scenario::Unchanged => "unchanged re-backup",
            Scenario::Changed => "backup after 1% of files changed",
            Scenario::Restore => "full restore",
            Scenario::StreamBackup => "stream backup (named pipe)",
            Scenario::StreamRestore => "stream restore",
            Scenario::SyncFirst => "first sync to the bucket",
            Scenario::SyncUnchanged => "unchanged sync pass",
            Scenario::SyncDownload => "download into an empty directory",
            Scenario::GatewayUpload => "rclone copy into a bucket (16 transfers)",
            Scenario::GatewayDownload => "rclone copy out of the bucket (16 transfers)",
        }
    }
}

/// One measured run.
#[derive(Clone, Copy, Default, Debug)]
struct Sample {
    wall: f64,
    cpu: f64,
    rss_mib: f64,
    server_cpu: f64,
    server_rss_mib: f64,
    /// CPU time of the S3 server (Garage) during the run.
    store_cpu: f64,
    uploaded_mib: f64,
    /// Our server's pack reads (GETs) during the run, from its `/metrics`.
    pack_reads: f64,
}

// ---------------------------------------------------------------------------------------
// The tools.

struct Bench {
    garage: Garage,
    work: PathBuf,
    rclone_env: Vec<(String, String)>,
    results: BTreeMap<(String, Scenario, Tool), Vec<Sample>>,
    floors: BTreeMap<String, (f64, f64)>,
    /// Whether the page cache was dropped before every run (`None` before the first).
    caches_dropped: std::cell::Cell<Option<bool>>,
    /// The tools to run (`--tools`), all by default.
    tools: Vec<Tool>,
    /// kopia, where `KOPIA_BIN` names it.
    kopia_bin: Option<PathBuf>,
    /// Trees restored or downloaded in this data set, moved aside until it is done.
    trash: std::cell::Cell<usize>,
    /// Probe directories made by [`Bench::quiesce`].
    probes: std::cell::Cell<usize>,
    /// Each restore checked against its source (untimed), by data set and tool: the
    /// files and links compared, or what differed.
    verified: BTreeMap<(String, Tool), Vec<Result<usize, String>>>,
}

/// Files created by one probe of [`Bench::quiesce`], and the time they may take.
const PROBE_FILES: usize = 5000;
const PROBE_SLOW: std::time::Duration = std::time::Duration::from_millis(600);
/// Probes before giving up waiting (30 s apart).
const PROBE_ATTEMPTS: usize = 12;

impl Bench {
    /// Moves a restored tree or a finished data set aside; the trash is deleted when the
    /// bench is done, so no measured run follows a large deletion (see [`Bench::quiesce`]).
    fn discard(&self, p: &Path) {
        if !p.exists() {
            return;
        }
        let n = self.trash.get();
        self.trash.set(n + 1);
        let dir = self.work.join("trash");
        let _ = std::fs::create_dir_all(&dir);
        if std::fs::rename(p, dir.join(n.to_string())).is_err() {
            let _ = std::fs::remove_dir_all(p);
        }
    }

    fn empty_trash(&self) {
        let _ = std::fs::remove_dir_all(self.work.join("trash"));
    }

    /// Creates [`PROBE_FILES`] small files in a new directory of the work dir (kept in
    /// the trash); returns how long that took.
    fn probe(&self) -> Res<std::time::Duration> {
        let n = self.probes.get();
        self.probes.set(n + 1);
        let dir = self.work.join(format!("probe-{n}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let t = Instant::now();
        for i in 0..PROBE_FILES {
            std::fs::write(dir.join(format!("f{i}")), b"probe").map_err(|e| e.to_string())?;
        }
        let took = t.elapsed();
        self.discard(&dir);
        Ok(took)
    }

    /// Called before every measured run: flushes what earlier runs left dirty (so no
    /// tool pays for another's writeback), then waits until creating files runs at its
    /// normal speed. On ext4 without a journal (as on the machine of RESULTS.md) the
    /// inode allocator skips inodes deleted in the last 60 s (360 s while their inode
    /// table block is dirty), checking every free inode from the start of the group,
    /// so creating files after a large deletion (by anything on the machine) is many
    /// times slower, most of all for the first tool that creates files: measured there,
    /// 50,000 files took 36.7 s, then 20.3 s, then 2.0 s when created three times in a
    /// row right after deleting 100,000. The bench itself deletes nothing until the end.
    ///
    /// Then, where the bench may (as root), it drops the page cache, so every tool starts
    /// cold: it reads its source files and Garage its data from disk, and no tool's run
    /// pays the kernel's reclaim of pages another tool left behind. With one repetition
    /// the first tool of a data set would otherwise be the only one to read it cold.
    fn quiesce(&self) -> Res<()> {
        // SAFETY: sync(2) has no arguments and cannot fail.
        unsafe { libc::sync() };
        let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
        self.caches_dropped.set(
            self.caches_dropped
                .get()
                .map_or(Some(dropped), |d| Some(d && dropped)),
        );
        for attempt in 1..=PROBE_ATTEMPTS {
            let took = self.probe()?;
            if took < PROBE_SLOW {
                return Ok(());
            }
            eprintln!(
                "  (creating {PROBE_FILES} files took {:.1} s: waiting for the file system to settle, {attempt}/{PROBE_ATTEMPTS})",
                took.as_secs_f64()
            );
            std::thread::sleep(std::time::Duration::from_secs(30));
            // SAFETY: as above.
            unsafe { libc::sync() };
        }
        eprintln!("  (measuring anyway: the file system is still slow to create files)");
        Ok(())
    }

    fn store_cpu(&self) -> f64 {
        self.garage.pid().map_or(0.0, proc_cpu)
    }
}

impl Bench {
    /// The tools in the order of this repetition (reversed on odd ones), for a data set
    /// that may exclude some.
    fn order(&self, rep: usize, exclude: &[Tool]) -> Vec<Tool> {
        let mut v: Vec<Tool> = Tool::ALL
            .into_iter()
            .filter(|t| self.tools.contains(t) && !exclude.contains(t))
            .collect();
        if !rep.is_multiple_of(2) {
            v.reverse();
        }
        v
    }
}

impl Bench {
    /// A kopia repository for each kopia row in `order` (the server row's with its
    /// server started and a client connected).
    fn kopia_repos(
        &self,
        order: &[Tool],
        ds: &str,
        rep: usize,
    ) -> Res<BTreeMap<Tool, kopia::Kopia>> {
        let mut out = BTreeMap::new();
        for (tool, server, name) in [
            (Tool::KopiaServer, true, "kopiaserver"),
            (Tool::Kopia, false, "kopia"),
        ] {
            if !order.contains(&tool) {
                continue;
            }
            let bin = self
                .kopia_bin
                .as_deref()
                .ok_or("kopia rows asked for, but KOPIA_BIN names no kopia binary")?;
            let prefix = format!("{ds}-{name}-{rep}");
            out.insert(tool, kopia::Kopia::create(self, bin, &prefix, server)?);
        }
        Ok(out)
    }

    fn rclone(&self, args: &[&str]) -> Command {
        let mut c = Command::new("rclone");
        c.args(args)
            .envs(self.rclone_env.iter().map(|(k, v)| (k, v)));
        // Garage on loopback is plain HTTP; a CA bundle from the environment only breaks it.
        c.env_remove("AWS_CA_BUNDLE");
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c
    }

    /// Bytes stored under a prefix of the bucket.
    fn stored(&self, prefix: &str) -> f64 {
        let out = self
            .rclone(&[
                "size",
                "--json",
                &format!("garage:{}/{prefix}", self.garage.bucket),
            ])
            .stdout(Stdio::piped())
            .output();
        out.ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["bytes"].as_f64())
            .unwrap_or(0.0)
    }

    fn restic(&self, prefix: &str, args: &[&str]) -> Command {
        let mut c = Command::new("restic");
        let cache = self.work.join("restic-cache");
        c.args([
            "-o",
            "s3.region=garage",
            "-o",
            "s3.bucket-lookup=path",
            "-q",
            "--cache-dir",
        ])
        .arg(cache)
        .args(args)
        .env(
            "RESTIC_REPOSITORY",
            format!(
                "s3:{}/{}/{prefix}",
                self.garage.endpoint, self.garage.bucket
            ),
        )
        .env("RESTIC_PASSWORD", "bench-password")
        .env("AWS_ACCESS_KEY_ID", &self.garage.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &self.garage.secret_key)
        .env_remove("AWS_CA_BUNDLE")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        c
    }

    /// rustic with a profile for the repository under `prefix` (rustic takes its S3
    /// settings from a profile; the profile is written next to the work files).
    fn rustic(&self, prefix: &str, args: &[&str]) -> Res<Command> {
        let profile = format!("rustic-{prefix}");
        let path = self.work.join(format!("{profile}.toml"));
        if !path.exists() {
            let toml = format!(
                "[repository]\nrepository = \"opendal:s3\"\npassword = \"bench-password\"\ncache-dir = \"{cache}\"\n\n\
                 [repository.options]\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\nroot = \"/{prefix}\"\n\
                 region = \"{region}\"\naccess_key_id = \"{key}\"\nsecret_access_key = \"{secret}\"\n",
                cache = self.work.join("rustic-cache").display(),
                endpoint = self.garage.endpoint,
                bucket = self.garage.bucket,
                region = self.garage.region,
                key = self.garage.access_key,
                secret = self.garage.secret_key,
            );
            std::fs::write(&path, toml).map_err(|e| e.to_string())?;
        }
        let mut c = Command::new("rustic");
        c.current_dir(&self.work)
            .args(["-P", &profile, "--no-progress", "--log-level", "warn"])
            .args(args)
            .env_remove("AWS_CA_BUNDLE")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        Ok(c)
    }

    /// Records the check of one restore (see [`verify`]).
    fn checked(&mut self, ds: &str, tool: Tool, r: Result<usize, String>) {
        match &r {
            Ok(n) => eprintln!(
                "  {:<10} restore checked: {n} entries as in the source (files and links)",
                tool.name()
            ),
            Err(e) => eprintln!("  {:<10} RESTORE DIFFERS from the source: {e}", tool.name()),
        }
        self.verified
            .entry((ds.to_string(), tool))
            .or_default()
            .push(r);
    }

    fn record(&mut self, ds: &str, sc: Scenario, tool: Tool, s: Sample) {
        eprintln!(
            "  {:<10} {:<34} wall {:>7.2}s cpu {:>7.2}s rss {:>6.0} MiB{} garage cpu {:>6.2}s up {:>8.1} MiB",
            tool.name(),
            sc.name(),
            s.wall,
            s.cpu,
            s.rss_mib,
            if tool == Tool::Datamover {
                format!(
                    " (server cpu {:.2}s rss {:.0} MiB, {} pack GETs)",
                    s.server_cpu, s.server_rss_mib, s.pack_reads
                )
            } else if tool.has_server() {
                format!(
                    " (server cpu {:.2}s rss {:.0} MiB)",
                    s.server_cpu, s.server_rss_mib
                )
            } else {
                String::new()
            },
            s.store_cpu,
            s.uploaded_mib
        );
        self.results
            .entry((ds.to_string(), sc, tool))
            .or_default()
            .push(s);
    }
}

/// A datamover server with its own repository prefix, plus a client.
struct Ours {
    server: Server,
    client: datamover_tests::Client,
    prefix: String,
}

impl Ours {
    /// Our server on the bench's Garage under `prefix`, and its client.
    fn start(b: &Bench, prefix: String) -> Ours {
        let server = Server::start(
            Storage::S3 {
                garage: &b.garage,
                bucket: &b.garage.bucket,
                prefix: &prefix,
            },
            &[("bench", "bench-token")],
        );
        Ours {
            client: server.client("bench", "bench-token"),
            server,
            prefix,
        }
    }

    /// Pack reads the server made so far.
    fn pack_reads(&self) -> f64 {
        let Some((200, text)) = self.server.http_get("/metrics") else {
            return 0.0;
        };
        text.lines()
            .filter(|l| {
                l.starts_with("datamover_store_requests_total{")
                    && l.contains("operation=\"read\"")
                    && l.contains("type=\"data\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn run(&self, b: &Bench, args: &[&str], stdout: Stdio) -> Res<Sample> {
        let reads0 = self.pack_reads();
        let mut cmd = self.client.command(args);
        cmd.stdin(Stdio::null()).stdout(stdout);
        let what = format!("datamover-client {args:?}");
        let mut s = with_server(b, &self.prefix, self.server.pid(), cmd, &what)?;
        if let Some(dir) = keep_logs_dir() {
            let _ = std::fs::write(dir.join("server.log"), self.server.log());
        }
        s.pack_reads = self.pack_reads() - reads0;
        Ok(s)
    }
}

fn simple(b: &Bench, prefix: &str, cmd: Command, what: &str) -> Res<Sample> {
    with_server(b, prefix, None, cmd, what)
}

/// One measured run of `cmd` (bytes added under `prefix`, Garage's CPU); with `server`,
/// also that process's CPU and peak memory during the run (its high-water mark reset
/// before it).
fn with_server(
    b: &Bench,
    prefix: &str,
    server: Option<u32>,
    cmd: Command,
    what: &str,
) -> Res<Sample> {
    let up0 = b.stored(prefix);
    b.quiesce()?;
    if let Some(pid) = server {
        reset_hwm(pid);
    }
    let cpu0 = server.map_or(0.0, proc_cpu);
    let store0 = b.store_cpu();
    let (wall, cpu, rss) = measured(cmd, what)?;
    Ok(Sample {
        wall,
        cpu,
        rss_mib: rss,
        server_cpu: server.map_or(0.0, proc_cpu) - cpu0,
        server_rss_mib: server.map_or(0.0, proc_hwm_mib),
        store_cpu: b.store_cpu() - store0,
        uploaded_mib: (b.stored(prefix) - up0) / 1048576.0,
        pack_reads: 0.0,
    })
}

/// Runs `f` while a writer process feeds `fifo` from `source`.
fn with_fifo_writer<T>(fifo: &Path, source: &Path, f: impl FnOnce() -> Res<T>) -> Res<T> {
    let _ = std::fs::remove_file(fifo);
    nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| e.to_string())?;
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!("cat '{}' > '{}'", source.display(), fifo.display()))
        .spawn()
        .map_err(|e| e.to_string())?;
    let r = f();
    let _ = writer.wait();
    r
}

fn tree_scenarios(
    b: &mut Bench,
    ds: &str,
    src: &Path,
    files: &mut [PathBuf],
    rep: usize,
    mutable: bool,
    exclude: &[Tool],
) -> Res<()> {
    let order = b.order(rep, exclude);
    let tag = ds.to_string();
    let dm_prefix = format!("{ds}-dm-{rep}");
    let ours = Ours::start(b, dm_prefix.clone());
    let restic_prefix = format!("{ds}-restic-{rep}");
    let rustic_prefix = format!("{ds}-rustic-{rep}");
    let rclone_prefix = format!("{ds}-rclone-{rep}");
    let kopia = b.kopia_repos(&order, ds, rep)?;
    if order.contains(&Tool::Restic) {
        measured(b.restic(&restic_prefix, &["init"]), "restic init")?;
    }
    if order.contains(&Tool::Rustic) {
        measured(b.rustic(&rustic_prefix, &["init"])?, "rustic init")?;
    }
    let src_s = src.to_str().ok_or("path")?.to_string();
    let remote = format!("garage:{}/{rclone_prefix}", b.garage.bucket);
    let rclone_copy = |b: &Bench| {
        let mut c = b.rclone(&["copy", "--links", &src_s, &remote]);
        c.stderr(Stdio::null());
        c
    };
    let mut source: Option<verify::Tree> = None;
    for sc in [
        Scenario::First,
        Scenario::Unchanged,
        Scenario::Changed,
        Scenario::Restore,
    ] {
        if sc == Scenario::Restore {
            // What every restore is checked against (read after the timed backups).
            source = Some(verify::digest(src)?);
        }
        if sc == Scenario::Changed {
            if mutable {
                change_one_percent(files, 1000 + rep as u64)?;
            } else {
                continue;
            }
        }
        for &tool in &order {
            // A restore goes into a fresh directory, set aside afterwards.
            let restore = sc == Scenario::Restore;
            let out = b.work.join(format!("restore-{}", tool.name()));
            let out_s = out.to_str().ok_or("path")?;
            if restore {
                b.discard(&out);
            }
            let s = match (tool, restore) {
                (Tool::Datamover, true) => {
                    ours.run(b, &["restore_files", out_s, &tag], Stdio::null())?
                }
                (Tool::Datamover, false) => {
                    ours.run(b, &["backup_files", &src_s, &tag], Stdio::null())?
                }
                (Tool::Restic, true) => simple(
                    b,
                    &restic_prefix,
                    b.restic(&restic_prefix, &["restore", "latest", "--target", out_s]),
                    "restic restore",
                )?,
                (Tool::Restic, false) => simple(
                    b,
                    &restic_prefix,
                    b.restic(&restic_prefix, &["backup", &src_s]),
                    "restic backup",
                )?,
                (Tool::Rustic, true) => simple(
                    b,
                    &rustic_prefix,
                    b.rustic(&rustic_prefix, &["restore", "latest", out_s])?,
                    "rustic restore",
                )?,
                (Tool::Rustic, false) => simple(
                    b,
                    &rustic_prefix,
                    b.rustic(&rustic_prefix, &["backup", &src_s])?,
                    "rustic backup",
                )?,
                (Tool::Rclone, true) => {
                    let mut c = b.rclone(&["copy", "--links", &remote, out_s]);
                    c.stderr(Stdio::null());
                    simple(b, &rclone_prefix, c, "rclone copy back")?
                }
                (Tool::Rclone, false) => simple(b, &rclone_prefix, rclone_copy(b), "rclone copy")?,
                (Tool::KopiaServer | Tool::Kopia, _) => {
                    let k = kopia.get(&tool).ok_or("kopia repository missing")?;
                    let (args, what): (Vec<&str>, _) = if restore {
                        (vec!["restore", &src_s, out_s], "kopia restore")
                    } else {
                        (vec!["snapshot", "create", &src_s], "kopia snapshot create")
                    };
                    k.run(b, k.command(&args), what)?
                }
            };
            if let (true, Some(want)) = (restore, &source) {
                let got = verify::digest(&verify::restored_root(&out, src));
                b.checked(ds, tool, got.and_then(|got| verify::compare(want, &got)));
                b.discard(&out);
            }
            b.record(ds, sc, tool, s);
        }
    }
    // The floor: uploading datamover's compressed, encrypted bytes alone (rep 0 only).
    if rep == 0 && b.tools.contains(&Tool::Rclone) && !exclude.contains(&Tool::Rclone) {
        let local = b.work.join("floor");
        let _ = std::fs::remove_dir_all(&local);
        let mut c = b.rclone(&[
            "copy",
            &format!("garage:{}/{dm_prefix}", b.garage.bucket),
            local.to_str().ok_or("path")?,
        ]);
        c.stderr(Stdio::null());
        measured(c, "rclone download of the datamover repository")?;
        let bytes = du_bytes(&local) as f64 / 1048576.0;
        let mut c = b.rclone(&[
            "copy",
            "--transfers",
            "8",
            local.to_str().ok_or("path")?,
            &format!("garage:{}/{ds}-floor", b.garage.bucket),
        ]);
        c.stderr(Stdio::null());
        let (wall, _, _) = measured(c, "floor upload")?;
        b.floors.insert(ds.to_string(), (bytes, wall));
        b.discard(&local);
    }
    Ok(())
}

fn stream_scenarios(b: &mut Bench, source: &Path, rep: usize) -> Res<()> {
    let ds = "stream";
    let order = b.order(rep, &[]);
    let dm_prefix = format!("stream-dm-{rep}");
    let ours = Ours::start(b, dm_prefix);
    let restic_prefix = format!("stream-restic-{rep}");
    let rustic_prefix = format!("stream-rustic-{rep}");
    let rclone_prefix = format!("stream-rclone-{rep}");
    let kopia = b.kopia_repos(&order, ds, rep)?;
    if order.contains(&Tool::Restic) {
        measured(b.restic(&restic_prefix, &["init"]), "restic init")?;
    }
    if order.contains(&Tool::Rustic) {
        measured(b.rustic(&rustic_prefix, &["init"])?, "rustic init")?;
    }
    let fifo = b.work.join("bench.fifo");
    let object = format!("garage:{}/{rclone_prefix}/dump.sql", b.garage.bucket);
    // The other tools' stream restore, to stdout (null unless set).
    let dump = |b: &Bench, tool: Tool| -> Res<Command> {
        Ok(match tool {
            Tool::Restic => b.restic(&restic_prefix, &["dump", "latest", "/dump.sql"]),
            Tool::Rustic => b.rustic(&rustic_prefix, &["dump", "latest:dump.sql"])?,
            Tool::Rclone => b.rclone(&["cat", &object]),
            Tool::KopiaServer | Tool::Kopia => {
                let k = kopia.get(&tool).ok_or("kopia repository missing")?;
                let root = k.latest_root(k.dir())?;
                k.command(&["show", &format!("{root}/dump.sql")])
            }
            Tool::Datamover => return Err("datamover restores through its server".into()),
        })
    };
    for sc in [Scenario::StreamBackup, Scenario::StreamRestore] {
        for &tool in &order {
            let s = match (tool, sc) {
                (Tool::Datamover, Scenario::StreamBackup) => {
                    with_fifo_writer(&fifo, source, || {
                        ours.run(
                            b,
                            &["backup_stream", fifo.to_str().ok_or("path")?, "dump"],
                            Stdio::null(),
                        )
                    })?
                }
                (Tool::Datamover, _) => {
                    ours.run(b, &["restore_stream", "-", "dump"], Stdio::null())?
                }
                (Tool::Restic, Scenario::StreamBackup) => with_fifo_writer(&fifo, source, || {
                    let mut c = b.restic(
                        &restic_prefix,
                        &["backup", "--stdin", "--stdin-filename", "dump.sql"],
                    );
                    c.stdin(File::open(&fifo).map_err(|e| e.to_string())?);
                    simple(b, &restic_prefix, c, "restic backup --stdin")
                })?,
                (Tool::Restic, _) => simple(b, &restic_prefix, dump(b, tool)?, "restic dump")?,
                (Tool::Rustic, Scenario::StreamBackup) => with_fifo_writer(&fifo, source, || {
                    let mut c = b.rustic(
                        &rustic_prefix,
                        &["backup", "-", "--stdin-filename", "dump.sql"],
                    )?;
                    c.stdin(File::open(&fifo).map_err(|e| e.to_string())?);
                    simple(b, &rustic_prefix, c, "rustic backup -")
                })?,
                (Tool::Rustic, _) => simple(b, &rustic_prefix, dump(b, tool)?, "rustic dump")?,
                (Tool::Rclone, Scenario::StreamBackup) => with_fifo_writer(&fifo, source, || {
                    let mut c = b.rclone(&["rcat", &object]);
                    c.stdin(File::open(&fifo).map_err(|e| e.to_string())?);
                    simple(b, &rclone_prefix, c, "rclone rcat")
                })?,
                (Tool::Rclone, _) => simple(b, &rclone_prefix, dump(b, tool)?, "rclone cat")?,
                (Tool::KopiaServer | Tool::Kopia, Scenario::StreamBackup) => {
                    let k = kopia.get(&tool).ok_or("kopia repository missing")?;
                    with_fifo_writer(&fifo, source, || {
                        let mut c =
                            k.command(&["snapshot", "create", "--stdin-file=dump.sql", "-"]);
                        c.stdin(File::open(&fifo).map_err(|e| e.to_string())?);
                        k.run(b, c, "kopia snapshot create --stdin-file")
                    })?
                }
                (Tool::KopiaServer | Tool::Kopia, _) => {
                    let k = kopia.get(&tool).ok_or("kopia repository missing")?;
                    let c = dump(b, tool)?;
                    k.run(b, c, "kopia show")?
                }
            };
            b.record(ds, sc, tool, s);
        }
    }
    // Each tool's restore once more, untimed, into a file checked against the source.
    let want = File::open(source)
        .and_then(verify::hash)
        .map_err(|e| format!("{}: {e}", source.display()))?;
    let check = b.work.join("stream-check");
    for &tool in &order {
        let sink = || File::create(&check).map_err(|e| format!("{}: {e}", check.display()));
        if tool == Tool::Datamover {
            ours.run(b, &["restore_stream", "-", "dump"], Stdio::from(sink()?))?;
        } else {
            let mut c = dump(b, tool)?;
            c.stdout(sink()?);
            measured(c, &format!("{} stream restore (check)", tool.name()))?;
        }
        let got = File::open(&check)
            .and_then(verify::hash)
            .map_err(|e| format!("{}: {e}", check.display()))?;
        let r = if got == want {
            Ok(1)
        } else {
            Err(format!(
                "{} bytes restored against {} in the source, or other bytes",
                got.0, want.0
            ))
        };
        b.checked(ds, tool, r);
        let _ = std::fs::remove_file(&check);
    }
    Ok(())
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("datamover-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Res<()> {
    let cli = <cli::Cli as clap::Parser>::parse();
    if let Some(cli::Scenario::Faults { .. }) = &cli.command {
        return faults::from_cli(&cli);
    }
    if let Some(cli::Scenario::IndexScale {
        chunks,
        seconds,
        sessions,
        label,
        ready_timeout,
    }) = &cli.command
    {
        crate::measure::use_binaries_beside_this_one();
        let work = cli.work.clone().unwrap_or_else(std::env::temp_dir);
        let opts = index_scale::IndexScaleOptions {
            chunks: chunks.clone(),
            seconds: *seconds,
            sessions: usize::from(*sessions),
            ready_within: std::time::Duration::from_secs(*ready_timeout),
        };
        let figures = index_scale::run(&work, &opts)?;
        let text = index_scale::report(&figures, label);
        println!("{text}");
        if let Some(o) = &cli.output {
            std::fs::write(o, &text).map_err(|e| format!("writing {}: {e}", o.display()))?;
        }
        return Ok(());
    }
    if let Some(cli::Scenario::Fleet { .. }) = &cli.command {
        return fleet::from_cli(&cli);
    }
    let reps = usize::from(cli.reps);
    let scale = cli.scale;
    let stream_mib = cli.stream_mib;
    let output = cli.output.clone();
    let skip_tree = cli.no_toolchain;
    let datasets = cli.datasets.clone();
    let want = |d: &str| datasets.iter().any(|x| x == d);
    // rustic joins by default where it is installed (`cargo install rustic-rs`).
    let rustic_installed = Command::new("rustic")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // kopia joins by default where KOPIA_BIN names it.
    let kopia_bin = kopia::binary();
    let kopia_named = |t: &str| t == "kopia" || t == "kopia-server";
    if kopia_bin.is_none() {
        if cli.tools.iter().flatten().any(|t| kopia_named(t)) {
            return Err(format!(
                "--tools names kopia, but {} does not name a kopia binary that runs: set it to one",
                kopia::KOPIA_BIN
            ));
        }
        eprintln!(
            "kopia: {} does not name a kopia binary: the kopia rows are left out",
            kopia::KOPIA_BIN
        );
    }
    let tools: Vec<Tool> = cli
        .tools
        .clone()
        .unwrap_or_else(|| {
            cli::TOOLS
                .iter()
                .filter(|t| **t != "rustic" || rustic_installed)
                .filter(|t| !kopia_named(t) || kopia_bin.is_some())
                .map(|t| t.to_string())
                .collect()
        })
        .iter()
        .filter_map(|t| Tool::from_name(t))
        .collect();
    let many_files = cli.many_files;
    let many_reps = cli.many_reps;
    let work_dir = cli.work.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&work_dir).map_err(|e| e.to_string())?;

    eprintln!("starting Garage");
    let garage = Garage::start()?;
    let rclone_env = vec![
        ("RCLONE_CONFIG_GARAGE_TYPE".to_string(), "s3".to_string()),
        (
            "RCLONE_CONFIG_GARAGE_PROVIDER".to_string(),
            "Other".to_string(),
        ),
        (
            "RCLONE_CONFIG_GARAGE_ENDPOINT".to_string(),
            garage.endpoint.clone(),
        ),
        (
            "RCLONE_CONFIG_GARAGE_REGION".to_string(),
            garage.region.clone(),
        ),
        (
            "RCLONE_CONFIG_GARAGE_ACCESS_KEY_ID".to_string(),
            garage.access_key.clone(),
        ),
        (
            "RCLONE_CONFIG_GARAGE_SECRET_ACCESS_KEY".to_string(),
            garage.secret_key.clone(),
        ),
        (
            "RCLONE_CONFIG_GARAGE_FORCE_PATH_STYLE".to_string(),
            "true".to_string(),
        ),
    ];
    let mut b = Bench {
        garage,
        work: work.path().to_path_buf(),
        rclone_env,
        results: BTreeMap::new(),
        floors: BTreeMap::new(),
        caches_dropped: std::cell::Cell::new(None),
        tools,
        kopia_bin: kopia_bin.clone(),
        trash: std::cell::Cell::new(0),
        probes: std::cell::Cell::new(0),
        verified: BTreeMap::new(),
    };

    let checkpoint = |b: &Bench| {
        if let Some(o) = &output {
            let _ = std::fs::write(o, report(b, "(partial: the run is still going)\n"));
        }
    };
    let (mut mixed_bytes, mut mixed_count) = (0, 0);
    if want("mixed") {
        eprintln!("generating data set (a) mixed, scale {scale}");
        let mixed = work.path().join("mixed");
        let mut mixed_files = make_mixed(&mixed, 42, scale)?;
        mixed_bytes = du_bytes(&mixed);
        mixed_count = mixed_files.len();
        for rep in 0..reps {
            eprintln!("mixed: repetition {}", rep + 1);
            tree_scenarios(&mut b, "mixed", &mixed, &mut mixed_files, rep, true, &[])?;
            checkpoint(&b);
        }
        b.discard(&mixed);
    }

    let sysroot = String::from_utf8_lossy(
        &Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
            .map_err(|e| e.to_string())?
            .stdout,
    )
    .trim()
    .to_string();
    let mut tree_desc = String::from("skipped");
    if !skip_tree && want("toolchain") && !sysroot.is_empty() {
        let tree = PathBuf::from(&sysroot);
        let mut files = list_files(&tree);
        tree_desc = format!(
            "{} ({} files, {:.0} MiB)",
            tree.display(),
            files.len(),
            du_bytes(&tree) as f64 / 1048576.0
        );
        for rep in 0..reps {
            eprintln!("toolchain: repetition {}", rep + 1);
            tree_scenarios(&mut b, "toolchain", &tree, &mut files, rep, false, &[])?;
            checkpoint(&b);
        }
    }

    if want("stream") {
        eprintln!("generating data set (c) a {stream_mib} MiB stream");
        let stream = work.path().join("stream.sql");
        {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut f = File::create(&stream).map_err(|e| e.to_string())?;
            for _ in 0..stream_mib {
                f.write_all(&half_compressible(&mut rng, 1024 * 1024))
                    .map_err(|e| e.to_string())?;
            }
        }
        for rep in 0..reps {
            eprintln!("stream: repetition {}", rep + 1);
            stream_scenarios(&mut b, &stream, rep)?;
            checkpoint(&b);
        }
        let _ = std::fs::remove_file(&stream);
    }

    // (d) for scale: rclone is left out (one PUT per file: hours for a million files).
    let mut many_desc = String::from("skipped");
    if want("many") {
        eprintln!("generating data set (d) {many_files} small files");
        let many = work.path().join("many");
        let mut files = make_many(&many, 99, many_files)?;
        many_desc = format!(
            "{} files of 50 to 300 bytes in directories of 1000 ({:.0} MiB); rclone not run (one request per file)",
            files.len(),
            du_bytes(&many) as f64 / 1048576.0
        );
        for rep in 0..many_reps {
            eprintln!("many: repetition {}", rep + 1);
            tree_scenarios(
                &mut b,
                "many",
                &many,
                &mut files,
                rep,
                true,
                &[Tool::Rclone],
            )?;
            checkpoint(&b);
        }
        b.discard(&many);
    }

    // (e) edge sync against rclone copy, on a fresh copy of the mixed data.
    if want("sync") {
        eprintln!("generating the mixed data set for edge sync, scale {scale}");
        let dir = work.path().join("sync-src");
        make_mixed(&dir, 43, scale)?;
        for rep in 0..reps {
            eprintln!("sync: repetition {}", rep + 1);
            sync::sync_scenarios(&mut b, &dir, rep)?;
            checkpoint(&b);
        }
        b.discard(&dir);
    }
    // (g) the S3 gateway: rclone through it against rclone straight to Garage.
    if want("gateway") {
        eprintln!("generating the mixed data set for the S3 gateway, scale {scale}");
        let dir = work.path().join("gateway-src");
        make_mixed(&dir, 44, scale)?;
        for rep in 0..reps {
            eprintln!("gateway: repetition {}", rep + 1);
            gateway::gateway_scenarios(&mut b, &dir, rep)?;
            checkpoint(&b);
        }
        b.discard(&dir);
    }
    // (f) file-level access against restic, on a data set like (d).
    let mut browse_section = String::new();
    if want("browse") {
        eprintln!("generating the browse data set: {many_files} small files");
        let dir = work.path().join("browse-src");
        let files = make_many(&dir, 98, many_files)?;
        browse_section = browse::browse_scenarios(&b, &dir, &files)?;
        b.discard(&dir);
    }
    b.empty_trash();

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default()
    };
    // The instruction sets that move the tools' hashing, compression and encryption
    // (BLAKE3 widest with AVX-512, restic's SHA-256 with the SHA extensions), so runs on
    // different machines can be told apart.
    let flags: Vec<String> = field("flags")
        .split_whitespace()
        .filter(|f| ["avx2", "avx512f", "sha_ni", "aes", "vaes"].contains(f))
        .map(str::to_string)
        .collect();
    let cpu = format!("{}; {}", field("model name"), flags.join(" "));
    let version = |c: &str, a: &str| {
        Command::new(c)
            .arg(a)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    let work_fs = Command::new("findmnt")
        .args(["-no", "FSTYPE,SOURCE,OPTIONS", "-T"])
        .arg(work.path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| work.path().display().to_string());
    // A loop device says whether it does direct I/O (no second copy of every page).
    let work_fs = match work_fs
        .split_whitespace()
        .nth(1)
        .and_then(|dev| dev.strip_prefix("/dev/"))
        .filter(|dev| dev.starts_with("loop"))
        .and_then(|dev| std::fs::read_to_string(format!("/sys/block/{dev}/loop/dio")).ok())
    {
        Some(dio) if dio.trim() == "1" => format!("{work_fs} (loop device with direct I/O)"),
        Some(_) => format!("{work_fs} (loop device, buffered)"),
        None => work_fs,
    };
    let cold = if b.caches_dropped.get() == Some(true) {
        "yes (every tool starts cold)"
    } else {
        "no (not permitted here)"
    };
    let meta = format!(
        "Machine: {} cores ({cpu}), {:.0} GiB memory. Tools: datamover {} (release build), {}, {}, {}, {}, Garage on 127.0.0.1 (single node, sqlite).\n\
         Work directory (data sets, restores, Garage's data): {work_fs}. Page cache dropped before every run: {cold}.\n\
         Medians of {reps} repetitions per cell, tool order alternating between repetitions.\n\
         Data sets: (a) mixed, {:.0} MiB in {} files (20,000 small text files, 300 medium and 3 large half-compressible files at scale 1); \
         (b) toolchain: {tree_desc}; (c) stream: {stream_mib} MiB half-compressible, through a named pipe fed by `cat`; \
         (d) many: {many_desc}; (e) sync: edge sync (`sync_egress`/`sync_ingress --once`) against `rclone copy` on a mixed data set like (a); (g) gateway: `rclone copy` (16 transfers) of a mixed data set like (a) through our S3 gateway and straight to Garage.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1048576.0,
        env!("CARGO_PKG_VERSION"),
        version("restic", "version"),
        if rustic_installed {
            version("rustic", "--version")
        } else {
            "rustic not installed".to_string()
        },
        version("rclone", "version"),
        kopia_bin.as_deref().map_or_else(
            || format!("kopia not run ({} unset)", kopia::KOPIA_BIN),
            |k| format!(
                "{} (as `kopia-server`: a repository server over TLS with a client connected; as `kopia`: straight on S3; zstd compression)",
                kopia::version(k)
            ),
        ),
        mixed_bytes as f64 / 1048576.0,
        mixed_count,
    );
    let text = report(&b, &meta) + "\n" + &browse_section;
    println!("{text}");
    if let Some(o) = output {
        std::fs::write(&o, &text).map_err(|e| e.to_string())?;
    }
    Ok(())
}
