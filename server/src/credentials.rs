//! Client credentials: `/etc/client_credentials/<client_id>`, one file per client, holding
//! a token or a PHC hash (`$argon2id$…`) of it; and the check of a caller against them,
//! or, for a caller that presents a Kubernetes ServiceAccount token
//! (`x-datamover-auth: serviceaccount`), against the allowed ServiceAccounts
//! ([`crate::sa_auth`]).
//!
//! The set is swapped whole on reload. Every swap (of credentials, access rules or allowed
//! ServiceAccounts) bumps a generation that in-flight streams watch, so a revoked or
//! rotated credential stops them at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tonic::Status;

use crate::access::{Access, Op, Role};
use crate::sa_auth::{Account, ServiceAccountAuth};
use crate::sa_clients::ServiceAccountClients;

/// A client's stored credential.
#[derive(Clone)]
pub enum Credential {
    Token(Vec<u8>),
    /// A PHC string; verified with Argon2, successes cached by a hash of the token.
    Phc(String),
}

impl Credential {
    pub fn parse(content: &[u8]) -> Option<Credential> {
        let trimmed = trim(content);
        if trimmed.is_empty() {
            return None;
        }
        if trimmed.starts_with(b"$argon2") {
            let phc = std::str::from_utf8(trimmed).ok()?;
            if let Err(e) = phc_cost_ok(phc) {
                tracing::warn!("a PHC credential is not loaded: {e}");
                return None;
            }
            return Some(Credential::Phc(phc.to_string()));
        }
        Some(Credential::Token(trimmed.to_vec()))
    }

    /// Identifies the stored credential (to notice rotation), never logged.
    fn fingerprint(&self) -> [u8; 32] {
        match self {
            Credential::Token(t) => *blake3::hash(t).as_bytes(),
            Credential::Phc(p) => *blake3::hash(p.as_bytes()).as_bytes(),
        }
    }
}

/// The most an Argon2 PHC credential may cost to check: memory in KiB (`m`), passes
/// (`t`) and lanes (`p`). A file asking for more (a typo, or a file written to make the
/// server allocate gigabytes at every unknown token) is not loaded.
const PHC_MAX_MEMORY_KIB: u32 = 256 * 1024;
const PHC_MAX_PASSES: u32 = 32;
const PHC_MAX_LANES: u32 = 16;

/// Whether a PHC string parses and its cost parameters are within the caps above.
pub fn phc_cost_ok(phc: &str) -> Result<(), String> {
    let h = argon2::password_hash::PasswordHash::new(phc).map_err(|e| {
        format!(
            "not a valid PHC string ({e}); write it with `argon2 <salt> -id -e` as the README shows"
        )
    })?;
    for (name, max) in [
        ("m", PHC_MAX_MEMORY_KIB),
        ("t", PHC_MAX_PASSES),
        ("p", PHC_MAX_LANES),
    ] {
        if let Some(v) = h.params.get_decimal(name)
            && v > max
        {
            return Err(format!(
                "its cost parameter {name}={v} is over {max}; hash the token again with a lower cost"
            ));
        }
    }
    Ok(())
}

/// Strips surrounding whitespace (a trailing newline from `echo` is common).
pub fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// A client id is a file name: letters, digits, `.`, `_`, `-`, not starting with `.`.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Reads the credentials directory. Empty files and bad names are skipped with a warning.
pub fn load_dir(dir: &Path) -> HashMap<String, Credential> {
    let mut out = HashMap::new();
    for (name, content) in crate::settings::read_mount(dir) {
        if !valid_client_id(&name) {
            tracing::warn!(file = %name, "ignoring credential file: not a valid client id");
            continue;
        }
        match Credential::parse(&content) {
            Some(c) => {
                out.insert(name, c);
            }
            None => tracing::warn!(client = %name, "ignoring empty credential file"),
        }
    }
    out
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The client id, or `system:serviceaccount:<namespace>:<name>` for a token client.
    pub client_id: String,
    pub tenant: String,
    pub role: Role,
    proof: Proof,
}

/// What authenticated a caller.
#[derive(Debug, Clone)]
enum Proof {
    /// This stored credential (rotation invalidates it).
    Credential([u8; 32]),
    /// A ServiceAccount token, confirmed by TokenReview for this account.
    ServiceAccount(Arc<Account>),
}

impl Identity {
    /// PERMISSION_DENIED unless the role allows `op`.
    pub fn require(&self, op: Op) -> Result<(), Status> {
        if self.role.allows(op) {
            return Ok(());
        }
        let (what, needs) = match op {
            Op::Backup => ("back up", "append or full"),
            Op::Restore => ("restore", "read or full"),
            Op::Delete => ("delete snapshots", "full"),
            Op::List => ("list snapshots", "read"),
            Op::Verify => ("verify snapshots", "read or full"),
            Op::Admin => ("run maintenance or act on every tenant", "admin"),
        };
        Err(Status::permission_denied(format!(
            "client '{}' has role {} and may not {what}; ask the operator for role {needs} (config key 'roles' of the DatamoverServer)",
            self.client_id, self.role
        )))
    }
}

/// A successful PHC check: (fingerprint of the stored hash, BLAKE3 of the token).
type PhcProof = ([u8; 32], [u8; 32]);

/// Slows down peers that keep presenting wrong credentials.
#[derive(Default)]
pub struct FailureLimiter {
    peers: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Free failures before slowing down; entries are forgotten after this long.
const FREE_FAILURES: u32 = 3;
const FAILURE_MEMORY: Duration = Duration::from_secs(600);
const MAX_PEERS: usize = 10_000;

impl FailureLimiter {
    /// Records a failure; returns how long to delay the answer.
    pub fn failed(&self, peer: IpAddr) -> Duration {
        let Ok(mut peers) = self.peers.lock() else {
            return Duration::ZERO;
        };
        if peers.len() >= MAX_PEERS {
            peers.retain(|_, (_, t)| t.elapsed() < FAILURE_MEMORY);
            if peers.len() >= MAX_PEERS {
                peers.clear();
            }
        }
        let e = peers.entry(peer).or_insert((0, Instant::now()));
        if e.1.elapsed() > FAILURE_MEMORY {
            e.0 = 0;
        }
        e.0 += 1;
        e.1 = Instant::now();
        Self::delay(e.0)
    }

    /// The delay after `failures` failures in a row: none for the first few, then doubling
    /// from 100 ms up to 5 s.
    pub fn delay(failures: u32) -> Duration {
        if failures <= FREE_FAILURES {
            return Duration::ZERO;
        }
        let exp = (failures - FREE_FAILURES - 1).min(6);
        Duration::from_millis(100 << exp).min(Duration::from_secs(5))
    }

    pub fn succeeded(&self, peer: IpAddr) {
        if let Ok(mut peers) = self.peers.lock() {
            peers.remove(&peer);
        }
    }
}

struct Clients {
    creds: HashMap<String, Credential>,
    access: Access,
}

/// The current clients, tenants and roles.
pub struct CredentialStore {
    current: RwLock<Arc<Clients>>,
    phc_verified: RwLock<HashMap<String, PhcProof>>,
    generation: tokio::sync::watch::Sender<u64>,
    limiter: FailureLimiter,
    accounts: Option<Arc<ServiceAccountAuth>>,
}

const UNAUTHENTICATED: &str = "the server does not accept this client's credential: check that /etc/client-secret/<client_id> holds the credential the server has for that client id in its client_credentials secret (it may have been rotated or revoked)";

/// What a reload changed (client ids only, never credentials).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub rotated: Vec<String>,
    pub access_changed: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.rotated.is_empty()
            && !self.access_changed
    }
}

impl CredentialStore {
    pub fn new(creds: HashMap<String, Credential>, access: Access) -> Self {
        CredentialStore {
            current: RwLock::new(Arc::new(Clients { creds, access })),
            phc_verified: RwLock::new(HashMap::new()),
            generation: tokio::sync::watch::channel(0).0,
            limiter: FailureLimiter::default(),
            accounts: None,
        }
    }

    /// Also accepts ServiceAccount tokens, checked by `accounts`.
    pub fn with_service_accounts(mut self, accounts: Arc<ServiceAccountAuth>) -> Self {
        self.accounts = Some(accounts);
        self
    }

    /// Replaces the allowed ServiceAccounts; whether anything changed.
    pub fn replace_service_accounts(&self, clients: ServiceAccountClients) -> bool {
        let changed = self.accounts.as_ref().is_some_and(|a| a.replace(clients));
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
        changed
    }

    fn clients(&self) -> Arc<Clients> {
        self.current
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    /// Replaces clients and access rules; returns what changed.
    pub fn replace(&self, creds: HashMap<String, Credential>, access: Access) -> Changes {
        let old = self.clients();
        let mut c = Changes {
            added: creds
                .keys()
                .filter(|k| !old.creds.contains_key(*k))
                .cloned()
                .collect(),
            removed: old
                .creds
                .keys()
                .filter(|k| !creds.contains_key(*k))
                .cloned()
                .collect(),
            rotated: creds
                .iter()
                .filter(|(k, v)| {
                    old.creds
                        .get(*k)
                        .is_some_and(|o| o.fingerprint() != v.fingerprint())
                })
                .map(|(k, _)| k.clone())
                .collect(),
            access_changed: old.access != access,
        };
        c.added.sort();
        c.removed.sort();
        c.rotated.sort();
        if c.is_empty() {
            return c;
        }
        if let Ok(mut w) = self.current.write() {
            *w = Arc::new(Clients { creds, access });
        }
        if let Ok(mut w) = self.phc_verified.write() {
            w.retain(|k, _| !c.removed.contains(k) && !c.rotated.contains(k));
        }
        self.generation.send_modify(|g| *g += 1);
        c
    }

    pub fn client_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.clients().creds.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn len(&self) -> usize {
        self.clients().creds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Is this identity still valid: same credential (or a ServiceAccount still
    /// allowed), same tenant and role?
    pub fn is_current(&self, id: &Identity) -> bool {
        match &id.proof {
            Proof::Credential(fp) => {
                let c = self.clients();
                c.creds
                    .get(&id.client_id)
                    .is_some_and(|cred| cred.fingerprint() == *fp)
                    && c.access.tenant(&id.client_id) == id.tenant
                    && c.access.role(&id.client_id) == id.role
            }
            Proof::ServiceAccount(account) => self.accounts.as_ref().is_some_and(|a| {
                a.current(account)
                    .is_some_and(|(tenant, role)| tenant == id.tenant && role == id.role)
            }),
        }
    }

    /// UNAUTHENTICATED if the identity was revoked or rotated since it was checked.
    pub fn still_valid(&self, id: &Identity) -> Result<(), Status> {
        if self.is_current(id) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "this client's credential or role was revoked or changed during the operation; nothing was committed",
            ))
        }
    }

    /// Resolves when `id` stops being valid (for aborting in-flight streams).
    pub async fn revoked(&self, id: &Identity) {
        let mut rx = self.generation.subscribe();
        loop {
            if !self.is_current(id) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Checks a presented credential.
    pub async fn verify(&self, client_id: &str, presented: &[u8]) -> Result<Identity, Status> {
        let clients = self.clients();
        let cred = clients
            .creds
            .get(client_id)
            .cloned()
            .ok_or_else(|| Status::unauthenticated(UNAUTHENTICATED))?;
        let fp = cred.fingerprint();
        let ok = match &cred {
            Credential::Token(t) => bool::from(t.as_slice().ct_eq(presented)),
            Credential::Phc(phc) => {
                let token_hash = *blake3::hash(presented).as_bytes();
                let cached = self
                    .phc_verified
                    .read()
                    .ok()
                    .and_then(|m| m.get(client_id).copied());
                if cached.is_some_and(|(f, t)| f == fp && bool::from(t.ct_eq(&token_hash))) {
                    true
                } else {
                    let phc = phc.clone();
                    let presented = presented.to_vec();
                    let ok = tokio::task::spawn_blocking(move || {
                        use argon2::password_hash::{PasswordHash, PasswordVerifier};
                        PasswordHash::new(&phc).is_ok_and(|h| {
                            argon2::Argon2::default()
                                .verify_password(&presented, &h)
                                .is_ok()
                        })
                    })
                    .await
                    .unwrap_or(false);
                    if ok && let Ok(mut m) = self.phc_verified.write() {
                        m.insert(client_id.to_string(), (fp, token_hash));
                    }
                    ok
                }
            }
        };
        if !ok {
            return Err(Status::unauthenticated(UNAUTHENTICATED));
        }
        Ok(Identity {
            client_id: client_id.to_string(),
            tenant: clients.access.tenant(client_id),
            role: clients.access.role(client_id),
            proof: Proof::Credential(fp),
        })
    }

    /// The current identity of `client_id` and the fingerprint of its stored credential,
    /// for callers that prove a secret derived from that credential (the S3 gateway signs
    /// with one) instead of presenting it; `None` for a client without a credential file.
    pub fn lookup_derived(&self, client_id: &str) -> Option<(Identity, [u8; 32])> {
        let clients = self.clients();
        let fp = clients.creds.get(client_id)?.fingerprint();
        Some((
            Identity {
                client_id: client_id.to_string(),
                tenant: clients.access.tenant(client_id),
                role: clients.access.role(client_id),
                proof: Proof::Credential(fp),
            },
            fp,
        ))
    }

    /// Checks a presented ServiceAccount token.
    pub async fn verify_service_account(&self, token: &str) -> Result<Identity, Status> {
        let Some(accounts) = &self.accounts else {
            return Err(Status::unauthenticated(
                "ServiceAccount tokens are not enabled on this server: use a client credential in /etc/client-secret",
            ));
        };
        let admitted = accounts
            .authenticate(token)
            .await
            .map_err(|r| r.to_status())?;
        Ok(Identity {
            client_id: admitted.account.username(),
            tenant: admitted.tenant,
            role: admitted.role,
            proof: Proof::ServiceAccount(admitted.account),
        })
    }

    /// A credential refused outside gRPC (an S3 signature) from `peer`: how long to delay
    /// the answer, as for gRPC failures.
    pub fn auth_failed(&self, peer: IpAddr) -> Duration {
        self.limiter.failed(peer)
    }

    /// A credential accepted outside gRPC from `peer`.
    pub fn auth_succeeded(&self, peer: IpAddr) {
        self.limiter.succeeded(peer)
    }

    /// Reads the caller's id and credential from request metadata and checks them;
    /// failures from one peer are answered more and more slowly.
    pub async fn authenticate(
        &self,
        meta: &tonic::metadata::MetadataMap,
        peer: Option<IpAddr>,
    ) -> Result<Identity, Status> {
        let result = async {
            match meta
                .get(datamover_proto::AUTH_SCHEME_HEADER)
                .map(|v| v.to_str())
            {
                None => {}
                Some(Ok(datamover_proto::SERVICE_ACCOUNT_AUTH)) => {
                    let token = meta
                        .get(datamover_proto::AUTHORIZATION_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .ok_or_else(|| {
                            Status::unauthenticated("no ServiceAccount token in the request")
                        })?;
                    return self.verify_service_account(token.trim()).await;
                }
                Some(_) => {
                    return Err(Status::unauthenticated(format!(
                        "unknown {} in the request: this server knows '{}' (a ServiceAccount token) or none (a client credential)",
                        datamover_proto::AUTH_SCHEME_HEADER,
                        datamover_proto::SERVICE_ACCOUNT_AUTH
                    )));
                }
            }
            let client_id = meta
                .get(datamover_proto::CLIENT_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|s| valid_client_id(s))
                .ok_or_else(|| {
                    Status::unauthenticated(
                        "no client id in the request: mount the client's credential secret at /etc/client-secret",
                    )
                })?;
            let token = meta
                .get(datamover_proto::AUTHORIZATION_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("no credential in the request"))?;
            self.verify(client_id, token.as_bytes()).await
        }
        .await;
        if let Some(peer) = peer {
            match &result {
                Ok(_) => self.limiter.succeeded(peer),
                Err(_) => {
                    let delay = self.limiter.failed(peer);
                    if !delay.is_zero() {
                        tracing::warn!(%peer, delay_ms = delay.as_millis() as u64, "repeated authentication failures: slowing down");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(pairs: &[(&str, &[u8])]) -> HashMap<String, Credential> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Credential::parse(v).unwrap()))
            .collect()
    }

    #[test]
    fn phc_credentials_over_the_cost_caps_are_not_loaded() {
        let salt = "c29tZXNhbHRzb21lc2FsdA";
        let hash = "KQr2bdmNmmf5d+fA2Sx+VMwUd2OTbmoeQh2UmUXgAwM";
        let phc =
            |m: u32, t: u32, p: u32| format!("$argon2id$v=19$m={m},t={t},p={p}${salt}${hash}");
        assert!(matches!(
            Credential::parse(phc(65536, 3, 4).as_bytes()),
            Some(Credential::Phc(_))
        ));
        for over in [
            phc(4 * 1024 * 1024, 3, 4),
            phc(65536, 1000, 4),
            phc(65536, 3, 255),
        ] {
            assert!(phc_cost_ok(&over).is_err(), "{over}");
            assert!(Credential::parse(over.as_bytes()).is_none(), "{over}");
        }
    }

    #[tokio::test]
    async fn token_phc_rotation_and_revocation() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = argon2::Argon2::default()
            .hash_password(b"s3cret", &salt)
            .unwrap()
            .to_string();
        let s = CredentialStore::new(
            store(&[("a", b"tok\n"), ("b", phc.as_bytes())]),
            Access::default(),
        );
        let a = s.verify("a", b"tok").await.unwrap();
        assert_eq!(a.tenant, "a");
        assert_eq!(a.role, Role::Full);
        assert!(s.verify("a", b"tok2").await.is_err());
        assert!(s.verify("b", b"s3cret").await.is_ok());
        assert!(s.verify("b", b"s3cret").await.is_ok()); // cached
        assert!(s.verify("b", b"wrong").await.is_err());
        assert!(s.verify("c", b"tok").await.is_err());

        // Rotation: the old identity is no longer current, the old token fails.
        let c = s.replace(
            store(&[("a", b"new"), ("b", phc.as_bytes())]),
            Access::default(),
        );
        assert_eq!(c.rotated, vec!["a"]);
        assert!(!s.is_current(&a));
        assert!(s.verify("a", b"tok").await.is_err());
        assert!(s.verify("a", b"new").await.is_ok());

        // Revocation wakes a waiter.
        let b = s.verify("b", b"s3cret").await.unwrap();
        let s = Arc::new(s);
        let s2 = Arc::clone(&s);
        let waiter = tokio::spawn(async move { s2.revoked(&b).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        let c = s.replace(store(&[("a", b"new")]), Access::default());
        assert_eq!(c.removed, vec!["b"]);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn failures_slow_down() {
        assert_eq!(FailureLimiter::delay(1), Duration::ZERO);
        assert_eq!(FailureLimiter::delay(3), Duration::ZERO);
        assert_eq!(FailureLimiter::delay(4), Duration::from_millis(100));
        assert_eq!(FailureLimiter::delay(5), Duration::from_millis(200));
        assert_eq!(FailureLimiter::delay(100), Duration::from_secs(5));
        let l = FailureLimiter::default();
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.failed(peer).is_zero());
        }
        assert!(!l.failed(peer).is_zero());
        l.succeeded(peer);
        assert!(l.failed(peer).is_zero());
    }

    #[test]
    fn ids() {
        assert!(valid_client_id("edge-01.site_a"));
        assert!(!valid_client_id("..data"));
        assert!(!valid_client_id("a/b"));
        assert!(!valid_client_id(""));
    }
}
