//! A repository in a local directory.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{FileType, Store, StoreError};

pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsStore { root: root.into() }
    }

    fn path(&self, ft: FileType, name: &str) -> PathBuf {
        self.root.join(ft.key(name))
    }

    fn map(&self, e: std::io::Error, path: &Path) -> StoreError {
        io_error(e, path)
    }
}

/// Maps an I/O error on `path` to a [`StoreError`].
pub(crate) fn io_error(e: std::io::Error, path: &Path) -> StoreError {
    let what = path.display().to_string();
    match e.kind() {
        ErrorKind::NotFound => StoreError::NotFound(what),
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => StoreError::AccessDenied {
            what,
            detail: e.to_string(),
        },
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => StoreError::NoSpace(what),
        _ if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) => {
            StoreError::NoSpace(what)
        }
        _ => StoreError::Other {
            what,
            detail: e.to_string(),
        },
    }
}

#[async_trait]
impl Store for FsStore {
    fn location(&self) -> String {
        format!("filesystem:{}", self.root.display())
    }

    async fn check(&self) -> Result<(), StoreError> {
        for dir in ["data", "index", "snapshots"] {
            let p = self.root.join(dir);
            tokio::fs::create_dir_all(&p)
                .await
                .map_err(|e| self.map(e, &p))?;
        }
        let probe = self.root.join(".write-check");
        tokio::fs::write(&probe, b"ok")
            .await
            .map_err(|e| self.map(e, &probe))?;
        let _ = tokio::fs::remove_file(&probe).await;
        Ok(())
    }

    async fn list(&self, ft: FileType) -> Result<Vec<String>, StoreError> {
        if ft == FileType::Config {
            let p = self.path(ft, "");
            return Ok(if tokio::fs::try_exists(&p).await.unwrap_or(false) {
                vec!["config".to_string()]
            } else {
                vec![]
            });
        }
        let base = self.root.join(ft.dir());
        let mut dirs = vec![base.clone()];
        let mut out = Vec::new();
        while let Some(dir) = dirs.pop() {
            let mut rd = match tokio::fs::read_dir(&dir).await {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(self.map(e, &dir)),
            };
            while let Some(entry) = rd.next_entry().await.map_err(|e| self.map(e, &dir))? {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue; // temporary files of unfinished writes
                }
                let ty = entry.file_type().await.map_err(|e| self.map(e, &dir))?;
                if ty.is_dir() && ft == FileType::Pack && dir == base {
                    dirs.push(entry.path());
                } else if ty.is_file() {
                    out.push(name);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn read(&self, ft: FileType, name: &str) -> Result<Bytes, StoreError> {
        let p = self.path(ft, name);
        tokio::fs::read(&p)
            .await
            .map(Bytes::from)
            .map_err(|e| self.map(e, &p))
    }

    async fn read_into(
        &self,
        ft: FileType,
        name: &str,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        use std::io::Read;
        let p = self.path(ft, name);
        let mut into = std::mem::take(buf);
        let path = p.clone();
        let (into, r) = tokio::task::spawn_blocking(move || {
            into.clear();
            let r = std::fs::File::open(&path).and_then(|mut f| {
                let len = usize::try_from(f.metadata()?.len()).unwrap_or(0);
                crate::memory::make_room(&mut into, len);
                f.read_to_end(&mut into)
            });
            (into, r)
        })
        .await
        .map_err(|e| StoreError::Other {
            what: p.display().to_string(),
            detail: format!("the read was cancelled: {e}"),
        })?;
        *buf = into;
        r.map(|_| ()).map_err(|e| self.map(e, &p))
    }

    async fn read_range(
        &self,
        ft: FileType,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StoreError> {
        let p = self.path(ft, name);
        let mut f = tokio::fs::File::open(&p)
            .await
            .map_err(|e| self.map(e, &p))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| self.map(e, &p))?;
        let mut buf = vec![0u8; length as usize];
        f.read_exact(&mut buf).await.map_err(|e| self.map(e, &p))?;
        Ok(Bytes::from(buf))
    }

    async fn write(&self, ft: FileType, name: &str, data: Bytes) -> Result<(), StoreError> {
        let p = self.path(ft, name);
        let dir = p.parent().unwrap_or(&self.root).to_path_buf();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| self.map(e, &dir))?;
        let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
        let result = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            f.write_all(&data).await?;
            f.sync_all().await?;
            drop(f);
            tokio::fs::rename(&tmp, &p).await
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(self.map(e, &p));
        }
        Ok(())
    }

    async fn remove(&self, ft: FileType, name: &str) -> Result<(), StoreError> {
        let p = self.path(ft, name);
        match tokio::fs::remove_file(&p).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.map(e, &p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_read_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStore::new(dir.path());
        s.check().await.unwrap();
        s.write(FileType::Pack, "abcdef", Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        assert_eq!(s.list(FileType::Pack).await.unwrap(), vec!["abcdef"]);
        // Read into a buffer that held something else: replaced, its memory kept.
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(b"an earlier pack");
        let at = buf.as_ptr();
        s.read_into(FileType::Pack, "abcdef", &mut buf)
            .await
            .unwrap();
        assert_eq!(&buf[..], b"0123456789");
        assert_eq!(buf.as_ptr(), at, "the buffer's memory is reused");
        assert!(
            s.read_into(FileType::Pack, "nope", &mut buf)
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert_eq!(
            &s.read_range(FileType::Pack, "abcdef", 2, 3).await.unwrap()[..],
            b"234"
        );
        assert!(
            s.read(FileType::Index, "nope")
                .await
                .unwrap_err()
                .is_not_found()
        );
        s.remove(FileType::Pack, "abcdef").await.unwrap();
        assert!(s.list(FileType::Pack).await.unwrap().is_empty());
        assert!(s.list(FileType::Config).await.unwrap().is_empty());
    }
}
