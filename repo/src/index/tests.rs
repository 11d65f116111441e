use super::*;

/// An index over a fresh on-disk index in `dir`.
fn index_in(dir: &Path) -> Index {
    Index::new(DiskIndex::open(dir, "repo").unwrap()).unwrap()
}

/// What a refresh does with one `index/` object.
fn ingest(ix: &mut Index, name: &str, packs: Vec<PackEntries>) {
    let file = IndexFile { packs };
    let disk = ix.disk();
    let added = disk
        .ingest(&[(name.to_string(), file.clone())], ix.condemned())
        .unwrap();
    ix.note_added(&added).unwrap();
    ix.own_packs_indexed(&FlatFile::from_index(&file));
}

fn pack(name: &str, id: ChunkId) -> PackEntries {
    PackEntries {
        name: name.into(),
        blobs: vec![BlobEntry {
            id: id.0.to_vec(),
            offset: 0,
            length: 10,
            raw_length: 5,
            tenant: "a".into(),
        }],
        created_unix: 0,
    }
}

fn id_of(n: u32) -> ChunkId {
    ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

#[test]
fn tenants_are_separate() {
    let dir = tempfile::tempdir().unwrap();
    let mut ix = index_in(dir.path());
    let id = ChunkId([1; 32]);
    assert!(ix.reserve("a", id));
    assert!(!ix.reserve("a", id));
    assert!(ix.is_pending("a", &id));
    assert!(!ix.is_pending("b", &id));
    // an own pack first (in memory), then listed by an index object (on disk)
    ix.add_own_pack(&pack("p", id));
    for _ in 0..2 {
        assert!(ix.is_stored("a", &id));
        assert!(!ix.is_stored("b", &id));
        assert!(ix.find("b", &id).is_none());
        assert_eq!(ix.find("a", &id).unwrap().pack, "p");
        assert_eq!(ix.missing("a", &[id]), Vec::<u32>::new());
        assert_eq!(ix.missing("b", &[id]), vec![0]);
        ingest(&mut ix, "i1", vec![pack("p", id)]);
    }
    assert!(ix.own.is_empty(), "indexed own packs leave memory");
    assert!(ix.has_pack("p"));
    assert!(!ix.has_pack("q"));
}

#[test]
fn condemned_copy_counts_as_absent_until_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut ix = index_in(dir.path());
    let id = ChunkId([2; 32]);
    ingest(&mut ix, "i1", vec![pack("old", id)]);
    ix.condemn(id, "old");
    assert!(!ix.is_stored("a", &id));
    assert_eq!(ix.missing("a", &[id]), vec![0]);
    assert!(ix.has_condemned("a"));
    assert!(
        !ix.has_condemned("b"),
        "another tenant's condemnations are not ours"
    );
    assert_eq!(ix.condemned_copy("a", &id).unwrap().pack, "old");
    // a backup may store it again: the new copy is the one reads use
    assert!(ix.reserve("a", id));
    ingest(&mut ix, "i2", vec![pack("new", id)]);
    assert!(ix.is_stored("a", &id));
    assert_eq!(ix.find("a", &id).unwrap().pack, "new");
    assert!(ix.condemned_copy("a", &id).is_none());
    assert!(
        !ix.has_condemned("a"),
        "the live copy is the one that counts"
    );
    // a condemnation of the old copy does not touch the new one
    ingest(&mut ix, "i3", vec![pack("third", id)]);
    assert_eq!(ix.find("a", &id).unwrap().pack, "new");
}

#[test]
fn many_chunks_a_byte_each_in_memory_first_live_copy_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut ix = index_in(dir.path());
    let per_pack = 32u32;
    let n = 300_000u32;
    let mut packs = Vec::new();
    for p in 0..n / per_pack {
        let blobs = (0..per_pack)
            .map(|i| BlobEntry {
                id: id_of(p * per_pack + i).0.to_vec(),
                offset: i,
                length: 1,
                raw_length: 1,
                tenant: "a".into(),
            })
            .collect();
        packs.push(PackEntries {
            name: format!("p{p}"),
            blobs,
            created_unix: 0,
        });
        // objects of 10,000 chunks, as a server writes them
        if packs.len() * per_pack as usize >= 10_000 {
            ingest(&mut ix, &format!("i{p}"), std::mem::take(&mut packs));
        }
    }
    ingest(&mut ix, "last", packs);
    assert_eq!(ix.len(), n as usize);
    // The filter is all the memory the entries take: about a byte a chunk, where the
    // in-memory table took 52, plus the deltas of recent additions (bounded).
    let deltas = filter::PARTITIONS * filter::DELTA_MIN * 20;
    let bytes = ix.filter_bytes();
    assert!(
        bytes < n as usize * 14 / 10 + deltas,
        "{bytes} bytes for {n} chunks"
    );
    // Rebuilt from disk (as at a start), exactly the fingerprints.
    let mut reopened = Index::new(DiskIndex::fresh(dir.path(), "repo").unwrap()).unwrap();
    reopened.replace(ix.disk(), build_filter(&ix.disk()).unwrap());
    let per_chunk = reopened.filter_bytes() as f64 / f64::from(n);
    // (1.5 bytes at this size, 1.35 at a million, 1.15 from about 50 million: small
    // partitions cost more a key)
    assert!(per_chunk < 1.6, "{per_chunk:.2} bytes a chunk");
    let ids: Vec<ChunkId> = (0..2000).map(|i| id_of(i * 150)).collect();
    assert_eq!(reopened.missing("a", &ids), Vec::<u32>::new());
    let absent: Vec<ChunkId> = (n..n + 2000).map(id_of).collect();
    assert_eq!(reopened.missing("a", &absent).len(), 2000);
    let id = id_of(4 * per_pack + 17);
    assert_eq!(ix.find("a", &id).unwrap().pack, "p4");
    assert_eq!(ix.find("a", &id).unwrap().offset, 17);
    // a second copy elsewhere does not replace a live one
    ingest(&mut ix, "dup", vec![pack("dup", id)]);
    assert_eq!(ix.find("a", &id).unwrap().pack, "p4");
    // once the first copy is condemned, the new copy is the one reads use
    ix.condemn(id, "p4");
    assert!(!ix.is_stored("a", &id));
    ingest(&mut ix, "dup2", vec![pack("dup2", id)]);
    assert_eq!(ix.find("a", &id).unwrap().pack, "dup2");
    assert!(ix.is_stored("a", &id));
}

#[test]
fn an_unusable_or_foreign_cache_file_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let id = ChunkId([3; 32]);
    let path = {
        let mut ix = index_in(dir.path());
        ingest(&mut ix, "i1", vec![pack("p", id)]);
        ix.disk().path().to_path_buf()
    };
    {
        let ix = index_in(dir.path());
        assert!(ix.is_stored("a", &id), "kept across opens");
        assert!(ix.disk().loaded_names().unwrap().contains("i1"));
    }
    // another repository's file is not used
    {
        let ix = Index::new(DiskIndex::open(dir.path(), "other").unwrap()).unwrap();
        assert!(!ix.is_stored("a", &id));
    }
    std::fs::write(&path, b"not a database at all, just some garbage bytes").unwrap();
    let ix = index_in(dir.path());
    assert!(!ix.is_stored("a", &id));
    assert!(
        ix.disk().loaded_names().unwrap().is_empty(),
        "to be rebuilt"
    );
    // while it is open, another opener gets a private file
    let other = index_in(dir.path());
    assert_ne!(other.disk().path(), ix.disk().path());
}

#[test]
fn leftovers_of_an_interrupted_rebuild_or_maintenance_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let me = std::process::id();
    // A pid that no process has (above the kernel's maximum).
    let gone = 4_194_400u32;
    let stale = [
        format!("index-repo.build-{me}-0000abcd.redb"),
        format!("index-repo.build-{gone}-0000abcd.redb"),
        format!("index-repo.build-{gone}-0000abcd.redb.base"),
        format!("{WORK_PREFIX}{gone}-00001234.runs"),
        format!("{WORK_PREFIX}{me}-00001234.runs"),
    ];
    let stale_dirs = [format!("index-repo.build-{me}-0000abcd.redb.runs")];
    // Pid 1 runs (init): its files are in use; another repository's and other names stay.
    let kept = [
        "index-repo.build-1-0000abcd.redb".to_string(),
        format!("index-other.build-{me}-0000abcd.redb"),
        "notes.txt".to_string(),
    ];
    let kept_dirs = [format!("{WORK_PREFIX}1-00001234.runs")];
    for f in stale.iter().chain(&kept) {
        if f.ends_with(".runs") {
            std::fs::create_dir_all(d.join(f)).unwrap();
            std::fs::write(d.join(f).join("run-0"), b"x").unwrap();
        } else {
            std::fs::write(d.join(f), b"torn").unwrap();
        }
    }
    for f in stale_dirs.iter().chain(&kept_dirs) {
        std::fs::create_dir_all(d.join(f)).unwrap();
        std::fs::write(d.join(f).join("run-0"), b"x").unwrap();
    }
    let ix = index_in(d);
    assert_eq!(ix.len(), 0);
    for f in stale.iter().chain(&stale_dirs) {
        assert!(!d.join(f).exists(), "{f} removed");
    }
    for f in kept.iter().chain(&kept_dirs) {
        assert!(d.join(f).exists(), "{f} kept");
    }
}

/// A rebuild writes the base file (first live copy of each id, the filter built on the
/// way); later objects go to the delta, which shadows a condemned base copy; a restart
/// opens both; a base file that is not the one the redb file names is rebuilt.
#[test]
fn a_rebuild_writes_the_base_file_and_later_objects_go_to_the_delta() {
    let dir = tempfile::tempdir().unwrap();
    let mut ix = index_in(dir.path());
    let n = 5_000u32;
    let packs: Vec<PackEntries> = (0..n)
        .map(|i| pack(&format!("p{}", i / 7), id_of(i)))
        .collect();
    let file = IndexFile { packs };
    let twice = id_of(10);
    let doomed = id_of(11);
    // id 10 again in a later pack: the first copy stays; id 11's first copy is condemned,
    // so its second one is kept
    let again = IndexFile {
        packs: vec![pack("later", twice), pack("later", doomed)],
    };
    let mut condemned = HashMap::new();
    condemned.insert(doomed, "p1".to_string());
    let fresh = DiskIndex::fresh(dir.path(), "repo").unwrap();
    let mut runs = Runs::new(fresh.runs_dir()).unwrap();
    fresh
        .ingest_to(
            &[
                ("i1".into(), FlatFile::from_index(&file)),
                ("i2".into(), FlatFile::from_index(&again)),
            ],
            &condemned,
            Some(&mut runs),
        )
        .unwrap();
    let filter = fresh.merge_runs(runs, &condemned).unwrap();
    assert!(!fresh.runs_dir().exists(), "runs removed after the merge");
    assert_eq!(fresh.len().unwrap(), u64::from(n));
    let fresh = fresh.adopt(&ix.disk());
    ix.replace(Arc::new(fresh), filter);
    ix.condemn(doomed, "p1");
    assert_eq!(ix.find("a", &twice).unwrap().pack, "p1");
    assert_eq!(ix.find("a", &doomed).unwrap().pack, "later");
    let ids: Vec<ChunkId> = (0..n).map(id_of).collect();
    assert_eq!(ix.missing("a", &ids), Vec::<u32>::new());
    assert_eq!(ix.missing("b", &ids).len(), n as usize, "tenants apart");
    let absent: Vec<ChunkId> = (n..n + 1000).map(id_of).collect();
    assert_eq!(ix.missing("a", &absent).len(), 1000);
    // The delta: a new chunk, and a copy that replaces a condemned base copy.
    let shadow = id_of(20);
    ix.condemn(shadow, "p2");
    ingest(
        &mut ix,
        "i3",
        vec![
            pack("new", id_of(n)),
            pack("new", shadow),
            pack("new", id_of(21)),
        ],
    );
    assert_eq!(ix.find("a", &id_of(n)).unwrap().pack, "new");
    assert_eq!(ix.find("a", &shadow).unwrap().pack, "new");
    assert_eq!(
        ix.find("a", &id_of(21)).unwrap().pack,
        "p3",
        "a live copy stays"
    );
    assert_eq!(
        ix.len(),
        n as usize + 1,
        "a shadowed base entry counts once"
    );
    let path = ix.disk().path().to_path_buf();
    drop(ix);
    // A restart opens the redb file and its base file; the filter is built from both.
    let ix = index_in(dir.path());
    assert_eq!(ix.disk().path(), path);
    assert_eq!(ix.len(), n as usize + 1);
    assert_eq!(ix.find("a", &shadow).unwrap().pack, "new");
    assert_eq!(ix.find("a", &id_of(n)).unwrap().pack, "new");
    assert_eq!(ix.missing("a", &ids), Vec::<u32>::new());
    let names = ix.disk().loaded_names().unwrap();
    assert_eq!(names.len(), 3);
    drop(ix);
    // A torn base file: the cache starts afresh, to be rebuilt from the bucket.
    let mut base = path.clone().into_os_string();
    base.push(".base");
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    f.set_len(100).unwrap();
    let ix = index_in(dir.path());
    assert_eq!(ix.len(), 0);
    assert!(
        ix.disk().loaded_names().unwrap().is_empty(),
        "to be rebuilt"
    );
    assert!(!std::path::Path::new(&base).exists(), "removed with it");
}
