//! Issue 30, item 5: a restore whose connection drops, or whose server restarts, goes on
//! from where it stopped instead of starting over (files and streams, into a real FIFO);
//! a stream backup interrupted by the server side fails saying that nothing was committed
//! and what to rerun, and the rerun sends only what the server does not have yet.
//!
//! The client goes through a [`FaultProxy`] that cuts its connection after a number of
//! bytes from the server and counts the bytes the server sent.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use datamover_tests::faults::{FaultProxy, Faults};
use datamover_tests::{Client, Server, Storage, assert_same_tree, mkfifo, random_bytes, sh};

const USER: (&str, &str) = ("app", "app-token");
const MIB: u64 = 1024 * 1024;

/// A tree of about 40 MiB: two large files, one medium, and small ones.
fn tree(dir: &Path) -> u64 {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let mut total = 0;
    for (name, seed, len) in [
        ("a.bin", 1, 18 * MIB),
        ("sub/b.bin", 2, 16 * MIB),
        ("c.bin", 3, 5 * MIB),
    ] {
        std::fs::write(dir.join(name), random_bytes(seed, len as usize)).unwrap();
        total += len;
    }
    for i in 0..40u64 {
        let len = 1000 + i * 100;
        std::fs::write(
            dir.join("sub").join(format!("small-{i}")),
            random_bytes(100 + i, len as usize),
        )
        .unwrap();
        total += len;
    }
    total
}

/// A client of `server` that connects through `proxy`.
fn through(server: &Server, proxy: &FaultProxy) -> Client {
    let mut c = server.client(USER.0, USER.1);
    c.set_env("SERVER_URL", &proxy.addr());
    c.set_env("PROTOCOLS", &format!("datamover-v1:{}", proxy.port));
    c.set_env("RUST_LOG", "info");
    c
}

/// No file of the restore is left under a temporary name.
fn no_temporaries(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(".dm-tmp-"),
                "left behind: {}",
                e.path().display()
            );
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

#[test]
fn a_files_restore_cut_mid_way_resumes_and_is_byte_identical() {
    let server = Server::start(Storage::Filesystem, &[USER]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let total = tree(&src);
    server
        .client(USER.0, USER.1)
        .ok(&["backup_files", src.to_str().unwrap(), "t"]);

    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", server.port));
    // The first two connections are cut once the server sent 16 MiB through each:
    // starting over would send 16 + 16 + 40 MiB.
    proxy.cut_downstream(2, 16 * MIB);
    let dst = work.path().join("dst");
    let client = through(&server, &proxy);
    let r = client.run(&["restore_files", dst.to_str().unwrap(), "t"]);
    assert!(r.success(), "restore failed ({}):\n{}", r.code, r.stderr);
    assert_eq!(proxy.cut.load(Ordering::Relaxed), 2, "{}", r.stderr);
    resumed_once_over(&r.stderr, &src, &dst, &proxy, total, "cut twice");
}

/// A files restore that succeeded resumed (it says so), left the same tree and no
/// temporary file, and was not started over: what was in flight when a connection
/// dropped is sent again, nothing more.
fn resumed_once_over(
    stderr: &str,
    src: &Path,
    dst: &Path,
    proxy: &FaultProxy,
    total: u64,
    how: &str,
) {
    assert!(
        stderr.contains("resuming where the connection dropped"),
        "{stderr}"
    );
    assert_same_tree(src, dst);
    no_temporaries(dst);
    let sent = proxy.down_bytes.load(Ordering::Relaxed);
    eprintln!(
        "files restore of {total} bytes {how}: the server sent {sent} bytes ({:.2}x)",
        sent as f64 / total as f64
    );
    assert!(
        sent < total + total / 2,
        "the server sent {sent} bytes for {total}: the restore started over"
    );
}

/// A server whose certificate stays the same across restarts (a TLS secret).
fn server_with_fixed_certificate() -> Server {
    let root = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    datamover_tests::write(
        &root.path().join("etc/secrets/tls/tls.crt"),
        ck.cert.pem().as_bytes(),
    );
    datamover_tests::write(
        &root.path().join("etc/secrets/tls/tls.key"),
        ck.key_pair.serialize_pem().as_bytes(),
    );
    Server::start_in(root, Storage::Filesystem, &[USER])
}

#[test]
fn a_files_restore_goes_on_across_a_server_restart() {
    let mut server = server_with_fixed_certificate();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let total = tree(&src);
    server
        .client(USER.0, USER.1)
        .ok(&["backup_files", src.to_str().unwrap(), "t"]);

    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", server.port));
    // Slow enough (64 KiB reads, 2 ms each) to kill the server in the middle.
    proxy.set(Faults {
        delay: Duration::from_millis(2),
        ..Faults::default()
    });
    let dst = work.path().join("dst");
    let client = through(&server, &proxy);
    let restore = client
        .command(&["restore_files", dst.to_str().unwrap(), "t"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.down_bytes.load(Ordering::Relaxed) < 15 * MIB {
        assert!(Instant::now() < deadline, "the restore does not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let fingerprint = server.fingerprint.clone();
    server.stop(nix::sys::signal::Signal::SIGKILL);
    proxy.cut_all();
    server.spawn();
    assert_eq!(server.fingerprint, fingerprint, "the certificate changed");
    proxy.set_upstream(&format!("127.0.0.1:{}", server.port));
    let out = restore.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore failed:\n{stderr}");
    resumed_once_over(
        &stderr,
        &src,
        &dst,
        &proxy,
        total,
        "across a server restart",
    );
}

#[test]
fn a_stream_restore_into_a_fifo_cut_mid_way_gives_the_same_bytes() {
    let server = Server::start(Storage::Filesystem, &[USER]);
    let work = tempfile::tempdir().unwrap();
    let dump = work.path().join("dump.bin");
    let data = random_bytes(7, 40 * MIB as usize);
    std::fs::write(&dump, &data).unwrap();
    server
        .client(USER.0, USER.1)
        .ok(&["backup_stream", dump.to_str().unwrap(), "db"]);

    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", server.port));
    proxy.cut_downstream(2, 17 * MIB);
    let fifo = work.path().join("out.fifo");
    mkfifo(&fifo);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::open(&fifo).unwrap();
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut len = 0u64;
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            (len, hasher.finalize())
        })
    };
    let client = through(&server, &proxy);
    let r = client.run(&["restore_stream", fifo.to_str().unwrap(), "db"]);
    let (len, hash) = reader.join().unwrap();
    assert!(r.success(), "restore failed ({}):\n{}", r.code, r.stderr);
    assert_eq!(proxy.cut.load(Ordering::Relaxed), 2, "{}", r.stderr);
    assert_eq!(len, data.len() as u64, "the reader got another length");
    assert_eq!(hash, blake3::hash(&data), "the reader got other bytes");
    let sent = proxy.down_bytes.load(Ordering::Relaxed);
    eprintln!(
        "stream restore of {} bytes cut twice: the server sent {sent} bytes ({:.2}x)",
        data.len(),
        sent as f64 / data.len() as f64
    );
    assert!(sent < data.len() as u64 * 3 / 2, "the server sent {sent}");
}

#[test]
fn a_stream_backup_cut_by_the_server_says_what_to_rerun_and_the_rerun_reuses_chunks() {
    let server = Server::start(Storage::Filesystem, &[USER]);
    let work = tempfile::tempdir().unwrap();
    let dump = work.path().join("dump.bin");
    let data = random_bytes(9, 40 * MIB as usize);
    std::fs::write(&dump, &data).unwrap();
    let fifo = work.path().join("dump.fifo");
    mkfifo(&fifo);
    let feed = || sh(&format!("cat '{}' > '{}'", dump.display(), fifo.display()));

    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", server.port));
    proxy.set(Faults {
        cut_every: 1,
        cut_after: 24 * MIB,
        ..Faults::default()
    });
    let client = through(&server, &proxy);
    let mut writer = feed();
    let r = client.run(&["backup_stream", fifo.to_str().unwrap(), "db"]);
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(!r.success(), "the backup did not fail:\n{}", r.stdout);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(proxy.cut.load(Ordering::Relaxed) >= 1);
    let line = r
        .stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(line.contains("not committed"), "{}", r.stderr);
    assert!(
        line.contains(&format!(
            "datamover-client backup_stream {} db",
            fifo.display()
        )),
        "{}",
        r.stderr
    );

    // Nothing committed: there is no snapshot with the tag.
    let direct = server.client(USER.0, USER.1);
    let none = direct.run(&[
        "restore_stream",
        work.path().join("x").to_str().unwrap(),
        "db",
    ]);
    assert_eq!(none.code, 4, "a snapshot was committed:\n{}", none.stderr);

    // The rerun, as the message says: the dump and the backup again.
    let mut writer = feed();
    let again = direct.ok(&["backup_stream", fifo.to_str().unwrap(), "db"]);
    let _ = writer.wait();
    let sent = again["bytes_sent"].as_u64().unwrap();
    eprintln!(
        "stream backup rerun after a cut at 24 MiB of {}: {sent} bytes sent",
        data.len()
    );
    assert!(
        sent < data.len() as u64 * 3 / 4,
        "the rerun sent {sent} of {} bytes: chunks stored before the cut were sent again",
        data.len()
    );
    let out = work.path().join("out.bin");
    direct.ok(&["restore_stream", out.to_str().unwrap(), "db"]);
    assert!(
        std::fs::read(&out).unwrap() == data,
        "the rerun's snapshot differs"
    );
}
