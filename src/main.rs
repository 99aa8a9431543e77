//! The `dealledger` binary: sets up logging, parses arguments, runs one
//! command and turns its outcome into an exit code. Everything else lives in
//! the library (`dealledger::cli` and the modules it calls).

use std::process::ExitCode;

use clap::Parser;
use std::io::IsTerminal;

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

/// Standard error, for log lines, ignoring failed writes. When a daemon's
/// log reader goes away (a closed terminal or pipe, a restarted collector)
/// tracing-subscriber reports each failed write with `eprintln!`, which
/// panics on that same broken pipe: the ingest thread died at its next log
/// line. A log line that cannot be written is lost; the work goes on.
struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = dealledger::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DEALLEDGER_LOG")
                .unwrap_or_else(|_| EnvFilter::new(cli.default_log_level())),
        )
        .with_writer(|| LogSink)
        // Colours only for a terminal: not into log files and pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match dealledger::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
