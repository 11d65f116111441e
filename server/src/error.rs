//! Server errors: fatal start-up errors (exit codes) and the mapping of repository errors
//! to gRPC status codes.

use datamover_repo::RepoError;
use datamover_repo::store::StoreError;
use tonic::Status;

/// Fatal errors at start: each is one line saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(RepoError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot write {path}: {error}; make the directory writable")]
    Output { path: String, error: String },
    #[error("cannot listen on {addr}: {error}; choose a free port")]
    Listen { addr: String, error: String },
}

impl ServerError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Config(_) => 2,
            ServerError::Storage(_) => 3,
            ServerError::Tls(_) => 4,
            ServerError::Output { .. } => 5,
            ServerError::Listen { .. } => 6,
        }
    }
}

/// Maps a repository error to the status a client sees. Storage details stay in the
/// server's log; the client is told what it can do.
pub fn status(e: RepoError) -> Status {
    match &e {
        RepoError::SnapshotNotFound(_) => Status::not_found(e.to_string()),
        RepoError::AmbiguousSnapshot(_) => Status::invalid_argument(e.to_string()),
        RepoError::ChunkMismatch(_) => Status::invalid_argument(e.to_string()),
        RepoError::MissingChunk(_) => Status::failed_precondition(e.to_string()),
        RepoError::Corrupt { .. } => Status::data_loss(e.to_string()),
        RepoError::Store(StoreError::NoSpace(_)) => Status::resource_exhausted(
            "the server's storage is full: ask the operator to free space or grow the bucket quota, then retry",
        ),
        RepoError::Busy(_) => Status::aborted(e.to_string()),
        RepoError::Store(StoreError::AccessDenied { .. }) => {
            tracing::error!(error = %e, "storage denied access");
            Status::unavailable(
                "the server's storage denied access: ask the operator to check the storage credentials and their permissions on the bucket (see the server log)",
            )
        }
        RepoError::Store(_) => {
            tracing::error!(error = %e, "storage error");
            Status::unavailable(
                "the server cannot reach its storage right now; retry later, and ask the operator to check the server log if it persists",
            )
        }
        _ => {
            tracing::error!(error = %e, "internal error");
            Status::internal(format!("server error: {e}"))
        }
    }
}
