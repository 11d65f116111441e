//! Client credentials: `/etc/client_credentials/<client_id>`, one file per client, holding
//! a token or a PHC hash (`$argon2id$…`) of it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use subtle::ConstantTimeEq;
use tonic::Status;

/// A client's stored credential.
#[derive(Clone)]
pub enum Credential {
    Token(Vec<u8>),
    /// A PHC string; verified with Argon2, results cached by a hash of the token.
    Phc(String),
}

impl Credential {
    pub fn parse(content: &[u8]) -> Option<Credential> {
        let trimmed = trim(content);
        if trimmed.is_empty() {
            return None;
        }
        if trimmed.starts_with(b"$argon2") {
            return std::str::from_utf8(trimmed)
                .ok()
                .map(|s| Credential::Phc(s.to_string()));
        }
        Some(Credential::Token(trimmed.to_vec()))
    }

    fn fingerprint(&self) -> [u8; 32] {
        match self {
            Credential::Token(t) => *blake3::hash(t).as_bytes(),
            Credential::Phc(p) => *blake3::hash(p.as_bytes()).as_bytes(),
        }
    }
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

/// Reads the credentials directory. Unreadable or empty files are skipped with a warning.
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
    pub client_id: String,
    pub tenant: String,
}

/// A successful PHC check: (fingerprint of the stored hash, BLAKE3 of the token).
type PhcProof = ([u8; 32], [u8; 32]);

/// The current set of clients; swapped whole on reload.
#[derive(Default)]
pub struct CredentialStore {
    clients: RwLock<Arc<HashMap<String, Credential>>>,
    /// (client id, credential fingerprint) -> hash of the token that verified against a PHC.
    phc_verified: RwLock<HashMap<String, PhcProof>>,
}

const UNAUTHENTICATED: &str = "the server does not accept this client's credential: check that /etc/client-secret/<client_id> holds the credential the server has for that client id in its client_credentials secret";

impl CredentialStore {
    pub fn new(clients: HashMap<String, Credential>) -> Self {
        CredentialStore {
            clients: RwLock::new(Arc::new(clients)),
            phc_verified: RwLock::new(HashMap::new()),
        }
    }

    /// Replaces the clients; returns (added, removed, changed) client ids.
    pub fn replace(
        &self,
        new: HashMap<String, Credential>,
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        let old = self.snapshot();
        let mut added: Vec<String> = new
            .keys()
            .filter(|k| !old.contains_key(*k))
            .cloned()
            .collect();
        let mut removed: Vec<String> = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        let mut changed: Vec<String> = new
            .iter()
            .filter(|(k, v)| {
                old.get(*k)
                    .is_some_and(|o| o.fingerprint() != v.fingerprint())
            })
            .map(|(k, _)| k.clone())
            .collect();
        added.sort();
        removed.sort();
        changed.sort();
        if let Ok(mut w) = self.clients.write() {
            *w = Arc::new(new);
        }
        if let Ok(mut w) = self.phc_verified.write() {
            w.retain(|k, _| !removed.contains(k) && !changed.contains(k));
        }
        (added, removed, changed)
    }

    pub fn snapshot(&self) -> Arc<HashMap<String, Credential>> {
        self.clients
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Is `client_id` still a known client?
    pub fn contains(&self, client_id: &str) -> bool {
        self.snapshot().contains_key(client_id)
    }

    /// Checks a presented credential.
    pub async fn verify(&self, client_id: &str, presented: &[u8]) -> Result<Identity, Status> {
        let cred = self
            .snapshot()
            .get(client_id)
            .cloned()
            .ok_or_else(|| Status::unauthenticated(UNAUTHENTICATED))?;
        let ok = match &cred {
            Credential::Token(t) => bool::from(t.as_slice().ct_eq(presented)),
            Credential::Phc(phc) => {
                let fp = cred.fingerprint();
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
                        PasswordHash::new(&phc)
                            .map(|h| {
                                argon2::Argon2::default()
                                    .verify_password(&presented, &h)
                                    .is_ok()
                            })
                            .unwrap_or(false)
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
            tenant: client_id.to_string(),
        })
    }
}

/// Reads the caller's id and credential from request metadata and checks them.
pub async fn authenticate(
    store: &CredentialStore,
    meta: &tonic::metadata::MetadataMap,
) -> Result<Identity, Status> {
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
    store.verify(client_id, token.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_and_phc() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = argon2::Argon2::default()
            .hash_password(b"s3cret", &salt)
            .unwrap()
            .to_string();
        let mut m = HashMap::new();
        m.insert("a".to_string(), Credential::parse(b"tok\n").unwrap());
        m.insert("b".to_string(), Credential::parse(phc.as_bytes()).unwrap());
        let s = CredentialStore::new(m);
        assert!(s.verify("a", b"tok").await.is_ok());
        assert!(s.verify("a", b"tok2").await.is_err());
        assert!(s.verify("b", b"s3cret").await.is_ok());
        assert!(s.verify("b", b"s3cret").await.is_ok()); // cached
        assert!(s.verify("b", b"wrong").await.is_err());
        assert!(s.verify("c", b"tok").await.is_err());
        let (added, removed, _) = s.replace(HashMap::new());
        assert!(added.is_empty());
        assert_eq!(removed, vec!["a", "b"]);
        assert!(s.verify("a", b"tok").await.is_err());
    }

    #[test]
    fn ids() {
        assert!(valid_client_id("edge-01.site_a"));
        assert!(!valid_client_id("..data"));
        assert!(!valid_client_id("a/b"));
        assert!(!valid_client_id(""));
    }
}
