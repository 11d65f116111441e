//! ServiceAccount tokens as client credentials, with the real server and client binaries.
//!
//! - Without Kubernetes (always run): a server with no Kubernetes API access refuses
//!   tokens and says why; a server whose API does not answer refuses with UNAVAILABLE and
//!   points at its RBAC.
//! - Against a real Kubernetes apiserver (the test cluster of `scripts/cluster-up.sh`):
//!   set `DATAMOVER_TEST_CLUSTER` to its env file (lines `export K=V`, with `KUBECONFIG`
//!   and `DATAMOVER_CLUSTER_BIN`). Unset, that test says it skipped (and fails when `CI`
//!   is set). It makes a namespace with ServiceAccounts, a token for the server bound to
//!   `system:auth-delegator`, and checks: an allowed account backs up and restores (as its
//!   tenant, beside credential clients); the token file is read again for each
//!   connection; another account, a wrong audience, an expired token, a deleted account
//!   (within the cache bounds) and an account removed from the clients file are refused
//!   with their own messages and exit code 3; a label selector; a server without RBAC.
//!   It prints Hello latencies (a cold TokenReview against a warm cache) for
//!   bench/RESULTS.md.
//!
//! The apiserver will not issue tokens shorter than 10 minutes, so "expired" is checked
//! with a real token whose `exp` claim is moved into the past (the server refuses it from
//! its claims before any TokenReview); `DATAMOVER_TEST_SA_EXPIRY=1` also waits for a real
//! 10-minute token to expire and checks that it is refused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use datamover_tests::{Client, Run, Server, Storage, free_port, write};

// ---- JWT claims, enough to forge test tokens (no base64 crate needed) ------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64url_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64url_decode(s: &str) -> Vec<u8> {
    let vals: Vec<u32> = s
        .bytes()
        .filter(|b| *b != b'=')
        .map(|b| B64.iter().position(|c| *c == b).expect("base64url") as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in vals.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, v)| n | (v << (18 - 6 * i)));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// A JWT with these claims (and a signature nobody would accept).
fn forged_jwt(claims: &serde_json::Value) -> String {
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64url_encode(br#"{"alg":"RS256","kid":"test"}"#),
        b64url_encode(claims.to_string().as_bytes())
    )
}

/// `token` with its claims changed by `f` (its signature no longer matches).
fn with_claims(token: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&b64url_decode(parts[1])).expect("claims");
    f(&mut claims);
    format!(
        "{}.{}.{}",
        parts[0],
        b64url_encode(claims.to_string().as_bytes()),
        parts[2]
    )
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[test]
fn base64url_round_trip() {
    for len in 0..20 {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(b64url_decode(&b64url_encode(&data)), data);
    }
    assert_eq!(b64url_encode(b"hello?"), "aGVsbG8_");
}

// ---- servers and clients ----------------------------------------------------------------

/// The server's `/etc/serviceaccount_clients`.
fn write_sa_clients(root: &Path, audience: &str, clients: &serde_json::Value) {
    let dir = root.join("etc/serviceaccount_clients");
    write(&dir.join("audience"), audience.as_bytes());
    // Replaced atomically, as a kubelet swaps a ConfigMap volume.
    let tmp = dir.join(".clients.json.tmp");
    write(&tmp, clients.to_string().as_bytes());
    std::fs::rename(&tmp, dir.join("clients.json")).expect("rename");
}

/// A client with no credential and a ServiceAccount token file.
fn token_client(server: &Server, token: &str) -> Client {
    let mut c = server.client("unused", "unused");
    std::fs::remove_dir_all(c.root.path().join("etc/client-secret")).expect("rm client-secret");
    let file = c.root.path().join("token");
    write(&file, token.as_bytes());
    let file = file.display().to_string();
    c.set_env("DATAMOVER_TOKEN_FILE", &file);
    c
}

fn set_token(client: &Client, token: &str) {
    write(&client.root.path().join("token"), token.as_bytes());
}

fn assert_refused(r: &Run, code: i32, wanted: &[&str]) {
    assert_eq!(r.code, code, "exit code; stderr: {}", r.stderr);
    for w in wanted {
        assert!(r.stderr.contains(w), "stderr lacks {w:?}: {}", r.stderr);
    }
}

/// A metric's value (summed over its label sets matching `labels`).
fn metric(server: &Server, name: &str, labels: &str) -> f64 {
    let (_, body) = server.http_get("/metrics").expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter(|l| l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A self-signed CA certificate (PEM), made with openssl.
fn some_ca(dir: &Path) -> PathBuf {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=test-ca", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    crt
}

#[test]
fn without_kubernetes_tokens_are_refused_and_the_server_says_why() {
    let token = forged_jwt(&serde_json::json!({
        "aud": ["dm-local"], "exp": unix_now() + 600,
        "sub": "system:serviceaccount:shop:backup",
    }));
    let entries = serde_json::json!([{"namespace": "shop", "tenant": "shop", "role": "full"}]);

    // No Kubernetes API: DATAMOVER_ROOT hides any real service-account directory.
    let root = tempfile::tempdir().expect("tempdir");
    write_sa_clients(root.path(), "dm-local", &entries);
    let server = Server::start_in_with_env(
        root,
        Storage::Filesystem,
        &[("edge", "edge-token")],
        &[("KUBERNETES_SERVICE_HOST", ""), ("DATAMOVER_KUBE_API", "")],
    );
    let r = token_client(&server, &token).run(&["list"]);
    assert_refused(
        &r,
        3,
        &["ServiceAccount tokens are not enabled on this server: no Kubernetes API access"],
    );
    let log = server.log();
    assert_eq!(
        log.matches("ServiceAccount tokens are not enabled on this server")
            .count(),
        2,
        "said once at start, and once for the refusal:\n{log}"
    );
    assert!(!log.contains(&token), "a token in the log");
    // Credential clients are unaffected.
    assert!(server.client("edge", "edge-token").run(&["list"]).success());
    // A client with neither a credential nor a token names both.
    let mut none = server.client("x", "y");
    std::fs::remove_dir_all(none.root.path().join("etc/client-secret")).expect("rm");
    none.set_env("DATAMOVER_TOKEN_FILE", "/nonexistent/token");
    assert_refused(
        &none.run(&["list"]),
        3,
        &[
            "holds none",
            "no ServiceAccount token at /nonexistent/token",
        ],
    );

    // An API that does not answer: UNAVAILABLE, pointing at the server's RBAC and log.
    let sa_dir = tempfile::tempdir().expect("tempdir");
    some_ca(sa_dir.path());
    write(&sa_dir.path().join("token"), b"server-token");
    let root = tempfile::tempdir().expect("tempdir");
    write_sa_clients(root.path(), "dm-local", &entries);
    let api = format!("https://127.0.0.1:{}", free_port());
    let sa = sa_dir.path().display().to_string();
    let server = Server::start_in_with_env(
        root,
        Storage::Filesystem,
        &[],
        &[
            ("DATAMOVER_KUBE_API", api.as_str()),
            ("DATAMOVER_KUBE_SA_DIR", sa.as_str()),
        ],
    );
    let r = token_client(&server, &token).run(&["list"]);
    assert_refused(
        &r,
        1,
        &[
            "Unavailable",
            "the Kubernetes TokenReview API is unavailable",
            "system:auth-delegator",
        ],
    );
    assert!(server.log().contains("Kubernetes API request failed"));
    // Refused from its claims, before any TokenReview: expired, wrong audience, not a JWT.
    let expired = forged_jwt(&serde_json::json!({"aud": ["dm-local"], "exp": unix_now() - 30}));
    assert_refused(
        &token_client(&server, &expired).run(&["list"]),
        3,
        &["the ServiceAccount token expired", "s ago"],
    );
    let other = forged_jwt(&serde_json::json!({"aud": ["elsewhere"], "exp": unix_now() + 60}));
    assert_refused(
        &token_client(&server, &other).run(&["list"]),
        3,
        &["is for audience 'elsewhere'", "accepts only 'dm-local'"],
    );
    assert_refused(
        &token_client(&server, "not-a-jwt").run(&["list"]),
        3,
        &["not a Kubernetes ServiceAccount token"],
    );
    assert_eq!(
        metric(&server, "datamover_token_reviews_total", "result=\"error\""),
        1.0
    );
}

// ---- a real apiserver --------------------------------------------------------------------

/// The test cluster, and a namespace of this test (removed at the end).
struct Cluster {
    kubectl: PathBuf,
    kubeconfig: String,
    ns: String,
}

impl Cluster {
    fn from_env() -> Option<Cluster> {
        let Ok(file) = std::env::var("DATAMOVER_TEST_CLUSTER") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but DATAMOVER_TEST_CLUSTER is not: start the test cluster (scripts/cluster-up.sh) and point DATAMOVER_TEST_CLUSTER at its env file"
            );
            eprintln!(
                "SKIPPED: DATAMOVER_TEST_CLUSTER is not set (the env file of scripts/cluster-up.sh); ServiceAccount tokens were not tested against a real apiserver"
            );
            return None;
        };
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("DATAMOVER_TEST_CLUSTER={file}: {e}"));
        let var = |k: &str| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.trim().trim_matches('"').trim_matches('\'').to_string())
                .unwrap_or_else(|| panic!("{file} does not export {k}"))
        };
        let ns = format!("dm-sa-test-{}-{}", std::process::id(), unix_now() % 100_000);
        let c = Cluster {
            kubectl: PathBuf::from(var("DATAMOVER_CLUSTER_BIN")).join("kubectl"),
            kubeconfig: var("KUBECONFIG"),
            ns,
        };
        c.kubectl(&["create", "namespace", &c.ns]);
        Some(c)
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl")
    }

    /// Runs kubectl; its stdout.
    fn kubectl(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn in_ns(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.ns.as_str()];
        a.extend_from_slice(args);
        self.kubectl(&a)
    }

    fn token(&self, sa: &str, audience: Option<&str>) -> String {
        let mut args = vec!["create", "token", sa, "--duration", "10m"];
        if let Some(a) = audience {
            args.extend(["--audience", a]);
        }
        self.in_ns(&args)
    }

    /// `{.clusters[0].cluster.<field>}` of the kubeconfig.
    fn cluster_field(&self, field: &str) -> String {
        self.kubectl(&[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            &format!("jsonpath={{.clusters[0].cluster.{field}}}"),
        ])
    }

    /// A service-account directory (`token`, `ca.crt`) for a server running as `sa`.
    fn sa_dir(&self, sa: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join("token"), self.token(sa, None).as_bytes());
        let ca_file = self.cluster_field("certificate-authority");
        if ca_file.is_empty() {
            let data = self.cluster_field("certificate-authority-data");
            write(&dir.path().join("ca.crt"), &b64_std_decode(&data));
        } else {
            std::fs::copy(&ca_file, dir.path().join("ca.crt")).expect("copy ca.crt");
        }
        dir
    }
}

fn b64_std_decode(s: &str) -> Vec<u8> {
    b64url_decode(&s.replace('+', "-").replace('/', "_"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.run(&["delete", "namespace", &self.ns, "--wait=false"]);
        let _ = self.run(&[
            "delete",
            "clusterrolebinding",
            &format!("{}-server", self.ns),
            "--ignore-not-found",
        ]);
    }
}

/// Runs `args` until `done` says so, at most `limit`; how long it took and the last run.
fn poll(
    client: &Client,
    args: &[&str],
    limit: Duration,
    done: impl Fn(&Run) -> bool,
) -> (Duration, Run) {
    let start = Instant::now();
    loop {
        let r = client.run(args);
        if done(&r) {
            return (start.elapsed(), r);
        }
        assert!(
            start.elapsed() < limit,
            "{args:?} not as expected within {limit:?}: {} {}",
            r.code,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn serviceaccount_tokens_against_a_real_apiserver() {
    let Some(k) = Cluster::from_env() else {
        return;
    };
    let ns = k.ns.clone();
    let audience = format!("datamover-test.{ns}");
    for sa in ["server", "backup", "other", "doomed", "labeled", "norbac"] {
        k.in_ns(&["create", "serviceaccount", sa]);
    }
    k.in_ns(&[
        "label",
        "serviceaccount",
        "labeled",
        "datamover-test/restore=yes",
    ]);
    k.kubectl(&[
        "create",
        "clusterrolebinding",
        &format!("{ns}-server"),
        "--clusterrole=system:auth-delegator",
        &format!("--serviceaccount={ns}:server"),
    ]);
    // Label selectors need the ServiceAccounts' labels.
    k.in_ns(&[
        "create",
        "role",
        "read-sa",
        "--verb=get",
        "--resource=serviceaccounts",
    ]);
    k.in_ns(&[
        "create",
        "rolebinding",
        "server-read-sa",
        "--role=read-sa",
        &format!("--serviceaccount={ns}:server"),
    ]);

    let entries = serde_json::json!([
        {"namespace": ns, "name": "backup", "tenant": "shop", "role": "full"},
        {"namespace": ns, "name": "doomed", "tenant": "shop", "role": "full"},
        {"namespace": ns, "selector": {"matchLabels": {"datamover-test/restore": "yes"}},
         "tenant": "shop", "role": "read"},
    ]);
    let api = k.cluster_field("server");
    let sa_dir = k.sa_dir("server");
    let sa = sa_dir.path().display().to_string();
    let root = tempfile::tempdir().expect("tempdir");
    write_sa_clients(root.path(), &audience, &entries);
    // A credential client in the same tenant, and one in its own.
    write(&root.path().join("etc/config/tenants"), b"shop-cred=shop\n");
    let server = Server::start_in_with_env(
        root,
        Storage::Filesystem,
        &[("shop-cred", "shop-token"), ("edge", "edge-token")],
        &[
            ("DATAMOVER_KUBE_API", api.as_str()),
            ("DATAMOVER_KUBE_SA_DIR", sa.as_str()),
        ],
    );
    assert!(
        server
            .log()
            .contains("ServiceAccount tokens are checked with the Kubernetes TokenReview API"),
        "{}",
        server.log()
    );

    // An allowed account backs up and restores.
    let client_id = format!("system:serviceaccount:{ns}:backup");
    let backup = token_client(&server, &k.token("backup", Some(&audience)));
    let src = tempfile::tempdir().expect("tempdir");
    write(&src.path().join("a.txt"), b"hello from a pod");
    write(
        &src.path().join("dir/b.bin"),
        &datamover_tests::random_bytes(7, 300_000),
    );
    let src_path = src.path().display().to_string();
    let made = backup.ok(&["backup_files", &src_path, "sa-tag"]);
    let snapshot = made["snapshot_id"]
        .as_str()
        .expect("snapshot_id")
        .to_string();
    let listed = backup.ok(&["list"]);
    assert!(listed.to_string().contains(&client_id), "{listed}");
    let out = tempfile::tempdir().expect("tempdir");
    let target = out.path().join("restored");
    let target_path = target.display().to_string();
    backup.ok(&["restore_files", &target_path, "sa-tag"]);
    datamover_tests::assert_same_tree(src.path(), &target);
    let log = server.log();
    assert!(log.contains(&client_id), "the client id is logged");

    // Tenants: a credential client of tenant shop sees the snapshot, another tenant not.
    let shop = server.client("shop-cred", "shop-token");
    assert!(shop.ok(&["list"]).to_string().contains(&snapshot));
    let edge = server.client("edge", "edge-token");
    assert!(!edge.ok(&["list"]).to_string().contains(&snapshot));
    let r = edge.run(&[
        "restore_files",
        &out.path().join("x").display().to_string(),
        &snapshot,
    ]);
    assert_eq!(
        r.code, 4,
        "another tenant's snapshot is not found: {}",
        r.stderr
    );

    // The token file is read again for every connection.
    set_token(&backup, "garbage");
    assert_refused(
        &backup.run(&["list"]),
        3,
        &["not a Kubernetes ServiceAccount token"],
    );
    let backup_token = k.token("backup", Some(&audience));
    set_token(&backup, &backup_token);
    backup.ok(&["list"]);

    // Another account, not listed (looked up by its labels first: a selector might admit it).
    let other = token_client(&server, &k.token("other", Some(&audience)));
    assert_refused(
        &other.run(&["list"]),
        3,
        &[
            &format!("ServiceAccount {ns}/other is not allowed to connect"),
            "spec.serviceAccountClients",
        ],
    );
    // An account admitted by its labels, with role read.
    let labeled = token_client(&server, &k.token("labeled", Some(&audience)));
    assert!(labeled.ok(&["list"]).to_string().contains(&snapshot));
    assert_refused(
        &labeled.run(&["backup_files", &src_path, "nope"]),
        3,
        &["has role read and may not back up"],
    );
    // A wrong audience: refused from its claims; and a real token with the audience
    // claim altered, which TokenReview itself refuses (its signature no longer holds).
    let wrong = token_client(&server, &k.token("backup", Some("someone-else")));
    assert_refused(
        &wrong.run(&["list"]),
        3,
        &[
            "is for audience 'someone-else'",
            &format!("accepts only '{audience}'"),
        ],
    );
    let altered = with_claims(&k.token("backup", Some("someone-else")), |c| {
        c["aud"] = serde_json::json!([audience.clone()]);
    });
    assert_refused(
        &token_client(&server, &altered).run(&["list"]),
        3,
        &["Kubernetes did not authenticate the ServiceAccount token"],
    );
    // Expired: a real token with its expiry moved into the past.
    let expired = with_claims(&k.token("backup", Some(&audience)), |c| {
        c["exp"] = serde_json::json!(unix_now() - 5);
    });
    assert_refused(
        &token_client(&server, &expired).run(&["list"]),
        3,
        &["the ServiceAccount token expired"],
    );
    assert!(
        metric(
            &server,
            "datamover_serviceaccount_refusals_total",
            "reason=\"expired\""
        ) >= 1.0
    );

    // Hello latency: a token never seen (TokenReview) against the same token again (cache).
    bench_hello(&server, &k, &audience);

    // A deleted account: refused once the caches let go (ours: 10 s; the apiserver's own
    // token cache: up to 10 s more).
    let doomed = token_client(&server, &k.token("doomed", Some(&audience)));
    doomed.ok(&["list"]);
    k.in_ns(&["delete", "serviceaccount", "doomed"]);
    let (took, r) = poll(&doomed, &["list"], Duration::from_secs(30), |r| {
        !r.success()
    });
    assert_refused(
        &r,
        3,
        &[
            "Kubernetes did not authenticate the ServiceAccount token",
            "not found",
        ],
    );
    eprintln!(
        "a deleted ServiceAccount's token was refused {:.1} s after the deletion",
        took.as_secs_f64()
    );

    // Removing the account from the clients file revokes it live.
    backup.ok(&["list"]);
    let fewer = serde_json::json!([entries[1].clone(), entries[2].clone()]);
    write_sa_clients(server.root.path(), &audience, &fewer);
    let (took, r) = poll(&backup, &["list"], Duration::from_secs(5), |r| !r.success());
    assert_refused(
        &r,
        3,
        &[&format!(
            "ServiceAccount {ns}/backup is not allowed to connect"
        )],
    );
    eprintln!(
        "removing a ServiceAccount from clients.json revoked it in {:.2} s",
        took.as_secs_f64()
    );
    write_sa_clients(server.root.path(), &audience, &entries);
    poll(&backup, &["list"], Duration::from_secs(5), Run::success);

    assert!(
        metric(
            &server,
            "datamover_token_reviews_total",
            "result=\"authenticated\""
        ) >= 3.0
    );
    assert!(
        metric(
            &server,
            "datamover_token_reviews_total",
            "result=\"unauthenticated\""
        ) >= 2.0
    );
    assert!(metric(&server, "datamover_token_review_cache_hits_total", "") >= 1.0);
    assert!(metric(&server, "datamover_token_review_seconds_count", "") >= 3.0);
    // No token (its signature, the part unique to it) is ever logged.
    let log = server.log();
    let server_token = std::fs::read_to_string(sa_dir.path().join("token")).unwrap_or_default();
    for t in [backup_token.as_str(), server_token.as_str()] {
        let signature = t.rsplit('.').next().unwrap_or(t);
        assert!(
            signature.len() > 20 && !log.contains(signature),
            "a token in the server log"
        );
    }

    // A server whose ServiceAccount may not create TokenReviews: UNAVAILABLE, naming RBAC.
    let norbac_dir = k.sa_dir("norbac");
    let norbac = norbac_dir.path().display().to_string();
    let root = tempfile::tempdir().expect("tempdir");
    write_sa_clients(root.path(), &audience, &entries);
    let server2 = Server::start_in_with_env(
        root,
        Storage::Filesystem,
        &[],
        &[
            ("DATAMOVER_KUBE_API", api.as_str()),
            ("DATAMOVER_KUBE_SA_DIR", norbac.as_str()),
        ],
    );
    let r = token_client(&server2, &k.token("backup", Some(&audience))).run(&["list"]);
    assert_refused(&r, 1, &["refused with 403", "system:auth-delegator"]);
    assert!(
        server2
            .log()
            .contains("tokenreviews.authentication.k8s.io is forbidden")
    );

    if std::env::var("DATAMOVER_TEST_SA_EXPIRY").is_ok_and(|v| v == "1") {
        real_expiry(&server, &k, &audience);
    } else {
        eprintln!(
            "(a real token's expiry is checked with DATAMOVER_TEST_SA_EXPIRY=1: it waits 10 minutes)"
        );
    }
}

/// Prints Hello latencies for bench/RESULTS.md: a connection and Hello with a token never
/// seen (a TokenReview), with the same token again (cached), and a Hello on an open
/// connection.
fn bench_hello(server: &Server, k: &Cluster, audience: &str) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    let mut settings = server.client_settings("unused", "");
    settings.token_file = Some(file.clone());
    let reviews_before = metric(server, "datamover_token_review_seconds_sum", "");
    let count_before = metric(server, "datamover_token_review_seconds_count", "");
    let (mut cold, mut warm, mut open) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        write(&file, k.token("backup", Some(audience)).as_bytes());
        let t = Instant::now();
        let conn = rt
            .block_on(datamover_client::connect::connect(&settings))
            .expect("connect (cold)");
        cold.push(t.elapsed());
        drop(conn);
        let t = Instant::now();
        let mut conn = rt
            .block_on(datamover_client::connect::connect(&settings))
            .expect("connect (warm)");
        warm.push(t.elapsed());
        for _ in 0..5 {
            let t = Instant::now();
            rt.block_on(conn.api.hello(datamover_proto::v1::HelloRequest::default()))
                .expect("hello");
            open.push(t.elapsed());
        }
        assert!(conn.settings.client_id.ends_with(":backup"));
    }
    let reviews = metric(server, "datamover_token_review_seconds_count", "") - count_before;
    let review_mean = (metric(server, "datamover_token_review_seconds_sum", "") - reviews_before)
        / reviews.max(1.0);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "BENCH serviceaccount-hello: connect+Hello with a new token (TokenReview) median {:.1} ms; with the same token again (cache) median {:.1} ms; Hello on an open connection (cache) median {:.2} ms; TokenReview itself mean {:.1} ms over {reviews} reviews (7 tokens, loopback server, apiserver on this machine)",
        ms(median(cold)),
        ms(median(warm)),
        ms(median(open)),
        review_mean * 1000.0
    );
}

/// Waits for a real 10-minute token to expire; it must then be refused.
fn real_expiry(server: &Server, k: &Cluster, audience: &str) {
    let token = k.token("backup", Some(audience));
    let client = token_client(server, &token);
    client.ok(&["list"]);
    eprintln!("waiting 10 minutes for a real token to expire");
    std::thread::sleep(Duration::from_secs(605));
    assert_refused(
        &client.run(&["list"]),
        3,
        &["the ServiceAccount token expired"],
    );
}
