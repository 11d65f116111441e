//! # datamover-client: backup and restore through a DatamoverServer
//!
//! The client holds one credential (`/etc/client-secret/<client_id>`, or in a pod a
//! projected ServiceAccount token in `DATAMOVER_TOKEN_FILE`) and never sees
//! storage keys. It cuts data into content-defined chunks, asks the server which ones it
//! lacks, and sends only those.
//!
//! - [`settings`]: `PROTOCOLS`, `SERVER_URL`, `SERVER_DATA`, the client secret or token.
//! - [`connect`]: TLS with certificate pinning, and the authenticated gRPC channel.
//! - [`backup`]: the walk (unchanged files are not read again), the chunk pipeline and
//!   the upload; files and streams share it.
//! - [`restore`]: writes a snapshot back, never outside its target, files under temporary
//!   names until complete; streams into a FIFO, a file or stdout. Chunks arrive
//!   compressed as stored and are decompressed and checked against their ids by the
//!   writer threads.
//! - [`browse`]: `ls`, `find`, `diff` and `cat` of snapshots, reading only the part of a
//!   catalog they need (its marks make it seekable).
//! - [`mount`]: `mount <dir>`, the snapshots as a read-only FUSE file system, directories
//!   and file ranges fetched when read.
//! - [`sync`]: edge sync of device directories with plain objects (egress, ingress, a
//!   Flotta `EdgeWorkload`), once or continuously.
//! - [`modes`]: the command line modes, `command_from_file`, and the result lines.
//! - [`progress`]: progress on stderr.
//! - `prefetch`: directories read ahead of a walk (backup, edge sync) by a few threads,
//!   so a cold cache does not make the walk wait on the disk one directory at a time.

pub mod backup;
pub mod browse;
pub mod connect;
pub mod error;
pub mod modes;
pub mod mount;
mod prefetch;
pub mod progress;
pub mod restore;
pub mod settings;
pub mod sync;

pub use error::ClientError;
