//! The deal book: every deal by id, in id order, terminated ones kept in a
//! store once one is attached; `DealBook::apply` is the fold's entry point.

use super::*;

/// The state of every deal, keyed by deal id.
///
/// The fold looks a deal up for every event: a hash map serves that (a
/// B-tree's search compared ~14 deal ids per event at 10,000 deals, about
/// 8 % of an ingest's CPU in profiles). Iteration and serialization follow
/// `order`, so they are in deal-id order, deterministic, as with a
/// `BTreeMap` (and the JSON is the same object).
///
/// Serialized (JSON) as the object of its deals only: the amendment
/// fingerprints are not in it ([`DealBook::amendments`]; snapshots store
/// them beside it and give them back with [`DealBook::keep_amendments_in`]).
///
/// With a store attached ([`DealBook::store_ended_in`]) a deal that is
/// terminated, and so changes no more, goes to the store with its locks,
/// and memory keeps what the fold and statistics need of it (its id,
/// places, times, counts, amendment count, when its locks could bind): the
/// book's memory follows the deals open, not every deal ever opened.
/// [`DealBook::get`] and [`DealBook::iter`] read such a deal back, lock
/// lookups and walks its locks; a read that fails leaves it out and is
/// recorded by the store, which the shell checks, as for ended locks.
pub struct DealBook {
    deals: HashMap<Id, KeptDeal>,
    /// The ids of `deals`, in order.
    pub(super) order: BTreeSet<Id>,
    /// Every amendment applied, by (deal, amendment id) fingerprint.
    pub(super) amendments: Box<dyn AmendmentSet>,
    /// Where ended locks and terminated deals go, once attached
    /// ([`DealBook::store_ended_in`]).
    ended_store: Option<EndedStore>,
}

impl Default for DealBook {
    fn default() -> Self {
        DealBook {
            deals: HashMap::new(),
            order: BTreeSet::new(),
            amendments: Box::new(MemoryAmendments::default()),
            ended_store: None,
        }
    }
}

/// A copy whose amendments are in memory ([`MemoryAmendments`]), wherever
/// this book keeps them; ended locks stay where they are.
impl Clone for DealBook {
    fn clone(&self) -> Self {
        let mut amendments = MemoryAmendments::default();
        amendments.load_sorted(self.amendments.sorted().collect());
        DealBook {
            deals: self.deals.clone(),
            order: self.order.clone(),
            amendments: Box::new(amendments),
            ended_store: self.ended_store.clone(),
        }
    }
}

impl fmt::Debug for DealBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DealBook")
            .field(
                "deals",
                &fmt::from_fn(|f| f.debug_map().entries(self.iter()).finish()),
            )
            .field("amendments", &self.amendments.len())
            .field("ended_store", &self.ended_store)
            .finish()
    }
}

/// Equal when they hold the same deals and amendments, wherever they keep
/// their ended locks, terminated deals and amendments.
impl PartialEq for DealBook {
    fn eq(&self, other: &Self) -> bool {
        self.deals.len() == other.deals.len()
            && self.order == other.order
            && self.iter().eq(other.iter())
            && self.amendments.len() == other.amendments.len()
            && self.amendments.sorted().eq(other.amendments.sorted())
    }
}

/// What statistics count of a deal ([`DealBook::counts_after`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DealCounts {
    /// Where it is in its lifecycle.
    pub status: Status,
    /// When it opened.
    pub opened_at: Timestamp,
    /// When it was finalized, if it was.
    pub finalized_at: Option<Timestamp>,
    /// How many proposals and counter-proposals it had.
    pub proposals: usize,
}

impl DealCounts {
    /// Seconds from opening to finalization, if it was finalized.
    pub fn seconds_to_finalize(&self) -> Option<i64> {
        let at = self.finalized_at?;
        Some((at.as_datetime() - self.opened_at.as_datetime()).num_seconds())
    }
}

/// [`DealBook`]'s handle on the store of ended locks and deals.
#[derive(Clone)]
struct EndedStore(Arc<dyn SegmentStore>);

/// A deal as [`DealBook`] keeps it.
#[derive(Clone)]
enum KeptDeal {
    /// Whole, in memory: every deal not terminated, and every deal of a
    /// book without a store.
    Open(Box<Deal>),
    /// A terminated deal, which no event changes any more, in the store.
    Stored(Box<StoredDeal>),
}

/// What the book keeps in memory of a terminated deal once it is in the
/// store: where its JSON is (written without its locks) and where its
/// locks' record is, and what the fold and statistics read without loading
/// either back. About 100 bytes,
/// instead of ~1.8 KB for a deal of a few proposals and ~90 bytes for each
/// of its locks (which go to the store as one record with the deal).
#[derive(Clone)]
pub(super) struct StoredDeal {
    pub(super) at: SegmentRef,
    /// What statistics count of it ([`DealBook::counts_after`]); its
    /// opening time is also what the fold's `AlreadyOpened` names.
    pub(super) counts: DealCounts,
    /// When it was terminated (the fold's `DealTerminated` names it).
    pub(super) terminated_at: Timestamp,
    /// Its `amendment_count` ([`DealBook::amendments_applied`]).
    pub(super) amendment_count: u32,
    /// Its locks, all ended, in the store (`None` if it granted none).
    locks: Option<StoredLocks>,
}

/// Where a terminated deal's locks are in the store
/// ([`DealLocks::stored_record`]), and when they could bind: a lock walk
/// for a time outside passes them over unread.
#[derive(Clone, Copy)]
struct StoredLocks {
    pub(super) at: SegmentRef,
    /// The earliest `valid_from` of its locks.
    pub(super) from: Timestamp,
    /// The latest end of their binding intervals (exclusive).
    pub(super) until: Timestamp,
}

impl StoredDeal {
    /// `deal`, terminated, written to `store`.
    pub(super) fn of(mut deal: Box<Deal>, store: &dyn SegmentStore) -> StoredDeal {
        let terminated_at = deal.termination.as_ref().expect("a terminated deal").at;
        debug_assert!(deal.locks.not_ended().next().is_none());
        let locks = std::mem::take(&mut deal.locks);
        let json = serde_json::to_vec(&*deal).expect("a deal serializes");
        StoredDeal {
            at: store.append(&json),
            counts: deal.counts(),
            terminated_at,
            amendment_count: deal.amendment_count,
            locks: StoredLocks::of(&locks, store),
        }
    }

    /// The deal read back, or `None` if the read failed (the store records
    /// it; the shell checks before it trusts anything derived).
    pub(super) fn load(&self, store: &Arc<dyn SegmentStore>) -> Option<Deal> {
        let mut bytes = Vec::new();
        if !store.read(self.at, &mut bytes) {
            return None;
        }
        // What this process wrote; anything else is a bug.
        let mut deal: Deal =
            serde_json::from_slice(&bytes).expect("a stored deal decodes: this process wrote it");
        deal.locks = self.load_locks(store)?;
        Some(deal)
    }

    /// Its locks read back (none read if it granted none), or `None` if
    /// the read failed (recorded by the store).
    fn load_locks(&self, store: &Arc<dyn SegmentStore>) -> Option<DealLocks> {
        let Some(StoredLocks { at, .. }) = self.locks else {
            return Some(DealLocks::default());
        };
        let mut bytes = Vec::new();
        if !store.read(at, &mut bytes) {
            return None;
        }
        Some(DealLocks::from_stored_record(&bytes, store))
    }
}

impl StoredLocks {
    /// `locks` (all ended) written to `store`; `None` if there are none.
    pub(super) fn of(locks: &DealLocks, store: &dyn SegmentStore) -> Option<StoredLocks> {
        let from = locks.ended.values().map(|e| e.from).min()?;
        let until = locks.ended.values().map(|e| e.until).max()?;
        Some(StoredLocks {
            at: store.append(&locks.stored_record()),
            from,
            until,
        })
    }
}

impl KeptDeal {
    pub(super) fn counts(&self) -> DealCounts {
        match self {
            KeptDeal::Open(deal) => deal.counts(),
            KeptDeal::Stored(stored) => stored.counts,
        }
    }
}

impl fmt::Debug for EndedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EndedStore")
    }
}

impl Serialize for DealBook {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for DealBook {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = DealBook;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of deals keyed by deal id")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<DealBook, A::Error> {
                let mut book = DealBook::new();
                while let Some((id, deal)) = access.next_entry::<Id, Deal>()? {
                    if book
                        .deals
                        .insert(id.clone(), KeptDeal::Open(Box::new(deal)))
                        .is_some()
                    {
                        return Err(serde::de::Error::custom(format!("deal {id} appears twice")));
                    }
                    book.order.insert(id);
                }
                Ok(book)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

impl DealBook {
    /// An empty book.
    pub fn new() -> DealBook {
        DealBook::default()
    }

    /// The deal `id`, if it was opened (a terminated deal read back from
    /// the store if it was moved there; `None` if that read failed, which
    /// the store records).
    pub fn get(&self, id: &Id) -> Option<Cow<'_, Deal>> {
        self.deals.get(id).and_then(|kept| self.load(kept))
    }

    fn load<'a>(&'a self, kept: &'a KeptDeal) -> Option<Cow<'a, Deal>> {
        match kept {
            KeptDeal::Open(deal) => Some(Cow::Borrowed(&**deal)),
            KeptDeal::Stored(stored) => stored.load(self.stored_in()).map(Cow::Owned),
        }
    }

    /// The store terminated deals were moved to.
    fn stored_in(&self) -> &Arc<dyn SegmentStore> {
        let EndedStore(store) = self
            .ended_store
            .as_ref()
            .expect("stored deals have a store");
        store
    }

    /// Every deal, in deal-id order (terminated ones read back from the
    /// store if they were moved there; one whose read failed is left out).
    pub fn iter(&self) -> impl Iterator<Item = (&Id, Cow<'_, Deal>)> {
        self.iter_after(None)
    }

    /// The ids that sort after `after` (every id without it), in order.
    fn ids_after<'a>(&'a self, after: Option<&'a str>) -> impl Iterator<Item = &'a Id> + 'a {
        self.order
            .iter()
            .filter(move |id| after.is_none_or(|a| id.as_str() > a))
    }

    /// The deals whose id sorts after `after` (every deal without it), in
    /// deal-id order, read as [`DealBook::iter`] reads them; those before
    /// are skipped without being read back (a page after a cursor).
    pub fn iter_after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Id, Cow<'a, Deal>)> + 'a {
        self.ids_after(after)
            .filter_map(|id| Some((id, self.load(&self.deals[id])?)))
    }

    /// The locks of deal `id`, if it was opened (a terminated deal's read
    /// back from the store if it was moved there, without the deal; `None`
    /// if that read failed, which the store records).
    pub fn locks_of(&self, id: &Id) -> Option<Cow<'_, DealLocks>> {
        self.kept_locks(self.deals.get(id)?)
    }

    fn kept_locks<'a>(&'a self, kept: &'a KeptDeal) -> Option<Cow<'a, DealLocks>> {
        match kept {
            KeptDeal::Open(deal) => Some(Cow::Borrowed(&deal.locks)),
            KeptDeal::Stored(stored) => stored.load_locks(self.stored_in()).map(Cow::Owned),
        }
    }

    /// Lock `lock` of deal `deal`, if that deal granted it ([`DealBook::locks_of`],
    /// then [`DealLocks::get`]).
    pub fn lock(&self, deal: &Id, lock: &Id) -> Option<Cow<'_, Lock>> {
        match self.locks_of(deal)? {
            Cow::Borrowed(locks) => locks.get(lock),
            Cow::Owned(locks) => locks.get(lock).map(|l| Cow::Owned(l.into_owned())),
        }
    }

    /// Lock `lock` of deal `deal` if it has not ended (it is then in
    /// memory: a deal in the store has none).
    pub fn not_ended_lock(&self, deal: &Id, lock: &Id) -> Option<&Lock> {
        match self.deals.get(deal)? {
            KeptDeal::Open(d) => d.locks.not_ended_get(lock),
            KeptDeal::Stored(_) => None,
        }
    }

    /// Calls `f` with every lock of the deals from `first` on (every deal
    /// without it), in (deal id, lock id) order, as a [`LockEntry`] (its
    /// id, kind and binding interval known without reading the lock
    /// back), until `f` breaks. The deals are not read back; a terminated
    /// deal's locks are, from the store, if it granted any (one whose read
    /// fails is passed over, and the store records why). With `binding_at`,
    /// a terminated deal's locks are passed over unread if none of them
    /// can bind then ([`LockEntry::active_at`] is false for each).
    pub fn for_each_lock(
        &self,
        first: Option<&Id>,
        binding_at: Option<Timestamp>,
        mut f: impl FnMut(&Id, LockEntry<'_>) -> std::ops::ControlFlow<()>,
    ) {
        self.walk_locks(first, binding_at, |id, step| match step {
            LockWalk::Lock(entry) => f(id, entry),
            LockWalk::PassedOver => std::ops::ControlFlow::Continue(()),
        });
    }

    /// [`DealBook::for_each_lock`], also telling `f` of every deal it passes
    /// without a lock to give ([`LockWalk::PassedOver`]: none granted, or
    /// terminated with none that can bind at `binding_at`), so that a caller
    /// can bound the whole walk, not only the locks it is given: terminated
    /// deals pile up with time, and a walk that passes them for free costs
    /// more the longer the ledger runs.
    pub fn walk_locks(
        &self,
        first: Option<&Id>,
        binding_at: Option<Timestamp>,
        mut f: impl FnMut(&Id, LockWalk<'_>) -> std::ops::ControlFlow<()>,
    ) {
        let ids: Box<dyn Iterator<Item = &Id> + '_> = match first {
            Some(first) => Box::new(self.order.range(first..)),
            None => Box::new(self.order.iter()),
        };
        let cannot_bind = |stored: &StoredDeal, t: Timestamp| {
            stored
                .locks
                .is_none_or(|locks| t < locks.from || locks.until <= t)
        };
        for id in ids {
            let kept = &self.deals[id];
            let locks = match (kept, binding_at) {
                (KeptDeal::Stored(stored), Some(t)) if cannot_bind(stored, t) => None,
                _ => self.kept_locks(kept),
            };
            let mut gave_any = false;
            for entry in locks.iter().flat_map(|locks| locks.entries()) {
                gave_any = true;
                if f(id, LockWalk::Lock(entry)).is_break() {
                    return;
                }
            }
            if !gave_any && f(id, LockWalk::PassedOver).is_break() {
                return;
            }
        }
    }

    /// What statistics count of each deal whose id sorts after `after`
    /// (every deal without it), in deal-id order, without reading any deal
    /// back.
    pub fn counts_after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Id, DealCounts)> + 'a {
        self.ids_after(after)
            .map(|id| (id, self.deals[id].counts()))
    }

    /// How many deals are terminated and kept in the store.
    pub fn stored_deals(&self) -> usize {
        self.deals
            .values()
            .filter(|kept| matches!(kept, KeptDeal::Stored(_)))
            .count()
    }

    /// How many deals were opened.
    pub fn len(&self) -> usize {
        self.deals.len()
    }

    /// Whether no deal was opened yet.
    pub fn is_empty(&self) -> bool {
        self.deals.is_empty()
    }

    /// Every lock of every deal, in (deal id, lock id) order, ended or not
    /// (ended ones read back from the store if they were moved there), as
    /// copies: for tests and tools, not for the daemon's paths.
    pub fn locks(&self) -> impl Iterator<Item = Lock> {
        let mut all = Vec::new();
        self.for_each_lock(None, None, |_, entry| {
            all.extend(entry.load().map(Cow::into_owned));
            std::ops::ControlFlow::Continue(())
        });
        all.into_iter()
    }

    /// Adds `deal` as read back from storage (a snapshot lists the deals one
    /// by one): its ended locks, and the deal itself if terminated, go to
    /// the book's store if it has one. An error if the book has a deal of
    /// that id already.
    pub fn insert_restored(&mut self, mut deal: Deal) -> Result<(), String> {
        if self.deals.contains_key(&deal.id) {
            return Err(format!("deal {} appears twice", deal.id));
        }
        let id = deal.id.clone();
        let kept = match &self.ended_store {
            Some(EndedStore(store)) => {
                deal.locks.store_ended_in(store);
                Self::kept(Box::new(deal), Some(&**store))
            }
            None => KeptDeal::Open(Box::new(deal)),
        };
        self.order.insert(id.clone());
        self.deals.insert(id, kept);
        Ok(())
    }

    /// How the book keeps `deal`: in the store if it is terminated and
    /// there is one.
    fn kept(deal: Box<Deal>, store: Option<&dyn SegmentStore>) -> KeptDeal {
        match store {
            Some(store) if deal.status == Status::Terminated => {
                KeptDeal::Stored(Box::new(StoredDeal::of(deal, store)))
            }
            _ => KeptDeal::Open(deal),
        }
    }

    /// Whether ended locks and terminated deals go to a store
    /// ([`DealBook::store_ended_in`]).
    pub fn stores_ended(&self) -> bool {
        self.ended_store.is_some()
    }

    /// Moves every deal's ended locks, and every terminated deal, to
    /// `store`, and those that end from now on (see [`DealLocks`] and the
    /// type's docs): what keeps the book's memory from growing with
    /// every lock granted and every deal that ended.
    pub fn store_ended_in(&mut self, store: Arc<dyn SegmentStore>) {
        assert!(self.ended_store.is_none(), "ended locks stored twice");
        self.deals = std::mem::take(&mut self.deals)
            .into_iter()
            .map(|(id, kept)| {
                let KeptDeal::Open(mut deal) = kept else {
                    unreachable!("no deal is stored before the store is attached")
                };
                deal.locks.store_ended_in(&store);
                (id, Self::kept(deal, Some(&*store)))
            })
            .collect();
        self.ended_store = Some(EndedStore(store));
    }

    /// The fingerprints of every amendment applied
    /// ([`amendment_fingerprint`]).
    pub fn amendments(&self) -> &dyn AmendmentSet {
        &*self.amendments
    }

    /// Moves the book's amendment fingerprints to `set`, which must be
    /// empty, and keeps those of amendments to come there: what keeps the
    /// book's memory from growing with every amendment. A snapshot's
    /// fingerprints (which its book's JSON lacks) come back this way too.
    pub fn keep_amendments_in(&mut self, mut set: Box<dyn AmendmentSet>) {
        assert!(
            set.is_empty(),
            "amendments moved into a set that is not empty"
        );
        set.load_sorted(self.amendments.sorted().collect());
        self.amendments = set;
    }

    /// Takes `set`, which holds the fingerprints of this book's amendments
    /// (a snapshot's, its book read from JSON), as the book's: an error if
    /// the book has amendments of its own or the count differs from the
    /// amendments its deals applied.
    pub fn keep_amendments_in_loaded(&mut self, set: Box<dyn AmendmentSet>) -> Result<(), String> {
        if !self.amendments.is_empty() {
            return Err("the book already holds amendment fingerprints".to_string());
        }
        let applied = self.amendments_applied();
        if applied != set.len() as u64 {
            return Err(format!(
                "the deals applied {applied} amendments, but {} amendment fingerprints are given",
                set.len()
            ));
        }
        self.amendments = set;
        Ok(())
    }

    /// How many amendments the deals applied (the sum of their
    /// `amendment_count`s): as many as [`DealBook::amendments`] holds.
    pub fn amendments_applied(&self) -> u64 {
        self.deals
            .values()
            .map(|kept| match kept {
                KeptDeal::Open(deal) => u64::from(deal.amendment_count),
                KeptDeal::Stored(stored) => u64::from(stored.amendment_count),
            })
            .sum()
    }

    /// Applies one event. On `Err` the book is exactly unchanged.
    pub fn apply(&mut self, event: &DealEvent) -> Result<(), Rejection> {
        // One lookup serves the check and the commit: the fold's hottest
        // path (a search of the deal ids per event showed in profiles).
        let Some(kept) = self.deals.get_mut(&event.deal_id) else {
            let Payload::NegotiationOpened(opened) = &event.payload else {
                return Err(Rejection::NotOpened {
                    deal_id: event.deal_id.clone(),
                    event_type: event.event_type(),
                });
            };
            let mut deal = Deal::open(event.deal_id.clone(), opened, event.time);
            if let Some(EndedStore(store)) = &self.ended_store {
                deal.locks.store_ended_in(store);
            }
            Self::commit_to(&mut deal, event, Checked::default(), &mut *self.amendments);
            self.deals
                .insert(event.deal_id.clone(), KeptDeal::Open(Box::new(deal)));
            self.order.insert(event.deal_id.clone());
            debug_assert_eq!(self.deals.len(), self.order.len());
            return Ok(());
        };
        let deal = match kept {
            KeptDeal::Open(deal) => deal,
            // The verdicts an open terminated deal gets below, from what
            // the book kept of it.
            KeptDeal::Stored(stored) => {
                return Err(match event.payload {
                    Payload::NegotiationOpened(_) => Rejection::AlreadyOpened {
                        deal_id: event.deal_id.clone(),
                        opened_at: stored.counts.opened_at,
                    },
                    _ => Rejection::DealTerminated {
                        deal_id: event.deal_id.clone(),
                        event_type: event.event_type(),
                        terminated_at: stored.terminated_at,
                    },
                });
            }
        };
        debug_assert_eq!(deal.id, event.deal_id);
        // A reused deal id is named as such, even for a terminated deal.
        if let Some(x) = &deal.termination
            && !matches!(event.payload, Payload::NegotiationOpened(_))
        {
            return Err(Rejection::DealTerminated {
                deal_id: deal.id.clone(),
                event_type: event.event_type(),
                terminated_at: x.at,
            });
        }
        let checked = deal.check(event, &*self.amendments)?;
        Self::commit_to(deal, event, checked, &mut *self.amendments);
        if deal.status == Status::Terminated
            && let Some(EndedStore(store)) = &self.ended_store
        {
            // It changes no more: to the store.
            let Some(KeptDeal::Open(deal)) = self.deals.remove(&event.deal_id) else {
                unreachable!("the deal just applied is open");
            };
            let stored = StoredDeal::of(deal, &**store);
            self.deals
                .insert(event.deal_id.clone(), KeptDeal::Stored(Box::new(stored)));
        }
        Ok(())
    }

    /// Applies `event`, which the deal's check accepted, to `deal`. Infallible.
    fn commit_to(
        deal: &mut Deal,
        event: &DealEvent,
        checked: Checked,
        amendments: &mut dyn AmendmentSet,
    ) {
        let status_before = deal.status;
        deal.commit(event, checked, amendments);
        debug_assert!(
            status_before <= deal.status,
            "status went back from {status_before} to {}",
            deal.status
        );
        if cfg!(debug_assertions) {
            deal.assert_invariants();
        }
    }
}

/// The fold in `(state, event) -> (state, verdict)` shape: applies `event` to
/// `book`. On `Err` the returned book equals the one passed in.
pub fn fold(mut book: DealBook, event: &DealEvent) -> (DealBook, Result<(), Rejection>) {
    let verdict = book.apply(event);
    (book, verdict)
}
