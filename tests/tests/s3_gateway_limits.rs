//! The S3 gateway's boundaries: bucket names owned across tenants (aws-sdk-s3 and the AWS
//! CLI), multipart uploads that survive a restart and expire in maintenance, the
//! per-client rate limit (SlowDown) and refused signatures slowed down.

use std::time::{Duration, Instant};

use aws_sdk_s3::Client as S3Client;
use aws_sdk_s3::primitives::ByteStream;
use datamover_tests::gateway::{Gateway, code, tool};
use datamover_tests::{Garage, Storage, random_bytes, write};

/// Every object of a bucket with its bytes, as `c` reads it.
fn contents(g: &Gateway, c: &S3Client, bucket: &str) -> Vec<(String, Vec<u8>)> {
    g.keys(c, bucket, "")
        .unwrap()
        .into_iter()
        .map(|k| {
            let data = g.get(c, bucket, &k, None).unwrap();
            (k, data)
        })
        .collect()
}

#[test]
fn another_tenant_gets_access_denied_on_a_bucket_and_changes_nothing() {
    let g = Gateway::start(
        Storage::Filesystem,
        &[
            ("alice", "alice-token"),
            ("alice2", "alice2-token"),
            ("bob", "bob-token"),
        ],
        &[("tenants", "alice=team-a\nalice2=team-a\nbob=team-b")],
    );
    let alice = g.client("alice", "alice-token");
    let alice2 = g.client("alice2", "alice2-token");
    let bob = g.client("bob", "bob-token");
    g.create_bucket(&alice, "reports").unwrap();
    g.put(&alice, "reports", "q1.txt", b"first quarter")
        .unwrap();
    g.put(&alice, "reports", "dir/q2.txt", b"second quarter")
        .unwrap();
    g.create_bucket(&alice, "empty-one").unwrap();
    let before = contents(&g, &alice, "reports");

    // Every operation of another tenant on the bucket: AccessDenied.
    let denied = "AccessDenied".to_string();
    assert_eq!(g.get(&bob, "reports", "q1.txt", None), Err(denied.clone()));
    assert_eq!(g.keys(&bob, "reports", ""), Err(denied.clone()));
    assert_eq!(
        g.put(&bob, "reports", "q1.txt", b"bob's"),
        Err(denied.clone())
    );
    assert_eq!(
        g.put(&bob, "reports", "new.txt", b"bob's"),
        Err(denied.clone())
    );
    assert_eq!(g.delete(&bob, "reports", "q1.txt"), Err(denied));
    g.rt.block_on(async {
        let head = bob
            .head_object()
            .bucket("reports")
            .key("q1.txt")
            .send()
            .await;
        assert!(head.is_err(), "HeadObject of another tenant's object");
        let up = bob
            .create_multipart_upload()
            .bucket("reports")
            .key("big")
            .send()
            .await
            .map_err(code);
        assert_eq!(up.err().as_deref(), Some("AccessDenied"));
        let copy = bob
            .copy_object()
            .bucket("bobs")
            .key("stolen")
            .copy_source("reports/q1.txt")
            .send()
            .await
            .map_err(code);
        assert_eq!(copy.err().as_deref(), Some("AccessDenied"));
        let del = bob
            .delete_bucket()
            .bucket("empty-one")
            .send()
            .await
            .map_err(code);
        assert_eq!(del.err().as_deref(), Some("AccessDenied"));
    });
    assert_eq!(
        g.create_bucket(&bob, "reports"),
        Err("BucketAlreadyExists".to_string())
    );
    assert_eq!(
        g.create_bucket(&bob, "empty-one"),
        Err("BucketAlreadyExists".to_string())
    );

    // ListBuckets shows each tenant its own only.
    g.put(&bob, "bobs", "mine.txt", b"bob's own").unwrap();
    assert_eq!(g.buckets(&alice).unwrap(), ["empty-one", "reports"]);
    assert_eq!(g.buckets(&bob).unwrap(), ["bobs"]);
    assert_eq!(
        g.get(&alice, "bobs", "mine.txt", None),
        Err("AccessDenied".to_string())
    );

    // Nothing of the owner's changed; its tenant's other client has the same bucket.
    assert_eq!(contents(&g, &alice, "reports"), before);
    assert_eq!(contents(&g, &alice2, "reports"), before);
    assert!(!g.server.log().contains("bob's"), "no content in the log");

    // The owner is recorded in the store: a restarted server agrees.
    let grpc = g.server.port;
    let mut g = g;
    g.server.stop(nix::sys::signal::Signal::SIGTERM);
    g.server.spawn();
    g.server.port = grpc;
    assert_eq!(
        g.get(&bob, "reports", "q1.txt", None),
        Err("AccessDenied".to_string())
    );
    assert_eq!(contents(&g, &alice, "reports"), before);

    // A deleted bucket's name is free again.
    g.rt.block_on(async {
        alice
            .delete_bucket()
            .bucket("empty-one")
            .send()
            .await
            .unwrap();
    });
    g.create_bucket(&bob, "empty-one").unwrap();
    assert_eq!(g.buckets(&bob).unwrap(), ["bobs", "empty-one"]);
}

#[test]
fn another_tenant_gets_access_denied_through_the_aws_cli() {
    let Some(aws) = tool("aws") else {
        return;
    };
    let g = Gateway::start(
        Storage::Filesystem,
        &[("alice", "alice-token"), ("bob", "bob-token")],
        &[],
    );
    let alice = g.client("alice", "alice-token");
    g.put(&alice, "shared-name", "secret.txt", b"alice only")
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let ca = work.path().join("ca.pem");
    write(&ca, g.ca_pem.as_bytes());
    write(&work.path().join("upload.txt"), b"from bob");
    let aws_as_bob = |args: &[&str]| {
        let out = std::process::Command::new(&aws)
            .env("AWS_ACCESS_KEY_ID", "bob")
            .env("AWS_SECRET_ACCESS_KEY", g.secret("bob", "bob-token"))
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CA_BUNDLE", &ca)
            .env("AWS_CONFIG_FILE", work.path().join("aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                work.path().join("aws-credentials"),
            )
            .env("AWS_MAX_ATTEMPTS", "1")
            .env_remove("AWS_PROFILE")
            .args(["--endpoint-url", &g.endpoint()])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        vec!["s3", "ls", "s3://shared-name/"],
        vec!["s3", "cp", "s3://shared-name/secret.txt", "-"],
        vec![
            "s3",
            "cp",
            work.path().join("upload.txt").to_str().unwrap(),
            "s3://shared-name/secret.txt",
        ],
        vec!["s3", "rm", "s3://shared-name/secret.txt"],
    ] {
        let (ok, stdout, stderr) = aws_as_bob(&args);
        assert!(!ok, "{args:?} succeeded for another tenant: {stdout}");
        // (A download starts with HeadObject, whose answer has no body: 403 only.)
        assert!(
            stderr.contains("AccessDenied") || (args[1] == "cp" && stderr.contains("(403)")),
            "{args:?}: no AccessDenied in {stderr}"
        );
        assert!(!stdout.contains("alice only"), "{args:?} leaked the object");
    }
    let (ok, _, stderr) = aws_as_bob(&["s3", "mb", "s3://shared-name"]);
    assert!(!ok && stderr.contains("BucketAlreadyExists"), "{stderr}");
    let (ok, stdout, _) = aws_as_bob(&["s3", "ls"]);
    assert!(ok && !stdout.contains("shared-name"), "{stdout}");
    assert_eq!(g.keys(&alice, "shared-name", "").unwrap(), ["secret.txt"]);
    assert_eq!(
        g.get(&alice, "shared-name", "secret.txt", None).unwrap(),
        b"alice only"
    );
}

#[test]
fn edge_sync_targets_are_their_tenants_buckets() {
    let g = Gateway::start(
        Storage::Filesystem,
        &[("dev", "dev-token"), ("other", "other-token")],
        &[],
    );
    let dev = g.client("dev", "dev-token");
    let other = g.client("other", "other-token");
    // Written as edge sync wrote before buckets had owners: objects only, no record. The
    // tenant whose namespace holds them owns the name at its first S3 request.
    let legacy = g.server.repo_dir().join("sync/dev/site-b");
    write(&legacy.join("a.txt"), b"from before");
    assert_eq!(
        g.get(&dev, "site-b", "a.txt", None).unwrap(),
        b"from before"
    );
    assert_eq!(
        g.put(&other, "site-b", "x", b"x"),
        Err("AccessDenied".to_string())
    );
    assert_eq!(
        g.create_bucket(&other, "site-b"),
        Err("BucketAlreadyExists".to_string())
    );

    // Another tenant writing first to a legacy target's name finds it taken: the
    // namespaces of the known tenants are looked at before a free name is given.
    write(
        &g.server.repo_dir().join("sync/dev/site-d/old.txt"),
        b"older still",
    );
    assert_eq!(
        g.put(&other, "site-d", "x", b"x"),
        Err("AccessDenied".to_string())
    );
    assert_eq!(
        g.get(&dev, "site-d", "old.txt", None).unwrap(),
        b"older still"
    );
    assert_eq!(g.keys(&dev, "site-d", "").unwrap(), ["old.txt"]);

    // A target edge sync writes now is recorded as its tenant's at once.
    let src = tempfile::tempdir().unwrap();
    write(&src.path().join("b.txt"), b"synced");
    g.server.client("dev", "dev-token").ok(&[
        "sync_egress",
        src.path().to_str().unwrap(),
        "site-c",
        "--once",
    ]);
    assert_eq!(
        g.keys(&other, "site-c", ""),
        Err("AccessDenied".to_string())
    );
    assert_eq!(g.buckets(&dev).unwrap(), ["site-b", "site-c", "site-d"]);
    assert_eq!(g.get(&dev, "site-c", "b.txt", None).unwrap(), b"synced");
    assert!(g.buckets(&other).unwrap().is_empty());
}

/// Starts an upload with one part: its id and the part's etag.
fn start_upload(
    g: &Gateway,
    c: &S3Client,
    bucket: &str,
    key: &str,
    part: &[u8],
) -> (String, String) {
    let id = g.create_upload(c, bucket, key).unwrap();
    let etag = g.upload_part(c, (bucket, key, &id), 1, part).unwrap();
    (id, etag)
}

fn uploads(g: &Gateway, c: &S3Client, bucket: &str) -> Vec<(String, String)> {
    g.uploads(c, bucket).unwrap()
}

fn upload_survives_a_restart(storage: Storage<'_>) {
    let mut g = Gateway::start(
        storage,
        &[("alice", "alice-token"), ("bob", "bob-token")],
        &[],
    );
    let c = g.client("alice", "alice-token");
    let part1 = random_bytes(21, 5 * 1024 * 1024);
    let part2 = random_bytes(22, 1234);
    let (id, etag1) = start_upload(&g, &c, "uploads", "big.bin", &part1);
    let (other_id, _) = start_upload(&g, &c, "uploads", "dropped.bin", b"x");
    let mut listed = uploads(&g, &c, "uploads");
    listed.sort();
    let mut expected = vec![
        ("big.bin".to_string(), id.clone()),
        ("dropped.bin".to_string(), other_id.clone()),
    ];
    expected.sort();
    assert_eq!(listed, expected);

    let grpc = g.server.port;
    g.server.stop(nix::sys::signal::Signal::SIGTERM);
    g.server.spawn();
    g.server.port = grpc;

    assert_eq!(
        uploads(&g, &c, "uploads").len(),
        2,
        "known after the restart"
    );
    let bob = g.client("bob", "bob-token");
    assert_eq!(g.uploads(&bob, "uploads"), Err("AccessDenied".to_string()));
    let big = ("uploads", "big.bin", id.as_str());
    let etag2 = g.upload_part(&c, big, 2, &part2).unwrap();
    assert_eq!(g.parts(&c, big).unwrap().len(), 2);
    g.complete_upload(&c, big, &[(1, etag1), (2, etag2)])
        .unwrap();
    g.abort_upload(&c, ("uploads", "dropped.bin", &other_id))
        .unwrap();
    let mut whole = part1;
    whole.extend_from_slice(&part2);
    assert!(g.get(&c, "uploads", "big.bin", None).unwrap() == whole);
    assert_eq!(g.keys(&c, "uploads", "").unwrap(), ["big.bin"]);
    assert!(uploads(&g, &c, "uploads").is_empty());
}

#[test]
fn a_multipart_upload_survives_a_restart_on_the_filesystem_store() {
    upload_survives_a_restart(Storage::Filesystem);
}

#[test]
fn a_multipart_upload_survives_a_restart_on_garage() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    upload_survives_a_restart(Storage::S3 {
        garage: &garage,
        bucket: &garage.bucket,
        prefix: "gw",
    });
}

#[test]
fn maintenance_aborts_uploads_older_than_the_set_age() {
    let g = Gateway::start(
        Storage::Filesystem,
        &[("alice", "alice-token"), ("admin", "admin-token")],
        &[("s3UploadMaxAge", "3s"), ("roles", "admin=admin")],
    );
    let c = g.client("alice", "alice-token");
    let (old, _) = start_upload(&g, &c, "bucket-one", "old.bin", &random_bytes(3, 100_000));
    let parts_dir = g.server.repo_dir().join("sync/.datamover/multipart");
    assert_eq!(std::fs::read_dir(&parts_dir).unwrap().count(), 1);
    std::thread::sleep(Duration::from_secs(5));
    let (young, _) = start_upload(&g, &c, "bucket-one", "young.bin", b"y");
    let admin = g.server.client("admin", "admin-token");
    let r = admin.run(&["maintenance"]);
    assert!(r.success(), "maintenance failed: {}", r.stderr);
    assert_eq!(
        uploads(&g, &c, "bucket-one"),
        [("young.bin".to_string(), young.clone())],
        "{}",
        g.server.log()
    );
    // The old upload's parts are gone from the store, and it can no longer complete.
    assert_eq!(std::fs::read_dir(&parts_dir).unwrap().count(), 1);
    assert_eq!(
        g.complete_upload(&c, ("bucket-one", "old.bin", &old), &[(1, "x".to_string())]),
        Err("NoSuchUpload".to_string())
    );
    assert!(
        g.server.log().contains("older than s3UploadMaxAge aborted"),
        "maintenance logs what it aborted"
    );
}

#[test]
fn a_flooding_client_gets_slow_down_and_another_is_served() {
    let g = Gateway::start_with_env(
        Storage::Filesystem,
        &[("flood", "flood-token"), ("quiet", "quiet-token")],
        &[],
        &[
            ("DATAMOVER_CLIENT_RATE", "5"),
            ("DATAMOVER_CLIENT_BURST", "10"),
        ],
    );
    let flood = g.client("flood", "flood-token");
    let quiet = g.client("quiet", "quiet-token");
    g.put(&quiet, "calm", "k", b"v").unwrap();
    let mut slowed = None;
    for i in 0..60 {
        match g.rt.block_on(async {
            flood
                .put_object()
                .bucket("noisy")
                .key(format!("k{i}"))
                .body(ByteStream::from_static(b"x"))
                .send()
                .await
        }) {
            Ok(_) => {}
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let message = aws_sdk_s3::error::ProvideErrorMetadata::message(&e)
                    .unwrap_or_default()
                    .to_string();
                slowed = Some((code(e), status, message));
                break;
            }
        }
    }
    let (code_, status, message) = slowed.expect("60 requests at once were never slowed down");
    assert_eq!(code_, "SlowDown");
    assert_eq!(status, Some(503));
    assert!(
        message.contains("DATAMOVER_CLIENT_RATE") && message.contains("slow down"),
        "{message}"
    );
    // The other client still works at once.
    for i in 0..5 {
        assert_eq!(
            g.get(&quiet, "calm", "k", None).unwrap(),
            b"v",
            "request {i}"
        );
    }
}

#[test]
fn refused_signatures_are_slowed_down_and_a_good_client_is_not() {
    let g = Gateway::start(
        Storage::Filesystem,
        &[("alice", "alice-token"), ("bob", "bob-token")],
        &[],
    );
    let good = g.client("bob", "bob-token");
    g.put(&good, "box", "k", b"v").unwrap();
    let wrong = g.client_with_secret("alice", "not-the-secret");
    let mut times = Vec::new();
    for _ in 0..8 {
        let t = Instant::now();
        assert_eq!(
            g.put(&wrong, "box", "k", b"x"),
            Err("SignatureDoesNotMatch".to_string())
        );
        times.push(t.elapsed());
    }
    // Three free failures, then 100, 200, 400, 800 and 1600 ms.
    assert!(
        times[..3].iter().all(|t| *t < Duration::from_millis(100)),
        "{times:?}"
    );
    assert!(times[4] >= Duration::from_millis(200), "{times:?}");
    assert!(times[7] >= Duration::from_millis(1600), "{times:?}");
    assert!(g.server.log().contains("repeated refused signatures"));
    // A correct client is answered at once, and nothing was written by the wrong one.
    let t = Instant::now();
    assert_eq!(g.get(&good, "box", "k", None).unwrap(), b"v");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn list_multipart_uploads_pages_and_folds() {
    let g = Gateway::start(Storage::Filesystem, &[("alice", "alice-token")], &[]);
    let c = g.client("alice", "alice-token");
    for key in ["a.bin", "b.bin", "dir/c.bin", "dir/d.bin"] {
        start_upload(&g, &c, "paged", key, b"p");
    }
    g.rt.block_on(async {
        let first = c
            .list_multipart_uploads()
            .bucket("paged")
            .max_uploads(2)
            .send()
            .await
            .unwrap();
        let keys: Vec<&str> = first.uploads().iter().filter_map(|u| u.key()).collect();
        assert_eq!(keys, ["a.bin", "b.bin"]);
        assert_eq!(first.is_truncated(), Some(true));
        let rest = c
            .list_multipart_uploads()
            .bucket("paged")
            .key_marker(first.next_key_marker().unwrap())
            .upload_id_marker(first.next_upload_id_marker().unwrap())
            .send()
            .await
            .unwrap();
        let keys: Vec<&str> = rest.uploads().iter().filter_map(|u| u.key()).collect();
        assert_eq!(keys, ["dir/c.bin", "dir/d.bin"]);
        assert_eq!(rest.is_truncated(), Some(false));
        let folded = c
            .list_multipart_uploads()
            .bucket("paged")
            .delimiter("/")
            .send()
            .await
            .unwrap();
        let keys: Vec<&str> = folded.uploads().iter().filter_map(|u| u.key()).collect();
        assert_eq!(keys, ["a.bin", "b.bin"]);
        let prefixes: Vec<&str> = folded
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix())
            .collect();
        assert_eq!(prefixes, ["dir/"]);
        let inside = c
            .list_multipart_uploads()
            .bucket("paged")
            .prefix("dir/")
            .send()
            .await
            .unwrap();
        assert_eq!(inside.uploads().len(), 2);
    });
}
