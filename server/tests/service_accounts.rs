//! The check of ServiceAccount tokens against a small stand-in for the Kubernetes API on
//! loopback (HTTPS with its own CA): what is cached and for how long, label lookups, the
//! server's own token read for every request, and an API that refuses the server.
//!
//! The real apiserver is used by `tests/tests/serviceaccount_tokens.rs`; this one runs
//! everywhere and counts the requests the server makes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use datamover_server::access::Role;
use datamover_server::metrics::Metrics;
use datamover_server::sa_auth::{Refusal, ServiceAccountAuth};
use datamover_server::sa_clients::ServiceAccountClients;
use datamover_server::token_review::{KubeApi, KubeSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AUDIENCE: &str = "dm-test";

/// What the stand-in API knows and has seen.
#[derive(Default)]
struct State {
    /// The server's token it accepts.
    server_token: Mutex<String>,
    /// ServiceAccounts (`ns/name`) that exist, with their labels.
    accounts: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// Answer 403 to everything.
    forbid: AtomicBool,
    reviews: AtomicUsize,
    lookups: AtomicUsize,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A token for `ns/name` with these audiences and expiry (signed by nobody: the stand-in
/// trusts its claims, as the real API trusts its signature).
fn token(ns: &str, name: &str, aud: &[&str], exp: i64) -> String {
    let claims = serde_json::json!({
        "aud": aud, "exp": exp, "sub": format!("system:serviceaccount:{ns}:{name}"),
        "jti": rand_id(),
    });
    format!(
        "{}.{}.sig",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn rand_id() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed) as u64
}

fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap_or_default();
    URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The answer of the stand-in API to one request: (status, JSON body).
fn answer(state: &State, method: &str, path: &str, auth: &str, body: &[u8]) -> (u16, String) {
    let forbidden = |what: &str| {
        (
            403,
            serde_json::json!({"kind": "Status", "message": format!("{what} is forbidden")})
                .to_string(),
        )
    };
    let expected = format!("Bearer {}", state.server_token.lock().unwrap());
    if auth != expected {
        return (401, r#"{"kind":"Status","message":"Unauthorized"}"#.into());
    }
    if state.forbid.load(Ordering::Relaxed) {
        return forbidden("tokenreviews.authentication.k8s.io");
    }
    if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        state.reviews.fetch_add(1, Ordering::Relaxed);
        let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let c = claims(req["spec"]["token"].as_str().unwrap_or_default());
        let sub = c["sub"].as_str().unwrap_or_default().to_string();
        let key = sub
            .strip_prefix("system:serviceaccount:")
            .unwrap_or_default()
            .replacen(':', "/", 1);
        let wanted: Vec<String> =
            serde_json::from_value(req["spec"]["audiences"].clone()).unwrap_or_default();
        let has: Vec<String> = serde_json::from_value(c["aud"].clone()).unwrap_or_default();
        let common: Vec<&String> = wanted.iter().filter(|a| has.contains(a)).collect();
        let status = if !state.accounts.lock().unwrap().contains_key(&key) {
            serde_json::json!({"user": {}, "error": format!("[invalid bearer token, serviceaccounts \"{key}\" not found]")})
        } else if common.is_empty() {
            serde_json::json!({"user": {}, "error": "[invalid bearer token, token audiences are invalid]"})
        } else {
            serde_json::json!({"authenticated": true, "user": {"username": sub, "uid": "u"}, "audiences": common})
        };
        return (201, serde_json::json!({"status": status}).to_string());
    }
    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((ns, name)) = rest.split_once("/serviceaccounts/")
        && method == "GET"
    {
        state.lookups.fetch_add(1, Ordering::Relaxed);
        return match state.accounts.lock().unwrap().get(&format!("{ns}/{name}")) {
            Some(labels) => (
                200,
                serde_json::json!({"metadata": {"name": name, "labels": labels}}).to_string(),
            ),
            None => (404, r#"{"kind":"Status","message":"not found"}"#.into()),
        };
    }
    (404, "{}".into())
}

/// Serves one request per connection (and says so, so the client opens a new one).
async fn serve(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    state: Arc<State>,
) -> std::io::Result<()> {
    let mut s = tls;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (
        first.next().unwrap_or_default(),
        first.next().unwrap_or_default(),
    );
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let length: usize = header("content-length").parse().unwrap_or(0);
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..buf.len().min(head_end + length)];
    let (status, out) = answer(&state, method, path, &header("authorization"), body);
    let resp = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
        out.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// Starts the stand-in API; its state and a service-account directory for the server.
async fn fake_api() -> (Arc<State>, KubeSettings, tempfile::TempDir) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(State::default());
    *state.server_token.lock().unwrap() = "server-token-1".into();
    let st = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, st) = (acceptor.clone(), Arc::clone(&st));
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = serve(tls, st).await;
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("token"), "server-token-1\n").unwrap();
    let settings = KubeSettings {
        api: Some(format!("https://127.0.0.1:{port}")),
        sa_dir: dir.path().to_path_buf(),
    };
    (state, settings, dir)
}

fn auth(settings: &KubeSettings, entries: &str) -> ServiceAccountAuth {
    ServiceAccountAuth::new(
        ServiceAccountClients::parse(entries.as_bytes(), Some(AUDIENCE.into())),
        KubeApi::new(settings),
        Arc::new(Metrics::new().unwrap()),
    )
}

fn add_account(state: &State, key: &str, labels: &[(&str, &str)]) {
    state.accounts.lock().unwrap().insert(
        key.into(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
}

#[tokio::test]
async fn answers_are_cached_within_their_bounds() {
    let (state, settings, sa_dir) = fake_api().await;
    let a = auth(
        &settings,
        r#"[{"namespace": "shop", "name": "backup", "tenant": "shop", "role": "append"}]"#,
    );
    add_account(&state, "shop/backup", &[]);
    let reviews = || state.reviews.load(Ordering::Relaxed);

    // Confirmed once, then from the cache.
    let t = token("shop", "backup", &[AUDIENCE], now() + 600);
    let ok = a.authenticate(&t).await.unwrap();
    assert_eq!(ok.account.username(), "system:serviceaccount:shop:backup");
    assert_eq!((ok.tenant.as_str(), ok.role), ("shop", Role::Append));
    a.authenticate(&t).await.unwrap();
    assert_eq!(reviews(), 1);

    // The server's own token is read for every request (the kubelet rotates it).
    *state.server_token.lock().unwrap() = "server-token-2".into();
    std::fs::write(sa_dir.path().join("token"), "server-token-2").unwrap();
    let t2 = token("shop", "backup", &[AUDIENCE], now() + 600);
    a.authenticate(&t2).await.unwrap();
    assert_eq!(reviews(), 2);

    // A deleted account: refused once the positive answer is older than 10 s.
    state.accounts.lock().unwrap().clear();
    let deleted = Instant::now();
    let refusal = loop {
        match a.authenticate(&t).await {
            Ok(_) => {
                assert!(
                    deleted.elapsed() < Duration::from_secs(11),
                    "still accepted"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(r) => break r,
        }
    };
    assert!(
        deleted.elapsed() >= Duration::from_secs(8),
        "the positive answer was kept for about 10 s: {:?}",
        deleted.elapsed()
    );
    assert!(
        matches!(&refusal, Refusal::Unauthenticated(e) if e.contains("serviceaccounts \"shop/backup\" not found")),
        "{refusal}"
    );

    // A negative answer is kept for 2 s: the account comes back, the token works after.
    let before = reviews();
    add_account(&state, "shop/backup", &[]);
    assert!(a.authenticate(&t).await.is_err(), "cached refusal");
    assert_eq!(reviews(), before);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    a.authenticate(&t).await.unwrap();
    assert_eq!(reviews(), before + 1);

    // A positive answer never outlives the token: expired ones are refused from the
    // claims, without asking.
    let short = token("shop", "backup", &[AUDIENCE], now() + 2);
    a.authenticate(&short).await.unwrap();
    let before = reviews();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(matches!(
        a.authenticate(&short).await,
        Err(Refusal::Expired { .. })
    ));
    assert_eq!(reviews(), before);
}

#[tokio::test]
async fn selectors_read_labels_and_removed_entries_revoke() {
    let (state, settings, _dir) = fake_api().await;
    let entries = r#"[
        {"namespace": "shop", "selector": {"matchLabels": {"restore": "yes"}}, "tenant": "shop", "role": "read"},
        {"namespace": "shop", "name": "web", "tenant": "web", "role": "full"}
    ]"#;
    let a = auth(&settings, entries);
    add_account(&state, "shop/db", &[("restore", "yes")]);
    add_account(&state, "shop/web", &[]);
    add_account(&state, "shop/other", &[("restore", "no")]);

    let t = token("shop", "db", &[AUDIENCE], now() + 600);
    let ok = a.authenticate(&t).await.unwrap();
    assert_eq!((ok.tenant.as_str(), ok.role), ("shop", Role::Read));
    assert_eq!(ok.account.labels.as_ref().unwrap()["restore"], "yes");
    a.authenticate(&t).await.unwrap();
    assert_eq!(state.lookups.load(Ordering::Relaxed), 1, "labels cached");
    // A named entry needs no labels.
    a.authenticate(&token("shop", "web", &[AUDIENCE], now() + 600))
        .await
        .unwrap();
    assert_eq!(state.lookups.load(Ordering::Relaxed), 1);
    // Labels that do not match: not listed, named.
    let r = a
        .authenticate(&token("shop", "other", &[AUDIENCE], now() + 600))
        .await
        .unwrap_err();
    assert_eq!(
        r.to_string().split(':').next(),
        Some("ServiceAccount shop/other is not allowed to connect to this server")
    );

    // The identity follows the file: the entry's role changes, then it goes.
    assert_eq!(a.current(&ok.account), Some(("shop".into(), Role::Read)));
    a.replace(ServiceAccountClients::parse(
        entries.replace("\"read\"", "\"full\"").as_bytes(),
        Some(AUDIENCE.into()),
    ));
    assert_eq!(a.current(&ok.account), Some(("shop".into(), Role::Full)));
    a.replace(ServiceAccountClients::parse(b"[]", Some(AUDIENCE.into())));
    assert_eq!(a.current(&ok.account), None);
    assert_eq!(
        a.authenticate(&t).await.unwrap_err(),
        Refusal::NotConfigured
    );
}

#[tokio::test]
async fn an_api_that_refuses_the_server_points_at_rbac() {
    let (state, settings, _dir) = fake_api().await;
    let a = auth(
        &settings,
        r#"[{"namespace": "shop", "tenant": "shop", "role": "full"}]"#,
    );
    add_account(&state, "shop/x", &[]);
    state.forbid.store(true, Ordering::Relaxed);
    let t = token("shop", "x", &[AUDIENCE], now() + 600);
    let r = a.authenticate(&t).await.unwrap_err();
    assert_eq!(r, Refusal::Unavailable("refused with 403".into()));
    let status = r.to_status();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("system:auth-delegator"));
    // Not cached: once the RBAC is fixed, the next call is confirmed.
    state.forbid.store(false, Ordering::Relaxed);
    a.authenticate(&t).await.unwrap();
    // A wrong audience never reaches the API.
    let before = state.reviews.load(Ordering::Relaxed);
    let r = a
        .authenticate(&token("shop", "x", &["other"], now() + 600))
        .await
        .unwrap_err();
    assert!(matches!(r, Refusal::WrongAudience { .. }), "{r}");
    assert_eq!(state.reviews.load(Ordering::Relaxed), before);
}
