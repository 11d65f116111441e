//! File-level access with the real server and client: `ls`, `find`, `diff`, `cat` and a
//! partial `restore_files` (`--path`, `--include`, `--exclude`), their errors, and their
//! access control. The catalog spans several chunks, so `ls` of the top must jump over the
//! large directory's tree instead of reading it.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use datamover_tests::{Run, Server, Storage, write};

const BIG: usize = 20_000;

fn make_tree(root: &Path) {
    write(&root.join("etc/app.conf"), b"key = value\n");
    write(&root.join("etc/app/x.yaml"), b"x: 1\n");
    write(&root.join("logs/day-1.log"), b"day one\n");
    write(&root.join("logs/day-2.tmp"), b"scratch\n");
    write(&root.join("z.txt"), b"last\n");
    for i in 0..BIG {
        write(
            &root.join(format!("big/f{i:05}")),
            format!("file {i}\n").as_bytes(),
        );
    }
    symlink("etc/app.conf", root.join("link")).expect("symlink");
}

/// The entry lines of a run (JSON objects with a `type`).
fn entries(run: &Run) -> Vec<serde_json::Value> {
    run.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("type").is_some())
        .collect()
}

fn paths(run: &Run) -> Vec<String> {
    entries(run)
        .iter()
        .map(|v| v["path"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn failed(run: &Run, code: i32, says: &str) {
    assert_eq!(run.code, code, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(says),
        "expected {says:?} in: {}",
        run.stderr
    );
}

#[test]
fn ls_find_diff_cat_and_partial_restores() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        &root.path().join("etc/config/roles"),
        b"fu=full\nap=append\nrd=read\n",
    );
    write(
        &root.path().join("etc/config/tenants"),
        b"fu=team\nap=team\nrd=team\n",
    );
    let server = Server::start_in(
        root,
        Storage::Filesystem,
        &[
            ("fu", "t-fu"),
            ("ap", "t-ap"),
            ("rd", "t-rd"),
            ("other", "t-other"),
        ],
    );
    let fu = server.client("fu", "t-fu");
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_tree(&src);
    let id1 = fu.ok(&["backup_files", src.to_str().unwrap(), "t"])["snapshot_id"]
        .as_str()
        .expect("id")
        .to_string();
    std::fs::write(src.join("big/f00010"), b"changed again\n").expect("write");
    std::fs::remove_file(src.join("z.txt")).expect("rm");
    std::fs::write(src.join("new.txt"), b"new\n").expect("write");
    std::fs::set_permissions(
        src.join("etc/app.conf"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let id2 = fu.ok(&["backup_files", src.to_str().unwrap(), "t"])["snapshot_id"]
        .as_str()
        .expect("id")
        .to_string();

    // ls: the top, without reading the big directory's tree.
    let run = fu.run(&["ls", &id1]);
    assert!(run.success(), "{}", run.stderr);
    assert_eq!(paths(&run), ["big", "etc", "link", "logs", "z.txt"]);
    let result = run.json();
    assert_eq!(result["indexed"], true, "{result}");
    assert!(result["jumps"].as_u64().unwrap_or(0) >= 1, "{result}");
    let link = &entries(&run)[2];
    assert_eq!(
        (link["type"].as_str(), link["target"].as_str()),
        (Some("symlink"), Some("etc/app.conf"))
    );
    // A directory, recursively, a file alone; by tag (the latest snapshot).
    assert_eq!(
        paths(&fu.run(&["ls", &id1, "etc"])),
        ["etc/app", "etc/app.conf"]
    );
    assert_eq!(
        paths(&fu.run(&["ls", &id1, "/etc/", "--recursive"])),
        ["etc/app", "etc/app/x.yaml", "etc/app.conf"]
    );
    let one = entries(&fu.run(&["ls", "t", "etc/app.conf"]));
    assert_eq!(one.len(), 1);
    assert_eq!(
        (one[0]["size"].as_u64(), one[0]["mode"].as_str()),
        (Some(12), Some("600"))
    );
    let deep = fu.run(&["ls", &id1, "big"]);
    assert_eq!(entries(&deep).len(), BIG);
    failed(&fu.run(&["ls", &id1, "nope"]), 4, "has no path 'nope'");
    failed(
        &fu.run(&["ls", &id1, "etc/app.conf/inner"]),
        4,
        "'etc/app.conf' in snapshot",
    );
    failed(
        &fu.run(&["cat", &id1, "z.txt/x"]),
        4,
        "is a file, not a directory",
    );
    failed(&fu.run(&["ls", &id1, "etc/../.."]), 2, "'.' or '..'");
    failed(
        &fu.run(&["ls", "no-such-tag"]),
        4,
        "no snapshot with tag or id",
    );

    // cat: one file, exact bytes; a directory is refused.
    let run = fu.run(&["cat", &id1, "big/f19999"]);
    assert!(run.success(), "{}", run.stderr);
    assert_eq!(run.stdout, "file 19999\n");
    assert_eq!(
        fu.run(&["cat", &id2, "big/f00010"]).stdout,
        "changed again\n"
    );
    failed(&fu.run(&["cat", &id1, "etc"]), 2, "is a dir, not a file");
    failed(&fu.run(&["cat", &id2, "z.txt"]), 4, "has no path 'z.txt'");

    // find: in one snapshot, and which snapshots hold a file.
    assert_eq!(
        paths(&fu.run(&["find", &id1, "*.yaml"])),
        ["etc/app/x.yaml"]
    );
    assert_eq!(
        paths(&fu.run(&["find", &id1, "etc/*"])),
        ["etc/app", "etc/app.conf"]
    );
    let all = fu.run(&["find", "--all", "f00010"]);
    let holders: Vec<String> = entries(&all)
        .iter()
        .map(|v| v["snapshot_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(holders, [id1.clone(), id2.clone()]);
    let sizes: Vec<u64> = entries(&all)
        .iter()
        .filter_map(|v| v["size"].as_u64())
        .collect();
    assert_eq!(sizes, [8, 14], "each snapshot's version");
    failed(&fu.run(&["find", &id1, "a/../b"]), 2, "bad glob");
    failed(
        &fu.run(&["find", &id1, "*.nothing"]),
        4,
        "nothing matches *.nothing",
    );

    // diff: added, removed, modified, metadata; nothing else.
    let run = fu.run(&["diff", &id1, &id2]);
    assert!(run.success(), "{}", run.stderr);
    let changes: Vec<(String, String)> = entries(&run)
        .iter()
        .map(|v| {
            (
                v["change"].as_str().unwrap_or_default().to_string(),
                v["path"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    // The top directory's mtime changed too, but it is not an entry of the catalog.
    let expect = [
        ("modified", "big/f00010"),
        ("metadata", "etc/app.conf"),
        ("added", "new.txt"),
        ("removed", "z.txt"),
    ];
    let got: Vec<(&str, &str)> = changes
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let without_dirs: Vec<(&str, &str)> = got
        .iter()
        .copied()
        .filter(|(c, p)| !(*c == "metadata" && (*p == "big")))
        .collect();
    assert_eq!(without_dirs, expect, "{}", run.stdout);
    let r = run.json();
    assert_eq!(
        (r["added"].as_u64(), r["removed"].as_u64()),
        (Some(1), Some(1))
    );

    // Partial restores into a directory that holds other files: only what is selected
    // is written, with its parents; the rest of the target is left alone.
    let target = work.path().join("partial");
    write(&target.join("keep.txt"), b"mine");
    let r = fu.ok(&[
        "restore_files",
        target.to_str().unwrap(),
        &id1,
        "--path",
        "etc",
    ]);
    assert_eq!(r["files"], 2, "{r}");
    assert_eq!(
        std::fs::read(target.join("etc/app/x.yaml")).expect("restored"),
        b"x: 1\n"
    );
    assert!(!target.join("big").exists() && !target.join("logs").exists());
    assert_eq!(
        std::fs::read(target.join("keep.txt")).expect("kept"),
        b"mine"
    );
    let logs = work.path().join("logs-only");
    fu.ok(&[
        "restore_files",
        logs.to_str().unwrap(),
        &id1,
        "--include",
        "logs",
        "--exclude",
        "*.tmp",
    ]);
    assert!(logs.join("logs/day-1.log").is_file());
    assert!(!logs.join("logs/day-2.tmp").exists() && !logs.join("etc").exists());
    let one = work.path().join("one");
    fu.ok(&[
        "restore_files",
        one.to_str().unwrap(),
        &id2,
        "--include",
        "big/f00010",
    ]);
    assert_eq!(
        std::fs::read(one.join("big/f00010")).expect("restored"),
        b"changed again\n"
    );
    assert_eq!(std::fs::read_dir(one.join("big")).expect("dir").count(), 1);
    failed(
        &fu.run(&[
            "restore_files",
            one.to_str().unwrap(),
            &id1,
            "--include",
            "*.nothing",
        ]),
        4,
        "nothing in snapshot",
    );
    failed(
        &fu.run(&[
            "restore_files",
            one.to_str().unwrap(),
            &id1,
            "--path",
            "../etc",
        ]),
        2,
        "'.' or '..'",
    );

    // Access: a role that cannot restore cannot browse; another tenant sees nothing.
    let ap = server.client("ap", "t-ap");
    failed(&ap.run(&["ls", &id1]), 3, "not allowed");
    failed(&ap.run(&["cat", &id1, "z.txt"]), 3, "not allowed");
    let rd = server.client("rd", "t-rd");
    assert_eq!(
        paths(&rd.run(&["ls", &id1, "logs"])),
        ["logs/day-1.log", "logs/day-2.tmp"]
    );
    let other = server.client("other", "t-other");
    failed(&other.run(&["ls", &id1]), 4, "no snapshot with tag or id");
    failed(&other.run(&["cat", &id1, "etc/app.conf"]), 4, "no snapshot");
}

/// A snapshot committed the way clients did before catalog marks (none): browsed and
/// partly restored from the catalog's start. Marks that lie are refused at commit when
/// they can be checked, and give a clear error, never a crash, when they cannot.
#[test]
fn snapshots_without_marks_and_lying_marks() {
    use bytes::Bytes;
    use datamover_proto::v1::{CatalogMark, Node, NodeType};

    let server = Server::start(Storage::Filesystem, &[("old", "t-old")]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut conn = rt
        .block_on(datamover_client::connect::connect(
            &server.client_settings("old", "t-old"),
        ))
        .expect("connect");
    let content = Bytes::from_static(b"old content\n");
    let id = Bytes::copy_from_slice(&conn.key.id(&content).0);
    let dir = |p: &str| Node {
        path: Bytes::copy_from_slice(p.as_bytes()),
        r#type: NodeType::Dir as i32,
        mode: 0o755,
        ..Default::default()
    };
    let file = |p: &str| Node {
        path: Bytes::copy_from_slice(p.as_bytes()),
        r#type: NodeType::File as i32,
        mode: 0o644,
        size: content.len() as u64,
        chunks: vec![id.clone()],
        ..Default::default()
    };
    let nodes = [
        dir("etc"),
        file("etc/a.conf"),
        dir("var"),
        file("var/b.log"),
    ];
    let contents = [content.clone()];
    let snap = rt
        .block_on(datamover_tests::crafted::commit(
            &mut conn,
            "old",
            &nodes,
            &contents,
            Vec::new(),
        ))
        .expect("a snapshot without marks is accepted");
    let client = server.client("old", "t-old");
    let run = client.run(&["ls", "old"]);
    assert_eq!(paths(&run), ["etc", "var"], "{}", run.stderr);
    assert_eq!(run.json()["indexed"], false);
    assert_eq!(
        client.run(&["cat", &snap.id, "var/b.log"]).stdout,
        "old content\n"
    );
    let work = tempfile::tempdir().expect("tempdir");
    client.ok(&[
        "restore_files",
        work.path().to_str().unwrap(),
        "old",
        "--path",
        "var",
    ]);
    assert_eq!(
        std::fs::read(work.path().join("var/b.log")).expect("restored"),
        b"old content\n"
    );
    assert!(!work.path().join("etc").exists());

    // Marks out of order, or naming a chunk the catalog does not have: refused.
    let mark = |chunk, offset, path: &str| CatalogMark {
        chunk,
        offset,
        path: Bytes::copy_from_slice(path.as_bytes()),
    };
    for (marks, says) in [
        (vec![mark(0, 0, "var"), mark(0, 0, "etc")], "out of order"),
        (vec![mark(3, 0, "etc")], "names chunk 3 of 1"),
    ] {
        let e = rt
            .block_on(datamover_tests::crafted::commit(
                &mut conn, "bad", &nodes, &contents, marks,
            ))
            .expect_err(says);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains(says), "{e}");
    }
    // A mark whose offset is not where a node begins cannot be checked without reading
    // the catalog: a seek through it reports a damaged catalog.
    let lying = rt
        .block_on(datamover_tests::crafted::commit(
            &mut conn,
            "lying",
            &nodes,
            &contents,
            vec![mark(0, 3, "etc")],
        ))
        .expect("accepted");
    let run = client.run(&["ls", &lying.id, "var"]);
    assert_eq!(run.code, 8, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("run verify"), "{}", run.stderr);
}
