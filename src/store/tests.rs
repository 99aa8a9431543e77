use super::*;
use crate::chain::{Header, Record, TimestampType};
use crate::generate::Generator;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

const TOPIC: &str = "deal-events";
/// Entries per run of one partition in the feed.
const RUN: u64 = 7;
const PARTITIONS: u64 = 3;

/// A deterministic record source: valid deal events from the generator,
/// with garbage values, tombstones and duplicates (also across
/// partitions), spread in runs over three partitions with offset gaps.
struct Feed {
    generator: Generator,
    next_offset: [i64; PARTITIONS as usize],
    sent: Vec<Vec<u8>>,
    n: u64,
}

impl Feed {
    fn new(seed: u64) -> Feed {
        Feed {
            generator: Generator::new(20, seed),
            next_offset: [0, 100, 5],
            sent: Vec::new(),
            n: 0,
        }
    }

    fn records(&mut self, len: usize) -> Vec<Record> {
        (0..len).map(|_| self.record()).collect()
    }

    fn record(&mut self) -> Record {
        let n = self.n;
        self.n += 1;
        let partition = ((n / RUN) % PARTITIONS) as usize;
        let value = match n % 23 {
            5 => Some(b"not json at all".to_vec()),
            11 => None,
            17 if !self.sent.is_empty() => {
                Some(self.sent[(n as usize * 31) % self.sent.len()].clone())
            }
            _ => {
                let value = self.generator.next_event().to_json();
                self.sent.push(value.clone());
                Some(value)
            }
        };
        let offset = self.next_offset[partition];
        self.next_offset[partition] += if n.is_multiple_of(13) { 3 } else { 1 };
        Record {
            topic: TOPIC.into(),
            partition: partition as i32,
            offset,
            timestamp_type: TimestampType::CreateTime,
            timestamp_ms: 1_795_000_000_000 + n as i64,
            key: Some(format!("deal-{n}").into_bytes()),
            value,
            headers: vec![Header {
                name: "source".into(),
                value: Some(b"test".to_vec()),
            }],
        }
    }
}

/// Applies and writes `count` batches of `len` records; returns them.
fn write_batches(
    store: &Store,
    state: &mut LedgerState,
    feed: &mut Feed,
    count: usize,
    len: usize,
) -> Vec<BatchWrite> {
    (0..count)
        .map(|_| {
            let batch = state.apply_batch(feed.records(len), store).unwrap();
            store.write_batch(&batch).unwrap();
            batch
        })
        .collect()
}

fn ledger_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ledger");
    (tmp, path)
}

/// A ledger of 3 partitions, 4 batches of 60 records each.
fn small_ledger(path: &Path) -> (LedgerState, Vec<BatchWrite>) {
    let store = Store::open(path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let written = write_batches(&store, &mut state, &mut Feed::new(1), 4, 60);
    (state, written)
}

fn book_json(state: &LedgerState) -> String {
    serde_json::to_string(state.book()).unwrap()
}

fn all_entries(written: &[BatchWrite]) -> impl Iterator<Item = &Entry> {
    written.iter().flat_map(|b| &b.entries)
}

// ---- round trip ------------------------------------------------------

#[test]
fn round_trip_across_reopen() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    assert_eq!(store.next_batch_no().unwrap(), 0);
    let mut state = LedgerState::new(TOPIC);
    let written = write_batches(&store, &mut state, &mut Feed::new(1), 6, 200);
    drop(store);

    let store = Store::open(&path, TOPIC).unwrap();
    assert_eq!(store.topic(), TOPIC);
    assert_eq!(store.dir(), path);
    assert_eq!(store.next_batch_no().unwrap(), 6);
    let heads: Vec<ChainHead> = state.heads().values().cloned().collect();
    assert_eq!(store.heads().unwrap(), heads);
    assert_eq!(store.partitions().unwrap(), vec![0, 1, 2]);

    for partition in 0..PARTITIONS as i32 {
        let expected: Vec<Entry> = all_entries(&written)
            .filter(|e| e.record.partition == partition)
            .cloned()
            .collect();
        let stored: Vec<Entry> = store.entries(partition, 0).map(Result::unwrap).collect();
        assert_eq!(stored, expected);
        assert_eq!(store.stream_len(partition).unwrap(), expected.len() as u64);
        let tail: Vec<Entry> = store.entries(partition, 10).map(Result::unwrap).collect();
        assert_eq!(tail, expected[10..]);
        let location = Location { partition, seq: 3 };
        assert_eq!(store.entry(location).unwrap().as_ref(), Some(&expected[3]));
    }
    let beyond = Location {
        partition: 0,
        seq: 1_000_000,
    };
    assert_eq!(store.entry(beyond).unwrap(), None);
    assert_eq!(store.stream_len(9).unwrap(), 0);

    let outcomes: Vec<(Location, Verdict)> = written
        .iter()
        .flat_map(|b| &b.outcomes)
        .map(|o| (o.location, o.verdict.clone()))
        .collect();
    let mut expected: Vec<(Location, Verdict)> = outcomes
        .iter()
        .filter(|(_, v)| *v != Verdict::Accepted)
        .cloned()
        .collect();
    expected.sort_by_key(|(location, _)| *location);
    let stored: Vec<(Location, Verdict)> = store.verdicts().map(Result::unwrap).collect();
    assert_eq!(stored, expected);
    for kind in ["duplicate", "not_json", "no_value"] {
        assert!(
            stored.iter().any(|(_, v)| v.kind() == Some(kind)),
            "the feed should produce {kind} verdicts"
        );
    }
    assert!(
        stored
            .iter()
            .any(|(l, v)| matches!(v, Verdict::Duplicate { of } if of.partition != l.partition)),
        "the feed should produce a duplicate across partitions"
    );
    for (location, verdict) in &outcomes {
        assert_eq!(&store.verdict(*location).unwrap(), verdict);
    }

    let records: Vec<BatchRecord> = store.batches(0).map(Result::unwrap).collect();
    assert_eq!(records.len(), written.len());
    for (record, batch) in records.iter().zip(&written) {
        assert_eq!(record.batch_no, batch.batch_no);
        assert_eq!(record.runs, runs_of(&batch.entries));
        assert_eq!(record.fingerprints, batch.fingerprints);
        assert_eq!(record.entry_count(), batch.entries.len() as u64);
    }
    assert!(records[0].runs.len() > 3, "runs interleave partitions");
    assert_eq!(
        records[0].runs[0],
        Run {
            partition: 0,
            first_seq: 0,
            count: RUN as u32
        }
    );
    let from_three: Vec<u64> = store.batches(3).map(|r| r.unwrap().batch_no).collect();
    assert_eq!(from_three, vec![3, 4, 5]);

    let mut replayed = Vec::new();
    let loaded = store
        .replay(|entry, outcome| {
            assert_eq!(outcome.location.seq, entry.seq);
            replayed.push((outcome.location, outcome.verdict.clone()));
        })
        .unwrap();
    assert_eq!(replayed, outcomes);
    assert_eq!(loaded.heads(), state.heads());
    assert_eq!(book_json(&loaded), book_json(&state));
    assert!(loaded.book().len() > 5);
    assert_eq!(loaded.next_batch(), state.next_batch());
    assert_eq!(loaded.entry_count(), state.entry_count());
    assert_eq!(loaded.identities(), state.identities());

    let report = store.verify().unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.streams.len(), 3);
    for (stream, head) in report.streams.iter().zip(state.heads().values()) {
        assert_eq!(stream.entries, head.next_seq());
        assert_eq!(stream.head, Some((head.next_seq() - 1, head.head())));
    }
}

/// Verify reads in rounds ([`VERIFY_ROUND_ENTRIES`]); rounds of a few
/// entries, ending anywhere in streams and pages, give the same report
/// as one round.
#[test]
fn verify_in_small_rounds_gives_the_same_report() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut feed = Feed::new(7);
    write_batches(&store, &mut state, &mut feed, 6, 200);
    let whole = store.verify().unwrap();
    assert!(whole.is_intact(), "{whole:?}");
    for entries in [1, 7, 500] {
        store.verify_round.store(entries, Ordering::Relaxed);
        assert_eq!(
            store.verify().unwrap(),
            whole,
            "rounds of {entries} entries"
        );
    }
}

#[test]
fn reloaded_state_continues_ingest_exactly() {
    let (_tmp, path) = ledger_dir();
    let mut feed = Feed::new(3);
    let mut state = LedgerState::new(TOPIC);
    let written = {
        let store = Store::open(&path, TOPIC).unwrap();
        write_batches(&store, &mut state, &mut feed, 3, 100)
    };
    let store = Store::open(&path, TOPIC).unwrap();
    let mut loaded = store.load_state().unwrap();
    // Exactly the positions: the next offset of each stream is the last
    // written offset + 1, both from the heads and from the reloaded state.
    let heads = store.heads().unwrap();
    assert_eq!(heads.len(), PARTITIONS as usize);
    for head in heads {
        let partition = head.stream().partition;
        let last_written = all_entries(&written)
            .filter(|e| e.record.partition == partition)
            .map(|e| e.record.offset)
            .max()
            .unwrap();
        assert_eq!(head.last_offset(), Some(last_written));
        assert_eq!(loaded.next_offset(partition), last_written + 1);
    }
    // Continue with the reloaded state and the original in lockstep.
    let records = feed.records(150);
    let from_loaded = loaded.apply_batch(records.clone(), &store).unwrap();
    let from_original = state.apply_batch(records, &store).unwrap();
    assert_eq!(from_loaded.entries, from_original.entries);
    let verdicts =
        |b: &BatchWrite| -> Vec<Verdict> { b.outcomes.iter().map(|o| o.verdict.clone()).collect() };
    assert_eq!(verdicts(&from_loaded), verdicts(&from_original));
    assert_eq!(from_loaded.fingerprints, from_original.fingerprints);
    store.write_batch(&from_loaded).unwrap();
    assert!(store.verify().unwrap().is_intact());
    assert_eq!(book_json(&store.load_state().unwrap()), book_json(&state));
}

#[test]
fn a_batch_of_only_stale_records_still_takes_its_number() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut feed = Feed::new(4);
    let records = feed.records(30);
    let first = state.apply_batch(records.clone(), &store).unwrap();
    store.write_batch(&first).unwrap();
    let stale = state.apply_batch(records, &store).unwrap();
    assert!(stale.entries.is_empty());
    assert_eq!(stale.skipped_stale, 30);
    let stats = store.write_batch(&stale).unwrap();
    assert_eq!(stats.entries, 0);
    assert_eq!(store.next_batch_no().unwrap(), 2);
    assert_eq!(store.next_batch_no().unwrap(), state.next_batch());
    let last = store.batches(1).next().unwrap().unwrap();
    assert_eq!(
        last,
        BatchRecord {
            batch_no: 1,
            runs: vec![],
            fingerprints: vec![]
        }
    );
    let loaded = store.load_state().unwrap();
    assert_eq!(loaded.next_batch(), 2);
    assert_eq!(loaded.heads(), state.heads());
}

#[test]
fn write_stats_count_what_was_written() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let batch = state.apply_batch(Feed::new(5).records(50), &store).unwrap();
    let stats = store.write_batch(&batch).unwrap();
    assert_eq!(stats.entries, 50);
    let mut by_partition: BTreeMap<i32, Vec<&Entry>> = BTreeMap::new();
    for entry in &batch.entries {
        by_partition
            .entry(entry.record.partition)
            .or_default()
            .push(entry);
    }
    let pages: usize = by_partition
        .values()
        .flat_map(|entries| encode_pages(entries))
        .map(|(_, page)| LOCATION_KEY_LEN + page.len())
        .sum();
    let verdicts: usize = batch
        .outcomes
        .iter()
        .filter(|o| o.verdict != Verdict::Accepted)
        .map(|o| LOCATION_KEY_LEN + verdict_json(&o.verdict).len())
        .sum();
    let heads = batch.heads.len() * (HEAD_KEY_LEN + HEAD_VALUE_LEN);
    let record =
        BATCH_KEY_LEN + encode_batch_record(&runs_of(&batch.entries), &batch.fingerprints).len();
    assert_eq!(stats.bytes, pages + verdicts + heads + record, "{stats:?}");
}

// ---- the write contract ----------------------------------------------

#[test]
#[should_panic(
    expected = "batch 0 entry 1 (partition 0 seq 2 offset 4): expected seq 1; each partition's entries must continue its stored head without gaps"
)]
fn write_batch_refuses_a_skipped_seq() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut batch = state.apply_batch(Feed::new(1).records(5), &store).unwrap();
    batch.entries.remove(1);
    batch.outcomes.remove(1);
    let _ = store.write_batch(&batch);
}

#[test]
#[should_panic(expected = "batch number 5 is not the next one, 0")]
fn write_batch_refuses_a_wrong_batch_number() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut batch = state.apply_batch(Feed::new(1).records(5), &store).unwrap();
    batch.batch_no = 5;
    let _ = store.write_batch(&batch);
}

#[test]
#[should_panic(expected = "batch number 0 is not the next one, 1")]
fn write_batch_refuses_a_batch_twice() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let batch = state.apply_batch(Feed::new(1).records(5), &store).unwrap();
    store.write_batch(&batch).unwrap();
    let _ = store.write_batch(&batch);
}

#[test]
#[should_panic(
    expected = "batch 1 entry 0 (partition 0 seq 0 offset 0): expected seq 7; each partition's entries must continue"
)]
fn write_batch_refuses_entries_that_do_not_continue_the_stored_head() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    write_batches(&store, &mut state, &mut Feed::new(1), 1, 10);
    // A second state that does not know the stored chain.
    let mut other = LedgerState::new(TOPIC);
    let mut batch = other.apply_batch(Feed::new(1).records(3), &store).unwrap();
    batch.batch_no = 1;
    let _ = store.write_batch(&batch);
}

#[test]
#[should_panic(expected = "batch 0: head of partition 0 says next seq 0, last offset None, hash")]
fn write_batch_refuses_heads_that_are_not_the_last_entries() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut batch = state.apply_batch(Feed::new(1).records(5), &store).unwrap();
    batch.heads[0] = ChainHead::genesis(StreamId::new(TOPIC, 0));
    let _ = store.write_batch(&batch);
}

#[test]
#[should_panic(expected = "has entries of partition 0 but no head for it")]
fn write_batch_refuses_a_missing_head() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut batch = state.apply_batch(Feed::new(1).records(5), &store).unwrap();
    batch.heads.clear();
    let _ = store.write_batch(&batch);
}

// ---- tampering ---------------------------------------------------------

/// Builds a small ledger, lets `edit` change the raw sled tree (with the
/// store closed), then returns the verification report and the result
/// of loading the state.
fn tamper(
    edit: impl FnOnce(&sled::Tree, &[BatchWrite]),
) -> (VerifyReport, Result<LedgerState, StoreError>) {
    let (_tmp, path) = ledger_dir();
    let (_, written) = small_ledger(&path);
    edit_raw(&path, |tree| edit(tree, &written));
    let store = Store::open_existing(&path).unwrap();
    let report = store.verify().unwrap();
    let loaded = store.load_state();
    // The same damage is found, at the same place, when verify reads in
    // rounds of a few entries.
    store.verify_round.store(5, Ordering::Relaxed);
    assert_eq!(
        store.verify().unwrap(),
        report,
        "verify in rounds of 5 entries"
    );
    (report, loaded)
}

/// Opens the ledger's sled database directly (no [`Store`]), lets `edit`
/// change the tree, flushes and closes it.
fn edit_raw(path: &Path, edit: impl FnOnce(&sled::Tree)) {
    edit_raw_tree(path, TREE_NAME, edit);
}

/// [`edit_raw`] on the snapshots' tree.
fn edit_raw_snapshots(path: &Path, edit: impl FnOnce(&SnapshotFiles)) {
    edit(&SnapshotFiles(path.join(SNAPSHOT_DIR_NAME)));
}

/// The snapshot files of a ledger, edited directly (no [`Store`]).
struct SnapshotFiles(PathBuf);

impl SnapshotFiles {
    fn get(&self, batch_no: u64) -> Vec<u8> {
        fs::read(self.0.join(snapshot_file_name(batch_no))).unwrap()
    }
    fn insert(&self, batch_no: u64, bytes: &[u8]) {
        fs::write(self.0.join(snapshot_file_name(batch_no)), bytes).unwrap();
    }
}

/// Opens the ledger's sled database directly, lets `edit` change the
/// tree `name`, flushes and closes it.
fn edit_raw_tree(path: &Path, name: &str, edit: impl FnOnce(&sled::Tree)) {
    {
        // sled's threads may still hold the lock of a database the
        // caller just closed.
        let started = Instant::now();
        let db = loop {
            match sled::open(path) {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && started.elapsed() < MAX_LOCK_RELEASE_WAIT =>
                {
                    std::thread::sleep(LOCK_RELEASE_POLL);
                }
                other => break other.unwrap(),
            }
        };
        let tree = db.open_tree(name).unwrap();
        edit(&tree);
        db.flush().unwrap();
    }
    // Like Store's drop: wait until sled's threads have let go of `db`.
    let file = File::open(path.join(SLED_DB_FILE)).unwrap();
    let started = Instant::now();
    while file.try_lock().is_err() {
        assert!(
            started.elapsed() < MAX_LOCK_RELEASE_WAIT,
            "sled keeps its lock"
        );
        std::thread::sleep(LOCK_RELEASE_POLL);
    }
}

/// The one problem of a report, which must be at partition 1.
fn only_problem(report: &VerifyReport) -> &StreamProblem {
    let problems: Vec<&StreamProblem> = report.problems().collect();
    assert_eq!(problems.len(), 1, "{report:#?}");
    assert_eq!(problems[0].stream, StreamId::new(TOPIC, 1));
    assert!(!report.is_intact());
    problems[0]
}

/// Asserts that loading failed as corrupt at `location`.
fn assert_corrupt_at(result: Result<LedgerState, StoreError>, location: Location) -> String {
    match result {
        Err(error @ StoreError::Corrupt { location: at, .. }) => {
            assert_eq!(at, Some(location), "{error}");
            let message = error.to_string();
            assert!(message.contains("dealledger verify"), "{message}");
            assert!(
                message.contains("dealledger rebuild --from-kafka"),
                "{message}"
            );
            message
        }
        Err(other) => panic!("expected Corrupt at {location}, got {other}"),
        Ok(_) => panic!("expected Corrupt at {location}, loading succeeded"),
    }
}

/// An entry page as the tests see it, parsed independently of
/// [`PageReader`] by docs/FORMAT.md: its key's first seq, its bytes,
/// and the byte range of each entry (its u32 length is the 4 bytes
/// before the range).
struct RawPage {
    first_seq: u64,
    bytes: Vec<u8>,
    entries: Vec<std::ops::Range<usize>>,
}

impl RawPage {
    fn parse(first_seq: u64, bytes: Vec<u8>) -> RawPage {
        assert_eq!(bytes[0], 1, "page format");
        let count = u32::from_be_bytes(bytes[1..5].try_into().unwrap());
        let mut at = 5;
        let mut entries = Vec::new();
        for _ in 0..count {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            entries.push(at + 4..at + 4 + len);
            at += 4 + len;
        }
        assert_eq!(at, bytes.len(), "the page adds up");
        RawPage {
            first_seq,
            bytes,
            entries,
        }
    }

    /// The page holding entry `seq` of `partition`.
    fn holding(tree: &sled::Tree, partition: i32, seq: u64) -> RawPage {
        let (key, value) = tree
            .range(page_key(partition, 0)..=page_key(partition, seq))
            .next_back()
            .unwrap()
            .unwrap();
        let page = RawPage::parse(parse_page_key(&key).unwrap(), value.to_vec());
        assert!(seq < page.end_seq(), "no page holds seq {seq}");
        page
    }

    /// Every page of `partition`, in key order.
    fn all(tree: &sled::Tree, partition: i32) -> Vec<RawPage> {
        tree.scan_prefix(entry_prefix(partition))
            .map(|item| {
                let (key, value) = item.unwrap();
                RawPage::parse(parse_page_key(&key).unwrap(), value.to_vec())
            })
            .collect()
    }

    fn encode(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![1];
        out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for entry in entries {
            out.extend_from_slice(&(entry.len() as u32).to_be_bytes());
            out.extend_from_slice(entry);
        }
        out
    }

    fn end_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }

    fn key(&self, partition: i32) -> [u8; LOCATION_KEY_LEN] {
        page_key(partition, self.first_seq)
    }

    fn entry_list(&self) -> Vec<Vec<u8>> {
        self.entries
            .iter()
            .map(|r| self.bytes[r.clone()].to_vec())
            .collect()
    }

    /// Where entry `seq`'s bytes start in the page.
    fn entry_start(&self, seq: u64) -> usize {
        self.entries[(seq - self.first_seq) as usize].start
    }

    /// The seq a flipped byte at `at` is reported at, when it belongs to
    /// an entry (its length or its bytes); `None` in the header.
    fn seq_of_byte(&self, at: usize) -> Option<u64> {
        self.entries
            .iter()
            .position(|r| (r.start - 4..r.end).contains(&at))
            .map(|i| self.first_seq + i as u64)
    }
}

/// The stored bytes of entry `seq` of `partition`.
fn raw_entry(tree: &sled::Tree, partition: i32, seq: u64) -> Vec<u8> {
    let page = RawPage::holding(tree, partition, seq);
    let start = page.entry_start(seq);
    let range = page.entries.iter().find(|r| r.start == start).unwrap();
    page.bytes[range.clone()].to_vec()
}

/// Rewrites the page holding entry `seq` of `partition` with that
/// entry's bytes changed by `edit` (its length follows them).
fn edit_entry(tree: &sled::Tree, partition: i32, seq: u64, edit: impl FnOnce(&mut Vec<u8>)) {
    let page = RawPage::holding(tree, partition, seq);
    let mut entries = page.entry_list();
    edit(&mut entries[(seq - page.first_seq) as usize]);
    tree.insert(page.key(partition), RawPage::encode(&entries))
        .unwrap();
}

/// Flips `mask` into byte `at` of the page stored under `key`.
fn flip_page_byte(tree: &sled::Tree, key: &[u8], at: usize, mask: u8) {
    let mut bytes = tree.get(key).unwrap().unwrap().to_vec();
    bytes[at] ^= mask;
    tree.insert(key, bytes).unwrap();
}

fn stream_len(written: &[BatchWrite], partition: i32) -> u64 {
    all_entries(written)
        .filter(|e| e.record.partition == partition)
        .count() as u64
}

const TAMPERED: Location = Location {
    partition: 1,
    seq: 10,
};

#[test]
fn the_small_ledger_has_several_pages_per_stream() {
    // The page tests below rely on this shape: partition 1 has at least
    // three pages, every batch starts a page, and TAMPERED lies inside
    // the first page with entries before and after it.
    let (_tmp, path) = ledger_dir();
    let (_, written) = small_ledger(&path);
    edit_raw(&path, |tree| {
        let pages = RawPage::all(tree, 1);
        assert!(pages.len() >= 3);
        assert_eq!(pages[0].first_seq, 0);
        for pair in pages.windows(2) {
            assert_eq!(pair[1].first_seq, pair[0].end_seq(), "contiguous");
        }
        assert_eq!(pages.last().unwrap().end_seq(), stream_len(&written, 1));
        for batch in &written {
            let first = batch
                .entries
                .iter()
                .find(|e| e.record.partition == 1)
                .unwrap();
            assert!(pages.iter().any(|p| p.first_seq == first.seq));
        }
        assert!(pages[0].end_seq() > TAMPERED.seq + 1);
    });
}

#[test]
fn a_flipped_byte_anywhere_in_an_entry_is_found_at_that_entry() {
    // Layout of a stored entry (docs/FORMAT.md): the feed's keys
    // ("deal-N") have at least 6 bytes, values a few hundred, and one
    // header "source" = "test" precedes the 32-byte hash.
    const KEY_AT: usize = 1 + 32 + 8 + 4 + TOPIC.len() + 4 + 8 + 1 + 8;
    type Position = fn(usize) -> usize;
    let regions: [(&str, Position); 15] = [
        ("version", |_| 0),
        ("prev hash", |_| 1 + 17),
        ("seq", |_| 1 + 32 + 7),
        ("topic length", |_| 1 + 32 + 8 + 3),
        ("topic", |_| 1 + 32 + 8 + 4 + 2),
        ("partition", |_| KEY_AT - 21 + 3),
        ("offset", |_| KEY_AT - 17 + 7),
        ("timestamp type", |_| KEY_AT - 9),
        ("timestamp", |_| KEY_AT - 8 + 7),
        ("key presence", |_| KEY_AT),
        ("key bytes", |_| KEY_AT + 5 + 2),
        ("value bytes", |len| KEY_AT + 5 + 6 + len / 4),
        ("header name", |len| len - 32 - 4 - 5 - 3),
        ("header value", |len| len - 32 - 2),
        ("hash", |len| len - 5),
    ];
    for (region, at) in regions {
        for mask in [0x01u8, 0x80] {
            let (report, loaded) = tamper(|tree, _| {
                edit_entry(tree, TAMPERED.partition, TAMPERED.seq, |bytes| {
                    let i = at(bytes.len());
                    bytes[i] ^= mask;
                });
            });
            let problem = only_problem(&report);
            assert_eq!(
                problem.seq, TAMPERED.seq,
                "{region} ^ {mask:#04x}: {problem}"
            );
            let message = assert_corrupt_at(loaded, TAMPERED);
            assert!(
                message.contains("partition 1") || message.contains("deal-events/1"),
                "{message}"
            );
        }
    }
}

#[test]
fn a_flipped_byte_anywhere_in_a_page_is_found_at_the_entry_it_belongs_to() {
    let (_tmp, path) = ledger_dir();
    small_ledger(&path);
    let mut page = None;
    edit_raw(&path, |tree| {
        page = Some(RawPage::holding(tree, TAMPERED.partition, TAMPERED.seq));
    });
    let page = page.unwrap();
    let count = page.entries.len();
    let first = page.first_seq;
    // The header, every byte of the lengths of the first, a middle and
    // the last entry, and bytes at the start, middle and end of them.
    let mut positions: Vec<(usize, u8)> = (0..5).flat_map(|at| [(at, 0x01), (at, 0x80)]).collect();
    for i in [0, count / 2, count - 1] {
        let range = page.entries[i].clone();
        for at in range.start - 4..range.start {
            positions.extend([(at, 0x01), (at, 0x80)]);
        }
        for at in [range.start, range.start + range.len() / 2, range.end - 1] {
            positions.push((at, 0x10));
        }
    }
    for (at, mask) in positions {
        let expected = page.seq_of_byte(at).unwrap_or_else(|| {
            // The header: a format or a count out of range is the
            // page's first seq; another count stops at the first entry
            // that it and the bytes disagree on.
            if at == 0 {
                return first;
            }
            let mut bytes = page.bytes[1..5].to_vec();
            bytes[at - 1] ^= mask;
            let damaged = u32::from_be_bytes(bytes.try_into().unwrap()) as usize;
            if damaged == 0 || damaged > MAX_PAGE_ENTRIES {
                first
            } else {
                first + damaged.min(count) as u64
            }
        });
        edit_raw(&path, |tree| flip_page_byte(tree, &page.key(1), at, mask));
        {
            let store = Store::open_existing(&path).unwrap();
            let report = store.verify().unwrap();
            let problem = only_problem(&report);
            assert_eq!(
                problem.seq, expected,
                "byte {at} of the page at seq {first} ^ {mask:#04x}: {problem}"
            );
            let location = Location {
                partition: 1,
                seq: expected,
            };
            assert_corrupt_at(store.load_state(), location);
            if at < 5 {
                assert!(
                    matches!(problem.kind, ProblemKind::DamagedPage { page_seq, .. } if page_seq == first),
                    "byte {at} ^ {mask:#04x}: {problem}"
                );
            }
        }
        edit_raw(&path, |tree| flip_page_byte(tree, &page.key(1), at, mask));
    }
    let store = Store::open_existing(&path).unwrap();
    assert!(store.verify().unwrap().is_intact(), "all restored");
}

/// A way to damage a page's framing: the damaged bytes, and the seq the
/// damage must be reported at.
type FramingDamage = fn(&RawPage) -> (Vec<u8>, u64);

#[test]
fn damaged_page_framing_is_reported_at_the_entry_it_hides() {
    let cases: [(&str, FramingDamage); 5] = [
        // Bytes appended after the last entry: at the seq after it.
        ("trailing bytes", |p| {
            ([&p.bytes[..], &[0, 0, 0, 1, 7]].concat(), p.end_seq())
        }),
        // The count one lower: the last entry's bytes are left over.
        ("count too low", |p| {
            let mut bytes = p.bytes.clone();
            bytes[1..5].copy_from_slice(&(p.entries.len() as u32 - 1).to_be_bytes());
            (bytes, p.end_seq() - 1)
        }),
        // Cut inside an entry: its length runs past the page.
        ("cut in an entry", |p| {
            (p.bytes[..p.entries[3].start + 10].to_vec(), p.first_seq + 3)
        }),
        // Cut inside a length: at the entry it belongs to.
        ("cut in a length", |p| {
            (p.bytes[..p.entries[4].start - 2].to_vec(), p.first_seq + 4)
        }),
        // Cut to the header: the page holds none of the entries it counts.
        ("header only", |p| (p.bytes[..5].to_vec(), p.first_seq)),
    ];
    for (what, damage) in cases {
        let mut expected = 0;
        let mut page_seq = 0;
        let (report, loaded) = tamper(|tree, _| {
            let page = RawPage::holding(tree, TAMPERED.partition, TAMPERED.seq);
            let (bytes, seq) = damage(&page);
            (page_seq, expected) = (page.first_seq, seq);
            tree.insert(page.key(1), bytes).unwrap();
        });
        let problem = only_problem(&report);
        assert_eq!(problem.seq, expected, "{what}: {problem}");
        assert!(
            matches!(&problem.kind, ProblemKind::DamagedPage { page_seq: p, .. } if *p == page_seq),
            "{what}: {problem}"
        );
        let message = assert_corrupt_at(
            loaded,
            Location {
                partition: 1,
                seq: expected,
            },
        );
        assert!(
            message.contains(&format!(
                "the entry page stored at partition 1 seq {page_seq} is damaged"
            )),
            "{what}: {message}"
        );
    }
}

#[test]
fn an_unreadable_page_header_is_reported_at_the_pages_first_seq() {
    type HeaderDamage = fn(&[u8]) -> Vec<u8>;
    let headers: [(&str, HeaderDamage); 4] = [
        ("format", |b| [&[2u8][..], &b[1..]].concat()),
        ("count 0", |b| [&[1u8, 0, 0, 0, 0][..], &b[5..]].concat()),
        ("count 33", |b| [&[1u8, 0, 0, 0, 33][..], &b[5..]].concat()),
        ("short", |b| b[..3].to_vec()),
    ];
    for (what, damage) in headers {
        let mut first = 0;
        let (report, loaded) = tamper(|tree, written| {
            // The second page of partition 1.
            let page = RawPage::all(tree, 1).remove(1);
            first = page.first_seq;
            assert!(first > 0 && first < stream_len(written, 1));
            tree.insert(page.key(1), damage(&page.bytes)).unwrap();
        });
        let problem = only_problem(&report);
        assert_eq!(problem.seq, first, "{what}: {problem}");
        assert!(
            matches!(problem.kind, ProblemKind::DamagedPage { page_seq, .. } if page_seq == first),
            "{what}: {problem}"
        );
        assert_corrupt_at(
            loaded,
            Location {
                partition: 1,
                seq: first,
            },
        );
    }
}

#[test]
fn a_hash_mismatch_names_partition_seq_and_offset() {
    let mut offset = 0;
    let (report, loaded) = tamper(|tree, written| {
        let entry = all_entries(written)
            .find(|e| e.record.partition == 1 && e.seq == TAMPERED.seq)
            .unwrap();
        offset = entry.record.offset;
        edit_entry(tree, 1, TAMPERED.seq, |bytes| {
            let len = bytes.len();
            bytes[len - 34] ^= 0x20; // inside the header value "test"
        });
    });
    let problem = only_problem(&report);
    assert!(matches!(
        problem.kind,
        ProblemKind::Chain(BreakKind::HashMismatch { .. })
    ));
    assert_eq!(problem.offset, Some(offset));
    assert!(
        problem.to_string().starts_with(&format!(
            "deal-events/1 seq 10 (offset {offset}): hash mismatch"
        )),
        "{problem}"
    );
    let message = assert_corrupt_at(loaded, TAMPERED);
    assert!(
        message.contains(&format!("deal-events/1 seq 10 (offset {offset})")),
        "{message}"
    );
}

#[test]
fn a_deleted_page_in_the_middle_is_found_at_its_first_seq() {
    let mut pages = (0, 0);
    let (report, loaded) = tamper(|tree, _| {
        let all = RawPage::all(tree, 1);
        pages = (all[1].first_seq, all[2].first_seq);
        tree.remove(all[1].key(1)).unwrap();
    });
    let (deleted, next) = pages;
    let problem = only_problem(&report);
    assert_eq!(problem.seq, deleted);
    assert_eq!(
        problem.kind,
        ProblemKind::Chain(BreakKind::SeqGap {
            expected: deleted,
            found: next
        })
    );
    let message = assert_corrupt_at(
        loaded,
        Location {
            partition: 1,
            seq: deleted,
        },
    );
    assert!(message.contains("entry deleted"), "{message}");
    assert!(
        message.contains(&format!("the next stored entry is seq {next}")),
        "{message}"
    );
}

#[test]
fn an_entry_cut_out_of_a_page_is_found_at_its_seq() {
    let (report, loaded) = tamper(|tree, _| {
        let page = RawPage::holding(tree, 1, TAMPERED.seq);
        let mut entries = page.entry_list();
        entries.remove((TAMPERED.seq - page.first_seq) as usize);
        tree.insert(page.key(1), RawPage::encode(&entries)).unwrap();
    });
    let problem = only_problem(&report);
    assert_eq!(problem.seq, TAMPERED.seq);
    assert_eq!(
        problem.kind,
        ProblemKind::MisplacedEntry {
            key_seq: 10,
            entry_seq: 11
        }
    );
    assert_corrupt_at(loaded, TAMPERED);
}

#[test]
fn swapped_entries_are_found_at_the_first_of_them() {
    let (report, loaded) = tamper(|tree, _| {
        let page = RawPage::holding(tree, 1, TAMPERED.seq);
        let mut entries = page.entry_list();
        let i = (TAMPERED.seq - page.first_seq) as usize;
        entries.swap(i, i + 1);
        tree.insert(page.key(1), RawPage::encode(&entries)).unwrap();
    });
    let problem = only_problem(&report);
    assert_eq!(problem.seq, TAMPERED.seq);
    assert_eq!(
        problem.kind,
        ProblemKind::MisplacedEntry {
            key_seq: 10,
            entry_seq: 11
        }
    );
    assert_corrupt_at(loaded, TAMPERED);
}

#[test]
fn swapped_pages_are_found_at_the_first_of_them() {
    let mut firsts = (0, 0);
    let (report, loaded) = tamper(|tree, _| {
        let all = RawPage::all(tree, 1);
        firsts = (all[1].first_seq, all[2].first_seq);
        tree.insert(all[1].key(1), all[2].bytes.clone()).unwrap();
        tree.insert(all[2].key(1), all[1].bytes.clone()).unwrap();
    });
    let problem = only_problem(&report);
    assert_eq!(problem.seq, firsts.0);
    assert_eq!(
        problem.kind,
        ProblemKind::MisplacedEntry {
            key_seq: firsts.0,
            entry_seq: firsts.1
        }
    );
    let message = assert_corrupt_at(
        loaded,
        Location {
            partition: 1,
            seq: firsts.0,
        },
    );
    assert!(
        message.contains(&format!("says it is partition 1 seq {}", firsts.1)),
        "{message}"
    );
}

#[test]
fn a_page_moved_to_another_partition_is_found() {
    let (report, loaded) = tamper(|tree, _| {
        // Partition 2's first page stored as partition 1's.
        let page = RawPage::all(tree, 2).remove(0);
        tree.insert(page_key(1, 0), page.bytes).unwrap();
    });
    let problem = only_problem(&report);
    assert_eq!(problem.seq, 0);
    assert!(
        matches!(
            problem.kind,
            ProblemKind::Chain(BreakKind::WrongStream { .. })
        ),
        "{problem}"
    );
    let message = assert_corrupt_at(
        loaded,
        Location {
            partition: 1,
            seq: 0,
        },
    );
    assert!(
        message.contains("says it is partition 2 seq 0"),
        "{message}"
    );
}

#[test]
fn a_deleted_last_page_is_found_at_its_first_seq() {
    let mut len = 0;
    let mut first = 0;
    let (report, loaded) = tamper(|tree, written| {
        len = stream_len(written, 1);
        let last = RawPage::holding(tree, 1, len - 1);
        first = last.first_seq;
        tree.remove(last.key(1)).unwrap();
    });
    let problem = only_problem(&report);
    assert_eq!(problem.seq, first);
    assert_eq!(problem.offset, None);
    assert_eq!(
        problem.kind,
        ProblemKind::Chain(BreakKind::HeadSeqMismatch {
            expected_next_seq: len,
            found_next_seq: first
        })
    );
    assert!(
        problem.to_string().contains("chain ends early"),
        "{problem}"
    );
    let message = assert_corrupt_at(
        loaded,
        Location {
            partition: 1,
            seq: first,
        },
    );
    assert!(message.contains("no entry is stored there"), "{message}");
}

#[test]
fn a_deleted_last_entry_is_found_at_the_tail() {
    let mut len = 0;
    let (report, loaded) = tamper(|tree, written| {
        len = stream_len(written, 1);
        let last = RawPage::holding(tree, 1, len - 1);
        let mut entries = last.entry_list();
        entries.pop();
        tree.insert(last.key(1), RawPage::encode(&entries)).unwrap();
    });
    let problem = only_problem(&report);
    assert_eq!(problem.seq, len - 1);
    assert_eq!(problem.offset, None);
    assert_eq!(
        problem.kind,
        ProblemKind::Chain(BreakKind::HeadSeqMismatch {
            expected_next_seq: len,
            found_next_seq: len - 1
        })
    );
    assert_corrupt_at(
        loaded,
        Location {
            partition: 1,
            seq: len - 1,
        },
    );
}

#[test]
fn a_duplicated_last_entry_is_found() {
    // Appended to the last page, or as a page of its own.
    for own_page in [false, true] {
        let mut len = 0;
        let (report, loaded) = tamper(|tree, written| {
            len = stream_len(written, 1);
            let last = RawPage::holding(tree, 1, len - 1);
            let mut entries = last.entry_list();
            let copy = entries.last().unwrap().clone();
            if own_page {
                tree.insert(page_key(1, len), RawPage::encode(&[copy]))
                    .unwrap();
            } else {
                entries.push(copy);
                tree.insert(last.key(1), RawPage::encode(&entries)).unwrap();
            }
        });
        let problem = only_problem(&report);
        assert_eq!(problem.seq, len);
        assert_eq!(
            problem.kind,
            ProblemKind::MisplacedEntry {
                key_seq: len,
                entry_seq: len - 1
            }
        );
        let message = assert_corrupt_at(
            loaded,
            Location {
                partition: 1,
                seq: len,
            },
        );
        assert!(message.contains("beyond its head"), "{message}");
    }
}

#[test]
fn a_duplicated_entry_over_the_next_one_is_found() {
    let (report, loaded) = tamper(|tree, _| {
        let entry = raw_entry(tree, 1, TAMPERED.seq);
        edit_entry(tree, 1, TAMPERED.seq + 1, |bytes| *bytes = entry);
    });
    let next = Location {
        partition: 1,
        seq: TAMPERED.seq + 1,
    };
    assert_eq!(only_problem(&report).seq, next.seq);
    assert_corrupt_at(loaded, next);
}

#[test]
fn a_rewritten_and_rehashed_tail_is_found_by_the_stored_head() {
    let mut len = 0;
    let (report, loaded) = tamper(|tree, written| {
        len = stream_len(written, 1);
        edit_entry(tree, 1, len - 1, |bytes| {
            let mut entry = chain::decode_entry(bytes).unwrap();
            entry.record.value = Some(b"rewritten".to_vec());
            entry.hash = chain::entry_hash(&entry.prev_hash, entry.seq, &entry.record);
            *bytes = chain::encode_entry(&entry);
        });
    });
    let problem = only_problem(&report);
    assert_eq!(problem.seq, len);
    assert!(matches!(
        problem.kind,
        ProblemKind::Chain(BreakKind::HeadHashMismatch { .. })
    ));
    let message = assert_corrupt_at(
        loaded,
        Location {
            partition: 1,
            seq: len,
        },
    );
    assert!(
        message.contains("stored head of partition 1 says next seq"),
        "{message}"
    );
}

#[test]
fn a_deleted_head_is_found() {
    let (report, loaded) = tamper(|tree, _| {
        tree.remove(head_key(1)).unwrap();
    });
    assert_eq!(only_problem(&report).kind, ProblemKind::HeadMissing);
    let Err(StoreError::Corrupt { detail, .. }) = loaded else {
        panic!("expected Corrupt")
    };
    assert!(detail.contains("no stored head"), "{detail}");
}

#[test]
fn damaged_batch_records_fail_loading_without_panic() {
    let edits: [fn(&sled::Tree); 6] = [
        |tree| {
            let record = tree.get(batch_key(1)).unwrap().unwrap();
            tree.insert(batch_key(1), &record[..record.len() - 3])
                .unwrap();
        },
        |tree| {
            tree.remove(batch_key(1)).unwrap();
        },
        |tree| {
            // A run that claims a huge partition.
            let mut record = tree.get(batch_key(0)).unwrap().unwrap().to_vec();
            record[5] = 0x7f;
            tree.insert(batch_key(0), record).unwrap();
        },
        |tree| {
            // A run that claims more entries than stored.
            let mut record = tree.get(batch_key(3)).unwrap().unwrap().to_vec();
            record[1 + 4 + 12] = 0x7f;
            tree.insert(batch_key(3), record).unwrap();
        },
        |tree| {
            tree.insert(head_key(2), &[1u8, 2, 3][..]).unwrap();
        },
        |tree| {
            tree.insert(verdict_key(TAMPERED), &b"{not json"[..])
                .unwrap();
        },
    ];
    for (i, edit) in edits.iter().enumerate() {
        let (_, loaded) = tamper(|tree, _| edit(tree));
        if i == 5 {
            // Verdicts are derived data: loading recomputes them.
            assert!(loaded.is_ok());
            continue;
        }
        match loaded {
            Err(StoreError::Corrupt { .. }) => {}
            Err(other) => panic!("edit {i}: expected Corrupt, got {other}"),
            Ok(_) => panic!("edit {i}: expected Corrupt, loading succeeded"),
        }
    }
}

#[test]
fn a_damaged_verdict_is_an_error_naming_it() {
    let (_tmp, path) = ledger_dir();
    small_ledger(&path);
    edit_raw(&path, |tree| {
        tree.insert(verdict_key(TAMPERED), &b"{not json"[..])
            .unwrap();
    });
    let store = Store::open_existing(&path).unwrap();
    let error = store.verdict(TAMPERED).unwrap_err();
    assert!(
        error.to_string().contains("verdict of partition 1 seq 10"),
        "{error}"
    );
    assert!(store.verdicts().any(|v| v.is_err()));
}

// ---- opening -------------------------------------------------------------

fn open_error(path: &Path, topic: &str) -> StoreError {
    match Store::open(path, topic) {
        Ok(_) => panic!("opening {} should fail", path.display()),
        Err(error) => error,
    }
}

#[test]
fn a_file_is_not_a_ledger() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("ledger");
    fs::write(&file, b"hello").unwrap();
    let error = open_error(&file, TOPIC);
    assert!(matches!(error, StoreError::NotALedger { .. }), "{error}");
    assert!(
        error.to_string().contains("is a file, not a folder"),
        "{error}"
    );
}

#[test]
fn a_folder_of_other_files_is_not_a_ledger_and_stays_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("notes.txt"), b"mine").unwrap();
    let error = open_error(tmp.path(), TOPIC);
    assert!(
        error.to_string().starts_with(&format!(
            "{} is not a dealledger ledger: the folder holds other files (such as \"notes.txt\")",
            tmp.path().display()
        )),
        "{error}"
    );
    let names: Vec<OsString> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![OsString::from("notes.txt")]);
    assert!(matches!(
        Store::open_existing(tmp.path()),
        Err(StoreError::NotALedger { .. })
    ));
}

#[test]
fn a_sled_database_of_something_else_is_not_a_ledger() {
    let (_tmp, path) = ledger_dir();
    {
        let db = sled::open(&path).unwrap();
        db.insert(b"hello", b"world").unwrap();
        db.flush().unwrap();
    }
    edit_raw(&path, |_| {});
    let error = open_error(&path, TOPIC);
    assert!(matches!(error, StoreError::NotALedger { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("sled database of something else"),
        "{error}"
    );
}

fn garbage() -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[test]
fn a_db_file_without_sled_conf_is_not_a_ledger_and_stays_untouched() {
    let (_tmp, path) = ledger_dir();
    fs::create_dir_all(&path).unwrap();
    fs::write(path.join("db"), garbage()).unwrap();
    let error = open_error(&path, TOPIC);
    assert!(error.to_string().contains("no sled `conf` file"), "{error}");
    assert_eq!(fs::read(path.join("db")).unwrap(), garbage());
}

#[test]
fn a_garbage_database_is_an_error_and_never_becomes_a_new_ledger() {
    let (_tmp, path) = ledger_dir();
    small_ledger(&path);
    fs::write(path.join("db"), garbage()).unwrap();
    for entry in fs::read_dir(path.join("blobs")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    for entry in fs::read_dir(&path).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with("snap.") {
            fs::remove_file(entry.path()).unwrap();
        }
    }
    let error = open_error(&path, TOPIC);
    assert!(matches!(error, StoreError::Unreadable { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("dealledger rebuild --from-kafka --data NEW_DIR"),
        "{error}"
    );
    // Still no ledger: the failed open did not initialise one.
    assert!(Store::open(&path, TOPIC).is_err());
}

#[test]
fn sled_files_without_db_never_become_a_new_ledger() {
    let (_tmp, path) = ledger_dir();
    small_ledger(&path);
    fs::remove_file(path.join("db")).unwrap();
    for error in [
        open_error(&path, TOPIC),
        Store::open_existing(&path).unwrap_err(),
    ] {
        assert!(matches!(error, StoreError::Unreadable { .. }), "{error}");
        assert!(error.to_string().contains("no `db` file"), "{error}");
        assert!(
            error.to_string().contains("rebuild --from-kafka"),
            "{error}"
        );
    }
    assert!(!path.join("db").exists(), "nothing was created");
}

#[test]
fn an_unfinished_sled_snapshot_file_is_deleted_not_read() {
    let (_tmp, path) = ledger_dir();
    let (state, _) = small_ledger(&path);
    // What an open that failed on a full disk leaves behind; sled would
    // read it (it sorts last) and report corruption.
    let unfinished = path.join("snap.FFFFFFFFFFFFFFFF.generating");
    fs::write(&unfinished, b"").unwrap();
    let store = Store::open_existing(&path).unwrap();
    assert!(!unfinished.exists());
    assert!(store.verify().unwrap().is_intact());
    assert_eq!(store.heads().unwrap().len(), state.heads().len());
}

#[test]
fn a_full_disk_is_named_with_the_space_needed() {
    let dir = Path::new("/data/ledger");
    assert!(is_disk_full(&io::Error::from_raw_os_error(28)));
    assert!(is_disk_full(&io::Error::from(io::ErrorKind::StorageFull)));
    assert!(!is_disk_full(&io::Error::from(io::ErrorKind::NotFound)));
    let error = sled_error(
        dir,
        "applying batch 3 (1000 entries)",
        sled::Error::Io(io::Error::from_raw_os_error(28)),
    );
    let error = needing(error, 3 * 1024 * 1024);
    assert!(
        matches!(error, StoreError::DiskFull { needed_bytes, .. } if needed_bytes == 8 * 1024 * 1024),
        "{error}"
    );
    let message = error.to_string();
    assert!(
            message.starts_with("ledger /data/ledger: the disk is full while applying batch 3 (1000 entries) (No space left on device"),
            "{message}"
        );
    assert!(
        message.contains("free at least 8 MiB on the filesystem holding /data/ledger"),
        "{message}"
    );
    // Our own fsyncs hitting ENOSPC say the same.
    let error = io_error(dir, "fsync of db", io::Error::from_raw_os_error(28));
    assert!(
        error
            .to_string()
            .contains("the disk is full while fsync of db"),
        "{error}"
    );
}

#[test]
fn scratch_files_left_by_a_dead_process_are_removed_at_open() {
    let (_tmp, path) = ledger_dir();
    small_ledger(&path);
    let left_index = path.join(format!("{}4242-0", identities::FOLDER_PREFIX));
    fs::create_dir(&left_index).unwrap();
    fs::write(left_index.join("run-000000"), b"x").unwrap();
    let left_history = path.join(format!("{}4242-1", segments::FILE_PREFIX));
    fs::write(&left_history, b"x").unwrap();
    let store = Store::open_existing(&path).unwrap();
    assert!(!left_index.exists() && !left_history.exists());
    // A state's own scratch files live while it does, then go.
    let state = store.load_state().unwrap();
    let scratch = |path: &Path| {
        fs::read_dir(path)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with(identities::FOLDER_PREFIX)
                    || name.starts_with(segments::FILE_PREFIX)
            })
            .count()
    };
    // Identity index, amendment set, history segments.
    assert_eq!(scratch(&path), 3);
    drop(state);
    assert_eq!(scratch(&path), 0);
}

#[test]
fn open_existing_creates_nothing() {
    let (_tmp, path) = ledger_dir();
    let error = Store::open_existing(&path).unwrap_err();
    assert!(
        error
            .to_string()
            .ends_with("is not a dealledger ledger: the folder does not exist"),
        "{error}"
    );
    assert!(!path.exists());
    fs::create_dir(&path).unwrap();
    let error = Store::open_existing(&path).unwrap_err();
    assert!(
        error.to_string().ends_with("the folder is empty"),
        "{error}"
    );
    assert_eq!(fs::read_dir(&path).unwrap().count(), 0);

    small_ledger(&path);
    let store = Store::open_existing(&path).unwrap();
    assert_eq!(store.topic(), TOPIC);
    assert!(store.verify().unwrap().is_intact());
}

#[test]
fn an_empty_folder_becomes_a_ledger() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), TOPIC).unwrap();
    assert_eq!(store.heads().unwrap(), vec![]);
    assert_eq!(store.next_batch_no().unwrap(), 0);
    let report = store.verify().unwrap();
    assert!(report.is_intact() && report.streams.is_empty());
    let state = store.load_state().unwrap();
    assert_eq!(state.next_batch(), 0);
}

#[test]
fn another_topic_is_refused() {
    let (_tmp, path) = ledger_dir();
    small_ledger(&path);
    let error = open_error(&path, "other-topic");
    assert!(matches!(error, StoreError::TopicMismatch { .. }));
    assert_eq!(
        error.to_string(),
        format!(
            "ledger {} holds topic \"deal-events\", not \"other-topic\": a ledger holds exactly one topic; use another folder for this topic",
            path.display()
        )
    );
    assert!(matches!(
        open_error(&path, ""),
        StoreError::InvalidTopic { .. }
    ));
}

#[test]
fn a_newer_format_is_refused() {
    let (_tmp, path) = ledger_dir();
    small_ledger(&path);
    edit_raw(&path, |tree| {
        tree.insert(meta_key(META_FORMAT), &3u32.to_be_bytes())
            .unwrap();
    });
    let error = open_error(&path, TOPIC);
    assert!(
        matches!(
            error,
            StoreError::UnsupportedFormat {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("storage format version 3"),
        "{error}"
    );
}

#[test]
fn a_format_1_ledger_is_refused_with_the_way_out() {
    let (_tmp, path) = ledger_dir();
    small_ledger(&path);
    edit_raw(&path, |tree| {
        tree.insert(meta_key(META_FORMAT), &1u32.to_be_bytes())
            .unwrap();
    });
    for error in [
        open_error(&path, TOPIC),
        Store::open_existing(&path).unwrap_err(),
    ] {
        assert!(
            matches!(
                error,
                StoreError::ObsoleteFormat {
                    found: 1,
                    supported: 2,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            format!(
                "ledger {} has storage format version 1, written by an older dealledger; this dealledger reads version 2 only and does not convert ledgers: rebuild it with `dealledger rebuild --from-kafka` or import an export of it (`dealledger import`)",
                path.display()
            )
        );
    }
    edit_raw(&path, |tree| {
        tree.insert(meta_key(META_FORMAT), &0u32.to_be_bytes())
            .unwrap();
    });
    // Damaged metadata: the ledger cannot be opened (never re-created).
    let error = open_error(&path, TOPIC);
    assert!(matches!(error, StoreError::Unreadable { .. }), "{error}");
    assert!(error.to_string().contains("format version is 0"), "{error}");
}

#[test]
fn a_second_open_in_the_same_process_is_locked() {
    let (_tmp, path) = ledger_dir();
    let _first = Store::open(&path, TOPIC).unwrap();
    let error = open_error(&path, TOPIC);
    assert!(matches!(error, StoreError::Locked { .. }), "{error}");
    assert!(matches!(
        Store::open_existing(&path),
        Err(StoreError::Locked { .. })
    ));
}

// ---- a real second process ---------------------------------------------

/// Environment variable that turns [`child_process`] into a helper.
const CHILD_ENV: &str = "DEALLEDGER_STORE_TEST_CHILD";
/// Line the helper prints when it holds the ledger (and wrote, if asked).
const CHILD_READY: &str = "dealledger-store-child-ready";

/// A helper process, killed (SIGKILL) when dropped.
struct ChildGuard {
    child: Child,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs this test binary again as a second process doing `task` on
/// `dir`, and waits until it says it is ready.
fn spawn_child(task: &str, dir: &Path) -> ChildGuard {
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::tests::child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{task}:{}", dir.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard { child };
    let stdout = guard.child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().contains(CHILD_READY) {
            return guard;
        }
    }
    panic!(
        "helper process exited before it was ready: {:?}",
        guard.child.wait()
    );
}

/// Not a test on its own: the second process of the lock and kill tests
/// (does nothing unless [`CHILD_ENV`] is set).
#[test]
#[ignore = "helper process, started by other tests"]
fn child_process() {
    let Ok(task) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (what, dir) = task.split_once(':').unwrap();
    let store = Store::open(Path::new(dir), TOPIC).unwrap();
    if what == "write" {
        let mut state = LedgerState::new(TOPIC);
        write_batches(&store, &mut state, &mut Feed::new(9), 2, 300);
    }
    println!("{CHILD_READY}");
    io::stdout().flush().unwrap();
    // Hold the ledger until the parent kills us or closes stdin.
    let _ = io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn a_ledger_open_in_another_process_is_locked() {
    let (_tmp, path) = ledger_dir();
    let child = spawn_child("hold", &path);
    let error = open_error(&path, TOPIC);
    assert!(matches!(error, StoreError::Locked { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        format!(
            "ledger folder {} is in use by another dealledger process (sled allows one process per ledger): stop that process, or query the running daemon instead",
            path.display()
        )
    );
    drop(child);
    // The lock dies with the process.
    Store::open(&path, TOPIC).unwrap();
}

#[test]
fn written_batches_survive_killing_the_writer() {
    let (_tmp, path) = ledger_dir();
    // The helper writes two batches, says so, and is then SIGKILLed:
    // no destructor, no sled shutdown flush.
    drop(spawn_child("write", &path));
    // The same batches, written here for comparison.
    let (_tmp2, twin) = ledger_dir();
    let expected = Store::open(&twin, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    write_batches(&expected, &mut state, &mut Feed::new(9), 2, 300);

    let store = Store::open(&path, TOPIC).unwrap();
    assert_eq!(store.next_batch_no().unwrap(), 2);
    assert_eq!(store.heads().unwrap(), expected.heads().unwrap());
    assert!(store.verify().unwrap().is_intact());
    let loaded = store.load_state().unwrap();
    assert_eq!(book_json(&loaded), book_json(&state));
}

#[test]
fn written_batches_survive_a_drop_and_reopen() {
    let (_tmp, path) = ledger_dir();
    let (state, _) = small_ledger(&path);
    let store = Store::open(&path, TOPIC).unwrap();
    assert_eq!(store.load_state().unwrap().heads(), state.heads());
}

// ---- encodings -------------------------------------------------------------

#[test]
fn keys_sort_in_sequence_order() {
    assert!(page_key(0, 255) < page_key(0, 256));
    assert!(page_key(0, u64::MAX) < page_key(1, 0));
    assert_eq!(
        page_key(0x0102, 0x0304)[..],
        [b'E', 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 3, 4]
    );
    assert!(batch_key(255) < batch_key(256));
    assert_eq!(
        parse_location_key(FAMILY_ENTRY, &page_key(7, 42)),
        Some(Location {
            partition: 7,
            seq: 42
        })
    );
    assert_eq!(parse_page_key(&page_key(7, 42)), Some(42));
    assert_eq!(
        parse_page_key(&verdict_key(Location {
            partition: 7,
            seq: 42
        })),
        None
    );
    assert_eq!(parse_head_key(&head_key(i32::MAX)), Some(i32::MAX));
    assert_eq!(parse_batch_key(&batch_key(9)), Some(9));
}

#[test]
fn head_and_batch_record_encodings_round_trip_and_reject_damage() {
    let stream = StreamId::new(TOPIC, 4);
    let mut head = ChainHead::genesis(stream.clone());
    assert_eq!(
        decode_head(stream.clone(), &encode_head(&head)).unwrap(),
        head
    );
    let mut feed = Feed::new(2);
    for _ in 0..3 {
        let mut record = feed.record();
        record.partition = 4;
        record.offset += 1000;
        head.append(record).unwrap();
    }
    let bytes = encode_head(&head);
    assert_eq!(bytes.len(), HEAD_VALUE_LEN);
    assert_eq!(decode_head(stream.clone(), &bytes).unwrap(), head);
    let mut bad = bytes;
    bad[8] = 2;
    assert!(decode_head(stream.clone(), &bad).is_err());
    assert!(decode_head(stream.clone(), &bytes[1..]).is_err());

    let runs = vec![
        Run {
            partition: 0,
            first_seq: 0,
            count: 3,
        },
        Run {
            partition: 2,
            first_seq: 9,
            count: 1,
        },
    ];
    let fingerprints = vec![(
        0xdead_beef,
        Location {
            partition: 2,
            seq: 9,
        },
    )];
    let bytes = encode_batch_record(&runs, &fingerprints);
    assert_eq!(bytes.len(), 1 + 4 + 2 * RUN_BYTES + 4 + FINGERPRINT_BYTES);
    let record = decode_batch_record(5, &bytes).unwrap();
    assert_eq!(
        record,
        BatchRecord {
            batch_no: 5,
            runs,
            fingerprints
        }
    );
    for cut in 0..bytes.len() {
        assert!(decode_batch_record(5, &bytes[..cut]).is_err());
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(decode_batch_record(5, &long).is_err());
    let mut many = bytes;
    many[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(
        decode_batch_record(5, &many)
            .unwrap_err()
            .contains("more than MAX_BATCH_RUNS")
    );
}

#[test]
fn an_overlong_reason_is_cut_to_fit() {
    let verdict = Verdict::Rejected {
        kind: "invalid".into(),
        reason: "\u{1}é".repeat(MAX_VERDICT_BYTES),
    };
    let json = verdict_json(&verdict);
    assert!(json.len() <= MAX_VERDICT_BYTES);
    let back: Verdict = serde_json::from_slice(&json).unwrap();
    assert_eq!(back.kind(), Some("invalid"));
    assert!(
        back.reason()
            .unwrap()
            .ends_with("(reason cut to fit MAX_VERDICT_BYTES)")
    );
    let short = Verdict::Duplicate {
        of: Location {
            partition: 1,
            seq: 2,
        },
    };
    assert_eq!(verdict_json(&short), serde_json::to_vec(&short).unwrap());
}

#[test]
fn verdict_json_is_as_documented() {
    let rejected = Verdict::Rejected {
        kind: "not_json".into(),
        reason: "...".into(),
    };
    let duplicate = Verdict::Duplicate {
        of: Location {
            partition: 0,
            seq: 17,
        },
    };
    let doc = include_str!("../../docs/FORMAT.md");
    for verdict in [rejected, duplicate] {
        let json = serde_json::to_string(&verdict).unwrap();
        assert!(doc.contains(&json), "FORMAT.md should show {json}");
    }
}

// ---- pages -------------------------------------------------------------------

/// A chain of partition 0 whose entries carry values of these lengths.
fn chain_of(value_lens: &[usize]) -> Vec<Entry> {
    let mut head = ChainHead::genesis(StreamId::new(TOPIC, 0));
    value_lens
        .iter()
        .enumerate()
        .map(|(i, len)| {
            head.append(Record {
                topic: TOPIC.into(),
                partition: 0,
                offset: i as i64,
                timestamp_type: TimestampType::CreateTime,
                timestamp_ms: 1_795_000_000_000,
                key: None,
                value: Some(vec![b'x'; *len]),
                headers: vec![],
            })
            .unwrap()
        })
        .collect()
}

/// Reads a page back with [`PageReader`], decoding every entry.
fn read_page(first_seq: u64, page: &[u8]) -> Result<Vec<Entry>, PageDamage> {
    let mut reader = PageReader::open(first_seq, sled::IVec::from(page))?;
    let mut entries = Vec::new();
    while let Some(item) = reader.next_entry() {
        let (seq, range) = item?;
        let entry = chain::decode_entry(&reader.value[range]).unwrap();
        assert_eq!(entry.seq, seq);
        entries.push(entry);
    }
    Ok(entries)
}

/// Reads a page's framing with [`PageReader`] (entries not decoded);
/// returns the number of entries.
fn frame_page(first_seq: u64, page: &[u8]) -> Result<usize, PageDamage> {
    let mut reader = PageReader::open(first_seq, sled::IVec::from(page))?;
    let mut count = 0;
    while let Some(item) = reader.next_entry() {
        item?;
        count += 1;
    }
    Ok(count)
}

/// Splits `entries` into pages filled to `fill` bytes and checks that
/// reading them back gives the same entries; returns the pages' first
/// seqs and entry counts.
fn page_shape(entries: &[Entry], fill: usize) -> Vec<(u64, usize)> {
    let refs: Vec<&Entry> = entries.iter().collect();
    let pages = encode_pages_filled_to(&refs, fill);
    if fill == PAGE_FILL_BYTES {
        assert_eq!(pages, encode_pages(&refs));
    }
    let mut read = Vec::new();
    let mut shape = Vec::new();
    for (first_seq, page) in &pages {
        let back = read_page(*first_seq, page).unwrap();
        assert!(
            page.len() <= fill || back.len() == 1,
            "only a page of one entry may be fuller than {fill} bytes"
        );
        assert!(back.len() <= MAX_PAGE_ENTRIES);
        shape.push((*first_seq, back.len()));
        read.extend(back);
    }
    assert_eq!(read, entries);
    shape
}

#[test]
fn pages_hold_at_most_32_entries_and_their_fill_size() {
    for fill in [PAGE_FILL_BYTES, MAX_PAGE_BYTES] {
        let small = chain_of(&[100; 100]);
        assert_eq!(
            page_shape(&small, fill),
            vec![(0, 32), (32, 32), (64, 32), (96, 4)]
        );
        assert_eq!(page_shape(&small[..1], fill), vec![(0, 1)]);
        assert_eq!(page_shape(&[], fill), vec![]);

        // The encoded size of an entry of this chain with an empty value.
        let fixed = chain::encode_entry(&chain_of(&[0])[0]).len();
        // Two entries that fill a page to exactly its fill size share
        // it; one byte more and they do not.
        let both = fill - PAGE_HEADER_BYTES - 2 * (PAGE_LENGTH_BYTES + fixed);
        let (a, b) = (both / 2, both - both / 2);
        let pair = chain_of(&[a, b]);
        let pair: Vec<&Entry> = pair.iter().collect();
        assert_eq!(encode_pages_filled_to(&pair, fill)[0].1.len(), fill);
        assert_eq!(
            page_shape(&chain_of(&[a, b, a]), fill),
            vec![(0, 2), (2, 1)]
        );
        assert_eq!(
            page_shape(&chain_of(&[a, b + 1, a - 1]), fill),
            vec![(0, 1), (1, 2)]
        );
        // An entry larger than a page gets a page of its own; the pages
        // around it are filled as usual.
        let third = (fill - PAGE_HEADER_BYTES) / 3 - (PAGE_LENGTH_BYTES + fixed) - 10;
        let mixed = chain_of(&[100, 100, fill * 2, 100, third, third, third, third]);
        assert_eq!(
            page_shape(&mixed, fill),
            vec![(0, 2), (2, 1), (3, 3), (6, 2)]
        );
    }
    // Entries of ~700 bytes (694 here), as generated events are: 10 to
    // a page.
    assert_eq!(
        page_shape(&chain_of(&[575; 25]), PAGE_FILL_BYTES),
        vec![(0, 10), (10, 10), (20, 5)]
    );
}

#[test]
fn a_damaged_page_is_refused_at_the_seq_it_hides_never_a_panic() {
    let entries = chain_of(&[50, 60, 70]);
    let refs: Vec<&Entry> = entries.iter().collect();
    let (_, page) = encode_pages(&refs).remove(0);
    let lengths_at: Vec<usize> = {
        let mut at = PAGE_HEADER_BYTES;
        entries
            .iter()
            .map(|e| {
                let here = at;
                at += PAGE_LENGTH_BYTES + chain::encode_entry(e).len();
                here
            })
            .collect()
    };
    assert_eq!(frame_page(40, &page).unwrap(), 3);
    let damage = |bytes: &[u8]| frame_page(40, bytes).unwrap_err();
    // Every cut: at the page for the header, else at the entry cut into
    // (an entry cut inside its bytes shows as its length running past
    // the page), or after the last whole entry.
    for cut in 0..page.len() {
        let found = damage(&page[..cut]);
        let expected = if cut < PAGE_HEADER_BYTES {
            40
        } else {
            40 + lengths_at.iter().filter(|at| **at <= cut).count() as u64 - 1
        };
        assert_eq!(found.seq, expected, "cut at {cut}: {found:?}");
        assert_eq!(found.page_seq, 40);
    }
    let mut long = page.clone();
    long.push(0);
    let found = damage(&long);
    assert_eq!(found.seq, 43);
    assert!(
        found.reason.contains("1 bytes follow its last entry"),
        "{found:?}"
    );
    for (header, why) in [
        ([2u8, 0, 0, 0, 3], "page format 2"),
        ([1, 0, 0, 0, 0], "holds 0 entries"),
        ([1, 0, 0, 0, 33], "holds 33 entries"),
    ] {
        let bytes = [&header[..], &page[PAGE_HEADER_BYTES..]].concat();
        let found = damage(&bytes);
        assert_eq!(found.seq, 40);
        assert!(found.reason.contains(why), "{found:?}");
    }
    // A count one too high: the page ends where the 4th length should be.
    let mut more = page.clone();
    more[1..5].copy_from_slice(&4u32.to_be_bytes());
    let found = damage(&more);
    assert_eq!(found.seq, 43);
    assert!(
        found
            .reason
            .contains("ends inside the length of its entry 3"),
        "{found:?}"
    );
    // A length running past the page.
    let mut past = page.clone();
    past[lengths_at[1]..lengths_at[1] + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    let found = damage(&past);
    assert_eq!(found.seq, 41);
    // More than one entry in more than MAX_PAGE_BYTES.
    let big = chain_of(&[40_000, 40_000]);
    let oversized = RawPage::encode(&big.iter().map(chain::encode_entry).collect::<Vec<_>>());
    assert!(oversized.len() > MAX_PAGE_BYTES);
    let found = damage(&oversized);
    assert_eq!(found.seq, 40);
    assert!(
        found
            .reason
            .contains("only a page of one entry may be larger"),
        "{found:?}"
    );
    // Seqs past u64::MAX.
    let found = frame_page(u64::MAX - 1, &page).unwrap_err();
    assert!(found.reason.contains("past seq u64::MAX"), "{found:?}");
}

/// Records of the feed, every 9th with a value of `big` bytes.
fn records_with_big_values(feed: &mut Feed, len: usize, big: usize) -> Vec<Record> {
    let mut records = feed.records(len);
    for record in records.iter_mut().step_by(9) {
        record.value = Some(vec![b'{'; big]);
    }
    records
}

#[test]
fn batches_start_new_pages_and_readers_find_every_entry() {
    for big in [None, Some(30_000), Some(100_000)] {
        let (_tmp, path) = ledger_dir();
        let store = Store::open(&path, TOPIC).unwrap();
        let mut state = LedgerState::new(TOPIC);
        let mut feed = Feed::new(6);
        let mut written = Vec::new();
        for len in [300, 1, 100, 250] {
            let records = match big {
                None => feed.records(len),
                Some(big) => records_with_big_values(&mut feed, len, big),
            };
            let batch = state.apply_batch(records, &store).unwrap();
            store.write_batch(&batch).unwrap();
            written.push(batch);
        }
        drop(store);
        // The raw pages: contiguous, within the limits, and every
        // batch's run of a partition starts a page.
        edit_raw(&path, |tree| {
            for partition in 0..PARTITIONS as i32 {
                let pages = RawPage::all(tree, partition);
                let starts: BTreeSet<u64> = pages.iter().map(|p| p.first_seq).collect();
                let mut next = 0;
                for page in &pages {
                    assert_eq!(page.first_seq, next);
                    next = page.end_seq();
                    assert!(page.entries.len() <= MAX_PAGE_ENTRIES);
                    assert!(page.entries.len() == 1 || page.bytes.len() <= MAX_PAGE_BYTES);
                }
                assert_eq!(next, stream_len(&written, partition));
                for batch in &written {
                    if let Some(first) = batch
                        .entries
                        .iter()
                        .find(|e| e.record.partition == partition)
                    {
                        assert!(starts.contains(&first.seq), "batch {}", batch.batch_no);
                    }
                }
                for page in &pages {
                    assert!(page.entries.len() == 1 || page.bytes.len() <= PAGE_FILL_BYTES);
                }
                if big.is_none() {
                    assert!(pages.iter().any(|p| p.entries.len() > 5));
                }
                if big == Some(100_000) {
                    assert!(pages.iter().any(|p| p.bytes.len() > MAX_PAGE_BYTES));
                }
            }
        });
        let store = Store::open_existing(&path).unwrap();
        for partition in 0..PARTITIONS as i32 {
            let expected: Vec<Entry> = all_entries(&written)
                .filter(|e| e.record.partition == partition)
                .cloned()
                .collect();
            let len = expected.len() as u64;
            for seq in 0..len {
                let location = Location { partition, seq };
                assert_eq!(
                    store.entry(location).unwrap().as_ref(),
                    Some(&expected[seq as usize])
                );
            }
            assert_eq!(
                store
                    .entry(Location {
                        partition,
                        seq: len
                    })
                    .unwrap(),
                None
            );
            assert_eq!(
                store
                    .entry(Location {
                        partition,
                        seq: u64::MAX
                    })
                    .unwrap(),
                None
            );
            for from in (0..=len + 1).step_by(7).chain([len - 1, len]) {
                let tail: Vec<Entry> = store.entries(partition, from).map(Result::unwrap).collect();
                assert_eq!(tail, expected[(from.min(len)) as usize..], "from {from}");
            }
        }
        assert!(store.verify().unwrap().is_intact());
        let loaded = store.load_state().unwrap();
        assert_eq!(loaded.heads(), state.heads());
        assert_eq!(book_json(&loaded), book_json(&state));
    }
}

#[test]
fn a_page_beyond_the_head_is_never_overwritten() {
    let (_tmp, path) = ledger_dir();
    let (mut state, written) = small_ledger(&path);
    let len = stream_len(&written, 1);
    let stray = RawPage::encode(&[b"stray".to_vec()]);
    edit_raw(&path, |tree| {
        tree.insert(page_key(1, len + 3), stray.clone()).unwrap();
    });
    let mut feed = Feed::new(1);
    feed.records(4 * 60);
    let store = Store::open(&path, TOPIC).unwrap();
    let batch = state.apply_batch(feed.records(60), &store).unwrap();
    let error = store.write_batch(&batch).unwrap_err();
    match &error {
        StoreError::Corrupt {
            location, detail, ..
        } => {
            assert_eq!(
                *location,
                Some(Location {
                    partition: 1,
                    seq: len
                })
            );
            assert!(
                detail.contains(&format!("entry page stored at seq {}", len + 3)),
                "{detail}"
            );
            assert!(detail.contains("pages are never rewritten"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(store.next_batch_no().unwrap(), 4, "nothing written");
    drop(store);
    edit_raw(&path, |tree| {
        assert_eq!(tree.get(page_key(1, len + 3)).unwrap().unwrap(), stray);
        assert!(tree.get(page_key(1, len)).unwrap().is_none());
        tree.remove(page_key(1, len + 3)).unwrap();
    });
    // Not poisoned: with the stray page gone, the batch is written.
    let store = Store::open(&path, TOPIC).unwrap();
    store.write_batch(&batch).unwrap();
    assert!(store.verify().unwrap().is_intact());
}

#[test]
fn format_md_documents_the_storage_layout() {
    let doc = include_str!("../../docs/FORMAT.md");
    let section = doc
        .split("\n## Storage layout")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap();
    // Line breaks count as spaces.
    let section = section.split_whitespace().collect::<Vec<_>>().join(" ");
    for text in [
        format!("u32: storage format version, `{STORE_FORMAT_VERSION}`"),
        format!("| `MAX_PAGE_ENTRIES` | {MAX_PAGE_ENTRIES} |"),
        format!(
            "| `MAX_PAGE_BYTES` | 65,536 ({} KiB) |",
            MAX_PAGE_BYTES / 1024
        ),
        format!(
            "7,168 bytes ({} KiB, `PAGE_FILL_BYTES`)",
            PAGE_FILL_BYTES / 1024
        ),
        format!("u8({PAGE_FORMAT})"),
    ] {
        assert!(
            section.contains(&text),
            "FORMAT.md Storage layout should say {text}"
        );
    }
    assert_eq!((MAX_PAGE_BYTES, PAGE_FILL_BYTES), (65_536, 7_168));
}

// ---- timing ------------------------------------------------------------------

/// `write_bytes` of /proc/self/io (Linux), if readable.
fn process_write_bytes() -> Option<u64> {
    fs::read_to_string("/proc/self/io")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))?
        .trim()
        .parse()
        .ok()
}

/// Total size of the files in a folder and its subfolders (files sled
/// removes meanwhile are skipped).
fn folder_bytes(path: &Path) -> u64 {
    let Ok(listing) = fs::read_dir(path) else {
        return 0;
    };
    listing
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.path(), e.metadata().ok()?)))
        .map(|(path, meta)| {
            if meta.is_dir() {
                folder_bytes(&path)
            } else {
                meta.len()
            }
        })
        .sum()
}

/// Times 5,000-entry batches. Run with
/// `cargo test --release --lib store::tests::time_write_batch -- --ignored --nocapture`.
#[test]
#[ignore = "timing, run by hand in release mode"]
fn time_write_batch() {
    const BATCHES: usize = 20;
    const LEN: usize = 5_000;
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut feed = Feed::new(11);
    let mut stats = Vec::new();
    let written_before = process_write_bytes();
    for _ in 0..BATCHES {
        let batch = state.apply_batch(feed.records(LEN), &store).unwrap();
        stats.push(store.write_batch(&batch).unwrap());
    }
    if let (Some(before), Some(after)) = (written_before, process_write_bytes()) {
        println!(
            "bytes written to disk by this process: {:.1} MB; ledger folder: {:.1} MB",
            (after - before) as f64 / 1e6,
            folder_bytes(&path) as f64 / 1e6
        );
    }
    let mut apply: Vec<Duration> = stats.iter().map(|s| s.apply).collect();
    let mut durable: Vec<Duration> = stats.iter().map(|s| s.durable).collect();
    apply.sort();
    durable.sort();
    let bytes: usize = stats.iter().map(|s| s.bytes).sum();
    let total: Duration = stats.iter().map(|s| s.apply + s.durable).sum();
    println!(
        "{BATCHES} batches of {LEN} entries, {} bytes/entry on average",
        bytes / (BATCHES * LEN)
    );
    println!(
        "apply:   min {:?} median {:?} max {:?}",
        apply[0],
        apply[BATCHES / 2],
        apply[BATCHES - 1]
    );
    println!(
        "durable: min {:?} median {:?} max {:?}",
        durable[0],
        durable[BATCHES / 2],
        durable[BATCHES - 1]
    );
    println!(
        "throughput: {:.0} entries/s (write_batch only)",
        (BATCHES * LEN) as f64 / total.as_secs_f64()
    );
    let started = Instant::now();
    sync_path(&path, &path, "folder").unwrap();
    println!(
        "an extra fsync of the unchanged ledger folder: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let loaded = store.load_state().unwrap();
    println!(
        "load_state of {} entries: {:?}",
        loaded.entry_count(),
        started.elapsed()
    );
    let started = Instant::now();
    assert!(store.verify().unwrap().is_intact());
    println!("verify: {:?}", started.elapsed());
}

// ---- snapshots -----------------------------------------------------------

/// Everything a state holds, comparable: heads, sorted fingerprints,
/// collided identities, book JSON, amendment fingerprints, batch
/// number, entry count.
fn state_parts(state: &LedgerState) -> impl PartialEq + std::fmt::Debug {
    let mut fingerprints: Vec<(u64, Location)> = state.fingerprints().collect();
    fingerprints.sort_unstable();
    let mut collided: Vec<((String, String), Location)> = state
        .collided()
        .map(|(identity, l)| (identity.clone(), l))
        .collect();
    collided.sort_unstable();
    (
        state.heads().clone(),
        fingerprints,
        collided,
        book_json(state),
        state.book().amendments().sorted().collect::<Vec<u64>>(),
        state.next_batch(),
        state.entry_count(),
        // Its lock tables are rebuilt on restore, not read.
        state.index().clone(),
    )
}

/// The verdicts a replay recomputes, by location.
fn replayed_verdicts(store: &Store, from: ReplayFrom) -> (Replayed, BTreeMap<Location, Verdict>) {
    let mut verdicts = BTreeMap::new();
    let replayed = store
        .replay_with(from, QueryIndex::Kept, None, |entry, outcome| {
            assert_eq!(outcome.location.seq, entry.seq);
            verdicts.insert(outcome.location, outcome.verdict.clone());
        })
        .unwrap();
    (replayed, verdicts)
}

#[test]
fn a_snapshot_round_trips_the_whole_state() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    assert_eq!(store.write_snapshot(&state).unwrap(), None, "no batch yet");
    write_batches(&store, &mut state, &mut Feed::new(5), 3, 90);
    let stats = store.write_snapshot(&state).unwrap().expect("written");
    assert_eq!(stats.batch_no, 2);
    assert_eq!(store.snapshot_batches().unwrap(), vec![2]);
    assert_eq!(store.write_snapshot(&state).unwrap(), None, "already taken");
    let restored = store.read_snapshot(2).unwrap().expect("readable");
    assert_eq!(state_parts(&restored), state_parts(&state));
    assert!(restored.identities() > 100);
    assert!(
        restored.book().amendments().len() > 10,
        "the amendments, beside the book, come back too"
    );
    assert_eq!(
        encode_snapshot(&restored),
        encode_snapshot(&state),
        "the encoding is deterministic"
    );
    assert!(matches!(store.read_snapshot(7).unwrap(), Err(r) if r == "it is not stored"));
}

#[test]
fn amendment_fingerprints_out_of_order_are_refused_as_they_load() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    write_batches(&store, &mut state, &mut Feed::new(5), 3, 90);
    let batch = store
        .write_snapshot(&state)
        .unwrap()
        .expect("written")
        .batch_no;
    let sorted: Vec<u64> = state.book().amendments().sorted().collect();
    assert!(sorted.len() > 10);
    // Swap the first two (big-endian, adjacent), then seal it again so
    // that only the order check can refuse it.
    let file = store.snapshot_path(batch);
    let mut bytes = fs::read(&file).unwrap();
    bytes.truncate(bytes.len() - HASH_LEN);
    let pair: Vec<u8> = [sorted[0], sorted[1]]
        .iter()
        .flat_map(|f| f.to_be_bytes())
        .collect();
    let at = bytes
        .windows(16)
        .position(|w| w == pair.as_slice())
        .expect("the first two fingerprints, side by side");
    bytes[at..at + 16].rotate_left(8);
    let seal = blake3::Hasher::new_derive_key(SNAPSHOT_CONTEXT)
        .update(&bytes)
        .finalize();
    bytes.extend_from_slice(seal.as_bytes());
    fs::write(&file, &bytes).unwrap();
    let Err(reason) = store.read_snapshot(batch).unwrap() else {
        panic!("a snapshot with its amendments out of order was read");
    };
    assert!(
        reason.contains("amendment fingerprints out of order or repeated"),
        "{reason}"
    );
}

#[test]
fn replay_from_a_snapshot_equals_replay_from_genesis() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut feed = Feed::new(8);
    let mut written = write_batches(&store, &mut state, &mut feed, 3, 70);
    store.write_snapshot(&state).unwrap().unwrap();
    written.extend(write_batches(&store, &mut state, &mut feed, 2, 70));
    drop(store);

    let store = Store::open(&path, TOPIC).unwrap();
    let (genesis, all) = replayed_verdicts(&store, ReplayFrom::Genesis);
    let (snapshot, tail) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
    assert_eq!(genesis.snapshot, None);
    assert_eq!(snapshot.snapshot, Some(2));
    assert!(snapshot.skipped.is_empty());
    assert_eq!(state_parts(&snapshot.state), state_parts(&genesis.state));
    assert_eq!(state_parts(&snapshot.state), state_parts(&state));
    // Only the entries after the snapshot were folded again, with the
    // verdicts ingest gave them.
    let ingested: BTreeMap<Location, Verdict> = written
        .iter()
        .flat_map(|b| &b.outcomes)
        .map(|o| (o.location, o.verdict.clone()))
        .collect();
    assert_eq!(all, ingested);
    let after: BTreeMap<Location, Verdict> = written[3..]
        .iter()
        .flat_map(|b| &b.outcomes)
        .map(|o| (o.location, o.verdict.clone()))
        .collect();
    assert_eq!(tail, after);
    assert_eq!(
        state_parts(&store.load_state().unwrap()),
        state_parts(&state)
    );

    // The restored state continues ingest exactly (duplicates included).
    let mut loaded = store.load_state().unwrap();
    let records = feed.records(120);
    let a = loaded.apply_batch(records.clone(), &store).unwrap();
    let b = state.apply_batch(records, &store).unwrap();
    let verdicts =
        |w: &BatchWrite| -> Vec<Verdict> { w.outcomes.iter().map(|o| o.verdict.clone()).collect() };
    assert_eq!(verdicts(&a), verdicts(&b));
    assert!(verdicts(&a).iter().any(|v| v.kind() == Some("duplicate")));
    assert_eq!(a.fingerprints, b.fingerprints);
}

#[test]
fn only_the_latest_two_snapshots_are_kept() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut feed = Feed::new(2);
    for _ in 0..4 {
        write_batches(&store, &mut state, &mut feed, 2, 20);
        store.write_snapshot(&state).unwrap().unwrap();
    }
    assert_eq!(store.snapshot_batches().unwrap(), vec![5, 7]);
    write_batches(&store, &mut state, &mut feed, 1, 20);
    assert_eq!(store.load_state().unwrap().next_batch(), 9);
    let (replayed, tail) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
    assert_eq!(replayed.snapshot, Some(7));
    assert_eq!(tail.len(), 20);
}

#[test]
fn a_snapshot_of_an_older_format_is_replaced() {
    let (_tmp, path) = ledger_dir();
    let mut state = LedgerState::new(TOPIC);
    {
        let store = Store::open(&path, TOPIC).unwrap();
        let mut feed = Feed::new(3);
        write_batches(&store, &mut state, &mut feed, 2, 20);
        store.write_snapshot(&state).unwrap().unwrap();
    }
    let mut old = Vec::new();
    edit_raw_snapshots(&path, |files| {
        old = files.get(1);
        old[0] = SNAPSHOT_FORMAT - 1;
        files.insert(1, &old);
    });
    // Where earlier versions kept snapshots: format 1 in the ledger's
    // tree, format 2 in a tree of their own.
    edit_raw(&path, |tree| {
        tree.insert(snapshot_key(0), old.clone()).unwrap();
    });
    edit_raw_tree(&path, SNAPSHOT_TREE_NAME, |tree| {
        tree.insert(snapshot_key(1), old.clone()).unwrap();
    });
    let store = Store::open_existing(&path).unwrap();
    let (replayed, _) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
    assert_eq!(replayed.snapshot, None, "the old snapshot is not read");
    let stats = store.write_snapshot(&replayed.state).unwrap();
    assert_eq!(stats.map(|s| s.batch_no), Some(1), "and it is replaced");
    let (replayed, _) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
    assert_eq!(replayed.snapshot, Some(1));
    assert_eq!(state_parts(&replayed.state), state_parts(&state));
    assert_eq!(
        store.write_snapshot(&replayed.state).unwrap(),
        None,
        "only once"
    );
    drop(store);
    for name in [TREE_NAME, SNAPSHOT_TREE_NAME] {
        edit_raw_tree(&path, name, |tree| {
            assert_eq!(
                tree.scan_prefix([FAMILY_SNAPSHOT]).count(),
                0,
                "old ones dropped from {name}"
            );
        });
    }
}

#[test]
#[should_panic(expected = "the state is at batch 1, but the ledger's next batch is 2")]
fn write_snapshot_refuses_a_state_that_is_not_the_stored_one() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut feed = Feed::new(2);
    write_batches(&store, &mut state, &mut feed, 1, 20);
    let behind = store.load_state().unwrap();
    write_batches(&store, &mut state, &mut feed, 1, 20);
    let _ = store.write_snapshot(&behind);
}

/// A ledger with snapshots after batches 1 and 3 and five batches in all.
fn snapshotted_ledger(path: &Path, seed: u64) -> LedgerState {
    let store = Store::open(path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut feed = Feed::new(seed);
    write_batches(&store, &mut state, &mut feed, 2, 50);
    store.write_snapshot(&state).unwrap().unwrap();
    write_batches(&store, &mut state, &mut feed, 2, 50);
    store.write_snapshot(&state).unwrap().unwrap();
    write_batches(&store, &mut state, &mut feed, 1, 50);
    state
}

#[test]
fn damaged_snapshots_are_skipped_for_older_ones_then_genesis() {
    let (_tmp, path) = ledger_dir();
    let state = snapshotted_ledger(&path, 4);
    let flip = |files: &SnapshotFiles, batch_no: u64| {
        let mut value = files.get(batch_no);
        let at = value.len() / 2;
        value[at] ^= 0x10;
        files.insert(batch_no, &value);
    };
    edit_raw_snapshots(&path, |files| flip(files, 3));
    {
        let store = Store::open_existing(&path).unwrap();
        let (replayed, _) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
        assert_eq!(replayed.snapshot, Some(1));
        assert_eq!(replayed.skipped.len(), 1);
        assert_eq!(replayed.skipped[0].0, 3);
        assert!(
            replayed.skipped[0].1.contains("checksum"),
            "{:?}",
            replayed.skipped
        );
        assert_eq!(state_parts(&replayed.state), state_parts(&state));
    }
    edit_raw_snapshots(&path, |files| {
        flip(files, 1);
        // A snapshot cut short is damage too, found before its checksum.
        files.insert(3, b"\x01short");
    });
    let store = Store::open_existing(&path).unwrap();
    let (replayed, _) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
    assert_eq!(replayed.snapshot, None);
    assert_eq!(replayed.skipped.len(), 2);
    assert_eq!(state_parts(&replayed.state), state_parts(&state));
    assert_eq!(
        state_parts(&store.load_state().unwrap()),
        state_parts(&state)
    );
}

/// The streaming reader reports a flipped byte anywhere (format byte,
/// heads, fingerprints, book, index, checksum) as checksum damage, and
/// a file cut anywhere as unusable, without panicking.
#[test]
fn a_snapshot_damaged_anywhere_is_refused_with_the_reason() {
    let (_tmp, path) = ledger_dir();
    snapshotted_ledger(&path, 4);
    let mut original = Vec::new();
    edit_raw_snapshots(&path, |files| original = files.get(3));
    let len = original.len();
    let read = |bytes: &[u8]| {
        edit_raw_snapshots(&path, |files| files.insert(3, bytes));
        let store = Store::open_existing(&path).unwrap();
        store.read_snapshot(3).unwrap()
    };
    assert!(read(&original).is_ok());
    for at in [
        0,
        1,
        9,
        40,
        100,
        len / 3,
        len / 2,
        len - HASH_LEN - 1,
        len - 1,
    ] {
        let mut damaged = original.clone();
        damaged[at] ^= 0x04;
        match read(&damaged) {
            Err(reason) => assert!(reason.contains("checksum"), "byte {at}: {reason}"),
            Ok(_) => panic!("byte {at} flipped: read as intact"),
        }
    }
    for cut in [0, 1, HASH_LEN, HASH_LEN + 1, len / 2, len - 1] {
        assert!(
            read(&original[..cut]).is_err(),
            "cut at {cut}: read as intact"
        );
    }
    let mut longer = original.clone();
    longer.push(0);
    assert!(read(&longer).is_err(), "a byte appended: read as intact");
}

#[test]
fn a_snapshot_of_another_chain_or_beyond_the_ledger_is_skipped() {
    let (_tmp, path) = ledger_dir();
    let state = snapshotted_ledger(&path, 4);
    let (_other_tmp, other) = ledger_dir();
    snapshotted_ledger(&other, 9);
    // A well-formed snapshot of another ledger of the same topic.
    let mut foreign = Vec::new();
    edit_raw_snapshots(&other, |files| {
        foreign = files.get(3);
    });
    let mut beyond = Vec::new();
    edit_raw_snapshots(&path, |files| {
        beyond = files.get(1);
        files.insert(3, &foreign);
    });
    let store = Store::open_existing(&path).unwrap();
    let (replayed, _) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
    assert_eq!(replayed.snapshot, Some(1));
    assert!(
        replayed.skipped[0]
            .1
            .contains("is not the stored entry there"),
        "{:?}",
        replayed.skipped
    );
    assert_eq!(state_parts(&replayed.state), state_parts(&state));
    drop(store);

    // A snapshot after a batch the ledger does not have.
    edit_raw_snapshots(&path, |files| {
        files.insert(40, &beyond);
    });
    let store = Store::open_existing(&path).unwrap();
    let (replayed, _) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
    assert_eq!(replayed.skipped[0].0, 40);
    assert!(
        replayed.skipped[0]
            .1
            .contains("the ledger's last batch is 4"),
        "{:?}",
        replayed.skipped
    );
    assert_eq!(state_parts(&replayed.state), state_parts(&state));
}

/// The location of the last entry of partition 1 covered by the
/// snapshot after batch 3, and of one after it.
fn around_the_snapshot(path: &Path) -> (Location, Location) {
    let store = Store::open_existing(path).unwrap();
    let snapshot = store.read_snapshot(3).unwrap().unwrap();
    let head = &snapshot.heads()[&1];
    let at_head = Location {
        partition: 1,
        seq: head.next_seq() - 1,
    };
    let after = Location {
        partition: 1,
        seq: head.next_seq() + 2,
    };
    assert!(store.entry(after).unwrap().is_some());
    (at_head, after)
}

#[test]
fn a_tampered_entry_at_or_after_the_snapshot_is_found() {
    for pick in [0, 1] {
        let (_tmp, path) = ledger_dir();
        snapshotted_ledger(&path, 4);
        let (at_head, after) = around_the_snapshot(&path);
        let target = [at_head, after][pick];
        edit_raw(&path, |tree| {
            edit_entry(tree, target.partition, target.seq, |bytes| {
                let len = bytes.len();
                bytes[len - 34] ^= 0x20; // inside the header value "test"
            });
        });
        let store = Store::open_existing(&path).unwrap();
        let message = assert_corrupt_at(store.load_state(), target);
        assert!(
            message.contains(&format!("deal-events/1 seq {}", target.seq)),
            "{message}"
        );
        assert!(message.contains("hash mismatch"), "{message}");
        assert_corrupt_at(store.replay(|_, _| {}), target);
    }
}

#[test]
fn a_tampered_entry_before_the_snapshot_is_found_from_genesis_only() {
    let (_tmp, path) = ledger_dir();
    let state = snapshotted_ledger(&path, 4);
    let target = Location {
        partition: 1,
        seq: 2,
    };
    edit_raw(&path, |tree| {
        edit_entry(tree, 1, 2, |bytes| {
            let len = bytes.len();
            bytes[len - 34] ^= 0x20;
        });
    });
    let store = Store::open_existing(&path).unwrap();
    // The documented trade-off: links before a snapshot's heads are not
    // re-verified by a replay from it.
    let (replayed, _) = replayed_verdicts(&store, ReplayFrom::LatestSnapshot);
    assert_eq!(replayed.snapshot, Some(3));
    assert_eq!(state_parts(&replayed.state), state_parts(&state));
    assert_corrupt_at(store.replay(|_, _| {}), target);
    assert_eq!(only_problem(&store.verify().unwrap()).seq, 2);
}

#[test]
fn snapshot_file_names_carry_the_batch_and_sort_by_it() {
    assert_eq!(
        snapshot_file_name(0x0102),
        "after-batch-00000000000000000258.snapshot"
    );
    assert!(snapshot_file_name(9) < snapshot_file_name(10));
    assert_eq!(parse_snapshot_file_name(&snapshot_file_name(77)), Some(77));
    assert_eq!(
        parse_snapshot_file_name(&snapshot_file_name(u64::MAX)),
        Some(u64::MAX)
    );
    for other in [
        ".after-batch-00000000000000000077.snapshot.partial",
        "after-batch-77.snapshot",
        "after-batch-0000000000000000007x.snapshot",
        "db",
    ] {
        assert_eq!(parse_snapshot_file_name(other), None, "{other}");
    }
}

#[test]
fn an_interrupted_snapshot_write_is_ignored_then_cleaned_up() {
    let (_tmp, path) = ledger_dir();
    let store = Store::open(&path, TOPIC).unwrap();
    let mut state = LedgerState::new(TOPIC);
    let mut feed = Feed::new(5);
    write_batches(&store, &mut state, &mut feed, 1, 20);
    store.write_snapshot(&state).unwrap().unwrap();
    let partial = path
        .join(SNAPSHOT_DIR_NAME)
        .join(format!(".{}.partial", snapshot_file_name(3)));
    fs::write(&partial, b"\x02cut short").unwrap();
    assert_eq!(store.snapshot_batches().unwrap(), vec![0]);
    write_batches(&store, &mut state, &mut feed, 1, 20);
    store.write_snapshot(&state).unwrap().unwrap();
    assert!(!partial.exists());
    assert_eq!(store.snapshot_batches().unwrap(), vec![0, 1]);
}
