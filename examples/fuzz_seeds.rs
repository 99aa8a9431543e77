//! Writes the seed corpora of the fuzz targets in `fuzz/` (see
//! `fuzz/README.md`): small, real inputs the fuzzer starts from.
//!
//! - `event_decode`: every line of `schemas/examples/*.jsonl` (the scenario,
//!   the `event` of each invalid example, the noise lines);
//! - `entry_decode`: stored entries made by `chain::encode_entry` (null and
//!   empty keys and values, headers, every timestamp type, scenario events);
//! - `export_reader`: an export of a small ledger made by `export_store`
//!   (three batches over two partitions), opened with its length known and
//!   unknown (the target's first byte), and its first few frames alone.
//!
//! Files are named by the blake3 of their content, so running this again
//! writes the same files. Run from the repository root:
//!
//! ```text
//! cargo run --example fuzz_seeds
//! ```

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use dealledger::chain::{ChainHead, Header, Record, StreamId, TimestampType, encode_entry};
use dealledger::export::export_store;
use dealledger::ledger::LedgerState;
use dealledger::store::Store;

/// Where the corpora live, relative to the repository root.
const CORPUS_DIR: &str = "fuzz/corpus";
/// The topic of the generated entries and ledger.
const TOPIC: &str = "deal-events";

fn main() -> Result<()> {
    let events = example_events()?;
    let mut written = 0;
    for event in &events {
        written += write_seed("event_decode", event)?;
    }
    for entry in entries(&events) {
        written += write_seed("entry_decode", &entry)?;
    }
    let export = small_export(&events)?;
    for mode in [0u8, 1] {
        let mut seed = vec![mode];
        seed.extend_from_slice(&export);
        written += write_seed("export_reader", &seed)?;
    }
    // The header and first frames alone: a truncated file.
    let mut cut = vec![0u8];
    cut.extend_from_slice(&export[..export.len().min(600)]);
    written += write_seed("export_reader", &cut)?;
    println!("wrote {written} new seed files under {CORPUS_DIR}/");
    Ok(())
}

/// Every example line as bytes: scenario events, the `event` of each invalid
/// example (a string `event` is used as raw text), and the noise lines.
fn example_events() -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for name in ["scenario", "noise"] {
        let path = format!("schemas/examples/{name}.jsonl");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        out.extend(text.lines().map(|l| l.as_bytes().to_vec()));
    }
    let path = "schemas/examples/invalid.jsonl";
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    for (i, line) in text.lines().enumerate() {
        let example: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{path} line {}", i + 1))?;
        match &example["event"] {
            serde_json::Value::String(raw) => out.push(raw.as_bytes().to_vec()),
            event => out.push(serde_json::to_vec(event)?),
        }
    }
    Ok(out)
}

/// Kafka-shaped records: the first few example events, then edge cases.
fn records(events: &[Vec<u8>], count: usize, partitions: i32) -> Vec<Record> {
    let types = [
        TimestampType::CreateTime,
        TimestampType::LogAppendTime,
        TimestampType::NotAvailable,
    ];
    (0..count)
        .map(|i| {
            let timestamp_type = types[i % types.len()];
            let partition = i as i32 % partitions;
            Record {
                topic: TOPIC.into(),
                partition,
                offset: i as i64 / i64::from(partitions),
                timestamp_type,
                timestamp_ms: match timestamp_type {
                    TimestampType::NotAvailable => 0,
                    _ => 1_795_000_000_000 + i as i64,
                },
                key: match i % 3 {
                    0 => None,
                    1 => Some(Vec::new()),
                    _ => Some(format!("deal-{i}").into_bytes()),
                },
                value: match i % 5 {
                    4 => None,
                    _ => events.get(i).cloned(),
                },
                headers: (0..i % 3)
                    .map(|h| Header {
                        name: format!("h{h}"),
                        value: (h % 2 == 0).then(|| vec![i as u8; h + 1]),
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Encoded entries of one chain.
fn entries(events: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut head = ChainHead::genesis(StreamId::new(TOPIC, 0));
    records(events, 8, 1)
        .into_iter()
        .map(|record| encode_entry(&head.append(record).expect("valid record")))
        .collect()
}

/// An export of a small ledger: three batches over two partitions.
fn small_export(events: &[Vec<u8>]) -> Result<Vec<u8>> {
    let tmp = tempfile::tempdir()?;
    let store = Store::open(&tmp.path().join("ledger"), TOPIC)?;
    let mut state = LedgerState::new(TOPIC);
    let mut all = records(events, 9, 2).into_iter();
    for size in [4, 3, 2] {
        let write = state.apply_batch(all.by_ref().take(size).collect(), &store)?;
        store.write_batch(&write)?;
    }
    let (bytes, _) = export_store(&store, Vec::new(), |_| {})?;
    Ok(bytes)
}

/// Writes `bytes` as `CORPUS_DIR/target/<blake3 prefix>`; 1 if new.
fn write_seed(target: &str, bytes: &[u8]) -> Result<usize> {
    let dir = Path::new(CORPUS_DIR).join(target);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = blake3::hash(bytes).to_hex();
    let path = dir.join(&name[..16]);
    if path.exists() {
        return Ok(0);
    }
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(1)
}
