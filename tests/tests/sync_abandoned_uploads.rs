//! Maintenance aborts the multipart uploads edge devices started and abandoned (issue 30,
//! item 5): the real server and client binaries, an egress interrupted with SIGKILL, on
//! Garage (its multipart uploads listed with an S3 client of our own) and on the
//! filesystem store (its parts directory).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use datamover_tests::edge::{n, wait_parts};
use datamover_tests::{Client, Garage, Server, Storage, random_bytes, write};

const PREFIX: &str = "fleet";

/// Starts an egress of `src` at 16 MiB/s, waits until three parts are stored, and
/// kills the client (SIGKILL): the upload stays unfinished on the server.
fn interrupted_egress(client: &Client, server: &Server, src: &str) {
    let mut child = client
        .command(&["sync_egress", src, "t", "--once", "--bwlimit", "16MiB"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_parts(server, 3);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = child.wait();
}

/// What the store holds of unfinished uploads: multipart uploads in progress.
type Pending<'a> = &'a dyn Fn(&Server) -> usize;

/// The edge-sync upload records (in the sync root, `.datamover/uploads/`).
type Records<'a> = &'a dyn Fn(&Server) -> usize;

fn set_max_age(server: &mut Server, age: &str) {
    server.stop(nix::sys::signal::Signal::SIGTERM);
    write(
        &server.root.path().join("etc/config/s3UploadMaxAge"),
        age.as_bytes(),
    );
    server.spawn();
}

fn abandoned_uploads(storage: Storage<'_>, pending: Pending<'_>, records: Records<'_>) {
    let mut server = Server::start_configured(
        storage,
        &[("dev-1", "tok-1"), ("admin", "admin-token")],
        &[("s3UploadMaxAge", "3s"), ("roles", "admin=admin")],
    );
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let src_s = src.to_str().unwrap();
    let content = random_bytes(11, 48 * 1024 * 1024);
    write(&src.join("huge.bin"), &content);

    // Abandoned: a dry run finds it and leaves it; maintenance aborts it and removes
    // its record.
    let client = server.client("dev-1", "tok-1");
    interrupted_egress(&client, &server, src_s);
    assert_eq!(pending(&server), 1, "one unfinished upload in the store");
    assert_eq!(records(&server), 1, "one upload record");
    std::thread::sleep(Duration::from_secs(4));
    let admin = server.client("admin", "admin-token");
    admin.ok(&["maintenance", "--dry-run"]);
    assert!(
        server.log().contains(
            "edge-sync uploads without a new part for longer than s3UploadMaxAge found (dry run"
        ),
        "a dry run says what it found:\n{}",
        server.log()
    );
    assert_eq!(pending(&server), 1, "a dry run aborts nothing");
    assert_eq!(records(&server), 1, "a dry run removes nothing");
    admin.ok(&["maintenance"]);
    assert_eq!(pending(&server), 0, "the parts are gone:\n{}", server.log());
    assert_eq!(records(&server), 0, "the record is gone");
    assert!(
        server.log().contains(
            "edge-sync uploads without a new part for longer than s3UploadMaxAge aborted"
        ),
        "maintenance says what it aborted"
    );
    assert!(server.log().contains("sync_uploads_expired=1"));

    // The device comes back: it sends the file from the start.
    let r = client.ok(&["sync_egress", src_s, "t", "--once"]);
    assert_eq!(n(&r, "files_sent"), 1, "{r}");
    assert_eq!(n(&r, "bytes_sent"), content.len() as u64, "{r}");

    // Younger than a large age: left alone, and the device resumes it.
    set_max_age(&mut server, "1h");
    let client = server.client("dev-1", "tok-1");
    let admin = server.client("admin", "admin-token");
    let changed = random_bytes(12, content.len());
    write(&src.join("huge.bin"), &changed);
    interrupted_egress(&client, &server, src_s);
    std::thread::sleep(Duration::from_secs(4));
    admin.ok(&["maintenance"]);
    assert_eq!(pending(&server), 1, "a young upload is left alone");
    assert_eq!(records(&server), 1, "its record too");
    let r = client.ok(&["sync_egress", src_s, "t", "--once"]);
    assert_eq!(n(&r, "files_sent"), 1, "{r}");
    assert!(
        n(&r, "bytes_sent") <= changed.len() as u64 - 16 * 1024 * 1024,
        "resumed, not sent again from the start: {r}"
    );
    assert_eq!(pending(&server), 0, "completed");
    assert_eq!(records(&server), 0, "and its record removed");
    let dst = work.path().join("dst");
    client.ok(&["sync_ingress", "t", dst.to_str().unwrap(), "--once"]);
    assert!(
        std::fs::read(dst.join("huge.bin")).unwrap() == changed,
        "the resumed upload is the file"
    );
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn fs_sync_root(server: &Server) -> PathBuf {
    server.repo_dir().join("sync")
}

#[test]
fn abandoned_sync_uploads_are_aborted_on_the_filesystem_store() {
    abandoned_uploads(
        Storage::Filesystem,
        &|s| entries(&fs_sync_root(s).join(".datamover/multipart")),
        &|s| entries(&fs_sync_root(s).join(".datamover/uploads")),
    );
}

#[test]
fn abandoned_sync_uploads_are_aborted_on_garage() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(g.region.clone()))
        .endpoint_url(&g.endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            &g.access_key,
            &g.secret_key,
            None,
            None,
            "test",
        ))
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(conf);
    let pending = |_: &Server| {
        rt.block_on(
            s3.list_multipart_uploads()
                .bucket(&g.bucket)
                .prefix(format!("{PREFIX}/sync/"))
                .send(),
        )
        .unwrap()
        .uploads()
        .len()
    };
    let records = |_: &Server| {
        rt.block_on(
            s3.list_objects_v2()
                .bucket(&g.bucket)
                .prefix(format!("{PREFIX}/sync/.datamover/uploads/"))
                .send(),
        )
        .unwrap()
        .contents()
        .len()
    };
    abandoned_uploads(
        Storage::S3 {
            garage: &g,
            bucket: &g.bucket,
            prefix: PREFIX,
        },
        &pending,
        &records,
    );
}
