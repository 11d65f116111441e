//! ServiceAccount clients against the mocked API server: the ConfigMap the server reads
//! live (never in the inputs hash), the server's ServiceAccount and its bindings, the
//! finalizer that removes the cluster-scoped and cross-namespace bindings, and the
//! audience in the status.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datamover_crd::controller;
use datamover_crd::serviceaccounts::FINALIZER;
use datamover_crd::types::{
    ClientRole, PodOptions, SelectorOperator, SelectorRequirement, ServiceAccountClient,
    ServiceAccountSelector,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::Utc;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use support::*;

const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1";

fn named(ns: &str, name: &str, role: ClientRole) -> ServiceAccountClient {
    ServiceAccountClient {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        selector: None,
        tenant: ns.into(),
        role,
    }
}

fn selected(ns: Option<&str>) -> ServiceAccountClient {
    ServiceAccountClient {
        namespace: ns.map(str::to_string),
        name: None,
        selector: Some(ServiceAccountSelector {
            match_labels: BTreeMap::from([("datamover/restore".to_string(), "true".to_string())]),
            match_expressions: vec![SelectorRequirement {
                key: "team".into(),
                operator: SelectorOperator::Exists,
                values: vec![],
            }],
        }),
        tenant: "lab".into(),
        role: ClientRole::Full,
    }
}

/// A server with these clients, its finalizer already in place.
fn server_with(clients: Vec<ServiceAccountClient>) -> datamover_crd::DatamoverServer {
    let mut dms = server();
    dms.spec.service_account_clients = clients;
    dms.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    dms.metadata.resource_version = Some("42".into());
    dms
}

fn config_map_patch(calls: &[Call]) -> &Value {
    &find(
        calls,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/dms-serviceaccount-clients",
    )
    .expect("the ServiceAccount clients' ConfigMap is applied")
    .body
}

fn rbac_calls<'a>(calls: &'a [Call], method: &str) -> Vec<&'a Call> {
    calls
        .iter()
        .filter(|c| c.method == method && c.path.starts_with(RBAC))
        .collect()
}

fn binding(kind: &str, namespace: Option<&str>, name: &str) -> Value {
    let mut meta = json!({"name": name, "labels": {
        "app.kubernetes.io/managed-by": "datamover-controller",
        "dm.cr.kanister.io/server-namespace": NS,
        "dm.cr.kanister.io/server-name": "dms"}});
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                       "name": "datamover-serviceaccount-reader"}})
}

#[tokio::test]
async fn clients_get_the_config_map_an_account_and_the_bindings() {
    let dms = server_with(vec![
        named("shop", "db-backup", ClientRole::Append),
        selected(Some("lab")),
    ]);
    let (action, calls) = run(World::standard(), dms).await;
    assert_eq!(action, Action::requeue(controller::WAIT_READY));

    // The ConfigMap the server reads: the audience and the entries in its format.
    let cm = config_map_patch(&calls);
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "0b9d3c2e-uid");
    assert_eq!(cm["data"]["audience"], "datamover.default.dms");
    let clients: Value =
        serde_json::from_str(cm["data"]["clients.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        clients,
        json!([
            {"namespace": "shop", "name": "db-backup", "tenant": "shop", "role": "append"},
            {"namespace": "lab",
             "selector": {"matchLabels": {"datamover/restore": "true"},
                          "matchExpressions": [{"key": "team", "operator": "Exists"}]},
             "tenant": "lab", "role": "full"}
        ])
    );

    // The server's own ServiceAccount, owned by the DatamoverServer.
    let sa = &find(
        &calls,
        "PATCH",
        "/api/v1/namespaces/default/serviceaccounts/dms-datamover-server",
    )
    .expect("the server's ServiceAccount is applied")
    .body;
    assert_eq!(sa["metadata"]["ownerReferences"][0]["uid"], "0b9d3c2e-uid");

    // TokenReview: a ClusterRoleBinding to system:auth-delegator, labelled, not owned.
    let crb = &find(
        &calls,
        "PATCH",
        &format!("{RBAC}/clusterrolebindings/datamover-server.default.dms"),
    )
    .expect("the auth-delegator binding is applied")
    .body;
    assert_eq!(crb["roleRef"]["name"], "system:auth-delegator");
    assert_eq!(crb["roleRef"]["kind"], "ClusterRole");
    assert_eq!(
        crb["subjects"],
        json!([{"kind": "ServiceAccount", "name": "dms-datamover-server", "namespace": "default"}])
    );
    assert!(crb["metadata"].get("ownerReferences").is_none());
    assert_eq!(
        crb["metadata"]["labels"]["dm.cr.kanister.io/server-namespace"],
        "default"
    );
    assert_eq!(
        crb["metadata"]["labels"]["dm.cr.kanister.io/server-name"],
        "dms"
    );

    // The selector entry: reading ServiceAccounts of its namespace, and only there.
    let rb = &find(
        &calls,
        "PATCH",
        &format!("{RBAC}/namespaces/lab/rolebindings/datamover-serviceaccount-reader.default.dms"),
    )
    .expect("the reader RoleBinding in the entry's namespace")
    .body;
    assert_eq!(rb["roleRef"]["name"], "datamover-serviceaccount-reader");
    assert_eq!(rb["subjects"][0]["name"], "dms-datamover-server");
    let patched: Vec<&str> = rbac_calls(&calls, "PATCH")
        .iter()
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(patched.len(), 2, "{patched:?}");

    // The pods run under that account, with its token, and mount the ConfigMap whole.
    let d = deployment_patch(&calls);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "dms-datamover-server");
    assert_eq!(pod["automountServiceAccountToken"], true);
    let m = mount_of(d, "/etc/serviceaccount_clients");
    assert_eq!(m["readOnly"], true);
    assert!(m.get("subPath").is_none());
    assert_eq!(
        volume(d, m["name"].as_str().unwrap())["configMap"]["name"],
        "dms-serviceaccount-clients"
    );
}

/// The ConfigMap's content is applied live by the kubelet: it must not be in the inputs
/// hash, and changing the list must not change the pod template.
#[tokio::test]
async fn changing_the_clients_does_not_roll_the_pods() {
    let (_, before) = run(
        World::standard(),
        server_with(vec![named("shop", "db-backup", ClientRole::Append)]),
    )
    .await;
    let (_, after) = run(
        World::standard(),
        server_with(vec![
            named("shop", "db-backup", ClientRole::Read),
            named("blog", "writer", ClientRole::Full),
        ]),
    )
    .await;
    assert_ne!(
        config_map_patch(&before)["data"],
        config_map_patch(&after)["data"]
    );
    assert_eq!(deployment_patch(&before), deployment_patch(&after));
    assert_eq!(
        template_hash(deployment_patch(&after)),
        World::standard().hash(),
        "the hash covers the storage inputs only"
    );
}

#[tokio::test]
async fn the_token_audience_is_published_with_the_server_info() {
    let ready_world = || {
        let mut world = World::standard();
        world.pods = vec![ready_pod("dms-a", "10.1.2.3", &world.hash())];
        world
    };
    let data = || FakeServerData {
        by_ip: HashMap::from([("10.1.2.3".to_string(), "abcd".to_string())]),
        ..FakeServerData::default()
    };
    let (_, calls) = run_with(
        ready_world(),
        server_with(vec![named("shop", "db-backup", ClientRole::Append)]),
        data(),
    )
    .await;
    let status = status_patch(&calls);
    assert_eq!(status["progress"], "Ready");
    assert_eq!(
        status["serverInfo"]["tokenAudience"],
        "datamover.default.dms"
    );

    // Without ServiceAccount clients there is no audience to publish.
    let (_, calls) = run_with(ready_world(), server(), data()).await;
    let status = status_patch(&calls);
    assert_eq!(status["progress"], "Ready");
    assert!(status["serverInfo"].get("tokenAudience").is_none());
}

#[tokio::test]
async fn the_finalizer_comes_first() {
    let mut dms = server_with(vec![named("shop", "db-backup", ClientRole::Append)]);
    dms.metadata.finalizers = None;
    let (action, calls) = run(World::standard(), dms).await;
    assert_eq!(action, Action::await_change());
    let add = find(&calls, "PATCH", "/datamoverservers/dms").expect("the finalizer is added");
    assert!(add.body.to_string().contains(FINALIZER), "{}", add.body);
    assert!(
        rbac_calls(&calls, "PATCH").is_empty(),
        "no binding before the finalizer that removes it"
    );
}

#[tokio::test]
async fn bindings_no_longer_needed_are_deleted() {
    let mut world = World::standard();
    world.cluster_role_bindings = vec![
        binding("ClusterRoleBinding", None, "datamover-server.default.dms"),
        binding(
            "ClusterRoleBinding",
            None,
            "datamover-serviceaccount-reader.default.dms",
        ),
    ];
    world.role_bindings = vec![binding(
        "RoleBinding",
        Some("old"),
        "datamover-serviceaccount-reader.default.dms",
    )];
    // No selector left: only TokenReview is needed.
    let (_, calls) = run(
        world,
        server_with(vec![named("shop", "db-backup", ClientRole::Append)]),
    )
    .await;
    let list = find(&calls, "GET", &format!("{RBAC}/clusterrolebindings")).unwrap();
    assert!(
        list.query.contains("dm.cr.kanister.io%2Fserver-name%3Ddms")
            || list.query.contains("dm.cr.kanister.io/server-name=dms"),
        "{}",
        list.query
    );
    let deleted: Vec<&str> = rbac_calls(&calls, "DELETE")
        .iter()
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(
        deleted,
        [
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/datamover-serviceaccount-reader.default.dms",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/old/rolebindings/datamover-serviceaccount-reader.default.dms",
        ]
    );
}

#[tokio::test]
async fn without_clients_the_bindings_and_the_finalizer_go() {
    let mut world = World::standard();
    world.cluster_role_bindings = vec![binding(
        "ClusterRoleBinding",
        None,
        "datamover-server.default.dms",
    )];
    let (_, calls) = run(world, server_with(vec![])).await;
    assert!(
        find(
            &calls,
            "DELETE",
            &format!("{RBAC}/clusterrolebindings/datamover-server.default.dms")
        )
        .is_some()
    );
    let drop = find(&calls, "PATCH", "/datamoverservers/dms").expect("the finalizer is removed");
    assert_eq!(drop.body["metadata"]["finalizers"], json!([]));
    assert_eq!(drop.body["metadata"]["resourceVersion"], "42");
    assert!(
        find(&calls, "PATCH", "/serviceaccounts/dms-datamover-server").is_none(),
        "no ServiceAccount without clients"
    );
    let pod = &deployment_patch(&calls)["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(pod.get("serviceAccountName").is_none());
    assert_eq!(
        serde_json::from_str::<Value>(
            config_map_patch(&calls)["data"]["clients.json"]
                .as_str()
                .unwrap()
        )
        .unwrap(),
        json!([])
    );
}

#[tokio::test]
async fn a_server_that_never_had_clients_touches_no_rbac() {
    let (_, calls) = run(World::standard(), server()).await;
    assert!(calls.iter().all(|c| !c.path.starts_with(RBAC)), "{calls:?}");
    assert!(find(&calls, "PATCH", "/datamoverservers/dms").is_none());
    // The ConfigMap is there all the same: the server mounts it.
    assert_eq!(
        config_map_patch(&calls)["data"]["audience"],
        "datamover.default.dms"
    );
}

#[tokio::test]
async fn deleting_the_server_deletes_its_bindings_then_the_finalizer() {
    let mut world = World::standard();
    world.cluster_role_bindings = vec![
        binding("ClusterRoleBinding", None, "datamover-server.default.dms"),
        binding(
            "ClusterRoleBinding",
            None,
            "datamover-serviceaccount-reader.default.dms",
        ),
    ];
    world.role_bindings = vec![binding(
        "RoleBinding",
        Some("lab"),
        "datamover-serviceaccount-reader.default.dms",
    )];
    let mut dms = server_with(vec![selected(Some("lab"))]);
    dms.metadata.deletion_timestamp = Some(Time(Utc::now()));
    let (ctx, calls, _) = mock(world, FakeServerData::default());
    let action = controller::reconcile(Arc::new(dms), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    let calls = calls.lock().unwrap().clone();
    assert_eq!(rbac_calls(&calls, "DELETE").len(), 3, "{calls:?}");
    let last = calls.last().unwrap();
    assert_eq!(last.method, "PATCH");
    assert!(
        last.path.ends_with("/datamoverservers/dms"),
        "{}",
        last.path
    );
    assert!(last.body.to_string().contains("remove"), "{}", last.body);
    assert!(find(&calls, "PATCH", "/deployments/dms").is_none());
}

#[tokio::test]
async fn a_users_account_is_bound_not_created() {
    let mut dms = server_with(vec![selected(Some("ghost")), selected(None)]);
    dms.spec.pod_options = Some(PodOptions {
        service_account_name: Some("mine".into()),
        ..PodOptions::default()
    });
    let (_, calls) = run(World::standard(), dms).await;
    assert!(
        rbac_calls(&calls, "PATCH")
            .iter()
            .all(|c| !c.path.contains("/rolebindings/")),
        "the ClusterRoleBinding covers the namespaced entry too"
    );
    // The user's account is bound, not created.
    assert!(find(&calls, "PATCH", "/serviceaccounts/mine").is_none());
    let crb = &find(
        &calls,
        "PATCH",
        &format!("{RBAC}/clusterrolebindings/datamover-server.default.dms"),
    )
    .unwrap()
    .body;
    assert_eq!(crb["subjects"][0]["name"], "mine");
    // A selector in every namespace: one ClusterRoleBinding to the reader role.
    let reader = &find(
        &calls,
        "PATCH",
        &format!("{RBAC}/clusterrolebindings/datamover-serviceaccount-reader.default.dms"),
    )
    .unwrap()
    .body;
    assert_eq!(reader["roleRef"]["name"], "datamover-serviceaccount-reader");
    let pod = &deployment_patch(&calls)["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "mine");
    assert_eq!(pod["automountServiceAccountToken"], true);
}

#[tokio::test]
async fn an_entry_namespace_that_does_not_exist_does_not_stop_the_server() {
    let mut world = World::standard();
    world.missing_namespaces = vec!["ghost".into()];
    let (_, calls) = run(world, server_with(vec![selected(Some("ghost"))])).await;
    assert!(
        find(
            &calls,
            "PATCH",
            &format!(
                "{RBAC}/namespaces/ghost/rolebindings/datamover-serviceaccount-reader.default.dms"
            )
        )
        .is_some()
    );
    deployment_patch(&calls);
    assert_eq!(status_patch(&calls)["progress"], "Pending");
}
