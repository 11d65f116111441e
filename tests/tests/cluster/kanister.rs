//! The blueprints in the cluster: every phase as the pod Kanister's KubeTask and
//! MultiContainerRun create (or the exec KubeExec makes), with the same rendered
//! arguments, and real ActionSets when `KANISTER_CONTROLLER` names a Kanister controller.
//!
//! A phase's pod is built as Kanister builds it: KubeTask a pod with one container
//! `container` (the phase's image and command), MultiContainerRun an `init` container and
//! `background` and `output` containers sharing a volume `shared` at `sharedVolumeDir`;
//! the phase's `podOverride` is merged into the pod spec by strategic merge (by the
//! apiserver's own merge code, `kubectl patch --local`), as Kanister does. Outputs are the
//! `###Phase-output###` lines of the output container.

use std::collections::BTreeMap;

use datamover_tests::assert_same_tree;
use datamover_tests::blueprint::{load, phase_outputs, render, render_value, repo_root};
use datamover_tests::cluster::{Cluster, poll};
use serde_yaml::Value;

use crate::setup::{TestServer, make_tree, ready, turn};

fn yaml(s: &str) -> Value {
    serde_yaml::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// The pod Kanister would create for a KubeTask or MultiContainerRun phase.
fn phase_pod(cluster: &Cluster, func: &str, args: &Value) -> (Value, &'static str) {
    let ns = args["namespace"].as_str().expect("phase namespace");
    let mut pod = yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{generateName: kanister-job-, namespace: {ns}, \
         labels: {{createdBy: kanister}}}}\n\
         spec: {{restartPolicy: Never}}\n"
    ));
    let output = match func {
        "KubeTask" => {
            pod["spec"]["containers"] = yaml("[{name: container, imagePullPolicy: IfNotPresent}]");
            pod["spec"]["containers"][0]["image"] = args["image"].clone();
            pod["spec"]["containers"][0]["command"] = args["command"].clone();
            "container"
        }
        "MultiContainerRun" => {
            let dir = args["sharedVolumeDir"].as_str().expect("sharedVolumeDir");
            let medium = args["sharedVolumeMedium"].as_str().unwrap_or("");
            pod["spec"]["volumes"] = yaml(&format!(
                "[{{name: shared, emptyDir: {{medium: \"{medium}\"}}}}]"
            ));
            let container = |name: &str, image: &str, command: &str| {
                let mut c = yaml(&format!(
                    "{{name: {name}, volumeMounts: [{{name: shared, mountPath: \"{dir}\"}}]}}"
                ));
                c["image"] = args[image].clone();
                c["command"] = args[command].clone();
                c
            };
            pod["spec"]["initContainers"] =
                Value::Sequence(vec![container("init", "initImage", "initCommand")]);
            pod["spec"]["containers"] = Value::Sequence(vec![
                container("background", "backgroundImage", "backgroundCommand"),
                container("output", "outputImage", "outputCommand"),
            ]);
            "output"
        }
        other => panic!("no pod for phase function {other}"),
    };
    // KubeTask's and MultiContainerRun's podLabels and podAnnotations.
    for (arg, field) in [("podLabels", "labels"), ("podAnnotations", "annotations")] {
        if let Some(m) = args.get(arg).and_then(Value::as_mapping) {
            for (k, v) in m {
                pod["metadata"][field][k.clone()] = v.clone();
            }
        }
    }
    if let Some(over) = args.get("podOverride") {
        let patch = serde_json::to_string(&serde_json::json!({ "spec": over }))
            .expect("podOverride as JSON");
        let base = serde_yaml::to_string(&pod).expect("pod");
        let o = cluster.kubectl_output(
            &[
                "patch",
                "--local",
                "-f",
                "-",
                "--type",
                "strategic",
                "-p",
                &patch,
                "-o",
                "yaml",
            ],
            Some(base.as_bytes()),
            60,
        );
        assert!(
            o.status.success(),
            "merging podOverride: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        pod = serde_yaml::from_slice(&o.stdout).expect("merged pod");
    }
    (pod, output)
}

/// Runs one phase in the cluster as Kanister would; returns its outputs.
pub fn run_phase(
    cluster: &Cluster,
    phase: &Value,
    values: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let func = phase["func"].as_str().expect("func");
    let name = phase["name"].as_str().unwrap_or("phase");
    let args = render_value(&phase["args"], values);
    let ns = args["namespace"].as_str().expect("namespace").to_string();
    if func == "KubeExec" {
        let pod = args["pod"].as_str().expect("pod");
        let container = args["container"].as_str().expect("container");
        let command: Vec<String> = args["command"]
            .as_sequence()
            .expect("command")
            .iter()
            .map(|a| a.as_str().expect("string argument").to_string())
            .collect();
        let mut argv = vec!["exec", "-n", &ns, pod, "-c", container, "--"];
        argv.extend(command.iter().map(String::as_str));
        let o = cluster.kubectl_output(&argv, None, 300);
        assert!(
            o.status.success(),
            "KubeExec phase {name} failed: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        return phase_outputs(&String::from_utf8_lossy(&o.stdout));
    }
    let (pod, output) = phase_pod(cluster, func, &args);
    let o = cluster.kubectl_output(
        &["create", "-f", "-", "-o", "jsonpath={.metadata.name}"],
        Some(serde_yaml::to_string(&pod).expect("pod").as_bytes()),
        60,
    );
    assert!(
        o.status.success(),
        "creating the pod of {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pod_name = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let (phase_state, logs) = cluster.wait_pod_done(&ns, &pod_name, 300);
    assert_eq!(
        phase_state,
        "Succeeded",
        "{func} phase {name} (pod {ns}/{pod_name}) failed:\n{logs}\n{}",
        cluster.describe(&ns, &format!("pod/{pod_name}"))
    );
    phase_outputs(&cluster.logs(&ns, &pod_name, Some(output)))
}

/// Runs every phase of `action`; adds its output artifacts to `values`.
pub fn run_action(
    cluster: &Cluster,
    blueprint: &Value,
    action: &str,
    values: &mut BTreeMap<String, String>,
) {
    let phases = blueprint["actions"][action]["phases"]
        .as_sequence()
        .unwrap_or_else(|| panic!("action {action} has no phases"))
        .clone();
    for phase in &phases {
        let name = phase["name"].as_str().unwrap_or_default().to_string();
        let outputs = run_phase(cluster, phase, values);
        for (k, v) in outputs {
            values.insert(format!(".Phases.{name}.Output.{k}"), v);
        }
    }
    // The action's output artifacts, rendered as Kanister does once its phases are done
    // (with everything the phases could see, and their outputs).
    if let Some(artifacts) = blueprint["actions"][action]["outputArtifacts"].as_mapping() {
        for (artifact, spec) in artifacts {
            let artifact = artifact.as_str().unwrap_or_default();
            for (key, template) in spec["keyValue"].as_mapping().into_iter().flatten() {
                let key = key.as_str().unwrap_or_default();
                let value = render(template.as_str().unwrap_or_default(), values);
                values.insert(format!(".ArtifactsIn.{artifact}.KeyValue.{key}"), value);
            }
        }
    }
}

#[test]
fn the_volume_blueprint_backs_up_restores_and_deletes_as_kanister_runs_it() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: volume blueprint phases") else {
        return;
    };
    let ns = cluster.namespace("dm-bp-server");
    let app = cluster.namespace("dm-bp-app");
    let server = TestServer::create(
        cluster,
        &ns,
        "datamover",
        &images.server,
        &[("volume-client", "volume-client-token-0123")],
    );
    let data = server.wait_ready(cluster, 180);
    // A client identity of its own in the namespace, named by the ActionSet's options.
    server.client_config(
        cluster,
        app.as_str(),
        "volume-client",
        "volume-client",
        "volume-client-token-0123",
        &data,
    );
    let source = cluster.volume_dir(&format!("{}-data", app.as_str()));
    make_tree(&source, 21);
    cluster.local_pvc(app.as_str(), "data", &source);
    let target = cluster.volume_dir(&format!("{}-restored", app.as_str()));
    cluster.local_pvc(app.as_str(), "restored", &target);

    let bp = load("volume-blueprint.yaml");
    let mut values = BTreeMap::new();
    values.insert(".Options.datamoverSecret".into(), "volume-client".into());
    values.insert(".Options.datamoverConfigMap".into(), "volume-client".into());
    values.insert(".PVC.Namespace".into(), app.as_str().into());
    values.insert(".PVC.Name".into(), "data".into());
    run_action(cluster, &bp, "backup", &mut values);
    let id = values
        .get(".ArtifactsIn.volumeSnapshot.KeyValue.snapshot_id")
        .cloned()
        .expect("the backup's snapshot_id artifact");
    assert!(!id.is_empty());

    values.insert(".PVC.Name".into(), "restored".into());
    run_action(cluster, &bp, "restore", &mut values);
    assert_same_tree(&source, &target);

    // Delete runs on the Namespace object, as Kanister gives it (`.Object`).
    values.insert(".Object.metadata.name".into(), app.as_str().into());
    run_action(cluster, &bp, "delete", &mut values);
    // The snapshot is gone: a restore of it now fails.
    let again = cluster.volume_dir(&format!("{}-again", app.as_str()));
    cluster.local_pvc(app.as_str(), "again", &again);
    values.insert(".PVC.Name".into(), "again".into());
    let restore = bp["actions"]["restore"]["phases"][0].clone();
    let args = render_value(&restore["args"], &values);
    let (pod, _) = phase_pod(cluster, "KubeTask", &args);
    let o = cluster.kubectl_output(
        &["create", "-f", "-", "-o", "jsonpath={.metadata.name}"],
        Some(serde_yaml::to_string(&pod).expect("pod").as_bytes()),
        60,
    );
    assert!(o.status.success());
    let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let (phase, logs) = cluster.wait_pod_done(app.as_str(), &name, 180);
    assert_eq!(
        phase, "Failed",
        "a restore of a deleted snapshot succeeded:\n{logs}"
    );
    assert!(
        logs.contains(&id[..8]) || logs.to_lowercase().contains("not found"),
        "{logs}"
    );
}

/// A Kanister controller binary to run, from `KANISTER_CONTROLLER`.
fn kanister_controller() -> Option<std::path::PathBuf> {
    match std::env::var_os("KANISTER_CONTROLLER") {
        Some(p) => Some(std::path::PathBuf::from(p)),
        None => {
            eprintln!(
                "SKIPPED cluster: real Kanister: KANISTER_CONTROLLER does not name a Kanister \
                 controller binary (build one from Kanister's source, CGO_ENABLED=0, and set it \
                 to run the blueprints through real ActionSets)"
            );
            None
        }
    }
}

/// Deploys the Kanister controller binary as a pod (its own image, cluster-admin) in
/// namespace `kanister`, and waits for its CRDs.
fn deploy_kanister(cluster: &Cluster, binary: &std::path::Path) {
    let ctx = tempfile::tempdir().expect("tempdir");
    std::fs::copy(binary, ctx.path().join("controller")).expect("copy the Kanister controller");
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        ctx.path().join("ca.crt"),
    )
    .ok();
    std::fs::write(
        ctx.path().join("Containerfile"),
        "FROM scratch\nCOPY controller /controller\nCOPY ca.crt /etc/ssl/certs/ca-certificates.crt\n\
         USER 65532:65532\nENTRYPOINT [\"/controller\"]\n",
    )
    .expect("write");
    let image = "datamover-test/kanister-controller:local";
    datamover_tests::blueprint::run_ok(
        std::process::Command::new("docker")
            .args(["build", "-q", "-t", image, "-f"])
            .arg(ctx.path().join("Containerfile"))
            .arg(ctx.path()),
        300,
        "docker build of the Kanister controller image",
    );
    cluster.load_images(&[image]);
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: kanister}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: kanister, namespace: kanister}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: datamover-test-kanister}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}
subjects: [{{kind: ServiceAccount, name: kanister, namespace: kanister}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: kanister-controller, namespace: kanister}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: kanister}}}}
  template:
    metadata: {{labels: {{app: kanister}}}}
    spec:
      serviceAccountName: kanister
      containers:
      - name: controller
        image: {image}
        imagePullPolicy: Never
        env:
        - {{name: POD_NAMESPACE, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}
        - {{name: POD_SERVICE_ACCOUNT, valueFrom: {{fieldRef: {{fieldPath: spec.serviceAccountName}}}}}}
        - {{name: CREATEORUPDATE_CRDS, value: "true"}}
"#
    ));
    poll("Kanister's ActionSet CRD", 180, || {
        cluster
            .kubectl_output(&["get", "crd", "actionsets.cr.kanister.io"], None, 30)
            .status
            .success()
            .then_some(())
    });
}

/// Creates an ActionSet and waits for it to complete; returns its status as JSON.
fn action_set(cluster: &Cluster, body: &str) -> serde_json::Value {
    let o = cluster.kubectl_output(
        &["create", "-f", "-", "-o", "jsonpath={.metadata.name}"],
        Some(body.as_bytes()),
        60,
    );
    assert!(
        o.status.success(),
        "creating an ActionSet: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
    poll(&format!("ActionSet {name} to complete"), 300, || {
        let o = cluster.kubectl_output(
            &["get", "actionset", "-n", "kanister", &name, "-o", "json"],
            None,
            30,
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        match v["status"]["state"].as_str() {
            Some("complete") => Some(v["status"].clone()),
            Some("failed") => panic!("ActionSet {name} failed: {}", v["status"]),
            _ => None,
        }
    })
}

#[test]
fn real_kanister_runs_the_volume_blueprint() {
    let _turn = turn();
    let Some(binary) = kanister_controller() else {
        return;
    };
    let Some((cluster, images)) = ready("cluster: real Kanister") else {
        return;
    };
    deploy_kanister(cluster, &binary);
    let ns = cluster.namespace("dm-k10-server");
    let app = cluster.namespace("dm-k10-app");
    let server = TestServer::create(
        cluster,
        &ns,
        "datamover",
        &images.server,
        &[("k-client", "k-client-token-0123456789")],
    );
    let data = server.wait_ready(cluster, 180);
    server.client_config(
        cluster,
        app.as_str(),
        "datamover-client",
        "k-client",
        "k-client-token-0123456789",
        &data,
    );
    let source = cluster.volume_dir(&format!("{}-data", app.as_str()));
    make_tree(&source, 31);
    cluster.local_pvc(app.as_str(), "data", &source);
    let target = cluster.volume_dir(&format!("{}-restored", app.as_str()));
    cluster.local_pvc(app.as_str(), "restored", &target);
    let bp = std::fs::read_to_string(repo_root().join("blueprints/volume-blueprint.yaml"))
        .expect("blueprint");
    let o = cluster.kubectl_output(
        &["apply", "-n", "kanister", "-f", "-"],
        Some(bp.as_bytes()),
        60,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let app = app.as_str();
    let status = action_set(
        cluster,
        &format!(
            "apiVersion: cr.kanister.io/v1alpha1\nkind: ActionSet\nmetadata: {{generateName: backup-, namespace: kanister}}\n\
             spec:\n  actions:\n  - name: backup\n    blueprint: datamover-volume\n    object: {{kind: pvc, name: data, namespace: {app}}}\n"
        ),
    );
    let artifact = &status["actions"][0]["artifacts"]["volumeSnapshot"]["keyValue"];
    let id = artifact["snapshot_id"]
        .as_str()
        .expect("snapshot_id artifact")
        .to_string();
    eprintln!("real Kanister backup: {artifact}");
    action_set(
        cluster,
        &format!(
            "apiVersion: cr.kanister.io/v1alpha1\nkind: ActionSet\nmetadata: {{generateName: restore-, namespace: kanister}}\n\
             spec:\n  actions:\n  - name: restore\n    blueprint: datamover-volume\n    object: {{kind: pvc, name: restored, namespace: {app}}}\n\
             \x20   artifacts:\n      volumeSnapshot:\n        keyValue: {artifact}\n"
        ),
    );
    assert_same_tree(&source, &target);
    action_set(
        cluster,
        &format!(
            "apiVersion: cr.kanister.io/v1alpha1\nkind: ActionSet\nmetadata: {{generateName: delete-, namespace: kanister}}\n\
             spec:\n  actions:\n  - name: delete\n    blueprint: datamover-volume\n    object: {{kind: namespace, name: {app}, namespace: {app}}}\n\
             \x20   artifacts:\n      volumeSnapshot:\n        keyValue: {artifact}\n"
        ),
    );
    eprintln!("real Kanister: backup, restore and delete of snapshot {id} complete");
}
