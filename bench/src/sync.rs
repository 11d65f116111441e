//! Data set "sync": edge sync against `rclone copy`, on the mixed data set.
//!
//! Scenarios: the first sync of a directory to the bucket, an unchanged pass, and the
//! download into an empty directory. Our sync keeps its state outside the synced
//! directory (`--state-dir`), so both tools see the same files.

use std::path::Path;
use std::process::Stdio;

use super::{Bench, Ours, Res, Scenario, Tool, simple};

pub(crate) fn sync_scenarios(b: &mut Bench, src: &Path, rep: usize) -> Res<()> {
    let ds = "sync";
    let order = b.order(rep, &[Tool::Restic]);
    let ours = Ours::start(b, format!("sync-dm-{rep}"));
    let rclone_prefix = format!("sync-rclone-{rep}");
    let remote = format!("garage:{}/{rclone_prefix}", b.garage.bucket);
    let src_s = src.to_str().ok_or("path")?.to_string();
    let state = b.work.join(format!("sync-state-{rep}"));
    let state_s = state.to_str().ok_or("path")?.to_string();
    for sc in [
        Scenario::SyncFirst,
        Scenario::SyncUnchanged,
        Scenario::SyncDownload,
    ] {
        for &tool in &order {
            let out = b.work.join(format!("sync-out-{}", tool.name()));
            let out_s = out.to_str().ok_or("path")?.to_string();
            b.discard(&out);
            let s = match (tool, sc) {
                (Tool::Datamover, Scenario::SyncDownload) => ours.run(
                    b,
                    &[
                        "sync_ingress",
                        "data",
                        &out_s,
                        "--once",
                        "--state-dir",
                        &state_s,
                    ],
                    Stdio::null(),
                )?,
                (Tool::Datamover, _) => ours.run(
                    b,
                    &[
                        "sync_egress",
                        &src_s,
                        "data",
                        "--once",
                        "--state-dir",
                        &state_s,
                    ],
                    Stdio::null(),
                )?,
                (Tool::Rclone, Scenario::SyncDownload) => {
                    let mut c = b.rclone(&["copy", &remote, &out_s]);
                    c.stderr(Stdio::null());
                    simple(b, &rclone_prefix, c, "rclone copy back")?
                }
                (Tool::Rclone, _) => {
                    let mut c = b.rclone(&["copy", &src_s, &remote]);
                    c.stderr(Stdio::null());
                    simple(b, &rclone_prefix, c, "rclone copy")?
                }
                _ => continue,
            };
            b.discard(&out);
            b.record(ds, sc, tool, s);
        }
    }
    Ok(())
}
