//! Fuzz harnesses (see `datamover_core::fuzz`) for the core decoders of untrusted bytes:
//! catalog streams and nodes, snapshot paths, chunk ids and chunker parameters.

use datamover_core::catalog::{CatalogDecoder, encode_node};
use datamover_core::chunk::{ChunkId, ChunkIdKey, ChunkerParams};
use datamover_core::fuzz::{self, LargestAlloc};
use datamover_core::paths::{components, safe_relative};
use datamover_proto::v1::{Node, NodeType};

#[global_allocator]
static ALLOC: LargestAlloc = LargestAlloc;

fn catalog_seed() -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (path, ty)) in [
        ("dir", NodeType::Dir),
        ("dir/file", NodeType::File),
        ("dir/link", NodeType::Symlink),
        ("fifo", NodeType::Fifo),
    ]
    .into_iter()
    .enumerate()
    {
        encode_node(
            &Node {
                path: path.as_bytes().to_vec().into(),
                r#type: ty as i32,
                mode: 0o644,
                mtime_ns: 1_700_000_000_000_000_000,
                size: 1234 * i as u64,
                link_target: b"../x".to_vec().into(),
                chunks: vec![vec![i as u8; 32].into(); i],
                ..Default::default()
            },
            &mut out,
        );
    }
    out
}

#[test]
fn fuzz_catalog_stream() {
    let runs = fuzz::run("catalog_stream", &[catalog_seed()], |input| {
        // Whole, and in pieces of the sizes the input's first byte picks.
        let step = usize::from(input.first().copied().unwrap_or(1)).max(1);
        for piece in [input.len().max(1), step] {
            let mut dec = CatalogDecoder::new();
            for p in input.chunks(piece) {
                dec.push(p);
                loop {
                    match dec.next_node() {
                        Ok(Some(node)) => {
                            // What a restore does with each node's path.
                            let _ = safe_relative(&node.path);
                            for c in &node.chunks {
                                let _ = ChunkId::from_slice(c);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            assert!(!e.to_string().is_empty());
                            return;
                        }
                    }
                }
            }
            let _ = dec.finish();
        }
    });
    assert!(runs >= fuzz::DEFAULT_RUNS || std::env::var("DATAMOVER_FUZZ_SECONDS").is_ok());
}

#[test]
fn fuzz_snapshot_paths() {
    let seeds = vec![
        b"a/b/c".to_vec(),
        b"../x".to_vec(),
        b"/etc/passwd".to_vec(),
        b"a/./b".to_vec(),
    ];
    fuzz::run("snapshot_paths", &seeds, |input| {
        if let Ok(p) = safe_relative(input) {
            // Whatever is accepted is plain names only: joined to a target, it stays in.
            for c in p.components() {
                assert!(
                    matches!(c, std::path::Component::Normal(_)),
                    "{input:?} gave {p:?}"
                );
            }
            assert!(components(input).all(|c| !c.is_empty() && c != b".." && c != b"."));
            assert!(!input.contains(&0));
        }
    });
}

#[test]
fn fuzz_chunk_ids_and_keys() {
    let key = ChunkIdKey::new([9; 32]);
    let seeds = vec![key.id(b"x").0.to_vec(), vec![1; 31], vec![2; 33]];
    fuzz::run("chunk_ids", &seeds, |input| {
        match ChunkId::from_slice(input) {
            Ok(id) => assert_eq!(input.len(), 32, "{id}"),
            Err(e) => assert!(e.to_string().contains("32 bytes")),
        }
        let _ = ChunkIdKey::from_slice(input);
        if input.len() >= 12 {
            let n =
                |i: usize| u32::from_le_bytes([input[i], input[i + 1], input[i + 2], input[i + 3]]);
            let p = ChunkerParams {
                min_size: n(0),
                avg_size: n(4),
                max_size: n(8),
            };
            if p.validate().is_ok() {
                assert!(p.min_size <= p.avg_size && p.avg_size <= p.max_size);
            }
        }
    });
}

#[test]
fn the_harness_catches_panics_and_allocations_that_trust_a_length() {
    let seed = vec![vec![0u8; 8]];
    // A decoder that trusts a length from its input.
    let trusting = std::panic::catch_unwind(|| {
        fuzz::run("self_test_alloc", &seed, |input| {
            if input.len() >= 4 {
                let n = u32::from_le_bytes([input[0], input[1], input[2], input[3]]);
                let v: Vec<u8> = Vec::with_capacity(n as usize);
                std::hint::black_box(v);
            }
        });
    });
    let msg = trusting.expect_err("caught");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("made an allocation of"), "{msg}");
    // A decoder that indexes past its input.
    let panicking = std::panic::catch_unwind(|| {
        fuzz::run("self_test_panic", &seed, |input| {
            let _ = input[7];
        });
    });
    assert!(panicking.is_err());
}
