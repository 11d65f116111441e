//! The client's inputs: `PROTOCOLS`, `SERVER_URL`, `SERVER_DATA`, `/etc/client-secret`.

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
    pub client_id: String,
    pub credential: String,
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
            .finish_non_exhaustive()
    }
}

fn etc(root: &Option<PathBuf>, rel: &str) -> PathBuf {
    match root {
        Some(r) => r.join("etc").join(rel),
        None => Path::new("/etc").join(rel),
    }
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

/// The client id and credential: the one file in `/etc/client-secret`.
pub fn read_client_secret(
    dir: &Path,
    wanted: Option<&str>,
) -> Result<(String, String), ClientError> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        ClientError::Auth(format!(
            "cannot read the client secret at {} ({e}): mount the client's credential secret there (one file, named by the client id)",
            dir.display()
        ))
    })?;
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
        (None, []) => {
            return Err(ClientError::Auth(format!(
                "{} holds no credential: mount the client's credential secret there",
                dir.display()
            )));
        }
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
    Ok((id, token))
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
        let (client_id, credential) = read_client_secret(
            &etc(&root, "client-secret"),
            env("DATAMOVER_CLIENT_ID").as_deref(),
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
        assert!(read_client_secret(d.path(), None).is_err());
        std::fs::write(d.path().join("edge-1"), "tok\n").unwrap();
        std::fs::create_dir(d.path().join("..data")).unwrap();
        assert_eq!(
            read_client_secret(d.path(), None).unwrap(),
            ("edge-1".into(), "tok".into())
        );
        std::fs::write(d.path().join("edge-2"), "t2").unwrap();
        assert!(read_client_secret(d.path(), None).is_err());
        assert_eq!(
            read_client_secret(d.path(), Some("edge-2")).unwrap().1,
            "t2"
        );
    }
}
