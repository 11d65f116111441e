//! End-to-end: the real server on the filesystem store and the real client.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Stdio};

use datamover_tests::{Run, Server, Storage, assert_same_tree, random_bytes};

const TOKEN: &str = "token-of-client-a";

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs/nested/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello world\n").unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(
        root.join("docs/big.bin"),
        random_bytes(1, 3 * 1024 * 1024 + 17),
    )
    .unwrap();
    std::fs::write(
        root.join("docs/nested/text.md"),
        "lorem ipsum ".repeat(50_000),
    )
    .unwrap();
    std::fs::write(root.join("docs/nested/deeper/x"), b"x").unwrap();
    std::fs::write(root.join("a.txt"), b"sorts after a/ in bytes").unwrap();
    std::fs::create_dir(root.join("a")).unwrap();
    std::fs::write(root.join("a/b"), b"inside a").unwrap();
    std::fs::set_permissions(
        root.join("hello.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("docs/nested"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    symlink("hello.txt", root.join("link-to-hello")).unwrap();
    // A symlink inside a directory whose mtime is checked: symlinks are created last,
    // and the directory's mtime must still come out right.
    symlink("../big.bin", root.join("docs/nested/link-up")).unwrap();
    // Enough small files, in several directories, to keep every restore writer busy;
    // each with its own mode and mtime.
    for d in 0..4 {
        let dir = root.join(format!("many/d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..150 {
            let p = dir.join(format!("f{i:03}"));
            std::fs::write(&p, format!("file {d}/{i} ").repeat(i + 1)).unwrap();
            std::fs::set_permissions(
                &p,
                std::fs::Permissions::from_mode(0o600 + (i as u32 % 8) * 8),
            )
            .unwrap();
            let t = filetime::FileTime::from_unix_time(1_500_000_000 + i as i64, i as u32);
            filetime::set_file_mtime(&p, t).unwrap();
        }
        let t = filetime::FileTime::from_unix_time(1_400_000_000 + d as i64, 0);
        filetime::set_file_mtime(&dir, t).unwrap();
    }
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    nix::unistd::mkfifo(
        &root.join("a-fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    for (i, p) in ["hello.txt", "docs/big.bin", "docs/nested", "empty-dir"]
        .iter()
        .enumerate()
    {
        let t = filetime::FileTime::from_unix_time(1_600_000_000 + i as i64, 123_456_789);
        filetime::set_file_mtime(root.join(p), t).unwrap();
    }
}

fn phase_outputs(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("###Phase-output###: "))
        .map(|j| {
            let v: serde_json::Value = serde_json::from_str(j).unwrap();
            (
                v["key"].as_str().unwrap().to_string(),
                v["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn files_round_trip_incremental_and_list() {
    let server = Server::start(Storage::Filesystem, &[("client-a", TOKEN)]);
    let client = server.client("client-a", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src);

    let run = client.run(&["backup_files", src.to_str().unwrap(), "daily"]);
    assert!(run.success(), "{}", run.stderr);
    let first = run.json();
    let outputs = phase_outputs(&run.stdout);
    let id = first["snapshot_id"].as_str().unwrap().to_string();
    assert!(
        outputs.contains(&("snapshot_id".to_string(), id.clone())),
        "{outputs:?}"
    );
    assert_eq!(first["tag"], "daily");
    assert_eq!(first["files"], 7 + 600);
    assert!(first["bytes_sent"].as_u64().unwrap() > 3 * 1024 * 1024);

    // Restore by tag and by id: identical trees, modes, mtimes, symlinks, empty dirs, FIFO.
    let out = work.path().join("restored");
    let r = client.ok(&["restore_files", out.to_str().unwrap(), "daily"]);
    assert_eq!(r["snapshot_id"], id.as_str());
    assert_same_tree(&src, &out);
    let out2 = work.path().join("restored-by-id");
    client.ok(&["restore_files", out2.to_str().unwrap(), &id[..12]]);
    assert_same_tree(&src, &out2);
    // Restoring over a restored tree replaces what changed there, and leaves no
    // temporary files.
    std::fs::write(out2.join("many/d1/f007"), b"changed after the restore").unwrap();
    std::fs::remove_file(out2.join("docs/big.bin")).unwrap();
    client.ok(&["restore_files", out2.to_str().unwrap(), &id[..12]]);
    assert_same_tree(&src, &out2);

    // Unchanged data: no file is read again and under 1% of the bytes are sent.
    let second = client.ok(&["backup_files", src.to_str().unwrap(), "daily"]);
    let bytes = second["bytes"].as_u64().unwrap();
    assert_eq!(second["files_unchanged"], second["files"]);
    assert!(
        second["bytes_sent"].as_u64().unwrap() * 100 < bytes,
        "{second}"
    );

    // A changed file is read again.
    std::fs::write(src.join("hello.txt"), b"hello again\n").unwrap();
    let third = client.ok(&["backup_files", src.to_str().unwrap(), "daily"]);
    assert_eq!(third["files_unchanged"].as_u64().unwrap(), 6 + 600);
    let out3 = work.path().join("restored3");
    client.ok(&["restore_files", out3.to_str().unwrap(), "daily"]);
    assert_eq!(
        std::fs::read(out3.join("hello.txt")).unwrap(),
        b"hello again\n"
    );

    let list = client.ok(&["list", "daily"]);
    assert_eq!(list["count"], 3);
    assert_eq!(list["snapshots"][0]["id"], id.as_str());

    // The repository holds no plaintext.
    let mut stack = vec![server.repo_dir()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let data = std::fs::read(e.path()).unwrap();
                assert!(
                    !data.windows(11).any(|w| w == b"lorem ipsum"),
                    "plaintext in {:?}",
                    e.path()
                );
            }
        }
    }
    let (code, metrics) = server.http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("datamover_operations_total{operation=\"backup\",outcome=\"ok\"} 3"),
        "{metrics}"
    );
    assert_eq!(server.http_get("/healthz").unwrap().0, 200);
}

#[test]
fn an_empty_directory_backs_up_and_restores_as_an_empty_directory() {
    // An empty volume (a fresh PVC, a device with nothing to sync yet) is a valid
    // backup: its snapshot has an empty catalog, and restoring it makes the directory.
    let server = Server::start(Storage::Filesystem, &[("client-a", TOKEN)]);
    let client = server.client("client-a", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("empty");
    std::fs::create_dir(&src).unwrap();

    let first = client.ok(&["backup_files", src.to_str().unwrap(), "vol"]);
    assert_eq!(first["files"], 0, "{first}");
    assert_eq!(first["chunks_sent"], 0, "{first}");
    let again = client.ok(&["backup_files", src.to_str().unwrap(), "vol"]);
    assert_ne!(again["snapshot_id"], first["snapshot_id"]);

    let out = work.path().join("restored");
    let r = client.ok(&["restore_files", out.to_str().unwrap(), "vol"]);
    assert_eq!(r["snapshot_id"], again["snapshot_id"], "{r}");
    assert!(out.is_dir(), "the restore makes the directory");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);

    assert_eq!(client.ok(&["list", "vol"])["count"], 2);
    // A target that is a file is refused before anything is written, and kept.
    let file = work.path().join("a-file");
    std::fs::write(&file, b"keep me").unwrap();
    let r = client.run(&["restore_files", file.to_str().unwrap(), "vol"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is not a directory"), "{}", r.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let verify = client.ok(&["verify", "--read-data"]);
    assert_eq!(verify["problems"], 0, "{verify}");

    // Files added later back up on top of the empty snapshot as usual.
    std::fs::write(src.join("later.txt"), b"added after the empty backup").unwrap();
    let third = client.ok(&["backup_files", src.to_str().unwrap(), "vol"]);
    assert_eq!(third["files"], 1, "{third}");
    let out2 = work.path().join("restored2");
    client.ok(&["restore_files", out2.to_str().unwrap(), "vol"]);
    assert_same_tree(&src, &out2);
}

#[test]
fn a_tree_deeper_than_the_open_file_limit_backs_up_and_restores() {
    // The walk holds a few directory levels open; a legal tree deeper than the client's
    // open-file limit (here 128, to keep the tree small; 1,024 is the usual default)
    // must still back up and restore whole.
    use std::os::unix::process::CommandExt;
    let server = Server::start(Storage::Filesystem, &[("client-a", TOKEN)]);
    let client = server.client("client-a", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("deep");
    let mut dir = src.clone();
    for level in 0..300 {
        dir.push("d");
        std::fs::create_dir_all(&dir).unwrap();
        if level % 50 == 0 {
            std::fs::write(dir.join(format!("f{level}")), format!("level {level}")).unwrap();
        }
    }
    std::fs::write(dir.join("bottom"), b"the deepest file").unwrap();
    let limited = |args: &[&str]| {
        let mut c = client.command(args);
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 128,
                    rlim_max: 128,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let r = Run::from(c.stdin(Stdio::null()).output().unwrap());
        assert!(r.success(), "{args:?} with 128 open files: {}", r.stderr);
        r.json()
    };
    let first = limited(&["backup_files", src.to_str().unwrap(), "deep"]);
    assert_eq!(first["files"], 7, "{first}");
    assert_eq!(first["dirs"], 300, "{first}");
    let again = limited(&["backup_files", src.to_str().unwrap(), "deep"]);
    assert_eq!(again["files_unchanged"], 7, "{again}");
    let out = work.path().join("restored");
    limited(&["restore_files", out.to_str().unwrap(), "deep"]);
    assert_same_tree(&src, &out);
}

#[test]
fn one_byte_change_in_a_100_mib_file_sends_under_1_mib() {
    let server = Server::start(Storage::Filesystem, &[("client-a", TOKEN)]);
    let client = server.client("client-a", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut data = random_bytes(42, 100 * 1024 * 1024);
    std::fs::write(src.join("big"), &data).unwrap();
    let first = client.ok(&["backup_files", src.to_str().unwrap(), "big"]);
    assert!(first["bytes_sent"].as_u64().unwrap() >= 100 * 1024 * 1024);
    data[50 * 1024 * 1024 + 12345] ^= 0x5a;
    std::fs::write(src.join("big"), &data).unwrap();
    let second = client.ok(&["backup_files", src.to_str().unwrap(), "big"]);
    let sent = second["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 1024 * 1024,
        "sent {sent} bytes for a one-byte change"
    );
    let out = work.path().join("out");
    client.ok(&["restore_files", out.to_str().unwrap(), "big"]);
    assert!(std::fs::read(out.join("big")).unwrap() == data);
}

#[test]
fn streams_through_named_pipes_and_stdio() {
    let server = Server::start(Storage::Filesystem, &[("db", TOKEN)]);
    let client = server.client("db", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let payload = work.path().join("dump.sql");
    let mut content = Vec::new();
    for i in 0..200_000 {
        content.extend_from_slice(format!("INSERT INTO t VALUES ({i}, 'row {i}');\n").as_bytes());
    }
    content.extend_from_slice(&random_bytes(7, 2 * 1024 * 1024));
    std::fs::write(&payload, &content).unwrap();

    // Backup: a writer process feeds a FIFO, as a DB dump would.
    let fifo = work.path().join("backup.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat '{}' > '{}'",
            payload.display(),
            fifo.display()
        ))
        .spawn()
        .unwrap();
    let b = client.ok(&["backup_stream", fifo.to_str().unwrap(), "pg"]);
    assert!(writer.wait().unwrap().success());
    assert_eq!(b["bytes"].as_u64().unwrap(), content.len() as u64);

    // Restore: a reader process drains another FIFO.
    let rfifo = work.path().join("restore.fifo");
    nix::unistd::mkfifo(&rfifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let restored = work.path().join("restored.sql");
    let mut reader = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat '{}' > '{}'",
            rfifo.display(),
            restored.display()
        ))
        .spawn()
        .unwrap();
    client.ok(&["restore_stream", rfifo.to_str().unwrap(), "pg"]);
    assert!(reader.wait().unwrap().success());
    assert!(std::fs::read(&restored).unwrap() == content);

    // stdin -> stdout.
    let mut child = client
        .command(&["backup_stream", "-", "piped"])
        .stdin(std::fs::File::open(&payload).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let out = client
        .command(&["restore_stream", "-", "piped"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == content,
        "stdout differs ({} bytes)",
        out.stdout.len()
    );
    // The result went to stderr so stdout holds only the stream.
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"snapshot_id\""));

    // Into a regular file (written atomically).
    let file_out = work.path().join("plain.sql");
    client.ok(&["restore_stream", file_out.to_str().unwrap(), "pg"]);
    assert!(std::fs::read(&file_out).unwrap() == content);

    // A stream snapshot cannot be restored as files, and vice versa.
    let r = client.run(&["restore_stream", "-", "nonexistent-tag"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
}

#[test]
fn bad_credentials_pins_and_tags_fail_clearly_without_transfer() {
    let server = Server::start(Storage::Filesystem, &[("client-a", TOKEN)]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), random_bytes(3, 1024 * 1024)).unwrap();

    let wrong = server.client("client-a", "not-the-token");
    let r = wrong.run(&["backup_files", src.to_str().unwrap(), "t"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("credential"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);

    let unknown = server.client("client-zzz", TOKEN);
    assert_eq!(unknown.run(&["list"]).code, 3);

    let mut pinned_wrong = server.client("client-a", TOKEN);
    pinned_wrong.set_env("SERVER_DATA", &"ab".repeat(32));
    let r = pinned_wrong.run(&["backup_files", src.to_str().unwrap(), "t"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("SERVER_DATA"), "{}", r.stderr);

    let client = server.client("client-a", TOKEN);
    let target = work.path().join("never-created");
    let r = client.run(&["restore_files", target.to_str().unwrap(), "no-such-tag"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("no-such-tag") && r.stderr.contains("list"),
        "{}",
        r.stderr
    );
    assert!(!target.exists(), "a failed restore created its target");

    // None of that sent a byte of data.
    let metrics = server.http_get("/metrics").unwrap().1;
    assert!(
        metrics.contains("datamover_bytes_received_total 0"),
        "{metrics}"
    );

    // A base64 form of the right fingerprint works (as Kanister hands it over).
    let mut b64 = server.client("client-a", TOKEN);
    let encoded = {
        use std::io::Write;
        let mut child = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(server.fingerprint.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    b64.set_env("SERVER_DATA", &encoded);
    b64.ok(&["list"]);

    // Usage errors.
    let r = client.run(&["backup_files", "only-one-arg"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("usage"));
    let r = client.run(&["frobnicate"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("unknown mode"));
    let mut no_proto = server.client("client-a", TOKEN);
    no_proto.set_env("PROTOCOLS", "kopia:1234");
    let r = no_proto.run(&["list"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("datamover-v1"), "{}", r.stderr);
}

#[test]
fn command_from_file_runs_each_line() {
    let server = Server::start(Storage::Filesystem, &[("side", TOKEN)]);
    let client = server.client("side", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("data dir");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"sidecar").unwrap();
    let out = work.path().join("out");
    let cmds = work.path().join("commands");
    std::fs::write(
        &cmds,
        format!(
            "# sidecar commands\nfs_backup '{}' side\nrestore_files '{}' side\n",
            src.display(),
            out.display()
        ),
    )
    .unwrap();
    let r = client.run(&["command_from_file", cmds.to_str().unwrap()]);
    assert!(r.success(), "{}", r.stderr);
    assert_eq!(r.stdout.lines().filter(|l| l.starts_with('{')).count(), 2);
    assert_eq!(std::fs::read(out.join("f")).unwrap(), b"sidecar");
}

#[test]
fn restore_gives_the_target_directory_the_snapshots_mode_and_mtime() {
    use std::os::unix::fs::MetadataExt;
    // The top directory is restored like every other one: its mode and mtime come from
    // the snapshot, not from the restore (a new target) or from what was there before
    // (an existing target).
    let server = Server::start(Storage::Filesystem, &[("client-a", TOKEN)]);
    let client = server.client("client-a", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 123_456_789);
    filetime::set_file_mtime(&src, t).unwrap();
    client.ok(&["backup_files", src.to_str().unwrap(), "root-meta"]);

    let fresh = work.path().join("fresh");
    let existing = work.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o700)).unwrap();
    for out in [&fresh, &existing] {
        client.ok(&["restore_files", out.to_str().unwrap(), "root-meta"]);
        let m = std::fs::metadata(out).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o750, "mode of {}", out.display());
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (1_500_000_000, 123_456_789),
            "mtime of {}",
            out.display()
        );
        assert_same_tree(&src, out);
    }
}
