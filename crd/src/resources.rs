//! Pure functions from a `DatamoverServer` (and what the controller read from the
//! cluster) to the objects it owns: the Deployment, the Service and the NetworkPolicy
//! (the ServiceAccount clients' objects are in [`crate::serviceaccounts`]). No I/O here,
//! so every detail of the pods is testable without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, HTTPGetAction, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec as K8sNetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::serviceaccounts::{self, SA_CLIENTS_MOUNT, SA_CLIENTS_VOLUME};
use crate::types::{ClientSelector, DatamoverServer, PodOptions};

/// Pod-template annotation holding [`inputs_hash`]: a change rolls the pods.
pub const INPUTS_HASH_ANNOTATION: &str = "dm.cr.kanister.io/inputs-hash";
/// Label naming the DatamoverServer a pod, Deployment or Service belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/name` of server pods.
pub const SERVER_APP: &str = "datamover-server";
/// `app.kubernetes.io/name` of the controller's pods (allowed through NetworkPolicies to
/// read `/server-data` on the probe port).
pub const CONTROLLER_APP: &str = "datamover-controller";
/// The probe listener of the server (`DATAMOVER_HTTP_ADDR`).
pub const HTTP_PORT: i32 = 8080;
pub const HTTP_PORT_NAME: &str = "http";
pub const CONTAINER_NAME: &str = "server";
/// The label (value `"true"`) of client pods a NetworkPolicy lets in when an
/// `allowedClients` entry has no `podSelector`. The datamover blueprints put it on their
/// pods.
pub const CLIENT_LABEL: &str = "dm.cr.kanister.io/client";
/// Group of the server pods' volumes (`fsGroup`), the image's user and group: the server
/// can write a mounted PersistentVolumeClaim.
pub const SERVER_GID: i64 = 65532;
/// Name of the `spec.storageVolume` volume.
pub const STORAGE_VOLUME: &str = "storage";
/// The label the API server puts on every namespace: its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub const CONFIG_MOUNT: &str = "/etc/config";
pub const SECRETS_MOUNT: &str = "/etc/secrets";
pub const CLIENT_CREDENTIALS_MOUNT: &str = "/etc/client_credentials";
pub const SERVER_DATA_DIR: &str = "/etc/server";
/// The server's local chunk index (a cache rebuilt from the bucket): an emptyDir, as the
/// root filesystem is read-only.
pub const INDEX_CACHE_DIR: &str = "/var/cache/datamover";

/// What the controller read from the cluster for one DatamoverServer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inputs {
    /// [`inputs_hash`] of the ConfigMap and the storage Secrets.
    pub hash: String,
}

/// Labels selecting the pods of one DatamoverServer.
pub fn selector_labels(dms: &DatamoverServer) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), SERVER_APP.to_string()),
        (INSTANCE_LABEL.to_string(), dms.name_any()),
    ])
}

/// Labels of every object the controller creates for a DatamoverServer.
pub fn labels(dms: &DatamoverServer) -> BTreeMap<String, String> {
    let mut l = selector_labels(dms);
    l.insert(MANAGED_BY_LABEL.to_string(), CONTROLLER_APP.to_string());
    l
}

/// The label selector, as a string for list calls.
pub fn selector_string(dms: &DatamoverServer) -> String {
    selector_labels(dms)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A stable SHA-256 over the ConfigMap's data and the storage Secrets' data (in the order
/// of `spec.secrets`). The client-credentials Secret is deliberately not part of it: the
/// server reloads credentials live, so a credential change must not restart it.
pub fn inputs_hash(config: &ConfigMap, secrets: &[Secret]) -> String {
    let mut h = Sha256::new();
    let mut field = |tag: &str, key: &str, value: &[u8]| {
        // Length-prefixed, so no two different inputs hash alike.
        for part in [tag.as_bytes(), key.as_bytes(), value] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    };
    field("configmap", &config.name_any(), b"");
    for (k, v) in config.data.iter().flatten() {
        field("data", k, v.as_bytes());
    }
    for (k, v) in config.binary_data.iter().flatten() {
        field("binaryData", k, &v.0);
    }
    for s in secrets {
        field("secret", &s.name_any(), b"");
        for (k, v) in s.data.iter().flatten() {
            field("data", k, &v.0);
        }
        // stringData is write-only, but a client-side object may carry it.
        for (k, v) in s.string_data.iter().flatten() {
            field("data", k, v.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

fn owner_reference(dms: &DatamoverServer) -> Result<OwnerReference, Error> {
    dms.controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))
}

pub(crate) fn child_meta(dms: &DatamoverServer) -> Result<ObjectMeta, Error> {
    Ok(ObjectMeta {
        name: Some(dms.name_any()),
        namespace: dms.namespace(),
        labels: Some(labels(dms)),
        owner_references: Some(vec![owner_reference(dms)?]),
        ..ObjectMeta::default()
    })
}

/// `PROTOCOLS` as the server reads it: `name:port` items joined by `,`.
pub fn protocols_env(dms: &DatamoverServer) -> String {
    dms.spec
        .protocols
        .iter()
        .map(|p| format!("{}:{}", p.name, p.port))
        .collect::<Vec<_>>()
        .join(",")
}

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(HTTP_PORT_NAME.to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Volume name of the `index`th storage secret (secret names may be longer than a volume
/// name may be).
fn secret_volume(index: usize) -> String {
    format!("secret-{index}")
}

/// The Deployment running the server pods.
pub fn deployment_for(dms: &DatamoverServer, inputs: &Inputs) -> Result<Deployment, Error> {
    let spec = &dms.spec;
    let name = dms.name_any();
    let namespace = dms
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let options = spec.pod_options.clone().unwrap_or_default();

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: spec.config.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            // The whole Secret, never a subPath: kubelet then swaps `..data` on a change
            // and the server picks up new credentials live.
            name: "client-credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(spec.client_secret_ref.secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "server-data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: "index-cache".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            // Whole, like the credentials: the server reloads it live. Its content is
            // not in the inputs hash, so a change of spec.serviceAccountClients rolls
            // nothing.
            name: SA_CLIENTS_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: serviceaccounts::config_map_name(dms),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "client-credentials".into(),
            mount_path: CLIENT_CREDENTIALS_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "server-data".into(),
            mount_path: SERVER_DATA_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "index-cache".into(),
            mount_path: INDEX_CACHE_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: SA_CLIENTS_VOLUME.into(),
            mount_path: SA_CLIENTS_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    if let Some(storage) = &spec.storage_volume {
        volumes.push(Volume {
            name: STORAGE_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: storage.persistent_volume_claim.claim_name.clone(),
                read_only: None,
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: STORAGE_VOLUME.into(),
            mount_path: storage.mount_path.clone(),
            sub_path: storage.sub_path.clone(),
            ..VolumeMount::default()
        });
    }
    for (i, s) in spec.secrets.iter().enumerate() {
        volumes.push(Volume {
            name: secret_volume(i),
            secret: Some(SecretVolumeSource {
                secret_name: Some(s.secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: secret_volume(i),
            mount_path: format!("{SECRETS_MOUNT}/{}", s.secret_name),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    let service_names = [
        name.clone(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ]
    .join(",");
    let mut env = vec![
        EnvVar {
            name: "PROTOCOLS".into(),
            value: Some(protocols_env(dms)),
            ..EnvVar::default()
        },
        EnvVar {
            name: "DATAMOVER_HTTP_ADDR".into(),
            value: Some(format!("0.0.0.0:{HTTP_PORT}")),
            ..EnvVar::default()
        },
        EnvVar {
            name: "DATAMOVER_TLS_NAMES".into(),
            value: Some(service_names),
            ..EnvVar::default()
        },
    ];
    env.extend(spec.limits.as_ref().map(|l| l.env()).unwrap_or_default());
    // The controller's variables come first; the user's may not replace them.
    let extra: Vec<EnvVar> = spec
        .env
        .iter()
        .filter(|e| !env.iter().any(|o| o.name == e.name))
        .cloned()
        .collect();
    env.extend(extra);

    let mut ports: Vec<ContainerPort> = spec
        .protocols
        .iter()
        .map(|p| ContainerPort {
            name: Some(p.name.clone()),
            container_port: p.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some(HTTP_PORT_NAME.into()),
        container_port: HTTP_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });

    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(spec.image.clone()),
        env: Some(env),
        ports: Some(ports),
        volume_mounts: Some(mounts),
        startup_probe: Some(
            spec.startup_probe
                .clone()
                .unwrap_or_else(|| http_probe("/healthz", 2, 60)),
        ),
        readiness_probe: Some(
            spec.readiness_probe
                .clone()
                .unwrap_or_else(|| http_probe("/readyz", 5, 3)),
        ),
        liveness_probe: Some(
            spec.liveness_probe
                .clone()
                .unwrap_or_else(|| http_probe("/healthz", 10, 3)),
        ),
        resources: options.resources.clone(),
        security_context: Some(options.container_security_context.clone().unwrap_or(
            SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            },
        )),
        ..Container::default()
    };

    let mut pod_labels = options.labels.clone();
    pod_labels.extend(labels(dms));
    let mut annotations = options.annotations.clone();
    annotations.insert(INPUTS_HASH_ANNOTATION.to_string(), inputs.hash.clone());

    let non_empty = |m: BTreeMap<String, String>| (!m.is_empty()).then_some(m);
    Ok(Deployment {
        metadata: child_meta(dms)?,
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(dms)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    // The server talks to the Kubernetes API (TokenReview) only for
                    // ServiceAccount clients; otherwise it gets no token.
                    automount_service_account_token: Some(serviceaccounts::enabled(dms)),
                    service_account_name: serviceaccounts::pod_service_account(dms),
                    node_selector: non_empty(options.node_selector.clone()),
                    tolerations: non_empty_vec(options.tolerations.clone()),
                    affinity: options.affinity.clone(),
                    security_context: Some(pod_security_context(&options)),
                    image_pull_secrets: non_empty_vec(options.image_pull_secrets.clone()),
                    // In-flight calls get 20 s after SIGTERM.
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// The pod security context: the user's, with `fsGroup` 65532 (and `fsGroupChangePolicy`
/// `OnRootMismatch`, so a large volume is not walked at every start) unless it sets its
/// own, so the server's user can write its storage volume.
fn pod_security_context(options: &PodOptions) -> PodSecurityContext {
    let mut ctx = options.security_context.clone().unwrap_or_default();
    if ctx.fs_group.is_none() {
        ctx.fs_group = Some(SERVER_GID);
        if ctx.fs_group_change_policy.is_none() {
            ctx.fs_group_change_policy = Some("OnRootMismatch".into());
        }
    }
    ctx
}

/// The Service clients connect to: one port per protocol.
pub fn service_for(dms: &DatamoverServer) -> Result<Service, Error> {
    Ok(Service {
        metadata: child_meta(dms)?,
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(dms)),
            ports: Some(
                dms.spec
                    .protocols
                    .iter()
                    .map(|p| ServicePort {
                        name: Some(p.name.clone()),
                        port: p.port,
                        target_port: Some(IntOrString::String(p.name.clone())),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The NetworkPolicy, when `spec.networkPolicy.enabled`: the allowed clients reach the
/// protocol ports, the controller reaches the probe port (to read `/server-data`), and
/// nothing else gets in.
pub fn network_policy_for(dms: &DatamoverServer) -> Result<Option<NetworkPolicy>, Error> {
    let Some(np) = dms.spec.network_policy.as_ref().filter(|np| np.enabled) else {
        return Ok(None);
    };
    let protocol_ports = dms
        .spec
        .protocols
        .iter()
        .map(|p| NetworkPolicyPort {
            port: Some(IntOrString::Int(p.port)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        })
        .collect();
    let clients: Vec<NetworkPolicyPeer> = np.allowed_clients.iter().map(client_peer).collect();
    let mut ingress = Vec::new();
    if !clients.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(clients),
            ports: Some(protocol_ports),
        });
    }
    ingress.push(NetworkPolicyIngressRule {
        from: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    NAME_LABEL.to_string(),
                    CONTROLLER_APP.to_string(),
                )])),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        }]),
        ports: Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(HTTP_PORT)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        }]),
    });
    Ok(Some(NetworkPolicy {
        metadata: child_meta(dms)?,
        spec: Some(K8sNetworkPolicySpec {
            pod_selector: LabelSelector {
                match_labels: Some(selector_labels(dms)),
                ..LabelSelector::default()
            },
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..K8sNetworkPolicySpec::default()
        }),
    }))
}

/// One `allowedClients` entry as a NetworkPolicy peer: its pod selector (default: the
/// [`CLIENT_LABEL`]), and its namespaces by name (a `kubernetes.io/metadata.name In`
/// requirement) and by label, both in one namespace selector. No namespaces at all: the
/// peer is in the server's own namespace.
pub fn client_peer(c: &ClientSelector) -> NetworkPolicyPeer {
    let pod_selector = c.pod_selector.clone().unwrap_or_else(|| LabelSelector {
        match_labels: Some(BTreeMap::from([(
            CLIENT_LABEL.to_string(),
            "true".to_string(),
        )])),
        ..LabelSelector::default()
    });
    let namespace_selector = if c.namespaces.is_empty() {
        c.namespace_selector.clone()
    } else {
        let mut selector = c.namespace_selector.clone().unwrap_or_default();
        let mut names = c.namespaces.clone();
        names.sort();
        names.dedup();
        selector
            .match_expressions
            .get_or_insert_with(Vec::new)
            .push(LabelSelectorRequirement {
                key: NAMESPACE_NAME_LABEL.into(),
                operator: "In".into(),
                values: Some(names),
            });
        Some(selector)
    };
    NetworkPolicyPeer {
        pod_selector: Some(pod_selector),
        namespace_selector,
        ..NetworkPolicyPeer::default()
    }
}

fn non_empty_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}
