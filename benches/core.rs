//! Micro-benchmarks of the pure core, on realistic generated events
//! (`dealledger::generate::Generator`):
//!
//! - `decode`: `DealEvent::decode` of one typical event (~450 bytes);
//! - `deal_book_apply`: `DealBook::apply` over a stream of 10,000 events,
//!   into a fresh book each iteration;
//! - `entry_hash`: `chain::entry_hash` of a record with a 450-byte value;
//! - `apply_batch`: `LedgerState::apply_batch` of 1,000 records (decode,
//!   chain, duplicate check and fold: the pure per-batch cost of ingest),
//!   into a fresh ledger each iteration.
//!
//! Run with `cargo bench --bench core`; each benchmark measures for 3 s.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use dealledger::chain::{self, Record, StreamId, TimestampType};
use dealledger::deal::DealBook;
use dealledger::event::DealEvent;
use dealledger::generate::Generator;
use dealledger::ledger::{LedgerState, NoOriginals};

/// Seed of every generated stream, so runs compare.
const SEED: u64 = 2026;
/// Deals the generated streams interleave.
const DEALS: usize = 500;
/// Topic of the benchmark ledger.
const TOPIC: &str = "deal-events";
/// Partitions records are spread over (by deal, as Kafka keys them).
const PARTITIONS: i32 = 4;

/// The first `n` events of the benchmark stream.
fn events(n: usize) -> Vec<DealEvent> {
    Generator::new(DEALS, SEED).take(n).collect()
}

/// The encoded event closest to 450 bytes among the first thousand.
fn typical_event() -> Vec<u8> {
    events(1_000)
        .iter()
        .map(DealEvent::to_json)
        .min_by_key(|e| e.len().abs_diff(450))
        .expect("events")
}

/// `events` as Kafka records: keyed by deal, partitioned by deal, offsets
/// contiguous per partition.
fn records(events: &[DealEvent]) -> Vec<Record> {
    let mut next_offset = [0i64; PARTITIONS as usize];
    events
        .iter()
        .map(|e| {
            let key = e.deal_id.as_str().as_bytes().to_vec();
            let partition = (key
                .iter()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)))
                % PARTITIONS as u32) as i32;
            let offset = next_offset[partition as usize];
            next_offset[partition as usize] += 1;
            Record {
                topic: TOPIC.to_string(),
                partition,
                offset,
                timestamp_type: TimestampType::CreateTime,
                timestamp_ms: e.time.unix_millis(),
                key: Some(key),
                value: Some(e.to_json()),
                headers: Vec::new(),
            }
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let bytes = typical_event();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function(format!("event_{}_bytes", bytes.len()), |b| {
        b.iter(|| DealEvent::decode(black_box(&bytes)).expect("valid"))
    });
    group.finish();
}

fn deal_book_apply(c: &mut Criterion) {
    let stream = events(10_000);
    let mut group = c.benchmark_group("deal_book_apply");
    group.throughput(Throughput::Elements(stream.len() as u64));
    // Milliseconds per iteration: equal-sized samples fit the 3 s budget.
    group.sampling_mode(SamplingMode::Flat).sample_size(30);
    group.bench_function("10000_events", |b| {
        b.iter_batched(
            DealBook::new,
            |mut book| {
                for event in &stream {
                    book.apply(black_box(event)).expect("generated events fold");
                }
                book
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn entry_hash(c: &mut Criterion) {
    let value = typical_event();
    let mut value = value[..value.len().min(450)].to_vec();
    value.resize(450, b' ');
    let record = Record {
        topic: TOPIC.to_string(),
        partition: 0,
        offset: 123_456,
        timestamp_type: TimestampType::CreateTime,
        timestamp_ms: 1_764_000_000_000,
        key: Some(b"deal-2026-0000042".to_vec()),
        value: Some(value),
        headers: Vec::new(),
    };
    let prev = chain::genesis(&StreamId::new(TOPIC, 0));
    let mut group = c.benchmark_group("entry_hash");
    group.throughput(Throughput::Bytes(450));
    group.bench_function("value_450_bytes", |b| {
        b.iter(|| chain::entry_hash(black_box(&prev), black_box(7), black_box(&record)))
    });
    group.finish();
}

fn apply_batch(c: &mut Criterion) {
    let batch = records(&events(1_000));
    // Measure the common path: every record new, valid and accepted.
    let write = LedgerState::new(TOPIC)
        .apply_batch(batch.clone(), &NoOriginals)
        .expect("records of the ledger's topic");
    let rejected = write
        .outcomes
        .iter()
        .filter(|o| o.verdict.kind().is_some())
        .count();
    assert_eq!(rejected, 0, "every generated record is accepted");
    let mut group = c.benchmark_group("apply_batch");
    group.throughput(Throughput::Elements(batch.len() as u64));
    // Milliseconds per iteration: equal-sized samples fit the 3 s budget.
    group.sampling_mode(SamplingMode::Flat).sample_size(30);
    group.bench_function("1000_records", |b| {
        b.iter_batched(
            || (LedgerState::new(TOPIC), batch.clone()),
            |(mut state, records)| {
                let write = state
                    .apply_batch(records, &NoOriginals)
                    .expect("records of the ledger's topic");
                (state, write)
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = core;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = decode, deal_book_apply, entry_hash, apply_batch
}
criterion_main!(core);
