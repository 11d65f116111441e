//! The committed manifests are exactly what the code generates, and the CRD schema carries
//! the validation the issue asks for.

use std::path::Path;

use datamover_crd::manifests;
use serde_json::Value;

#[test]
fn committed_manifests_match_the_generator() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let mut stale = Vec::new();
    for (name, generated) in manifests::render().unwrap() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        if committed != generated {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "crd/manifests/{{{}}} differ from the code: run `cargo run -p datamover-crd --bin crdgen -- --write crd/manifests` and commit",
        stale.join(",")
    );
}

fn schema() -> Value {
    let crd = serde_json::to_value(manifests::crd()).unwrap();
    assert_eq!(crd["spec"]["group"], "dm.cr.kanister.io");
    assert_eq!(crd["spec"]["names"]["kind"], "DatamoverServer");
    assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn the_schema_validates_ports_names_and_required_fields() {
    let root = schema();
    let spec = &root["properties"]["spec"];
    let required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for field in ["image", "config", "clientSecretRef", "secrets"] {
        assert!(
            required.contains(&field),
            "{field} must be required: {required:?}"
        );
    }
    let port = &spec["properties"]["protocols"]["items"]["properties"]["port"];
    assert_eq!(port["minimum"].as_f64(), Some(1.0));
    assert_eq!(port["maximum"].as_f64(), Some(65535.0));
    let proto_name = &spec["properties"]["protocols"]["items"]["properties"]["name"];
    assert_eq!(proto_name["maxLength"], 15);
    assert!(
        proto_name["pattern"]
            .as_str()
            .unwrap()
            .starts_with("^[a-z0-9]")
    );
    let secret_name = &spec["properties"]["secrets"]["items"]["properties"]["secretName"];
    assert!(secret_name["pattern"].is_string());
    assert_eq!(spec["properties"]["protocols"]["default"][0]["port"], 51515);
    assert_eq!(spec["properties"]["replicas"]["default"], 1);
    // The object name becomes the Service name: a DNS label, checked by CEL.
    let rules = root["x-kubernetes-validations"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["rule"].as_str().unwrap().contains("metadata.name"))
    );
    // Status subresource and print columns.
    let crd = serde_json::to_value(manifests::crd()).unwrap();
    let version = &crd["spec"]["versions"][0];
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Progress", "Service", "Replicas", "Image", "Age"]);
    let progress = &root["properties"]["status"]["properties"]["progress"];
    assert_eq!(
        progress["enum"],
        serde_json::json!(["Pending", "Ready", "Failed"])
    );
}

fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crd/ has a parent")
        .to_path_buf()
}

fn yaml_docs(text: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Helm template lines (`{{ … }}`) removed: what is left of a template is plain YAML.
fn without_template_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !l.contains("{{"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_helm_chart_does_not_drift_from_the_generated_manifests() {
    let chart = repo_root().join(manifests::CHART_DIR);
    let mut stale = Vec::new();
    for (name, generated) in manifests::render_chart().unwrap() {
        let committed = std::fs::read_to_string(chart.join(name)).unwrap_or_default();
        if committed != generated {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "charts/datamover/{{{}}} differ from the code: run `cargo run -p datamover-crd --bin crdgen -- --write crd/manifests` and commit",
        stale.join(",")
    );

    let generated: Vec<(&str, String)> = manifests::render().unwrap();
    let file = |name: &str| {
        generated
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c.clone())
            .unwrap()
    };
    // The chart's CRD is crd/manifests/crd.yaml.
    let chart_crd = std::fs::read_to_string(chart.join("crds/datamoverservers.yaml")).unwrap();
    assert_eq!(chart_crd, file("crd.yaml"));

    // The ClusterRole template's rules, read as YAML, are rbac.yaml's.
    let rbac = yaml_docs(&file("rbac.yaml"));
    let role = rbac
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("rbac.yaml has a ClusterRole");
    let template = std::fs::read_to_string(chart.join("templates/clusterrole.yaml")).unwrap();
    let chart_role: serde_yaml::Value =
        serde_yaml::from_str(&without_template_lines(&template)).unwrap();
    assert_eq!(chart_role["kind"], "ClusterRole");
    assert_eq!(chart_role["rules"], role["rules"]);
    // The binding binds that role to the chart's service account.
    let binding = std::fs::read_to_string(chart.join("templates/clusterrolebinding.yaml")).unwrap();
    assert!(binding.contains("kind: ClusterRole\n"), "{binding}");

    // The chart's Deployment sets what the generated one sets.
    let deployment = std::fs::read_to_string(chart.join("templates/deployment.yaml")).unwrap();
    let generated_deployment = serde_json::to_value(manifests::controller_deployment()).unwrap();
    let container = &generated_deployment["spec"]["template"]["spec"]["containers"][0];
    for env in container["env"].as_array().unwrap() {
        let name = env["name"].as_str().unwrap();
        assert!(
            deployment.contains(&format!("- name: {name}\n")),
            "the chart's Deployment lacks {name}"
        );
    }
    for needle in [
        "serviceAccountName: {{ include \"datamover.fullname\" . }}",
        "namespace: {{ .Release.Namespace }}",
        "containerPort: 8080",
        "path: /healthz",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "type: RuntimeDefault",
        "app.kubernetes.io/name: datamover-controller",
    ] {
        let haystack =
            std::fs::read_to_string(chart.join("templates/_helpers.tpl")).unwrap() + &deployment;
        assert!(haystack.contains(needle), "the chart lacks {needle:?}");
    }

    // The chart's versions follow the workspace's.
    let meta: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(meta["apiVersion"], "v2");
    assert_eq!(meta["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta["appVersion"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn the_schema_has_the_storage_volume_and_client_namespaces() {
    let root = schema();
    let spec = &root["properties"]["spec"]["properties"];
    let volume = &spec["storageVolume"];
    assert_eq!(
        volume["required"],
        serde_json::json!(["persistentVolumeClaim"])
    );
    assert_eq!(
        volume["properties"]["mountPath"]["default"],
        "/var/lib/datamover"
    );
    assert_eq!(
        volume["properties"]["persistentVolumeClaim"]["required"],
        serde_json::json!(["claimName"])
    );
    let client = &spec["networkPolicy"]["properties"]["allowedClients"]["items"]["properties"];
    assert_eq!(client["namespaces"]["items"]["maxLength"], 63);
    assert!(client["namespaces"]["items"]["pattern"].is_string());
    let rules = root["x-kubernetes-validations"].as_array().unwrap();
    assert!(rules.iter().any(|r| {
        r["rule"]
            .as_str()
            .unwrap()
            .contains("storageVolume.mountPath")
    }));
}

#[test]
fn the_schema_validates_serviceaccount_clients_and_publishes_the_audience() {
    let root = schema();
    let clients = &root["properties"]["spec"]["properties"]["serviceAccountClients"];
    assert_eq!(clients["maxItems"], 64);
    let entry = &clients["items"];
    assert_eq!(entry["required"], serde_json::json!(["role", "tenant"]));
    let props = &entry["properties"];
    assert_eq!(
        props["role"]["enum"],
        serde_json::json!(["append", "read", "full", "admin"])
    );
    assert!(props["tenant"]["pattern"].is_string());
    assert_eq!(props["namespace"]["maxLength"], 63);
    let requirement = &props["selector"]["properties"]["matchExpressions"]["items"];
    assert_eq!(
        requirement["properties"]["operator"]["enum"],
        serde_json::json!(["In", "NotIn", "Exists", "DoesNotExist"])
    );
    let rules: Vec<String> = root["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap().to_string())
        .collect();
    for needle in [
        "needs a namespace or a selector",
        "needs a non-empty selector",
        "In and NotIn need values",
    ] {
        assert!(
            rules.iter().any(|m| m.contains(needle)),
            "{needle}: {rules:?}"
        );
    }
    let info = &root["properties"]["status"]["properties"]["serverInfo"]["properties"];
    assert_eq!(info["tokenAudience"]["type"], "string");
}

/// The RBAC of ServiceAccount clients: exactly what the controller needs, `bind` only on
/// the two ClusterRoles it binds, and the reader role shipped with it.
#[test]
fn the_controller_may_bind_only_the_two_roles_it_grants() {
    let role = serde_json::to_value(manifests::cluster_role()).unwrap();
    let rules = role["rules"].as_array().unwrap();
    let verbs_of = |group: &str, resource: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| {
                r["apiGroups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|g| g == group)
                    && r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x == resource)
            })
            .flat_map(|r| r["verbs"].as_array().unwrap().clone())
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let bind: Vec<&Value> = rules
        .iter()
        .filter(|r| r["verbs"].as_array().unwrap().iter().any(|v| v == "bind"))
        .collect();
    assert_eq!(bind.len(), 1);
    assert_eq!(bind[0]["resources"], serde_json::json!(["clusterroles"]));
    assert_eq!(
        bind[0]["resourceNames"],
        serde_json::json!(["system:auth-delegator", "datamover-serviceaccount-reader"])
    );
    assert!(
        !rules.iter().any(|r| r["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "escalate" || v == "*")),
        "no escalate, no wildcard"
    );
    let rbac = "rbac.authorization.k8s.io";
    for resource in ["clusterrolebindings", "rolebindings"] {
        assert_eq!(
            verbs_of(rbac, resource),
            ["list", "create", "patch", "delete"],
            "{resource}"
        );
    }
    assert_eq!(verbs_of("", "serviceaccounts"), ["create", "patch"]);
    assert_eq!(
        verbs_of("", "configmaps"),
        ["get", "list", "watch", "create", "patch"]
    );
    assert_eq!(verbs_of("", "secrets"), ["get"], "Secrets stay get-only");
    assert_eq!(
        verbs_of("dm.cr.kanister.io", "datamoverservers"),
        ["get", "list", "watch", "patch"]
    );

    let reader = serde_json::to_value(manifests::serviceaccount_reader_role()).unwrap();
    assert_eq!(
        reader["metadata"]["name"],
        "datamover-serviceaccount-reader"
    );
    assert_eq!(
        reader["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]}])
    );
    let rbac_yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/rbac.yaml"))
            .unwrap();
    assert!(rbac_yaml.contains("name: datamover-serviceaccount-reader"));
    let chart = std::fs::read_to_string(
        repo_root()
            .join(manifests::CHART_DIR)
            .join("templates/serviceaccount-reader-clusterrole.yaml"),
    )
    .unwrap();
    assert!(
        chart.contains("name: datamover-serviceaccount-reader\n"),
        "{chart}"
    );
}
