//! `dealledger replay`: the state of every deal, rebuilt by folding the
//! ledger (verifying every chain link), as of a business time and as known
//! at a record time; a table or one JSON document.

use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::table::{Align, Table};
use super::{DEFAULT_DATA_DIR, EXIT_BAD_INPUT};
use crate::event::{Id, LockKind, Timestamp};
use crate::export::{ExportReader, import_export};
use crate::replay::{self, Cut, DealView, Replay, ReplayOptions, parse_time};
use crate::store::Store;

/// Output buffer: stdout is line-buffered, a large JSON document has
/// hundreds of thousands of lines.
const OUTPUT_BUFFER_BYTES: usize = 1 << 20;

/// Read buffer of an export being imported.
const IMPORT_BUFFER_BYTES: usize = 1 << 20;

/// How often the progress bar redraws.
const PROGRESS_TICK: Duration = Duration::from_millis(200);

/// Examples shown at the end of `dealledger replay --help`.
const EXAMPLES: &str = "\
Examples:
  dealledger replay --data ./ledger
  dealledger replay --data ./ledger --json > deals.json
  dealledger replay --data ./ledger --as-of 2025-01-15 --deal google-openai-2025
  dealledger replay --data ./ledger --as-of 2024-12-31 --recorded-as-of 2025-02-01T12:00:00Z
  dealledger replay --data ./ledger --from-genesis

Exit codes: 0 success; 1 the ledger is damaged (the message names the stream,
seq and offset of the first broken link), cannot be opened, or has no such
deal; 2 bad arguments.";

/// Arguments of `dealledger replay`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ReplayArgs {
    /// Ledger folder to replay [default: dealledger-data]. It must not be in
    /// use: stop the daemon first (sled allows one process per ledger).
    /// Example: --data ./ledger
    #[arg(long, env = "DEALLEDGER_DATA", value_name = "DIR")]
    data: Option<PathBuf>,
    /// Replay an export file (from `dealledger export`) instead of a ledger
    /// folder: it is first imported, every link verified, into a temporary
    /// folder (under $TMPDIR; needs about the ledger's size), removed
    /// afterwards. Example: --export ledger.export
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
    /// Business-time cut: fold only events whose CloudEvents `time` is at or
    /// before TIME (later events have not happened yet); locks are shown if
    /// active at TIME. TIME is RFC 3339, or a date meaning the start of that
    /// day in UTC. Example: --as-of 2025-01-15 (= 2025-01-15T00:00:00Z)
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    as_of: Option<Timestamp>,
    /// Record-time cut: fold only entries whose Kafka record timestamp is at
    /// or before TIME: what the ledger knew then. With --as-of: what was
    /// known at this TIME about the world at the --as-of time. TIME as for
    /// --as-of. Example: --recorded-as-of 2025-06-01T12:00:00Z
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    recorded_as_of: Option<Timestamp>,
    /// Show only the deal with this id; exit 1 if the replay has no such
    /// deal (not in the ledger, or not opened within the cut).
    /// Example: --deal google-openai-2025
    #[arg(long, value_name = "ID")]
    deal: Option<Id>,
    /// Ignore snapshots: verify every chain link from seq 0 and fold every
    /// entry again. Without it, a replay starts from the latest snapshot: it
    /// verifies the links after the snapshot and that the snapshot's heads
    /// are the stored chain, but not the links before them (this flag, or
    /// `dealledger verify`, checks those). Replays with --as-of or
    /// --recorded-as-of always start from genesis. Example: --from-genesis
    #[arg(long)]
    from_genesis: bool,
    /// Print one JSON document (shape in README.md) instead of a table, and
    /// no progress bar. Example: --json
    #[arg(long)]
    json: bool,
}

/// The ledger a replay reads, and the temporary folder holding it when it
/// was imported from an export (removed after the store is closed).
struct Source {
    store: Store,
    /// "ledger DIR" or "export FILE", for messages.
    name: String,
    _imported: Option<tempfile::TempDir>,
}

/// `dealledger replay`.
pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    // --data may come from DEALLEDGER_DATA; only an explicit one conflicts.
    let data_from_env = std::env::var_os("DEALLEDGER_DATA").map(PathBuf::from);
    if args.export.is_some() && args.data.is_some() && args.data != data_from_env {
        eprintln!("error: --data and --export both name a ledger to replay; give one of them");
        return Ok(ExitCode::from(EXIT_BAD_INPUT));
    }
    let source = match &args.export {
        Some(file) => import(file, args.json)?,
        None => {
            let dir = args
                .data
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
            Source {
                store: Store::open_existing(&dir)?,
                name: format!("ledger {}", dir.display()),
                _imported: None,
            }
        }
    };
    let (store, name) = (&source.store, &source.name);
    let options = ReplayOptions {
        cut: Cut {
            as_of: args.as_of,
            recorded_as_of: args.recorded_as_of,
        },
        from_genesis: args.from_genesis,
    };
    let total = store.stored_entries()?;
    let bar = progress_bar(total, "entries replayed", args.json)?;
    let result = match &bar {
        Some(bar) => replay::replay(store, &options, Some(&|n| bar.inc(n))),
        None => replay::replay(store, &options, None),
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let replayed = result.with_context(|| format!("replay of {name} failed"))?;

    let deals = match &args.deal {
        None => replayed.deals(),
        Some(id) => match replayed.deal(id) {
            Some(view) => vec![view],
            None => anyhow::bail!(
                "deal {id} is not in {name}{}",
                cut_text(&replayed.cut)
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default()
            ),
        },
    };
    let mut out = BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, std::io::stdout().lock());
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &replayed.document(deals))
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        print_table(&mut out, &replayed, &deals)
    }
    .and_then(|()| out.flush());
    // The process ends now: freeing a large state piece by piece (a million
    // fingerprints, every deal's maps) would only delay the exit.
    std::mem::forget(replayed);
    match written {
        // A reader that stopped early (`| head`) is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e).context("writing the replay to standard output"),
        Ok(()) => Ok(ExitCode::SUCCESS),
    }
}

/// Imports the export `file` into a new ledger in a temporary folder,
/// verifying every link (`crate::export::import_export`).
fn import(file: &Path, json: bool) -> anyhow::Result<Source> {
    let opened = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = opened
        .metadata()
        .with_context(|| format!("cannot read the size of {}", file.display()))?
        .len();
    let mut reader =
        ExportReader::with_len(BufReader::with_capacity(IMPORT_BUFFER_BYTES, opened), len)
            .with_context(|| format!("cannot read export {}", file.display()))?;
    let topic = reader.header().topic.clone();
    let total = reader.header().entries;
    let tmp = tempfile::Builder::new()
        .prefix("dealledger-replay-")
        .tempdir()
        .context("cannot create a temporary folder for the imported ledger")?;
    let dir = tmp.path().join("ledger");
    let store = Store::open(&dir, &topic)?;
    let bar = progress_bar(total, "entries imported", json)?;
    let imported = import_export(&mut reader, &store, |n| {
        if let Some(bar) = &bar {
            bar.set_position(n);
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    imported.with_context(|| format!("cannot import export {}", file.display()))?;
    Ok(Source {
        store,
        name: format!("export {}", file.display()),
        _imported: Some(tmp),
    })
}

/// A progress bar over `total` items on stderr, when it is a terminal and
/// output is not JSON.
fn progress_bar(total: u64, what: &str, json: bool) -> anyhow::Result<Option<ProgressBar>> {
    if json || !std::io::stderr().is_terminal() {
        return Ok(None);
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:30}}] {{human_pos}}/{{human_len}} {what}, {{eta}} left"
        ))
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(PROGRESS_TICK);
    Ok(Some(bar))
}

/// "as of T, recorded as of R", if the replay was cut.
fn cut_text(cut: &Cut) -> Option<String> {
    let parts: Vec<String> = [
        cut.as_of.map(|t| format!("as of {t}")),
        cut.recorded_as_of.map(|r| format!("recorded as of {r}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn print_table(out: &mut impl Write, replayed: &Replay, deals: &[DealView]) -> std::io::Result<()> {
    let v = &replayed.verdicts;
    writeln!(
        out,
        "ledger {}: {} entries in {} streams; {} folded (accepted {}, rejected {}, duplicate {})",
        replayed.topic,
        replayed.entries,
        replayed.streams.len(),
        replayed.folded,
        v.accepted,
        v.rejected,
        v.duplicate,
    )?;
    match replayed.snapshot {
        Some(batch) => writeln!(
            out,
            "started from the snapshot after batch {batch}: verified the links after it (--from-genesis verifies every link)"
        )?,
        None => writeln!(out, "folded from genesis: verified every link")?,
    }
    if let Some(cut) = cut_text(&replayed.cut) {
        writeln!(out, "{cut}")?;
    }
    writeln!(out)?;
    let mut table = Table::new(&[
        ("deal", Align::Left),
        ("status", Align::Left),
        ("parties", Align::Left),
        ("capacity", Align::Left),
        ("price (minor units)", Align::Left),
        ("term", Align::Left),
        ("events", Align::Right),
        ("last event", Align::Left),
    ]);
    for d in deals {
        let parties = [&d.parties.customer, &d.parties.provider]
            .into_iter()
            .chain(&d.parties.partners)
            .map(Id::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let (capacity, price, term) = match &d.terms {
            None => ("-".into(), "-".into(), "-".into()),
            Some(t) => (
                format!(
                    "{} {}",
                    t.capacity.quantity,
                    serde_json::to_value(t.capacity.unit)
                        .ok()
                        .and_then(|u| u.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
                format!("{} {}", t.price.amount_minor, t.price.currency),
                format!("{} .. {}", t.start, t.end),
            ),
        };
        let locks = d
            .active_locks
            .iter()
            .map(|lock| {
                let kind = match lock.kind {
                    LockKind::Exclusive => "exclusive",
                    LockKind::RightOfFirstRefusal => "right of first refusal",
                };
                format!(
                    "    lock {}: {} holds {kind} over {} in {}, since {}{}",
                    lock.lock_id,
                    lock.holder,
                    lock.bound_party,
                    lock.scope,
                    lock.since,
                    lock.until
                        .map(|u| format!(" until {u}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        table.row_with_notes(
            vec![
                d.id.to_string(),
                d.status.to_string(),
                parties,
                capacity,
                price,
                term,
                d.event_count.to_string(),
                format!("{} {}", d.last_event.event_type, d.last_event.time),
            ],
            locks,
        );
    }
    table.write_to(out)?;
    if deals.is_empty() {
        writeln!(out, "(no deals)")?;
    }
    Ok(())
}
