//! Prints the generated manifests (the CRD, the controller's RBAC and Deployment), or
//! writes them into a directory with `--write <dir>`, together with the generated files of
//! the Helm chart (its CRD and its ClusterRole template) under `--chart <dir>` (default:
//! `<dir>/../../charts/datamover`, i.e. `charts/datamover` for `--write crd/manifests`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: crdgen [--write <manifests dir> [--chart <chart dir>]]";

fn write_all(dir: &Path, files: &[(&str, String)]) -> Result<(), String> {
    for (name, content) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, content).map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rendered = datamover_crd::manifests::render()
        .and_then(|m| Ok((m, datamover_crd::manifests::render_chart()?)));
    let (files, chart_files) = match rendered {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (dir, chart) = match args.as_slice() {
        [] => {
            for (_, content) in &files {
                print!("{content}");
            }
            return ExitCode::SUCCESS;
        }
        [flag, dir] if flag == "--write" => {
            let dir = PathBuf::from(dir);
            let chart = dir.join("../..").join(datamover_crd::manifests::CHART_DIR);
            (dir, chart)
        }
        [flag, dir, chart_flag, chart] if flag == "--write" && chart_flag == "--chart" => {
            (PathBuf::from(dir), PathBuf::from(chart))
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !chart.join("Chart.yaml").is_file() {
        eprintln!(
            "crdgen: no Helm chart at {} (no Chart.yaml): pass --chart <chart dir>",
            chart.display()
        );
        return ExitCode::from(2);
    }
    match write_all(&dir, &files).and_then(|()| write_all(&chart, &chart_files)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}
