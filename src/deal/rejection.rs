//! Why the fold refuses an event: `Rejection`, with the deal, ids and
//! times it names, and the event field each one points at.

use super::*;

fn join(ids: &[Id]) -> String {
    ids.iter().map(Id::as_str).collect::<Vec<_>>().join(", ")
}

/// Why the fold refused an event. Every variant names the deal and the field
/// at fault ([`Rejection::field`]); [`Rejection::kind`] gives a stable code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The deal was never opened and the event is not its opening.
    #[error(
        "deal {deal_id}: type: {event_type} for a deal that was never opened; expected deal.negotiation.opened as the deal's first event"
    )]
    NotOpened {
        /// The deal.
        deal_id: Id,
        /// The type received.
        event_type: EventType,
    },
    /// `deal.negotiation.opened` for a deal that already exists.
    #[error(
        "deal {deal_id}: type: deal.negotiation.opened but the deal was already opened at {opened_at}; expected a new deal id"
    )]
    AlreadyOpened {
        /// The deal.
        deal_id: Id,
        /// When it was first opened.
        opened_at: Timestamp,
    },
    /// Any event after the deal was terminated.
    #[error(
        "deal {deal_id}: type: {event_type} after the deal was terminated at {terminated_at}; expected no further events"
    )]
    DealTerminated {
        /// The deal.
        deal_id: Id,
        /// The type received.
        event_type: EventType,
        /// When it was terminated.
        terminated_at: Timestamp,
    },
    /// A party named in the event is not a party of the deal.
    #[error(
        "deal {deal_id}: {field}: {party} is not a party of the deal; expected one of {}",
        join(parties)
    )]
    NotAParty {
        /// The deal.
        deal_id: Id,
        /// Path of the field, e.g. `data.accepted_by`.
        field: String,
        /// The party named.
        party: Id,
        /// The deal's parties.
        parties: Vec<Id>,
    },
    /// A proposal, counter, acceptance or rejection after finalization.
    #[error(
        "deal {deal_id}: type: {event_type} after the deal was finalized at {finalized_at}; expected deal.amended to change a finalized deal's terms"
    )]
    TermsLocked {
        /// The deal.
        deal_id: Id,
        /// The type received.
        event_type: EventType,
        /// When it was finalized.
        finalized_at: Timestamp,
    },
    /// A new proposal reuses a proposal id of the deal.
    #[error(
        "deal {deal_id}: data.proposal_id: proposal {proposal_id} already exists; expected a proposal id new within the deal"
    )]
    ProposalExists {
        /// The deal.
        deal_id: Id,
        /// The proposal id reused.
        proposal_id: Id,
    },
    /// The deal already holds [`MAX_PROPOSALS_PER_DEAL`] proposals.
    #[error(
        "deal {deal_id}: data.proposal_id: the deal already has {limit} proposals; expected at most {limit}"
    )]
    TooManyProposals {
        /// The deal.
        deal_id: Id,
        /// The limit.
        limit: usize,
    },
    /// The event names a proposal the deal does not have.
    #[error(
        "deal {deal_id}: {field}: no proposal {proposal_id} in this deal; expected an existing proposal"
    )]
    UnknownProposal {
        /// The deal.
        deal_id: Id,
        /// Path of the field, e.g. `data.counters`.
        field: String,
        /// The proposal named.
        proposal_id: Id,
    },
    /// A counter, acceptance or rejection of a proposal that is not open.
    #[error(
        "deal {deal_id}: {field}: proposal {proposal_id} is {status}; expected an open proposal"
    )]
    ProposalNotOpen {
        /// The deal.
        deal_id: Id,
        /// Path of the field, e.g. `data.proposal_id`.
        field: String,
        /// The proposal named.
        proposal_id: Id,
        /// Where it stands.
        status: ProposalStatus,
    },
    /// A party counters, accepts or rejects its own proposal.
    #[error(
        "deal {deal_id}: {field}: {party} made proposal {proposal_id} itself; expected another party (a counter, acceptance or rejection answers an open proposal of the other party)"
    )]
    OwnProposal {
        /// The deal.
        deal_id: Id,
        /// Path of the acting party's field, e.g. `data.accepted_by`.
        field: String,
        /// The party.
        party: Id,
        /// Its proposal.
        proposal_id: Id,
    },
    /// A grant reuses a lock id of the deal.
    #[error(
        "deal {deal_id}: data.lock_id: lock {lock_id} already exists; expected a lock id new within the deal"
    )]
    LockExists {
        /// The deal.
        deal_id: Id,
        /// The lock id reused.
        lock_id: Id,
    },
    /// The deal already granted [`MAX_LOCKS_PER_DEAL`] locks.
    #[error(
        "deal {deal_id}: data.lock_id: the deal already granted {limit} locks; expected at most {limit}"
    )]
    TooManyLocks {
        /// The deal.
        deal_id: Id,
        /// The limit.
        limit: usize,
    },
    /// A release of a lock the deal never granted.
    #[error(
        "deal {deal_id}: data.lock_id: no lock {lock_id} in this deal; expected a lock granted by this deal"
    )]
    UnknownLock {
        /// The deal.
        deal_id: Id,
        /// The lock named.
        lock_id: Id,
    },
    /// A release of a lock that already ended.
    #[error(
        "deal {deal_id}: data.lock_id: lock {lock_id} already ended at {ended_at}; expected an active lock"
    )]
    LockEnded {
        /// The deal.
        deal_id: Id,
        /// The lock.
        lock_id: Id,
        /// When it ended.
        ended_at: Timestamp,
    },
    /// A release before the lock's validity starts.
    #[error(
        "deal {deal_id}: data.lock_id: lock {lock_id} is not yet valid at {at} (valid from {valid_from}); expected an active lock"
    )]
    LockNotStarted {
        /// The deal.
        deal_id: Id,
        /// The lock.
        lock_id: Id,
        /// When its validity starts.
        valid_from: Timestamp,
        /// The release event's time.
        at: Timestamp,
    },
    /// A release at or after the lock's validity ended.
    #[error(
        "deal {deal_id}: data.lock_id: lock {lock_id} expired at {valid_until}, before the release at {at}; expected an active lock"
    )]
    LockExpired {
        /// The deal.
        deal_id: Id,
        /// The lock.
        lock_id: Id,
        /// When its validity ended.
        valid_until: Timestamp,
        /// The release event's time.
        at: Timestamp,
    },
    /// `deal.finalized` before any proposal was accepted.
    #[error(
        "deal {deal_id}: data.proposal_id: no proposal of the deal has been accepted; expected deal.terms.accepted before deal.finalized"
    )]
    NoAcceptedProposal {
        /// The deal.
        deal_id: Id,
    },
    /// `deal.finalized` names a proposal that was not accepted.
    #[error(
        "deal {deal_id}: data.proposal_id: proposal {proposal_id} is {status}; expected an accepted proposal of the deal"
    )]
    ProposalNotAccepted {
        /// The deal.
        deal_id: Id,
        /// The proposal named.
        proposal_id: Id,
        /// Where it stands.
        status: ProposalStatus,
    },
    /// A second `deal.finalized`.
    #[error(
        "deal {deal_id}: type: deal.finalized but the deal was already finalized at {finalized_at}; expected deal.amended to change its terms"
    )]
    AlreadyFinalized {
        /// The deal.
        deal_id: Id,
        /// When it was finalized.
        finalized_at: Timestamp,
    },
    /// `deal.amended` for a deal that is not finalized.
    #[error(
        "deal {deal_id}: type: deal.amended while the deal is {status}; expected a finalized deal (before that, terms change through proposals)"
    )]
    NotFinalized {
        /// The deal.
        deal_id: Id,
        /// Its status.
        status: Status,
    },
    /// An amendment reuses an amendment id of the deal.
    #[error(
        "deal {deal_id}: data.amendment_id: amendment {amendment_id} was already applied; expected an amendment id new within the deal"
    )]
    AmendmentExists {
        /// The deal.
        deal_id: Id,
        /// The amendment id reused.
        amendment_id: Id,
    },
    /// The deal already received [`MAX_AMENDMENTS_PER_DEAL`] amendments.
    #[error(
        "deal {deal_id}: data.amendment_id: the deal already has {limit} amendments; expected at most {limit}"
    )]
    TooManyAmendments {
        /// The deal.
        deal_id: Id,
        /// The limit.
        limit: u32,
    },
}

impl Rejection {
    /// Every [`Rejection::kind`] code, in declaration order (for
    /// pre-registering metrics).
    pub const KINDS: [&'static str; 22] = [
        "not_opened",
        "already_opened",
        "deal_terminated",
        "not_a_party",
        "terms_locked",
        "proposal_exists",
        "too_many_proposals",
        "unknown_proposal",
        "proposal_not_open",
        "own_proposal",
        "lock_exists",
        "too_many_locks",
        "unknown_lock",
        "lock_ended",
        "lock_not_started",
        "lock_expired",
        "no_accepted_proposal",
        "proposal_not_accepted",
        "already_finalized",
        "not_finalized",
        "amendment_exists",
        "too_many_amendments",
    ];

    /// A stable snake_case code for metrics and machine consumers; one of
    /// [`Rejection::KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::NotOpened { .. } => "not_opened",
            Rejection::AlreadyOpened { .. } => "already_opened",
            Rejection::DealTerminated { .. } => "deal_terminated",
            Rejection::NotAParty { .. } => "not_a_party",
            Rejection::TermsLocked { .. } => "terms_locked",
            Rejection::ProposalExists { .. } => "proposal_exists",
            Rejection::TooManyProposals { .. } => "too_many_proposals",
            Rejection::UnknownProposal { .. } => "unknown_proposal",
            Rejection::ProposalNotOpen { .. } => "proposal_not_open",
            Rejection::OwnProposal { .. } => "own_proposal",
            Rejection::LockExists { .. } => "lock_exists",
            Rejection::TooManyLocks { .. } => "too_many_locks",
            Rejection::UnknownLock { .. } => "unknown_lock",
            Rejection::LockEnded { .. } => "lock_ended",
            Rejection::LockNotStarted { .. } => "lock_not_started",
            Rejection::LockExpired { .. } => "lock_expired",
            Rejection::NoAcceptedProposal { .. } => "no_accepted_proposal",
            Rejection::ProposalNotAccepted { .. } => "proposal_not_accepted",
            Rejection::AlreadyFinalized { .. } => "already_finalized",
            Rejection::NotFinalized { .. } => "not_finalized",
            Rejection::AmendmentExists { .. } => "amendment_exists",
            Rejection::TooManyAmendments { .. } => "too_many_amendments",
        }
    }

    /// The deal the rejected event was for.
    pub fn deal_id(&self) -> &Id {
        match self {
            Rejection::NotOpened { deal_id, .. }
            | Rejection::AlreadyOpened { deal_id, .. }
            | Rejection::DealTerminated { deal_id, .. }
            | Rejection::NotAParty { deal_id, .. }
            | Rejection::TermsLocked { deal_id, .. }
            | Rejection::ProposalExists { deal_id, .. }
            | Rejection::TooManyProposals { deal_id, .. }
            | Rejection::UnknownProposal { deal_id, .. }
            | Rejection::ProposalNotOpen { deal_id, .. }
            | Rejection::OwnProposal { deal_id, .. }
            | Rejection::LockExists { deal_id, .. }
            | Rejection::TooManyLocks { deal_id, .. }
            | Rejection::UnknownLock { deal_id, .. }
            | Rejection::LockEnded { deal_id, .. }
            | Rejection::LockNotStarted { deal_id, .. }
            | Rejection::LockExpired { deal_id, .. }
            | Rejection::NoAcceptedProposal { deal_id }
            | Rejection::ProposalNotAccepted { deal_id, .. }
            | Rejection::AlreadyFinalized { deal_id, .. }
            | Rejection::NotFinalized { deal_id, .. }
            | Rejection::AmendmentExists { deal_id, .. }
            | Rejection::TooManyAmendments { deal_id, .. } => deal_id,
        }
    }

    /// Path of the field at fault: `type` when the event type is wrong for
    /// the deal's status, otherwise a path into `data` such as
    /// `data.accepted_by` or `data.signatories[1].party`.
    pub fn field(&self) -> &str {
        match self {
            Rejection::NotOpened { .. }
            | Rejection::AlreadyOpened { .. }
            | Rejection::DealTerminated { .. }
            | Rejection::TermsLocked { .. }
            | Rejection::AlreadyFinalized { .. }
            | Rejection::NotFinalized { .. } => "type",
            Rejection::NotAParty { field, .. }
            | Rejection::UnknownProposal { field, .. }
            | Rejection::ProposalNotOpen { field, .. }
            | Rejection::OwnProposal { field, .. } => field,
            Rejection::ProposalExists { .. }
            | Rejection::TooManyProposals { .. }
            | Rejection::NoAcceptedProposal { .. }
            | Rejection::ProposalNotAccepted { .. } => "data.proposal_id",
            Rejection::LockExists { .. }
            | Rejection::TooManyLocks { .. }
            | Rejection::UnknownLock { .. }
            | Rejection::LockEnded { .. }
            | Rejection::LockNotStarted { .. }
            | Rejection::LockExpired { .. } => "data.lock_id",
            Rejection::AmendmentExists { .. } | Rejection::TooManyAmendments { .. } => {
                "data.amendment_id"
            }
        }
    }
}
