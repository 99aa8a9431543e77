//! The `dealledger` binary: sets up logging, parses arguments, runs one
//! command and turns its outcome into an exit code. Everything else lives in
//! the library (`dealledger::cli` and the modules it calls).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DEALLEDGER_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = dealledger::cli::Cli::parse();
    match dealledger::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
