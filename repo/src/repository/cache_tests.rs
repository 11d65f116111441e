//! The local index cache across restarts: kept, corrupt, stale.

use super::*;
use crate::store::FsStore;

fn options(cache: Option<&std::path::Path>) -> RepositoryOptions {
    RepositoryOptions {
        kdf_memory_kib: 64,
        index_cache_dir: cache.map(std::path::Path::to_path_buf),
        ..RepositoryOptions::default()
    }
}

async fn add(repo: &Arc<Repository>, what: &[&str]) -> Vec<ChunkId> {
    let key = repo.chunk_id_key("t");
    let chunks: Vec<(ChunkId, Bytes)> = what
        .iter()
        .map(|s| {
            let data = Bytes::from(s.as_bytes().to_vec());
            (key.id(&data), data)
        })
        .collect();
    let ids = chunks.iter().map(|(id, _)| *id).collect();
    repo.add_chunks("t", chunks).await.unwrap();
    repo.flush().await.unwrap();
    ids
}

async fn all_readable(repo: &Arc<Repository>, ids: &[ChunkId]) {
    assert_eq!(repo.find_missing("t", ids).unwrap(), Vec::<u32>::new());
    assert_eq!(
        repo.find_missing("u", ids).unwrap().len(),
        ids.len(),
        "another tenant has none of them"
    );
    for id in ids {
        repo.read_chunk("t", id).await.unwrap();
    }
}

fn cache_file(dir: &std::path::Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "redb"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

#[tokio::test]
async fn a_stale_or_corrupt_local_index_is_rebuilt_from_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(FsStore::new(dir.path()));
    let open = || Repository::open(Arc::clone(&store), b"pw", options(Some(cache.path())));

    let repo = open().await.unwrap();
    let mut ids = add(&repo, &["one", "two", "three"]).await;
    all_readable(&repo, &ids).await;
    drop(repo);

    // Kept: a restart reads no index object again.
    let repo = open().await.unwrap();
    assert_eq!(repo.index.read().unwrap().len(), 3);
    all_readable(&repo, &ids).await;
    drop(repo);

    // Corrupt: detected at open, rebuilt from the bucket.
    let file = cache_file(cache.path());
    std::fs::write(&file, vec![0x5a; 64 * 1024]).unwrap();
    let repo = open().await.unwrap();
    all_readable(&repo, &ids).await;
    drop(repo);

    // Stale: while this server was down, another one (its own cache) added a chunk and
    // compacted `index/` into one object, as maintenance does.
    let other = Repository::open(Arc::clone(&store), b"pw", options(None))
        .await
        .unwrap();
    ids.extend(add(&other, &["four"]).await);
    let names = store.list(FileType::Index).await.unwrap();
    assert!(names.len() >= 2);
    let mut packs = Vec::new();
    for name in &names {
        let sealed = store.read(FileType::Index, name).await.unwrap();
        let raw = crypto::unpack_blob(&other.keys, &sealed, 0, name).unwrap();
        packs.extend(IndexFile::decode(raw.as_slice()).unwrap().packs);
    }
    let merged = other.write_index_file(&IndexFile { packs }).await.unwrap();
    for name in names.iter().filter(|n| **n != merged) {
        store.remove(FileType::Index, name).await.unwrap();
    }
    drop(other);
    let repo = open().await.unwrap();
    all_readable(&repo, &ids).await;
    let disk = repo.index.read().unwrap().disk();
    assert_eq!(
        disk.loaded_names().unwrap(),
        HashSet::from([merged.clone()]),
        "rebuilt from the one object left"
    );
    drop(disk);
    drop(repo);
    // the rebuild replaced the cache file, and a restart uses it as it is
    let _ = cache_file(cache.path());
    let repo = open().await.unwrap();
    assert_eq!(repo.index.read().unwrap().len(), 4);
    all_readable(&repo, &ids).await;
}

/// A pack in `data/` that no index object lists is adopted at open, unless a
/// maintenance run holds the bucket's lock: it may be a pack that run is deleting.
#[tokio::test]
async fn packs_without_an_index_are_not_adopted_at_open_while_maintenance_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(FsStore::new(dir.path()));
    let open = || Repository::open(Arc::clone(&store), b"pw", options(None));
    let repo = open().await.unwrap();
    let ids = add(&repo, &["doomed one", "doomed two"]).await;
    drop(repo);
    // What a maintenance run's deletions leave for a moment: the pack, no index object.
    for name in store.list(FileType::Index).await.unwrap() {
        store.remove(FileType::Index, &name).await.unwrap();
    }
    let lock = format!(
        r#"{{"owner":"replica-0","written_unix":{}}}"#,
        super::maintenance::unix_now()
    );
    store
        .write(FileType::Lock, "maintenance", Bytes::from(lock))
        .await
        .unwrap();
    let repo = open().await.unwrap();
    assert_eq!(
        repo.find_missing("t", &ids).unwrap(),
        vec![0, 1],
        "not adopted while maintenance runs"
    );
    assert!(store.list(FileType::Index).await.unwrap().is_empty());
    drop(repo);
    store.remove(FileType::Lock, "maintenance").await.unwrap();
    let repo = open().await.unwrap();
    all_readable(&repo, &ids).await;
}
