//! Fuzz harnesses (see `datamover_core::fuzz`) for what the server reads that others
//! write: credential files (tokens and PHC strings), the edge-sync state objects
//! (manifests and upload records) in the bucket, and the gRPC requests clients send
//! (`grpc_messages`: raw request bodies sent to a real server in this process). The
//! bodies are `datamover_server::fuzz_targets`, shared with the cargo-fuzz targets.

use datamover_core::fuzz::{self, LargestAlloc};
use datamover_server::fuzz_targets::{self, GrpcTarget, SESSION_PLACEHOLDER};
use prost::Message;

#[global_allocator]
static ALLOC: LargestAlloc = LargestAlloc;

#[test]
fn fuzz_credential_files() {
    let seeds = vec![
        b"token-1234\n".to_vec(),
        b"  $argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQxMjM0$M1R6TXpDb3JyZWN0SG9yc2VCYXR0ZXJ5U3RhcGxl\n".to_vec(),
        b"\xff\xfe".to_vec(),
    ];
    fuzz::run("credential_files", &seeds, fuzz_targets::credential_files);
}

#[test]
fn fuzz_sync_state() {
    let seeds = vec![
        br#"{"entries":{"a/b.txt":{"e":"\"etag\"","s":5,"h":"0000000000000000000000000000000000000000000000000000000000000000","m":1,"o":420}}}"#.to_vec(),
        br#"{"upload_id":"u","size":10485760,"hash":"1111111111111111111111111111111111111111111111111111111111111111","part_size":5242880,"parts":[[1,"x"]]}"#.to_vec(),
    ];
    let mut seeds = seeds;
    seeds.extend(manifest_objects());
    fuzz::run("sync_state", &seeds, fuzz_targets::sync_state);
}

/// A manifest base of two entries and a delta that sets one and removes another.
fn manifest_objects() -> Vec<Vec<u8>> {
    use datamover_server::sync::manifest_store;
    use datamover_server::sync::state::{Entry, Manifest};
    let entry = |n: u8| Entry {
        etag: format!("\"etag-{n}\""),
        size: u64::from(n) * 1000,
        hash: [n; 32],
        mtime_ns: i64::from(n) << 40,
        mode: 0o644,
    };
    let mut m = Manifest::default();
    m.entries.insert("a/b.txt".into(), entry(1));
    m.entries.insert("c.bin".into(), entry(2));
    let changes = [
        ("a/b.txt".to_string(), Some(entry(3))),
        ("c.bin".to_string(), None),
    ]
    .into_iter()
    .collect();
    vec![
        manifest_store::encode_base(&m),
        manifest_store::encode_delta(&changes),
    ]
}

#[test]
fn fuzz_grpc_messages() {
    let mut target = GrpcTarget::start().expect("the in-process server starts");
    let seeds = target.seeds();
    let runs = fuzz::run("grpc_messages", &seeds, |input| target.run(input));
    eprintln!("grpc_messages: {runs} requests");
}

/// Requests the server must refuse with a clear status, each checked for its code: a
/// harness that let them through, or a server that stopped checking, fails here.
#[test]
fn crafted_requests_are_refused_with_clear_statuses() {
    let mut target = GrpcTarget::start().expect("the in-process server starts");
    let session = String::from_utf8_lossy(SESSION_PLACEHOLDER).into_owned();
    let chunk = |id: Vec<u8>, data: &[u8]| datamover_proto::v1::Chunk {
        id: id.into(),
        data: data.to_vec().into(),
    };
    let put = |chunks| {
        fuzz_targets::encode_input(
            3,
            &[datamover_proto::v1::PutChunksRequest {
                session_id: session.clone(),
                chunks,
            }
            .encode_to_vec()],
        )
    };
    let cases: Vec<(&str, Vec<u8>, tonic::Code, &str)> = vec![
        (
            "an id of the wrong length",
            put(vec![chunk(vec![1; 31], b"x")]),
            tonic::Code::InvalidArgument,
            "",
        ),
        (
            "data that does not hash to its id",
            put(vec![chunk(vec![9; 32], b"not the data of that id")]),
            tonic::Code::InvalidArgument,
            "",
        ),
        (
            "no such session",
            fuzz_targets::encode_input(
                3,
                &[datamover_proto::v1::PutChunksRequest {
                    session_id: "0".repeat(32),
                    chunks: vec![],
                }
                .encode_to_vec()],
            ),
            tonic::Code::NotFound,
            "run the backup again",
        ),
        (
            "a body that is not a request",
            vec![1, 0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
            tonic::Code::Internal,
            "decode",
        ),
        (
            "a restore path past the limit",
            fuzz_targets::encode_input(
                7,
                &[datamover_proto::v1::RestoreRequest {
                    snapshot: "fuzz".into(),
                    path: vec![b'a'; 5000].into(),
                    ..Default::default()
                }
                .encode_to_vec()],
            ),
            tonic::Code::ResourceExhausted,
            "shorter path",
        ),
    ];
    for (what, input, code, words) in cases {
        let s = target
            .refusal(&input)
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(s.code(), code, "{what}: {s:?}");
        assert!(s.message().contains(words), "{what}: {s:?}");
    }
}
