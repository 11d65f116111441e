//! # datamover-server: the DatamoverServer
//!
//! The only process that holds storage credentials, the repository password and the TLS
//! key. Clients reach it over `datamover-v1` (gRPC over TLS) with a per-client credential.
//!
//! - [`settings`]: the spec's inputs: `PROTOCOLS`, `/etc/config/<key>`,
//!   `/etc/secrets/<secret>/<key>`, all under `DATAMOVER_ROOT` when set.
//! - [`credentials`]: `/etc/client_credentials/<client_id>`, token or PHC hash, the check
//!   of a caller's credential, and the slowdown of repeated failures.
//! - [`access`]: tenants and roles (`append`, `read`, `full`, `admin`) from `/etc/config`.
//! - [`reload`]: live reload of credentials, access rules and allowed ServiceAccounts
//!   (inotify plus a rescan).
//! - ServiceAccount clients: [`sa_clients`] (which ServiceAccounts may connect, as which
//!   tenant and role: `/etc/serviceaccount_clients`), [`token_review`] (the Kubernetes
//!   TokenReview API), [`review_cache`] (its answers, briefly) and [`sa_auth`] (the check
//!   of a presented token).
//! - [`tls`]: the given or a generated certificate and its fingerprint, written to
//!   `/etc/server/data`.
//! - [`browse`]: reading part of a snapshot (the catalog's marks, a range of it, chunks by
//!   id) and the nodes a partial restore selects, by seeking instead of reading it all.
//! - [`service`]: the gRPC service on top of [`datamover_repo::Repository`]. A restore
//!   runs as a planner (walks the catalog, downloads packs ahead), a reader (opens
//!   chunks within a bounded read-ahead) and a sender (sends them in snapshot order,
//!   compressed as stored to clients that accept it).
//! - [`sync`]: edge sync, the second service: devices' directories as plain objects under
//!   `<sync prefix>/<tenant>/<target>/`, beside the repository.
//! - [`s3`]: the S3 gateway (`s3:<port>` in `PROTOCOLS`): the plain objects of edge sync
//!   over the S3 API, signed with a per-client key derived from the client's credential.
//! - [`maintenance`]: maintenance on request and on a schedule, and the publication of
//!   running sessions that keeps maintenance on other replicas safe.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics` on a plaintext port; [`metered`] counts
//!   and times every storage request.
//! - [`run`]: wiring, readiness and graceful shutdown.

// `tonic::Status` is the error type at the gRPC boundary; boxing it everywhere would only
// add noise to the handlers.
#![allow(clippy::result_large_err)]

pub mod access;
pub mod browse;
pub mod credentials;
pub mod error;
pub mod fuzz_targets;
pub mod http;
pub mod limits;
pub mod maintenance;
pub mod metered;
pub mod metrics;
pub mod reload;
pub mod review_cache;
pub mod run;
pub mod s3;
pub mod sa_auth;
pub mod sa_clients;
pub mod service;
pub mod settings;
pub mod sync;
pub mod tls;
pub mod token_review;

pub use error::ServerError;
