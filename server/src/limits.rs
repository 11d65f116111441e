//! Limits against abuse, per client: calls per second (a token bucket), open backup
//! sessions, chunks per `PutChunks` message, catalog chunks per commit, and the length of
//! a restore's path and patterns ([`check_selection`]). A client over
//! a limit gets RESOURCE_EXHAUSTED saying which limit and what to do; other clients are
//! not affected (each has its own bucket). The S3 gateway's requests take from the same
//! bucket as the client's gRPC calls; over the rate they are answered SlowDown (HTTP 503).
//!
//! Set by environment variables (read once, at the first call):
//! `DATAMOVER_CLIENT_RATE` (calls per second, default 1000), `DATAMOVER_CLIENT_BURST`
//! (default twice the rate), `DATAMOVER_MAX_SESSIONS_PER_CLIENT` (default 16),
//! `DATAMOVER_MAX_CHUNKS_PER_PUT` (default 262144, more than a 16 MiB message of the
//! smallest chunks holds) and `DATAMOVER_MAX_CATALOG_CHUNKS` (default 1048576).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use thiserror::Error;
use tonic::Status;

#[derive(Debug, Clone, PartialEq)]
pub struct LimitConfig {
    pub rate: f64,
    pub burst: f64,
    pub sessions_per_client: usize,
    pub chunks_per_put: usize,
    pub catalog_chunks: usize,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            rate: 1000.0,
            burst: 2000.0,
            sessions_per_client: 16,
            chunks_per_put: 262_144,
            catalog_chunks: 1_048_576,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum LimitError {
    #[error("{name}='{value}' is not a positive number: unset it or give one")]
    Bad { name: &'static str, value: String },
}

impl LimitConfig {
    /// From the environment (`get` looks a variable up); unset ones keep their default.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<LimitConfig, LimitError> {
        let mut c = LimitConfig::default();
        let num = |name: &'static str| -> Result<Option<f64>, LimitError> {
            match get(name) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<f64>() {
                    Ok(n) if n.is_finite() && n > 0.0 => Ok(Some(n)),
                    _ => Err(LimitError::Bad { name, value: v }),
                },
            }
        };
        if let Some(r) = num("DATAMOVER_CLIENT_RATE")? {
            c.rate = r;
            c.burst = 2.0 * r;
        }
        if let Some(b) = num("DATAMOVER_CLIENT_BURST")? {
            c.burst = b.max(1.0);
        }
        if let Some(n) = num("DATAMOVER_MAX_SESSIONS_PER_CLIENT")? {
            c.sessions_per_client = n as usize;
        }
        if let Some(n) = num("DATAMOVER_MAX_CHUNKS_PER_PUT")? {
            c.chunks_per_put = n as usize;
        }
        if let Some(n) = num("DATAMOVER_MAX_CATALOG_CHUNKS")? {
            c.catalog_chunks = n as usize;
        }
        Ok(c)
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limits and each client's token bucket.
pub struct Limits {
    pub config: LimitConfig,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Buckets kept at most; full (idle) ones are dropped first when there are more.
const MAX_BUCKETS: usize = 65_536;

impl Limits {
    pub fn new(config: LimitConfig) -> Limits {
        Limits {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call from `client`'s bucket.
    pub fn admit(&self, client: &str) -> Result<(), Status> {
        self.take(client).map_err(Status::resource_exhausted)
    }

    /// Takes one call from `client`'s bucket; over the rate, the message to answer (the
    /// S3 gateway answers it as SlowDown).
    pub fn take(&self, client: &str) -> Result<(), String> {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(()); // a poisoned table limits nobody rather than everybody
        };
        let now = Instant::now();
        let (rate, burst) = (self.config.rate, self.config.burst);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(client) {
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(client.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(format!(
                "client {client} is over its rate of {rate} calls per second: slow down and retry (the server's DATAMOVER_CLIENT_RATE sets the limit)"
            ));
        }
        b.tokens -= 1.0;
        Ok(())
    }

    /// A client with `open` sessions begins another.
    pub fn check_sessions(&self, client: &str, open: usize) -> Result<(), Status> {
        let max = self.config.sessions_per_client;
        if open >= max {
            return Err(Status::resource_exhausted(format!(
                "client {client} already has {open} backup sessions running, the most allowed: wait for one to finish and retry (the server's DATAMOVER_MAX_SESSIONS_PER_CLIENT sets the limit)"
            )));
        }
        Ok(())
    }

    pub fn check_put(&self, chunks: usize) -> Result<(), Status> {
        let max = self.config.chunks_per_put;
        if chunks > max {
            return Err(Status::resource_exhausted(format!(
                "a PutChunks message holds {chunks} chunks, more than the {max} allowed: send them in smaller messages (the server's DATAMOVER_MAX_CHUNKS_PER_PUT sets the limit)"
            )));
        }
        Ok(())
    }

    pub fn check_catalog(&self, chunks: usize) -> Result<(), Status> {
        let max = self.config.catalog_chunks;
        if chunks > max {
            return Err(Status::resource_exhausted(format!(
                "the snapshot's catalog has {chunks} chunks, more than the {max} allowed: split the backup into smaller trees (the server's DATAMOVER_MAX_CATALOG_CHUNKS sets the limit)"
            )));
        }
        Ok(())
    }
}

/// The longest path a request may name (as Linux's PATH_MAX), and the most include and
/// exclude patterns a restore may give.
pub const MAX_PATH_BYTES: usize = 4096;
pub const MAX_PATTERNS: usize = 1024;

/// Checks a restore's selection: its path and patterns are bounded before any is
/// compiled or matched.
pub fn check_selection(path: &[u8], include: &[String], exclude: &[String]) -> Result<(), Status> {
    if path.len() > MAX_PATH_BYTES {
        return Err(Status::resource_exhausted(format!(
            "a path of {} bytes, more than the {MAX_PATH_BYTES} allowed: name a shorter path",
            path.len()
        )));
    }
    if include.len() + exclude.len() > MAX_PATTERNS {
        return Err(Status::resource_exhausted(format!(
            "{} include and exclude patterns, more than the {MAX_PATTERNS} allowed: use fewer, broader globs",
            include.len() + exclude.len()
        )));
    }
    if let Some(p) = include
        .iter()
        .chain(exclude)
        .find(|p| p.len() > MAX_PATH_BYTES)
    {
        return Err(Status::resource_exhausted(format!(
            "a pattern of {} bytes, more than the {MAX_PATH_BYTES} allowed: use a shorter glob",
            p.len()
        )));
    }
    Ok(())
}

/// The server's limits, from the environment at the first call (a bad value is logged
/// and the defaults are used).
pub fn global() -> &'static Limits {
    static LIMITS: OnceLock<Limits> = OnceLock::new();
    LIMITS.get_or_init(|| {
        let config = LimitConfig::from_env(|k| std::env::var(k).ok()).unwrap_or_else(|e| {
            tracing::error!("{e}; using the default limits");
            LimitConfig::default()
        });
        tracing::info!(
            rate = config.rate,
            burst = config.burst,
            sessions_per_client = config.sessions_per_client,
            chunks_per_put = config.chunks_per_put,
            catalog_chunks = config.catalog_chunks,
            "per-client limits"
        );
        Limits::new(config)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_over_its_rate_is_refused_and_others_are_not() {
        let l = Limits::new(LimitConfig {
            rate: 1.0,
            burst: 5.0,
            ..LimitConfig::default()
        });
        for _ in 0..5 {
            l.admit("flood").expect("within the burst");
        }
        let e = l.admit("flood").expect_err("over the rate");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("slow down"), "{}", e.message());
        l.admit("quiet").expect("another client has its own bucket");
    }

    #[test]
    fn sessions_chunks_and_catalogs_are_capped() {
        let l = Limits::new(LimitConfig {
            sessions_per_client: 2,
            chunks_per_put: 10,
            catalog_chunks: 3,
            ..LimitConfig::default()
        });
        l.check_sessions("c", 1).expect("one open");
        let e = l.check_sessions("c", 2).expect_err("two open");
        assert!(e.message().contains("wait for one to finish"), "{e}");
        l.check_put(10).expect("at the limit");
        assert_eq!(
            l.check_put(11).expect_err("over").code(),
            tonic::Code::ResourceExhausted
        );
        l.check_catalog(3).expect("at the limit");
        assert!(l.check_catalog(4).is_err());
    }

    #[test]
    fn selections_are_bounded() {
        check_selection(b"a/b", &["*.txt".into()], &[]).expect("small");
        let long = vec![b'a'; MAX_PATH_BYTES + 1];
        assert!(check_selection(&long, &[], &[]).is_err());
        let many = vec!["x".to_string(); MAX_PATTERNS + 1];
        assert!(check_selection(b"", &many, &[]).is_err());
        let e = check_selection(b"", &[], &["*".repeat(MAX_PATH_BYTES + 1)]).expect_err("long");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn config_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            LimitConfig::from_env(env(&[])).expect("defaults"),
            LimitConfig::default()
        );
        let c = LimitConfig::from_env(env(&[
            ("DATAMOVER_CLIENT_RATE", "20"),
            ("DATAMOVER_MAX_SESSIONS_PER_CLIENT", "3"),
        ]))
        .expect("parsed");
        assert_eq!((c.rate, c.burst, c.sessions_per_client), (20.0, 40.0, 3));
        let e =
            LimitConfig::from_env(env(&[("DATAMOVER_CLIENT_RATE", "fast")])).expect_err("refused");
        assert!(e.to_string().contains("DATAMOVER_CLIENT_RATE"), "{e}");
    }
}
