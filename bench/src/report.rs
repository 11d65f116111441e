//! The report: one Markdown table per data set, medians and ratios (ours / theirs).

use crate::{Bench, Sample, Scenario, Tool, median};

pub(crate) fn report(b: &Bench, meta: &str) -> String {
    let mut out = String::new();
    out.push_str(meta);
    let datasets: Vec<String> = {
        let mut v: Vec<String> = b.results.keys().map(|k| k.0.clone()).collect();
        v.dedup();
        v
    };
    for ds in datasets {
        out.push_str(&format!("\n### Data set: {ds}\n\n"));
        out.push_str("| scenario | tool | wall s | CPU s (client + server) | Garage CPU s | peak RSS MiB (client / server) | uploaded MiB | wall ratio ours/theirs |\n");
        out.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        let scenarios: Vec<Scenario> = {
            let mut v: Vec<Scenario> = b
                .results
                .keys()
                .filter(|k| k.0 == ds)
                .map(|k| k.1)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        for sc in scenarios {
            let med = |tool: Tool, f: fn(&Sample) -> f64| {
                b.results
                    .get(&(ds.clone(), sc, tool))
                    .map(|v| median(v.iter().map(f).collect()))
            };
            let ours_wall = med(Tool::Datamover, |s| s.wall);
            for tool in Tool::ALL {
                let Some(wall) = med(tool, |s| s.wall) else {
                    continue;
                };
                let cpu = med(tool, |s| s.cpu).unwrap_or(0.0);
                let rss = med(tool, |s| s.rss_mib).unwrap_or(0.0);
                let up = med(tool, |s| s.uploaded_mib).unwrap_or(0.0);
                let store = med(tool, |s| s.store_cpu).unwrap_or(0.0);
                let n = b.results.get(&(ds.clone(), sc, tool)).map_or(0, Vec::len);
                let ratio = match tool {
                    Tool::Datamover => String::new(),
                    _ => ours_wall.map_or(String::new(), |o| format!("{:.2}", o / wall)),
                };
                let (cpu_s, rss_s) = if tool.has_server() {
                    let scpu = med(tool, |s| s.server_cpu).unwrap_or(0.0);
                    let srss = med(tool, |s| s.server_rss_mib).unwrap_or(0.0);
                    (
                        format!("{cpu:.2} + {scpu:.2}"),
                        format!("{rss:.0} / {srss:.0}"),
                    )
                } else {
                    (format!("{cpu:.2}"), format!("{rss:.0}"))
                };
                out.push_str(&format!(
                    "| {} | {} (n={n}) | {wall:.2} | {cpu_s} | {store:.2} | {rss_s} | {up:.1} | {ratio} |\n",
                    sc.name(),
                    tool.name()
                ));
            }
        }
        if let Some((mib, secs)) = b.floors.get(&ds) {
            out.push_str(&format!(
                "\nFloor: uploading datamover's {mib:.0} MiB of compressed, encrypted packs to the same Garage with `rclone copy --transfers 8` alone takes {secs:.2} s.\n"
            ));
        }
        let checks: Vec<String> = Tool::ALL
            .into_iter()
            .filter_map(|tool| {
                let v = b.verified.get(&(ds.clone(), tool))?;
                let bad: Vec<&String> = v.iter().filter_map(|r| r.as_ref().err()).collect();
                Some(match (bad.first(), v.first()) {
                    (Some(e), _) => format!(
                        "{} ✗ ({} of {} differ: {e})",
                        tool.name(),
                        bad.len(),
                        v.len()
                    ),
                    (None, Some(Ok(n))) if *n > 1 => format!("{} ✓ ({n} entries)", tool.name()),
                    (None, _) => format!("{} ✓", tool.name()),
                })
            })
            .collect();
        if !checks.is_empty() {
            out.push_str(&format!(
                "\nRestores checked against the source after the timed runs (every file's bytes and every link's target): {}.\n",
                checks.join(", ")
            ));
        }
    }
    out
}
