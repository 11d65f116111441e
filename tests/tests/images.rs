//! End-to-end: the container images. `images/build.sh` builds the three images
//! (`datamover/datamover-{server,client,controller}:<version>`) from the binaries of this
//! build (`--bin-dir target/<profile>`); the controller's runs `--help`, and without
//! cluster credentials exits with one clear line. Then the server and the client
//! run as containers on a private `--internal` Docker network, each with a read-only
//! root filesystem, as the non-root user 65532, with every capability dropped; the
//! server's config, secrets and client credentials are mounted read-only where the spec
//! says. A directory is backed up and restored through them, and a stream too.
//!
//! Without a Docker engine the test says so and passes, unless `CI` is set: CI must run it.

use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use datamover_tests::blueprint::repo_root;
use datamover_tests::{assert_same_tree, bin_dir, random_bytes};

/// Runs a command with a deadline; kills it when the deadline passes.
fn run_for(cmd: &mut Command, secs: u64, stdin: Option<Vec<u8>>) -> Output {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let writer = stdin.map(|data| {
        let mut w = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&data);
        })
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish in {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

fn docker(args: &[&str], secs: u64) -> Output {
    run_for(Command::new("docker").args(args), secs, None)
}

/// Runs docker and asserts success; returns stdout.
fn docker_ok(args: &[&str], secs: u64) -> String {
    let o = docker(args, secs);
    assert!(
        o.status.success(),
        "docker {args:?} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn docker_available() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Everything the test created in Docker, removed on drop (also when the test fails).
struct Cleanup {
    containers: Vec<String>,
    networks: Vec<String>,
    volumes: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c], 60);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n], 60);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v], 60);
        }
        for i in &self.images {
            let _ = docker(&["rmi", "-f", i], 60);
        }
    }
}

fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// Makes a host directory usable by the container user 65532: readable dirs and files.
fn open_up(dir: &Path, mode: u32) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A fresh random credential or password (test values, made at run time).
fn token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    hex(&random_bytes(nanos ^ u64::from(std::process::id()), 24))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs/nested")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello from a container\n").unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(
        root.join("docs/big.bin"),
        random_bytes(7, 2 * 1024 * 1024 + 5),
    )
    .unwrap();
    std::fs::write(
        root.join("docs/nested/text.md"),
        "lorem ipsum ".repeat(20_000),
    )
    .unwrap();
    symlink("hello.txt", root.join("link-to-hello")).unwrap();
    for d in ["", "docs", "docs/nested", "empty-dir"] {
        open_up(&root.join(d), 0o755);
    }
    for (i, p) in ["hello.txt", "docs/big.bin", "docs/nested"]
        .iter()
        .enumerate()
    {
        let t = filetime::FileTime::from_unix_time(1_650_000_000 + i as i64, 987_654_321);
        filetime::set_file_mtime(root.join(p), t).unwrap();
    }
}

fn phase_output(stdout: &str, key: &str) -> Option<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("###Phase-output###: "))
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .find(|v| v["key"] == key)
        .and_then(|v| v["value"].as_str().map(str::to_string))
}

fn last_json(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

/// A `--mount` argument binding a host directory.
fn mount(host: &Path, target: &str, ro: bool) -> String {
    format!(
        "type=bind,source={},target={target}{}",
        host.display(),
        if ro { ",readonly" } else { "" }
    )
}

/// The uid of a running container's main process, read from the host's /proc.
fn container_uid(name: &str) -> Option<u32> {
    let pid = docker_ok(&["inspect", "--format", "{{.State.Pid}}", name], 30);
    let pid = pid.trim();
    // Only when the engine shares our PID namespace (the pid is a datamover process here).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !String::from_utf8_lossy(&cmdline).contains("datamover-") {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
}

/// The hardening every container of the test runs with.
const HARDENING: &[&str] = &[
    "--read-only",
    "--user",
    "65532:65532",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
];

#[test]
fn images_build_and_round_trip_read_only_non_root() {
    if !docker_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "docker engine not available, but CI is set: the image tests must run in CI"
        );
        eprintln!("docker engine not available: image tests skipped");
        return;
    }
    let run_id = format!("dmtest{}", std::process::id());
    let version = format!("test-{run_id}");
    let server_image = format!("datamover/datamover-server:{version}");
    let client_image = format!("datamover/datamover-client:{version}");
    let controller_image = format!("datamover/datamover-controller:{version}");
    let mut cleanup = Cleanup {
        containers: Vec::new(),
        networks: Vec::new(),
        volumes: Vec::new(),
        images: vec![
            server_image.clone(),
            client_image.clone(),
            controller_image.clone(),
        ],
    };

    // Build the three images from the binaries of this build.
    let built = run_for(
        Command::new(repo_root().join("images/build.sh"))
            .args(["--engine", "docker", "--bin-dir"])
            .arg(bin_dir())
            .args(["--version", &version]),
        600,
        None,
    );
    assert!(
        built.status.success(),
        "images/build.sh failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let refs = String::from_utf8_lossy(&built.stdout).into_owned();
    assert_eq!(
        refs.lines().collect::<Vec<_>>(),
        [
            server_image.as_str(),
            client_image.as_str(),
            controller_image.as_str()
        ]
    );
    for (image, entry) in [
        (&server_image, "datamover-server"),
        (&client_image, "datamover-client"),
        (&controller_image, "datamover-controller"),
    ] {
        let meta = docker_ok(
            &[
                "image",
                "inspect",
                "--format",
                "{{.Config.User}}|{{json .Config.Entrypoint}}|{{index .Config.Labels \"org.opencontainers.image.version\"}}|{{index .Config.Labels \"org.opencontainers.image.licenses\"}}|{{index .Config.Labels \"org.opencontainers.image.source\"}}|{{.Size}}",
                image,
            ],
            30,
        );
        let f: Vec<&str> = meta.trim().split('|').collect();
        assert_eq!(f[0], "65532:65532", "{image}: {meta}");
        assert_eq!(f[1], format!("[\"/usr/local/bin/{entry}\"]"), "{image}");
        assert_eq!(f[2], version, "{image}");
        assert_eq!(f[3], "Apache-2.0", "{image}");
        assert!(f[4].starts_with("https://"), "{image}: {meta}");
        // Nothing but the binary, its libraries and a few files.
        let size: u64 = f[5].parse().unwrap();
        assert!(size < 200 * 1024 * 1024, "{image} is {size} bytes");
    }

    // The controller's binary runs in its image: --help, and outside a cluster one clear
    // error line (no panic).
    let mut args = vec!["run", "--rm", "--network", "none"];
    args.extend_from_slice(HARDENING);
    args.push(&controller_image);
    let help = docker_ok(&[args.as_slice(), &["--help"]].concat(), 60);
    assert!(help.contains("Usage: datamover-controller"), "{help}");
    let alone = docker(&args, 60);
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert_eq!(alone.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no Kubernetes credentials"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The server's /etc as Kubernetes would mount it: ConfigMap, Secrets, credentials.
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    open_up(w, 0o755);
    let credential = token();
    write(&w.join("config/type"), b"filesystem");
    write(&w.join("config/path"), b"/var/lib/datamover");
    write(&w.join("secrets/repo/repo-password"), token().as_bytes());
    write(&w.join("client_credentials/edge-01"), credential.as_bytes());
    write(&w.join("client-secret/edge-01"), credential.as_bytes());
    for d in [
        "config",
        "secrets",
        "secrets/repo",
        "client_credentials",
        "client-secret",
    ] {
        open_up(&w.join(d), 0o755);
    }
    // /etc/server is written by the server: an emptyDir in a pod, a host dir here.
    let server_out = w.join("server");
    std::fs::create_dir(&server_out).unwrap();
    open_up(&server_out, 0o777);

    let network = format!("{run_id}-net");
    docker_ok(&["network", "create", "--internal", &network], 60);
    cleanup.networks.push(network.clone());
    let volume = format!("{run_id}-repo");
    docker_ok(&["volume", "create", &volume], 60);
    cleanup.volumes.push(volume.clone());

    let server = format!("{run_id}-server");
    cleanup.containers.push(server.clone());
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        server.clone(),
        "--network".into(),
        network.clone(),
    ];
    args.extend(HARDENING.iter().map(|s| s.to_string()));
    for (host, target, ro) in [
        (w.join("config"), "/etc/config", true),
        (w.join("secrets/repo"), "/etc/secrets/repo", true),
        (
            w.join("client_credentials"),
            "/etc/client_credentials",
            true,
        ),
        (server_out.clone(), "/etc/server", false),
    ] {
        args.push("--mount".into());
        args.push(mount(&host, target, ro));
    }
    args.push("--mount".into());
    args.push(format!(
        "type=volume,source={volume},target=/var/lib/datamover"
    ));
    // The local chunk index: an emptyDir in a pod, a tmpfs here.
    args.extend([
        "--tmpfs".into(),
        "/var/cache/datamover:uid=65532,gid=65532".into(),
    ]);
    args.extend(["-e".into(), format!("DATAMOVER_TLS_NAMES={server}")]);
    args.push(server_image.clone());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_ok(&a, 60);

    // Ready: /etc/server/data written (the spec writes it before the server is ready).
    let deadline = Instant::now() + Duration::from_secs(90);
    let fingerprint = loop {
        if let Ok(fp) = std::fs::read_to_string(server_out.join("data"))
            && fp.trim().len() == 64
        {
            break fp.trim().to_string();
        }
        let running = docker_ok(&["inspect", "--format", "{{.State.Running}}", &server], 30);
        if running.trim() != "true" || Instant::now() > deadline {
            let logs = docker(&["logs", &server], 30);
            panic!(
                "server container not ready (running: {}):\n{}{}",
                running.trim(),
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(uid) = container_uid(&server) {
        assert_eq!(uid, 65532, "the server runs as the non-root user");
    }

    // The client container: same network, its credential at /etc/client-secret/<id>.
    let client = |extra: &[String], cmd: &[&str], stdin: Option<Vec<u8>>| -> Output {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--network".into(),
            network.clone(),
        ];
        if stdin.is_some() {
            args.push("-i".into());
        }
        args.extend(HARDENING.iter().map(|s| s.to_string()));
        args.extend([
            "-e".into(),
            format!("SERVER_URL={server}:51515"),
            "-e".into(),
            format!("SERVER_DATA={fingerprint}"),
            "-e".into(),
            "PROTOCOLS=datamover-v1:51515".into(),
            "-e".into(),
            "DATAMOVER_PROGRESS=0".into(),
            "--mount".into(),
            mount(&w.join("client-secret"), "/etc/client-secret", true),
        ]);
        args.extend(extra.iter().cloned());
        args.push(client_image.clone());
        args.extend(cmd.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_for(Command::new("docker").args(&a), 300, stdin)
    };
    let ok = |o: Output, what: &str| -> String {
        assert!(
            o.status.success(),
            "client {what} failed: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };

    // Files: back up a host directory (read-only), restore into another, compare.
    let src = w.join("src");
    make_tree(&src);
    let out = ok(
        client(
            &["--mount".into(), mount(&src, "/data", true)],
            &["backup_files", "/data", "nightly"],
            None,
        ),
        "backup_files",
    );
    let snapshot = phase_output(&out, "snapshot_id").expect("a snapshot_id phase output");
    let result = last_json(&out);
    assert_eq!(result["snapshot_id"], snapshot.as_str());
    assert_eq!(result["files"], 4, "{out}");

    let restored = w.join("restored");
    std::fs::create_dir(&restored).unwrap();
    open_up(&restored, 0o777);
    let out = ok(
        client(
            &["--mount".into(), mount(&restored, "/restore", false)],
            &["restore_files", "/restore/tree", snapshot.as_str()],
            None,
        ),
        "restore_files",
    );
    assert_eq!(last_json(&out)["snapshot_id"], snapshot.as_str());
    assert_same_tree(&src, &restored.join("tree"));

    // A stream through stdin and back through stdout.
    let dump = random_bytes(11, 1024 * 1024 + 3);
    let out = ok(
        client(&[], &["backup_stream", "-", "dump"], Some(dump.clone())),
        "backup_stream",
    );
    assert!(phase_output(&out, "snapshot_id").is_some());
    let back = client(&[], &["restore_stream", "-", "dump"], None);
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    assert!(back.stdout == dump, "the restored stream differs");

    // Sidecar: a long-running client container (command_from_file on its stdin, which
    // stays open), driven by `docker exec … datamover-client …` as `kubectl exec` would.
    let sidecar = format!("{run_id}-sidecar");
    cleanup.containers.push(sidecar.clone());
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "-i".into(),
        "--name".into(),
        sidecar.clone(),
        "--network".into(),
        network.clone(),
    ];
    args.extend(HARDENING.iter().map(|s| s.to_string()));
    args.extend([
        "-e".into(),
        format!("SERVER_URL={server}:51515"),
        "-e".into(),
        format!("SERVER_DATA={fingerprint}"),
        "--mount".into(),
        mount(&w.join("client-secret"), "/etc/client-secret", true),
        client_image.clone(),
        "command_from_file".into(),
        "/dev/stdin".into(),
    ]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_ok(&a, 60);
    let listed = docker_ok(
        &["exec", &sidecar, "datamover-client", "list", "nightly"],
        120,
    );
    let list = last_json(&listed);
    assert_eq!(list["count"], 1, "{listed}");
    assert_eq!(list["snapshots"][0]["id"], snapshot.as_str());
    if let Some(uid) = container_uid(&sidecar) {
        assert_eq!(uid, 65532, "the sidecar runs as the non-root user");
    }

    // The server wrote nothing outside its mounts (its root filesystem is read-only):
    // the container's layer holds only the mount points Docker made.
    let diff = docker_ok(&["diff", &server], 30);
    let mount_points = ["/etc", "/etc/secrets", "/etc/secrets/repo"];
    for line in diff.lines().filter(|l| !l.trim().is_empty()) {
        let path = line.split_whitespace().nth(1).unwrap_or("");
        assert!(
            mount_points.contains(&path),
            "server container changed {line}:\n{diff}"
        );
    }
    drop(cleanup);
}
