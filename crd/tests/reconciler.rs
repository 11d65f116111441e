//! Reconciler tests against a mocked API server (kube's `tower-test` pattern): a scripted
//! fake cluster answers every request and records it, and each test asserts on what the
//! controller asked for.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine;
use datamover_crd::controller::{self, RESYNC, WAIT_READY};
use datamover_crd::types::{ClientSelector, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::chrono::Utc;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use support::*;

#[tokio::test]
async fn create_applies_the_deployment_service_and_a_pending_status() {
    let (action, calls) = run(World::standard(), server()).await;
    assert_eq!(action, Action::requeue(WAIT_READY));

    // Server-side apply with our field manager.
    let apply = find(&calls, "PATCH", "/deployments/dms").unwrap();
    assert!(
        apply.query.contains("fieldManager=datamover-controller"),
        "{}",
        apply.query
    );
    assert!(apply.query.contains("force=true"), "{}", apply.query);

    let d = deployment_patch(&calls);
    assert_eq!(d["kind"], "Deployment");
    let owner = &d["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "DatamoverServer");
    assert_eq!(owner["apiVersion"], "dm.cr.kanister.io/v1alpha1");
    assert_eq!(owner["uid"], "0b9d3c2e-uid");
    assert_eq!(owner["controller"], true);

    // The ConfigMap at /etc/config.
    let config = mount_of(d, "/etc/config");
    assert_eq!(
        volume(d, config["name"].as_str().unwrap())["configMap"]["name"],
        "datamover-config"
    );
    // Each storage secret at /etc/secrets/<name>.
    for name in ["datamover-s3", "datamover-repo"] {
        let m = mount_of(d, &format!("/etc/secrets/{name}"));
        assert_eq!(
            volume(d, m["name"].as_str().unwrap())["secret"]["secretName"],
            name
        );
    }
    // The client credentials as a whole Secret volume (no subPath: live reload works).
    let creds = mount_of(d, "/etc/client_credentials");
    assert!(creds.get("subPath").is_none());
    assert_eq!(
        volume(d, creds["name"].as_str().unwrap())["secret"]["secretName"],
        "datamover-clients"
    );
    // The server writes /etc/server/data into a writable volume.
    assert!(
        volume(d, mount_of(d, "/etc/server")["name"].as_str().unwrap())["emptyDir"].is_object()
    );

    let container = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "datamover/datamover-server:0.1.0");
    let env: Vec<&Value> = container["env"].as_array().unwrap().iter().collect();
    assert!(
        env.iter()
            .any(|e| e["name"] == "PROTOCOLS" && e["value"] == "datamover-v1:51515")
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["startupProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        d["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    assert_eq!(template_hash(d), World::standard().hash());

    // The Service, owned too, with the protocol port.
    let svc = &find(&calls, "PATCH", "/api/v1/namespaces/default/services/dms")
        .unwrap()
        .body;
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], "0b9d3c2e-uid");
    assert_eq!(svc["spec"]["ports"][0]["port"], 51515);
    assert_eq!(svc["spec"]["ports"][0]["name"], "datamover-v1");

    // No pod yet: Pending, and an Event says so.
    let status = status_patch(&calls);
    assert_eq!(status["progress"], "Pending");
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "False");
    assert_eq!(status["conditions"][0]["reason"], "PodsNotReady");
    assert!(status.get("serverInfo").is_none());
    let event = find(
        &calls,
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
    )
    .unwrap();
    assert_eq!(event.body["reason"], "PodsNotReady");
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(event.body["regarding"]["name"], "dms");
    // No NetworkPolicy was asked for, so none is applied.
    assert!(find(&calls, "PATCH", "/networkpolicies/dms").is_none());
}

#[tokio::test]
async fn a_changed_config_or_storage_secret_rolls_the_pods() {
    let world = World::standard();
    let (_, before) = run(world.clone(), server()).await;
    let h0 = template_hash(deployment_patch(&before));

    let mut changed = world.clone();
    changed.put_config(
        "datamover-config",
        &[("type", "s3"), ("bucket", "other-bucket")],
    );
    let (_, after) = run(changed, server()).await;
    let h1 = template_hash(deployment_patch(&after));
    assert_ne!(h0, h1, "a ConfigMap change must change the pod template");

    let mut rotated = world.clone();
    rotated.put_secret(
        "datamover-s3",
        &[
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "SK2"),
        ],
    );
    let (_, after) = run(rotated, server()).await;
    assert_ne!(
        h0,
        template_hash(deployment_patch(&after)),
        "a storage Secret change must roll the pods"
    );
}

#[tokio::test]
async fn a_client_credentials_change_does_not_roll_the_pods() {
    let world = World::standard();
    let (_, before) = run(world.clone(), server()).await;

    let mut changed = world.clone();
    changed.put_secret(
        "datamover-clients",
        &[("edge-01", "rotated"), ("edge-02", "new")],
    );
    let (_, after) = run(changed, server()).await;
    // The whole applied Deployment is identical: nothing in the template changed.
    assert_eq!(deployment_patch(&before), deployment_patch(&after));
}

#[tokio::test]
async fn a_missing_secret_is_named_in_the_status_and_retried_with_backoff() {
    let mut world = World::standard();
    world.secrets.remove("datamover-repo");
    let (ctx, calls, _) = mock(world, FakeServerData::default());
    let first = controller::reconcile(Arc::new(server()), ctx.clone())
        .await
        .unwrap();
    let calls_now = calls.lock().unwrap().clone();

    assert!(
        find(&calls_now, "PATCH", "/deployments/dms").is_none(),
        "no Deployment without its inputs"
    );
    let status = status_patch(&calls_now);
    assert_eq!(status["progress"], "Failed");
    assert_eq!(status["conditions"][0]["reason"], "MissingInput");
    let message = status["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("Secret default/datamover-repo (named in spec.secrets[1]) not found"),
        "{message}"
    );
    assert!(
        !message.contains("datamover-s3"),
        "only the missing one is named: {message}"
    );
    let event = find(&calls_now, "POST", "/events").unwrap();
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["reason"], "MissingInput");

    // Retried, later each time.
    let second = controller::reconcile(Arc::new(server()), ctx)
        .await
        .unwrap();
    assert_eq!(first, Action::requeue(std::time::Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(std::time::Duration::from_secs(10)));
}

#[tokio::test]
async fn a_missing_config_map_and_client_secret_are_named() {
    let mut world = World::standard();
    world.config_maps.clear();
    world.secrets.remove("datamover-clients");
    let (_, calls) = run(world, server()).await;
    let message = status_patch(&calls)["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("ConfigMap default/datamover-config (named in spec.config) not found"),
        "{message}"
    );
    assert!(
        message
            .contains("Secret default/datamover-clients (named in spec.clientSecretRef) not found"),
        "{message}"
    );
}

#[tokio::test]
async fn a_ready_pod_makes_the_status_ready_with_service_and_base64_data() {
    let mut world = World::standard();
    let hash = world.hash();
    let fingerprint = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    world.pods = vec![
        ready_pod("dms-abc", "10.1.2.3", &hash),
        // A pod of an older configuration is not asked (it may present another certificate).
        ready_pod("dms-old", "10.1.2.4", "stale-hash"),
    ];
    let data = FakeServerData {
        by_ip: HashMap::from([
            ("10.1.2.3".to_string(), fingerprint.to_string()),
            ("10.1.2.4".to_string(), "0000".to_string()),
        ]),
        ..FakeServerData::default()
    };
    let (ctx, calls, data) = mock(world, data);
    let action = controller::reconcile(Arc::new(server()), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(RESYNC));
    let calls = calls.lock().unwrap().clone();

    let list = find(&calls, "GET", "/api/v1/namespaces/default/pods").unwrap();
    assert!(list.query.contains("labelSelector="), "{}", list.query);
    assert_eq!(
        *data.asked.lock().unwrap(),
        vec![("10.1.2.3".to_string(), 8080)]
    );

    let status = status_patch(&calls);
    assert_eq!(status["progress"], "Ready");
    assert_eq!(status["serverInfo"]["serviceName"], "dms");
    let encoded = status["serverInfo"]["data"].as_str().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(decoded, fingerprint.as_bytes());
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["conditions"][0]["reason"], "ServerReady");
    assert_eq!(
        find(&calls, "POST", "/events").unwrap().body["reason"],
        "ServerReady"
    );
}

#[tokio::test]
async fn ready_pods_with_different_certificates_fail_with_advice() {
    let mut world = World::standard();
    let hash = world.hash();
    world.pods = vec![
        ready_pod("a", "10.0.0.1", &hash),
        ready_pod("b", "10.0.0.2", &hash),
    ];
    let data = FakeServerData {
        by_ip: HashMap::from([
            ("10.0.0.1".to_string(), "aa".to_string()),
            ("10.0.0.2".to_string(), "bb".to_string()),
        ]),
        ..FakeServerData::default()
    };
    let mut dms = server();
    dms.spec.replicas = 2;
    let (_, calls) = run_with(world, dms, data).await;
    let status = status_patch(&calls);
    assert_eq!(status["progress"], "Failed");
    assert_eq!(status["conditions"][0]["reason"], "FingerprintMismatch");
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("tls.crt")
    );
}

#[tokio::test]
async fn no_event_when_nothing_changed() {
    let mut dms = server();
    // The status says what this reconciliation will find again.
    dms.status = Some(datamover_crd::DatamoverServerStatus {
        progress: Some(datamover_crd::types::Progress::Pending),
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "PodsNotReady".into(),
            message: "waiting".into(),
            last_transition_time: Time(Utc::now()),
            observed_generation: Some(3),
        }],
        ..Default::default()
    });
    let (_, calls) = run(World::standard(), dms).await;
    assert!(find(&calls, "PATCH", "/status").is_some());
    assert!(find(&calls, "POST", "/events").is_none());
}

#[tokio::test]
async fn deletion_leaves_cleanup_to_owner_references() {
    let mut dms = server();
    dms.metadata.deletion_timestamp = Some(Time(Utc::now()));
    let (action, calls) = run(World::standard(), dms).await;
    assert_eq!(action, Action::await_change());
    assert!(
        calls.is_empty(),
        "a server being deleted is left alone: {calls:?}"
    );

    // What garbage collection relies on: every child names the server as its controller
    // owner.
    let (_, calls) = run(World::standard(), server()).await;
    let children: Vec<&Call> = calls
        .iter()
        .filter(|c| c.method == "PATCH" && !c.path.ends_with("/status"))
        .collect();
    // The Deployment, the Service and the ServiceAccount clients' ConfigMap.
    assert_eq!(children.len(), 3, "{children:?}");
    for child in children {
        let owner = &child.body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["name"], "dms");
        assert_eq!(owner["uid"], "0b9d3c2e-uid");
        assert_eq!(owner["controller"], true);
    }
}

#[tokio::test]
async fn a_network_policy_is_applied_when_enabled_and_removed_when_not() {
    let mut dms = server();
    dms.spec.network_policy = Some(NetworkPolicySpec {
        enabled: true,
        allowed_clients: vec![ClientSelector {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "datamover-client".to_string(),
                    "true".to_string(),
                )])),
                ..LabelSelector::default()
            }),
            namespace_selector: None,
            namespaces: vec![],
        }],
    });
    let (_, calls) = run(World::standard(), dms).await;
    let np = &find(
        &calls,
        "PATCH",
        "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/dms",
    )
    .expect("the NetworkPolicy is applied")
    .body;
    let ingress = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(
        ingress[0]["from"][0]["podSelector"]["matchLabels"]["datamover-client"],
        "true"
    );
    assert_eq!(ingress[0]["ports"][0]["port"], 51515);
    // The controller may still read /server-data on the probe port.
    assert_eq!(ingress[1]["ports"][0]["port"], 8080);
    assert_eq!(np["metadata"]["ownerReferences"][0]["uid"], "0b9d3c2e-uid");

    // Disabled again: the one we made is deleted.
    let mut world = World::standard();
    world.network_policies.insert("dms".into(), np.clone());
    let (_, calls) = run(world, server()).await;
    assert!(find(&calls, "DELETE", "/networkpolicies/dms").is_some());

    // A NetworkPolicy of the same name that is not ours is left alone.
    let mut world = World::standard();
    world.network_policies.insert(
        "dms".into(),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "dms", "namespace": "default"}, "spec": {"podSelector": {}}}),
    );
    let (_, calls) = run(world, server()).await;
    assert!(find(&calls, "DELETE", "/networkpolicies/dms").is_none());
}
