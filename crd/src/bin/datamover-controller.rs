//! `datamover-controller`: reconciles DatamoverServers into running, ready servers.
//!
//! Environment: `DATAMOVER_CONTROLLER_HTTP_ADDR` (default `0.0.0.0:8080`, `/healthz` and
//! `/metrics`), `POD_NAME` (names this instance in Events), `RUST_LOG`,
//! `DATAMOVER_LOG_FORMAT=json`. Credentials: in-cluster service account or kubeconfig.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use datamover_crd::controller::{self, Context, MANAGER};
use datamover_crd::metrics::{self, Metrics};
use datamover_crd::server_data::HttpServerData;
use kube::runtime::events::Reporter;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "datamover-controller: reconciles DatamoverServers (dm.cr.kanister.io/v1alpha1)
into server Deployments, Services and NetworkPolicies, and writes their status.

Usage: datamover-controller            (no arguments; runs until SIGTERM or SIGINT)
       datamover-controller --help | --version

Kubernetes credentials: the pod's service account in a cluster, else the kubeconfig
(KUBECONFIG or ~/.kube/config).
Environment:
  DATAMOVER_CONTROLLER_HTTP_ADDR (0.0.0.0:8080)  /healthz and /metrics
  POD_NAME                                       names this instance in Events
  RUST_LOG (info), DATAMOVER_LOG_FORMAT=json";

fn main() -> ExitCode {
    // One crypto provider for every TLS connection (kube's, the server-data reads are
    // plaintext). Already installed is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("datamover-controller {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "datamover-controller: unexpected argument '{other}': it takes none (see --help)"
            );
            return ExitCode::from(2);
        }
    }

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("DATAMOVER_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
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
    let config = kube::Config::infer().await.map_err(|e| {
        format!(
            "no Kubernetes credentials: run in a pod with a service account, or set KUBECONFIG \
             (or ~/.kube/config): {e}"
        )
    })?;
    let cluster_url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .map_err(|e| format!("Kubernetes client for {cluster_url}: {e}"))?;
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
    let served = http.await;
    result.map_err(|e| format!("{e} [Kubernetes API server {cluster_url}]"))?;
    served??;
    Ok(())
}
