//! The server certificate fingerprint: SHA-256 of the certificate's DER bytes, written as
//! lowercase hex to `/etc/server/data`. Clients receive it as `SERVER_DATA`, either as
//! that hex or base64 of it (Kanister base64-encodes `status.serverInfo.data`).

use base64::Engine;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// A SHA-256 certificate fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

#[derive(Debug, Error)]
#[error(
    "SERVER_DATA is not a certificate fingerprint: expected 64 hex digits (the content of the \
     server's /etc/server/data) or base64 of them"
)]
pub struct FingerprintError;

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Lowercase hex, as written to `/etc/server/data`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses hex (colons allowed, any case), base64 of the hex, or base64 of the raw 32 bytes.
    pub fn parse(value: &str) -> Result<Self, FingerprintError> {
        let value = value.trim();
        if let Some(fp) = Self::parse_hex(value) {
            return Ok(fp);
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| FingerprintError)?;
        if let Ok(text) = std::str::from_utf8(&decoded)
            && let Some(fp) = Self::parse_hex(text.trim())
        {
            return Ok(fp);
        }
        <[u8; 32]>::try_from(decoded.as_slice())
            .map(Fingerprint)
            .map_err(|_| FingerprintError)
    }

    fn parse_hex(value: &str) -> Option<Self> {
        let cleaned: String = value.chars().filter(|c| *c != ':').collect();
        if cleaned.len() != 64 {
            return None;
        }
        let bytes = hex::decode(cleaned.to_ascii_lowercase()).ok()?;
        <[u8; 32]>::try_from(bytes.as_slice()).ok().map(Fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base64_forms() {
        let fp = Fingerprint::of_der(b"certificate");
        let hex = fp.to_hex();
        assert_eq!(Fingerprint::parse(&hex).unwrap(), fp);
        assert_eq!(Fingerprint::parse(&hex.to_uppercase()).unwrap(), fp);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&hex);
        assert_eq!(Fingerprint::parse(&b64).unwrap(), fp);
        let raw = base64::engine::general_purpose::STANDARD.encode(fp.0);
        assert_eq!(Fingerprint::parse(&raw).unwrap(), fp);
        assert!(Fingerprint::parse("abc").is_err());
    }
}
