//! `datamover-server`: runs with no arguments inside a pod; see the README and SPEC.

use std::process::ExitCode;

use datamover_server::settings::Settings;

const USAGE: &str = "datamover-server: the DatamoverServer

Runs with no arguments. Inputs (under $DATAMOVER_ROOT when set):
  PROTOCOLS                         name:port items (default datamover-v1:51515)
  /etc/config/<key>                 storage location: type, path, bucket, prefix, region, endpoint
  /etc/secrets/<secret>/<key>       repo-password, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ca.crt, tls.crt, tls.key
  /etc/client_credentials/<client>  one credential (token or $argon2id$ hash) per client
Outputs:
  /etc/server/data                  the TLS certificate's SHA-256 fingerprint (hex)
  DATAMOVER_HTTP_ADDR (0.0.0.0:8080) /healthz /readyz /metrics
Other environment: DATAMOVER_LOG_FORMAT=json, DATAMOVER_LISTEN_HOST, DATAMOVER_TLS_NAMES, RUST_LOG";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("datamover-server {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "datamover-server: unexpected argument '{other}': it takes none (see --help)"
            );
            return ExitCode::from(2);
        }
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let settings = match Settings::load(|k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("datamover-server: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    init_tracing(settings.log_json);
    // Sealing and unsealing run on the blocking pool; a few threads keep every core busy
    // and, with few malloc arenas, keep memory flat (each arena would hold its own
    // freed pack-sized buffers). Packs (over 8 MiB) are mapped and unmapped on their own:
    // glibc's default raises that threshold after the first such buffer is freed, after
    // which freed packs stayed in the heap, fragmented. Smaller buffers (chunks, messages
    // of a few MiB) stay in the heap, and up to 32 MiB of free heap is kept rather than
    // returned and faulted in again for the next message. Measured against mapping
    // everything from 1 MiB with the default trimming: server CPU restoring 1 GiB
    // 2.1-2.3 s -> 1.6-1.9 s, about 0.4 s less backing it up, 15-30 MiB more at peak.
    // SAFETY: mallopt only tunes the allocator, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 6 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 * 1024 * 1024);
    }
    let files = raise_open_files();
    if files < MIN_OPEN_FILES {
        tracing::warn!(
            limit = files,
            "the open-file limit is low: each client connection holds one, so at most about {files} devices can stay connected; raise the container's or the service's nofile limit (e.g. LimitNOFILE=1048576)"
        );
    } else {
        tracing::info!(limit = files, "open-file limit");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Named so profiles and `top -H` tell client and server threads apart.
        .thread_name("dm-server")
        .max_blocking_threads(16)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("datamover-server: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(datamover_server::run::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("datamover-server: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Below this open-file limit the server warns at start (one per client connection).
const MIN_OPEN_FILES: u64 = 16_384;

/// Raises the soft open-file limit to the hard one (as Go programs do at start), since
/// every connected client holds a socket; returns the soft limit now in force.
fn raise_open_files() -> u64 {
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,aws=warn,h2=warn,tower=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: `kubectl logs` and files get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
