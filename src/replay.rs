//! Replay: the state of every deal, rebuilt by folding the ledger, as of any
//! business time and as known at any record time.
//!
//! Why this module exists: the ingester keeps only the *current* state, in
//! memory. Auditors and operators also ask "what did this deal look like on
//! 15 January?" and "what did we know at noon?". Both are answered from the
//! ledger alone, by folding its entries again in *ledger order* (the order
//! stored in the batch records, so verdicts equal ingest's) with the same
//! pure state machine ingest uses ([`crate::ledger::LedgerState`]), verifying
//! the chain links on the way ([`crate::store::Store::replay_with`],
//! [`crate::store::Store::walk_entries`]; a break is an error naming its
//! stream, seq and offset).
//!
//! Two clocks ([`Cut`]):
//! - **business time** (`--as-of T`): only entries whose CloudEvents `time`
//!   is at or before `T` are folded; later ones have not happened yet;
//! - **record time** (`--recorded-as-of R`): only entries whose Kafka record
//!   timestamp is at or before `R` are folded: what the ledger knew at `R`.
//!
//! Together they answer "what did we know at R about the world at T". An
//! entry outside the cut is verified but not folded, as if it were absent,
//! so a cut replay's verdicts may differ from ingest's (a duplicate whose
//! original is cut becomes the first of its identity; an event whose
//! prerequisite is cut is refused): that is the point. Entries that do not
//! decode have no business time; they are folded (and refused) whenever
//! their record time is inside the cut.
//!
//! Where folding starts: an uncut replay starts from the latest usable
//! snapshot; the entries after it are verified and folded, and the snapshot
//! is tied to the chain (each stream's entry at the snapshot's head must be
//! stored, hash correctly and be that head), but the links before the
//! snapshot are not re-verified: that is what makes it fast (reading and
//! hashing a million entries takes about a second on 2 cores). `--from-genesis` ignores
//! snapshots and verifies and folds every entry. A cut replay always starts
//! from genesis (and so verifies every link), because a snapshot holds the
//! fold of *every* entry up to its batch: entries are not in business-time
//! order (nor, across producers, in record-time order), so a snapshot may
//! already include events after the cut, and a fold cannot take an event
//! back out.
//!
//! Memory is proportional to the number of deals (the deal book), plus the
//! identity fingerprints the ledger keeps to recognise duplicates: 16 bytes
//! per distinct event (a 64-bit fingerprint and a packed location, plus hash
//! table overhead). The ledger itself is never collected: entries are
//! streamed from sled one at a time.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chain::Entry;
use crate::deal::{Deal, DealBook, Lock, Status};
use crate::event::{Date, Id, LockKind, Terms, Timestamp};
use crate::ledger::{LedgerState, Outcome, Verdict};
use crate::store::{QueryIndex, ReplayFrom, Store, StoreError};

/// Describes the accepted forms of a TIME argument; used in messages.
pub const TIME_RULE: &str = "an RFC 3339 timestamp such as 2025-01-15T09:30:00Z, or a date such as 2025-01-15 (the start of that day, UTC)";

/// Parses a TIME argument: strict RFC 3339 ([`Timestamp::parse`]), or a plain
/// date `YYYY-MM-DD`, meaning the start of that day in UTC.
pub fn parse_time(s: &str) -> Result<Timestamp, String> {
    if s.len() == 10 {
        return Date::parse(s)
            .map(|d| d.start())
            .map_err(|e| format!("{e}; expected {TIME_RULE}"));
    }
    Timestamp::parse(s).map_err(|e| format!("{e}; expected {TIME_RULE}"))
}

/// Which entries a replay folds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cut {
    /// Fold only events whose business `time` is at or before this.
    pub as_of: Option<Timestamp>,
    /// Fold only entries whose Kafka record timestamp is at or before this.
    pub recorded_as_of: Option<Timestamp>,
}

impl Cut {
    /// Whether the cut folds everything.
    pub fn is_none(&self) -> bool {
        self.as_of.is_none() && self.recorded_as_of.is_none()
    }

    /// Whether `entry` is inside the cut.
    pub fn includes(&self, entry: &Entry) -> bool {
        if let Some(r) = self.recorded_as_of
            && entry.record.timestamp_ms > r.unix_millis()
        {
            return false;
        }
        match self.as_of {
            None => true,
            Some(t) => business_time(entry).is_none_or(|time| time <= t),
        }
    }
}

/// The CloudEvents `time` of an entry's event, read without decoding the
/// whole event (the fold decodes it once, fully); `None` when the value is
/// absent, not JSON or has no valid `time`.
fn business_time(entry: &Entry) -> Option<Timestamp> {
    #[derive(Deserialize)]
    struct TimeOnly<'a> {
        #[serde(borrow)]
        time: Option<Cow<'a, str>>,
    }
    let value = entry.record.value.as_deref()?;
    let parsed: TimeOnly<'_> = serde_json::from_slice(value).ok()?;
    Timestamp::parse(&parsed.time?).ok()
}

/// How to replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Which entries to fold.
    pub cut: Cut,
    /// Ignore snapshots: fold every entry again (only matters without a cut).
    pub from_genesis: bool,
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The ledger could not be read, or is damaged (a broken chain names its
    /// stream, seq and offset).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Verdict counts of the entries a replay folded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VerdictCounts {
    /// Decoded, new and applied.
    pub accepted: u64,
    /// Undecodable, invalid or refused by the fold.
    pub rejected: u64,
    /// A second entry of an identity.
    pub duplicate: u64,
}

impl VerdictCounts {
    fn add(&mut self, verdict: &Verdict) {
        match verdict {
            Verdict::Accepted => self.accepted += 1,
            Verdict::Rejected { .. } => self.rejected += 1,
            Verdict::Duplicate { .. } => self.duplicate += 1,
        }
    }
}

/// One stream's verified head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamSummary {
    /// The Kafka partition.
    pub partition: i32,
    /// Its number of entries.
    pub entries: u64,
    /// The hash of its last entry (the genesis hash of an empty stream).
    pub head_hash: String,
}

/// The result of a replay.
pub struct Replay {
    /// The ledger's topic.
    pub topic: String,
    /// The cut applied.
    pub cut: Cut,
    /// Entries verified: every entry of the ledger.
    pub entries: u64,
    /// Entries inside the cut, folded (all of them without a cut).
    pub folded: u64,
    /// The folded entries' verdicts.
    pub verdicts: VerdictCounts,
    /// Every stream's verified head.
    pub streams: Vec<StreamSummary>,
    /// The batch after which the snapshot that folding started from was
    /// taken; `None` from genesis.
    pub snapshot: Option<u64>,
    /// The folded state (its chain heads are meaningless after a cut).
    state: LedgerState,
}

/// Replays `store` (see the module documentation). `progress` is called
/// now and then, possibly from several threads, with the number of entries
/// verified since its last call.
pub fn replay(
    store: &Store,
    options: &ReplayOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<Replay, ReplayError> {
    let cut = options.cut;
    let mut verdicts = VerdictCounts::default();
    let mut folded = 0u64;
    let mut first_folded: BTreeMap<i32, u64> = BTreeMap::new();
    let (state, snapshot) = if cut.is_none() {
        let from = if options.from_genesis {
            ReplayFrom::Genesis
        } else {
            ReplayFrom::LatestSnapshot
        };
        // The deals are printed; the query index would be built for nothing.
        let replayed = store.replay_with(
            from,
            QueryIndex::Dropped,
            progress,
            |entry, outcome: &Outcome| {
                first_folded
                    .entry(entry.record.partition)
                    .or_insert(entry.seq);
                folded += 1;
                verdicts.add(&outcome.verdict);
            },
        )?;
        (replayed.state, replayed.snapshot)
    } else {
        let mut state = store.new_state_with(QueryIndex::Dropped)?;
        store.walk_entries(progress, |entry| {
            if cut.includes(entry) {
                folded += 1;
                verdicts.add(&state.judge_entry(entry, store).verdict);
            }
        })?;
        store.check_derived(&state)?;
        (state, None)
    };
    let heads = store.heads()?;
    let entries: u64 = heads.iter().map(|h| h.next_seq()).sum();
    if snapshot.is_some() {
        // The entries the snapshot covers were not folded again: count their
        // verdicts as stored (absence of a `V` key means accepted).
        let boundary = |partition: i32| {
            first_folded.get(&partition).copied().unwrap_or_else(|| {
                heads
                    .iter()
                    .find(|h| h.stream().partition == partition)
                    .map_or(0, |h| h.next_seq())
            })
        };
        let covered: u64 = heads.iter().map(|h| boundary(h.stream().partition)).sum();
        let mut not_accepted = 0u64;
        for item in store.verdicts() {
            let (location, verdict) = item?;
            if location.seq < boundary(location.partition) {
                not_accepted += 1;
                verdicts.add(&verdict);
            }
        }
        verdicts.accepted += covered.saturating_sub(not_accepted);
        folded += covered;
    }
    let streams = heads
        .iter()
        .map(|h| StreamSummary {
            partition: h.stream().partition,
            entries: h.next_seq(),
            head_hash: h.head().to_string(),
        })
        .collect();
    Ok(Replay {
        topic: store.topic().to_owned(),
        cut,
        entries,
        folded,
        verdicts,
        streams,
        snapshot,
        state,
    })
}

// ---------------------------------------------------------------------------
// What a replay shows of a deal
// ---------------------------------------------------------------------------

/// The parties of a deal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartiesView {
    /// The party buying capacity.
    pub customer: Id,
    /// The party selling it.
    pub provider: Id,
    /// Further parties.
    pub partners: Vec<Id>,
}

impl PartiesView {
    /// The parties of `deal`.
    pub fn of(deal: &Deal) -> Self {
        PartiesView {
            customer: deal.customer.clone(),
            provider: deal.provider.clone(),
            partners: deal.partners.clone(),
        }
    }
}

/// An exclusivity lock in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockView {
    /// The lock's id, unique within its deal.
    pub lock_id: Id,
    /// The party holding it.
    pub holder: Id,
    /// The party it binds.
    pub bound_party: Id,
    /// What it covers.
    pub scope: Id,
    /// Exclusive or right of first refusal.
    pub kind: LockKind,
    /// Start of validity.
    pub since: Timestamp,
    /// End of validity, if fixed.
    pub until: Option<Timestamp>,
}

/// The last event folded into a deal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastEvent {
    /// Its CloudEvents type.
    #[serde(rename = "type")]
    pub event_type: &'static str,
    /// Its business time.
    pub time: Timestamp,
}

/// One deal as a replay shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DealView {
    /// The deal's id.
    pub id: Id,
    /// Where it is in its lifecycle.
    pub status: Status,
    /// What it is about.
    pub scope: Id,
    /// Who is party to it.
    pub parties: PartiesView,
    /// The terms in force: the accepted proposal's, then the signed one's,
    /// then the latest amendment's; `null` while negotiating.
    pub terms: Option<Terms>,
    /// The locks in force: at the `--as-of` time, or, without one, those
    /// not released and whose deal is not terminated.
    pub active_locks: Vec<LockView>,
    /// Events folded into the deal.
    pub event_count: u64,
    /// The last of them.
    pub last_event: LastEvent,
}

impl DealView {
    /// The view of `deal`, its locks evaluated at `as_of` (see
    /// [`DealView::active_locks`]).
    pub fn of(deal: &Deal, as_of: Option<Timestamp>) -> DealView {
        let active: Vec<std::borrow::Cow<'_, Lock>> = match as_of {
            Some(t) => deal
                .locks
                .entries()
                .filter(|entry| entry.active_at(t))
                .filter_map(|entry| entry.load())
                .collect(),
            None => deal
                .locks
                .not_ended()
                .map(std::borrow::Cow::Borrowed)
                .collect(),
        };
        DealView {
            id: deal.id.clone(),
            status: deal.status,
            scope: deal.scope.clone(),
            parties: PartiesView::of(deal),
            terms: deal.current_terms.clone(),
            active_locks: active
                .iter()
                .map(|l| LockView {
                    lock_id: l.lock_id.clone(),
                    holder: l.holder.clone(),
                    bound_party: l.bound_party.clone(),
                    scope: l.scope.clone(),
                    kind: l.kind,
                    since: l.valid_from,
                    until: l.valid_until,
                })
                .collect(),
            event_count: deal.event_count,
            last_event: LastEvent {
                event_type: deal.last_event_type.as_str(),
                time: deal.last_event_at,
            },
        }
    }
}

/// The `--json` document of a replay; its shape is documented in README.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayDocument {
    /// The ledger's topic.
    pub topic: String,
    /// The business-time cut, if any.
    pub as_of: Option<Timestamp>,
    /// The record-time cut, if any.
    pub recorded_as_of: Option<Timestamp>,
    /// Entries verified (the whole ledger).
    pub entries: u64,
    /// Entries inside the cut.
    pub folded: u64,
    /// Their verdicts.
    pub verdicts: VerdictCounts,
    /// Every stream's verified head.
    pub streams: Vec<StreamSummary>,
    /// The deals, in id order (only the one asked for with `--deal`).
    pub deals: Vec<DealView>,
}

impl Replay {
    /// The deal state.
    pub fn book(&self) -> &DealBook {
        self.state.book()
    }

    /// The view of deal `id`, if the replay has it.
    pub fn deal(&self, id: &Id) -> Option<DealView> {
        self.book()
            .get(id)
            .map(|d| DealView::of(&d, self.cut.as_of))
    }

    /// The document of this replay with `deals`.
    pub fn document(&self, deals: Vec<DealView>) -> ReplayDocument {
        ReplayDocument {
            topic: self.topic.clone(),
            as_of: self.cut.as_of,
            recorded_as_of: self.cut.recorded_as_of,
            entries: self.entries,
            folded: self.folded,
            verdicts: self.verdicts,
            streams: self.streams.clone(),
            deals,
        }
    }

    /// Every deal's view, in id order.
    pub fn deals(&self) -> Vec<DealView> {
        self.book()
            .iter()
            .map(|(_, d)| DealView::of(&d, self.cut.as_of))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;
    use crate::chain::{Record, TimestampType};
    use crate::generate::Generator;
    use crate::ledger::{BatchWrite, Location};

    const TOPIC: &str = "deal-events";
    const PARTITIONS: usize = 3;
    /// Record timestamps: the n-th record of a feed is stamped `RECORDED_AT + n` ms.
    const RECORDED_AT: i64 = 1_795_000_000_000;

    fn record(partition: usize, offset: i64, n: usize, value: Option<Vec<u8>>) -> Record {
        Record {
            topic: TOPIC.into(),
            partition: partition as i32,
            offset,
            timestamp_type: TimestampType::CreateTime,
            timestamp_ms: RECORDED_AT + n as i64,
            key: Some(b"k".to_vec()),
            value,
            headers: Vec::new(),
        }
    }

    /// Record values with their partition; `None` is a tombstone.
    type Values = Vec<(usize, Option<Vec<u8>>)>;

    /// A random ledger's generator seed and deal count, its items with their
    /// partition, and its batch sizes, each with whether to snapshot after it.
    type LedgerPlan = (u64, usize, Vec<(Item, usize)>, Vec<(usize, bool)>);

    /// Writes `batches` of values (partition, value) to a new ledger at
    /// `path`, numbering offsets per partition; snapshots after the batches
    /// whose flag is set. Returns what ingest wrote.
    fn write_ledger(path: &Path, batches: &[(Values, bool)]) -> (LedgerState, Vec<BatchWrite>) {
        let store = Store::open(path, TOPIC).unwrap();
        let mut state = LedgerState::new(TOPIC);
        let mut next_offset = [0i64; PARTITIONS];
        let mut n = 0;
        let mut written = Vec::new();
        for (values, snapshot) in batches {
            let records = values
                .iter()
                .map(|(p, value)| {
                    let offset = next_offset[*p];
                    next_offset[*p] += 1 + (n % 3) as i64;
                    n += 1;
                    record(*p, offset, n - 1, value.clone())
                })
                .collect();
            let batch = state.apply_batch(records, &store).unwrap();
            store.write_batch(&batch).unwrap();
            written.push(batch);
            if *snapshot {
                store.write_snapshot(&state).unwrap();
            }
        }
        (state, written)
    }

    /// A CloudEvent JSON document.
    fn event(id: &str, deal: &str, event_type: &str, time: &str, data: &str) -> Vec<u8> {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"urn:t","type":"deal.{event_type}","subject":"{deal}","time":"{time}","data":{data}}}"#
        )
        .into_bytes()
    }

    fn opened(id: &str, deal: &str, time: &str) -> Vec<u8> {
        event(
            id,
            deal,
            "negotiation.opened",
            time,
            r#"{"customer":"openai","provider":"microsoft","scope":"cloud-compute"}"#,
        )
    }

    fn proposed(id: &str, deal: &str, time: &str) -> Vec<u8> {
        event(
            id,
            deal,
            "terms.proposed",
            time,
            r#"{"proposal_id":"p1","proposer":"openai","terms":{"capacity":{"quantity":10,"unit":"gpus"},"price":{"amount_minor":500,"currency":"USD"},"start":"2025-03-01T00:00:00Z","end":"2026-03-01T00:00:00Z"}}"#,
        )
    }

    fn accepted(id: &str, deal: &str, time: &str) -> Vec<u8> {
        event(
            id,
            deal,
            "terms.accepted",
            time,
            r#"{"proposal_id":"p1","accepted_by":"microsoft"}"#,
        )
    }

    fn granted(id: &str, deal: &str, time: &str) -> Vec<u8> {
        event(
            id,
            deal,
            "exclusivity.granted",
            time,
            r#"{"lock_id":"l1","holder":"microsoft","bound_party":"openai","scope":"cloud-compute","kind":"exclusive","valid_from":"2025-01-02T00:00:00Z"}"#,
        )
    }

    fn released(id: &str, deal: &str, time: &str) -> Vec<u8> {
        event(
            id,
            deal,
            "exclusivity.released",
            time,
            r#"{"lock_id":"l1","reason":"over"}"#,
        )
    }

    fn at(s: &str) -> Timestamp {
        parse_time(s).unwrap()
    }

    fn cut_replay(store: &Store, as_of: Option<&str>, recorded_as_of: Option<i64>) -> Replay {
        let options = ReplayOptions {
            cut: Cut {
                as_of: as_of.map(at),
                recorded_as_of: recorded_as_of
                    .map(|n| Timestamp::from_unix_millis(RECORDED_AT + n).unwrap()),
            },
            from_genesis: false,
        };
        replay(store, &options, None).unwrap()
    }

    #[test]
    fn times_are_rfc3339_or_the_start_of_a_utc_day() {
        assert_eq!(at("2025-01-15").to_string(), "2025-01-15T00:00:00Z");
        assert_eq!(
            at("2025-01-15T10:00:00+02:00").to_string(),
            "2025-01-15T08:00:00Z"
        );
        for bad in [
            "2025-1-15",
            "2025-02-30",
            "2025-01-15 10:00",
            "yesterday",
            "",
        ] {
            let err = parse_time(bad).unwrap_err();
            assert!(err.contains("or a date such as 2025-01-15"), "{bad}: {err}");
        }
    }

    #[test]
    fn business_time_cuts_fold_only_what_had_happened() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ledger");
        let d = "deal-1";
        write_ledger(
            &path,
            &[
                (
                    vec![
                        (0, Some(opened("e1", d, "2025-01-01T00:00:00Z"))),
                        (0, Some(proposed("e2", d, "2025-01-10T00:00:00Z"))),
                        (0, Some(granted("e3", d, "2025-01-11T00:00:00Z"))),
                    ],
                    true,
                ),
                (
                    vec![
                        (0, Some(accepted("e4", d, "2025-02-01T00:00:00Z"))),
                        (0, Some(b"not json".to_vec())),
                        (0, Some(released("e5", d, "2025-03-01T00:00:00Z"))),
                    ],
                    false,
                ),
            ],
        );
        let store = Store::open_existing(&path).unwrap();
        let id = Id::new(d).unwrap();

        let all = cut_replay(&store, None, None);
        assert_eq!(all.snapshot, Some(0), "an uncut replay uses the snapshot");
        let view = all.deal(&id).unwrap();
        assert_eq!(view.status, Status::Agreed);
        assert_eq!(view.event_count, 5);
        assert!(view.active_locks.is_empty(), "released");
        assert_eq!(all.entries, 6);
        assert_eq!(all.folded, 6);
        assert_eq!(
            all.verdicts,
            VerdictCounts {
                accepted: 5,
                rejected: 1,
                duplicate: 0
            }
        );

        let mid = cut_replay(&store, Some("2025-01-15"), None);
        assert_eq!(mid.snapshot, None, "a cut replay starts from genesis");
        let view = mid.deal(&id).unwrap();
        assert_eq!(view.status, Status::Negotiating);
        assert_eq!(view.event_count, 3);
        assert_eq!(view.terms, None);
        assert_eq!(view.last_event.event_type, "deal.exclusivity.granted");
        assert_eq!(view.active_locks.len(), 1);
        let lock = &view.active_locks[0];
        assert_eq!(
            (
                lock.lock_id.as_str(),
                lock.holder.as_str(),
                lock.bound_party.as_str()
            ),
            ("l1", "microsoft", "openai")
        );
        assert_eq!(lock.since, at("2025-01-02"));
        // The undecodable entry has no business time: it is folded (refused).
        assert_eq!(mid.folded, 4);
        assert_eq!(mid.verdicts.rejected, 1);

        // Locks are judged at the cut: released on 2025-03-01.
        let feb = cut_replay(&store, Some("2025-02-15"), None);
        assert_eq!(feb.deal(&id).unwrap().active_locks.len(), 1);
        assert_eq!(feb.deal(&id).unwrap().status, Status::Agreed);
        let before_lock = cut_replay(&store, Some("2025-01-01T12:00:00Z"), None);
        assert!(before_lock.deal(&id).unwrap().active_locks.is_empty());
        let exact = cut_replay(&store, Some("2025-01-10T00:00:00Z"), None);
        assert_eq!(exact.deal(&id).unwrap().event_count, 2, "at T is included");

        let before = cut_replay(&store, Some("2024-12-31"), None);
        assert!(before.deals().is_empty());
        assert_eq!(before.entries, 6);
        assert_eq!(before.folded, 1, "only the undecodable entry");
    }

    #[test]
    fn record_time_cuts_fold_what_the_ledger_knew() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ledger");
        let d = "deal-1";
        // Record n is stamped RECORDED_AT + n. The duplicate of e2 (same
        // source and id, another time) is recorded after it.
        write_ledger(
            &path,
            &[(
                vec![
                    (0, Some(opened("e1", d, "2025-01-01T00:00:00Z"))),
                    (1, Some(proposed("e2", d, "2025-01-20T00:00:00Z"))),
                    (2, Some(proposed("e2", d, "2025-01-05T00:00:00Z"))),
                    (0, Some(accepted("e3", d, "2025-01-25T00:00:00Z"))),
                ],
                false,
            )],
        );
        let store = Store::open_existing(&path).unwrap();
        let id = Id::new(d).unwrap();
        let all = cut_replay(&store, None, None);
        assert_eq!(all.verdicts.duplicate, 1);
        assert_eq!(all.deal(&id).unwrap().status, Status::Agreed);

        let known = cut_replay(&store, None, Some(1));
        assert_eq!(known.folded, 2);
        assert_eq!(known.deal(&id).unwrap().event_count, 2);
        assert!(cut_replay(&store, None, Some(-1)).deals().is_empty());

        // As of 2025-01-10, e2's first entry had not happened: its later
        // duplicate (stamped 2025-01-05) is then the first of its identity.
        let both = cut_replay(&store, Some("2025-01-10"), None);
        assert_eq!(both.verdicts.duplicate, 0);
        assert_eq!(both.verdicts.accepted, 2);
        assert_eq!(both.deal(&id).unwrap().event_count, 2);
        // ... but not what the ledger knew before it was recorded.
        let known_then = cut_replay(&store, Some("2025-01-10"), Some(1));
        assert_eq!(known_then.deal(&id).unwrap().event_count, 1);
    }

    /// What one feed position holds.
    #[derive(Debug, Clone, Copy)]
    enum Item {
        /// The generator's next event.
        Event,
        /// An event of the same deals out of their lifecycle (a second
        /// generator, its ids renamed): mostly refused by the fold.
        Stray,
        /// Bytes that are not JSON.
        Garbage,
        /// A record without value.
        Tombstone,
        /// An earlier value sent again.
        Duplicate(usize),
    }

    fn arb_item() -> impl Strategy<Value = Item> {
        prop_oneof![
            12 => Just(Item::Event),
            2 => Just(Item::Stray),
            1 => Just(Item::Garbage),
            1 => Just(Item::Tombstone),
            3 => any::<usize>().prop_map(Item::Duplicate),
        ]
    }

    /// A random ledger (see [`LedgerPlan`]).
    fn arb_ledger() -> impl Strategy<Value = LedgerPlan> {
        (
            any::<u64>(),
            1..12usize,
            prop::collection::vec((arb_item(), 0..PARTITIONS), 1..300),
            prop::collection::vec((1..60usize, prop::bool::weighted(0.3)), 1..12),
        )
    }

    /// The values of `items`, in order.
    fn values(seed: u64, deals: usize, items: &[(Item, usize)]) -> Values {
        let mut generator = Generator::new(deals, seed);
        let mut stray = Generator::new(deals, seed ^ 1);
        let mut sent: Vec<Vec<u8>> = Vec::new();
        items
            .iter()
            .map(|(item, partition)| {
                let value = match *item {
                    Item::Event => Some(generator.next_event().to_json()),
                    Item::Stray => {
                        let mut e = stray.next_event();
                        e.deal_id = Id::new(
                            e.deal_id
                                .as_str()
                                .replace(&format!("deal-{}-", seed ^ 1), &format!("deal-{seed}-")),
                        )
                        .unwrap();
                        e.id = format!("stray-{}", e.id);
                        Some(e.to_json())
                    }
                    Item::Garbage => Some(b"{\"not\": an event".to_vec()),
                    Item::Tombstone => None,
                    Item::Duplicate(i) if !sent.is_empty() => Some(sent[i % sent.len()].clone()),
                    Item::Duplicate(_) => Some(generator.next_event().to_json()),
                };
                if let Some(v) = &value {
                    sent.push(v.clone());
                }
                (*partition, value)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Replay from a snapshot and from genesis agree: deal book, heads,
        /// identities, recomputed verdicts, the replay document; and a state
        /// restored from a snapshot continues ingest exactly.
        #[test]
        fn replay_from_a_snapshot_equals_replay_from_genesis(
            (seed, deals, items, splits) in arb_ledger()
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("ledger");
            let mut feed = values(seed, deals, &items).into_iter();
            let mut batches = Vec::new();
            for (size, snapshot) in splits.iter().cycle() {
                let batch: Vec<_> = feed.by_ref().take(*size).collect();
                if batch.is_empty() {
                    break;
                }
                batches.push((batch, *snapshot));
            }
            let (mut state, written) = write_ledger(&path, &batches);
            let store = Store::open_existing(&path).unwrap();
            let last_snapshot = batches.iter().rposition(|(_, s)| *s).map(|b| b as u64);
            prop_assert_eq!(store.snapshot_batches().unwrap().last().copied(), last_snapshot);

            let replay_of = |from| {
                let mut verdicts = BTreeMap::new();
                let replayed = store
                    .replay_with(from, QueryIndex::Kept, None, |_, outcome| {
                        verdicts.insert(outcome.location, outcome.verdict.clone());
                    })
                    .unwrap();
                (replayed, verdicts)
            };
            let (genesis, all) = replay_of(ReplayFrom::Genesis);
            let (snapshot, tail) = replay_of(ReplayFrom::LatestSnapshot);
            prop_assert_eq!(snapshot.snapshot, last_snapshot);
            let ingested: BTreeMap<Location, Verdict> = written
                .iter()
                .flat_map(|b| &b.outcomes)
                .map(|o| (o.location, o.verdict.clone()))
                .collect();
            prop_assert_eq!(&all, &ingested);
            for (location, verdict) in &tail {
                prop_assert_eq!(Some(verdict), all.get(location));
            }
            let first_tail_batch = last_snapshot.map_or(0, |b| b as usize + 1);
            let tail_len: usize = written[first_tail_batch..].iter().map(|b| b.entries.len()).sum();
            prop_assert_eq!(tail.len(), tail_len);
            for s in [&genesis.state, &snapshot.state] {
                prop_assert_eq!(
                    serde_json::to_string(s.book()).unwrap(),
                    serde_json::to_string(state.book()).unwrap()
                );
                prop_assert_eq!(s.heads(), state.heads());
                prop_assert_eq!(s.identities(), state.identities());
                prop_assert_eq!(s.entry_count(), state.entry_count());
                prop_assert_eq!(s.next_batch(), state.next_batch());
            }

            // The documents agree too (verdicts of the entries the snapshot
            // covers are counted from the stored ones).
            let document = |from_genesis| {
                let options = ReplayOptions { cut: Cut::default(), from_genesis };
                let r = replay(&store, &options, None).unwrap();
                serde_json::to_string(&r.document(r.deals())).unwrap()
            };
            prop_assert_eq!(document(true), document(false));

            // A restored state judges new records exactly as the original.
            let mut restored = snapshot.state;
            let more: Vec<Record> = values(seed, deals, &items)
                .into_iter()
                .rev()
                .take(20)
                .enumerate()
                .map(|(i, (p, v))| record(p, 1_000_000 + i as i64, 10_000 + i, v))
                .collect();
            let a = restored.apply_batch(more.clone(), &store).unwrap();
            let b = state.apply_batch(more, &store).unwrap();
            let verdicts = |w: &BatchWrite| -> Vec<Verdict> {
                w.outcomes.iter().map(|o| o.verdict.clone()).collect()
            };
            prop_assert_eq!(verdicts(&a), verdicts(&b));
            prop_assert_eq!(a.fingerprints, b.fingerprints);
        }
    }
}
