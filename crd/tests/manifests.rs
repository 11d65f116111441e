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
