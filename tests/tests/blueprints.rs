//! The Kanister blueprints, beyond what the Blueprint CRD's schema checks (the test
//! command validates every blueprint and example against it and the Kubernetes schemas
//! with `scripts/validate-manifests.sh`). The CRD leaves each phase's `args` free, so here:
//! each function is one Kanister has and gets only the arguments Kanister's function
//! takes, with the required ones; artifacts refer to phases and inputs that exist; the
//! client runs from the client image of this version; every pod a blueprint starts
//! carries the client label; every `podOverride` is a valid Kubernetes PodSpec (checked
//! by the same validator, as a Pod). Then what Kanister 0.118.0 does with them: the
//! ActionSet object kinds it accepts, the template parameters it fills for each kind,
//! the templates rendered (ActionSet options naming the Secret and ConfigMap, the
//! namespace of a delete), and the ActionSets the README documents.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use datamover_tests::blueprint::{load, phase_args, render, repo_root};
use serde_yaml::Value;

const BLUEPRINTS: &[&str] = &[
    "volume-blueprint.yaml",
    "volume-token-blueprint.yaml",
    "postgresql-blueprint.yaml",
    "mysql-blueprint.yaml",
    "sidecar-blueprint.yaml",
];

/// Kanister's functions used here: (all arguments, required arguments), as in
/// kanister's pkg/function (`Arguments()` and `RequiredArgs()`).
const KUBE_TASK: (&[&str], &[&str]) = (
    &[
        "namespace",
        "image",
        "command",
        "podOverride",
        "podLabels",
        "podAnnotations",
    ],
    &["image", "command"],
);
const KUBE_EXEC: (&[&str], &[&str]) = (
    &["namespace", "pod", "container", "command"],
    &["namespace", "pod", "container", "command"],
);
const MULTI_CONTAINER_RUN: (&[&str], &[&str]) = (
    &[
        "namespace",
        "initImage",
        "initCommand",
        "backgroundImage",
        "backgroundCommand",
        "outputImage",
        "outputCommand",
        "sharedVolumeMedium",
        "sharedVolumeSizeLimit",
        "sharedVolumeDir",
        "podOverride",
        "podLabels",
        "podAnnotations",
    ],
    &[
        "backgroundImage",
        "backgroundCommand",
        "outputImage",
        "outputCommand",
    ],
);

/// The ActionSet object kinds Kanister 0.118.0 accepts without an API group and resource
/// (`pkg/validate/validate.go` `actionSpec`, compared in lower case), and the template
/// parameter each one fills (`pkg/param/param.go` `New`): `.Object` (the object as
/// unstructured) and `.Options` are there for every kind. `.Namespace` is filled for a
/// namespace object from the object's `namespace` field, which kanctl's
/// `--namespacetargets` sets but an ActionSet written by hand may not: the blueprints
/// do not use it.
const OBJECT_KINDS: &[(&str, &str)] = &[
    ("pvc", ".PVC."),
    ("statefulset", ".StatefulSet."),
    ("deployment", ".Deployment."),
    ("deploymentconfig", ".DeploymentConfig."),
    ("namespace", ".Namespace."),
];

/// The client pods' label, which the DatamoverServer's NetworkPolicy admits.
const CLIENT_LABEL: &str = "dm.cr.kanister.io/client";

/// The ActionSet options the blueprints read, with their defaults.
const OPTIONS: &[(&str, &str)] = &[
    ("datamoverSecret", "datamover-client"),
    ("datamoverConfigMap", "datamover-client"),
    ("postgresqlSecret", "datamover-postgresql"),
    ("mysqlSecret", "datamover-mysql"),
    ("datamoverServiceAccount", "datamover-client"),
    ("tokenAudience", "datamover.datamover.datamover"),
];

/// Where a token blueprint's client finds its projected ServiceAccount token (the
/// client's default `DATAMOVER_TOKEN_FILE` is `<this>/token`).
const TOKEN_DIR: &str = "/var/run/secrets/datamover";

fn function_args(func: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    match func {
        "KubeTask" => Some(KUBE_TASK),
        "KubeExec" => Some(KUBE_EXEC),
        "MultiContainerRun" => Some(MULTI_CONTAINER_RUN),
        _ => None,
    }
}

fn workspace_version() -> String {
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let section = cargo
        .split("[workspace.package]")
        .nth(1)
        .expect("[workspace.package]");
    section
        .lines()
        .find_map(|l| {
            l.strip_prefix("version")
                .map(|v| v.trim().trim_start_matches('=').trim().trim_matches('"'))
        })
        .expect("workspace version")
        .to_string()
}

/// Every `{{ … }}` expression in a string.
fn templates(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(a) = rest.find("{{") {
        let b = rest[a..].find("}}").expect("closed template") + a;
        out.push(rest[a + 2..b].trim().to_string());
        rest = &rest[b + 2..];
    }
    out
}

/// The field paths (`.A.B`) of a template expression.
fn fields(expr: &str) -> Vec<&str> {
    expr.split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == '|')
        .filter(|w| w.starts_with('.'))
        .collect()
}

fn all_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Sequence(s) => s.iter().for_each(|x| all_strings(x, out)),
        Value::Mapping(m) => m.values().for_each(|x| all_strings(x, out)),
        _ => {}
    }
}

#[test]
fn blueprints_use_kanister_functions_and_arguments_correctly() {
    let client_image = format!("datamover/datamover-client:{}", workspace_version());
    for name in BLUEPRINTS {
        let bp = load(name);
        assert_eq!(bp["apiVersion"], "cr.kanister.io/v1alpha1", "{name}");
        assert_eq!(bp["kind"], "Blueprint", "{name}");
        let actions = bp["actions"].as_mapping().expect("actions");
        for action in ["backup", "restore", "delete"] {
            assert!(
                actions.contains_key(action),
                "{name} has no {action} action"
            );
        }
        for (action_name, action) in actions {
            let action_name = action_name.as_str().unwrap();
            let what = format!("{name} action {action_name}");
            // The kind is informational for Kanister, but it is what the ActionSet's
            // object must be: one Kanister accepts (never PersistentVolumeClaim).
            let kind = action["kind"].as_str().expect("kind");
            assert!(
                OBJECT_KINDS.iter().any(|(k, _)| *k == kind),
                "{what}: kind {kind} is not an ActionSet object kind of Kanister"
            );
            let phases = action["phases"].as_sequence().expect("phases");
            let phase_names: BTreeSet<&str> = phases
                .iter()
                .map(|p| p["name"].as_str().expect("phase name"))
                .collect();
            assert_eq!(phase_names.len(), phases.len(), "{what}: unique names");
            let inputs: BTreeSet<&str> = action["inputArtifactNames"]
                .as_sequence()
                .map(|s| s.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for phase in phases {
                let func = phase["func"].as_str().expect("func");
                let (allowed, required) =
                    function_args(func).unwrap_or_else(|| panic!("{what}: unknown {func}"));
                let args = phase["args"].as_mapping().expect("args");
                for k in args.keys() {
                    let k = k.as_str().unwrap();
                    assert!(allowed.contains(&k), "{what}: {func} takes no argument {k}");
                }
                for r in required {
                    assert!(args.contains_key(*r), "{what}: {func} needs {r}");
                }
                for key in ["image", "outputImage"] {
                    if let Some(image) = phase["args"][key].as_str() {
                        assert_eq!(image, client_image, "{what}: {key}");
                    }
                }
                // Every pod a blueprint starts carries the client label (Kanister's
                // podOverride patches the PodSpec only; podLabels label the pod).
                if func != "KubeExec" {
                    assert_eq!(
                        phase["args"]["podLabels"][CLIENT_LABEL].as_str(),
                        Some("true"),
                        "{what}: podLabels {CLIENT_LABEL}"
                    );
                }
                // The client's command, wherever it runs, is `datamover-client <mode> …`.
                for key in ["command", "outputCommand"] {
                    if let Some(cmd) = phase["args"][key].as_sequence()
                        && cmd.first().and_then(Value::as_str) == Some("datamover-client")
                    {
                        let mode = cmd[1].as_str().unwrap();
                        assert!(
                            [
                                "backup_files",
                                "restore_files",
                                "backup_stream",
                                "restore_stream",
                                "delete"
                            ]
                            .contains(&mode),
                            "{what}: mode {mode}"
                        );
                    }
                }
                // Artifacts used are declared as inputs.
                let mut strings = Vec::new();
                all_strings(&phase["args"], &mut strings);
                for t in strings.iter().flat_map(|s| templates(s)) {
                    // Only parameters Kanister fills for this kind of object.
                    for field in fields(&t) {
                        if let Some((k, _)) =
                            OBJECT_KINDS.iter().find(|(_, p)| field.starts_with(p))
                        {
                            assert!(
                                *k == kind && *k != "namespace",
                                "{what}: Kanister does not fill {field} for a {kind} object (.Namespace only from the object's namespace field)"
                            );
                        }
                        if let Some(opt) = field.strip_prefix(".Options.") {
                            panic!(
                                "{what}: .Options.{opt} fails when the option is not given: use index .Options"
                            );
                        }
                    }
                    if let Some(rest) = t.strip_prefix(".ArtifactsIn.") {
                        let artifact = rest.split('.').next().unwrap();
                        assert!(
                            inputs.contains(artifact),
                            "{what}: {t} is not an input artifact"
                        );
                    }
                }
            }
            // Output artifacts come from phases of this action, from keys the client prints.
            if let Some(arts) = action["outputArtifacts"].as_mapping() {
                for art in arts.values() {
                    for v in art["keyValue"].as_mapping().expect("keyValue").values() {
                        for t in templates(v.as_str().unwrap()) {
                            if let Some(rest) = t.strip_prefix(".Phases.") {
                                let parts: Vec<&str> = rest.split('.').collect();
                                assert!(phase_names.contains(parts[0]), "{what}: {t}");
                                assert_eq!(parts[1], "Output", "{what}: {t}");
                            }
                        }
                    }
                }
            }
        }
        // Backups return the snapshot id; restore and delete take it.
        let out = &bp["actions"]["backup"]["outputArtifacts"];
        let art = out.as_mapping().and_then(|m| m.keys().next()).unwrap();
        assert!(
            out[art]["keyValue"]["snapshot_id"].is_string(),
            "{name}: snapshot_id artifact"
        );
        for action in ["restore", "delete"] {
            let inputs = &bp["actions"][action]["inputArtifactNames"];
            assert_eq!(inputs[0], *art, "{name}: {action} takes {art:?}");
        }
    }
}

/// Every podOverride, as the spec of a Pod, passes the Kubernetes schema (strict).
#[test]
fn pod_overrides_are_valid_pod_specs() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for name in BLUEPRINTS {
        let bp = load(name);
        for (action, a) in bp["actions"].as_mapping().unwrap() {
            for phase in a["phases"].as_sequence().unwrap() {
                let Some(po) = phase["args"].get("podOverride") else {
                    continue;
                };
                let mut meta = serde_yaml::Mapping::new();
                meta.insert("name".into(), format!("override-{n}").into());
                let mut pod = serde_yaml::Mapping::new();
                pod.insert("apiVersion".into(), "v1".into());
                pod.insert("kind".into(), "Pod".into());
                pod.insert("metadata".into(), Value::Mapping(meta));
                pod.insert("spec".into(), po.clone());
                let file = dir.path().join(format!(
                    "{}-{}-{}.yaml",
                    name.trim_end_matches(".yaml"),
                    action.as_str().unwrap(),
                    phase["name"].as_str().unwrap()
                ));
                std::fs::write(&file, serde_yaml::to_string(&pod).unwrap()).unwrap();
                n += 1;
            }
        }
    }
    assert!(n >= 8, "found {n} podOverrides");
    if Command::new("python3")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 is missing, but CI is set"
        );
        eprintln!("python3 not available: podOverride validation skipped");
        return;
    }
    let out = Command::new(repo_root().join("scripts/validate-manifests.sh"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podOverrides are not valid PodSpecs:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Values for every template parameter the blueprints use, as Kanister fills them for
/// the object `object` (`kind`, `namespace`, `name`) of an action that takes the
/// artifacts `inputs`, with the ActionSet options `options`.
fn template_values(
    kind: &str,
    namespace: &str,
    name: &str,
    inputs: &[&str],
    options: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let param = match kind {
        "pvc" => Some(".PVC"),
        "statefulset" => Some(".StatefulSet"),
        "deployment" => Some(".Deployment"),
        _ => None,
    };
    if let Some(p) = param {
        v.insert(format!("{p}.Name"), name.to_string());
        v.insert(format!("{p}.Namespace"), namespace.to_string());
        v.insert(format!("{p}.Pods.0"), format!("{name}-0"));
    }
    // .Object is the object itself: a namespace has no metadata.namespace.
    v.insert(".Object.metadata.name".into(), name.to_string());
    if kind != "namespace" {
        v.insert(".Object.metadata.namespace".into(), namespace.to_string());
    }
    for art in inputs {
        v.insert(
            format!(".ArtifactsIn.{art}.KeyValue.snapshot_id"),
            "0123456789abcdef".into(),
        );
    }
    for (k, x) in options {
        v.insert(format!(".Options.{k}"), x.to_string());
    }
    v
}

/// The names a rendered pod spec refers to: (secret volumes, envFrom ConfigMaps,
/// envFrom Secrets).
fn referenced_names(spec: &Value) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let mut volumes = BTreeSet::new();
    let mut config_maps = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    for vol in spec["volumes"].as_sequence().into_iter().flatten() {
        if let Some(s) = vol["secret"]["secretName"].as_str() {
            volumes.insert(s.to_string());
        }
    }
    for c in spec["containers"].as_sequence().into_iter().flatten() {
        for e in c["envFrom"].as_sequence().into_iter().flatten() {
            if let Some(n) = e["configMapRef"]["name"].as_str() {
                config_maps.insert(n.to_string());
            }
            if let Some(n) = e["secretRef"]["name"].as_str() {
                secrets.insert(n.to_string());
            }
        }
    }
    (volumes, config_maps, secrets)
}

/// The template forms the blueprints use render as Kanister 0.118.0 renders them (Go's
/// text/template, `missingkey=error`, sprig): pinned here so the local renderer cannot
/// drift from it.
#[test]
fn the_renderer_follows_go_templates_and_sprig() {
    let mut v = BTreeMap::new();
    v.insert(".Object.metadata.name".to_string(), "shop".to_string());
    v.insert(".Options.datamoverSecret".to_string(), "second".to_string());
    // A missing map key through index: the zero value ("" for map[string]string, nil,
    // printed <no value>, for map[string]interface{}); sprig's default replaces both.
    assert_eq!(render(r#"{{ index .Options "other" }}"#, &v), "");
    assert_eq!(
        render(r#"{{ index .Object.metadata "namespace" }}"#, &v),
        "<no value>"
    );
    assert_eq!(
        render(
            r#"{{ index .Object.metadata "namespace" | default .Object.metadata.name }}"#,
            &v
        ),
        "shop"
    );
    assert_eq!(
        render(
            r#"{{ default "d" (index .Options "other") }}-{{ index .Options "datamoverSecret" | default "d" }}"#,
            &v
        ),
        "d-second"
    );
    v.insert(".Options.empty".to_string(), String::new());
    assert_eq!(
        render(r#"{{ index .Options "empty" | default "d" }}"#, &v),
        "d"
    );
    for bad in [
        "{{ .Options.other }}",
        "{{ upper .Object.metadata.name }}",
        "{{ .Object.metadata.name | default }}",
    ] {
        let v = v.clone();
        assert!(
            std::panic::catch_unwind(move || render(bad, &v)).is_err(),
            "{bad} must fail"
        );
    }
}

/// The projected ServiceAccount tokens of a rendered pod spec: (audience,
/// expirationSeconds, path), and the directories the pod's containers mount them at.
fn projected_tokens(spec: &Value) -> (Vec<(String, u64, String)>, BTreeSet<String>) {
    let mut tokens = Vec::new();
    let mut volumes = BTreeSet::new();
    for vol in spec["volumes"].as_sequence().into_iter().flatten() {
        for source in vol["projected"]["sources"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let t = &source["serviceAccountToken"];
            if t.is_mapping() {
                tokens.push((
                    t["audience"].as_str().unwrap_or_default().to_string(),
                    t["expirationSeconds"].as_u64().unwrap_or(3600),
                    t["path"].as_str().unwrap_or_default().to_string(),
                ));
                volumes.extend(vol["name"].as_str().map(str::to_string));
            }
        }
    }
    let mut dirs = BTreeSet::new();
    for c in spec["containers"].as_sequence().into_iter().flatten() {
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            if m["name"].as_str().is_some_and(|n| volumes.contains(n)) {
                dirs.extend(m["mountPath"].as_str().map(str::to_string));
            }
        }
    }
    (tokens, dirs)
}

/// A token blueprint's pod: under the ServiceAccount `account`, with exactly one
/// projected token for `audience` (600 s) at the client's default path, no credential
/// Secret, and not the account's API token.
fn check_token_pod(spec: &Value, account: &str, audience: &str, what: &str) {
    assert_eq!(
        spec["serviceAccountName"].as_str(),
        Some(account),
        "{what}: serviceAccountName"
    );
    assert_eq!(
        spec["automountServiceAccountToken"].as_bool(),
        Some(false),
        "{what}: the API token is not mounted"
    );
    let (tokens, dirs) = projected_tokens(spec);
    assert_eq!(
        tokens,
        [(audience.to_string(), 600, "token".to_string())],
        "{what}: the projected token"
    );
    assert_eq!(dirs, BTreeSet::from([TOKEN_DIR.to_string()]), "{what}");
    let (secrets, _, _) = referenced_names(spec);
    assert!(secrets.is_empty(), "{what}: a token pod mounts no Secret");
}

/// The Secret and ConfigMap names (the ServiceAccount and the token's audience for the
/// token blueprint) come from the ActionSet's options, with the documented defaults:
/// several client identities (and databases) can share a namespace.
#[test]
fn actionset_options_name_the_secret_and_config_map() {
    let renamed: Vec<(&str, &str)> = vec![
        ("datamoverSecret", "shop-db-2"),
        ("datamoverConfigMap", "shop-db-2-server"),
        ("postgresqlSecret", "postgresql-2"),
        ("mysqlSecret", "mysql-2"),
        ("datamoverServiceAccount", "shop-db-2-account"),
        ("tokenAudience", "datamover.backup.dms"),
    ];
    let option = |options: &[(&str, &str)], key: &str| {
        options
            .iter()
            .find(|(k, v)| *k == key && !v.is_empty())
            .or_else(|| OPTIONS.iter().find(|(k, _)| *k == key))
            .map(|(_, v)| v.to_string())
            .unwrap()
    };
    let mut pods = 0;
    for name in BLUEPRINTS {
        let bp = load(name);
        for (action_name, action) in bp["actions"].as_mapping().unwrap() {
            let action_name = action_name.as_str().unwrap();
            let kind = action["kind"].as_str().unwrap();
            let inputs: Vec<&str> = action["inputArtifactNames"]
                .as_sequence()
                .map(|s| s.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for phase in action["phases"].as_sequence().unwrap() {
                let phase_name = phase["name"].as_str().unwrap();
                if phase["args"].get("podOverride").is_none() {
                    continue;
                }
                pods += 1;
                let what = format!("{name} {action_name} {phase_name}");
                for (options, secret, config, db) in [
                    (
                        vec![],
                        "datamover-client",
                        "datamover-client",
                        ["datamover-postgresql", "datamover-mysql"],
                    ),
                    // An empty option is no option (sprig's default).
                    (
                        vec![
                            ("datamoverSecret", ""),
                            ("datamoverConfigMap", ""),
                            ("datamoverServiceAccount", ""),
                            ("tokenAudience", ""),
                        ],
                        "datamover-client",
                        "datamover-client",
                        ["datamover-postgresql", "datamover-mysql"],
                    ),
                    (
                        renamed.clone(),
                        "shop-db-2",
                        "shop-db-2-server",
                        ["postgresql-2", "mysql-2"],
                    ),
                ] {
                    let values = template_values(kind, "shop", "data", &inputs, &options);
                    let args = phase_args(&bp, action_name, phase_name, &values);
                    let (volumes, config_maps, secrets) = referenced_names(&args["podOverride"]);
                    if name.contains("token") {
                        check_token_pod(
                            &args["podOverride"],
                            &option(&options, "datamoverServiceAccount"),
                            &option(&options, "tokenAudience"),
                            &format!("{what} {options:?}"),
                        );
                    } else {
                        assert_eq!(
                            volumes,
                            BTreeSet::from([secret.to_string()]),
                            "{what} {options:?}: credential Secret"
                        );
                    }
                    assert_eq!(
                        config_maps,
                        BTreeSet::from([config.to_string()]),
                        "{what} {options:?}: ConfigMap"
                    );
                    assert!(
                        secrets.iter().all(|s| db.contains(&s.as_str())),
                        "{what} {options:?}: database Secret {secrets:?}"
                    );
                    if !options.is_empty() && !options[0].1.is_empty() {
                        let mut all = Vec::new();
                        all_strings(&args["podOverride"], &mut all);
                        assert!(
                            !all.iter().any(|s| s.starts_with("datamover-")),
                            "{what}: a default name is left with the options given: {all:?}"
                        );
                    }
                }
            }
        }
    }
    assert!(pods >= 8, "found {pods} pods");
    // The options the blueprints read are the documented ones.
    for name in BLUEPRINTS {
        let text = std::fs::read_to_string(repo_root().join("blueprints").join(name)).unwrap();
        for part in text.split("index .Options \"").skip(1) {
            let opt = part.split('"').next().unwrap();
            assert!(
                OPTIONS.iter().any(|(o, _)| *o == opt),
                "{name}: undocumented option {opt}"
            );
        }
    }
}

/// A delete runs in the application's namespace whether its ActionSet object is the
/// namespace (with or without its `namespace` field: kanctl's --namespacetargets sets
/// it, a hand-written ActionSet may not) or the backup's own object (kanctl --from
/// without --namespacetargets).
#[test]
fn delete_runs_in_the_namespace_of_its_object() {
    for name in BLUEPRINTS {
        let bp = load(name);
        let backup_kind = bp["actions"]["backup"]["kind"].as_str().unwrap();
        let delete = &bp["actions"]["delete"];
        assert_eq!(delete["kind"], "namespace", "{name}");
        let inputs: Vec<&str> = delete["inputArtifactNames"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for phase in delete["phases"].as_sequence().unwrap() {
            let phase_name = phase["name"].as_str().unwrap();
            for (kind, object_name) in [("namespace", "shop"), (backup_kind, "data")] {
                let values = template_values(kind, "shop", object_name, &inputs, &[]);
                let args = phase_args(&bp, "delete", phase_name, &values);
                assert_eq!(
                    args["namespace"], "shop",
                    "{name} delete on a {kind} object"
                );
                assert_eq!(args["command"][2], "0123456789abcdef", "{name}");
            }
        }
        // Backup and restore run in their object's namespace.
        for action in ["backup", "restore"] {
            let a = &bp["actions"][action];
            let kind = a["kind"].as_str().unwrap();
            let inputs: Vec<&str> = a["inputArtifactNames"]
                .as_sequence()
                .map(|s| s.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let values = template_values(kind, "shop", "data", &inputs, &[]);
            for phase in a["phases"].as_sequence().unwrap() {
                let args = phase_args(&bp, action, phase["name"].as_str().unwrap(), &values);
                assert_eq!(args["namespace"], "shop", "{name} {action}");
            }
        }
    }
}

/// The documents of a multi-document YAML text.
fn documents(text: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.iter()
        .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("{e}:\n{d}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The blueprints' `metadata.name` -> file.
fn blueprint_by_name() -> BTreeMap<String, Value> {
    BLUEPRINTS
        .iter()
        .map(|f| {
            let bp = load(f);
            (bp["metadata"]["name"].as_str().unwrap().to_string(), bp)
        })
        .collect()
}

/// Checks one `kanctl create actionset …` line: flags kanctl has, an action of the
/// blueprint, an object flag of the action's kind.
fn check_kanctl(line: &str, blueprint: Option<&Value>, blueprints: &BTreeMap<String, Value>) {
    let words: Vec<&str> = line
        .split_whitespace()
        .map(|w| w.trim_matches('`'))
        .collect();
    let start = words
        .windows(3)
        .position(|w| w == ["kanctl", "create", "actionset"])
        .unwrap_or_else(|| panic!("{line}"));
    let mut flags: BTreeMap<&str, &str> = BTreeMap::new();
    let mut rest = words[start + 3..].iter();
    while let Some(flag) = rest.next() {
        let known = [
            "-n",
            "--namespace",
            "--action",
            "--blueprint",
            "--from",
            "--pvc",
            "--statefulset",
            "--deployment",
            "--namespacetargets",
            "--options",
        ];
        assert!(known.contains(flag), "{line}: kanctl flag {flag}?");
        let value = rest
            .next()
            .unwrap_or_else(|| panic!("{line}: {flag} value"));
        flags.insert(*flag, *value);
    }
    let action = flags
        .get("--action")
        .unwrap_or_else(|| panic!("{line}: --action"));
    let bp = match flags.get("--blueprint") {
        Some(b) => {
            let bp = blueprints
                .get(*b)
                .unwrap_or_else(|| panic!("{line}: no blueprint {b}"));
            if let Some(expected) = blueprint {
                assert_eq!(bp, expected, "{line}: another blueprint");
            }
            bp
        }
        None => {
            assert!(
                flags.contains_key("--from"),
                "{line}: --blueprint or --from"
            );
            match blueprint {
                Some(b) => b,
                None => return,
            }
        }
    };
    let a = &bp["actions"][*action];
    let kind = a["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("{line}: no action {action}"));
    let object_flags: Vec<(&str, &str)> = [
        ("--pvc", "pvc"),
        ("--statefulset", "statefulset"),
        ("--deployment", "deployment"),
        ("--namespacetargets", "namespace"),
    ]
    .into_iter()
    .filter(|(f, _)| flags.contains_key(f))
    .collect();
    match object_flags.as_slice() {
        [] => assert!(flags.contains_key("--from"), "{line}: no object"),
        [(_, k)] => assert_eq!(k, &kind, "{line}: object kind"),
        _ => panic!("{line}: several object kinds"),
    }
    if a.get("inputArtifactNames").is_some() {
        assert!(
            flags.contains_key("--from"),
            "{line}: artifacts come --from the backup"
        );
    }
    if let Some(opts) = flags.get("--options") {
        for kv in opts.split(',') {
            let k = kv.split('=').next().unwrap();
            assert!(OPTIONS.iter().any(|(o, _)| *o == k), "{line}: option {k}");
        }
    }
}

/// The ActionSets the README and the blueprints' headers document run: their objects are
/// of kinds Kanister accepts and that the actions take, their artifacts are the actions'
/// inputs, their options the blueprints' options, and every action of every blueprint
/// has one.
#[test]
fn documented_actionsets_match_the_blueprints() {
    let blueprints = blueprint_by_name();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme
        .split("## Kanister blueprints")
        .nth(1)
        .expect("README section Kanister blueprints");
    let section = section.split("\n## ").next().unwrap();
    assert!(
        !section.contains("PersistentVolumeClaim`)")
            && !section.contains("kind: PersistentVolumeClaim"),
        "the README gives PersistentVolumeClaim as an ActionSet kind"
    );
    let mut covered: BTreeSet<(String, String)> = BTreeSet::new();
    // ```yaml blocks holding ActionSets.
    for block in section.split("```yaml").skip(1) {
        let block = block.split("```").next().unwrap();
        for doc in documents(block) {
            if doc["kind"] != "ActionSet" {
                continue;
            }
            assert_eq!(doc["apiVersion"], "cr.kanister.io/v1alpha1");
            for a in doc["spec"]["actions"].as_sequence().expect("spec.actions") {
                let what = serde_yaml::to_string(a).unwrap();
                let bp_name = a["blueprint"].as_str().expect("blueprint");
                let bp = blueprints
                    .get(bp_name)
                    .unwrap_or_else(|| panic!("no blueprint {bp_name}:\n{what}"));
                let action = a["name"].as_str().expect("name");
                let ba = &bp["actions"][action];
                let kind = a["object"]["kind"].as_str().expect("object.kind");
                assert!(
                    OBJECT_KINDS.iter().any(|(k, _)| *k == kind),
                    "object kind {kind} (Kanister's are lower case):\n{what}"
                );
                let ns = a["object"]["namespace"].as_str().expect("object.namespace");
                let obj_name = a["object"]["name"].as_str().expect("object.name");
                if kind == "namespace" {
                    assert_eq!(ns, obj_name, "a namespace object names itself:\n{what}");
                } else {
                    assert_eq!(ba["kind"].as_str(), Some(kind), "{what}");
                }
                let inputs: BTreeSet<&str> = ba["inputArtifactNames"]
                    .as_sequence()
                    .map(|s| s.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let given: BTreeSet<&str> = a["artifacts"]
                    .as_mapping()
                    .map(|m| m.keys().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                assert_eq!(given, inputs, "artifacts:\n{what}");
                for art in &given {
                    assert!(
                        a["artifacts"][*art]["keyValue"]["snapshot_id"].is_string(),
                        "{what}"
                    );
                }
                for k in a["options"]
                    .as_mapping()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k)
                {
                    let k = k.as_str().unwrap();
                    assert!(OPTIONS.iter().any(|(o, _)| *o == k), "option {k}:\n{what}");
                }
                covered.insert((bp_name.to_string(), action.to_string()));
            }
        }
    }
    // The table: | blueprint | action | object | artifact | kanctl |, one row per action.
    let mut current: Option<&str> = None;
    let mut backup_object = Value::Null;
    for row in section
        .lines()
        .filter(|l| l.starts_with("| `datamover-") || l.starts_with("| |"))
    {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 5, "{row}");
        if !cells[0].is_empty() {
            current = Some(cells[0].trim_matches('`'));
        }
        let bp_name = current.unwrap_or_else(|| panic!("{row}: no blueprint"));
        let bp = blueprints
            .get(bp_name)
            .unwrap_or_else(|| panic!("{row}: no blueprint {bp_name}"));
        let action = cells[1];
        let ba = &bp["actions"][action];
        let kind = ba["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{row}: no action {action}"));
        let object: Value = if cells[2] == "the same" {
            backup_object.clone()
        } else {
            serde_yaml::from_str(cells[2].trim_matches('`'))
                .unwrap_or_else(|e| panic!("{row}: {e}"))
        };
        if action == "backup" {
            backup_object = object.clone();
        }
        let object_kind = object["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{row}: object"));
        assert!(
            object_kind == kind || (action == "delete" && object_kind == "namespace"),
            "{row}: object kind {object_kind}, the action's is {kind}"
        );
        if object_kind == "namespace" {
            assert_eq!(object["name"], object["namespace"], "{row}");
        }
        let artifact = cells[3];
        if let Some(out) = artifact.strip_prefix("out: ") {
            assert!(
                ba["outputArtifacts"][out.trim_matches('`')].is_mapping(),
                "{row}"
            );
        } else {
            let inp = artifact
                .strip_prefix("in: ")
                .unwrap_or_else(|| panic!("{row}"));
            assert_eq!(ba["inputArtifactNames"][0], inp.trim_matches('`'), "{row}");
        }
        assert!(cells[4].contains(&format!("--action {action}")), "{row}");
        check_kanctl(cells[4], Some(bp), &blueprints);
        covered.insert((bp_name.to_string(), action.to_string()));
    }
    for (bp_name, bp) in &blueprints {
        for action in bp["actions"].as_mapping().unwrap().keys() {
            let action = action.as_str().unwrap().to_string();
            assert!(
                covered.contains(&(bp_name.clone(), action.clone())),
                "the README has no ActionSet for {bp_name} {action}"
            );
        }
    }
    // Each blueprint's header: a kanctl line for each of its actions.
    for file in BLUEPRINTS {
        let text = std::fs::read_to_string(repo_root().join("blueprints").join(file)).unwrap();
        let bp = load(file);
        let mut actions = BTreeSet::new();
        for line in text
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| l.contains("kanctl create actionset"))
        {
            check_kanctl(line, Some(&bp), &blueprints);
            let a = line
                .split("--action ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next());
            actions.extend(a.map(str::to_string));
        }
        let all: BTreeSet<String> = bp["actions"]
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect();
        assert_eq!(actions, all, "{file}: kanctl lines in the header");
        for wrong in ["kind: PersistentVolumeClaim", "kind PersistentVolumeClaim"] {
            assert!(
                !text.contains(wrong),
                "{file}: {wrong} (Kanister's ActionSet kind is pvc)"
            );
        }
    }
}

/// The pod specs of a manifest: of Pods, of workloads' templates, of CronJobs' jobs.
fn pod_specs(doc: &Value) -> Vec<&Value> {
    match doc["kind"].as_str() {
        Some("Pod") => vec![&doc["spec"]],
        Some("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job") => {
            vec![&doc["spec"]["template"]["spec"]]
        }
        Some("CronJob") => vec![&doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]],
        _ => vec![],
    }
}

/// A volume's file mode as Kubernetes reads the YAML (YAML 1.1: a leading 0 is octal;
/// serde_yaml keeps such a scalar as a string).
fn file_mode(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| n as u32),
        Value::String(s) if s.starts_with("0o") => u32::from_str_radix(&s[2..], 8).ok(),
        Value::String(s) if s.starts_with('0') => u32::from_str_radix(s, 8).ok(),
        _ => None,
    }
}

/// Every container of the client image that mounts a Secret (a credential) and runs as
/// non-root can read it: the files are root's, so the mode must let the container's user
/// read them through "other" or through the pod's fsGroup.
fn check_secret_readable(spec: &Value, what: &str) -> usize {
    let mut checked = 0;
    let pod_sc = &spec["securityContext"];
    let fs_group = pod_sc["fsGroup"].as_u64();
    for c in spec["containers"].as_sequence().into_iter().flatten() {
        let image = c["image"].as_str().unwrap_or("datamover/datamover-client");
        let uid = c["securityContext"]["runAsUser"]
            .as_u64()
            .or(pod_sc["runAsUser"].as_u64())
            // The client image's user.
            .or(image.contains("datamover-client").then_some(65532));
        let gid = c["securityContext"]["runAsGroup"]
            .as_u64()
            .or(pod_sc["runAsGroup"].as_u64());
        let Some(uid) = uid else { continue };
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            let vol = spec["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == m["name"]);
            let Some(secret) = vol.map(|v| &v["secret"]).filter(|s| s.is_mapping()) else {
                continue;
            };
            let mode = match secret.get("defaultMode") {
                Some(m) => file_mode(m).unwrap_or_else(|| panic!("{what}: defaultMode {m:?}")),
                None => 0o644,
            };
            let readable = uid == 0
                || mode & 0o004 != 0
                || (mode & 0o040 != 0 && (fs_group.is_some() || gid == Some(0)));
            assert!(
                readable,
                "{what}: container {} (uid {uid}) cannot read its Secret {} (mode {mode:o}, fsGroup {fs_group:?})",
                c["name"].as_str().unwrap_or("?"),
                m["name"].as_str().unwrap_or("?"),
            );
            checked += 1;
        }
    }
    checked
}

/// Every container that mounts a projected ServiceAccount token can read it: the kubelet
/// writes it with mode 0600 when the pod has an `fsGroup` (owned by root), unless every
/// container runs as one explicitly given user, whose file it then is.
fn check_token_readable(spec: &Value, what: &str) -> usize {
    let (tokens, dirs) = projected_tokens(spec);
    if tokens.is_empty() {
        return 0;
    }
    let pod_sc = &spec["securityContext"];
    let fs_group = pod_sc["fsGroup"].as_u64();
    let uid_of = |c: &Value| {
        c["securityContext"]["runAsUser"]
            .as_u64()
            .or(pod_sc["runAsUser"].as_u64())
    };
    let all: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_sequence().into_iter().flatten())
        .collect();
    let one_user = uid_of(all[0]).filter(|u| all.iter().all(|c| uid_of(c) == Some(*u)));
    let mut checked = 0;
    for c in &all {
        let mounts_token = c["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|m| m["mountPath"].as_str().is_some_and(|p| dirs.contains(p)));
        if !mounts_token {
            continue;
        }
        let readable = uid_of(c) == Some(0) || one_user.is_some() || fs_group.is_none();
        assert!(
            readable,
            "{what}: container {} cannot read its projected token (fsGroup {fs_group:?} makes it 0600 root's): give every container the same runAsUser",
            c["name"].as_str().unwrap_or("?")
        );
        checked += 1;
    }
    checked
}

#[test]
fn non_root_client_containers_can_read_their_credential() {
    let mut checked = 0;
    let files = ["blueprints/examples", "crd/examples"]
        .iter()
        .flat_map(|d| std::fs::read_dir(repo_root().join(d)).unwrap().flatten());
    for e in files {
        let text = std::fs::read_to_string(e.path()).unwrap();
        for doc in documents(&text) {
            for spec in pod_specs(&doc) {
                checked += check_secret_readable(spec, &e.path().display().to_string());
                checked += check_token_readable(spec, &e.path().display().to_string());
            }
        }
    }
    for name in BLUEPRINTS {
        let bp = load(name);
        for (action, a) in bp["actions"].as_mapping().unwrap() {
            for phase in a["phases"].as_sequence().unwrap() {
                if let Some(po) = phase["args"].get("podOverride") {
                    let mut spec = po.clone();
                    // Kanister's containers run the phase's images.
                    for c in spec["containers"].as_sequence_mut().into_iter().flatten() {
                        let image = match c["name"].as_str() {
                            Some("container") => &phase["args"]["image"],
                            Some("output") => &phase["args"]["outputImage"],
                            _ => &phase["args"]["backgroundImage"],
                        };
                        c["image"] = image.clone();
                    }
                    let what = format!("{name} {}", action.as_str().unwrap());
                    checked += check_secret_readable(&spec, &what);
                    checked += check_token_readable(&spec, &what);
                }
            }
        }
    }
    assert!(
        checked >= 15,
        "checked {checked} credential and token mounts"
    );
}

/// The examples use the project's image names, of this version.
#[test]
fn examples_use_the_project_images() {
    let version = workspace_version();
    let mut seen = 0;
    let dir = repo_root().join("blueprints/examples");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        for doc in documents(&text) {
            let mut images: Vec<String> = pod_specs(&doc)
                .into_iter()
                .flat_map(|s| s["containers"].as_sequence().into_iter().flatten())
                .filter_map(|c| c["image"].as_str().map(str::to_string))
                .collect();
            if doc["kind"] == "DatamoverServer" {
                images.extend(doc["spec"]["image"].as_str().map(str::to_string));
            }
            for image in images.iter().filter(|i| i.contains("datamover")) {
                seen += 1;
                assert!(
                    *image == format!("datamover/datamover-client:{version}")
                        || *image == format!("datamover/datamover-server:{version}"),
                    "{}: image {image}",
                    e.path().display()
                );
            }
        }
    }
    assert!(seen >= 4, "{seen} images");
}
