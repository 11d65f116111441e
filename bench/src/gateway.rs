//! Data set (g): the S3 gateway. `rclone copy` of a mixed data set like (a) into a
//! bucket and back, 16 transfers at a time, once through our server's S3 gateway (with
//! a client's derived key, over TLS) and once straight to the same Garage. The gateway's
//! rows add the server's CPU and peak memory.

use std::path::Path;
use std::process::{Command, Stdio};

use datamover_tests::Storage;
use datamover_tests::gateway::{self, S3Gateway};

use crate::{Bench, Res, Scenario, Tool, simple, with_server};

/// rclone's parallel transfers in both rows (the "16 parallel uploads").
const TRANSFERS: &str = "16";

pub(crate) fn gateway_scenarios(b: &mut Bench, src: &Path, rep: usize) -> Res<()> {
    let ds = "gateway";
    let prefix = format!("gateway-dm-{rep}");
    let gw = S3Gateway::start(
        Storage::S3 {
            garage: &b.garage,
            bucket: &b.garage.bucket,
            prefix: &prefix,
        },
        &[("bench", "bench-token")],
        &[],
    );
    let secret = gateway::secret(&gw.server, "bench", "bench-token")?;
    let ca = b.work.join(format!("gateway-ca-{rep}.pem"));
    std::fs::write(&ca, &gw.ca_pem).map_err(|e| format!("{}: {e}", ca.display()))?;
    let src_s = src.to_str().ok_or("path")?;
    let direct = format!("garage:{}/gateway-rclone-{rep}", b.garage.bucket);
    let through = "gw:bench/data";
    let rclone = |b: &Bench, gw_side: bool, args: &[&str]| -> Command {
        let mut c = b.rclone(args);
        c.args(["--transfers", TRANSFERS, "--checkers", TRANSFERS])
            .stderr(Stdio::null());
        if gw_side {
            c.env("RCLONE_CONFIG_GW_TYPE", "s3")
                .env("RCLONE_CONFIG_GW_PROVIDER", "Other")
                .env("RCLONE_CONFIG_GW_ACCESS_KEY_ID", "bench")
                .env("RCLONE_CONFIG_GW_SECRET_ACCESS_KEY", &secret)
                .env("RCLONE_CONFIG_GW_ENDPOINT", gw.endpoint())
                .env("RCLONE_CONFIG_GW_FORCE_PATH_STYLE", "true")
                .arg("--ca-cert")
                .arg(&ca);
        }
        c
    };
    let order = b.order(
        rep,
        &[Tool::Restic, Tool::Rustic, Tool::KopiaServer, Tool::Kopia],
    );
    for sc in [Scenario::GatewayUpload, Scenario::GatewayDownload] {
        for &tool in &order {
            let out = b.work.join(format!("gateway-out-{}", tool.name()));
            let out_s = out.to_str().ok_or("path")?.to_string();
            b.discard(&out);
            let (gw_side, from, to) = match (tool, sc) {
                (Tool::Datamover, Scenario::GatewayUpload) => (true, src_s, through),
                (Tool::Datamover, _) => (true, through, out_s.as_str()),
                (_, Scenario::GatewayUpload) => (false, src_s, direct.as_str()),
                (_, _) => (false, direct.as_str(), out_s.as_str()),
            };
            let cmd = rclone(b, gw_side, &["copy", from, to]);
            let s = if gw_side {
                let what = "rclone copy through the S3 gateway";
                with_server(b, &prefix, gw.server.pid(), cmd, what)?
            } else {
                simple(b, &format!("gateway-rclone-{rep}"), cmd, "rclone copy")?
            };
            b.discard(&out);
            b.record(ds, sc, tool, s);
        }
    }
    Ok(())
}
