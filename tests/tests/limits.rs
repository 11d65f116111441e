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

fn begin() -> v1::BeginBackupRequest {
    v1::BeginBackupRequest {
        tag: "t".into(),
        kind: v1::SnapshotKind::Files as i32,
        source: "/s".into(),
        hostname: "h".into(),
    }
}

/// `n` chunks of 10 bytes each, with their ids under `key`.
fn chunks(key: &datamover_core::chunk::ChunkIdKey, n: u8) -> Vec<v1::Chunk> {
    (0..n)
        .map(|i| {
            let data = bytes::Bytes::from(vec![i; 10]);
            v1::Chunk {
                id: bytes::Bytes::copy_from_slice(&key.id(&data).0),
                data,
            }
        })
        .collect()
}

#[test]
fn sessions_chunks_per_put_and_catalog_size_are_capped() {
    let server = Server::start_in_with_env(
        tempfile::tempdir().unwrap(),
        Storage::Filesystem,
        &[("greedy", "g-token"), ("other", "o-token")],
        &[
            ("DATAMOVER_MAX_SESSIONS_PER_CLIENT", "2"),
            ("DATAMOVER_MAX_CHUNKS_PER_PUT", "3"),
            ("DATAMOVER_MAX_CATALOG_CHUNKS", "2"),
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut greedy = connect::connect(&server.client_settings("greedy", "g-token"))
            .await
            .unwrap();
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let s = greedy.api.begin_backup(begin()).await.unwrap().into_inner();
            sessions.push(s.session_id);
        }
        let e = greedy
            .api
            .begin_backup(begin())
            .await
            .expect_err("a third session");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("wait for one to finish"), "{e}");
        // Another client is not affected.
        let mut other = connect::connect(&server.client_settings("other", "o-token"))
            .await
            .unwrap();
        other
            .api
            .begin_backup(begin())
            .await
            .expect("another client's session");

        // Four chunks in one message: refused.
        let chunks = chunks(&greedy.key, 4);
        let put = |chunks: Vec<v1::Chunk>| v1::PutChunksRequest {
            session_id: sessions[0].clone(),
            chunks,
        };
        let e = greedy
            .api
            .put_chunks(tokio_stream::iter(vec![put(chunks.clone())]))
            .await
            .expect_err("too many chunks");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("smaller messages"), "{e}");
        greedy
            .api
            .put_chunks(tokio_stream::iter(vec![put(chunks[..3].to_vec())]))
            .await
            .expect("three chunks");

        // A catalog of three chunks: refused.
        let e = greedy
            .api
            .commit_backup(v1::CommitBackupRequest {
                session_id: sessions[1].clone(),
                catalog: chunks[..3].iter().map(|c| c.id.clone()).collect(),
                ..Default::default()
            })
            .await
            .expect_err("too large a catalog");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("catalog has 3 chunks"), "{e}");
    });
}

/// The value of `datamover_limit_refusals_total{limit="<limit>"}` at the metrics endpoint.
fn refusals(server: &Server, limit: &str) -> u64 {
    let (code, body) = server
        .http_get("/metrics")
        .expect("the metrics endpoint answers");
    assert_eq!(code, 200, "{body}");
    let prefix = format!("datamover_limit_refusals_total{{limit=\"{limit}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in the metrics:\n{body}"))
        .trim()
        .parse()
        .expect("a count")
}

#[test]
fn limits_from_the_config_map_are_applied_and_counted() {
    // The limits come from the server's ConfigMap keys, not from variables.
    let server = Server::start_configured(
        Storage::Filesystem,
        &[("c", "c-token")],
        &[
            // One call in 5 s after a burst of 4: the test's calls spend the burst.
            ("clientRate", "0.2"),
            ("clientBurst", "4"),
            ("maxChunksPerPut", "1"),
            ("maxPathBytes", "16"),
        ],
    );
    for limit in ["rate", "chunks_per_put", "path_bytes", "sessions"] {
        assert_eq!(refusals(&server, limit), 0, "{limit} before any call");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // connect() says Hello: one call of the burst of 4.
        let mut c = connect::connect(&server.client_settings("c", "c-token"))
            .await
            .unwrap();
        let session = c
            .api
            .begin_backup(begin())
            .await
            .unwrap()
            .into_inner()
            .session_id;
        let chunks = chunks(&c.key, 2);
        let e = c
            .api
            .put_chunks(tokio_stream::iter(vec![v1::PutChunksRequest {
                session_id: session,
                chunks,
            }]))
            .await
            .expect_err("two chunks in one message, over maxChunksPerPut 1");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("maxChunksPerPut"), "{e}");
        // A restore path of 17 bytes, over maxPathBytes 16 (the fourth call).
        let e = c
            .api
            .restore(v1::RestoreRequest {
                snapshot: "t".into(),
                path: vec![b'p'; 17].into(),
                ..Default::default()
            })
            .await
            .expect_err("a path over maxPathBytes");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("maxPathBytes"), "{e}");
        // The burst of 4 is spent: calls now are over the rate.
        let mut refused = 0;
        for _ in 0..5 {
            match c
                .api
                .list_snapshots(v1::ListSnapshotsRequest::default())
                .await
            {
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    assert!(e.message().contains("clientRate"), "{e}");
                    refused += 1;
                }
                Err(e) => panic!("{e}"),
                Ok(_) => {}
            }
        }
        assert!(
            refused >= 4,
            "only {refused} of 5 calls over the rate refused"
        );
        assert_eq!(refusals(&server, "rate"), refused);
    });
    assert_eq!(refusals(&server, "chunks_per_put"), 1);
    assert_eq!(refusals(&server, "path_bytes"), 1);
    assert_eq!(refusals(&server, "sessions"), 0);
}
