//! The Kubernetes API, as far as the server needs it for ServiceAccount clients: the
//! TokenReview API (is this token genuine, and valid for this audience?) and the labels of
//! a ServiceAccount (for entries that select ServiceAccounts by label).
//!
//! Where the API is (in-cluster config):
//!
//! - the address: `DATAMOVER_KUBE_API=https://host:port` when set, else
//!   `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` (what Kubernetes gives every
//!   pod);
//! - the server's own ServiceAccount token and the cluster CA: `token` and `ca.crt` in
//!   `DATAMOVER_KUBE_SA_DIR` when set, else `/var/run/secrets/kubernetes.io/serviceaccount`
//!   (under `DATAMOVER_ROOT` when that is set, like every other path of the server, so a
//!   local run never picks up the host's credentials by accident).
//!
//! Without an address, a token or a CA, ServiceAccount tokens are not enabled (edge and
//! local runs). The server's token is read again for every request, since the kubelet
//! rotates it; the CA is read once at start. Its calls need the ClusterRole
//! `system:auth-delegator` (TokenReview) and, for label selectors only, `get` on
//! `serviceaccounts`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::settings::Paths;

/// How long one API request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest API answer read.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Where the Kubernetes API and the server's credentials for it are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    /// `https://host:port`, if known.
    pub api: Option<String>,
    /// Holds `token` and `ca.crt`.
    pub sa_dir: PathBuf,
}

impl KubeSettings {
    pub fn from_env(env: impl Fn(&str) -> Option<String>, paths: &Paths) -> KubeSettings {
        let set = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let api = set("DATAMOVER_KUBE_API").or_else(|| {
            let host = set("KUBERNETES_SERVICE_HOST")?;
            let port = set("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host
            };
            Some(format!("https://{host}:{port}"))
        });
        let sa_dir = set("DATAMOVER_KUBE_SA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| paths.resolve("var/run/secrets/kubernetes.io/serviceaccount"));
        KubeSettings { api, sa_dir }
    }
}

/// Why the Kubernetes API cannot be used at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotEnabled {
    #[error("neither KUBERNETES_SERVICE_HOST (set in every pod) nor DATAMOVER_KUBE_API is set")]
    NoAddress,
    #[error("the Kubernetes API address '{0}' is not an https://host:port URL")]
    BadAddress(String),
    #[error(
        "no ServiceAccount token at {0} (is automountServiceAccountToken off for the server's pod?)"
    )]
    NoToken(String),
    #[error("cannot use the cluster CA at {path}: {error}")]
    BadCa { path: String, error: String },
}

/// A failed API request.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ApiError {
    #[error("the Kubernetes API at {api} did not answer: {detail}")]
    Unreachable { api: String, detail: String },
    #[error("the Kubernetes API refused the server's request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the Kubernetes API answered {status}: {message}")]
    Failed { status: u16, message: String },
    #[error("cannot read the server's own ServiceAccount token at {path}: {error}")]
    OwnToken { path: String, error: String },
    #[error("unexpected answer from the Kubernetes API: {0}")]
    BadAnswer(String),
}

/// What TokenReview says about a token (`status` of the answer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Review {
    pub authenticated: bool,
    pub user: ReviewedUser,
    /// The requested audiences the token is valid for.
    pub audiences: Vec<String>,
    /// Why the token was not authenticated.
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ReviewedUser {
    pub username: String,
    pub uid: String,
}

#[derive(Deserialize)]
struct ReviewAnswer {
    #[serde(default)]
    status: Review,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ObjectMeta {
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ServiceAccountAnswer {
    #[serde(default)]
    metadata: ObjectMeta,
}

/// A Kubernetes `Status` error answer: only its message is of use.
#[derive(Deserialize, Default)]
#[serde(default)]
struct StatusAnswer {
    message: String,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client of the Kubernetes API with the server's ServiceAccount.
#[derive(Clone)]
pub struct KubeApi {
    api: String,
    token_path: PathBuf,
    client: HttpClient,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("api", &self.api)
            .field("token_path", &self.token_path)
            .finish_non_exhaustive()
    }
}

fn tls_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in it".into());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

/// The message of an error answer (a Kubernetes `Status`), else its start.
fn answer_message(body: &[u8]) -> String {
    match serde_json::from_slice::<StatusAnswer>(body) {
        Ok(s) if !s.message.is_empty() => s.message,
        _ => String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_string(),
    }
}

impl KubeApi {
    /// The API client of `settings`, or why there is none.
    pub fn new(settings: &KubeSettings) -> Result<KubeApi, NotEnabled> {
        let api = settings.api.clone().ok_or(NotEnabled::NoAddress)?;
        let api = api.trim_end_matches('/').to_string();
        let uri: Uri = api
            .parse()
            .map_err(|_| NotEnabled::BadAddress(api.clone()))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(NotEnabled::BadAddress(api));
        }
        let token_path = settings.sa_dir.join("token");
        if !token_path.is_file() {
            return Err(NotEnabled::NoToken(token_path.display().to_string()));
        }
        let ca_path = settings.sa_dir.join("ca.crt");
        let bad_ca = |error: String| NotEnabled::BadCa {
            path: ca_path.display().to_string(),
            error,
        };
        let ca = std::fs::read(&ca_path).map_err(|e| bad_ca(e.to_string()))?;
        let tls = tls_config(&ca).map_err(bad_ca)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(REQUEST_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(KubeApi {
            api,
            token_path,
            client,
        })
    }

    /// The API address, for messages.
    pub fn address(&self) -> &str {
        &self.api
    }

    async fn own_token(&self) -> Result<String, ApiError> {
        let t = tokio::fs::read_to_string(&self.token_path)
            .await
            .map_err(|e| ApiError::OwnToken {
                path: self.token_path.display().to_string(),
                error: e.to_string(),
            })?;
        let t = t.trim().to_string();
        if t.is_empty() {
            return Err(ApiError::OwnToken {
                path: self.token_path.display().to_string(),
                error: "the file is empty".into(),
            });
        }
        Ok(t)
    }

    /// One request; the status and the answer's body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let own = self.own_token().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api))
            .header(hyper::header::AUTHORIZATION, format!("Bearer {own}"))
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ApiError::BadAnswer(format!("cannot build the request: {e}")))?;
        let unreachable = |detail: String| ApiError::Unreachable {
            api: self.api.clone(),
            detail,
        };
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ApiError::Refused {
                status: status.as_u16(),
                message: answer_message(&body),
            });
        }
        Ok((status, body))
    }

    /// Asks TokenReview whether `token` is genuine and valid for `audience`.
    pub async fn review(&self, token: &str, audience: &str) -> Result<Review, ApiError> {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        });
        let body = serde_json::to_vec(&body).map_err(|e| ApiError::BadAnswer(e.to_string()))?;
        let (status, answer) = self
            .call(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(body),
            )
            .await?;
        if !status.is_success() {
            return Err(ApiError::Failed {
                status: status.as_u16(),
                message: answer_message(&answer),
            });
        }
        let answer: ReviewAnswer = serde_json::from_slice(&answer)
            .map_err(|e| ApiError::BadAnswer(format!("TokenReview: {e}")))?;
        Ok(answer.status)
    }

    /// The labels of a ServiceAccount; `None` when it does not exist.
    pub async fn service_account_labels(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ApiError> {
        if !valid_name(namespace) || !valid_name(name) {
            return Ok(None);
        }
        let (status, answer) = self
            .call(
                Method::GET,
                &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}"),
                None,
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ApiError::Failed {
                status: status.as_u16(),
                message: answer_message(&answer),
            });
        }
        let sa: ServiceAccountAnswer = serde_json::from_slice(&answer)
            .map_err(|e| ApiError::BadAnswer(format!("ServiceAccount: {e}")))?;
        Ok(Some(sa.metadata.labels))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn settings_from_the_pod_environment_and_overrides() {
        let root = Paths::new(Some("/r".into()));
        let s = KubeSettings::from_env(
            env(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ]),
            &Paths::default(),
        );
        assert_eq!(s.api.as_deref(), Some("https://10.96.0.1:443"));
        assert_eq!(
            s.sa_dir,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount")
        );
        let s = KubeSettings::from_env(env(&[("KUBERNETES_SERVICE_HOST", "fd00::1")]), &root);
        assert_eq!(s.api.as_deref(), Some("https://[fd00::1]:443"));
        assert_eq!(
            s.sa_dir,
            PathBuf::from("/r/var/run/secrets/kubernetes.io/serviceaccount")
        );
        let s = KubeSettings::from_env(
            env(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("DATAMOVER_KUBE_API", "https://10.250.0.1:6443"),
                ("DATAMOVER_KUBE_SA_DIR", "/sa"),
            ]),
            &root,
        );
        assert_eq!(s.api.as_deref(), Some("https://10.250.0.1:6443"));
        assert_eq!(s.sa_dir, PathBuf::from("/sa"));
        assert_eq!(KubeSettings::from_env(env(&[]), &root).api, None);
    }

    #[test]
    fn what_is_missing_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = KubeSettings {
            api: None,
            sa_dir: dir.path().to_path_buf(),
        };
        assert_eq!(KubeApi::new(&s).unwrap_err(), NotEnabled::NoAddress);
        s.api = Some("http://10.0.0.1:6443".into());
        assert!(matches!(
            KubeApi::new(&s).unwrap_err(),
            NotEnabled::BadAddress(_)
        ));
        s.api = Some("https://10.0.0.1:6443".into());
        assert!(matches!(
            KubeApi::new(&s).unwrap_err(),
            NotEnabled::NoToken(_)
        ));
        std::fs::write(dir.path().join("token"), "t").unwrap();
        assert!(matches!(
            KubeApi::new(&s).unwrap_err(),
            NotEnabled::BadCa { .. }
        ));
        std::fs::write(dir.path().join("ca.crt"), "not a certificate").unwrap();
        assert!(matches!(
            KubeApi::new(&s).unwrap_err(),
            NotEnabled::BadCa { .. }
        ));
    }

    #[test]
    fn review_answers_and_error_messages() {
        let a: ReviewAnswer = serde_json::from_str(
            r#"{"kind":"TokenReview","status":{"authenticated":true,
               "user":{"username":"system:serviceaccount:shop:backup","uid":"u1",
                       "groups":["system:serviceaccounts"],"extra":{"x":["y"]}},
               "audiences":["dm"]}}"#,
        )
        .unwrap();
        assert!(a.status.authenticated);
        assert_eq!(a.status.user.username, "system:serviceaccount:shop:backup");
        assert_eq!(a.status.audiences, vec!["dm"]);
        let a: ReviewAnswer = serde_json::from_str(
            r#"{"status":{"user":{},"error":"[invalid bearer token, service account token has been invalidated]"}}"#,
        )
        .unwrap();
        assert!(!a.status.authenticated);
        assert!(a.status.error.contains("invalidated"));
        assert_eq!(
            answer_message(
                br#"{"kind":"Status","message":"tokenreviews.authentication.k8s.io is forbidden"}"#
            ),
            "tokenreviews.authentication.k8s.io is forbidden"
        );
        assert_eq!(answer_message(b"plain text"), "plain text");
        assert!(valid_name("shop-1.a"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }
}
