//! The server's inputs, as the spec lists them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use datamover_proto::protocols;
use datamover_repo::store::S3Options;

use crate::ServerError;

/// Resolves the spec's absolute paths, under `DATAMOVER_ROOT` when set.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    pub root: Option<PathBuf>,
}

impl Paths {
    pub fn new(root: Option<PathBuf>) -> Self {
        Paths { root }
    }

    /// `/etc/<rel>`, or `$DATAMOVER_ROOT/etc/<rel>`.
    pub fn etc(&self, rel: &str) -> PathBuf {
        self.resolve(&format!("etc/{rel}"))
    }

    pub fn resolve(&self, rel: &str) -> PathBuf {
        match &self.root {
            Some(r) => r.join(rel),
            None => Path::new("/").join(rel),
        }
    }
}

/// Files of a mounted ConfigMap or Secret: name -> content. Kubelet's bookkeeping entries
/// (`..data`, `..2024_…`) start with a dot and are skipped; the key files are symlinks
/// into them and are read through.
pub fn read_mount(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_file()
            && let Ok(content) = std::fs::read(&path)
        {
            out.insert(name, content);
        }
    }
    out
}

/// Where the repository lives.
#[derive(Debug, Clone)]
pub enum StorageSettings {
    Filesystem(PathBuf),
    S3(S3Options),
}

impl StorageSettings {
    pub fn describe(&self) -> String {
        match self {
            StorageSettings::Filesystem(p) => format!("filesystem {}", p.display()),
            StorageSettings::S3(o) => format!(
                "s3 bucket {} prefix '{}' at {}",
                o.bucket,
                o.prefix,
                o.endpoint.as_deref().unwrap_or("AWS")
            ),
        }
    }
}

/// The `PROTOCOLS` name of the S3 gateway.
pub const S3_PROTOCOL: &str = "s3";

/// Everything the server needs to start.
pub struct Settings {
    pub paths: Paths,
    pub port: u16,
    /// The port of the S3 gateway (`s3:<port>` in `PROTOCOLS`), off when `None`.
    pub s3_port: Option<u16>,
    pub listen_host: String,
    pub http_addr: String,
    pub storage: StorageSettings,
    pub repo_password: Vec<u8>,
    /// PEM certificate chain and key from a kubernetes.io/tls secret.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Extra names for a generated certificate.
    pub tls_names: Vec<String>,
    /// Attempts to reach storage at start.
    pub startup_attempts: u32,
    pub log_json: bool,
    pub maintenance: crate::maintenance::MaintenanceSettings,
    /// Where edge sync keeps plain objects, relative to the bucket (S3) or the storage
    /// directory (filesystem): config key `syncPrefix`, default `<prefix>/sync`.
    pub sync_prefix: String,
    pub config: BTreeMap<String, String>,
    /// The Kubernetes API, for ServiceAccount clients.
    pub kube: crate::token_review::KubeSettings,
    /// The local on-disk chunk index (`DATAMOVER_INDEX_CACHE`, default
    /// `/var/cache/datamover/index`): a cache, rebuilt from the bucket's `index/` objects
    /// when missing; an emptyDir volume is enough.
    pub index_cache: PathBuf,
    /// `DATAMOVER_INDEX_CACHE` was set: no fallback when it cannot be used.
    pub index_cache_set: bool,
    /// Per-client limits: config keys `clientRate`, `clientBurst`, `maxSessionsPerClient`,
    /// `maxChunksPerPut`, `maxCatalogChunks`, `maxPathBytes`, each overridden by its
    /// `DATAMOVER_…` variable (see [`crate::limits`]).
    pub limits: crate::limits::LimitConfig,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("paths", &self.paths)
            .field("port", &self.port)
            .field("storage", &self.storage)
            .field("tls_given", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn truthy(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Some(true),
        "false" | "no" | "0" | "off" | "" => Some(false),
        _ => None,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

impl Settings {
    /// Reads the environment (through `env`) and the mounted files.
    pub fn load(env: impl Fn(&str) -> Option<String>) -> Result<Settings, ServerError> {
        let paths = Paths::new(
            env("DATAMOVER_ROOT")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );

        let protos = protocols::parse(env("PROTOCOLS").as_deref())
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let mut port = None;
        let mut s3_port = None;
        for p in &protos {
            if p.name == datamover_proto::PROTOCOL_NAME {
                port = Some(p.port);
            } else if p.name == S3_PROTOCOL {
                s3_port = Some(p.port);
            } else {
                return Err(ServerError::Config(format!(
                    "PROTOCOLS lists '{}', which this server does not support; it supports only {} and {S3_PROTOCOL}",
                    p.name,
                    datamover_proto::PROTOCOL_NAME
                )));
            }
        }
        let port = port.ok_or_else(|| {
            ServerError::Config(format!(
                "PROTOCOLS does not list {}",
                datamover_proto::PROTOCOL_NAME
            ))
        })?;

        let config: BTreeMap<String, String> = read_mount(&paths.etc("config"))
            .into_iter()
            .map(|(k, v)| (k, text(&v)))
            .collect();

        // Secrets: every key is looked up across all mounted secrets.
        let secrets_dir = paths.etc("secrets");
        let mut secrets: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(&secrets_dir) {
            let mut dirs: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            for d in dirs {
                for (k, v) in read_mount(&d) {
                    secrets.entry(k).or_insert(v);
                }
            }
        }

        let repo_password = secrets
            .get("repo-password")
            .map(|v| {
                let mut v = v.clone();
                while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    v.pop();
                }
                v
            })
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ServerError::Config(format!(
                    "no repository password: mount a secret with the key repo-password under {}",
                    secrets_dir.display()
                ))
            })?;

        let storage = Self::storage(&config, &secrets, &paths)?;

        let tls = match (secrets.get("tls.crt"), secrets.get("tls.key")) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(ServerError::Config(
                    "a TLS secret needs both tls.crt and tls.key (a kubernetes.io/tls secret)"
                        .into(),
                ));
            }
        };

        let log_json = env("DATAMOVER_LOG_FORMAT")
            .or_else(|| config.get("logFormat").cloned())
            .is_some_and(|v| v.eq_ignore_ascii_case("json"));
        let startup_attempts = config
            .get("startupAttempts")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        let tls_names = env("DATAMOVER_TLS_NAMES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();

        let duration = |key: &str| -> Result<Option<std::time::Duration>, ServerError> {
            match config.get(key).map(String::as_str) {
                None | Some("") | Some("off") | Some("never") => Ok(None),
                Some(v) => humantime::parse_duration(v).map(Some).map_err(|e| {
                    ServerError::Config(format!(
                        "config key {key} = '{v}' is not a duration ({e}); write e.g. 24h or 30m"
                    ))
                }),
            }
        };
        let mut maintenance = crate::maintenance::MaintenanceSettings {
            interval: duration("maintenanceInterval")?,
            ..Default::default()
        };
        if let Some(g) = duration("maintenanceGrace")? {
            maintenance.grace = g;
        }
        if config.contains_key("s3UploadMaxAge") {
            maintenance.s3_upload_max_age = duration("s3UploadMaxAge")?;
        }

        let sync_prefix = match config.get("syncPrefix").map(|s| s.trim().trim_matches('/')) {
            Some(p) if !p.is_empty() => {
                if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                    return Err(ServerError::Config(format!(
                        "config key syncPrefix = '{p}' is not a plain key prefix: use names separated by '/', e.g. edge/sync"
                    )));
                }
                p.to_string()
            }
            _ => match &storage {
                StorageSettings::S3(o) if !o.prefix.trim_matches('/').is_empty() => {
                    format!("{}/sync", o.prefix.trim_matches('/'))
                }
                _ => "sync".to_string(),
            },
        };

        let limits = crate::limits::LimitConfig::from_settings(&config, &env)
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let kube = crate::token_review::KubeSettings::from_env(&env, &paths);
        let index_cache_env = env("DATAMOVER_INDEX_CACHE").filter(|s| !s.is_empty());
        let index_cache_set = index_cache_env.is_some();
        let index_cache = index_cache_env
            .map(PathBuf::from)
            .unwrap_or_else(|| paths.resolve("var/cache/datamover/index"));
        Ok(Settings {
            limits,
            index_cache,
            index_cache_set,
            kube,
            sync_prefix,
            maintenance,
            port,
            s3_port,
            listen_host: env("DATAMOVER_LISTEN_HOST").unwrap_or_else(|| "0.0.0.0".into()),
            http_addr: env("DATAMOVER_HTTP_ADDR").unwrap_or_else(|| "0.0.0.0:8080".into()),
            storage,
            repo_password,
            tls,
            tls_names,
            startup_attempts,
            log_json,
            config,
            paths,
        })
    }

    fn storage(
        config: &BTreeMap<String, String>,
        secrets: &BTreeMap<String, Vec<u8>>,
        paths: &Paths,
    ) -> Result<StorageSettings, ServerError> {
        let obc = config.contains_key("BUCKET_NAME") || config.contains_key("BUCKET_HOST");
        let kind = config
            .get("type")
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_else(|| {
                if obc {
                    "s3".into()
                } else {
                    "filesystem".into()
                }
            });
        match kind.as_str() {
            "filesystem" | "fs" | "local" => {
                let path = config
                    .get("path")
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
                    .unwrap_or_else(|| paths.resolve("var/lib/datamover"));
                Ok(StorageSettings::Filesystem(path))
            }
            "s3" | "s3compliant" => {
                let bucket = config
                    .get("bucket")
                    .or_else(|| config.get("BUCKET_NAME"))
                    .filter(|b| !b.is_empty())
                    .cloned()
                    .ok_or_else(|| {
                        ServerError::Config(
                            "storage type s3 needs a bucket: set the config key 'bucket' (or BUCKET_NAME)".into(),
                        )
                    })?;
                let endpoint = match (config.get("endpoint"), config.get("BUCKET_HOST")) {
                    (Some(ep), _) if !ep.is_empty() => Some(if ep.contains("://") {
                        ep.clone()
                    } else {
                        format!("https://{ep}")
                    }),
                    (_, Some(host)) if !host.is_empty() => {
                        let port = config.get("BUCKET_PORT").cloned().unwrap_or_default();
                        let tls = match config.get("TLS_HOST") {
                            Some(v) => truthy(v).unwrap_or(true),
                            None => port.is_empty() || port == "443",
                        };
                        let scheme = if tls { "https" } else { "http" };
                        Some(if port.is_empty() {
                            format!("{scheme}://{host}")
                        } else {
                            format!("{scheme}://{host}:{port}")
                        })
                    }
                    _ => None,
                };
                if let Some(v) = config.get("skipSSLVerify")
                    && truthy(v) == Some(true)
                {
                    return Err(ServerError::Config(
                            "skipSSLVerify=true is not supported: the server never talks to storage unverified; mount the endpoint's CA certificate as ca.crt in a secret instead".into(),
                        ));
                }
                let path_style = config
                    .get("pathStyle")
                    .and_then(|v| truthy(v))
                    .unwrap_or(endpoint.is_some());
                let access_key_id = secrets
                    .get("AWS_ACCESS_KEY_ID")
                    .map(|v| text(v))
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        ServerError::Config(
                            "storage type s3 needs credentials: mount a secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY under /etc/secrets/<name>/".into(),
                        )
                    })?;
                let secret_access_key = secrets
                    .get("AWS_SECRET_ACCESS_KEY")
                    .map(|v| text(v))
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        ServerError::Config(
                            "the storage secret has AWS_ACCESS_KEY_ID but no AWS_SECRET_ACCESS_KEY"
                                .into(),
                        )
                    })?;
                Ok(StorageSettings::S3(S3Options {
                    bucket,
                    prefix: config.get("prefix").cloned().unwrap_or_default(),
                    region: config
                        .get("region")
                        .or_else(|| config.get("BUCKET_REGION"))
                        .filter(|r| !r.is_empty())
                        .cloned(),
                    endpoint,
                    path_style,
                    access_key_id,
                    secret_access_key,
                    session_token: secrets
                        .get("AWS_SESSION_TOKEN")
                        .map(|v| text(v))
                        .filter(|v| !v.is_empty()),
                    ca_pem: secrets.get("ca.crt").cloned(),
                    max_attempts: config
                        .get("s3MaxAttempts")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(6),
                    unsigned_payload: None,
                }))
            }
            other => Err(ServerError::Config(format!(
                "storage type '{other}' is not supported: set the config key 'type' to s3 or filesystem"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn setup(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (p, c) in files {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, c).unwrap();
        }
        dir
    }

    fn load(dir: &tempfile::TempDir, extra: &[(&str, &str)]) -> Result<Settings, ServerError> {
        let mut env: HashMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.insert("DATAMOVER_ROOT".into(), dir.path().display().to_string());
        Settings::load(|k| env.get(k).cloned())
    }

    #[test]
    fn defaults_to_embedded_filesystem() {
        let d = setup(&[("etc/secrets/repo/repo-password", "pw\n")]);
        let s = load(&d, &[]).unwrap();
        assert_eq!(s.port, 51515);
        assert_eq!(s.repo_password, b"pw");
        match s.storage {
            StorageSettings::Filesystem(p) => assert_eq!(p, d.path().join("var/lib/datamover")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requires_password_and_known_protocols() {
        let d = setup(&[]);
        let e = load(&d, &[]).unwrap_err().to_string();
        assert!(e.contains("repo-password"), "{e}");
        let d = setup(&[("etc/secrets/repo/repo-password", "pw")]);
        let e = load(&d, &[("PROTOCOLS", "datamover-v1:1;kopia:2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'kopia'"), "{e}");
        let s = load(&d, &[("PROTOCOLS", "datamover-v1:1;s3:9000")]).unwrap();
        assert_eq!((s.port, s.s3_port), (1, Some(9000)));
        assert_eq!(load(&d, &[]).unwrap().s3_port, None);
    }

    #[test]
    fn obc_configmap() {
        let d = setup(&[
            ("etc/secrets/repo/repo-password", "pw"),
            ("etc/secrets/s3/AWS_ACCESS_KEY_ID", "AK"),
            ("etc/secrets/s3/AWS_SECRET_ACCESS_KEY", "SK"),
            ("etc/config/BUCKET_HOST", "s3.example"),
            ("etc/config/BUCKET_PORT", "8080"),
            ("etc/config/BUCKET_NAME", "b1"),
            ("etc/config/TLS_HOST", "false"),
        ]);
        match load(&d, &[]).unwrap().storage {
            StorageSettings::S3(o) => {
                assert_eq!(o.bucket, "b1");
                assert_eq!(o.endpoint.as_deref(), Some("http://s3.example:8080"));
                assert!(o.path_style);
                assert_eq!(o.access_key_id, "AK");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn limits_from_config_keys_and_variables() {
        let d = setup(&[
            ("etc/secrets/repo/repo-password", "pw"),
            ("etc/config/clientRate", "3\n"),
            ("etc/config/maxChunksPerPut", "10"),
        ]);
        let s = load(&d, &[("DATAMOVER_MAX_CHUNKS_PER_PUT", "20")]).unwrap();
        assert_eq!(
            (s.limits.rate, s.limits.burst, s.limits.chunks_per_put),
            (3.0, 6.0, 20)
        );
        let d = setup(&[
            ("etc/secrets/repo/repo-password", "pw"),
            ("etc/config/maxSessionsPerClient", "many"),
        ]);
        let e = load(&d, &[]).unwrap_err().to_string();
        assert!(e.contains("maxSessionsPerClient='many'"), "{e}");
    }

    #[test]
    fn kubelet_layout_is_read_through_symlinks() {
        let d = setup(&[("etc/secrets/repo/..2024_01_01/repo-password", "secret")]);
        let dir = d.path().join("etc/secrets/repo");
        std::os::unix::fs::symlink("..2024_01_01", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/repo-password", dir.join("repo-password")).unwrap();
        assert_eq!(load(&d, &[]).unwrap().repo_password, b"secret");
    }
}
