//! The server's per-client limits (`spec.limits`), passed to the server pods as the
//! `DATAMOVER_…` variables the server reads (over its ConfigMap's keys of the same
//! limits). A limit left out keeps the server's default.

use k8s_openapi::api::core::v1::EnvVar;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Limits against abuse, per client: a client over one is answered RESOURCE_EXHAUSTED
/// (the S3 gateway: SlowDown) and counted in the server's
/// `datamover_limit_refusals_total{limit}`; other clients are not affected.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Calls per second of one client (gRPC calls and S3 gateway requests). Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub client_rate: Option<u32>,
    /// Calls a client may make at once above its rate. Default twice the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub client_burst: Option<u32>,
    /// Backup sessions one client may have open. Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_sessions_per_client: Option<u32>,
    /// Chunks in one PutChunks message. Default 262144.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_chunks_per_put: Option<u32>,
    /// Chunks of one snapshot's catalog. Default 1048576.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_catalog_chunks: Option<u32>,
    /// Bytes of a restore's path and of each of its patterns. Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_path_bytes: Option<u32>,
}

impl LimitsSpec {
    /// The server's variables for the limits given.
    pub fn env(&self) -> Vec<EnvVar> {
        [
            ("DATAMOVER_CLIENT_RATE", self.client_rate),
            ("DATAMOVER_CLIENT_BURST", self.client_burst),
            (
                "DATAMOVER_MAX_SESSIONS_PER_CLIENT",
                self.max_sessions_per_client,
            ),
            ("DATAMOVER_MAX_CHUNKS_PER_PUT", self.max_chunks_per_put),
            ("DATAMOVER_MAX_CATALOG_CHUNKS", self.max_catalog_chunks),
            ("DATAMOVER_MAX_PATH_BYTES", self.max_path_bytes),
        ]
        .into_iter()
        .filter_map(|(name, value)| {
            value.map(|v| EnvVar {
                name: name.into(),
                value: Some(v.to_string()),
                ..EnvVar::default()
            })
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Inputs, deployment_for};
    use crate::types::DatamoverServer;

    fn server(limits: serde_json::Value, env: serde_json::Value) -> DatamoverServer {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "dm.cr.kanister.io/v1alpha1",
            "kind": "DatamoverServer",
            "metadata": {"name": "dms", "namespace": "ns", "uid": "u1"},
            "spec": {
                "image": "datamover/datamover-server:0.1.0",
                "config": "cfg",
                "clientSecretRef": {"secretName": "clients"},
                "secrets": [{"secretName": "repo"}],
                "env": env,
                "limits": limits,
            }
        }))
        .expect("a valid DatamoverServer")
    }

    fn server_env(dms: &DatamoverServer) -> Vec<(String, Option<String>)> {
        let d = deployment_for(dms, &Inputs { hash: "h".into() }).expect("deployment");
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod spec");
        pod.containers[0]
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value))
            .collect()
    }

    #[test]
    fn the_limits_reach_the_server_container() {
        let dms = server(
            serde_json::json!({"clientRate": 50, "maxChunksPerPut": 1000, "maxPathBytes": 512}),
            // The spec's limit wins over a variable of the same name in `env`.
            serde_json::json!([{"name": "DATAMOVER_CLIENT_RATE", "value": "7"}]),
        );
        let env = server_env(&dms);
        let get = |n: &str| -> Vec<Option<String>> {
            env.iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .collect()
        };
        assert_eq!(get("DATAMOVER_CLIENT_RATE"), [Some("50".to_string())]);
        assert_eq!(
            get("DATAMOVER_MAX_CHUNKS_PER_PUT"),
            [Some("1000".to_string())]
        );
        assert_eq!(get("DATAMOVER_MAX_PATH_BYTES"), [Some("512".to_string())]);
        assert!(get("DATAMOVER_CLIENT_BURST").is_empty(), "{env:?}");
        assert!(get("DATAMOVER_MAX_SESSIONS_PER_CLIENT").is_empty());
    }

    #[test]
    fn without_limits_the_server_keeps_its_defaults() {
        let dms = server(serde_json::json!(null), serde_json::json!([]));
        assert_eq!(dms.spec.limits, None);
        let env = server_env(&dms);
        assert!(
            !env.iter()
                .any(|(k, _)| k.starts_with("DATAMOVER_CLIENT_") || k.starts_with("DATAMOVER_MAX_")),
            "{env:?}"
        );
    }

    #[test]
    fn every_limit_has_its_variable() {
        let all = LimitsSpec {
            client_rate: Some(1),
            client_burst: Some(2),
            max_sessions_per_client: Some(3),
            max_chunks_per_put: Some(4),
            max_catalog_chunks: Some(5),
            max_path_bytes: Some(6),
        };
        let env = all.env();
        assert_eq!(env.len(), 6);
        let values: Vec<_> = env.iter().filter_map(|e| e.value.clone()).collect();
        assert_eq!(values, ["1", "2", "3", "4", "5", "6"]);
    }
}
