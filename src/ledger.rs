//! The ledger's pure state machine: turns Kafka records into hash-chained
//! entries and verdicts, and keeps the derived state they imply.
//!
//! This is the functional core of ingestion and replay. It owns, in memory:
//! the chain head of every stream (one per Kafka partition), the set of
//! event identities seen so far (for duplicate detection) and the
//! [`DealBook`]. Given a batch of records it produces a [`BatchWrite`]: the
//! exact facts and derived data the storage shell must persist, atomically.
//! It performs no I/O; the one thing it cannot know by itself, where an
//! earlier event with the same identity was recorded, the shell supplies
//! through [`OriginalLookup`].
//!
//! Facts vs verdicts: every record becomes an entry, whatever its content.
//! The verdict (accepted, rejected with a reason, duplicate of an earlier
//! entry) is derived, kept beside the chain and never hashed into it.
//!
//! Ledger order: the order in which entries were applied across streams.
//! Within a stream it is offset order; across streams it is the order
//! records were consumed. Replay follows the stored ledger order, so it
//! reproduces ingest's verdicts exactly even when one deal's events (or one
//! event's duplicates) are spread over several partitions.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

use crate::chain::{AppendError, ChainHead, Entry, Record, StreamId};
use crate::deal::{AmendmentSet, DealBook};
use crate::event::{DealEvent, DecodeError, EventType, Id, Payload};
use crate::index::{DealIndex, Judged, SegmentStore};

/// Context string of the event-identity fingerprint (blake3 derive_key mode).
pub const IDENTITY_CONTEXT: &str = "dealledger 2026-11 event identity v1";

/// Most records in one batch: bounds the memory of a batch and the size of
/// one atomic storage write.
pub const MAX_BATCH_RECORDS: usize = 10_000;

/// Most value bytes in one batch.
pub const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Where an entry sits: its stream (partition) and sequence number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Location {
    /// Kafka partition = stream.
    pub partition: i32,
    /// Position in the stream's chain, from 0.
    pub seq: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "partition {} seq {}", self.partition, self.seq)
    }
}

/// The fold's judgement of one entry. Derived data: never hashed.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Decoded, new, and applied to its deal.
    Accepted,
    /// Not applied: undecodable, invalid, or refused by the fold.
    Rejected {
        /// Stable code: a [`crate::event::DecodeError::kind`], a
        /// [`crate::deal::Rejection::kind`], or `no_value`.
        kind: String,
        /// One line saying what was wrong and where.
        reason: String,
    },
    /// Same CloudEvents `source` and `id` as an earlier entry; not applied again.
    Duplicate {
        /// The entry that carried this identity first.
        of: Location,
    },
}

impl Verdict {
    /// `accepted`, `rejected` or `duplicate`.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Rejected { .. } => "rejected",
            Verdict::Duplicate { .. } => "duplicate",
        }
    }

    /// The reason, for rejected and duplicate entries.
    pub fn reason(&self) -> Option<String> {
        match self {
            Verdict::Accepted => None,
            Verdict::Rejected { reason, .. } => Some(reason.clone()),
            Verdict::Duplicate { of } => Some(format!(
                "duplicate: an event with the same source and id was recorded at {of}"
            )),
        }
    }

    /// The stable code of the reason (`duplicate` for duplicates).
    pub fn kind(&self) -> Option<&str> {
        match self {
            Verdict::Accepted => None,
            Verdict::Rejected { kind, .. } => Some(kind),
            Verdict::Duplicate { .. } => Some("duplicate"),
        }
    }
}

/// What happened to one record of a batch; for metrics and the dead-letter topic.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Where its entry is.
    pub location: Location,
    /// Its Kafka offset.
    pub offset: i64,
    /// The deal, when the event decoded.
    pub deal_id: Option<Id>,
    /// The event type, when the event decoded.
    pub event_type: Option<EventType>,
    /// The verdict.
    pub verdict: Verdict,
}

/// Everything one batch adds to storage. The shell must persist all of it in
/// one atomic write, or none of it.
#[derive(Debug)]
pub struct BatchWrite {
    /// Number of this batch; batches are numbered from 0 without gaps.
    pub batch_no: u64,
    /// New entries, in ledger order.
    pub entries: Vec<Entry>,
    /// One outcome per entry, same order.
    pub outcomes: Vec<Outcome>,
    /// Chain heads after the batch, for every stream the batch touched.
    pub heads: Vec<ChainHead>,
    /// Identity fingerprints of the batch's decodable, non-duplicate events.
    pub fingerprints: Vec<(u64, Location)>,
    /// Records skipped because their offset was already in the ledger.
    pub skipped_stale: u64,
}

/// Finds the event identity (`source`, `id`) of an earlier entry; implemented
/// by the storage shell. Used only when a fingerprint matches, to tell a true
/// duplicate from a (astronomically rare) 64-bit fingerprint collision.
pub trait OriginalLookup {
    /// The (`source`, `id`) of the event at `location`, if it decodes.
    fn identity(&self, location: Location) -> Option<(String, String)>;
}

/// The identity (`source`, `id`) of the event an entry carries, if it decodes.
pub fn identity_of(entry: &Entry) -> Option<(String, String)> {
    let event = DealEvent::decode(entry.record.value.as_deref()?).ok()?;
    Some((event.source, event.id))
}

/// A lookup for a ledger with no earlier entries (tests, fresh replays).
pub struct NoOriginals;

impl OriginalLookup for NoOriginals {
    fn identity(&self, _location: Location) -> Option<(String, String)> {
        None
    }
}

/// A batch could not be applied. This is a bug or a misuse by the caller
/// (records of another topic), never a property of the data.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A record is for another topic than this ledger's.
    #[error(
        "record at offset {offset} of partition {partition} is from topic {found:?}, but this ledger holds topic {expected:?}"
    )]
    WrongTopic {
        /// This ledger's topic.
        expected: String,
        /// The record's topic.
        found: String,
        /// The record's partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
    },
    /// The chain refused the record.
    #[error(transparent)]
    Append(#[from] AppendError),
}

/// Hasher for fingerprints, which are already uniformly distributed.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Fingerprint -> packed location of the first entry with that identity.
pub type FingerprintMap = HashMap<u64, u64, BuildHasherDefault<IdentityHasher>>;

/// The first I/O failure of a scratch file of the derived state: the
/// identity index ([`IdentityIndex`]) or the history segments
/// ([`crate::index::SegmentStore`]). After one, a lookup may have missed an
/// identity or a history lost items, so the state must not be stored or
/// trusted: the shell stops with this error.
#[derive(Debug)]
pub struct ScratchFailure {
    /// What was being done, e.g. `writing run 3 (65536 identities)`.
    pub action: String,
    /// The underlying error.
    pub error: std::io::Error,
}

impl fmt::Display for ScratchFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.action, self.error)
    }
}

/// Where a ledger keeps the first location of every event identity it has
/// seen, by fingerprint: the one part of the state that grows with every
/// event rather than with the deals. [`MemoryIdentities`] keeps it in a hash
/// map (tests, small replays); the storage shell's
/// [`crate::identities::SpilledIdentities`] keeps it in sorted files with a
/// filter in memory, so a long-running daemon's memory does not grow with
/// the number of events.
///
/// Lookups of an index on disk can fail; the index records the first
/// failure ([`IdentityIndex::failure`]) and the shell checks it before it
/// stores anything derived from the state, so the pure fold never sees an
/// I/O error.
pub trait IdentityIndex: Send + Sync {
    /// The first location recorded for fingerprint `fp`.
    fn get(&self, fp: u64) -> Option<Location>;
    /// Records `location` as the first of `fp`, which must be absent.
    fn insert(&mut self, fp: u64, location: Location);
    /// Number of fingerprints recorded.
    fn len(&self) -> usize;
    /// Whether no fingerprint is recorded.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Records every `(fingerprint, first location)` of `sorted`, whose
    /// fingerprints strictly increase, in this empty index.
    fn load_sorted(&mut self, sorted: Vec<(u64, Location)>) {
        assert!(
            self.is_empty(),
            "load_sorted into an index that is not empty"
        );
        for (fp, location) in sorted {
            self.insert(fp, location);
        }
    }
    /// Records the `(fingerprint, first location)`s that `next` gives,
    /// fingerprints strictly increasing, until it gives `None`, in this
    /// empty index (`count` of them expected: a hint), without holding
    /// them all at once (a snapshot's list, read as it is loaded). Returns
    /// how many it recorded.
    fn load_sorted_from(
        &mut self,
        count: usize,
        next: &mut dyn FnMut() -> Option<(u64, Location)>,
    ) -> usize {
        let _ = count;
        assert!(
            self.is_empty(),
            "load_sorted_from into an index that is not empty"
        );
        let mut loaded = 0;
        while let Some((fp, location)) = next() {
            self.insert(fp, location);
            loaded += 1;
        }
        loaded
    }
    /// Every `(fingerprint, first location)`, in increasing fingerprint order.
    fn sorted(&self) -> Box<dyn Iterator<Item = (u64, Location)> + '_>;
    /// The first I/O failure met, if any.
    fn failure(&self) -> Option<&ScratchFailure>;
}

/// An [`IdentityIndex`] in memory: a hash map of 2^k slots of 17 bytes
/// (34 MB at a million identities).
#[derive(Default)]
pub struct MemoryIdentities(FingerprintMap);

impl IdentityIndex for MemoryIdentities {
    fn get(&self, fp: u64) -> Option<Location> {
        self.0.get(&fp).map(|packed| unpack(*packed))
    }

    fn insert(&mut self, fp: u64, location: Location) {
        let earlier = self.0.insert(fp, pack(location));
        debug_assert!(earlier.is_none(), "fingerprint {fp:016x} inserted twice");
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn sorted(&self) -> Box<dyn Iterator<Item = (u64, Location)> + '_> {
        let mut all: Vec<(u64, u64)> = self.0.iter().map(|(fp, p)| (*fp, *p)).collect();
        all.sort_unstable();
        Box::new(all.into_iter().map(|(fp, packed)| (fp, unpack(packed))))
    }

    fn failure(&self) -> Option<&ScratchFailure> {
        None
    }
}

/// Packs a location into 64 bits: 16 bits of partition, 48 of sequence.
pub fn pack(location: Location) -> u64 {
    assert!(
        (0..=i32::from(u16::MAX)).contains(&location.partition),
        "partition {} outside the supported range 0..=65535",
        location.partition
    );
    assert!(
        location.seq < 1 << 48,
        "sequence {} beyond 2^48",
        location.seq
    );
    (u64::from(location.partition as u16) << 48) | location.seq
}

/// The location [`pack`] packed.
pub fn unpack(packed: u64) -> Location {
    Location {
        partition: i32::from((packed >> 48) as u16),
        seq: packed & ((1 << 48) - 1),
    }
}

/// The 64-bit fingerprint of an event identity (`source`, `id`).
pub fn identity_fingerprint(source: &str, id: &str) -> u64 {
    // Deriving the context key is a hash of its own: done once, the keyed
    // hasher's initial state cloned per event.
    static IDENTITY_HASHER: std::sync::OnceLock<blake3::Hasher> = std::sync::OnceLock::new();
    let mut h = IDENTITY_HASHER
        .get_or_init(|| blake3::Hasher::new_derive_key(IDENTITY_CONTEXT))
        .clone();
    h.update(&(source.len() as u64).to_be_bytes());
    h.update(source.as_bytes());
    h.update(&(id.len() as u64).to_be_bytes());
    h.update(id.as_bytes());
    let bytes = h.finalize();
    u64::from_be_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// A record's value decoded ahead of the fold, by [`decode_record`].
///
/// Decoding is pure and needs nothing from the state, so the shells run it on
/// another thread than the fold (ingest decodes the next batch while the
/// current one is folded; replay decodes entries as they are read). The fold
/// then only judges: [`LedgerState::apply_decoded_batch`],
/// [`LedgerState::replay_decoded`].
#[derive(Debug)]
pub enum Decoded {
    /// The record has no value (a tombstone).
    NoValue,
    /// The value is a valid deal event, with its identity's fingerprint
    /// ([`identity_fingerprint`] of its `source` and `id`).
    Event {
        /// The event.
        event: Box<DealEvent>,
        /// `identity_fingerprint(&event.source, &event.id)`.
        fingerprint: u64,
    },
    /// The value is not one: why.
    Invalid(DecodeError),
}

/// Decodes a record's value: the part of judging that does not depend on
/// the state.
pub fn decode_record(record: &Record) -> Decoded {
    match record.value.as_deref() {
        None => Decoded::NoValue,
        Some(value) => match DealEvent::decode(value) {
            Ok(event) => Decoded::Event {
                fingerprint: identity_fingerprint(&event.source, &event.id),
                event: Box::new(event),
            },
            Err(err) => Decoded::Invalid(err),
        },
    }
}

/// What judging a fresh batch keeps beside the state: the identities first
/// seen in this batch (not stored yet, so `originals` cannot name them) and
/// the fingerprints the batch record lists. Replays judge stored entries
/// and need neither.
struct InBatch<'a> {
    first_seen: &'a mut HashMap<u64, (Location, String, String)>,
    fingerprints: &'a mut Vec<(u64, Location)>,
}

/// The in-memory state of a ledger: chain heads, seen identities, deal book.
pub struct LedgerState {
    topic: String,
    heads: BTreeMap<i32, ChainHead>,
    /// First entry of every identity seen, by fingerprint.
    seen: Box<dyn IdentityIndex>,
    /// Identities whose fingerprint collided with an earlier, different one.
    collided: HashMap<(String, String), Location>,
    book: DealBook,
    /// Which entries stand behind each deal: for queries.
    index: DealIndex,
    /// Whether `index` is kept up to date ([`LedgerState::drop_query_index`]).
    keeps_index: bool,
    next_batch: u64,
    entries: u64,
}

impl LedgerState {
    /// An empty ledger of `topic`, keeping identities in memory.
    pub fn new(topic: impl Into<String>) -> Self {
        Self::with_identities(topic, Box::new(MemoryIdentities::default()))
    }

    /// An empty ledger of `topic` keeping identities in `identities`, which
    /// must be empty.
    pub fn with_identities(topic: impl Into<String>, identities: Box<dyn IdentityIndex>) -> Self {
        assert!(
            identities.is_empty(),
            "a new ledger state needs an empty identity index"
        );
        LedgerState {
            topic: topic.into(),
            heads: BTreeMap::new(),
            seen: identities,
            collided: HashMap::new(),
            book: DealBook::new(),
            index: DealIndex::new(),
            keeps_index: true,
            next_batch: 0,
            entries: 0,
        }
    }

    /// The topic this ledger holds.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The chain head of every stream seen so far.
    pub fn heads(&self) -> &BTreeMap<i32, ChainHead> {
        &self.heads
    }

    /// The next Kafka offset to read for `partition` (0 for a new stream).
    pub fn next_offset(&self, partition: i32) -> i64 {
        self.heads
            .get(&partition)
            .and_then(ChainHead::last_offset)
            .map_or(0, |o| o + 1)
    }

    /// The derived deal state.
    pub fn book(&self) -> &DealBook {
        &self.book
    }

    /// The query index: the entries behind each deal.
    pub fn index(&self) -> &DealIndex {
        &self.index
    }

    /// Empties the query index and stops keeping it, for a fold that only
    /// needs the deals (a replay that prints them): it saves about a fifth
    /// of a replay's CPU. The chain heads, identities, verdicts and deal
    /// book are judged exactly as before. Such a state answers no query and
    /// is never stored ([`crate::store::Store::write_snapshot`] refuses it).
    pub fn drop_query_index(&mut self) {
        self.index = DealIndex::new();
        self.keeps_index = false;
    }

    /// Whether the query index is kept (see [`LedgerState::drop_query_index`]).
    pub fn keeps_query_index(&self) -> bool {
        self.keeps_index
    }

    /// Records a judged entry in the query index, if it is kept.
    fn index_entry(
        &mut self,
        location: Location,
        hash: crate::chain::Hash,
        record_ms: i64,
        judged: Judged<'_>,
    ) {
        if self.keeps_index {
            self.index.record(location, hash, record_ms, judged);
        }
    }

    /// Number of the next batch.
    pub fn next_batch(&self) -> u64 {
        self.next_batch
    }

    /// Entries applied (ingested or replayed) so far.
    pub fn entry_count(&self) -> u64 {
        self.entries
    }

    /// Number of distinct event identities seen.
    pub fn identities(&self) -> usize {
        self.seen.len()
    }

    /// The first failure of the identity index, if it met one: the state
    /// may then have missed a duplicate and must be neither stored nor
    /// trusted.
    pub fn identity_failure(&self) -> Option<&ScratchFailure> {
        self.seen.failure()
    }

    /// Moves the book's amendment fingerprints to `set` (empty), where those
    /// to come go too ([`DealBook::keep_amendments_in`]).
    pub fn keep_amendments_in(&mut self, set: Box<dyn AmendmentSet>) {
        self.book.keep_amendments_in(set);
    }

    /// The first I/O failure of the set of amendment fingerprints, if any:
    /// a lookup since may have missed a reused amendment id.
    pub fn amendment_failure(&self) -> Option<&ScratchFailure> {
        self.book.amendments().failure()
    }

    /// Moves the index's history items and the book's ended locks and
    /// terminated deals to `store` from now on (see
    /// [`DealIndex::spill_history_to`], [`crate::deal::DealLocks`] and
    /// [`crate::deal::DealBook`]).
    pub fn spill_history_to(&mut self, store: std::sync::Arc<dyn SegmentStore>) {
        // A state restored from a snapshot may have stored them already.
        if !self.book.stores_ended() {
            self.book.store_ended_in(std::sync::Arc::clone(&store));
        }
        if !self.index.is_spilled() {
            self.index.spill_history_to(store);
        }
    }

    /// Applies a batch of freshly consumed records: appends each to its
    /// stream's chain, judges it, and returns what must be stored.
    ///
    /// The state is updated as if the write succeeded; if the shell cannot
    /// make the write durable it must not continue with this state (it exits
    /// and rebuilds from storage on restart).
    pub fn apply_batch(
        &mut self,
        records: Vec<Record>,
        originals: &dyn OriginalLookup,
    ) -> Result<BatchWrite, LedgerError> {
        let decoded = records
            .into_iter()
            .map(|record| {
                let decoded = decode_record(&record);
                (record, decoded)
            })
            .collect();
        self.apply_decoded_batch(decoded, originals)
    }

    /// [`LedgerState::apply_batch`] for records whose values were already
    /// decoded with [`decode_record`] (each pair must be a record and its
    /// own decoding: the fold trusts it).
    pub fn apply_decoded_batch(
        &mut self,
        records: Vec<(Record, Decoded)>,
        originals: &dyn OriginalLookup,
    ) -> Result<BatchWrite, LedgerError> {
        assert!(
            records.len() <= MAX_BATCH_RECORDS,
            "batch of {} records exceeds MAX_BATCH_RECORDS",
            records.len()
        );
        let mut write = BatchWrite {
            batch_no: self.next_batch,
            entries: Vec::with_capacity(records.len()),
            outcomes: Vec::with_capacity(records.len()),
            heads: Vec::new(),
            fingerprints: Vec::new(),
            skipped_stale: 0,
        };
        // Identities first recorded in this very batch: fingerprint -> locations.
        let mut in_batch: HashMap<u64, (Location, String, String)> = HashMap::new();
        let mut touched = BTreeMap::new();
        for (record, decoded) in records {
            if record.topic != self.topic {
                return Err(LedgerError::WrongTopic {
                    expected: self.topic.clone(),
                    found: record.topic,
                    partition: record.partition,
                    offset: record.offset,
                });
            }
            let partition = record.partition;
            let head = self.heads.entry(partition).or_insert_with(|| {
                ChainHead::genesis(StreamId::new(self.topic.clone(), partition))
            });
            if head.last_offset().is_some_and(|last| record.offset <= last) {
                write.skipped_stale += 1;
                continue;
            }
            let entry = head.append(record)?;
            touched.insert(partition, ());
            let outcome = self.judge(
                &entry,
                decoded,
                originals,
                Some(InBatch {
                    first_seen: &mut in_batch,
                    fingerprints: &mut write.fingerprints,
                }),
            );
            write.entries.push(entry);
            write.outcomes.push(outcome);
        }
        write.heads = touched.keys().map(|p| self.heads[p].clone()).collect();
        self.next_batch += 1;
        Ok(write)
    }

    /// Re-applies one stored entry during replay (entries come in ledger
    /// order). The chain link is checked by the caller's verifier; this
    /// advances the head and recomputes the verdict.
    pub fn replay_entry(&mut self, entry: &Entry, originals: &dyn OriginalLookup) -> Outcome {
        self.replay_decoded(entry, decode_record(&entry.record), originals)
    }

    /// [`LedgerState::replay_entry`] for an entry whose value was already
    /// decoded with [`decode_record`].
    pub fn replay_decoded(
        &mut self,
        entry: &Entry,
        decoded: Decoded,
        originals: &dyn OriginalLookup,
    ) -> Outcome {
        let partition = entry.record.partition;
        let head = self
            .heads
            .entry(partition)
            .or_insert_with(|| ChainHead::genesis(StreamId::new(self.topic.clone(), partition)));
        head.advance_verified(entry)
            .expect("replayed entries were appended once already; the caller verifies them");
        // Every earlier entry is stored: `originals` finds any identity.
        self.judge(entry, decoded, originals, None)
    }

    /// Marks the end of a replayed batch, so batch numbering continues.
    pub fn replayed_batch(&mut self) {
        self.next_batch += 1;
    }

    fn judge(
        &mut self,
        entry: &Entry,
        decoded: Decoded,
        originals: &dyn OriginalLookup,
        mut in_batch: Option<InBatch<'_>>,
    ) -> Outcome {
        let record = &entry.record;
        let hash = entry.hash;
        let location = Location {
            partition: record.partition,
            seq: entry.seq,
        };
        self.entries += 1;
        let mut outcome = Outcome {
            location,
            offset: record.offset,
            deal_id: None,
            event_type: None,
            verdict: Verdict::Accepted,
        };
        let (event, fp) = match decoded {
            Decoded::Event { event, fingerprint } => (event, fingerprint),
            Decoded::NoValue => {
                self.index_entry(
                    location,
                    hash,
                    record.timestamp_ms,
                    Judged::Undecodable("no_value"),
                );
                outcome.verdict = Verdict::Rejected {
                    kind: "no_value".into(),
                    reason: "record has no value (a tombstone); a deal event is a CloudEvents JSON document"
                        .into(),
                };
                return outcome;
            }
            Decoded::Invalid(err) => {
                self.index_entry(
                    location,
                    hash,
                    record.timestamp_ms,
                    Judged::Undecodable(err.kind()),
                );
                outcome.verdict = Verdict::Rejected {
                    kind: err.kind().into(),
                    reason: err.to_string(),
                };
                return outcome;
            }
        };
        outcome.event_type = Some(event.event_type());

        debug_assert_eq!(fp, identity_fingerprint(&event.source, &event.id));
        match self.seen.get(fp) {
            Some(first) => {
                let first_seen = in_batch.as_ref().map(|b| &*b.first_seen);
                if let Some(of) = self.find_original(fp, first, &event, originals, first_seen) {
                    self.index_entry(
                        location,
                        hash,
                        record.timestamp_ms,
                        Judged::Duplicate(&event),
                    );
                    outcome.verdict = Verdict::Duplicate { of };
                    outcome.deal_id = Some(event.deal_id);
                    return outcome;
                }
                // A different identity with the same fingerprint: keep it exactly.
                self.collided
                    .insert((event.source.clone(), event.id.clone()), location);
            }
            None => {
                self.seen.insert(fp, location);
                if let Some(batch) = in_batch.as_mut() {
                    batch
                        .first_seen
                        .insert(fp, (location, event.source.clone(), event.id.clone()));
                }
            }
        }
        if let Some(batch) = in_batch {
            batch.fingerprints.push((fp, location));
        }

        let ending = self.locks_it_may_end(&event);
        match self.book.apply(&event) {
            Ok(()) => {
                self.index_entry(
                    location,
                    hash,
                    record.timestamp_ms,
                    Judged::Accepted(&event),
                );
                self.forget_ended_locks(&event.deal_id, ending);
            }
            Err(rejection) => {
                self.index_entry(
                    location,
                    hash,
                    record.timestamp_ms,
                    Judged::Refused(&event, rejection.kind()),
                );
                outcome.verdict = Verdict::Rejected {
                    kind: rejection.kind().into(),
                    reason: rejection.to_string(),
                };
            }
        }
        // The event ends here: its deal id moves to the outcome.
        outcome.deal_id = Some(event.deal_id);
        outcome
    }

    /// The locks not ended yet that `event` ends if the fold accepts it,
    /// as they are before (the book may move ended locks out of memory;
    /// the index needs only their ids and times). Empty when the index is
    /// not kept.
    fn locks_it_may_end(&self, event: &DealEvent) -> Vec<crate::deal::Lock> {
        if !self.keeps_index {
            return Vec::new();
        }
        let Some(locks) = self.book.locks_of(&event.deal_id) else {
            return Vec::new();
        };
        match &event.payload {
            Payload::ExclusivityReleased(r) => locks
                .not_ended_get(&r.lock_id)
                .cloned()
                .into_iter()
                .collect(),
            Payload::Terminated(_) => locks.not_ended().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Tells the index which of `ending` (from [`Self::locks_it_may_end`])
    /// the event just accepted ended, and when.
    fn forget_ended_locks(&mut self, deal_id: &Id, ending: Vec<crate::deal::Lock>) {
        let Some(locks) = self.book.locks_of(deal_id) else {
            return;
        };
        for lock in ending {
            if let Some(at) = locks.ended_at(&lock.lock_id) {
                self.index.lock_ended(&lock, at);
            }
        }
    }

    /// The location of an earlier event with the same identity as `event`,
    /// whose fingerprint `fp` was first seen at `first`, if any.
    fn find_original(
        &self,
        fp: u64,
        first: Location,
        event: &DealEvent,
        originals: &dyn OriginalLookup,
        in_batch: Option<&HashMap<u64, (Location, String, String)>>,
    ) -> Option<Location> {
        let same = |source: &str, id: &str| source == event.source && id == event.id;
        let first_matches = match in_batch.and_then(|b| b.get(&fp)) {
            Some((loc, source, id)) if *loc == first => same(source, id),
            _ => originals
                .identity(first)
                .is_some_and(|(source, id)| same(&source, &id)),
        };
        if first_matches {
            return Some(first);
        }
        self.collided
            .get(&(event.source.clone(), event.id.clone()))
            .copied()
    }

    /// Judges one stored entry and folds it into the deal book *without*
    /// advancing its stream's chain head. For replays that fold only some
    /// entries (cut at a business or record time): the skipped entries
    /// would break the heads' hashes, so the caller verifies the chain
    /// separately. Entries come in ledger order, as for
    /// [`LedgerState::replay_entry`].
    pub fn judge_entry(&mut self, entry: &Entry, originals: &dyn OriginalLookup) -> Outcome {
        self.judge(entry, decode_record(&entry.record), originals, None)
    }

    // ---- snapshots: the state in plain parts, and back ---------------------

    /// The first location of every identity seen, in increasing fingerprint
    /// order. From an index on disk, an I/O failure ends it early and is
    /// then [`LedgerState::identity_failure`].
    pub fn fingerprints(&self) -> impl Iterator<Item = (u64, Location)> + '_ {
        self.seen.sorted()
    }

    /// Identities (`source`, `id`) whose fingerprint collided with an earlier,
    /// different identity, with the location that carried them first.
    pub fn collided(&self) -> impl Iterator<Item = (&(String, String), Location)> + '_ {
        self.collided.iter().map(|(identity, l)| (identity, *l))
    }

    /// Rebuilds a state from its parts (as [`LedgerState::heads`],
    /// [`LedgerState::collided`], ... give them), checking that they fit
    /// together, with its identities in `identities` and its amendment
    /// fingerprints in `amendment_set`, both loaded already (a snapshot
    /// reader loads them as it reads, checking each as [`check_fingerprint`]
    /// does; the book checks the amendments' count). The parts come from
    /// storage, so nothing here panics on bad input.
    pub fn restore(
        parts: LedgerParts,
        identities: Box<dyn IdentityIndex>,
        amendment_set: Box<dyn AmendmentSet>,
    ) -> Result<LedgerState, RestoreError> {
        let LedgerParts {
            topic,
            heads,
            collided,
            mut book,
            index,
            next_batch,
            entries,
        } = parts;
        // `with_identities` takes an empty index; this one holds the
        // snapshot's identities already.
        let mut state = LedgerState::with_identities(topic, Box::new(MemoryIdentities::default()));
        state.seen = identities;
        let mut chained = 0u64;
        for head in heads {
            let stream = head.stream();
            if stream.topic != state.topic {
                return Err(RestoreError(format!(
                    "head of stream {stream} is not of topic {:?}",
                    state.topic
                )));
            }
            if !(0..=i32::from(u16::MAX)).contains(&stream.partition) {
                return Err(RestoreError(format!(
                    "head of stream {stream}: partition outside the supported range 0..=65535"
                )));
            }
            chained = chained.saturating_add(head.next_seq());
            let partition = stream.partition;
            if state.heads.insert(partition, head).is_some() {
                return Err(RestoreError(format!("partition {partition} has two heads")));
            }
        }
        if chained != entries {
            return Err(RestoreError(format!(
                "the heads hold {chained} entries, but the entry count is {entries}"
            )));
        }
        for (identity, location) in collided {
            if !is_entry(&state.heads, location) {
                return Err(RestoreError(format!(
                    "collided identity {identity:?} points at {location}, which is not an entry"
                )));
            }
            state.collided.insert(identity, location);
        }
        book.keep_amendments_in_loaded(amendment_set)
            .map_err(RestoreError)?;
        state.book = book;
        state.index = index;
        state.index.rebuild_lock_tables(&state.book);
        state.next_batch = next_batch;
        state.entries = entries;
        Ok(state)
    }
}

/// Checks one fingerprint of a state's list against the state's `heads`
/// and the fingerprint before it in the list, if any: it must point at an
/// entry, and the list must strictly increase.
pub fn check_fingerprint(
    heads: &BTreeMap<i32, ChainHead>,
    previous: Option<u64>,
    fp: u64,
    location: Location,
) -> Result<(), RestoreError> {
    if !is_entry(heads, location) {
        return Err(RestoreError(format!(
            "fingerprint {fp:016x} points at {location}, which is not an entry"
        )));
    }
    if previous.is_some_and(|p| p >= fp) {
        return Err(RestoreError(format!(
            "fingerprint {fp:016x} is listed out of order or twice"
        )));
    }
    Ok(())
}

/// Whether `location` is an entry of the chains whose `heads` these are.
fn is_entry(heads: &BTreeMap<i32, ChainHead>, location: Location) -> bool {
    heads
        .get(&location.partition)
        .is_some_and(|h| location.seq < h.next_seq())
}

/// A [`LedgerState`] taken apart, but for its identity and amendment
/// fingerprints: what a snapshot stores besides them, and what
/// [`LedgerState::restore`] takes with them.
#[derive(Debug)]
pub struct LedgerParts {
    /// The topic.
    pub topic: String,
    /// The chain head of every stream, at most one per partition.
    pub heads: Vec<ChainHead>,
    /// Identities whose fingerprint collided, with their first location.
    pub collided: Vec<((String, String), Location)>,
    /// The deal book (its amendment fingerprints are given to
    /// [`LedgerState::restore`] in their set, as the identities are).
    pub book: DealBook,
    /// The query index.
    pub index: DealIndex,
    /// Number of the next batch.
    pub next_batch: u64,
    /// Entries applied so far (the sum of the heads' next seqs).
    pub entries: u64,
}

/// The parts given to [`LedgerState::restore`] do not fit together; says how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inconsistent ledger state: {0}")]
pub struct RestoreError(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::TimestampType;

    #[test]
    fn a_listed_fingerprint_points_at_an_entry_and_follows_the_one_before() {
        let mut head = ChainHead::genesis(StreamId::new("deal-events", 2));
        for offset in 0..3 {
            head.append(record(2, offset, b"{}")).unwrap();
        }
        let heads = BTreeMap::from([(2, head)]);
        let at = |partition, seq| Location { partition, seq };
        assert!(check_fingerprint(&heads, None, 5, at(2, 2)).is_ok());
        assert!(check_fingerprint(&heads, Some(4), 5, at(2, 0)).is_ok());
        let err = check_fingerprint(&heads, None, 5, at(2, 3)).unwrap_err();
        assert!(err.0.contains("which is not an entry"), "{err}");
        let err = check_fingerprint(&heads, None, 5, at(1, 0)).unwrap_err();
        assert!(err.0.contains("which is not an entry"), "{err}");
        for previous in [5, 6] {
            let err = check_fingerprint(&heads, Some(previous), 5, at(2, 0)).unwrap_err();
            assert!(err.0.contains("out of order or twice"), "{err}");
        }
    }

    fn record(partition: i32, offset: i64, value: &[u8]) -> Record {
        Record {
            topic: "deal-events".into(),
            partition,
            offset,
            timestamp_type: TimestampType::CreateTime,
            timestamp_ms: 1_700_000_000_000 + offset,
            key: Some(b"deal-1".to_vec()),
            value: Some(value.to_vec()),
            headers: Vec::new(),
        }
    }

    fn opened(id: &str) -> Vec<u8> {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"urn:t","type":"deal.negotiation.opened","subject":"deal-1","time":"2025-01-01T00:00:00Z","data":{{"customer":"a","provider":"b","scope":"cloud-compute"}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn every_record_becomes_an_entry_with_a_verdict() {
        let mut state = LedgerState::new("deal-events");
        let batch = state
            .apply_batch(
                vec![
                    record(0, 0, &opened("e1")),
                    record(0, 1, b"\xff not utf-8"),
                    record(0, 2, &opened("e1")),
                    record(0, 5, &opened("e2")),
                ],
                &NoOriginals,
            )
            .unwrap();
        assert_eq!(batch.entries.len(), 4);
        let kinds: Vec<Option<&str>> = batch.outcomes.iter().map(|o| o.verdict.kind()).collect();
        assert_eq!(
            kinds,
            vec![
                None,
                Some("not_utf8"),
                Some("duplicate"),
                Some("already_opened")
            ]
        );
        assert_eq!(
            batch.outcomes[2].verdict,
            Verdict::Duplicate {
                of: Location {
                    partition: 0,
                    seq: 0
                }
            }
        );
        assert_eq!(batch.heads.len(), 1);
        assert_eq!(batch.heads[0].next_seq(), 4);
        assert_eq!(state.next_offset(0), 6);
        assert_eq!(state.book().len(), 1);
    }

    #[test]
    fn stale_records_are_skipped_not_chained() {
        let mut state = LedgerState::new("deal-events");
        state
            .apply_batch(vec![record(1, 0, &opened("e1"))], &NoOriginals)
            .unwrap();
        let again = state
            .apply_batch(
                vec![record(1, 0, &opened("e1")), record(1, 1, b"x")],
                &NoOriginals,
            )
            .unwrap();
        assert_eq!(again.skipped_stale, 1);
        assert_eq!(again.entries.len(), 1);
        assert_eq!(again.entries[0].seq, 1);
        assert_eq!(again.batch_no, 1);
    }

    #[test]
    fn other_topics_are_refused() {
        let mut state = LedgerState::new("deal-events");
        let mut r = record(0, 0, b"{}");
        r.topic = "other".into();
        assert!(matches!(
            state.apply_batch(vec![r], &NoOriginals),
            Err(LedgerError::WrongTopic { .. })
        ));
    }

    #[test]
    fn replay_reproduces_ingest_verdicts_and_heads() {
        let mut ingest = LedgerState::new("deal-events");
        let records: Vec<Record> = (0..6)
            .map(|i| record(i % 2, i64::from(i / 2), &opened(&format!("e{}", i % 3))))
            .collect();
        let batch = ingest.apply_batch(records, &NoOriginals).unwrap();
        struct Stored<'a>(&'a [Entry]);
        impl OriginalLookup for Stored<'_> {
            fn identity(&self, location: Location) -> Option<(String, String)> {
                let entry = self
                    .0
                    .iter()
                    .find(|e| e.record.partition == location.partition && e.seq == location.seq)?;
                identity_of(entry)
            }
        }
        let mut replay = LedgerState::new("deal-events");
        let outcomes: Vec<Verdict> = batch
            .entries
            .iter()
            .map(|e| replay.replay_entry(e, &Stored(&batch.entries)).verdict)
            .collect();
        let ingested: Vec<Verdict> = batch.outcomes.iter().map(|o| o.verdict.clone()).collect();
        assert_eq!(outcomes, ingested);
        assert!(
            ingested
                .iter()
                .filter(|v| v.kind() == Some("duplicate"))
                .count()
                == 3
        );
        let heads = |s: &LedgerState| -> Vec<(i32, String)> {
            s.heads()
                .iter()
                .map(|(p, h)| (*p, h.head().to_string()))
                .collect()
        };
        assert_eq!(heads(&replay), heads(&ingest));
    }

    #[test]
    fn a_state_without_query_index_judges_the_same() {
        // Generated events, with repeats (duplicates), garbage and events
        // the fold refuses, in batches over three partitions.
        let mut records = Vec::new();
        let events: Vec<Vec<u8>> = crate::generate::Generator::new(40, 3)
            .take(3_000)
            .map(|e| e.to_json())
            .collect();
        for (i, value) in events.iter().enumerate() {
            let value = match i % 97 {
                13 => b"{not json".to_vec(),
                29 => events[i / 2].clone(),
                41 => opened(&format!("again-{i}")),
                _ => value.clone(),
            };
            let partition = (i % 3) as i32;
            records.push(record(partition, (i / 3) as i64, &value));
        }
        let mut full = LedgerState::new("deal-events");
        let mut deals_only = LedgerState::new("deal-events");
        deals_only.drop_query_index();
        assert!(full.keeps_query_index() && !deals_only.keeps_query_index());
        let mut kinds = std::collections::BTreeSet::new();
        for batch in records.chunks(250) {
            let a = full.apply_batch(batch.to_vec(), &NoOriginals).unwrap();
            let b = deals_only
                .apply_batch(batch.to_vec(), &NoOriginals)
                .unwrap();
            let verdicts = |w: &BatchWrite| -> Vec<Verdict> {
                w.outcomes.iter().map(|o| o.verdict.clone()).collect()
            };
            assert_eq!(verdicts(&a), verdicts(&b));
            assert_eq!(a.heads, b.heads);
            kinds.extend(
                a.outcomes
                    .iter()
                    .map(|o| o.verdict.kind().map(str::to_string)),
            );
        }
        // Every kind of verdict was met: accepted, duplicate, undecodable, refused.
        assert!(kinds.contains(&None) && kinds.contains(&Some("duplicate".to_string())));
        assert!(kinds.contains(&Some("not_json".to_string())), "{kinds:?}");
        assert!(kinds.len() >= 4, "{kinds:?}");
        assert_eq!(
            serde_json::to_string(full.book()).unwrap(),
            serde_json::to_string(deals_only.book()).unwrap()
        );
        assert!(!full.index().is_empty());
        assert!(deals_only.index().is_empty());
    }

    #[test]
    fn fingerprints_are_blake3_derive_key_of_the_identity() {
        // The rule docs/FORMAT.md states for batch records (stored, exported).
        for (source, id) in [
            ("urn:a", "e1"),
            ("", ""),
            ("urn:generator", "gen-42-000000000017"),
        ] {
            let mut material = Vec::new();
            material.extend_from_slice(&(source.len() as u64).to_be_bytes());
            material.extend_from_slice(source.as_bytes());
            material.extend_from_slice(&(id.len() as u64).to_be_bytes());
            material.extend_from_slice(id.as_bytes());
            let full = blake3::derive_key(IDENTITY_CONTEXT, &material);
            let expected = u64::from_be_bytes(full[..8].try_into().unwrap());
            assert_eq!(
                identity_fingerprint(source, id),
                expected,
                "{source:?} {id:?}"
            );
        }
    }

    #[test]
    fn fingerprints_separate_source_and_id() {
        assert_ne!(
            identity_fingerprint("ab", "c"),
            identity_fingerprint("a", "bc")
        );
        assert_eq!(
            identity_fingerprint("s", "1"),
            identity_fingerprint("s", "1")
        );
    }
}
