//! The daemon's counters, gauges and health, shared between the ingest
//! thread (which writes them) and the HTTP handlers (which read them).
//!
//! Why it exists: operators need to see, without reading logs, whether the
//! daemon is consuming (consumer lag per partition), what it makes of the data
//! (verdicts and rejection kinds), how storage keeps up (batch sizes, flush
//! latency) and whether Kafka is reachable. [`Metrics`] holds all of that;
//! `GET /metrics` renders it in the Prometheus text format and `GET /health`
//! summarises it as a [`Health`] document (see [`crate::api`]).
//!
//! The set of metrics is small and fixed, so it is written by hand rather than
//! through a metrics registry crate: no global state, and label cardinality
//! stays under our control. The one label whose values come from data, the
//! rejection `kind`, is bounded by [`MAX_KINDS`].
//!
//! Writers are lock-light: plain atomics, plus two mutexes (per-partition
//! values and rejection kinds) that are taken a few times per batch. Every
//! lock recovers from poisoning, so a panic elsewhere can never make metrics
//! take the ingest thread down with it.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ledger::{MAX_BATCH_RECORDS, Outcome, Verdict};

/// Most distinct rejection kinds counted under their own label; further
/// kinds are counted under [`OTHER_KIND`]. Kinds come from data, so they
/// must not grow the exposition without bound.
pub const MAX_KINDS: usize = 64;

/// Longest rejection kind, in bytes, counted under its own label; longer
/// kinds are counted under [`OTHER_KIND`].
pub const MAX_KIND_LEN: usize = 64;

/// The `kind` label of rejections beyond [`MAX_KINDS`] or [`MAX_KIND_LEN`].
pub const OTHER_KIND: &str = "other";

/// The `kind` label of a rejection reported without a kind.
pub const UNKNOWN_KIND: &str = "unknown";

/// Longest Kafka status detail or ingest failure message kept, in bytes;
/// longer ones are cut (at a character boundary) and end with `…`.
pub const MAX_DETAIL_LEN: usize = 512;

/// Upper bounds of the `dealledger_batch_entries` histogram buckets, in
/// entries. The last is [`MAX_BATCH_RECORDS`], the largest possible batch.
pub const BATCH_ENTRIES_BUCKETS: &[f64] =
    &[1.0, 10.0, 100.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0];

const _: () = assert!(
    BATCH_ENTRIES_BUCKETS[BATCH_ENTRIES_BUCKETS.len() - 1] as usize == MAX_BATCH_RECORDS,
    "the last batch-size bucket must be the largest possible batch"
);

/// Upper bounds of the `dealledger_flush_seconds` histogram buckets, in
/// seconds.
pub const FLUSH_SECONDS_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const NANOS_PER_SECOND: f64 = 1e9;

/// What the ingest loop is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "error", rename_all = "snake_case")]
pub enum IngestState {
    /// Opening storage, replaying, joining the consumer group.
    #[default]
    Starting,
    /// Consuming and writing batches.
    Running,
    /// Shutting down: finishing the current batch, committing offsets.
    Stopping,
    /// Stopped on an error it cannot recover from; the message says which.
    Failed(String),
}

impl IngestState {
    /// `starting`, `running`, `stopping` or `failed`.
    pub fn label(&self) -> &'static str {
        match self {
            IngestState::Starting => "starting",
            IngestState::Running => "running",
            IngestState::Stopping => "stopping",
            IngestState::Failed(_) => "failed",
        }
    }
}

/// The one-word summary of [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Ingest is running and Kafka is reachable.
    Ok,
    /// Ingest is running but Kafka is not reachable, ingest is starting and
    /// Kafka has not answered yet (it keeps retrying), or ingest is stopping.
    Degraded,
    /// Ingest has not started consuming yet.
    Starting,
    /// Ingest stopped on an error.
    Failed,
}

impl HealthStatus {
    /// `ok`, `degraded`, `starting` or `failed`.
    pub fn label(self) -> &'static str {
        match self {
            HealthStatus::Ok => "ok",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Starting => "starting",
            HealthStatus::Failed => "failed",
        }
    }

    /// The status implied by the ingest state and Kafka connectivity. A
    /// failure wins; Kafka being unreachable makes a running ingester
    /// degraded, and a starting one too once a connection attempt has failed
    /// (`kafka.detail` is set): the daemon is up and retrying, but it cannot
    /// ingest.
    pub fn from_parts(ingest: &IngestState, kafka: &KafkaHealth) -> Self {
        match ingest {
            IngestState::Failed(_) => HealthStatus::Failed,
            IngestState::Starting if kafka_unreachable(kafka) => HealthStatus::Degraded,
            IngestState::Starting => HealthStatus::Starting,
            IngestState::Stopping => HealthStatus::Degraded,
            IngestState::Running if kafka.connected => HealthStatus::Ok,
            IngestState::Running => HealthStatus::Degraded,
        }
    }
}

/// Kafka is known to be unreachable: not connected, and a failure was reported.
fn kafka_unreachable(kafka: &KafkaHealth) -> bool {
    !kafka.connected && kafka.detail.is_some()
}

/// Why the status is not `ok`, one line per reason, most important first
/// (empty when it is ok): `ingest failed: ...`, `kafka unreachable: ...`,
/// `ingest stopping`, `ingest starting`.
pub fn health_reasons(ingest: &IngestState, kafka: &KafkaHealth) -> Vec<String> {
    let mut reasons = Vec::new();
    if let IngestState::Failed(error) = ingest {
        reasons.push(format!("ingest failed: {error}"));
    }
    if (!kafka.connected && *ingest != IngestState::Starting) || kafka_unreachable(kafka) {
        reasons.push(format!(
            "kafka unreachable: {}",
            kafka
                .detail
                .as_deref()
                .unwrap_or("no broker connection is up")
        ));
    }
    match ingest {
        IngestState::Stopping => reasons.push("ingest stopping".to_owned()),
        IngestState::Starting if !kafka_unreachable(kafka) => {
            reasons.push("ingest starting".to_owned())
        }
        _ => {}
    }
    reasons
}

/// Kafka connectivity, as last reported by librdkafka's callbacks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaHealth {
    /// Whether the client can reach the brokers.
    pub connected: bool,
    /// The last error or status message, if any.
    pub detail: Option<String>,
}

/// One partition's position and verdict counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionHealth {
    /// The Kafka partition (= ledger stream).
    pub partition: i32,
    /// Next offset ingest will consume, once known.
    pub next_offset: Option<i64>,
    /// The partition's high watermark, once known.
    pub high_watermark: Option<i64>,
    /// Records not yet consumed, when both offsets are known.
    pub lag: Option<i64>,
    /// Entries accepted since the daemon started.
    pub accepted: u64,
    /// Entries rejected since the daemon started.
    pub rejected: u64,
    /// Duplicate entries since the daemon started.
    pub duplicate: u64,
}

/// The `GET /health` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The one-word summary; see [`HealthStatus::from_parts`].
    pub status: HealthStatus,
    /// Kafka connectivity.
    pub kafka: KafkaHealth,
    /// What the ingest loop is doing.
    pub ingest: IngestState,
    /// Every partition seen, in partition order.
    pub partitions: Vec<PartitionHealth>,
    /// When the last batch was made durable (Unix milliseconds), if any.
    pub last_batch_unix_ms: Option<u64>,
    /// Why the status is not `ok` (see [`health_reasons`]); empty when ok.
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// Consumer lag of a partition: records at or after `next_offset` and below
/// the high watermark; never negative (the watermark can trail the position
/// between two metadata refreshes).
pub fn consumer_lag(next_offset: i64, high_watermark: i64) -> i64 {
    high_watermark.saturating_sub(next_offset).max(0)
}

/// The daemon's metrics. Create one as `Arc<Metrics>` and share it.
#[derive(Debug)]
pub struct Metrics {
    partitions: Mutex<BTreeMap<i32, PartitionStats>>,
    kinds: Mutex<Kinds>,
    kafka: Mutex<KafkaHealth>,
    ingest: Mutex<IngestState>,
    batches: AtomicU64,
    batch_bytes: AtomicU64,
    apply_nanos: AtomicU64,
    batch_entries: Histogram,
    flush_seconds: Histogram,
    /// 0 until the first batch.
    last_batch_unix_ms: AtomicU64,
    dead_letter_ok: AtomicU64,
    dead_letter_failed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics: ingest starting, Kafka not (yet) connected, all zero.
    pub fn new() -> Self {
        Metrics {
            partitions: Mutex::default(),
            kinds: Mutex::default(),
            kafka: Mutex::default(),
            ingest: Mutex::default(),
            batches: AtomicU64::new(0),
            batch_bytes: AtomicU64::new(0),
            apply_nanos: AtomicU64::new(0),
            batch_entries: Histogram::new(BATCH_ENTRIES_BUCKETS, 1.0),
            flush_seconds: Histogram::new(FLUSH_SECONDS_BUCKETS, NANOS_PER_SECOND),
            last_batch_unix_ms: AtomicU64::new(0),
            dead_letter_ok: AtomicU64::new(0),
            dead_letter_failed: AtomicU64::new(0),
        }
    }

    /// Counts one entry of `partition` with its verdict label (`accepted`,
    /// `rejected` or `duplicate`, see [`Verdict::label`]) and, for rejected
    /// entries, its kind ([`UNKNOWN_KIND`] when `None`). Any other verdict
    /// label is a caller bug: it panics in debug builds and is ignored in
    /// release builds.
    pub fn record(&self, partition: i32, verdict: &str, kind: Option<&str>) {
        let Some(slot) = VerdictSlot::from_label(verdict) else {
            debug_assert!(false, "unknown verdict label {verdict:?}");
            return;
        };
        lock(&self.partitions)
            .entry(partition)
            .or_default()
            .count(slot, 1);
        if slot == VerdictSlot::Rejected {
            lock(&self.kinds).count(kind.unwrap_or(UNKNOWN_KIND), 1);
        }
    }

    /// Counts every outcome of a batch, taking each lock once.
    pub fn record_outcomes(&self, outcomes: &[Outcome]) {
        if outcomes.is_empty() {
            return;
        }
        {
            let mut partitions = lock(&self.partitions);
            for outcome in outcomes {
                let slot = VerdictSlot::of(&outcome.verdict);
                partitions
                    .entry(outcome.location.partition)
                    .or_default()
                    .count(slot, 1);
            }
        }
        let mut kinds = lock(&self.kinds);
        for outcome in outcomes {
            if let Verdict::Rejected { kind, .. } = &outcome.verdict {
                kinds.count(kind, 1);
            }
        }
    }

    /// Records one batch made durable: `entries` entries of `bytes` value
    /// bytes, applied in `apply` and flushed to disk in `durable`.
    pub fn batch_written(&self, entries: usize, bytes: usize, apply: Duration, durable: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_bytes
            .fetch_add(saturating_u64(bytes as u128), Ordering::Relaxed);
        self.apply_nanos
            .fetch_add(saturating_u64(apply.as_nanos()), Ordering::Relaxed);
        self.batch_entries.observe(saturating_u64(entries as u128));
        self.flush_seconds
            .observe(saturating_u64(durable.as_nanos()));
        self.last_batch_unix_ms
            .store(unix_ms_now().max(1), Ordering::Relaxed);
    }

    /// Sets the next offset ingest will consume from `partition`. A negative
    /// offset (one of librdkafka's logical offsets) clears it.
    pub fn set_position(&self, partition: i32, next_offset: i64) {
        lock(&self.partitions)
            .entry(partition)
            .or_default()
            .next_offset = (next_offset >= 0).then_some(next_offset);
    }

    /// Sets the high watermark of `partition`. A negative value (librdkafka's
    /// "unknown") clears it.
    pub fn set_high_watermark(&self, partition: i32, hw: i64) {
        lock(&self.partitions)
            .entry(partition)
            .or_default()
            .high_watermark = (hw >= 0).then_some(hw);
    }

    /// Forgets the position and high watermark of a partition this consumer
    /// no longer owns (after a rebalance), so its lag is no longer reported.
    /// Its verdict counters are kept.
    pub fn unassign(&self, partition: i32) {
        if let Some(stats) = lock(&self.partitions).get_mut(&partition) {
            stats.next_offset = None;
            stats.high_watermark = None;
        }
    }

    /// Sets Kafka connectivity; called from librdkafka's error and statistics
    /// callbacks. `detail` is cut to [`MAX_DETAIL_LEN`] bytes.
    pub fn set_kafka_status(&self, connected: bool, detail: Option<String>) {
        *lock(&self.kafka) = KafkaHealth {
            connected,
            detail: detail.map(|d| truncate(d, MAX_DETAIL_LEN)),
        };
    }

    /// Sets what the ingest loop is doing. A failure message is cut to
    /// [`MAX_DETAIL_LEN`] bytes.
    pub fn set_ingest_state(&self, state: IngestState) {
        let state = match state {
            IngestState::Failed(message) => IngestState::Failed(truncate(message, MAX_DETAIL_LEN)),
            other => other,
        };
        *lock(&self.ingest) = state;
    }

    /// Counts one publish to the dead-letter topic, successful or not.
    pub fn dead_letter(&self, ok: bool) {
        let counter = if ok {
            &self.dead_letter_ok
        } else {
            &self.dead_letter_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The current health summary.
    pub fn health(&self) -> Health {
        let kafka = lock(&self.kafka).clone();
        let ingest = lock(&self.ingest).clone();
        let partitions = lock(&self.partitions)
            .iter()
            .map(|(&partition, stats)| PartitionHealth {
                partition,
                next_offset: stats.next_offset,
                high_watermark: stats.high_watermark,
                lag: stats.lag(),
                accepted: stats.accepted,
                rejected: stats.rejected,
                duplicate: stats.duplicate,
            })
            .collect();
        let last_batch = self.last_batch_unix_ms.load(Ordering::Relaxed);
        Health {
            status: HealthStatus::from_parts(&ingest, &kafka),
            reasons: health_reasons(&ingest, &kafka),
            kafka,
            ingest,
            partitions,
            last_batch_unix_ms: (last_batch != 0).then_some(last_batch),
        }
    }

    /// All metrics in the Prometheus text exposition format, version 0.0.4.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.write_prometheus(&mut out)
            .expect("writing to a String cannot fail");
        out
    }

    fn write_prometheus(&self, out: &mut String) -> fmt::Result {
        // Snapshot under the locks, render without them.
        let partitions = lock(&self.partitions).clone();
        let kinds = lock(&self.kinds).clone();
        let kafka_connected = lock(&self.kafka).connected;
        let running = *lock(&self.ingest) == IngestState::Running;

        header(
            out,
            "dealledger_up",
            "gauge",
            "1 while the ingest loop is running, 0 while starting, stopping or failed.",
        )?;
        writeln!(out, "dealledger_up {}", u8::from(running))?;

        header(
            out,
            "dealledger_events_total",
            "counter",
            "Ledger entries written, by partition and verdict.",
        )?;
        for (partition, stats) in &partitions {
            for slot in VerdictSlot::ALL {
                writeln!(
                    out,
                    "dealledger_events_total{{partition=\"{partition}\",verdict=\"{}\"}} {}",
                    slot.label(),
                    stats.get(slot)
                )?;
            }
        }

        header(
            out,
            "dealledger_rejections_total",
            "counter",
            "Rejected entries, by rejection kind.",
        )?;
        for (kind, count) in &kinds.named {
            writeln!(
                out,
                "dealledger_rejections_total{{kind=\"{}\"}} {count}",
                escape_label_value(kind)
            )?;
        }
        if kinds.other > 0 {
            writeln!(
                out,
                "dealledger_rejections_total{{kind=\"{OTHER_KIND}\"}} {}",
                kinds.other
            )?;
        }

        header(
            out,
            "dealledger_consumer_position",
            "gauge",
            "Next offset ingest will consume, by partition.",
        )?;
        for (partition, stats) in &partitions {
            if let Some(offset) = stats.next_offset {
                writeln!(
                    out,
                    "dealledger_consumer_position{{partition=\"{partition}\"}} {offset}"
                )?;
            }
        }

        header(
            out,
            "dealledger_high_watermark",
            "gauge",
            "High watermark of the partition, by partition.",
        )?;
        for (partition, stats) in &partitions {
            if let Some(hw) = stats.high_watermark {
                writeln!(
                    out,
                    "dealledger_high_watermark{{partition=\"{partition}\"}} {hw}"
                )?;
            }
        }

        header(
            out,
            "dealledger_consumer_lag",
            "gauge",
            "Records not yet consumed (high watermark minus position, at least 0), by partition.",
        )?;
        for (partition, stats) in &partitions {
            if let Some(lag) = stats.lag() {
                writeln!(
                    out,
                    "dealledger_consumer_lag{{partition=\"{partition}\"}} {lag}"
                )?;
            }
        }

        header(
            out,
            "dealledger_batches_total",
            "counter",
            "Batches made durable.",
        )?;
        writeln!(
            out,
            "dealledger_batches_total {}",
            self.batches.load(Ordering::Relaxed)
        )?;

        header(
            out,
            "dealledger_batch_entries",
            "histogram",
            "Entries per batch.",
        )?;
        self.batch_entries.write(out, "dealledger_batch_entries")?;

        header(
            out,
            "dealledger_batch_bytes_total",
            "counter",
            "Record value bytes in batches made durable.",
        )?;
        writeln!(
            out,
            "dealledger_batch_bytes_total {}",
            self.batch_bytes.load(Ordering::Relaxed)
        )?;

        header(
            out,
            "dealledger_apply_seconds_total",
            "counter",
            "Time spent applying batches before their flush, in seconds.",
        )?;
        writeln!(
            out,
            "dealledger_apply_seconds_total {}",
            self.apply_nanos.load(Ordering::Relaxed) as f64 / NANOS_PER_SECOND
        )?;

        header(
            out,
            "dealledger_flush_seconds",
            "histogram",
            "Time to make one batch durable (flush to disk), in seconds.",
        )?;
        self.flush_seconds.write(out, "dealledger_flush_seconds")?;

        let last_batch = self.last_batch_unix_ms.load(Ordering::Relaxed);
        header(
            out,
            "dealledger_last_batch_timestamp_seconds",
            "gauge",
            "When the last batch was made durable, in Unix seconds.",
        )?;
        if last_batch != 0 {
            writeln!(
                out,
                "dealledger_last_batch_timestamp_seconds {}",
                last_batch as f64 / 1000.0
            )?;
        }

        header(
            out,
            "dealledger_kafka_connected",
            "gauge",
            "1 when the Kafka client reports the brokers reachable, else 0.",
        )?;
        writeln!(
            out,
            "dealledger_kafka_connected {}",
            u8::from(kafka_connected)
        )?;

        header(
            out,
            "dealledger_dead_letter_total",
            "counter",
            "Publishes to the dead-letter topic, by result.",
        )?;
        writeln!(
            out,
            "dealledger_dead_letter_total{{result=\"ok\"}} {}",
            self.dead_letter_ok.load(Ordering::Relaxed)
        )?;
        writeln!(
            out,
            "dealledger_dead_letter_total{{result=\"failed\"}} {}",
            self.dead_letter_failed.load(Ordering::Relaxed)
        )?;
        Ok(())
    }
}

/// Per-partition values, behind [`Metrics::partitions`].
#[derive(Clone, Copy, Debug, Default)]
struct PartitionStats {
    next_offset: Option<i64>,
    high_watermark: Option<i64>,
    accepted: u64,
    rejected: u64,
    duplicate: u64,
}

impl PartitionStats {
    fn lag(&self) -> Option<i64> {
        Some(consumer_lag(self.next_offset?, self.high_watermark?))
    }

    fn count(&mut self, slot: VerdictSlot, n: u64) {
        let counter = match slot {
            VerdictSlot::Accepted => &mut self.accepted,
            VerdictSlot::Rejected => &mut self.rejected,
            VerdictSlot::Duplicate => &mut self.duplicate,
        };
        *counter = counter.saturating_add(n);
    }

    fn get(&self, slot: VerdictSlot) -> u64 {
        match slot {
            VerdictSlot::Accepted => self.accepted,
            VerdictSlot::Rejected => self.rejected,
            VerdictSlot::Duplicate => self.duplicate,
        }
    }
}

/// The three verdict labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VerdictSlot {
    Accepted,
    Rejected,
    Duplicate,
}

impl VerdictSlot {
    const ALL: [VerdictSlot; 3] = [
        VerdictSlot::Accepted,
        VerdictSlot::Rejected,
        VerdictSlot::Duplicate,
    ];

    fn of(verdict: &Verdict) -> Self {
        match verdict {
            Verdict::Accepted => VerdictSlot::Accepted,
            Verdict::Rejected { .. } => VerdictSlot::Rejected,
            Verdict::Duplicate { .. } => VerdictSlot::Duplicate,
        }
    }

    fn from_label(label: &str) -> Option<Self> {
        VerdictSlot::ALL
            .into_iter()
            .find(|slot| slot.label() == label)
    }

    fn label(self) -> &'static str {
        match self {
            VerdictSlot::Accepted => "accepted",
            VerdictSlot::Rejected => "rejected",
            VerdictSlot::Duplicate => "duplicate",
        }
    }
}

/// Rejection counts by kind, at most [`MAX_KINDS`] of them named.
#[derive(Clone, Debug, Default)]
struct Kinds {
    named: BTreeMap<String, u64>,
    other: u64,
}

impl Kinds {
    fn count(&mut self, kind: &str, n: u64) {
        if let Some(count) = self.named.get_mut(kind) {
            *count = count.saturating_add(n);
        } else if kind != OTHER_KIND && kind.len() <= MAX_KIND_LEN && self.named.len() < MAX_KINDS {
            self.named.insert(kind.to_owned(), n);
        } else {
            self.other = self.other.saturating_add(n);
        }
    }
}

/// A Prometheus histogram with fixed buckets, updated with atomics.
#[derive(Debug)]
struct Histogram {
    /// Upper bounds, ascending.
    bounds: &'static [f64],
    /// Non-cumulative counts: `buckets[i]` counts observations in
    /// `(bounds[i-1], bounds[i]]`; the last one those above every bound.
    buckets: Box<[AtomicU64]>,
    /// Sum of observations, in units of `1 / scale`.
    sum_units: AtomicU64,
    /// Units per observed value (1 for counts, 1e9 for seconds in nanos).
    scale: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64], scale: f64) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_units: AtomicU64::new(0),
            scale,
        }
    }

    /// Observes a value of `units / scale`.
    fn observe(&self, units: u64) {
        let value = units as f64 / self.scale;
        let index = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_units.fetch_add(units, Ordering::Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples. `_count` is the
    /// `+Inf` bucket as read, so the two always agree within one scrape.
    fn write(&self, out: &mut String, name: &str) -> fmt::Result {
        let mut cumulative = 0u64;
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative = cumulative.saturating_add(bucket.load(Ordering::Relaxed));
            writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}")?;
        }
        cumulative =
            cumulative.saturating_add(self.buckets[self.bounds.len()].load(Ordering::Relaxed));
        writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}")?;
        let sum = self.sum_units.load(Ordering::Relaxed) as f64 / self.scale;
        writeln!(out, "{name}_sum {sum}")?;
        writeln!(out, "{name}_count {cumulative}")
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
fn header(out: &mut String, name: &str, kind: &str, help: &str) -> fmt::Result {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")
}

/// Escapes a label value for the text format: backslash, double quote and
/// line feed.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Cuts `s` to at most `max` bytes (at a character boundary), marking the cut.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn saturating_u64(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| saturating_u64(d.as_millis()))
}

/// Locks a mutex, recovering the data if another thread panicked holding it:
/// counters stay meaningful, and metrics must never panic the ingest thread.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Location;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    /// Checks every line is a comment or `name{labels} value` with a numeric
    /// value, and returns the samples.
    fn parse(text: &str) -> Vec<(String, f64)> {
        assert!(text.ends_with('\n'), "exposition must end with a newline");
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                assert!(
                    comment.starts_with("HELP dealledger_")
                        || comment.starts_with("TYPE dealledger_"),
                    "bad comment line {line:?}"
                );
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(name.starts_with("dealledger_"), "bad name in {line:?}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad name in {line:?}"
            );
            if name_end < series.len() {
                assert!(series.ends_with('}'), "unclosed labels in {line:?}");
            }
            samples.push((series.to_owned(), value));
        }
        samples
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        parse(text)
            .into_iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| v)
    }

    #[test]
    fn fresh_metrics_render_and_parse() {
        let text = Metrics::new().render_prometheus();
        let samples = parse(&text);
        assert!(!samples.is_empty());
        let lines = lines(&text);
        for expected in [
            "# HELP dealledger_up 1 while the ingest loop is running, 0 while starting, stopping or failed.",
            "# TYPE dealledger_up gauge",
            "dealledger_up 0",
            "# TYPE dealledger_events_total counter",
            "dealledger_batches_total 0",
            "# TYPE dealledger_batch_entries histogram",
            "dealledger_batch_entries_bucket{le=\"+Inf\"} 0",
            "dealledger_batch_entries_count 0",
            "dealledger_kafka_connected 0",
            "dealledger_dead_letter_total{result=\"ok\"} 0",
            "dealledger_dead_letter_total{result=\"failed\"} 0",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        // Every family has exactly one HELP and one TYPE line.
        let types = lines.iter().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = lines.iter().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
    }

    #[test]
    fn records_render_as_exact_lines() {
        let metrics = Metrics::new();
        metrics.record(3, "accepted", None);
        metrics.record(3, "accepted", None);
        metrics.record(3, "rejected", Some("schema"));
        metrics.record(1, "duplicate", Some("duplicate"));
        metrics.record(1, "rejected", None);
        metrics.set_position(3, 100);
        metrics.set_high_watermark(3, 142);
        metrics.dead_letter(true);
        metrics.dead_letter(false);
        metrics.dead_letter(false);
        metrics.set_kafka_status(true, None);
        metrics.set_ingest_state(IngestState::Running);

        let text = metrics.render_prometheus();
        parse(&text);
        let lines = lines(&text);
        for expected in [
            "dealledger_events_total{partition=\"3\",verdict=\"accepted\"} 2",
            "dealledger_events_total{partition=\"3\",verdict=\"rejected\"} 1",
            "dealledger_events_total{partition=\"3\",verdict=\"duplicate\"} 0",
            "dealledger_events_total{partition=\"1\",verdict=\"duplicate\"} 1",
            "dealledger_rejections_total{kind=\"schema\"} 1",
            "dealledger_rejections_total{kind=\"unknown\"} 1",
            "dealledger_consumer_position{partition=\"3\"} 100",
            "dealledger_high_watermark{partition=\"3\"} 142",
            "dealledger_consumer_lag{partition=\"3\"} 42",
            "dealledger_dead_letter_total{result=\"ok\"} 1",
            "dealledger_dead_letter_total{result=\"failed\"} 2",
            "dealledger_kafka_connected 1",
            "dealledger_up 1",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        // Duplicates are not rejections; partition 1 has no known offsets.
        assert!(!text.contains("kind=\"duplicate\""));
        assert!(!text.contains("dealledger_consumer_lag{partition=\"1\"}"));
        // Partitions render in order.
        let p1 = text.find("partition=\"1\"").unwrap();
        let p3 = text.find("partition=\"3\"").unwrap();
        assert!(p1 < p3);
    }

    #[test]
    fn record_outcomes_matches_record() {
        let outcome = |partition, verdict| Outcome {
            location: Location { partition, seq: 0 },
            offset: 0,
            deal_id: None,
            event_type: None,
            verdict,
        };
        let outcomes = [
            outcome(0, Verdict::Accepted),
            outcome(
                0,
                Verdict::Rejected {
                    kind: "schema".into(),
                    reason: "bad".into(),
                },
            ),
            outcome(
                2,
                Verdict::Duplicate {
                    of: Location {
                        partition: 0,
                        seq: 0,
                    },
                },
            ),
        ];
        let batched = Metrics::new();
        batched.record_outcomes(&outcomes);
        let single = Metrics::new();
        for o in &outcomes {
            single.record(o.location.partition, o.verdict.label(), o.verdict.kind());
        }
        assert_eq!(batched.render_prometheus(), single.render_prometheus());
        assert_eq!(batched.health(), single.health());
    }

    #[test]
    fn batches_fill_histograms() {
        let metrics = Metrics::new();
        metrics.batch_written(1, 100, Duration::from_millis(2), Duration::from_millis(5));
        metrics.batch_written(
            700,
            70_000,
            Duration::from_millis(3),
            Duration::from_millis(30),
        );
        metrics.batch_written(20_000, 1, Duration::from_millis(5), Duration::from_secs(60));
        let text = metrics.render_prometheus();
        parse(&text);
        let lines = lines(&text);
        for expected in [
            "dealledger_batches_total 3",
            "dealledger_batch_bytes_total 70101",
            "dealledger_batch_entries_bucket{le=\"1\"} 1",
            "dealledger_batch_entries_bucket{le=\"500\"} 1",
            "dealledger_batch_entries_bucket{le=\"1000\"} 2",
            "dealledger_batch_entries_bucket{le=\"10000\"} 2",
            "dealledger_batch_entries_bucket{le=\"+Inf\"} 3",
            "dealledger_batch_entries_sum 20701",
            "dealledger_batch_entries_count 3",
            // 5 ms lands exactly on its bound (le is inclusive).
            "dealledger_flush_seconds_bucket{le=\"0.0025\"} 0",
            "dealledger_flush_seconds_bucket{le=\"0.005\"} 1",
            "dealledger_flush_seconds_bucket{le=\"0.05\"} 2",
            "dealledger_flush_seconds_bucket{le=\"10\"} 2",
            "dealledger_flush_seconds_bucket{le=\"+Inf\"} 3",
            "dealledger_flush_seconds_sum 60.035",
            "dealledger_flush_seconds_count 3",
            "dealledger_apply_seconds_total 0.01",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        assert!(value(&text, "dealledger_last_batch_timestamp_seconds").unwrap() > 1e9);
        assert!(metrics.health().last_batch_unix_ms.is_some());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("plain"), "plain");
        assert_eq!(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let metrics = Metrics::new();
        metrics.record(0, "rejected", Some("we\"ird\\\nkind"));
        let text = metrics.render_prometheus();
        parse(&text);
        assert!(
            lines(&text).contains(&"dealledger_rejections_total{kind=\"we\\\"ird\\\\\\nkind\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn kinds_are_bounded() {
        let metrics = Metrics::new();
        for i in 0..MAX_KINDS + 10 {
            metrics.record(0, "rejected", Some(&format!("kind{i}")));
        }
        metrics.record(0, "rejected", Some("kind0"));
        metrics.record(0, "rejected", Some(&"x".repeat(MAX_KIND_LEN + 1)));
        metrics.record(0, "rejected", Some(OTHER_KIND));
        let text = metrics.render_prometheus();
        let kinds: Vec<_> = parse(&text)
            .into_iter()
            .filter(|(s, _)| s.starts_with("dealledger_rejections_total{"))
            .collect();
        assert_eq!(kinds.len(), MAX_KINDS + 1, "{text}");
        assert_eq!(
            value(&text, "dealledger_rejections_total{kind=\"kind0\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "dealledger_rejections_total{kind=\"other\"}"),
            Some(12.0)
        );
        let total: f64 = kinds.iter().map(|(_, v)| v).sum();
        assert_eq!(total, (MAX_KINDS + 13) as f64);
        assert_eq!(
            metrics.health().partitions[0].rejected,
            (MAX_KINDS + 13) as u64
        );
    }

    #[test]
    fn lag_math() {
        assert_eq!(consumer_lag(100, 142), 42);
        assert_eq!(consumer_lag(142, 142), 0);
        assert_eq!(consumer_lag(150, 142), 0);
        assert_eq!(consumer_lag(0, i64::MAX), i64::MAX);
        assert_eq!(consumer_lag(i64::MAX, 0), 0);

        let metrics = Metrics::new();
        metrics.set_high_watermark(0, 10);
        assert_eq!(metrics.health().partitions[0].lag, None);
        metrics.set_position(0, 4);
        assert_eq!(metrics.health().partitions[0].lag, Some(6));
        metrics.set_position(0, 12);
        assert_eq!(metrics.health().partitions[0].lag, Some(0));
        // librdkafka's "unknown" watermark clears the value and the lag.
        metrics.set_high_watermark(0, -1);
        let p = &metrics.health().partitions[0];
        assert_eq!((p.high_watermark, p.lag), (None, None));
        metrics.set_high_watermark(0, 20);
        metrics.unassign(0);
        let p = &metrics.health().partitions[0];
        assert_eq!((p.next_offset, p.high_watermark, p.lag), (None, None, None));
        assert!(
            !metrics
                .render_prometheus()
                .contains("dealledger_consumer_lag{")
        );
    }

    #[test]
    fn health_status_transitions() {
        let metrics = Metrics::new();
        let status = || metrics.health().status;
        let reasons = || metrics.health().reasons;
        assert_eq!(status(), HealthStatus::Starting);
        assert_eq!(reasons(), ["ingest starting"]);
        // A broker that does not answer at start: up, retrying, degraded.
        metrics.set_kafka_status(false, Some("cannot read metadata: timed out".into()));
        assert_eq!(status(), HealthStatus::Degraded);
        assert_eq!(
            reasons(),
            ["kafka unreachable: cannot read metadata: timed out"]
        );
        metrics.set_kafka_status(true, None);
        assert_eq!(status(), HealthStatus::Starting);
        metrics.set_ingest_state(IngestState::Running);
        assert_eq!(status(), HealthStatus::Ok);
        assert!(reasons().is_empty());
        metrics.set_kafka_status(false, Some("all brokers down".into()));
        assert_eq!(status(), HealthStatus::Degraded);
        assert_eq!(reasons(), ["kafka unreachable: all brokers down"]);
        assert_eq!(
            metrics.health().kafka.detail.as_deref(),
            Some("all brokers down")
        );
        metrics.set_kafka_status(true, None);
        assert_eq!(status(), HealthStatus::Ok);
        metrics.set_ingest_state(IngestState::Stopping);
        assert_eq!(status(), HealthStatus::Degraded);
        metrics.set_ingest_state(IngestState::Failed("disk full".into()));
        assert_eq!(status(), HealthStatus::Failed);
        assert_eq!(reasons(), ["ingest failed: disk full"]);
        metrics.set_kafka_status(false, None);
        assert_eq!(status(), HealthStatus::Failed);
        assert_eq!(
            reasons(),
            [
                "ingest failed: disk full",
                "kafka unreachable: no broker connection is up"
            ]
        );
        assert!(metrics.render_prometheus().contains("\ndealledger_up 0\n"));
    }

    #[test]
    fn health_serializes_as_documented() {
        let metrics = Metrics::new();
        metrics.set_ingest_state(IngestState::Failed("disk full".into()));
        metrics.set_kafka_status(false, Some("broker down".into()));
        metrics.record(2, "accepted", None);
        metrics.set_position(2, 5);
        metrics.set_high_watermark(2, 7);
        let json = serde_json::to_value(metrics.health()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "status": "failed",
                "kafka": { "connected": false, "detail": "broker down" },
                "ingest": { "state": "failed", "error": "disk full" },
                "partitions": [{
                    "partition": 2, "next_offset": 5, "high_watermark": 7, "lag": 2,
                    "accepted": 1, "rejected": 0, "duplicate": 0
                }],
                "last_batch_unix_ms": null,
                "reasons": ["ingest failed: disk full", "kafka unreachable: broker down"]
            })
        );
        metrics.set_ingest_state(IngestState::Running);
        let json = serde_json::to_value(metrics.health()).unwrap();
        assert_eq!(json["ingest"], serde_json::json!({ "state": "running" }));
        assert_eq!(json["status"], "degraded");
        let back: Health = serde_json::from_value(json).unwrap();
        assert_eq!(back, metrics.health());
    }

    #[test]
    fn long_details_are_cut() {
        let metrics = Metrics::new();
        metrics.set_kafka_status(false, Some("é".repeat(MAX_DETAIL_LEN)));
        let detail = metrics.health().kafka.detail.unwrap();
        assert!(detail.len() <= MAX_DETAIL_LEN);
        assert!(detail.ends_with('…'));
        metrics.set_ingest_state(IngestState::Failed("x".repeat(10 * MAX_DETAIL_LEN)));
        let IngestState::Failed(message) = metrics.health().ingest else {
            panic!("not failed");
        };
        assert!(message.len() <= MAX_DETAIL_LEN);
    }

    #[test]
    fn metrics_are_shared_across_threads() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let metrics = metrics.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        metrics.record(t, "accepted", None);
                        metrics.batch_written(1, 1, Duration::ZERO, Duration::ZERO);
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let text = metrics.render_prometheus();
        assert_eq!(value(&text, "dealledger_batches_total"), Some(4000.0));
        assert_eq!(value(&text, "dealledger_batch_entries_count"), Some(4000.0));
        let accepted: u64 = metrics.health().partitions.iter().map(|p| p.accepted).sum();
        assert_eq!(accepted, 4000);
    }
}
