use std::process::ExitCode;

use clap::Parser;
use outpost_agent::cli::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The TPM stack logs every TPM error response to stderr, including expected ones
    // (no EK certificate in NV); the agent reports what matters in its own errors.
    // Set before any thread exists.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = if cli.long_running() {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", outpost_protocol::display_chain(&e));
            ExitCode::FAILURE
        }
    }
}
