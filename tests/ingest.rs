//! Ingestion against the real broker: exactly once under SIGKILL, the same
//! heads whatever the batch size, bad input recorded and dead-lettered, one
//! process per ledger, clean shutdown on SIGTERM.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dealledger::ledger::Verdict;
use dealledger::store::Store;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::common::{
    bootstrap, create_topic, dealledger, describe, read_all, repo_file, unique_topic,
};

fn ingest_until_caught_up(topic: &str, data: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "ingest",
        "--until-caught-up",
        "--json",
        "--topic",
        topic,
        "--data",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = dealledger(&args, None);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).expect("json summary")
}

fn heads(summary: &serde_json::Value) -> Vec<(i64, i64, String)> {
    summary["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["partition"].as_i64().unwrap(),
                s["entries"].as_i64().unwrap(),
                s["head_hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn produce_file(topic: &str, file: &Path) {
    let out = dealledger(&["produce", "--topic", topic, file.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", describe(&out));
}

/// Every offset of every partition of `topic` is in the ledger exactly once,
/// in offset order, and every chain verifies.
fn assert_ledger_matches_topic(topic: &str, data: &Path) {
    let records = read_all(topic);
    let store = Store::open_existing(data).expect("open ledger");
    let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in &records {
        by_partition.entry(r.partition).or_default().push(r.offset);
    }
    for (partition, offsets) in &by_partition {
        let stored: Vec<i64> = store
            .entries(*partition, 0)
            .map(|e| e.expect("readable entry").record.offset)
            .collect();
        assert_eq!(
            &stored, offsets,
            "partition {partition}: ledger offsets differ from the topic's"
        );
    }
    let report = store.verify().expect("verify runs");
    assert!(report.is_intact(), "{report:?}");
}

#[test]
fn scenario_is_ingested_with_every_entry_accepted() {
    let topic = unique_topic("ingest-scenario");
    create_topic(&topic, 6);
    produce_file(&topic, &repo_file("schemas/examples/scenario.jsonl"));
    let dir = tempfile::tempdir().unwrap();
    let summary = ingest_until_caught_up(&topic, dir.path(), &[]);
    let lines = std::fs::read_to_string(repo_file("schemas/examples/scenario.jsonl"))
        .unwrap()
        .lines()
        .count() as u64;
    assert_eq!(summary["ingested"], lines, "{summary}");
    assert_eq!(summary["accepted"], lines, "{summary}");
    assert_ledger_matches_topic(&topic, dir.path());

    // A second run finds nothing new: positions were stored with the entries.
    let again = ingest_until_caught_up(&topic, dir.path(), &[]);
    assert_eq!(again["ingested"], 0, "{again}");
    assert_eq!(heads(&again), heads(&summary));
}

#[test]
fn batch_size_does_not_change_the_chain_heads() {
    let topic = unique_topic("ingest-determinism");
    create_topic(&topic, 4);
    let events = tempfile::NamedTempFile::new().unwrap();
    let out = dealledger(
        &[
            "generate", "--events", "3000", "--deals", "40", "--seed", "9",
        ],
        None,
    );
    assert!(out.status.success());
    std::fs::write(events.path(), &out.stdout).unwrap();
    produce_file(&topic, events.path());
    produce_file(&topic, &repo_file("schemas/examples/scenario.jsonl"));

    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let one = ingest_until_caught_up(&topic, a.path(), &["--batch-records", "7"]);
    let many = ingest_until_caught_up(&topic, b.path(), &["--batch-records", "2000"]);
    assert_eq!(one["ingested"], 3041);
    assert_eq!(heads(&one), heads(&many));
    assert_eq!(heads(&one).len(), 4);
}

fn raw_producer() -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap()
}

#[test]
fn bad_input_is_recorded_rejected_and_dead_lettered() {
    let topic = unique_topic("ingest-bad");
    create_topic(&topic, 1);
    let scenario = std::fs::read_to_string(repo_file("schemas/examples/scenario.jsonl")).unwrap();
    let first = scenario.lines().next().unwrap().to_string();
    let proposal = scenario
        .lines()
        .find(|l| l.contains("\"deal.terms.proposed\""))
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(proposal).unwrap();
    v["data"]["terms"]["price"]["amount_minor"] = serde_json::json!(-1);
    let schema_violation = v.to_string();
    let mut unknown: serde_json::Value = serde_json::from_str(&first).unwrap();
    unknown["type"] = serde_json::json!("deal.unknown.thing");
    unknown["id"] = serde_json::json!("unknown-type-1");
    let mut orphan: serde_json::Value = serde_json::from_str(proposal).unwrap();
    orphan["subject"] = serde_json::json!("never-opened-deal");
    orphan["id"] = serde_json::json!("orphan-1");
    let oversized = format!("{{\"pad\":\"{}\"}}", "x".repeat(100_000));

    // (value, expected verdict kind); None value = tombstone.
    let cases: Vec<(Option<Vec<u8>>, &str)> = vec![
        (Some(first.clone().into_bytes()), "accepted"),
        (Some(b"\xff\xfe not utf-8".to_vec()), "not_utf8"),
        (Some(b"{not json".to_vec()), "not_json"),
        (Some(br#"{"hello":"world"}"#.to_vec()), "not_cloudevent"),
        (Some(unknown.to_string().into_bytes()), "unknown_type"),
        (Some(schema_violation.into_bytes()), "schema"),
        (Some(orphan.to_string().into_bytes()), "not_opened"),
        (Some(oversized.into_bytes()), "too_large"),
        (Some(first.into_bytes()), "duplicate"),
        (None, "no_value"),
    ];
    let producer = raw_producer();
    for (value, _) in &cases {
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&topic).key("k");
        if let Some(v) = value {
            record = record.payload(v.as_slice());
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let summary = ingest_until_caught_up(&topic, dir.path(), &[]);
    assert_eq!(summary["ingested"], cases.len() as u64, "{summary}");
    assert_eq!(summary["accepted"], 1);
    assert_eq!(summary["duplicate"], 1);
    assert_ledger_matches_topic(&topic, dir.path());

    let store = Store::open_existing(dir.path()).unwrap();
    for (seq, (_, want)) in cases.iter().enumerate() {
        let verdict = store
            .verdict(dealledger::ledger::Location {
                partition: 0,
                seq: seq as u64,
            })
            .unwrap();
        let got = match &verdict {
            Verdict::Accepted => "accepted",
            other => other.kind().unwrap(),
        };
        assert_eq!(got, *want, "entry {seq}: {verdict:?}");
    }
    drop(store);

    // Every non-accepted entry is in the dead-letter topic with its reason and origin.
    let dead = read_all(&format!("{topic}.rejected"));
    assert_eq!(dead.len(), cases.len() - 1);
    for r in &dead {
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.clone())
                .map(|v| String::from_utf8(v).unwrap())
                .unwrap_or_else(|| panic!("header {name} missing"))
        };
        let offset: usize = header("dealledger.source.offset").parse().unwrap();
        assert_eq!(header("dealledger.source.partition"), "0");
        assert_eq!(header("dealledger.source.topic"), topic);
        assert_eq!(header("dealledger.kind"), cases[offset].1);
        assert!(!header("dealledger.reason").is_empty());
        assert_eq!(
            r.value, cases[offset].0,
            "dead letter carries the original bytes"
        );
    }
}

fn spawn_serve(topic: &str, data: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .args([
            "serve",
            "--topic",
            topic,
            "--data",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--batch-records",
            "500",
            "--group",
            &format!("{topic}-group"),
        ])
        .env("DEALLEDGER_BROKERS", bootstrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// A tiny deterministic PRNG for kill timings.
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Batches the daemon listening on `port` has written since it started.
fn batches_written(port: u16) -> u64 {
    http_get(port, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with("dealledger_batches_total "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        })
        .map_or(0, |n| n as u64)
}

fn stored_entries(data: &Path) -> u64 {
    match Store::open_existing(data) {
        Ok(store) => store.heads().unwrap().iter().map(|h| h.next_seq()).sum(),
        Err(_) => 0,
    }
}

#[test]
fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let topic = unique_topic("ingest-crash");
    create_topic(&topic, 6);
    let dir = tempfile::tempdir().unwrap();
    let events = tempfile::NamedTempFile::new().unwrap();
    let out = dealledger(
        &[
            "generate", "--events", "50000", "--deals", "500", "--seed", "3",
        ],
        None,
    );
    assert!(out.status.success());
    std::fs::write(events.path(), &out.stdout).unwrap();

    // Produce in ten slices, spread over time, while the daemon is being killed.
    let producer_topic = topic.clone();
    let file = events.path().to_path_buf();
    let producer = std::thread::spawn(move || {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for chunk in lines.chunks(2_500) {
            let out = dealledger(
                &["produce", "--topic", &producer_topic, "-"],
                Some(chunk.join("\n").as_bytes()),
            );
            assert!(out.status.success(), "{}", describe(&out));
            std::thread::sleep(Duration::from_millis(1_000));
        }
    });

    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut kills = 0;
    let mut progress = Vec::new();
    while kills < 12 {
        let port = free_port();
        let mut child = spawn_serve(&topic, dir.path(), port);
        // Kill while it ingests: once this run has written a batch (or after
        // 15 s, if there was nothing left to read), at a random moment.
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && batches_written(port) == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(next_rand(&mut rng) % 1_000));
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        kills += 1;
        progress.push(stored_entries(dir.path()));
    }
    producer.join().unwrap();
    // The kills landed while the daemon was ingesting: it made progress between
    // several of them, and had not finished before the last one.
    eprintln!("entries in the ledger after each SIGKILL: {progress:?}");
    let grew = progress.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        grew >= 5,
        "the daemon made progress in only {grew} runs: {progress:?}"
    );

    let summary =
        ingest_until_caught_up(&topic, dir.path(), &["--group", &format!("{topic}-group")]);
    let total: i64 = heads(&summary).iter().map(|(_, n, _)| n).sum();
    assert_eq!(total, 50_000, "{summary}");
    assert_ledger_matches_topic(&topic, dir.path());
    // Every event was new to the ledger exactly once: no duplicates, none lost.
    let store = Store::open_existing(dir.path()).unwrap();
    assert_eq!(
        store.verdicts().count(),
        0,
        "no entry should be rejected or a duplicate"
    );
}

#[test]
fn daemon_serves_health_and_metrics_and_stops_cleanly_on_sigterm() {
    let topic = unique_topic("ingest-serve");
    create_topic(&topic, 2);
    produce_file(&topic, &repo_file("schemas/examples/scenario.jsonl"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_serve(&topic, dir.path(), port);

    assert_eq!(wait_for_accepted(port, 41), 41.0);
    let (status, health) = http_get(port, "/health").expect("health answers");
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("\"ok\""), "{health}");

    // A second process cannot open the same ledger, and says which folder.
    let out = dealledger(
        &[
            "ingest",
            "--until-caught-up",
            "--topic",
            &topic,
            "--data",
            dir.path().to_str().unwrap(),
        ],
        None,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(dir.path().to_str().unwrap()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let exit = stop_with_sigterm(&mut child);
    assert!(exit.success(), "serve exited with {exit:?}");
    assert_ledger_matches_topic(&topic, dir.path());
}

#[test]
fn the_daemon_outlives_its_log_reader() {
    // A daemon's log reader can go away (a closed terminal, a restarted
    // log collector): every later log line then meets a broken pipe.
    // tracing-subscriber reports a failed write with eprintln!, which
    // panicked on that same broken pipe and took the ingest thread down.
    let topic = unique_topic("ingest-logpipe");
    create_topic(&topic, 2);
    produce_file(&topic, &repo_file("schemas/examples/scenario.jsonl"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_serve(&topic, dir.path(), port);
    drop(child.stderr.take());
    // Taking its partitions and stopping are logged at the default level.
    assert_eq!(wait_for_accepted(port, 41), 41.0);
    let exit = stop_with_sigterm(&mut child);
    assert!(exit.success(), "serve exited with {exit:?}");
    assert_ledger_matches_topic(&topic, dir.path());
}

/// Waits (60 s at most) until the daemon on `port` reports at least
/// `events` accepted on /metrics; returns how many it reports.
fn wait_for_accepted(port: u16, events: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = http_get(port, "/metrics") {
            let n: f64 = body
                .lines()
                .filter(|l| {
                    l.starts_with("dealledger_events_total{") && l.contains("verdict=\"accepted\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if n >= events as f64 {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not accept {events} events in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends SIGTERM to `child` and waits (30 s at most) for it to exit.
fn stop_with_sigterm(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("serve did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
