//! The second way to install the controller: the plain manifests of crd/manifests/,
//! applied in a namespace of their own instead of the chart's release.

use datamover_tests::blueprint::repo_root;
use datamover_tests::cluster::{Cluster, Images, run};

use crate::setup::{HELM_NAMESPACE, HELM_RELEASE, TestServer, helm_install, ready, turn};

/// Puts the chart's controller back when the test ends, passed or not: the other tests
/// use it.
struct ReinstallChart {
    cluster: &'static Cluster,
    images: &'static Images,
    manifests: String,
}

impl Drop for ReinstallChart {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl_output(
            &["delete", "--ignore-not-found", "--wait=true", "-f", "-"],
            Some(self.manifests.as_bytes()),
            180,
        );
        helm_install(self.cluster, self.images);
    }
}

#[test]
fn the_plain_manifests_install_a_controller_that_serves_a_cr() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: plain manifests") else {
        return;
    };
    // One controller at a time: two would reconcile the same DatamoverServers.
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
    // crd/manifests/ as they are, in the namespace dm-manifests instead of datamover-system.
    let mut manifests = String::new();
    for f in ["rbac.yaml", "controller.yaml"] {
        let text =
            std::fs::read_to_string(repo_root().join("crd/manifests").join(f)).expect("manifest");
        manifests.push_str(&text.replace("datamover-system", "dm-manifests"));
        manifests.push_str("\n---\n");
    }
    let _reinstall = ReinstallChart {
        cluster,
        images,
        manifests: manifests.clone(),
    };
    // The CRD stays from the chart (Helm never removes CRDs); crd/manifests/crd.yaml is the
    // same file as the chart's crds/ (crd/tests/manifests.rs), and applying it here would
    // take its fields from Helm's field manager.
    cluster.apply(&manifests);
    let o = cluster.kubectl_output(
        &[
            "rollout",
            "status",
            "-n",
            "dm-manifests",
            "deployment/datamover-controller",
            "--timeout=180s",
        ],
        None,
        200,
    );
    assert!(
        o.status.success(),
        "the manifests' controller did not become available: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        cluster.describe("dm-manifests", "pods")
    );
    let ns = cluster.namespace("dm-by-manifests");
    let server = TestServer::create(
        cluster,
        &ns,
        "datamover",
        &images.server,
        &[("c", "c-token-0123456789")],
    );
    server.wait_ready(cluster, 180);
    cluster.kubectl_ok(&[
        "delete",
        "-n",
        ns.as_str(),
        "datamoverserver/datamover",
        "--wait=true",
    ]);
}
