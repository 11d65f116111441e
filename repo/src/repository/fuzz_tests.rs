//! Fuzz harnesses (see `datamover_core::fuzz`) for what the repository reads from its
//! store, which others may be able to write to: sealed objects (tampered ciphertext,
//! nonce, length), compressed payloads, pack trailers, `index/` objects, snapshot JSON,
//! the `config` object and `locks/` JSON.

use datamover_core::chunk::ChunkId;
use datamover_core::fuzz;
use prost::Message;

use super::RepoConfig;
use super::maintenance::LockFile;
use crate::SnapshotFile;
use crate::crypto::{self, KdfParams, Keys};
use crate::index::{BlobEntry, DiskIndex, Index, IndexFile, PackEntries};
use crate::pack::PackBuilder;

fn keys() -> Keys {
    let kdf = KdfParams {
        memory_kib: 8,
        iterations: 1,
        ..KdfParams::new_random()
    };
    Keys::derive(b"fuzz", &kdf).expect("keys")
}

fn plaintexts() -> Vec<Vec<u8>> {
    vec![
        Vec::new(),
        b"small".to_vec(),
        b"compressible ".repeat(40),
        (0..6000u32).map(|i| (i * 7 % 251) as u8).collect(),
    ]
}

#[test]
fn fuzz_sealed_objects() {
    let k = keys();
    let plain = plaintexts();
    let mut seeds: Vec<Vec<u8>> = plain.iter().map(|p| k.seal(p)).collect();
    seeds.extend(plain.iter().map(|p| crypto::pack_blob(&k, p, 3)));
    fuzz::run("sealed_objects", &seeds, |input| {
        // Authenticated: whatever opens is one of the sealed originals, untouched.
        if let Ok(opened) = k.open(input, "fuzz") {
            assert!(seeds.iter().any(|s| s == input), "a tampered object opened");
            let _ = opened;
        }
        if crypto::unpack_blob(&k, input, 0, "fuzz").is_ok() {
            assert!(
                seeds.iter().any(|s| s == input),
                "a tampered object unpacked"
            );
        }
        let _ = crypto::unpack_blob_bytes(&k, input, 0, "fuzz");
    });
}

#[test]
fn fuzz_compressed_payloads() {
    let seeds: Vec<Vec<u8>> = plaintexts()
        .iter()
        .map(|p| crypto::compress(p, 3))
        .collect();
    fuzz::run("compressed_payloads", &seeds, |input| {
        let _ = crypto::decompress(input, 0, "fuzz");
        // With the length an index entry would give.
        let raw = input.len().min(64 * 1024);
        if let Ok(out) = crypto::decompress(input, raw, "fuzz")
            && input.first() == Some(&1)
        {
            assert_eq!(out.len(), raw);
        }
    });
}

fn entries(n: u8) -> PackEntries {
    PackEntries {
        name: String::new(),
        blobs: (0..n)
            .map(|i| BlobEntry {
                id: vec![i; 32],
                offset: u32::from(i) * 100,
                length: 100,
                raw_length: 80,
                tenant: format!("t{}", i % 2),
            })
            .collect(),
        created_unix: 1_700_000_000,
    }
}

/// A pack's trailer and length, sealed with `k`, after `body`.
fn pack_bytes(k: &Keys, body: &[u8], e: &PackEntries) -> Vec<u8> {
    let mut out = body.to_vec();
    let trailer = crypto::pack_blob(k, &e.encode_to_vec(), 3);
    out.extend_from_slice(&trailer);
    out.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
    out
}

#[test]
fn fuzz_pack_trailers() {
    let k = keys();
    let seeds = vec![
        pack_bytes(&k, &[5; 300], &entries(3)),
        pack_bytes(&k, &[], &entries(0)),
    ];
    fuzz::run("pack_trailers", &seeds, |input| {
        match PackBuilder::read_trailer(&k, "fuzz", input) {
            Ok(e) => {
                // Authenticated: only an untouched trailer reads.
                let mut index = Index::new(DiskIndex::in_memory()).expect("index");
                index.add_own_pack(&e);
                assert!(
                    seeds
                        .iter()
                        .any(|s| input.ends_with(&s[300.min(s.len())..]))
                );
            }
            Err(e) => assert!(e.to_string().contains("pack fuzz"), "{e}"),
        }
    });
}

#[test]
fn fuzz_index_objects() {
    // What an index object holds once opened (a buggy writer's, say): decoded and
    // loaded into the index, then looked up.
    let seeds = vec![
        IndexFile {
            packs: vec![entries(3), entries(1)],
        }
        .encode_to_vec(),
    ];
    let mut index = Index::new(DiskIndex::in_memory()).expect("index");
    let mut n = 0u64;
    fuzz::run("index_objects", &seeds, |input| {
        if let Ok(file) = IndexFile::decode(input) {
            n += 1;
            let added = index
                .disk()
                .ingest(&[(format!("i{n}"), file.clone())], &Default::default())
                .expect("ingest");
            index.note_added(&added).expect("filter");
            for p in &file.packs {
                for b in &p.blobs {
                    if let Ok(id) = ChunkId::from_slice(&b.id) {
                        let _ = index.find(&b.tenant, &id);
                    }
                }
            }
        }
    });
}

#[test]
fn fuzz_snapshot_json() {
    let seeds = vec![
        br#"{"tag":"t","time":"2024-01-01T00:00:00Z","client_id":"c","tenant":"c","hostname":"h","source":"/d","kind":"files","stats":{"files":1,"dirs":0,"other":0,"bytes":5,"bytes_sent":5,"chunks":1,"chunks_sent":1,"files_unchanged":0},"catalog":["0000000000000000000000000000000000000000000000000000000000000000"],"root":{"mode":493,"mtime_ns":1,"uid":0,"gid":0},"catalog_marks":[{"chunk":0,"offset":0,"path":"61"}]}"#.to_vec(),
    ];
    fuzz::run("snapshot_json", &seeds, |input| {
        if let Ok(s) = serde_json::from_slice::<SnapshotFile>(input) {
            let _ = s.catalog_ids();
            let _ = s.to_proto();
            for m in &s.catalog_marks {
                let _ = m.to_proto();
            }
        }
    });
}

#[test]
fn fuzz_config_json() {
    let seeds = vec![
        br#"{"version":1,"id":"abc","kdf":{"algorithm":"argon2id","memory_kib":65536,"iterations":3,"parallelism":1,"salt":"00112233445566778899aabbccddeeff"},"chunker_min":65536,"chunker_avg":262144,"chunker_max":1048576,"key_check":"00"}"#.to_vec(),
    ];
    fuzz::run("config_json", &seeds, |input| {
        if let Ok(c) = serde_json::from_slice::<RepoConfig>(input) {
            // What opening a repository does before deriving the key.
            if c.kdf.check().is_ok() {
                assert!(c.kdf.memory_kib <= crypto::MAX_KDF_MEMORY_KIB);
            }
            let _ = hex::decode(&c.key_check);
        }
    });
}

#[test]
fn fuzz_lock_json() {
    let seeds = vec![
        br#"{"owner":"server-1","written_unix":1700000000,"oldest_session_unix":1699999000}"#
            .to_vec(),
        br#"{"owner":"m","written_unix":1}"#.to_vec(),
    ];
    fuzz::run("lock_json", &seeds, |input| {
        let _ = serde_json::from_slice::<LockFile>(input);
    });
}
