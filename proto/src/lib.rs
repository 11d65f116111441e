//! # datamover-proto: the wire contract
//!
//! Everything a `datamover-server` and a `datamover-client` must agree on, and nothing
//! else:
//!
//! - [`v1`]: the `datamover-v1` gRPC protocol, generated at build time from
//!   `proto/datamover/v1/datamover.proto` with protox (no system `protoc` needed);
//! - [`protocols`]: parsing of the `PROTOCOLS` environment variable (`name:port` items);
//! - [`fingerprint`]: the certificate fingerprint the server publishes in
//!   `/etc/server/data` and the client pins through `SERVER_DATA`;
//! - [`codec`]: the gRPC codec both sides' generated code uses (prost's, with each
//!   message's buffer sized once);
//! - the metadata names (a client credential, or a ServiceAccount token marked by
//!   [`AUTH_SCHEME_HEADER`]) and message size limits below.

pub mod codec;
pub mod fingerprint;
pub mod protocols;

/// Generated types and services of the `datamover-v1` protocol.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("datamover.v1");
}

/// The name of the gRPC protocol in `PROTOCOLS`.
pub const PROTOCOL_NAME: &str = "datamover-v1";
/// The port used when `PROTOCOLS` is unset.
pub const DEFAULT_PORT: u16 = 51515;
/// Metadata key carrying the client id.
pub const CLIENT_ID_HEADER: &str = "x-datamover-client";
/// Metadata key carrying `Bearer <credential>`.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// Metadata key naming how the bearer credential is to be checked. Absent: a client
/// credential, with the client id in [`CLIENT_ID_HEADER`]. [`SERVICE_ACCOUNT_AUTH`]: a
/// Kubernetes ServiceAccount token (no client id is sent; the server learns the identity
/// from the Kubernetes TokenReview API).
pub const AUTH_SCHEME_HEADER: &str = "x-datamover-auth";
/// The [`AUTH_SCHEME_HEADER`] value of a ServiceAccount token.
pub const SERVICE_ACCOUNT_AUTH: &str = "serviceaccount";
/// The largest gRPC message either side decodes. A message holds at most one maximal chunk
/// plus a batch of small ones, so 16 MiB leaves ample room above the 1 MiB chunk maximum.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// A batch of chunks or restore items is cut at this many bytes.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
