//! `datamover-controller`: reconciles DatamoverServers into running, ready servers.
//!
//! Environment: `DATAMOVER_CONTROLLER_HTTP_ADDR` (default `0.0.0.0:8080`, `/healthz` and
//! `/metrics`), `POD_NAME` (names this instance in Events), `RUST_LOG`,
//! `DATAMOVER_LOG_FORMAT=json`. Credentials: in-cluster service account or kubeconfig.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use datamover_crd::controller::{self, Context, MANAGER};
use datamover_crd::metrics::{self, Metrics};
use datamover_crd::server_data::HttpServerData;
use kube::runtime::events::Reporter;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("DATAMOVER_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::var("DATAMOVER_CONTROLLER_HTTP_ADDR")
        .unwrap_or_else(|_| "0.0.0.0:8080".into())
        .parse()
        .map_err(|e| format!("DATAMOVER_CONTROLLER_HTTP_ADDR: {e}"))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes credentials (in-cluster or kubeconfig): {e}"))?;
    let metrics = Arc::new(Metrics::new()?);
    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        reporter,
        metrics.clone(),
        Arc::new(HttpServerData::default()),
    ));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(metrics::serve(addr, metrics, async {
        let _ = stop_rx.await;
    }));
    // Returns after SIGTERM/SIGINT, once running reconciliations have finished.
    let result = controller::run(client, ctx).await;
    let _ = stop_tx.send(());
    http.await??;
    result?;
    Ok(())
}
