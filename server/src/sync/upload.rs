//! Uploads: whole small files, and large ones through multipart uploads whose record
//! (see [`super::state::UploadRecord`]) lets an interrupted upload resume, also after a
//! restart of the server.

use bytes::{Bytes, BytesMut};
use datamover_proto::v1;
use datamover_repo::objects::FileMeta;
use datamover_repo::store::StoreError;
use tonic::{Status, Streaming};

use super::state::{UploadRecord, upload_key};
use super::{
    Piece, SyncService, changed_while_sent, collect, next_piece, part_size, record, store_status,
};
use crate::credentials::Identity;

impl SyncService {
    pub(super) async fn load_upload(&self, key: &str) -> Result<Option<UploadRecord>, Status> {
        let rkey = upload_key(key);
        let got = record(&self.metrics, "get", "sync-state", async {
            let (_, body) = self.objects.get(&rkey, 0).await?;
            collect(body).await
        })
        .await;
        match got {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(store_status(e)),
        }
    }

    async fn save_upload(&self, key: &str, rec: &UploadRecord) -> Result<(), Status> {
        let json = serde_json::to_vec(rec).map_err(|e| Status::internal(e.to_string()))?;
        record(
            &self.metrics,
            "put",
            "sync-state",
            self.objects.put(&upload_key(key), Bytes::from(json), None),
        )
        .await
        .map_err(store_status)?;
        Ok(())
    }

    /// Removes the record of `key`'s multipart upload, as far as the store lets it.
    async fn delete_upload_record(&self, key: &str) {
        let _ = record(
            &self.metrics,
            "delete",
            "sync-state",
            self.objects.delete(&upload_key(key)),
        )
        .await;
    }

    async fn drop_upload(&self, key: &str, rec: &UploadRecord) {
        let _ = self
            .req(
                "abort_multipart",
                self.objects.abort_multipart(key, &rec.upload_id),
            )
            .await;
        self.delete_upload_record(key).await;
    }

    /// Receives a whole small file.
    pub(super) async fn receive_small(
        stream: &mut Streaming<v1::SyncPutRequest>,
        path: &str,
        size: u64,
        hash: [u8; 32],
    ) -> Result<Bytes, Status> {
        let mut buf = BytesMut::with_capacity(size as usize);
        let trailer = loop {
            match next_piece(stream).await? {
                Piece::Data(d) => {
                    if (buf.len() + d.len()) as u64 > size {
                        return Err(changed_while_sent(path));
                    }
                    buf.extend_from_slice(&d);
                }
                Piece::Trailer(h) => break h,
            }
        };
        let data = buf.freeze();
        if data.len() as u64 != size || trailer != hash || *blake3::hash(&data).as_bytes() != hash {
            return Err(changed_while_sent(path));
        }
        Ok(data)
    }

    /// Receives a large file into a multipart upload, resuming a recorded one.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn receive_multipart(
        &self,
        id: &Identity,
        stream: &mut Streaming<v1::SyncPutRequest>,
        key: &str,
        path: &str,
        meta: FileMeta,
        size: u64,
        offset: u64,
    ) -> Result<String, Status> {
        let existing = self.load_upload(key).await?;
        let mut rec = match existing {
            Some(mut r)
                if offset > 0 && r.hash == meta.hash && r.size == size && r.offset() == offset =>
            {
                // (A record of an older server names no object; maintenance needs it.)
                r.key = key.to_string();
                r
            }
            other if offset == 0 => {
                if let Some(old) = other {
                    self.drop_upload(key, &old).await;
                }
                let upload_id = self
                    .req("create_multipart", self.objects.create_multipart(key, meta))
                    .await
                    .map_err(store_status)?;
                let rec = UploadRecord {
                    upload_id,
                    key: key.to_string(),
                    size,
                    hash: meta.hash,
                    part_size: part_size(size),
                    parts: Vec::new(),
                };
                self.save_upload(key, &rec).await?;
                rec
            }
            other => {
                let held = other
                    .filter(|r| r.hash == meta.hash && r.size == size)
                    .map_or(0, |r| r.offset());
                return Err(Status::failed_precondition(format!(
                    "the server holds {held} bytes of this upload of {path}, not {offset}: ask again where to resume (run the sync again)"
                )));
            }
        };
        let part_size = rec.part_size as usize;
        // Only an upload from the start can be hashed here; a resumed one relies on the
        // client, which hashes the whole file again while sending.
        let mut hasher = (offset == 0).then(blake3::Hasher::new);
        let mut received = offset;
        let mut buf = BytesMut::with_capacity(part_size);
        let trailer = loop {
            match next_piece(stream).await? {
                Piece::Data(mut d) => {
                    received += d.len() as u64;
                    if received > size {
                        self.drop_upload(key, &rec).await;
                        return Err(changed_while_sent(path));
                    }
                    if let Some(h) = hasher.as_mut() {
                        h.update(&d);
                    }
                    while !d.is_empty() {
                        let take = (part_size - buf.len()).min(d.len());
                        buf.extend_from_slice(&d.split_to(take));
                        if buf.len() == part_size {
                            self.creds.still_valid(id)?;
                            let number = rec.parts.len() as i32 + 1;
                            let data = buf.split().freeze();
                            buf.reserve(part_size);
                            let etag = match self
                                .req(
                                    "upload_part",
                                    self.objects.upload_part(key, &rec.upload_id, number, data),
                                )
                                .await
                            {
                                Ok(etag) => etag,
                                // The storage forgot the upload (expired or aborted):
                                // start afresh next time rather than failing forever.
                                Err(StoreError::NotFound(_)) => {
                                    self.drop_upload(key, &rec).await;
                                    return Err(Status::aborted(format!(
                                        "the unfinished upload of {path} expired on the storage: it is sent again from the start"
                                    )));
                                }
                                Err(e) => return Err(store_status(e)),
                            };
                            rec.parts.push((number, etag));
                            self.save_upload(key, &rec).await?;
                        }
                    }
                }
                Piece::Trailer(h) => break h,
            }
        };
        let ours_ok = hasher.is_none_or(|h| *h.finalize().as_bytes() == meta.hash);
        if received != size || trailer != meta.hash || !ours_ok {
            self.drop_upload(key, &rec).await;
            return Err(changed_while_sent(path));
        }
        if !buf.is_empty() || rec.parts.is_empty() {
            let number = rec.parts.len() as i32 + 1;
            let etag = self
                .req(
                    "upload_part",
                    self.objects
                        .upload_part(key, &rec.upload_id, number, buf.freeze()),
                )
                .await
                .map_err(store_status)?;
            rec.parts.push((number, etag));
        }
        let etag = self
            .req(
                "complete_multipart",
                self.objects
                    .complete_multipart(key, &rec.upload_id, &rec.parts),
            )
            .await
            .map_err(store_status)?;
        self.delete_upload_record(key).await;
        Ok(etag)
    }
}
