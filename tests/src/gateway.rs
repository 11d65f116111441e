//! A server with the S3 gateway on (`PROTOCOLS=datamover-v1:<port>;s3:<port>`) behind a
//! certificate signed by a CA of its own, as a cluster's cert-manager would make, for the
//! gateway's tests and its benchmark.

use crate::{Server, Storage, free_port, write};

/// A CA and a server certificate for 127.0.0.1 signed by it.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a CA and a server certificate (panics if rcgen cannot: a test harness).
pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "datamover test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("server params");
    // Another name than the CA's, or OpenSSL takes the certificate for self-signed.
    leaf.distinguished_name
        .push(DnType::CommonName, "datamover test server");
    let cert = leaf
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The server, the gateway's port and the CA that signed its certificate.
pub struct S3Gateway {
    pub server: Server,
    pub s3_port: u16,
    pub ca_pem: String,
}

impl S3Gateway {
    /// Starts the server with `etc/config` keys `config`, the gateway on a port of its own.
    pub fn start(
        storage: Storage<'_>,
        clients: &[(&str, &str)],
        config: &[(&str, &str)],
    ) -> S3Gateway {
        let root = tempfile::tempdir().expect("server root");
        for (k, v) in config {
            write(&root.path().join("etc/config").join(k), v.as_bytes());
        }
        let pki = pki();
        write(
            &root.path().join("etc/secrets/tls/tls.crt"),
            pki.cert_pem.as_bytes(),
        );
        write(
            &root.path().join("etc/secrets/tls/tls.key"),
            pki.key_pem.as_bytes(),
        );
        let grpc = free_port();
        let s3_port = free_port();
        let protocols = format!("datamover-v1:{grpc};s3:{s3_port}");
        let mut server =
            Server::start_in_with_env(root, storage, clients, &[("PROTOCOLS", &protocols)]);
        server.port = grpc;
        S3Gateway {
            server,
            s3_port,
            ca_pem: pki.ca_pem,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.s3_port)
    }
}

/// The S3 profile `datamover-client s3-credentials` prints for a client.
pub fn profile(server: &Server, id: &str, credential: &str) -> Result<String, String> {
    let r = server.client(id, credential).run(&["s3-credentials"]);
    if r.success() {
        Ok(r.stdout)
    } else {
        Err(format!("s3-credentials failed: {}", r.stderr))
    }
}

/// The S3 secret of a client whose credential file holds `credential`.
pub fn secret(server: &Server, id: &str, credential: &str) -> Result<String, String> {
    let profile = profile(server, id, credential)?;
    profile
        .lines()
        .find_map(|l| l.strip_prefix("aws_secret_access_key = "))
        .map(str::to_string)
        .ok_or_else(|| format!("no secret in the profile:\n{profile}"))
}
