//! Client errors and their exit codes. Every message says what to do.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Pinning(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Server(String),
}

impl ClientError {
    /// Exit codes, as documented in the README.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) => 2,
            ClientError::Auth(_) => 3,
            ClientError::NotFound(_) => 4,
            ClientError::Unreachable(_) => 5,
            ClientError::Pinning(_) => 6,
            ClientError::NoSpace(_) => 7,
            ClientError::Corrupt(_) => 8,
            ClientError::Config(_) | ClientError::Io(_) | ClientError::Server(_) => 1,
        }
    }

    /// A local I/O error on `what`.
    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull {
            return ClientError::NoSpace(format!(
                "no space left on the device while writing {what}: free space or restore elsewhere"
            ));
        }
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return ClientError::Io(format!(
                "permission denied on {what}: run the client as a user that may access it"
            ));
        }
        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
            return ClientError::Io(format!(
                "{what}: {e}: raise the open-file limit (`ulimit -n`, or the container \
                 runtime's nofile limit) and run again"
            ));
        }
        ClientError::Io(format!("{what}: {e}"))
    }

    /// Did the connection to the server break (rather than the server refusing)?
    pub fn is_connection_lost(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Server(m) => {
                let m = m.to_ascii_lowercase();
                [
                    "transport",
                    "connection",
                    "broken pipe",
                    "reset",
                    "h2 protocol",
                    "stream closed",
                    // hyper's word for a call whose connection went away under it
                    "operation was canceled",
                ]
                .iter()
                .any(|k| m.contains(k))
            }
            _ => false,
        }
    }

    /// Maps a status from the server.
    pub fn from_status(s: Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::Unauthenticated => ClientError::Auth(format!("authentication failed: {msg}")),
            Code::PermissionDenied => ClientError::Auth(format!("not allowed: {msg}")),
            Code::NotFound => ClientError::NotFound(msg),
            Code::InvalidArgument => ClientError::Usage(msg),
            // The server's storage is full; any other exhaustion is a per-client limit,
            // whose message says what to do.
            Code::ResourceExhausted if msg.contains("storage is full") => ClientError::NoSpace(msg),
            Code::ResourceExhausted => ClientError::Server(format!("over a server limit: {msg}")),
            Code::DataLoss => ClientError::Corrupt(msg),
            Code::Unavailable if msg.contains("transport") || msg.contains("connect") => {
                ClientError::Unreachable(format!(
                    "lost the connection to the server ({msg}): check the server is running and retry"
                ))
            }
            _ => ClientError::Server(format!("server error ({:?}): {msg}", s.code())),
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::from_status(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_cancelled_under_a_dropped_connection_is_a_lost_connection() {
        let cut = ClientError::from_status(Status::cancelled("operation was canceled"));
        assert!(cut.is_connection_lost(), "{cut}");
        let refused = ClientError::from_status(Status::internal("the store is read-only"));
        assert!(!refused.is_connection_lost(), "{refused}");
    }

    #[test]
    fn a_full_store_is_no_space_and_a_client_limit_is_not() {
        let full = ClientError::from_status(Status::resource_exhausted(
            "the server's storage is full: ask the operator to free space",
        ));
        assert_eq!(full.exit_code(), 7, "{full}");
        let limited = ClientError::from_status(Status::resource_exhausted(
            "client c is over its rate of 5 calls per second: slow down and retry",
        ));
        assert_eq!(limited.exit_code(), 1, "{limited}");
        assert!(limited.to_string().contains("slow down"), "{limited}");
    }

    #[test]
    fn running_out_of_open_files_says_to_raise_the_limit() {
        let e = ClientError::io("/data/x", std::io::Error::from_raw_os_error(libc::EMFILE));
        let m = e.to_string();
        assert!(m.contains("/data/x") && m.contains("ulimit -n"), "{m}");
    }
}
