//! ServiceAccount clients (`spec.serviceAccountClients`): pure builders of what the server
//! needs to accept projected ServiceAccount tokens.
//!
//! * The ConfigMap `<name>-serviceaccount-clients` (keys `audience` and `clients.json`,
//!   the server's format), always mounted whole at `/etc/serviceaccount_clients` and
//!   never part of the inputs hash: the kubelet updates the volume and the server reloads
//!   it live, no pod rolls.
//! * With a non-empty list: the server's ServiceAccount `<name>-datamover-server` (unless
//!   `podOptions.serviceAccountName` names one), whose token the pods then mount; a
//!   ClusterRoleBinding `datamover-server.<namespace>.<name>` to `system:auth-delegator`
//!   (TokenReview); and for entries with a `selector`, `get` on ServiceAccounts through
//!   the ClusterRole [`SA_READER_ROLE`]: a RoleBinding
//!   `datamover-serviceaccount-reader.<namespace>.<name>` in each entry's namespace, or a
//!   ClusterRoleBinding of that name for entries without one.
//!
//! The ConfigMap and the ServiceAccount are owned by the DatamoverServer (garbage
//! collection). The bindings cannot be (cluster-scoped, or in another namespace): they
//! carry [`SERVER_NAMESPACE_LABEL`] and [`SERVER_NAME_LABEL`], and the controller deletes
//! them by those labels when they are no longer wanted and, through the finalizer
//! [`FINALIZER`], when the DatamoverServer is deleted.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::Error;
use crate::resources::{self, MANAGED_BY_LABEL, NAME_LABEL};
use crate::types::DatamoverServer;

/// Where the server reads the ConfigMap.
pub const SA_CLIENTS_MOUNT: &str = "/etc/serviceaccount_clients";
/// The ConfigMap's volume in the server pods.
pub const SA_CLIENTS_VOLUME: &str = "serviceaccount-clients";
/// The ConfigMap key holding the audience.
pub const AUDIENCE_KEY: &str = "audience";
/// The ConfigMap key holding the JSON array of `spec.serviceAccountClients`.
pub const CLIENTS_KEY: &str = "clients.json";
/// The ClusterRole the server's ServiceAccount is bound to for TokenReview.
pub const AUTH_DELEGATOR_ROLE: &str = "system:auth-delegator";
/// The ClusterRole (shipped with the controller) granting `get` on ServiceAccounts, for
/// entries with a selector.
pub const SA_READER_ROLE: &str = "datamover-serviceaccount-reader";
/// Label of the bindings: the DatamoverServer's namespace.
pub const SERVER_NAMESPACE_LABEL: &str = "dm.cr.kanister.io/server-namespace";
/// Label of the bindings: the DatamoverServer's name.
pub const SERVER_NAME_LABEL: &str = "dm.cr.kanister.io/server-name";
/// The finalizer of a DatamoverServer that has (or had) bindings to remove.
pub const FINALIZER: &str = "dm.cr.kanister.io/serviceaccount-bindings";
/// `app.kubernetes.io/name` of the bindings.
pub const BINDING_APP: &str = "datamover-server";

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// The audience of a DatamoverServer's tokens: `datamover.<namespace>.<name>`, unique in
/// the cluster, so a token for one server is refused by every other.
pub fn token_audience(namespace: &str, name: &str) -> String {
    format!("datamover.{namespace}.{name}")
}

fn namespace_of(dms: &DatamoverServer) -> Result<String, Error> {
    dms.namespace()
        .ok_or(Error::MissingField("metadata.namespace"))
}

/// Does the server accept ServiceAccount tokens at all?
pub fn enabled(dms: &DatamoverServer) -> bool {
    !dms.spec.service_account_clients.is_empty()
}

/// The audience published in `status.serverInfo.tokenAudience`: only with clients.
pub fn published_audience(dms: &DatamoverServer) -> Option<String> {
    enabled(dms)
        .then(|| Some(token_audience(&dms.namespace()?, &dms.name_any())))
        .flatten()
}

/// Name of the ConfigMap the server reads at [`SA_CLIENTS_MOUNT`].
pub fn config_map_name(dms: &DatamoverServer) -> String {
    format!("{}-serviceaccount-clients", dms.name_any())
}

/// The ServiceAccount the controller creates for the server pods.
pub fn default_service_account_name(dms: &DatamoverServer) -> String {
    format!("{}-datamover-server", dms.name_any())
}

/// The server pods' ServiceAccount: the user's (`podOptions.serviceAccountName`), else,
/// with ServiceAccount clients, [`default_service_account_name`]; else none (the
/// namespace's default, its token not mounted).
pub fn pod_service_account(dms: &DatamoverServer) -> Option<String> {
    let own = dms
        .spec
        .pod_options
        .as_ref()
        .and_then(|o| o.service_account_name.clone());
    match own {
        Some(own) => Some(own),
        None if enabled(dms) => Some(default_service_account_name(dms)),
        None => None,
    }
}

/// The ConfigMap with the audience and `clients.json` (an empty array without clients).
pub fn config_map_for(dms: &DatamoverServer) -> Result<ConfigMap, Error> {
    let namespace = namespace_of(dms)?;
    let clients = serde_json::to_string_pretty(&dms.spec.service_account_clients)?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(dms)),
            ..resources::child_meta(dms)?
        },
        data: Some(BTreeMap::from([
            (
                AUDIENCE_KEY.to_string(),
                token_audience(&namespace, &dms.name_any()),
            ),
            (CLIENTS_KEY.to_string(), format!("{clients}\n")),
        ])),
        ..ConfigMap::default()
    })
}

/// The server's own ServiceAccount, when it has ServiceAccount clients and the user names
/// none.
pub fn service_account_for(dms: &DatamoverServer) -> Result<Option<ServiceAccount>, Error> {
    let user_named = dms
        .spec
        .pod_options
        .as_ref()
        .is_some_and(|o| o.service_account_name.is_some());
    if !enabled(dms) || user_named {
        return Ok(None);
    }
    Ok(Some(ServiceAccount {
        metadata: ObjectMeta {
            name: Some(default_service_account_name(dms)),
            ..resources::child_meta(dms)?
        },
        ..ServiceAccount::default()
    }))
}

/// Labels of the bindings of one DatamoverServer.
pub fn binding_labels(dms: &DatamoverServer) -> Result<BTreeMap<String, String>, Error> {
    Ok(BTreeMap::from([
        (NAME_LABEL.to_string(), BINDING_APP.to_string()),
        (
            MANAGED_BY_LABEL.to_string(),
            resources::CONTROLLER_APP.to_string(),
        ),
        (SERVER_NAMESPACE_LABEL.to_string(), namespace_of(dms)?),
        (SERVER_NAME_LABEL.to_string(), dms.name_any()),
    ]))
}

/// The label selector finding every binding of one DatamoverServer.
pub fn binding_selector(dms: &DatamoverServer) -> Result<String, Error> {
    Ok(binding_labels(dms)?
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(","))
}

/// Name of the ClusterRoleBinding to `system:auth-delegator`.
pub fn auth_delegator_binding_name(namespace: &str, name: &str) -> String {
    format!("datamover-server.{namespace}.{name}")
}

/// Name of the bindings to [`SA_READER_ROLE`] (a RoleBinding per entry namespace, or one
/// ClusterRoleBinding).
pub fn reader_binding_name(namespace: &str, name: &str) -> String {
    format!("{SA_READER_ROLE}.{namespace}.{name}")
}

/// The bindings one DatamoverServer wants (none without ServiceAccount clients).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bindings {
    pub cluster: Vec<ClusterRoleBinding>,
    pub namespaced: Vec<RoleBinding>,
}

impl Bindings {
    /// The ClusterRoleBindings' names.
    pub fn cluster_names(&self) -> BTreeSet<String> {
        self.cluster.iter().map(|b| b.name_any()).collect()
    }

    /// The RoleBindings' (namespace, name).
    pub fn namespaced_keys(&self) -> BTreeSet<(String, String)> {
        self.namespaced
            .iter()
            .map(|b| (b.namespace().unwrap_or_default(), b.name_any()))
            .collect()
    }
}

fn cluster_role_ref(name: &str) -> RoleRef {
    RoleRef {
        api_group: RBAC_GROUP.into(),
        kind: "ClusterRole".into(),
        name: name.into(),
    }
}

/// The bindings for the server pods' ServiceAccount.
pub fn bindings_for(dms: &DatamoverServer) -> Result<Bindings, Error> {
    let Some(account) = pod_service_account(dms).filter(|_| enabled(dms)) else {
        return Ok(Bindings::default());
    };
    let namespace = namespace_of(dms)?;
    let name = dms.name_any();
    let labels = binding_labels(dms)?;
    let subjects = Some(vec![Subject {
        kind: "ServiceAccount".into(),
        name: account,
        namespace: Some(namespace.clone()),
        ..Subject::default()
    }]);
    let meta = |binding: String, ns: Option<String>| ObjectMeta {
        name: Some(binding),
        namespace: ns,
        labels: Some(labels.clone()),
        ..ObjectMeta::default()
    };
    let mut cluster = vec![ClusterRoleBinding {
        metadata: meta(auth_delegator_binding_name(&namespace, &name), None),
        role_ref: cluster_role_ref(AUTH_DELEGATOR_ROLE),
        subjects: subjects.clone(),
    }];
    let selecting = dms
        .spec
        .service_account_clients
        .iter()
        .filter(|c| c.selector.is_some());
    let mut reader_namespaces = BTreeSet::new();
    let mut everywhere = false;
    for c in selecting {
        match &c.namespace {
            Some(ns) => {
                reader_namespaces.insert(ns.clone());
            }
            None => everywhere = true,
        }
    }
    let reader = reader_binding_name(&namespace, &name);
    let namespaced = if everywhere {
        cluster.push(ClusterRoleBinding {
            metadata: meta(reader, None),
            role_ref: cluster_role_ref(SA_READER_ROLE),
            subjects,
        });
        Vec::new()
    } else {
        reader_namespaces
            .into_iter()
            .map(|ns| RoleBinding {
                metadata: meta(reader.clone(), Some(ns)),
                role_ref: cluster_role_ref(SA_READER_ROLE),
                subjects: subjects.clone(),
            })
            .collect()
    };
    Ok(Bindings {
        cluster,
        namespaced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{
        ClientRole, PodOptions, SelectorOperator, SelectorRequirement, ServiceAccountClient,
        ServiceAccountSelector,
    };
    use crate::{DatamoverServer, DatamoverServerSpec};

    fn server(clients: Vec<ServiceAccountClient>) -> DatamoverServer {
        let spec: DatamoverServerSpec = serde_json::from_value(serde_json::json!({
            "image": "datamover/datamover-server:0.1.0",
            "config": "cfg",
            "clientSecretRef": {"secretName": "clients"},
            "secrets": [{"secretName": "repo"}],
        }))
        .expect("a valid spec");
        let mut dms = DatamoverServer::new("dms", spec);
        dms.metadata.namespace = Some("backup".into());
        dms.metadata.uid = Some("uid-1".into());
        dms.spec.service_account_clients = clients;
        dms
    }

    fn entry(ns: Option<&str>, name: Option<&str>, selector: bool) -> ServiceAccountClient {
        ServiceAccountClient {
            namespace: ns.map(str::to_string),
            name: name.map(str::to_string),
            selector: selector.then(|| ServiceAccountSelector {
                match_labels: BTreeMap::from([("team".to_string(), "a".to_string())]),
                match_expressions: vec![SelectorRequirement {
                    key: "tier".into(),
                    operator: SelectorOperator::In,
                    values: vec!["db".into()],
                }],
            }),
            tenant: "shop".into(),
            role: ClientRole::Append,
        }
    }

    #[test]
    fn the_audience_names_namespace_and_server() {
        assert_eq!(token_audience("backup", "dms"), "datamover.backup.dms");
        assert_eq!(published_audience(&server(vec![])), None);
        assert_eq!(
            published_audience(&server(vec![entry(Some("shop"), None, false)])).as_deref(),
            Some("datamover.backup.dms")
        );
    }

    #[test]
    fn the_config_map_holds_the_servers_format() {
        let dms = server(vec![
            entry(Some("shop"), Some("db-backup"), false),
            entry(None, None, true),
        ]);
        let cm = config_map_for(&dms).unwrap();
        assert_eq!(cm.name_any(), "dms-serviceaccount-clients");
        assert_eq!(cm.namespace().as_deref(), Some("backup"));
        assert_eq!(cm.owner_references()[0].uid, "uid-1");
        let data = cm.data.unwrap();
        assert_eq!(data[AUDIENCE_KEY], "datamover.backup.dms");
        let clients: serde_json::Value = serde_json::from_str(&data[CLIENTS_KEY]).unwrap();
        assert_eq!(
            clients,
            serde_json::json!([
                {"namespace": "shop", "name": "db-backup", "tenant": "shop", "role": "append"},
                {"selector": {"matchLabels": {"team": "a"},
                              "matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]},
                 "tenant": "shop", "role": "append"}
            ])
        );
        // Without clients: an empty array, and the audience all the same.
        let data = config_map_for(&server(vec![])).unwrap().data.unwrap();
        assert_eq!(data[CLIENTS_KEY].trim(), "[]");
    }

    #[test]
    fn no_clients_no_account_and_no_bindings() {
        let dms = server(vec![]);
        assert_eq!(service_account_for(&dms).unwrap(), None);
        assert_eq!(pod_service_account(&dms), None);
        assert_eq!(bindings_for(&dms).unwrap(), Bindings::default());
    }

    #[test]
    fn clients_get_an_account_bound_to_auth_delegator() {
        let dms = server(vec![entry(Some("shop"), Some("db-backup"), false)]);
        let sa = service_account_for(&dms)
            .unwrap()
            .expect("a ServiceAccount");
        assert_eq!(sa.name_any(), "dms-datamover-server");
        assert_eq!(sa.owner_references()[0].uid, "uid-1");
        let b = bindings_for(&dms).unwrap();
        assert!(b.namespaced.is_empty(), "no selector, no reader binding");
        assert_eq!(b.cluster.len(), 1);
        let crb = &b.cluster[0];
        assert_eq!(crb.name_any(), "datamover-server.backup.dms");
        assert_eq!(crb.role_ref.name, "system:auth-delegator");
        assert_eq!(crb.role_ref.kind, "ClusterRole");
        let subject = &crb.subjects.as_ref().unwrap()[0];
        assert_eq!(
            (subject.kind.as_str(), subject.name.as_str()),
            ("ServiceAccount", "dms-datamover-server")
        );
        assert_eq!(subject.namespace.as_deref(), Some("backup"));
        assert!(
            crb.owner_references().is_empty(),
            "cluster-scoped: no owner"
        );
        assert_eq!(crb.labels()[SERVER_NAMESPACE_LABEL], "backup");
        assert_eq!(crb.labels()[SERVER_NAME_LABEL], "dms");
        assert_eq!(
            binding_selector(&dms).unwrap(),
            "app.kubernetes.io/managed-by=datamover-controller,app.kubernetes.io/name=datamover-server,dm.cr.kanister.io/server-name=dms,dm.cr.kanister.io/server-namespace=backup"
        );
    }

    #[test]
    fn a_users_account_is_bound_and_not_created() {
        let mut dms = server(vec![entry(Some("shop"), None, false)]);
        dms.spec.pod_options = Some(PodOptions {
            service_account_name: Some("mine".into()),
            ..PodOptions::default()
        });
        assert_eq!(service_account_for(&dms).unwrap(), None);
        assert_eq!(pod_service_account(&dms).as_deref(), Some("mine"));
        let b = bindings_for(&dms).unwrap();
        assert_eq!(b.cluster[0].subjects.as_ref().unwrap()[0].name, "mine");
    }

    #[test]
    fn selectors_get_a_reader_binding_in_their_namespace_or_the_cluster() {
        let dms = server(vec![
            entry(Some("shop"), None, true),
            entry(Some("lab"), None, true),
            entry(Some("shop"), None, true),
            entry(Some("other"), Some("x"), false),
        ]);
        let b = bindings_for(&dms).unwrap();
        assert_eq!(
            b.cluster_names(),
            BTreeSet::from(["datamover-server.backup.dms".to_string()])
        );
        assert_eq!(
            b.namespaced_keys(),
            BTreeSet::from([
                (
                    "lab".to_string(),
                    "datamover-serviceaccount-reader.backup.dms".to_string()
                ),
                (
                    "shop".to_string(),
                    "datamover-serviceaccount-reader.backup.dms".to_string()
                ),
            ])
        );
        assert!(
            b.namespaced
                .iter()
                .all(|r| r.role_ref.name == SA_READER_ROLE && r.role_ref.kind == "ClusterRole")
        );

        // A selector without a namespace: every namespace, one ClusterRoleBinding.
        let dms = server(vec![
            entry(Some("shop"), None, true),
            entry(None, None, true),
        ]);
        let b = bindings_for(&dms).unwrap();
        assert!(b.namespaced.is_empty());
        assert_eq!(
            b.cluster_names(),
            BTreeSet::from([
                "datamover-server.backup.dms".to_string(),
                "datamover-serviceaccount-reader.backup.dms".to_string()
            ])
        );
    }
}
