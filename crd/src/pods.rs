//! What the server pods' status says: ready or not, and why not when the reason is one
//! the user must fix (an image that cannot be pulled).

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

/// Waiting reasons of a container whose image the kubelet cannot get.
pub const IMAGE_PULL_REASONS: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
];

/// A ready pod that is not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The first container (init containers included) of `pods` waiting for an image the
/// kubelet cannot pull, as `image cannot be pulled: <image>: <reason>: <message> (pod
/// <name>)`.
pub fn image_pull_problem<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Option<String> {
    pods.into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .find_map(|pod| {
            let status = pod.status.as_ref()?;
            let containers = status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten());
            containers.filter_map(|c| pull_failure(pod, c)).next()
        })
}

fn pull_failure(pod: &Pod, c: &ContainerStatus) -> Option<String> {
    let waiting = c.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    if !IMAGE_PULL_REASONS.contains(&reason) {
        return None;
    }
    // The status names the image being pulled; the spec is the fallback.
    let image = Some(c.image.as_str())
        .filter(|i| !i.is_empty())
        .map(str::to_string)
        .or_else(|| {
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .chain(pod.spec.as_ref()?.init_containers.iter().flatten())
                .find(|s| s.name == c.name)?
                .image
                .clone()
        })
        .unwrap_or_else(|| "(unknown image)".into());
    let detail = match waiting.message.as_deref().map(str::trim) {
        Some(m) if !m.is_empty() => format!("{reason}: {m}"),
        _ => reason.to_string(),
    };
    Some(format!(
        "image cannot be pulled: {image}: {detail} (pod {}); check spec.image, that the \
         cluster's nodes can reach its registry (or that it is loaded into them), and \
         spec.podOptions.imagePullSecrets for a private registry",
        pod.name_any()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn waiting(reason: &str, message: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("dms-1".into()),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "server".into(),
                    image: "datamover/datamover-server:9.9".into(),
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some(reason.into()),
                            message: message.map(str::to_string),
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn names_the_image_and_the_kubelets_reason() {
        let pods = [
            waiting("ContainerCreating", None),
            waiting("ErrImagePull", Some("manifest unknown")),
        ];
        let p = image_pull_problem(&pods).expect("a pull problem");
        assert!(
            p.starts_with(
                "image cannot be pulled: datamover/datamover-server:9.9: ErrImagePull: manifest unknown (pod dms-1)"
            ),
            "{p}"
        );
        for reason in IMAGE_PULL_REASONS {
            assert!(image_pull_problem(&[waiting(reason, None)]).is_some());
        }
        assert!(image_pull_problem(&[waiting("CrashLoopBackOff", None)]).is_none());
        assert!(image_pull_problem(&[]).is_none());
    }
}
