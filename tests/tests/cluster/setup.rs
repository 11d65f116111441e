//! What the cluster tests share: turns, the controller, a DatamoverServer with its
//! storage, credentials and volume, and client pods.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

use datamover_tests::blueprint::repo_root;
use datamover_tests::cluster::{Cluster, Images, Namespace};

/// The cluster tests take turns: they share one controller (a second one would hide a
/// broken first) and two cores.
pub fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cluster, the project's images in it and the controller from the Helm chart, or
/// `None` when there is no cluster (said, and a failure under CI).
pub fn ready(test: &str) -> Option<(&'static Cluster, &'static Images)> {
    let cluster = Cluster::get(test)?;
    let images = cluster.project_images();
    ensure_helm_controller(cluster, images);
    Some((cluster, images))
}

/// Namespace and release of the chart's controller, shared by the tests.
pub const HELM_NAMESPACE: &str = "datamover-system";
pub const HELM_RELEASE: &str = "datamover";

static HELM_INSTALLED: OnceLock<()> = OnceLock::new();

/// `helm install` of charts/datamover (CRD, RBAC, ServiceAccount, controller), once;
/// waits for the controller to be available.
pub fn ensure_helm_controller(cluster: &'static Cluster, images: &Images) {
    HELM_INSTALLED.get_or_init(|| {
        helm_install(cluster, images);
    });
}

pub fn helm_install(cluster: &Cluster, images: &Images) {
    let (repository, tag) = images
        .controller
        .rsplit_once(':')
        .expect("image reference with a tag");
    let chart = repo_root().join("charts/datamover");
    let out = datamover_tests::cluster::run(
        &mut cluster.helm(),
        &[
            "upgrade",
            "--install",
            HELM_RELEASE,
            &chart.display().to_string(),
            "--namespace",
            HELM_NAMESPACE,
            "--create-namespace",
            "--set",
            &format!("image.repository={repository}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=Never",
            "--wait",
            "--timeout",
            "180s",
        ],
        None,
        240,
    );
    assert!(
        out.status.success(),
        "helm install of charts/datamover failed: {}\n{}\ncontroller pods:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        cluster.describe(HELM_NAMESPACE, "pods")
    );
}

/// A DatamoverServer on the filesystem store, with its repository on a local
/// PersistentVolume, and what its clients need.
pub struct TestServer {
    pub name: String,
    pub ns: String,
}

pub const REPO_PASSWORD: &str = "cluster-test-repository-password";

impl TestServer {
    /// Creates the ConfigMap, Secrets, repository volume and the CR; `clients` are
    /// (id, token) pairs. Does not wait.
    pub fn create(
        cluster: &Cluster,
        ns: &Namespace,
        name: &str,
        image: &str,
        clients: &[(&str, &str)],
    ) -> TestServer {
        Self::create_with(cluster, ns, name, image, clients, "")
    }

    /// [`TestServer::create`] with more of the CR's spec: YAML lines indented by two
    /// spaces (fields of `spec`).
    pub fn create_with(
        cluster: &Cluster,
        ns: &Namespace,
        name: &str,
        image: &str,
        clients: &[(&str, &str)],
        extra_spec: &str,
    ) -> TestServer {
        let repo_dir = cluster.volume_dir(&format!("{}-{name}-repo", ns.as_str()));
        chown_for_pods(&repo_dir);
        cluster.local_pvc(ns.as_str(), &format!("{name}-repo"), &repo_dir);
        let client_lines: String = clients
            .iter()
            .map(|(id, token)| format!("  {id}: {token}\n"))
            .collect();
        cluster.apply(&format!(
            r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: {name}-config, namespace: {ns}}}
data:
  type: filesystem
---
apiVersion: v1
kind: Secret
metadata: {{name: {name}-repo, namespace: {ns}}}
stringData:
  repo-password: {REPO_PASSWORD}
---
apiVersion: v1
kind: Secret
metadata: {{name: {name}-clients, namespace: {ns}}}
stringData:
{client_lines}---
apiVersion: dm.cr.kanister.io/v1alpha1
kind: DatamoverServer
metadata: {{name: {name}, namespace: {ns}}}
spec:
  image: {image}
  config: {name}-config
  clientSecretRef: {{secretName: {name}-clients}}
  secrets: [{{secretName: {name}-repo}}]
  storageVolume:
    persistentVolumeClaim: {{claimName: {name}-repo}}
  env:
  - {{name: RUST_LOG, value: info}}
{extra_spec}"#,
            ns = ns.as_str(),
        ));
        TestServer {
            name: name.to_string(),
            ns: ns.as_str().to_string(),
        }
    }

    /// Waits for `status.progress` Ready; returns `status.serverInfo.data`. On a timeout
    /// the panic says what the status, the pods, the events and the controller said.
    pub fn wait_ready(&self, cluster: &Cluster, secs: u64) -> String {
        let object = format!("datamoverserver/{}", self.name);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let progress = cluster.jsonpath(&self.ns, &object, "{.status.progress}");
            let data = cluster.jsonpath(&self.ns, &object, "{.status.serverInfo.data}");
            if progress == "Ready" && !data.is_empty() {
                return data;
            }
            if std::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {secs} s waiting for DatamoverServer {}/{} Ready\n{}",
                    self.ns,
                    self.name,
                    self.explain(cluster)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// What the cluster says about this server, for a failure message.
    pub fn explain(&self, cluster: &Cluster) -> String {
        let out = |args: &[&str]| {
            let o = cluster.kubectl_output(args, None, 60);
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        };
        let controller_log = |which: &str| {
            out(&[
                "logs",
                "-n",
                HELM_NAMESPACE,
                "deploy/datamover-controller",
                which,
                "--tail=200",
            ])
        };
        let ns = self.ns.as_str();
        let tail = |s: String, n: usize| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        format!(
            "--- status:\n{}\n--- objects:\n{}\n--- pods:\n{}\n--- events:\n{}\n--- controller pods (restarts):\n{}\n--- controller log:\n{}\n--- the controller's log before its last restart:\n{}",
            out(&[
                "get",
                "-n",
                ns,
                "datamoverserver",
                &self.name,
                "-o",
                "jsonpath={.status}"
            ]),
            out(&["get", "-n", ns, "deploy,rs,pods,pvc,svc", "-o", "wide"]),
            tail(out(&["describe", "-n", ns, "pods"]), 60),
            tail(
                out(&["get", "-n", ns, "events", "--sort-by=.lastTimestamp"]),
                30
            ),
            out(&["get", "-n", HELM_NAMESPACE, "pods", "-o", "wide"]),
            tail(controller_log("--all-containers"), 40),
            tail(controller_log("--previous"), 20),
        )
    }

    /// The in-cluster address clients use (the Service's DNS name).
    pub fn url(&self) -> String {
        format!("{}.{}.svc:51515", self.name, self.ns)
    }

    /// A Secret `secret` in `ns` holding one client's credential (`/etc/client-secret`),
    /// and a ConfigMap `secret` with SERVER_URL, SERVER_DATA and PROTOCOLS.
    pub fn client_config(
        &self,
        cluster: &Cluster,
        ns: &str,
        secret: &str,
        id: &str,
        token: &str,
        data: &str,
    ) {
        cluster.apply(&format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: {secret}, namespace: {ns}}}
stringData:
  {id}: {token}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: {secret}, namespace: {ns}}}
data:
  SERVER_URL: {url}
  SERVER_DATA: "{data}"
  PROTOCOLS: datamover-v1:51515
"#,
            url = self.url(),
        ));
    }
}

/// A client pod running `args` with the ConfigMap and Secret `config` (see
/// [`TestServer::client_config`]), and `data` (a PVC) at /data. Runs as root, like the
/// volume blueprint (to read and restore any owner's files).
pub fn client_pod(
    name: &str,
    ns: &str,
    image: &str,
    config: &str,
    args: &[&str],
    pvc: Option<&str>,
) -> String {
    let args = args
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let (mount, volume) = match pvc {
        Some(claim) => (
            "    - {name: data, mountPath: /data}\n".to_string(),
            format!("  - name: data\n    persistentVolumeClaim: {{claimName: {claim}}}\n"),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{dm.cr.kanister.io/client: "true"}}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  containers:
  - name: client
    image: {image}
    imagePullPolicy: Never
    args: [{args}]
    envFrom:
    - configMapRef: {{name: {config}}}
    securityContext: {{runAsUser: 0, runAsNonRoot: false, allowPrivilegeEscalation: false}}
    volumeMounts:
    - {{name: credential, mountPath: /etc/client-secret, readOnly: true}}
{mount}  volumes:
  - name: credential
    secret: {{secretName: {config}}}
{volume}"#
    )
}

/// Runs a client pod to completion; returns its last stdout line as JSON. Panics with
/// its logs when it fails.
pub fn run_client_pod(
    cluster: &Cluster,
    ns: &str,
    yaml: &str,
    name: &str,
    secs: u64,
) -> serde_json::Value {
    cluster.apply(yaml);
    let (phase, logs) = cluster.wait_pod_done(ns, name, secs);
    assert_eq!(
        phase,
        "Succeeded",
        "client pod {ns}/{name} failed:\n{logs}\n{}",
        cluster.describe(ns, &format!("pod/{name}"))
    );
    let stdout = cluster.logs(ns, name, Some("client"));
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON result line from {name}:\n{stdout}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{name}: {e}: {last}"))
}

/// Makes a directory writable for the pods' non-root user (65532).
pub fn chown_for_pods(dir: &Path) {
    nix::unistd::chown(
        dir,
        Some(nix::unistd::Uid::from_raw(65532)),
        Some(nix::unistd::Gid::from_raw(65532)),
    )
    .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

/// Gives a whole tree to the pods' non-root user (65532), symlinks included.
pub fn chown_tree(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        nix::unistd::fchownat(
            None,
            &p,
            Some(nix::unistd::Uid::from_raw(65532)),
            Some(nix::unistd::Gid::from_raw(65532)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(&p).expect("read_dir").flatten() {
                stack.push(e.path());
            }
        }
    }
}

/// A tree of files of several sizes, modes, a symlink and an empty directory.
pub fn make_tree(root: &Path, seed: u64) {
    use datamover_tests::{random_bytes, write};
    write(&root.join("a/small.txt"), b"hello from the cluster\n");
    write(&root.join("a/b/medium.bin"), &random_bytes(seed, 300_000));
    write(&root.join("big.bin"), &random_bytes(seed + 1, 3_000_000));
    write(&root.join("c/d/e/deep.txt"), b"deep\n");
    std::fs::create_dir_all(root.join("empty")).expect("mkdir");
    std::fs::set_permissions(
        root.join("a/small.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("a/small.txt", root.join("link")).expect("symlink");
    let t = filetime::FileTime::from_unix_time(1_700_000_000, 123_000_000);
    filetime::set_file_mtime(root.join("a/b/medium.bin"), t).expect("mtime");
    filetime::set_file_mtime(root.join("c"), t).expect("mtime");
    filetime::set_file_mtime(root, filetime::FileTime::from_unix_time(1_600_000_000, 0))
        .expect("mtime");
}

/// A Ready DatamoverServer in its own namespace and an application namespace holding a
/// client's ConfigMap and Secret: what most cluster tests start from.
pub struct ServerAndApp {
    pub server: TestServer,
    /// The application's namespace, with the client configuration (deleted on drop).
    pub app: Namespace,
    /// Where the server runs (deleted on drop).
    _server_ns: Namespace,
}

/// A server (namespace `<prefix>-server`) with one client `id`, and that client's
/// ConfigMap and Secret, both named `secret`, in namespace `<prefix>-app`.
pub fn server_and_app(
    cluster: &'static Cluster,
    images: &Images,
    prefix: &str,
    id: &str,
    secret: &str,
) -> ServerAndApp {
    let server_ns = cluster.namespace(&format!("{prefix}-server"));
    let app = cluster.namespace(&format!("{prefix}-app"));
    let token = format!("{id}-token-0123456789");
    let server = TestServer::create(
        cluster,
        &server_ns,
        "datamover",
        &images.server,
        &[(id, &token)],
    );
    let data = server.wait_ready(cluster, 180);
    server.client_config(cluster, app.as_str(), secret, id, &token, &data);
    ServerAndApp {
        server,
        app,
        _server_ns: server_ns,
    }
}
