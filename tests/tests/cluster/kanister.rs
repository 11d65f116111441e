//! The blueprints in the cluster: every phase as the pod Kanister's KubeTask and
//! MultiContainerRun create (or the exec KubeExec makes), with the same rendered
//! arguments, and real ActionSets when `KANISTER_CONTROLLER` names a Kanister controller.
//!
//! Each blueprint test runs its actions through a [`Runner`]: [`Runner::Phases`] (always)
//! or [`Runner::Kanister`] (real ActionSets; only when `KANISTER_CONTROLLER` is set, the
//! one skip allowed under CI). The same [`ActionSpec`] (blueprint, action, object,
//! options, input artifacts) drives both, so what the phases test is what Kanister runs.
//!
//! A phase's pod is built as Kanister builds it: KubeTask a pod with one container
//! `container` (the phase's image and command), MultiContainerRun an `init` container and
//! `background` and `output` containers sharing a volume `shared` at `sharedVolumeDir`;
//! the phase's `podOverride` is merged into the pod spec by strategic merge (by the
//! apiserver's own merge code, `kubectl patch --local`), as Kanister does. Outputs are the
//! `###Phase-output###` lines of the output container.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use datamover_tests::blueprint::{load, phase_outputs, render, render_value, repo_root};
use datamover_tests::cluster::{Cluster, poll};
use serde_json::json;
use serde_yaml::Value;

fn yaml(s: &str) -> Value {
    serde_yaml::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// The pod Kanister would create for a KubeTask or MultiContainerRun phase.
pub fn phase_pod(cluster: &Cluster, func: &str, args: &Value) -> (Value, &'static str) {
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

/// Output artifacts of an action (or input artifacts of the next): name → key → value.
pub type Artifacts = BTreeMap<String, BTreeMap<String, String>>;

/// The object of an ActionSet, as Kanister gives it to the templates.
#[derive(Clone, Debug)]
pub enum Object<'a> {
    Pvc {
        namespace: &'a str,
        name: &'a str,
    },
    StatefulSet {
        namespace: &'a str,
        name: &'a str,
    },
    /// `pod`: the Deployment's running pod (`index .Deployment.Pods 0`).
    Deployment {
        namespace: &'a str,
        name: &'a str,
        pod: &'a str,
    },
    /// A namespace object with its `namespace` set too, as `kanctl --namespacetargets`
    /// makes it.
    Namespace(&'a str),
}

/// One action of one blueprint: what an ActionSet names.
pub struct ActionSpec<'a> {
    /// File under blueprints/.
    pub blueprint: &'a str,
    pub action: &'a str,
    pub object: Object<'a>,
    pub options: &'a [(&'a str, &'a str)],
    pub artifacts: &'a Artifacts,
}

/// How an action runs: its phases as the pods Kanister creates, or real Kanister.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    Phases,
    Kanister,
}

impl Runner {
    /// Runs the action; its output artifacts. Panics when it fails.
    pub fn run(self, cluster: &Cluster, spec: &ActionSpec) -> Artifacts {
        self.try_run(cluster, spec)
            .unwrap_or_else(|e| panic!("{} {}: {e}", spec.blueprint, spec.action))
    }

    /// Runs the action; its output artifacts, or what its failure said.
    pub fn try_run(self, cluster: &Cluster, spec: &ActionSpec) -> Result<Artifacts, String> {
        match self {
            Runner::Phases => run_phases(cluster, spec),
            Runner::Kanister => run_action_set(cluster, spec),
        }
    }
}

/// The template values Kanister gives an action on `spec`'s object.
pub fn template_values(spec: &ActionSpec) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let mut set = |k: &str, x: &str| {
        v.insert(k.to_string(), x.to_string());
    };
    match spec.object {
        Object::Pvc { namespace, name } => {
            set(".PVC.Namespace", namespace);
            set(".PVC.Name", name);
            set(".Object.metadata.name", name);
            set(".Object.metadata.namespace", namespace);
        }
        Object::StatefulSet { namespace, name } => {
            set(".StatefulSet.Namespace", namespace);
            set(".StatefulSet.Name", name);
            set(".Object.metadata.name", name);
            set(".Object.metadata.namespace", namespace);
        }
        Object::Deployment {
            namespace,
            name,
            pod,
        } => {
            set(".Deployment.Namespace", namespace);
            set(".Deployment.Name", name);
            set(".Deployment.Pods.0", pod);
            set(".Object.metadata.name", name);
            set(".Object.metadata.namespace", namespace);
        }
        Object::Namespace(ns) => {
            set(".Namespace.Name", ns);
            set(".Object.metadata.name", ns);
            set(".Object.metadata.namespace", ns);
        }
    }
    for (k, x) in spec.options {
        set(&format!(".Options.{k}"), x);
    }
    for (artifact, kv) in spec.artifacts {
        for (k, x) in kv {
            set(&format!(".ArtifactsIn.{artifact}.KeyValue.{k}"), x);
        }
    }
    v
}

fn run_phases(cluster: &Cluster, spec: &ActionSpec) -> Result<Artifacts, String> {
    let blueprint = load(spec.blueprint);
    let action = &blueprint["actions"][spec.action];
    let phases = action["phases"]
        .as_sequence()
        .ok_or_else(|| format!("action {} has no phases", spec.action))?;
    let mut values = template_values(spec);
    for phase in phases {
        let name = phase["name"].as_str().unwrap_or_default().to_string();
        for (k, v) in run_phase(cluster, phase, &values)? {
            values.insert(format!(".Phases.{name}.Output.{k}"), v);
        }
    }
    // The action's output artifacts, rendered as Kanister does once its phases are done
    // (with everything the phases could see, and their outputs).
    let mut out = Artifacts::new();
    for (artifact, a) in action["outputArtifacts"].as_mapping().into_iter().flatten() {
        let artifact = artifact.as_str().unwrap_or_default().to_string();
        for (key, template) in a["keyValue"].as_mapping().into_iter().flatten() {
            let value = render(template.as_str().unwrap_or_default(), &values);
            out.entry(artifact.clone())
                .or_default()
                .insert(key.as_str().unwrap_or_default().to_string(), value);
        }
    }
    Ok(out)
}

/// Runs one phase in the cluster as Kanister would; its outputs, or why it failed.
pub fn run_phase(
    cluster: &Cluster,
    phase: &Value,
    values: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
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
        let stdout = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            return Err(format!(
                "KubeExec phase {name} failed: {stdout}\n{}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        return Ok(phase_outputs(&stdout));
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
    if phase_state != "Succeeded" {
        return Err(format!(
            "{func} phase {name} (pod {ns}/{pod_name}) failed:\n{logs}\n{}",
            cluster.describe(&ns, &format!("pod/{pod_name}"))
        ));
    }
    Ok(phase_outputs(&cluster.logs(&ns, &pod_name, Some(output))))
}

/// The Kanister controller binary `KANISTER_CONTROLLER` names, or `None` (said) when it
/// is not set: real Kanister tests then skip, the one skip allowed under CI.
pub fn kanister_controller(test: &str) -> Option<std::path::PathBuf> {
    match std::env::var_os("KANISTER_CONTROLLER") {
        Some(p) => Some(std::path::PathBuf::from(p)),
        None => {
            eprintln!(
                "SKIPPED {test}: KANISTER_CONTROLLER does not name a Kanister controller binary \
                 (build one from Kanister's source, CGO_ENABLED=0, and set it to run the \
                 blueprints through real ActionSets)"
            );
            None
        }
    }
}

/// Kanister's namespace in the test cluster.
pub const KANISTER_NS: &str = "kanister";

/// Runs Kanister's controller in the cluster once (for every real Kanister test).
fn ensure_kanister(cluster: &Cluster) {
    static DEPLOYED: OnceLock<()> = OnceLock::new();
    DEPLOYED.get_or_init(|| {
        let binary = kanister_controller("real Kanister")
            .expect("a real Kanister test runs only when KANISTER_CONTROLLER is set");
        deploy_kanister(cluster, &binary);
    });
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

/// Creates the ActionSet of `spec` (its blueprint applied in Kanister's namespace first)
/// and waits for it; its output artifacts, or Kanister's status when it failed.
fn run_action_set(cluster: &Cluster, spec: &ActionSpec) -> Result<Artifacts, String> {
    ensure_kanister(cluster);
    let text = std::fs::read_to_string(repo_root().join("blueprints").join(spec.blueprint))
        .expect("blueprint");
    let o = cluster.kubectl_output(
        &["apply", "-n", KANISTER_NS, "-f", "-"],
        Some(text.as_bytes()),
        60,
    );
    assert!(
        o.status.success(),
        "applying blueprint {}: {}",
        spec.blueprint,
        String::from_utf8_lossy(&o.stderr)
    );
    let blueprint = load(spec.blueprint);
    let blueprint_name = blueprint["metadata"]["name"]
        .as_str()
        .expect("blueprint name");
    let object = match spec.object {
        Object::Pvc { namespace, name } => {
            json!({"kind": "pvc", "name": name, "namespace": namespace})
        }
        Object::StatefulSet { namespace, name } => {
            json!({"kind": "statefulset", "name": name, "namespace": namespace})
        }
        Object::Deployment {
            namespace, name, ..
        } => json!({"kind": "deployment", "name": name, "namespace": namespace}),
        Object::Namespace(ns) => json!({"kind": "namespace", "name": ns, "namespace": ns}),
    };
    let options: serde_json::Map<String, serde_json::Value> = spec
        .options
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let artifacts: serde_json::Map<String, serde_json::Value> = spec
        .artifacts
        .iter()
        .map(|(name, kv)| (name.clone(), json!({ "keyValue": kv })))
        .collect();
    let action_set = json!({
        "apiVersion": "cr.kanister.io/v1alpha1",
        "kind": "ActionSet",
        "metadata": {"generateName": format!("{}-", spec.action), "namespace": KANISTER_NS},
        "spec": {"actions": [{
            "name": spec.action,
            "blueprint": blueprint_name,
            "object": object,
            "options": options,
            "artifacts": artifacts,
        }]},
    });
    let o = cluster.kubectl_output(
        &["create", "-f", "-", "-o", "jsonpath={.metadata.name}"],
        Some(action_set.to_string().as_bytes()),
        60,
    );
    assert!(
        o.status.success(),
        "creating an ActionSet: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let name = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let status = poll(&format!("ActionSet {name} to end"), 420, || {
        let o = cluster.kubectl_output(
            &["get", "actionset", "-n", KANISTER_NS, &name, "-o", "json"],
            None,
            30,
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        match v["status"]["state"].as_str() {
            Some("complete" | "failed") => Some(v["status"].clone()),
            _ => None,
        }
    });
    eprintln!(
        "real Kanister: ActionSet {name} ({} {}): {}",
        spec.blueprint, spec.action, status["state"]
    );
    if status["state"] != "complete" {
        return Err(format!("ActionSet {name} failed: {status}"));
    }
    let mut out = Artifacts::new();
    if let Some(m) = status["actions"][0]["artifacts"].as_object() {
        for (artifact, a) in m {
            for (k, v) in a["keyValue"].as_object().into_iter().flatten() {
                out.entry(artifact.clone())
                    .or_default()
                    .insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
        }
    }
    Ok(out)
}
