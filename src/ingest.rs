//! Ingestion: the Kafka shell around the ledger's pure state machine.
//!
//! It consumes the deal-events topic, groups records into bounded batches,
//! hands each batch to [`LedgerState::apply_batch`], makes the result durable
//! with [`Store::write_batch`], and only then tells anyone else: metrics, the
//! dead-letter topic, and Kafka's committed offsets (kept for lag monitoring
//! only; the ledger's own positions are the truth).
//!
//! Exactly once: consumer positions live in sled, written atomically with the
//! entries they cover. Kafka auto-commit and auto offset store are off. On
//! every partition assignment the rebalance callback reads the stored
//! position of each partition and puts it *into the assignment* (seeking
//! after assign is unreliable in librdkafka); a partition never seen starts
//! at the beginning. Every message is tagged with its partition's assignment
//! epoch when polled; messages of a partition revoked (or re-assigned) while
//! the batch was being gathered are dropped before the write and re-read
//! from the stored position. Records already in the ledger are skipped by
//! the state machine. A batch whose write fails stops the ingester with an
//! error (non-zero exit); it is never skipped.
//!
//! Two modes: [`Mode::UntilCaughtUp`] assigns every partition itself (no
//! group membership) and stops when each partition reaches the high
//! watermark it saw at start; [`Mode::Continuous`] joins the consumer group
//! and runs until stopped.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::chain::{Header, Record, TimestampType};
use crate::kafka::{KafkaSettings, SecurityFailure, SettingsError};
use crate::ledger::{
    self, BatchWrite, Decoded, LedgerError, LedgerState, MAX_BATCH_BYTES, MAX_BATCH_RECORDS,
    Verdict,
};
use crate::metrics::{IngestState, Metrics};
use crate::store::{Store, StoreError};

/// Default number of records per batch (one durable write each). About
/// six batches are in memory at once (gathered, decoding, folded, being
/// written...), so this sets a part of the ingester's memory. Measured on
/// the 1M-event bench topic, by hand, interleaved, with sled's cache
/// bounded (session of 2026-11-30): 1,000 in 7.09-7.72 s at 164-167 MiB
/// peak RSS, 2,000 in 6.97-7.67 s at 175-182 MiB; 3M events: 1,000 in
/// 26.5 s at 253 MiB, 2,000 in 27.6 s at 265 MiB. (5,000 was slower and
/// larger still: 8.4 s at 214-218 MiB at 1M.)
pub const DEFAULT_BATCH_RECORDS: usize = 1_000;
/// Default bytes of record values per batch.
pub const DEFAULT_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// How long a batch waits for more records after its first one.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(50);
/// How long one poll blocks when no record is waiting.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// Timeout of metadata and watermark requests.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for dead-letter deliveries after each batch that has some.
const DEAD_LETTER_FLUSH: Duration = Duration::from_secs(30);
/// Suffix of the dead-letter topic's name.
pub const DEAD_LETTER_SUFFIX: &str = ".rejected";

/// librdkafka settings of the ledger's consumer.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("isolation.level", "read_committed"),
    ("enable.partition.eof", "false"),
    // Bound prefetched data: part of the ingester's memory budget. 4 MiB
    // and 2 MiB fetches ingest as fast as 16 MiB and 8 MiB did, with ~40 MiB
    // less peak RSS (1M-event ingest, 3 runs each: 10.6-11.3 s either way,
    // 278-281 -> 238-242 MiB).
    ("queued.max.messages.kbytes", "4096"),
    // And the size of one fetch response (default 50 MiB), which librdkafka
    // buffers whole before it queues the messages.
    ("fetch.max.bytes", "2097152"),
    // When that bound is reached, librdkafka postpones the partition's
    // next fetch by this much (default 1000 ms). The ingester drains what
    // is queued in well under a second, so with the default it stood idle
    // for about half of every second (measured: 6 s of a 15 s, 1M-event
    // ingest).
    ("fetch.queue.backoff.ms", "20"),
    ("statistics.interval.ms", "5000"),
];

/// Whether to stop once caught up or run until told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Assign all partitions, stop at the high watermarks seen at start.
    UntilCaughtUp,
    /// Join the consumer group and run until stopped.
    Continuous,
}

/// How to ingest.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// Kafka connection.
    pub kafka: KafkaSettings,
    /// Topic of deal events.
    pub topic: String,
    /// Consumer group (offsets committed there for lag monitoring).
    pub group_id: String,
    /// Static group membership id (continuous mode), so a restarted daemon
    /// takes its partitions back at once instead of waiting for the old
    /// member's session to time out.
    pub instance_id: Option<String>,
    /// Dead-letter topic; `None` disables publishing.
    pub dead_letter_topic: Option<String>,
    /// Records per batch (at most [`MAX_BATCH_RECORDS`]).
    pub batch_records: usize,
    /// Value bytes per batch (at most [`MAX_BATCH_BYTES`]).
    pub batch_bytes: usize,
    /// Wait after a batch's first record.
    pub linger: Duration,
    /// The mode.
    pub mode: Mode,
}

impl IngestConfig {
    /// Defaults for `topic`, in `mode`.
    pub fn new(kafka: KafkaSettings, topic: impl Into<String>, mode: Mode) -> Self {
        let topic = topic.into();
        IngestConfig {
            kafka,
            dead_letter_topic: Some(format!("{topic}{DEAD_LETTER_SUFFIX}")),
            topic,
            group_id: "dealledger".into(),
            instance_id: None,
            batch_records: DEFAULT_BATCH_RECORDS,
            batch_bytes: DEFAULT_BATCH_BYTES,
            linger: DEFAULT_LINGER,
            mode,
        }
    }
}

/// Why ingestion stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Bad Kafka settings.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A Kafka client could not be created or a request failed.
    #[error("Kafka: {what}: {source}")]
    Kafka {
        /// What was being done.
        what: String,
        /// The client error.
        source: KafkaError,
    },
    /// The topic does not exist.
    #[error(
        "topic {topic:?} does not exist on {brokers}; create it first (ops/kafka/topic create {topic})"
    )]
    NoTopic {
        /// The topic.
        topic: String,
        /// The brokers asked.
        brokers: String,
    },
    /// The ledger store failed; the batch in flight was not acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The state machine refused a record (see the message for partition and offset).
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// The writer thread could not be started or stopped unexpectedly.
    #[error("ledger writer: {0}")]
    Writer(String),
    /// The rebalance callback could not read stored positions.
    #[error("could not read stored positions during a partition assignment: {0}")]
    Positions(String),
    /// The broker refused the credentials or its certificate is not trusted
    /// (librdkafka would retry forever; retrying cannot fix it).
    #[error(transparent)]
    Security(#[from] SecurityFailure),
}

/// Per-stream state at the end of a run.
#[derive(Clone, Debug, Serialize)]
pub struct StreamSummary {
    /// Kafka partition.
    pub partition: i32,
    /// Entries in the stream.
    pub entries: u64,
    /// Sequence number of the last entry.
    pub head_seq: Option<u64>,
    /// Hash of the last entry (or the genesis value of an empty stream).
    pub head_hash: String,
    /// Next Kafka offset to read.
    pub next_offset: i64,
}

/// What one run of the ingester did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IngestSummary {
    /// Topic ingested.
    pub topic: String,
    /// Every stream of the ledger.
    pub streams: Vec<StreamSummary>,
    /// Entries written by this run.
    pub ingested: u64,
    /// Of which accepted.
    pub accepted: u64,
    /// Of which rejected.
    pub rejected: u64,
    /// Of which duplicates.
    pub duplicate: u64,
    /// Batches written.
    pub batches: u64,
    /// Messages dropped because their partition was revoked mid-batch.
    pub dropped_revoked: u64,
    /// Records skipped because they were already in the ledger.
    pub skipped_stale: u64,
    /// Seconds this run took.
    pub seconds: f64,
}

impl IngestSummary {
    /// Builds the per-stream part from the state.
    fn streams_of(state: &LedgerState) -> Vec<StreamSummary> {
        state
            .heads()
            .iter()
            .map(|(p, head)| StreamSummary {
                partition: *p,
                entries: head.next_seq(),
                head_seq: head.next_seq().checked_sub(1),
                head_hash: head.head().to_string(),
                next_offset: state.next_offset(*p),
            })
            .collect()
    }
}

/// Assignment epochs: bumped on every assign and revoke of a partition.
#[derive(Default)]
struct Epochs {
    current: Mutex<HashMap<i32, u64>>,
    counter: AtomicU64,
}

impl Epochs {
    fn assign(&self, partitions: &[i32]) {
        let mut current = self.current.lock().expect("epochs lock");
        for p in partitions {
            current.insert(*p, self.counter.fetch_add(1, Ordering::Relaxed) + 1);
        }
    }
    fn revoke(&self, partitions: &[i32]) {
        let mut current = self.current.lock().expect("epochs lock");
        for p in partitions {
            current.remove(p);
        }
    }
    fn of(&self, partition: i32) -> Option<u64> {
        self.current
            .lock()
            .expect("epochs lock")
            .get(&partition)
            .copied()
    }
}

/// The consumer's context: positions from the store, epochs, Kafka health.
struct LedgerContext {
    store: Arc<Store>,
    topic: String,
    epochs: Epochs,
    metrics: Arc<Metrics>,
    /// Set when a rebalance could not be served; the loop stops with it.
    fatal: Mutex<Option<String>>,
    /// The first authentication or certificate failure; startup and the loop stop with it.
    security: std::sync::OnceLock<SecurityFailure>,
}

impl LedgerContext {
    /// Stored next offset of every partition of the ledger.
    fn stored_positions(&self) -> Result<HashMap<i32, i64>, StoreError> {
        Ok(self
            .store
            .heads()?
            .into_iter()
            .map(|h| (h.stream().partition, h.last_offset().map_or(0, |o| o + 1)))
            .collect())
    }
}

impl ClientContext for LedgerContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if let Some(failure) = SecurityFailure::from_log(fac, message) {
            let _ = self.security.set(failure);
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(failure) = SecurityFailure::classify(&error, reason) {
            // Logged once, by the check that stops ingestion.
            self.metrics
                .set_kafka_status(false, Some(failure.to_string()));
            let _ = self.security.set(failure);
            return;
        }
        tracing::warn!(%error, reason, "Kafka client error");
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
                | Some(rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure)
        ) {
            self.metrics
                .set_kafka_status(false, Some(reason.to_string()));
        }
    }

    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.metrics
            .set_kafka_status(up, (!up).then(|| "no broker connection is up".to_string()));
        if let Some(topic) = stats.topics.get(&self.topic) {
            for (p, partition) in &topic.partitions {
                if *p >= 0 && partition.hi_offset >= 0 {
                    self.metrics.set_high_watermark(*p, partition.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for LedgerContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let positions = match self.stored_positions() {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read stored positions; refusing the assignment");
                        *self.fatal.lock().expect("fatal lock") = Some(e.to_string());
                        let _ = consumer.unassign();
                        return;
                    }
                };
                for p in &partitions {
                    let offset = positions
                        .get(p)
                        .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                    if let Err(e) = tpl.set_partition_offset(&self.topic, *p, offset) {
                        tracing::error!(partition = p, error = %e, "cannot set the stored offset in the assignment");
                    }
                }
                self.epochs.assign(&partitions);
                tracing::info!(?partitions, "partitions assigned at their stored positions");
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assign failed");
                    *self.fatal.lock().expect("fatal lock") = Some(format!("assign failed: {e}"));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.epochs.revoke(&partitions);
                tracing::info!(?partitions, "partitions revoked");
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.epochs.revoke(&partitions);
                let _ = consumer.unassign();
            }
        }
    }
}

/// A polled message, owned, with the assignment epoch it was polled under.
struct Polled {
    epoch: Option<u64>,
    record: Record,
}

fn to_record(m: &BorrowedMessage<'_>) -> Record {
    let (timestamp_type, timestamp_ms) = match m.timestamp() {
        rdkafka::Timestamp::NotAvailable => (TimestampType::NotAvailable, 0),
        rdkafka::Timestamp::CreateTime(t) => (TimestampType::CreateTime, t),
        rdkafka::Timestamp::LogAppendTime(t) => (TimestampType::LogAppendTime, t),
    };
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    name: h.key.to_string(),
                    value: h.value.map(<[u8]>::to_vec),
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_type,
        timestamp_ms,
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// Publishes rejected and duplicate entries to the dead-letter topic.
struct DeadLetters {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
}

impl DeadLetters {
    fn publish(&self, batch: &BatchWrite, metrics: &Metrics) {
        let mut sent = 0;
        for (entry, outcome) in batch.entries.iter().zip(&batch.outcomes) {
            if outcome.verdict == Verdict::Accepted {
                continue;
            }
            let r = &entry.record;
            let partition = r.partition.to_string();
            let offset = r.offset.to_string();
            let seq = entry.seq.to_string();
            let hash = entry.hash.to_string();
            let reason = outcome.verdict.reason().unwrap_or_default();
            let headers = OwnedHeaders::new()
                .insert(rdkafka::message::Header {
                    key: "dealledger.verdict",
                    value: Some(outcome.verdict.label()),
                })
                .insert(rdkafka::message::Header {
                    key: "dealledger.kind",
                    value: Some(outcome.verdict.kind().unwrap_or("")),
                })
                .insert(rdkafka::message::Header {
                    key: "dealledger.reason",
                    value: Some(reason.as_str()),
                })
                .insert(rdkafka::message::Header {
                    key: "dealledger.source.topic",
                    value: Some(r.topic.as_str()),
                })
                .insert(rdkafka::message::Header {
                    key: "dealledger.source.partition",
                    value: Some(partition.as_str()),
                })
                .insert(rdkafka::message::Header {
                    key: "dealledger.source.offset",
                    value: Some(offset.as_str()),
                })
                .insert(rdkafka::message::Header {
                    key: "dealledger.entry.seq",
                    value: Some(seq.as_str()),
                })
                .insert(rdkafka::message::Header {
                    key: "dealledger.entry.hash",
                    value: Some(hash.as_str()),
                });
            let mut record: BaseRecord<'_, [u8], [u8]> =
                BaseRecord::to(&self.topic).headers(headers);
            if let Some(k) = r.key.as_deref() {
                record = record.key(k);
            }
            if let Some(v) = r.value.as_deref() {
                record = record.payload(v);
            }
            match self.producer.send(record) {
                Ok(()) => sent += 1,
                Err((e, _)) => {
                    tracing::warn!(error = %e, partition = r.partition, offset = r.offset, "dead-letter publish failed");
                    metrics.dead_letter(false);
                }
            }
        }
        if sent > 0 {
            match self.producer.flush(DEAD_LETTER_FLUSH) {
                Ok(()) => (0..sent).for_each(|_| metrics.dead_letter(true)),
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter deliveries not confirmed");
                    (0..sent).for_each(|_| metrics.dead_letter(false));
                }
            }
        }
    }
}

fn kafka_err(what: impl Into<String>) -> impl FnOnce(KafkaError) -> IngestError {
    let what = what.into();
    move |source| IngestError::Kafka { what, source }
}

/// Creates the dead-letter topic if it does not exist, with as many
/// partitions as the source topic.
fn ensure_topic(settings: &KafkaSettings, topic: &str, partitions: i32) -> Result<(), IngestError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config(&[])?
        .create()
        .map_err(kafka_err("creating an admin client"))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1");
    let results = futures::executor::block_on(admin.create_topics(&[new], &AdminOptions::new()))
        .map_err(kafka_err(format!("creating topic {topic}")))?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(topic, "created the dead-letter topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(IngestError::Kafka {
                    what: format!("creating topic {t}"),
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

/// The ledger state shared by the ingester, its only writer, and the query
/// API's readers. The ingester holds the write lock only while it applies a
/// batch in memory (milliseconds), never while it waits for Kafka or disk.
/// Readers may see a batch before it is durable; what they cite from the
/// store is there once the writer catches up (see [`crate::api`]).
pub type SharedState = Arc<RwLock<LedgerState>>;

/// Reads the shared state. A writer that panicked leaves the state as it
/// was before its batch, so reading on is safe.
pub fn read_state(state: &RwLock<LedgerState>) -> RwLockReadGuard<'_, LedgerState> {
    state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the ingester until caught up (or stopped), starting from `state`
/// (loaded from `store`). Returns what it did.
pub fn run(
    config: &IngestConfig,
    store: Arc<Store>,
    state: SharedState,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> Result<IngestSummary, IngestError> {
    assert!(
        (1..=MAX_BATCH_RECORDS).contains(&config.batch_records),
        "batch size must be 1..={MAX_BATCH_RECORDS}"
    );
    assert!(
        (1..=MAX_BATCH_BYTES).contains(&config.batch_bytes),
        "batch bytes must be 1..={MAX_BATCH_BYTES}"
    );
    let started = Instant::now();
    metrics.set_ingest_state(IngestState::Starting);
    let mut client = config.kafka.client_config(CONSUMER_DEFAULTS)?;
    client.set("group.id", &config.group_id);
    if config.mode == Mode::Continuous
        && let Some(id) = &config.instance_id
    {
        client.set("group.instance.id", id);
    }
    let context = LedgerContext {
        store: Arc::clone(&store),
        topic: config.topic.clone(),
        epochs: Epochs::default(),
        metrics: Arc::clone(&metrics),
        fatal: Mutex::new(None),
        security: std::sync::OnceLock::new(),
    };
    let consumer: BaseConsumer<LedgerContext> = client
        .create_with_context(context)
        .map_err(kafka_err("creating the consumer"))?;

    // Discover the topic (retrying while the broker is unreachable) and,
    // in until-caught-up mode, the high watermarks to reach.
    let partitions = wait_for_partitions(&consumer, config, &metrics, &stop)?;
    let Some(partitions) = partitions else {
        return Ok(finish(
            &config.topic,
            &read_state(&state),
            IngestSummary::default(),
            started,
        ));
    };
    if let Some(dlq) = &config.dead_letter_topic {
        ensure_topic(&config.kafka, dlq, partitions.len() as i32)?;
    }
    let dead_letters = match &config.dead_letter_topic {
        Some(topic) => Some(DeadLetters {
            producer: config
                .kafka
                .client_config(crate::producer::PRODUCER_DEFAULTS)?
                .create()
                .map_err(kafka_err("creating the dead-letter producer"))?,
            topic: topic.clone(),
        }),
        None => None,
    };

    let mut targets: BTreeMap<i32, i64> = BTreeMap::new();
    match config.mode {
        Mode::UntilCaughtUp => {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                let Some(high) = high_watermark(&consumer, config, *p, &stop)? else {
                    return Ok(finish(
                        &config.topic,
                        &read_state(&state),
                        IngestSummary::default(),
                        started,
                    ));
                };
                targets.insert(*p, high);
                metrics.set_high_watermark(*p, high);
                let next = read_state(&state).next_offset(*p);
                let offset = if next == 0 {
                    Offset::Beginning
                } else {
                    Offset::Offset(next)
                };
                tpl.add_partition_offset(&config.topic, *p, offset)
                    .map_err(kafka_err("building the assignment"))?;
            }
            consumer.context().epochs.assign(&partitions);
            consumer
                .assign(&tpl)
                .map_err(kafka_err("assigning partitions"))?;
        }
        Mode::Continuous => {
            consumer
                .subscribe(&[&config.topic])
                .map_err(kafka_err(format!("subscribing to {}", config.topic)))?;
        }
    }
    for (p, head) in read_state(&state).heads() {
        metrics.set_position(*p, head.last_offset().map_or(0, |o| o + 1));
    }
    metrics.set_ingest_state(IngestState::Running);

    let mut summary = IngestSummary {
        topic: config.topic.clone(),
        ..Default::default()
    };
    let writer = Writer::start(Arc::clone(&store), dead_letters, Arc::clone(&metrics))?;
    let outcome = ingest_loop(
        &consumer,
        config,
        &state,
        &store,
        &writer,
        &metrics,
        &stop,
        &targets,
        &mut summary,
    );
    // Whatever ended the loop, wait for the batches already handed to the writer.
    let drained = writer
        .finish(|written| acknowledge(&consumer, &config.topic, written, &metrics, &mut summary));
    outcome?;
    drained?;
    snapshot(&store, &read_state(&state));
    metrics.set_ingest_state(IngestState::Stopping);
    if config.mode == Mode::Continuous {
        // Leave the group now rather than after the session timeout.
        consumer.unsubscribe();
    }
    let state = read_state(&state);
    Ok(finish(&config.topic, &state, summary, started))
}

/// Gathers, applies and hands batches to the writer until caught up or stopped.
#[allow(clippy::too_many_arguments)]
fn ingest_loop(
    consumer: &BaseConsumer<LedgerContext>,
    config: &IngestConfig,
    state: &RwLock<LedgerState>,
    store: &Store,
    writer: &Writer,
    metrics: &Metrics,
    stop: &AtomicBool,
    targets: &BTreeMap<i32, i64>,
    summary: &mut IngestSummary,
) -> Result<(), IngestError> {
    let decoder = start_decoder()?;
    // Entries the state held at its last snapshot (or at start: a restart
    // folds at most those after the latest snapshot again).
    let mut last_snapshot_at = read_state(state).entry_count();
    loop {
        if let Some(reason) = consumer.context().fatal.lock().expect("fatal lock").take() {
            metrics.set_ingest_state(IngestState::Failed(reason.clone()));
            return Err(IngestError::Positions(reason));
        }
        security_check(consumer, metrics)?;
        // Acknowledge whatever the writer has made durable meanwhile.
        while let Some(written) = writer.try_done()? {
            acknowledge(consumer, &config.topic, written, metrics, summary);
        }
        if decoder.in_flight() == 0
            && config.mode == Mode::UntilCaughtUp
            && caught_up(&read_state(state), targets)
        {
            return Ok(());
        }
        if stop.load(Ordering::Relaxed) {
            // Batches still at the decoder were never applied: they are
            // re-read from the stored positions next time.
            return Ok(());
        }
        let polled = gather(consumer, config, stop, metrics);
        let gathered = !polled.is_empty();
        if gathered {
            decoder.submit(polled)?;
        }
        // Fold the oldest decoded batch once the next one is being decoded
        // behind it, or at once when no new record came.
        if decoder.in_flight() == 0 || (gathered && decoder.in_flight() <= DECODE_AHEAD) {
            continue;
        }
        let decoded = decoder.recv()?;
        // Drop messages whose partition was revoked or re-assigned since they were polled.
        let mut records = Vec::with_capacity(decoded.len());
        for (m, value) in decoded {
            if m.epoch.is_some() && m.epoch == consumer.context().epochs.of(m.record.partition) {
                records.push((m.record, value));
            } else {
                summary.dropped_revoked += 1;
            }
        }
        if records.is_empty() {
            continue;
        }
        // The state now includes this batch. If the writer cannot make it
        // durable the ingester stops; a restart rebuilds the state from what is.
        let (write, after) = {
            let mut state = state
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let write = state.apply_decoded_batch(records, store)?;
            // A lookup the identity index on disk failed may have missed a
            // duplicate: the batch is not stored.
            store.check_derived(&state)?;
            (write, state.entry_count())
        };
        if let Some(written) = writer.submit(write)? {
            acknowledge(consumer, &config.topic, written, metrics, summary);
        }
        if snapshot_due(last_snapshot_at, after, snapshot_every()) {
            last_snapshot_at = after;
            // A snapshot is of the stored ledger: let the writer catch up first.
            while writer.in_flight() > 0 {
                acknowledge(
                    consumer,
                    &config.topic,
                    writer.wait_done()?,
                    metrics,
                    summary,
                );
            }
            snapshot(store, &read_state(state));
        }
    }
}

/// Fewest entries between two periodic snapshots of the state (there is
/// one at clean shutdown too); see [`snapshot_due`] for the rule. Each
/// snapshot pauses ingestion for about half a second per million entries
/// held (3M-event ingest, 2 cores).
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 500_000;

/// Whether to snapshot now that the state holds `now` entries, its last
/// snapshot having been at `last`: once `max(every, last / 2)` entries were
/// added since (`every` 0: never). A snapshot costs time in proportion to
/// the state, so a fixed interval would make the pauses grow with the
/// ledger, without bound (at 3M events they took 10 % of the ingest); an
/// interval that grows with the state keeps their share of the time
/// bounded, at the price of a restart folding again at most a third of the
/// ledger (the entries after the latest snapshot) rather than
/// [`SNAPSHOT_EVERY_ENTRIES`].
pub fn snapshot_due(last: u64, now: u64, every: u64) -> bool {
    every > 0 && now.saturating_sub(last) >= every.max(last / 2)
}

/// [`SNAPSHOT_EVERY_ENTRIES`], unless `DEALLEDGER_SNAPSHOT_EVERY` overrides it
/// (0 turns periodic snapshots off; the one at clean shutdown stays).
fn snapshot_every() -> u64 {
    std::env::var("DEALLEDGER_SNAPSHOT_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SNAPSHOT_EVERY_ENTRIES)
}

/// Snapshots the stored ledger's state, for faster restarts. A failure is
/// only logged: a store it leaves unusable fails the next batch.
fn snapshot(store: &Store, state: &LedgerState) {
    if let Err(e) = store.write_snapshot(state) {
        tracing::warn!("snapshot not written: {e}");
    }
}

/// One step of the ingest pipeline on its own thread: work goes in through a
/// bounded channel and results come back in the order given. The thread
/// ends when the input closes, when the output is dropped, or after a
/// result its work marks as the last ([`ControlFlow::Break`]: the writer
/// stops at its first failure).
struct Stage<In, Out> {
    /// What the stage is called in errors and thread names.
    name: &'static str,
    input: Option<std::sync::mpsc::SyncSender<In>>,
    output: Option<std::sync::mpsc::Receiver<Out>>,
    handle: Option<std::thread::JoinHandle<()>>,
    /// Items handed over and not yet taken back.
    in_flight: std::cell::Cell<usize>,
}

impl<In: Send + 'static, Out: Send + 'static> Stage<In, Out> {
    /// Starts the thread. At most `input_bound` items wait for it, and at
    /// most `output_bound` results wait to be taken back.
    fn start(
        name: &'static str,
        input_bound: usize,
        output_bound: usize,
        mut work: impl FnMut(In) -> ControlFlow<Out, Out> + Send + 'static,
    ) -> Result<Self, IngestError> {
        let (input, items) = std::sync::mpsc::sync_channel::<In>(input_bound);
        let (results, output) = std::sync::mpsc::sync_channel::<Out>(output_bound);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for item in items {
                    match work(item) {
                        ControlFlow::Continue(result) => {
                            if results.send(result).is_err() {
                                return;
                            }
                        }
                        ControlFlow::Break(last) => {
                            let _ = results.send(last);
                            return;
                        }
                    }
                }
            })
            .map_err(|e| IngestError::Writer(format!("cannot start the {name} thread: {e}")))?;
        Ok(Stage {
            name,
            input: Some(input),
            output: Some(output),
            handle: Some(handle),
            in_flight: std::cell::Cell::new(0),
        })
    }

    fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    fn stopped(&self) -> IngestError {
        IngestError::Writer(format!("the {} thread stopped", self.name))
    }

    /// Hands an item over (waits while `input_bound` items are queued).
    fn submit(&self, item: In) -> Result<(), IngestError> {
        self.input
            .as_ref()
            .expect("the stage is running")
            .send(item)
            .map_err(|_| self.stopped())?;
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(())
    }

    /// The oldest result not taken back (waits for it).
    fn recv(&self) -> Result<Out, IngestError> {
        assert!(
            self.in_flight.get() > 0,
            "nothing is in the {} thread",
            self.name
        );
        let result = self
            .output
            .as_ref()
            .expect("the stage is running")
            .recv()
            .map_err(|_| self.stopped())?;
        self.in_flight.set(self.in_flight.get() - 1);
        Ok(result)
    }

    /// The oldest result, if it is ready.
    fn try_recv(&self) -> Option<Out> {
        let result = self.output.as_ref()?.try_recv().ok()?;
        self.in_flight.set(self.in_flight.get() - 1);
        Some(result)
    }
}

impl<In, Out> Stage<In, Out> {
    /// Closes both channels and waits for the thread, which then sees no
    /// more items or fails to hand a result back, and ends (results not
    /// taken back are dropped).
    fn stop(&mut self) {
        drop(self.input.take());
        drop(self.output.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl<In, Out> Drop for Stage<In, Out> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Batches gathered and being decoded ahead of the one being folded.
const DECODE_AHEAD: usize = 1;

/// The decoder thread: decodes each gathered batch's values
/// ([`ledger::decode_record`], pure) while the loop folds the previous
/// batch, so JSON parsing and validation, the largest part of judging, run
/// beside the fold instead of before it. Batches come back in the order
/// they were given.
type Decoder = Stage<Vec<Polled>, Vec<(Polled, Decoded)>>;

/// Starts the [`Decoder`].
fn start_decoder() -> Result<Decoder, IngestError> {
    Stage::start(
        "ledger-decoder",
        DECODE_AHEAD,
        DECODE_AHEAD,
        |batch: Vec<Polled>| {
            ControlFlow::Continue(
                batch
                    .into_iter()
                    .map(|m| {
                        let value = ledger::decode_record(&m.record);
                        (m, value)
                    })
                    .collect(),
            )
        },
    )
}

/// Most batches applied in memory but not yet durable: one batch is gathered
/// and applied while the previous one is being written.
const PIPELINE_DEPTH: usize = 1;

/// A batch the writer made durable (its entries already dropped).
struct Written {
    write: BatchWrite,
}

/// The writer thread: makes batches durable in order, then publishes their
/// dead letters. Nothing is acknowledged before it is durable; after a
/// failed write it stops (that batch's error is its last result).
struct Writer(Stage<BatchWrite, Result<Written, StoreError>>);

impl Writer {
    fn start(
        store: Arc<Store>,
        dead_letters: Option<DeadLetters>,
        metrics: Arc<Metrics>,
    ) -> Result<Writer, IngestError> {
        // Results wait for the loop: at most the batches in flight.
        let stage = Stage::start(
            "ledger-writer",
            PIPELINE_DEPTH,
            PIPELINE_DEPTH + 1,
            move |mut write: BatchWrite| {
                match store.write_batch(&write) {
                    Ok(stats) => {
                        metrics.batch_written(
                            stats.entries,
                            stats.bytes,
                            stats.apply,
                            stats.durable,
                        );
                        if let Some(dlq) = &dead_letters {
                            dlq.publish(&write, &metrics);
                        }
                        // Acknowledging needs the outcomes and heads, not the
                        // entries: free them here, off the ingest loop's thread.
                        write.entries = Vec::new();
                        ControlFlow::Continue(Ok(Written { write }))
                    }
                    Err(e) => {
                        metrics.set_ingest_state(IngestState::Failed(e.to_string()));
                        ControlFlow::Break(Err(e))
                    }
                }
            },
        )?;
        Ok(Writer(stage))
    }

    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }

    /// Hands a batch over; when the pipeline is full, first waits for the
    /// oldest batch to become durable and returns it.
    fn submit(&self, write: BatchWrite) -> Result<Option<Written>, IngestError> {
        let mut acknowledged = None;
        if self.in_flight() >= PIPELINE_DEPTH {
            acknowledged = Some(self.wait_done()?);
        }
        self.0.submit(write)?;
        Ok(acknowledged)
    }

    /// The oldest batch in flight, once durable (waits for it).
    fn wait_done(&self) -> Result<Written, IngestError> {
        Ok(self.0.recv()??)
    }

    /// A batch made durable since the last call, if any.
    fn try_done(&self) -> Result<Option<Written>, IngestError> {
        match self.0.try_recv() {
            Some(result) => Ok(Some(result?)),
            None => Ok(None),
        }
    }

    /// Waits for every batch in flight, acknowledging each, then stops the thread.
    fn finish(mut self, mut acknowledge: impl FnMut(Written)) -> Result<(), IngestError> {
        let mut first_error = None;
        while self.in_flight() > 0 {
            match self.wait_done() {
                Ok(written) => acknowledge(written),
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
        }
        self.0.stop();
        first_error.map_or(Ok(()), Err)
    }
}

/// A batch is durable: count it, report it, and commit its positions to Kafka.
fn acknowledge(
    consumer: &BaseConsumer<LedgerContext>,
    topic: &str,
    written: Written,
    metrics: &Metrics,
    summary: &mut IngestSummary,
) {
    let write = written.write;
    summary.batches += 1;
    summary.skipped_stale += write.skipped_stale;
    for outcome in &write.outcomes {
        summary.ingested += 1;
        match outcome.verdict {
            Verdict::Accepted => summary.accepted += 1,
            Verdict::Rejected { .. } => summary.rejected += 1,
            Verdict::Duplicate { .. } => summary.duplicate += 1,
        }
    }
    metrics.record_outcomes(&write.outcomes);
    commit_positions(consumer, topic, &write, metrics);
}

fn finish(
    topic: &str,
    state: &LedgerState,
    mut summary: IngestSummary,
    started: Instant,
) -> IngestSummary {
    summary.topic = topic.to_string();
    summary.streams = IngestSummary::streams_of(state);
    summary.seconds = started.elapsed().as_secs_f64();
    summary
}

/// How long one attempt to reach Kafka at start waits for an answer: short,
/// so that a broker that appears is noticed soon (the backoff comes on top).
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after the first failed attempt to reach Kafka at start; doubled
/// after each further failure, up to [`CONNECT_BACKOFF_MAX`].
const CONNECT_BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// Longest pause between two attempts to reach Kafka at start.
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Waits until the topic's metadata can be read, retrying with backoff
/// while Kafka is unreachable (health: degraded, "kafka unreachable");
/// `None` if stopped first.
fn wait_for_partitions(
    consumer: &BaseConsumer<LedgerContext>,
    config: &IngestConfig,
    metrics: &Metrics,
    stop: &AtomicBool,
) -> Result<Option<Vec<i32>>, IngestError> {
    let mut backoff = CONNECT_BACKOFF_FIRST;
    loop {
        match consumer.fetch_metadata(Some(&config.topic), CONNECT_ATTEMPT_TIMEOUT) {
            Ok(md) => {
                let topic = md.topics().first();
                let missing = topic.is_none_or(|t| {
                    t.partitions().is_empty()
                        || t.error()
                            == Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
                });
                if missing {
                    return Err(IngestError::NoTopic {
                        topic: config.topic.clone(),
                        brokers: config.kafka.brokers.clone(),
                    });
                }
                metrics.set_kafka_status(true, None);
                let mut ps: Vec<i32> = topic
                    .expect("checked above")
                    .partitions()
                    .iter()
                    .map(|p| p.id())
                    .collect();
                ps.sort_unstable();
                return Ok(Some(ps));
            }
            Err(e) => {
                serve_client_events(consumer);
                security_check(consumer, metrics)?;
                metrics.set_kafka_status(false, Some(format!("cannot read metadata: {e}")));
                tracing::warn!(error = %e, brokers = %config.kafka.brokers, "Kafka unreachable; retrying in {backoff:?}");
                if !sleep_unless_stopped(backoff, stop) {
                    return Ok(None);
                }
                backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
            }
        }
    }
}

/// Sleeps for `duration`, checking `stop` every 50 ms; false if it was set.
fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// How long `ingest --until-caught-up` keeps retrying to read a
/// partition's high watermark while the cluster answers that the partition
/// has no leader yet (a broker that just started, a leader moving).
const WATERMARK_RETRY_LIMIT: Duration = Duration::from_secs(60);

/// Whether reading a watermark failed for a reason that passes by itself.
fn is_transient(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::NotLeaderForPartition
                | Code::LeaderNotAvailable
                | Code::RequestTimedOut
                | Code::BrokerNotAvailable
                | Code::OperationTimedOut
                | Code::AllBrokersDown
                | Code::BrokerTransportFailure
        )
    )
}

/// The high watermark of `partition`, retried with backoff for up to
/// [`WATERMARK_RETRY_LIMIT`] while the failure is transient; `None` if
/// asked to stop meanwhile.
fn high_watermark(
    consumer: &BaseConsumer<LedgerContext>,
    config: &IngestConfig,
    partition: i32,
    stop: &AtomicBool,
) -> Result<Option<i64>, IngestError> {
    retry_transient(
        &format!("the high watermark of partition {partition}"),
        || consumer.fetch_watermarks(&config.topic, partition, METADATA_TIMEOUT),
        WATERMARK_RETRY_LIMIT,
        stop,
    )
    .map(|high| high.map(|(_, high)| high))
    .map_err(|(e, waited)| {
        kafka_err(format!(
            "reading the high watermark of partition {partition} (for {waited:.0?})"
        ))(e)
    })
}

/// What `attempt` (reading `what`) gives, tried again with backoff (from
/// [`CONNECT_BACKOFF_FIRST`], doubling up to [`CONNECT_BACKOFF_MAX`]) while
/// it fails transiently ([`is_transient`]) and less than `limit` has
/// passed; `None` if `stop` is set meanwhile. A failure that is not
/// transient, or one past `limit`, is returned with the time spent.
fn retry_transient<T>(
    what: &str,
    mut attempt: impl FnMut() -> Result<T, KafkaError>,
    limit: Duration,
    stop: &AtomicBool,
) -> Result<Option<T>, (KafkaError, Duration)> {
    let started = Instant::now();
    let mut backoff = CONNECT_BACKOFF_FIRST;
    loop {
        match attempt() {
            Ok(value) => return Ok(Some(value)),
            Err(e) if is_transient(&e) && started.elapsed() + backoff < limit => {
                tracing::warn!(error = %e, "cannot read {what} yet; retrying in {backoff:?}");
                if !sleep_unless_stopped(backoff, stop) {
                    return Ok(None);
                }
                backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
            }
            Err(e) => return Err((e, started.elapsed())),
        }
    }
}

/// Most client events served by one [`serve_client_events`].
const MAX_STARTUP_EVENTS: usize = 64;

/// Before any assignment: lets the consumer serve its queued client events
/// (errors reach [`LedgerContext`]'s `error` callback only when polled).
/// No message can arrive yet.
fn serve_client_events(consumer: &BaseConsumer<LedgerContext>) {
    for _ in 0..MAX_STARTUP_EVENTS {
        if consumer.poll(Duration::ZERO).is_none() {
            break;
        }
    }
}

/// Fails with the authentication or certificate failure the client reported, if any.
fn security_check(
    consumer: &BaseConsumer<LedgerContext>,
    metrics: &Metrics,
) -> Result<(), IngestError> {
    match consumer.context().security.get() {
        Some(failure) => {
            tracing::error!(%failure, "Kafka refused the connection; stopping");
            metrics.set_kafka_status(false, Some(failure.to_string()));
            metrics.set_ingest_state(IngestState::Failed(failure.to_string()));
            Err(IngestError::Security(failure.clone()))
        }
        None => Ok(()),
    }
}

/// Polls until the batch is full, its linger time is over, or nothing comes.
fn gather(
    consumer: &BaseConsumer<LedgerContext>,
    config: &IngestConfig,
    stop: &AtomicBool,
    metrics: &Metrics,
) -> Vec<Polled> {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    let mut first_at: Option<Instant> = None;
    while batch.len() < config.batch_records && bytes < config.batch_bytes {
        let timeout = match first_at {
            None => POLL_TIMEOUT,
            Some(t) => match config.linger.checked_sub(t.elapsed()) {
                Some(left) => left,
                None => break,
            },
        };
        match consumer.poll(timeout) {
            Some(Ok(m)) => {
                let epoch = consumer.context().epochs.of(m.partition());
                let record = to_record(&m);
                bytes += record.value.as_ref().map_or(0, Vec::len);
                batch.push(Polled { epoch, record });
                first_at.get_or_insert_with(Instant::now);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                if matches!(
                    e.rdkafka_error_code(),
                    Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
                ) {
                    metrics.set_kafka_status(false, Some(e.to_string()));
                }
                if first_at.is_none() {
                    break;
                }
            }
            None => {
                if first_at.is_none() || stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    }
    batch
}

fn caught_up(state: &LedgerState, targets: &BTreeMap<i32, i64>) -> bool {
    targets
        .iter()
        .all(|(p, high)| state.next_offset(*p) >= *high)
}

/// Commits a durable batch's positions to Kafka (for lag monitoring only)
/// and updates the position metrics.
fn commit_positions(
    consumer: &BaseConsumer<LedgerContext>,
    topic: &str,
    write: &BatchWrite,
    metrics: &Metrics,
) {
    let mut tpl = TopicPartitionList::new();
    for head in &write.heads {
        let p = head.stream().partition;
        let next = head.last_offset().map_or(0, |o| o + 1);
        metrics.set_position(p, next);
        if tpl
            .add_partition_offset(topic, p, Offset::Offset(next))
            .is_err()
        {
            continue;
        }
    }
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
    {
        tracing::debug!(error = %e, "offset commit to Kafka failed (lag monitoring only)");
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::types::RDKafkaErrorCode;

    fn not_leader() -> KafkaError {
        KafkaError::MetadataFetch(RDKafkaErrorCode::NotLeaderForPartition)
    }

    #[test]
    fn a_transient_failure_is_retried_until_it_passes() {
        let stop = AtomicBool::new(false);
        let mut attempts = 0;
        let got = retry_transient(
            "a value",
            || {
                attempts += 1;
                if attempts < 3 {
                    Err(not_leader())
                } else {
                    Ok(42)
                }
            },
            Duration::from_secs(60),
            &stop,
        );
        assert_eq!(got.unwrap(), Some(42));
        assert_eq!(attempts, 3);
    }

    #[test]
    fn a_lasting_or_other_failure_is_returned() {
        let stop = AtomicBool::new(false);
        // (failure, time allowed): not transient; transient, but the next
        // pause would end past the limit. Each is tried once.
        for (code, limit) in [
            (
                RDKafkaErrorCode::UnknownTopicOrPartition,
                Duration::from_secs(60),
            ),
            (
                RDKafkaErrorCode::NotLeaderForPartition,
                Duration::from_millis(100),
            ),
        ] {
            let mut attempts = 0;
            let got = retry_transient::<()>(
                "a value",
                || {
                    attempts += 1;
                    Err(KafkaError::MetadataFetch(code))
                },
                limit,
                &stop,
            );
            assert!(
                matches!(got, Err((KafkaError::MetadataFetch(c), _)) if c == code),
                "{code:?}"
            );
            assert_eq!(attempts, 1, "{code:?}");
        }
    }

    #[test]
    fn a_stop_ends_the_retries() {
        let stop = AtomicBool::new(true);
        let got = retry_transient::<()>(
            "a value",
            || Err(not_leader()),
            Duration::from_secs(60),
            &stop,
        );
        assert!(matches!(got, Ok(None)));
    }

    use super::*;

    /// Where periodic snapshots fall for a ledger ingested from empty in
    /// batches of `batch` up to `total` entries.
    fn snapshot_points(total: u64, batch: u64, every: u64) -> Vec<u64> {
        let mut last = 0;
        let mut points = Vec::new();
        for now in (batch..=total).step_by(batch as usize) {
            if snapshot_due(last, now, every) {
                points.push(now);
                last = now;
            }
        }
        points
    }

    #[test]
    fn snapshots_come_every_interval_then_at_half_the_state() {
        assert_eq!(
            snapshot_points(3_000_000, 5_000, 500_000),
            [500_000, 1_000_000, 1_500_000, 2_250_000]
        );
        assert!(snapshot_points(3_000_000, 5_000, 0).is_empty());
        // A restart that loaded a state of 2M entries snapshots 1M later.
        assert!(!snapshot_due(2_000_000, 2_999_999, 500_000));
        assert!(snapshot_due(2_000_000, 3_000_000, 500_000));
    }

    #[test]
    fn snapshot_work_stays_proportional_to_the_ledger() {
        for total in [1_000_000u64, 10_000_000, 100_000_000] {
            let points = snapshot_points(total, 5_000, SNAPSHOT_EVERY_ENTRIES);
            // Each snapshot costs in proportion to the entries it holds.
            let held: u64 = points.iter().sum();
            assert!(held <= 4 * total, "{total}: {held}");
            // A restart folds again at most a third of the ledger.
            let after_last = total - points.last().copied().unwrap_or(0);
            assert!(
                after_last <= (total / 3).max(SNAPSHOT_EVERY_ENTRIES),
                "{total}: {after_last}"
            );
        }
    }
}
