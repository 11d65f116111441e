//! Applies what [`crate::serviceaccounts`] builds: the ServiceAccount clients' ConfigMap,
//! the server's ServiceAccount, and the RBAC bindings, and removes bindings that are no
//! longer wanted (found by their labels, since they cannot carry an owner reference).

use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::Error;
use crate::controller::MANAGER;
use crate::serviceaccounts::{self, Bindings, FINALIZER};
use crate::types::DatamoverServer;

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// The ConfigMap (always: the server mounts it) and, with ServiceAccount clients, the
/// server's ServiceAccount and its bindings; stale bindings are deleted. `tracked`: the
/// DatamoverServer carries [`FINALIZER`], so bindings of an earlier spec may exist.
/// Without clients and once nothing is left to remove, the finalizer is dropped, so a
/// server that does not use ServiceAccount tokens is deleted without the controller.
pub async fn apply(dms: &DatamoverServer, client: &Client, tracked: bool) -> Result<(), Error> {
    let ns = dms
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let config_map = serviceaccounts::config_map_for(dms)?;
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(
            &config_map.name_any(),
            &apply_params(),
            &Patch::Apply(&config_map),
        )
        .await?;
    if let Some(account) = serviceaccounts::service_account_for(dms)? {
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .patch(
                &account.name_any(),
                &apply_params(),
                &Patch::Apply(&account),
            )
            .await?;
    }
    if !serviceaccounts::enabled(dms) && !tracked {
        return Ok(());
    }
    let wanted = serviceaccounts::bindings_for(dms)?;
    for binding in &wanted.cluster {
        Api::<ClusterRoleBinding>::all(client.clone())
            .patch(&binding.name_any(), &apply_params(), &Patch::Apply(binding))
            .await?;
    }
    for binding in &wanted.namespaced {
        let target = binding.namespace().unwrap_or_default();
        let applied = Api::<RoleBinding>::namespaced(client.clone(), &target)
            .patch(&binding.name_any(), &apply_params(), &Patch::Apply(binding))
            .await;
        match applied {
            Ok(_) => {}
            // A namespace that does not exist (yet): its ServiceAccounts cannot connect
            // either; the next resync binds it once it does.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                warn!(namespace = %target, server = %dms.name_any(), "namespace of a serviceAccountClients entry not found; its RoleBinding is made once it exists");
            }
            Err(e) => return Err(e.into()),
        }
    }
    prune(dms, client, &wanted).await?;
    if !serviceaccounts::enabled(dms) && tracked {
        drop_finalizer(dms, client).await?;
    }
    Ok(())
}

/// Deletes the bindings of `dms` that `wanted` does not hold.
pub async fn prune(dms: &DatamoverServer, client: &Client, wanted: &Bindings) -> Result<(), Error> {
    let selector = serviceaccounts::binding_selector(dms)?;
    let list = ListParams::default().labels(&selector);
    let cluster_api = Api::<ClusterRoleBinding>::all(client.clone());
    let keep = wanted.cluster_names();
    for existing in cluster_api.list(&list).await?.items {
        let name = existing.name_any();
        if !keep.contains(&name) {
            info!(binding = %name, server = %dms.name_any(), "deleting a ClusterRoleBinding no longer needed");
            delete_ignoring_gone(cluster_api.delete(&name, &DeleteParams::default()).await)?;
        }
    }
    let keep = wanted.namespaced_keys();
    for existing in Api::<RoleBinding>::all(client.clone())
        .list(&list)
        .await?
        .items
    {
        let key = (
            existing.namespace().unwrap_or_default(),
            existing.name_any(),
        );
        if !keep.contains(&key) {
            info!(namespace = %key.0, binding = %key.1, server = %dms.name_any(), "deleting a RoleBinding no longer needed");
            delete_ignoring_gone(
                Api::<RoleBinding>::namespaced(client.clone(), &key.0)
                    .delete(&key.1, &DeleteParams::default())
                    .await,
            )?;
        }
    }
    Ok(())
}

fn delete_ignoring_gone<T>(result: Result<T, kube::Error>) -> Result<(), Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes [`FINALIZER`] (a merge patch conditional on the resourceVersion, so a
/// concurrent change of the finalizers is never overwritten).
async fn drop_finalizer(dms: &DatamoverServer, client: &Client) -> Result<(), Error> {
    let ns = dms
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let remaining: Vec<&String> = dms
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = json!({
        "metadata": {
            "finalizers": remaining,
            "resourceVersion": dms.resource_version(),
        }
    });
    Api::<DatamoverServer>::namespaced(client.clone(), &ns)
        .patch(
            &dms.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    info!(%ns, name = %dms.name_any(), "no ServiceAccount clients left: finalizer removed");
    Ok(())
}
