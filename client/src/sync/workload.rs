//! The data paths of a Flotta `EdgeWorkload`:
//!
//! ```yaml
//! apiVersion: management.project-flotta.io/v1alpha1
//! kind: EdgeWorkload
//! metadata: {name: sensors}
//! spec:
//!   data:
//!     egress:                 # device → bucket
//!       - source: readings    # relative to /export on the device
//!         target: sensors/readings
//!     ingress:                # bucket → device
//!       - source: models
//!         target: models      # relative to /export on the device
//! ```
//!
//! Local paths are relative to the export directory (`/export`, or `--export-root`) and
//! may not leave it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Direction, SyncOptions};
use crate::ClientError;

#[derive(Debug, Deserialize)]
struct Workload {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    spec: Option<Spec>,
}

#[derive(Debug, Deserialize)]
struct Spec {
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Debug, Deserialize)]
struct Data {
    #[serde(default)]
    egress: Vec<Mapping>,
    #[serde(default)]
    ingress: Vec<Mapping>,
}

#[derive(Debug, Deserialize)]
struct Mapping {
    source: String,
    target: String,
}

fn local_path(export_root: &Path, rel: &str, file: &Path) -> Result<PathBuf, ClientError> {
    let trimmed = rel.trim_start_matches("/export/").trim_matches('/');
    if trimmed.is_empty() {
        return Ok(export_root.to_path_buf());
    }
    let safe = datamover_core::paths::safe_relative(trimmed.as_bytes()).map_err(|e| {
        ClientError::Usage(format!(
            "{}: the device path '{rel}' must stay inside the export directory ({})",
            file.display(),
            e.why
        ))
    })?;
    Ok(export_root.join(safe))
}

/// Reads the mappings of an `EdgeWorkload` file; `template` carries the options shared
/// by all of them.
pub fn load(
    file: &Path,
    export_root: &Path,
    template: &SyncOptions,
) -> Result<Vec<SyncOptions>, ClientError> {
    let text = std::fs::read_to_string(file).map_err(|e| ClientError::io(file.display(), e))?;
    let w: Workload = serde_yaml::from_str(&text).map_err(|e| {
        ClientError::Usage(format!(
            "{} is not an EdgeWorkload: {e}; it needs spec.data.egress and/or spec.data.ingress lists of source/target",
            file.display()
        ))
    })?;
    if let Some(kind) = &w.kind
        && kind != "EdgeWorkload"
    {
        tracing::warn!(kind = %kind, "reading spec.data of a resource that is not an EdgeWorkload");
    }
    let data = w.spec.and_then(|s| s.data).ok_or_else(|| {
        ClientError::Usage(format!(
            "{} has no spec.data: add spec.data.egress or spec.data.ingress mappings",
            file.display()
        ))
    })?;
    let mut jobs = Vec::new();
    for m in &data.egress {
        let mut o = template.clone();
        o.direction = Direction::Egress;
        o.local = local_path(export_root, &m.source, file)?;
        o.target = m.target.clone();
        jobs.push(o);
    }
    for m in &data.ingress {
        let mut o = template.clone();
        o.direction = Direction::Ingress;
        o.local = local_path(export_root, &m.target, file)?;
        o.target = m.source.clone();
        jobs.push(o);
    }
    if jobs.is_empty() {
        return Err(ClientError::Usage(format!(
            "{} lists no data paths: add spec.data.egress or spec.data.ingress mappings",
            file.display()
        )));
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flotta_data_paths() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("w.yaml");
        std::fs::write(
            &f,
            "apiVersion: management.project-flotta.io/v1alpha1\nkind: EdgeWorkload\nmetadata:\n  name: w\nspec:\n  type: pod\n  data:\n    egress:\n      - source: readings\n        target: sensors/readings\n    ingress:\n      - source: models\n        target: /export/models\n  pod:\n    spec: {}\n",
        )
        .unwrap();
        let t = SyncOptions::new(Direction::Egress, PathBuf::new(), String::new());
        let jobs = load(&f, Path::new("/export"), &t).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].direction, Direction::Egress);
        assert_eq!(jobs[0].local, Path::new("/export/readings"));
        assert_eq!(jobs[0].target, "sensors/readings");
        assert_eq!(jobs[1].direction, Direction::Ingress);
        assert_eq!(jobs[1].local, Path::new("/export/models"));
        assert_eq!(jobs[1].target, "models");
    }

    #[test]
    fn refuses_paths_outside_export() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("w.yaml");
        std::fs::write(
            &f,
            "kind: EdgeWorkload\nspec:\n  data:\n    ingress:\n      - source: x\n        target: ../../etc\n",
        )
        .unwrap();
        let t = SyncOptions::new(Direction::Egress, PathBuf::new(), String::new());
        assert!(load(&f, Path::new("/export"), &t).is_err());
    }
}
