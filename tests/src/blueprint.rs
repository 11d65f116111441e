//! Plays the phases of the project's Kanister blueprints locally, as Kanister would run
//! them in a pod, for the database blueprint tests.
//!
//! A blueprint is read from `blueprints/<file>`; a `MultiContainerRun` phase is run as its
//! pod would be: the init command to completion, then the background and output
//! commands at once, each as the exact argument list of the YAML. The only changes are
//! the Go-template expressions (replaced by the values the test gives; an expression it
//! does not know fails the test, so a blueprint cannot grow templates its test does not
//! account for) and the shared volume's directory (a temporary directory). The output
//! container's `###Phase-output###` lines become the phase's outputs, and the action's
//! `outputArtifacts` are rendered from them, as Kanister does.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Reads and parses `blueprints/<file>`.
pub fn load(file: &str) -> Value {
    let path = repo_root().join("blueprints").join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Replaces each `{{ … }}` by its value in `values` (keyed by the trimmed expression).
pub fn render(s: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .unwrap_or_else(|| panic!("unclosed template in {s:?}"))
            + start;
        let expr = rest[start + 2..end].trim();
        let v = values
            .get(expr)
            .unwrap_or_else(|| panic!("template {{{{ {expr} }}}} has no test value"));
        out.push_str(v);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A YAML list of strings.
pub fn strings(v: &Value, what: &str) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what} is not a list"))
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| panic!("{what} holds a non-string"))
                .to_string()
        })
        .collect()
}

/// Waits for a child with a deadline, collecting its output; kills it when the deadline
/// passes.
pub fn wait_for(mut child: Child, secs: u64, what: &str) -> Output {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = out.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = err.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish in {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    }
}

/// Runs a command to success within `secs`; returns its stdout.
pub fn run_ok(cmd: &mut Command, secs: u64, what: &str) -> String {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let o = wait_for(child, secs, what);
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One `MultiContainerRun` phase, rendered.
pub struct Phase {
    pub name: String,
    pub init: Vec<String>,
    pub background: Vec<String>,
    pub output: Vec<String>,
}

/// The `MultiContainerRun` phase of `action`, rendered with `values`, its shared volume
/// directory replaced by `shared`.
pub fn multi_container_phase(
    blueprint: &Value,
    action: &str,
    values: &BTreeMap<String, String>,
    shared: &Path,
) -> Phase {
    let phase = blueprint["actions"][action]["phases"]
        .as_sequence()
        .and_then(|p| p.iter().find(|p| p["func"] == "MultiContainerRun"))
        .unwrap_or_else(|| panic!("action {action} has no MultiContainerRun phase"));
    let args = &phase["args"];
    assert_eq!(args["sharedVolumeMedium"], "Memory", "{action}: in memory");
    let dir = args["sharedVolumeDir"].as_str().expect("sharedVolumeDir");
    let cmd = |key: &str| -> Vec<String> {
        strings(&args[key], key)
            .iter()
            .map(|a| render(a, values).replace(dir, &shared.display().to_string()))
            .collect()
    };
    Phase {
        name: phase["name"].as_str().unwrap_or_default().to_string(),
        init: cmd("initCommand"),
        background: cmd("backgroundCommand"),
        output: cmd("outputCommand"),
    }
}

/// Runs a phase as its pod would: init to completion, then background and output at once;
/// both must succeed. `path` is the `PATH` of every container; `background_env` and
/// `output_env` are what the podOverride gives the two containers. Returns the output
/// container's stdout.
pub fn run_phase(
    phase: &Phase,
    path: &str,
    background_env: &[(String, String)],
    output_env: &[(String, String)],
) -> String {
    let command = |argv: &[String], env: &[(String, String)]| {
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..])
            .env_clear()
            .env("PATH", path)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    run_ok(
        &mut command(&phase.init, &[]),
        30,
        &format!("{} init", phase.name),
    );
    let background = command(&phase.background, background_env)
        .spawn()
        .expect("start the background command");
    let output = command(&phase.output, output_env)
        .spawn()
        .expect("start the output command");
    let o = wait_for(output, 300, &format!("{} output", phase.name));
    let b = wait_for(background, 300, &format!("{} background", phase.name));
    for (what, argv, r) in [
        ("background", &phase.background, &b),
        ("output", &phase.output, &o),
    ] {
        assert!(
            r.status.success(),
            "{} {what} {argv:?} failed: {}\n{}\n{}",
            phase.name,
            r.status,
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Kanister's view of a phase's output: the `###Phase-output###` lines.
pub fn phase_outputs(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("###Phase-output###: "))
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .filter_map(|v| {
            Some((
                v["key"].as_str()?.to_string(),
                v["value"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// Renders `action`'s output artifacts from the outputs of its phase `phase` and adds
/// them to `values` as `.ArtifactsIn.<artifact>.KeyValue.<key>`, ready for the next action.
pub fn add_output_artifacts(
    blueprint: &Value,
    action: &str,
    phase: &str,
    outputs: &BTreeMap<String, String>,
    values: &mut BTreeMap<String, String>,
) {
    let phase_values: BTreeMap<String, String> = outputs
        .iter()
        .map(|(k, v)| (format!(".Phases.{phase}.Output.{k}"), v.clone()))
        .collect();
    let artifacts = blueprint["actions"][action]["outputArtifacts"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{action} has no output artifacts"));
    for (name, artifact) in artifacts {
        let name = name.as_str().unwrap_or_default();
        let kv = artifact["keyValue"]
            .as_mapping()
            .unwrap_or_else(|| panic!("artifact {name} has no keyValue"));
        for (key, template) in kv {
            let key = key.as_str().unwrap_or_default();
            let value = render(template.as_str().unwrap_or_default(), &phase_values);
            values.insert(format!(".ArtifactsIn.{name}.KeyValue.{key}"), value);
        }
    }
}

/// The rendered command of the first phase of `action`, a `KubeTask`.
pub fn kube_task_command(
    blueprint: &Value,
    action: &str,
    values: &BTreeMap<String, String>,
) -> Vec<String> {
    let phase = blueprint["actions"][action]["phases"]
        .as_sequence()
        .and_then(|p| p.first())
        .unwrap_or_else(|| panic!("{action} has no phase"));
    assert_eq!(phase["func"], "KubeTask", "{action}");
    strings(&phase["args"]["command"], "command")
        .iter()
        .map(|a| render(a, values))
        .collect()
}
