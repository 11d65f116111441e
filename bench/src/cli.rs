//! The bench's command line (clap): `--help` lists the options and starts nothing; an
//! unknown option or value is an error.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const DATASETS: [&str; 7] = [
    "mixed",
    "toolchain",
    "stream",
    "many",
    "sync",
    "browse",
    "gateway",
];
pub const TOOLS: [&str; 6] = [
    "datamover",
    "restic",
    "rustic",
    "rclone",
    "kopia-server",
    "kopia",
];

/// Runs datamover, restic, rustic (where installed), rclone and kopia (where `KOPIA_BIN`
/// names it) side by side against one Garage on loopback, on the same data, and prints
/// medians and ratios (ours / theirs).
/// Usually started by scripts/bench.sh, which installs the tools and builds the release.
#[derive(Parser, Debug)]
#[command(name = "datamover-bench", version)]
pub struct Cli {
    /// Repetitions of each scenario (the report gives medians).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub reps: u16,
    /// Size of the mixed data sets, (a) and (e): 1.0 is about 1 GiB.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Size of the stream data set (c), in MiB.
    #[arg(long, default_value_t = 1024)]
    pub stream_mib: usize,
    /// Also write the report (Markdown) to this file, and a partial one as it goes.
    #[arg(long, global = true)]
    pub output: Option<PathBuf>,
    /// Leave out data set (b), the Rust toolchain.
    #[arg(long)]
    pub no_toolchain: bool,
    /// Data sets to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "mixed,toolchain,stream,many,sync,browse,gateway",
          value_parser = clap::builder::PossibleValuesParser::new(DATASETS))]
    pub datasets: Vec<String>,
    /// Tools to run, comma-separated (default: all; rustic where it is installed, kopia and
    /// kopia-server where `KOPIA_BIN` names a kopia binary).
    #[arg(long, value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(TOOLS))]
    pub tools: Option<Vec<String>>,
    /// Files of data sets (d) and (f).
    #[arg(long, default_value_t = 1_000_000)]
    pub many_files: usize,
    /// Repetitions of data set (d).
    #[arg(long, default_value_t = 1)]
    pub many_reps: usize,
    /// Directory for the data sets, restores and Garage's data (default: the temp dir).
    #[arg(long, global = true)]
    pub work: Option<PathBuf>,
    /// A scenario run on its own instead of the data sets.
    #[command(subcommand)]
    pub command: Option<Scenario>,
}

/// Scenarios run on their own.
#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Issue 29: N simulated edge devices (each its own credential, directory and sync
    /// state, over its own connection, in this process) syncing a few changed small files
    /// every interval, spread evenly, against our server on Garage; then two replicas on
    /// one bucket with the devices split between their ports. Measures pass latency
    /// (p50/p99), errors, server peak RSS and CPU per pass.
    Fleet {
        /// Simulated devices.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        devices: u64,
        /// Minutes each run lasts.
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Seconds between a device's passes.
        #[arg(long, default_value_t = 15.0)]
        interval: f64,
        /// Files per device.
        #[arg(long, default_value_t = 10)]
        files: usize,
        /// Files a device changes each cycle.
        #[arg(long, default_value_t = 2)]
        changed: usize,
        /// Bytes per file.
        #[arg(long, default_value_t = 1024)]
        file_bytes: usize,
        /// Replica counts to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2",
              value_parser = clap::value_parser!(u64).range(1..=2))]
        replicas: Vec<u64>,
        /// A note on the machine for the report (e.g. that it was shared).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Issue 29: the chunk index at N chunks. Writes index objects for N synthetic chunks
    /// into a filesystem repository, starts our server on it (cold, then warm) and
    /// measures the time to Ready, its memory, and FindMissing throughput (1024-id
    /// batches, half present). Needs no Garage and no other tool.
    IndexScale {
        /// The chunk counts N, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
        chunks: Vec<u64>,
        /// Seconds of FindMissing calls per N.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Concurrent FindMissing sessions.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
        sessions: u16,
        /// What the report calls this run (e.g. the index it measures).
        #[arg(long, default_value = "this build")]
        label: String,
        /// Seconds to wait for the server to be ready after each start (a cold start
        /// on 100M chunks reads and sorts every index entry).
        #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        ready_timeout: u64,
    },
    /// Issue 30: a long fault run. Garage behind a proxy that cuts some connections and
    /// delays others, two server replicas on one bucket, clients backing up, restoring
    /// (every restore compared byte for byte), forgetting, and an admin running
    /// maintenance and verify; optionally a replica killed with SIGKILL now and then.
    /// Counts operations, retries and failures. A correctness run, not in CI.
    Faults {
        /// How long the loop runs, in minutes.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Kill a random replica with SIGKILL this often (`60s`, `90`; `0`: never).
        #[arg(long, default_value = "0", value_parser = parse_seconds)]
        kill_every: u64,
        /// Concurrent clients.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
        clients: u16,
        /// Percent of the storage connections the proxy cuts.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
        drop_percent: u32,
        /// Percent of the other storage connections the proxy delays.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=100))]
        delay_percent: u32,
        /// Seconds between the admin's runs (maintenance and verify in turn).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        admin_every: u64,
        /// Seed of the proxy's and the clients' random choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Insert the report into this Markdown file (bench/RESULTS.md), after its title.
        #[arg(long)]
        results: Option<PathBuf>,
        /// A note on the machine for the report (e.g. that it was shared).
        #[arg(long, default_value = "")]
        note: String,
    },
}

/// `60s`, `60` or `0`: whole seconds.
fn parse_seconds(s: &str) -> Result<u64, String> {
    s.strip_suffix('s')
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds such as 60s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_unknown_flags_and_values() {
        let c = Cli::try_parse_from(["datamover-bench"]).expect("defaults");
        assert_eq!(c.reps, 3);
        assert_eq!(c.datasets, DATASETS);
        assert!(c.tools.is_none());
        let c = Cli::try_parse_from([
            "datamover-bench",
            "--datasets",
            "browse",
            "--tools",
            "datamover,restic",
        ])
        .expect("valid");
        assert_eq!(c.datasets, ["browse"]);
        assert_eq!(
            c.tools.as_deref(),
            Some(&["datamover".to_string(), "restic".to_string()][..])
        );
        for bad in [
            vec!["datamover-bench", "--frobnicate"],
            vec!["datamover-bench", "--datasets", "nope"],
            vec!["datamover-bench", "--reps", "0"],
            vec!["datamover-bench", "stray"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
        let c = Cli::try_parse_from([
            "datamover-bench",
            "index-scale",
            "--chunks",
            "1000,20000",
            "--work",
            "/tmp",
        ])
        .expect("index-scale");
        match c.command {
            Some(Scenario::IndexScale {
                chunks,
                ready_timeout,
                ..
            }) => {
                assert_eq!(chunks, [1000, 20000]);
                assert_eq!(ready_timeout, 900, "long enough for a cold start at 100M");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Cli::try_parse_from(["datamover-bench", "index-scale", "--ready-timeout", "60"])
                .map(|c| c.command),
            Ok(Some(Scenario::IndexScale {
                ready_timeout: 60,
                ..
            }))
        ));
        assert!(
            Cli::try_parse_from(["datamover-bench", "index-scale", "--ready-timeout", "0"])
                .is_err()
        );
        assert!(c.work.is_some());
        assert!(
            Cli::try_parse_from(["datamover-bench", "index-scale", "--chunks", "many"]).is_err()
        );
        let c = Cli::try_parse_from(["datamover-bench", "faults", "--kill-every", "60s"])
            .expect("faults");
        match c.command {
            Some(Scenario::Faults {
                kill_every,
                minutes,
                clients,
                ..
            }) => assert_eq!((kill_every, minutes, clients), (60, 30.0, 4)),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["datamover-bench", "faults", "--kill-every", "1m"]).is_err());
        assert!(
            Cli::try_parse_from(["datamover-bench", "faults", "--drop-percent", "101"]).is_err()
        );
        let c =
            Cli::try_parse_from(["datamover-bench", "fleet", "--devices", "1000"]).expect("fleet");
        match c.command {
            Some(Scenario::Fleet {
                devices,
                minutes,
                replicas,
                ..
            }) => assert_eq!((devices, minutes, replicas), (1000, 5.0, vec![1, 2])),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["datamover-bench", "fleet", "--replicas", "3"]).is_err());
        let help = Cli::try_parse_from(["datamover-bench", "--help"]).expect_err("help");
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(help.to_string().contains("--many-files"));
    }
}
