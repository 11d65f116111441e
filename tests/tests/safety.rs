//! Restores never write outside their target, whatever a snapshot holds; an interrupted
//! backup commits nothing; the server refuses bad configuration with one clear line.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use datamover_client::connect;
use datamover_client::settings::ClientSettings;
use datamover_proto::v1::{Node, NodeType};
use datamover_tests::{Server, Storage, bin, free_port};

const TOKEN: &str = "evil-token";

fn settings(server: &Server, id: &str) -> ClientSettings {
    server.client_settings(id, TOKEN)
}

fn file_node(path: &str, chunk: &Bytes, size: u64) -> Node {
    Node {
        path: Bytes::copy_from_slice(path.as_bytes()),
        r#type: NodeType::File as i32,
        mode: 0o644,
        size,
        chunks: vec![chunk.clone()],
        ..Default::default()
    }
}

/// Commits a hand-made snapshot, as a malicious or buggy client could.
async fn commit_crafted(server: &Server, id: &str, tag: &str, outside: &str) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut conn = connect::connect(&settings(server, id)).await.unwrap();
    let content = Bytes::from_static(b"pwned\n");
    let cid = conn.key.id(&content);
    let cid_b = Bytes::copy_from_slice(&cid.0);
    let nodes = vec![
        file_node("../escape-dotdot", &cid_b, 6),
        file_node(&format!("{outside}/escape-absolute"), &cid_b, 6),
        file_node("ok/../../escape-nested", &cid_b, 6),
        Node {
            path: Bytes::from_static(b"link"),
            r#type: NodeType::Symlink as i32,
            link_target: Bytes::copy_from_slice(outside.as_bytes()),
            ..Default::default()
        },
        file_node("link/escape-through-symlink", &cid_b, 6),
        file_node("prelink/escape-through-existing-link", &cid_b, 6),
        file_node("inside.txt", &cid_b, 6),
    ];
    datamover_tests::crafted::commit(&mut conn, tag, &nodes, &[content], Vec::new())
        .await
        .unwrap();
}

#[test]
fn malicious_snapshot_paths_restore_nothing_outside_the_target() {
    let server = Server::start(Storage::Filesystem, &[("evil", TOKEN)]);
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = work.path().join("a/b/target");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(commit_crafted(
        &server,
        "evil",
        "crafted",
        outside.to_str().unwrap(),
    ));

    // The target already holds a symlink pointing outside it.
    std::fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("prelink")).unwrap();

    let client = server.client("evil", TOKEN);
    let r = client.run(&["restore_files", target.to_str().unwrap(), "crafted"]);
    // Three unsafe names, the write below the existing symlink, and the snapshot's
    // symlink "link", which would have to replace the directory its own later entry made:
    // not restored, and the restore fails once the rest is in place.
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(
        r.stderr.contains("5 entries of snapshot") && r.stderr.contains("were not restored"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read(target.join("inside.txt")).unwrap(),
        b"pwned\n"
    );
    // Snapshot symlinks are created last, so "link/…" was written to a real directory
    // inside the target, never through the link.
    assert!(
        std::fs::symlink_metadata(target.join("link"))
            .unwrap()
            .is_dir()
    );
    assert!(target.join("link/escape-through-symlink").is_file());
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote outside the target"
    );
    for p in [
        "a/b/escape-dotdot",
        "a/escape-nested",
        "escape-nested",
        "a/b/target/escape-absolute",
    ] {
        assert!(!work.path().join(p).exists(), "{p} exists");
    }
    // Only the target's own entries exist under a/b.
    let names: Vec<_> = std::fs::read_dir(work.path().join("a/b"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("target")]);
}

#[test]
fn a_backup_interrupted_by_sigterm_commits_no_snapshot() {
    let mut server = Server::start(Storage::Filesystem, &[("c", "tok")]);
    let client = server.client("c", "tok");
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("slow.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // A writer that sends some data, then stalls with the pipe open.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(head -c 3000000 /dev/urandom; sleep 30) > '{}'",
            fifo.display()
        ))
        .spawn()
        .unwrap();
    let backup = client
        .command(&["backup_stream", fifo.to_str().unwrap(), "interrupted"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let status = server.stop(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(status.success(), "server exit on SIGTERM: {status}");
    let out = backup.wait_with_output().unwrap();
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(
        !out.status.success(),
        "the interrupted backup reported success"
    );
    server.spawn();
    let client = server.client("c", "tok");
    let list = client.ok(&["list"]);
    assert_eq!(list["count"], 0, "{list}");
}

fn server_with(files: &[(&str, &str)], env: &[(&str, &str)]) -> (i32, String) {
    let root = tempfile::tempdir().unwrap();
    for (p, c) in files {
        let path = root.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
    let mut cmd = Command::new(bin("datamover-server"));
    cmd.env("DATAMOVER_ROOT", root.path())
        .env("DATAMOVER_LISTEN_HOST", "127.0.0.1")
        .env("DATAMOVER_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("PROTOCOLS", format!("datamover-v1:{}", free_port()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn server_refuses_bad_configuration_with_one_clear_line() {
    let (code, err) = server_with(&[], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("repo-password"), "{err}");

    let pw = ("etc/secrets/repo/repo-password", "pw");
    let (code, err) = server_with(&[pw], &[("PROTOCOLS", "datamover-v1:4000;kopia-v2:4001")]);
    assert_ne!(code, 0);
    assert!(err.contains("kopia-v2"), "{err}");

    let (code, err) = server_with(&[pw, ("etc/config/type", "s3")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("bucket"), "{err}");

    let (code, err) = server_with(&[pw, ("etc/config/type", "tape")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("tape"), "{err}");

    let (code, err) = server_with(
        &[
            pw,
            ("etc/config/type", "s3"),
            ("etc/config/bucket", "b"),
            ("etc/config/endpoint", "http://127.0.0.1:1"),
            ("etc/config/startupAttempts", "1"),
            ("etc/secrets/s3/AWS_ACCESS_KEY_ID", "a"),
            ("etc/secrets/s3/AWS_SECRET_ACCESS_KEY", "b"),
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn a_wrong_repository_password_is_refused() {
    let mut server = Server::start(Storage::Filesystem, &[("c", "tok")]);
    server.stop(nix::sys::signal::Signal::SIGTERM);
    std::fs::write(
        server.root.path().join("etc/secrets/repo/repo-password"),
        "another",
    )
    .unwrap();
    let out = Command::new(bin("datamover-server"))
        .env("DATAMOVER_ROOT", server.root.path())
        .env("DATAMOVER_LISTEN_HOST", "127.0.0.1")
        .env("DATAMOVER_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("PROTOCOLS", format!("datamover-v1:{}", free_port()))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password"), "{err}");
    let _: PathBuf = server.repo_dir();
}
