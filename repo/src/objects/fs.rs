//! Plain objects as files in a directory (the embedded default store).
//!
//! A key is a relative path under the root. Writes go to a temporary name and are renamed
//! into place; multipart uploads keep their parts under `.datamover/multipart/<id>/`.
//! A directory keeps no object metadata: hashes live in the sync manifest.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{ByteStream, FileMeta, ObjectHead, ObjectInfo, ObjectStore, Part};
use crate::store::StoreError;
use crate::store::fs::io_error;

/// Marks files being written; never listed.
const TMP_MARK: &str = ".dm-tmp-";
/// Pieces of an object sent to a reader.
const READ_PIECE: usize = 1024 * 1024;

pub struct FsObjects {
    root: PathBuf,
}

fn etag_of(m: &std::fs::Metadata) -> String {
    let mtime = m.mtime() as i128 * 1_000_000_000 + i128::from(m.mtime_nsec());
    format!("{mtime:x}-{:x}-{:x}", m.len(), m.ino())
}

fn random_hex() -> String {
    let mut raw = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    hex::encode(raw)
}

/// A temporary name next to `path`, never listed.
fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "object".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!("{name}{TMP_MARK}{}", random_hex()))
}

impl FsObjects {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsObjects { root: root.into() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The directory of an upload this store made (24 hex digits); any other id, e.g.
    /// one read from a tampered record, is no upload (and never a path).
    fn upload_dir(&self, upload_id: &str) -> Result<PathBuf, StoreError> {
        if upload_id.len() != 24 || !upload_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::NotFound(format!(
                "upload {upload_id:?}: not an upload id of this store (start the upload again)"
            )));
        }
        Ok(self.root.join(".datamover/multipart").join(upload_id))
    }

    /// Writes `data` under a temporary name next to `path`, then renames it into place.
    async fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<String, StoreError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_error(e, parent))?;
        }
        let tmp = tmp_path(path);
        let result = async {
            tokio::fs::write(&tmp, data)
                .await
                .map_err(|e| io_error(e, &tmp))?;
            tokio::fs::rename(&tmp, path)
                .await
                .map_err(|e| io_error(e, path))?;
            let m = tokio::fs::metadata(path)
                .await
                .map_err(|e| io_error(e, path))?;
            Ok(etag_of(&m))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

#[async_trait]
impl ObjectStore for FsObjects {
    fn location(&self) -> String {
        format!("filesystem:{}", self.root.display())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let base = root.join(&prefix);
            let mut out = Vec::new();
            let mut dirs = vec![base];
            // Bounded by the tree: every directory is pushed once (symlinks not followed).
            while let Some(dir) = dirs.pop() {
                let rd = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error(e, &dir)),
                };
                for entry in rd {
                    let entry = entry.map_err(|e| io_error(e, &dir))?;
                    let path = entry.path();
                    let ty = entry.file_type().map_err(|e| io_error(e, &path))?;
                    if ty.is_dir() {
                        dirs.push(path);
                    } else if ty.is_file() {
                        let name = entry.file_name();
                        if name.to_string_lossy().contains(TMP_MARK) {
                            continue;
                        }
                        let Ok(rel) = path.strip_prefix(&root) else {
                            continue;
                        };
                        let Some(key) = rel.to_str() else { continue };
                        let m = entry.metadata().map_err(|e| io_error(e, &path))?;
                        out.push(ObjectInfo {
                            key: key.to_string(),
                            size: m.len(),
                            etag: etag_of(&m),
                            modified: m.modified().ok(),
                        });
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Other {
            what: "listing".into(),
            detail: e.to_string(),
        })?
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectHead>, StoreError> {
        let path = self.path(key);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectHead {
                size: m.len(),
                etag: etag_of(&m),
                modified: m.modified().ok(),
                meta: None,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(e, &path)),
        }
    }

    async fn get(&self, key: &str, offset: u64) -> Result<(ObjectHead, ByteStream), StoreError> {
        let path = self.path(key);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error(e, &path))?;
        let m = file.metadata().await.map_err(|e| io_error(e, &path))?;
        let head = ObjectHead {
            size: m.len(),
            etag: etag_of(&m),
            modified: m.modified().ok(),
            meta: None,
        };
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| io_error(e, &path))?;
        let body = futures::stream::unfold(Some((file, path)), |state| async move {
            let (mut file, path) = state?;
            let mut buf = vec![0u8; READ_PIECE];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), Some((file, path))))
                }
                Err(e) => Some((Err(io_error(e, &path)), None)),
            }
        });
        Ok((head, Box::pin(body)))
    }

    async fn put(
        &self,
        key: &str,
        data: Bytes,
        _meta: Option<FileMeta>,
    ) -> Result<String, StoreError> {
        self.write_atomic(&self.path(key), &data).await
    }

    async fn create_multipart(&self, _key: &str, _meta: FileMeta) -> Result<String, StoreError> {
        let id = random_hex();
        let dir = self.upload_dir(&id)?;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io_error(e, &dir))?;
        Ok(id)
    }

    async fn upload_part(
        &self,
        _key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> Result<String, StoreError> {
        let dir = self.upload_dir(upload_id)?;
        if !tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            return Err(StoreError::NotFound(format!("upload {upload_id}")));
        }
        self.write_atomic(&dir.join(number.to_string()), &data)
            .await?;
        Ok(format!("{:x}", data.len()))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[Part],
    ) -> Result<String, StoreError> {
        let dir = self.upload_dir(upload_id)?;
        let target = self.path(key);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_error(e, parent))?;
        }
        let tmp = tmp_path(&target);
        let result = async {
            let mut out = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| io_error(e, &tmp))?;
            for (n, _) in parts {
                let part = dir.join(n.to_string());
                let mut f = tokio::fs::File::open(&part)
                    .await
                    .map_err(|e| io_error(e, &part))?;
                tokio::io::copy(&mut f, &mut out)
                    .await
                    .map_err(|e| io_error(e, &tmp))?;
            }
            out.sync_all().await.map_err(|e| io_error(e, &tmp))?;
            drop(out);
            tokio::fs::rename(&tmp, &target)
                .await
                .map_err(|e| io_error(e, &target))?;
            let m = tokio::fs::metadata(&target)
                .await
                .map_err(|e| io_error(e, &target))?;
            Ok(etag_of(&m))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        } else {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        result
    }

    async fn abort_multipart(&self, _key: &str, upload_id: &str) -> Result<(), StoreError> {
        // An id this store never made has nothing to abort.
        let Ok(dir) = self.upload_dir(upload_id) else {
            return Ok(());
        };
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(e, &dir)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(e, &path)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upload_ids_from_records_never_reach_outside_the_uploads() {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("store");
        let victim = top.path().join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("keep"), b"x").unwrap();
        let store = FsObjects::new(&root);
        let meta = FileMeta {
            hash: [0; 32],
            mtime_ns: 0,
            mode: 0o644,
        };
        for bad in [
            "../../../victim",
            "../../victim",
            "/tmp",
            "",
            "0123456789abcdef0123456/",
        ] {
            store.abort_multipart("k", bad).await.unwrap();
            assert!(matches!(
                store
                    .upload_part("k", bad, 1, Bytes::from_static(b"p"))
                    .await,
                Err(StoreError::NotFound(_))
            ));
            assert!(matches!(
                store
                    .complete_multipart("k", bad, &[(1, String::new())])
                    .await,
                Err(StoreError::NotFound(_))
            ));
        }
        assert!(
            victim.join("keep").exists(),
            "abort reached outside the store"
        );
        assert!(!root.join("k").exists());
        // Its own uploads still work.
        let id = store.create_multipart("k", meta).await.unwrap();
        let etag = store
            .upload_part("k", &id, 1, Bytes::from_static(b"part"))
            .await
            .unwrap();
        store
            .complete_multipart("k", &id, &[(1, etag)])
            .await
            .unwrap();
        assert_eq!(std::fs::read(root.join("k")).unwrap(), b"part");
    }
}
