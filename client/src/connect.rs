//! The connection to the server: TLS (pinned by `SERVER_DATA`, or verified against system
//! and mounted CAs) and a gRPC channel whose every call carries the client's credential:
//! `x-datamover-client: <id>` and `authorization: Bearer <credential>`, or, for a
//! ServiceAccount token (read again for every connection, as the kubelet rotates it),
//! `authorization: Bearer <token>` and `x-datamover-auth: serviceaccount`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use datamover_core::chunk::{ChunkIdKey, ChunkerParams};
use datamover_proto::fingerprint::Fingerprint;
use datamover_proto::v1::datamover_client::DatamoverClient;
use datamover_proto::v1::sync_client::SyncClient;
use datamover_proto::v1::{HelloRequest, HelloResponse};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::ClientError;
use crate::settings::{ClientSettings, read_token};

/// Adds the client id and credential (or the ServiceAccount token) to every call.
#[derive(Clone)]
pub struct Auth {
    /// `None` for a ServiceAccount token: the server learns who it is from Kubernetes.
    client_id: Option<MetadataValue<tonic::metadata::Ascii>>,
    bearer: MetadataValue<tonic::metadata::Ascii>,
    /// `serviceaccount` for a ServiceAccount token.
    scheme: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Auth {
    /// The credential of `settings`; a token file is read now.
    fn new(settings: &ClientSettings) -> Result<Auth, ClientError> {
        if let Some(path) = &settings.token_file {
            let token = read_token(path)?;
            return Ok(Auth {
                client_id: None,
                bearer: format!("Bearer {token}").parse().map_err(|_| {
                    ClientError::Auth(format!(
                        "the ServiceAccount token at {} has characters that cannot be sent",
                        path.display()
                    ))
                })?,
                scheme: Some(MetadataValue::from_static(
                    datamover_proto::SERVICE_ACCOUNT_AUTH,
                )),
            });
        }
        Ok(Auth {
            client_id: Some(settings.client_id.parse().map_err(|_| {
                ClientError::Auth(
                    "the client id (file name in /etc/client-secret) is not ASCII".into(),
                )
            })?),
            bearer: format!("Bearer {}", settings.credential).parse().map_err(|_| {
                ClientError::Auth("the client credential has characters that cannot be sent; use a printable ASCII token".into())
            })?,
            scheme: None,
        })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let m = req.metadata_mut();
        if let Some(id) = &self.client_id {
            m.insert(datamover_proto::CLIENT_ID_HEADER, id.clone());
        }
        m.insert(datamover_proto::AUTHORIZATION_HEADER, self.bearer.clone());
        if let Some(scheme) = &self.scheme {
            m.insert(datamover_proto::AUTH_SCHEME_HEADER, scheme.clone());
        }
        Ok(req)
    }
}

pub type Api = DatamoverClient<InterceptedService<Channel, Auth>>;
/// The edge sync service on the same channel.
pub type SyncApi = SyncClient<InterceptedService<Channel, Auth>>;

/// A connected, authenticated client.
pub struct Conn {
    pub api: Api,
    pub sync: SyncApi,
    pub hello: HelloResponse,
    pub key: ChunkIdKey,
    pub chunker: ChunkerParams,
    pub settings: ClientSettings,
}

/// Accepts exactly the certificate whose SHA-256 is pinned.
#[derive(Debug)]
struct PinnedVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
    seen: Arc<Mutex<Option<Fingerprint>>>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of_der(end_entity.as_ref());
        if fp == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            if let Ok(mut s) = self.seen.lock() {
                *s = Some(fp);
            }
            Err(rustls::Error::General(
                "server certificate does not match SERVER_DATA".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls_config(
    settings: &ClientSettings,
    seen: Arc<Mutex<Option<Fingerprint>>>,
) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS setup: {e}")))?;
    let mut config = match settings.pinned {
        Some(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin,
                provider,
                seen,
            }))
            .with_no_client_auth(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if let Some(pem) = &settings.ca_pem {
                for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                    let _ = roots.add(cert);
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg = format!("{msg}: {s_msg}");
        }
        src = s.source();
    }
    msg
}

/// Opens the channel (with a few attempts) and says hello, which checks the credential.
pub async fn connect(settings: &ClientSettings) -> Result<Conn, ClientError> {
    let auth = Auth::new(settings)?;
    let seen = Arc::new(Mutex::new(None));
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(settings, Arc::clone(&seen))?));
    let host = settings.host.clone();
    let port = settings.port;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| ClientError::Config(format!("'{host}' is not a valid server name")))?
        .to_owned();
    // TLS is done by the connector below, so the URI's scheme is plain http.
    let uri_host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let endpoint = Endpoint::from_shared(format!("http://{uri_host}:{port}"))
        .map_err(|e| ClientError::Config(format!("server address: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024));
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        let host = host.clone();
        let server_name = server_name.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let attempts: u32 = std::env::var("DATAMOVER_CONNECT_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut last = String::new();
    let mut channel = None;
    for attempt in 1..=attempts {
        match endpoint.connect_with_connector(connector.clone()).await {
            Ok(c) => {
                channel = Some(c);
                break;
            }
            Err(e) => {
                if let Some(fp) = seen.lock().ok().and_then(|s| *s) {
                    let pin = settings.pinned.map(|p| p.to_hex()).unwrap_or_default();
                    return Err(ClientError::Pinning(format!(
                        "the server at {}:{} presented certificate {} but SERVER_DATA pins {}: set SERVER_DATA to the server's /etc/server/data (status.serverInfo.data of its DatamoverServer); nothing was sent",
                        settings.host,
                        settings.port,
                        fp.to_hex(),
                        pin
                    )));
                }
                last = error_chain(&e);
                if last.contains("UnknownIssuer") || last.contains("invalid peer certificate") {
                    return Err(ClientError::Pinning(format!(
                        "the server's certificate is not trusted ({last}): set SERVER_DATA to the server's fingerprint (its /etc/server/data), or mount its CA as ca.crt under /etc/secrets/<name>/"
                    )));
                }
                if attempt < attempts {
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
            }
        }
    }
    let channel = channel.ok_or_else(|| {
        ClientError::Unreachable(format!(
            "cannot reach the server at {}:{} ({last}): check SERVER_URL and that the DatamoverServer is running",
            settings.host, settings.port
        ))
    })?;
    let sync = SyncClient::with_interceptor(channel.clone(), auth.clone())
        .max_decoding_message_size(datamover_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(datamover_proto::MAX_MESSAGE_BYTES);
    let mut api = DatamoverClient::with_interceptor(channel, auth)
        .max_decoding_message_size(datamover_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(datamover_proto::MAX_MESSAGE_BYTES);
    let hello = api
        .hello(HelloRequest {
            client_version: env!("CARGO_PKG_VERSION").into(),
        })
        .await?
        .into_inner();
    let key = ChunkIdKey::from_slice(&hello.chunk_id_key)
        .map_err(|e| ClientError::Server(format!("server sent a bad chunk-id key: {e}")))?;
    let p = hello.chunker.unwrap_or_default();
    let chunker = ChunkerParams {
        min_size: p.min_size,
        avg_size: p.avg_size,
        max_size: p.max_size,
    };
    chunker
        .validate()
        .map_err(|e| ClientError::Server(format!("server sent bad chunker parameters: {e}")))?;
    let mut settings = settings.clone();
    if settings.token_file.is_some() && !hello.client_id.is_empty() {
        // Who the server says this ServiceAccount is, for messages.
        settings.client_id = hello.client_id.clone();
    }
    Ok(Conn {
        api,
        sync,
        hello,
        key,
        chunker,
        settings,
    })
}
