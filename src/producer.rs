//! The Rust producer API: publishes deal events to Kafka, keyed by deal id.
//!
//! Producers in other languages code against `schemas/`; Rust producers use
//! [`DealProducer`]. It is idempotent (`enable.idempotence=true`, which
//! implies `acks=all` and ordered retries), and keys every event by its deal
//! id so all events of one deal land on one partition, in the order sent.
//! Each send resolves to the partition and offset Kafka gave the event.
//!
//! Events are sent as CloudEvents in Kafka's *structured* content mode: the
//! record value is the whole CloudEvent JSON, with the header
//! `content-type: application/cloudevents+json`.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer, ProducerContext, PurgeConfig,
};

use crate::event::DealEvent;
use crate::kafka::{KafkaSettings, SecurityFailure, SettingsError};

/// The CloudEvents Kafka binding's content type for structured mode.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// librdkafka settings every dealledger producer starts from.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "5"),
    ("message.timeout.ms", "120000"),
];

/// Where Kafka put a delivered event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// Why an event could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The Kafka settings are unusable.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// librdkafka refused to create the producer.
    #[error("cannot create a Kafka producer for {brokers}: {source}")]
    Create {
        /// The bootstrap servers.
        brokers: String,
        /// The client error.
        source: KafkaError,
    },
    /// Kafka did not take the event.
    #[error("event for deal {key:?} was not delivered to topic {topic}: {source}")]
    Delivery {
        /// The record key (the deal id).
        key: String,
        /// The topic.
        topic: String,
        /// The client error.
        source: Box<KafkaError>,
    },
    /// The producer was dropped before it reported the delivery.
    #[error("event for deal {key:?}: the producer shut down before reporting delivery")]
    Canceled {
        /// The record key (the deal id).
        key: String,
    },
    /// The broker refused the credentials or its certificate is not trusted;
    /// nothing more was sent (retrying cannot fix this).
    #[error(transparent)]
    Security(#[from] SecurityFailure),
    /// Waiting for delivery reports failed or timed out.
    #[error("not every delivery report arrived: {0}")]
    Flush(KafkaError),
}

/// What [`BulkProducer`] delivered.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Events delivered, per partition.
    pub per_partition: BTreeMap<i32, u64>,
    /// Events not delivered: the caller's tag and why.
    pub failed: Vec<(u64, ProduceError)>,
}

impl SendReport {
    /// Total events delivered.
    pub fn delivered(&self) -> u64 {
        self.per_partition.values().sum()
    }
}

/// An idempotent Kafka producer of deal events.
pub struct DealProducer {
    inner: FutureProducer,
    topic: String,
}

impl DealProducer {
    /// Creates a producer for `topic`.
    pub fn new(settings: &KafkaSettings, topic: impl Into<String>) -> Result<Self, ProduceError> {
        let inner = settings
            .client_config(PRODUCER_DEFAULTS)?
            .create()
            .map_err(|source| ProduceError::Create {
                brokers: settings.brokers.clone(),
                source,
            })?;
        Ok(DealProducer {
            inner,
            topic: topic.into(),
        })
    }

    /// The topic events go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends one event, keyed by its deal id, and waits for Kafka's acknowledgement.
    pub async fn send(&self, event: &DealEvent) -> Result<Delivery, ProduceError> {
        self.send_encoded(Some(event.deal_id.as_str()), &event.to_json())
            .await
    }

    /// Sends already-encoded bytes exactly as given.
    pub async fn send_encoded(
        &self,
        key: Option<&str>,
        value: &[u8],
    ) -> Result<Delivery, ProduceError> {
        let record = self.record(key, value);
        let result = self.inner.send(record, Duration::from_secs(60)).await;
        result
            .map(|d| Delivery {
                partition: d.partition,
                offset: d.offset,
            })
            .map_err(|(source, _)| self.delivery_error(key, source))
    }

    /// Waits until every queued event is delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }

    fn record<'a>(&'a self, key: Option<&'a str>, value: &'a [u8]) -> FutureRecord<'a, str, [u8]> {
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(CONTENT_TYPE),
        });
        let record = FutureRecord::to(&self.topic)
            .payload(value)
            .headers(headers);
        match key {
            Some(k) => record.key(k),
            None => record,
        }
    }

    fn delivery_error(&self, key: Option<&str>, source: KafkaError) -> ProduceError {
        ProduceError::Delivery {
            key: key.unwrap_or("").to_string(),
            topic: self.topic.clone(),
            source: Box::new(source),
        }
    }
}

/// librdkafka's local queue bound for [`BulkProducer`] (messages): what
/// `produce` may have sent but not yet had acknowledged, in memory. Measured
/// on 1M events of ~530 bytes: 500,000 held 530-550 MB (peak RSS) for no
/// gain in time over 100,000 (167 MB) or 50,000 (110 MB): 3.7-5.1 s each
/// way, the broker beside it being the bound.
pub const BULK_QUEUE_MESSAGES: &str = "100000";

/// [`BulkProducer`] serves delivery reports after this many events.
const POLL_EVERY_EVENTS: u32 = 1_000;

/// How long [`BulkProducer::send`] waits for delivery reports when
/// librdkafka's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// How long [`BulkProducer::finish`] waits at a time before checking for a
/// [`SecurityFailure`].
const FLUSH_SLICE: Duration = Duration::from_millis(200);

/// Counts deliveries reported by librdkafka's delivery callback.
#[derive(Default)]
pub struct DeliveryTally {
    state: std::sync::Mutex<SendReport>,
    topic: String,
    /// The first authentication or certificate failure librdkafka reported.
    security: OnceLock<SecurityFailure>,
}

impl ClientContext for DeliveryTally {
    fn error(&self, error: KafkaError, reason: &str) {
        match SecurityFailure::classify(&error, reason) {
            Some(failure) => {
                tracing::error!(%failure, "Kafka refused the connection; stopping");
                let _ = self.security.set(failure);
            }
            None => tracing::error!(%error, reason, "Kafka client error"),
        }
    }
}

impl ProducerContext for DeliveryTally {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        let mut report = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(message) => *report.per_partition.entry(message.partition()).or_default() += 1,
            Err((error, message)) => {
                let key = message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                report.failed.push((
                    tag as u64,
                    ProduceError::Delivery {
                        key,
                        topic: self.topic.clone(),
                        source: Box::new(error.clone()),
                    },
                ));
            }
        }
    }
}

/// A producer for many events at once (the `produce` command): no future
/// per event, deliveries counted by librdkafka's callback. Same settings as
/// [`DealProducer`] (idempotent, acks=all), same headers.
pub struct BulkProducer {
    inner: BaseProducer<DeliveryTally>,
    topic: String,
    /// Events queued since delivery reports were last served.
    unpolled: std::cell::Cell<u32>,
}

impl BulkProducer {
    /// Creates a bulk producer for `topic`.
    pub fn new(settings: &KafkaSettings, topic: impl Into<String>) -> Result<Self, ProduceError> {
        let topic = topic.into();
        let mut config = settings.client_config(PRODUCER_DEFAULTS)?;
        if config.get("queue.buffering.max.messages").is_none() {
            config.set("queue.buffering.max.messages", BULK_QUEUE_MESSAGES);
        }
        let inner = config
            .create_with_context(DeliveryTally {
                state: Default::default(),
                topic: topic.clone(),
                security: OnceLock::new(),
            })
            .map_err(|source| ProduceError::Create {
                brokers: settings.brokers.clone(),
                source,
            })?;
        Ok(BulkProducer {
            inner,
            topic,
            unpolled: std::cell::Cell::new(0),
        })
    }

    /// The topic events go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Queues one event (librdkafka copies the bytes); waits while the local
    /// queue is full. `tag` comes back with a failed delivery.
    pub fn send(&self, tag: u64, key: Option<&str>, value: &[u8]) -> Result<(), ProduceError> {
        loop {
            let headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(CONTENT_TYPE),
            });
            let mut record: BaseRecord<'_, str, [u8], usize> =
                BaseRecord::with_opaque_to(&self.topic, tag as usize)
                    .payload(value)
                    .headers(headers);
            if let Some(k) = key {
                record = record.key(k);
            }
            match self.inner.send(record) {
                Ok(()) => {
                    // Delivery reports are served here, on the sending
                    // thread, every so many events: no thread of their own.
                    let unpolled = self.unpolled.get() + 1;
                    if unpolled >= POLL_EVERY_EVENTS {
                        self.inner.poll(Duration::ZERO);
                        self.unpolled.set(0);
                    } else {
                        self.unpolled.set(unpolled);
                    }
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // A refused login never drains the queue: stop waiting.
                    if let Some(failure) = self.inner.context().security.get() {
                        return Err(ProduceError::Security(failure.clone()));
                    }
                    // Serve delivery reports until the queue has room.
                    self.inner.poll(QUEUE_FULL_WAIT);
                    self.unpolled.set(0);
                }
                Err((source, _)) => {
                    return Err(ProduceError::Delivery {
                        key: key.unwrap_or("").to_string(),
                        topic: self.topic.clone(),
                        source: Box::new(source),
                    });
                }
            }
        }
    }

    /// Waits for every queued event's delivery report and returns the tally.
    /// Stops early, dropping what is still queued, with
    /// [`ProduceError::Security`] if the broker refuses the credentials or
    /// its certificate is not trusted (librdkafka would retry until
    /// `message.timeout.ms`).
    pub fn finish(self, timeout: Duration) -> Result<SendReport, ProduceError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(failure) = self.inner.context().security.get() {
                self.inner.purge(PurgeConfig::default().queue().inflight());
                return Err(ProduceError::Security(failure.clone()));
            }
            match self
                .inner
                .flush(FLUSH_SLICE.min(deadline.saturating_duration_since(Instant::now())))
            {
                Ok(()) => break,
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                    if Instant::now() < deadline => {}
                Err(e) => return Err(ProduceError::Flush(e)),
            }
        }
        let tally = self.inner.context();
        let mut report = tally.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(std::mem::take(&mut *report))
    }
}
