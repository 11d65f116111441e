//! Reconciler tests against a mocked API server (kube's `tower-test` pattern): a scripted
//! fake cluster answers every request and records it, and each test asserts on what the
//! controller asked for.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use datamover_crd::Error;
use datamover_crd::controller::{self, Context, RESYNC, WAIT_READY};
use datamover_crd::metrics::Metrics;
use datamover_crd::resources::{INPUTS_HASH_ANNOTATION, inputs_hash};
use datamover_crd::server_data::ServerDataSource;
use datamover_crd::types::{
    ClientSelector, DatamoverServer, DatamoverServerSpec, NetworkPolicySpec, ProtocolSpec,
    SecretRef,
};
use http::{Request, Response};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodCondition, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::chrono::Utc;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};

const NS: &str = "default";

/// One request the controller made.
#[derive(Clone, Debug)]
struct Call {
    method: String,
    path: String,
    query: String,
    body: Value,
}

/// What the fake cluster holds.
#[derive(Clone, Default)]
struct World {
    config_maps: HashMap<String, ConfigMap>,
    secrets: HashMap<String, Secret>,
    pods: Vec<Pod>,
    network_policies: HashMap<String, Value>,
}

impl World {
    fn standard() -> Self {
        let mut w = World::default();
        w.put_config("datamover-config", &[("type", "s3"), ("bucket", "backups")]);
        w.put_secret(
            "datamover-s3",
            &[("AWS_ACCESS_KEY_ID", "AK"), ("AWS_SECRET_ACCESS_KEY", "SK")],
        );
        w.put_secret("datamover-repo", &[("repo-password", "pw")]);
        w.put_secret("datamover-clients", &[("edge-01", "token-1")]);
        w
    }

    fn put_config(&mut self, name: &str, data: &[(&str, &str)]) {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NS.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ConfigMap::default()
        };
        self.config_maps.insert(name.into(), cm);
    }

    fn put_secret(&mut self, name: &str, data: &[(&str, &str)]) {
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(NS.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        self.secrets.insert(name.into(), s);
    }

    /// The hash the controller should compute for the standard server in this world.
    fn hash(&self) -> String {
        inputs_hash(
            &self.config_maps["datamover-config"],
            &[
                self.secrets["datamover-s3"].clone(),
                self.secrets["datamover-repo"].clone(),
            ],
        )
    }
}

fn ready_pod(name: &str, ip: &str, hash: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            annotations: Some(BTreeMap::from([(
                INPUTS_HASH_ANNOTATION.to_string(),
                hash.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
        ..Pod::default()
    }
}

fn server() -> DatamoverServer {
    let mut dms = DatamoverServer::new(
        "dms",
        DatamoverServerSpec {
            image: "datamover/datamover-server:0.1.0".into(),
            protocols: vec![ProtocolSpec {
                name: "datamover-v1".into(),
                port: 51515,
            }],
            config: "datamover-config".into(),
            client_secret_ref: SecretRef {
                secret_name: "datamover-clients".into(),
            },
            secrets: vec![
                SecretRef {
                    secret_name: "datamover-s3".into(),
                },
                SecretRef {
                    secret_name: "datamover-repo".into(),
                },
            ],
            startup_probe: None,
            readiness_probe: None,
            liveness_probe: None,
            replicas: 1,
            env: vec![],
            pod_options: None,
            network_policy: None,
        },
    );
    dms.metadata.namespace = Some(NS.into());
    dms.metadata.uid = Some("0b9d3c2e-uid".into());
    dms.metadata.generation = Some(3);
    dms
}

/// Server data by pod IP; records which IPs were asked.
#[derive(Default)]
struct FakeServerData {
    by_ip: HashMap<String, String>,
    asked: Mutex<Vec<(String, i32)>>,
}

#[async_trait]
impl ServerDataSource for FakeServerData {
    async fn fetch(&self, ip: &str, port: i32) -> Result<String, Error> {
        self.asked.lock().unwrap().push((ip.to_string(), port));
        self.by_ip
            .get(ip)
            .cloned()
            .ok_or_else(|| Error::ServerData {
                addr: ip.to_string(),
                reason: "connection refused".into(),
            })
    }
}

fn not_found(what: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

fn answer(world: &World, call: &Call) -> (u16, Value) {
    let segments: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
    let last = segments.last().copied().unwrap_or_default();
    let resource = |kind: &str| segments.len() >= 2 && segments[segments.len() - 2] == kind;
    match call.method.as_str() {
        "GET" if resource("configmaps") => match world.config_maps.get(last) {
            Some(cm) => (200, serde_json::to_value(cm).unwrap()),
            None => not_found(&format!("configmaps \"{last}\"")),
        },
        "GET" if resource("secrets") => match world.secrets.get(last) {
            Some(s) => (200, serde_json::to_value(s).unwrap()),
            None => not_found(&format!("secrets \"{last}\"")),
        },
        "GET" if resource("networkpolicies") => match world.network_policies.get(last) {
            Some(np) => (200, np.clone()),
            None => not_found(&format!("networkpolicies \"{last}\"")),
        },
        "DELETE" if resource("networkpolicies") => (
            200,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        ),
        "GET" if last == "pods" => (
            200,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": world.pods}),
        ),
        "PATCH" if last == "status" => {
            let mut obj = serde_json::to_value(server()).unwrap();
            obj["status"] = call.body["status"].clone();
            (200, obj)
        }
        // Server-side apply of a child: the API server returns the applied object.
        "PATCH" => (200, call.body.clone()),
        "POST" if last == "events" => (201, call.body.clone()),
        _ => panic!("unexpected request {} {}", call.method, call.path),
    }
}

/// A context whose client talks to the fake `world`; returns what it recorded.
fn mock(
    world: World,
    server_data: FakeServerData,
) -> (Arc<Context>, Arc<Mutex<Vec<Call>>>, Arc<FakeServerData>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let call = Call {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                body: if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                },
            };
            let (status, reply) = answer(&world, &call);
            recorded.lock().unwrap().push(call);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = Client::new(service, NS);
    let server_data = Arc::new(server_data);
    let ctx = Context::new(
        client,
        Reporter {
            controller: "datamover-controller".into(),
            instance: Some("test".into()),
        },
        Arc::new(Metrics::new().unwrap()),
        server_data.clone(),
    );
    (Arc::new(ctx), calls, server_data)
}

async fn run(world: World, dms: DatamoverServer) -> (Action, Vec<Call>) {
    run_with(world, dms, FakeServerData::default()).await
}

async fn run_with(world: World, dms: DatamoverServer, data: FakeServerData) -> (Action, Vec<Call>) {
    let (ctx, calls, _) = mock(world, data);
    let action = controller::reconcile(Arc::new(dms), ctx).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    (action, calls)
}

fn find<'a>(calls: &'a [Call], method: &str, path_end: &str) -> Option<&'a Call> {
    calls
        .iter()
        .find(|c| c.method == method && c.path.ends_with(path_end))
}

fn deployment_patch(calls: &[Call]) -> &Value {
    &find(
        calls,
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/dms",
    )
    .expect("the Deployment is applied")
    .body
}

fn status_patch(calls: &[Call]) -> &Value {
    &find(calls, "PATCH", "/datamoverservers/dms/status")
        .expect("the status is applied")
        .body["status"]
}

fn template_hash(deployment: &Value) -> String {
    deployment["spec"]["template"]["metadata"]["annotations"][INPUTS_HASH_ANNOTATION]
        .as_str()
        .expect("the template carries the inputs hash")
        .to_string()
}

fn volume<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn mount_of<'a>(deployment: &'a Value, path: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("nothing mounted at {path}"))
}

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
    assert_eq!(children.len(), 2, "{children:?}");
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
