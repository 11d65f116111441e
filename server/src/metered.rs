//! A [`Store`] wrapper that counts storage requests and times them, by operation, object
//! type and outcome (`datamover_store_requests_total`, `datamover_store_request_seconds`).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use datamover_repo::store::{FileType, Store, StoreError};

use crate::metrics::Metrics;

pub struct MeteredStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    fn record<T>(&self, op: &str, ft: FileType, started: Instant, r: &Result<T, StoreError>) {
        let outcome = match r {
            Ok(_) => "ok",
            Err(StoreError::NotFound(_)) => "not_found",
            Err(StoreError::NoSpace(_)) => "no_space",
            Err(StoreError::AccessDenied { .. }) => "access_denied",
            Err(StoreError::Unreachable { .. }) => "unreachable",
            Err(StoreError::Other { .. }) => "error",
        };
        let ty = match ft.dir() {
            "" => "config",
            d => d,
        };
        self.metrics
            .store_requests
            .with_label_values(&[op, ty, outcome])
            .inc();
        self.metrics
            .store_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl Store for MeteredStore {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn check(&self) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.check().await;
        self.record("check", FileType::Config, t, &r);
        r
    }

    async fn list(&self, ft: FileType) -> Result<Vec<String>, StoreError> {
        let t = Instant::now();
        let r = self.inner.list(ft).await;
        self.record("list", ft, t, &r);
        r
    }

    async fn read(&self, ft: FileType, name: &str) -> Result<Bytes, StoreError> {
        let t = Instant::now();
        let r = self.inner.read(ft, name).await;
        self.record("read", ft, t, &r);
        r
    }

    async fn read_into(
        &self,
        ft: FileType,
        name: &str,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.read_into(ft, name, buf).await;
        self.record("read", ft, t, &r);
        r
    }

    async fn read_range(
        &self,
        ft: FileType,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StoreError> {
        let t = Instant::now();
        let r = self.inner.read_range(ft, name, offset, length).await;
        self.record("read_range", ft, t, &r);
        r
    }

    async fn write(&self, ft: FileType, name: &str, data: Bytes) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.write(ft, name, data).await;
        self.record("write", ft, t, &r);
        r
    }

    async fn remove(&self, ft: FileType, name: &str) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.remove(ft, name).await;
        self.record("remove", ft, t, &r);
        r
    }
}
