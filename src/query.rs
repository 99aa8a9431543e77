//! Compliance queries: the questions officers ask of the ledger, answered
//! with the entries behind every answer.
//!
//! Why this module exists: the same questions are asked offline of a stopped
//! ledger (`dealledger deal show ... --data DIR`) and of the running daemon
//! (`GET /v1/deals/{id}`); both must give the same answer, byte for byte, so
//! the answers are computed here, once, from a [`LedgerState`] (deal book +
//! [`DealIndex`]) and an [`Evidence`] source that reads stored entries. Every
//! answer cites each entry it rests on by stream (partition), sequence and
//! hash ([`EntryRef`]), so an auditor can check it against `verify`.
//!
//! Nothing here does I/O of its own: entries come through [`Evidence`]
//! (the store in practice), time comes from the caller. Results that can be
//! long are paged with opaque cursors ([`PageRequest`], [`Page`]); a cursor
//! names the last item returned, so a walk sees every item exactly once even
//! while the ledger grows (new items sort after the cursor or are skipped
//! consistently).
//!
//! The findings, precisely:
//! - `finalized_during_exclusive_lock`: a deal was finalized (business time
//!   of its `deal.finalized`) while a lock of kind `exclusive`, granted by
//!   another deal, binding one of its parties in the deal's scope, held by
//!   someone who is not a party of the finalized deal, was in force at that
//!   time ([`Lock::active_at`]). A right of first refusal does not forbid the
//!   deal and is not a finding.
//! - `time_backwards`: an accepted event whose business time is earlier than
//!   the previous accepted event of the same deal (in ledger order).
//! - `backdated`: an accepted event whose business time lies more than
//!   `max_backdate` before Kafka's record timestamp (only when the caller
//!   sets `max_backdate`: loading historical deals is not backdating).
//! - `terms_mismatch`: a finalization stating terms that differ from the
//!   accepted proposal's.
//! - `activity_after_termination`: events for a deal after it was terminated
//!   (all refused by the fold), one finding per deal.
//! - `producer_rejections`: per producer (`source`), the events refused or
//!   recognised as duplicates, one finding per producer.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::chain::Entry;
use crate::deal::{Deal, DealBook, Lock, LockWalk, Status};
use crate::event::{Date, EventType, Id, LockKind, Signatory, Terms, Timestamp};
use crate::index::{Cited, DealEntries, DealIndex, HistoryItem, ItemVerdict};
use crate::ledger::{LedgerState, Location, Verdict};
use crate::replay::PartiesView;

/// Items per page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Entries per `deal history` page when the caller does not say: each
/// carries its whole event, read from the store.
pub const DEFAULT_HISTORY_PAGE_SIZE: usize = 25;
/// Most items one page may hold.
pub const MAX_PAGE_SIZE: usize = 1_000;
/// Longest cursor accepted, in bytes.
pub const MAX_CURSOR_BYTES: usize = 512;
/// Most locks `deal show` lists in `locks_binding_parties` (its
/// `locks_binding_parties_total` says how many there are; `locks active`
/// lists them all).
pub const MAX_BINDING_LOCKS_SHOWN: usize = 20;

/// Most entries one `producer_rejections` or `activity_after_termination`
/// finding cites (its `count` says how many there are in all).
pub const MAX_CITED_PER_FINDING: usize = 20;

// ---------------------------------------------------------------------------
// Errors, evidence, paging.
// ---------------------------------------------------------------------------

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A parameter is malformed or out of range.
    #[error("parameter {name}: {reason}")]
    BadParameter {
        /// The parameter's name, as the CLI and the HTTP API spell it.
        name: &'static str,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// No deal has this id.
    #[error("deal {0}: no event of the ledger names this deal")]
    UnknownDeal(Id),
    /// Reading an entry behind the answer failed.
    #[error("{0}")]
    Evidence(String),
}

impl QueryError {
    fn bad(name: &'static str, reason: impl Into<String>) -> Self {
        QueryError::BadParameter {
            name,
            reason: reason.into(),
        }
    }
}

/// Reads stored entries and their verdicts; the store implements it.
pub trait Evidence {
    /// The entry at `location`.
    fn entry_at(&self, location: Location) -> Result<Entry, String>;
    /// The stored verdict of the entry at `location`.
    fn verdict_at(&self, location: Location) -> Result<Verdict, String>;
}

/// An entry cited by an answer: enough to find it and check its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRef {
    /// The stream (Kafka partition).
    pub stream: i32,
    /// Its sequence number in the stream.
    pub seq: u64,
    /// Its entry hash, 64 hex digits.
    pub hash: String,
}

impl From<Cited> for EntryRef {
    fn from(c: Cited) -> Self {
        EntryRef {
            stream: c.location.partition,
            seq: c.location.seq,
            hash: c.hash.to_string(),
        }
    }
}

impl From<&Entry> for EntryRef {
    fn from(e: &Entry) -> Self {
        EntryRef {
            stream: e.record.partition,
            seq: e.seq,
            hash: e.hash.to_string(),
        }
    }
}

fn cite(evidence: &dyn Evidence, location: Location) -> Result<EntryRef, QueryError> {
    evidence
        .entry_at(location)
        .map(|e| EntryRef::from(&e))
        .map_err(QueryError::Evidence)
}

/// Which page of a long result to return.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Items per page (default [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`]).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page; none for the first page.
    pub cursor: Option<String>,
}

impl PageRequest {
    /// The first page of `limit` items.
    pub fn first(limit: usize) -> Self {
        PageRequest {
            limit: Some(limit),
            cursor: None,
        }
    }

    fn limit(&self) -> Result<usize, QueryError> {
        self.limit_or(DEFAULT_PAGE_SIZE)
    }

    fn limit_or(&self, default: usize) -> Result<usize, QueryError> {
        match self.limit {
            None => Ok(default),
            Some(n) if (1..=MAX_PAGE_SIZE).contains(&n) => Ok(n),
            Some(n) => Err(QueryError::bad(
                "limit",
                format!("{n} is outside 1..={MAX_PAGE_SIZE}"),
            )),
        }
    }

    fn cursor(&self) -> Result<Option<&str>, QueryError> {
        match &self.cursor {
            Some(c) if c.len() > MAX_CURSOR_BYTES => Err(QueryError::bad(
                "cursor",
                format!(
                    "longer than {MAX_CURSOR_BYTES} bytes; pass the next_cursor of the previous page"
                ),
            )),
            Some(c) if c.is_empty() => Err(QueryError::bad(
                "cursor",
                "empty; omit it for the first page",
            )),
            Some(c) => Ok(Some(c)),
            None => Ok(None),
        }
    }
}

/// One page of a long result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    /// The items, in the result's order.
    pub items: Vec<T>,
    /// Pass it as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Pages `items` (already in order, each with its cursor key) after `after`.
fn paginate<T>(
    keyed: impl Iterator<Item = (String, T)>,
    request: &PageRequest,
) -> Result<Page<T>, QueryError> {
    let limit = request.limit()?;
    let after = request.cursor()?;
    let mut items = Vec::with_capacity(limit.min(64));
    let mut last_key = None;
    let mut more = false;
    for (key, item) in keyed.filter(|(k, _)| after.is_none_or(|a| k.as_str() > a)) {
        if items.len() == limit {
            more = true;
            break;
        }
        last_key = Some(key);
        items.push(item);
    }
    Ok(Page {
        items,
        next_cursor: if more { last_key } else { None },
    })
}

// ---------------------------------------------------------------------------
// Shared views.
// ---------------------------------------------------------------------------

/// How a lock ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEnded {
    /// Business time of the release or termination.
    pub at: Timestamp,
    /// Why.
    pub reason: String,
    /// The entry that ended it.
    pub entry: Option<EntryRef>,
}

/// An exclusivity lock and the entries behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// The deal that granted it.
    pub deal_id: Id,
    /// Its id within that deal.
    pub lock_id: Id,
    /// Who holds it.
    pub holder: Id,
    /// Whom it binds.
    pub bound_party: Id,
    /// What it covers.
    pub scope: Id,
    /// `exclusive` or `right-of-first-refusal`.
    pub kind: LockKind,
    /// Start of validity.
    pub valid_from: Timestamp,
    /// End of validity, if fixed.
    pub valid_until: Option<Timestamp>,
    /// Business time of the grant.
    pub granted_at: Timestamp,
    /// The entry that granted it.
    pub granted_by: Option<EntryRef>,
    /// How it ended, if it did.
    pub ended: Option<LockEnded>,
}

impl LockInfo {
    fn of(lock: &Lock, refs: Option<&DealEntries>) -> Self {
        let lock_refs = refs.and_then(|r| r.locks.get(&lock.lock_id));
        LockInfo {
            deal_id: lock.deal_id.clone(),
            lock_id: lock.lock_id.clone(),
            holder: lock.holder.clone(),
            bound_party: lock.bound_party.clone(),
            scope: lock.scope.clone(),
            kind: lock.kind,
            valid_from: lock.valid_from,
            valid_until: lock.valid_until,
            granted_at: lock.granted_at,
            granted_by: lock_refs.and_then(|r| r.granted).map(EntryRef::from),
            ended: lock.ended.as_ref().map(|end| LockEnded {
                at: end.at,
                reason: end.reason.as_str().to_string(),
                entry: lock_refs.and_then(|r| r.ended).map(EntryRef::from),
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// deal show
// ---------------------------------------------------------------------------

/// The accepted proposal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgreedView {
    /// The proposal accepted.
    pub proposal_id: Id,
    /// Its terms.
    pub terms: Terms,
    /// Who accepted it.
    pub accepted_by: Id,
    /// When.
    pub at: Timestamp,
    /// The `deal.terms.accepted` entry.
    pub entry: Option<EntryRef>,
}

/// The signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalizedView {
    /// The proposal signed.
    pub proposal_id: Id,
    /// When the contract takes effect.
    pub effective_date: Date,
    /// Who signed.
    pub signatories: Vec<Signatory>,
    /// Business time of the signature.
    pub at: Timestamp,
    /// The terms the finalization stated, if it stated any.
    pub stated_terms: Option<Terms>,
    /// The `deal.finalized` entry.
    pub entry: Option<EntryRef>,
}

/// The end of a deal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminatedView {
    /// When.
    pub at: Timestamp,
    /// By whom.
    pub by: Id,
    /// Why.
    pub reason: String,
    /// The `deal.terminated` entry.
    pub entry: Option<EntryRef>,
}

/// `deal show ID`: a deal's current state, with the entries behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealShow {
    /// The deal's id.
    pub id: Id,
    /// Where it is in its lifecycle.
    pub status: Status,
    /// What it is about.
    pub scope: Id,
    /// Free text from the opening.
    pub description: Option<String>,
    /// Who is party to it.
    pub parties: PartiesView,
    /// When negotiation opened.
    pub opened_at: Timestamp,
    /// The `deal.negotiation.opened` entry.
    pub opened_by: Option<EntryRef>,
    /// Proposals and counter-proposals made.
    pub proposals: usize,
    /// The accepted proposal, if any.
    pub agreed: Option<AgreedView>,
    /// The signature, if any.
    pub finalized: Option<FinalizedView>,
    /// The terms in force: accepted, signed or last amended.
    pub current_terms: Option<Terms>,
    /// The entry that set `current_terms`.
    pub current_terms_from: Option<EntryRef>,
    /// Amendments since finalization.
    pub amendments: u32,
    /// The termination, if any.
    pub terminated: Option<TerminatedView>,
    /// Events folded into the deal.
    pub event_count: u64,
    /// The last of them.
    pub last_event: Option<EntryRef>,
    /// Entries naming the deal, accepted or not (`deal history` lists them).
    pub entries: usize,
    /// Locks this deal granted, ended or not.
    pub locks_granted: Vec<LockInfo>,
    /// Locks in force (not ended) in the deal's scope that bind one of its
    /// parties, granted by any deal, in (deal, lock) order; at most
    /// [`MAX_BINDING_LOCKS_SHOWN`].
    pub locks_binding_parties: Vec<LockInfo>,
    /// How many such locks there are in all.
    pub locks_binding_parties_total: usize,
}

/// `deal show ID`.
pub fn deal_show(state: &LedgerState, id: &Id) -> Result<DealShow, QueryError> {
    let Some(deal) = state.book().get(id) else {
        // A terminated deal that could not be read back is not unknown.
        history_intact(state)?;
        return Err(QueryError::UnknownDeal(id.clone()));
    };
    let refs = state.index().deal(id);
    let refs = refs.as_deref();
    let cited = |f: fn(&DealEntries) -> Option<Cited>| refs.and_then(f).map(EntryRef::from);
    // A lock binds one party, so the parties' sets are disjoint: the first
    // locks overall are among each party's first ones.
    let mut locks_binding_parties_total = 0;
    let mut first: Vec<&(Id, Id)> = Vec::new();
    for party in deal.parties() {
        let (total, some) =
            state
                .index()
                .first_locks_in_force(party, &deal.scope, MAX_BINDING_LOCKS_SHOWN);
        locks_binding_parties_total += total;
        first.extend(some);
    }
    first.sort_unstable();
    first.truncate(MAX_BINDING_LOCKS_SHOWN);
    let locks_binding_parties = first
        .into_iter()
        .filter_map(|(granting, lock_id)| state.book().not_ended_lock(granting, lock_id))
        .inspect(|l| debug_assert!(l.scope == deal.scope))
        .map(|l| LockInfo::of(l, state.index().deal(&l.deal_id).as_deref()))
        .collect();
    // Ended locks (and their entries) are read back from the scratch file.
    let locks_granted = deal.locks.iter().map(|l| LockInfo::of(&l, refs)).collect();
    history_intact(state)?;
    Ok(DealShow {
        id: deal.id.clone(),
        status: deal.status,
        scope: deal.scope.clone(),
        description: deal.description.as_ref().map(|d| d.as_str().to_string()),
        parties: PartiesView::of(&deal),
        opened_at: deal.opened_at,
        opened_by: cited(|r| r.opened),
        proposals: deal.proposals.len(),
        agreed: deal.accepted.as_ref().map(|a| AgreedView {
            proposal_id: a.proposal_id.clone(),
            terms: a.terms.clone(),
            accepted_by: a.accepted_by.clone(),
            at: a.at,
            entry: cited(|r| r.agreed),
        }),
        finalized: deal.finalization.as_ref().map(|f| FinalizedView {
            proposal_id: f.proposal_id.clone(),
            effective_date: f.effective_date,
            signatories: f.signatories.clone(),
            at: f.at,
            stated_terms: f.stated_terms.clone(),
            entry: cited(|r| r.finalized),
        }),
        current_terms: deal.current_terms.clone(),
        current_terms_from: cited(|r| r.terms_from),
        amendments: deal.amendment_count,
        terminated: deal.termination.as_ref().map(|t| TerminatedView {
            at: t.at,
            by: t.by.clone(),
            reason: t.reason.as_str().to_string(),
            entry: cited(|r| r.terminated),
        }),
        event_count: deal.event_count,
        last_event: cited(|r| r.last),
        entries: refs.map_or(0, |r| r.items.len()),
        locks_granted,
        locks_binding_parties,
        locks_binding_parties_total,
    })
}

// ---------------------------------------------------------------------------
// deal history
// ---------------------------------------------------------------------------

/// One entry of a deal's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Position in the deal's history, from 0.
    pub position: u64,
    /// The entry.
    pub entry: EntryRef,
    /// Its Kafka offset.
    pub offset: i64,
    /// Kafka's record timestamp.
    pub record_time: Option<Timestamp>,
    /// The event's CloudEvents `type`.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// The event's CloudEvents `id`.
    pub event_id: Option<String>,
    /// The producer (`source`).
    pub source: String,
    /// The event's business time.
    pub time: Option<Timestamp>,
    /// `accepted`, `rejected` or `duplicate`.
    pub verdict: String,
    /// The rejection kind (`duplicate` for duplicates).
    pub kind: Option<String>,
    /// Why it was rejected, in one line.
    pub reason: Option<String>,
    /// For a duplicate: the entry that carried the event first.
    pub duplicate_of: Option<EntryRef>,
    /// The event exactly as received (the record value, when it is JSON),
    /// byte for byte.
    pub event: Option<RawEvent>,
}

/// A record value that is JSON, kept and written back verbatim (no parse
/// into a tree and back: `deal history` pages carry many of them).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawEvent(pub Box<serde_json::value::RawValue>);

impl PartialEq for RawEvent {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for RawEvent {}

/// The CloudEvents `id` of an event, read without building the rest.
#[derive(Deserialize)]
struct EventId<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

/// `deal history ID`: every entry naming the deal, in ledger order.
pub fn deal_history(
    state: &LedgerState,
    evidence: &dyn Evidence,
    id: &Id,
    page: &PageRequest,
) -> Result<Page<HistoryEntry>, QueryError> {
    let refs = state
        .index()
        .deal(id)
        .ok_or_else(|| QueryError::UnknownDeal(id.clone()))?;
    let start = match page.cursor()? {
        None => 0,
        Some(c) => {
            let n: usize = c.parse().map_err(|_| {
                QueryError::bad(
                    "cursor",
                    "not a cursor of deal history; pass next_cursor as given",
                )
            })?;
            n + 1
        }
    };
    let limit = page.limit_or(DEFAULT_HISTORY_PAGE_SIZE)?;
    let end = refs.items.len().min(start.saturating_add(limit));
    let mut items = Vec::with_capacity(end.saturating_sub(start));
    for (position, item) in (start..end).zip(refs.items.iter_from(start)) {
        items.push(history_entry(state.index(), evidence, position, &item)?);
    }
    history_intact(state)?;
    let next_cursor = (end < refs.items.len() && end > start).then(|| (end - 1).to_string());
    Ok(Page { items, next_cursor })
}

fn history_entry(
    index: &DealIndex,
    evidence: &dyn Evidence,
    position: usize,
    item: &HistoryItem,
) -> Result<HistoryEntry, QueryError> {
    let location = item.location();
    let entry = evidence.entry_at(location).map_err(QueryError::Evidence)?;
    let text = entry
        .record
        .value
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok());
    let event: Option<RawEvent> = text
        .and_then(|t| serde_json::from_str::<&serde_json::value::RawValue>(t).ok())
        .map(|raw| RawEvent(raw.to_owned()));
    let event_id = event
        .as_ref()
        .and_then(|e| serde_json::from_str::<EventId<'_>>(e.0.get()).ok())
        .and_then(|e| e.id)
        .map(|id| id.into_owned());
    let (verdict, kind, reason, duplicate_of) = match item.verdict() {
        ItemVerdict::Accepted => ("accepted", None, None, None),
        _ => match evidence
            .verdict_at(location)
            .map_err(QueryError::Evidence)?
        {
            Verdict::Accepted => ("accepted", None, None, None),
            Verdict::Rejected { kind, reason } => ("rejected", Some(kind), Some(reason), None),
            Verdict::Duplicate { of } => (
                "duplicate",
                Some("duplicate".to_string()),
                None,
                Some(cite(evidence, of)?),
            ),
        },
    };
    Ok(HistoryEntry {
        position: position as u64,
        entry: EntryRef::from(&entry),
        offset: entry.record.offset,
        record_time: Timestamp::from_unix_millis(item.record_ms),
        event_type: item.event_type().map(|t| t.as_str().to_string()),
        event_id,
        source: index.source_name(item.source).to_string(),
        time: item.time(),
        verdict: verdict.to_string(),
        kind,
        reason,
        duplicate_of,
        event,
    })
}

// ---------------------------------------------------------------------------
// deals list
// ---------------------------------------------------------------------------

/// Which deals `deals list` returns; every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DealFilter {
    /// Deals this party is a party of.
    pub party: Option<Id>,
    /// Deals in this status.
    pub status: Option<Status>,
    /// Deals whose last accepted event is at or after this business time.
    pub from: Option<Timestamp>,
    /// Deals opened before this business time.
    pub to: Option<Timestamp>,
}

/// One line of `deals list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealSummary {
    /// The deal's id.
    pub id: Id,
    /// Its status.
    pub status: Status,
    /// What it is about.
    pub scope: Id,
    /// Who is party to it.
    pub parties: PartiesView,
    /// When negotiation opened.
    pub opened_at: Timestamp,
    /// When it was finalized.
    pub finalized_at: Option<Timestamp>,
    /// When it was terminated.
    pub terminated_at: Option<Timestamp>,
    /// Business time of its last accepted event.
    pub last_event_at: Timestamp,
    /// Events folded into it.
    pub event_count: u64,
    /// Its last accepted entry: the head of its proven history.
    pub last_event: Option<EntryRef>,
}

/// Parses a status name as the CLI and API spell it.
pub fn parse_status(s: &str) -> Result<Status, QueryError> {
    [
        Status::Negotiating,
        Status::Agreed,
        Status::Finalized,
        Status::Terminated,
    ]
    .into_iter()
    .find(|st| st.as_str() == s)
    .ok_or_else(|| {
        QueryError::bad(
            "status",
            format!("{s:?} is not a status; expected negotiating, agreed, finalized or terminated"),
        )
    })
}

/// `deals list`: deals in id order.
pub fn deals_list(
    state: &LedgerState,
    filter: &DealFilter,
    page: &PageRequest,
) -> Result<Page<DealSummary>, QueryError> {
    if let (Some(from), Some(to)) = (filter.from, filter.to)
        && to < from
    {
        return Err(QueryError::bad(
            "to",
            format!("{to} is before from ({from})"),
        ));
    }
    let matches = |d: &Deal| {
        filter.party.as_ref().is_none_or(|p| d.is_party(p))
            && filter.status.is_none_or(|s| d.status == s)
            && filter.from.is_none_or(|t| d.last_event_at >= t)
            && filter.to.is_none_or(|t| d.opened_at < t)
    };
    let after = page.cursor()?.map(str::to_string);
    let keyed = state
        .book()
        .iter_after(after.as_deref())
        .filter(|(_, d)| matches(d))
        .map(|(id, d)| {
            let summary = DealSummary {
                id: id.clone(),
                status: d.status,
                scope: d.scope.clone(),
                parties: PartiesView::of(&d),
                opened_at: d.opened_at,
                finalized_at: d.finalization.as_ref().map(|f| f.at),
                terminated_at: d.termination.as_ref().map(|t| t.at),
                last_event_at: d.last_event_at,
                event_count: d.event_count,
                last_event: state
                    .index()
                    .deal(id)
                    .and_then(|r| r.last)
                    .map(EntryRef::from),
            };
            (id.as_str().to_string(), summary)
        });
    let deals = paginate(keyed, page)?;
    // Terminated deals are read back from the scratch file.
    history_intact(state)?;
    Ok(deals)
}

// ---------------------------------------------------------------------------
// locks active
// ---------------------------------------------------------------------------

/// Work a `locks active` page may do per item it lists, in either way to
/// it: locks the timeline may find binding before the walk is tried
/// instead, and steps the walk may take (a step tests one lock or passes
/// over one deal that has none to test) before the timeline is asked for
/// all of them.
const LOCKS_TESTED_PER_ITEM: usize = 32;

/// `locks active --at TIME`: every lock in force at `at` (business time), in
/// (deal, lock) order.
///
/// Two ways to the same page. Where few locks bind at `at` (at most 32 per
/// item wanted), the lock timeline
/// ([`crate::index::DealIndex::locks_active_at_most`]) finds them all
/// without looking at the others, and the page is picked out of them.
/// Where more bind, walking the locks in page order and testing each
/// fills the page after a few deals; the walk stops after 32 steps per
/// item wanted (a lock tested, or a deal passed over: one without locks,
/// or terminated with none that can bind), and the page is then picked
/// out of everything the timeline finds. Either way the cost follows the
/// page and the binding locks, not every lock ever granted nor every deal
/// ever opened. (A walk that passed terminated deals for free cost more the
/// longer the ledger ran; a walk tried first, even bounded, spent its whole
/// budget passing over deals wherever few locks bind.)
pub fn locks_active(
    state: &LedgerState,
    at: Timestamp,
    page: &PageRequest,
) -> Result<Page<LockInfo>, QueryError> {
    let limit = page.limit()?;
    let after = page.cursor()?.map(lock_cursor).transpose()?;
    let after = after.as_ref().map(|(deal, lock)| (deal, lock));
    let wanted = limit + 1; // one more tells whether a next page exists
    let few = state
        .index()
        .locks_active_at_most(at, LOCKS_TESTED_PER_ITEM * wanted);
    let mut locks = match few {
        Some(ids) => first_locks_of(state, ids, after, wanted),
        None => match first_locks_walked(state.book(), at, after, wanted) {
            Some(locks) => locks,
            None => first_locks_of(state, state.index().locks_active_at(at), after, wanted),
        },
    };
    // Ended locks are read back from the history's scratch file.
    history_intact(state)?;
    let more = locks.len() > limit;
    locks.truncate(limit);
    // Locks come in (deal, lock) order: each deal's entries are read once
    // (a terminated deal's from the store).
    let mut items = Vec::with_capacity(locks.len());
    for same_deal in locks.chunk_by(|a, b| a.deal_id == b.deal_id) {
        let refs = state.index().deal(&same_deal[0].deal_id);
        items.extend(
            same_deal
                .iter()
                .map(|lock| LockInfo::of(lock, refs.as_deref())),
        );
    }
    Ok(Page {
        items,
        next_cursor: match locks.last() {
            Some(lock) if more => Some(lock_key(&lock.deal_id, &lock.lock_id)),
            _ => None,
        },
    })
}

/// The first `wanted` locks binding at `at` after the cursor `after`, in
/// (deal, lock) order, found by testing the locks in that order; `None`
/// once [`LOCKS_TESTED_PER_ITEM`] steps per lock wanted were taken in vain.
fn first_locks_walked(
    book: &DealBook,
    at: Timestamp,
    after: Option<(&Id, &Id)>,
    wanted: usize,
) -> Option<Vec<Lock>> {
    let mut budget = LOCKS_TESTED_PER_ITEM * wanted;
    let mut found = Vec::with_capacity(wanted);
    let mut out_of_budget = false;
    book.walk_locks(after.map(|(deal, _)| deal), Some(at), |deal_id, step| {
        if let LockWalk::Lock(lock) = &step
            && after.is_some_and(|a| (deal_id, lock.id()) <= a)
        {
            return ControlFlow::Continue(());
        }
        // A deal passed over costs a step too: terminated deals pile up
        // with time, and passing them for free made this walk (and the
        // route's p99) grow with the ledger's age.
        if budget == 0 {
            out_of_budget = true;
            return ControlFlow::Break(());
        }
        budget -= 1;
        let LockWalk::Lock(lock) = step else {
            return ControlFlow::Continue(());
        };
        if lock.active_at(at) {
            // A failed read leaves it out; the caller checks for that.
            found.extend(lock.load().map(Cow::into_owned));
            if found.len() == wanted {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    (!out_of_budget).then_some(found)
}

/// The first `wanted` locks after the cursor `after`, in (deal, lock)
/// order, picked out of `ids`: the (deal, lock) ids of every lock binding
/// at the time asked, as the lock timeline finds them.
fn first_locks_of(
    state: &LedgerState,
    mut ids: Vec<(Id, Id)>,
    after: Option<(&Id, &Id)>,
    wanted: usize,
) -> Vec<Lock> {
    ids.retain(|(deal, lock)| after.is_none_or(|a| (deal, lock) > a));
    if ids.len() > wanted {
        ids.select_nth_unstable(wanted - 1);
        ids.truncate(wanted);
    }
    ids.sort_unstable();
    let mut found = Vec::with_capacity(ids.len());
    // Each deal's locks are read once (a terminated deal's from the store).
    for same_deal in ids.chunk_by(|a, b| a.0 == b.0) {
        let deal_id = &same_deal[0].0;
        let locks = state.book().locks_of(deal_id);
        for (_, lock_id) in same_deal {
            let lock = locks.as_deref().and_then(|locks| locks.get(lock_id));
            // A failed read leaves it out; the caller checks for that.
            assert!(
                lock.is_some() || state.index().segment_failure().is_some(),
                "the lock timeline names {deal_id}/{lock_id}, which the book lacks"
            );
            found.extend(lock.map(Cow::into_owned));
        }
    }
    found
}

/// A lock's name and cursor: `deal/lock` (no id holds a `/`).
fn lock_key(deal: &Id, lock: &Id) -> String {
    format!("{deal}/{lock}")
}

/// The (deal, lock) a [`lock_key`] cursor names. Cursors compare as pairs:
/// as strings, `a-b/x` would sort before `a/x` (`-` is below `/`), though
/// deal `a` comes first.
fn lock_cursor(cursor: &str) -> Result<(Id, Id), QueryError> {
    let bad = || {
        QueryError::bad(
            "cursor",
            format!(
                "{cursor:?} is no cursor of this query (deal/lock); pass the next_cursor of the previous page"
            ),
        )
    };
    let (deal, lock) = cursor.split_once('/').ok_or_else(bad)?;
    Ok((
        Id::new(deal).map_err(|_| bad())?,
        Id::new(lock).map_err(|_| bad())?,
    ))
}

// ---------------------------------------------------------------------------
// findings
// ---------------------------------------------------------------------------

/// The kinds of finding.
pub const FINDING_KINDS: [&str; 6] = [
    "finalized_during_exclusive_lock",
    "time_backwards",
    "backdated",
    "terms_mismatch",
    "activity_after_termination",
    "producer_rejections",
];

/// Which findings to report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FindingFilter {
    /// Only findings at or after this time.
    pub from: Option<Timestamp>,
    /// Only findings before this time.
    pub to: Option<Timestamp>,
    /// Only findings of this kind (one of [`FINDING_KINDS`]).
    pub kind: Option<String>,
    /// Report `backdated` events: business time more than this many
    /// milliseconds before the record timestamp. None: not checked.
    pub max_backdate_ms: Option<i64>,
}

/// One compliance finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// One of [`FINDING_KINDS`].
    pub kind: String,
    /// When it happened (business time; the record time for events that
    /// carry none).
    pub at: Timestamp,
    /// The deals involved.
    pub deals: Vec<Id>,
    /// The lock involved, as `deal/lock`.
    pub lock: Option<String>,
    /// The producer involved.
    pub source: Option<String>,
    /// How many events the finding covers (it cites at most
    /// [`MAX_CITED_PER_FINDING`]).
    pub count: u64,
    /// The entries behind it.
    pub entries: Vec<EntryRef>,
    /// What is wrong, in one line.
    pub explanation: String,
}

/// `findings`: every finding in (time, kind, deal) order.
pub fn findings(
    state: &LedgerState,
    evidence: &dyn Evidence,
    filter: &FindingFilter,
    page: &PageRequest,
) -> Result<Page<Finding>, QueryError> {
    if let Some(kind) = &filter.kind
        && !FINDING_KINDS.contains(&kind.as_str())
    {
        return Err(QueryError::bad(
            "kind",
            format!(
                "{kind:?} is not a finding kind; expected one of {}",
                FINDING_KINDS.join(", ")
            ),
        ));
    }
    if let (Some(from), Some(to)) = (filter.from, filter.to)
        && to < from
    {
        return Err(QueryError::bad(
            "to",
            format!("{to} is before from ({from})"),
        ));
    }
    if filter.max_backdate_ms.is_some_and(|ms| ms < 0) {
        return Err(QueryError::bad("max_backdate", "must not be negative"));
    }
    let mut all = all_findings(state, filter)?;
    history_intact(state)?;
    let in_range =
        |t: Timestamp| filter.from.is_none_or(|f| t >= f) && filter.to.is_none_or(|e| t < e);
    all.retain(|f| in_range(f.at) && filter.kind.as_ref().is_none_or(|k| *k == f.kind));
    all.sort_by(|a, b| a.key.cmp(&b.key));
    // Keys are cursors: a repeated one would hide findings past a page's end.
    debug_assert!(
        all.windows(2).all(|w| w[0].key < w[1].key),
        "findings with the same key"
    );
    let page = paginate(all.into_iter().map(|f| (f.key.clone(), f)), page)?;
    let mut items = Vec::with_capacity(page.items.len());
    for pending in page.items {
        items.push(pending.resolve(evidence)?);
    }
    Ok(Page {
        items,
        next_cursor: page.next_cursor,
    })
}

/// A finding before its entries are read: cited entries as locations or
/// already-known references. Only the page returned is resolved.
struct PendingFinding {
    key: String,
    kind: &'static str,
    at: Timestamp,
    deals: Vec<Id>,
    lock: Option<String>,
    source: Option<String>,
    count: u64,
    cited: Vec<EntryRef>,
    locations: Vec<Location>,
    explanation: String,
}

impl PendingFinding {
    fn new(
        kind: &'static str,
        at: Timestamp,
        deals: Vec<Id>,
        first: Location,
        explanation: String,
    ) -> Self {
        // Sortable: time (offset so negative micros sort first), kind, deal,
        // then the first entry behind it.
        let key = format!(
            "{:020}|{kind}|{}|{:05}:{:015}",
            (at.unix_micros() as i128 - i64::MIN as i128) as u128,
            deals.first().map_or("", |d| d.as_str()),
            first.partition,
            first.seq
        );
        PendingFinding {
            key,
            kind,
            at,
            deals,
            lock: None,
            source: None,
            count: 1,
            cited: Vec::new(),
            locations: vec![first],
            explanation,
        }
    }

    fn resolve(self, evidence: &dyn Evidence) -> Result<Finding, QueryError> {
        let mut entries = self.cited;
        for location in self.locations {
            entries.push(cite(evidence, location)?);
        }
        Ok(Finding {
            kind: self.kind.to_string(),
            at: self.at,
            deals: self.deals,
            lock: self.lock,
            source: self.source,
            count: self.count,
            entries,
            explanation: self.explanation,
        })
    }
}

fn all_findings(
    state: &LedgerState,
    filter: &FindingFilter,
) -> Result<Vec<PendingFinding>, QueryError> {
    let book = state.book();
    let index = state.index();
    let mut out = Vec::new();

    // Locks by the party they bind, for the finalization check.
    // Only exclusive locks are read back from the store (when ended).
    let mut exclusive: Vec<Lock> = Vec::new();
    book.for_each_lock(None, None, |_, lock| {
        if lock.kind() == LockKind::Exclusive {
            exclusive.extend(lock.load().map(Cow::into_owned));
        }
        ControlFlow::Continue(())
    });
    let mut binding: HashMap<&Id, Vec<&Lock>> = HashMap::new();
    for lock in &exclusive {
        binding.entry(&lock.bound_party).or_default().push(lock);
    }

    for (id, deal) in book.iter() {
        let refs = index.deal(id);
        let refs = refs.as_deref();
        // Finalized while an exclusive lock bound a party.
        if let Some(fin) = &deal.finalization
            && let Some(fin_ref) = refs.and_then(|r| r.finalized)
        {
            for party in deal.parties() {
                for lock in binding.get(party).into_iter().flatten() {
                    if lock.deal_id == deal.id
                        || lock.scope != deal.scope
                        || deal.is_party(&lock.holder)
                        || !lock.active_at(fin.at)
                    {
                        continue;
                    }
                    let lock_refs = index
                        .deal(&lock.deal_id)
                        .and_then(|r| r.locks.get(&lock.lock_id));
                    let mut f = PendingFinding::new(
                        "finalized_during_exclusive_lock",
                        fin.at,
                        vec![deal.id.clone(), lock.deal_id.clone()],
                        fin_ref.location,
                        format!(
                            "deal {} was finalized at {} while lock {} (granted by deal {}) gave {} exclusivity over {} in scope {}",
                            deal.id,
                            fin.at,
                            lock.lock_id,
                            lock.deal_id,
                            lock.holder,
                            lock.bound_party,
                            lock.scope
                        ),
                    );
                    f.locations.clear();
                    f.cited.push(EntryRef::from(fin_ref));
                    if let Some(g) = lock_refs.and_then(|r| r.granted) {
                        f.cited.push(EntryRef::from(g));
                    }
                    if let Some(e) = lock_refs.and_then(|r| r.ended) {
                        f.cited.push(EntryRef::from(e));
                    }
                    // One finalization may meet several locks: the lock
                    // tells their findings apart (keys are page cursors).
                    let named = lock_key(&lock.deal_id, &lock.lock_id);
                    f.key.push('|');
                    f.key.push_str(&named);
                    f.lock = Some(named);
                    out.push(f);
                }
            }
        }
        // Finalization stating other terms than the accepted ones.
        if let (Some(fin), Some(accepted)) = (&deal.finalization, &deal.accepted)
            && let Some(stated) = &fin.stated_terms
            && *stated != accepted.terms
            && let Some(fin_ref) = refs.and_then(|r| r.finalized)
        {
            let mut f = PendingFinding::new(
                "terms_mismatch",
                fin.at,
                vec![deal.id.clone()],
                fin_ref.location,
                format!(
                    "deal {} was finalized at {} stating terms that differ from accepted proposal {}",
                    deal.id, fin.at, accepted.proposal_id
                ),
            );
            f.locations.clear();
            f.cited.push(EntryRef::from(fin_ref));
            if let Some(a) = refs.and_then(|r| r.agreed) {
                f.cited.push(EntryRef::from(a));
            }
            out.push(f);
        }
    }

    // Per producer: refused and duplicate events, tallied in the same pass
    // over the items as the per-deal checks below (the items are decoded
    // as they are read: one pass, not two).
    struct Tally {
        rejected: u64,
        duplicate: u64,
        first: Option<(Timestamp, Location)>,
        cited: Vec<Location>,
    }
    let mut per_source: BTreeMap<u32, Tally> = BTreeMap::new();
    let mut tally_item = |item: &HistoryItem| {
        let verdict = item.verdict();
        if verdict == ItemVerdict::Accepted {
            return;
        }
        let Some(at) = item
            .time()
            .or_else(|| Timestamp::from_unix_millis(item.record_ms))
        else {
            return;
        };
        if filter.from.is_some_and(|f| at < f) || filter.to.is_some_and(|e| at >= e) {
            return;
        }
        let tally = per_source.entry(item.source).or_insert(Tally {
            rejected: 0,
            duplicate: 0,
            first: None,
            cited: Vec::new(),
        });
        match verdict {
            ItemVerdict::Duplicate => tally.duplicate += 1,
            _ => tally.rejected += 1,
        }
        let location = item.location();
        if tally.first.is_none_or(|(t, l)| (at, location) < (t, l)) {
            tally.first = Some((at, location));
        }
        tally.cited.push(location);
    };

    // Per deal, over its entries in ledger order.
    for (id, refs) in index.deals() {
        let mut last_time: Option<(i64, Location)> = None;
        let mut after_termination: Option<PendingFinding> = None;
        for item in refs.items.iter() {
            tally_item(&item);
            let location = item.location();
            match item.verdict() {
                ItemVerdict::Accepted => {
                    if let Some((prev, prev_loc)) = last_time
                        && item.time_micros < prev
                        && let Some(t) = item.time()
                    {
                        let mut f = PendingFinding::new(
                            "time_backwards",
                            t,
                            vec![id.clone()],
                            location,
                            format!(
                                "deal {id}: an event at {t} was recorded after one at {}",
                                Timestamp::from_unix_micros(prev)
                                    .map_or_else(String::new, |p| p.to_string())
                            ),
                        );
                        f.locations.push(prev_loc);
                        out.push(f);
                    }
                    if last_time.is_none_or(|(prev, _)| item.time_micros >= prev) {
                        last_time = Some((item.time_micros, location));
                    }
                    if let Some(max) = filter.max_backdate_ms
                        && let Some(t) = item.time()
                    {
                        let lag_ms = item
                            .record_ms
                            .saturating_sub(item.time_micros.div_euclid(1000));
                        if lag_ms > max {
                            out.push(PendingFinding::new(
                                "backdated",
                                t,
                                vec![id.clone()],
                                location,
                                format!(
                                    "deal {id}: an event dated {t} was recorded by Kafka {} later, more than the {} allowed",
                                    human_ms(lag_ms),
                                    human_ms(max)
                                ),
                            ));
                        }
                    }
                }
                ItemVerdict::Rejected(k) if index.kind_name(k) == "deal_terminated" => {
                    let at = item
                        .time()
                        .or_else(|| Timestamp::from_unix_millis(item.record_ms))
                        .unwrap_or_else(|| Timestamp::from_unix_millis(0).expect("epoch"));
                    match &mut after_termination {
                        None => {
                            after_termination = Some(PendingFinding::new(
                                "activity_after_termination",
                                at,
                                vec![id.clone()],
                                location,
                                format!(
                                    "deal {id}: events arrived after the deal was terminated; all were refused"
                                ),
                            ));
                        }
                        Some(f) => {
                            f.count += 1;
                            if f.locations.len() < MAX_CITED_PER_FINDING {
                                f.locations.push(location);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(mut f) = after_termination {
            f.explanation = format!(
                "deal {id}: {} event(s) arrived after the deal was terminated; all were refused",
                f.count
            );
            out.push(f);
        }
    }

    index.unattributed().iter().for_each(&mut tally_item);
    for (source, mut tally) in per_source {
        let Some((at, first)) = tally.first else {
            continue;
        };
        tally.cited.sort_unstable();
        tally.cited.truncate(MAX_CITED_PER_FINDING);
        let name = index.source_name(source).to_string();
        let mut f = PendingFinding::new(
            "producer_rejections",
            at,
            Vec::new(),
            first,
            format!(
                "producer {name} sent {} refused and {} duplicate event(s)",
                tally.rejected, tally.duplicate
            ),
        );
        f.locations = tally.cited;
        f.count = tally.rejected + tally.duplicate;
        f.key = format!("{}|{name}", f.key);
        f.source = Some(name);
        out.push(f);
    }
    Ok(out)
}

/// Parses a duration such as `36h`, `7d`, `90m`, `30s` or `1500ms` into
/// milliseconds (for `max_backdate`).
pub fn parse_duration_ms(s: &str) -> Result<i64, QueryError> {
    let bad = || {
        QueryError::bad(
            "max_backdate",
            format!(
                "{s:?} is not a duration; expected a whole number and a unit: ms, s, m, h or d (e.g. 36h, 7d)"
            ),
        )
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(split);
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per).ok_or_else(bad)
}

/// `90061000` → `1d 1h 1m 1s`.
fn human_ms(ms: i64) -> String {
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    let mut out = String::new();
    for (n, unit) in [(d, "d"), (h, "h"), (m, "m"), (sec, "s")] {
        if n != 0 {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() {
        format!("{ms}ms")
    } else {
        out
    }
}

// ---------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------

/// Statistics of one deal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealStats {
    /// The deal's id.
    pub id: Id,
    /// Its status.
    pub status: Status,
    /// Seconds from opening to finalization, if finalized.
    pub seconds_to_finalize: Option<i64>,
    /// Proposals and counter-proposals made.
    pub proposal_rounds: usize,
    /// Entries naming the deal, by event type.
    pub events_by_type: BTreeMap<String, u64>,
    /// Entries naming the deal, by verdict.
    pub verdicts: VerdictTally,
}

/// Entries by verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictTally {
    /// Accepted.
    pub accepted: u64,
    /// Rejected.
    pub rejected: u64,
    /// Duplicates.
    pub duplicate: u64,
}

impl VerdictTally {
    fn add(&mut self, v: ItemVerdict) {
        match v {
            ItemVerdict::Accepted => self.accepted += 1,
            ItemVerdict::Duplicate => self.duplicate += 1,
            ItemVerdict::Rejected(_) => self.rejected += 1,
        }
    }
}

/// Statistics of the whole ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OverallStats {
    /// Entries in the ledger.
    pub entries: u64,
    /// Entries by verdict.
    pub verdicts: VerdictTally,
    /// Entries by event type (`(not decodable)` for the others).
    pub events_by_type: BTreeMap<String, u64>,
    /// Deals by status.
    pub deals_by_status: BTreeMap<String, u64>,
    /// Deals finalized.
    pub finalized: u64,
    /// Mean seconds from opening to finalization.
    pub mean_seconds_to_finalize: Option<i64>,
    /// Median seconds from opening to finalization.
    pub median_seconds_to_finalize: Option<i64>,
    /// Mean proposals and counter-proposals per deal.
    pub mean_proposal_rounds: Option<f64>,
}

/// `stats`: overall, and per deal (paged, in id order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The whole ledger.
    pub overall: OverallStats,
    /// One page of per-deal statistics.
    pub deals: Page<DealStats>,
}

/// `stats`.
pub fn stats(state: &LedgerState, page: &PageRequest) -> Result<Stats, QueryError> {
    let index = state.index();
    let mut verdicts = VerdictTally::default();
    let mut events_by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut tally_item = |item: &HistoryItem| {
        verdicts.add(item.verdict());
        let t = item
            .event_type()
            .map_or(crate::index::UNKNOWN_SOURCE, EventType::as_str);
        *events_by_type.entry(t.to_string()).or_default() += 1;
    };
    for (_, refs) in index.deals() {
        refs.items.iter().for_each(|item| tally_item(&item));
    }
    index.unattributed().iter().for_each(&mut tally_item);

    let mut deals_by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut to_finalize = Vec::new();
    let mut rounds = 0usize;
    // Terminated deals in the store are not read back for these.
    for (_, deal) in state.book().counts_after(None) {
        *deals_by_status
            .entry(deal.status.as_str().to_string())
            .or_default() += 1;
        if let Some(s) = deal.seconds_to_finalize() {
            to_finalize.push(s);
        }
        rounds += deal.proposals;
    }
    to_finalize.sort_unstable();
    let deals = state.book().len();
    let overall = OverallStats {
        entries: state.entry_count(),
        verdicts,
        events_by_type,
        deals_by_status,
        finalized: to_finalize.len() as u64,
        mean_seconds_to_finalize: (!to_finalize.is_empty())
            .then(|| to_finalize.iter().sum::<i64>() / to_finalize.len() as i64),
        median_seconds_to_finalize: to_finalize.get(to_finalize.len() / 2).copied(),
        mean_proposal_rounds: (deals > 0).then(|| rounds as f64 / deals as f64),
    };

    let after = page.cursor()?.map(str::to_string);
    let keyed = state
        .book()
        .counts_after(after.as_deref())
        .map(|(id, deal)| {
            let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
            let mut tally = VerdictTally::default();
            let refs = index.deal(id);
            for item in refs.iter().flat_map(|r| r.items.iter()) {
                tally.add(item.verdict());
                if let Some(t) = item.event_type() {
                    *by_type.entry(t.as_str().to_string()).or_default() += 1;
                }
            }
            (
                id.as_str().to_string(),
                DealStats {
                    id: id.clone(),
                    status: deal.status,
                    seconds_to_finalize: deal.seconds_to_finalize(),
                    proposal_rounds: deal.proposals,
                    events_by_type: by_type,
                    verdicts: tally,
                },
            )
        });
    let deals = paginate(keyed, page)?;
    history_intact(state)?;
    Ok(Stats { overall, deals })
}

/// An error if the index's history items are spilled to a file that failed
/// (a read of it ended an iteration early): what was counted or listed from
/// them may be incomplete.
fn history_intact(state: &LedgerState) -> Result<(), QueryError> {
    match state.index().segment_failure() {
        None => Ok(()),
        Some(failure) => Err(QueryError::Evidence(format!(
            "the deals' history cannot be read back: {failure}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::chain::{Record, TimestampType};
    use crate::ledger::{BatchWrite, NoOriginals};

    const SCENARIO: &str = include_str!("../schemas/examples/scenario.jsonl");

    /// A ledger built in memory, with the entries and verdicts as evidence.
    struct Built {
        state: LedgerState,
        entries: HashMap<Location, Entry>,
        verdicts: HashMap<Location, Verdict>,
    }

    impl Evidence for Built {
        fn entry_at(&self, location: Location) -> Result<Entry, String> {
            self.entries
                .get(&location)
                .cloned()
                .ok_or_else(|| format!("no entry {location}"))
        }

        fn verdict_at(&self, location: Location) -> Result<Verdict, String> {
            Ok(self
                .verdicts
                .get(&location)
                .cloned()
                .unwrap_or(Verdict::Accepted))
        }
    }

    /// Ledger of `lines`, each its own record; deals spread over 3 partitions
    /// by the length of their id, offsets in order, record time = 2026.
    /// History items and ended locks go to a store, as in the daemon.
    fn build(lines: &[String]) -> Built {
        build_with(lines, true)
    }

    /// [`build`], its history items and ended locks in a store or in memory.
    fn build_with(lines: &[String], stored: bool) -> Built {
        let store = stored.then(|| std::sync::Arc::new(crate::index::MemorySegments::default()));
        build_in(lines, store)
    }

    /// [`build`], its history items and ended locks in `store` if given.
    fn build_in(
        lines: &[String],
        store: Option<std::sync::Arc<crate::index::MemorySegments>>,
    ) -> Built {
        let mut state = LedgerState::new("deal-events");
        if let Some(store) = store {
            state.spill_history_to(store);
        }
        let mut offsets = [0i64; 3];
        let records = lines
            .iter()
            .map(|line| {
                let subject = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["subject"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let partition = (subject.len() % 3) as i32;
                let offset = offsets[partition as usize];
                offsets[partition as usize] += 1;
                Record {
                    topic: "deal-events".into(),
                    partition,
                    offset,
                    timestamp_type: TimestampType::CreateTime,
                    timestamp_ms: 1_790_000_000_000 + offset,
                    key: Some(subject.into_bytes()),
                    value: Some(line.clone().into_bytes()),
                    headers: Vec::new(),
                }
            })
            .collect();
        let BatchWrite {
            entries, outcomes, ..
        } = state.apply_batch(records, &NoOriginals).unwrap();
        let mut built = Built {
            state,
            entries: HashMap::new(),
            verdicts: HashMap::new(),
        };
        for (entry, outcome) in entries.into_iter().zip(outcomes) {
            if outcome.verdict != Verdict::Accepted {
                built.verdicts.insert(outcome.location, outcome.verdict);
            }
            built.entries.insert(outcome.location, entry);
        }
        built
    }

    fn scenario() -> Vec<String> {
        SCENARIO.lines().map(str::to_string).collect()
    }

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    fn t(s: &str) -> Timestamp {
        crate::replay::parse_time(s).unwrap()
    }

    fn all_findings_of(b: &Built, filter: &FindingFilter) -> Vec<Finding> {
        findings(&b.state, b, filter, &PageRequest::first(MAX_PAGE_SIZE))
            .unwrap()
            .items
    }

    /// The scenario with Google–OpenAI closing fast, on 2025-01-16, five
    /// days before Microsoft released its exclusive lock over OpenAI.
    fn finalized_before_release() -> Vec<String> {
        include_str!("../schemas/examples/finalized-under-lock.jsonl")
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_scenario_has_no_finding_and_google_openai_is_finalized_in_may_2025() {
        let b = build(&scenario());
        let show = deal_show(&b.state, &id("google-openai-2025")).unwrap();
        assert_eq!(show.status, Status::Finalized);
        let fin = show.finalized.unwrap();
        assert_eq!(fin.at, t("2025-05-28T15:00:00Z"));
        let entry = fin.entry.unwrap();
        let stored = b
            .entry_at(Location {
                partition: entry.stream,
                seq: entry.seq,
            })
            .unwrap();
        assert_eq!(entry.hash, stored.hash.to_string());
        let found = all_findings_of(&b, &FindingFilter::default());
        assert!(found.is_empty(), "{found:#?}");
    }

    #[test]
    fn microsofts_exclusive_lock_is_active_at_the_end_of_2024_and_not_in_february_2025() {
        let b = build(&scenario());
        let page = PageRequest::first(MAX_PAGE_SIZE);
        let at_2024 = locks_active(&b.state, t("2024-12-31"), &page)
            .unwrap()
            .items;
        let exclusive: Vec<&LockInfo> = at_2024
            .iter()
            .filter(|l| l.lock_id.as_str() == "azure-exclusive")
            .collect();
        assert_eq!(exclusive.len(), 1, "{at_2024:#?}");
        let lock = exclusive[0];
        assert_eq!(lock.holder.as_str(), "microsoft");
        assert_eq!(lock.bound_party.as_str(), "openai");
        assert_eq!(lock.deal_id.as_str(), "msft-openai-2019");
        assert!(lock.granted_by.is_some());
        let at_feb = locks_active(&b.state, t("2025-02-01"), &page)
            .unwrap()
            .items;
        assert!(
            at_feb
                .iter()
                .all(|l| l.lock_id.as_str() != "azure-exclusive"),
            "{at_feb:#?}"
        );
        assert!(
            at_feb.iter().any(|l| l.lock_id.as_str() == "azure-rofr"),
            "the right of first refusal replaced it: {at_feb:#?}"
        );
    }

    /// Every (deal, lock) `locks_active` lists at `at`, page after page of
    /// `limit`, following the cursors.
    fn all_active_locks(state: &LedgerState, at: Timestamp, limit: usize) -> Vec<(String, String)> {
        let mut seen = Vec::new();
        let mut page = PageRequest::first(limit);
        for _ in 0..10_000 {
            let got = locks_active(state, at, &page).unwrap();
            assert!(got.items.len() <= limit);
            seen.extend(
                got.items
                    .iter()
                    .map(|l| (l.deal_id.to_string(), l.lock_id.to_string())),
            );
            match got.next_cursor {
                Some(cursor) => page.cursor = Some(cursor),
                None => return seen,
            }
        }
        panic!("locks active at {at} in pages of {limit} did not end after 10,000 pages");
    }

    #[test]
    fn locks_active_pages_in_deal_then_lock_order_whatever_the_ids() {
        // `-` and `.` sort below `/`: as strings, "a-b/l1" < "a/l1", but deal
        // "a" comes before deal "a-b". Every page must continue where the
        // last one stopped.
        let deals = ["a", "a-b", "a.c", "a0", "b"];
        let mut lines = Vec::new();
        for (n, deal) in deals.iter().enumerate() {
            lines.push(format!(
                r#"{{"specversion":"1.0","id":"o{n}","source":"urn:t","type":"deal.negotiation.opened","subject":"{deal}","time":"2025-01-01T00:00:00Z","data":{{"customer":"x","provider":"y","scope":"cloud-compute"}}}}"#
            ));
            for lock in ["l1", "l1-b", "l2"] {
                lines.push(format!(
                    r#"{{"specversion":"1.0","id":"g{n}{lock}","source":"urn:t","type":"deal.exclusivity.granted","subject":"{deal}","time":"2025-01-02T00:00:00Z","data":{{"lock_id":"{lock}","holder":"y","bound_party":"x","scope":"cloud-compute","kind":"exclusive","valid_from":"2025-01-02T00:00:00Z"}}}}"#
                ));
            }
        }
        let b = build(&lines);
        let mut expected: Vec<(String, String)> = Vec::new();
        for deal in deals {
            for lock in ["l1", "l1-b", "l2"] {
                expected.push((deal.to_string(), lock.to_string()));
            }
        }
        for limit in [1, 2, 4, 15, 16] {
            let seen = all_active_locks(&b.state, t("2025-02-01"), limit);
            assert_eq!(seen, expected, "pages of {limit}");
        }
        let bad = PageRequest {
            cursor: Some("no-slash".into()),
            ..PageRequest::first(5)
        };
        assert!(locks_active(&b.state, t("2025-02-01"), &bad).is_err());
        assert!(
            locks_active(&b.state, t("2025-01-01"), &PageRequest::first(5))
                .unwrap()
                .items
                .is_empty()
        );
    }

    #[test]
    fn locks_active_gives_the_same_pages_whether_it_walks_or_asks_the_timeline() {
        // 200 deals, 3 locks each, starting on various days of January 2025,
        // some expiring, some released. Small pages give up the walk after
        // a few locks (and ask the timeline) where few bind; large ones
        // walk every lock.
        let mut lines = Vec::new();
        for d in 0..200u32 {
            let deal = format!("deal-{d:03}");
            lines.push(format!(
                r#"{{"specversion":"1.0","id":"o{d}","source":"urn:t","type":"deal.negotiation.opened","subject":"{deal}","time":"2025-01-01T00:00:00Z","data":{{"customer":"x","provider":"y","scope":"cloud-compute"}}}}"#
            ));
            if d % 50 == 7 {
                // A few locks of mid-2024: at 2024-06-15 they alone bind,
                // 150 locks apart, so small pages give up the walk.
                lines.push(format!(
                    r#"{{"specversion":"1.0","id":"g{d}-old","source":"urn:t","type":"deal.exclusivity.granted","subject":"{deal}","time":"2025-01-01T00:00:00Z","data":{{"lock_id":"lock-old","holder":"y","bound_party":"x","scope":"cloud-compute","kind":"exclusive","valid_from":"2024-06-01T00:00:00Z","valid_until":"2024-07-01T00:00:00Z"}}}}"#
                ));
            }
            for l in 0..3u32 {
                let day = 2 + (d * 7 + l * 5) % 25;
                let until = if (d + l) % 3 == 0 {
                    format!(r#","valid_until":"2025-01-{:02}T00:00:00Z""#, day + 3)
                } else {
                    String::new()
                };
                lines.push(format!(
                    r#"{{"specversion":"1.0","id":"g{d}-{l}","source":"urn:t","type":"deal.exclusivity.granted","subject":"{deal}","time":"2025-01-{day:02}T00:00:00Z","data":{{"lock_id":"lock-{l}","holder":"y","bound_party":"x","scope":"cloud-compute","kind":"exclusive","valid_from":"2025-01-{day:02}T00:00:00Z"{until}}}}}"#
                ));
                if until.is_empty() && (d + l) % 4 == 1 {
                    lines.push(format!(
                        r#"{{"specversion":"1.0","id":"r{d}-{l}","source":"urn:t","type":"deal.exclusivity.released","subject":"{deal}","time":"2025-01-{:02}T12:00:00Z","data":{{"lock_id":"lock-{l}","reason":"done"}}}}"#,
                        day + 2
                    ));
                }
            }
        }
        let b = build(&lines);
        assert_eq!(b.state.book().locks().count(), 604);
        assert!(b.state.book().locks().any(|l| l.ended.is_some()));
        for at in [
            "2024-06-15",
            "2024-12-31",
            "2025-01-03",
            "2025-01-05T06:00:00Z",
            "2025-01-10",
            "2025-01-20",
            "2025-01-28",
            "2025-02-15",
            "2030-01-01",
        ] {
            let at = t(at);
            let expected: Vec<(String, String)> = b
                .state
                .book()
                .locks()
                .filter(|l| l.active_at(at))
                .map(|l| (l.deal_id.to_string(), l.lock_id.to_string()))
                .collect();
            for limit in [1, 2, 5, 50] {
                let seen = all_active_locks(&b.state, at, limit);
                assert_eq!(seen, expected, "at {at}, pages of {limit}");
            }
        }
    }

    #[test]
    fn the_locks_walk_counts_the_terminated_deals_it_passes_over() {
        // 40 deals with a lock of 2024, terminated (so in the store), then
        // one open deal whose lock binds from 2025 on. At 2025-02-01 the
        // walk passes over the 40 (none of their locks can bind) before it
        // finds that lock: 41 steps. One lock wanted allows 32 steps, so
        // the walk gives up and the timeline answers; two allow 64.
        let mut lines = Vec::new();
        for d in 0..41u32 {
            let deal = format!("deal-{d:03}");
            let from = if d < 40 { "2024-03-01" } else { "2025-01-02" };
            lines.push(format!(
                r#"{{"specversion":"1.0","id":"o{d}","source":"urn:t","type":"deal.negotiation.opened","subject":"{deal}","time":"2025-01-01T00:00:00Z","data":{{"customer":"x","provider":"y","scope":"cloud-compute"}}}}"#
            ));
            lines.push(format!(
                r#"{{"specversion":"1.0","id":"g{d}","source":"urn:t","type":"deal.exclusivity.granted","subject":"{deal}","time":"2025-01-01T00:00:00Z","data":{{"lock_id":"lock","holder":"y","bound_party":"x","scope":"cloud-compute","kind":"exclusive","valid_from":"{from}T00:00:00Z"}}}}"#
            ));
            if d < 40 {
                lines.push(format!(
                    r#"{{"specversion":"1.0","id":"t{d}","source":"urn:t","type":"deal.terminated","subject":"{deal}","time":"2025-01-01T12:00:00Z","data":{{"terminated_by":"x","reason":"ended"}}}}"#
                ));
            }
        }
        let b = build(&lines);
        let book = b.state.book();
        assert_eq!(book.stored_deals(), 40);
        let at = t("2025-02-01");
        assert!(first_locks_walked(book, at, None, 1).is_none());
        let walked = first_locks_walked(book, at, None, 2).expect("64 steps are enough");
        assert_eq!(walked.len(), 1);
        assert_eq!(walked[0].deal_id.as_str(), "deal-040");
        let page = locks_active(&b.state, at, &PageRequest::first(1)).unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.next_cursor, None);
        assert_eq!(
            all_active_locks(&b.state, at, 1),
            [("deal-040".to_string(), "lock".to_string())]
        );
    }

    /// The scenario and 30 deals that grant exclusive locks (and rights of
    /// first refusal) over OpenAI to Microsoft, releasing some and ending
    /// others by termination: findings meet many locks at one
    /// finalization, some of them ended since.
    fn scenario_with_locks_over_openai() -> Vec<String> {
        let mut lines = scenario();
        for d in 0..30u32 {
            let deal = format!("extra-{d:02}");
            lines.push(format!(
                r#"{{"specversion":"1.0","id":"xo{d}","source":"urn:t","type":"deal.negotiation.opened","subject":"{deal}","time":"2024-06-01T00:00:00Z","data":{{"customer":"openai","provider":"microsoft","scope":"cloud-compute"}}}}"#
            ));
            for l in 0..4u32 {
                let day = 1 + (d + l * 7) % 27;
                lines.push(format!(
                    r#"{{"specversion":"1.0","id":"xg{d}-{l}","source":"urn:t","type":"deal.exclusivity.granted","subject":"{deal}","time":"2024-06-{day:02}T00:00:00Z","data":{{"lock_id":"l{l}","holder":"microsoft","bound_party":"openai","scope":"cloud-compute","kind":"{}","valid_from":"2024-06-{day:02}T00:00:00Z"}}}}"#,
                    if l % 2 == 0 { "exclusive" } else { "right-of-first-refusal" }
                ));
                if (d + l) % 3 == 0 {
                    lines.push(format!(
                        r#"{{"specversion":"1.0","id":"xr{d}-{l}","source":"urn:t","type":"deal.exclusivity.released","subject":"{deal}","time":"2025-0{}-01T00:00:00Z","data":{{"lock_id":"l{l}","reason":"done"}}}}"#,
                        1 + l
                    ));
                }
            }
            if d % 4 == 1 {
                lines.push(format!(
                    r#"{{"specversion":"1.0","id":"xt{d}","source":"urn:t","type":"deal.terminated","subject":"{deal}","time":"2025-03-15T00:00:00Z","data":{{"terminated_by":"openai","reason":"ended"}}}}"#
                ));
            }
        }
        lines
    }

    #[test]
    fn answers_are_the_same_whether_ended_locks_are_stored_or_kept() {
        let lines = scenario_with_locks_over_openai();
        let stored = build_with(&lines, true);
        let kept = build_with(&lines, false);
        assert_eq!(stored.state.book(), kept.state.book());
        assert!(
            kept.state
                .book()
                .locks()
                .filter(|l| l.ended.is_some())
                .count()
                > 40,
            "the ledger ends enough locks to tell"
        );
        for (id, _) in kept.state.book().iter() {
            assert_eq!(
                json(&deal_show(&stored.state, id).unwrap()),
                json(&deal_show(&kept.state, id).unwrap()),
                "deal {id}"
            );
        }
        for at in [
            "2019-06-01",
            "2024-06-15",
            "2025-01-15",
            "2025-02-15",
            "2025-06-01",
        ] {
            for limit in [1, 7, 100] {
                assert_eq!(
                    all_active_locks(&stored.state, t(at), limit),
                    all_active_locks(&kept.state, t(at), limit),
                    "at {at}, pages of {limit}"
                );
            }
        }
        let all = |b: &Built| {
            let filter = FindingFilter::default();
            json(&findings(&b.state, b, &filter, &PageRequest::first(MAX_PAGE_SIZE)).unwrap())
        };
        let found = all(&kept);
        // A lock that ended (its deal terminated) after a finalization it bound.
        assert!(found.contains(r#""lock":"extra-01/l0""#), "{found}");
        assert_eq!(all(&stored), found);
    }

    #[test]
    fn lock_answers_fail_when_ended_locks_cannot_be_read() {
        let store = std::sync::Arc::new(crate::index::MemorySegments::default());
        let b = build_in(&scenario_with_locks_over_openai(), Some(store.clone()));
        let at = t("2025-01-15");
        let page = PageRequest::first(100);
        assert!(deal_show(&b.state, &id("extra-01")).is_ok());
        assert!(locks_active(&b.state, at, &page).is_ok());
        store
            .fail_reads
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // extra-01's locks all ended (released, or by its termination).
        let err = deal_show(&b.state, &id("extra-01"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be read back"), "{err}");
        assert!(locks_active(&b.state, at, &page).is_err());
        let filter = FindingFilter::default();
        assert!(findings(&b.state, &b, &filter, &page).is_err());
    }

    #[test]
    fn findings_pages_hold_every_finding_of_one_finalization() {
        // Several findings share a time, kind, deal and entry (one
        // finalization, many locks): the cursor must tell them apart.
        let stored = build(&scenario_with_locks_over_openai());
        let whole = findings(
            &stored.state,
            &stored,
            &FindingFilter::default(),
            &PageRequest::first(MAX_PAGE_SIZE),
        )
        .unwrap();
        let at_coreweave = |f: &&Finding| {
            f.kind == "finalized_during_exclusive_lock"
                && f.deals
                    .first()
                    .is_some_and(|d| d.as_str() == "coreweave-openai-2025")
        };
        assert!(whole.items.iter().filter(at_coreweave).count() > 20);
        for limit in [1, 7] {
            let mut page = PageRequest::first(limit);
            let mut paged = Vec::new();
            for _ in 0..10_000 {
                let got =
                    findings(&stored.state, &stored, &FindingFilter::default(), &page).unwrap();
                paged.extend(got.items.iter().map(json));
                match got.next_cursor {
                    Some(cursor) => page.cursor = Some(cursor),
                    None => break,
                }
            }
            assert_eq!(
                paged,
                whole.items.iter().map(json).collect::<Vec<_>>(),
                "pages of {limit}"
            );
        }
    }

    /// An answer as JSON text, to compare answers of any query.
    fn json<T: serde::Serialize>(answer: &T) -> String {
        serde_json::to_string(answer).unwrap()
    }

    #[test]
    fn deal_show_lists_the_locks_in_force_over_its_parties_in_its_scope() {
        // Up to 2025-10-27: the exclusive lock is released, the right of
        // first refusal that replaced it is still in force.
        let lines: Vec<String> = scenario().into_iter().take(39).collect();
        let b = build(&lines);
        let show = deal_show(&b.state, &id("google-openai-2025")).unwrap();
        let binding: Vec<String> = show
            .locks_binding_parties
            .iter()
            .map(|l| format!("{}/{}", l.deal_id, l.lock_id))
            .collect();
        assert_eq!(binding, ["msft-openai-2019/azure-rofr"]);
        assert_eq!(show.locks_binding_parties_total, 1);
        assert!(show.locks_binding_parties[0].granted_by.is_some());
        // After its release on 2025-10-28: none.
        let b = build(&scenario());
        let show = deal_show(&b.state, &id("google-openai-2025")).unwrap();
        assert!(show.locks_binding_parties.is_empty());
        let msft = deal_show(&b.state, &id("msft-openai-2019")).unwrap();
        assert_eq!(msft.locks_granted.len(), 2);
        assert!(
            msft.locks_granted
                .iter()
                .all(|l| l.ended.as_ref().is_some_and(|e| e.entry.is_some()))
        );
    }

    #[test]
    fn finalizing_before_the_release_is_exactly_one_finding_naming_both_deals_and_the_lock() {
        let b = build(&finalized_before_release());
        let show = deal_show(&b.state, &id("google-openai-2025")).unwrap();
        assert_eq!(
            show.status,
            Status::Finalized,
            "the variant must be accepted by the fold"
        );
        let found = all_findings_of(&b, &FindingFilter::default());
        assert_eq!(found.len(), 1, "{found:#?}");
        let f = &found[0];
        assert_eq!(f.kind, "finalized_during_exclusive_lock");
        assert_eq!(f.deals, [id("google-openai-2025"), id("msft-openai-2019")]);
        assert_eq!(f.lock.as_deref(), Some("msft-openai-2019/azure-exclusive"));
        assert_eq!(f.at, t("2025-01-16T10:00:00Z"));
        assert_eq!(f.entries.len(), 3, "finalization, grant and release");
        for e in &f.entries {
            let stored = b
                .entry_at(Location {
                    partition: e.stream,
                    seq: e.seq,
                })
                .unwrap();
            assert_eq!(e.hash, stored.hash.to_string());
        }
        // Out of the time window: gone.
        let later = FindingFilter {
            from: Some(t("2025-02-01")),
            ..Default::default()
        };
        assert!(all_findings_of(&b, &later).is_empty());
    }

    #[test]
    fn backwards_time_backdating_termination_and_producer_findings() {
        let mut lines = scenario();
        // A late event dated before the deal's previous one.
        let mut v: serde_json::Value = serde_json::from_str(&lines[37]).unwrap(); // evt-0038 stargate amended
        v["id"] = "evt-9100".into();
        v["time"] = "2025-08-01T00:00:00Z".into();
        v["data"]["amendment_id"] = "sg-late".into();
        lines.push(v.to_string());
        // An event for the terminated deal, and a duplicate.
        let mut x: serde_json::Value = serde_json::from_str(&lines[9]).unwrap(); // evt-0010
        x["id"] = "evt-9101".into();
        x["time"] = "2025-02-01T00:00:00Z".into();
        x["data"]["proposal_id"] = "msc-p9".into();
        lines.push(x.to_string());
        lines.push(lines[0].clone());
        lines.push("not json".into());
        let b = build(&lines);
        let found = all_findings_of(&b, &FindingFilter::default());
        let kinds: Vec<&str> = found.iter().map(|f| f.kind.as_str()).collect();
        assert!(kinds.contains(&"time_backwards"), "{kinds:?}");
        assert!(kinds.contains(&"activity_after_termination"), "{kinds:?}");
        let producers: Vec<&Finding> = found
            .iter()
            .filter(|f| f.kind == "producer_rejections")
            .collect();
        let names: Vec<&str> = producers
            .iter()
            .filter_map(|f| f.source.as_deref())
            .collect();
        assert!(names.contains(&crate::index::UNKNOWN_SOURCE), "{names:?}");
        assert_eq!(
            producers.iter().map(|f| f.count).sum::<u64>(),
            3,
            "{producers:#?}"
        );
        assert!(!kinds.contains(&"backdated"), "not checked unless asked");
        // Every scenario event is years older than its 2026 record time.
        let backdated = FindingFilter {
            max_backdate_ms: Some(parse_duration_ms("7d").unwrap()),
            kind: Some("backdated".into()),
            ..Default::default()
        };
        assert_eq!(all_findings_of(&b, &backdated).len(), 42);
    }

    #[test]
    fn pages_walk_every_finding_and_deal_exactly_once() {
        let mut lines = scenario();
        for i in 0..25 {
            lines.push(format!("garbage {i}"));
        }
        let b = build(&lines);
        let filter = FindingFilter {
            max_backdate_ms: Some(0),
            ..Default::default()
        };
        let whole = all_findings_of(&b, &filter);
        assert!(whole.len() > 10);
        let mut walked = Vec::new();
        let mut request = PageRequest::first(3);
        loop {
            let page = findings(&b.state, &b, &filter, &request).unwrap();
            assert!(page.items.len() <= 3);
            walked.extend(page.items);
            match page.next_cursor {
                Some(c) => request.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(walked, whole);

        let all = deals_list(&b.state, &DealFilter::default(), &PageRequest::first(1000)).unwrap();
        let mut ids = Vec::new();
        let mut request = PageRequest::first(2);
        loop {
            let page = deals_list(&b.state, &DealFilter::default(), &request).unwrap();
            ids.extend(page.items.into_iter().map(|d| d.id));
            match page.next_cursor {
                Some(c) => request.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(ids, all.items.into_iter().map(|d| d.id).collect::<Vec<_>>());
        assert_eq!(ids.len(), 5);

        let history = deal_history(
            &b.state,
            &b,
            &id("google-openai-2025"),
            &PageRequest::first(1000),
        )
        .unwrap();
        let mut walked = Vec::new();
        let mut request = PageRequest::first(4);
        loop {
            let page = deal_history(&b.state, &b, &id("google-openai-2025"), &request).unwrap();
            walked.extend(page.items);
            match page.next_cursor {
                Some(c) => request.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(walked, history.items);
        assert_eq!(walked.len(), 10);
    }

    #[test]
    fn history_shows_rejections_with_reasons_and_duplicates_with_their_original() {
        let mut lines = scenario();
        lines.push(lines[10].clone()); // evt-0011 again
        let mut bad: serde_json::Value = serde_json::from_str(&lines[11]).unwrap();
        bad["id"] = "evt-9200".into();
        bad["data"]["proposer"] = "amazon".into();
        lines.push(bad.to_string());
        let b = build(&lines);
        let h = deal_history(
            &b.state,
            &b,
            &id("google-openai-2025"),
            &PageRequest::first(1000),
        )
        .unwrap()
        .items;
        let dup = h.iter().find(|e| e.verdict == "duplicate").unwrap();
        assert_eq!(dup.duplicate_of.as_ref().unwrap(), &h[0].entry);
        let rejected = h.iter().find(|e| e.verdict == "rejected").unwrap();
        // Proposed after the deal was signed (and by an outsider).
        assert_eq!(rejected.kind.as_deref(), Some("terms_locked"));
        assert!(
            rejected
                .reason
                .as_deref()
                .unwrap()
                .contains("after the deal was finalized")
        );
        assert_eq!(rejected.event_id.as_deref(), Some("evt-9200"));
        assert!(h.iter().all(|e| e.event.is_some()));
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let b = build(&scenario());
        let name = |e: QueryError| match e {
            QueryError::BadParameter { name, .. } => name,
            other => panic!("{other}"),
        };
        let big = PageRequest::first(MAX_PAGE_SIZE + 1);
        assert_eq!(
            name(deals_list(&b.state, &DealFilter::default(), &big).unwrap_err()),
            "limit"
        );
        let zero = PageRequest::first(0);
        assert_eq!(
            name(locks_active(&b.state, t("2025-01-01"), &zero).unwrap_err()),
            "limit"
        );
        let cursor = PageRequest {
            limit: None,
            cursor: Some("x".into()),
        };
        assert_eq!(
            name(deal_history(&b.state, &b, &id("google-openai-2025"), &cursor).unwrap_err()),
            "cursor"
        );
        let kind = FindingFilter {
            kind: Some("nope".into()),
            ..Default::default()
        };
        assert_eq!(
            name(findings(&b.state, &b, &kind, &PageRequest::default()).unwrap_err()),
            "kind"
        );
        assert_eq!(name(parse_status("open").unwrap_err()), "status");
        assert_eq!(
            name(parse_duration_ms("7 days").unwrap_err()),
            "max_backdate"
        );
        assert_eq!(parse_duration_ms("36h").unwrap(), 36 * 3_600_000);
        assert!(matches!(
            deal_show(&b.state, &id("no-such-deal")),
            Err(QueryError::UnknownDeal(_))
        ));
    }

    #[test]
    fn stats_count_rounds_time_to_finalize_and_types() {
        let b = build(&scenario());
        let s = stats(&b.state, &PageRequest::first(MAX_PAGE_SIZE)).unwrap();
        assert_eq!(s.overall.entries, 41);
        assert_eq!(s.overall.verdicts.accepted, 41);
        assert_eq!(s.overall.events_by_type["deal.negotiation.opened"], 5);
        assert_eq!(s.overall.finalized, 4);
        let google = s
            .deals
            .items
            .iter()
            .find(|d| d.id.as_str() == "google-openai-2025")
            .unwrap();
        assert_eq!(google.proposal_rounds, 6);
        assert_eq!(
            google.seconds_to_finalize,
            Some(
                (t("2025-05-28T15:00:00Z").as_datetime() - t("2024-11-12T17:00:00Z").as_datetime())
                    .num_seconds()
            )
        );
    }
}
