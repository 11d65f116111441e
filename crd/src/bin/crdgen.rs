//! Prints the generated manifests (the CRD, the controller's RBAC and Deployment), or
//! writes them into a directory with `--write <dir>`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let files = match datamover_crd::manifests::render() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.as_slice() {
        [] => {
            for (_, content) in &files {
                print!("{content}");
            }
        }
        [flag, dir] if flag == "--write" => {
            let dir = PathBuf::from(dir);
            for (name, content) in &files {
                let path = dir.join(name);
                if let Err(e) = std::fs::write(&path, content) {
                    eprintln!("crdgen: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("wrote {}", path.display());
            }
        }
        _ => {
            eprintln!("usage: crdgen [--write <dir>]");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
