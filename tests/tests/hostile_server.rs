//! The client against a hostile server (tests/src/hostile.rs): whatever a restore stream
//! holds, not one byte is written outside the target (the whole parent tree is compared
//! before and after), the client exits non-zero with a message that says what happened,
//! and no partly restored file sits under its final name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use datamover_proto::v1::{NodeType, SnapshotKind, restore_item::Item};
use datamover_tests::hostile::{self, HostileServer, Script, data, node, packed, symlink};
use datamover_tests::{Client, Run};

/// A work directory holding the restore target and, beside it, things a restore must
/// not touch.
struct Case {
    work: tempfile::TempDir,
    target: PathBuf,
    outside: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

impl Case {
    fn new() -> Case {
        let work = tempfile::tempdir().unwrap();
        let outside = work.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep.txt"), b"precious\n").unwrap();
        std::fs::write(work.path().join("beside.txt"), b"beside\n").unwrap();
        let target = work.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let before = hostile::tree_state(work.path(), &target);
        Case {
            work,
            target,
            outside,
            before,
        }
    }

    fn outside_abs(&self) -> Vec<u8> {
        self.outside.as_os_str().as_encoded_bytes().to_vec()
    }

    /// Not one entry outside the target was added, removed or changed.
    fn assert_nothing_outside(&self) {
        let after = hostile::tree_state(self.work.path(), &self.target);
        assert_eq!(
            self.before, after,
            "the restore changed something outside its target"
        );
    }

    /// No temporary file is left in the target, and none of `names` exists in it.
    fn assert_not_restored(&self, names: &[&str]) {
        for n in names {
            assert!(
                std::fs::symlink_metadata(self.target.join(n)).is_err(),
                "{n} sits in the target under its final name"
            );
        }
        let mut todo = vec![self.target.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(!name.contains(".dm-tmp-"), "temporary file left: {name}");
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                }
            }
        }
    }
}

/// Runs the client, killing it (and failing) if it runs longer than `limit`.
fn run_within(client: &Client, args: &[&str], limit: Duration) -> Run {
    let mut child = client
        .command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return Run::from(child.wait_with_output().unwrap());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "datamover-client {args:?} still ran after {limit:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn restore_files(case: &Case, script: Script) -> Run {
    let server = HostileServer::start(script);
    let client = server.client();
    run_within(
        &client,
        &["restore_files", case.target.to_str().unwrap(), "hostile"],
        Duration::from_secs(60),
    )
}

fn assert_failed(r: &Run, code: i32, says: &str) {
    assert_eq!(r.code, code, "exit code; stderr:\n{}", r.stderr);
    let last = r.stderr.lines().last().unwrap_or("");
    assert!(
        last.contains("datamover-client: error:") && last.contains(says),
        "the last line should say {says:?}:\n{}",
        r.stderr
    );
}

fn file(path: &[u8], content: &[u8]) -> [Item; 2] {
    [
        node(path, NodeType::File, content.len() as u64),
        data(content),
    ]
}

#[test]
fn unsafe_names_are_never_written_and_the_restore_fails() {
    let case = Case::new();
    let mut abs = case.outside_abs();
    abs.extend_from_slice(b"/absolute");
    let mut items = Vec::new();
    for name in [
        &b"../escape-dotdot"[..],
        &abs,
        b"ok/../../escape-nested",
        b"..",
        b".",
        b"",
        b"a//b",
        b"./dot",
        b"nul\0name",
        b"../outside/keep.txt",
    ] {
        items.extend(file(name, b"pwned\n"));
    }
    items.extend(file(b"inside.txt", b"fine\n"));
    let r = restore_files(&case, hostile::once(SnapshotKind::Files, items));
    case.assert_nothing_outside();
    assert_failed(&r, 8, "10 entries of snapshot");
    assert!(r.stderr.contains("were not restored"), "{}", r.stderr);
    // The safe entry is restored all the same.
    assert_eq!(
        std::fs::read(case.target.join("inside.txt")).unwrap(),
        b"fine\n"
    );
    case.assert_not_restored(&[
        "escape-dotdot",
        "escape-nested",
        "absolute",
        "ok",
        "a",
        "dot",
    ]);
}

#[test]
fn a_symlink_never_redirects_a_later_write() {
    let case = Case::new();
    let mut items = vec![symlink(b"link", &case.outside_abs())];
    items.extend(file(b"link/through-absolute", b"pwned\n"));
    items.push(symlink(b"rel", b"../outside"));
    items.extend(file(b"rel/through-relative", b"pwned\n"));
    items.extend(file(b"rel/keep.txt", b"pwned\n"));
    // A symlink to a file outside, then a file of the same name.
    items.push(symlink(b"same", b"../outside/keep.txt"));
    items.extend(file(b"same", b"pwned\n"));
    let r = restore_files(&case, hostile::once(SnapshotKind::Files, items));
    case.assert_nothing_outside();
    assert_failed(&r, 8, "a directory is in the way");
    // What went through the links went to real directories inside the target.
    assert!(case.target.join("link").is_dir());
    assert!(case.target.join("rel/keep.txt").is_file());
    case.assert_not_restored(&[]);
}

#[test]
fn a_directory_replaced_by_a_symlink_mid_stream_is_not_followed() {
    let case = Case::new();
    let mut items = vec![node(b"d", NodeType::Dir, 0)];
    items.extend(file(b"d/a", b"first\n"));
    items.push(symlink(b"d", &case.outside_abs()));
    items.extend(file(b"d/b", b"pwned\n"));
    items.push(node(b"d/sub", NodeType::Dir, 0));
    items.extend(file(b"d/sub/c", b"pwned\n"));
    // The same, one level down, with a relative link climbing out.
    items.push(node(b"e", NodeType::Dir, 0));
    items.push(node(b"e/f", NodeType::Dir, 0));
    items.push(symlink(b"e/f", b"../../outside"));
    items.extend(file(b"e/f/g", b"pwned\n"));
    items.push(node(b"fifo-dir", NodeType::Dir, 0));
    items.push(symlink(b"fifo-dir", &case.outside_abs()));
    items.push(node(b"fifo-dir/pipe", NodeType::Fifo, 0));
    let r = restore_files(&case, hostile::once(SnapshotKind::Files, items));
    case.assert_nothing_outside();
    assert_failed(&r, 8, "were not restored");
    assert!(case.target.join("d").is_dir());
    assert!(case.target.join("d/sub/c").is_file());
    assert!(case.target.join("e/f/g").is_file());
    case.assert_not_restored(&[]);
}

#[test]
fn sizes_that_lie_leave_no_file_under_its_name() {
    // More data than the size.
    let case = Case::new();
    let mut items = Vec::new();
    items.extend(file(b"good", b"ok\n"));
    items.push(node(b"long", NodeType::File, 4));
    items.push(data(b"0123456789"));
    let r = restore_files(&case, hostile::once(SnapshotKind::Files, items));
    case.assert_nothing_outside();
    assert_failed(&r, 8, "more than the file's 4 bytes");
    case.assert_not_restored(&["long"]);

    // Less data than the size, then the next file.
    let case = Case::new();
    let mut items = vec![node(b"short", NodeType::File, 100), data(b"0123456789")];
    items.extend(file(b"next", b"x"));
    let r = restore_files(&case, hostile::once(SnapshotKind::Files, items));
    case.assert_nothing_outside();
    assert_failed(&r, 8, "holds 100 bytes but 10 were received");
    case.assert_not_restored(&["short"]);

    // A large file (streamed to a writer as it arrives) with more than its size.
    let case = Case::new();
    let piece = vec![b'z'; 200 * 1024];
    let items = vec![
        node(b"large", NodeType::File, 300 * 1024),
        data(&piece),
        data(&piece),
        data(&piece),
    ];
    let r = restore_files(&case, hostile::once(SnapshotKind::Files, items));
    case.assert_nothing_outside();
    assert_failed(&r, 8, "more than the file's 307200 bytes");
    case.assert_not_restored(&["large"]);

    // A stream restore: less, then more than the stream's size.
    for (size, says) in [
        (100, "ended after 10 of 100 bytes"),
        (5, "more than the stream's 5 bytes"),
    ] {
        let case = Case::new();
        let out = case.target.join("out.bin");
        let server = HostileServer::start(hostile::once(
            SnapshotKind::Stream,
            vec![node(b"stream", NodeType::File, size), data(b"0123456789")],
        ));
        let r = run_within(
            &server.client(),
            &["restore_stream", out.to_str().unwrap(), "hostile"],
            Duration::from_secs(60),
        );
        case.assert_nothing_outside();
        assert_failed(&r, 8, says);
        case.assert_not_restored(&["out.bin"]);
    }
}

#[test]
fn chunks_that_do_not_match_their_ids_are_refused() {
    let content = vec![b'c'; 5000];
    for (item, says) in [
        (packed(&content, b"other content"), "does not match its id"),
        (
            Item::Packed(datamover_proto::v1::PackedData {
                raw_length: 4000,
                ..match packed(&content, &content) {
                    Item::Packed(p) => p,
                    _ => unreachable!(),
                }
            }),
            "decompress",
        ),
    ] {
        let case = Case::new();
        let items = vec![node(b"f", NodeType::File, content.len() as u64), item];
        let r = restore_files(&case, hostile::once(SnapshotKind::Files, items));
        case.assert_nothing_outside();
        assert_failed(&r, 8, says);
        case.assert_not_restored(&["f"]);
    }
    // The same chunk with its own id is restored: the refusals above are the checks.
    let case = Case::new();
    let items = vec![
        node(b"f", NodeType::File, content.len() as u64),
        packed(&content, &content),
    ];
    let r = restore_files(&case, hostile::once(SnapshotKind::Files, items));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(case.target.join("f")).unwrap(), content);
}

#[test]
fn an_endless_stream_stops_at_the_declared_size() {
    let piece = vec![b'e'; 64 * 1024];
    let case = Case::new();
    let script = hostile::endless(
        SnapshotKind::Files,
        vec![node(b"endless", NodeType::File, 1024 * 1024)],
        data(&piece),
    );
    let r = restore_files(&case, script);
    case.assert_nothing_outside();
    assert_failed(&r, 8, "more than the file's 1048576 bytes");
    case.assert_not_restored(&["endless"]);

    let case = Case::new();
    let out = case.target.join("endless.bin");
    let server = HostileServer::start(hostile::endless(
        SnapshotKind::Stream,
        vec![node(b"stream", NodeType::File, 1024 * 1024)],
        data(&piece),
    ));
    let r = run_within(
        &server.client(),
        &["restore_stream", out.to_str().unwrap(), "hostile"],
        Duration::from_secs(60),
    );
    case.assert_nothing_outside();
    assert_failed(&r, 8, "more than the stream's 1048576 bytes");
    case.assert_not_restored(&["endless.bin"]);
    assert_eq!(dir_len(&case.target), 0);
}

fn dir_len(d: &Path) -> usize {
    std::fs::read_dir(d).unwrap().count()
}
