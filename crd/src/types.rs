//! The `DatamoverServer` custom resource (`dm.cr.kanister.io/v1alpha1`).
//!
//! The spec follows the Kanister datamover design (`image`, `protocols`, `config`,
//! `clientSecretRef`, `secrets`, probes) plus what operators need to run it (`replicas`,
//! `env`, `podOptions`, `storageVolume`, `networkPolicy`). Validation lives in the generated OpenAPI schema,
//! so `kubectl apply` rejects a bad object before the controller ever sees it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, PodSecurityContext, Probe, ResourceRequirements,
    SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::limits::LimitsSpec;

/// API group of the custom resource.
pub const GROUP: &str = "dm.cr.kanister.io";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";
/// The gRPC protocol the server speaks, and its default port.
pub const DEFAULT_PROTOCOL: &str = "datamover-v1";
pub const DEFAULT_PORT: i32 = 51515;

/// A datamover server: a Deployment of `datamover-server` pods holding the storage
/// credentials, and a Service clients reach it by.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "dm.cr.kanister.io",
    version = "v1alpha1",
    kind = "DatamoverServer",
    plural = "datamoverservers",
    shortname = "dms",
    namespaced,
    status = "DatamoverServerStatus",
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".status.serverInfo.serviceName"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DatamoverServerSpec {
    /// Container image of the datamover server.
    #[schemars(length(min = 1))]
    pub image: String,

    /// Protocols to serve, each on its own port. Default: `datamover-v1` on 51515.
    #[serde(default = "default_protocols")]
    #[schemars(length(min = 1, max = 8))]
    pub protocols: Vec<ProtocolSpec>,

    /// Name of the ConfigMap with the storage settings, mounted at `/etc/config`.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub config: String,

    /// The Secret with one key per client id (a token or a PHC hash), mounted at
    /// `/etc/client_credentials`. The server reloads it live: changing it never restarts pods.
    pub client_secret_ref: SecretRef,

    /// Storage secrets (S3 keys, `repo-password`, `tls.crt`/`tls.key`, `ca.crt`), each
    /// mounted at `/etc/secrets/<secretName>`. A change to one of them rolls the pods.
    #[schemars(length(min = 1, max = 16))]
    pub secrets: Vec<SecretRef>,

    /// Overrides the default startup probe (`GET /healthz` on the probe port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
    /// Overrides the default readiness probe (`GET /readyz` on the probe port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    /// Overrides the default liveness probe (`GET /healthz` on the probe port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,

    /// Number of server pods. Several replicas need a TLS secret (`tls.crt`, `tls.key`)
    /// among `secrets`, so that they all present the certificate clients pin.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 32))]
    pub replicas: i32,

    /// Extra environment variables for the server container (for example `RUST_LOG`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Scheduling and security settings of the server pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_options: Option<PodOptions>,

    /// A volume for the filesystem store (ConfigMap `type: filesystem`, or no `type` and
    /// no bucket keys): a PersistentVolumeClaim of this namespace, mounted into the server
    /// container at `mountPath` (default `/var/lib/datamover`, where the store lives unless
    /// the ConfigMap's `path` says otherwise; `path` must be `mountPath` or below it).
    /// Without it a filesystem store lives in the container and every snapshot is lost
    /// whenever the pod restarts: the controller then sets the condition
    /// `StoragePersistent` to False (reason `EphemeralFilesystemStore`) and emits a Warning
    /// event. Pods run with `fsGroup: 65532` (unless `podOptions.securityContext` sets
    /// another), so the server's user can write the volume. With `replicas` above 1 the
    /// claim must be `ReadWriteMany` (a `ReadWriteOnce` claim attaches to one node only).
    /// Not needed with an S3 store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_volume: Option<StorageVolume>,

    /// A NetworkPolicy that lets only the selected clients reach the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,

    /// Kubernetes ServiceAccounts whose projected tokens the server accepts instead of a
    /// client credential, each as a tenant with a role. The token must be projected with
    /// the audience of `status.serverInfo.tokenAudience`. Applied live (a ConfigMap the
    /// server watches); when the list is non-empty the server pods run under a
    /// ServiceAccount allowed to call the TokenReview API (`system:auth-delegator`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub service_account_clients: Vec<ServiceAccountClient>,

    /// Per-client limits of the server (calls per second, backup sessions, chunks per
    /// message, catalog size, path length), passed to the pods as `DATAMOVER_*`
    /// variables; a limit left out keeps the server's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
}

/// ServiceAccounts allowed to connect: by namespace and name, a whole namespace, or a
/// label selector on the ServiceAccounts (of one namespace, or of every namespace).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountClient {
    /// The ServiceAccounts' namespace. Required unless `selector` is given (then left
    /// out: every namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,
    /// The ServiceAccount's name. Left out: every ServiceAccount the other fields match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: Option<String>,
    /// A label selector on the ServiceAccounts (not the pods). The server then reads the
    /// ServiceAccounts' labels: the controller grants it `get` on `serviceaccounts` in
    /// `namespace` (or in every namespace when there is none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<ServiceAccountSelector>,
    /// Whose snapshots the client sees: a name like a client id (letters, digits, `.`,
    /// `_`, `-`, not starting with `.`). May be shared with credential clients.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
    )]
    pub tenant: String,
    /// What the client may do in its tenant.
    pub role: ClientRole,
}

/// A Kubernetes label selector (`matchLabels`, `matchExpressions`), every part of which
/// must hold.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<SelectorRequirement>,
}

impl ServiceAccountSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

/// One requirement of a label selector: `In` and `NotIn` need `values`, `Exists` and
/// `DoesNotExist` take none.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SelectorRequirement {
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub values: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A client's role: `append` (back up only), `read` (restore only), `full` (its own
/// tenant, deletes included), `admin` (also maintenance).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientRole {
    Append,
    Read,
    Full,
    Admin,
}

/// The volume of the filesystem store, as in `spec.storageVolume`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageVolume {
    /// The PersistentVolumeClaim holding the repository (created beforehand, in the
    /// DatamoverServer's namespace).
    pub persistent_volume_claim: ClaimRef,
    /// Where the claim is mounted in the server container: an absolute path outside
    /// `/etc`. Default: `/var/lib/datamover`.
    #[serde(default = "default_storage_mount_path")]
    #[schemars(length(min = 2, max = 1024), regex(pattern = r"^/[^/]"))]
    pub mount_path: String,
    /// A sub-directory of the claim to mount instead of its root (so that one claim can
    /// serve several servers); relative, without `..`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^[^/]"))]
    pub sub_path: Option<String>,
}

/// A PersistentVolumeClaim in the DatamoverServer's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub claim_name: String,
}

/// One protocol served by the server, as in `PROTOCOLS` (`name:port`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ProtocolSpec {
    /// Protocol name; also the name of the container and Service port.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// TCP port the server listens on and the Service exposes.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// A reference to a Secret in the DatamoverServer's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: String,
}

/// Pod-level settings passed through to the server pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Service account of the server pods. Without `serviceAccountClients` the server
    /// needs no Kubernetes API access and its token is not mounted; with them, the
    /// controller binds this account (default: `<name>-datamover-server`, which it
    /// creates) to `system:auth-delegator` and mounts its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
    /// Pod security context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Security context of the server container. Default: no privilege escalation,
    /// all capabilities dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Extra labels of the server pods (the controller's own labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations of the server pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Which pods may reach the server's protocol ports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create a NetworkPolicy for the server pods.
    pub enabled: bool,
    /// Clients allowed to connect. Each entry selects pods (by default those labelled
    /// `dm.cr.kanister.io/client: "true"`) in the server's namespace, or in the namespaces
    /// it names or selects (Kanister runs its function pods in the application's
    /// namespace). Empty: no client at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub allowed_clients: Vec<ClientSelector>,
}

/// A set of client pods, as in a NetworkPolicy peer: the pods `podSelector` selects in
/// the namespaces `namespaces` and `namespaceSelector` pick.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSelector {
    /// The client pods. Left out: pods labelled `dm.cr.kanister.io/client: "true"`, the
    /// label the datamover blueprints give their pods. `{}`: every pod of the namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// The client pods' namespaces, by label. With `namespaces` too, a namespace must be
    /// named and selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// The client pods' namespaces, by name (for example the applications' namespaces
    /// Kanister backs up). Neither this nor `namespaceSelector`: the server's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        )
    )]
    pub namespaces: Vec<String>,
}

/// Where the server is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Progress {
    /// Created or changing; not serving yet.
    Pending,
    /// At least one current pod is ready and `serverInfo` is filled in.
    Ready,
    /// Cannot proceed until something is fixed; the conditions say what.
    Failed,
}

impl Progress {
    pub fn as_str(self) -> &'static str {
        match self {
            Progress::Pending => "Pending",
            Progress::Ready => "Ready",
            Progress::Failed => "Failed",
        }
    }
}

/// What clients need to reach the server.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    /// Name of the Service in front of the server pods.
    pub service_name: String,
    /// Base64 of the content of the server's `/etc/server/data` (the hex SHA-256
    /// fingerprint of its TLS certificate); give it to clients as `SERVER_DATA`.
    pub data: String,
    /// With `spec.serviceAccountClients`: the audience a client pod projects its
    /// ServiceAccount token with (`serviceAccountToken.audience`),
    /// `datamover.<namespace>.<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_audience: Option<String>,
}

/// Observed state, written by the controller.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatamoverServerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_info: Option<ServerInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn default_protocols() -> Vec<ProtocolSpec> {
    vec![ProtocolSpec {
        name: DEFAULT_PROTOCOL.to_string(),
        port: DEFAULT_PORT,
    }]
}

fn default_replicas() -> i32 {
    1
}

fn default_storage_mount_path() -> String {
    crate::storage::DEFAULT_STORE_PATH.to_string()
}
