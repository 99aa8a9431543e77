//! `dealledger replay` against the real broker: the example scenario
//! produced and ingested, then replayed as of several business and record
//! times, one deal at a time, on a tampered ledger, and from a snapshot vs
//! from genesis.

use std::path::Path;
use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use dealledger::event::Timestamp;
use dealledger::store::{SNAPSHOT_DIR_NAME, Store};
use serde_json::Value;

use crate::common::{create_topic, dealledger, describe, repo_file, unique_topic};

const SCENARIO: &str = "schemas/examples/scenario.jsonl";

fn produce_lines(topic: &str, lines: &[&str]) {
    let mut input = lines.join("\n");
    input.push('\n');
    let out = dealledger(&["produce", "--topic", topic, "-"], Some(input.as_bytes()));
    assert!(out.status.success(), "{}", describe(&out));
}

fn ingest(topic: &str, data: &Path) {
    let out = dealledger(
        &[
            "ingest",
            "--until-caught-up",
            "--topic",
            topic,
            "--data",
            data.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
}

fn scenario_lines() -> Vec<String> {
    std::fs::read_to_string(repo_file(SCENARIO))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A ledger of the whole scenario, ingested from its own 3-partition topic;
/// also returns a time just before it was produced.
fn scenario_ledger(name: &str) -> (tempfile::TempDir, Timestamp) {
    let topic = unique_topic(name);
    create_topic(&topic, 3);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let before = Timestamp::from_unix_millis(millis - 1_000).unwrap();
    let lines = scenario_lines();
    produce_lines(
        &topic,
        &lines.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let dir = tempfile::tempdir().unwrap();
    ingest(&topic, dir.path());
    (dir, before)
}

fn replay(data: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["replay", "--data", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    dealledger(&args, None)
}

fn replay_json(data: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let out = replay(data, &args);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

fn deal<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["deals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("deal {id} missing from {doc:#}"))
}

fn lock_ids(deal: &Value) -> Vec<&str> {
    deal["active_locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lock_id"].as_str().unwrap())
        .collect()
}

#[test]
fn scenario_replays_as_of_business_and_record_times() {
    let (dir, before_produce) = scenario_ledger("replay-scenario");
    let data = dir.path();

    let now = replay_json(data, &[]);
    let lines = scenario_lines().len() as u64;
    assert_eq!(now["entries"], lines, "{now:#}");
    assert_eq!(now["folded"], lines);
    assert_eq!(now["verdicts"]["accepted"], lines);
    assert_eq!(now["as_of"], Value::Null);
    let per_stream: u64 = now["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["entries"].as_u64().unwrap())
        .sum();
    assert_eq!(per_stream, lines);
    assert_eq!(now["deals"].as_array().unwrap().len(), 5);
    let google = deal(&now, "google-openai-2025");
    assert_eq!(google["status"], "finalized", "{google:#}");
    assert_eq!(google["parties"]["customer"], "openai");
    assert_eq!(google["parties"]["provider"], "google-cloud");
    assert_eq!(google["terms"]["capacity"]["quantity"], 60_000_000);
    assert_eq!(google["terms"]["capacity"]["unit"], "tpu-hours");
    assert_eq!(google["terms"]["price"]["amount_minor"], 260_000_000_000u64);
    assert_eq!(google["terms"]["price"]["currency"], "USD");
    assert_eq!(google["terms"]["start"], "2025-06-01T00:00:00Z");
    assert_eq!(google["terms"]["end"], "2029-06-01T00:00:00Z");
    assert_eq!(google["last_event"]["type"], "deal.finalized");
    assert_eq!(google["last_event"]["time"], "2025-05-28T15:00:00Z");
    // Both of Microsoft's locks were released by October 2025.
    assert_eq!(lock_ids(deal(&now, "msft-openai-2019")), Vec::<&str>::new());
    assert_eq!(
        deal(&now, "msft-supercomputer-2024")["status"],
        "terminated"
    );

    // The exclusivity lock binds on 2024-12-31 and was released on 2025-01-21.
    let end_2024 = replay_json(data, &["--as-of", "2024-12-31"]);
    assert_eq!(end_2024["as_of"], "2024-12-31T00:00:00Z");
    let msft = deal(&end_2024, "msft-openai-2019");
    assert_eq!(lock_ids(msft), vec!["azure-exclusive"]);
    let lock = &msft["active_locks"][0];
    assert_eq!(lock["holder"], "microsoft");
    assert_eq!(lock["bound_party"], "openai");
    assert_eq!(lock["scope"], "cloud-compute");
    assert_eq!(lock["kind"], "exclusive");
    assert_eq!(lock["since"], "2019-07-22T00:00:00Z");
    let feb_2025 = replay_json(data, &["--as-of", "2025-02-01"]);
    assert_eq!(
        lock_ids(deal(&feb_2025, "msft-openai-2019")),
        vec!["azure-rofr"],
        "azure-exclusive was released on 2025-01-21, the right of first refusal replaced it"
    );

    // Mid-January 2025 the Google deal was still being negotiated.
    let mid_january = replay_json(data, &["--as-of", "2025-01-15"]);
    let google = deal(&mid_january, "google-openai-2025");
    assert_eq!(google["status"], "negotiating");
    assert_eq!(google["terms"], Value::Null);
    assert_eq!(google["last_event"]["time"], "2025-01-14T16:30:00Z");
    assert!(mid_january["folded"].as_u64().unwrap() < lines);
    assert_eq!(mid_january["entries"], lines, "every entry is verified");

    // Before the events were produced, the ledger knew of nothing.
    let before = before_produce.to_string();
    let unknown = replay_json(data, &["--recorded-as-of", &before]);
    assert_eq!(unknown["deals"], serde_json::json!([]));
    assert_eq!(unknown["folded"], 0);
    assert_eq!(unknown["recorded_as_of"], before.as_str());
    // ... and both clocks together: known now, about the world of 2024-12-31.
    let both = replay_json(
        data,
        &["--as-of", "2024-12-31", "--recorded-as-of", "9999-12-31"],
    );
    assert_eq!(both["deals"], end_2024["deals"]);

    // The human table names the deals and the locks.
    let out = replay(data, &["--as-of", "2024-12-31"]);
    assert!(out.status.success(), "{}", describe(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("as of 2024-12-31T00:00:00Z"), "{table}");
    assert!(
        table.contains(
            "lock azure-exclusive: microsoft holds exclusive over openai in cloud-compute, since 2019-07-22T00:00:00Z"
        ),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("google-openai-2025 ") && l.contains(" negotiating ")),
        "{table}"
    );

    // A TIME that is neither RFC 3339 nor a date is a bad argument.
    let out = replay(data, &["--as-of", "15/01/2025"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2025-01-15 (the start of that day, UTC)"),
        "{stderr}"
    );
}

#[test]
fn one_deal_known_or_unknown() {
    let (dir, _) = scenario_ledger("replay-deal");
    let data = dir.path();
    let doc = replay_json(data, &["--deal", "stargate-2025"]);
    let deals = doc["deals"].as_array().unwrap();
    assert_eq!(deals.len(), 1);
    assert_eq!(deals[0]["id"], "stargate-2025");
    assert_eq!(deals[0]["status"], "finalized");
    assert_eq!(
        deals[0]["parties"]["partners"],
        serde_json::json!(["softbank", "mgx"])
    );
    assert_eq!(deals[0]["terms"]["capacity"]["quantity"], 7);

    let out = replay(data, &["--deal", "stargate-2025"]);
    assert!(out.status.success(), "{}", describe(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("openai, oracle, softbank, mgx"), "{table}");
    assert!(!table.contains("google-openai-2025"), "{table}");

    for args in [
        vec!["--deal", "no-such-deal"],
        vec!["--deal", "stargate-2025", "--as-of", "2025-01-01"],
    ] {
        let out = replay(data, &args);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(" is not in ledger "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}

/// Flips the case of one letter of the event id inside the stored entry at
/// (`partition`, `seq`): the entry still decodes, its hash no longer matches.
/// Entries are stored in pages (storage format 2, docs/FORMAT.md "Entry
/// pages": key `E` ‖ u32 partition ‖ u64 first seq; value u8 1 ‖ u32 count
/// ‖ (u32 length ‖ entry)*), so the entry is found in the page holding it.
fn tamper(data: &Path, partition: u32, seq: u64) {
    crate::common::edit_raw(data, |tree| {
        crate::common::edit_page(tree, partition as i32, seq, |entries, i| {
            let entry = &mut entries[i];
            let id = entry
                .windows(7)
                .position(|w| w == b"\"evt-00")
                .expect("the event id in the entry");
            entry[id + 1] = b'E';
        });
    });
}

fn assert_broken_at(out: &Output, stream: &str, seq: u64) {
    assert_eq!(out.status.code(), Some(1), "{}", describe(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("chain broken at {stream} seq {seq} (offset ")),
        "{stderr}"
    );
    assert!(stderr.contains("hash mismatch"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", describe(out));
}

#[test]
fn a_tampered_ledger_is_refused_naming_stream_and_seq() {
    let (dir, _) = scenario_ledger("replay-tamper");
    let data = dir.path();
    let (topic, partition, last) = {
        let store = Store::open_existing(data).unwrap();
        assert!(
            !store.snapshot_batches().unwrap().is_empty(),
            "ingest snapshots at clean shutdown"
        );
        let head = store
            .heads()
            .unwrap()
            .into_iter()
            .max_by_key(|h| h.next_seq())
            .unwrap();
        assert!(head.next_seq() >= 3);
        (
            store.topic().to_owned(),
            head.stream().partition,
            head.next_seq() - 1,
        )
    };
    let stream = format!("{topic}/{partition}");

    // An entry in the middle of a stream: found by every replay from genesis.
    tamper(data, partition as u32, 1);
    assert_broken_at(&replay(data, &["--from-genesis"]), &stream, 1);
    assert_broken_at(
        &replay(data, &["--as-of", "2030-01-01", "--json"]),
        &stream,
        1,
    );
    assert_broken_at(
        &replay(data, &["--recorded-as-of", "2000-01-01"]),
        &stream,
        1,
    );

    // The last entry, where the shutdown snapshot ties in: found by the
    // default replay from that snapshot too.
    tamper(data, partition as u32, last);
    assert_broken_at(&replay(data, &["--json"]), &stream, last);
}

#[test]
fn replay_from_a_snapshot_equals_replay_from_genesis() {
    let topic = unique_topic("replay-snapshot");
    create_topic(&topic, 3);
    let lines = scenario_lines();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();

    // Ingest the first half; write a snapshot (ingest also takes one when it
    // stops cleanly); then ingest the rest.
    produce_lines(&topic, &lines[..20]);
    ingest(&topic, data);
    let first = {
        let store = Store::open_existing(data).unwrap();
        let state = store.load_state().unwrap();
        assert_eq!(state.entry_count(), 20);
        assert_eq!(store.write_snapshot(&state).unwrap(), None, "already taken");
        let taken = store.snapshot_batches().unwrap();
        assert_eq!(taken.len(), 1);
        taken[0]
    };
    produce_lines(&topic, &lines[20..]);
    ingest(&topic, data);
    let latest = {
        let store = Store::open_existing(data).unwrap();
        let taken = store.snapshot_batches().unwrap();
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0], first);
        taken[1]
    };

    let genesis = replay(data, &["--json", "--from-genesis"]);
    assert!(genesis.status.success(), "{}", describe(&genesis));
    let from_latest = replay(data, &["--json"]);
    assert!(from_latest.status.success(), "{}", describe(&from_latest));
    assert_eq!(
        String::from_utf8(from_latest.stdout).unwrap(),
        String::from_utf8(genesis.stdout.clone()).unwrap()
    );
    let table = String::from_utf8(replay(data, &[]).stdout).unwrap();
    assert!(
        table.contains(&format!("started from the snapshot after batch {latest}")),
        "{table}"
    );

    // Damage the latest snapshot: the replay starts from the first one and
    // folds the second half again, with the same result.
    {
        let file = data
            .join(SNAPSHOT_DIR_NAME)
            .join(format!("after-batch-{latest:020}.snapshot"));
        let mut value = std::fs::read(&file).unwrap();
        let middle = value.len() / 2;
        value[middle] ^= 0x01;
        std::fs::write(&file, value).unwrap();
    }
    let from_first = replay(data, &["--json"]);
    assert!(from_first.status.success(), "{}", describe(&from_first));
    assert_eq!(
        String::from_utf8(from_first.stdout).unwrap(),
        String::from_utf8(genesis.stdout).unwrap()
    );
    let table = String::from_utf8(replay(data, &[]).stdout).unwrap();
    assert!(
        table.contains(&format!("started from the snapshot after batch {first}")),
        "{table}"
    );
}

#[test]
fn an_export_replays_like_its_ledger() {
    let (dir, _) = scenario_ledger("replay-export");
    let data = dir.path();
    let files = tempfile::tempdir().unwrap();
    let export = files.path().join("scenario.dlx");
    let out = dealledger(
        &[
            "export",
            "--data",
            data.to_str().unwrap(),
            "--out",
            export.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    for cut in [&[][..], &["--as-of", "2025-01-15"][..]] {
        let mut args = vec!["replay", "--json", "--export", export.to_str().unwrap()];
        args.extend_from_slice(cut);
        let from_export = dealledger(&args, None);
        assert!(from_export.status.success(), "{}", describe(&from_export));
        let from_ledger = replay_json(data, cut);
        let from_export: Value = serde_json::from_slice(&from_export.stdout).unwrap();
        assert_eq!(from_export, from_ledger);
    }
    // --data and --export together name two ledgers.
    let out = replay(data, &["--export", export.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}
