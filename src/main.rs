//! The `dealledger` binary: sets up logging, parses arguments, runs one
//! command and turns its outcome into an exit code. Everything else lives in
//! the library (`dealledger::cli` and the modules it calls).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc malloc: batches are built on the ingest thread
/// and freed on the writer thread, and glibc's per-thread arenas then keep
/// far more memory than is in use (measured: peak RSS of a 1M-event ingest).
/// `tikv-jemalloc-sys` is built with `unprefixed_malloc_on_supported_platforms`,
/// so on Linux the C code linked in (librdkafka above all, which copies every
/// produced message in one thread and frees it in another) uses jemalloc too:
/// `produce --no-validate` of 1M events took 2.5-2.8 s instead of 3.4-4.0 s,
/// glibc's malloc and free having been ~20 % of its CPU.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
