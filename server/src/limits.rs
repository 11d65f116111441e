//! Limits against abuse, per client: calls per second (a token bucket), open backup
//! sessions, chunks per `PutChunks` message, catalog chunks per commit, and the length of
//! a restore's path and patterns ([`check_selection`]). A client over
//! a limit gets RESOURCE_EXHAUSTED saying which limit and what to do; other clients are
//! not affected (each has its own bucket). The S3 gateway's requests take from the same
//! bucket as the client's gRPC calls; over the rate they are answered SlowDown (HTTP 503).
//! Every refusal counts in `datamover_limit_refusals_total{limit="…"}` ([`LIMIT_NAMES`]).
//!
//! Set by the server's ConfigMap (`/etc/config/<key>`) or, winning over it, environment
//! variables (what the controller sets from the DatamoverServer's `spec.limits`):
//!
//! | config key | variable | default |
//! | --- | --- | --- |
//! | `clientRate` | `DATAMOVER_CLIENT_RATE` | 1000 calls per second |
//! | `clientBurst` | `DATAMOVER_CLIENT_BURST` | twice the rate |
//! | `maxSessionsPerClient` | `DATAMOVER_MAX_SESSIONS_PER_CLIENT` | 16 |
//! | `maxChunksPerPut` | `DATAMOVER_MAX_CHUNKS_PER_PUT` | 262144 (more than a 16 MiB message of the smallest chunks holds) |
//! | `maxCatalogChunks` | `DATAMOVER_MAX_CATALOG_CHUNKS` | 1048576 |
//! | `maxPathBytes` | `DATAMOVER_MAX_PATH_BYTES` | 4096 (a restore's path and each pattern) |
//!
//! [`crate::run::run`] installs the limits of its settings ([`init`]); without that
//! (tools, tests) [`global`] reads the environment at its first call.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use prometheus::{IntCounterVec, Opts};
use thiserror::Error;
use tonic::Status;

#[derive(Debug, Clone, PartialEq)]
pub struct LimitConfig {
    pub rate: f64,
    pub burst: f64,
    pub sessions_per_client: usize,
    pub chunks_per_put: usize,
    pub catalog_chunks: usize,
    /// The longest path (and pattern) a restore may name.
    pub path_bytes: usize,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            rate: 1000.0,
            burst: 2000.0,
            sessions_per_client: 16,
            chunks_per_put: 262_144,
            catalog_chunks: 1_048_576,
            path_bytes: MAX_PATH_BYTES,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum LimitError {
    #[error("{name}='{value}' is not a positive number: unset it or give one")]
    Bad { name: String, value: String },
}

/// Each limit: (config key, environment variable).
const RATE: (&str, &str) = ("clientRate", "DATAMOVER_CLIENT_RATE");
const BURST: (&str, &str) = ("clientBurst", "DATAMOVER_CLIENT_BURST");
const SESSIONS: (&str, &str) = ("maxSessionsPerClient", "DATAMOVER_MAX_SESSIONS_PER_CLIENT");
const CHUNKS_PER_PUT: (&str, &str) = ("maxChunksPerPut", "DATAMOVER_MAX_CHUNKS_PER_PUT");
const CATALOG_CHUNKS: (&str, &str) = ("maxCatalogChunks", "DATAMOVER_MAX_CATALOG_CHUNKS");
const PATH_BYTES: (&str, &str) = ("maxPathBytes", "DATAMOVER_MAX_PATH_BYTES");

/// The `limit` label values of `datamover_limit_refusals_total`.
pub const LIMIT_NAMES: [&str; 6] = [
    "rate",
    "sessions",
    "chunks_per_put",
    "catalog_chunks",
    "path_bytes",
    "patterns",
];

impl LimitConfig {
    /// From the environment (`get` looks a variable up); unset ones keep their default.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<LimitConfig, LimitError> {
        Self::from_settings(&BTreeMap::new(), get)
    }

    /// From the server's config keys and the environment (`get` looks a variable up; a
    /// variable wins over the key); unset ones keep their default.
    pub fn from_settings(
        config: &BTreeMap<String, String>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<LimitConfig, LimitError> {
        let mut c = LimitConfig::default();
        let num = |(key, var): (&str, &str)| -> Result<Option<f64>, LimitError> {
            let (name, value) = match get(var) {
                Some(v) => (var, v),
                None => match config.get(key) {
                    Some(v) => (key, v.clone()),
                    None => return Ok(None),
                },
            };
            match value.trim().parse::<f64>() {
                Ok(n) if n.is_finite() && n > 0.0 => Ok(Some(n)),
                _ => Err(LimitError::Bad {
                    name: name.to_string(),
                    value,
                }),
            }
        };
        // A count: at least 1, and no more than a usize holds.
        let count = |n: f64| (n as usize).max(1);
        if let Some(r) = num(RATE)? {
            c.rate = r;
            c.burst = 2.0 * r;
        }
        if let Some(b) = num(BURST)? {
            c.burst = b.max(1.0);
        }
        if let Some(n) = num(SESSIONS)? {
            c.sessions_per_client = count(n);
        }
        if let Some(n) = num(CHUNKS_PER_PUT)? {
            c.chunks_per_put = count(n);
        }
        if let Some(n) = num(CATALOG_CHUNKS)? {
            c.catalog_chunks = count(n);
        }
        if let Some(n) = num(PATH_BYTES)? {
            c.path_bytes = count(n);
        }
        Ok(c)
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limits, each client's token bucket, and the count of refusals per limit.
pub struct Limits {
    pub config: LimitConfig,
    buckets: Mutex<HashMap<String, Bucket>>,
    refusals: IntCounterVec,
}

/// Buckets kept at most; full (idle) ones are dropped first when there are more.
const MAX_BUCKETS: usize = 65_536;

/// The counter of refusals, by limit (registered by [`crate::metrics::Metrics`]).
pub fn refusals_counter() -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(
        Opts::new(
            "datamover_limit_refusals_total",
            "Requests refused because a client was over a limit, by limit",
        ),
        &["limit"],
    )
}

impl Limits {
    /// Limits counting their refusals in a counter of their own.
    pub fn new(config: LimitConfig) -> Limits {
        // Its name and label are constants, valid: creating it cannot fail.
        let refusals =
            refusals_counter().unwrap_or_else(|e| unreachable!("a constant counter: {e}"));
        Self::with_refusals(config, refusals)
    }

    /// Limits counting their refusals in `refusals` (the server's metric).
    pub fn with_refusals(config: LimitConfig, refusals: IntCounterVec) -> Limits {
        for name in LIMIT_NAMES {
            // Present at 0 from the start, so a rate over time has a beginning.
            refusals.with_label_values(&[name]);
        }
        Limits {
            config,
            buckets: Mutex::new(HashMap::new()),
            refusals,
        }
    }

    /// Refusals so far of the limit `name` (one of [`LIMIT_NAMES`]).
    pub fn refusals(&self, name: &str) -> u64 {
        self.refusals.with_label_values(&[name]).get()
    }

    fn refuse(&self, name: &str, message: String) -> Status {
        self.refusals.with_label_values(&[name]).inc();
        Status::resource_exhausted(message)
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
            self.refusals.with_label_values(&["rate"]).inc();
            return Err(format!(
                "client {client} is over its rate of {rate} calls per second: slow down and retry (the server's clientRate / DATAMOVER_CLIENT_RATE sets the limit)"
            ));
        }
        b.tokens -= 1.0;
        Ok(())
    }

    /// A client with `open` sessions begins another.
    pub fn check_sessions(&self, client: &str, open: usize) -> Result<(), Status> {
        let max = self.config.sessions_per_client;
        if open >= max {
            return Err(self.refuse("sessions", format!(
                "client {client} already has {open} backup sessions running, the most allowed: wait for one to finish and retry (the server's maxSessionsPerClient / DATAMOVER_MAX_SESSIONS_PER_CLIENT sets the limit)"
            )));
        }
        Ok(())
    }

    pub fn check_put(&self, chunks: usize) -> Result<(), Status> {
        let max = self.config.chunks_per_put;
        if chunks > max {
            return Err(self.refuse("chunks_per_put", format!(
                "a PutChunks message holds {chunks} chunks, more than the {max} allowed: send them in smaller messages (the server's maxChunksPerPut / DATAMOVER_MAX_CHUNKS_PER_PUT sets the limit)"
            )));
        }
        Ok(())
    }

    pub fn check_catalog(&self, chunks: usize) -> Result<(), Status> {
        let max = self.config.catalog_chunks;
        if chunks > max {
            return Err(self.refuse("catalog_chunks", format!(
                "the snapshot's catalog has {chunks} chunks, more than the {max} allowed: split the backup into smaller trees (the server's maxCatalogChunks / DATAMOVER_MAX_CATALOG_CHUNKS sets the limit)"
            )));
        }
        Ok(())
    }

    /// Checks a restore's selection: its path and patterns are bounded before any is
    /// compiled or matched.
    pub fn check_selection(
        &self,
        path: &[u8],
        include: &[String],
        exclude: &[String],
    ) -> Result<(), Status> {
        let max = self.config.path_bytes;
        if path.len() > max {
            return Err(self.refuse(
                "path_bytes",
                format!(
                    "a path of {} bytes, more than the {max} allowed: name a shorter path (the server's maxPathBytes / DATAMOVER_MAX_PATH_BYTES sets the limit)",
                    path.len()
                ),
            ));
        }
        if include.len() + exclude.len() > MAX_PATTERNS {
            return Err(self.refuse(
                "patterns",
                format!(
                    "{} include and exclude patterns, more than the {MAX_PATTERNS} allowed: use fewer, broader globs",
                    include.len() + exclude.len()
                ),
            ));
        }
        if let Some(p) = include.iter().chain(exclude).find(|p| p.len() > max) {
            return Err(self.refuse(
                "path_bytes",
                format!(
                    "a pattern of {} bytes, more than the {max} allowed: use a shorter glob (the server's maxPathBytes / DATAMOVER_MAX_PATH_BYTES sets the limit)",
                    p.len()
                ),
            ));
        }
        Ok(())
    }
}

/// The default longest path a request may name (as Linux's PATH_MAX), and the most
/// include and exclude patterns a restore may give.
pub const MAX_PATH_BYTES: usize = 4096;
pub const MAX_PATTERNS: usize = 1024;

/// Checks a restore's selection against the server's limits ([`Limits::check_selection`]).
pub fn check_selection(path: &[u8], include: &[String], exclude: &[String]) -> Result<(), Status> {
    global().check_selection(path, include, exclude)
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Installs the server's limits (from its settings) before any request; false when
/// limits were already in place (a second server in one process keeps the first's).
pub fn init(limits: Limits) -> bool {
    let c = limits.config.clone();
    let installed = LIMITS.set(limits).is_ok();
    if installed {
        tracing::info!(
            rate = c.rate,
            burst = c.burst,
            sessions_per_client = c.sessions_per_client,
            chunks_per_put = c.chunks_per_put,
            catalog_chunks = c.catalog_chunks,
            path_bytes = c.path_bytes,
            "per-client limits"
        );
    }
    installed
}

/// The server's limits: those [`init`] installed, or else from the environment at the
/// first call (a bad value is logged and the defaults are used).
pub fn global() -> &'static Limits {
    LIMITS.get_or_init(|| {
        let config = LimitConfig::from_env(|k| std::env::var(k).ok()).unwrap_or_else(|e| {
            tracing::error!("{e}; using the default limits");
            LimitConfig::default()
        });
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
        let l = Limits::new(LimitConfig::default());
        l.check_selection(b"a/b", &["*.txt".into()], &[])
            .expect("small");
        let long = vec![b'a'; MAX_PATH_BYTES + 1];
        assert!(l.check_selection(&long, &[], &[]).is_err());
        let many = vec!["x".to_string(); MAX_PATTERNS + 1];
        assert!(l.check_selection(b"", &many, &[]).is_err());
        let e = l
            .check_selection(b"", &[], &["*".repeat(MAX_PATH_BYTES + 1)])
            .expect_err("long");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!((l.refusals("path_bytes"), l.refusals("patterns")), (2, 1));
        // A shorter configured path length.
        let l = Limits::new(LimitConfig {
            path_bytes: 8,
            ..LimitConfig::default()
        });
        l.check_selection(b"12345678", &[], &[])
            .expect("at the limit");
        let e = l.check_selection(b"123456789", &[], &[]).expect_err("over");
        assert!(e.message().contains("maxPathBytes"), "{e}");
    }

    #[test]
    fn every_refusal_is_counted_by_limit() {
        let l = Limits::new(LimitConfig {
            rate: 1.0,
            burst: 1.0,
            sessions_per_client: 1,
            chunks_per_put: 1,
            catalog_chunks: 1,
            ..LimitConfig::default()
        });
        for name in LIMIT_NAMES {
            assert_eq!(l.refusals(name), 0, "{name}");
        }
        l.admit("c").expect("the burst");
        assert!(l.admit("c").is_err());
        assert!(l.take("c").is_err());
        assert!(l.check_sessions("c", 1).is_err());
        assert!(l.check_put(2).is_err());
        assert!(l.check_catalog(2).is_err());
        l.check_put(1).expect("within");
        assert_eq!(
            LIMIT_NAMES.map(|n| l.refusals(n)),
            [2, 1, 1, 1, 0, 0],
            "{LIMIT_NAMES:?}"
        );
    }

    #[test]
    fn config_keys_and_variables_over_them() {
        let config: BTreeMap<String, String> = [
            ("clientRate", "5"),
            ("maxChunksPerPut", "7"),
            ("maxPathBytes", "100"),
            ("maxSessionsPerClient", "4"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = LimitConfig::from_settings(&config, |k| {
            (k == "DATAMOVER_MAX_SESSIONS_PER_CLIENT").then(|| "9".to_string())
        })
        .expect("parsed");
        assert_eq!(
            (
                c.rate,
                c.burst,
                c.chunks_per_put,
                c.path_bytes,
                c.sessions_per_client
            ),
            (5.0, 10.0, 7, 100, 9)
        );
        assert_eq!(c.catalog_chunks, LimitConfig::default().catalog_chunks);
        let bad: BTreeMap<String, String> = [("maxCatalogChunks".to_string(), "-3".to_string())]
            .into_iter()
            .collect();
        let e = LimitConfig::from_settings(&bad, |_| None).expect_err("refused");
        assert!(e.to_string().contains("maxCatalogChunks='-3'"), "{e}");
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
