//! Edge-sync manifests (issue 29, item 3): dropped from the server's memory when idle or
//! over the entry cap and loaded again on use (an unchanged pass is still one listing
//! with no lookup per object), written incrementally (a flush after one changed file
//! writes bytes in proportion to the change, not to the target), read back after a
//! restart, and old single-JSON manifests still load. The real server and client, Garage
//! on loopback, the bucket read with an S3 client of its own.

use std::path::Path;
use std::time::Duration;

use datamover_tests::edge::{self, Bucket, metric, n, store_requests, wait_for};
use datamover_tests::{Garage, Server, write};

const PREFIX: &str = "manifests";
const MANIFESTS: &str = "manifests/sync/.datamover/manifests/";

fn s3_server(g: &Garage, config: &[(&str, &str)]) -> Server {
    edge::s3_server(g, PREFIX, &[("dev-1", "tok-1")], config)
}

/// Storage requests by operation for the synced objects themselves (`type="sync"`).
fn object_requests(server: &Server) -> std::collections::BTreeMap<String, u64> {
    store_requests(server, |t| t == "sync")
}

fn make_tree(dir: &Path, n: usize) {
    for i in 0..n {
        write(
            &dir.join(format!("d{}/reading-{i:04}.csv", i % 10)),
            format!("{i},{}\n", i * 7).as_bytes(),
        );
    }
}

/// The manifest objects once no flush has written for longer than the server's flush
/// interval (3 s): a listing taken in the middle of a flush would count its rest as the
/// next change's.
fn settled(bucket: &Bucket) -> std::collections::BTreeMap<String, (String, u64)> {
    let mut last = bucket.objects(MANIFESTS);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(4));
        let now = bucket.objects(MANIFESTS);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the manifests kept changing for 40 s with no pass running: {last:?}");
}

/// An unchanged pass: nothing sent, one listing of the objects, no lookup per object.
fn unchanged_pass(server: &Server, src: &str, target: &str) {
    let client = server.client("dev-1", "tok-1");
    let before = object_requests(server);
    let r = client.ok(&["sync_egress", src, target, "--once"]);
    assert_eq!(n(&r, "files_sent"), 0, "{r}");
    let after = object_requests(server);
    let delta = |op: &str| after.get(op).unwrap_or(&0) - before.get(op).unwrap_or(&0);
    assert_eq!(delta("list"), 1, "{before:?} -> {after:?}");
    assert_eq!(
        delta("head"),
        0,
        "no lookup per object: {before:?} -> {after:?}"
    );
}

#[test]
fn idle_manifests_leave_memory_and_come_back_with_one_listing() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let server = s3_server(&g, &[("syncManifestIdle", "2s")]);
    let client = server.client("dev-1", "tok-1");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src, 60);
    let src_s = src.to_str().unwrap();
    client.ok(&["sync_egress", src_s, "site-a", "--once"]);
    assert_eq!(metric(&server, "datamover_sync_manifests_resident", ""), 1);
    // Idle for 2 s, written back: dropped at the next sweep (every 3 s).
    wait_for("the idle manifest dropped from memory", 20, || {
        metric(&server, "datamover_sync_manifests_resident", "") == 0
    });
    assert!(metric(&server, "datamover_sync_manifest_evictions_total", "") >= 1);
    assert_eq!(
        metric(&server, "datamover_sync_manifest_entries_resident", ""),
        0
    );
    // The next pass loads it again (from the store) and still lists once, no HEADs.
    let gets = metric(
        &server,
        "datamover_store_requests_total",
        "type=\"sync-state\"",
    );
    unchanged_pass(&server, src_s, "site-a");
    assert!(
        metric(
            &server,
            "datamover_store_requests_total",
            "type=\"sync-state\""
        ) > gets,
        "the manifest was read again"
    );
    assert_eq!(metric(&server, "datamover_sync_manifests_resident", ""), 1);
}

#[test]
fn entry_cap_keeps_the_least_recently_used_out_of_memory() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let server = s3_server(
        &g,
        &[("syncManifestIdle", "1h"), ("syncManifestEntries", "100")],
    );
    let client = server.client("dev-1", "tok-1");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src, 40);
    let src_s = src.to_str().unwrap();
    for t in ["t1", "t2", "t3", "t4"] {
        client.ok(&["sync_egress", src_s, t, "--once"]);
    }
    // 160 entries over a cap of 100: once written, the oldest go.
    wait_for("resident entries back under the cap", 20, || {
        metric(&server, "datamover_sync_manifest_entries_resident", "") <= 100
    });
    assert!(metric(&server, "datamover_sync_manifests_resident", "") <= 2);
    assert!(metric(&server, "datamover_sync_manifest_evictions_total", "") >= 2);
    // The first target was dropped; it still costs one listing and no lookup.
    unchanged_pass(&server, src_s, "t1");
}

#[test]
fn a_flush_writes_the_change_not_the_target_and_restarts_and_old_manifests_load() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let bucket = Bucket::new(&g);
    let mut server = s3_server(&g, &[]);
    let client = server.client("dev-1", "tok-1");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src, 800);
    let src_s = src.to_str().unwrap();
    let r = client.ok(&["sync_egress", src_s, "big", "--once"]);
    assert_eq!(n(&r, "files_sent"), 800);
    wait_for("the manifest written", 20, || {
        bucket.objects(MANIFESTS).values().any(|(_, s)| *s > 50_000)
    });
    // A flush may still be under way (a pass's last entries as a delta): the listing
    // counts only once a whole flush interval has passed without a write.
    let before = settled(&bucket);
    let whole: u64 = before.values().map(|(_, s)| s).sum();

    // One file changes: the flush writes about one entry's worth.
    write(&src.join("d3/reading-0003.csv"), b"changed\n");
    let r = client.ok(&["sync_egress", src_s, "big", "--once"]);
    assert_eq!(n(&r, "files_sent"), 1);
    wait_for("the change written", 20, || {
        bucket.objects(MANIFESTS) != before
    });
    let after = settled(&bucket);
    let written: u64 = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(_, (_, s))| s)
        .sum();
    assert!(
        written < 1024 && written * 50 < whole,
        "{written} bytes written for one change to a manifest of {whole}: {before:?} -> {after:?}"
    );

    // A restart reads base and delta: an unchanged pass with no lookups.
    server.stop(nix::sys::signal::Signal::SIGTERM);
    server.spawn();
    unchanged_pass(&server, src_s, "big");

    // An old manifest (one JSON object) still loads, and is then replaced by a base.
    let small = work.path().join("small");
    make_tree(&small, 20);
    let small_s = small.to_str().unwrap();
    server
        .client("dev-1", "tok-1")
        .ok(&["sync_egress", small_s, "old", "--once"]);
    server.stop(nix::sys::signal::Signal::SIGTERM);
    let h = {
        let mut h = blake3::Hasher::new();
        h.update(b"dev-1");
        h.update(&[0]);
        h.update(b"old");
        h.finalize().to_hex().to_string()
    };
    let mprefix = format!("{MANIFESTS}{h}/");
    assert!(!bucket.objects(&mprefix).is_empty(), "new-format objects");
    for k in bucket.objects(&mprefix).keys() {
        bucket.delete(k);
    }
    let objects_prefix = format!("{PREFIX}/sync/dev-1/old/");
    let mut entries = serde_json::Map::new();
    for (key, (etag, size)) in bucket.objects(&objects_prefix) {
        let meta = bucket.meta(&key).expect("the object's metadata");
        entries.insert(
            key.strip_prefix(&objects_prefix).unwrap().to_string(),
            serde_json::json!({"e": etag, "s": size, "h": meta.hash.iter().map(|b| format!("{b:02x}")).collect::<String>(), "m": meta.mtime_ns, "o": meta.mode}),
        );
    }
    assert_eq!(entries.len(), 20);
    let legacy = format!("{MANIFESTS}{h}.json");
    bucket.put(
        &legacy,
        &serde_json::to_vec(&serde_json::json!({ "entries": entries })).unwrap(),
    );
    server.spawn();
    unchanged_pass(&server, small_s, "old");
    wait_for("the old manifest replaced by a base", 20, || {
        let objs = bucket.objects(&format!("{MANIFESTS}{h}"));
        !objs.contains_key(&legacy) && objs.keys().any(|k| k.contains("/b-"))
    });
    server.stop(nix::sys::signal::Signal::SIGTERM);
    server.spawn();
    unchanged_pass(&server, small_s, "old");
}
