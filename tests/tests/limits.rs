//! Per-client limits (issue 30, item 4): a client that floods the server is answered
//! RESOURCE_EXHAUSTED with a message saying what to do, and another client's backup
//! meanwhile takes at most about twice its usual time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use datamover_client::connect;
use datamover_proto::v1;
use datamover_tests::{Server, Storage, random_bytes};

fn tree(dir: &std::path::Path, seed: u64) {
    for i in 0..40u64 {
        std::fs::write(
            dir.join(format!("f{i}")),
            random_bytes(seed * 1000 + i, 1024 * 1024),
        )
        .unwrap();
    }
}

#[test]
fn a_flooding_client_is_limited_and_another_backup_is_unaffected() {
    let server = Server::start_in_with_env(
        tempfile::tempdir().unwrap(),
        Storage::Filesystem,
        &[("flood", "flood-token"), ("quiet", "quiet-token")],
        &[
            ("DATAMOVER_CLIENT_RATE", "50"),
            ("DATAMOVER_CLIENT_BURST", "100"),
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    tree(&a, 1);
    tree(&b, 2);
    let quiet = server.client("quiet", "quiet-token");
    let started = Instant::now();
    quiet.ok(&["backup_files", a.to_str().unwrap(), "alone"]);
    let alone = started.elapsed();

    // The flood: many connections of one client, each calling as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let message = Arc::new(std::sync::Mutex::new(String::new()));
    let settings = server.client_settings("flood", "flood-token");
    let flood = {
        let (stop, ok, refused, message) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&refused),
            Arc::clone(&message),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                let mut tasks = Vec::new();
                for _ in 0..4 {
                    let Ok(mut conn) = connect::connect(&settings).await else {
                        continue;
                    };
                    let (stop, ok, refused, message) = (
                        Arc::clone(&stop),
                        Arc::clone(&ok),
                        Arc::clone(&refused),
                        Arc::clone(&message),
                    );
                    tasks.push(tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            match conn
                                .api
                                .list_snapshots(v1::ListSnapshotsRequest::default())
                                .await
                            {
                                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                                    *message.lock().unwrap() = s.message().to_string();
                                    refused.fetch_add(1, Ordering::Relaxed)
                                }
                                Err(s) => panic!("flood call failed otherwise: {s}"),
                            };
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            });
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    quiet.ok(&["backup_files", b.to_str().unwrap(), "flooded"]);
    let flooded = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();

    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    assert!(
        refused > 0,
        "the flood was never limited ({ok} calls served)"
    );
    let message = message.lock().unwrap().clone();
    assert!(
        message.contains("slow down") && message.contains("flood"),
        "{message}"
    );
    assert!(
        flooded <= alone * 2 + Duration::from_millis(500),
        "the backup took {flooded:?} during the flood, {alone:?} alone ({ok} flood calls served, {refused} refused)"
    );
    eprintln!("alone {alone:?}, flooded {flooded:?}, flood calls served {ok}, refused {refused}");
}
