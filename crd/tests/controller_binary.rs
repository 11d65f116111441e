//! The built `datamover-controller` binary: `--help`, and a clear one-line error (never a
//! panic) when the Kubernetes API server cannot be reached. The second is what a rustls
//! build with two crypto providers turned on (ring through kube, aws-lc-rs through the
//! workspace) broke: the client panicked before it ever connected.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn controller() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_datamover-controller"));
    cmd.env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("RUST_LOG")
        .env_remove("DATAMOVER_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `cmd` to its end, killing it after `secs`.
fn run_for(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd.spawn().expect("the controller binary runs");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the controller") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("datamover-controller did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: o.join().unwrap_or_default(),
        stderr: e.join().unwrap_or_default(),
    }
}

#[test]
fn help_prints_usage_and_exits_zero() {
    let out = run_for(controller().arg("--help"), 30);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Usage: datamover-controller"), "{stdout}");
    assert!(stdout.contains("KUBECONFIG"), "{stdout}");

    let out = run_for(controller().arg("--bogus"), 30);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--help"));
}

#[test]
fn an_unreachable_api_server_is_one_clear_error_line_not_a_panic() {
    // A port that was free a moment ago: nobody listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster:
    server: https://127.0.0.1:{port}
    insecure-skip-tls-verify: true
users:
- name: nobody
  user:
    token: not-a-real-token
contexts:
- name: nowhere
  context:
    cluster: nowhere
    user: nobody
current-context: nowhere
"
        ),
    )
    .expect("write the kubeconfig");

    let out = run_for(
        controller()
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            .env("DATAMOVER_CONTROLLER_HTTP_ADDR", "127.0.0.1:0"),
        60,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "the controller panicked:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // One line of its own says what is wrong (kube's client may log the failed request
    // before it), and it is the last.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ERROR datamover_controller:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
    assert!(
        errors[0].contains("cannot reach the Kubernetes API server")
            && errors[0].contains(&format!("127.0.0.1:{port}")),
        "{stderr}"
    );
    // Not a terminal: no colour codes in the log.
    assert!(!stderr.contains('\u{1b}'), "ANSI escapes in:\n{stderr}");
}
