//! Edge sync end to end: the real server and client binaries, Garage on loopback, real
//! directories. Plain objects are checked with an S3 client of their own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use datamover_tests::edge::{Bucket, files_under, n, s3_server, sync_requests, wait_parts};
use datamover_tests::{Garage, Server, Storage, random_bytes, write};

const PREFIX: &str = "fleet";

fn make_tree(dir: &Path) {
    for i in 0..40 {
        write(
            &dir.join(format!("logs/day-{}/reading-{i}.csv", i % 4)),
            format!("sensor,{i}\n").repeat(i * 7 + 1).as_bytes(),
        );
    }
    write(&dir.join("empty"), b"");
    write(
        &dir.join("video.bin"),
        &random_bytes(1, 20 * 1024 * 1024 + 123),
    );
}

fn set_mtime(p: &Path, delta_secs: i64) {
    let m = std::fs::metadata(p).unwrap();
    let t = filetime::FileTime::from_last_modification_time(&m);
    filetime::set_file_mtime(
        p,
        filetime::FileTime::from_unix_time(t.unix_seconds() + delta_secs, t.nanoseconds()),
    )
    .unwrap();
}

#[test]
fn egress_ingress_round_trip_plain_objects_and_unchanged_passes() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let mut server = s3_server(&g, PREFIX, &[("dev-1", "tok-1")], &[]);
    let client = server.client("dev-1", "tok-1");
    let bucket = Bucket::new(&g);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src);
    let src_s = src.to_str().unwrap();

    let first = client.ok(&["sync_egress", src_s, "site-a", "--once"]);
    assert_eq!(n(&first, "files"), 42);
    assert_eq!(n(&first, "files_sent"), 42);
    assert_eq!(n(&first, "bytes_sent"), n(&first, "bytes"));

    // Plain objects under <prefix>/sync/<tenant>/<target>/<path>, with our hash as metadata.
    let video = std::fs::read(src.join("video.bin")).unwrap();
    let key = format!("{PREFIX}/sync/dev-1/site-a/video.bin");
    assert_eq!(
        bucket.get(&key).as_deref(),
        Some(video.as_slice()),
        "multipart object readable as is"
    );
    assert_eq!(
        bucket.meta(&key).map(|m| m.hash),
        Some(*blake3::hash(&video).as_bytes())
    );
    assert_eq!(
        bucket
            .get(&format!(
                "{PREFIX}/sync/dev-1/site-a/logs/day-1/reading-5.csv"
            ))
            .unwrap(),
        std::fs::read(src.join("logs/day-1/reading-5.csv")).unwrap()
    );

    // Unchanged: nothing sent, one listing, no request per file.
    let before = sync_requests(&server);
    let again = client.ok(&["sync_egress", src_s, "site-a", "--once"]);
    assert_eq!(n(&again, "files_sent"), 0);
    assert_eq!(n(&again, "bytes_sent"), 0);
    let after = sync_requests(&server);
    let delta = |op: &str| after.get(op).unwrap_or(&0) - before.get(op).unwrap_or(&0);
    assert_eq!(delta("list"), 1, "{before:?} -> {after:?}");
    for op in ["head", "get", "put", "upload_part"] {
        assert_eq!(delta(op), 0, "{op}: {before:?} -> {after:?}");
    }

    // After a restart the manifest comes back from the store: still no per-file requests.
    server.stop(nix::sys::signal::Signal::SIGTERM);
    server.spawn();
    let client = server.client("dev-1", "tok-1");
    let again = client.ok(&["sync_egress", src_s, "site-a", "--once"]);
    assert_eq!(n(&again, "files_sent"), 0);
    let r = sync_requests(&server);
    assert_eq!(r.get("head"), None, "{r:?}");
    assert!(
        r.get("get").copied().unwrap_or(0) <= 1,
        "only the manifest is read: {r:?}"
    );

    // Ingress to another directory: the same files, modes and mtimes.
    let dst = work.path().join("dst");
    let down = client.ok(&["sync_ingress", "site-a", dst.to_str().unwrap(), "--once"]);
    assert_eq!(n(&down, "files_sent"), 42);
    assert_eq!(files_under(&src), files_under(&dst));
    let (ms, md) = (
        std::fs::metadata(src.join("video.bin")).unwrap(),
        std::fs::metadata(dst.join("video.bin")).unwrap(),
    );
    assert_eq!(
        filetime::FileTime::from_last_modification_time(&ms),
        filetime::FileTime::from_last_modification_time(&md)
    );
    let down = client.ok(&["sync_ingress", "site-a", dst.to_str().unwrap(), "--once"]);
    assert_eq!(
        n(&down, "files_sent"),
        0,
        "unchanged ingress pass moves nothing"
    );
    assert_eq!(n(&down, "bytes_sent"), 0);

    // The filesystem store serves the same layout.
    let fs_server = Server::start(Storage::Filesystem, &[("dev-1", "tok-1")]);
    let c = fs_server.client("dev-1", "tok-1");
    c.ok(&["sync_egress", src_s, "site-a", "--once"]);
    assert_eq!(
        std::fs::read(fs_server.repo_dir().join("sync/dev-1/site-a/video.bin")).unwrap(),
        video
    );
    let again = c.ok(&["sync_egress", src_s, "site-a", "--once"]);
    assert_eq!(n(&again, "files_sent"), 0);
    let dst2 = work.path().join("dst2");
    c.ok(&["sync_ingress", "site-a", dst2.to_str().unwrap(), "--once"]);
    assert_eq!(files_under(&src), files_under(&dst2));
}

#[test]
fn clock_skew_and_deletions() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let server = s3_server(&g, PREFIX, &[("dev-1", "tok-1")], &[]);
    let client = server.client("dev-1", "tok-1");
    let bucket = Bucket::new(&g);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let dst = work.path().join("dst");
    for i in 0..10 {
        write(
            &src.join(format!("f{i}.txt")),
            format!("version one of {i}\n").as_bytes(),
        );
    }
    let (src_s, dst_s) = (src.to_str().unwrap(), dst.to_str().unwrap());
    client.ok(&["sync_egress", src_s, "t", "--once"]);
    client.ok(&["sync_ingress", "t", dst_s, "--once"]);
    // Let the recorded state age past the racy window, as on a real device.
    std::thread::sleep(Duration::from_millis(2100));

    // A clock an hour ahead touches a file without changing it: nothing is sent.
    set_mtime(&src.join("f1.txt"), 3600);
    let r = client.ok(&["sync_egress", src_s, "t", "--once"]);
    assert_eq!(n(&r, "files_sent"), 0, "{r}");

    // In-place edits of the same size, the mtime an hour ahead (kept as it was) and an
    // hour behind: both are sent.
    let f1 = src.join("f1.txt");
    let mtime1 = filetime::FileTime::from_last_modification_time(&std::fs::metadata(&f1).unwrap());
    std::fs::write(&f1, b"version TWO of 1\n").unwrap();
    assert_eq!(
        std::fs::metadata(&f1).unwrap().len(),
        "version one of 1\n".len() as u64
    );
    filetime::set_file_mtime(&f1, mtime1).unwrap();
    let f2 = src.join("f2.txt");
    std::fs::write(&f2, b"version 2wo of 2\n").unwrap();
    set_mtime(&f2, -3600);
    let r = client.ok(&["sync_egress", src_s, "t", "--once"]);
    assert_eq!(n(&r, "files_sent"), 2, "{r}");
    assert_eq!(
        bucket
            .get(&format!("{PREFIX}/sync/dev-1/t/f1.txt"))
            .unwrap(),
        std::fs::read(&f1).unwrap()
    );
    assert_eq!(
        bucket
            .get(&format!("{PREFIX}/sync/dev-1/t/f2.txt"))
            .unwrap(),
        b"version 2wo of 2\n"
    );

    // Ingress sees the same-size edits whatever the times say, and nothing else.
    let r = client.ok(&["sync_ingress", "t", dst_s, "--once"]);
    assert_eq!(n(&r, "files_sent"), 2, "{r}");
    assert_eq!(
        std::fs::read(dst.join("f1.txt")).unwrap(),
        std::fs::read(&f1).unwrap()
    );
    assert_eq!(
        std::fs::read(dst.join("f2.txt")).unwrap(),
        b"version 2wo of 2\n"
    );

    // Deletions: kept without --delete, propagated with it, both ways.
    std::fs::remove_file(src.join("f3.txt")).unwrap();
    write(&dst.join("local-only.txt"), b"mine");
    client.ok(&["sync_egress", src_s, "t", "--once"]);
    assert!(
        bucket
            .get(&format!("{PREFIX}/sync/dev-1/t/f3.txt"))
            .is_some()
    );
    let r = client.ok(&["sync_egress", src_s, "t", "--once", "--delete"]);
    assert_eq!(n(&r, "files_deleted"), 1);
    assert!(
        bucket
            .get(&format!("{PREFIX}/sync/dev-1/t/f3.txt"))
            .is_none()
    );
    client.ok(&["sync_ingress", "t", dst_s, "--once"]);
    assert!(dst.join("f3.txt").exists() && dst.join("local-only.txt").exists());
    let r = client.ok(&["sync_ingress", "t", dst_s, "--once", "--delete"]);
    assert_eq!(n(&r, "files_deleted"), 2);
    assert!(!dst.join("f3.txt").exists() && !dst.join("local-only.txt").exists());
    assert_eq!(files_under(&src), files_under(&dst));
}

/// Waits (bounded) for a child; kills it after `secs`.
fn wait_child(mut c: std::process::Child, secs: u64) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    c.wait_with_output().unwrap()
}

/// Starts a once-egress of `src` to target `t` at 16 MiB/s, in the background.
fn slow_egress(client: &datamover_tests::Client, src: &str, out: Stdio) -> std::process::Child {
    client
        .command(&["sync_egress", src, "t", "--once", "--bwlimit", "16MiB"])
        .stdout(Stdio::piped())
        .stderr(out)
        .spawn()
        .unwrap()
}

#[test]
fn files_changing_during_upload_are_never_stored_torn_and_uploads_resume() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let server = s3_server(&g, PREFIX, &[("dev-1", "tok-1")], &[]);
    let client = server.client("dev-1", "tok-1");
    let bucket = Bucket::new(&g);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let src_s = src.to_str().unwrap();
    let big = src.join("growing.log");
    let original = random_bytes(2, 40 * 1024 * 1024);
    write(&big, &original);
    let key = format!("{PREFIX}/sync/dev-1/t/growing.log");

    // Appended while it is sent (~2.5 s at 16 MiB/s): the object is the whole earlier
    // version, never a mix; the next pass sends the new one.
    let child = slow_egress(&client, src_s, Stdio::piped());
    wait_parts(&server, 1);
    let extra = random_bytes(3, 1024 * 1024);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&big).unwrap();
        f.write_all(&extra).unwrap();
    }
    let out = wait_child(child, 60);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = bucket.get(&key).unwrap();
    let mut grown = original.clone();
    grown.extend_from_slice(&extra);
    assert!(
        stored == original || stored == grown,
        "stored object is torn ({} bytes)",
        stored.len()
    );
    assert_eq!(
        bucket.meta(&key).map(|m| m.hash),
        Some(*blake3::hash(&stored).as_bytes())
    );
    client.ok(&["sync_egress", src_s, "t", "--once"]);
    assert_eq!(bucket.get(&key).unwrap(), grown);

    // Rewritten in place while it is sent: the server refuses the mix, the client reads
    // the file again and sends the new version.
    write(&big, &random_bytes(6, grown.len()));
    let child = slow_egress(&client, src_s, Stdio::piped());
    wait_parts(&server, 1);
    let rewritten = random_bytes(4, grown.len());
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.write_all(&rewritten).unwrap();
    }
    let out = wait_child(child, 90);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = bucket.get(&key).unwrap();
    assert!(
        stored == rewritten,
        "stored object is not the rewritten file ({} bytes)",
        stored.len()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("changed while it was being uploaded"),
        "the mixed upload was refused and retried: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An interrupted large upload resumes where it stopped.
    let huge = src.join("huge.bin");
    let content = random_bytes(5, 64 * 1024 * 1024);
    write(&huge, &content);
    let child = slow_egress(&client, src_s, Stdio::null());
    wait_parts(&server, 3);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = wait_child(child, 10);
    assert!(
        bucket
            .get(&format!("{PREFIX}/sync/dev-1/t/huge.bin"))
            .is_none(),
        "nothing visible yet"
    );
    let r = client.ok(&["sync_egress", src_s, "t", "--once"]);
    assert_eq!(n(&r, "files_sent"), 1, "{r}");
    assert!(
        n(&r, "bytes_sent") <= content.len() as u64 - 16 * 1024 * 1024,
        "resumed, not sent again from the start: {r}"
    );
    assert_eq!(
        bucket
            .get(&format!("{PREFIX}/sync/dev-1/t/huge.bin"))
            .unwrap(),
        content
    );
}

#[test]
fn disk_budget_tenants_and_edge_workload() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let server = s3_server(
        &g,
        PREFIX,
        &[("dev-1", "tok-1"), ("dev-2", "tok-2"), ("viewer", "tok-3")],
        &[("roles", "viewer=read")],
    );
    let c1 = server.client("dev-1", "tok-1");
    let c2 = server.client("dev-2", "tok-2");
    let viewer = server.client("viewer", "tok-3");
    let bucket = Bucket::new(&g);
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    for i in 0..6 {
        write(
            &models.join(format!("m{i}.bin")),
            &random_bytes(10 + i, 1024 * 1024),
        );
    }
    c1.ok(&["sync_egress", models.to_str().unwrap(), "models", "--once"]);

    // The disk budget stops ingress with a clear error, within the budget, no partials.
    let dst = work.path().join("device-models");
    let r = c1.run(&[
        "sync_ingress",
        "models",
        dst.to_str().unwrap(),
        "--once",
        "--disk-budget",
        "3.5MiB",
    ]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(r.stderr.contains("disk budget"), "{}", r.stderr);
    let held: u64 = files_under(&dst).values().map(|v| v.len() as u64).sum();
    assert!(
        (3 * 1024 * 1024..=3 * 1024 * 1024 + 512 * 1024).contains(&held),
        "{held}"
    );
    assert!(!files_under(&dst).keys().any(|k| k.contains("partial")));

    // Tenants: dev-2 sees its own (empty) target, cannot name another tenant's, and an
    // object with a crafted key in its space is not written outside the directory.
    let d2 = work.path().join("dev2");
    let r = c2.ok(&["sync_ingress", "models", d2.to_str().unwrap(), "--once"]);
    assert_eq!(n(&r, "files"), 0);
    for args in [
        vec![
            "sync_ingress",
            "../dev-1/models",
            d2.to_str().unwrap(),
            "--once",
        ],
        vec![
            "sync_egress",
            models.to_str().unwrap(),
            "../dev-1/models",
            "--once",
        ],
        vec![
            "sync_egress",
            models.to_str().unwrap(),
            "/dev-1/models",
            "--once",
        ],
    ] {
        let r = c2.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("not allowed"), "{}", r.stderr);
    }
    assert_eq!(
        bucket.keys(&format!("{PREFIX}/sync/dev-1/")).len(),
        6,
        "dev-1's objects untouched"
    );
    bucket.put(&format!("{PREFIX}/sync/dev-2/in/../../escape.txt"), b"evil");
    bucket.put(&format!("{PREFIX}/sync/dev-2/in/ok.txt"), b"fine");
    let r = c2.ok(&["sync_ingress", "in", d2.to_str().unwrap(), "--once"]);
    assert_eq!(n(&r, "files_sent"), 1, "{r}");
    assert_eq!(std::fs::read(d2.join("ok.txt")).unwrap(), b"fine");
    assert!(!work.path().join("escape.txt").exists() && !d2.join("escape.txt").exists());
    // An object written by another tool is fetched once, then recognised by its etag.
    let r = c2.ok(&["sync_ingress", "in", d2.to_str().unwrap(), "--once"]);
    assert_eq!(n(&r, "files_sent"), 0, "{r}");

    // A point-in-time copy lands under <target>/YYYY-MM-DD-HHMMSS/.
    c1.ok(&[
        "sync_egress",
        models.to_str().unwrap(),
        "snap",
        "--once",
        "--point-in-time",
    ]);
    let keys = bucket.keys(&format!("{PREFIX}/sync/dev-1/snap/"));
    assert_eq!(keys.len(), 6, "{keys:?}");
    let stamp = keys[0].split('/').nth(4).unwrap();
    assert_eq!(stamp.len(), "2026-11-22-060122".len(), "{keys:?}");
    assert!(
        stamp.chars().all(|c| c.is_ascii_digit() || c == '-'),
        "{keys:?}"
    );
    assert!(
        keys.iter().all(|k| k.contains(&format!("/snap/{stamp}/m"))),
        "{keys:?}"
    );

    // Roles: a read-only client cannot upload.
    let r = viewer.run(&["sync_egress", models.to_str().unwrap(), "x", "--once"]);
    assert_eq!(r.code, 3, "{}", r.stderr);

    // A Flotta EdgeWorkload: egress and ingress paths relative to the export directory.
    let export = work.path().join("export");
    write(&export.join("readings/r1.csv"), b"1,2,3\n");
    let yaml = work.path().join("workload.yaml");
    std::fs::write(
        &yaml,
        "apiVersion: management.project-flotta.io/v1alpha1\nkind: EdgeWorkload\nmetadata:\n  name: sensors\nspec:\n  type: pod\n  data:\n    egress:\n      - source: readings\n        target: sensors/readings\n    ingress:\n      - source: models\n        target: models\n",
    )
    .unwrap();
    let r = c1.ok(&[
        "sync_workload",
        yaml.to_str().unwrap(),
        "--export-root",
        export.to_str().unwrap(),
        "--once",
    ]);
    assert_eq!(n(&r["egress"], "files_sent"), 1, "{r}");
    assert_eq!(n(&r["ingress"], "files_sent"), 6, "{r}");
    assert_eq!(
        bucket
            .get(&format!("{PREFIX}/sync/dev-1/sensors/readings/r1.csv"))
            .unwrap(),
        b"1,2,3\n"
    );
    assert_eq!(files_under(&export.join("models")), files_under(&models));
}

#[test]
fn continuous_egress_follows_changes_and_stops_on_sigterm() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let server = s3_server(&g, PREFIX, &[("dev-1", "tok-1")], &[]);
    let client = server.client("dev-1", "tok-1");
    let bucket = Bucket::new(&g);
    let work = tempfile::tempdir().unwrap();
    let src: PathBuf = work.path().join("src");
    write(&src.join("a.txt"), b"a");
    // An hour between timed passes: only the file-system events can trigger the second.
    let child = client
        .command(&[
            "sync_egress",
            src.to_str().unwrap(),
            "live",
            "--interval",
            "1h",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let wait_for = |key: &str, want: &[u8]| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if bucket.get(key).as_deref() == Some(want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    };
    assert!(wait_for(&format!("{PREFIX}/sync/dev-1/live/a.txt"), b"a"));
    write(&src.join("sub/b.txt"), b"bee");
    assert!(
        wait_for(&format!("{PREFIX}/sync/dev-1/live/sub/b.txt"), b"bee"),
        "a change triggers a pass"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = wait_child(child, 30);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .filter(|l| l.starts_with("{\"bytes\""))
            .count()
            >= 2,
        "one JSON line per pass (two passes at least): {stdout}"
    );
}
