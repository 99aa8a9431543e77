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

/// Returns jemalloc's unused pages to the OS at once. Called after the
/// ingester let sled's memory go (`Store::release_memory_to_os`): jemalloc
/// would otherwise keep the freed pages for its decay time (10 s).
fn purge_allocator() {
    // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena.
    const PURGE_ALL_ARENAS: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated mallctl name that takes no old or new value.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL_ARENAS.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    debug_assert_eq!(status, 0, "mallctl arena.4096.purge");
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("DEALLEDGER_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    dealledger::store::after_memory_release(purge_allocator);
    let cli = dealledger::cli::Cli::parse();
    match dealledger::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
