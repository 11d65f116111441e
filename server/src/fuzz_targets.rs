//! The bodies of the server's fuzz harnesses, shared by the stable harnesses
//! (`server/tests/fuzz.rs`, run by `cargo test` with `datamover_core::fuzz`) and the
//! coverage-guided cargo-fuzz targets under `fuzz/cargo-fuzz/` (nightly). Each panics on
//! a bug: a panic in a decoder, a result that breaks an invariant, or a refusal without a
//! clear status.
//!
//! [`GrpcTarget`] is a real server in this process (the gRPC services on loopback, plain
//! HTTP/2, a filesystem store in a temp directory) that each input is sent to as the raw
//! body of a request, so the server's own decoding, validation and handling see it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use datamover_core::chunk::ChunkIdKey;
use datamover_proto::v1;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::credentials::{Credential, trim, valid_client_id};
use crate::sync::state::{Manifest, UploadRecord};

/// Credential files (`/etc/client_credentials/<id>`): tokens and PHC strings.
pub fn credential_files(input: &[u8]) {
    let t = trim(input);
    assert!(t.len() <= input.len());
    match Credential::parse(input) {
        Some(Credential::Phc(s)) => {
            // What verification parses first.
            let _ = argon2::password_hash::PasswordHash::new(&s);
        }
        Some(Credential::Token(t)) => assert!(!t.is_empty()),
        None => assert!(trim(input).is_empty() || trim(input).starts_with(b"$argon2")),
    }
    let _ = valid_client_id(&String::from_utf8_lossy(input));
}

/// Edge-sync manifests and upload records, as read from the bucket.
pub fn sync_state(input: &[u8]) {
    let _ = serde_json::from_slice::<Manifest>(input);
    // Manifests as a base plus deltas (binary objects under the manifest's prefix).
    crate::sync::manifest_store::fuzz_check(input);
    if let Ok(r) = serde_json::from_slice::<UploadRecord>(input) {
        // Where an upload resumes: never past the object's end.
        assert!(r.offset() <= r.size, "{r:?}");
    }
}

/// Request bodies as given: the server decodes them.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Unary,
    ClientStream,
    ServerStream,
}

/// The methods an input may call: the first byte picks one.
const METHODS: [(&str, Kind); 20] = [
    ("/datamover.v1.Datamover/Hello", Kind::Unary),
    ("/datamover.v1.Datamover/BeginBackup", Kind::Unary),
    ("/datamover.v1.Datamover/FindMissing", Kind::Unary),
    ("/datamover.v1.Datamover/PutChunks", Kind::ClientStream),
    ("/datamover.v1.Datamover/CommitBackup", Kind::Unary),
    ("/datamover.v1.Datamover/ListSnapshots", Kind::Unary),
    ("/datamover.v1.Datamover/ReadCatalog", Kind::ServerStream),
    ("/datamover.v1.Datamover/Restore", Kind::ServerStream),
    ("/datamover.v1.Datamover/DeleteSnapshot", Kind::Unary),
    ("/datamover.v1.Datamover/Forget", Kind::Unary),
    ("/datamover.v1.Datamover/Verify", Kind::Unary),
    ("/datamover.v1.Datamover/Maintain", Kind::Unary),
    ("/datamover.v1.Datamover/CatalogIndex", Kind::Unary),
    ("/datamover.v1.Datamover/ReadChunks", Kind::ServerStream),
    ("/datamover.v1.Sync/List", Kind::ServerStream),
    ("/datamover.v1.Sync/PutOffset", Kind::Unary),
    ("/datamover.v1.Sync/Put", Kind::ClientStream),
    ("/datamover.v1.Sync/Get", Kind::ServerStream),
    ("/datamover.v1.Sync/Delete", Kind::Unary),
    ("/datamover.v1.Sync/S3Credentials", Kind::Unary),
];

/// Stands for the harness's backup session id in inputs (as long as a real one), so
/// that inputs, and the committed corpus, reach past the session lookup.
pub const SESSION_PLACEHOLDER: &[u8; 32] = b"SESSION-ID-PLACEHOLDER-32-BYTES!";

/// Messages of a client stream at most, and response messages read at most.
const MAX_STREAM_MESSAGES: usize = 8;
const MAX_RESPONSES: usize = 64;
/// Longer than any call on the tiny repository should take: a hang is a bug.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

const CLIENT: &str = "fuzz";
const TOKEN: &str = "fuzz-token-0123456789";

/// An input: `[method index] [body]`; for a client stream the body is messages each
/// prefixed by its length as a protobuf varint (a length past the end takes the rest).
pub fn encode_input(method: usize, messages: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![method as u8];
    match METHODS.get(method).map(|m| m.1) {
        Some(Kind::ClientStream) => {
            for m in messages {
                prost::encoding::encode_varint(m.len() as u64, &mut v);
                v.extend_from_slice(m);
            }
        }
        _ => {
            if let Some(m) = messages.first() {
                v.extend_from_slice(m);
            }
        }
    }
    v
}

fn split_stream(mut body: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    while !body.is_empty() && out.len() < MAX_STREAM_MESSAGES {
        let Ok(len) = prost::encoding::decode_varint(&mut body) else {
            out.push(Bytes::copy_from_slice(body));
            break;
        };
        let n = usize::try_from(len).unwrap_or(usize::MAX).min(body.len());
        out.push(Bytes::copy_from_slice(&body[..n]));
        body = &body[n..];
    }
    out
}

fn replace_placeholder(body: &[u8], session: &str) -> Vec<u8> {
    let mut v = body.to_vec();
    let p = SESSION_PLACEHOLDER.as_slice();
    let mut i = 0;
    while i + p.len() <= v.len() {
        if &v[i..i + p.len()] == p {
            v[i..i + p.len()].copy_from_slice(session.as_bytes());
            i += p.len();
        } else {
            i += 1;
        }
    }
    v
}

/// A refusal must be a status a client can act on: a known code and a message.
fn check_status(method: &str, s: &Status) {
    assert!(
        !s.message().trim().is_empty(),
        "{method}: a refusal without a message: {s:?}"
    );
    match s.code() {
        // tonic answers a body that is not the request type with INTERNAL "failed to
        // decode Protobuf message: …" (the decoder's own words: clear enough).
        Code::Internal => assert!(
            s.message().contains("decode"),
            "{method}: an internal error: {s:?}"
        ),
        // A panic in a handler, or a broken connection.
        Code::Unknown | Code::Cancelled | Code::Unavailable => {
            panic!("{method}: the server failed: {s:?}")
        }
        _ => {}
    }
}

/// A running in-process server and a client of it.
pub struct GrpcTarget {
    rt: tokio::runtime::Runtime,
    grpc: tonic::client::Grpc<Channel>,
    session: String,
    key: ChunkIdKey,
    dir: PathBuf,
}

impl Drop for GrpcTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl GrpcTarget {
    /// Starts the server on a fresh filesystem store under the temp directory, one
    /// client (`fuzz`) with the full role, and one backup session (what
    /// [`SESSION_PLACEHOLDER`] stands for). The limits are raised so that the fuzzer's
    /// calls are not refused for their rate (unless limits were set in this process).
    pub fn start() -> Result<GrpcTarget, String> {
        let mut raw = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
        let dir = std::env::temp_dir().join(format!("datamover-fuzz-{}", hex::encode(raw)));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        crate::limits::init(crate::limits::Limits::new(crate::limits::LimitConfig {
            rate: 1e9,
            burst: 1e9,
            ..crate::limits::LimitConfig::default()
        }));
        // One thread: the server's tasks run on the thread that sends the input, so the
        // fuzzer's allocation check sees what decoding an input allocates.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let grpc = rt.block_on(serve(&dir))?;
        let mut t = GrpcTarget {
            rt,
            grpc,
            session: String::new(),
            key: ChunkIdKey::new([0; 32]),
            dir,
        };
        let hello = t.call(0, Bytes::new()).map_err(|s| format!("Hello: {s}"))?;
        let hello = v1::HelloResponse::decode(hello.first().cloned().unwrap_or_default())
            .map_err(|e| format!("HelloResponse: {e}"))?;
        t.key = ChunkIdKey::from_slice(&hello.chunk_id_key).map_err(|e| e.to_string())?;
        t.begin_session()?;
        // A snapshot to restore, read and delete: one file of one chunk. Its commit
        // ends the session, and `run` opens the next.
        for input in t.seeds().into_iter().take(3) {
            t.run(&input);
        }
        Ok(t)
    }

    /// Opens the backup session that [`SESSION_PLACEHOLDER`] stands for.
    fn begin_session(&mut self) -> Result<(), String> {
        let begin = v1::BeginBackupRequest {
            tag: "fuzz".into(),
            kind: v1::SnapshotKind::Files as i32,
            source: "/src".into(),
            hostname: "h".into(),
        };
        let r = self
            .call(1, begin.encode_to_vec().into())
            .map_err(|s| format!("BeginBackup: {s}"))?;
        let r = v1::BeginBackupResponse::decode(r.first().cloned().unwrap_or_default())
            .map_err(|e| format!("BeginBackupResponse: {e}"))?;
        if r.session_id.len() != SESSION_PLACEHOLDER.len() {
            return Err(format!("a session id of {} bytes", r.session_id.len()));
        }
        self.session = r.session_id;
        Ok(())
    }

    /// Whether the harness's session is still open (a FindMissing of no ids).
    fn session_open(&mut self) -> bool {
        let probe = v1::FindMissingRequest {
            session_id: self.session.clone(),
            ids: Vec::new(),
        };
        !matches!(self.call(2, probe.encode_to_vec().into()), Err(s) if s.code() == Code::NotFound)
    }

    /// Sends one input's request; after a CommitBackup (which may have ended the
    /// session) a new session is opened, so that later inputs reach past the lookup.
    fn send(&mut self, method: usize, body: Bytes) -> Result<Vec<Bytes>, Status> {
        let r = self.call(method, body);
        if METHODS[method % METHODS.len()].0.ends_with("/CommitBackup")
            && !self.session_open()
            && let Err(e) = self.begin_session()
        {
            panic!("a new backup session after CommitBackup: {e}");
        }
        r
    }

    /// Sends one request; the response messages or the refusal.
    fn call(&mut self, method: usize, body: Bytes) -> Result<Vec<Bytes>, Status> {
        let (path, kind) = METHODS[method % METHODS.len()];
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let grpc = &mut self.grpc;
        let fut = async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
            match kind {
                Kind::Unary => {
                    let r = grpc.unary(authed(body), path, Raw).await?;
                    Ok(vec![r.into_inner()])
                }
                Kind::ClientStream => {
                    let msgs = split_stream(&body);
                    let r = grpc
                        .client_streaming(authed(tokio_stream::iter(msgs)), path, Raw)
                        .await?;
                    Ok(vec![r.into_inner()])
                }
                Kind::ServerStream => {
                    let mut s = grpc.server_streaming(authed(body), path, Raw).await?;
                    let mut out = Vec::new();
                    let stream = s.get_mut();
                    while let Some(m) = stream.next().await {
                        out.push(m?);
                        if out.len() >= MAX_RESPONSES {
                            break;
                        }
                    }
                    Ok(out)
                }
            }
        };
        self.rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, fut)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("the call hung")))
        })
    }

    /// Runs one input: `[method] [body]` (see [`encode_input`]). Panics when the server
    /// fails (a panic in a handler, a hang, an internal error) or refuses without a
    /// clear status.
    pub fn run(&mut self, input: &[u8]) {
        let Some((&m, body)) = input.split_first() else {
            return;
        };
        let method = usize::from(m) % METHODS.len();
        let body = replace_placeholder(body, &self.session);
        match self.send(method, body.into()) {
            Ok(_) => {}
            Err(s) if s.code() == Code::DeadlineExceeded && s.message() == "the call hung" => {
                panic!("{}: the call hung", METHODS[method].0)
            }
            Err(s) => check_status(METHODS[method].0, &s),
        }
    }

    /// The status `input` is refused with (`None`: served).
    pub fn refusal(&mut self, input: &[u8]) -> Option<Status> {
        let (&m, body) = input.split_first()?;
        let body = replace_placeholder(body, &self.session);
        self.send(usize::from(m), body.into()).err()
    }

    /// Valid requests of every method (with [`SESSION_PLACEHOLDER`]): the first three
    /// store a one-chunk file and commit it.
    pub fn seeds(&self) -> Vec<Vec<u8>> {
        let session = String::from_utf8_lossy(SESSION_PLACEHOLDER).into_owned();
        let data = b"fuzzed file contents".to_vec();
        let id = self.key.id(&data).0.to_vec();
        let node = v1::Node {
            path: b"f".to_vec().into(),
            r#type: v1::NodeType::File as i32,
            mode: 0o644,
            size: data.len() as u64,
            chunks: vec![id.clone().into()],
            ..Default::default()
        };
        let catalog = node.encode_length_delimited_to_vec();
        let catalog_id = self.key.id(&catalog).0.to_vec();
        let chunk = |id: &[u8], data: &[u8]| v1::Chunk {
            id: id.to_vec().into(),
            data: data.to_vec().into(),
        };
        let put = v1::PutChunksRequest {
            session_id: session.clone(),
            chunks: vec![chunk(&id, &data), chunk(&catalog_id, &catalog)],
        };
        let commit = v1::CommitBackupRequest {
            session_id: session.clone(),
            catalog: vec![catalog_id.clone().into()],
            ..Default::default()
        };
        let find = v1::FindMissingRequest {
            session_id: session.clone(),
            ids: vec![id.clone().into(), vec![7u8; 31].into()],
        };
        // Data that does not hash to its id, an id of the wrong length.
        let lying = v1::PutChunksRequest {
            session_id: session.clone(),
            chunks: vec![chunk(&id, b"other data"), chunk(&[1, 2, 3], b"x")],
        };
        let restore = v1::RestoreRequest {
            snapshot: "fuzz".into(),
            path: b"f".to_vec().into(),
            include: vec!["*".into()],
            exclude: vec!["../*".into()],
            ..Default::default()
        };
        let header = |path: &str| v1::SyncPutRequest {
            part: Some(v1::sync_put_request::Part::Header(v1::SyncPutHeader {
                target: "t".into(),
                object: Some(v1::SyncObject {
                    path: path.into(),
                    size: 3,
                    ..Default::default()
                }),
                offset: 0,
            })),
        };
        let sync_data = v1::SyncPutRequest {
            part: Some(v1::sync_put_request::Part::Data(b"abc".to_vec().into())),
        };
        let trailer = v1::SyncPutRequest {
            part: Some(v1::sync_put_request::Part::Trailer(v1::SyncPutTrailer {
                hash: blake3::hash(b"abc").as_bytes().to_vec().into(),
            })),
        };
        let one = |m: usize, msg: Vec<u8>| encode_input(m, &[msg]);
        vec![
            one(3, put.encode_to_vec()),
            encode_input(
                3,
                &[
                    put.encode_to_vec(),
                    lying.encode_to_vec(),
                    put.encode_to_vec(),
                ],
            ),
            one(4, commit.encode_to_vec()),
            one(0, Vec::new()),
            one(
                1,
                v1::BeginBackupRequest {
                    tag: "t\0../".into(),
                    kind: 2,
                    source: "/".into(),
                    hostname: String::new(),
                }
                .encode_to_vec(),
            ),
            one(2, find.encode_to_vec()),
            one(3, lying.encode_to_vec()),
            one(5, v1::ListSnapshotsRequest::default().encode_to_vec()),
            one(
                6,
                v1::ReadCatalogRequest {
                    snapshot_id: "fuzz".into(),
                    encoded: true,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            one(7, restore.encode_to_vec()),
            one(
                8,
                v1::DeleteSnapshotRequest {
                    snapshot_id: "00000000".into(),
                }
                .encode_to_vec(),
            ),
            one(
                9,
                v1::ForgetRequest {
                    tag: "fuzz".into(),
                    keep_last: 5,
                    dry_run: true,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            one(10, v1::VerifyRequest::default().encode_to_vec()),
            one(11, v1::MaintainRequest { dry_run: true }.encode_to_vec()),
            one(
                12,
                v1::CatalogIndexRequest {
                    snapshot: "fuzz".into(),
                }
                .encode_to_vec(),
            ),
            one(
                13,
                v1::ReadChunksRequest {
                    ids: vec![id.clone().into(), catalog_id.into()],
                }
                .encode_to_vec(),
            ),
            one(
                14,
                v1::SyncListRequest { target: "t".into() }.encode_to_vec(),
            ),
            one(
                15,
                v1::SyncPutOffsetRequest {
                    target: "t".into(),
                    object: Some(v1::SyncObject {
                        path: "a/b".into(),
                        size: 3,
                        ..Default::default()
                    }),
                }
                .encode_to_vec(),
            ),
            encode_input(
                16,
                &[
                    header("a/b").encode_to_vec(),
                    sync_data.encode_to_vec(),
                    trailer.encode_to_vec(),
                ],
            ),
            encode_input(
                16,
                &[header("../x\0").encode_to_vec(), sync_data.encode_to_vec()],
            ),
            one(
                17,
                v1::SyncGetRequest {
                    target: "t".into(),
                    path: "a/b".into(),
                    offset: 1,
                }
                .encode_to_vec(),
            ),
            one(
                18,
                v1::SyncDeleteRequest {
                    target: "t".into(),
                    paths: vec!["a/b".into(), "../../etc".into()],
                }
                .encode_to_vec(),
            ),
            one(19, Vec::new()),
        ]
    }
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    let meta = r.metadata_mut();
    meta.insert(
        datamover_proto::CLIENT_ID_HEADER,
        tonic::metadata::MetadataValue::from_static(CLIENT),
    );
    meta.insert(
        datamover_proto::AUTHORIZATION_HEADER,
        tonic::metadata::MetadataValue::from_static("Bearer fuzz-token-0123456789"),
    );
    r
}

/// The server's services on a loopback port (plain HTTP/2) and a channel to them.
async fn serve(dir: &std::path::Path) -> Result<tonic::client::Grpc<Channel>, String> {
    use datamover_repo::objects::FsObjects;
    use datamover_repo::store::{FsStore, Store};
    use datamover_repo::{Repository, RepositoryOptions};

    let metrics = Arc::new(crate::metrics::Metrics::new().map_err(|e| e.to_string())?);
    let store: Arc<dyn Store> = Arc::new(FsStore::new(dir.join("repo")));
    let repo = Repository::open(
        store,
        b"fuzz password",
        RepositoryOptions {
            index_cache_dir: Some(dir.join("index")),
            ..RepositoryOptions::default()
        },
    )
    .await
    .map_err(|e| format!("repository: {e}"))?;
    let creds = Arc::new(crate::credentials::CredentialStore::new(
        HashMap::from([(
            CLIENT.to_string(),
            Credential::Token(TOKEN.as_bytes().to_vec()),
        )]),
        crate::access::Access::default(),
    ));
    let sessions = crate::service::Sessions::default();
    let maintainer = crate::maintenance::Maintainer::new(
        Arc::clone(&repo),
        sessions.clone(),
        crate::maintenance::MaintenanceSettings::default(),
        Arc::clone(&metrics),
    );
    let service = crate::service::DatamoverService::new(
        repo,
        Arc::clone(&creds),
        Arc::clone(&metrics),
        sessions,
        maintainer,
    )
    .into_server();
    let objects = Arc::new(FsObjects::new(dir.join("sync")));
    let sync = crate::sync::SyncService::new(
        objects,
        creds,
        metrics,
        crate::sync::ManifestLimits::default(),
    )
    .into_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .add_service(sync)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    Ok(tonic::client::Grpc::new(channel)
        .max_decoding_message_size(datamover_proto::MAX_MESSAGE_BYTES))
}
