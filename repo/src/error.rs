use crate::store::StoreError;

/// Errors of the repository layer. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the repository password does not open this repository: set the repo-password secret \
         to the password the repository was created with"
    )]
    WrongPassword,
    #[error(
        "repository object {what} is corrupt or was tampered with ({why}); run verify and restore from another snapshot if it persists"
    )]
    Corrupt { what: String, why: String },
    #[error(
        "the repository config is unreadable ({0}); check that the storage location points at a datamover repository"
    )]
    BadConfig(String),
    #[error("chunk {0} is not in the repository; run the backup again to store it")]
    MissingChunk(String),
    #[error(
        "no snapshot matches '{0}' for this client; run `datamover-client list` to see the available tags and ids"
    )]
    SnapshotNotFound(String),
    #[error("'{0}' matches several snapshots; give more characters of the snapshot id")]
    AmbiguousSnapshot(String),
    #[error("chunk {0} does not match its id: the client sent corrupted data; retry the backup")]
    ChunkMismatch(String),
    #[error("{0}")]
    Busy(String),
    /// The local index cache failed (its message says what to do).
    #[error("{0}")]
    IndexCache(String),
    #[error("internal task failed: {0}")]
    Task(String),
}

impl RepoError {
    pub(crate) fn corrupt(what: impl Into<String>, why: impl ToString) -> Self {
        RepoError::Corrupt {
            what: what.into(),
            why: why.to_string(),
        }
    }
}
