//! Object bodies between S3 clients and the store, in pieces.
//!
//! An upload is streamed: up to 8 MiB it is one PUT, beyond that a multipart upload of the
//! store in 8 MiB parts, so at most one part of it is in memory. An upload that ends short
//! of its declared length, or whose connection breaks, leaves nothing visible (the store's
//! multipart upload is aborted). A download is pumped from the store through a small
//! channel, cut to the requested range.

use std::fmt::Display;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use datamover_repo::objects::{ByteStream, FileMeta, ObjectStore, Part};
use datamover_repo::store::StoreError;
use futures::{Stream, StreamExt as _};
use s3s::dto::StreamingBlob;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::{GatewayError, GatewayResult};

/// Objects up to this size are stored with one PUT; larger ones in parts of this size.
pub const PART: usize = 8 * 1024 * 1024;

/// Metadata of an object written through the gateway: the content hash when known (edge
/// sync treats a zero hash as "written by another tool"), now, and a plain file mode.
pub fn meta_for(hash: Option<[u8; 32]>) -> FileMeta {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    FileMeta {
        hash: hash.unwrap_or([0; 32]),
        mtime_ns: now,
        mode: 0o644,
    }
}

/// Writes `body` to `key`; returns the new object's etag and size.
pub async fn write_stream<S, E>(
    objects: &dyn ObjectStore,
    key: &str,
    mut body: S,
    declared: Option<u64>,
) -> GatewayResult<(String, u64)>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Display,
{
    // Exactly one part's capacity, filled to the brim before it is sent: no reallocation
    // doubles it.
    let mut buf = BytesMut::with_capacity(PART);
    let mut upload: Option<(String, Vec<Part>)> = None;
    let mut total = 0u64;
    let received: GatewayResult<()> = async {
        // Bounded by the body, which the client ends (or the connection breaks).
        while let Some(piece) = body.next().await {
            let mut piece = piece.map_err(|e| GatewayError::Body(e.to_string()))?;
            total += piece.len() as u64;
            if declared.is_some_and(|d| total > d) {
                return Err(GatewayError::Body(format!(
                    "more than the declared {} bytes arrived",
                    declared.unwrap_or(0)
                )));
            }
            while !piece.is_empty() {
                if buf.len() == PART {
                    // Full, and more follows: not the last part, so it goes now.
                    let id = match &upload {
                        Some((id, _)) => id.clone(),
                        None => {
                            let id = objects.create_multipart(key, meta_for(None)).await?;
                            upload = Some((id.clone(), Vec::new()));
                            id
                        }
                    };
                    let data = std::mem::replace(&mut buf, BytesMut::with_capacity(PART)).freeze();
                    let parts = upload.as_mut().map(|(_, p)| p);
                    let number = parts.as_ref().map_or(0, |p| p.len()) as i32 + 1;
                    let etag = objects.upload_part(key, &id, number, data).await?;
                    if let Some(parts) = parts {
                        parts.push((number, etag));
                    }
                }
                let take = (PART - buf.len()).min(piece.len());
                buf.extend_from_slice(&piece.split_to(take));
            }
        }
        if let Some(d) = declared
            && d != total
        {
            return Err(GatewayError::IncompleteBody {
                declared: d,
                got: total,
            });
        }
        Ok(())
    }
    .await;
    match (received, upload) {
        (Err(e), Some((id, _))) => {
            abort(objects, key, &id).await;
            Err(e)
        }
        (Err(e), None) => Err(e),
        (Ok(()), None) => {
            let data = buf.freeze();
            let hash = *blake3::hash(&data).as_bytes();
            let etag = objects.put(key, data, Some(meta_for(Some(hash)))).await?;
            Ok((etag, total))
        }
        (Ok(()), Some((id, mut parts))) => {
            let done: Result<String, StoreError> = async {
                let number = parts.len() as i32 + 1;
                let etag = objects.upload_part(key, &id, number, buf.freeze()).await?;
                parts.push((number, etag));
                objects.complete_multipart(key, &id, &parts).await
            }
            .await;
            match done {
                Ok(etag) => Ok((etag, total)),
                Err(e) => {
                    abort(objects, key, &id).await;
                    Err(e.into())
                }
            }
        }
    }
}

/// Collects one part of a client's multipart upload (its size is capped by the caller).
pub async fn collect<S, E>(mut body: S, declared: Option<u64>, max: u64) -> GatewayResult<Bytes>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Display,
{
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(max) as usize);
    // Bounded by `max`.
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| GatewayError::Body(e.to_string()))?;
        if (buf.len() + piece.len()) as u64 > max {
            return Err(GatewayError::TooLarge(format!(
                "a part may hold at most {} MiB: use smaller parts (for example 8 MiB)",
                max / (1024 * 1024)
            )));
        }
        buf.extend_from_slice(&piece);
    }
    if let Some(d) = declared
        && d != buf.len() as u64
    {
        return Err(GatewayError::IncompleteBody {
            declared: d,
            got: buf.len() as u64,
        });
    }
    Ok(buf.freeze())
}

async fn abort(objects: &dyn ObjectStore, key: &str, id: &str) {
    if let Err(e) = objects.abort_multipart(key, id).await {
        tracing::warn!(key, error = %e, "S3 gateway: aborting an unfinished upload failed (the store's lifecycle rules clean it up)");
    }
}

/// A response body of `len` bytes from a store stream (which may hold more).
pub fn read_stream(mut body: ByteStream, len: u64) -> StreamingBlob {
    let (tx, rx) = mpsc::channel::<Result<Bytes, StoreError>>(4);
    tokio::spawn(async move {
        let mut left = len;
        // Bounded by `len` and the object's size.
        while left > 0 {
            let Some(piece) = body.next().await else {
                break;
            };
            let piece = match piece {
                Ok(mut p) => {
                    if p.len() as u64 > left {
                        p.truncate(left as usize);
                    }
                    left -= p.len() as u64;
                    Ok(p)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "S3 gateway: reading an object from the store failed");
                    left = 0;
                    Err(e)
                }
            };
            if tx.send(piece).await.is_err() {
                return;
            }
        }
    });
    StreamingBlob::wrap(ReceiverStream::new(rx))
}
