//! `Restore` sends the same files whether the client takes chunks as stored (compressed,
//! what the client asks for) or whole (for clients that do not ask): compressed chunks
//! cross the wire compressed, with the id that checks them, and chunks stored
//! uncompressed are sent whole in both cases.

use std::collections::BTreeMap;

use datamover_client::connect;
use datamover_core::chunk::ChunkId;
use datamover_proto::v1::{self, restore_item::Item};
use datamover_tests::{Server, Storage, random_bytes};
use tokio_stream::StreamExt;

const TOKEN: &str = "wire-token";

/// What a restore sends: each file's contents, and the bytes of data on the wire.
struct Sent {
    files: BTreeMap<String, Vec<u8>>,
    wire_bytes: usize,
    packed_items: usize,
}

async fn restore(server: &Server, tag: &str, accept_packed: bool) -> Sent {
    let settings = server.client_settings("c", TOKEN);
    let mut conn = connect::connect(&settings).await.unwrap();
    let mut stream = conn
        .api
        .restore(v1::RestoreRequest {
            snapshot: tag.into(),
            accept_packed,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut sent = Sent {
        files: BTreeMap::new(),
        wire_bytes: 0,
        packed_items: 0,
    };
    let mut current = String::new();
    while let Some(msg) = stream.next().await {
        for item in msg.unwrap().items {
            match item.item.unwrap() {
                Item::Node(n) => {
                    current = String::from_utf8(n.path.to_vec()).unwrap();
                    if n.r#type == v1::NodeType::File as i32 {
                        sent.files.insert(current.clone(), Vec::new());
                    }
                }
                Item::Data(d) => {
                    sent.wire_bytes += d.len();
                    sent.files.get_mut(&current).unwrap().extend_from_slice(&d);
                }
                Item::Packed(p) => {
                    assert!(
                        accept_packed,
                        "packed data sent to a client that did not ask"
                    );
                    sent.packed_items += 1;
                    sent.wire_bytes += p.zstd.len();
                    let data = zstd::bulk::decompress(&p.zstd, p.raw_length as usize).unwrap();
                    assert_eq!(data.len(), p.raw_length as usize);
                    assert_eq!(
                        conn.key.id(&data),
                        ChunkId::from_slice(&p.id).unwrap(),
                        "a packed chunk comes with its id"
                    );
                    sent.files
                        .get_mut(&current)
                        .unwrap()
                        .extend_from_slice(&data);
                }
            }
        }
    }
    sent
}

#[test]
fn restore_sends_the_same_files_packed_or_whole() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = Server::start(Storage::Filesystem, &[("c", TOKEN)]);
    let client = server.client("c", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let text: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("line {i} of a text that compresses\n").into_bytes())
        .collect();
    let random = random_bytes(7, 3 << 20);
    std::fs::write(src.join("text"), &text).unwrap();
    std::fs::write(src.join("random"), &random).unwrap();
    for i in 0..50 {
        std::fs::write(
            src.join("d").join(format!("small-{i}")),
            format!("small {i}"),
        )
        .unwrap();
    }
    client.ok(&["backup_files", src.to_str().unwrap(), "wire"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let packed = rt.block_on(restore(&server, "wire", true));
    let whole = rt.block_on(restore(&server, "wire", false));

    assert_eq!(packed.files, whole.files, "the same files either way");
    assert_eq!(packed.files["text"], text);
    assert_eq!(packed.files["random"], random);
    assert_eq!(packed.files["d/small-7"], b"small 7");
    assert_eq!(whole.packed_items, 0);
    assert!(
        packed.packed_items > 0,
        "compressible chunks are sent packed"
    );
    let raw = text.len() + random.len();
    assert!(
        whole.wire_bytes >= raw,
        "whole: {} of {raw}",
        whole.wire_bytes
    );
    // The text shrinks on the wire; the random file (stored uncompressed) does not.
    assert!(
        packed.wire_bytes < random.len() + text.len() / 4,
        "packed: {} bytes on the wire for {raw}",
        packed.wire_bytes
    );
}
