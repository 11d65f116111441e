//! The README's Kubernetes walkthrough ("Running on Kubernetes"), run verbatim: the shell
//! block after the `walkthrough` marker, as a user pastes it, on the test cluster. It
//! installs the controller with Helm, makes a filesystem-store DatamoverServer, backs up
//! an application volume and restores it into another; the restored volume must equal
//! the original.
//!
//! What the test provides is what a cluster would: PersistentVolumes for the claims (no
//! provisioner here) and the `busybox:1.36` image the example Jobs use (no registry here:
//! made from this machine's `sh`, `diff` and coreutils).

use datamover_tests::blueprint::repo_root;
use datamover_tests::cluster::{Cluster, Images, host_image, run};

use crate::setup::{HELM_NAMESPACE, HELM_RELEASE, helm_install, ready, turn};

const NS: &str = "demo";
/// The claims of crd/examples/ the walkthrough makes, with their sizes.
const CLAIMS: [(&str, &str); 3] = [
    ("datamover-fs-store", "20Gi"),
    ("app-data", "1Gi"),
    ("app-data-restored", "1Gi"),
];

/// The shell block of the README after the walkthrough marker.
fn walkthrough() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let after = readme
        .split_once("<!-- walkthrough:")
        .expect("README.md has no walkthrough marker")
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("a sh block after the walkthrough marker")
        .1;
    block
        .split_once("\n```")
        .expect("the walkthrough block ends")
        .0
        .to_string()
}

fn pv_name(claim: &str) -> String {
    format!("dm-walkthrough-{claim}")
}

/// Removes the walkthrough's namespace and volumes, and puts the shared chart release back
/// as the other tests expect it, passed or not.
struct CleanUp {
    cluster: &'static Cluster,
    images: &'static Images,
}

impl Drop for CleanUp {
    fn drop(&mut self) {
        if std::env::var_os("DATAMOVER_KEEP_CLUSTER_OBJECTS").is_none() {
            let _ = self.cluster.kubectl_output(
                &[
                    "delete",
                    "namespace",
                    NS,
                    "--ignore-not-found",
                    "--wait=true",
                ],
                None,
                180,
            );
            for (claim, _) in CLAIMS {
                let _ = self.cluster.kubectl_output(
                    &["delete", "pv", &pv_name(claim), "--ignore-not-found"],
                    None,
                    60,
                );
            }
        }
        helm_install(self.cluster, self.images);
    }
}

#[test]
fn the_readme_walkthrough_runs_verbatim_and_restores_an_equal_volume() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: README walkthrough") else {
        return;
    };
    let script = walkthrough();
    assert!(script.contains("helm install"), "{script}");
    // A clean start: no namespace `demo`, no chart release (the walkthrough installs it).
    let _ = cluster.kubectl_output(
        &[
            "delete",
            "namespace",
            NS,
            "--ignore-not-found",
            "--wait=true",
        ],
        None,
        180,
    );
    let o = run(
        &mut cluster.helm(),
        &[
            "uninstall",
            HELM_RELEASE,
            "--namespace",
            HELM_NAMESPACE,
            "--wait",
        ],
        None,
        180,
    );
    assert!(
        o.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _clean_up = CleanUp { cluster, images };

    host_image(
        "busybox:1.36",
        &[
            "/bin/sh",
            "/usr/bin/mkdir",
            "/usr/bin/date",
            "/usr/bin/seq",
            "/usr/bin/diff",
        ],
        &[],
        &[],
        "/usr/bin:/bin",
    );
    cluster.load_images(&["busybox:1.36"]);
    let mut dirs = Vec::new();
    for (claim, size) in CLAIMS {
        let dir = cluster.volume_dir(&pv_name(claim));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        cluster.apply(&format!(
            r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: {pv}}}
spec:
  capacity: {{storage: {size}}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {{namespace: {NS}, name: {claim}}}
  local: {{path: {dir}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {{key: kubernetes.io/hostname, operator: In, values: [{node}]}}
"#,
            pv = pv_name(claim),
            dir = dir.display(),
            node = cluster.node,
        ));
        dirs.push(dir);
    }

    // The block as it is, with the cluster's kubectl and helm first on PATH.
    let path = format!(
        "{}:{}",
        cluster.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bash = std::process::Command::new("bash");
    bash.current_dir(repo_root())
        .env("PATH", path)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("HELM_CACHE_HOME", cluster.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", cluster.dir.join("helm/config"))
        .env("HELM_DATA_HOME", cluster.dir.join("helm/data"));
    let o = run(
        &mut bash,
        &["-euo", "pipefail", "-x", "-c", &script],
        None,
        900,
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "the README walkthrough failed: {}\n{stdout}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        cluster.describe(NS, "pods")
    );
    assert!(
        stdout.contains("\"tag\":\"first\""),
        "step 5 printed no backup result: {stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("identical"),
        "step 6 did not compare equal: {stdout}"
    );
    // The restored volume equals the original, metadata included.
    datamover_tests::assert_same_tree(&dirs[1].join("app"), &dirs[2].join("app"));
}
