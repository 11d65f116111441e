//! Reconciler tests, against the mocked API server of `support`, for what the first real
//! cluster run found: a filesystem store without a volume (lost at every pod restart), an
//! image that cannot be pulled, and client pods in other namespaces than the server's.

mod support;

use std::collections::BTreeMap;

use datamover_crd::DatamoverServerStatus;
use datamover_crd::types::{
    ClaimRef, ClientSelector, NetworkPolicySpec, PodOptions, Progress, StorageVolume,
};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodSecurityContext, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta, Time};
use k8s_openapi::chrono::Utc;
use serde_json::{Value, json};
use support::*;

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn events(calls: &[Call]) -> Vec<&Value> {
    calls
        .iter()
        .filter(|c| c.method == "POST" && c.path.ends_with("/events"))
        .map(|c| &c.body)
        .collect()
}

fn with_volume(claim: &str, mount: &str) -> datamover_crd::DatamoverServer {
    let mut dms = server();
    dms.spec.storage_volume = Some(StorageVolume {
        persistent_volume_claim: ClaimRef {
            claim_name: claim.into(),
        },
        mount_path: mount.into(),
        sub_path: None,
    });
    dms
}

fn filesystem_world() -> World {
    let mut world = World::standard();
    world.put_config("datamover-config", &[("type", "filesystem")]);
    world
}

#[tokio::test]
async fn a_filesystem_store_without_a_volume_is_reported_and_warned_about() {
    let (_, calls) = run(filesystem_world(), server()).await;
    let status = status_patch(&calls);
    let storage = condition(status, "StoragePersistent");
    assert_eq!(storage["status"], "False");
    assert_eq!(storage["reason"], "EphemeralFilesystemStore");
    let message = storage["message"].as_str().unwrap();
    assert!(
        message.contains("/var/lib/datamover")
            && message.contains("lost whenever the server pod restarts")
            && message.contains("spec.storageVolume.persistentVolumeClaim.claimName"),
        "{message}"
    );
    // The server still starts (a demo may want exactly this), but never silently.
    assert_eq!(condition(status, "Ready")["reason"], "PodsNotReady");
    let warning = events(&calls)
        .into_iter()
        .find(|e| e["reason"] == "EphemeralFilesystemStore")
        .expect("a Warning event about the store");
    assert_eq!(warning["type"], "Warning");

    // No config keys at all is the filesystem store too.
    let mut world = World::standard();
    world.put_config("datamover-config", &[]);
    let (_, calls) = run(world, server()).await;
    assert_eq!(
        condition(status_patch(&calls), "StoragePersistent")["status"],
        "False"
    );
}

#[tokio::test]
async fn a_storage_volume_is_mounted_over_the_store_and_writable_by_the_server() {
    let mut world = filesystem_world();
    world.put_claim("repo-pvc");
    let (_, calls) = run(world, with_volume("repo-pvc", "/var/lib/datamover")).await;
    assert!(find(&calls, "GET", "/persistentvolumeclaims/repo-pvc").is_some());

    let d = deployment_patch(&calls);
    let m = mount_of(d, "/var/lib/datamover");
    assert!(m.get("readOnly").is_none() || m["readOnly"] == false);
    let v = volume(d, m["name"].as_str().unwrap());
    assert_eq!(v["persistentVolumeClaim"]["claimName"], "repo-pvc");
    let pod_security = &d["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod_security["fsGroup"], 65532);
    assert_eq!(pod_security["fsGroupChangePolicy"], "OnRootMismatch");

    let status = status_patch(&calls);
    let storage = condition(status, "StoragePersistent");
    assert_eq!(storage["status"], "True");
    assert_eq!(storage["reason"], "PersistentVolume");
    assert!(
        events(&calls)
            .iter()
            .all(|e| e["reason"] != "EphemeralFilesystemStore")
    );

    // A store path outside the mount is not covered.
    let mut world = World::standard();
    world.put_config(
        "datamover-config",
        &[("type", "filesystem"), ("path", "/srv/repo")],
    );
    world.put_claim("repo-pvc");
    let (_, calls) = run(world, with_volume("repo-pvc", "/var/lib/datamover")).await;
    let storage = condition(status_patch(&calls), "StoragePersistent");
    assert_eq!(storage["reason"], "EphemeralFilesystemStore");
    assert!(
        storage["message"]
            .as_str()
            .unwrap()
            .contains("not under spec.storageVolume.mountPath /var/lib/datamover")
    );
}

#[tokio::test]
async fn the_users_fs_group_wins_and_s3_needs_no_volume() {
    let mut dms = server();
    dms.spec.pod_options = Some(PodOptions {
        security_context: Some(PodSecurityContext {
            fs_group: Some(2000),
            run_as_non_root: Some(true),
            ..PodSecurityContext::default()
        }),
        ..PodOptions::default()
    });
    let (_, calls) = run(World::standard(), dms).await;
    let pod_security = &deployment_patch(&calls)["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod_security["fsGroup"], 2000);
    assert_eq!(pod_security["runAsNonRoot"], true);
    assert!(pod_security.get("fsGroupChangePolicy").is_none());

    let storage = condition(status_patch(&calls), "StoragePersistent");
    assert_eq!(storage["status"], "True");
    assert_eq!(storage["reason"], "ObjectStore");
    assert!(events(&calls).iter().all(|e| e["type"] != "Warning"));
}

#[tokio::test]
async fn a_missing_claim_is_named_and_the_storage_condition_kept() {
    let mut dms = with_volume("repo-pvc", "/var/lib/datamover");
    let kept = Condition {
        type_: "StoragePersistent".into(),
        status: "True".into(),
        reason: "PersistentVolume".into(),
        message: "on repo-pvc".into(),
        last_transition_time: Time(Utc::now()),
        observed_generation: Some(3),
    };
    dms.status = Some(DatamoverServerStatus {
        conditions: vec![kept.clone()],
        ..DatamoverServerStatus::default()
    });
    let (_, calls) = run(filesystem_world(), dms).await;
    assert!(find(&calls, "PATCH", "/deployments/dms").is_none());
    let status = status_patch(&calls);
    assert_eq!(status["progress"], "Failed");
    let ready = condition(status, "Ready");
    assert_eq!(ready["reason"], "MissingInput");
    assert!(
        ready["message"].as_str().unwrap().contains(
            "PersistentVolumeClaim default/repo-pvc (named in spec.storageVolume.persistentVolumeClaim.claimName) not found"
        ),
        "{ready}"
    );
    assert_eq!(
        condition(status, "StoragePersistent")["message"],
        "on repo-pvc"
    );
}

fn pulling_pod(reason: &str, message: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("dms-7d9f".into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        status: Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "server".into(),
                image: "datamover/datamover-server:0.1.0".into(),
                ready: false,
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        message: Some(message.into()),
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
        ..Pod::default()
    }
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_is_named_in_the_status() {
    for reason in [
        "ErrImagePull",
        "ImagePullBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
    ] {
        let mut world = World::standard();
        world.pods = vec![pulling_pod(
            reason,
            "Back-off pulling image \"datamover/datamover-server:0.1.0\"",
        )];
        let (_, calls) = run(world, server()).await;
        let status = status_patch(&calls);
        assert_eq!(status["progress"], "Failed", "{reason}");
        let ready = condition(status, "Ready");
        assert_eq!(ready["reason"], "ImagePullFailed");
        let message = ready["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!(
                "image cannot be pulled: datamover/datamover-server:0.1.0: {reason}: Back-off pulling image"
            )),
            "{message}"
        );
        assert!(message.contains("pod dms-7d9f"), "{message}");
        let event = events(&calls)
            .into_iter()
            .find(|e| e["reason"] == "ImagePullFailed")
            .expect("an event");
        assert_eq!(event["type"], "Warning");
    }

    // Still creating: just not ready yet.
    let mut world = World::standard();
    world.pods = vec![pulling_pod("ContainerCreating", "")];
    let (_, calls) = run(world, server()).await;
    let status = status_patch(&calls);
    assert_eq!(status["progress"], Progress::Pending.as_str());
    assert_eq!(condition(status, "Ready")["reason"], "PodsNotReady");
}

#[tokio::test]
async fn clients_in_named_namespaces_reach_the_server() {
    let mut dms = server();
    dms.spec.network_policy = Some(NetworkPolicySpec {
        enabled: true,
        allowed_clients: vec![
            // Kanister's function pods in the applications' namespaces, with the label.
            ClientSelector {
                namespaces: vec!["shop".into(), "blog".into()],
                ..ClientSelector::default()
            },
            // Every pod of the namespaces labelled team=payments.
            ClientSelector {
                pod_selector: Some(LabelSelector::default()),
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "team".to_string(),
                        "payments".to_string(),
                    )])),
                    ..LabelSelector::default()
                }),
                namespaces: vec![],
            },
            // The server's own namespace, labelled pods only.
            ClientSelector::default(),
        ],
    });
    let (_, calls) = run(World::standard(), dms).await;
    let np = &find(&calls, "PATCH", "/networkpolicies/dms")
        .expect("the NetworkPolicy is applied")
        .body;
    let from = &np["spec"]["ingress"][0]["from"];
    let client_label = json!({"matchLabels": {"dm.cr.kanister.io/client": "true"}});

    assert_eq!(from[0]["podSelector"], client_label);
    assert_eq!(
        from[0]["namespaceSelector"],
        json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                                     "operator": "In", "values": ["blog", "shop"]}]})
    );
    assert_eq!(from[1]["podSelector"], json!({}));
    assert_eq!(
        from[1]["namespaceSelector"]["matchLabels"]["team"],
        "payments"
    );
    assert_eq!(from[2]["podSelector"], client_label);
    assert!(from[2].get("namespaceSelector").is_none());
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], 51515);
}
