//! The audit commands against the real broker: export, verify (of ledgers
//! and exports), import and rebuild. Ledgers are made the way operators make
//! them (`dealledger produce`, then `dealledger ingest --until-caught-up`),
//! then exported, damaged in chosen places, re-imported, rebuilt from Kafka
//! and killed mid-export.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dealledger::chain::{self, Entry};
use dealledger::export::{ExportItem, ExportReader};
use dealledger::ledger::Location;
use dealledger::store::Store;
use serde_json::Value;

use crate::common::{
    bootstrap, create_topic, dealledger, describe, edit_page, edit_raw, repo_file, unique_topic,
};

// ---- helpers ------------------------------------------------------------------

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(out)))
}

/// Asserts `out` exited with `want`; for exit 2 also that stderr is one
/// clear line and nothing panicked.
fn expect_code(out: &Output, want: i32) {
    assert_eq!(code(out), want, "{}", describe(out));
    let err = stderr(out);
    assert!(!err.contains("panicked"), "{}", describe(out));
    if want == 2 {
        assert_eq!(err.trim_end().lines().count(), 1, "{}", describe(out));
        assert!(err.starts_with("error: "), "{}", describe(out));
    }
}

/// Generates `events` events with `seed` and produces them (and the
/// scenario) to a new topic of `partitions` partitions.
fn topic_with_events(name: &str, partitions: i32, events: u64, seed: u64) -> String {
    let topic = unique_topic(name);
    create_topic(&topic, partitions);
    produce_generated(&topic, events, seed);
    let scenario = repo_file("schemas/examples/scenario.jsonl");
    let out = dealledger(&["produce", "--topic", &topic, path(&scenario)], None);
    assert!(out.status.success(), "{}", describe(&out));
    topic
}

fn produce_generated(topic: &str, events: u64, seed: u64) {
    let out = dealledger(
        &[
            "generate",
            "--events",
            &events.to_string(),
            "--deals",
            "60",
            "--seed",
            &seed.to_string(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let out = dealledger(&["produce", "--topic", topic, "-"], Some(&out.stdout));
    assert!(out.status.success(), "{}", describe(&out));
}

fn ingest(topic: &str, data: &Path, batch_records: u32) {
    let out = dealledger(
        &[
            "ingest",
            "--until-caught-up",
            "--no-dead-letter",
            "--topic",
            topic,
            "--data",
            path(data),
            "--batch-records",
            &batch_records.to_string(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
}

fn export(data: &Path, file: &Path) -> Value {
    let out = dealledger(
        &[
            "export",
            "--data",
            path(data),
            "--out",
            path(file),
            "--json",
        ],
        None,
    );
    expect_code(&out, 0);
    json(&out)
}

fn verify_data(data: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["verify", "--data", path(data)];
    args.extend_from_slice(extra);
    dealledger(&args, None)
}

fn verify_export(file: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["verify", "--export", path(file)];
    args.extend_from_slice(extra);
    dealledger(&args, None)
}

/// (partition, entries, head seq, head hash) of every stream in a verify
/// report.
fn report_heads(report: &Value) -> Vec<(i64, i64, i64, String)> {
    report["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["partition"].as_i64().unwrap(),
                s["entries"].as_i64().unwrap(),
                s["head_seq"].as_i64().unwrap(),
                s["head_hash"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `--expect-head` arguments for every stream of a verify report.
fn expect_heads(topic: &str, report: &Value) -> Vec<String> {
    report_heads(report)
        .into_iter()
        .flat_map(|(p, _, seq, hash)| {
            [
                "--expect-head".to_owned(),
                format!("{topic}/{p}:{seq}:{hash}"),
            ]
        })
        .collect()
}

/// Every entry frame of an export: byte offset of the frame and the entry.
fn entry_frames(bytes: &[u8]) -> Vec<(usize, Entry)> {
    let mut reader = ExportReader::new(bytes).unwrap();
    let mut out = Vec::new();
    while let Some(item) = reader.next() {
        if let ExportItem::Entry(e) = item.unwrap() {
            out.push((reader.frame_start() as usize, e));
        }
    }
    out
}

/// Byte offset of the header's end (the first frame).
fn first_frame(bytes: &[u8]) -> usize {
    ExportReader::new(bytes).unwrap().bytes_read() as usize
}

/// Byte offset, in `bytes`, of the value of the entry frame at `frame`.
fn value_at(bytes: &[u8], frame: usize, entry: &Entry) -> usize {
    let value = entry.record.value.as_deref().unwrap();
    frame
        + bytes[frame..]
            .windows(value.len())
            .position(|w| w == value)
            .unwrap()
}

fn write_damaged(dir: &Path, name: &str, bytes: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut damaged = bytes.to_vec();
    edit(&mut damaged);
    let file = dir.join(name);
    std::fs::write(&file, damaged).unwrap();
    file
}

fn head_key(partition: i32) -> Vec<u8> {
    let mut key = vec![b'H'];
    key.extend_from_slice(&(partition as u32).to_be_bytes());
    key
}

// ---- tests ----------------------------------------------------------------------

#[test]
fn export_verify_import_round_trip_reproduces_the_ledger() {
    let topic = topic_with_events("audit-roundtrip", 4, 3000, 21);
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    ingest(&topic, &original, 500);

    let verified = verify_data(&original, &["--json"]);
    expect_code(&verified, 0);
    let report = json(&verified);
    assert_eq!(report["status"], "intact");
    assert_eq!(report["entries"], 3041);
    let heads = report_heads(&report);
    assert_eq!(heads.len(), 4);

    let file = tmp.path().join("ledger.dlx");
    let summary = export(&original, &file);
    assert_eq!(summary["entries"], 3041, "{summary}");
    assert_eq!(summary["bytes"], std::fs::metadata(&file).unwrap().len());
    assert!(!tmp.path().join("ledger.dlx.tmp").exists());

    let out = verify_export(&file, &["--json"]);
    expect_code(&out, 0);
    let export_report = json(&out);
    assert_eq!(export_report["status"], "intact");
    assert_eq!(export_report["source"], "export");
    assert_eq!(report_heads(&export_report), heads);
    assert_eq!(export_report["trailer"]["entries"], 3041);

    // The true heads, as a caller who saved them would pass them.
    let expected = expect_heads(&topic, &report);
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    expect_code(&verify_data(&original, &expected), 0);
    let out = verify_export(&file, &expected);
    expect_code(&out, 0);
    assert!(
        stdout(&out).contains("4 expected heads match"),
        "{}",
        describe(&out)
    );

    let copy = tmp.path().join("copy");
    let out = dealledger(
        &["import", path(&file), "--data", path(&copy), "--json"],
        None,
    );
    expect_code(&out, 0);
    assert_eq!(json(&out)["entries"], 3041);
    assert!(!tmp.path().join("copy.importing").exists());
    let out = verify_data(&copy, &["--json"]);
    expect_code(&out, 0);
    assert_eq!(report_heads(&json(&out)), heads);

    // The same batches, verdicts and heads, and the same export bytes.
    {
        let a = Store::open_existing(&original).unwrap();
        let b = Store::open_existing(&copy).unwrap();
        assert_eq!(a.heads().unwrap(), b.heads().unwrap());
        let batches = |s: &Store| s.batches(0).map(Result::unwrap).collect::<Vec<_>>();
        assert_eq!(batches(&a), batches(&b));
        let verdicts = |s: &Store| s.verdicts().map(Result::unwrap).collect::<Vec<_>>();
        assert_eq!(verdicts(&a), verdicts(&b));
    }
    let again = tmp.path().join("again.dlx");
    export(&copy, &again);
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&file).unwrap()
    );

    // An export to standard output is the same file.
    let out = dealledger(&["export", "--data", path(&copy)], None);
    expect_code(&out, 0);
    assert_eq!(out.stdout, std::fs::read(&file).unwrap());
    assert!(stderr(&out).contains("3041 entries"), "{}", describe(&out));

    // A ledger is never imported over another one.
    let out = dealledger(&["import", path(&file), "--data", path(&copy)], None);
    expect_code(&out, 2);
    assert!(stderr(&out).contains("not empty"), "{}", describe(&out));
}

#[test]
fn verify_export_reports_damage_at_its_place_and_refuses_unreadable_files() {
    let topic = topic_with_events("audit-damage", 3, 400, 22);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    ingest(&topic, &data, 100);
    let file = tmp.path().join("good.dlx");
    export(&data, &file);
    let bytes = std::fs::read(&file).unwrap();
    let frames = entry_frames(&bytes);
    let dir = tmp.path();

    // Unreadable: exit 2, one line on stderr.
    let cut_message = format!(
        "truncated at byte {} inside an entry frame",
        frames[5].0 + 30
    );
    let unreadable: Vec<(&str, PathBuf, &str)> = vec![
        (
            "magic",
            write_damaged(dir, "magic.dlx", &bytes, |b| b[0] ^= 0x01),
            "not a dealledger export",
        ),
        (
            "version",
            write_damaged(dir, "newer.dlx", &bytes, |b| {
                b[8..12].copy_from_slice(&2u32.to_be_bytes())
            }),
            "newer than the version 1",
        ),
        (
            "header",
            write_damaged(dir, "header.dlx", &bytes, |b| b[20] ^= 0x01),
            "export header at byte 16 is not valid",
        ),
        (
            "frame tag",
            write_damaged(dir, "tag.dlx", &bytes, |b| {
                let at = first_frame(b);
                b[at] ^= 0x01;
            }),
            "unknown frame tag",
        ),
        (
            "entry frame length",
            write_damaged(dir, "length.dlx", &bytes, |b| b[frames[3].0 + 1] ^= 0x40),
            "export",
        ),
        (
            "truncated inside an entry",
            write_damaged(dir, "cut.dlx", &bytes, |b| b.truncate(frames[5].0 + 30)),
            &cut_message,
        ),
        (
            "truncated before the trailer",
            write_damaged(dir, "cut2.dlx", &bytes, |b| b.truncate(b.len() - 53)),
            "ends before its trailer frame",
        ),
        (
            "truncated in the header",
            write_damaged(dir, "cut3.dlx", &bytes, |b| b.truncate(40)),
            "truncated at byte 40 inside the header",
        ),
        (
            "garbage",
            write_damaged(dir, "garbage.dlx", &bytes, |b| {
                *b = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
            }),
            "not a dealledger export",
        ),
        (
            "empty",
            write_damaged(dir, "empty.dlx", &bytes, Vec::clear),
            "the file is empty",
        ),
        (
            "missing",
            dir.join("no-such-file.dlx"),
            "cannot open export",
        ),
    ];
    for (what, file, says) in &unreadable {
        let out = verify_export(file, &[]);
        expect_code(&out, 2);
        assert!(stderr(&out).contains(says), "{what}: {}", describe(&out));
        let out = verify_export(file, &["--json"]);
        expect_code(&out, 2);
        assert_eq!(json(&out)["status"], "unreadable", "{what}");
    }

    // Broken: exit 1, at the right stream, seq and offset.
    let (frame, entry) = frames[7].clone();
    let partition = entry.record.partition;
    let stream = format!("{topic}/{partition}");
    let flips: Vec<(&str, usize, &str)> = vec![
        (
            "value byte",
            value_at(&bytes, frame, &entry) + 5,
            "hash mismatch",
        ),
        (
            "stored hash",
            frame + 5 + chain::encode_entry(&entry).len() - 1,
            "hash mismatch",
        ),
        ("prev hash", frame + 5 + 1 + 3, "prev hash mismatch"),
        (
            "seq",
            frame + 5 + 1 + 32 + 7,
            "entry moved, altered, inserted or deleted",
        ),
        ("version byte", frame + 5, "does not decode"),
    ];
    for (what, at, says) in flips {
        let damaged = write_damaged(dir, "flip.dlx", &bytes, |b| b[at] ^= 0x01);
        let out = verify_export(&damaged, &[]);
        expect_code(&out, 1);
        let text = stdout(&out);
        assert!(text.contains(says), "{what}: {}", describe(&out));
        assert!(
            text.contains(&format!("{stream} seq {}", entry.seq))
                || text.contains(&format!("partition {partition} seq {}", entry.seq)),
            "{what}: {}",
            describe(&out)
        );
        let out = verify_export(&damaged, &["--json"]);
        expect_code(&out, 1);
        let report = json(&out);
        assert_eq!(report["status"], "broken");
        let broken: Vec<&Value> = report["streams"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "broken")
            .collect();
        assert_eq!(broken.len(), 1, "{what}: {report:#}");
        let problem = &broken[0]["problem"];
        assert_eq!(problem["partition"], partition, "{what}: {report:#}");
        assert_eq!(problem["seq"], entry.seq, "{what}: {report:#}");
        assert_eq!(problem["byte_offset"], frame, "{what}: {report:#}");
        // Streams before the break verified up to it.
        assert_eq!(broken[0]["entries"], entry.seq, "{what}");
        // The trailer hash no longer matches either.
        assert_eq!(
            report["problems"][0]["kind"], "trailer_hash_mismatch",
            "{what}"
        );
    }
    // The hash mismatch names the Kafka offset and expected vs found.
    let damaged = write_damaged(dir, "flip.dlx", &bytes, |b| {
        b[value_at(&bytes, frame, &entry) + 5] ^= 0x01
    });
    let out = verify_export(&damaged, &["--json"]);
    let report = json(&out);
    let problem = report["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["status"] == "broken")
        .unwrap()["problem"]
        .clone();
    assert_eq!(problem["kind"], "hash_mismatch");
    assert_eq!(problem["offset"], entry.record.offset);
    assert_eq!(problem["found"], entry.hash.to_string());
    assert_ne!(problem["expected"], problem["found"]);
    assert!(stdout(&verify_export(&damaged, &[])).contains(&format!(
        "{stream} seq {} (offset {}): hash mismatch",
        entry.seq, entry.record.offset
    )));

    // A flipped byte in the trailer's hash.
    let damaged = write_damaged(dir, "trailer.dlx", &bytes, |b| {
        let n = b.len();
        b[n - 1] ^= 0x01;
    });
    let out = verify_export(&damaged, &[]);
    expect_code(&out, 1);
    assert!(
        stdout(&out).contains("export altered or damaged after it was written"),
        "{}",
        describe(&out)
    );

    // A folder that is not a ledger, and one that does not exist.
    let not_ledger = tmp.path().join("not-a-ledger");
    std::fs::create_dir(&not_ledger).unwrap();
    std::fs::write(not_ledger.join("notes.txt"), "hello").unwrap();
    for folder in [not_ledger, tmp.path().join("nowhere")] {
        let out = verify_data(&folder, &[]);
        expect_code(&out, 2);
        assert!(
            stderr(&out).contains("is not a dealledger ledger"),
            "{}",
            describe(&out)
        );
    }
    // A ledger folder given as an export, and an export as a ledger.
    expect_code(&verify_export(&data, &[]), 2);
    expect_code(&verify_data(&file, &[]), 2);
    // Bad --expect-head arguments (clap's own message, exit 2).
    let out = verify_data(&data, &["--expect-head", "0:1:nothex"]);
    assert_eq!(code(&out), 2, "{}", describe(&out));
    assert!(
        stderr(&out).contains("hash must be 64"),
        "{}",
        describe(&out)
    );
    let other = format!("other-topic/0:1:{}", "0".repeat(64));
    expect_code(&verify_data(&data, &["--expect-head", &other]), 2);
}

#[test]
fn verify_catches_a_tampered_ledger_and_a_rewritten_tail() {
    let topic = topic_with_events("audit-ledger", 2, 300, 23);
    let tmp = tempfile::tempdir().unwrap();

    // One value byte altered in sled.
    let tampered = tmp.path().join("tampered");
    ingest(&topic, &tampered, 50);
    let entry = {
        let store = Store::open_existing(&tampered).unwrap();
        store
            .entry(Location {
                partition: 1,
                seq: 5,
            })
            .unwrap()
            .unwrap()
    };
    edit_raw(&tampered, |tree| {
        edit_page(tree, 1, 5, |entries, i| {
            let value = &mut entries[i];
            let value_bytes = entry.record.value.as_deref().unwrap();
            let at = value
                .windows(value_bytes.len())
                .position(|w| w == value_bytes)
                .unwrap();
            value[at + 10] ^= 0x04;
        });
    });
    let out = verify_data(&tampered, &[]);
    expect_code(&out, 1);
    assert!(
        stdout(&out).contains(&format!(
            "{topic}/1 seq 5 (offset {}): hash mismatch",
            entry.record.offset
        )),
        "{}",
        describe(&out)
    );
    let report = json(&verify_data(&tampered, &["--json"]));
    assert_eq!(report["status"], "broken");
    assert_eq!(report["streams"][0]["status"], "intact");
    assert_eq!(report["streams"][1]["problem"]["seq"], 5);
    assert_eq!(report["streams"][1]["problem"]["partition"], 1);
    assert_eq!(
        report["streams"][1]["problem"]["offset"],
        entry.record.offset
    );
    // Exporting it is refused, and leaves no file.
    let file = tmp.path().join("tampered.dlx");
    let out = dealledger(
        &["export", "--data", path(&tampered), "--out", path(&file)],
        None,
    );
    expect_code(&out, 1);
    assert!(
        stderr(&out).contains(&format!("{topic}/1 seq 5")),
        "{}",
        describe(&out)
    );
    assert!(!file.exists() && !tmp.path().join("tampered.dlx.tmp").exists());

    // The last entry deleted and the head rewritten to match: the store is
    // consistent, only a trusted head tells.
    let truncated = tmp.path().join("truncated");
    ingest(&topic, &truncated, 50);
    let good = json(&verify_data(&truncated, &["--json"]));
    let (n, last, previous) = {
        let store = Store::open_existing(&truncated).unwrap();
        let n = store.stream_len(0).unwrap();
        let at = |seq| {
            store
                .entry(Location { partition: 0, seq })
                .unwrap()
                .unwrap()
        };
        (n, at(n - 1), at(n - 2))
    };
    edit_raw(&truncated, |tree| {
        edit_page(tree, 0, n - 1, |entries, i| {
            assert_eq!(i, entries.len() - 1, "the last entry of its page");
            entries.pop();
        });
        let mut head = Vec::new();
        head.extend_from_slice(&(n - 1).to_be_bytes());
        head.push(1);
        head.extend_from_slice(&previous.record.offset.to_be_bytes());
        head.extend_from_slice(previous.hash.as_bytes());
        tree.insert(head_key(0), head).unwrap();
    });
    let plain = verify_data(&truncated, &[]);
    expect_code(&plain, 0);
    let expected = expect_heads(&topic, &good);
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    let out = verify_data(&truncated, &expected);
    expect_code(&out, 1);
    assert!(
        stdout(&out).contains(&format!(
            "{topic}/0 seq {} (end of chain): chain ends early: expected next seq {n}, found {} (1 entries missing: tail truncated) (against --expect-head)",
            n - 1,
            n - 1
        )),
        "{}",
        describe(&out)
    );
    assert_eq!(last.seq, n - 1);
    // Partition-only form, and JSON.
    let bare = format!("0:{}:{}", last.seq, last.hash);
    let report = json(&verify_data(
        &truncated,
        &["--expect-head", &bare, "--json"],
    ));
    assert_eq!(report["streams"][0]["problem"]["kind"], "head_seq_mismatch");
    assert_eq!(report["streams"][1]["status"], "intact");
    // Export is stricter than plain verify: the batch records still list
    // the deleted entry, so the ledger is refused.
    let file = tmp.path().join("truncated.dlx");
    let out = dealledger(
        &["export", "--data", path(&truncated), "--out", path(&file)],
        None,
    );
    expect_code(&out, 1);
    assert!(
        stderr(&out).contains(&format!("lists the entry at partition 0 seq {}", n - 1)),
        "{}",
        describe(&out)
    );
    assert!(!file.exists());
}

#[test]
fn import_refuses_a_damaged_export_and_leaves_nothing_behind() {
    let topic = topic_with_events("audit-import", 2, 300, 24);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    ingest(&topic, &data, 64);
    let file = tmp.path().join("good.dlx");
    export(&data, &file);
    let bytes = std::fs::read(&file).unwrap();
    let frames = entry_frames(&bytes);
    let (frame, entry) = frames[frames.len() / 2].clone();

    let damaged = write_damaged(tmp.path(), "bad.dlx", &bytes, |b| {
        b[value_at(&bytes, frame, &entry) + 2] ^= 0x02
    });
    let target = tmp.path().join("restored");
    let out = dealledger(&["import", path(&damaged), "--data", path(&target)], None);
    expect_code(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{topic}/{} seq {} (offset {}): hash mismatch",
            entry.record.partition, entry.seq, entry.record.offset
        )) && err.contains(&format!("export byte {frame}")),
        "{}",
        describe(&out)
    );
    assert!(!target.exists());
    assert!(!tmp.path().join("restored.importing").exists());

    // Truncated: unreadable, exit 2, nothing left either.
    let cut = write_damaged(tmp.path(), "cut.dlx", &bytes, |b| b.truncate(b.len() - 100));
    let out = dealledger(&["import", path(&cut), "--data", path(&target)], None);
    expect_code(&out, 2);
    assert!(stderr(&out).contains("truncated"), "{}", describe(&out));
    assert!(!target.exists());
    assert!(!tmp.path().join("restored.importing").exists());

    // Into an existing empty folder works.
    std::fs::create_dir(&target).unwrap();
    let out = dealledger(&["import", path(&file), "--data", path(&target)], None);
    expect_code(&out, 0);
    expect_code(&verify_data(&target, &[]), 0);
}

#[test]
fn rebuild_from_kafka_reproduces_the_heads_of_an_earlier_ingest() {
    let topic = topic_with_events("audit-rebuild", 3, 2000, 25);
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    ingest(&topic, &original, 7);
    let file = tmp.path().join("original.dlx");
    export(&original, &file);

    let rebuilt = tmp.path().join("rebuilt");
    let out = dealledger(
        &[
            "rebuild",
            "--from-kafka",
            "--topic",
            &topic,
            "--data",
            path(&rebuilt),
            "--compare-with",
            path(&original),
        ],
        None,
    );
    expect_code(&out, 0);
    assert!(
        stdout(&out).contains("heads match: the chain is a pure function of the Kafka log"),
        "{}",
        describe(&out)
    );
    assert!(!tmp.path().join("rebuilt.rebuilding").exists());
    expect_code(&verify_data(&rebuilt, &[]), 0);

    let from_export = tmp.path().join("from-export");
    let out = dealledger(
        &[
            "rebuild",
            "--from-kafka",
            "--topic",
            &topic,
            "--data",
            path(&from_export),
            "--compare-with",
            path(&file),
            "--batch-records",
            "999",
            "--json",
        ],
        None,
    );
    expect_code(&out, 0);
    let report = json(&out);
    assert_eq!(report["heads_match"], true, "{report:#}");
    assert_eq!(report["entries"], 2041);

    // A DIR that holds a ledger is refused before anything is read.
    let out = dealledger(
        &[
            "rebuild",
            "--from-kafka",
            "--topic",
            &topic,
            "--data",
            path(&rebuilt),
        ],
        None,
    );
    expect_code(&out, 2);
    // A comparison target of another topic is refused.
    let out = dealledger(
        &[
            "rebuild",
            "--from-kafka",
            "--topic",
            "some-other-topic",
            "--data",
            path(&tmp.path().join("x")),
            "--compare-with",
            path(&original),
        ],
        None,
    );
    expect_code(&out, 2);
    assert!(!tmp.path().join("x").exists());

    // The topic moves on: the old ledger no longer matches, stream by stream.
    produce_generated(&topic, 30, 26);
    let later = tmp.path().join("later");
    let out = dealledger(
        &[
            "rebuild",
            "--from-kafka",
            "--topic",
            &topic,
            "--data",
            path(&later),
            "--compare-with",
            path(&original),
        ],
        None,
    );
    expect_code(&out, 1);
    let text = stdout(&out);
    assert!(text.contains("heads differ from"), "{}", describe(&out));
    assert!(
        text.contains(&format!("{topic}/0: rebuilt")),
        "{}",
        describe(&out)
    );
    assert!(later.exists(), "the rebuilt ledger is kept");
}

#[test]
fn a_killed_export_never_leaves_a_partial_file() {
    let topic = topic_with_events("audit-kill", 6, 20_000, 27);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ledger");
    ingest(&topic, &data, 5000);
    let reference = tmp.path().join("reference.dlx");
    let started = Instant::now();
    export(&data, &reference);
    let full = started.elapsed();
    let reference = std::fs::read(&reference).unwrap();

    let target = tmp.path().join("killed.dlx");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let (mut absent, mut complete, mut interrupted) = (0, 0, 0);
    for round in 0..8 {
        let _ = std::fs::remove_file(&target);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Kill somewhere between 2 ms and the time a full export takes.
        let wait = Duration::from_millis(2 + rng % (full.as_millis() as u64).max(3));
        let mut child = Command::new(env!("CARGO_BIN_EXE_dealledger"))
            .args(["export", "--data", path(&data), "--out", path(&target)])
            .env("DEALLEDGER_BROKERS", bootstrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if round % 2 == 0 {
            std::thread::sleep(wait);
        } else {
            // Every other round aims at the write itself: once the staging
            // file appears (a loaded machine can stretch what comes before
            // it past any fixed wait), within a tenth of a full export.
            let tmp_file = tmp.path().join("killed.dlx.tmp");
            let deadline = Instant::now() + full * 20 + Duration::from_secs(5);
            while !tmp_file.exists() && Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_micros(
                rng % (full.as_micros() as u64 / 10).max(1),
            ));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if status.code().is_none() && tmp.path().join("killed.dlx.tmp").exists() {
            interrupted += 1;
        }
        if target.exists() {
            complete += 1;
            assert_eq!(
                std::fs::read(&target).unwrap(),
                reference,
                "round {round}: killed after {wait:?}, the file under the real name is not the complete export"
            );
            expect_code(&verify_export(&target, &[]), 0);
        } else {
            absent += 1;
        }
    }
    eprintln!(
        "killed exports (full export {full:?}): {absent} left no file, {complete} a complete one, {interrupted} were caught mid-write"
    );
    assert!(interrupted >= 1, "no kill landed during the write");
    // A later export over the leftover .tmp works.
    export(&data, &target);
    assert_eq!(std::fs::read(&target).unwrap(), reference);
}
