//! The TLS listener of the S3 gateway: HTTP/1.1 and HTTP/2 over the server's certificate.
//!
//! Refused signatures are slowed down like failed gRPC authentications, by the same
//! per-peer limiter of the credential store: a request that never reached an operation
//! (the S3 library refused its signature, key or expiry) and answers 403 counts as a
//! failure and, after the first few in a row, is answered later and later; a request that
//! reached one (its signature was good) clears the peer's count.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::service::S3Service;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ServerError;
use crate::credentials::CredentialStore;
use crate::tls::ServerTls;

/// Set by the gateway when a request reached an operation: its signature was accepted.
#[derive(Clone, Default)]
pub struct Reached(Arc<AtomicBool>);

impl Reached {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Serves one request, slowing down the answer of a refused signature.
async fn answer(
    service: S3Service,
    creds: Arc<CredentialStore>,
    peer: IpAddr,
    mut req: hyper::Request<hyper::body::Incoming>,
) -> Result<s3s::HttpResponse, s3s::HttpError> {
    let reached = Reached::default();
    req.extensions_mut().insert(reached.clone());
    let resp = hyper::service::Service::call(&service, req).await?;
    if reached.get() {
        creds.auth_succeeded(peer);
    } else if resp.status() == hyper::StatusCode::FORBIDDEN {
        let delay = creds.auth_failed(peer);
        if !delay.is_zero() {
            tracing::warn!(%peer, delay_ms = delay.as_millis() as u64, "S3 gateway: repeated refused signatures: slowing down");
            tokio::time::sleep(delay).await;
        }
    }
    Ok(resp)
}

/// The TLS configuration of the gateway: the same certificate as the gRPC server.
pub fn acceptor(tls: &ServerTls) -> Result<TlsAcceptor, ServerError> {
    let certs = rustls_pemfile::certs(&mut tls.cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Tls(format!("tls.crt is not valid PEM: {e}")))?;
    let key = rustls_pemfile::private_key(&mut tls.key_pem.as_slice())
        .map_err(|e| ServerError::Tls(format!("tls.key is not valid PEM: {e}")))?
        .ok_or_else(|| ServerError::Tls("tls.key holds no private key".into()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("the certificate does not fit the key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: S3Service,
    creds: Arc<CredentialStore>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "S3 gateway: accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = service.clone();
        let creds = Arc::clone(&creds);
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "S3 gateway: TLS handshake failed");
                    return;
                }
            };
            let ip = peer.ip();
            let per_request = hyper::service::service_fn(move |req| {
                answer(service.clone(), Arc::clone(&creds), ip, req)
            });
            if let Err(e) = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), per_request)
                .await
            {
                tracing::debug!(%peer, error = %e, "S3 gateway: connection ended with an error");
            }
        });
    }
}
