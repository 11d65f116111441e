//! The controller's Prometheus metrics and its plaintext HTTP listener (`/healthz`,
//! `/metrics`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::Error;

/// Reconciliation counters and timings.
pub struct Metrics {
    registry: Registry,
    /// `datamover_controller_reconciliations_total{progress}`
    pub reconciliations: IntCounterVec,
    /// `datamover_controller_reconcile_failures_total{error}`
    pub failures: IntCounterVec,
    /// `datamover_controller_reconcile_duration_seconds`
    pub duration: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "datamover_controller_reconciliations_total",
                "Reconciliations of DatamoverServers, by the progress they ended in",
            ),
            &["progress"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "datamover_controller_reconcile_failures_total",
                "Reconciliations that failed with an error, by kind of error",
            ),
            &["error"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "datamover_controller_reconcile_duration_seconds",
                "Time one reconciliation took",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &[],
        )?;
        registry.register(Box::new(reconciliations.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            registry,
            reconciliations,
            failures,
            duration,
        })
    }

    pub fn observe(&self, elapsed: Duration) {
        self.duration
            .with_label_values(&[])
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The listener's routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.render() }),
        )
        .with_state(metrics)
}

/// Serves [`router`] on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz and /metrics");
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
