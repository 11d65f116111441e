//! `mount <dir>`: the caller's snapshots as a read-only FUSE file system.
//!
//! ```text
//! <dir>/<tag>/<time>/…     one directory per snapshot, named by its time (UTC, RFC 3339
//!                          to the second; a second snapshot of a tag in the same second
//!                          gets `-<id prefix>`)
//! <dir>/<tag>/latest       a symlink to the newest snapshot of the tag
//! ```
//!
//! A tag with `/` or `%` in it is escaped (`%2F`, `%25`). Directories are read from the
//! snapshot's catalog when opened ([`fs`]); file contents are fetched by range when read,
//! through a cache of decoded chunks ([`data`]). Files keep their mode, size, mtime,
//! uid and gid; writes fail with EROFS.
//!
//! The mount needs /dev/fuse and the right to mount (root or CAP_SYS_ADMIN, or a
//! `fusermount3` on the PATH); no libfuse. It ends on SIGTERM or SIGINT (the file system
//! is unmounted, lazily if something still uses it), or when someone unmounts it.

mod data;
mod fs;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datamover_proto::v1;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

use crate::ClientError;
use crate::connect::Conn;
use data::{ChunkCache, Reader};
use fs::MountFs;

/// Bytes of decoded chunks kept for reads.
const CHUNK_CACHE: usize = 64 << 20;
/// Threads serving FUSE calls, each with at most one call in flight to the server.
const FUSE_THREADS: usize = 4;
/// How long unmounting may wait for the FUSE threads to end.
const UNMOUNT_WAIT: Duration = Duration::from_secs(10);

/// Checks the mount point: an existing directory, not a dead mount.
fn check_mount_point(dir: &Path) -> Result<PathBuf, ClientError> {
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ClientError::Usage(format!(
                "the mount point {shown} is not a directory: give an empty directory"
            )));
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(ClientError::Io(format!(
                "{shown} is a mount whose process has ended: unmount it with `umount -l {shown}`, then mount again"
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClientError::NotFound(format!(
                "the mount point {shown} does not exist: create it (mkdir -p {shown})"
            )));
        }
        Err(e) => return Err(ClientError::io(shown, e)),
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(ClientError::Config(
            "there is no /dev/fuse: mount needs the FUSE device (in a pod: the device /dev/fuse and CAP_SYS_ADMIN, or a privileged container); ls, find, diff, cat and restore_files do not".into(),
        ));
    }
    dir.canonicalize().map_err(|e| ClientError::io(shown, e))
}

/// Does the role allow reading snapshots? A `ReadChunks` of no chunks asks the server.
async fn check_read_access(conn: &Conn) -> Result<(), ClientError> {
    let mut s = conn
        .api
        .clone()
        .read_chunks(v1::ReadChunksRequest { ids: Vec::new() })
        .await?
        .into_inner();
    while s.message().await?.is_some() {}
    Ok(())
}

fn mount_error(dir: &Path, e: std::io::Error) -> ClientError {
    let shown = dir.display();
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => ClientError::Config(format!(
            "cannot mount at {shown}: {e}: mounting needs root or CAP_SYS_ADMIN (in a pod: a privileged container, or CAP_SYS_ADMIN and /dev/fuse), or fusermount3 on the PATH"
        )),
        Some(libc::ENODEV) => ClientError::Config(format!(
            "cannot mount at {shown}: the kernel has no FUSE support: load the fuse module (modprobe fuse)"
        )),
        Some(libc::EBUSY) => ClientError::Io(format!(
            "cannot mount at {shown}: it is busy: unmount what is mounted there, or give another directory"
        )),
        _ => ClientError::Io(format!(
            "cannot mount at {shown}: {e}: check that /dev/fuse can be opened and the directory is not in use"
        )),
    }
}

/// Unmounts: normally, or lazily when something still uses the file system (it goes
/// when the last user leaves). Waits a bounded time for the FUSE threads.
fn unmount(session: fuser::BackgroundSession, dir: &Path) -> Result<&'static str, ClientError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(session.umount_and_join());
    });
    match rx.recv_timeout(UNMOUNT_WAIT) {
        Ok(Ok(())) => Ok("unmounted"),
        Ok(Err(e)) if e.raw_os_error() == Some(libc::EBUSY) => {
            nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                ClientError::Io(format!(
                    "cannot unmount {}: {e}: unmount it with `umount -l {}`",
                    path.display(),
                    path.display()
                ))
            })?;
            tracing::warn!(dir = %path.display(), "the mount was busy: detached it; it goes when the last user leaves");
            Ok("detached while busy")
        }
        Ok(Err(e)) => Err(ClientError::Io(format!(
            "cannot unmount {}: {e}: unmount it with `umount -l {}`",
            path.display(),
            path.display()
        ))),
        Err(_) => {
            tracing::warn!(dir = %path.display(), "the FUSE threads did not end in time");
            Ok("unmounted (threads still busy)")
        }
    }
}

/// `mount <dir>`: mounts, serves until SIGTERM/SIGINT or an unmount, unmounts.
pub async fn run(conn: &mut Conn, dir: &Path) -> Result<Value, ClientError> {
    let started = Instant::now();
    let dir = check_mount_point(dir)?;
    check_read_access(conn).await?;
    let snapshots = conn
        .api
        .list_snapshots(v1::ListSnapshotsRequest { tag: String::new() })
        .await?
        .into_inner()
        .snapshots;
    // Signals are caught before mounting, so none ends the process with a mount left.
    let sig =
        |kind| signal(kind).map_err(|e| ClientError::Io(format!("cannot catch signals: {e}")));
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let reader = Arc::new(Reader {
        api: conn.api.clone(),
        key: conn.key.clone(),
        cache: Mutex::new(ChunkCache::new(CHUNK_CACHE)),
        prefetching: Mutex::new(Default::default()),
    });
    let fs = MountFs::new(
        tokio::runtime::Handle::current(),
        conn.api.clone(),
        reader,
        snapshots,
    );
    let (tags, snaps) = fs.counts();
    let stats = Arc::clone(&fs.stats);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("datamover".into()),
        fuser::MountOption::Subtype("datamover".into()),
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::DefaultPermissions,
    ];
    // As root, every user may read what the files' modes allow (allow_other).
    config.acl = if nix::unistd::geteuid().is_root() {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(FUSE_THREADS);
    let at = dir.clone();
    let session = tokio::task::spawn_blocking(move || fuser::Session::new(fs, &at, &config))
        .await
        .map_err(|e| ClientError::Io(format!("the mount task failed: {e}")))?
        .map_err(|e| mount_error(&dir, e))?;
    let session = session.spawn().map_err(|e| mount_error(&dir, e))?;
    tracing::info!(dir = %dir.display(), tags, snapshots = snaps, "mounted");
    eprintln!(
        "datamover-client: mounted {snaps} snapshot(s) of {tags} tag(s) read-only at {}; stop with SIGTERM or Ctrl-C, or `umount {}`",
        dir.display(),
        dir.display()
    );
    let stopped_by = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if session.guard.is_finished() {
                    break "unmounted";
                }
            }
        }
    };
    let at = dir.clone();
    let unmounted = tokio::task::spawn_blocking(move || unmount(session, &at))
        .await
        .map_err(|e| ClientError::Io(format!("the unmount task failed: {e}")))??;
    tracing::info!(dir = %dir.display(), stopped_by, unmounted, "mount ended");
    Ok(json!({
        "mode": "mount",
        "dir": dir.display().to_string(),
        "tags": tags,
        "snapshots": snaps,
        "stopped_by": stopped_by,
        "unmount": unmounted,
        "reads": stats.reads.load(Ordering::Relaxed),
        "bytes_read": stats.bytes_read.load(Ordering::Relaxed),
        "dirs_listed": stats.dirs_listed.load(Ordering::Relaxed),
        "errors": stats.errors.load(Ordering::Relaxed),
        "duration_s": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    }))
}
