//! The deal fold: the state of every deal, rebuilt from its events.
//!
//! Why this module exists: [`crate::event`] checks what a single event can
//! check on its own (shapes, bounds, `end` after `start`). Whether an event
//! *makes sense* depends on the deal's history: who the parties are, which
//! proposals are open, whether the deal is already signed or terminated. This
//! module owns those rules. It folds a stream of decoded [`DealEvent`]s into a
//! [`DealBook`] and rejects, with a precise [`Rejection`], every event the
//! deal's history does not allow.
//!
//! This module is part of the pure core: no I/O, no clock, no async. The only
//! notion of time is each event's own business `time`. Every collection is
//! iterated (and serialized) in a deterministic order: the book's deals in
//! id order (a hash map for lookups, a `BTreeSet` of ids for order), the
//! per-deal maps as [`IdMap`]s sorted by id.
//!
//! The fold's contract:
//! - [`DealBook::apply`] either applies an event completely or, on `Err`,
//!   leaves the book exactly as it was. It first checks the event against an
//!   immutable view of the book ([`DealBook`]'s private `check`), then applies
//!   it with an infallible `commit`.
//! - Duplicate events (same CloudEvents `source` and `id`) are the ledger's
//!   concern, not the fold's; business time going backwards is not a
//!   rejection either (compliance reports it).
//! - Every per-deal collection is bounded by a named constant
//!   ([`MAX_PROPOSALS_PER_DEAL`], [`MAX_LOCKS_PER_DEAL`],
//!   [`MAX_AMENDMENTS_PER_DEAL`]); parties are bounded by the event limits.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

use crate::event::{
    Amended, Date, DealEvent, EventType, ExclusivityGranted, ExclusivityReleased, Finalized, Id,
    LockKind, NegotiationOpened, Payload, Signatory, Terminated, Terms, TermsAccepted,
    TermsCountered, TermsProposed, TermsRejected, Text, Timestamp, limits,
};
use crate::index::{SegmentRef, SegmentStore};
use crate::ledger::ScratchFailure;

/// Most proposals (including counter-proposals) one deal may hold.
pub const MAX_PROPOSALS_PER_DEAL: usize = 1_000;

/// Most exclusivity locks one deal may grant over its lifetime.
pub const MAX_LOCKS_PER_DEAL: usize = 100;

/// Most amendments one finalized deal may receive.
pub const MAX_AMENDMENTS_PER_DEAL: u32 = 1_000;

/// Most parties of one deal: customer, provider and at most
/// [`limits::MAX_LIST_LEN`] partners.
pub const MAX_PARTIES_PER_DEAL: usize = 2 + limits::MAX_LIST_LEN;

/// The reason recorded on locks that end because their deal was terminated.
pub const LOCK_END_REASON_TERMINATED: &str = "deal terminated";

mod amendments;
mod book;
mod id_map;
mod locks;
mod rejection;
#[cfg(test)]
mod tests;

pub use amendments::{AmendmentSet, MemoryAmendments, amendment_fingerprint};
pub use book::{DealBook, DealCounts, fold};
use id_map::{Either, merged};
pub use id_map::{IdMap, IdMapIter};
pub use locks::{DealLocks, LockEntry, LockWalk};
pub use rejection::Rejection;

// ---------------------------------------------------------------------------
// State.
// ---------------------------------------------------------------------------

/// Where a deal is in its lifecycle.
///
/// `Negotiating → Agreed → Finalized`, and from any of them `→ Terminated`,
/// which is final. A deal never returns to an earlier status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Opened; no proposal accepted yet.
    Negotiating,
    /// A proposal has been accepted; not yet signed.
    Agreed,
    /// Signed on an accepted proposal; terms change only by amendment.
    Finalized,
    /// Ended for good; no further events are accepted.
    Terminated,
}

impl Status {
    /// The lower-case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Negotiating => "negotiating",
            Status::Agreed => "agreed",
            Status::Finalized => "finalized",
            Status::Terminated => "terminated",
        }
    }
}

/// Honours width and alignment (`{:<12}`), as the CLI's tables ask.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Where a proposal stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProposalStatus {
    /// On the table: it may be countered, accepted or rejected.
    Open,
    /// Superseded by a counter-proposal.
    Countered {
        /// The counter-proposal that superseded it (its proposer is
        /// `proposals[by].proposer`).
        by: Id,
    },
    /// Accepted by another party.
    Accepted,
    /// Turned down by another party.
    Rejected,
}

impl fmt::Display for ProposalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProposalStatus::Open => f.write_str("open"),
            ProposalStatus::Countered { by } => write!(f, "countered by proposal {by}"),
            ProposalStatus::Accepted => f.write_str("accepted"),
            ProposalStatus::Rejected => f.write_str("rejected"),
        }
    }
}

/// One proposal or counter-proposal of a deal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// Identifier, unique within the deal.
    pub id: Id,
    /// The party that made it.
    pub proposer: Id,
    /// The terms proposed.
    pub terms: Terms,
    /// Where it stands.
    pub status: ProposalStatus,
    /// When it was made (business time).
    pub proposed_at: Timestamp,
    /// The proposal it counters, for counter-proposals.
    pub counters: Option<Id>,
}

/// The acceptance of a proposal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    /// The proposal accepted.
    pub proposal_id: Id,
    /// Its terms.
    pub terms: Terms,
    /// The party that accepted it (never its proposer).
    pub accepted_by: Id,
    /// When (business time).
    pub at: Timestamp,
}

/// The signing of a deal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finalization {
    /// The accepted proposal the deal was signed on.
    pub proposal_id: Id,
    /// When the contract takes effect.
    pub effective_date: Date,
    /// Who signed, each for a party of the deal.
    pub signatories: Vec<Signatory>,
    /// When it was signed (business time).
    pub at: Timestamp,
    /// The terms as the producer stated them in the event, if it did
    /// (compliance compares them with the accepted proposal's terms).
    pub stated_terms: Option<Terms>,
}

/// The end of a deal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Termination {
    /// When (business time).
    pub at: Timestamp,
    /// The party that ended it.
    pub by: Id,
    /// Why.
    pub reason: Text,
}

/// How and when a lock ended before (or instead of) expiring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockEnd {
    /// When (business time).
    pub at: Timestamp,
    /// Why: the release reason, or [`LOCK_END_REASON_TERMINATED`].
    pub reason: Text,
}

/// An exclusivity lock granted by a deal: `holder` has a lock over
/// `bound_party` in `scope`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lock {
    /// The deal that granted it.
    pub deal_id: Id,
    /// Identifier, unique within the deal.
    pub lock_id: Id,
    /// The party holding the lock.
    pub holder: Id,
    /// The party it binds.
    pub bound_party: Id,
    /// What it covers.
    pub scope: Id,
    /// Exclusive or right of first refusal.
    pub kind: LockKind,
    /// Start of validity (inclusive).
    pub valid_from: Timestamp,
    /// End of validity (exclusive), if fixed.
    pub valid_until: Option<Timestamp>,
    /// When it was granted (the grant event's time).
    pub granted_at: Timestamp,
    /// Set when it was released or its deal terminated.
    pub ended: Option<LockEnd>,
}

impl Lock {
    /// Whether the lock binds at business time `t`: it has started
    /// (`valid_from <= t`), not expired (`t < valid_until`) and not ended
    /// (`t < ended.at`).
    pub fn active_at(&self, t: Timestamp) -> bool {
        self.valid_from <= t
            && self.valid_until.is_none_or(|until| t < until)
            && self.ended.as_ref().is_none_or(|end| t < end.at)
    }
}

/// Serde support for [`EventType`] as its CloudEvents `type` string.
mod event_type_serde {
    use serde::de::{self, Deserialize, Deserializer};
    use serde::ser::Serializer;

    use crate::event::EventType;

    pub fn serialize<S: Serializer>(t: &EventType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EventType, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        EventType::parse(&s)
            .ok_or_else(|| de::Error::custom(format!("{s:?} is not a deal event type")))
    }
}

/// What [`Deal::check`] computed that [`Deal::commit`] needs again, so the
/// fold computes it once per event.
#[derive(Debug, Default)]
struct Checked {
    /// The amendment's fingerprint ([`amendment_fingerprint`]), for
    /// `deal.amended`.
    amendment: Option<u64>,
}

/// The state of one deal, as folded from its events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deal {
    /// The deal's identifier (the events' `subject`).
    pub id: Id,
    /// What the deal is about.
    pub scope: Id,
    /// Human description, if the opening event gave one.
    pub description: Option<Text>,
    /// The party buying capacity.
    pub customer: Id,
    /// The party selling it.
    pub provider: Id,
    /// Further parties.
    pub partners: Vec<Id>,
    /// Where the deal is in its lifecycle.
    pub status: Status,
    /// When negotiation opened (business time).
    pub opened_at: Timestamp,
    /// Every proposal and counter-proposal, by id.
    pub proposals: IdMap<Proposal>,
    /// The latest acceptance, if any.
    pub accepted: Option<Accepted>,
    /// The signing, once finalized.
    pub finalization: Option<Finalization>,
    /// The terms in force: the accepted proposal's, then the signed
    /// proposal's, then the latest amendment's.
    pub current_terms: Option<Terms>,
    /// How many amendments were applied (at most
    /// [`MAX_AMENDMENTS_PER_DEAL`]; their ids are remembered by the book's
    /// [`AmendmentSet`]).
    pub amendment_count: u32,
    /// Every lock this deal granted, by id.
    pub locks: DealLocks,
    /// The end, once terminated.
    pub termination: Option<Termination>,
    /// How many events were applied to this deal.
    pub event_count: u64,
    /// The business time of the last applied event (not necessarily the
    /// latest: time may go backwards).
    pub last_event_at: Timestamp,
    /// The type of the last applied event.
    #[serde(with = "event_type_serde")]
    pub last_event_type: EventType,
}

impl Deal {
    /// What statistics count of this deal.
    pub fn counts(&self) -> DealCounts {
        DealCounts {
            status: self.status,
            opened_at: self.opened_at,
            finalized_at: self.finalization.as_ref().map(|f| f.at),
            proposals: self.proposals.len(),
        }
    }

    /// A deal as `deal.negotiation.opened` creates it, before any event is counted.
    fn open(id: Id, opened: &NegotiationOpened, at: Timestamp) -> Deal {
        Deal {
            id,
            scope: opened.scope.clone(),
            description: opened.description.clone(),
            customer: opened.customer.clone(),
            provider: opened.provider.clone(),
            partners: opened.partners.as_slice().to_vec(),
            status: Status::Negotiating,
            opened_at: at,
            proposals: IdMap::new(),
            accepted: None,
            finalization: None,
            current_terms: None,
            amendment_count: 0,
            locks: DealLocks::default(),
            termination: None,
            event_count: 0,
            last_event_at: at,
            last_event_type: EventType::NegotiationOpened,
        }
    }

    /// Every party: the customer, the provider, then the partners in order.
    pub fn parties(&self) -> impl Iterator<Item = &Id> {
        [&self.customer, &self.provider]
            .into_iter()
            .chain(self.partners.iter())
    }

    /// Whether `party` is a party of this deal.
    pub fn is_party(&self, party: &Id) -> bool {
        self.parties().any(|p| p == party)
    }

    /// Rejects `party` at `field` unless it is a party of this deal.
    fn require_party(&self, field: &str, party: &Id) -> Result<(), Rejection> {
        self.require_party_at(|| field.to_owned(), party)
    }

    /// [`Deal::require_party`] for a field whose path is built (an indexed
    /// list item) only when the party is refused: the fold runs for every
    /// event, and accepted ones should not pay for a message.
    fn require_party_at(
        &self,
        field: impl FnOnce() -> String,
        party: &Id,
    ) -> Result<(), Rejection> {
        if self.is_party(party) {
            Ok(())
        } else {
            Err(Rejection::NotAParty {
                deal_id: self.id.clone(),
                field: field(),
                party: party.clone(),
                parties: self.parties().cloned().collect(),
            })
        }
    }

    /// Rejects proposal-level events (propose, counter, accept, reject) once
    /// the deal is finalized.
    fn require_terms_open(&self, event_type: EventType) -> Result<(), Rejection> {
        match &self.finalization {
            None => Ok(()),
            Some(f) => Err(Rejection::TermsLocked {
                deal_id: self.id.clone(),
                event_type,
                finalized_at: f.at,
            }),
        }
    }

    /// The proposal `proposal_id` named at `field`, which must be open and
    /// made by a party other than `actor` (named at `actor_field`).
    fn open_proposal_of_other(
        &self,
        field: &str,
        proposal_id: &Id,
        actor_field: &str,
        actor: &Id,
    ) -> Result<&Proposal, Rejection> {
        let proposal =
            self.proposals
                .get(proposal_id)
                .ok_or_else(|| Rejection::UnknownProposal {
                    deal_id: self.id.clone(),
                    field: field.to_string(),
                    proposal_id: proposal_id.clone(),
                })?;
        if proposal.status != ProposalStatus::Open {
            return Err(Rejection::ProposalNotOpen {
                deal_id: self.id.clone(),
                field: field.to_string(),
                proposal_id: proposal_id.clone(),
                status: proposal.status.clone(),
            });
        }
        if proposal.proposer == *actor {
            return Err(Rejection::OwnProposal {
                deal_id: self.id.clone(),
                field: actor_field.to_string(),
                party: actor.clone(),
                proposal_id: proposal_id.clone(),
            });
        }
        Ok(proposal)
    }

    /// Rejects a new proposal id that is taken, or a proposal over the limit.
    fn require_new_proposal(&self, proposal_id: &Id) -> Result<(), Rejection> {
        if self.proposals.contains_key(proposal_id) {
            return Err(Rejection::ProposalExists {
                deal_id: self.id.clone(),
                proposal_id: proposal_id.clone(),
            });
        }
        if self.proposals.len() >= MAX_PROPOSALS_PER_DEAL {
            return Err(Rejection::TooManyProposals {
                deal_id: self.id.clone(),
                limit: MAX_PROPOSALS_PER_DEAL,
            });
        }
        Ok(())
    }

    /// Checks `event` (for this deal, which exists and is not terminated)
    /// against the deal's history. Never mutates. What the check computed
    /// and the commit needs again comes back in [`Checked`].
    fn check(
        &self,
        event: &DealEvent,
        amendments: &dyn AmendmentSet,
    ) -> Result<Checked, Rejection> {
        let checked = Checked {
            amendment: match &event.payload {
                Payload::Amended(a) => Some(amendment_fingerprint(&self.id, &a.amendment_id)),
                _ => None,
            },
        };
        self.check_rules(event, &checked, amendments)?;
        Ok(checked)
    }

    /// The rules of [`Deal::check`], given what it computed.
    fn check_rules(
        &self,
        event: &DealEvent,
        checked: &Checked,
        amendments: &dyn AmendmentSet,
    ) -> Result<(), Rejection> {
        let t = event.time;
        match &event.payload {
            Payload::NegotiationOpened(_) => Err(Rejection::AlreadyOpened {
                deal_id: self.id.clone(),
                opened_at: self.opened_at,
            }),
            Payload::TermsProposed(TermsProposed {
                proposal_id,
                proposer,
                terms: _,
            }) => {
                self.require_terms_open(EventType::TermsProposed)?;
                self.require_party("data.proposer", proposer)?;
                self.require_new_proposal(proposal_id)
            }
            Payload::TermsCountered(TermsCountered {
                proposal_id,
                counters,
                proposer,
                terms: _,
            }) => {
                self.require_terms_open(EventType::TermsCountered)?;
                self.require_party("data.proposer", proposer)?;
                self.require_new_proposal(proposal_id)?;
                self.open_proposal_of_other("data.counters", counters, "data.proposer", proposer)?;
                Ok(())
            }
            Payload::TermsAccepted(TermsAccepted {
                proposal_id,
                accepted_by,
            }) => {
                self.require_terms_open(EventType::TermsAccepted)?;
                self.require_party("data.accepted_by", accepted_by)?;
                self.open_proposal_of_other(
                    "data.proposal_id",
                    proposal_id,
                    "data.accepted_by",
                    accepted_by,
                )?;
                Ok(())
            }
            Payload::TermsRejected(TermsRejected {
                proposal_id,
                rejected_by,
                reason: _,
            }) => {
                self.require_terms_open(EventType::TermsRejected)?;
                self.require_party("data.rejected_by", rejected_by)?;
                self.open_proposal_of_other(
                    "data.proposal_id",
                    proposal_id,
                    "data.rejected_by",
                    rejected_by,
                )?;
                Ok(())
            }
            Payload::ExclusivityGranted(g) => {
                self.require_party("data.holder", &g.holder)?;
                self.require_party("data.bound_party", &g.bound_party)?;
                if self.locks.contains(&g.lock_id) {
                    return Err(Rejection::LockExists {
                        deal_id: self.id.clone(),
                        lock_id: g.lock_id.clone(),
                    });
                }
                if self.locks.len() >= MAX_LOCKS_PER_DEAL {
                    return Err(Rejection::TooManyLocks {
                        deal_id: self.id.clone(),
                        limit: MAX_LOCKS_PER_DEAL,
                    });
                }
                Ok(())
            }
            Payload::ExclusivityReleased(ExclusivityReleased { lock_id, reason: _ }) => {
                // Ended locks are checked by their end time alone: the fold
                // never reads a lock back from the store.
                if let Some(ended_at) = self.locks.ended_at(lock_id) {
                    return Err(Rejection::LockEnded {
                        deal_id: self.id.clone(),
                        lock_id: lock_id.clone(),
                        ended_at,
                    });
                }
                let lock = self
                    .locks
                    .held
                    .get(lock_id)
                    .ok_or_else(|| Rejection::UnknownLock {
                        deal_id: self.id.clone(),
                        lock_id: lock_id.clone(),
                    })?;
                if t < lock.valid_from {
                    return Err(Rejection::LockNotStarted {
                        deal_id: self.id.clone(),
                        lock_id: lock_id.clone(),
                        valid_from: lock.valid_from,
                        at: t,
                    });
                }
                if let Some(until) = lock.valid_until
                    && until <= t
                {
                    return Err(Rejection::LockExpired {
                        deal_id: self.id.clone(),
                        lock_id: lock_id.clone(),
                        valid_until: until,
                        at: t,
                    });
                }
                debug_assert!(lock.active_at(t));
                Ok(())
            }
            Payload::Finalized(Finalized {
                proposal_id,
                signatories,
                effective_date: _,
                terms: _,
            }) => {
                if let Some(f) = &self.finalization {
                    return Err(Rejection::AlreadyFinalized {
                        deal_id: self.id.clone(),
                        finalized_at: f.at,
                    });
                }
                if self.accepted.is_none() {
                    return Err(Rejection::NoAcceptedProposal {
                        deal_id: self.id.clone(),
                    });
                }
                let proposal =
                    self.proposals
                        .get(proposal_id)
                        .ok_or_else(|| Rejection::UnknownProposal {
                            deal_id: self.id.clone(),
                            field: "data.proposal_id".to_string(),
                            proposal_id: proposal_id.clone(),
                        })?;
                if proposal.status != ProposalStatus::Accepted {
                    return Err(Rejection::ProposalNotAccepted {
                        deal_id: self.id.clone(),
                        proposal_id: proposal_id.clone(),
                        status: proposal.status.clone(),
                    });
                }
                for (i, s) in signatories.as_slice().iter().enumerate() {
                    self.require_party_at(|| format!("data.signatories[{i}].party"), &s.party)?;
                }
                Ok(())
            }
            Payload::Amended(Amended {
                amendment_id,
                agreed_by,
                terms: _,
                reason: _,
            }) => {
                if self.status != Status::Finalized {
                    return Err(Rejection::NotFinalized {
                        deal_id: self.id.clone(),
                        status: self.status,
                    });
                }
                for (i, party) in agreed_by.as_slice().iter().enumerate() {
                    self.require_party_at(|| format!("data.agreed_by[{i}]"), party)?;
                }
                let fingerprint = checked
                    .amendment
                    .expect("check computes an amendment's fingerprint");
                if amendments.contains(fingerprint) {
                    return Err(Rejection::AmendmentExists {
                        deal_id: self.id.clone(),
                        amendment_id: amendment_id.clone(),
                    });
                }
                if self.amendment_count >= MAX_AMENDMENTS_PER_DEAL {
                    return Err(Rejection::TooManyAmendments {
                        deal_id: self.id.clone(),
                        limit: MAX_AMENDMENTS_PER_DEAL,
                    });
                }
                Ok(())
            }
            Payload::Terminated(Terminated {
                terminated_by,
                reason: _,
            }) => self.require_party("data.terminated_by", terminated_by),
        }
    }

    /// Applies `event`, which [`Deal::check`] accepted (`checked`: what it
    /// computed). Infallible.
    fn commit(&mut self, event: &DealEvent, checked: Checked, amendments: &mut dyn AmendmentSet) {
        let t = event.time;
        match &event.payload {
            Payload::NegotiationOpened(_) => {
                // Creation happens in `DealBook::commit`; only the counters below apply.
                debug_assert_eq!(self.event_count, 0);
            }
            Payload::TermsProposed(p) => {
                let proposal = Proposal {
                    id: p.proposal_id.clone(),
                    proposer: p.proposer.clone(),
                    terms: p.terms.clone(),
                    status: ProposalStatus::Open,
                    proposed_at: t,
                    counters: None,
                };
                let previous = self.proposals.insert(p.proposal_id.clone(), proposal);
                assert!(previous.is_none(), "checked: proposal id is new");
            }
            Payload::TermsCountered(c) => {
                let countered = self
                    .proposals
                    .get_mut(&c.counters)
                    .expect("checked: countered proposal exists");
                countered.status = ProposalStatus::Countered {
                    by: c.proposal_id.clone(),
                };
                let proposal = Proposal {
                    id: c.proposal_id.clone(),
                    proposer: c.proposer.clone(),
                    terms: c.terms.clone(),
                    status: ProposalStatus::Open,
                    proposed_at: t,
                    counters: Some(c.counters.clone()),
                };
                let previous = self.proposals.insert(c.proposal_id.clone(), proposal);
                assert!(previous.is_none(), "checked: proposal id is new");
            }
            Payload::TermsAccepted(a) => {
                let proposal = self
                    .proposals
                    .get_mut(&a.proposal_id)
                    .expect("checked: accepted proposal exists");
                proposal.status = ProposalStatus::Accepted;
                self.accepted = Some(Accepted {
                    proposal_id: a.proposal_id.clone(),
                    terms: proposal.terms.clone(),
                    accepted_by: a.accepted_by.clone(),
                    at: t,
                });
                self.current_terms = Some(proposal.terms.clone());
                self.status = Status::Agreed;
            }
            Payload::TermsRejected(r) => {
                let proposal = self
                    .proposals
                    .get_mut(&r.proposal_id)
                    .expect("checked: rejected proposal exists");
                proposal.status = ProposalStatus::Rejected;
            }
            Payload::ExclusivityGranted(g) => {
                let lock = self.lock_from_grant(g, t);
                self.locks.grant(lock);
            }
            Payload::ExclusivityReleased(r) => {
                self.locks.end(
                    &r.lock_id,
                    LockEnd {
                        at: t,
                        reason: r.reason.clone(),
                    },
                );
            }
            Payload::Finalized(f) => {
                let terms = self.proposals[&f.proposal_id].terms.clone();
                self.finalization = Some(Finalization {
                    proposal_id: f.proposal_id.clone(),
                    effective_date: f.effective_date,
                    signatories: f.signatories.as_slice().to_vec(),
                    at: t,
                    stated_terms: f.terms.clone(),
                });
                self.current_terms = Some(terms);
                self.status = Status::Finalized;
            }
            Payload::Amended(a) => {
                self.current_terms = Some(a.terms.clone());
                self.amendment_count += 1;
                let fingerprint = checked
                    .amendment
                    .expect("check computed the amendment's fingerprint");
                debug_assert_eq!(
                    fingerprint,
                    amendment_fingerprint(&self.id, &a.amendment_id)
                );
                debug_assert!(
                    !amendments.contains(fingerprint),
                    "checked: amendment id is new"
                );
                amendments.insert(fingerprint);
            }
            Payload::Terminated(x) => {
                self.termination = Some(Termination {
                    at: t,
                    by: x.terminated_by.clone(),
                    reason: x.reason.clone(),
                });
                self.status = Status::Terminated;
                self.locks.end_all(&LockEnd {
                    at: t,
                    reason: Text::new(LOCK_END_REASON_TERMINATED).expect("a valid text"),
                });
            }
        }
        self.event_count += 1;
        self.last_event_at = t;
        self.last_event_type = event.event_type();
    }

    fn lock_from_grant(&self, g: &ExclusivityGranted, at: Timestamp) -> Lock {
        Lock {
            deal_id: self.id.clone(),
            lock_id: g.lock_id.clone(),
            holder: g.holder.clone(),
            bound_party: g.bound_party.clone(),
            scope: g.scope.clone(),
            kind: g.kind,
            valid_from: g.valid_from,
            valid_until: g.valid_until,
            granted_at: at,
            ended: None,
        }
    }

    /// Asserts every invariant of a deal the fold produced. Called after
    /// each commit in debug builds and by the tests.
    fn assert_invariants(&self) {
        let parties: Vec<&Id> = self.parties().collect();
        assert!(parties.len() <= MAX_PARTIES_PER_DEAL);
        for (i, p) in parties.iter().enumerate() {
            assert!(!parties[..i].contains(p), "party {p} named twice");
        }
        assert!(self.event_count >= 1);
        assert!(self.proposals.len() <= MAX_PROPOSALS_PER_DEAL);
        assert!(self.locks.len() <= MAX_LOCKS_PER_DEAL);
        assert!(self.amendment_count <= MAX_AMENDMENTS_PER_DEAL);

        for (id, p) in &self.proposals {
            assert_eq!(*id, p.id);
            assert!(self.is_party(&p.proposer));
            if let Some(c) = &p.counters {
                assert!(self.proposals.contains_key(c));
            }
            if let ProposalStatus::Countered { by } = &p.status {
                let counter = &self.proposals[by];
                assert_eq!(counter.counters.as_ref(), Some(id));
                assert_ne!(counter.proposer, p.proposer);
            }
        }
        if let Some(a) = &self.accepted {
            let p = &self.proposals[&a.proposal_id];
            assert_eq!(p.status, ProposalStatus::Accepted);
            assert_ne!(a.accepted_by, p.proposer, "accepted by its own proposer");
            assert!(self.is_party(&a.accepted_by));
        }
        if let Some(f) = &self.finalization {
            assert_eq!(
                self.proposals[&f.proposal_id].status,
                ProposalStatus::Accepted
            );
            assert!(f.signatories.iter().all(|s| self.is_party(&s.party)));
        }
        self.locks.assert_invariants(self);

        match self.status {
            Status::Negotiating => {
                assert!(self.accepted.is_none() && self.finalization.is_none());
                assert!(self.current_terms.is_none() && self.termination.is_none());
                assert_eq!(self.amendment_count, 0);
            }
            Status::Agreed => {
                assert!(self.accepted.is_some() && self.current_terms.is_some());
                assert!(self.finalization.is_none() && self.termination.is_none());
                assert_eq!(self.amendment_count, 0);
            }
            Status::Finalized => {
                assert!(self.accepted.is_some() && self.finalization.is_some());
                assert!(self.current_terms.is_some() && self.termination.is_none());
            }
            Status::Terminated => {
                assert!(self.termination.is_some());
                assert!(self.locks.not_ended().next().is_none());
            }
        }
    }
}
