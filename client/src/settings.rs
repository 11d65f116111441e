//! The client's inputs: `PROTOCOLS`, `SERVER_URL`, `SERVER_DATA`, `/etc/client-secret`,
//! and, when that holds no credential, a ServiceAccount token in `DATAMOVER_TOKEN_FILE`.
//!
//! Like every `/etc/...` path, the default token file
//! `/var/run/secrets/datamover/token` resolves under `DATAMOVER_ROOT` when that is set (so
//! a local run never picks up a pod's token by accident); a `DATAMOVER_TOKEN_FILE` that is
//! set is taken as given.

use std::path::{Path, PathBuf};

use datamover_proto::fingerprint::Fingerprint;
use datamover_proto::protocols;

use crate::ClientError;

/// Everything needed to reach and authenticate to the server.
#[derive(Clone)]
pub struct ClientSettings {
    pub host: String,
    pub port: u16,
    /// The pinned server certificate, from `SERVER_DATA`.
    pub pinned: Option<Fingerprint>,
    /// The client id; for a ServiceAccount token, a placeholder until the server names
    /// the client (`system:serviceaccount:<namespace>:<name>`, set by `connect`).
    pub client_id: String,
    /// The client credential (unused with a token file).
    pub credential: String,
    /// A projected ServiceAccount token, sent instead of a client credential and read
    /// again before every connection (the kubelet rotates it).
    pub token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) when not pinning.
    pub ca_pem: Option<Vec<u8>>,
    pub hostname: String,
    pub root: Option<PathBuf>,
}

impl std::fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("pinned", &self.pinned.map(|p| p.to_hex()))
            .field("client_id", &self.client_id)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

fn etc(root: &Option<PathBuf>, rel: &str) -> PathBuf {
    resolve(root, &format!("etc/{rel}"))
}

/// An absolute path of the spec (`rel` without its leading `/`), under `DATAMOVER_ROOT`
/// when set.
fn resolve(root: &Option<PathBuf>, rel: &str) -> PathBuf {
    match root {
        Some(r) => r.join(rel),
        None => Path::new("/").join(rel),
    }
}

/// Where a pod's projected ServiceAccount token is by default (without the leading `/`).
pub const DEFAULT_TOKEN_FILE: &str = "var/run/secrets/datamover/token";

/// The placeholder client id of a token client before the server names it.
pub const TOKEN_CLIENT_ID: &str = "serviceaccount";

/// Reads a ServiceAccount token (again: the kubelet replaces it before it expires).
pub fn read_token(path: &Path) -> Result<String, ClientError> {
    let content = std::fs::read(path).map_err(|e| {
        ClientError::Auth(format!(
            "cannot read the ServiceAccount token at {} ({e}): project the token there (a serviceAccountToken volume with the audience in the DatamoverServer's status.serverInfo.tokenAudience), or set DATAMOVER_TOKEN_FILE",
            path.display()
        ))
    })?;
    let token = String::from_utf8(content)
        .map_err(|_| {
            ClientError::Auth(format!(
                "the ServiceAccount token at {} is not text",
                path.display()
            ))
        })?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(ClientError::Auth(format!(
            "the ServiceAccount token at {} is empty",
            path.display()
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::Auth(format!(
            "the ServiceAccount token at {} has characters a token cannot have",
            path.display()
        )));
    }
    Ok(token)
}

/// Splits `SERVER_URL` (`host`, `host:port`, `scheme://host:port/`, `[v6]:port`).
pub fn parse_server_url(url: &str, default_port: u16) -> Result<(String, u16), ClientError> {
    let bad = || {
        ClientError::Config(format!(
            "SERVER_URL '{url}' is not a server address: use host, host:port or https://host:port"
        ))
    };
    let rest = url.trim();
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or("");
    if rest.is_empty() {
        return Err(bad());
    }
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => default_port,
            None => return Err(bad()),
        };
        return Ok((host.to_string(), port));
    }
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port: u16 = p.parse().map_err(|_| bad())?;
            if h.is_empty() || port == 0 {
                return Err(bad());
            }
            Ok((h.to_string(), port))
        }
        Some(_) => Ok((rest.to_string(), default_port)), // bare IPv6
        None => Ok((rest.to_string(), default_port)),
    }
}

/// The client id and credential: the one file in `/etc/client-secret`; `None` when the
/// directory is missing or holds no file (and none was asked for by name).
pub fn read_client_secret(
    dir: &Path,
    wanted: Option<&str>,
) -> Result<Option<(String, String)>, ClientError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && wanted.is_none() => {
            return Ok(None);
        }
        Err(e) => {
            return Err(ClientError::Auth(format!(
                "cannot read the client secret at {} ({e}): mount the client's credential secret there (one file, named by the client id)",
                dir.display()
            )));
        }
    };
    let mut ids: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .filter(|n| dir.join(n).is_file())
        .collect();
    ids.sort();
    let id = match (wanted, ids.as_slice()) {
        (Some(w), _) if ids.iter().any(|i| i == w) => w.to_string(),
        (Some(w), _) => {
            return Err(ClientError::Auth(format!(
                "DATAMOVER_CLIENT_ID is '{w}' but {} has no such file",
                dir.display()
            )));
        }
        (None, [one]) => one.clone(),
        (None, []) => return Ok(None),
        (None, many) => {
            return Err(ClientError::Auth(format!(
                "{} holds several credentials ({}): set DATAMOVER_CLIENT_ID to the one to use",
                dir.display(),
                many.join(", ")
            )));
        }
    };
    let content = std::fs::read(dir.join(&id))
        .map_err(|e| ClientError::Auth(format!("cannot read the client credential {id}: {e}")))?;
    let token = String::from_utf8(content)
        .map_err(|_| ClientError::Auth(format!("the credential file {id} is not text")))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(ClientError::Auth(format!(
            "the credential file {id} is empty"
        )));
    }
    Ok(Some((id, token)))
}

/// The client secret, else the ServiceAccount token file; neither: an error naming both.
fn credential(
    secret_dir: &Path,
    wanted: Option<&str>,
    token_file: PathBuf,
) -> Result<(String, String, Option<PathBuf>), ClientError> {
    if let Some((id, credential)) = read_client_secret(secret_dir, wanted)? {
        return Ok((id, credential, None));
    }
    match std::fs::metadata(&token_file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ClientError::Auth(format!(
            "no client credential: {} holds none (mount the client's credential secret there: one file, named by the client id), and there is no ServiceAccount token at {} (in a pod, project one there with the audience in the DatamoverServer's status.serverInfo.tokenAudience, or point DATAMOVER_TOKEN_FILE at it)",
            secret_dir.display(),
            token_file.display()
        ))),
        _ => {
            // Checked now, so a bad file fails at once; read again for every connection.
            read_token(&token_file)?;
            Ok((TOKEN_CLIENT_ID.to_string(), String::new(), Some(token_file)))
        }
    }
}

impl ClientSettings {
    pub fn load(env: impl Fn(&str) -> Option<String>) -> Result<ClientSettings, ClientError> {
        let root = env("DATAMOVER_ROOT")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let protos = protocols::parse(env("PROTOCOLS").as_deref())
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let port = protos
            .iter()
            .find(|p| p.name == datamover_proto::PROTOCOL_NAME)
            .map(|p| p.port)
            .ok_or_else(|| {
                ClientError::Config(format!(
                    "PROTOCOLS lists no protocol this client speaks (it speaks {}): add {}:<port>",
                    datamover_proto::PROTOCOL_NAME,
                    datamover_proto::PROTOCOL_NAME
                ))
            })?;
        let url = env("SERVER_URL")
            .or_else(|| env("SESSION_URL"))
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                ClientError::Config(
                    "SERVER_URL is not set: set it to the DatamoverServer's service address (host or host:port)".into(),
                )
            })?;
        let (host, port) = parse_server_url(&url, port)?;
        let pinned = env("SERVER_DATA")
            .or_else(|| env("SESSION_DATA"))
            .filter(|s| !s.trim().is_empty())
            .map(|v| Fingerprint::parse(&v).map_err(|e| ClientError::Config(e.to_string())))
            .transpose()?;
        let token_file = env("DATAMOVER_TOKEN_FILE")
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| resolve(&root, DEFAULT_TOKEN_FILE));
        let (client_id, credential, token_file) = credential(
            &etc(&root, "client-secret"),
            env("DATAMOVER_CLIENT_ID").as_deref(),
            token_file,
        )?;
        let ca_pem = find_secret_key(&etc(&root, "secrets"), "ca.crt");
        let hostname = env("DATAMOVER_HOSTNAME")
            .or_else(|| {
                hostname::get()
                    .ok()
                    .map(|h| h.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        Ok(ClientSettings {
            host,
            port,
            pinned,
            client_id,
            credential,
            token_file,
            ca_pem,
            hostname,
            root,
        })
    }
}

fn find_secret_key(dir: &Path, key: &str) -> Option<Vec<u8>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .find_map(|d| std::fs::read(d.join(key)).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_server_url("srv", 1).unwrap(), ("srv".into(), 1));
        assert_eq!(parse_server_url("srv:2", 1).unwrap(), ("srv".into(), 2));
        assert_eq!(
            parse_server_url("https://srv.ns.svc:3/", 1).unwrap(),
            ("srv.ns.svc".into(), 3)
        );
        assert_eq!(parse_server_url("[::1]:4", 1).unwrap(), ("::1".into(), 4));
        assert!(parse_server_url("srv:x", 1).is_err());
        assert!(parse_server_url("", 1).is_err());
    }

    #[test]
    fn client_secret() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_client_secret(d.path(), None).unwrap(), None);
        assert_eq!(
            read_client_secret(&d.path().join("missing"), None).unwrap(),
            None
        );
        assert!(read_client_secret(&d.path().join("missing"), Some("x")).is_err());
        std::fs::write(d.path().join("edge-1"), "tok\n").unwrap();
        std::fs::create_dir(d.path().join("..data")).unwrap();
        assert_eq!(
            read_client_secret(d.path(), None).unwrap(),
            Some(("edge-1".into(), "tok".into()))
        );
        std::fs::write(d.path().join("edge-2"), "t2").unwrap();
        assert!(read_client_secret(d.path(), None).is_err());
        assert_eq!(
            read_client_secret(d.path(), Some("edge-2"))
                .unwrap()
                .unwrap()
                .1,
            "t2"
        );
    }

    fn load(root: &Path, extra: &[(&str, &str)]) -> Result<ClientSettings, ClientError> {
        let mut env: Vec<(String, String)> = vec![
            ("DATAMOVER_ROOT".into(), root.display().to_string()),
            ("SERVER_URL".into(), "srv:1".into()),
            ("PROTOCOLS".into(), "datamover-v1:1".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        ClientSettings::load(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn a_service_account_token_when_there_is_no_credential() {
        let d = tempfile::tempdir().unwrap();
        // Neither: one error naming both.
        let e = load(d.path(), &[]).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let m = e.to_string();
        assert!(m.contains("etc/client-secret holds none"), "{m}");
        assert!(m.contains("var/run/secrets/datamover/token"), "{m}");
        assert!(
            m.contains("tokenAudience") && m.contains("DATAMOVER_TOKEN_FILE"),
            "{m}"
        );

        // The default token file resolves under DATAMOVER_ROOT.
        let token = d.path().join(DEFAULT_TOKEN_FILE);
        std::fs::create_dir_all(token.parent().unwrap()).unwrap();
        std::fs::write(&token, "eyJ.a.b\n").unwrap();
        let s = load(d.path(), &[]).unwrap();
        assert_eq!(s.token_file.as_deref(), Some(token.as_path()));
        assert_eq!(s.client_id, TOKEN_CLIENT_ID);
        assert_eq!(read_token(&token).unwrap(), "eyJ.a.b");

        // DATAMOVER_TOKEN_FILE is taken as given.
        let other = d.path().join("elsewhere");
        std::fs::write(&other, "t").unwrap();
        let s = load(
            d.path(),
            &[("DATAMOVER_TOKEN_FILE", other.to_str().unwrap())],
        )
        .unwrap();
        assert_eq!(s.token_file.as_deref(), Some(other.as_path()));

        // An empty token file is an error of its own.
        std::fs::write(&token, "\n").unwrap();
        let m = load(d.path(), &[]).unwrap_err().to_string();
        assert!(m.contains("is empty"), "{m}");

        // A client credential wins over the token.
        std::fs::write(&token, "t").unwrap();
        std::fs::create_dir_all(d.path().join("etc/client-secret")).unwrap();
        std::fs::write(d.path().join("etc/client-secret/edge"), "c").unwrap();
        let s = load(d.path(), &[]).unwrap();
        assert_eq!((s.client_id.as_str(), s.token_file), ("edge", None));
    }
}
