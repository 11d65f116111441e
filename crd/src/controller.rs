//! The reconciler: one DatamoverServer in, its Deployment, Service and NetworkPolicy
//! applied (and, for ServiceAccount clients, the objects of `bindings.rs`), its
//! status written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::chrono::Utc;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, Event as Finalized};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::Error;
use crate::bindings;
use crate::metrics::Metrics;
use crate::pods;
use crate::resources::{
    self, HTTP_PORT, INPUTS_HASH_ANNOTATION, Inputs, MANAGED_BY_LABEL, deployment_for,
    network_policy_for, service_for,
};
use crate::server_data::ServerDataSource;
use crate::serviceaccounts::{self, FINALIZER};
use crate::storage::{self, STORAGE_CONDITION, StorageCheck};
use crate::types::{DatamoverServer, DatamoverServerStatus, Progress, ServerInfo};

/// Field manager of every apply, and the Events' reporting controller.
pub const MANAGER: &str = "datamover-controller";
/// The condition the controller maintains.
pub const READY_CONDITION: &str = "Ready";

/// How soon a ready server is looked at again: picks up ConfigMap and Secret changes
/// (the controller only `get`s those, it does not watch every Secret in the cluster)
/// and a changed certificate fingerprint.
pub const RESYNC: Duration = Duration::from_secs(60);
/// How soon a server whose pods are not ready yet is looked at again.
pub const WAIT_READY: Duration = Duration::from_secs(5);
const BACKOFF_BASE: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub server_data: Arc<dyn ServerDataSource>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<DatamoverServer>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        server_data: Arc<dyn ServerDataSource>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            server_data,
            failures: Mutex::default(),
        }
    }

    /// The next backoff delay for `obj`: 5 s doubling to 5 min.
    fn backoff(&self, obj: &DatamoverServer) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(ObjectRef::from_obj(obj)).or_insert(0);
        let delay = BACKOFF_BASE.saturating_mul(1u32 << (*n).min(6));
        *n = n.saturating_add(1);
        delay.min(BACKOFF_MAX)
    }

    fn reset_backoff(&self, obj: &DatamoverServer) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&ObjectRef::from_obj(obj));
    }
}

/// An input of the server that does not exist.
#[derive(Debug, Clone, PartialEq)]
pub struct Missing {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
}

/// The outcome of one reconciliation, before it is written to the status.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    progress: Progress,
    reason: &'static str,
    message: String,
    server_info: Option<ServerInfo>,
    /// The `StoragePersistent` condition; `None` keeps the previous one (inputs missing).
    storage: Option<StorageCheck>,
}

/// Reconciles one DatamoverServer. Children carry an owner reference to it, so deleting it
/// deletes them (garbage collection). Only a server with ServiceAccount clients gets a
/// finalizer ([`FINALIZER`]): its ClusterRoleBindings and RoleBindings in other
/// namespaces cannot be owned by it, and are deleted by the controller before it goes.
pub async fn reconcile(dms: Arc<DatamoverServer>, ctx: Arc<Context>) -> Result<Action, Error> {
    let tracked = dms.finalizers().iter().any(|f| f == FINALIZER);
    if dms.meta().deletion_timestamp.is_some() && !tracked {
        debug!(name = %dms.name_any(), "being deleted; garbage collection removes its objects");
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let result = if serviceaccounts::enabled(&dms) || tracked {
        let ns = dms
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let api = Api::<DatamoverServer>::namespaced(ctx.client.clone(), &ns);
        finalizer::finalizer(&api, FINALIZER, dms, |event| async {
            match event {
                Finalized::Apply(dms) => reconcile_inner(&dms, &ctx).await,
                Finalized::Cleanup(dms) => cleanup(&dms, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    } else {
        reconcile_inner(&dms, &ctx).await
    };
    ctx.metrics.observe(started.elapsed());
    result
}

/// The DatamoverServer is being deleted: its bindings go (the rest is garbage collected).
async fn cleanup(dms: &DatamoverServer, ctx: &Context) -> Result<Action, Error> {
    info!(name = %dms.name_any(), namespace = ?dms.namespace(), "deleting the bindings of a deleted DatamoverServer");
    bindings::prune(dms, &ctx.client, &serviceaccounts::Bindings::default()).await?;
    Ok(Action::await_change())
}

async fn reconcile_inner(dms: &DatamoverServer, ctx: &Context) -> Result<Action, Error> {
    let ns = dms
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = dms.name_any();
    let client = &ctx.client;
    let spec = &dms.spec;

    // 1. Inputs: the ConfigMap, the storage Secrets, the client-credentials Secret.
    let mut missing = Vec::new();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let config = config_maps.get_opt(&spec.config).await?;
    if config.is_none() {
        missing.push(Missing {
            kind: "ConfigMap",
            name: spec.config.clone(),
            field: "spec.config".into(),
        });
    }
    let mut secrets = Vec::new();
    for (i, s) in spec.secrets.iter().enumerate() {
        match secrets_api.get_opt(&s.secret_name).await? {
            Some(secret) => secrets.push(secret),
            None => missing.push(Missing {
                kind: "Secret",
                name: s.secret_name.clone(),
                field: format!("spec.secrets[{i}]"),
            }),
        }
    }
    if secrets_api
        .get_opt(&spec.client_secret_ref.secret_name)
        .await?
        .is_none()
    {
        missing.push(Missing {
            kind: "Secret",
            name: spec.client_secret_ref.secret_name.clone(),
            field: "spec.clientSecretRef".into(),
        });
    }
    if let Some(volume) = &spec.storage_volume {
        let claim = &volume.persistent_volume_claim.claim_name;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        if claims.get_opt(claim).await?.is_none() {
            missing.push(Missing {
                kind: "PersistentVolumeClaim",
                name: claim.clone(),
                field: "spec.storageVolume.persistentVolumeClaim.claimName".into(),
            });
        }
    }
    let Some(config) = config.filter(|_| missing.is_empty()) else {
        let message = missing_message(&ns, &missing);
        warn!(%ns, %name, %message, "inputs missing");
        let outcome = Outcome {
            progress: Progress::Failed,
            reason: "MissingInput",
            message,
            server_info: dms.status.as_ref().and_then(|s| s.server_info.clone()),
            storage: None,
        };
        write_status(dms, ctx, &outcome).await?;
        return Ok(Action::requeue(ctx.backoff(dms)));
    };

    // Never silently: a filesystem store without a volume loses every snapshot.
    let storage = storage::check(dms, &config);
    if !storage.persistent {
        warn!(%ns, %name, message = %storage.message, "repository not persistent");
    }

    // 2. The objects that run the server.
    let inputs = Inputs {
        hash: resources::inputs_hash(&config, &secrets),
    };
    let tracked = dms.finalizers().iter().any(|f| f == FINALIZER);
    bindings::apply(dms, client, tracked).await?;
    let apply = PatchParams::apply(MANAGER).force();
    let deployment = deployment_for(dms, &inputs)?;
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch(&name, &apply, &Patch::Apply(&deployment))
        .await?;
    let service = service_for(dms)?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .patch(&name, &apply, &Patch::Apply(&service))
        .await?;
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    match network_policy_for(dms)? {
        Some(policy) => {
            policies
                .patch(&name, &apply, &Patch::Apply(&policy))
                .await?;
        }
        None => {
            // Only one we made: it carries our managed-by label.
            if let Some(existing) = policies.get_opt(&name).await? {
                let ours = existing.labels().get(MANAGED_BY_LABEL).map(String::as_str)
                    == Some(resources::CONTROLLER_APP)
                    && existing
                        .owner_references()
                        .iter()
                        .any(|o| Some(&o.uid) == dms.uid().as_ref());
                if ours {
                    policies.delete(&name, &DeleteParams::default()).await?;
                }
            }
        }
    }

    // 3. Readiness: a ready pod of the current template, and its server data.
    let mut outcome = observe_pods(dms, ctx, &ns, &inputs).await?;
    outcome.storage = Some(storage);
    let requeue = match outcome.progress {
        Progress::Ready => RESYNC,
        _ => WAIT_READY,
    };
    write_status(dms, ctx, &outcome).await?;
    ctx.reset_backoff(dms);
    Ok(Action::requeue(requeue))
}

fn missing_message(ns: &str, missing: &[Missing]) -> String {
    let items: Vec<String> = missing
        .iter()
        .map(|m| {
            format!(
                "{} {ns}/{} (named in {}) not found",
                m.kind, m.name, m.field
            )
        })
        .collect();
    format!(
        "{}; create it and the server starts without further action",
        items.join("; ")
    )
}

async fn observe_pods(
    dms: &DatamoverServer,
    ctx: &Context,
    ns: &str,
    inputs: &Inputs,
) -> Result<Outcome, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&resources::selector_string(dms)))
        .await?;
    let current: Vec<&Pod> = list
        .items
        .iter()
        .filter(|p| {
            p.annotations()
                .get(INPUTS_HASH_ANNOTATION)
                .map(String::as_str)
                == Some(&inputs.hash)
        })
        .collect();
    let ready: Vec<(&Pod, &str)> = current
        .iter()
        .filter(|p| pods::is_ready(p))
        .filter_map(|p| Some((*p, p.status.as_ref()?.pod_ip.as_deref()?)))
        .collect();
    let service_name = dms.name_any();
    if dms.spec.replicas == 0 {
        return Ok(Outcome {
            progress: Progress::Pending,
            reason: "ScaledToZero",
            message: "spec.replicas is 0".into(),
            server_info: None,
            storage: None,
        });
    }
    // Any pod of this server (an image change keeps the inputs hash).
    let pull_problem = pods::image_pull_problem(&list.items);
    if ready.is_empty() {
        if let Some(message) = pull_problem {
            return Ok(Outcome {
                progress: Progress::Failed,
                reason: "ImagePullFailed",
                message,
                server_info: None,
                storage: None,
            });
        }
        return Ok(Outcome {
            progress: Progress::Pending,
            reason: "PodsNotReady",
            message: format!(
                "waiting for a ready server pod: 0 of {} ready ({} of the current configuration exist)",
                dms.spec.replicas,
                current.len()
            ),
            server_info: None,
            storage: None,
        });
    }
    let mut fingerprints = Vec::with_capacity(ready.len());
    for (pod, ip) in &ready {
        match ctx.server_data.fetch(ip, HTTP_PORT).await {
            Ok(d) => fingerprints.push(d),
            Err(e) => {
                return Ok(Outcome {
                    progress: Progress::Pending,
                    reason: "ServerDataUnavailable",
                    message: format!(
                        "pod {} is ready but its server data is not: {e}",
                        pod.name_any()
                    ),
                    server_info: None,
                    storage: None,
                });
            }
        }
    }
    let data = fingerprints.first().cloned().unwrap_or_default();
    if fingerprints.iter().any(|f| *f != data) {
        return Ok(Outcome {
            progress: Progress::Failed,
            reason: "FingerprintMismatch",
            message: "the ready pods present different certificates: with more than one \
                      replica, add a kubernetes.io/tls Secret (tls.crt, tls.key) to spec.secrets"
                .into(),
            server_info: None,
            storage: None,
        });
    }
    let mut message = format!("{} of {} server pods ready", ready.len(), dms.spec.replicas);
    // A rollout to an image that cannot be pulled leaves the old pods serving.
    if let Some(problem) = pull_problem {
        message = format!("{message}; {problem}");
    }
    Ok(Outcome {
        progress: Progress::Ready,
        reason: "ServerReady",
        message,
        server_info: Some(ServerInfo {
            service_name,
            data: base64::engine::general_purpose::STANDARD.encode(data.as_bytes()),
            token_audience: None,
        }),
        storage: None,
    })
}

/// Writes the status by server-side apply, and an Event when the progress, the reason or
/// the storage condition changed.
async fn write_status(
    dms: &DatamoverServer,
    ctx: &Context,
    outcome: &Outcome,
) -> Result<(), Error> {
    let ns = dms
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let previous = dms.status.clone().unwrap_or_default();
    let previous_of = |type_: &str| previous.conditions.iter().find(|c| c.type_ == type_);
    let previous_ready = previous_of(READY_CONDITION);
    let previous_storage = previous_of(STORAGE_CONDITION);
    let condition = |type_: &str, status: bool, reason: &str, message: &str| {
        let status = if status { "True" } else { "False" };
        let last_transition_time = match previous_of(type_) {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(Utc::now()),
        };
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time,
            observed_generation: dms.meta().generation,
        }
    };
    let mut conditions = vec![condition(
        READY_CONDITION,
        outcome.progress == Progress::Ready,
        outcome.reason,
        &outcome.message,
    )];
    match &outcome.storage {
        Some(s) => conditions.push(condition(
            STORAGE_CONDITION,
            s.persistent,
            s.reason,
            &s.message,
        )),
        None => conditions.extend(previous_storage.cloned()),
    }
    let server_info = outcome.server_info.clone().map(|info| ServerInfo {
        token_audience: serviceaccounts::published_audience(dms),
        ..info
    });
    let status = DatamoverServerStatus {
        progress: Some(outcome.progress),
        server_info,
        conditions,
        observed_generation: dms.meta().generation,
    };
    let patch = json!({
        "apiVersion": DatamoverServer::api_version(&()),
        "kind": DatamoverServer::kind(&()),
        "status": status,
    });
    Api::<DatamoverServer>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &dms.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;

    let changed = previous.progress != Some(outcome.progress)
        || previous_ready.map(|c| c.reason.as_str()) != Some(outcome.reason);
    if changed {
        info!(%ns, name = %dms.name_any(), progress = outcome.progress.as_str(), reason = outcome.reason, "status changed");
        let type_ = if outcome.progress == Progress::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, dms, type_, outcome.reason, &outcome.message).await;
    }
    if let Some(s) = &outcome.storage {
        let was = previous_storage.map(|c| (c.status == "True", c.reason.as_str()));
        if was != Some((s.persistent, s.reason)) {
            if !s.persistent {
                publish(ctx, dms, EventType::Warning, s.reason, &s.message).await;
            } else if was.is_some_and(|(persistent, _)| !persistent) {
                publish(ctx, dms, EventType::Normal, s.reason, &s.message).await;
            }
        }
    }
    ctx.metrics
        .reconciliations
        .with_label_values(&[outcome.progress.as_str()])
        .inc();
    Ok(())
}

/// Publishes an Event about `dms`. One that cannot be written is logged, not worth failing
/// the reconciliation for.
async fn publish(ctx: &Context, dms: &DatamoverServer, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &dms.object_ref(&())).await {
        warn!(error = %e, "could not publish an Event");
    }
}

/// On an error: count it, log it, and retry with exponential backoff.
pub fn error_policy(dms: Arc<DatamoverServer>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .with_label_values(&[error.metric_label()])
        .inc();
    let delay = ctx.backoff(&dms);
    warn!(name = %dms.name_any(), namespace = ?dms.namespace(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// What a failed first list of DatamoverServers means, and what to do about it.
pub fn startup_error(e: &kube::Error) -> Error {
    let message = match e {
        kube::Error::Api(r) if r.code == 404 => format!(
            "the DatamoverServer CRD is not installed in this Kubernetes cluster: kubectl apply \
             -f crd/manifests/crd.yaml (or install the Helm chart charts/datamover): {e}"
        ),
        kube::Error::Api(r) if r.code == 403 => format!(
            "Kubernetes denies this controller's service account the list of DatamoverServers: \
             apply crd/manifests/rbac.yaml (or install the Helm chart charts/datamover): {e}"
        ),
        kube::Error::Api(r) if r.code == 401 => format!(
            "the Kubernetes API server refused the controller's credentials (service account \
             token or kubeconfig): {e}"
        ),
        _ => format!(
            "cannot reach the Kubernetes API server (check KUBECONFIG, or the cluster's \
             network): {e}"
        ),
    };
    Error::Startup(message)
}

/// Runs the controller until SIGTERM or SIGINT, then lets running reconciliations finish.
pub async fn run(client: Client, ctx: Arc<Context>) -> Result<(), Error> {
    let servers: Api<DatamoverServer> = Api::all(client.clone());
    // Fail early, with one clear line, when the API server is unreachable, the CRD is
    // not installed or the RBAC is missing.
    if let Err(e) = servers.list(&ListParams::default().limit(1)).await {
        return Err(startup_error(&e));
    }
    let owned = watcher::Config::default()
        .labels(&format!("{MANAGED_BY_LABEL}={}", resources::CONTROLLER_APP));
    Controller::new(servers, watcher::Config::default())
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<NetworkPolicy>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(name = %obj.name, namespace = ?obj.namespace, "reconciled"),
                Err(e) => debug!(error = %e, "controller event"),
            }
        })
        .await;
    info!("controller stopped");
    Ok(())
}
