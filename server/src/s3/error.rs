//! The gateway's errors, and how each one answers an S3 client.

use datamover_repo::store::StoreError;
use s3s::{S3Error, S3ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "access key '{0}' is not a client of this server: use the client id as access key and the secret that `datamover-client s3-credentials` prints (a rotated or removed credential changes or revokes it)"
    )]
    UnknownClient(String),
    #[error("{0}")]
    Denied(String),
    #[error(
        "tenant '{0}' cannot use the S3 gateway: a tenant name may not contain '/' nor begin with '.'; rename it in the config key tenants"
    )]
    BadTenant(String),
    #[error(
        "key '{0}' is not allowed: use at most 1024 printable characters, '/' as separator, and no empty, '.' or '..' segments (no leading or trailing '/')"
    )]
    BadKey(String),
    #[error("no object '{key}' in bucket '{bucket}'")]
    NoSuchKey { bucket: String, key: String },
    #[error(
        "no multipart upload '{0}' for this key: it was completed, aborted, or started before the server restarted; start a new upload"
    )]
    NoSuchUpload(String),
    #[error("{0}")]
    InvalidPart(String),
    #[error("the requested range is outside the object of {0} bytes")]
    InvalidRange(u64),
    #[error(
        "the request body ended after {got} bytes but declared {declared}: nothing was stored; send the whole body again"
    )]
    IncompleteBody { declared: u64, got: u64 },
    #[error("reading the request body failed ({0}): nothing was stored; send it again")]
    Body(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("the object has not changed (If-None-Match)")]
    NotModified,
    #[error("{0}")]
    PreconditionFailed(String),
    #[error(
        "bucket '{0}' is not empty: delete its objects and abort its multipart uploads (ListMultipartUploads names them) first"
    )]
    BucketNotEmpty(String),
    #[error(
        "the storage behind the gateway failed: retry; if it persists, the server log says why"
    )]
    Store(#[from] StoreError),
    #[error("the gateway is shutting down: retry")]
    Unavailable,
    #[error("{0}")]
    SlowDown(String),
    #[error(
        "bucket '{0}' belongs to another tenant: bucket names are shared by all tenants of this server; choose another name"
    )]
    BucketAlreadyExists(String),
    #[error("bucket '{0}' does not exist: create it (CreateBucket) or write an object into it")]
    NoSuchBucket(String),
}

impl From<GatewayError> for S3Error {
    fn from(e: GatewayError) -> S3Error {
        let code = match &e {
            GatewayError::UnknownClient(_) => S3ErrorCode::InvalidAccessKeyId,
            GatewayError::Denied(_) | GatewayError::BadTenant(_) => S3ErrorCode::AccessDenied,
            GatewayError::BadKey(_) => S3ErrorCode::InvalidArgument,
            GatewayError::NoSuchKey { .. } => S3ErrorCode::NoSuchKey,
            GatewayError::NoSuchUpload(_) => S3ErrorCode::NoSuchUpload,
            GatewayError::InvalidPart(_) => S3ErrorCode::InvalidPart,
            GatewayError::InvalidRange(_) => S3ErrorCode::InvalidRange,
            GatewayError::IncompleteBody { .. } | GatewayError::Body(_) => {
                S3ErrorCode::IncompleteBody
            }
            GatewayError::TooLarge(_) => S3ErrorCode::EntityTooLarge,
            GatewayError::BucketNotEmpty(_) => S3ErrorCode::BucketNotEmpty,
            GatewayError::NotModified => S3ErrorCode::NotModified,
            GatewayError::PreconditionFailed(_) => S3ErrorCode::PreconditionFailed,
            GatewayError::Store(StoreError::NotFound(_)) => S3ErrorCode::NoSuchKey,
            GatewayError::Store(_) => S3ErrorCode::InternalError,
            GatewayError::Unavailable => S3ErrorCode::ServiceUnavailable,
            GatewayError::SlowDown(_) => S3ErrorCode::SlowDown,
            GatewayError::BucketAlreadyExists(_) => S3ErrorCode::BucketAlreadyExists,
            GatewayError::NoSuchBucket(_) => S3ErrorCode::NoSuchBucket,
        };
        if let GatewayError::Store(err) = &e {
            // The detail stays in the log (it names the backing store, never its keys).
            tracing::warn!(error = %err, "S3 gateway: storage request failed");
        }
        S3Error::with_message(code, e.to_string())
    }
}

pub type GatewayResult<T> = Result<T, GatewayError>;
