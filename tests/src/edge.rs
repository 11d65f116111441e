//! Helpers for the edge-sync tests: a server on Garage with its sync root beside the
//! repository, the bucket read with an S3 client of our own (as any S3 tool would), the
//! server's storage-request counters, and bounded waits.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datamover_repo::objects::{FileMeta, ObjectStore, S3Objects};
use datamover_repo::store::S3Store;

use crate::{Garage, Server, Storage};

/// Starts a server on Garage under `prefix`, with `etc/config` keys `config`.
pub fn s3_server(
    g: &Garage,
    prefix: &str,
    clients: &[(&str, &str)],
    config: &[(&str, &str)],
) -> Server {
    Server::start_configured(
        Storage::S3 {
            garage: g,
            bucket: &g.bucket,
            prefix,
        },
        clients,
        config,
    )
}

/// Reads and writes the bucket directly, as any S3 tool would.
pub struct Bucket {
    objects: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
}

impl Bucket {
    pub fn new(g: &Garage) -> Bucket {
        let store = S3Store::new(g.s3_options("")).expect("S3 store on Garage");
        Bucket {
            objects: Arc::new(S3Objects::new(&store, "")),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    /// An object's bytes, or `None` when it is not there (or cannot be read).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.rt.block_on(async {
            use futures::StreamExt;
            let (_, mut body) = self.objects.get(key, 0).await.ok()?;
            let mut out = Vec::new();
            while let Some(piece) = body.next().await {
                out.extend_from_slice(&piece.ok()?);
            }
            Some(out)
        })
    }

    /// The metadata edge sync stored with an object, if any.
    pub fn meta(&self, key: &str) -> Option<FileMeta> {
        self.rt
            .block_on(self.objects.head(key))
            .ok()
            .flatten()
            .and_then(|h| h.meta)
    }

    pub fn put(&self, key: &str, data: &[u8]) {
        self.rt
            .block_on(
                self.objects
                    .put(key, bytes::Bytes::copy_from_slice(data), None),
            )
            .expect("put");
    }

    pub fn delete(&self, key: &str) {
        self.rt.block_on(self.objects.delete(key)).expect("delete");
    }

    /// The keys under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.objects(prefix).into_keys().collect()
    }

    /// key → (etag, size) under `prefix`.
    pub fn objects(&self, prefix: &str) -> BTreeMap<String, (String, u64)> {
        self.rt
            .block_on(self.objects.list(prefix))
            .expect("list")
            .into_iter()
            .map(|o| (o.key, (o.etag, o.size)))
            .collect()
    }
}

/// A metric's value, summed over the label sets whose line contains `with`.
pub fn metric(server: &Server, name: &str, with: &str) -> u64 {
    let (_, body) = server.http_get("/metrics").expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Storage requests made so far by operation, for the object types `types` accepts
/// (`type="sync"` are the synced objects themselves, `sync_*` what edge sync keeps
/// beside them).
pub fn store_requests(server: &Server, types: impl Fn(&str) -> bool) -> BTreeMap<String, u64> {
    let (_, body) = server.http_get("/metrics").expect("metrics");
    let label = |line: &str, name: &str| -> String {
        line.split(&format!("{name}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if !line.starts_with("datamover_store_requests_total{") || !types(&label(line, "type")) {
            continue;
        }
        let v: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        *out.entry(label(line, "operation")).or_default() += v;
    }
    out
}

/// Storage requests for everything edge sync stores (objects, manifests, upload records).
pub fn sync_requests(server: &Server) -> BTreeMap<String, u64> {
    store_requests(server, |t| t.starts_with("sync"))
}

/// Waits (bounded) until the server has stored `n` more multipart parts than when
/// called, i.e. until an upload is under way, whatever the machine's load.
pub fn wait_parts(server: &Server, n: u64) {
    let parts = || {
        sync_requests(server)
            .get("upload_part")
            .copied()
            .unwrap_or(0)
    };
    let base = parts();
    wait_for("an upload under way", 60, || parts() >= base + n);
}

/// Waits (bounded by `secs`) until `ok`.
pub fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "not {what} after {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A number from the client's JSON output (panics, naming it, when absent).
pub fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// The files of a synced directory (without edge sync's state), path → bytes.
pub fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if e.file_name() == ".datamover-sync" {
                continue;
            }
            if e.file_type().expect("file type").is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}
