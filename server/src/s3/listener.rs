//! The TLS listener of the S3 gateway: HTTP/1.1 and HTTP/2 over the server's certificate.

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::service::S3Service;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ServerError;
use crate::tls::ServerTls;

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
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, service: S3Service) {
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
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "S3 gateway: TLS handshake failed");
                    return;
                }
            };
            if let Err(e) = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "S3 gateway: connection ended with an error");
            }
        });
    }
}
