//! The `DatamoverServer` custom resource (`dm.cr.kanister.io/v1alpha1`) and its
//! controller, as in the Kanister datamover design.
//!
//! # Architecture
//!
//! ```text
//!  kubectl apply DatamoverServer ─▶ API server ◀── watch ── datamover-controller
//!                                      ▲                       │ reconcile(dms):
//!                                      │                       │ 1. get ConfigMap spec.config, Secrets
//!                                      │                       │    spec.secrets[*], spec.clientSecretRef,
//!                                      │                       │    the storageVolume claim
//!                                      │                       │    (missing: status Failed naming it,
//!                                      │                       │    requeue with backoff)
//!                                      │  server-side apply    │ 2. apply ConfigMap of SA clients,
//!                                      │                       │    (SA + RBAC bindings), Deployment,
//!                                      └───────────────────────┤    Service, NetworkPolicy
//!                                                              │ 3. list pods (ready? image pulled?);
//!                                                              │    GET /server-data from a
//!  server pod ─ /etc/config, /etc/secrets/<name>,              │    ready pod's probe port
//!     /etc/client_credentials, PROTOCOLS ◀── :8080 ────────────┘ 4. apply status: progress, serverInfo
//!                                                                   {serviceName, base64 data}, conditions
//! ```
//!
//! * [`types`]: the CRD (spec, status, schema validation, print columns).
//! * [`resources`]: pure builders from a DatamoverServer to its Deployment, Service and
//!   NetworkPolicy, and the inputs hash. The hash covers the ConfigMap and the storage
//!   Secrets and sits in a pod-template annotation, so changing them rolls the pods; the
//!   client-credentials Secret is left out (the server reloads it live) and mounted whole,
//!   without `subPath`, so kubelet's atomic `..data` swap reaches the server.
//! * [`controller`]: the reconciler, status by server-side apply, Events on transitions,
//!   exponential backoff on errors. Children carry a controller owner reference, so
//!   deleting the DatamoverServer deletes them through garbage collection. Only a server
//!   with `spec.serviceAccountClients` gets a finalizer (its RBAC bindings cannot be
//!   owned); it is dropped again when the list empties, so a server without them never
//!   waits for the controller to be deleted. The controller only `get`s the user's
//!   ConfigMaps and Secrets (it never lists or watches Secrets) and looks again every
//!   minute, so a changed input takes effect within [`controller::RESYNC`].
//! * [`serviceaccounts`]: pure builders for ServiceAccount clients: the ConfigMap
//!   `<name>-serviceaccount-clients` (`audience`, `clients.json`) the server reads live
//!   at `/etc/serviceaccount_clients` (not in the inputs hash), the server's
//!   ServiceAccount, its ClusterRoleBinding to `system:auth-delegator` and the bindings
//!   to `datamover-serviceaccount-reader` for label selectors; `bindings` applies them
//!   and deletes stale bindings by label.
//! * [`limits`]: `spec.limits`, the server's per-client limits, as the pods' variables.
//! * [`storage`]: whether the repository survives a pod restart (a filesystem store needs
//!   `spec.storageVolume` over its path), reported as the `StoragePersistent` condition.
//! * [`pods`]: readiness of the server pods, and an image that cannot be pulled.
//! * [`server_data`]: how `/etc/server/data` is read without `pods/exec`: the server serves
//!   the same (public) fingerprint at `GET /server-data` on its plaintext probe port.
//! * [`metrics`]: Prometheus counters and timings, `/healthz` and `/metrics`.
//! * [`manifests`]: the CRD and the controller's Namespace, ServiceAccount, RBAC and
//!   Deployment, rendered by the `crdgen` binary into `crd/manifests/`, and the chart's
//!   copies of the CRD and the ClusterRole rules into `charts/datamover/`.

mod bindings;
pub mod controller;
mod error;
pub mod limits;
pub mod manifests;
pub mod metrics;
pub mod pods;
pub mod resources;
pub mod server_data;
pub mod serviceaccounts;
pub mod storage;
pub mod types;

pub use error::Error;
pub use types::{DatamoverServer, DatamoverServerSpec, DatamoverServerStatus};
