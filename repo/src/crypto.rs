//! Keys, compression and sealing.
//!
//! The master key is Argon2id(repository password, salt) with the parameters recorded in
//! the `config` object. Sub-keys derive from it with BLAKE3's `derive_key`: one for
//! sealing objects, one per tenant for chunk ids. The master key never leaves the server.
//!
//! A sealed object is `nonce (24 bytes) || XChaCha20-Poly1305(plaintext)`; a compressed
//! payload is one header byte (0 stored, 1 zstd) and the body. XChaCha20-Poly1305 is
//! computed as its definition goes: HChaCha20 of the key and the nonce's first 16 bytes
//! gives a subkey for ChaCha20-Poly1305 (aws-lc's, about twice as fast as a portable one
//! here) with the nonce's last 8 bytes; objects up to [`SMALL_SEAL`] bytes, where key
//! setup would dominate, use RustCrypto's XChaCha20-Poly1305. Both give the same bytes.

use std::sync::Mutex;

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use bytes::Bytes;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use datamover_core::chunk::ChunkIdKey;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zstd::zstd_safe::CParameter;

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

/// The most Argon2 memory, passes and lanes a repository config may ask for: the config
/// is plain JSON that whoever can write to the bucket can change, and the key is derived
/// before the password is checked, so its parameters are capped first.
pub const MAX_KDF_MEMORY_KIB: u32 = 4 * 1024 * 1024;
pub const MAX_KDF_ITERATIONS: u32 = 64;
pub const MAX_KDF_PARALLELISM: u32 = 64;

impl KdfParams {
    /// Refuses parameters beyond the caps (or an unknown algorithm).
    pub fn check(&self) -> Result<(), RepoError> {
        if self.algorithm != "argon2id" {
            return Err(RepoError::BadConfig(format!(
                "unknown key derivation '{}': the repository's config object is damaged or from a newer version",
                self.algorithm
            )));
        }
        if self.memory_kib > MAX_KDF_MEMORY_KIB
            || self.iterations > MAX_KDF_ITERATIONS
            || self.parallelism > MAX_KDF_PARALLELISM
            || self.salt.len() > 256
        {
            return Err(RepoError::BadConfig(format!(
                "the repository config asks for a key derivation of {} KiB, {} passes and {} lanes, beyond what this server accepts ({MAX_KDF_MEMORY_KIB} KiB, {MAX_KDF_ITERATIONS}, {MAX_KDF_PARALLELISM}) or with an oversized salt: the config object was altered; restore it from a copy",
                self.memory_kib, self.iterations, self.parallelism
            )));
        }
        Ok(())
    }

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

/// Objects up to this size are sealed and opened with RustCrypto's XChaCha20-Poly1305,
/// larger ones with aws-lc's ChaCha20-Poly1305 under an HChaCha20 subkey.
const SMALL_SEAL: usize = 4096;

/// The repository's keys.
pub struct Keys {
    master: [u8; 32],
    seal_key: [u8; 32],
    cipher: XChaCha20Poly1305,
}

impl Keys {
    /// Derives the keys from the password (slow on purpose: memory-hard).
    pub fn derive(password: &[u8], kdf: &KdfParams) -> Result<Keys, RepoError> {
        kdf.check()?;
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
            seal_key,
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
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&[0; NONCE_LEN]);
        out.extend_from_slice(plaintext);
        self.seal_in_place(out)
    }

    /// Seals `buf[NONCE_LEN..]` in place (the first `NONCE_LEN` bytes are overwritten
    /// with the nonce, the tag is appended).
    fn seal_in_place(&self, mut buf: Vec<u8>) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        buf[..NONCE_LEN].copy_from_slice(&nonce);
        // Encryption in place with a valid key and nonce size cannot fail.
        let tag = if buf.len() - NONCE_LEN <= SMALL_SEAL {
            self.cipher
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), b"", &mut buf[NONCE_LEN..])
                .ok()
                .map(<[u8; TAG_LEN]>::from)
        } else {
            let (key, n) = self.subkey(&nonce);
            key.and_then(|k| {
                k.seal_in_place_separate_tag(n, Aad::empty(), &mut buf[NONCE_LEN..])
                    .ok()
                    .and_then(|t| <[u8; TAG_LEN]>::try_from(t.as_ref()).ok())
            })
        };
        match tag {
            Some(tag) => buf.extend_from_slice(&tag),
            None => buf.clear(),
        }
        buf
    }

    /// The ChaCha20-Poly1305 key and nonce that XChaCha20-Poly1305 with `nonce` is.
    fn subkey(&self, nonce: &[u8; NONCE_LEN]) -> (Option<LessSafeKey>, Nonce) {
        let sub = chacha20::hchacha::<chacha20::cipher::consts::U10>(
            (&self.seal_key).into(),
            chacha20::cipher::generic_array::GenericArray::from_slice(&nonce[..16]),
        );
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&nonce[16..]);
        let key = UnboundKey::new(&CHACHA20_POLY1305, sub.as_slice())
            .ok()
            .map(LessSafeKey::new);
        (key, Nonce::assume_unique_for_key(n))
    }

    pub fn open(&self, sealed: &[u8], what: &str) -> Result<Vec<u8>, RepoError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(RepoError::corrupt(what, "too short"));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let failed = || RepoError::corrupt(what, "authentication failed");
        if ct.len() <= SMALL_SEAL {
            let mut buf = ct.to_vec();
            self.cipher
                .decrypt_in_place_detached(XNonce::from_slice(nonce), b"", &mut buf, tag.into())
                .map_err(|_| failed())?;
            return Ok(buf);
        }
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| failed())?;
        let (key, n) = self.subkey(nonce);
        // Decrypted from where it lies (a pack buffer, say) straight into its own
        // buffer, without copying the sealed bytes first.
        let mut buf = vec![0u8; ct.len()];
        key.ok_or_else(failed)?
            .open_separate_gather(n, Aad::empty(), ct, tag, &mut buf)
            .map_err(|_| failed())?;
        Ok(buf)
    }
}

const TAG_LEN: usize = 16;

/// Below this size zstd cannot win once its frame header is counted: stored as is.
const MIN_COMPRESS: usize = 128;
/// Compression contexts kept for reuse (one per sealing thread at a time).
const POOLED_CONTEXTS: usize = 8;

/// The level whose match tables are sized for chunks ([`CHUNK_TABLES`]): the default one.
const TABLED_LEVEL: i32 = 3;
/// Log2 sizes of zstd's hash and chain tables at [`TABLED_LEVEL`]. zstd picks 2^17 and
/// 2^16 entries (768 KiB) for inputs above 256 KiB; chunks are at most 1 MiB, and tables
/// of 2^16 and 2^15 (384 KiB, within a core's L2 cache) find nearly the same matches,
/// 5-7 % faster: +0.05 % bytes on the benchmark's stream, -0.1 % on text, +0.15 % on a
/// sample of the toolchain and +0.9 % on its largest library (bench/RESULTS.md).
const CHUNK_TABLES: (u32, u32) = (16, 15);

/// A zstd context with its output buffer, reused across calls.
struct Zstd {
    level: i32,
    ctx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

static COMPRESSORS: Mutex<Vec<Zstd>> = Mutex::new(Vec::new());
static DECOMPRESSORS: Mutex<Vec<zstd::bulk::Decompressor<'static>>> = Mutex::new(Vec::new());

/// Calls `f` with the payload of `data`: header byte (0 stored, 1 zstd) and body.
fn with_compressed<T>(data: &[u8], level: i32, f: impl FnOnce(u8, &[u8]) -> T) -> T {
    if data.len() < MIN_COMPRESS {
        return f(0, data);
    }
    let pooled = COMPRESSORS.lock().ok().and_then(|mut pool| {
        let i = pool.iter().position(|z| z.level == level)?;
        Some(pool.swap_remove(i))
    });
    let Some(mut z) = pooled.or_else(|| {
        let mut ctx = zstd::bulk::Compressor::new(level).ok()?;
        if level == TABLED_LEVEL {
            let (hash, chain) = CHUNK_TABLES;
            // Only a speed hint: zstd's own tables are used if it refuses them.
            let _ = ctx.set_parameter(CParameter::HashLog(hash));
            let _ = ctx.set_parameter(CParameter::ChainLog(chain));
        }
        Some(Zstd {
            level,
            ctx,
            out: Vec::new(),
        })
    }) else {
        return f(0, data);
    };
    // Only a result at least two bytes smaller is worth its header: a smaller output
    // buffer makes zstd give up early on incompressible data.
    let room = data.len() - 2;
    if z.out.len() < room {
        z.out.resize(room, 0);
    }
    let result = match z.ctx.compress_to_buffer(data, &mut z.out[..room]) {
        Ok(n) if n + 1 < data.len() => f(1, &z.out[..n]),
        _ => f(0, data),
    };
    if z.out.len() > 2 * 1024 * 1024 {
        z.out = Vec::new();
    }
    if let Ok(mut pool) = COMPRESSORS.lock()
        && pool.len() < POOLED_CONTEXTS
    {
        pool.push(z);
    }
    result
}

/// Compresses with zstd unless that does not make it smaller.
pub fn compress(data: &[u8], level: i32) -> Vec<u8> {
    with_compressed(data, level, |header, body| {
        let mut out = Vec::with_capacity(body.len() + 1);
        out.push(header);
        out.extend_from_slice(body);
        out
    })
}

fn zstd_decompress(body: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    let mut ctx = match DECOMPRESSORS.lock().ok().and_then(|mut p| p.pop()) {
        Some(c) => c,
        None => zstd::bulk::Decompressor::new()?,
    };
    let out = ctx.decompress(body, raw_len);
    if let Ok(mut pool) = DECOMPRESSORS.lock()
        && pool.len() < POOLED_CONTEXTS
    {
        pool.push(ctx);
    }
    let out = out?;
    if out.len() != raw_len {
        return Err(std::io::Error::other(format!(
            "{} bytes instead of {raw_len}",
            out.len()
        )));
    }
    Ok(out)
}

/// `raw_len` is the exact decompressed size when known, 0 when not.
pub fn decompress(data: &[u8], raw_len: usize, what: &str) -> Result<Vec<u8>, RepoError> {
    match data.split_first() {
        Some((0, body)) => Ok(body.to_vec()),
        Some((1, body)) if raw_len > 0 => zstd_decompress(body, raw_len)
            .map_err(|e| RepoError::corrupt(what, format!("zstd: {e}"))),
        Some((1, body)) => zstd::stream::decode_all(body)
            .map_err(|e| RepoError::corrupt(what, format!("zstd: {e}"))),
        _ => Err(RepoError::corrupt(what, "unknown compression")),
    }
}

/// Compress, then seal (one allocation: the sealed object).
pub fn pack_blob(keys: &Keys, data: &[u8], level: i32) -> Vec<u8> {
    let buf = with_compressed(data, level, |header, body| {
        let mut buf = Vec::with_capacity(NONCE_LEN + 1 + body.len() + TAG_LEN);
        buf.extend_from_slice(&[0; NONCE_LEN]);
        buf.push(header);
        buf.extend_from_slice(body);
        buf
    });
    keys.seal_in_place(buf)
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

/// [`unpack_blob`] as shared bytes: a stored payload is not copied again.
pub fn unpack_blob_bytes(
    keys: &Keys,
    sealed: &[u8],
    raw_len: usize,
    what: &str,
) -> Result<Bytes, RepoError> {
    let z = keys.open(sealed, what)?;
    if z.first() == Some(&0) {
        return Ok(Bytes::from(z).slice(1..));
    }
    decompress(&z, raw_len, what).map(Bytes::from)
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
    fn small_and_reused_contexts_roundtrip() {
        let k = test_keys();
        let tiny = b"tiny".repeat(10);
        let c = compress(&tiny, 3);
        assert_eq!(c[0], 0, "under the compression threshold: stored");
        for i in 0..50usize {
            let data = format!("chunk {i} ").repeat(50 + i * 37).into_bytes();
            let level = if i % 2 == 0 { 3 } else { 1 };
            let blob = pack_blob(&k, &data, level);
            assert!(blob.len() < data.len());
            assert_eq!(unpack_blob(&k, &blob, data.len(), "t").unwrap(), data);
            assert_eq!(unpack_blob_bytes(&k, &blob, data.len(), "t").unwrap(), data);
            // a wrong size is corruption, not a short read
            assert!(unpack_blob(&k, &blob, data.len() + 1, "t").is_err());
        }
        let blob = pack_blob(&k, &tiny, 3);
        assert_eq!(unpack_blob_bytes(&k, &blob, tiny.len(), "t").unwrap(), tiny);
    }

    /// The chunk-sized tables lose (almost) nothing against zstd's own at the same level,
    /// on chunks either side of its 256 KiB size class, and what they make decodes.
    #[test]
    fn chunk_tables_compress_as_well_as_zstds_own() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let words = [
            "backup", "restore", "chunk", "pack", "the", "of", "stream", "tenant",
        ];
        let (mut ours, mut theirs) = (0usize, 0usize);
        for len in [64 * 1024, 200 * 1024, 300 * 1024, 700 * 1024, 1024 * 1024] {
            let mut data = Vec::with_capacity(len + 16);
            while data.len() < len {
                if rng.gen_bool(0.3) {
                    let mut noise = [0u8; 64];
                    rng.fill_bytes(&mut noise);
                    data.extend_from_slice(&noise);
                }
                data.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
                data.extend_from_slice(format!(" {} ", rng.gen_range(0..100_000u32)).as_bytes());
            }
            data.truncate(len);
            let c = compress(&data, TABLED_LEVEL);
            assert_eq!(c[0], 1, "{len} bytes: compressed");
            assert_eq!(decompress(&c, len, "t").unwrap(), data);
            ours += c.len();
            theirs += zstd::bulk::compress(&data, TABLED_LEVEL).unwrap().len() + 1;
        }
        assert!(
            (ours as f64) < theirs as f64 * 1.002,
            "chunk tables: {ours} bytes against zstd's own {theirs}"
        );
    }

    /// Objects sealed either way open the other way: repositories written before the
    /// aws-lc path (all with RustCrypto) still open, and the format did not change.
    #[test]
    fn both_ciphers_give_the_same_xchacha20_poly1305() {
        use chacha20poly1305::aead::Aead;
        let k = test_keys();
        for len in [
            0usize,
            1,
            SMALL_SEAL,
            SMALL_SEAL + 1,
            100_000,
            3 * 1024 * 1024 + 5,
        ] {
            let mut data = vec![0u8; len];
            rand::thread_rng().fill_bytes(&mut data);
            let sealed = k.seal(&data);
            let (nonce, rest) = sealed.split_at(NONCE_LEN);
            let portable = k
                .cipher
                .decrypt(XNonce::from_slice(nonce), rest)
                .expect("RustCrypto opens what was sealed");
            assert_eq!(portable, data, "len {len}");
            let mut by_portable = nonce.to_vec();
            by_portable.extend(
                k.cipher
                    .encrypt(XNonce::from_slice(nonce), data.as_slice())
                    .expect("seal"),
            );
            assert_eq!(by_portable, sealed, "len {len}: same bytes");
            assert_eq!(k.open(&by_portable, "t").expect("open"), data);
            // A flipped bit in the tag, the ciphertext or the nonce: refused.
            for at in [sealed.len() - 1, NONCE_LEN + len / 2, 0] {
                let mut bad = sealed.clone();
                bad[at] ^= 1;
                assert!(k.open(&bad, "t").is_err(), "len {len}: byte {at} flipped");
            }
        }
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
    fn kdf_parameters_from_the_config_are_capped() {
        // Without the caps, these would ask for 4 TiB of memory or 4 billion passes.
        for p in [
            KdfParams {
                memory_kib: u32::MAX,
                iterations: 1,
                ..KdfParams::new_random()
            },
            KdfParams {
                memory_kib: 8,
                iterations: u32::MAX,
                ..KdfParams::new_random()
            },
        ] {
            let e = Keys::derive(b"pw", &p).err().expect("refused");
            assert!(e.to_string().contains("restore it from a copy"), "{e}");
        }
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
