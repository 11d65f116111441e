//! Against a real S3 server (Garage on loopback): backups complete while a proxy in
//! front of Garage drops and resets connections, and two server replicas on one bucket
//! serve eight concurrent clients whose snapshots all restore byte-identical.

use std::time::Duration;

use datamover_tests::faults::{FaultProxy, Faults};
use datamover_tests::{Garage, Server, Storage, assert_same_tree, random_bytes};

#[test]
fn backups_complete_while_the_storage_connection_drops_and_resets() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let upstream = g
        .endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let proxy = FaultProxy::start(&upstream);
    let server = Server::start_configured(
        Storage::S3 {
            garage: &g,
            bucket: &g.bucket,
            prefix: "faults",
        },
        &[("c", "tok")],
        &[
            ("endpoint", &format!("http://{}", proxy.addr())),
            ("s3MaxAttempts", "10"),
        ],
    );
    let client = server.client("c", "tok");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(
            src.join(format!("f{i}")),
            random_bytes(100 + i, 6 * 1024 * 1024),
        )
        .unwrap();
    }
    // Every third connection is cut after 1 MiB (uploads of packs are 8 MiB), half of
    // them with a reset; every read is delayed a little. Connections are pooled, so the
    // open ones are also reset a few times (every 800 ms): the server opens new ones.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let out = work.path().join("out");
    std::thread::scope(|scope| {
        // Ends the resetting thread however the runs below end (a panic included).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        scope.spawn(|| {
            // A few resets, early in the backup, then idle until the flag ends it.
            let mut resets = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                resets += 1;
                if resets % 8 == 0 && resets <= 32 {
                    proxy.cut_all();
                }
            }
        });
        proxy.set(Faults {
            cut_every: 3,
            cut_after: 1024 * 1024,
            reset: true,
            delay: Duration::from_millis(2),
        });
        let first = client.ok(&["backup_files", src.to_str().unwrap(), "t"]);
        assert_eq!(first["files"], 6);
        proxy.set(Faults {
            cut_every: 2,
            cut_after: 256 * 1024,
            reset: false,
            delay: Duration::ZERO,
        });
        client.ok(&["restore_files", out.to_str().unwrap(), "t"]);
    });
    assert_same_tree(&src, &out);
    assert!(
        proxy.cut.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no fault was injected"
    );
    proxy.set(Faults::default());
    assert_eq!(client.ok(&["verify", "--read-data"])["problems"], 0);
    let metrics = server.http_get("/metrics").unwrap().1;
    assert!(
        metrics.contains(
            "datamover_store_requests_total{operation=\"write\",outcome=\"ok\",type=\"data\"}"
        ) || metrics.contains(
            "datamover_store_requests_total{operation=\"write\",type=\"data\",outcome=\"ok\"}"
        ),
        "pack writes are counted:\n{metrics}"
    );
}

#[test]
fn two_replicas_serve_eight_concurrent_clients_on_one_bucket() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let clients: Vec<(String, String)> = (0..8)
        .map(|i| (format!("client-{i}"), format!("token-{i}")))
        .collect();
    let pairs: Vec<(&str, &str)> = clients
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    // All clients share one tenant, so they deduplicate against each other across
    // replicas; half the data of each client is common to all.
    let tenants: String = clients
        .iter()
        .map(|(c, _)| format!("{c}=fleet\n"))
        .collect();
    let config = [("tenants", tenants.as_str())];
    let storage = || Storage::S3 {
        garage: &g,
        bucket: &g.bucket,
        prefix: "replicas",
    };
    let a = Server::start_configured(storage(), &pairs, &config);
    let b = Server::start_configured(storage(), &pairs, &config);
    let work = tempfile::tempdir().unwrap();
    let common = random_bytes(7, 6 * 1024 * 1024);
    let mut handles = Vec::new();
    for (i, (id, tok)) in clients.iter().enumerate() {
        let server = if i % 2 == 0 { &a } else { &b };
        let client = server.client(id, tok);
        let src = work.path().join(format!("src-{i}"));
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("common"), &common).unwrap();
        std::fs::write(
            src.join("d/own"),
            random_bytes(200 + i as u64, 5 * 1024 * 1024),
        )
        .unwrap();
        std::fs::write(src.join("small"), format!("client {i}")).unwrap();
        let out = work.path().join(format!("out-{i}"));
        handles.push(std::thread::spawn(move || {
            let snap = client.ok(&["backup_files", src.to_str().unwrap(), "nightly"]);
            (client, src, out, snap)
        }));
    }
    let done: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (_, src, out, snap)) in done.iter().enumerate() {
        // Restore each snapshot through the other replica.
        let (id, tok) = &clients[i];
        let other = if i % 2 == 0 { &b } else { &a };
        let reader = other.client(id, tok);
        let sid = snap["snapshot_id"].as_str().unwrap();
        reader.ok(&["restore_files", out.to_str().unwrap(), sid]);
        assert_same_tree(src, out);
    }
    let listed = a.client(&clients[0].0, &clients[0].1).ok(&["list"]);
    assert_eq!(listed["count"], 8, "{listed}");
    assert_eq!(
        b.client(&clients[1].0, &clients[1].1)
            .ok(&["verify", "--read-data"])["problems"],
        0
    );
}
