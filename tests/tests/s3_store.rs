//! End-to-end against a real S3 server: Garage on loopback, started by the test.

use std::process::{Command, Stdio};

use datamover_tests::{Garage, Server, Storage, assert_same_tree, random_bytes};

#[test]
fn all_modes_against_garage() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let server = Server::start(
        Storage::S3 {
            garage: &g,
            bucket: &g.bucket,
            prefix: "team-a/repo",
        },
        &[("edge-1", "edge-token")],
    );
    let client = server.client("edge-1", "edge-token");
    let work = tempfile::tempdir().unwrap();

    // Files: round trip, then an unchanged re-backup that sends almost nothing.
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("sub/empty")).unwrap();
    for i in 0..200 {
        std::fs::write(
            src.join(format!("sub/small-{i}")),
            format!("file number {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    std::fs::write(src.join("large"), random_bytes(11, 20 * 1024 * 1024)).unwrap();
    std::os::unix::fs::symlink("large", src.join("link")).unwrap();
    let first = client.ok(&["backup_files", src.to_str().unwrap(), "edge"]);
    assert_eq!(first["files"], 201);
    let out = work.path().join("out");
    client.ok(&["restore_files", out.to_str().unwrap(), "edge"]);
    assert_same_tree(&src, &out);
    let second = client.ok(&["backup_files", src.to_str().unwrap(), "edge"]);
    assert!(second["bytes_sent"].as_u64().unwrap() * 100 < second["bytes"].as_u64().unwrap());

    // Streams: a FIFO with a writer process, and stdin -> stdout.
    let content = random_bytes(12, 5 * 1024 * 1024);
    let payload = work.path().join("payload");
    std::fs::write(&payload, &content).unwrap();
    let fifo = work.path().join("in.fifo");
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
    client.ok(&["backup_stream", fifo.to_str().unwrap(), "dump"]);
    assert!(writer.wait().unwrap().success());
    let rfifo = work.path().join("out.fifo");
    nix::unistd::mkfifo(&rfifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let restored = work.path().join("restored");
    let mut reader = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat '{}' > '{}'",
            rfifo.display(),
            restored.display()
        ))
        .spawn()
        .unwrap();
    client.ok(&["restore_stream", rfifo.to_str().unwrap(), "dump"]);
    assert!(reader.wait().unwrap().success());
    assert!(std::fs::read(&restored).unwrap() == content);

    let status = client
        .command(&["backup_stream", "-", "stdin-dump"])
        .stdin(std::fs::File::open(&payload).unwrap())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let out = client
        .command(&["restore_stream", "-", "stdin-dump"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == content);

    // Unknown tag: clear error.
    let r = client.run(&["restore_stream", "-", "missing"]);
    assert_eq!(r.code, 4, "{}", r.stderr);

    // The data landed in the bucket under the prefix, in packs of megabytes.
    let log = server.log();
    assert!(log.contains("s3:"), "{log}");
}
