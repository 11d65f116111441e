//! One image naming everywhere: every image of the project that a manifest, an example
//! or the Helm chart names is `datamover/datamover-<name>:<workspace version>`.

use std::path::{Path, PathBuf};

const NAMES: [&str; 3] = ["server", "client", "controller"];
/// Images of others the examples use, allowed as they are.
const THIRD_PARTY: [&str; 1] = ["busybox:"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crd/ has a parent")
        .to_path_buf()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// The `image:` values of a YAML file, with their line numbers (quotes removed).
fn images(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim_start().trim_start_matches("- ");
            let value = line.strip_prefix("image:")?.trim();
            let value = value.split(" #").next().unwrap_or_default().trim();
            Some((
                i + 1,
                value.trim_matches('"').trim_matches('\'').to_string(),
            ))
        })
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

fn well_named(image: &str) -> bool {
    let version = env!("CARGO_PKG_VERSION");
    NAMES
        .iter()
        .any(|n| image == format!("datamover/datamover-{n}:{version}"))
}

#[test]
fn every_image_is_datamover_slash_datamover_name_colon_version() {
    let root = repo_root();
    let mut files = Vec::new();
    for dir in ["crd/examples", "crd/manifests", "charts"] {
        yaml_files(&root.join(dir), &mut files);
    }
    assert!(files.len() >= 8, "too few YAML files found: {files:?}");
    let mut bad = Vec::new();
    let mut seen = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, image) in images(&text) {
            // A Helm template's image comes from values.yaml, checked below.
            if image.contains("{{") || THIRD_PARTY.iter().any(|t| image.starts_with(t)) {
                continue;
            }
            seen += 1;
            if !well_named(&image) {
                bad.push(format!("{}:{line}: {image}", file.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "images not named datamover/datamover-<{}>:{}:\n{}",
        NAMES.join("|"),
        env!("CARGO_PKG_VERSION"),
        bad.join("\n")
    );
    assert!(seen >= 3, "only {seen} images found");

    // The chart: repository in values.yaml, tag defaulting to the appVersion.
    let chart = root.join("charts/datamover");
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("values.yaml")).unwrap()).unwrap();
    let meta: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap()).unwrap();
    let tag = match values["image"]["tag"].as_str() {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => meta["appVersion"].as_str().unwrap_or_default().to_string(),
    };
    let repository = values["image"]["repository"].as_str().unwrap_or_default();
    let chart_image = format!("{repository}:{tag}");
    assert_eq!(
        chart_image,
        format!(
            "datamover/datamover-controller:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert!(well_named(datamover_crd::manifests::CONTROLLER_IMAGE));
}

#[test]
fn the_scanner_sees_images_in_every_yaml_form() {
    let text = "containers:\n  - image: datamover/datamover-client:0.1.0\n    image: \"a:b\" # c\nimage: 'x'\n";
    let found: Vec<String> = images(text).into_iter().map(|(_, v)| v).collect();
    assert_eq!(found, ["datamover/datamover-client:0.1.0", "a:b", "x"]);
    assert!(well_named(&format!(
        "datamover/datamover-server:{}",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(!well_named("datamover-server:0.1.0"));
    assert!(!well_named("datamover/datamover-server:latest"));
}
