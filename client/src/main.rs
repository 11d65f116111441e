//! `datamover-client <mode> <args…>`: see `datamover-client --help`.

use std::process::ExitCode;

use datamover_client::modes::{self, USAGE};
use datamover_client::settings::ClientSettings;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("datamover-client {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let fail = |e: datamover_client::ClientError| {
        eprintln!("datamover-client: error: {e}");
        ExitCode::from(e.exit_code())
    };
    let mode = match modes::parse(&args) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: `kubectl logs` and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let settings = match ClientSettings::load(|k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Named so profiles and `top -H` tell client and server threads apart.
        .thread_name("dm-client")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("datamover-client: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(modes::run(mode, &settings));
    // Do not wait for a worker blocked on a pipe that nobody writes to any more.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
