//! The volume blueprint in the cluster: backup of a PVC, restore into another, delete of
//! the snapshot (then a restore of it fails), through its phases as Kanister's pods and,
//! when `KANISTER_CONTROLLER` is set, through real ActionSets. Its token variant
//! (volume-token-blueprint.yaml) the same way, with no credential Secret in the
//! application's namespace: the pods present their ServiceAccount's projected token.

use std::collections::BTreeMap;

use datamover_tests::assert_same_tree;
use datamover_tests::cluster::{Cluster, Images};

use crate::kanister::{ActionSpec, Artifacts, Object, Runner, kanister_controller};
use crate::setup::{TestServer, make_tree, ready, server_and_app, turn};

/// The volume blueprint with a client identity of its own (a Secret and ConfigMap named
/// by the ActionSet's options).
fn volume_round_trip(cluster: &'static Cluster, images: &Images, runner: Runner, prefix: &str) {
    let setup = server_and_app(cluster, images, prefix, "volume-client", "volume-client");
    let options = [
        ("datamoverSecret", "volume-client"),
        ("datamoverConfigMap", "volume-client"),
    ];
    volume_actions(
        cluster,
        runner,
        setup.app.as_str(),
        "volume-blueprint.yaml",
        &options,
    );
}

/// The token variant: the DatamoverServer lists the application's ServiceAccount
/// `datamover-client`; the namespace holds that account and the ConfigMap
/// `datamover-client`, no Secret; the ActionSet gives the token audience.
fn volume_token_round_trip(
    cluster: &'static Cluster,
    images: &Images,
    runner: Runner,
    prefix: &str,
) {
    let server_ns = cluster.namespace(&format!("{prefix}-server"));
    let app = cluster.namespace(&format!("{prefix}-app"));
    let a = app.as_str();
    cluster.kubectl_ok(&["create", "serviceaccount", "-n", a, "datamover-client"]);
    let server = TestServer::create_with(
        cluster,
        &server_ns,
        "datamover",
        &images.server,
        &[("edge-1", "edge-1-token-0123456789")],
        &format!(
            "  serviceAccountClients: [{{namespace: {a}, name: datamover-client, tenant: apps, role: full}}]\n"
        ),
    );
    let data = server.wait_ready(cluster, 180);
    let audience = cluster.jsonpath(
        &server.ns,
        &format!("datamoverserver/{}", server.name),
        "{.status.serverInfo.tokenAudience}",
    );
    assert!(!audience.is_empty(), "no status.serverInfo.tokenAudience");
    server.client_config(
        cluster,
        a,
        "datamover-client",
        "unused",
        "unused-0123456789",
        &data,
    );
    // No credential Secret in the application's namespace.
    cluster.kubectl_ok(&["delete", "secret", "-n", a, "datamover-client"]);
    volume_actions(
        cluster,
        runner,
        a,
        "volume-token-blueprint.yaml",
        &[("tokenAudience", &audience)],
    );
}

/// Backup, restore, delete, and a restore of the deleted snapshot that must fail.
fn volume_actions(
    cluster: &'static Cluster,
    runner: Runner,
    app: &str,
    blueprint: &str,
    options: &[(&str, &str)],
) {
    let source = cluster.volume_dir(&format!("{app}-data"));
    make_tree(&source, 21);
    cluster.local_pvc(app, "data", &source);
    let target = cluster.volume_dir(&format!("{app}-restored"));
    cluster.local_pvc(app, "restored", &target);
    let none = Artifacts::new();
    let spec = |action, object, artifacts| ActionSpec {
        blueprint,
        action,
        object,
        options,
        artifacts,
    };

    let out = runner.run(
        cluster,
        &spec(
            "backup",
            Object::Pvc {
                namespace: app,
                name: "data",
            },
            &none,
        ),
    );
    let id = out
        .get("volumeSnapshot")
        .and_then(|a| a.get("snapshot_id"))
        .cloned()
        .unwrap_or_else(|| panic!("the backup's snapshot_id artifact: {out:?}"));
    assert_eq!(id.len(), 64, "snapshot id {id:?}");

    runner.run(
        cluster,
        &spec(
            "restore",
            Object::Pvc {
                namespace: app,
                name: "restored",
            },
            &out,
        ),
    );
    assert_same_tree(&source, &target);

    // Delete runs on the Namespace object.
    runner.run(cluster, &spec("delete", Object::Namespace(app), &out));
    // The snapshot is gone: a restore of it now fails.
    let again = cluster.volume_dir(&format!("{app}-again"));
    cluster.local_pvc(app, "again", &again);
    let err = runner
        .try_run(
            cluster,
            &spec(
                "restore",
                Object::Pvc {
                    namespace: app,
                    name: "again",
                },
                &out,
            ),
        )
        .map(|a: BTreeMap<_, _>| format!("{a:?}"))
        .expect_err("a restore of a deleted snapshot succeeded");
    if runner == Runner::Phases {
        assert!(
            err.contains(&id[..8]) || err.to_lowercase().contains("not found"),
            "{err}"
        );
    }
    eprintln!("{runner:?}: {blueprint}: backup, restore and delete of {id} complete");
}

#[test]
fn the_volume_blueprint_backs_up_restores_and_deletes_as_kanister_runs_it() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: volume blueprint phases") else {
        return;
    };
    volume_round_trip(cluster, images, Runner::Phases, "dm-bp");
}

#[test]
fn real_kanister_runs_the_volume_blueprint() {
    let _turn = turn();
    if kanister_controller("cluster: real Kanister, volume blueprint").is_none() {
        return;
    }
    let Some((cluster, images)) = ready("cluster: real Kanister, volume blueprint") else {
        return;
    };
    volume_round_trip(cluster, images, Runner::Kanister, "dm-k10");
}

#[test]
fn the_volume_token_blueprint_needs_no_secret_in_the_application_namespace() {
    let _turn = turn();
    let Some((cluster, images)) = ready("cluster: volume token blueprint phases") else {
        return;
    };
    volume_token_round_trip(cluster, images, Runner::Phases, "dm-tk");
}

#[test]
fn real_kanister_runs_the_volume_token_blueprint() {
    let _turn = turn();
    let test = "cluster: real Kanister, volume token blueprint";
    if kanister_controller(test).is_none() {
        return;
    }
    let Some((cluster, images)) = ready(test) else {
        return;
    };
    volume_token_round_trip(cluster, images, Runner::Kanister, "dm-k10tk");
}
