//! The plaintext probe listener: `/healthz`, `/readyz`, `/metrics`, and `/server-data`
//! (the content of `/etc/server/data`, the public fingerprint of the certificate, so the
//! controller can put it into the DatamoverServer's status without `pods/exec`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct ProbeState {
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// What was written to `/etc/server/data`; set once it is written.
    pub server_data: Arc<OnceLock<String>>,
}

pub fn router(state: ProbeState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<ProbeState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .route(
            "/server-data",
            get(|State(s): State<ProbeState>| async move {
                match s.server_data.get() {
                    Some(data) => (StatusCode::OK, data.clone()),
                    None => (StatusCode::SERVICE_UNAVAILABLE, "not written yet\n".into()),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<ProbeState>| async move { s.metrics.render() }),
        )
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_body(state: ProbeState, path: &str) -> (u16, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });
        let response = tokio::task::spawn_blocking({
            let path = path.to_string();
            move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            }
        })
        .await
        .unwrap();
        server.abort();
        let code = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }

    #[tokio::test]
    async fn server_data_is_served_once_written() {
        let state = ProbeState {
            ready: Arc::default(),
            metrics: Arc::new(Metrics::new().unwrap()),
            server_data: Arc::default(),
        };
        assert_eq!(get_body(state.clone(), "/server-data").await.0, 503);
        state.server_data.set("ab12".to_string()).unwrap();
        assert_eq!(
            get_body(state, "/server-data").await,
            (200, "ab12".to_string())
        );
    }
}
