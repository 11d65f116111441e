//! End-to-end on a real Kubernetes (the single-node cluster of `scripts/cluster-up.sh`):
//! the controller installed from the Helm chart and from the plain manifests, a
//! DatamoverServer CR becoming a ready server, client pods backing up and restoring
//! volumes, credentials changed through the kubelet, `kubectl exec` of the client image,
//! the blueprints' phases as the pods Kanister creates, and (when `KANISTER_CONTROLLER`
//! names one) real Kanister ActionSets.
//!
//! The tests share one cluster and one controller, so they take turns ([`turn`]). Without
//! a cluster each says so and passes, except under `CI`.

#[path = "cluster/install.rs"]
mod install;
#[path = "cluster/kanister.rs"]
mod kanister;
#[path = "cluster/mysql.rs"]
mod mysql;
#[path = "cluster/networkpolicy.rs"]
mod networkpolicy;
#[path = "cluster/postgresql.rs"]
mod postgresql;
#[path = "cluster/server.rs"]
mod server;
#[path = "cluster/serviceaccounts.rs"]
mod serviceaccounts;
#[path = "cluster/setup.rs"]
mod setup;
#[path = "cluster/sidecar.rs"]
mod sidecar;
#[path = "cluster/volume.rs"]
mod volume;
#[path = "cluster/walkthrough.rs"]
mod walkthrough;
