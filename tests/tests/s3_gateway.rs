//! The S3 gateway end to end: the real server binary with `PROTOCOLS=…;s3:<port>`, real S3
//! clients (aws-sdk-s3, rclone and the AWS CLI) over TLS with a per-client key, on the
//! filesystem store and on Garage.

use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client as S3Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use datamover_tests::gateway::{Gateway, code, tool};
use datamover_tests::{Garage, Server, Storage, random_bytes, write};

fn multipart(g: &Gateway, c: &S3Client, bucket: &str, key: &str, parts: &[Vec<u8>]) {
    let id = g.create_upload(c, bucket, key).unwrap();
    let up = (bucket, key, id.as_str());
    let mut done = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let n = i as i32 + 1;
        done.push((n, g.upload_part(c, up, n, p).unwrap()));
    }
    let listed = g.parts(c, up).unwrap();
    assert_eq!(listed.len(), parts.len());
    assert_eq!(
        listed[0].1,
        parts[0].len() as i64,
        "ListParts shows the parts' sizes"
    );
    g.complete_upload(c, up, &done).unwrap();
}

/// Put, list, get (whole and ranges), head, multipart, copy, delete: what a client sees.
fn round_trip(g: &Gateway, c: &S3Client) {
    let small = random_bytes(1, 1000);
    let big = random_bytes(2, 21 * 1024 * 1024 + 17);
    g.put(c, "photos", "a/small.bin", &small).unwrap();
    g.put(c, "photos", "a/b/big.bin", &big).unwrap();
    g.put(c, "photos", "top.txt", b"top").unwrap();
    g.put(c, "photos", "empty", b"").unwrap();
    assert_eq!(g.get(c, "photos", "a/small.bin", None).unwrap(), small);
    assert!(
        g.get(c, "photos", "a/b/big.bin", None).unwrap() == big,
        "a streamed 21 MiB object reads back the same"
    );
    assert_eq!(g.get(c, "photos", "empty", None).unwrap(), b"");
    assert_eq!(
        g.get(c, "photos", "a/b/big.bin", Some("bytes=100-199"))
            .unwrap(),
        big[100..200]
    );
    assert_eq!(
        g.get(c, "photos", "a/b/big.bin", Some("bytes=-10"))
            .unwrap(),
        big[big.len() - 10..]
    );
    assert_eq!(
        g.get(
            c,
            "photos",
            "a/b/big.bin",
            Some(&format!("bytes={}-", 9 * 1024 * 1024))
        )
        .unwrap(),
        big[9 * 1024 * 1024..]
    );
    assert_eq!(
        g.get(c, "photos", "a/small.bin", Some("bytes=5000-6000")),
        Err("InvalidRange".to_string())
    );
    assert_eq!(
        g.get(c, "photos", "nope", None),
        Err("NoSuchKey".to_string())
    );
    // Paged by two keys per page.
    assert_eq!(
        g.keys(c, "photos", "").unwrap(),
        ["a/b/big.bin", "a/small.bin", "empty", "top.txt"]
    );
    assert_eq!(
        g.keys(c, "photos", "a/").unwrap(),
        ["a/b/big.bin", "a/small.bin"]
    );
    g.rt.block_on(async {
        let page = c
            .list_objects_v2()
            .bucket("photos")
            .delimiter("/")
            .send()
            .await
            .unwrap();
        let prefixes: Vec<&str> = page
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix())
            .collect();
        assert_eq!(prefixes, ["a/"]);
        let keys: Vec<&str> = page.contents().iter().filter_map(|o| o.key()).collect();
        assert_eq!(keys, ["empty", "top.txt"]);
        assert!(page.contents()[1].last_modified().is_some());
        let head = c
            .head_object()
            .bucket("photos")
            .key("a/b/big.bin")
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_length(), Some(big.len() as i64));
        let buckets = c.list_buckets().send().await.unwrap();
        let names: Vec<&str> = buckets.buckets().iter().filter_map(|b| b.name()).collect();
        assert_eq!(names, ["photos"]);
    });

    // Multipart: two 5 MiB parts and a short last one.
    let parts = vec![
        random_bytes(3, 5 * 1024 * 1024),
        random_bytes(4, 5 * 1024 * 1024),
        random_bytes(5, 1234),
    ];
    multipart(g, c, "photos", "multi.bin", &parts);
    assert_eq!(
        g.get(c, "photos", "multi.bin", None).unwrap(),
        parts.concat()
    );
    // An aborted upload leaves nothing.
    let id = g.create_upload(c, "photos", "gone.bin").unwrap();
    let up = ("photos", "gone.bin", id.as_str());
    g.upload_part(c, up, 1, &[1u8; 1024]).unwrap();
    g.abort_upload(c, up).unwrap();
    assert_eq!(
        g.upload_part(c, up, 2, &[1u8; 1024]),
        Err("NoSuchUpload".to_string())
    );
    assert_eq!(
        g.get(c, "photos", "gone.bin", None),
        Err("NoSuchKey".to_string())
    );

    // Copy within the tenant, across buckets.
    g.rt.block_on(async {
        c.copy_object()
            .bucket("archive")
            .key("copy/big.bin")
            .copy_source("photos/a/b/big.bin")
            .send()
            .await
            .unwrap();
    });
    assert!(g.get(c, "archive", "copy/big.bin", None).unwrap() == big);

    // Delete one, then the rest at once.
    g.delete(c, "photos", "top.txt").unwrap();
    assert_eq!(
        g.get(c, "photos", "top.txt", None),
        Err("NoSuchKey".to_string())
    );
    g.rt.block_on(async {
        let ids = ["a/small.bin", "a/b/big.bin", "empty", "multi.bin"]
            .iter()
            .map(|k| ObjectIdentifier::builder().key(*k).build().unwrap())
            .collect();
        let out = c
            .delete_objects()
            .bucket("photos")
            .delete(Delete::builder().set_objects(Some(ids)).build().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(out.deleted().len(), 4);
        assert!(out.errors().is_empty());
    });
    assert!(g.keys(c, "photos", "").unwrap().is_empty());
    // A key that cannot be a file path is refused.
    assert_eq!(
        g.put(c, "photos", "a/../b", b"x"),
        Err("InvalidArgument".to_string())
    );
}

#[test]
fn aws_sdk_round_trip_on_the_filesystem_store() {
    let g = Gateway::start(Storage::Filesystem, &[("alice", "alice-token")], &[]);
    let c = g.client("alice", "alice-token");
    round_trip(&g, &c);
    assert_no_storage_secret(&g, &[]);
    let (_, metrics) = g.server.http_get("/metrics").unwrap();
    for line in [
        r#"datamover_s3_requests_total{operation="put_object",result="ok"}"#,
        r#"datamover_s3_requests_total{operation="get_object",result="NoSuchKey"}"#,
        r#"datamover_s3_requests_total{operation="complete_multipart_upload",result="ok"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
}

#[test]
fn aws_sdk_round_trip_on_garage() {
    let Some(garage) = Garage::start_or_skip() else {
        return;
    };
    let g = Gateway::start(
        Storage::S3 {
            garage: &garage,
            bucket: &garage.bucket,
            prefix: "gw",
        },
        &[("alice", "alice-token")],
        &[],
    );
    let c = g.client("alice", "alice-token");
    round_trip(&g, &c);
    assert_no_storage_secret(&g, &[&garage.secret_key, &garage.access_key]);
}

/// Neither the server's log nor its answers carry the storage keys.
fn assert_no_storage_secret(g: &Gateway, secrets: &[&str]) {
    let log = g.server.log();
    for s in secrets {
        assert!(!log.contains(s), "the server log holds a storage key");
    }
}

#[test]
fn wrong_keys_are_s3_errors() {
    let g = Gateway::start(Storage::Filesystem, &[("alice", "alice-token")], &[]);
    let wrong = g.client_with_secret("alice", "not-the-secret");
    assert_eq!(
        g.put(&wrong, "box", "k", b"x"),
        Err("SignatureDoesNotMatch".to_string())
    );
    let unknown = g.client_with_secret("mallory", &g.secret("alice", "alice-token"));
    assert_eq!(
        g.put(&unknown, "box", "k", b"x"),
        Err("InvalidAccessKeyId".to_string())
    );
    // The gRPC credential itself is not the S3 secret.
    let token = g.client_with_secret("alice", "alice-token");
    assert_eq!(
        g.put(&token, "box", "k", b"x"),
        Err("SignatureDoesNotMatch".to_string())
    );
}

#[test]
fn tenants_are_separate_and_roles_limit_what_a_client_does() {
    let g = Gateway::start(
        Storage::Filesystem,
        &[
            ("owner", "owner-token"),
            ("other", "other-token"),
            ("reader", "reader-token"),
            ("writer", "writer-token"),
        ],
        &[
            (
                "tenants",
                "owner=team\nreader=team\nwriter=team\nother=elsewhere",
            ),
            ("roles", "reader=read\nwriter=append"),
        ],
    );
    let owner = g.client("owner", "owner-token");
    let other = g.client("other", "other-token");
    let reader = g.client("reader", "reader-token");
    let writer = g.client("writer", "writer-token");
    g.put(&owner, "docs", "plan.txt", b"the plan").unwrap();

    // Another tenant: the bucket is not its own (s3_gateway_limits.rs goes further).
    assert_eq!(
        g.get(&other, "docs", "plan.txt", None),
        Err("AccessDenied".into())
    );
    assert_eq!(
        g.put(&other, "docs", "plan.txt", b"theirs"),
        Err("AccessDenied".into())
    );
    assert_eq!(
        g.get(&owner, "docs", "plan.txt", None).unwrap(),
        b"the plan"
    );

    // read: get and list, no writes, no deletes.
    assert_eq!(
        g.get(&reader, "docs", "plan.txt", None).unwrap(),
        b"the plan"
    );
    assert_eq!(g.keys(&reader, "docs", "").unwrap(), ["plan.txt"]);
    assert_eq!(
        g.put(&reader, "docs", "new.txt", b"x"),
        Err("AccessDenied".into())
    );
    assert_eq!(
        g.delete(&reader, "docs", "plan.txt"),
        Err("AccessDenied".into())
    );

    // append: new objects and listing; no overwrite, no delete, no reading back.
    g.put(&writer, "docs", "log-1.txt", b"one").unwrap();
    assert_eq!(
        g.put(&writer, "docs", "log-1.txt", b"two"),
        Err("AccessDenied".into())
    );
    assert_eq!(
        g.delete(&writer, "docs", "log-1.txt"),
        Err("AccessDenied".into())
    );
    assert_eq!(
        g.get(&writer, "docs", "log-1.txt", None),
        Err("AccessDenied".into())
    );
    assert_eq!(
        g.keys(&writer, "docs", "").unwrap(),
        ["log-1.txt", "plan.txt"]
    );
    assert_eq!(g.get(&owner, "docs", "log-1.txt", None).unwrap(), b"one");
}

#[test]
fn revoked_and_rotated_clients_are_refused_within_two_seconds() {
    let g = Gateway::start(
        Storage::Filesystem,
        &[("alice", "alice-token"), ("bob", "bob-token")],
        &[],
    );
    let alice = g.client("alice", "alice-token");
    let bob = g.client("bob", "bob-token");
    g.put(&alice, "box", "k", b"x").unwrap();
    g.put(&bob, "bobs-box", "k", b"x").unwrap();

    let creds = g.server.root.path().join("etc/client_credentials");
    std::fs::remove_file(creds.join("alice")).unwrap();
    g.server.set_client("bob", "bob-rotated");
    let started = Instant::now();
    let refused = |c: &S3Client, bucket: &str, expect: &str| loop {
        match g.keys(c, bucket, "") {
            Err(e) => {
                assert_eq!(e, expect);
                break started.elapsed();
            }
            Ok(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "still accepted after 5 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let a = refused(&alice, "box", "InvalidAccessKeyId");
    let b = refused(&bob, "bobs-box", "SignatureDoesNotMatch");
    assert!(
        a < Duration::from_secs(2) && b < Duration::from_secs(2),
        "refused after {a:?} / {b:?}"
    );
    // The rotated credential gives a new secret at once.
    let bob2 = g.client("bob", "bob-rotated");
    assert_eq!(g.get(&bob2, "bobs-box", "k", None).unwrap(), b"x");
}

#[test]
fn edge_sync_objects_are_s3_objects_and_the_reverse() {
    let g = Gateway::start(Storage::Filesystem, &[("dev", "dev-token")], &[]);
    let c = g.client("dev", "dev-token");
    let src = tempfile::tempdir().unwrap();
    write(&src.path().join("a.txt"), b"from the device");
    write(
        &src.path().join("sub/big.bin"),
        &random_bytes(7, 9 * 1024 * 1024),
    );
    let device = g.server.client("dev", "dev-token");
    device.ok(&[
        "sync_egress",
        src.path().to_str().unwrap(),
        "site-a",
        "--once",
    ]);
    assert_eq!(g.keys(&c, "site-a", "").unwrap(), ["a.txt", "sub/big.bin"]);
    assert_eq!(
        g.get(&c, "site-a", "a.txt", None).unwrap(),
        b"from the device"
    );
    assert!(
        g.get(&c, "site-a", "sub/big.bin", None).unwrap()
            == std::fs::read(src.path().join("sub/big.bin")).unwrap()
    );

    g.put(&c, "site-a", "from-s3/new.txt", b"written over S3")
        .unwrap();
    let dst = tempfile::tempdir().unwrap();
    device.ok(&[
        "sync_ingress",
        "site-a",
        dst.path().to_str().unwrap(),
        "--once",
    ]);
    assert_eq!(
        std::fs::read(dst.path().join("from-s3/new.txt")).unwrap(),
        b"written over S3"
    );
    assert_eq!(
        std::fs::read(dst.path().join("a.txt")).unwrap(),
        b"from the device"
    );
    assert_same_file(
        &src.path().join("sub/big.bin"),
        &dst.path().join("sub/big.bin"),
    );
}

fn assert_same_file(a: &Path, b: &Path) {
    assert!(
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
        "{} differs from {}",
        a.display(),
        b.display()
    );
}

/// A tree with nested directories, an empty file and one file large enough for multipart.
fn sample_tree(dir: &Path) {
    write(&dir.join("readme.txt"), b"hello from a tool");
    write(&dir.join("empty"), b"");
    write(&dir.join("deep/er/data.bin"), &random_bytes(11, 300_000));
    write(
        &dir.join("deep/big.bin"),
        &random_bytes(12, 11 * 1024 * 1024 + 5),
    );
    for i in 0..20 {
        write(
            &dir.join(format!("many/f{i:02}.txt")),
            format!("file {i}").as_bytes(),
        );
    }
}

/// Every regular file under `dir`, by relative path.
fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rclone_copies_a_tree_in_and_out() {
    let Some(rclone) = tool("rclone") else {
        return;
    };
    let g = Gateway::start(Storage::Filesystem, &[("alice", "alice-token")], &[]);
    let work = tempfile::tempdir().unwrap();
    let ca = work.path().join("ca.pem");
    write(&ca, g.ca_pem.as_bytes());
    let src = work.path().join("src");
    let dst = work.path().join("dst");
    sample_tree(&src);
    let rclone = |args: &[&str]| {
        let mut c = std::process::Command::new(&rclone);
        // rclone's S3 library would load this bundle instead of --ca-cert, and fail.
        c.env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG", work.path().join("rclone.conf"))
            .env("RCLONE_CONFIG_GW_TYPE", "s3")
            .env("RCLONE_CONFIG_GW_PROVIDER", "Other")
            .env("RCLONE_CONFIG_GW_ACCESS_KEY_ID", "alice")
            .env(
                "RCLONE_CONFIG_GW_SECRET_ACCESS_KEY",
                g.secret("alice", "alice-token"),
            )
            .env("RCLONE_CONFIG_GW_ENDPOINT", g.endpoint())
            .env("RCLONE_CONFIG_GW_FORCE_PATH_STYLE", "true")
            .args(["--ca-cert", ca.to_str().unwrap()])
            // Multipart from 5 MiB on, so the large file goes up in parts.
            .args(["--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M"])
            .args(args);
        run(&mut c);
    };
    rclone(&["copy", src.to_str().unwrap(), "gw:tools/in"]);
    rclone(&["copy", "gw:tools/in", dst.to_str().unwrap()]);
    assert!(
        files(&src) == files(&dst),
        "the tree read back through rclone differs"
    );
    // A second sync with nothing changed, then a deletion propagated.
    std::fs::remove_file(src.join("many/f03.txt")).unwrap();
    rclone(&["sync", "--size-only", src.to_str().unwrap(), "gw:tools/in"]);
    let c = g.client("alice", "alice-token");
    let keys = g.keys(&c, "tools", "in/many/").unwrap();
    assert_eq!(keys.len(), 19);
    assert!(!keys.contains(&"in/many/f03.txt".to_string()));
}

#[test]
fn aws_cli_syncs_a_tree_in_and_out() {
    let Some(aws) = tool("aws") else {
        return;
    };
    let g = Gateway::start(Storage::Filesystem, &[("alice", "alice-token")], &[]);
    let work = tempfile::tempdir().unwrap();
    let ca = work.path().join("ca.pem");
    write(&ca, g.ca_pem.as_bytes());
    let src = work.path().join("src");
    let dst = work.path().join("dst");
    sample_tree(&src);
    let aws = |args: &[&str]| {
        let mut c = std::process::Command::new(&aws);
        c.env("AWS_ACCESS_KEY_ID", "alice")
            .env("AWS_SECRET_ACCESS_KEY", g.secret("alice", "alice-token"))
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CA_BUNDLE", &ca)
            .env("AWS_CONFIG_FILE", work.path().join("aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                work.path().join("aws-credentials"),
            )
            .env_remove("AWS_PROFILE")
            .args(["--endpoint-url", &g.endpoint()])
            .args(args);
        run(&mut c);
    };
    aws(&["s3", "sync", src.to_str().unwrap(), "s3://cli/in"]);
    aws(&["s3", "sync", "s3://cli/in", dst.to_str().unwrap()]);
    assert!(
        files(&src) == files(&dst),
        "the tree read back through the AWS CLI differs"
    );
    std::fs::remove_file(src.join("many/f07.txt")).unwrap();
    aws(&[
        "s3",
        "sync",
        "--delete",
        src.to_str().unwrap(),
        "s3://cli/in",
    ]);
    let c = g.client("alice", "alice-token");
    assert_eq!(g.keys(&c, "cli", "in/many/").unwrap().len(), 19);
    aws(&["s3", "rm", "--recursive", "s3://cli/in"]);
    assert!(g.keys(&c, "cli", "").unwrap().is_empty());
}

#[test]
fn s3_credentials_prints_a_profile_and_needs_the_gateway() {
    let g = Gateway::start(Storage::Filesystem, &[("alice", "alice-token")], &[]);
    let profile = g.profile("alice", "alice-token");
    assert!(
        profile.starts_with("[default]\naws_access_key_id = alice\n"),
        "{profile}"
    );
    assert!(
        profile.contains(&format!("endpoint_url = https://127.0.0.1:{}\n", g.s3_port)),
        "{profile}"
    );
    let r = g
        .server
        .client("alice", "wrong-token")
        .run(&["s3-credentials"]);
    assert!(
        !r.success() && r.stdout.is_empty(),
        "a wrong credential gets no key"
    );

    let plain = Server::start(Storage::Filesystem, &[("alice", "alice-token")]);
    let r = plain
        .client("alice", "alice-token")
        .run(&["s3-credentials"]);
    assert!(!r.success());
    assert!(r.stderr.contains("s3:<port>"), "{}", r.stderr);
}

/// Sends `head` and then `body` over TLS to the gateway (then closes the sending side when
/// `hang_up`), and returns whatever the server answered (empty when it just closed).
fn raw_https(g: &Gateway, head: &str, body: &[u8], hang_up: bool) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(g.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "127.0.0.1".try_into().unwrap())
            .unwrap();
    let sock = std::net::TcpStream::connect(("127.0.0.1", g.s3_port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(head.as_bytes()).unwrap();
    // The server may answer early and close; what matters is what it keeps.
    let _ = tls.write_all(body);
    let _ = tls.flush();
    if hang_up {
        tls.conn.send_close_notify();
        let _ = tls.flush();
        let _ = tls.sock.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn path_and_query(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    rest.find('/')
        .map_or("/".to_string(), |i| rest[i..].to_string())
}

#[test]
fn presigned_urls_short_bodies_and_conditions() {
    use aws_sdk_s3::presigning::PresigningConfig;
    let g = Gateway::start(Storage::Filesystem, &[("alice", "alice-token")], &[]);
    let c = g.client("alice", "alice-token");
    let etag = g.put(&c, "box", "k", b"value").unwrap();

    // A presigned GET works until it expires, then it is an S3 error.
    let url = |secs: u64| {
        g.rt.block_on(async {
            c.get_object()
                .bucket("box")
                .key("k")
                .presigned(PresigningConfig::expires_in(Duration::from_secs(secs)).unwrap())
                .await
                .unwrap()
                .uri()
                .to_string()
        })
    };
    let get = |uri: &str| {
        raw_https(
            &g,
            &format!(
                "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                path_and_query(uri),
                g.s3_port
            ),
            b"",
            false,
        )
    };
    let fresh = get(&url(60));
    assert!(
        fresh.starts_with("HTTP/1.1 200") && fresh.ends_with("value"),
        "{fresh}"
    );
    let short = url(1);
    std::thread::sleep(Duration::from_millis(2100));
    let expired = get(&short);
    assert!(expired.starts_with("HTTP/1.1 403"), "{expired}");
    assert!(expired.contains("<Code>AccessDenied</Code>"), "{expired}");
    assert!(expired.contains("expired"), "{expired}");

    // A PUT declaring 5 GiB that sends 9 MiB and stops: nothing is visible afterwards,
    // and the store's multipart upload behind it is aborted.
    let put_url = g.rt.block_on(async {
        c.put_object()
            .bucket("box")
            .key("huge.bin")
            .presigned(PresigningConfig::expires_in(Duration::from_secs(60)).unwrap())
            .await
            .unwrap()
            .uri()
            .to_string()
    });
    let answer = raw_https(
        &g,
        &format!(
            "PUT {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\r\n",
            path_and_query(&put_url),
            g.s3_port,
            5u64 << 30
        ),
        &random_bytes(9, 9 * 1024 * 1024),
        true,
    );
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    let uploads = g.server.repo_dir().join("sync/.datamover/multipart");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&uploads).is_ok_and(|mut d| d.next().is_some()) {
        assert!(
            Instant::now() < deadline,
            "the unfinished upload was not aborted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(g.keys(&c, "box", "").unwrap(), ["k"]);
    assert_eq!(g.get(&c, "box", "huge.bin", None), Err("NoSuchKey".into()));

    // Conditional requests.
    g.rt.block_on(async {
        let not_modified = c
            .get_object()
            .bucket("box")
            .key("k")
            .if_none_match(&etag)
            .send()
            .await;
        assert!(not_modified.is_err(), "If-None-Match with the current ETag");
        let changed = c
            .get_object()
            .bucket("box")
            .key("k")
            .if_match("\"other\"")
            .send()
            .await;
        assert_eq!(
            changed.map(|_| ()).map_err(code),
            Err("PreconditionFailed".into())
        );
        let create_only = c
            .put_object()
            .bucket("box")
            .key("k")
            .if_none_match("*")
            .body(ByteStream::from_static(b"new"))
            .send()
            .await;
        assert_eq!(
            create_only.map(|_| ()).map_err(code),
            Err("PreconditionFailed".into())
        );
        c.put_object()
            .bucket("box")
            .key("k2")
            .if_none_match("*")
            .body(ByteStream::from_static(b"new"))
            .send()
            .await
            .unwrap();
    });
    assert_eq!(g.get(&c, "box", "k", None).unwrap(), b"value");
}

/// The server's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn sixteen_parallel_uploads_stay_under_256_mib() {
    let g = Gateway::start(Storage::Filesystem, &[("alice", "alice-token")], &[]);
    let c = g.client("alice", "alice-token");
    let data = bytes::Bytes::from(random_bytes(21, 40 * 1024 * 1024));
    let before = peak_rss(g.server.pid().unwrap());
    g.rt.block_on(async {
        let uploads = (0..16).map(|i| {
            let c = c.clone();
            let data = data.clone();
            async move {
                c.put_object()
                    .bucket("load")
                    .key(format!("f{i}"))
                    .body(ByteStream::from(data))
                    .send()
                    .await
                    .map_err(code)
            }
        });
        for r in futures::future::join_all(uploads).await {
            r.unwrap();
        }
    });
    let peak = peak_rss(g.server.pid().unwrap());
    eprintln!(
        "server peak RSS {} MiB (before the uploads {} MiB)",
        peak >> 20,
        before >> 20
    );
    assert!(peak < 256 << 20, "server peak RSS {} MiB", peak >> 20);
    assert_eq!(g.keys(&c, "load", "").unwrap().len(), 16);
    assert!(g.get(&c, "load", "f7", None).unwrap() == data);
}
