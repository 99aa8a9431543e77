//! `dealledger verify`: recomputes every hash of every stream of a ledger
//! folder or an export file, and says where the first break of each stream
//! is.
//!
//! Why this command exists: the chains only protect the ledger if someone
//! checks them. This is the check, for an operator (a ledger folder), for an
//! auditor (an export file) and for a script (`--json`, exit codes). With
//! `--expect-head` the caller brings heads they trust (saved earlier, or
//! published), which also catches what no self-contained check can: a
//! truncated tail whose stored head was rewritten to match, or a chain
//! rewritten and re-hashed from some point on.
//!
//! Exit codes: 0 intact; 1 broken (the first broken place of each stream is
//! printed: stream, seq, Kafka offset, expected vs found); 2 unreadable or
//! foreign input (a folder that is no ledger, a truncated or garbage export,
//! a newer export version) or bad arguments, reported as one line on stderr.
//!
//! This file also holds what the audit commands (`verify`, `export`,
//! `import`, `rebuild`) share: progress bars, exit codes, staging folders.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde::Serialize;

use super::table::stream_table;
use super::{DEFAULT_DATA_DIR, EXIT_BAD_INPUT};
use crate::chain::{BreakKind, ChainBreak, Hash, StreamId};
use crate::export::{
    ExportReader, ExportReport, ExportTrailer, ReadError, StreamFault, verify_export,
};
use crate::store::{ProblemKind, Store, StoreError, StreamProblem, VerifyReport};

/// Exit code of a broken chain or a failed check.
pub(super) const EXIT_BROKEN: u8 = 1;

/// Read buffer for export files.
pub(super) const EXPORT_READ_BUFFER: usize = 1 << 20;

/// Entries between two progress-bar updates.
pub(super) const PROGRESS_EVERY: u64 = 1024;

const VERIFY_EXAMPLES: &str = "\
Examples:
  dealledger verify --data ./ledger
  dealledger verify --export deal-events.dlx --json
  dealledger verify --data ./ledger \\
      --expect-head deal-events/3:1041:7d96c0b2f2e095838fedf9dc30f5cf1167cfa36dc81b3907d4aeefc0c2381407

Exit codes: 0 intact; 1 broken (first broken place per stream printed);
2 unreadable or foreign input (not a ledger, truncated or garbage export,
newer export version) or bad arguments.";

/// Arguments of `dealledger verify`.
#[derive(Debug, Args)]
#[command(after_help = VERIFY_EXAMPLES)]
pub struct VerifyArgs {
    /// Ledger folder to verify, e.g. `--data ./ledger`. Default: the
    /// DEALLEDGER_DATA environment variable, else `dealledger-data`.
    /// Checks every entry key, every chain link and each stream's end
    /// against its stored head.
    #[arg(long, value_name = "DIR", conflicts_with = "export")]
    data: Option<PathBuf>,
    /// Export file to verify instead of a ledger folder, e.g.
    /// `--export deal-events.dlx`. Checks the framing, every chain link,
    /// each stream's end against the header's heads, and the trailer
    /// (counts and blake3 of the file).
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
    /// A head you trust, as STREAM:SEQ:HASH (repeatable): STREAM is
    /// `topic/partition` or just the partition, SEQ the seq of the stream's
    /// last entry, HASH its 64 hex digits, e.g.
    /// `--expect-head deal-events/3:1041:7d96c0b2…` (full hash). The stream
    /// must end exactly there: catches a truncated tail whose stored head
    /// was rewritten, and a chain rewritten and re-hashed.
    #[arg(long = "expect-head", value_name = "STREAM:SEQ:HASH", value_parser = parse_expected_head)]
    expect_head: Vec<ExpectedHead>,
    /// Print the report as one JSON document on stdout (no progress bar),
    /// e.g. `--json | jq .status`.
    #[arg(long)]
    json: bool,
}

/// A head given with `--expect-head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedHead {
    /// The topic, when given as `topic/partition`.
    pub topic: Option<String>,
    /// The partition.
    pub partition: i32,
    /// Seq of the stream's last entry.
    pub seq: u64,
    /// Hash of that entry.
    pub hash: Hash,
}

impl FromStr for ExpectedHead {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.rsplitn(3, ':');
        let (Some(hash), Some(seq), Some(stream)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "{text:?} is not STREAM:SEQ:HASH (e.g. deal-events/3:1041:<64 hex digits>)"
            ));
        };
        let (topic, partition) = match stream.rsplit_once('/') {
            Some((topic, partition)) => (Some(topic.to_owned()), partition),
            None => (None, stream),
        };
        if topic.as_deref() == Some("") {
            return Err(format!("{text:?}: the topic before '/' is empty"));
        }
        let partition: i32 = partition
            .parse()
            .ok()
            .filter(|p| (0..=crate::store::MAX_PARTITION).contains(p))
            .ok_or_else(|| {
                format!(
                    "{text:?}: partition {partition:?} is not a number in 0..={}",
                    crate::store::MAX_PARTITION
                )
            })?;
        let seq: u64 = seq.parse().map_err(|_| {
            format!("{text:?}: seq {seq:?} is not a number (the seq of the stream's last entry)")
        })?;
        let hash: Hash = hash
            .to_ascii_lowercase()
            .parse()
            .map_err(|e| format!("{text:?}: {e}"))?;
        Ok(ExpectedHead {
            topic,
            partition,
            seq,
            hash,
        })
    }
}

fn parse_expected_head(text: &str) -> Result<ExpectedHead, String> {
    text.parse()
}

// ---------------------------------------------------------------------------
// Shared by the audit commands
// ---------------------------------------------------------------------------

/// Prints `message` as one line on stderr and returns `code`.
pub(super) fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

/// A progress bar over `total` entries on stderr, with rate and ETA; hidden
/// when stderr is not a terminal or the output is JSON.
pub(super) fn progress_bar(total: u64, json: bool, what: &str) -> ProgressBar {
    if json || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {human_pos}/{human_len} entries, {rate}, ETA {eta}",
    )
    .map(|s| {
        s.progress_chars("=> ").with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} entries/s", state.per_sec());
            },
        )
    })
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// A progress callback for `bar`, updating it every [`PROGRESS_EVERY`] entries.
pub(super) fn progress_fn(bar: &ProgressBar) -> impl FnMut(u64) + '_ {
    move |n| {
        if n % PROGRESS_EVERY == 0 {
            bar.set_position(n);
        }
    }
}

/// The sibling path `DIR<suffix>` where a new ledger is built before it is
/// renamed to `dir`.
pub(super) fn staging_path(dir: &Path, suffix: &str) -> Result<PathBuf, String> {
    let name = dir
        .file_name()
        .ok_or_else(|| format!("{} has no folder name to build beside", dir.display()))?;
    let mut staged = name.to_os_string();
    staged.push(suffix);
    Ok(dir.with_file_name(staged))
}

/// Checks that `dir` can receive a new ledger (missing, or an empty
/// folder) and that its staging folder does not exist; returns the staging
/// folder. The error is a bad-arguments message.
pub(super) fn prepare_new_ledger(dir: &Path, suffix: &str) -> Result<PathBuf, String> {
    match fs::read_dir(dir) {
        Ok(mut items) => {
            if items.next().is_some() {
                return Err(format!(
                    "{} already exists and is not empty; give a new folder (a ledger is never overwritten)",
                    dir.display()
                ));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            return Err(format!(
                "{} exists and is a file, not a folder",
                dir.display()
            ));
        }
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    }
    let staging = staging_path(dir, suffix)?;
    if fs::symlink_metadata(&staging).is_ok() {
        return Err(format!(
            "{} already exists, probably left by an interrupted run; delete it and try again",
            staging.display()
        ));
    }
    Ok(staging)
}

/// Moves a finished ledger from `staging` to `dir` (replacing an empty
/// `dir`) and makes the rename durable (fsync of the parent folder).
pub(super) fn publish_ledger(staging: &Path, dir: &Path) -> io::Result<()> {
    if let Ok(mut items) = fs::read_dir(dir)
        && items.next().is_none()
    {
        fs::remove_dir(dir)?;
    }
    fs::rename(staging, dir)?;
    sync_parent(dir)
}

/// fsync of `path`'s parent folder, so a rename or creation in it is durable.
pub(super) fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Exit code for a store error: damage is 1, anything else (not a ledger,
/// newer format, in use, I/O) 2.
pub(super) fn store_exit_code(error: &StoreError) -> u8 {
    match error {
        StoreError::Corrupt { .. } => EXIT_BROKEN,
        _ => EXIT_BAD_INPUT,
    }
}

/// Exit code for an export read error: damage is 1, unreadable 2.
pub(super) fn read_exit_code(error: &ReadError) -> u8 {
    if error.is_damage() {
        EXIT_BROKEN
    } else {
        EXIT_BAD_INPUT
    }
}

/// Opens an export file for reading, with its length known to the reader.
pub(super) fn open_export(path: &Path) -> Result<ExportReader<BufReader<File>>, String> {
    let file =
        File::open(path).map_err(|e| format!("cannot open export {}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read export {}: {e}", path.display()))?
        .len();
    ExportReader::with_len(BufReader::with_capacity(EXPORT_READ_BUFFER, file), len)
        .map_err(|e| format!("export {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// One problem, as printed and as JSON.
#[derive(Debug, Serialize)]
struct Problem {
    stream: Option<String>,
    partition: Option<i32>,
    seq: Option<u64>,
    offset: Option<i64>,
    byte_offset: Option<u64>,
    kind: String,
    expected: Option<String>,
    found: Option<String>,
    message: String,
}

/// One stream's result.
#[derive(Debug, Serialize)]
struct StreamRow {
    stream: String,
    partition: i32,
    /// Entries that verified from seq 0.
    entries: u64,
    head_seq: Option<u64>,
    head_hash: Option<String>,
    status: &'static str,
    problem: Option<Problem>,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    status: &'static str,
    source: &'static str,
    path: String,
    topic: String,
    entries: u64,
    streams: Vec<StreamRow>,
    problems: Vec<Problem>,
    expected_heads: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trailer: Option<TrailerOut>,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct TrailerOut {
    batches: u64,
    entries: u64,
    hash: String,
}

impl From<&ExportTrailer> for TrailerOut {
    fn from(t: &ExportTrailer) -> Self {
        TrailerOut {
            batches: t.batches,
            entries: t.entries,
            hash: t.hash.to_string(),
        }
    }
}

/// Stable code, expected and found values of a chain break.
fn break_fields(stream: &StreamId, kind: &BreakKind) -> (&'static str, String, String) {
    match kind {
        BreakKind::SeqGap { expected, found } => {
            ("seq_gap", format!("seq {expected}"), format!("seq {found}"))
        }
        BreakKind::WrongStream { found } => ("wrong_stream", stream.to_string(), found.to_string()),
        BreakKind::OffsetNotIncreasing { previous, found } => (
            "offset_not_increasing",
            format!("offset > {previous}"),
            format!("offset {found}"),
        ),
        BreakKind::PrevHashMismatch { expected, found } => (
            "prev_hash_mismatch",
            expected.to_string(),
            found.to_string(),
        ),
        BreakKind::HashMismatch { expected, found } => {
            ("hash_mismatch", expected.to_string(), found.to_string())
        }
        BreakKind::HeadSeqMismatch {
            expected_next_seq,
            found_next_seq,
        } => (
            "head_seq_mismatch",
            format!("{expected_next_seq} entries"),
            format!("{found_next_seq} entries"),
        ),
        BreakKind::HeadHashMismatch { expected, found } => (
            "head_hash_mismatch",
            expected.to_string(),
            found.to_string(),
        ),
    }
}

fn chain_problem(brk: &ChainBreak, byte_offset: Option<u64>, message: String) -> Problem {
    let (kind, expected, found) = break_fields(&brk.stream, &brk.kind);
    Problem {
        stream: Some(brk.stream.to_string()),
        partition: Some(brk.stream.partition),
        seq: Some(brk.seq),
        offset: brk.offset,
        byte_offset,
        kind: kind.to_owned(),
        expected: Some(expected),
        found: Some(found),
        message,
    }
}

/// A Kafka offset as the report spells it: the number, or `none` where
/// there is none (a stream with no entry).
fn offset_text(offset: Option<i64>) -> String {
    offset.map_or_else(|| "none".to_owned(), |o| o.to_string())
}

fn store_problem(problem: &StreamProblem) -> Problem {
    let message = problem.to_string();
    let (kind, expected, found) = match &problem.kind {
        ProblemKind::Chain(kind) => {
            let (k, e, f) = break_fields(&problem.stream, kind);
            (k, Some(e), Some(f))
        }
        ProblemKind::Undecodable(_) => ("undecodable", None, None),
        ProblemKind::MisplacedEntry { key_seq, entry_seq } => (
            "misplaced_entry",
            Some(format!("seq {key_seq}")),
            Some(format!("seq {entry_seq}")),
        ),
        ProblemKind::DamagedPage { .. } => ("damaged_page", None, None),
        ProblemKind::MalformedKey { .. } => ("malformed_key", None, None),
        ProblemKind::HeadMissing => ("head_missing", None, None),
        ProblemKind::HeadUnreadable { .. } => ("head_unreadable", None, None),
        ProblemKind::HeadOffsetMismatch { expected, found } => (
            "head_offset_mismatch",
            Some(offset_text(*expected)),
            Some(offset_text(*found)),
        ),
    };
    Problem {
        stream: Some(problem.stream.to_string()),
        partition: Some(problem.stream.partition),
        seq: Some(problem.seq),
        offset: problem.offset,
        byte_offset: None,
        kind: kind.to_owned(),
        expected,
        found,
        message,
    }
}

fn read_problem(topic: &str, error: &ReadError) -> Problem {
    let location = error.location();
    let (expected, found) = match error {
        ReadError::Misplaced { listed, found, .. } => (
            Some(format!("partition {} seq {}", listed.partition, listed.seq)),
            Some(format!("partition {} seq {}", found.partition, found.seq)),
        ),
        ReadError::TrailerHashMismatch {
            stored, computed, ..
        } => (Some(stored.to_string()), Some(computed.to_string())),
        _ => (None, None),
    };
    Problem {
        stream: location.map(|l| StreamId::new(topic, l.partition).to_string()),
        partition: location.map(|l| l.partition),
        seq: location.map(|l| l.seq),
        offset: match error {
            ReadError::Misplaced { offset, .. } => Some(*offset),
            _ => None,
        },
        byte_offset: Some(error.byte_offset()),
        kind: error.kind().to_owned(),
        expected,
        found,
        message: error.to_string(),
    }
}

fn fault_problem(topic: &str, fault: &StreamFault) -> Problem {
    match fault {
        StreamFault::Chain { brk, at } => chain_problem(brk, *at, fault.to_string()),
        StreamFault::Frame(error) => read_problem(topic, error),
    }
}

fn row(
    topic: &str,
    partition: i32,
    entries: u64,
    head: Option<(u64, Hash)>,
    problem: Option<Problem>,
) -> StreamRow {
    StreamRow {
        stream: StreamId::new(topic, partition).to_string(),
        partition,
        entries,
        head_seq: head.map(|(seq, _)| seq),
        head_hash: head.map(|(_, hash)| hash.to_string()),
        status: if problem.is_some() {
            "broken"
        } else {
            "intact"
        },
        problem,
    }
}

fn rows_of_store(topic: &str, report: &VerifyReport) -> Vec<StreamRow> {
    report
        .streams
        .iter()
        .map(|s| {
            row(
                topic,
                s.partition,
                s.entries,
                s.head,
                s.problem.as_ref().map(store_problem),
            )
        })
        .collect()
}

fn rows_of_export(topic: &str, report: &ExportReport) -> Vec<StreamRow> {
    report
        .streams
        .iter()
        .map(|s| {
            row(
                topic,
                s.partition,
                s.entries,
                s.head,
                s.fault.as_ref().map(|f| fault_problem(topic, f)),
            )
        })
        .collect()
}

/// Checks the `--expect-head`s against the verified streams: a stream that
/// verified must end exactly at its expected head.
fn check_expected(topic: &str, rows: &mut Vec<StreamRow>, expected: &[ExpectedHead]) {
    for want in expected {
        let at = match rows.iter().position(|r| r.partition == want.partition) {
            Some(i) => i,
            None => {
                rows.push(row(topic, want.partition, 0, None, None));
                rows.sort_by_key(|r| r.partition);
                rows.iter()
                    .position(|r| r.partition == want.partition)
                    .unwrap_or(0)
            }
        };
        let r = &mut rows[at];
        if r.problem.is_some() {
            continue;
        }
        let hash = r.head_hash.as_deref().and_then(|h| h.parse::<Hash>().ok());
        let kind = if r.entries != want.seq.saturating_add(1) {
            BreakKind::HeadSeqMismatch {
                expected_next_seq: want.seq.saturating_add(1),
                found_next_seq: r.entries,
            }
        } else if hash != Some(want.hash) {
            BreakKind::HeadHashMismatch {
                expected: want.hash,
                found: hash.unwrap_or(Hash([0; 32])),
            }
        } else {
            continue;
        };
        let brk = ChainBreak {
            stream: StreamId::new(topic, want.partition),
            seq: r.entries,
            offset: None,
            kind: Box::new(kind),
        };
        let message = format!("{brk} (against --expect-head)");
        r.problem = Some(chain_problem(&brk, None, message));
        r.status = "broken";
    }
}

/// Refuses `--expect-head`s of another topic or repeated streams.
fn check_expected_args(topic: &str, expected: &[ExpectedHead]) -> Result<(), String> {
    let mut seen = BTreeMap::new();
    for want in expected {
        if let Some(t) = &want.topic
            && t != topic
        {
            return Err(format!(
                "--expect-head names topic {t:?}, but this holds topic {topic:?}"
            ));
        }
        if seen.insert(want.partition, ()).is_some() {
            return Err(format!(
                "--expect-head is given twice for partition {}",
                want.partition
            ));
        }
    }
    Ok(())
}

fn print_report(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let broken = report
        .streams
        .iter()
        .filter(|s| s.problem.is_some())
        .count();
    let status = if report.status == "intact" {
        "intact".to_owned()
    } else if broken > 0 {
        format!(
            "BROKEN ({broken} of {} streams; first broken place of each below)",
            report.streams.len()
        )
    } else {
        "BROKEN (see below)".to_owned()
    };
    let size = report
        .bytes
        .map(|b| format!(", {:.1} MB", b as f64 / 1e6))
        .unwrap_or_default();
    println!(
        "{} {} (topic {}): {status}; {} streams, {} entries verified{size}, {:.1} s",
        report.source,
        report.path,
        report.topic,
        report.streams.len(),
        report.entries,
        report.seconds
    );
    let mut table = stream_table(&["status"]);
    for s in &report.streams {
        table.row(vec![
            s.stream.to_string(),
            s.entries.to_string(),
            s.head_seq.map_or("-".to_owned(), |q| q.to_string()),
            s.status.to_string(),
            s.head_hash.as_deref().unwrap_or("-").to_owned(),
        ]);
    }
    table.print()?;
    if let Some(t) = &report.trailer {
        println!(
            "trailer: {} batches, {} entries, blake3 {}",
            t.batches, t.entries, t.hash
        );
    }
    if report.expected_heads > 0 && report.status == "intact" {
        println!("{} expected heads match", report.expected_heads);
    }
    for p in report
        .streams
        .iter()
        .filter_map(|s| s.problem.as_ref())
        .chain(&report.problems)
    {
        println!("broken: {}", p.message);
    }
    Ok(())
}

/// Prints an unreadable input: one line on stderr, and with `--json` a
/// JSON document on stdout too. Returns exit code 2.
fn unreadable(
    json: bool,
    source: &str,
    path: &Path,
    kind: &str,
    message: &str,
    byte_offset: Option<u64>,
) -> ExitCode {
    if json {
        let doc = serde_json::json!({
            "status": "unreadable",
            "source": source,
            "path": path.display().to_string(),
            "error": { "kind": kind, "message": message, "byte_offset": byte_offset },
        });
        println!("{doc:#}");
    }
    fail(EXIT_BAD_INPUT, message)
}

/// `dealledger verify`.
pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let (report, intact) = match &args.export {
        Some(path) => match verify_file(&args, path, started)? {
            Ok(r) => r,
            Err(code) => return Ok(code),
        },
        None => {
            let dir = args.data.clone().unwrap_or_else(|| {
                std::env::var_os("DEALLEDGER_DATA")
                    .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from)
            });
            match verify_ledger(&args, &dir, started)? {
                Ok(r) => r,
                Err(code) => return Ok(code),
            }
        }
    };
    print_report(&report, args.json)?;
    Ok(if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_BROKEN)
    })
}

type Outcome = Result<(Report, bool), ExitCode>;

fn verify_ledger(args: &VerifyArgs, dir: &Path, started: Instant) -> anyhow::Result<Outcome> {
    let store_failed = |e: &StoreError| {
        let code = store_exit_code(e);
        if code == EXIT_BAD_INPUT {
            unreadable(args.json, "ledger", dir, "unreadable", &e.to_string(), None)
        } else {
            fail(code, e)
        }
    };
    let store = match Store::open_existing(dir) {
        Ok(store) => store,
        Err(e) => return Ok(Err(store_failed(&e))),
    };
    let topic = store.topic().to_owned();
    if let Err(message) = check_expected_args(&topic, &args.expect_head) {
        return Ok(Err(fail(EXIT_BAD_INPUT, message)));
    }
    let total = store
        .heads()
        .map(|heads| heads.iter().map(|h| h.next_seq()).sum())
        .unwrap_or(0);
    let bar = progress_bar(total, args.json, "verifying");
    let result = store.verify_with_progress(|n| bar.set_position(n));
    bar.finish_and_clear();
    let verified = match result {
        Ok(report) => report,
        Err(e) => return Ok(Err(store_failed(&e))),
    };
    let mut streams = rows_of_store(&topic, &verified);
    check_expected(&topic, &mut streams, &args.expect_head);
    let intact = streams.iter().all(|s| s.problem.is_none());
    Ok(Ok((
        Report {
            status: if intact { "intact" } else { "broken" },
            source: "ledger",
            path: dir.display().to_string(),
            topic,
            entries: streams.iter().map(|s| s.entries).sum(),
            streams,
            problems: Vec::new(),
            expected_heads: args.expect_head.len(),
            bytes: None,
            trailer: None,
            seconds: started.elapsed().as_secs_f64(),
        },
        intact,
    )))
}

fn verify_file(args: &VerifyArgs, path: &Path, started: Instant) -> anyhow::Result<Outcome> {
    let failed = |e: &ReadError| {
        let message = format!("export {}: {e}", path.display());
        if e.is_damage() {
            fail(EXIT_BROKEN, message)
        } else {
            unreadable(
                args.json,
                "export",
                path,
                e.kind(),
                &message,
                Some(e.byte_offset()),
            )
        }
    };
    let mut reader = match File::open(path).and_then(|f| Ok((f.metadata()?.len(), f))) {
        Err(e) => {
            let message = format!("cannot open export {}: {e}", path.display());
            return Ok(Err(unreadable(
                args.json, "export", path, "io", &message, None,
            )));
        }
        Ok((len, file)) => {
            match ExportReader::with_len(BufReader::with_capacity(EXPORT_READ_BUFFER, file), len) {
                Ok(reader) => reader,
                Err(e) => return Ok(Err(failed(&e))),
            }
        }
    };
    let topic = reader.header().topic.clone();
    if let Err(message) = check_expected_args(&topic, &args.expect_head) {
        return Ok(Err(fail(EXIT_BAD_INPUT, message)));
    }
    let bar = progress_bar(reader.header().entries, args.json, "verifying");
    let result = verify_export(&mut reader, progress_fn(&bar));
    bar.finish_and_clear();
    let verified = match result {
        Ok(report) => report,
        Err(e) => return Ok(Err(failed(&e))),
    };
    let mut streams = rows_of_export(&topic, &verified);
    check_expected(&topic, &mut streams, &args.expect_head);
    let problems: Vec<Problem> = verified
        .faults
        .iter()
        .map(|e| read_problem(&topic, e))
        .collect();
    let intact = problems.is_empty() && streams.iter().all(|s| s.problem.is_none());
    Ok(Ok((
        Report {
            status: if intact { "intact" } else { "broken" },
            source: "export",
            path: path.display().to_string(),
            topic,
            entries: streams.iter().map(|s| s.entries).sum(),
            streams,
            problems,
            expected_heads: args.expect_head.len(),
            bytes: Some(verified.bytes),
            trailer: verified.trailer.as_ref().map(TrailerOut::from),
            seconds: started.elapsed().as_secs_f64(),
        },
        intact,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_offset_mismatch_reports_offsets_not_rust_debug_text() {
        let problem = StreamProblem {
            stream: StreamId::new("deal-events", 2),
            seq: 17,
            offset: Some(41),
            kind: ProblemKind::HeadOffsetMismatch {
                expected: Some(41),
                found: None,
            },
        };
        let reported = store_problem(&problem);
        assert_eq!(reported.kind, "head_offset_mismatch");
        assert_eq!(reported.expected.as_deref(), Some("41"));
        assert_eq!(reported.found.as_deref(), Some("none"));
    }

    #[test]
    fn expected_heads_parse() {
        let hash = "7d96c0b2f2e095838fedf9dc30f5cf1167cfa36dc81b3907d4aeefc0c2381407";
        let head: ExpectedHead = format!("deal-events/3:1041:{hash}").parse().unwrap();
        assert_eq!(head.topic.as_deref(), Some("deal-events"));
        assert_eq!((head.partition, head.seq), (3, 1041));
        assert_eq!(head.hash.to_string(), hash);
        let bare: ExpectedHead = format!("3:1041:{}", hash.to_uppercase()).parse().unwrap();
        assert_eq!(bare.topic, None);
        assert_eq!(bare.hash, head.hash);
        for bad in [
            format!("deal-events/3:x:{hash}"),
            format!("deal-events/-1:1:{hash}"),
            format!("/3:1:{hash}"),
            "3:1:abc".to_owned(),
            "3:1".to_owned(),
        ] {
            assert!(bad.parse::<ExpectedHead>().is_err(), "{bad}");
        }
    }
}
