//! The `dealledger` command line: argument definitions and dispatch.
//!
//! Each subcommand lives in its own file and is a thin shell over the
//! library: it parses arguments, calls the core, and prints a human table or,
//! with `--json`, one JSON document. Exit codes are the same for every
//! command: 0 success, 1 failure of the environment (Kafka unreachable, I/O),
//! 2 bad input (invalid events, bad arguments).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::kafka::{DEFAULT_BROKERS, DEFAULT_TOPIC, KafkaSettings};

mod export;
mod generate;
mod ingest;
mod produce;
mod query;
mod rebuild;
mod replay;
mod table;
mod verify;

/// Default ledger folder (`--data`, env `DEALLEDGER_DATA`).
pub const DEFAULT_DATA_DIR: &str = "dealledger-data";

/// Exit code for bad input (invalid events, bad arguments).
pub const EXIT_BAD_INPUT: u8 = 2;

/// dealledger: an event-sourced, hash-chained ledger of compute and cloud deals.
#[derive(Debug, Parser)]
#[command(name = "dealledger", version, about, long_about = None)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log level when `DEALLEDGER_LOG` does not set one: `info` for the
    /// daemon (`serve`), whose operators want to see it start, listen,
    /// take its partitions and stop; `warn` for the commands, whose output
    /// is their answer.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Serve(_) => "info",
            _ => "warn",
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a JSONL file of deal events, then publish them to Kafka.
    ///
    /// Every line is validated first; if any is invalid, each is reported as
    /// `line N: field PATH: reason`, nothing is sent and the exit code is 2.
    /// Then exactly what was validated is sent: lines appended to the file
    /// meanwhile are not, and a file changed in between stops the sending
    /// before the first 4 MiB chunk of lines that differs (exit code 1, with
    /// what was sent).
    ///
    /// Example: dealledger produce --brokers 127.0.0.1:9092 schemas/examples/scenario.jsonl
    Produce(produce::ProduceArgs),
    /// Validate a JSONL file of deal events without sending anything.
    ///
    /// Example: dealledger validate events.jsonl
    Validate(produce::ValidateArgs),
    /// Write a synthetic, valid stream of deal events as JSONL (for load tests
    /// and benchmarks).
    ///
    /// Example: dealledger generate --events 1000000 --deals 10000 > events.jsonl
    Generate(generate::GenerateArgs),
    /// Consume the topic into the ledger.
    ///
    /// With --until-caught-up it stops once every partition reaches the high
    /// watermark seen at start and prints each stream's head.
    ///
    /// Example: dealledger ingest --until-caught-up --data ./ledger
    Ingest(ingest::IngestArgs),
    /// Run the daemon: continuous ingest plus /health, /metrics and the query API over HTTP(S).
    ///
    /// SIGTERM or Ctrl-C finishes the batch in flight, makes it durable,
    /// leaves the consumer group and exits 0.
    ///
    /// Example: dealledger serve --data ./ledger --listen 127.0.0.1:8080
    Serve(ingest::ServeArgs),
    /// Recompute every hash of every stream of a ledger or an export.
    ///
    /// Intact: prints each stream's head (entries, last seq, hash), exit 0.
    /// Broken: prints the first broken place of each stream (stream, seq,
    /// Kafka offset, expected vs found), exit 1. Unreadable or foreign
    /// input: one line on stderr, exit 2. --expect-head pins heads you trust.
    ///
    /// Example: dealledger verify --data ./ledger --expect-head deal-events/3:1041:<64 hex>
    Verify(verify::VerifyArgs),
    /// Rebuild deal state by folding the ledger, as of any time.
    ///
    /// Folds the entries in ledger order, verifying the chain links, and
    /// prints each deal: status, parties, terms, active locks, last event.
    /// --as-of cuts at business time, --recorded-as-of at Kafka record time.
    ///
    /// Example: dealledger replay --data ./ledger --as-of 2025-01-15
    Replay(replay::ReplayArgs),
    /// Write every entry, with its hashes, to a versioned export file.
    ///
    /// Ledger order, batch records included (docs/FORMAT.md, "Export
    /// format"); the ledger is verified on the way. --out FILE is written
    /// as FILE.tmp, fsynced and renamed: never a partial file under FILE.
    ///
    /// Example: dealledger export --data ./ledger --out deal-events.dlx
    Export(export::ExportArgs),
    /// Build a ledger from an export file, verifying every link.
    ///
    /// Re-applies every batch (verdicts are recomputed), checks hashes,
    /// fingerprints and heads against the export, builds in DIR.importing
    /// and renames it to DIR at the end. A broken export is refused at its
    /// exact place (exit 1); unreadable or foreign input exits 2.
    ///
    /// Example: dealledger import deal-events.dlx --data ./restored
    Import(export::ImportArgs),
    /// Re-read the topic into a fresh ledger and compare its heads.
    ///
    /// Ingests the topic from the beginning into DIR.rebuilding (renamed to
    /// DIR at the end) and compares every stream's head with a ledger or an
    /// export: exit 0 when they match, 1 naming each stream that differs.
    ///
    /// Example: dealledger rebuild --from-kafka --data ./rebuilt --compare-with ./ledger
    Rebuild(rebuild::RebuildArgs),
    /// Ask about one deal: `deal show ID`, `deal history ID`.
    ///
    /// Every answer cites the stream, seq and hash of the entries behind it.
    /// Offline with --data DIR (stopped ledger) or from the daemon with
    /// --server URL (token in DEALLEDGER_TOKEN); --json for one document.
    ///
    /// Example: dealledger deal show google-openai-2025 --data ./ledger
    #[command(subcommand)]
    Deal(query::DealCommand),
    /// List deals: `deals list [--party P] [--status S] [--from T] [--to T]`.
    ///
    /// Example: dealledger deals list --party openai --json
    #[command(subcommand)]
    Deals(query::DealsCommand),
    /// Exclusivity locks: `locks active --at TIME`.
    ///
    /// Example: dealledger locks active --at 2025-01-15
    #[command(subcommand)]
    Locks(query::LocksCommand),
    /// Compliance findings: deals finalized under another's exclusive lock,
    /// time going backwards, backdating, terms mismatches, activity after
    /// termination, refused and duplicate events per producer.
    ///
    /// Example: dealledger findings --data ./ledger --from 2025-01-01 --json
    Findings(query::FindingsArgs),
    /// Per-deal and overall statistics: time to finalization, proposal
    /// rounds, events by type and verdict.
    ///
    /// Example: dealledger stats --data ./ledger
    Stats(query::StatsArgs),
}

/// How to reach Kafka; shared by every command that talks to it.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "DEALLEDGER_BROKERS", default_value = DEFAULT_BROKERS)]
    pub brokers: String,
    /// Topic of deal events.
    #[arg(long, env = "DEALLEDGER_TOPIC", default_value = DEFAULT_TOPIC)]
    pub topic: String,
    /// librdkafka properties file (key=value lines), e.g. TLS and SASL
    /// settings. Put secrets here, never on the command line.
    #[arg(long, env = "DEALLEDGER_KAFKA_CONFIG", value_name = "FILE")]
    pub kafka_config: Option<PathBuf>,
    /// A librdkafka setting, applied last (repeatable), e.g. -X linger.ms=10.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_override)]
    pub set: Vec<(String, String)>,
}

impl KafkaArgs {
    /// The Kafka settings these arguments describe.
    pub fn settings(&self) -> KafkaSettings {
        KafkaSettings {
            brokers: self.brokers.clone(),
            config_file: self.kafka_config.clone(),
            overrides: self.set.clone(),
        }
    }
}

fn parse_override(s: &str) -> Result<(String, String), String> {
    KafkaSettings::parse_override(s).map_err(|e| e.to_string())
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Produce(args) => produce::produce(args),
        Command::Validate(args) => produce::validate(args),
        Command::Generate(args) => generate::generate(args),
        Command::Ingest(args) => ingest::ingest(args),
        Command::Serve(args) => ingest::serve(args),
        Command::Verify(args) => verify::verify(args),
        Command::Replay(args) => replay::replay(args),
        Command::Export(args) => export::export(args),
        Command::Import(args) => export::import(args),
        Command::Rebuild(args) => rebuild::rebuild(args),
        Command::Deal(command) => query::deal(command),
        Command::Deals(command) => query::deals(command),
        Command::Locks(command) => query::locks(command),
        Command::Findings(args) => query::findings(args),
        Command::Stats(args) => query::stats(args),
    }
}
