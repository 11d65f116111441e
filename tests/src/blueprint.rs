//! Plays the phases of the project's Kanister blueprints locally, as Kanister would run
//! them in a pod, for the database blueprint tests.
//!
//! A blueprint is read from `blueprints/<file>`; a `MultiContainerRun` phase is run as its
//! pod would be: the init command to completion, then the background and output
//! commands at once, each as the exact argument list of the YAML. The only changes are
//! the Go-template expressions (evaluated by [`render`] against the values the test
//! gives; an expression or function it does not know fails the test, so a blueprint
//! cannot grow templates its test does not account for) and the shared volume's
//! directory (a temporary directory). The output container's `###Phase-output###` lines
//! become the phase's outputs, and the action's `outputArtifacts` are rendered from
//! them, as Kanister does.

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

/// Renders a string as Kanister does (Go's `text/template` with `missingkey=error` and
/// sprig's functions, over its `TemplateParams`), for the subset the blueprints use:
///
/// - a field path such as `.PVC.Name` or `.Object.metadata.name` is looked up in
///   `values` under that exact key; a key the test gives no value for fails the test
///   (Kanister fails the phase on a missing map key);
/// - `index <path> "key"` looks up `<path>.key` and, like Go's `index` on a map, gives
///   the zero value when it is missing: `""` under `.Options` (a `map[string]string`),
///   nil elsewhere (`.Object` is a `map[string]interface{}`), printed as `<no value>`;
///   `index <path> N` (a list) must be there;
/// - sprig's `default <default> <value>`: the default when the value is nil or `""`;
/// - pipelines (`a | f x` calls `f x a`), parentheses and string literals.
///
/// Any other function or syntax fails the test.
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
        match eval_template(expr, values) {
            Ok(Some(v)) => out.push_str(&v),
            // What Go's text/template prints for a nil interface value.
            Ok(None) => out.push_str("<no value>"),
            Err(e) => panic!("template {{{{ {expr} }}}} in {s:?}: {e}"),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Renders every string of a YAML value, keys included, as Kanister renders a phase's
/// `args` (`param.RenderArgs`).
pub fn render_value(v: &Value, values: &BTreeMap<String, String>) -> Value {
    match v {
        Value::String(s) => Value::String(render(s, values)),
        Value::Sequence(seq) => {
            Value::Sequence(seq.iter().map(|x| render_value(x, values)).collect())
        }
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, x)| (render_value(k, values), render_value(x, values)))
                .collect(),
        ),
        Value::Tagged(t) => render_value(&t.value, values),
        other => other.clone(),
    }
}

/// The `args` of the phase `phase` of `action`, rendered with `values`.
pub fn phase_args(
    blueprint: &Value,
    action: &str,
    phase: &str,
    values: &BTreeMap<String, String>,
) -> Value {
    let p = blueprint["actions"][action]["phases"]
        .as_sequence()
        .and_then(|p| p.iter().find(|p| p["name"] == phase))
        .unwrap_or_else(|| panic!("action {action} has no phase {phase}"));
    render_value(&p["args"], values)
}

/// One token of a template expression.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Field(String),
    Ident(String),
    Str(String),
    Int(i64),
    Open,
    Close,
    Pipe,
}

fn tokenize(expr: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            ' ' | '\t' | '\n' => {
                chars.next();
            }
            '(' | ')' | '|' => {
                chars.next();
                out.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    _ => Token::Pipe,
                });
            }
            '"' => {
                chars.next();
                let mut lit = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e @ ('"' | '\\')) => lit.push(e),
                            other => return Err(format!("unsupported escape {other:?}")),
                        },
                        Some(x) => lit.push(x),
                        None => return Err("unclosed string".into()),
                    }
                }
                out.push(Token::Str(lit));
            }
            _ => {
                let mut word = String::new();
                while let Some(&x) = chars.peek() {
                    if x.is_alphanumeric() || x == '_' || x == '.' || x == '-' {
                        word.push(x);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if word.is_empty() {
                    return Err(format!("unexpected {c:?}"));
                }
                out.push(if word.starts_with('.') {
                    Token::Field(word)
                } else if let Ok(n) = word.parse() {
                    Token::Int(n)
                } else {
                    Token::Ident(word)
                });
            }
        }
    }
    Ok(out)
}

/// An argument of a command: evaluated lazily, since `index` takes a path, not a value.
#[derive(Debug, Clone)]
enum Arg {
    Field(String),
    Str(String),
    Int(i64),
    Value(Option<String>),
}

fn eval_template(expr: &str, values: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    let tokens = tokenize(expr)?;
    let mut pos = 0;
    let v = eval_pipeline(&tokens, &mut pos, values)?;
    if pos != tokens.len() {
        return Err(format!("unexpected {:?}", tokens[pos]));
    }
    Ok(v)
}

fn eval_pipeline(
    tokens: &[Token],
    pos: &mut usize,
    values: &BTreeMap<String, String>,
) -> Result<Option<String>, String> {
    let mut piped: Option<Option<String>> = None;
    loop {
        let v = eval_command(tokens, pos, values, piped.take())?;
        if tokens.get(*pos) == Some(&Token::Pipe) {
            *pos += 1;
            piped = Some(v);
        } else {
            return Ok(v);
        }
    }
}

fn eval_command(
    tokens: &[Token],
    pos: &mut usize,
    values: &BTreeMap<String, String>,
    piped: Option<Option<String>>,
) -> Result<Option<String>, String> {
    let mut args = Vec::new();
    let mut func = None;
    if let Some(Token::Ident(name)) = tokens.get(*pos) {
        func = Some(name.clone());
        *pos += 1;
    }
    while let Some(t) = tokens.get(*pos) {
        match t {
            Token::Pipe | Token::Close => break,
            Token::Field(f) => args.push(Arg::Field(f.clone())),
            Token::Str(s) => args.push(Arg::Str(s.clone())),
            Token::Int(n) => args.push(Arg::Int(*n)),
            Token::Open => {
                *pos += 1;
                let v = eval_pipeline(tokens, pos, values)?;
                if tokens.get(*pos) != Some(&Token::Close) {
                    return Err("unclosed parenthesis".into());
                }
                args.push(Arg::Value(v));
            }
            Token::Ident(i) => return Err(format!("function {i} as an argument")),
        }
        *pos += 1;
    }
    if let Some(v) = piped {
        args.push(Arg::Value(v));
    }
    let value = |a: &Arg| -> Result<Option<String>, String> {
        match a {
            Arg::Field(f) => values
                .get(f)
                .cloned()
                .map(Some)
                .ok_or_else(|| format!("{f} has no test value")),
            Arg::Str(s) => Ok(Some(s.clone())),
            Arg::Int(n) => Ok(Some(n.to_string())),
            Arg::Value(v) => Ok(v.clone()),
        }
    };
    match func.as_deref() {
        None => match args.as_slice() {
            [a] => value(a),
            _ => Err(format!("{} operands without a function", args.len())),
        },
        Some("index") => match args.as_slice() {
            [Arg::Field(path), Arg::Str(key)] => {
                let missing = if path == ".Options" || path.starts_with(".Options.") {
                    Some(String::new())
                } else {
                    None
                };
                Ok(values.get(&format!("{path}.{key}")).cloned().or(missing))
            }
            [Arg::Field(path), Arg::Int(i)] => values
                .get(&format!("{path}.{i}"))
                .cloned()
                .map(Some)
                .ok_or_else(|| format!("{path} has no test value at index {i}")),
            _ => Err(format!("index takes a path and a key, not {args:?}")),
        },
        Some("default") => match args.as_slice() {
            [d, given] => {
                let given = value(given)?;
                if given.as_deref().is_none_or(str::is_empty) {
                    value(d)
                } else {
                    Ok(given)
                }
            }
            _ => Err(format!("default takes two arguments, not {args:?}")),
        },
        Some(f) => Err(format!(
            "function {f} is not rendered by the tests: add it to blueprint::render"
        )),
    }
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
    // Every argument renders, as in Kanister (the podOverride too), not only the commands.
    let args = render_value(&phase["args"], values);
    assert_eq!(args["sharedVolumeMedium"], "Memory", "{action}: in memory");
    let dir = args["sharedVolumeDir"].as_str().expect("sharedVolumeDir");
    let cmd = |key: &str| -> Vec<String> {
        strings(&args[key], key)
            .iter()
            .map(|a| a.replace(dir, &shared.display().to_string()))
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
    // Every argument renders, as in Kanister, not only the command.
    let args = render_value(&phase["args"], values);
    strings(&args["command"], "command")
}
