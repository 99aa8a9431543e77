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
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::event::DealEvent;
use crate::kafka::{KafkaSettings, SettingsError};

/// The CloudEvents Kafka binding's content type for structured mode.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// Most events in flight (sent, delivery not yet reported) in [`DealProducer::send_all`].
/// Below librdkafka's default `queue.buffering.max.messages` (100,000).
pub const MAX_IN_FLIGHT: usize = 50_000;

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
}

/// One encoded event to send with [`DealProducer::send_all`].
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Caller's tag for this event (e.g. its line number), echoed in failures.
    pub tag: u64,
    /// Record key: the deal id, or `None` for a keyless record.
    pub key: Option<String>,
    /// Record value, sent exactly as given.
    pub value: Vec<u8>,
}

/// What [`DealProducer::send_all`] did.
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

    /// Sends many events with at most [`MAX_IN_FLIGHT`] awaiting acknowledgement,
    /// then flushes. Order per key is kept (idempotent producer, one partition per key).
    pub async fn send_all<I>(&self, events: I) -> SendReport
    where
        I: IntoIterator<Item = Outgoing>,
    {
        let mut report = SendReport::default();
        let mut in_flight = FuturesUnordered::new();
        for out in events {
            if in_flight.len() >= MAX_IN_FLIGHT
                && let Some((tag, key, result)) = in_flight.next().await
            {
                self.tally(&mut report, tag, key, result);
            }
            loop {
                let record = self.record(out.key.as_deref(), &out.value);
                match self.inner.send_result(record) {
                    Ok(future) => {
                        let (tag, key) = (out.tag, out.key.clone());
                        in_flight.push(async move { (tag, key, future.await) });
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // librdkafka's local queue is full: wait for one delivery, then retry.
                        match in_flight.next().await {
                            Some((tag, key, result)) => self.tally(&mut report, tag, key, result),
                            None => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                    Err((source, _)) => {
                        let err = self.delivery_error(out.key.as_deref(), source);
                        report.failed.push((out.tag, err));
                        break;
                    }
                }
            }
        }
        while let Some((tag, key, result)) = in_flight.next().await {
            self.tally(&mut report, tag, key, result);
        }
        report
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

    fn tally(
        &self,
        report: &mut SendReport,
        tag: u64,
        key: Option<String>,
        result: Result<
            rdkafka::producer::future_producer::OwnedDeliveryResult,
            futures::channel::oneshot::Canceled,
        >,
    ) {
        match result {
            Ok(Ok(delivery)) => *report.per_partition.entry(delivery.partition).or_default() += 1,
            Ok(Err((source, _))) => report
                .failed
                .push((tag, self.delivery_error(key.as_deref(), source))),
            Err(_) => report.failed.push((
                tag,
                ProduceError::Canceled {
                    key: key.unwrap_or_default(),
                },
            )),
        }
    }
}
