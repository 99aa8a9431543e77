//! `dealledger export` and `dealledger import`: a ledger to one export file
//! and back.
//!
//! Why these commands exist: an export is the ledger as a plain file, for
//! archives, auditors and moving a ledger between machines (see
//! `docs/FORMAT.md`, "Export format"). Both commands are careful never to
//! leave a half-written result under the real name: `export --out FILE`
//! writes `FILE.tmp`, fsyncs it and renames it; `import FILE --data DIR`
//! builds `DIR.importing` and renames it when every link, batch and head
//! checked out. A killed run leaves at most the `.tmp` / `.importing`
//! leftover, never a partial file or ledger under the real name; the next
//! run overwrites the `.tmp` file and deletes an `.importing` folder no
//! process has open.
//!
//! Exit codes: 0 done; 1 broken (a ledger or export that fails a check) or
//! a failed write; 2 unreadable or foreign input, or bad arguments.

use std::fs::{self, File};
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::table::stream_table;
use super::verify::{
    EXIT_BROKEN, fail, open_export, prepare_new_ledger, progress_bar, progress_fn, publish_ledger,
    read_exit_code, staging_path, store_exit_code, sync_parent,
};
use super::{DEFAULT_DATA_DIR, EXIT_BAD_INPUT};
use crate::chain::ChainHead;
use crate::export::{ExportSummary, ImportError, WriteError, export_store, import_export};
use crate::store::{Store, StoreError};

/// Output buffer of an export.
const WRITE_BUFFER: usize = 1 << 20;

/// Suffix of the temporary file an export is written to.
const TMP_SUFFIX: &str = ".tmp";

/// Suffix of the folder an import builds the ledger in.
const IMPORTING_SUFFIX: &str = ".importing";

const EXPORT_EXAMPLES: &str = "\
Examples:
  dealledger export --data ./ledger --out deal-events.dlx
  dealledger export --data ./ledger | gzip > deal-events.dlx.gz
  dealledger export --data ./ledger --out deal-events.dlx --json

With --out, the export is written to FILE.tmp, fsynced and renamed to FILE,
so FILE is always either absent or complete. The ledger is verified while it
is exported: a broken ledger is refused (exit 1).

Exit codes: 0 exported; 1 the ledger is broken, or writing failed; 2 the
folder is no ledger (or is in use), or bad arguments.";

const IMPORT_EXAMPLES: &str = "\
Examples:
  dealledger import deal-events.dlx --data ./restored
  gunzip -c deal-events.dlx.gz > e.dlx && dealledger import e.dlx --data ./restored --json

The ledger is built in DIR.importing and renamed to DIR only when every link,
batch record and head checked out; a refused or killed import leaves no
ledger under DIR.

Exit codes: 0 imported; 1 the export is broken (the place is named: stream,
seq, Kafka offset, byte offset) or writing failed; 2 the file is unreadable,
foreign or of a newer format, DIR is not new, or bad arguments.";

/// Arguments of `dealledger export`.
#[derive(Debug, Args)]
#[command(after_help = EXPORT_EXAMPLES)]
pub struct ExportArgs {
    /// Ledger folder to export, e.g. `--data ./ledger`.
    #[arg(long, env = "DEALLEDGER_DATA", default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    data: PathBuf,
    /// Export file to write, e.g. `--out deal-events.dlx` (written as
    /// FILE.tmp, then renamed). Default: standard output, which must not be
    /// a terminal.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Print the summary as one JSON document (on stdout with --out, on
    /// stderr when the export itself goes to stdout), e.g. `--json`.
    #[arg(long)]
    json: bool,
}

/// Arguments of `dealledger import`.
#[derive(Debug, Args)]
#[command(after_help = IMPORT_EXAMPLES)]
pub struct ImportArgs {
    /// Export file to import, e.g. `deal-events.dlx`.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// New ledger folder to build, e.g. `--data ./restored`; it must not
    /// exist or be empty.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Print the summary as one JSON document on stdout, e.g. `--json`.
    #[arg(long)]
    json: bool,
}

/// A stream head as printed.
#[derive(Debug, Serialize)]
struct HeadOut {
    stream: String,
    partition: i32,
    entries: u64,
    head_seq: Option<u64>,
    head_hash: String,
}

fn heads_out(heads: &[ChainHead]) -> Vec<HeadOut> {
    heads
        .iter()
        .map(|h| HeadOut {
            stream: h.stream().to_string(),
            partition: h.stream().partition,
            entries: h.next_seq(),
            head_seq: h.next_seq().checked_sub(1),
            head_hash: h.head().to_string(),
        })
        .collect()
}

/// What `export` reports.
#[derive(Debug, Serialize)]
struct ExportOut {
    topic: String,
    data: String,
    out: Option<String>,
    entries: u64,
    batches: u64,
    bytes: u64,
    trailer_hash: String,
    streams: Vec<HeadOut>,
    seconds: f64,
}

/// `dealledger export`.
pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    if args.out.is_none() && io::stdout().is_terminal() {
        return Ok(fail(
            EXIT_BAD_INPUT,
            "refusing to write a binary export to a terminal: give --out FILE or redirect standard output",
        ));
    }
    let store = match Store::open_existing(&args.data) {
        Ok(store) => store,
        Err(e) => return Ok(fail(store_exit_code(&e), e)),
    };
    let total: u64 = match store.heads() {
        Ok(heads) => heads.iter().map(|h| h.next_seq()).sum(),
        Err(e) => return Ok(fail(store_exit_code(&e), e)),
    };
    let bar = progress_bar(total, args.json, "exporting");
    let result = match &args.out {
        None => {
            let stdout = BufWriter::with_capacity(WRITE_BUFFER, io::stdout().lock());
            export_store(&store, stdout, progress_fn(&bar)).and_then(|(mut out, summary)| {
                out.flush().map_err(|source| WriteError::Io {
                    at: summary.bytes,
                    source,
                })?;
                Ok(summary)
            })
        }
        Some(path) => export_to_file(&store, path, &bar),
    };
    bar.finish_and_clear();
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            let code = match &e {
                WriteError::Store(s) => store_exit_code(s),
                _ => EXIT_BROKEN,
            };
            let target = args
                .out
                .as_ref()
                .map_or_else(|| "standard output".to_owned(), |p| p.display().to_string());
            return Ok(fail(code, format!("export to {target} failed: {e}")));
        }
    };
    let out = ExportOut {
        topic: summary.header.topic.clone(),
        data: args.data.display().to_string(),
        out: args.out.as_ref().map(|p| p.display().to_string()),
        entries: summary.header.entries,
        batches: summary.header.batches,
        bytes: summary.bytes,
        trailer_hash: summary.trailer.hash.to_string(),
        streams: heads_out(&summary.header.streams),
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        let json = serde_json::to_string_pretty(&out)?;
        if args.out.is_some() {
            println!("{json}");
        } else {
            eprintln!("{json}");
        }
    } else {
        eprintln!(
            "exported topic {}: {} entries in {} batches, {} streams, {:.1} MB to {} in {:.1} s (trailer blake3 {})",
            out.topic,
            out.entries,
            out.batches,
            out.streams.len(),
            out.bytes as f64 / 1e6,
            out.out.as_deref().unwrap_or("standard output"),
            out.seconds,
            summary.trailer.hash.short()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes the export to `path.tmp`, fsyncs it, renames it to `path` and
/// fsyncs the folder. On failure the temporary file is removed.
fn export_to_file(
    store: &Store,
    path: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<ExportSummary, WriteError> {
    let tmp = with_suffix(path, TMP_SUFFIX);
    let io_error = |source: io::Error| WriteError::Io { at: 0, source };
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| {
            io_error(io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", tmp.display()),
            ))
        })?;
        let (out, summary) = export_store(
            store,
            BufWriter::with_capacity(WRITE_BUFFER, file),
            progress_fn(bar),
        )?;
        let file = out.into_inner().map_err(|e| WriteError::Io {
            at: summary.bytes,
            source: e.into_error(),
        })?;
        file.sync_all().map_err(|source| WriteError::Io {
            at: summary.bytes,
            source,
        })?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| {
            io_error(io::Error::new(
                e.kind(),
                format!("cannot rename {} to {}: {e}", tmp.display(), path.display()),
            ))
        })?;
        sync_parent(path).map_err(io_error)?;
        Ok(summary)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Deletes `DIR<suffix>` when a killed import or rebuild left it behind
/// (no process has it open); it is never a result, only a half-built
/// ledger. Refuses while another run is building it.
pub(super) fn remove_abandoned_staging(dir: &Path, suffix: &str) -> Result<(), String> {
    let staging = staging_path(dir, suffix)?;
    match Store::remove_abandoned(&staging) {
        Ok(true) => {
            tracing::warn!(
                staging = %staging.display(),
                "deleted a half-built ledger left by an interrupted run"
            );
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(StoreError::Locked { .. }) => Err(format!(
            "{} is being built by another dealledger process; wait for it to finish",
            staging.display()
        )),
        Err(e) => Err(format!(
            "cannot delete {}, left by an interrupted run: {e}",
            staging.display()
        )),
    }
}

/// What `import` reports.
#[derive(Debug, Serialize)]
struct ImportOut {
    topic: String,
    file: String,
    data: String,
    entries: u64,
    batches: u64,
    bytes: u64,
    streams: Vec<HeadOut>,
    seconds: f64,
}

/// `dealledger import`.
pub fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut reader = match open_export(&args.file) {
        Ok(reader) => reader,
        Err(message) => return Ok(fail(EXIT_BAD_INPUT, message)),
    };
    if let Err(message) = remove_abandoned_staging(&args.data, IMPORTING_SUFFIX) {
        return Ok(fail(EXIT_BAD_INPUT, format!("import: {message}")));
    }
    let staging = match prepare_new_ledger(&args.data, IMPORTING_SUFFIX) {
        Ok(staging) => staging,
        Err(message) => return Ok(fail(EXIT_BAD_INPUT, format!("import: {message}"))),
    };
    let topic = reader.header().topic.clone();
    let store = match Store::open(&staging, &topic) {
        Ok(store) => store,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Ok(fail(EXIT_BROKEN, e));
        }
    };
    let bar = progress_bar(reader.header().entries, args.json, "importing");
    let result = import_export(&mut reader, &store, progress_fn(&bar));
    bar.finish_and_clear();
    drop(store);
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            // Unreadable input is 2; damage and failed writes are 1.
            let code = match &e {
                ImportError::Read(r) => read_exit_code(r),
                _ => EXIT_BROKEN,
            };
            return Ok(fail(
                code,
                format!(
                    "import of {} refused: {e}; nothing was imported ({} was not created)",
                    args.file.display(),
                    args.data.display()
                ),
            ));
        }
    };
    if let Err(e) = publish_ledger(&staging, &args.data) {
        return Ok(fail(
            EXIT_BROKEN,
            format!(
                "import of {} is complete in {} but it cannot be renamed to {}: {e}",
                args.file.display(),
                staging.display(),
                args.data.display()
            ),
        ));
    }
    let out = ImportOut {
        topic,
        file: args.file.display().to_string(),
        data: args.data.display().to_string(),
        entries: summary.entries,
        batches: summary.batches,
        bytes: summary.bytes,
        streams: heads_out(&summary.streams),
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "imported {} into {}: topic {}, {} entries in {} batches, every link verified, heads equal the export's ({:.1} s)",
            out.file, out.data, out.topic, out.entries, out.batches, out.seconds
        );
        let mut table = stream_table(&[]);
        for s in &out.streams {
            table.row(vec![
                s.stream.to_string(),
                s.entries.to_string(),
                s.head_seq.map_or("-".to_owned(), |q| q.to_string()),
                s.head_hash.to_string(),
            ]);
        }
        table.print()?;
    }
    Ok(ExitCode::SUCCESS)
}
