//! A hostile server: speaks datamover-v1 over TLS like the real one, but answers a
//! restore with whatever stream a test scripts (unsafe names, lying sizes, chunks that do
//! not match their ids, a stream without end), so tests can check what the real client
//! binary does with it. Every other call is refused.

// tonic::Status is what the protocol returns, large or not.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use datamover_core::chunk::ChunkIdKey;
use datamover_proto::v1::datamover_server::{Datamover, DatamoverServer};
use datamover_proto::v1::{self, Node, NodeType, RestoreItem, RestoreResponse, restore_item::Item};
use futures::Stream;
use futures::StreamExt;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::{Client, free_port, write};

/// The chunk-id key the hostile server hands out.
pub const KEY: [u8; 32] = [7; 32];

type Messages = BoxStream<RestoreResponse>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Makes the stream a restore gets (called once per restore).
pub type Script = Arc<dyn Fn() -> Messages + Send + Sync>;

struct Hostile {
    script: Script,
}

fn refused<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the hostile test server only restores",
    ))
}

#[tonic::async_trait]
impl Datamover for Hostile {
    async fn hello(
        &self,
        _: Request<v1::HelloRequest>,
    ) -> Result<Response<v1::HelloResponse>, Status> {
        Ok(Response::new(v1::HelloResponse {
            server_version: "hostile".into(),
            client_id: "victim".into(),
            tenant: "victim".into(),
            role: "full".into(),
            chunk_id_key: Bytes::copy_from_slice(&KEY),
            chunker: Some(v1::ChunkerParams {
                min_size: 64 * 1024,
                avg_size: 256 * 1024,
                max_size: 1024 * 1024,
            }),
            max_message_bytes: datamover_proto::MAX_MESSAGE_BYTES as u32,
        }))
    }
    async fn begin_backup(
        &self,
        _: Request<v1::BeginBackupRequest>,
    ) -> Result<Response<v1::BeginBackupResponse>, Status> {
        refused()
    }
    async fn find_missing(
        &self,
        _: Request<v1::FindMissingRequest>,
    ) -> Result<Response<v1::FindMissingResponse>, Status> {
        refused()
    }
    async fn put_chunks(
        &self,
        _: Request<tonic::Streaming<v1::PutChunksRequest>>,
    ) -> Result<Response<v1::PutChunksResponse>, Status> {
        refused()
    }
    async fn commit_backup(
        &self,
        _: Request<v1::CommitBackupRequest>,
    ) -> Result<Response<v1::CommitBackupResponse>, Status> {
        refused()
    }
    async fn list_snapshots(
        &self,
        _: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        refused()
    }
    type ReadCatalogStream = BoxStream<v1::ReadCatalogResponse>;
    async fn read_catalog(
        &self,
        _: Request<v1::ReadCatalogRequest>,
    ) -> Result<Response<Self::ReadCatalogStream>, Status> {
        refused()
    }
    type RestoreStream = Messages;
    async fn restore(
        &self,
        _: Request<v1::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        Ok(Response::new((self.script)()))
    }
    async fn delete_snapshot(
        &self,
        _: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        refused()
    }
    async fn forget(
        &self,
        _: Request<v1::ForgetRequest>,
    ) -> Result<Response<v1::ForgetResponse>, Status> {
        refused()
    }
    async fn verify(
        &self,
        _: Request<v1::VerifyRequest>,
    ) -> Result<Response<v1::VerifyResponse>, Status> {
        refused()
    }
    async fn maintain(
        &self,
        _: Request<v1::MaintainRequest>,
    ) -> Result<Response<v1::MaintainResponse>, Status> {
        refused()
    }
    async fn catalog_index(
        &self,
        _: Request<v1::CatalogIndexRequest>,
    ) -> Result<Response<v1::CatalogIndexResponse>, Status> {
        refused()
    }
    type ReadChunksStream = BoxStream<v1::ReadChunksResponse>;
    async fn read_chunks(
        &self,
        _: Request<v1::ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        refused()
    }
}

/// A running hostile server (stopped when dropped).
pub struct HostileServer {
    pub port: u16,
    pub fingerprint: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HostileServer {
    pub fn start(script: Script) -> HostileServer {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("a test certificate");
        let fingerprint = datamover_proto::fingerprint::Fingerprint::of_der(ck.cert.der()).to_hex();
        let identity = Identity::from_pem(ck.cert.pem(), ck.key_pair.serialize_pem());
        let port = free_port();
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .expect("bind the hostile server");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let service = DatamoverServer::new(Hostile { script })
            .max_decoding_message_size(datamover_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(datamover_proto::MAX_MESSAGE_BYTES);
        let server = tonic::transport::Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .expect("TLS config")
            .add_service(service)
            .serve_with_incoming(incoming);
        runtime.spawn(server);
        HostileServer {
            port,
            fingerprint,
            runtime: Some(runtime),
        }
    }

    /// A client environment pinned to this server.
    pub fn client(&self) -> Client {
        let root = tempfile::tempdir().expect("tempdir");
        write(&root.path().join("etc/client-secret/victim"), b"token");
        let env = vec![
            ("DATAMOVER_ROOT".into(), root.path().display().to_string()),
            ("SERVER_URL".into(), format!("127.0.0.1:{}", self.port)),
            ("PROTOCOLS".into(), format!("datamover-v1:{}", self.port)),
            ("SERVER_DATA".into(), self.fingerprint.clone()),
            ("DATAMOVER_PROGRESS".into(), "0".into()),
            ("DATAMOVER_CONNECT_ATTEMPTS".into(), "1".into()),
        ];
        Client { root, env }
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The snapshot a restore stream starts with.
pub fn snapshot(kind: v1::SnapshotKind) -> v1::Snapshot {
    v1::Snapshot {
        id: "0123456789abcdef".into(),
        tag: "hostile".into(),
        time: "2026-01-01T00:00:00Z".into(),
        client_id: "victim".into(),
        tenant: "victim".into(),
        kind: kind as i32,
        ..Default::default()
    }
}

pub fn node(path: &[u8], ty: NodeType, size: u64) -> Item {
    Item::Node(Node {
        path: Bytes::copy_from_slice(path),
        r#type: ty as i32,
        mode: if ty == NodeType::Dir { 0o755 } else { 0o644 },
        mtime_ns: 1_700_000_000_000_000_000,
        size,
        ..Default::default()
    })
}

pub fn symlink(path: &[u8], target: &[u8]) -> Item {
    Item::Node(Node {
        path: Bytes::copy_from_slice(path),
        r#type: NodeType::Symlink as i32,
        mode: 0o777,
        link_target: Bytes::copy_from_slice(target),
        ..Default::default()
    })
}

pub fn data(d: &[u8]) -> Item {
    Item::Data(Bytes::copy_from_slice(d))
}

/// `d` compressed, as the real server sends stored chunks, with the id `id_of` has.
pub fn packed(d: &[u8], id_of: &[u8]) -> Item {
    Item::Packed(v1::PackedData {
        zstd: Bytes::from(zstd::bulk::compress(d, 1).expect("compress")),
        raw_length: d.len() as u32,
        id: Bytes::copy_from_slice(&ChunkIdKey::new(KEY).id(id_of).0),
    })
}

/// One message with the snapshot and `items`, then the stream ends.
pub fn once(kind: v1::SnapshotKind, items: Vec<Item>) -> Script {
    Arc::new(move || {
        let msg = RestoreResponse {
            snapshot: Some(snapshot(kind)),
            items: items
                .iter()
                .cloned()
                .map(|i| RestoreItem { item: Some(i) })
                .collect(),
            ..Default::default()
        };
        futures::stream::iter([Ok(msg)]).boxed()
    })
}

/// The snapshot and `items`, then `more` again and again, without end.
pub fn endless(kind: v1::SnapshotKind, items: Vec<Item>, more: Item) -> Script {
    Arc::new(move || {
        let first = RestoreResponse {
            snapshot: Some(snapshot(kind)),
            items: items
                .iter()
                .cloned()
                .map(|i| RestoreItem { item: Some(i) })
                .collect(),
            ..Default::default()
        };
        let next = RestoreResponse {
            snapshot: None,
            items: vec![RestoreItem {
                item: Some(more.clone()),
            }],
            ..Default::default()
        };
        futures::stream::iter([Ok(first)])
            .chain(futures::stream::repeat_with(move || Ok(next.clone())))
            .boxed()
    })
}

/// Everything under `dir` except `skip`'s subtree: type, mode, size, mtime and contents,
/// without following symlinks.
pub fn tree_state(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.starts_with(skip) {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let what = if m.is_dir() {
                todo.push(p.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("symlink {:?}", std::fs::read_link(&p).ok())
            } else {
                let content = std::fs::read(&p).unwrap_or_default();
                format!("file {}", blake3::hash(&content).to_hex())
            };
            out.insert(
                p,
                format!(
                    "{what} mode {:o} size {} mtime {}.{}",
                    m.mode(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
        }
    }
    out
}
