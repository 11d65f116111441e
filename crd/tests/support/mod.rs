//! The mocked API server of the reconciler tests (kube's `tower-test` pattern): a scripted
//! fake cluster answers every request and records it, and each test asserts on what the
//! controller asked for.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datamover_crd::Error;
use datamover_crd::controller::{self, Context};
use datamover_crd::metrics::Metrics;
use datamover_crd::resources::{INPUTS_HASH_ANNOTATION, inputs_hash};
use datamover_crd::server_data::ServerDataSource;
use datamover_crd::types::{DatamoverServer, DatamoverServerSpec, ProtocolSpec, SecretRef};
use http::{Request, Response};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodCondition, PodStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};

pub const NS: &str = "default";

/// One request the controller made.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

/// What the fake cluster holds.
#[derive(Clone, Default)]
pub struct World {
    pub config_maps: HashMap<String, ConfigMap>,
    pub secrets: HashMap<String, Secret>,
    pub pods: Vec<Pod>,
    pub network_policies: HashMap<String, Value>,
    pub claims: HashMap<String, Value>,
    /// ClusterRoleBindings and RoleBindings a list returns (as if they matched the
    /// label selector).
    pub cluster_role_bindings: Vec<Value>,
    pub role_bindings: Vec<Value>,
    /// Namespaces that do not exist: applying a RoleBinding there is NotFound.
    pub missing_namespaces: Vec<String>,
}

impl World {
    pub fn standard() -> Self {
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

    pub fn put_config(&mut self, name: &str, data: &[(&str, &str)]) {
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

    pub fn put_secret(&mut self, name: &str, data: &[(&str, &str)]) {
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

    /// A PersistentVolumeClaim named `name`.
    pub fn put_claim(&mut self, name: &str) {
        self.claims.insert(
            name.into(),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": name, "namespace": NS},
                   "spec": {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "10Gi"}}}}),
        );
    }

    /// The hash the controller should compute for the standard server in this world.
    pub fn hash(&self) -> String {
        inputs_hash(
            &self.config_maps["datamover-config"],
            &[
                self.secrets["datamover-s3"].clone(),
                self.secrets["datamover-repo"].clone(),
            ],
        )
    }
}

pub fn ready_pod(name: &str, ip: &str, hash: &str) -> Pod {
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

pub fn server() -> DatamoverServer {
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
            storage_volume: None,
            network_policy: None,
            service_account_clients: vec![],
            limits: None,
        },
    );
    dms.metadata.namespace = Some(NS.into());
    dms.metadata.uid = Some("0b9d3c2e-uid".into());
    dms.metadata.generation = Some(3);
    dms
}

/// Server data by pod IP; records which IPs were asked.
#[derive(Default)]
pub struct FakeServerData {
    pub by_ip: HashMap<String, String>,
    pub asked: Mutex<Vec<(String, i32)>>,
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

pub fn not_found(what: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

pub fn answer(world: &World, call: &Call) -> (u16, Value) {
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
        "GET" if resource("persistentvolumeclaims") => match world.claims.get(last) {
            Some(pvc) => (200, pvc.clone()),
            None => not_found(&format!("persistentvolumeclaims \"{last}\"")),
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
        // The finalizer: a JSON patch (kube's finalizer helper) or a merge patch.
        "PATCH" if resource("datamoverservers") => {
            let mut obj = serde_json::to_value(server()).unwrap();
            obj["metadata"]["finalizers"] = match &call.body {
                Value::Array(_) => json!([datamover_crd::serviceaccounts::FINALIZER]),
                other => other["metadata"]["finalizers"].clone(),
            };
            (200, obj)
        }
        "PATCH"
            if resource("rolebindings")
                && world
                    .missing_namespaces
                    .iter()
                    .any(|ns| call.path.contains(&format!("/namespaces/{ns}/"))) =>
        {
            not_found("namespaces")
        }
        "GET" if last == "clusterrolebindings" => (
            200,
            json!({"kind": "ClusterRoleBindingList", "apiVersion": "rbac.authorization.k8s.io/v1",
                   "metadata": {}, "items": world.cluster_role_bindings}),
        ),
        "GET" if last == "rolebindings" => (
            200,
            json!({"kind": "RoleBindingList", "apiVersion": "rbac.authorization.k8s.io/v1",
                   "metadata": {}, "items": world.role_bindings}),
        ),
        "DELETE" if resource("clusterrolebindings") || resource("rolebindings") => (
            200,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        ),
        // Server-side apply of a child: the API server returns the applied object.
        "PATCH" => (200, call.body.clone()),
        "POST" if last == "events" => (201, call.body.clone()),
        _ => panic!("unexpected request {} {}", call.method, call.path),
    }
}

/// A context whose client talks to the fake `world`; returns what it recorded.
pub fn mock(
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

pub async fn run(world: World, dms: DatamoverServer) -> (Action, Vec<Call>) {
    run_with(world, dms, FakeServerData::default()).await
}

pub async fn run_with(
    world: World,
    dms: DatamoverServer,
    data: FakeServerData,
) -> (Action, Vec<Call>) {
    let (ctx, calls, _) = mock(world, data);
    let action = controller::reconcile(Arc::new(dms), ctx).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    (action, calls)
}

pub fn find<'a>(calls: &'a [Call], method: &str, path_end: &str) -> Option<&'a Call> {
    calls
        .iter()
        .find(|c| c.method == method && c.path.ends_with(path_end))
}

pub fn deployment_patch(calls: &[Call]) -> &Value {
    &find(
        calls,
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/dms",
    )
    .expect("the Deployment is applied")
    .body
}

pub fn status_patch(calls: &[Call]) -> &Value {
    &find(calls, "PATCH", "/datamoverservers/dms/status")
        .expect("the status is applied")
        .body["status"]
}

pub fn template_hash(deployment: &Value) -> String {
    deployment["spec"]["template"]["metadata"]["annotations"][INPUTS_HASH_ANNOTATION]
        .as_str()
        .expect("the template carries the inputs hash")
        .to_string()
}

pub fn volume<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

pub fn mount_of<'a>(deployment: &'a Value, path: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("nothing mounted at {path}"))
}
