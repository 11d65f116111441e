//! S3 credentials: the access key is the client id; the secret is derived, never stored.
//!
//! secret = base64url(BLAKE3-keyed(gateway key, client id ‖ 0 ‖ BLAKE3(credential file)))
//! where the gateway key derives from the repository password. So the server can compute
//! every client's secret from what it already holds (a PHC-hashed credential works too),
//! a rotated credential file changes the secret, and a removed one revokes it: the secret
//! is looked up through the live credential store on every request.

use std::sync::Arc;

use base64::Engine as _;
use s3s::auth::{S3Auth, SecretKey};
use s3s::{S3Error, S3Result};

use super::error::GatewayError;
use crate::credentials::{CredentialStore, Identity};

/// The context string of the gateway key's derivation (never change it: it would change
/// every client's secret).
const KEY_CONTEXT: &str = "datamover 2026-12 s3 gateway client secrets v1";

/// The key from which clients' S3 secrets derive.
#[derive(Clone)]
pub struct GatewayKey([u8; 32]);

impl GatewayKey {
    pub fn from_repo_password(password: &[u8]) -> GatewayKey {
        GatewayKey(blake3::derive_key(KEY_CONTEXT, password))
    }

    /// The S3 secret of `client_id` whose credential file has fingerprint `fp`.
    pub fn secret(&self, client_id: &str, fp: &[u8; 32]) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(client_id.as_bytes());
        h.update(&[0]);
        h.update(fp);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&h.finalize().as_bytes()[..30])
    }
}

/// Answers the S3 library's question "what is the secret of this access key?".
pub struct GatewayAuth {
    pub creds: Arc<CredentialStore>,
    pub key: GatewayKey,
}

impl GatewayAuth {
    /// The caller's current identity (tenant and role as configured now).
    pub fn identity(&self, access_key: &str) -> Result<Identity, GatewayError> {
        self.creds
            .lookup_derived(access_key)
            .map(|(id, _)| id)
            .ok_or_else(|| GatewayError::UnknownClient(access_key.to_string()))
    }

    /// The S3 secret of a client, when it has a credential file.
    pub fn secret_of(&self, client_id: &str) -> Option<String> {
        self.creds
            .lookup_derived(client_id)
            .map(|(_, fp)| self.key.secret(client_id, &fp))
    }
}

#[async_trait::async_trait]
impl S3Auth for GatewayAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.secret_of(access_key) {
            Some(s) => Ok(SecretKey::from(s)),
            None => {
                tracing::info!(client = %access_key, "S3 request with an unknown access key refused");
                Err(S3Error::from(GatewayError::UnknownClient(
                    access_key.chars().take(100).collect(),
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_depend_on_everything() {
        let k = GatewayKey::from_repo_password(b"pw");
        let s = k.secret("a", &[1; 32]);
        assert_eq!(s.len(), 40);
        assert_eq!(s, k.secret("a", &[1; 32]));
        assert_ne!(s, k.secret("b", &[1; 32]));
        assert_ne!(s, k.secret("a", &[2; 32]));
        assert_ne!(
            s,
            GatewayKey::from_repo_password(b"pw2").secret("a", &[1; 32])
        );
    }
}
