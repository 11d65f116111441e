//! The DatamoverServer's NetworkPolicy against the pods Kanister makes for a blueprint.
//!
//! The test cluster's CNI (the `bridge` plugin) does not enforce NetworkPolicies, so this
//! test asks the API server which pods the policy's peers select (its own label-selector
//! evaluation of the policy the controller wrote): the blueprint's pods in a namespace
//! the CR names are admitted to the protocol port, an unlabelled pod there and a
//! blueprint pod of another namespace are not.

use std::collections::BTreeSet;

use datamover_tests::cluster::{Cluster, poll};
use serde_json::Value;

use crate::kanister::{ActionSpec, Artifacts, Object, phase_pod, template_values};
use crate::setup::{ready, server_and_app, turn};

/// A label selector as kubectl's `-l` string; `None` for the empty selector (everything).
fn selector_string(sel: &Value) -> Option<String> {
    let mut parts = Vec::new();
    for (k, v) in sel["matchLabels"].as_object().into_iter().flatten() {
        parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
    }
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            other => panic!("unknown selector operator {other}"),
        });
    }
    (!parts.is_empty()).then(|| parts.join(","))
}

fn names(cluster: &Cluster, args: &[&str], selector: Option<&str>) -> Vec<String> {
    let mut argv = args.to_vec();
    if let Some(s) = selector {
        argv.extend(["-l", s]);
    }
    argv.extend(["-o", "jsonpath={.items[*].metadata.name}"]);
    let o = cluster.kubectl_output(&argv, None, 60);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `namespace/pod` of every pod the policy admits to `port`, by the API server's
/// evaluation of its peers' selectors.
fn admitted(cluster: &Cluster, policy: &Value, port: i64) -> BTreeSet<String> {
    let own_ns = policy["metadata"]["namespace"].as_str().expect("namespace");
    let mut out = BTreeSet::new();
    for rule in policy["spec"]["ingress"].as_array().into_iter().flatten() {
        let ports = rule["ports"].as_array().cloned().unwrap_or_default();
        if !ports.is_empty() && !ports.iter().any(|p| p["port"].as_i64() == Some(port)) {
            continue;
        }
        for peer in rule["from"].as_array().into_iter().flatten() {
            assert!(peer.get("ipBlock").is_none(), "an ipBlock peer: {peer}");
            let namespaces = match peer.get("namespaceSelector") {
                Some(sel) => names(
                    cluster,
                    &["get", "namespaces"],
                    selector_string(sel).as_deref(),
                ),
                None => vec![own_ns.to_string()],
            };
            let pod_selector = peer.get("podSelector").and_then(selector_string);
            for ns in namespaces {
                for pod in names(
                    cluster,
                    &["get", "pods", "-n", &ns],
                    pod_selector.as_deref(),
                ) {
                    out.insert(format!("{ns}/{pod}"));
                }
            }
        }
    }
    out
}

/// Creates the pod of the volume blueprint's backup phase, as Kanister makes it (labels
/// included), on PVC `data` of `ns`; its name. Whether it runs does not matter here.
fn blueprint_pod(cluster: &Cluster, ns: &str) -> String {
    let spec = ActionSpec {
        blueprint: "volume-blueprint.yaml",
        action: "backup",
        object: Object::Pvc {
            namespace: ns,
            name: "data",
        },
        options: &[],
        artifacts: &Artifacts::new(),
    };
    let bp = datamover_tests::blueprint::load(spec.blueprint);
    let phase = &bp["actions"]["backup"]["phases"][0];
    let args = datamover_tests::blueprint::render_value(&phase["args"], &template_values(&spec));
    let (pod, _) = phase_pod(cluster, phase["func"].as_str().expect("func"), &args);
    create(cluster, &serde_yaml::to_string(&pod).expect("pod"))
}

fn create(cluster: &Cluster, yaml: &str) -> String {
    let o = cluster.kubectl_output(
        &[
            "create",
            "-f",
            "-",
            "-o",
            "jsonpath={.metadata.namespace}/{.metadata.name}",
        ],
        Some(yaml.as_bytes()),
        60,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn the_network_policy_admits_blueprint_pods_of_the_namespaces_the_cr_names() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: NetworkPolicy") else {
        return;
    };
    let setup = server_and_app(cluster, images, "dm-np", "np-client", "datamover-client");
    let app = setup.app.as_str();
    let other = cluster.namespace("dm-np-other");
    let server_ns = setup.server.ns.as_str();
    cluster.kubectl_ok(&[
        "patch",
        "-n",
        server_ns,
        "datamoverserver",
        &setup.server.name,
        "--type",
        "merge",
        "-p",
        &format!(
            r#"{{"spec":{{"networkPolicy":{{"enabled":true,"allowedClients":[{{}},{{"namespaces":["{app}"]}}]}}}}}}"#
        ),
    ]);
    let policy: Value = poll("the DatamoverServer's NetworkPolicy", 120, || {
        let o = cluster.kubectl_output(
            &[
                "get",
                "networkpolicy",
                "-n",
                server_ns,
                &setup.server.name,
                "-o",
                "json",
            ],
            None,
            30,
        );
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    });
    let allowed = blueprint_pod(cluster, app);
    let elsewhere = blueprint_pod(cluster, other.as_str());
    let unlabelled = create(
        cluster,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: unlabelled, namespace: {app}}}\n\
             spec: {{restartPolicy: Never, containers: [{{name: c, image: {}, \
             imagePullPolicy: Never, args: [--version]}}]}}\n",
            images.client
        ),
    );
    let clients = admitted(cluster, &policy, 51515);
    assert!(
        clients.contains(&allowed),
        "the blueprint's pod {allowed} is not admitted by the policy: {policy}"
    );
    assert!(
        !clients.contains(&elsewhere),
        "a pod of a namespace the CR does not name ({elsewhere}) is admitted: {policy}"
    );
    assert!(
        !clients.contains(&unlabelled),
        "an unlabelled pod ({unlabelled}) is admitted: {policy}"
    );
    // The probe port admits the controller's pods (to read /server-data), not clients.
    let probe = admitted(cluster, &policy, 8080);
    assert!(!probe.contains(&allowed), "{probe:?}");
    assert!(
        probe
            .iter()
            .any(|p| p.starts_with(&format!("{}/", crate::setup::HELM_NAMESPACE))),
        "the controller's pods are not admitted to the probe port: {probe:?}"
    );
}
