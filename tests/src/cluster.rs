//! The real single-node Kubernetes of `scripts/cluster-up.sh`, for the cluster tests
//! (`tests/tests/cluster.rs`).
//!
//! The test command starts the cluster once and names its env file in
//! `DATAMOVER_TEST_CLUSTER`; [`Cluster::get`] reads it. Without it a cluster test says
//! that it cannot run and passes, except under `CI`, where it fails. The project's images
//! are built once per test binary by `images/build.sh` from this build's binaries and
//! loaded into the cluster's containerd ([`Cluster::project_images`]); pods use them
//! without a registry. Every test works in namespaces of its own ([`Namespace`]),
//! deleted when it ends, so tests can run side by side.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::blueprint::{repo_root, wait_for};

/// The running test cluster.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    /// Its state directory (host paths of PersistentVolumes go under `<dir>/volumes`).
    pub dir: PathBuf,
    /// The node's name, for local PersistentVolumes' node affinity.
    pub node: String,
    /// kubectl, helm and the other cluster programs.
    pub bin: PathBuf,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
static IMAGES: OnceLock<Images> = OnceLock::new();

/// The project's images, loaded into the cluster.
#[derive(Clone, Debug)]
pub struct Images {
    pub server: String,
    pub client: String,
    pub controller: String,
}

impl Cluster {
    /// The cluster the test command started, or `None` after saying why `test` cannot
    /// run (a failure under `CI`).
    pub fn get(test: &str) -> Option<&'static Cluster> {
        let cluster = CLUSTER.get_or_init(|| {
            let env = std::env::var("DATAMOVER_TEST_CLUSTER").ok()?;
            let text = std::fs::read_to_string(&env)
                .unwrap_or_else(|e| panic!("DATAMOVER_TEST_CLUSTER={env}: {e}"));
            let vars: BTreeMap<&str, &str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
                .collect();
            let var = |k: &str| {
                PathBuf::from(
                    vars.get(k)
                        .unwrap_or_else(|| panic!("{env} does not name {k}")),
                )
            };
            Some(Cluster {
                kubeconfig: var("KUBECONFIG"),
                dir: var("DATAMOVER_CLUSTER_DIR"),
                node: var("DATAMOVER_CLUSTER_NODE").display().to_string(),
                bin: var("DATAMOVER_CLUSTER_BIN"),
            })
        });
        match cluster {
            Some(c) => Some(c),
            None => {
                let msg = format!(
                    "{test}: no test cluster (DATAMOVER_TEST_CLUSTER is unset): \
                     run scripts/test.sh, which starts one with scripts/cluster-up.sh"
                );
                assert!(std::env::var_os("CI").is_none(), "{msg}; CI must run it");
                eprintln!("SKIPPED {msg}");
                None
            }
        }
    }

    /// kubectl against the cluster.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// helm against the cluster.
    pub fn helm(&self) -> Command {
        let mut c = Command::new(self.bin.join("helm"));
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        c
    }

    /// Runs kubectl with `args` (and `stdin`), within `secs`.
    pub fn kubectl_output(&self, args: &[&str], stdin: Option<&[u8]>, secs: u64) -> Output {
        run(&mut self.kubectl(), args, stdin, secs)
    }

    /// Runs kubectl to success; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let o = self.kubectl_output(args, None, 120);
        assert!(
            o.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) {
        let o = self.kubectl_output(&["apply", "-f", "-"], Some(yaml.as_bytes()), 120);
        assert!(
            o.status.success(),
            "kubectl apply failed: {}\n{}\n--- of:\n{yaml}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
    }

    /// One field of an object by JSONPath (`""` when absent).
    pub fn jsonpath(&self, ns: &str, object: &str, path: &str) -> String {
        let o = self.kubectl_output(
            &["get", "-n", ns, object, "-o", &format!("jsonpath={path}")],
            None,
            60,
        );
        if o.status.success() {
            String::from_utf8_lossy(&o.stdout).into_owned()
        } else {
            String::new()
        }
    }

    /// Whether an object exists.
    pub fn exists(&self, ns: &str, object: &str) -> bool {
        let o = self.kubectl_output(&["get", "-n", ns, object, "-o", "name"], None, 60);
        o.status.success()
    }

    /// Waits for a pod to end; returns its phase (`Succeeded` or `Failed`) and its logs.
    pub fn wait_pod_done(&self, ns: &str, pod: &str, secs: u64) -> (String, String) {
        let phase = poll(&format!("pod {ns}/{pod} to finish"), secs, || {
            let p = self.jsonpath(ns, &format!("pod/{pod}"), "{.status.phase}");
            (p == "Succeeded" || p == "Failed").then_some(p)
        });
        let logs = self.logs(ns, pod, None);
        (phase, logs)
    }

    /// A pod's logs (all containers when `container` is `None`), prefixed by container.
    pub fn logs(&self, ns: &str, pod: &str, container: Option<&str>) -> String {
        let mut args = vec!["logs", "-n", ns, pod];
        match container {
            Some(c) => args.extend(["-c", c]),
            None => args.extend(["--all-containers", "--prefix"]),
        }
        let o = self.kubectl_output(&args, None, 60);
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    }

    /// What the cluster says about a pod, for failure messages.
    pub fn describe(&self, ns: &str, object: &str) -> String {
        let o = self.kubectl_output(&["describe", "-n", ns, object], None, 60);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A namespace of this test, deleted on drop.
    pub fn namespace(&'static self, prefix: &str) -> Namespace {
        let name = format!(
            "{prefix}-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() ^ std::process::id())
                .unwrap_or_default()
                & 0xffffff
        );
        self.kubectl_ok(&["create", "namespace", &name]);
        poll("the namespace's default ServiceAccount", 60, || {
            self.exists(&name, "serviceaccount/default").then_some(())
        });
        Namespace {
            cluster: self,
            name,
        }
    }

    /// A directory on the node for a local PersistentVolume (removed with the cluster).
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.join("volumes").join(name);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        d
    }

    /// A local PersistentVolume on `dir` and a claim bound to it, in `ns`.
    pub fn local_pvc(&self, ns: &str, name: &str, dir: &Path) {
        let pv = format!("{ns}-{name}");
        self.apply(&format!(
            r#"apiVersion: v1
kind: PersistentVolume
metadata:
  name: {pv}
  labels: {{datamover-test-ns: {ns}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: datamover-test-local
  claimRef: {{namespace: {ns}, name: {name}}}
  local: {{path: {dir}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {{key: kubernetes.io/hostname, operator: In, values: [{node}]}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {name}, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: datamover-test-local
  volumeName: {pv}
  resources: {{requests: {{storage: 1Gi}}}}
"#,
            dir = dir.display(),
            node = self.node,
        ));
    }

    /// Builds the project's images once (images/build.sh, from this build's binaries) and
    /// loads them into the cluster.
    pub fn project_images(&self) -> &'static Images {
        IMAGES.get_or_init(|| {
            let bin_dir = crate::bin_dir();
            let out = crate::blueprint::run_ok(
                Command::new(repo_root().join("images/build.sh"))
                    .args(["--engine", "docker", "--bin-dir"])
                    .arg(&bin_dir),
                900,
                "images/build.sh",
            );
            let refs: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
            let find = |name: &str| {
                refs.iter()
                    .find(|r| r.contains(&format!("datamover-{name}:")))
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| panic!("images/build.sh built no {name} image: {refs:?}"))
            };
            let images = Images {
                server: find("server"),
                client: find("client"),
                controller: find("controller"),
            };
            self.load_images(&[&images.server, &images.client, &images.controller]);
            images
        })
    }

    /// Loads images from the Docker engine into the cluster.
    pub fn load_images(&self, images: &[&str]) {
        crate::blueprint::run_ok(
            Command::new(repo_root().join("scripts/cluster-load-image.sh"))
                .args(images)
                .env("DATAMOVER_CLUSTER_DIR", &self.dir),
            600,
            "scripts/cluster-load-image.sh",
        );
    }
}

/// A namespace deleted (without waiting) on drop.
pub struct Namespace {
    pub cluster: &'static Cluster,
    pub name: String,
}

impl Namespace {
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if std::env::var_os("DATAMOVER_KEEP_CLUSTER_OBJECTS").is_some() {
            eprintln!("keeping namespace {}", self.name);
            return;
        }
        let _ = self.cluster.kubectl_output(
            &["delete", "namespace", &self.name, "--wait=false"],
            None,
            60,
        );
        let _ = self.cluster.kubectl_output(
            &[
                "delete",
                "pv",
                "-l",
                &format!("datamover-test-ns={}", self.name),
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
            30,
        );
    }
}

/// Runs `cmd args` with `stdin`, within `secs`.
pub fn run(cmd: &mut Command, args: &[&str], stdin: Option<&[u8]>, secs: u64) -> Output {
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let writer = stdin.map(|data| {
        let mut w = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        })
    });
    let o = wait_for(child, secs, &format!("{cmd:?}"));
    if let Some(w) = writer {
        let _ = w.join();
    }
    o
}

/// Polls `f` every 200 ms until it returns a value; panics naming `what` after `secs`.
pub fn poll<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Builds an image (`FROM scratch`) from this machine's own programs: each of
/// `programs` with the shared libraries `ldd` names for it (and for the `.so` files under
/// `dirs`), the directories `dirs` copied whole, and `/etc/passwd` and `/etc/group` with
/// `users` (name, uid). For the database pods of the blueprint tests, made from Debian's
/// packages the tests install anyway (no registry here). Returns the image reference.
pub fn host_image(
    reference: &str,
    programs: &[&str],
    dirs: &[&str],
    users: &[(&str, u32)],
    env_path: &str,
) {
    let ctx = tempfile::tempdir().expect("tempdir");
    let rootfs = ctx.path().join("rootfs");
    let copy = |src: &Path| {
        let dest = rootfs.join(src.strip_prefix("/").unwrap_or(src));
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let o = Command::new("cp")
            .args(["-a", "-L", "--no-preserve=ownership"])
            .arg(src)
            .arg(&dest)
            .output()
            .expect("cp");
        assert!(
            o.status.success(),
            "cp {}: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let mut objects: Vec<PathBuf> = programs.iter().map(PathBuf::from).collect();
    for d in dirs {
        copy(Path::new(d));
        let o = Command::new("find")
            .args([d, "-name", "*.so*", "-type", "f"])
            .output()
            .expect("find");
        objects.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(PathBuf::from),
        );
    }
    let mut libs = std::collections::BTreeSet::new();
    for p in &objects {
        let o = Command::new("ldd").arg(p).output().expect("ldd");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let lib = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                libs.insert(PathBuf::from(lib));
            }
        }
    }
    for p in programs {
        copy(Path::new(p));
    }
    for l in &libs {
        copy(l);
    }
    let passwd: String = std::iter::once("root:x:0:0:root:/root:/bin/sh\n".to_string())
        .chain(
            users
                .iter()
                .map(|(n, u)| format!("{n}:x:{u}:{u}:{n}:/tmp:/bin/sh\n")),
        )
        .collect();
    let group: String = std::iter::once("root:x:0:\n".to_string())
        .chain(users.iter().map(|(n, u)| format!("{n}:x:{u}:\n")))
        .collect();
    crate::write(&rootfs.join("etc/passwd"), passwd.as_bytes());
    crate::write(&rootfs.join("etc/group"), group.as_bytes());
    std::fs::create_dir_all(rootfs.join("tmp")).expect("mkdir");
    std::fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod");
    crate::write(
        &ctx.path().join("Containerfile"),
        format!("FROM scratch\nCOPY rootfs/ /\nENV PATH={env_path}\n").as_bytes(),
    );
    crate::blueprint::run_ok(
        Command::new("docker")
            .args(["build", "-q", "-t", reference, "-f"])
            .arg(ctx.path().join("Containerfile"))
            .arg(ctx.path()),
        600,
        &format!("docker build of {reference}"),
    );
}
