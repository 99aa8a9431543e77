//! `dealledger ingest` and `dealledger serve`: the ledger's ingester, as a
//! batch job or as the daemon with its HTTP listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::table::stream_table;
use super::{DEFAULT_DATA_DIR, KafkaArgs};
use crate::api::{self, ApiState};
use crate::ingest::{self, IngestConfig, IngestSummary, Mode};
use crate::metrics::Metrics;
use crate::store::Store;

/// Options shared by `ingest` and `serve`.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Ledger folder (a sled database; one process at a time).
    #[arg(long, env = "DEALLEDGER_DATA", default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    data: PathBuf,
    /// Consumer group; offsets are committed there for lag monitoring only.
    /// Give every ledger its own group.
    #[arg(long, env = "DEALLEDGER_GROUP", default_value = "dealledger")]
    group: String,
    /// Records per batch: one atomic, durable write each.
    #[arg(long, default_value_t = ingest::DEFAULT_BATCH_RECORDS as u64,
          value_parser = clap::value_parser!(u64).range(1..=crate::ledger::MAX_BATCH_RECORDS as u64))]
    batch_records: u64,
    /// Milliseconds a batch waits for more records after its first one.
    #[arg(long, default_value_t = 50)]
    linger_ms: u64,
    /// Do not publish rejected and duplicate events to the dead-letter topic
    /// (<topic>.rejected).
    #[arg(long)]
    no_dead_letter: bool,
}

impl LedgerArgs {
    fn config(&self, mode: Mode) -> IngestConfig {
        let mut config = IngestConfig::new(self.kafka.settings(), &self.kafka.topic, mode);
        config.group_id = self.group.clone();
        config.batch_records = self.batch_records as usize;
        config.linger = Duration::from_millis(self.linger_ms);
        if self.no_dead_letter {
            config.dead_letter_topic = None;
        }
        config
    }

    fn open(&self) -> anyhow::Result<(Arc<Store>, crate::ingest::SharedState)> {
        let store = Store::open(&self.data, &self.kafka.topic)?;
        let state = store.load_state()?;
        Ok((Arc::new(store), Arc::new(std::sync::RwLock::new(state))))
    }
}

/// Arguments of `dealledger ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    /// Stop once every partition reaches the high watermark seen at start
    /// (otherwise run until Ctrl-C or SIGTERM).
    #[arg(long)]
    until_caught_up: bool,
    /// Print the summary as one JSON document.
    #[arg(long)]
    json: bool,
}

/// Arguments of `dealledger serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    /// Address of the HTTP listener (/health, /metrics, the /v1 query API).
    #[arg(long, env = "DEALLEDGER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// API tokens file: one token per line, optionally followed by
    /// `allow=deals,history,locks,findings,stats,export`; `#` comments.
    /// Tokens in the environment variable DEALLEDGER_API_TOKENS
    /// (comma-separated) are allowed every route. Without any token every
    /// /v1 request is answered 401.
    #[arg(long, env = "DEALLEDGER_TOKENS_FILE", value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// Require a valid API token for /health and /metrics too (default: open).
    #[arg(long)]
    protect_health: bool,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(
        long,
        env = "DEALLEDGER_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        env = "DEALLEDGER_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Static consumer-group membership id, so a restarted daemon gets its
    /// partitions back at once. Default: derived from the ledger folder.
    #[arg(long)]
    instance_id: Option<String>,
}

impl ServeArgs {
    /// The API tokens from --tokens-file and DEALLEDGER_API_TOKENS.
    fn auth(&self) -> anyhow::Result<api::Auth> {
        let mut auth = api::Auth::new(self.protect_health);
        if let Some(path) = &self.tokens_file {
            auth.add_file(path)?;
        }
        match std::env::var(api::auth::TOKENS_ENV) {
            Ok(list) => auth.add_env_list(&list)?,
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("{} is not valid UTF-8", api::auth::TOKENS_ENV)
            }
        }
        if auth.is_empty() {
            tracing::warn!(
                "no API tokens configured (--tokens-file, {}): every /v1 request will be answered 401",
                api::auth::TOKENS_ENV
            );
        } else {
            tracing::info!(tokens = auth.len(), "API tokens loaded");
        }
        Ok(auth)
    }

    /// The TLS configuration, if --tls-cert and --tls-key are given.
    fn tls(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(
                api::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }
                .load()?,
            )),
            _ => Ok(None),
        }
    }
}

/// A flag set by SIGTERM and SIGINT (Ctrl-C).
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install a signal handler")?;
    }
    Ok(stop)
}

fn print_summary(summary: &IngestSummary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
        return Ok(());
    }
    println!(
        "topic {}: ingested {} entries in {} batches, {:.1} s (accepted {}, rejected {}, duplicate {})",
        summary.topic,
        summary.ingested,
        summary.batches,
        summary.seconds,
        summary.accepted,
        summary.rejected,
        summary.duplicate
    );
    let mut table = stream_table(&[]);
    for s in &summary.streams {
        table.row(vec![
            format!("{}/{}", summary.topic, s.partition),
            s.entries.to_string(),
            s.head_seq.map_or("-".to_string(), |q| q.to_string()),
            s.head_hash.to_string(),
        ]);
    }
    table.print()?;
    Ok(())
}

/// `dealledger ingest`.
pub fn ingest(args: IngestArgs) -> anyhow::Result<ExitCode> {
    let stop = stop_flag()?;
    let (store, state) = args.ledger.open()?;
    let mode = if args.until_caught_up {
        Mode::UntilCaughtUp
    } else {
        Mode::Continuous
    };
    let metrics = Arc::new(Metrics::new());
    let summary = ingest::run(&args.ledger.config(mode), store, state, metrics, stop)?;
    print_summary(&summary, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// `dealledger serve`.
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let stop = stop_flag()?;
    let auth = Arc::new(args.auth()?);
    let tls = args.tls()?;
    let (store, state) = args.ledger.open()?;
    let mut config = args.ledger.config(Mode::Continuous);
    config.instance_id = Some(args.instance_id.clone().unwrap_or_else(|| {
        let dir =
            std::fs::canonicalize(&args.ledger.data).unwrap_or_else(|_| args.ledger.data.clone());
        let digest = blake3::hash(dir.to_string_lossy().as_bytes());
        format!("dealledger-{}", &digest.to_hex()[..16])
    }));
    let metrics = Arc::new(Metrics::new());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let api_state = ApiState {
        metrics: Arc::clone(&metrics),
        ledger: Some(api::LedgerHandle {
            state: Arc::clone(&state),
            store: Arc::clone(&store),
        }),
        auth,
    };
    let http_stop = Arc::clone(&stop);
    let shutdown = async move {
        while !http_stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let http = match tls {
        Some(tls) => runtime.spawn(api::serve_tls(listener, tls, api_state, shutdown)),
        None => runtime.spawn(api::serve(listener, api_state, shutdown)),
    };

    let ingest_stop = Arc::clone(&stop);
    let ingest_metrics = Arc::clone(&metrics);
    let ingester = std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || ingest::run(&config, store, state, ingest_metrics, ingest_stop))
        .context("cannot start the ingest thread")?;
    let result = ingester.join().expect("the ingest thread panicked");
    // Whatever ended ingestion also ends the HTTP listener.
    stop.store(true, Ordering::Relaxed);
    runtime
        .block_on(http)
        .context("the HTTP task panicked")?
        .context("the HTTP listener failed")?;
    let summary = result?;
    tracing::info!(ingested = summary.ingested, "stopped cleanly");
    Ok(ExitCode::SUCCESS)
}
