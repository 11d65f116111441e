//! The sidecar blueprint in the cluster: KubeExec into the `datamover` sidecar of a
//! running Deployment (the shape of blueprints/examples/app-with-sidecar.yaml) backs up
//! and restores the live volume; delete is a KubeTask. Through the phases as Kanister
//! runs them and, when `KANISTER_CONTROLLER` is set, through real ActionSets.

use datamover_tests::assert_same_tree;
use datamover_tests::cluster::{Cluster, Images, poll};

use crate::kanister::{ActionSpec, Artifacts, Object, Runner, kanister_controller};
use crate::setup::{chown_tree, make_tree, ready, server_and_app, turn};

#[test]
fn the_sidecar_blueprint_execs_into_a_running_pod_and_restores_its_volume() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: sidecar blueprint") else {
        return;
    };
    sidecar_round_trip(cluster, images, Runner::Phases, "dm-sc");
}

#[test]
fn real_kanister_runs_the_sidecar_blueprint() {
    let _turn = turn();
    if kanister_controller("cluster: real Kanister, sidecar blueprint").is_none() {
        return;
    }
    let Some((cluster, images)) = ready("cluster: real Kanister, sidecar blueprint") else {
        return;
    };
    sidecar_round_trip(cluster, images, Runner::Kanister, "dm-k10sc");
}

fn sidecar_round_trip(cluster: &'static Cluster, images: &Images, runner: Runner, prefix: &str) {
    let setup = server_and_app(cluster, images, prefix, "notes", "datamover-client");
    let app = &setup.app;
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
    let none = Artifacts::new();
    let deployment = Object::Deployment {
        namespace: app.as_str(),
        name: "notes",
        pod: &pod,
    };
    let spec = |action, object, artifacts| ActionSpec {
        blueprint: "sidecar-blueprint.yaml",
        action,
        object,
        options: &[],
        artifacts,
    };
    let out = runner.run(cluster, &spec("backup", deployment.clone(), &none));
    assert!(
        out.get("sidecarSnapshot")
            .is_some_and(|a| a.get("snapshot_id").is_some_and(|id| id.len() == 64)),
        "{out:?}"
    );

    // Damage the live volume, then restore it in place.
    std::fs::remove_file(live.join("a/small.txt")).expect("rm");
    std::fs::write(live.join("big.bin"), b"overwritten").expect("write");
    runner.run(cluster, &spec("restore", deployment, &out));
    assert_same_tree(reference.path(), &live);

    runner.run(
        cluster,
        &spec("delete", Object::Namespace(app.as_str()), &out),
    );
}
