//! File-level access to snapshots without restoring them: `ls`, `find`, `diff` and
//! `cat`. Each prints one JSON line per entry, then the result line (as every mode).
//!
//! The catalog is read in part ([`catalog`]): `ls` of a directory and `cat` of a file
//! start at the nearest catalog mark and skip the trees they do not descend into.
//! They need a role that may restore (`read`, `full`, `admin`), like a restore, and see
//! only the caller's tenant.

pub mod catalog;
mod diff;

use std::io::Write;

use bytes::Bytes;
use datamover_core::chunk::{ChunkId, ChunkIdKey};
use datamover_core::paths::safe_relative;
use datamover_core::select::{Globs, is_within};
use datamover_proto::v1::{self, Node, NodeType, restore_item::Item};
use serde_json::{Value, json};

use crate::ClientError;
use crate::connect::{Api, Conn};
use crate::restore::piece::{Piece, Unpacker};
use catalog::Catalog;

/// Chunk ids asked for in one `ReadChunks` call (the server's limit).
const READ_CHUNKS: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `ls <tag|id> [path] [--recursive]`
    Ls {
        spec: String,
        path: Vec<u8>,
        recursive: bool,
    },
    /// `find <tag|id> <glob>... [--all]`; with `--all`, `spec` is empty or a tag.
    Find {
        spec: String,
        globs: Vec<String>,
        all: bool,
    },
    /// `diff <a> <b>`
    Diff { a: String, b: String },
    /// `cat <tag|id> <path>`
    Cat { spec: String, path: Vec<u8> },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Ls { .. } => "ls",
            Command::Find { .. } => "find",
            Command::Diff { .. } => "diff",
            Command::Cat { .. } => "cat",
        }
    }

    /// `cat` writes the file to stdout, so its result goes to stderr.
    pub fn uses_stdout(&self) -> bool {
        matches!(self, Command::Cat { .. })
    }
}

/// A path inside a snapshot as given on the command line: relative, plain names.
pub fn snapshot_path(p: &str) -> Result<Vec<u8>, String> {
    let p = p.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty() || p == "." {
        return Ok(Vec::new());
    }
    safe_relative(p.as_bytes()).map_err(|e| {
        format!(
            "bad path {:?} inside the snapshot ({}): give a relative path of plain names, such as etc/app",
            e.path, e.why
        )
    })?;
    Ok(p.as_bytes().to_vec())
}

/// Parses the arguments of `ls`, `find`, `diff` and `cat`; `Err` is a usage message.
pub fn parse(mode: &str, args: &[&str]) -> Result<Command, String> {
    let (flags, positional): (Vec<&str>, Vec<&str>) =
        args.iter().partition(|a| a.starts_with("--"));
    let flag = |name: &str| flags.contains(&name);
    if let Some(bad) = flags.iter().find(|f| match mode {
        "ls" => **f != "--recursive",
        "find" => **f != "--all",
        _ => true,
    }) {
        return Err(format!("unknown {mode} option '{bad}'"));
    }
    match (mode, positional.as_slice()) {
        ("ls", [spec, rest @ ..]) if rest.len() <= 1 => Ok(Command::Ls {
            spec: spec.to_string(),
            path: snapshot_path(rest.first().copied().unwrap_or(""))?,
            recursive: flag("--recursive"),
        }),
        ("find", [first, rest @ ..]) => {
            let all = flag("--all");
            // With --all every snapshot is searched: every argument is a glob.
            let (spec, globs): (String, Vec<String>) = if all {
                (
                    String::new(),
                    positional.iter().map(|s| s.to_string()).collect(),
                )
            } else {
                (
                    first.to_string(),
                    rest.iter().map(|s| s.to_string()).collect(),
                )
            };
            if globs.is_empty() {
                return Err("find needs at least one glob".into());
            }
            Globs::new(&globs).map_err(|e| e.to_string())?;
            Ok(Command::Find { spec, globs, all })
        }
        ("diff", [a, b]) => Ok(Command::Diff {
            a: a.to_string(),
            b: b.to_string(),
        }),
        ("cat", [spec, path]) => {
            let path = snapshot_path(path)?;
            if path.is_empty() {
                return Err("cat needs the path of a file inside the snapshot".into());
            }
            Ok(Command::Cat {
                spec: spec.to_string(),
                path,
            })
        }
        _ => Err(format!("wrong arguments for {mode}")),
    }
}

fn type_name(t: i32) -> &'static str {
    match NodeType::try_from(t) {
        Ok(NodeType::File) => "file",
        Ok(NodeType::Dir) => "dir",
        Ok(NodeType::Symlink) => "symlink",
        Ok(NodeType::Fifo) => "fifo",
        _ => "unknown",
    }
}

fn mtime(ns: i64) -> String {
    let t = if ns >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
    } else {
        std::time::UNIX_EPOCH - std::time::Duration::from_nanos(ns.unsigned_abs())
    };
    humantime::format_rfc3339_nanos(t).to_string()
}

/// One entry as a JSON line.
pub fn node_json(n: &Node) -> Value {
    let mut v = json!({
        "path": String::from_utf8_lossy(&n.path),
        "type": type_name(n.r#type),
        "mode": format!("{:o}", n.mode & 0o7777),
        "size": n.size,
        "mtime": mtime(n.mtime_ns),
        "uid": n.uid,
        "gid": n.gid,
    });
    if n.r#type == NodeType::Symlink as i32 {
        v["target"] = json!(String::from_utf8_lossy(&n.link_target));
    }
    v
}

/// Writes JSON lines to stdout, buffered.
pub struct Lines {
    out: std::io::BufWriter<std::io::Stdout>,
    pub count: u64,
}

impl Lines {
    pub fn new() -> Lines {
        Lines {
            out: std::io::BufWriter::new(std::io::stdout()),
            count: 0,
        }
    }

    pub fn put(&mut self, v: &Value) -> Result<(), ClientError> {
        self.count += 1;
        writeln!(self.out, "{v}").map_err(|e| ClientError::io("stdout", e))
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.out.flush().map_err(|e| ClientError::io("stdout", e))
    }
}

impl Default for Lines {
    fn default() -> Self {
        Lines::new()
    }
}

pub async fn run(conn: &mut Conn, cmd: &Command) -> Result<Value, ClientError> {
    match cmd {
        Command::Ls {
            spec,
            path,
            recursive,
        } => ls(conn, spec, path, *recursive).await,
        Command::Find { spec, globs, all } => find(conn, spec, globs, *all).await,
        Command::Diff { a, b } => diff::diff(conn, a, b).await,
        Command::Cat { spec, path } => cat(conn, spec, path).await,
    }
}

/// Why `path` is not in the snapshot: a parent that is not a directory, or no such path.
async fn not_found(catalog: &Catalog, path: &[u8]) -> ClientError {
    let snapshot = &catalog.snapshot;
    let parents = path
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .map(|(i, _)| &path[..i]);
    for parent in parents {
        match catalog.find(parent).await {
            Ok(Some(n)) if n.r#type != NodeType::Dir as i32 => {
                return ClientError::NotFound(format!(
                    "'{}' in snapshot {} is a {}, not a directory, so it holds no '{}': list it with `datamover-client ls {} {}`",
                    String::from_utf8_lossy(parent),
                    snapshot.id,
                    type_name(n.r#type),
                    String::from_utf8_lossy(path),
                    snapshot.id,
                    String::from_utf8_lossy(parent),
                ));
            }
            Ok(Some(_)) => continue,
            _ => break,
        }
    }
    ClientError::NotFound(format!(
        "snapshot {} (tag {}) has no path '{}': list its top with `datamover-client ls {}`",
        snapshot.id,
        snapshot.tag,
        String::from_utf8_lossy(path),
        snapshot.id
    ))
}

async fn ls(
    conn: &mut Conn,
    spec: &str,
    path: &[u8],
    recursive: bool,
) -> Result<Value, ClientError> {
    let catalog = Catalog::open(&conn.api, spec).await?;
    let mut out = Lines::new();
    let mut cursor = if path.is_empty() {
        catalog.cursor()
    } else {
        let mut c = catalog.cursor_at(path);
        // The path itself: a file is listed alone, a directory by its entries.
        let found = loop {
            match c.next().await? {
                Some(n) if datamover_core::paths::walk_order(&n.path, path).is_lt() => continue,
                Some(n) if n.path.as_ref() == path => break n,
                _ => return Err(not_found(&catalog, path).await),
            }
        };
        if found.r#type != NodeType::Dir as i32 {
            out.put(&node_json(&found))?;
            out.flush()?;
            return Ok(ls_result(&catalog, path, &out, 0));
        }
        c
    };
    let depth = |p: &[u8]| p.iter().filter(|b| **b == b'/').count();
    let child_depth = if path.is_empty() { 0 } else { depth(path) + 1 };
    while let Some(n) = cursor.next().await? {
        if !is_within(&n.path, path) {
            break;
        }
        if n.path.as_ref() == path {
            continue;
        }
        out.put(&node_json(&n))?;
        if !recursive && n.r#type == NodeType::Dir as i32 && depth(&n.path) == child_depth {
            cursor.skip_tree(&n.path);
        }
    }
    out.flush()?;
    Ok(ls_result(&catalog, path, &out, cursor.jumps()))
}

fn ls_result(catalog: &Catalog, path: &[u8], out: &Lines, jumps: u64) -> Value {
    json!({
        "mode": "ls",
        "snapshot_id": catalog.snapshot.id,
        "tag": catalog.snapshot.tag,
        "path": String::from_utf8_lossy(path),
        "entries": out.count,
        "indexed": catalog.is_indexed(),
        "jumps": jumps,
    })
}

async fn find(
    conn: &mut Conn,
    spec: &str,
    globs: &[String],
    all: bool,
) -> Result<Value, ClientError> {
    let globs_text = globs;
    let globs = Globs::new(globs).map_err(|e| ClientError::Usage(e.to_string()))?;
    let specs: Vec<String> = if all {
        let mut list = conn
            .api
            .list_snapshots(v1::ListSnapshotsRequest { tag: String::new() })
            .await?
            .into_inner()
            .snapshots;
        list.retain(|s| s.kind == v1::SnapshotKind::Files as i32);
        list.sort_by(|a, b| a.time.cmp(&b.time));
        list.into_iter().map(|s| s.id).collect()
    } else {
        vec![spec.to_string()]
    };
    let mut out = Lines::new();
    let mut snapshots = 0u64;
    for spec in &specs {
        let catalog = Catalog::open(&conn.api, spec).await?;
        snapshots += 1;
        let mut cursor = catalog.cursor();
        while let Some(n) = cursor.next().await? {
            if globs.matches(&n.path) {
                let mut v = node_json(&n);
                v["snapshot_id"] = json!(catalog.snapshot.id);
                v["tag"] = json!(catalog.snapshot.tag);
                v["time"] = json!(catalog.snapshot.time);
                out.put(&v)?;
            }
        }
    }
    out.flush()?;
    if out.count == 0 {
        return Err(ClientError::NotFound(format!(
            "nothing matches {} in {}: a glob without '/' matches a name, one with '/' the whole path from the snapshot's top (see `datamover-client ls`)",
            globs_text.join(" "),
            if all {
                format!("any of the {snapshots} snapshots")
            } else {
                format!("snapshot {spec}")
            }
        )));
    }
    Ok(json!({
        "mode": "find",
        "snapshots": snapshots,
        "matches": out.count,
    }))
}

/// The contents of a file node, chunk by chunk, checked against their ids, to `sink`.
pub async fn read_file(
    conn: &Conn,
    node: &Node,
    mut sink: impl FnMut(&[u8]) -> Result<(), ClientError>,
) -> Result<u64, ClientError> {
    let what = || format!("file {}", String::from_utf8_lossy(&node.path));
    let mut written = 0u64;
    read_chunks(&conn.api, &conn.key, &node.chunks, &what, |data| {
        written += data.len() as u64;
        sink(data)
    })
    .await?;
    if written != node.size {
        return Err(ClientError::Corrupt(format!(
            "{}: {written} bytes read, but the snapshot says {}: run verify on the server's repository",
            what(),
            node.size
        )));
    }
    Ok(written)
}

/// Chunks by id (of a file `what`), in order, each checked against its id, to `sink`:
/// `ReadChunks` calls of at most [`READ_CHUNKS`] ids.
pub async fn read_chunks(
    api: &Api,
    key: &ChunkIdKey,
    ids: &[Bytes],
    what: &(dyn Fn() -> String + Sync),
    mut sink: impl FnMut(&[u8]) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let mut unpacker = Unpacker::new(key.clone());
    for batch in ids.chunks(READ_CHUNKS) {
        let mut stream = api
            .clone()
            .read_chunks(v1::ReadChunksRequest {
                ids: batch.to_vec(),
            })
            .await?
            .into_inner();
        let mut expected = batch.iter();
        while let Some(m) = stream.message().await? {
            for item in m.items {
                let want = expected.next().ok_or_else(|| {
                    ClientError::Server(format!(
                        "{}: the server sent more chunks than asked",
                        what()
                    ))
                })?;
                let piece = match item.item {
                    Some(Item::Packed(p)) if p.id == *want => Piece::Packed(p),
                    Some(Item::Data(d)) => {
                        let id = ChunkId::from_slice(want)
                            .map_err(|e| ClientError::Corrupt(format!("{}: {e}", what())))?;
                        if key.id(&d) != id {
                            return Err(ClientError::Corrupt(format!(
                                "{}: a chunk does not match its id: run verify on the server's repository",
                                what()
                            )));
                        }
                        Piece::Plain(d)
                    }
                    _ => {
                        return Err(ClientError::Corrupt(format!(
                            "{}: the server sent another chunk than asked: run verify on the server's repository",
                            what()
                        )));
                    }
                };
                sink(unpacker.open(&piece, what)?)?;
            }
        }
        if expected.next().is_some() {
            return Err(ClientError::Server(format!(
                "{}: the server sent fewer chunks than asked: retry",
                what()
            )));
        }
    }
    Ok(())
}

async fn cat(conn: &mut Conn, spec: &str, path: &[u8]) -> Result<Value, ClientError> {
    let catalog = Catalog::open(&conn.api, spec).await?;
    let Some(node) = catalog.find(path).await? else {
        return Err(not_found(&catalog, path).await);
    };
    if node.r#type != NodeType::File as i32 {
        return Err(ClientError::Usage(format!(
            "'{}' in snapshot {} is a {}, not a file: list it with `datamover-client ls {} {}`, or restore it with `restore_files <target> {} --path {}`",
            String::from_utf8_lossy(path),
            catalog.snapshot.id,
            type_name(node.r#type),
            catalog.snapshot.id,
            String::from_utf8_lossy(path),
            catalog.snapshot.id,
            String::from_utf8_lossy(path),
        )));
    }
    let started = std::time::Instant::now();
    let mut stdout = std::io::stdout().lock();
    let bytes = read_file(conn, &node, |d| {
        stdout
            .write_all(d)
            .map_err(|e| ClientError::io("stdout", e))
    })
    .await?;
    stdout.flush().map_err(|e| ClientError::io("stdout", e))?;
    Ok(json!({
        "mode": "cat",
        "snapshot_id": catalog.snapshot.id,
        "tag": catalog.snapshot.tag,
        "path": String::from_utf8_lossy(path),
        "bytes": bytes,
        "duration_s": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    }))
}
