//! Prometheus metrics.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub operations: IntCounterVec,
    pub bytes_received: IntCounter,
    pub bytes_stored: IntCounter,
    pub chunks_stored: IntCounter,
    pub chunks_deduplicated: IntCounter,
    pub bytes_restored: IntCounter,
    pub active_sessions: IntGauge,
    pub clients: IntGauge,
    pub credential_reloads: IntCounter,
    pub maintenance_bytes_freed: IntCounter,
    /// Storage requests by operation (`read`, `write`, `list`, `remove`, …), object type
    /// and outcome.
    pub store_requests: IntCounterVec,
    pub store_seconds: HistogramVec,
    /// Edge sync: files and bytes moved, and the time per file, by direction (`egress`
    /// device to bucket, `ingress` bucket to device).
    pub sync_files: IntCounterVec,
    pub sync_bytes: IntCounterVec,
    pub sync_seconds: HistogramVec,
    /// S3 gateway: requests by operation and result (`ok` or the S3 error code).
    pub s3_requests: IntCounterVec,
    /// ServiceAccount clients: TokenReview requests by result (`authenticated`,
    /// `unauthenticated`, `error`), their latency, answers taken from the cache, tokens
    /// refused by reason, and the entries of the allowed ServiceAccounts.
    pub token_reviews: IntCounterVec,
    pub token_review_seconds: Histogram,
    pub token_review_cache_hits: IntCounter,
    pub serviceaccount_refusals: IntCounterVec,
    pub serviceaccount_clients: IntGauge,
    /// Requests refused because a client was over a limit, by limit (`rate`, `sessions`,
    /// `chunks_per_put`, `catalog_chunks`, `path_bytes`, `patterns`): counted by
    /// [`crate::limits`], which the server gives this counter.
    pub limit_refusals: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let operations = IntCounterVec::new(
            Opts::new(
                "datamover_operations_total",
                "Operations by kind and outcome",
            ),
            &["operation", "outcome"],
        )?;
        let c = |name: &str, help: &str| IntCounter::new(name, help);
        let m = Metrics {
            operations,
            bytes_received: c(
                "datamover_bytes_received_total",
                "Chunk bytes received from clients",
            )?,
            bytes_stored: c(
                "datamover_bytes_stored_total",
                "Bytes written to packs (compressed, encrypted)",
            )?,
            chunks_stored: c("datamover_chunks_stored_total", "Chunks written to packs")?,
            chunks_deduplicated: c(
                "datamover_chunks_deduplicated_total",
                "Chunks received that were already stored",
            )?,
            bytes_restored: c(
                "datamover_bytes_restored_total",
                "File bytes sent to restoring clients",
            )?,
            active_sessions: IntGauge::new("datamover_active_sessions", "Open backup sessions")?,
            clients: IntGauge::new("datamover_clients", "Known clients")?,
            credential_reloads: c(
                "datamover_credential_reloads_total",
                "Reloads of the client credentials",
            )?,
            maintenance_bytes_freed: c(
                "datamover_maintenance_bytes_freed_total",
                "Pack bytes freed by maintenance",
            )?,
            store_requests: IntCounterVec::new(
                Opts::new(
                    "datamover_store_requests_total",
                    "Storage requests by operation, object type and outcome",
                ),
                &["operation", "type", "outcome"],
            )?,
            store_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "datamover_store_request_seconds",
                    "Storage request latency by operation",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["operation"],
            )?,
            s3_requests: IntCounterVec::new(
                Opts::new(
                    "datamover_s3_requests_total",
                    "Requests to the S3 gateway, by operation and result (ok or the S3 error code)",
                ),
                &["operation", "result"],
            )?,
            sync_files: IntCounterVec::new(
                Opts::new(
                    "datamover_sync_files_total",
                    "Files moved by edge sync, by direction",
                ),
                &["direction"],
            )?,
            sync_bytes: IntCounterVec::new(
                Opts::new(
                    "datamover_sync_bytes_total",
                    "File bytes moved by edge sync, by direction",
                ),
                &["direction"],
            )?,
            sync_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "datamover_sync_file_seconds",
                    "Time to move one file by edge sync, by direction",
                )
                .buckets(vec![0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0]),
                &["direction"],
            )?,
            token_reviews: IntCounterVec::new(
                Opts::new(
                    "datamover_token_reviews_total",
                    "Kubernetes TokenReview requests for ServiceAccount clients, by result",
                ),
                &["result"],
            )?,
            token_review_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "datamover_token_review_seconds",
                    "Latency of Kubernetes TokenReview requests",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            token_review_cache_hits: c(
                "datamover_token_review_cache_hits_total",
                "ServiceAccount tokens checked from the cache, without a TokenReview",
            )?,
            serviceaccount_refusals: IntCounterVec::new(
                Opts::new(
                    "datamover_serviceaccount_refusals_total",
                    "ServiceAccount tokens refused, by reason",
                ),
                &["reason"],
            )?,
            serviceaccount_clients: IntGauge::new(
                "datamover_serviceaccount_clients",
                "Entries of the allowed ServiceAccounts",
            )?,
            limit_refusals: crate::limits::refusals_counter()?,
            registry,
        };
        m.registry.register(Box::new(m.limit_refusals.clone()))?;
        m.registry.register(Box::new(m.token_reviews.clone()))?;
        m.registry
            .register(Box::new(m.token_review_seconds.clone()))?;
        m.registry
            .register(Box::new(m.serviceaccount_refusals.clone()))?;
        m.registry
            .register(Box::new(m.serviceaccount_clients.clone()))?;
        m.registry.register(Box::new(m.s3_requests.clone()))?;
        m.registry.register(Box::new(m.sync_files.clone()))?;
        m.registry.register(Box::new(m.sync_bytes.clone()))?;
        m.registry.register(Box::new(m.sync_seconds.clone()))?;
        m.registry.register(Box::new(m.store_requests.clone()))?;
        m.registry.register(Box::new(m.store_seconds.clone()))?;
        m.registry.register(Box::new(m.operations.clone()))?;
        for counter in [
            &m.bytes_received,
            &m.bytes_stored,
            &m.chunks_stored,
            &m.chunks_deduplicated,
            &m.bytes_restored,
            &m.credential_reloads,
            &m.maintenance_bytes_freed,
            &m.token_review_cache_hits,
        ] {
            m.registry.register(Box::new(counter.clone()))?;
        }
        m.registry.register(Box::new(m.active_sessions.clone()))?;
        m.registry.register(Box::new(m.clients.clone()))?;
        Ok(m)
    }

    pub fn op(&self, operation: &str, ok: bool) {
        self.operations
            .with_label_values(&[operation, if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
