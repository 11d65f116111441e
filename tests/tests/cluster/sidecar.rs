//! The sidecar blueprint in the cluster: KubeExec into the `datamover` sidecar of a
//! running Deployment (the shape of blueprints/examples/app-with-sidecar.yaml) backs up
//! and restores the live volume; delete is a KubeTask.

use std::collections::BTreeMap;

use datamover_tests::assert_same_tree;
use datamover_tests::blueprint::load;
use datamover_tests::cluster::poll;

use crate::kanister::run_action;
use crate::setup::{TestServer, chown_tree, make_tree, ready, turn};

#[test]
fn the_sidecar_blueprint_execs_into_a_running_pod_and_restores_its_volume() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: sidecar blueprint") else {
        return;
    };
    let ns = cluster.namespace("dm-sc-server");
    let app = cluster.namespace("dm-sc-app");
    let server = TestServer::create(
        cluster,
        &ns,
        "datamover",
        &images.server,
        &[("notes", "notes-token-0123456789")],
    );
    let data = server.wait_ready(cluster, 180);
    server.client_config(
        cluster,
        app.as_str(),
        "datamover-client",
        "notes",
        "notes-token-0123456789",
        &data,
    );
    let live = cluster.volume_dir(&format!("{}-notes", app.as_str()));
    make_tree(&live, 41);
    chown_tree(&live);
    cluster.local_pvc(app.as_str(), "notes-data", &live);
    // The example's sidecar, with the application's container left out.
    cluster.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: notes, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: notes}}}}
  template:
    metadata: {{labels: {{app: notes, dm.cr.kanister.io/client: "true"}}}}
    spec:
      securityContext: {{runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532}}
      containers:
      - name: datamover
        image: {image}
        args: [command_from_file, /dev/stdin]
        stdin: true
        envFrom: [{{configMapRef: {{name: datamover-client}}}}]
        securityContext: {{readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
        volumeMounts:
        - {{name: data, mountPath: /data}}
        - {{name: client-secret, mountPath: /etc/client-secret, readOnly: true}}
      volumes:
      - {{name: data, persistentVolumeClaim: {{claimName: notes-data}}}}
      - {{name: client-secret, secret: {{secretName: datamover-client}}}}
"#,
        ns = app.as_str(),
        image = images.client,
    ));
    let pod = poll("the sidecar's pod running", 120, || {
        let o = cluster.kubectl_output(
            &[
                "get",
                "pods",
                "-n",
                app.as_str(),
                "-l",
                "app=notes",
                "--field-selector",
                "status.phase=Running",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ],
            None,
            30,
        );
        let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !name.is_empty()).then_some(name)
    });

    // What the volume holds once mounted (the kubelet applies the pod's fsGroup to it).
    let reference = tempfile::tempdir().expect("tempdir");
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", live.display()))
        .arg(reference.path())
        .output()
        .expect("cp");
    assert!(o.status.success());
    let bp = load("sidecar-blueprint.yaml");
    let mut values = BTreeMap::new();
    values.insert(".Deployment.Namespace".into(), app.as_str().to_string());
    values.insert(".Deployment.Name".into(), "notes".to_string());
    values.insert(".Deployment.Pods.0".into(), pod);
    run_action(cluster, &bp, "backup", &mut values);
    assert!(
        values.contains_key(".ArtifactsIn.sidecarSnapshot.KeyValue.snapshot_id"),
        "{values:?}"
    );

    // Damage the live volume, then restore it in place.
    std::fs::remove_file(live.join("a/small.txt")).expect("rm");
    std::fs::write(live.join("big.bin"), b"overwritten").expect("write");
    run_action(cluster, &bp, "restore", &mut values);
    assert_same_tree(reference.path(), &live);

    values.insert(".Object.metadata.name".into(), app.as_str().to_string());
    run_action(cluster, &bp, "delete", &mut values);
}
