//! ServiceAccount tokens as client credentials.
//!
//! A client in a pod may present a projected ServiceAccount token instead of a client
//! credential (`authorization: Bearer <token>` with `x-datamover-auth: serviceaccount`,
//! and no client id). It is accepted only when
//!
//! 1. this server has Kubernetes API access ([`crate::token_review`]) and an audience and
//!    allowed ServiceAccounts ([`crate::sa_clients`]);
//! 2. the token, read as a JWT, is not expired and names the server's audience (checked
//!    first, only to refuse early with a precise reason: nothing is trusted from it);
//! 3. the Kubernetes TokenReview API authenticates it for that audience, as
//!    `system:serviceaccount:<namespace>:<name>` (this is the client id in logs, metrics
//!    and snapshots);
//! 4. an entry of the allowed ServiceAccounts admits that account: its tenant and role
//!    are the client's.
//!
//! Answers of TokenReview are cached by a keyed hash of audience and token, positive ones
//! for [`POSITIVE_TTL`] (never past the token's expiry) and negative ones for
//! [`NEGATIVE_TTL`], so a deleted ServiceAccount or pod loses access within
//! [`POSITIVE_TTL`]; an unreachable API is not cached. Step 4 runs on every call against
//! the current entries, so an entry removed from the file revokes at once (and ends calls
//! in flight, as for credential clients).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;
use tonic::Status;

use crate::access::Role;
use crate::metrics::Metrics;
use crate::review_cache::{MAX_ENTRIES, TtlCache};
use crate::sa_clients::{Labels, Lookup, ServiceAccountClients};
use crate::token_review::{ApiError, KubeApi, NotEnabled};

/// How long a positive TokenReview answer is trusted.
pub const POSITIVE_TTL: Duration = Duration::from_secs(10);
/// How long a negative TokenReview answer is kept.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// The largest token looked at (projected tokens are about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The ServiceAccount a token was confirmed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub namespace: String,
    pub name: String,
    /// Its labels, when an entry with a selector needed them.
    pub labels: Option<Labels>,
}

impl Account {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// A token client that may connect.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub account: Arc<Account>,
    pub tenant: String,
    pub role: Role,
}

/// Why a ServiceAccount token was refused. Messages say what to do, never the token.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Refusal {
    #[error(
        "ServiceAccount tokens are not enabled on this server: no Kubernetes API access ({0}); use a client credential in /etc/client-secret instead"
    )]
    NotEnabled(String),
    #[error(
        "ServiceAccount tokens are not accepted by this server: its DatamoverServer lists no serviceAccountClients (or publishes no token audience); add this ServiceAccount to spec.serviceAccountClients, or use a client credential"
    )]
    NotConfigured,
    #[error(
        "the ServiceAccount token is not a Kubernetes ServiceAccount token ({0}): DATAMOVER_TOKEN_FILE must hold a projected ServiceAccount token"
    )]
    Malformed(String),
    #[error(
        "the ServiceAccount token expired {ago_s} s ago: the kubelet refreshes a projected token well before it expires, so check that DATAMOVER_TOKEN_FILE is a projected serviceAccountToken volume (not a copy)"
    )]
    Expired { ago_s: u64 },
    #[error(
        "the ServiceAccount token is for audience {presented}, but this server accepts only '{expected}': project the token with audience '{expected}' (status.serverInfo.tokenAudience of the DatamoverServer)"
    )]
    WrongAudience { presented: String, expected: String },
    #[error(
        "Kubernetes did not authenticate the ServiceAccount token: {0} (its ServiceAccount or pod may have been deleted, or the token is not genuine)"
    )]
    Unauthenticated(String),
    #[error("the token belongs to '{0}', which is not a ServiceAccount")]
    NotServiceAccount(String),
    #[error(
        "ServiceAccount {namespace}/{name} is not allowed to connect to this server: add it to spec.serviceAccountClients of the DatamoverServer"
    )]
    NotListed { namespace: String, name: String },
    #[error("ServiceAccount {namespace}/{name} no longer exists")]
    Gone { namespace: String, name: String },
    /// The message for the client; the detail is logged by the server.
    #[error(
        "the server cannot check the ServiceAccount token now: the Kubernetes TokenReview API is unavailable or refused it ({0}); retry, and ask the operator to check the server's RBAC: its ServiceAccount needs the ClusterRole system:auth-delegator (and get on serviceaccounts for label selectors), see the server log"
    )]
    Unavailable(String),
}

impl Refusal {
    /// The `reason` label of the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotEnabled(_) => "not_enabled",
            Refusal::NotConfigured => "not_configured",
            Refusal::Malformed(_) => "malformed",
            Refusal::Expired { .. } => "expired",
            Refusal::WrongAudience { .. } => "wrong_audience",
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::NotServiceAccount(_) => "not_serviceaccount",
            Refusal::NotListed { .. } => "not_listed",
            Refusal::Gone { .. } => "gone",
            Refusal::Unavailable(_) => "unavailable",
        }
    }

    pub fn to_status(&self) -> Status {
        match self {
            Refusal::Unavailable(_) => Status::unavailable(self.to_string()),
            Refusal::NotListed { .. } => Status::permission_denied(self.to_string()),
            _ => Status::unauthenticated(self.to_string()),
        }
    }
}

/// What the (unverified) claims of a JWT say; used only to refuse early.
#[derive(Deserialize, Default)]
struct Claims {
    #[serde(default)]
    aud: Audience,
    exp: Option<i64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Default for Audience {
    fn default() -> Self {
        Audience::Many(Vec::new())
    }
}

impl Audience {
    fn list(&self) -> Vec<String> {
        match self {
            Audience::One(a) => vec![a.clone()],
            Audience::Many(v) => v.clone(),
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Refuses a token that is not a JWT, expired, or for another audience; else how long
/// it stays valid.
fn precheck(token: &str, audience: &str, now: i64) -> Result<Option<Duration>, Refusal> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::Malformed("it is too long".into()));
    }
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed("it is not a JWT".into()));
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| Refusal::Malformed("its claims are not base64url".into()))?;
    let claims: Claims = serde_json::from_slice(&raw)
        .map_err(|_| Refusal::Malformed("its claims are not JSON".into()))?;
    if let Some(exp) = claims.exp
        && exp <= now
    {
        return Err(Refusal::Expired {
            ago_s: (now - exp) as u64,
        });
    }
    let auds = claims.aud.list();
    if !auds.iter().any(|a| a == audience) {
        return Err(Refusal::WrongAudience {
            presented: describe_audiences(&auds),
            expected: audience.to_string(),
        });
    }
    Ok(claims
        .exp
        .map(|exp| Duration::from_secs((exp - now) as u64)))
}

fn describe_audiences(auds: &[String]) -> String {
    if auds.is_empty() {
        "(none)".into()
    } else {
        auds.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `system:serviceaccount:<namespace>:<name>` → (namespace, name).
pub fn parse_username(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

/// A cached TokenReview answer.
#[derive(Debug, Clone)]
enum Reviewed {
    Valid {
        username: String,
        audiences: Vec<String>,
    },
    Invalid(String),
}

/// Checks ServiceAccount tokens against the current allowed ServiceAccounts.
pub struct ServiceAccountAuth {
    clients: RwLock<Arc<ServiceAccountClients>>,
    api: Result<KubeApi, NotEnabled>,
    reviews: TtlCache<Reviewed>,
    labels: TtlCache<Option<Labels>>,
    metrics: Arc<Metrics>,
}

impl ServiceAccountAuth {
    pub fn new(
        clients: ServiceAccountClients,
        api: Result<KubeApi, NotEnabled>,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics
            .serviceaccount_clients
            .set(clients.entries.len() as i64);
        ServiceAccountAuth {
            clients: RwLock::new(Arc::new(clients)),
            api,
            reviews: TtlCache::new(MAX_ENTRIES),
            labels: TtlCache::new(MAX_ENTRIES),
            metrics,
        }
    }

    /// The Kubernetes API, or why there is none.
    pub fn api(&self) -> Result<&KubeApi, &NotEnabled> {
        self.api.as_ref()
    }

    pub fn clients(&self) -> Arc<ServiceAccountClients> {
        self.clients
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    /// Replaces the allowed ServiceAccounts; whether anything changed.
    pub fn replace(&self, clients: ServiceAccountClients) -> bool {
        if *self.clients() == clients {
            return false;
        }
        self.metrics
            .serviceaccount_clients
            .set(clients.entries.len() as i64);
        if let Ok(mut w) = self.clients.write() {
            *w = Arc::new(clients);
        }
        // Labels may matter to new selectors: look them up afresh.
        self.labels.clear();
        true
    }

    /// The tenant and role `account` has now, if it may still connect.
    pub fn current(&self, account: &Account) -> Option<(String, Role)> {
        match self
            .clients()
            .lookup(&account.namespace, &account.name, account.labels.as_ref())
        {
            Lookup::Allowed(e) => Some((e.tenant.clone(), e.role)),
            _ => None,
        }
    }

    /// Checks a presented token; refusals are logged and counted.
    pub async fn authenticate(&self, token: &str) -> Result<Admitted, Refusal> {
        let result = self.check(token).await;
        match &result {
            Ok(a) => {
                tracing::debug!(client = %a.account.username(), tenant = %a.tenant, role = %a.role, "ServiceAccount token accepted")
            }
            Err(r) => {
                self.metrics
                    .serviceaccount_refusals
                    .with_label_values(&[r.reason()])
                    .inc();
                tracing::warn!(reason = r.reason(), refusal = %r, "ServiceAccount token refused");
            }
        }
        result
    }

    async fn check(&self, token: &str) -> Result<Admitted, Refusal> {
        let api = self
            .api
            .as_ref()
            .map_err(|e| Refusal::NotEnabled(e.to_string()))?;
        let clients = self.clients();
        let audience = match &clients.audience {
            Some(a) if !clients.is_empty() => a.clone(),
            _ => return Err(Refusal::NotConfigured),
        };
        let key = self.reviews.key(&[audience.as_bytes(), token.as_bytes()]);
        let reviewed = match self.reviews.get(&key) {
            Some(r) => {
                self.metrics.token_review_cache_hits.inc();
                r
            }
            None => {
                let lifetime = precheck(token, &audience, unix_now())?;
                let r = self.review(api, token, &audience).await?;
                let ttl = match &r {
                    Reviewed::Valid { .. } => {
                        lifetime.map_or(POSITIVE_TTL, |l| l.min(POSITIVE_TTL))
                    }
                    Reviewed::Invalid(_) => NEGATIVE_TTL,
                };
                self.reviews.insert(key, r.clone(), ttl);
                r
            }
        };
        let username = match reviewed {
            Reviewed::Invalid(e) => return Err(Refusal::Unauthenticated(e)),
            Reviewed::Valid {
                audiences,
                username,
            } => {
                if !audiences.contains(&audience) {
                    return Err(Refusal::WrongAudience {
                        presented: describe_audiences(&audiences),
                        expected: audience,
                    });
                }
                username
            }
        };
        let (namespace, name) = parse_username(&username)
            .ok_or_else(|| Refusal::NotServiceAccount(username.clone()))?;
        let not_listed = || Refusal::NotListed {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let (entry, labels) = match clients.lookup(namespace, name, None) {
            Lookup::Allowed(e) => (e, None),
            Lookup::NotListed => return Err(not_listed()),
            Lookup::NeedLabels => {
                let labels =
                    self.labels_of(api, namespace, name)
                        .await?
                        .ok_or_else(|| Refusal::Gone {
                            namespace: namespace.to_string(),
                            name: name.to_string(),
                        })?;
                match clients.lookup(namespace, name, Some(&labels)) {
                    Lookup::Allowed(e) => (e, Some(labels)),
                    _ => return Err(not_listed()),
                }
            }
        };
        Ok(Admitted {
            account: Arc::new(Account {
                namespace: namespace.to_string(),
                name: name.to_string(),
                labels,
            }),
            tenant: entry.tenant.clone(),
            role: entry.role,
        })
    }

    /// Asks TokenReview; counts and times it. An unreachable API is an error, not an answer.
    async fn review(
        &self,
        api: &KubeApi,
        token: &str,
        audience: &str,
    ) -> Result<Reviewed, Refusal> {
        let started = Instant::now();
        let answer = api.review(token, audience).await;
        self.metrics
            .token_review_seconds
            .observe(started.elapsed().as_secs_f64());
        let result = match &answer {
            Ok(r) if r.authenticated => "authenticated",
            Ok(_) => "unauthenticated",
            Err(_) => "error",
        };
        self.metrics
            .token_reviews
            .with_label_values(&[result])
            .inc();
        match answer {
            Ok(r) if r.authenticated => {
                tracing::info!(client = %r.user.username, elapsed_ms = started.elapsed().as_millis() as u64, "TokenReview confirmed a ServiceAccount token");
                Ok(Reviewed::Valid {
                    username: r.user.username,
                    audiences: r.audiences,
                })
            }
            Ok(r) => Ok(Reviewed::Invalid(if r.error.is_empty() {
                "the token is not valid".into()
            } else {
                r.error
            })),
            Err(e) => Err(unavailable(api, &e)),
        }
    }

    /// A ServiceAccount's labels (`None`: it does not exist), cached like reviews.
    async fn labels_of(
        &self,
        api: &KubeApi,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Labels>, Refusal> {
        let key = self.labels.key(&[namespace.as_bytes(), name.as_bytes()]);
        if let Some(l) = self.labels.get(&key) {
            return Ok(l);
        }
        let labels = api
            .service_account_labels(namespace, name)
            .await
            .map_err(|e| unavailable(api, &e))?;
        let ttl = if labels.is_some() {
            POSITIVE_TTL
        } else {
            NEGATIVE_TTL
        };
        self.labels.insert(key, labels.clone(), ttl);
        Ok(labels)
    }
}

/// Logs what went wrong with the API (the detail stays in the server's log).
fn unavailable(api: &KubeApi, e: &ApiError) -> Refusal {
    tracing::error!(api = %api.address(), error = %e, "Kubernetes API request failed: check the server's network access to the API and its RBAC (ClusterRole system:auth-delegator; get on serviceaccounts for label selectors)");
    let short = match e {
        ApiError::Unreachable { .. } => "no answer".to_string(),
        ApiError::Refused { status, .. } => format!("refused with {status}"),
        ApiError::Failed { status, .. } => format!("answered {status}"),
        ApiError::OwnToken { .. } => "the server's own token is unreadable".to_string(),
        ApiError::BadAnswer(_) => "an unexpected answer".to_string(),
    };
    Refusal::Unavailable(short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn precheck_names_the_reason() {
        let now = 1_000_000;
        assert_eq!(
            precheck(&jwt(r#"{"aud":["dm"],"exp":1000600}"#), "dm", now).unwrap(),
            Some(Duration::from_secs(600))
        );
        assert_eq!(precheck(&jwt(r#"{"aud":"dm"}"#), "dm", now).unwrap(), None);
        assert_eq!(
            precheck(&jwt(r#"{"aud":["dm"],"exp":999990}"#), "dm", now).unwrap_err(),
            Refusal::Expired { ago_s: 10 }
        );
        let e = precheck(&jwt(r#"{"aud":["a","b"],"exp":2000000}"#), "dm", now).unwrap_err();
        assert_eq!(
            e,
            Refusal::WrongAudience {
                presented: "'a', 'b'".into(),
                expected: "dm".into()
            }
        );
        assert!(
            e.to_string()
                .contains("project the token with audience 'dm'")
        );
        assert!(matches!(
            precheck("opaque-token", "dm", now),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            precheck("a.!!!.c", "dm", now),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            precheck(&jwt("[1]"), "dm", now),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn usernames() {
        assert_eq!(
            parse_username("system:serviceaccount:shop:db-backup"),
            Some(("shop", "db-backup"))
        );
        assert_eq!(parse_username("system:serviceaccount:shop"), None);
        assert_eq!(parse_username("system:serviceaccount::x"), None);
        assert_eq!(parse_username("alice"), None);
        let a = Account {
            namespace: "shop".into(),
            name: "db".into(),
            labels: None,
        };
        assert_eq!(a.username(), "system:serviceaccount:shop:db");
    }

    #[test]
    fn refusals_map_to_codes_and_never_say_connect() {
        let r = Refusal::Unavailable("no answer".into());
        let s = r.to_status();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("system:auth-delegator"));
        // The client reads "connect"/"transport" in UNAVAILABLE as a lost connection.
        assert!(!s.message().contains("connect") && !s.message().contains("transport"));
        let s = Refusal::NotListed {
            namespace: "a".into(),
            name: "b".into(),
        }
        .to_status();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert!(s.message().contains("ServiceAccount a/b is not allowed"));
        let s = Refusal::NotEnabled("x".into()).to_status();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().starts_with(
            "ServiceAccount tokens are not enabled on this server: no Kubernetes API access"
        ));
    }

    fn auth(json: &str, api: Result<KubeApi, NotEnabled>) -> ServiceAccountAuth {
        ServiceAccountAuth::new(
            ServiceAccountClients::parse(json.as_bytes(), Some("dm".into())),
            api,
            Arc::new(Metrics::new().unwrap()),
        )
    }

    #[tokio::test]
    async fn refused_before_any_review() {
        let a = auth(
            r#"[{"namespace":"n","tenant":"t","role":"read"}]"#,
            Err(NotEnabled::NoAddress),
        );
        let r = a.authenticate("x.y.z").await.unwrap_err();
        assert_eq!(r.reason(), "not_enabled");
        // An API that is configured but down: refused as unavailable, not cached.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "server-token").unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert.pem()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let api = KubeApi::new(&crate::token_review::KubeSettings {
            api: Some(format!("https://127.0.0.1:{port}")),
            sa_dir: dir.path().to_path_buf(),
        })
        .unwrap();
        let a = auth(r#"[]"#, Ok(api.clone()));
        assert_eq!(
            a.authenticate("x").await.unwrap_err(),
            Refusal::NotConfigured
        );
        let a = auth(r#"[{"namespace":"n","tenant":"t","role":"read"}]"#, Ok(api));
        let token = jwt(r#"{"aud":["other"],"exp":99999999999}"#);
        assert_eq!(
            a.authenticate(&token).await.unwrap_err().reason(),
            "wrong_audience"
        );
        let token = jwt(r#"{"aud":["dm"],"exp":99999999999}"#);
        let r = a.authenticate(&token).await.unwrap_err();
        assert_eq!(r.reason(), "unavailable", "{r}");
        assert!(a.reviews.is_empty(), "an unreachable API is not cached");
        assert_eq!(
            a.metrics.token_reviews.with_label_values(&["error"]).get(),
            1
        );
        assert_eq!(
            a.metrics
                .serviceaccount_refusals
                .with_label_values(&["wrong_audience"])
                .get(),
            1
        );
    }

    #[test]
    fn current_follows_the_file() {
        let a = auth(
            r#"[{"namespace":"n","tenant":"t","role":"read"}]"#,
            Err(NotEnabled::NoAddress),
        );
        let acc = Account {
            namespace: "n".into(),
            name: "x".into(),
            labels: None,
        };
        assert_eq!(a.current(&acc), Some(("t".into(), Role::Read)));
        assert!(!a.replace(ServiceAccountClients::parse(
            br#"[{"namespace":"n","tenant":"t","role":"read"}]"#,
            Some("dm".into())
        )));
        assert!(a.replace(ServiceAccountClients::parse(
            br#"[{"namespace":"n","tenant":"t","role":"full"}]"#,
            Some("dm".into())
        )));
        assert_eq!(a.current(&acc), Some(("t".into(), Role::Full)));
        assert!(a.replace(ServiceAccountClients::default()));
        assert_eq!(a.current(&acc), None);
    }
}
