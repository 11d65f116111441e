//! # datamover-repo: the repository, server side only
//!
//! Layers, from the bottom:
//!
//! - [`store`]: the narrow storage trait [`Store`](store::Store), keyed by
//!   [`FileType`](store::FileType) and name, with two implementations: a local directory
//!   ([`store::FsStore`], the embedded default) and S3 ([`store::S3Store`], aws-sdk-s3).
//!   Nothing above this trait knows which one it talks to.
//! - [`crypto`]: the master key (Argon2id from the repository password, parameters in the
//!   repository's `config` object), zstd compression and XChaCha20-Poly1305 sealing of
//!   every object but `config`.
//! - [`Repository`]: packs (many chunks per object of several MiB, with an encrypted
//!   trailer listing them), the chunk index (a filter in memory, the locations in local
//!   files built from `index/` objects), and snapshots. Chunk ids are keyed per tenant; every index entry records its tenant.
//!
//! - Maintenance (in `repository/maintenance.rs`): two-phase garbage collection that is
//!   safe while backups run on any replica, repacking, index compaction, adoption of
//!   packs a crashed server left unindexed, and `verify`.
//! - [`objects`]: the second layout, plain objects for edge sync ([`objects::ObjectStore`]
//!   on S3 or a directory), beside the repository and independent of it.
//! - [`retention`]: which snapshots a `forget` policy keeps.
//!
//! Object layout: `config`, `data/<2 hex>/<pack id>`, `index/<id>`, `snapshots/<id>`,
//! `condemned/<id>`, `locks/<name>`.

pub mod crypto;
mod error;
mod index;
mod memory;
pub mod objects;
mod pack;
mod repository;
pub mod retention;
mod snapshot;
pub mod store;

pub use error::RepoError;

// The fuzz harnesses check the largest allocation each input causes.
#[cfg(test)]
#[global_allocator]
static ALLOC: datamover_core::fuzz::LargestAlloc = datamover_core::fuzz::LargestAlloc;
pub use repository::{
    AddResult, ChunkData, ChunkPlace, MaintenanceOptions, MaintenanceReport, Problem, Repository,
    RepositoryOptions, VerifyOptions, VerifyReport, synthetic_chunk_id,
};
pub use snapshot::{CatalogMark, MAX_MARK_PATH, RootMeta, SnapshotFile, SnapshotKindName};
