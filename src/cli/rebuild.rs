//! `dealledger rebuild --from-kafka`: re-reads the topic from the beginning
//! into a fresh ledger and compares its heads with an existing ledger or
//! export.
//!
//! Why this command exists: the ledger's central claim is that its chains
//! are a pure function of the Kafka log (every hash covers only what Kafka
//! stores, nothing from the ingesting machine, and ingestion is exactly
//! once). This command tests that claim end to end: it ingests the topic
//! again, with the ordinary ingester, into a new folder, and checks that
//! every stream ends at the same seq and hash as the ledger (or export)
//! being audited. It is also the recovery path for a damaged ledger.
//!
//! The new ledger is built in `DIR.rebuilding` and renamed to `DIR` at the
//! end, so an interrupted rebuild never leaves a half-built ledger under
//! the real name (a `DIR.rebuilding` left by a killed run is deleted by the
//! next one). Exit codes: 0 rebuilt (and heads match, when compared);
//! 1 heads differ, or the rebuild failed (Kafka unreachable, I/O); 2 bad
//! arguments (DIR not new, a comparison target that is unreadable or of
//! another topic, a topic that does not exist).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::export::remove_abandoned_staging;
use super::table::stream_table;
use super::verify::{EXIT_BROKEN, fail, open_export, prepare_new_ledger, publish_ledger};
use super::{EXIT_BAD_INPUT, KafkaArgs};
use crate::chain::ChainHead;
use crate::ingest::{self, IngestConfig, IngestError, Mode};
use crate::ledger::MAX_BATCH_RECORDS;
use crate::metrics::Metrics;
use crate::store::Store;

/// Suffix of the folder a rebuild builds the ledger in.
const REBUILDING_SUFFIX: &str = ".rebuilding";

const REBUILD_EXAMPLES: &str = "\
Examples:
  dealledger rebuild --from-kafka --data ./rebuilt
  dealledger rebuild --from-kafka --data ./rebuilt --compare-with ./ledger
  dealledger rebuild --from-kafka --data ./rebuilt --compare-with deal-events.dlx --json
  dealledger rebuild --from-kafka --data ./rebuilt --topic deal-events \\
      --brokers kafka-1:9092 --kafka-config client.properties

The ledger being compared should be caught up with the topic: a topic that
received records after it was ingested rebuilds to longer chains, reported as
different heads.

Exit codes: 0 rebuilt, heads match (or nothing to compare); 1 heads differ,
or the rebuild failed (Kafka, I/O); 2 bad arguments (DIR not new, unreadable
or foreign --compare-with, unknown topic).";

/// Arguments of `dealledger rebuild`.
#[derive(Debug, Args)]
#[command(after_help = REBUILD_EXAMPLES)]
pub struct RebuildArgs {
    /// Read the topic from Kafka, from the beginning of every partition
    /// (the only source so far; required), e.g. `--from-kafka`.
    #[arg(long, required = true)]
    from_kafka: bool,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// New ledger folder to build, e.g. `--data ./rebuilt`; it must not
    /// exist or be empty.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// A ledger folder or an export file whose heads the rebuilt ledger
    /// must equal, e.g. `--compare-with ./ledger` or
    /// `--compare-with deal-events.dlx`. Its stored heads (the export's
    /// header heads) are compared; run `dealledger verify` to check its
    /// chains themselves.
    #[arg(long, value_name = "DIR_OR_EXPORT")]
    compare_with: Option<PathBuf>,
    /// Records per batch of the rebuild, e.g. `--batch-records 5000`. The
    /// heads do not depend on it.
    #[arg(long, default_value_t = ingest::DEFAULT_BATCH_RECORDS as u64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_BATCH_RECORDS as u64))]
    batch_records: u64,
    /// Print the result as one JSON document on stdout, e.g. `--json`.
    #[arg(long)]
    json: bool,
}

/// A stream head as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Head {
    partition: i32,
    entries: u64,
    head_seq: Option<u64>,
    head_hash: String,
}

fn heads_of(heads: &[ChainHead]) -> BTreeMap<i32, Head> {
    heads
        .iter()
        .map(|h| {
            let partition = h.stream().partition;
            (
                partition,
                Head {
                    partition,
                    entries: h.next_seq(),
                    head_seq: h.next_seq().checked_sub(1),
                    head_hash: h.head().to_string(),
                },
            )
        })
        .collect()
}

/// One stream whose heads differ.
#[derive(Debug, Serialize)]
struct Difference {
    stream: String,
    rebuilt: Option<Head>,
    compared: Option<Head>,
}

/// What `rebuild` reports.
#[derive(Debug, Serialize)]
struct RebuildOut {
    topic: String,
    data: String,
    entries: u64,
    batches: u64,
    seconds: f64,
    streams: Vec<Head>,
    compare_with: Option<String>,
    heads_match: Option<bool>,
    differences: Vec<Difference>,
}

/// The topic and stored heads of a ledger folder or an export file.
fn heads_to_compare(path: &Path) -> Result<(String, Vec<ChainHead>), String> {
    if path.is_dir() {
        let store = Store::open_existing(path).map_err(|e| e.to_string())?;
        let heads = store.heads().map_err(|e| e.to_string())?;
        Ok((store.topic().to_owned(), heads))
    } else {
        let reader = open_export(path)?;
        let header = reader.header();
        Ok((header.topic.clone(), header.streams.clone()))
    }
}

/// A consumer group no one else uses (the rebuild assigns partitions
/// itself; the group only receives lag-monitoring commits).
fn throwaway_group() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("dealledger-rebuild-{}-{nanos}", std::process::id())
}

/// `dealledger rebuild`.
pub fn rebuild(args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let topic = args.kafka.topic.clone();
    // Read the comparison target first: no point re-reading a topic to
    // compare with something unreadable.
    let compared = match &args.compare_with {
        None => None,
        Some(path) => match heads_to_compare(path) {
            Ok((found, _)) if found != topic => {
                return Ok(fail(
                    EXIT_BAD_INPUT,
                    format!(
                        "--compare-with {} holds topic {found:?}, but the rebuild reads topic {topic:?} (give --topic {found})",
                        path.display()
                    ),
                ));
            }
            Ok((_, heads)) => Some(heads_of(&heads)),
            Err(message) => {
                return Ok(fail(
                    EXIT_BAD_INPUT,
                    format!("--compare-with {}: {message}", path.display()),
                ));
            }
        },
    };
    if let Err(message) = remove_abandoned_staging(&args.data, REBUILDING_SUFFIX) {
        return Ok(fail(EXIT_BAD_INPUT, format!("rebuild: {message}")));
    }
    let staging = match prepare_new_ledger(&args.data, REBUILDING_SUFFIX) {
        Ok(staging) => staging,
        Err(message) => return Ok(fail(EXIT_BAD_INPUT, format!("rebuild: {message}"))),
    };
    let store = match Store::open(&staging, &topic) {
        Ok(store) => Arc::new(store),
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Ok(fail(EXIT_BAD_INPUT, e));
        }
    };
    // The daemon's kind of state: identities, amendments and history in
    // scratch files in the staging folder, not all in memory.
    let state = match store.new_state() {
        Ok(state) => state,
        Err(e) => {
            drop(store);
            let _ = fs::remove_dir_all(&staging);
            return Ok(fail(EXIT_BROKEN, format!("rebuild: {e}")));
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install a signal handler")?;
    }
    let mut config = IngestConfig::new(args.kafka.settings(), &topic, Mode::UntilCaughtUp);
    config.group_id = throwaway_group();
    config.dead_letter_topic = None;
    config.batch_records = args.batch_records as usize;
    let result = ingest::run(
        &config,
        Arc::clone(&store),
        Arc::new(std::sync::RwLock::new(state)),
        Arc::new(Metrics::new()),
        Arc::clone(&stop),
    );
    let heads = store.heads();
    let batches = store.next_batch_no();
    drop(store);
    let discard = |code: u8, message: String| {
        let _ = fs::remove_dir_all(&staging);
        Ok(fail(code, message))
    };
    let summary = match result {
        Ok(summary) => summary,
        Err(e @ IngestError::NoTopic { .. }) => return discard(EXIT_BAD_INPUT, e.to_string()),
        Err(e) => return discard(EXIT_BROKEN, format!("rebuild failed: {e}")),
    };
    if stop.load(Ordering::Relaxed) {
        return discard(
            EXIT_BROKEN,
            "rebuild interrupted; the partial ledger was removed".to_owned(),
        );
    }
    let (heads, batches) = match (heads, batches) {
        (Ok(h), Ok(b)) => (h, b),
        (Err(e), _) | (_, Err(e)) => return discard(EXIT_BROKEN, format!("rebuild failed: {e}")),
    };
    if let Err(e) = publish_ledger(&staging, &args.data) {
        return Ok(fail(
            EXIT_BROKEN,
            format!(
                "the rebuilt ledger is complete in {} but cannot be renamed to {}: {e}",
                staging.display(),
                args.data.display()
            ),
        ));
    }
    let rebuilt = heads_of(&heads);
    let differences: Vec<Difference> = match &compared {
        None => Vec::new(),
        Some(compared) => rebuilt
            .keys()
            .chain(compared.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|p| rebuilt.get(p) != compared.get(p))
            .map(|p| Difference {
                stream: format!("{topic}/{p}"),
                rebuilt: rebuilt.get(p).cloned(),
                compared: compared.get(p).cloned(),
            })
            .collect(),
    };
    let out = RebuildOut {
        topic: topic.clone(),
        data: args.data.display().to_string(),
        entries: summary.ingested,
        batches,
        seconds: started.elapsed().as_secs_f64(),
        streams: rebuilt.values().cloned().collect(),
        compare_with: args.compare_with.as_ref().map(|p| p.display().to_string()),
        heads_match: compared.as_ref().map(|_| differences.is_empty()),
        differences,
    };
    print(&out, args.json)?;
    Ok(if out.heads_match == Some(false) {
        ExitCode::from(EXIT_BROKEN)
    } else {
        ExitCode::SUCCESS
    })
}

fn print(out: &RebuildOut, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(out)?);
        return Ok(());
    }
    println!(
        "rebuilt {} from topic {}: {} entries in {} batches, {} streams ({:.1} s)",
        out.data,
        out.topic,
        out.entries,
        out.batches,
        out.streams.len(),
        out.seconds
    );
    let mut table = stream_table(&[]);
    for s in &out.streams {
        table.row(vec![
            format!("{}/{}", out.topic, s.partition),
            s.entries.to_string(),
            s.head_seq.map_or("-".to_owned(), |q| q.to_string()),
            s.head_hash.to_string(),
        ]);
    }
    table.print()?;
    let Some(with) = &out.compare_with else {
        return Ok(());
    };
    if out.differences.is_empty() {
        println!(
            "heads match: the chain is a pure function of the Kafka log (compared with {with})"
        );
        return Ok(());
    }
    println!(
        "heads differ from {with} in {} stream(s):",
        out.differences.len()
    );
    let describe = |h: &Option<Head>| match h {
        None => "no stream".to_owned(),
        Some(h) => format!(
            "{} entries, head seq {}, hash {}",
            h.entries,
            h.head_seq.map_or("-".to_owned(), |q| q.to_string()),
            h.head_hash
        ),
    };
    for d in &out.differences {
        println!(
            "  {}: rebuilt {}; {with} has {}",
            d.stream,
            describe(&d.rebuilt),
            describe(&d.compared)
        );
    }
    Ok(())
}
