//! The command line: modes, their arguments, and the result lines.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::ClientError;
use crate::backup::{self, BackupResult};
use crate::browse;
use crate::connect::{self, Conn};
use crate::mount;
use crate::restore::{self, RestoreResult};
use crate::settings::ClientSettings;
use crate::sync::{self, Direction, SyncOptions};

pub const USAGE: &str = "usage: datamover-client <mode> <args>
  backup_files <path> <tag>          back up a directory tree            (alias fs_backup)
  restore_files <path> <tag|id> [--path P] [--include G]... [--exclude G]...
                                     restore the latest snapshot of tag  (alias fs_restore);
                                     only the tree at P, only what matches G (globs: a
                                     name at any depth, or a path with '/'); parents are
                                     created, the rest of <path> is left as it is
  backup_stream <file|-> [tag]       back up a named pipe, file or stdin (alias stream_backup)
  restore_stream <file|-> [tag|id]   restore a stream into a pipe, file or stdout (alias stream_restore)
  list [tag]                         list snapshots as JSON
  ls <tag|id> [path] [--recursive]   the entries of a directory of a snapshot (JSON lines)
  find <tag|id> <glob>...            the paths that match, in one snapshot
  find --all <glob>...               ... in every snapshot: which hold it, in which version
  diff <tag|id> <tag|id>             added, removed, modified paths (no file data read)
  cat <tag|id> <path>                one file of a snapshot to stdout
  mount <dir>                        every snapshot as a read-only FUSE file system:
                                     <dir>/<tag>/<time>/, <dir>/<tag>/latest; runs until
                                     SIGTERM/Ctrl-C, then unmounts (needs /dev/fuse and
                                     root or CAP_SYS_ADMIN)
  delete <snapshot-id>               delete one snapshot (id or unique prefix, never a tag)
  forget [--tag T] --keep-last N|--keep-hourly N|--keep-daily N|--keep-weekly N|--keep-monthly N [--dry-run]
                                     apply a retention policy per tag
  verify [--read-data | --read-data-subset F] [--all-tenants]
                                     check that snapshots are whole; with --read-data,
                                     read packs back and check every chunk (exit 8 if not)
  maintenance [--dry-run]            garbage collection, repacking, index compaction
                                     (role admin; alias prune)
  sync_egress <dir> <target> [opts]  keep <target> (plain objects under the tenant's sync
                                     prefix) in step with the directory <dir>
  sync_ingress <target> <dir> [opts] keep the directory <dir> in step with <target>
  sync_workload <edgeworkload.yaml> [--export-root DIR] [opts]
                                     the spec.data egress/ingress paths of a Flotta
                                     EdgeWorkload (device paths relative to /export)
    sync options: --once (one pass; default: every --interval, 15s, and on changes)
                  --delete (propagate deletions)  --point-in-time (egress: a full copy
                  under <target>/YYYY-MM-DD-HHMMSS/)  --disk-budget SIZE (ingress)
                  --bwlimit SIZE/s  --transfers N (16)  --state-dir DIR
  s3-credentials                     this client's key for the server's S3 gateway, as an
                                     AWS profile on stdout (alias s3_credentials)
  command_from_file <file>           run each line of <file> as a mode  (alias fs_sidecar)
environment: SERVER_URL, SERVER_DATA, PROTOCOLS; credential in /etc/client-secret/<client_id>,
  or else a projected ServiceAccount token in DATAMOVER_TOKEN_FILE
  (default /var/run/secrets/datamover/token)";

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    BackupFiles {
        path: PathBuf,
        tag: String,
    },
    RestoreFiles {
        path: PathBuf,
        spec: String,
        selection: restore::PartialRestore,
    },
    BackupStream {
        file: String,
        tag: String,
    },
    RestoreStream {
        file: String,
        spec: String,
    },
    List {
        tag: Option<String>,
    },
    Delete {
        id: String,
    },
    Forget {
        request: datamover_proto::v1::ForgetRequest,
    },
    Verify {
        request: datamover_proto::v1::VerifyRequest,
    },
    Maintenance {
        dry_run: bool,
    },
    CommandFromFile {
        file: PathBuf,
    },
    Sync {
        mode: &'static str,
        jobs: Vec<SyncOptions>,
    },
    Browse(browse::Command),
    Mount {
        dir: PathBuf,
    },
    S3Credentials,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::BackupFiles { .. } => "backup_files",
            Mode::RestoreFiles { .. } => "restore_files",
            Mode::BackupStream { .. } => "backup_stream",
            Mode::RestoreStream { .. } => "restore_stream",
            Mode::List { .. } => "list",
            Mode::Delete { .. } => "delete",
            Mode::Forget { .. } => "forget",
            Mode::Verify { .. } => "verify",
            Mode::Maintenance { .. } => "maintenance",
            Mode::CommandFromFile { .. } => "command_from_file",
            Mode::Sync { mode, .. } => mode,
            Mode::Browse(c) => c.name(),
            Mode::Mount { .. } => "mount",
            Mode::S3Credentials => "s3-credentials",
        }
    }

    /// Does the mode write its data to stdout (so results go to stderr)?
    fn uses_stdout(&self) -> bool {
        matches!(self, Mode::RestoreStream { file, .. } if file == "-")
            || matches!(self, Mode::Browse(c) if c.uses_stdout())
            || matches!(self, Mode::S3Credentials)
    }
}

fn usage(msg: &str) -> ClientError {
    ClientError::Usage(format!("{msg}\n{USAGE}"))
}

/// The default tag of a stream: the file's name, or `stdin`.
fn stream_tag(file: &str) -> String {
    if file == "-" {
        return "stdin".into();
    }
    Path::new(file)
        .file_name()
        .map_or_else(|| "stream".into(), |n| n.to_string_lossy().into_owned())
}

pub fn parse(args: &[String]) -> Result<Mode, ClientError> {
    let Some((mode, rest)) = args.split_first() else {
        return Err(usage("no mode given"));
    };
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let nonempty = |s: &str, what: &str| {
        if s.is_empty() {
            Err(usage(&format!("{what} must not be empty")))
        } else {
            Ok(s.to_string())
        }
    };
    match (mode.as_str(), rest.as_slice()) {
        ("backup_files" | "fs_backup", [path, tag]) => Ok(Mode::BackupFiles {
            path: PathBuf::from(nonempty(path, "path")?),
            tag: nonempty(tag, "tag")?,
        }),
        ("restore_files" | "fs_restore", [path, spec, opts @ ..]) => Ok(Mode::RestoreFiles {
            path: PathBuf::from(nonempty(path, "path")?),
            spec: nonempty(spec, "tag")?,
            selection: parse_partial(opts)?,
        }),
        ("ls" | "find" | "diff" | "cat", opts) => browse::parse(mode, opts)
            .map(Mode::Browse)
            .map_err(|e| usage(&e)),
        ("mount", [dir]) => Ok(Mode::Mount {
            dir: PathBuf::from(nonempty(dir, "mount point")?),
        }),
        ("backup_stream" | "stream_backup", [file, rest @ ..]) if rest.len() <= 1 => {
            Ok(Mode::BackupStream {
                file: nonempty(file, "file")?,
                tag: rest
                    .first()
                    .map_or_else(|| stream_tag(file), |t| t.to_string()),
            })
        }
        ("restore_stream" | "stream_restore", [file, rest @ ..]) if rest.len() <= 1 => {
            Ok(Mode::RestoreStream {
                file: nonempty(file, "file")?,
                spec: rest
                    .first()
                    .map_or_else(|| stream_tag(file), |t| t.to_string()),
            })
        }
        ("list" | "snapshots", rest) if rest.len() <= 1 => Ok(Mode::List {
            tag: rest.first().map(|t| t.to_string()),
        }),
        ("forget" | "retention", opts) => parse_forget(opts),
        ("verify" | "check", opts) => parse_verify(opts),
        ("maintenance" | "prune", opts) => match opts {
            [] => Ok(Mode::Maintenance { dry_run: false }),
            ["--dry-run" | "-n"] => Ok(Mode::Maintenance { dry_run: true }),
            _ => Err(usage("maintenance takes only --dry-run")),
        },
        ("delete" | "forget_snapshot", [id]) => Ok(Mode::Delete {
            id: nonempty(id, "snapshot id")?,
        }),
        ("sync_egress" | "sync_ingress" | "sync_workload", opts) => parse_sync(mode, opts),
        ("s3-credentials" | "s3_credentials", []) => Ok(Mode::S3Credentials),
        ("command_from_file" | "fs_sidecar", [file]) => Ok(Mode::CommandFromFile {
            file: PathBuf::from(nonempty(file, "file")?),
        }),
        (
            "backup_files" | "fs_backup" | "restore_files" | "fs_restore" | "backup_stream"
            | "stream_backup" | "restore_stream" | "stream_restore" | "list" | "snapshots"
            | "command_from_file" | "fs_sidecar" | "delete" | "forget_snapshot" | "mount"
            | "s3-credentials" | "s3_credentials",
            _,
        ) => Err(usage(&format!("wrong arguments for {mode}"))),
        _ => Err(usage(&format!("unknown mode '{mode}'"))),
    }
}

/// `restore_files` options: `--path P`, `--include G`, `--exclude G` (repeatable).
fn parse_partial(opts: &[&str]) -> Result<restore::PartialRestore, ClientError> {
    let mut sel = restore::PartialRestore::default();
    let mut it = opts.iter();
    while let Some(opt) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| usage(&format!("{opt} needs a value")))?;
        match *opt {
            "--path" => sel.path = browse::snapshot_path(value).map_err(|e| usage(&e))?,
            "--include" => sel.include.push(value.to_string()),
            "--exclude" => sel.exclude.push(value.to_string()),
            other => return Err(usage(&format!("unknown restore_files option '{other}'"))),
        }
    }
    datamover_core::select::Selection::new(&sel.path, &sel.include, &sel.exclude)
        .map_err(|e| usage(&e.to_string()))?;
    Ok(sel)
}

fn parse_sync(mode: &str, opts: &[&str]) -> Result<Mode, ClientError> {
    let mut o = SyncOptions::new(Direction::Egress, PathBuf::new(), String::new());
    let mut positional = Vec::new();
    let mut export_root = PathBuf::from("/export");
    let mut it = opts.iter();
    while let Some(opt) = it.next() {
        let mut value = |what: &str| {
            it.next()
                .map(|v| v.to_string())
                .ok_or_else(|| usage(&format!("{opt} needs {what}")))
        };
        match *opt {
            "--once" => o.once = true,
            "--delete" => o.delete = true,
            "--point-in-time" => o.point_in_time = true,
            "--interval" => {
                let v = value("a duration, e.g. 15s")?;
                o.interval = humantime::parse_duration(&v)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        usage(&format!(
                            "--interval takes a duration such as 15s or 5m, not '{v}'"
                        ))
                    })?;
            }
            "--disk-budget" | "--bwlimit" => {
                let v = value("a size, e.g. 500MiB")?;
                let n = sync::parse_size(&v).ok_or_else(|| {
                    usage(&format!(
                        "{opt} takes a size such as 500MiB or 2G, not '{v}'"
                    ))
                })?;
                if *opt == "--disk-budget" {
                    o.disk_budget = Some(n);
                } else {
                    o.bwlimit = Some(n);
                }
            }
            "--transfers" => {
                let v = value("a number")?;
                o.transfers = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| usage(&format!("--transfers takes 1 to 64, not '{v}'")))?;
            }
            "--state-dir" => o.state_dir = Some(PathBuf::from(value("a directory")?)),
            "--export-root" if mode == "sync_workload" => {
                export_root = PathBuf::from(value("a directory")?);
            }
            other if other.starts_with("--") => {
                return Err(usage(&format!("unknown {mode} option '{other}'")));
            }
            other => positional.push(other.to_string()),
        }
    }
    let jobs = match (mode, positional.as_slice()) {
        ("sync_egress", [dir, target]) => {
            o.direction = Direction::Egress;
            o.local = PathBuf::from(dir);
            o.target = target.clone();
            vec![o]
        }
        ("sync_ingress", [target, dir]) => {
            o.direction = Direction::Ingress;
            o.local = PathBuf::from(dir);
            o.target = target.clone();
            vec![o]
        }
        ("sync_workload", [file]) => sync::workload::load(Path::new(file), &export_root, &o)?,
        _ => return Err(usage(&format!("wrong arguments for {mode}"))),
    };
    for j in &jobs {
        if j.target.trim_matches('/').is_empty() || j.local.as_os_str().is_empty() {
            return Err(usage(&format!(
                "{mode} needs a directory and a non-empty target"
            )));
        }
    }
    let mode = match mode {
        "sync_egress" => "sync_egress",
        "sync_ingress" => "sync_ingress",
        _ => "sync_workload",
    };
    Ok(Mode::Sync { mode, jobs })
}

fn parse_verify(opts: &[&str]) -> Result<Mode, ClientError> {
    let mut r = datamover_proto::v1::VerifyRequest::default();
    let mut it = opts.iter();
    while let Some(opt) = it.next() {
        match *opt {
            "--read-data" => r.read_data = 1.0,
            "--all-tenants" => r.all_tenants = true,
            "--read-data-subset" => {
                let v = it
                    .next()
                    .ok_or_else(|| usage("--read-data-subset needs a fraction, e.g. 0.1 or 10%"))?;
                r.read_data = parse_fraction(v).ok_or_else(|| {
                    usage(&format!(
                        "--read-data-subset takes a fraction between 0 and 1 or a percentage, not '{v}'"
                    ))
                })?;
            }
            other => return Err(usage(&format!("unknown verify option '{other}'"))),
        }
    }
    Ok(Mode::Verify { request: r })
}

fn parse_fraction(v: &str) -> Option<f64> {
    let f = match v.strip_suffix('%') {
        Some(p) => p.parse::<f64>().ok()? / 100.0,
        None => v.parse::<f64>().ok()?,
    };
    (0.0..=1.0).contains(&f).then_some(f)
}

fn parse_forget(opts: &[&str]) -> Result<Mode, ClientError> {
    let mut r = datamover_proto::v1::ForgetRequest::default();
    let mut it = opts.iter();
    while let Some(opt) = it.next() {
        if *opt == "--dry-run" || *opt == "-n" {
            r.dry_run = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| usage(&format!("{opt} needs a value")))?;
        let number = || {
            value
                .parse::<u32>()
                .map_err(|_| usage(&format!("{opt} takes a number, not '{value}'")))
        };
        match *opt {
            "--tag" => r.tag = value.to_string(),
            "--keep-last" => r.keep_last = number()?,
            "--keep-hourly" => r.keep_hourly = number()?,
            "--keep-daily" => r.keep_daily = number()?,
            "--keep-weekly" => r.keep_weekly = number()?,
            "--keep-monthly" => r.keep_monthly = number()?,
            other => return Err(usage(&format!("unknown forget option '{other}'"))),
        }
    }
    if r.keep_last + r.keep_hourly + r.keep_daily + r.keep_weekly + r.keep_monthly == 0 {
        return Err(usage(
            "forget needs at least one --keep-* option (an empty policy would remove everything)",
        ));
    }
    Ok(Mode::Forget { request: r })
}

fn backup_json(mode: &str, r: &BackupResult) -> Value {
    json!({
        "mode": mode,
        "snapshot_id": r.snapshot.id,
        "tag": r.snapshot.tag,
        "time": r.snapshot.time,
        "files": r.stats.files,
        "dirs": r.stats.dirs,
        "bytes": r.stats.bytes,
        "bytes_sent": r.stats.bytes_sent,
        "chunks": r.stats.chunks,
        "chunks_sent": r.stats.chunks_sent,
        "files_unchanged": r.stats.files_unchanged,
        "duration_s": (r.duration.as_secs_f64() * 1000.0).round() / 1000.0,
    })
}

fn restore_json(mode: &str, r: &RestoreResult, path: &str) -> Value {
    json!({
        "mode": mode,
        "snapshot_id": r.snapshot.id,
        "tag": r.snapshot.tag,
        "path": path,
        "files": r.files,
        "dirs": r.dirs,
        "bytes": r.bytes,
        "skipped": r.skipped,
        "duration_s": (r.duration.as_secs_f64() * 1000.0).round() / 1000.0,
    })
}

/// Prints Kanister's `###Phase-output###` lines, then the JSON result as the last line.
pub fn print_result(result: &Value, to_stderr: bool) {
    let mut lines = String::new();
    if let Value::Object(map) = result {
        for (k, v) in map {
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Number(_) | Value::Bool(_) => v.to_string(),
                _ => continue,
            };
            lines.push_str(&format!(
                "###Phase-output###: {}\n",
                json!({"key": k, "value": value})
            ));
        }
    }
    lines.push_str(&result.to_string());
    lines.push('\n');
    if to_stderr {
        let _ = std::io::stderr().write_all(lines.as_bytes());
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(lines.as_bytes());
        let _ = out.flush();
    }
}

async fn run_one(conn: &mut Conn, mode: &Mode) -> Result<Value, ClientError> {
    match mode {
        Mode::BackupFiles { path, tag } => {
            let r = backup::backup_files(conn, path, tag).await?;
            Ok(backup_json(mode.name(), &r))
        }
        Mode::BackupStream { file, tag } => {
            let r = backup::backup_stream(conn, file, tag).await?;
            Ok(backup_json(mode.name(), &r))
        }
        Mode::RestoreFiles {
            path,
            spec,
            selection,
        } => {
            let r = restore::restore_files(conn, path, spec, selection).await?;
            Ok(restore_json(mode.name(), &r, &path.display().to_string()))
        }
        Mode::RestoreStream { file, spec } => {
            let r = restore::restore_stream(conn, file, spec).await?;
            Ok(restore_json(mode.name(), &r, file))
        }
        Mode::List { tag } => {
            let list = conn
                .api
                .list_snapshots(datamover_proto::v1::ListSnapshotsRequest {
                    tag: tag.clone().unwrap_or_default(),
                })
                .await?
                .into_inner()
                .snapshots;
            let items: Vec<Value> = list
                .iter()
                .map(|s| {
                    let st = s.stats.unwrap_or_default();
                    json!({
                        "id": s.id, "tag": s.tag, "time": s.time, "client_id": s.client_id,
                        "hostname": s.hostname, "source": s.source,
                        "kind": if s.kind == datamover_proto::v1::SnapshotKind::Stream as i32 { "stream" } else { "files" },
                        "files": st.files, "bytes": st.bytes,
                    })
                })
                .collect();
            let mut m = Map::new();
            m.insert("mode".into(), json!("list"));
            m.insert("count".into(), json!(items.len()));
            m.insert("snapshots".into(), Value::Array(items));
            Ok(Value::Object(m))
        }
        Mode::Delete { id } => {
            let snap = conn
                .api
                .delete_snapshot(datamover_proto::v1::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                })
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::NotFound => ClientError::NotFound(format!(
                        "no snapshot with id '{id}' for this client: run `datamover-client list` to see the ids; nothing was deleted"
                    )),
                    _ => ClientError::from_status(s),
                })?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            Ok(json!({"mode": "delete", "snapshot_id": snap.id, "tag": snap.tag, "deleted": true}))
        }
        Mode::Forget { request } => {
            let resp = conn.api.forget(request.clone()).await?.into_inner();
            let ids = |v: &[datamover_proto::v1::Snapshot]| {
                v.iter().map(|s| json!(s.id)).collect::<Vec<Value>>()
            };
            Ok(json!({
                "mode": "forget",
                "dry_run": request.dry_run,
                "kept": resp.kept.len(),
                "removed": resp.removed.len(),
                "kept_ids": ids(&resp.kept),
                "removed_ids": ids(&resp.removed),
            }))
        }
        Mode::Verify { request } => {
            let r = conn.api.verify(*request).await?.into_inner();
            let problems: Vec<Value> = r
                .problems
                .iter()
                .map(|p| {
                    json!({
                        "snapshot_id": p.snapshot_id, "tag": p.tag,
                        "path": String::from_utf8_lossy(&p.path), "message": p.message,
                    })
                })
                .collect();
            let result = json!({
                "mode": "verify",
                "snapshots": r.snapshots,
                "files": r.files,
                "chunks": r.chunks,
                "packs_read": r.packs_read,
                "bytes_read": r.bytes_read,
                "problems": problems.len(),
                "details": problems,
            });
            if let Some(first) = r.problems.first() {
                print_result(&result, false);
                let file = String::from_utf8_lossy(&first.path);
                return Err(ClientError::Corrupt(format!(
                    "verify found {} problem(s); first: snapshot {} (tag {}){}: {}. Restore the affected files from another snapshot and run a new backup; details in the JSON above",
                    r.problems.len(),
                    first.snapshot_id,
                    first.tag,
                    if file.is_empty() {
                        String::new()
                    } else {
                        format!(", file {file}")
                    },
                    first.message
                )));
            }
            Ok(result)
        }
        Mode::Maintenance { dry_run } => {
            let r = conn
                .api
                .maintain(datamover_proto::v1::MaintainRequest { dry_run: *dry_run })
                .await?
                .into_inner();
            let report: Value = serde_json::from_str(&r.report_json)
                .map_err(|e| ClientError::Server(format!("unreadable maintenance report: {e}")))?;
            let mut m = Map::new();
            m.insert("mode".into(), json!("maintenance"));
            if let Value::Object(fields) = report {
                m.extend(fields);
            }
            Ok(Value::Object(m))
        }
        Mode::Sync { mode, jobs } => sync::run_once(conn, jobs, mode).await,
        Mode::Browse(c) => browse::run(conn, c).await,
        Mode::Mount { dir } => mount::run(conn, dir).await,
        Mode::S3Credentials => s3_credentials(conn).await,
        Mode::CommandFromFile { .. } => Err(usage("command_from_file cannot be nested")),
    }
}

/// Prints this client's S3 gateway key as an AWS profile (credentials and endpoint).
async fn s3_credentials(conn: &mut Conn) -> Result<Value, ClientError> {
    let key = conn
        .sync
        .s3_credentials(datamover_proto::v1::S3CredentialsRequest {})
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let host = &conn.settings.host;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let endpoint = format!("https://{host}:{}", key.port);
    let mut profile = format!(
        "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\nendpoint_url = {endpoint}\n",
        key.access_key_id, key.secret_access_key
    );
    if let Some(fp) = &conn.settings.pinned {
        profile.push_str(&format!(
            "# the endpoint presents the DatamoverServer's certificate, SHA-256 fingerprint {}\n",
            fp.to_hex()
        ));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(profile.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| ClientError::Io(format!("writing the profile to stdout failed: {e}")))?;
    Ok(serde_json::json!({
        "mode": "s3-credentials",
        "access_key_id": key.access_key_id,
        "endpoint": endpoint,
    }))
}

/// Runs a mode: connects, does it, prints the result.
pub async fn run(mode: Mode, settings: &ClientSettings) -> Result<(), ClientError> {
    if let Mode::CommandFromFile { file } = &mode {
        return command_from_file(file, settings).await;
    }
    if let Mode::Sync { mode, jobs } = &mode
        && !jobs.iter().all(|j| j.once)
    {
        let result = sync::run_continuous(settings, jobs.clone(), mode).await?;
        print_result(&result, false);
        return Ok(());
    }
    // A directory can be read again, so a backup that loses its connection reconnects
    // and starts over; chunks the server already stored are found and not sent again.
    // Streams cannot be re-read, and other modes are cheap to rerun by hand.
    let attempts = if matches!(mode, Mode::BackupFiles { .. }) {
        BACKUP_ATTEMPTS
    } else {
        1
    };
    let mut delay = std::time::Duration::from_secs(1);
    for attempt in 1..=attempts {
        let outcome = async {
            let mut conn = connect::connect(settings).await?;
            run_one(&mut conn, &mode).await
        }
        .await;
        match outcome {
            Ok(result) => {
                print_result(&result, mode.uses_stdout());
                return Ok(());
            }
            Err(e) if attempt < attempts && e.is_connection_lost() => {
                tracing::warn!(error = %e, attempt, "connection lost: reconnecting; chunks already stored are not sent again");
                eprintln!(
                    "datamover-client: {e}; reconnecting (attempt {} of {attempts})",
                    attempt + 1
                );
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Unreachable(
        "lost the connection to the server on every attempt: check the server and the network, then retry".into(),
    ))
}

/// Attempts of a `backup_files` whose connection drops.
const BACKUP_ATTEMPTS: u32 = 4;

/// Sidecar mode: runs each line of `file` as a mode, as soon as the line arrives (a
/// sidecar's stdin stays open, so waiting for its end would run nothing). A named pipe is
/// opened again after each writer closes it; a line `exit` ends the mode. Lines are handed
/// from a reader thread through a small bounded queue.
pub async fn command_from_file(file: &Path, settings: &ClientSettings) -> Result<(), ClientError> {
    use std::io::BufRead;
    use std::os::unix::fs::FileTypeExt;
    let is_fifo = std::fs::metadata(file)
        .map_err(|e| ClientError::io(file.display(), e))?
        .file_type()
        .is_fifo();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<String, ClientError>>(16);
    let path = file.to_path_buf();
    std::thread::spawn(move || {
        loop {
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(Err(ClientError::io(path.display(), e)));
                    return;
                }
            };
            for line in std::io::BufReader::new(f).lines() {
                let sent = match line {
                    Ok(l) => tx.blocking_send(Ok(l)),
                    Err(e) => {
                        let _ = tx.blocking_send(Err(ClientError::io(path.display(), e)));
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
            if !is_fifo {
                return;
            }
        }
    });
    let mut last: Result<(), ClientError> = Ok(());
    while let Some(line) = rx.recv().await {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line == "exit" {
            return last;
        }
        let Some(args) = shlex::split(line) else {
            eprintln!("datamover-client: error: cannot parse the line '{line}': check its quoting");
            last = Err(usage("bad command line"));
            continue;
        };
        let outcome = match parse(&args) {
            Ok(Mode::CommandFromFile { .. }) => Err(usage("command_from_file cannot be nested")),
            Ok(mode) => {
                let r = async {
                    let mut conn = connect::connect(settings).await?;
                    run_one(&mut conn, &mode).await
                }
                .await;
                r.map(|v| print_result(&v, mode.uses_stdout()))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &outcome {
            eprintln!("datamover-client: error: {e}");
        }
        last = outcome;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn modes_and_aliases() {
        assert_eq!(parse(&s(&["s3-credentials"])).unwrap(), Mode::S3Credentials);
        assert_eq!(parse(&s(&["s3_credentials"])).unwrap(), Mode::S3Credentials);
        assert!(parse(&s(&["s3-credentials", "extra"])).is_err());
        assert!(Mode::S3Credentials.uses_stdout());
        assert_eq!(
            parse(&s(&["fs_backup", "/d", "t"])).unwrap(),
            Mode::BackupFiles {
                path: "/d".into(),
                tag: "t".into()
            }
        );
        assert_eq!(
            parse(&s(&["backup_stream", "/p/dump.fifo"])).unwrap(),
            Mode::BackupStream {
                file: "/p/dump.fifo".into(),
                tag: "dump.fifo".into()
            }
        );
        assert_eq!(
            parse(&s(&["stream_restore", "-"])).unwrap(),
            Mode::RestoreStream {
                file: "-".into(),
                spec: "stdin".into()
            }
        );
        assert!(matches!(parse(&s(&["nope"])), Err(ClientError::Usage(_))));
        assert!(matches!(
            parse(&s(&["backup_files", "/d"])),
            Err(ClientError::Usage(_))
        ));
        assert!(matches!(parse(&s(&[])), Err(ClientError::Usage(_))));
        match parse(&s(&[
            "forget",
            "--tag",
            "db",
            "--keep-last",
            "3",
            "--keep-daily",
            "7",
            "--dry-run",
        ]))
        .unwrap()
        {
            Mode::Forget { request } => {
                assert_eq!(
                    (request.keep_last, request.keep_daily, request.dry_run),
                    (3, 7, true)
                );
                assert_eq!(request.tag, "db");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&s(&["forget", "--dry-run"])),
            Err(ClientError::Usage(_))
        ));
        assert!(matches!(
            parse(&s(&["forget", "--keep-last", "x"])),
            Err(ClientError::Usage(_))
        ));
    }
}
