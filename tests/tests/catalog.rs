//! `ReadCatalog` gives the same nodes whether the catalog is sent as stored (what the
//! client asks for) or decoded (for clients that do not ask for it encoded), across
//! several catalog chunks.

use datamover_client::connect;
use datamover_core::catalog::CatalogDecoder;
use datamover_proto::v1::{self, Node};
use datamover_tests::{Server, Storage};
use tokio_stream::StreamExt;

const TOKEN: &str = "catalog-token";

async fn read_catalog(server: &Server, snapshot_id: &str, encoded: bool) -> (Vec<Node>, usize) {
    let settings = server.client_settings("c", TOKEN);
    let mut conn = connect::connect(&settings).await.unwrap();
    let mut stream = conn
        .api
        .read_catalog(v1::ReadCatalogRequest {
            snapshot_id: snapshot_id.into(),
            encoded,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut nodes, mut messages) = (Vec::new(), 0);
    let mut decoder = CatalogDecoder::new();
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        messages += 1;
        if encoded {
            assert!(
                msg.nodes.is_empty(),
                "nodes sent though encoded was asked for"
            );
        } else {
            assert!(
                msg.encoded.is_empty(),
                "encoded sent though nodes were asked for"
            );
        }
        nodes.extend(msg.nodes);
        decoder.push(&msg.encoded);
        while let Some(n) = decoder.next_node().unwrap() {
            nodes.push(n);
        }
    }
    decoder.finish().unwrap();
    (nodes, messages)
}

#[test]
fn catalog_reads_the_same_encoded_or_decoded() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = Server::start(Storage::Filesystem, &[("c", TOKEN)]);
    let client = server.client("c", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    // 20,000 files: a catalog of several chunks (each up to 1 MiB, 256 KiB on average).
    for d in 0..20 {
        let dir = src.join(format!("dir-{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..1000 {
            std::fs::write(
                dir.join(format!("file-with-a-longer-name-{i:04}")),
                [d as u8; 3],
            )
            .unwrap();
        }
    }
    let run = client.ok(&["backup_files", src.to_str().unwrap(), "cat"]);
    let id = run["snapshot_id"].as_str().unwrap().to_string();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (encoded, pieces) = rt.block_on(read_catalog(&server, &id, true));
    let (decoded, _) = rt.block_on(read_catalog(&server, &id, false));
    assert_eq!(encoded.len(), 20 * 1000 + 20, "every file and directory");
    assert!(
        pieces > 1,
        "the catalog spans several chunks ({pieces} pieces)"
    );
    assert_eq!(encoded, decoded);
    assert!(
        encoded.windows(2).all(
            |w| datamover_core::paths::walk_order(&w[0].path, &w[1].path)
                == std::cmp::Ordering::Less
        ),
        "in walk order"
    );

    // The incremental backup reads it encoded: nothing is read again.
    let second = client.ok(&["backup_files", src.to_str().unwrap(), "cat"]);
    assert_eq!(second["files_unchanged"], 20_000);
}
