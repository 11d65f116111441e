//! ServiceAccount tokens as client credentials, through a DatamoverServer CR
//! (`spec.serviceAccountClients`): the controller gives the server its ServiceAccount,
//! the `system:auth-delegator` binding and the allowed accounts (a ConfigMap at
//! `/etc/serviceaccount_clients`), and publishes the token audience.
//!
//! Pods with an allowed account back up and restore with a projected token and no
//! credential Secret. Then the client (this build's binary, on the node, reaching the
//! Service's cluster IP) presents tokens made by the TokenRequest API: another account, a
//! wrong audience, a deleted ServiceAccount (refused within the server's cache bound), an
//! account removed from the CR (revoked live, no pod restart) and another tenant's account
//! (sees none of the first tenant's snapshots) are each refused or isolated, with a message
//! naming the reason.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use datamover_tests::assert_same_tree;
use datamover_tests::cluster::Cluster;

use crate::setup::{TestServer, make_tree, ready, turn};

/// A client pod under ServiceAccount `account` with a projected token for `audience` at
/// the client's default path, and no credential Secret.
fn token_pod(
    name: &str,
    ns: &str,
    image: &str,
    account: &str,
    audience: &str,
    args: &[&str],
    claim: &str,
) -> String {
    let args = args
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{dm.cr.kanister.io/client: "true"}}
spec:
  restartPolicy: Never
  serviceAccountName: {account}
  automountServiceAccountToken: false
  containers:
  - name: client
    image: {image}
    imagePullPolicy: Never
    args: [{args}]
    envFrom:
    - configMapRef: {{name: datamover-client}}
    securityContext: {{runAsUser: 0, runAsNonRoot: false, allowPrivilegeEscalation: false}}
    volumeMounts:
    - {{name: data, mountPath: /data}}
    - {{name: token, mountPath: /var/run/secrets/datamover, readOnly: true}}
  volumes:
  - name: data
    persistentVolumeClaim: {{claimName: {claim}}}
  - name: token
    projected:
      sources:
      - serviceAccountToken: {{audience: "{audience}", expirationSeconds: 600, path: token}}
"#
    )
}

fn run_pod(cluster: &Cluster, ns: &str, name: &str, yaml: &str) -> serde_json::Value {
    cluster.apply(yaml);
    let (phase, logs) = cluster.wait_pod_done(ns, name, 180);
    assert_eq!(phase, "Succeeded", "pod {ns}/{name}:\n{logs}");
    let stdout = cluster.logs(ns, name, Some("client"));
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON result from {name}:\n{stdout}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{name}: {e}: {last}"))
}

/// The client on the node, presenting `token` to the server at `addr`.
struct HostClient {
    root: tempfile::TempDir,
    addr: String,
    data: String,
}

impl HostClient {
    fn run(&self, token: &str, args: &[&str]) -> Output {
        let dir = self.root.path().join("var/run/secrets/datamover");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("token"), token).expect("write the token");
        let bin = datamover_tests::bin_dir().join("datamover-client");
        datamover_tests::cluster::run(
            Command::new(bin)
                .env("DATAMOVER_ROOT", self.root.path())
                .env_remove("DATAMOVER_TOKEN_FILE")
                .env("SERVER_URL", &self.addr)
                .env("SERVER_DATA", &self.data)
                .env("PROTOCOLS", "datamover-v1:51515")
                .env("DATAMOVER_PROGRESS", "0"),
            args,
            None,
            60,
        )
    }

    /// Runs `list`; its exit code and stderr.
    fn list(&self, token: &str) -> (i32, String) {
        let o = self.run(token, &["list"]);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout),
        )
    }
}

/// A token of `ns/account` for `audience` from the TokenRequest API.
fn token(cluster: &Cluster, ns: &str, account: &str, audience: &str) -> String {
    cluster
        .kubectl_ok(&[
            "create",
            "token",
            "-n",
            ns,
            account,
            "--audience",
            audience,
            "--duration",
            "10m",
        ])
        .trim()
        .to_string()
}

/// Polls `list` with `token` until it is refused (exit 3); the time it took and the message.
fn refused_within(client: &HostClient, token: &str, secs: u64) -> (Duration, String) {
    let start = Instant::now();
    loop {
        let (code, out) = client.list(token);
        if code == 3 {
            return (start.elapsed(), out);
        }
        assert_eq!(code, 0, "neither accepted nor refused: {out}");
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "still accepted after {secs} s: {out}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn serviceaccount_tokens_are_checked_through_the_cr() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: ServiceAccount tokens") else {
        return;
    };
    let server_ns = cluster.namespace("dm-sa-server");
    let app = cluster.namespace("dm-sa-app");
    let other = cluster.namespace("dm-sa-other");
    let (a, o) = (app.as_str(), other.as_str());
    for (ns, account) in [
        (a, "backup-sa"),
        (a, "temp-sa"),
        (a, "not-listed"),
        (o, "intruder"),
    ] {
        cluster.kubectl_ok(&["create", "serviceaccount", "-n", ns, account]);
    }
    let entries = |with_backup: bool| {
        let mut e = vec![
            format!(r#"{{"namespace":"{a}","name":"temp-sa","tenant":"shop","role":"full"}}"#),
            format!(r#"{{"namespace":"{o}","name":"intruder","tenant":"other","role":"full"}}"#),
        ];
        if with_backup {
            e.push(format!(
                r#"{{"namespace":"{a}","name":"backup-sa","tenant":"shop","role":"full"}}"#
            ));
        }
        format!("[{}]", e.join(","))
    };
    let server = TestServer::create_with(
        cluster,
        &server_ns,
        "datamover",
        &images.server,
        &[("edge-1", "edge-1-token-0123456789")],
        &format!("  serviceAccountClients: {}\n", entries(true)),
    );
    let data = server.wait_ready(cluster, 180);
    let object = format!("datamoverserver/{}", server.name);
    let audience = cluster.jsonpath(&server.ns, &object, "{.status.serverInfo.tokenAudience}");
    assert_eq!(audience, format!("datamover.{}.{}", server.ns, server.name));
    // What the controller made: the server's account, bound to system:auth-delegator.
    let account = cluster.jsonpath(
        &server.ns,
        "deployment/datamover",
        "{.spec.template.spec.serviceAccountName}",
    );
    assert!(
        !account.is_empty(),
        "the server pods run without a ServiceAccount"
    );
    let bindings = cluster.kubectl_ok(&[
        "get",
        "clusterrolebindings",
        "-o",
        "jsonpath={range .items[*]}{.roleRef.name} {.subjects[0].namespace}/{.subjects[0].name}{\"\\n\"}{end}",
    ]);
    assert!(
        bindings
            .lines()
            .any(|l| l == format!("system:auth-delegator {}/{account}", server.ns)),
        "no system:auth-delegator binding for {account}:\n{bindings}"
    );

    // Pods with the allowed account: a backup and a restore, no credential Secret.
    server.client_config(
        cluster,
        a,
        "datamover-client",
        "unused",
        "unused-token-0123",
        &data,
    );
    cluster.kubectl_ok(&["delete", "secret", "-n", a, "datamover-client"]);
    let source = cluster.volume_dir(&format!("{a}-data"));
    make_tree(&source, 51);
    cluster.local_pvc(a, "data", &source);
    let target = cluster.volume_dir(&format!("{a}-restored"));
    cluster.local_pvc(a, "restored", &target);
    let backup = run_pod(
        cluster,
        a,
        "token-backup",
        &token_pod(
            "token-backup",
            a,
            &images.client,
            "backup-sa",
            &audience,
            &["backup_files", "/data", "shop-data"],
            "data",
        ),
    );
    let id = backup["snapshot_id"]
        .as_str()
        .expect("snapshot_id")
        .to_string();
    run_pod(
        cluster,
        a,
        "token-restore",
        &token_pod(
            "token-restore",
            a,
            &images.client,
            "backup-sa",
            &audience,
            &["restore_files", "/data", &id],
            "restored",
        ),
    );
    assert_same_tree(&source, &target);

    // The refusals, from the node.
    let ip = cluster.jsonpath(&server.ns, "service/datamover", "{.spec.clusterIP}");
    let client = HostClient {
        root: tempfile::tempdir().expect("tempdir"),
        addr: format!("{ip}:51515"),
        data: data.clone(),
    };
    let allowed = token(cluster, a, "backup-sa", &audience);
    let (code, out) = client.list(&allowed);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&id),
        "the allowed account does not see its snapshot: {out}"
    );

    let (code, out) = client.list(&token(cluster, a, "not-listed", &audience));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not allowed to connect"), "{out}");

    let (code, out) = client.list(&token(cluster, a, "backup-sa", "some-other-audience"));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("audience"), "{out}");

    // Another tenant's account: connects, sees nothing of tenant shop.
    let intruder = token(cluster, o, "intruder", &audience);
    let (code, out) = client.list(&intruder);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains(&id),
        "tenant other sees shop's snapshot: {out}"
    );
    let o_restore = client.run(&intruder, &["restore_stream", "-", &id[..16]]);
    assert_eq!(
        o_restore.status.code(),
        Some(4),
        "another tenant restored shop's snapshot: {}",
        String::from_utf8_lossy(&o_restore.stderr)
    );

    // A deleted ServiceAccount: refused within the cache bound (10 s for an accepted token).
    let temp = token(cluster, a, "temp-sa", &audience);
    let (code, out) = client.list(&temp);
    assert_eq!(code, 0, "{out}");
    cluster.kubectl_ok(&["delete", "serviceaccount", "-n", a, "temp-sa"]);
    let (took, out) = refused_within(&client, &temp, 15);
    eprintln!("a deleted ServiceAccount refused after {took:?}: {out}");
    assert!(
        out.contains("did not authenticate") || out.contains("no longer exists"),
        "{out}"
    );

    // Removed from the CR: revoked live, without a new server pod.
    let pods_before = cluster.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        &server.ns,
        "-o",
        "jsonpath={.items[*].metadata.uid}",
    ]);
    let (code, out) = client.list(&allowed);
    assert_eq!(code, 0, "{out}");
    cluster.kubectl_ok(&[
        "patch",
        "-n",
        &server.ns,
        &object,
        "--type",
        "merge",
        "-p",
        &format!(
            r#"{{"spec":{{"serviceAccountClients":{}}}}}"#,
            entries(false)
        ),
    ]);
    let (took, out) = refused_within(&client, &allowed, 90);
    eprintln!("an account removed from the CR refused after {took:?}: {out}");
    assert!(out.contains("not allowed to connect"), "{out}");
    let pods_after = cluster.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        &server.ns,
        "-o",
        "jsonpath={.items[*].metadata.uid}",
    ]);
    assert_eq!(pods_before, pods_after, "the server pods were replaced");
}
