//! Operations on the bad days, with the real binaries: verification of a repository with
//! a flipped byte, two-phase maintenance (also while a backup runs), a server killed with
//! SIGKILL mid-backup, and a client whose connection drops.

use std::time::{Duration, Instant};

use datamover_tests::faults::FaultProxy;
use datamover_tests::{
    Client, Server, Storage, assert_same_tree, dir_bytes, mkfifo, random_bytes, sh,
};

const ADMIN: (&str, &str) = ("ops", "ops-token");
const USER: (&str, &str) = ("app", "app-token");

fn server(grace: &str) -> Server {
    Server::start_configured(
        Storage::Filesystem,
        &[ADMIN, USER],
        &[
            ("roles", "ops=admin\napp=full"),
            ("tenants", "ops=shop\napp=shop"),
            ("maintenanceGrace", grace),
        ],
    )
}

fn packs(server: &Server) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let data = server.repo_dir().join("data");
    for shard in std::fs::read_dir(data).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !f.file_name().to_string_lossy().starts_with('.') {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

fn id(v: &serde_json::Value) -> String {
    v["snapshot_id"].as_str().expect("snapshot_id").to_string()
}

#[test]
fn a_flipped_byte_is_reported_by_verify_and_restore_naming_the_file() {
    let mut server = server("24h");
    let client = server.client(USER.0, USER.1);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("big.bin"), random_bytes(1, 3 * 1024 * 1024)).unwrap();
    client.ok(&["backup_files", src.to_str().unwrap(), "t"]);

    let clean = client.ok(&["verify", "--read-data"]);
    assert_eq!(clean["problems"], 0, "{clean}");
    assert!(clean["packs_read"].as_u64().unwrap() >= 1, "{clean}");
    assert_eq!(clean["files"], 1);

    // Flip one byte inside the first chunk of the file (the first blob of the pack).
    let pack = packs(&server).into_iter().next().expect("a pack");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();
    // A new server process: nothing of the pack is cached from before the flip.
    server.stop(nix::sys::signal::Signal::SIGTERM);
    server.spawn();
    let client = server.client(USER.0, USER.1);

    // Without reading data, verify only sees that everything is indexed.
    assert_eq!(client.ok(&["verify"])["problems"], 0);
    let r = client.run(&["verify", "--read-data"]);
    assert_eq!(
        r.code, 8,
        "verify must fail with exit 8:\n{}\n{}",
        r.stdout, r.stderr
    );
    assert!(
        r.stderr.contains("big.bin"),
        "the error names the file: {}",
        r.stderr
    );
    let report = r.json();
    assert_eq!(report["problems"], 1, "{report}");
    assert_eq!(report["details"][0]["path"], "big.bin", "{report}");

    let out = work.path().join("out");
    let r = client.run(&["restore_files", out.to_str().unwrap(), "t"]);
    assert_eq!(r.code, 8, "restore must fail with exit 8: {}", r.stderr);
    assert!(
        r.stderr.contains("big.bin"),
        "the error names the file: {}",
        r.stderr
    );
    assert!(
        !out.join("big.bin").exists(),
        "a corrupt file must not be left looking complete"
    );
}

#[test]
fn maintenance_removes_unreferenced_data_in_two_phases_and_keeps_the_rest() {
    let server = server("5s");
    let admin = server.client(ADMIN.0, ADMIN.1);
    let user = server.client(USER.0, USER.1);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    for (dir, seed) in [(&a, 10), (&b, 20)] {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("data"), random_bytes(seed, 12 * 1024 * 1024)).unwrap();
        std::fs::write(dir.join("small"), format!("seed {seed}")).unwrap();
    }
    let snap_a = user.ok(&["backup_files", a.to_str().unwrap(), "a"]);
    user.ok(&["backup_files", b.to_str().unwrap(), "b"]);
    user.ok(&["delete", &id(&snap_a)]);

    // Only an admin may run maintenance.
    let r = user.run(&["maintenance"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("admin"), "{}", r.stderr);

    // Packs younger than the grace period are left alone.
    let young = admin.ok(&["maintenance"]);
    assert_eq!(young["chunks_condemned"], 0, "{young}");
    std::thread::sleep(Duration::from_millis(5200));

    let size_before = dir_bytes(&server.repo_dir().join("data"));
    let dry = admin.ok(&["maintenance", "--dry-run"]);
    assert!(dry["chunks_condemned"].as_u64().unwrap() > 0, "{dry}");
    // First phase: condemned, nothing deleted yet.
    let first = admin.ok(&["maintenance"]);
    assert!(first["chunks_condemned"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["chunks_removed"], 0, "{first}");
    assert_eq!(dir_bytes(&server.repo_dir().join("data")), size_before);

    // Second phase, after the grace period: deleted.
    std::thread::sleep(Duration::from_millis(5200));
    let second = admin.ok(&["maintenance"]);
    assert!(second["chunks_removed"].as_u64().unwrap() > 0, "{second}");
    assert!(
        second["bytes_freed"].as_u64().unwrap() > 10 * 1024 * 1024,
        "{second}"
    );
    let size_after = dir_bytes(&server.repo_dir().join("data"));
    assert!(
        size_after < size_before - 10 * 1024 * 1024,
        "{size_before} -> {size_after}"
    );

    // What is still referenced is whole.
    assert_eq!(
        admin.ok(&["verify", "--read-data", "--all-tenants"])["problems"],
        0
    );
    let out = work.path().join("out");
    user.ok(&["restore_files", out.to_str().unwrap(), "b"]);
    assert_same_tree(&b, &out);
    // A later backup of the deleted data stores it again and restores.
    user.ok(&["backup_files", a.to_str().unwrap(), "a"]);
    let out_a = work.path().join("out-a");
    user.ok(&["restore_files", out_a.to_str().unwrap(), "a"]);
    assert_same_tree(&a, &out_a);
}

/// A backup finds chunks present that no snapshot refers to (its data was backed up
/// before and deleted); maintenance condemns them while the backup runs and would
/// sweep them after the grace period. The backup's snapshot must restore.
#[test]
fn maintenance_during_a_running_backup_loses_nothing() {
    let server = server("1s");
    let admin = server.client(ADMIN.0, ADMIN.1);
    let user = server.client(USER.0, USER.1);
    let work = tempfile::tempdir().unwrap();
    let part1 = work.path().join("part1");
    let part2 = work.path().join("part2");
    std::fs::write(&part1, random_bytes(30, 16 * 1024 * 1024)).unwrap();
    std::fs::write(&part2, random_bytes(31, 4 * 1024 * 1024)).unwrap();

    let old = user.ok(&["backup_stream", part1.to_str().unwrap(), "old"]);
    user.ok(&["delete", &id(&old)]);
    std::thread::sleep(Duration::from_millis(1200));

    // The new backup reads part1 (all present), then waits for part2.
    let fifo = work.path().join("dump.fifo");
    mkfifo(&fifo);
    let writer = sh(&format!(
        "exec 3>'{}'; cat '{}' >&3; sleep 6; cat '{}' >&3",
        fifo.display(),
        part1.display(),
        part2.display(),
    ));
    let backup = user
        .command(&["backup_stream", fifo.to_str().unwrap(), "db"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));

    // Condemn, wait past the grace period, and try to sweep, all while it runs.
    let first = admin.ok(&["maintenance"]);
    assert!(first["chunks_condemned"].as_u64().unwrap() > 0, "{first}");
    std::thread::sleep(Duration::from_millis(1500));
    let second = admin.ok(&["maintenance"]);
    assert_eq!(
        second["chunks_removed"], 0,
        "a running backup's chunks were swept: {second}"
    );

    let out = backup.wait_with_output().unwrap();
    let mut writer = writer;
    let _ = writer.wait();
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // After the backup, condemned copies it needed were kept or stored again.
    std::thread::sleep(Duration::from_millis(1200));
    admin.ok(&["maintenance"]);
    std::thread::sleep(Duration::from_millis(1200));
    admin.ok(&["maintenance"]);
    assert_eq!(user.ok(&["verify", "--read-data"])["problems"], 0);
    let restored = work.path().join("restored");
    user.ok(&["restore_stream", restored.to_str().unwrap(), "db"]);
    let mut expected = std::fs::read(&part1).unwrap();
    expected.extend(std::fs::read(&part2).unwrap());
    assert!(
        std::fs::read(&restored).unwrap() == expected,
        "restored stream differs"
    );
}

#[test]
fn a_sigkilled_server_leaves_a_repository_that_verifies_and_the_next_backup_sends_only_what_is_missing()
 {
    let mut server = server("24h");
    let work = tempfile::tempdir().unwrap();
    let total: usize = 64 * 1024 * 1024;
    let data = work.path().join("data");
    std::fs::write(&data, random_bytes(40, total)).unwrap();
    let keep = work.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("f"), b"committed before the crash").unwrap();
    {
        let client = server.client(USER.0, USER.1);
        client.ok(&["backup_files", keep.to_str().unwrap(), "keep"]);
        let fifo = work.path().join("big.fifo");
        mkfifo(&fifo);
        // 48 MiB, then a pause during which the server dies.
        let mut writer = sh(&format!(
            "exec 3>'{2}'; head -c {0} '{1}' >&3; sleep 30",
            48 * 1024 * 1024,
            data.display(),
            fifo.display()
        ));
        let mut backup = client
            .command(&["backup_stream", fifo.to_str().unwrap(), "big"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while packs(&server).len() < 4 {
            assert!(
                Instant::now() < deadline,
                "no packs written:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        server.stop(nix::sys::signal::Signal::SIGKILL);
        let _ = backup.wait();
        let _ = writer.kill();
        let _ = writer.wait();
    }
    let stored_before_kill = dir_bytes(&server.repo_dir().join("data"));
    assert!(
        stored_before_kill > 28 * 1024 * 1024,
        "{stored_before_kill}"
    );

    server.spawn();
    let client = server.client(USER.0, USER.1);
    let v = client.ok(&["verify", "--read-data"]);
    assert_eq!(v["problems"], 0, "{v}");
    assert_eq!(v["snapshots"], 1, "only the committed snapshot: {v}");
    let list = client.ok(&["list"]);
    assert_eq!(
        list["count"], 1,
        "the killed backup must leave no snapshot: {list}"
    );

    let again = client.ok(&["backup_stream", data.to_str().unwrap(), "big"]);
    let sent = again["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < (total as u64) - 24 * 1024 * 1024,
        "the chunks uploaded before the crash were sent again: {again}"
    );
    let restored = work.path().join("restored");
    client.ok(&["restore_stream", restored.to_str().unwrap(), "big"]);
    assert!(std::fs::read(&restored).unwrap() == std::fs::read(&data).unwrap());
    assert_eq!(client.ok(&["verify", "--read-data"])["problems"], 0);
}

fn through(server: &Server, proxy: &FaultProxy, who: (&str, &str)) -> Client {
    let mut c = server.client(who.0, who.1);
    c.set_env("SERVER_URL", &proxy.addr());
    c.set_env("PROTOCOLS", &format!("datamover-v1:{}", proxy.port));
    c
}

#[test]
fn a_backup_whose_connection_drops_reconnects_and_does_not_resend_stored_chunks() {
    let server = server("24h");
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", server.port));
    let client = through(&server, &proxy, USER);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..12u64 {
        std::fs::write(
            src.join(format!("f{i:02}")),
            random_bytes(50 + i, 4 * 1024 * 1024),
        )
        .unwrap();
    }
    let total = 48 * 1024 * 1024u64;
    let backup = client
        .command(&["backup_files", src.to_str().unwrap(), "t"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Cut the connection once a good part has been received.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let received = server
            .http_get("/metrics")
            .and_then(|(_, m)| metric(&m, "datamover_bytes_received_total"))
            .unwrap_or(0);
        if received > 20 * 1024 * 1024 {
            break;
        }
        assert!(Instant::now() < deadline, "backup made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.cut_all();
    let out = backup.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backup failed: {stderr}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
    let received = server
        .http_get("/metrics")
        .and_then(|(_, m)| metric(&m, "datamover_bytes_received_total"))
        .unwrap();
    assert!(
        received < total + 12 * 1024 * 1024,
        "stored chunks were sent again: {received} bytes received for {total}"
    );
    let restored = work.path().join("out");
    client.ok(&["restore_files", restored.to_str().unwrap(), "t"]);
    assert_same_tree(&src, &restored);
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A small tmpfs mounted for the test (needs root; unmounted on drop).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_store_is_a_clear_error_and_loses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let Some(_disk) = SmallDisk::mount(&store, "24m") else {
        eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root)");
        return;
    };
    let server = Server::start_configured(
        Storage::Filesystem,
        &[USER],
        &[("type", "filesystem"), ("path", store.to_str().unwrap())],
    );
    let client = server.client(USER.0, USER.1);
    let keep = work.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("f"), random_bytes(60, 2 * 1024 * 1024)).unwrap();
    client.ok(&["backup_files", keep.to_str().unwrap(), "keep"]);

    let big = work.path().join("big");
    std::fs::create_dir(&big).unwrap();
    std::fs::write(big.join("f"), random_bytes(61, 40 * 1024 * 1024)).unwrap();
    let r = client.run(&["backup_files", big.to_str().unwrap(), "big"]);
    assert_eq!(r.code, 7, "a full store is exit code 7: {}", r.stderr);
    assert!(
        r.stderr.contains("storage is full"),
        "the error says what happened: {}",
        r.stderr
    );
    assert_eq!(
        client.ok(&["list"])["count"],
        1,
        "no snapshot from the failed backup"
    );
    assert_eq!(client.ok(&["verify", "--read-data"])["problems"], 0);
    let out = work.path().join("out");
    client.ok(&["restore_files", out.to_str().unwrap(), "keep"]);
    assert_same_tree(&keep, &out);
}
