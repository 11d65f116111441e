//! A DatamoverServer CR in the cluster: Ready with `status.serverInfo`, client pods
//! backing up and restoring a volume, the repository surviving a restart, clean removal,
//! clear conditions for a missing Secret and a bad image, credentials applied live
//! through the kubelet, and `kubectl exec` / a sidecar of the client image.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use datamover_tests::cluster::{Cluster, poll, run};
use datamover_tests::{assert_same_tree, bin, random_bytes};

use crate::setup::{TestServer, chown_tree, client_pod, make_tree, ready, run_client_pod, turn};

#[test]
fn a_server_cr_serves_client_pods_keeps_its_repository_and_is_removed_with_the_cr() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: server CR and client pods") else {
        return;
    };
    let ns = cluster.namespace("dm-server");
    let app = cluster.namespace("dm-app");
    let server = TestServer::create(
        cluster,
        &ns,
        "datamover",
        &images.server,
        &[("app-client", "app-client-token-0123456789")],
    );
    let data = server.wait_ready(cluster, 180);
    assert_eq!(
        cluster.jsonpath(
            &server.ns,
            "datamoverserver/datamover",
            "{.status.serverInfo.serviceName}"
        ),
        "datamover"
    );
    let fingerprint = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .expect("serverInfo.data is base64");
    let fingerprint = String::from_utf8(fingerprint).expect("hex");
    assert!(
        fingerprint.trim().len() == 64 && fingerprint.trim().chars().all(|c| c.is_ascii_hexdigit()),
        "serverInfo.data is not a SHA-256 fingerprint: {fingerprint:?}"
    );
    assert!(cluster.exists(&server.ns, "service/datamover"));
    assert!(cluster.exists(&server.ns, "deployment/datamover"));

    // A client in another namespace, by the Service's DNS name, pinned by serverInfo.
    server.client_config(
        cluster,
        app.as_str(),
        "datamover-client",
        "app-client",
        "app-client-token-0123456789",
        &data,
    );
    let source = cluster.volume_dir(&format!("{}-source", app.as_str()));
    make_tree(&source, 7);
    cluster.local_pvc(app.as_str(), "source", &source);
    let backup = run_client_pod(
        cluster,
        app.as_str(),
        &client_pod(
            "backup",
            app.as_str(),
            &images.client,
            "datamover-client",
            &["backup_files", "/data", "volume"],
            Some("source"),
        ),
        "backup",
        180,
    );
    assert_eq!(backup["tag"], "volume", "{backup}");
    assert_eq!(backup["files"].as_u64(), Some(4), "{backup}");

    let restore_into = |name: &str| {
        let target = cluster.volume_dir(&format!("{}-{name}", app.as_str()));
        cluster.local_pvc(app.as_str(), name, &target);
        run_client_pod(
            cluster,
            app.as_str(),
            &client_pod(
                name,
                app.as_str(),
                &images.client,
                "datamover-client",
                &["restore_files", "/data", "volume"],
                Some(name),
            ),
            name,
            180,
        );
        target
    };
    let target = restore_into("restored");
    assert_same_tree(&source, &target);
    assert_same_root_mtime(&source, &target);

    // The repository is on the CR's volume: a new server pod still has the snapshot.
    let old_pod = server_pod(cluster, &server.ns);
    cluster.kubectl_ok(&["delete", "pod", "-n", &server.ns, &old_pod, "--wait=true"]);
    poll("a new server pod", 120, || {
        let p = server_pod(cluster, &server.ns);
        (p != old_pod && !p.is_empty()).then_some(())
    });
    // A self-signed certificate is made anew by each pod (a TLS Secret among
    // spec.secrets keeps it): clients take the new fingerprint from the status.
    let new_data = poll("the new pod's fingerprint in the status", 180, || {
        let d = server.wait_ready(cluster, 180);
        (d != data).then_some(d)
    });
    server.client_config(
        cluster,
        app.as_str(),
        "datamover-client",
        "app-client",
        "app-client-token-0123456789",
        &new_data,
    );
    poll("the new server pod ready", 120, || {
        (cluster.jsonpath(
            &server.ns,
            "deployment/datamover",
            "{.status.readyReplicas}",
        ) == "1")
            .then_some(())
    });
    let again = restore_into("restored-after-restart");
    assert_same_tree(&source, &again);

    // Deleting the CR removes what the controller made.
    cluster.kubectl_ok(&["delete", "-n", &server.ns, "datamoverserver/datamover"]);
    poll(
        "the Deployment and Service removed with the CR",
        120,
        || {
            (!cluster.exists(&server.ns, "deployment/datamover")
                && !cluster.exists(&server.ns, "service/datamover"))
            .then_some(())
        },
    );
}

/// The root directory's mtime is restored too.
fn assert_same_root_mtime(a: &Path, b: &Path) {
    use std::os::unix::fs::MetadataExt;
    let (ma, mb) = (
        std::fs::metadata(a).expect("stat"),
        std::fs::metadata(b).expect("stat"),
    );
    assert_eq!(ma.mtime(), mb.mtime(), "mtime of the restored root");
}

/// The name of the (newest running) server pod in `ns`.
fn server_pod(cluster: &Cluster, ns: &str) -> String {
    cluster
        .kubectl_output(
            &[
                "get",
                "pods",
                "-n",
                ns,
                "-l",
                "app.kubernetes.io/name=datamover-server",
                "--field-selector",
                "status.phase=Running",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ],
            None,
            60,
        )
        .stdout
        .split(|b| *b == b' ')
        .map(|s| String::from_utf8_lossy(s).trim().to_string())
        .rfind(|s| !s.is_empty())
        .unwrap_or_default()
}

#[test]
fn a_missing_secret_and_a_bad_image_are_named_in_the_status() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: status conditions") else {
        return;
    };
    let ns = cluster.namespace("dm-status");
    // No client-credentials Secret at all.
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: cfg, namespace: {ns}}}
data: {{type: filesystem}}
---
apiVersion: v1
kind: Secret
metadata: {{name: repo, namespace: {ns}}}
stringData: {{repo-password: pw-for-status-test}}
---
apiVersion: dm.cr.kanister.io/v1alpha1
kind: DatamoverServer
metadata: {{name: no-secret, namespace: {ns}}}
spec:
  image: {image}
  config: cfg
  clientSecretRef: {{secretName: missing-clients}}
  secrets: [{{secretName: repo}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: clients, namespace: {ns}}}
stringData: {{c: token-of-c-0123456789}}
---
apiVersion: dm.cr.kanister.io/v1alpha1
kind: DatamoverServer
metadata: {{name: bad-image, namespace: {ns}}}
spec:
  image: datamover/no-such-image:0.0.0
  config: cfg
  clientSecretRef: {{secretName: clients}}
  secrets: [{{secretName: repo}}]
"#,
        ns = ns.as_str(),
        image = images.server,
    ));
    let messages = |name: &str| {
        cluster.jsonpath(
            ns.as_str(),
            &format!("datamoverserver/{name}"),
            "{.status.conditions[*].message}",
        )
    };
    poll("the status to name the missing Secret", 60, || {
        let m = messages("no-secret");
        m.contains("missing-clients").then_some(m)
    });
    let m = poll("the status to say the image cannot be pulled", 120, || {
        let m = messages("bad-image");
        m.contains("image cannot be pulled").then_some(m)
    });
    assert!(m.contains("datamover/no-such-image:0.0.0"), "{m}");
}

#[test]
fn credential_changes_reach_the_server_through_the_kubelet_within_two_seconds() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: live credentials") else {
        return;
    };
    let ns = cluster.namespace("dm-creds");
    let server = TestServer::create(
        cluster,
        &ns,
        "creds",
        &images.server,
        &[("old-client", "old-client-token-0123456789")],
    );
    let data = server.wait_ready(cluster, 180);
    let pod = server_pod(cluster, &server.ns);
    let pod_ip = cluster.jsonpath(&server.ns, &format!("pod/{pod}"), "{.status.podIP}");
    let uid = cluster.jsonpath(&server.ns, &format!("pod/{pod}"), "{.metadata.uid}");
    // The credentials volume as the kubelet writes it on the node.
    let volumes = cluster
        .dir
        .join("kubelet/pods")
        .join(&uid)
        .join("volumes/kubernetes.io~secret");
    let creds_dir = std::fs::read_dir(&volumes)
        .unwrap_or_else(|e| panic!("{}: {e}", volumes.display()))
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("old-client").exists())
        .unwrap_or_else(|| {
            panic!(
                "no secret volume with old-client under {}",
                volumes.display()
            )
        });

    // The real client binary on the node, straight to the pod's address.
    let client = |id: &str, token: &str| {
        let root = tempfile::tempdir().expect("tempdir");
        datamover_tests::write(
            &root.path().join("etc/client-secret").join(id),
            token.as_bytes(),
        );
        let mut c = Command::new(bin("datamover-client"));
        c.env_clear()
            .env("DATAMOVER_ROOT", root.path())
            .env("SERVER_URL", format!("{pod_ip}:51515"))
            .env("SERVER_DATA", data.trim())
            .env("PROTOCOLS", "datamover-v1:51515")
            .env("DATAMOVER_PROGRESS", "0");
        (root, c)
    };
    let accepted = |id: &str, token: &str| {
        let (_root, mut c) = client(id, token);
        run(&mut c, &["list"], None, 30).status.success()
    };
    assert!(accepted("old-client", "old-client-token-0123456789"));
    assert!(!accepted("new-client", "new-client-token-0123456789"));

    // Add new-client and revoke old-client in one Secret change.
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: creds-clients, namespace: {}}}\n\
         stringData: {{new-client: new-client-token-0123456789}}\n",
        server.ns
    ));
    cluster.kubectl_ok(&[
        "patch",
        "secret",
        "creds-clients",
        "-n",
        &server.ns,
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/data/old-client"}]"#,
    ]);
    // When the kubelet swapped the volume's ..data link to the new content.
    let written = poll("the kubelet to write the new credentials", 60, || {
        (creds_dir.join("new-client").exists() && !creds_dir.join("old-client").exists()).then(
            || {
                std::fs::symlink_metadata(creds_dir.join("..data"))
                    .and_then(|m| m.modified())
                    .unwrap_or_else(|_| SystemTime::now())
            },
        )
    });
    let start = Instant::now();
    poll("new-client accepted", 10, || {
        accepted("new-client", "new-client-token-0123456789").then_some(())
    });
    poll("old-client refused", 10, || {
        (!accepted("old-client", "old-client-token-0123456789")).then_some(())
    });
    let after_write = SystemTime::now()
        .duration_since(written)
        .unwrap_or(Duration::ZERO);
    eprintln!(
        "credentials applied {:.2} s after the kubelet wrote them ({:.2} s of polling)",
        after_write.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        after_write <= Duration::from_secs(2),
        "the change took {after_write:?} after the kubelet wrote the file"
    );
    // The revoked client's error says what it is.
    let (_root, mut c) = client("old-client", "old-client-token-0123456789");
    let o = run(&mut c, &["list"], None, 30);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn kubectl_exec_of_the_client_image_streams_and_a_sidecar_runs_commands() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: exec and sidecar") else {
        return;
    };
    let ns = cluster.namespace("dm-exec");
    let server = TestServer::create(
        cluster,
        &ns,
        "exec",
        &images.server,
        &[("sidecar", "sidecar-token-0123456789")],
    );
    let data = server.wait_ready(cluster, 180);
    server.client_config(
        cluster,
        ns.as_str(),
        "datamover-client",
        "sidecar",
        "sidecar-token-0123456789",
        &data,
    );
    let dir = cluster.volume_dir(&format!("{}-app", ns.as_str()));
    make_tree(&dir, 11);
    chown_tree(&dir);
    cluster.local_pvc(ns.as_str(), "app-data", &dir);
    // The client image as a sidecar: command_from_file on its stdin keeps it running.
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: app, namespace: {ns}, labels: {{dm.cr.kanister.io/client: "true"}}}}
spec:
  automountServiceAccountToken: false
  securityContext: {{runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532, runAsNonRoot: true}}
  containers:
  - name: datamover
    image: {image}
    imagePullPolicy: Never
    args: [command_from_file, /dev/stdin]
    stdin: true
    envFrom: [{{configMapRef: {{name: datamover-client}}}}]
    securityContext: {{readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
    volumeMounts:
    - {{name: data, mountPath: /data}}
    - {{name: client-secret, mountPath: /etc/client-secret, readOnly: true}}
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: app-data}}}}
  - {{name: client-secret, secret: {{secretName: datamover-client, defaultMode: 0440}}}}
"#,
        ns = ns.as_str(),
        image = images.client,
    ));
    poll("the sidecar pod running", 120, || {
        (cluster.jsonpath(ns.as_str(), "pod/app", "{.status.phase}") == "Running").then_some(())
    });

    // backup_stream from a pipe through kubectl exec -i, restore_stream to stdout.
    let dump = random_bytes(42, 5_000_000);
    let o = cluster.kubectl_output(
        &[
            "exec",
            "-i",
            "-n",
            ns.as_str(),
            "app",
            "-c",
            "datamover",
            "--",
            "datamover-client",
            "backup_stream",
            "-",
            "db-dump",
        ],
        Some(&dump),
        180,
    );
    assert!(
        o.status.success(),
        "exec backup_stream: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("###Phase-output###: {\"key\":\"snapshot_id\""),
        "{out}"
    );
    let o = cluster.kubectl_output(
        &[
            "exec",
            "-n",
            ns.as_str(),
            "app",
            "-c",
            "datamover",
            "--",
            "datamover-client",
            "restore_stream",
            "-",
            "db-dump",
        ],
        None,
        180,
    );
    assert!(
        o.status.success(),
        "exec restore_stream: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stdout == dump,
        "restore_stream gave {} bytes, not the {} backed up",
        o.stdout.len(),
        dump.len()
    );

    // The sidecar itself: a command written to its stdin.
    let o = cluster.kubectl_output(
        &["attach", "-i", "-n", ns.as_str(), "app", "-c", "datamover"],
        Some(b"backup_files /data sidecar-files\n"),
        60,
    );
    let _ = o;
    let logs = poll("the sidecar's backup result", 120, || {
        let l = cluster.logs(ns.as_str(), "app", Some("datamover"));
        l.lines()
            .any(|l| l.starts_with('{') && l.contains("\"tag\":\"sidecar-files\""))
            .then_some(l)
    });
    assert!(
        !logs.contains("\u{1b}["),
        "colour escapes in kubectl logs:\n{logs}"
    );
}

#[test]
fn the_edge_client_example_pod_reads_its_credential_and_backs_up() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: edge client example") else {
        return;
    };
    let ns = cluster.namespace("dm-edge");
    let server = TestServer::create(
        cluster,
        &ns,
        "datamover",
        &images.server,
        &[("edge-01", "edge-01-token-0123456789")],
    );
    let data = server.wait_ready(cluster, 180);
    let sensors = cluster.volume_dir(&format!("{}-sensors", ns.as_str()));
    make_tree(&sensors, 5);
    chown_tree(&sensors);
    // blueprints/examples/edge-client-pod.yaml as a user fills it in: namespace, node,
    // server address, fingerprint, token and the data directory (and no restarts, so a
    // failure shows); nothing else changes.
    let text = std::fs::read_to_string(
        datamover_tests::blueprint::repo_root().join("blueprints/examples/edge-client-pod.yaml"),
    )
    .expect("edge-client-pod.yaml");
    let mut yaml = text;
    for (from, to) in [
        ("namespace: edge\n", format!("namespace: {}\n", ns.as_str())),
        (
            "kubernetes.io/hostname: edge-01",
            format!("kubernetes.io/hostname: {}", cluster.node),
        ),
        (
            "restartPolicy: OnFailure",
            "restartPolicy: Never".to_string(),
        ),
        (
            "value: datamover.example.com:51515",
            format!("value: {}", server.url()),
        ),
        (
            "\"<status.serverInfo.data of the DatamoverServer>\"",
            format!("\"{}\"", data.trim()),
        ),
        (
            "\"<token of edge-01>\"",
            "edge-01-token-0123456789".to_string(),
        ),
        (
            "path: /var/lib/sensors",
            format!("path: {}", sensors.display()),
        ),
    ] {
        assert!(
            yaml.contains(from),
            "edge-client-pod.yaml no longer has {from:?}"
        );
        yaml = yaml.replace(from, &to);
    }
    cluster.apply(&yaml);
    let (phase, logs) = cluster.wait_pod_done(ns.as_str(), "edge-01-backup", 180);
    assert_eq!(phase, "Succeeded", "the edge example pod failed:\n{logs}");
    assert!(logs.contains("\"tag\":\"edge-01-sensors\""), "{logs}");
}
