//! Keys, compression and sealing.
//!
//! The master key is Argon2id(repository password, salt) with the parameters recorded in
//! the `config` object. Sub-keys derive from it with BLAKE3's `derive_key`: one for
//! sealing objects, one per tenant for chunk ids. The master key never leaves the server.
//!
//! A sealed object is `nonce (24 bytes) || XChaCha20-Poly1305(plaintext)`; a compressed
//! payload is one header byte (0 stored, 1 zstd) and the body.

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use datamover_core::chunk::ChunkIdKey;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::RepoError;

const NONCE_LEN: usize = 24;
/// Bytes a sealed object adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// Argon2id parameters, as recorded in the repository config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
}

impl KdfParams {
    pub fn new_random() -> Self {
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        KdfParams {
            algorithm: "argon2id".into(),
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
            salt: hex::encode(salt),
        }
    }
}

/// The repository's keys.
pub struct Keys {
    master: [u8; 32],
    cipher: XChaCha20Poly1305,
}

impl Keys {
    /// Derives the keys from the password (slow on purpose: memory-hard).
    pub fn derive(password: &[u8], kdf: &KdfParams) -> Result<Keys, RepoError> {
        if kdf.algorithm != "argon2id" {
            return Err(RepoError::BadConfig(format!(
                "unknown key derivation '{}'",
                kdf.algorithm
            )));
        }
        let salt = hex::decode(&kdf.salt).map_err(|e| RepoError::BadConfig(e.to_string()))?;
        let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
            .map_err(|e| RepoError::BadConfig(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut master = [0u8; 32];
        argon
            .hash_password_into(password, &salt, &mut master)
            .map_err(|e| RepoError::BadConfig(e.to_string()))?;
        Ok(Self::from_master(master))
    }

    fn from_master(master: [u8; 32]) -> Keys {
        let seal_key = blake3::derive_key("datamover v1 object sealing", &master);
        Keys {
            master,
            cipher: XChaCha20Poly1305::new((&seal_key).into()),
        }
    }

    /// The chunk-id key of a tenant.
    pub fn chunk_id_key(&self, tenant: &str) -> ChunkIdKey {
        let mut material = Vec::with_capacity(32 + tenant.len());
        material.extend_from_slice(&self.master);
        material.extend_from_slice(tenant.as_bytes());
        ChunkIdKey::new(blake3::derive_key(
            "datamover v1 tenant chunk id",
            &material,
        ))
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        // Encryption in place with a valid key and nonce size cannot fail.
        match self.cipher.encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            b"",
            &mut out[NONCE_LEN..],
        ) {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => out.clear(),
        }
        out
    }

    pub fn open(&self, sealed: &[u8], what: &str) -> Result<Vec<u8>, RepoError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(RepoError::corrupt(what, "too short"));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| RepoError::corrupt(what, "authentication failed"))
    }
}

/// Compresses with zstd unless that does not make it smaller.
pub fn compress(data: &[u8], level: i32) -> Vec<u8> {
    if let Ok(z) = zstd::bulk::compress(data, level)
        && z.len() + 1 < data.len()
    {
        let mut out = Vec::with_capacity(z.len() + 1);
        out.push(1);
        out.extend_from_slice(&z);
        return out;
    }
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(0);
    out.extend_from_slice(data);
    out
}

/// `raw_len` is the exact decompressed size when known, 0 when not.
pub fn decompress(data: &[u8], raw_len: usize, what: &str) -> Result<Vec<u8>, RepoError> {
    match data.split_first() {
        Some((0, body)) => Ok(body.to_vec()),
        Some((1, body)) if raw_len > 0 => zstd::bulk::decompress(body, raw_len)
            .map_err(|e| RepoError::corrupt(what, format!("zstd: {e}"))),
        Some((1, body)) => zstd::stream::decode_all(body)
            .map_err(|e| RepoError::corrupt(what, format!("zstd: {e}"))),
        _ => Err(RepoError::corrupt(what, "unknown compression")),
    }
}

/// Compress, then seal.
pub fn pack_blob(keys: &Keys, data: &[u8], level: i32) -> Vec<u8> {
    keys.seal(&compress(data, level))
}

/// Open, then decompress.
pub fn unpack_blob(
    keys: &Keys,
    sealed: &[u8],
    raw_len: usize,
    what: &str,
) -> Result<Vec<u8>, RepoError> {
    let z = keys.open(sealed, what)?;
    decompress(&z, raw_len, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_keys() -> Keys {
        Keys::from_master([7; 32])
    }

    #[test]
    fn seal_roundtrip_and_tamper() {
        let k = test_keys();
        let data = b"hello hello hello hello hello hello".repeat(100);
        let blob = pack_blob(&k, &data, 3);
        assert!(blob.len() < data.len());
        assert_eq!(unpack_blob(&k, &blob, data.len(), "t").unwrap(), data);
        let mut bad = blob.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(matches!(
            unpack_blob(&k, &bad, data.len(), "t"),
            Err(RepoError::Corrupt { .. })
        ));
    }

    #[test]
    fn incompressible_is_stored() {
        let mut data = vec![0u8; 4096];
        rand::thread_rng().fill_bytes(&mut data);
        let c = compress(&data, 3);
        assert_eq!(c[0], 0);
        assert_eq!(decompress(&c, data.len(), "t").unwrap(), data);
    }

    #[test]
    fn tenant_keys_differ() {
        let k = test_keys();
        assert_ne!(
            k.chunk_id_key("a").as_bytes(),
            k.chunk_id_key("b").as_bytes()
        );
    }

    #[test]
    fn kdf_is_deterministic() {
        let p = KdfParams {
            memory_kib: 1024,
            iterations: 1,
            ..KdfParams::new_random()
        };
        let a = Keys::derive(b"pw", &p).unwrap();
        let b = Keys::derive(b"pw", &p).unwrap();
        let c = Keys::derive(b"other", &p).unwrap();
        assert_eq!(a.master, b.master);
        assert_ne!(a.master, c.master);
    }
}
