//! The server certificate: from a kubernetes.io/tls secret, or generated at start.

use std::path::Path;

use datamover_proto::fingerprint::Fingerprint;

use crate::ServerError;

pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub fingerprint: Fingerprint,
}

/// Uses the given PEM pair, or generates a self-signed certificate for `names`
/// (plus `localhost`, `127.0.0.1` and the host name).
pub fn load_or_generate(
    given: Option<(Vec<u8>, Vec<u8>)>,
    names: &[String],
) -> Result<ServerTls, ServerError> {
    if let Some((cert_pem, key_pem)) = given {
        let first = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .next()
            .ok_or_else(|| ServerError::Tls("tls.crt holds no PEM certificate".into()))?
            .map_err(|e| ServerError::Tls(format!("tls.crt is not valid PEM: {e}")))?;
        rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| ServerError::Tls(format!("tls.key is not valid PEM: {e}")))?
            .ok_or_else(|| ServerError::Tls("tls.key holds no private key".into()))?;
        return Ok(ServerTls {
            fingerprint: Fingerprint::of_der(first.as_ref()),
            cert_pem,
            key_pem,
        });
    }
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.is_empty()
    {
        sans.push(h);
    }
    sans.extend(names.iter().cloned());
    sans.dedup();
    let ck = rcgen::generate_simple_self_signed(sans)
        .map_err(|e| ServerError::Tls(format!("generating a certificate: {e}")))?;
    tracing::info!("no TLS secret mounted: generated a self-signed certificate");
    Ok(ServerTls {
        fingerprint: Fingerprint::of_der(ck.cert.der()),
        cert_pem: ck.cert.pem().into_bytes(),
        key_pem: ck.key_pair.serialize_pem().into_bytes(),
    })
}

/// Writes `/etc/server/data` atomically: the fingerprint in hex.
pub fn write_server_data(path: &Path, fp: &Fingerprint) -> Result<(), ServerError> {
    let err = |e: std::io::Error| ServerError::Output {
        path: path.display().to_string(),
        error: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, fp.to_hex()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_and_given_agree() {
        let generated = load_or_generate(None, &["svc.ns".into()]).unwrap();
        let given = load_or_generate(
            Some((generated.cert_pem.clone(), generated.key_pem.clone())),
            &[],
        )
        .unwrap();
        assert_eq!(generated.fingerprint, given.fingerprint);
        assert!(load_or_generate(Some((b"junk".to_vec(), b"junk".to_vec())), &[]).is_err());
    }
}
