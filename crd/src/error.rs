//! Errors of the controller and the manifest generator.

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the object has no {0}")]
    MissingField(&'static str),
    #[error("serializing: {0}")]
    Json(#[from] serde_json::Error),
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("reading server data from {addr}: {reason}")]
    ServerData { addr: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The controller cannot start: what is wrong and what to do.
    #[error("{0}")]
    Startup(String),
    /// Adding or removing the finalizer, or a reconciliation run under it.
    #[error("{0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A short label for the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingField(_) => "invalid_object",
            Error::Json(_) | Error::Yaml(_) => "serialization",
            Error::ServerData { .. } => "server_data",
            Error::Io(_) => "io",
            Error::Metrics(_) => "metrics",
            Error::Startup(_) => "startup",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
        }
    }
}
