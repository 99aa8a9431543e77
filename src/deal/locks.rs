//! A deal's exclusivity locks (`DealLocks`): those not ended whole in
//! memory, ended ones as what the fold and walks need, the rest in a store.

use super::*;

/// A deal's locks, ended or not, by id; those that ended move out of memory
/// once a [`SegmentStore`] is attached ([`DealBook::store_ended_in`]).
///
/// A lock that ended (released, or its deal terminated) never changes
/// again, and the fold needs only its id (a reused id is refused) and when
/// it ended (releasing it again is refused with that time). So those two
/// stay in memory, with its kind and binding interval so that lock queries
/// test it without reading it (~90 bytes a lock), and the lock itself is
/// written to the store, as its JSON, and read back by the queries that
/// show it; once the deal is terminated, what stayed goes to the store too,
/// as one record ([`DealBook`] reads it back for lock lookups and walks
/// that reach the deal). Locks not
/// ended stay whole in memory: the fold changes them. Without a store
/// (tests, `replay`) ended locks stay in memory too, and everything reads
/// the same. Serialized (snapshots) as one object of every lock by id, as an
/// [`IdMap`] of locks was.
///
/// A failed read of the store yields no lock (`get`, `iter` leave it out)
/// and is recorded by the store ([`SegmentStore::failure`]); the shell
/// checks that before it trusts or stores anything derived.
#[derive(Clone, Default)]
pub struct DealLocks {
    /// Locks that have not ended.
    pub(super) held: IdMap<Lock>,
    /// Locks that ended.
    pub(super) ended: IdMap<EndedLock>,
    /// Where ended locks go, once attached.
    pub(super) store: Option<Arc<dyn SegmentStore>>,
}

/// An ended lock as [`DealLocks`] keeps it: what the fold and the lock
/// queries test, without reading it back.
#[derive(Clone, Debug)]
pub(super) struct EndedLock {
    /// When it ended (the fold's `LockEnded` rejection names it).
    pub(super) at: Timestamp,
    /// Its kind (findings look at exclusive locks only).
    pub(super) kind: LockKind,
    /// It bound from `from` (inclusive) to `until` (exclusive): its
    /// `valid_from`, and the earlier of its end and `valid_until`.
    pub(super) from: Timestamp,
    pub(super) until: Timestamp,
    pub(super) body: LockBody,
}

impl EndedLock {
    pub(super) fn of(lock: Lock, body: impl FnOnce(Lock) -> LockBody) -> EndedLock {
        let at = lock.ended.as_ref().expect("an ended lock").at;
        EndedLock {
            at,
            kind: lock.kind,
            from: lock.valid_from,
            until: lock.valid_until.map_or(at, |until| until.min(at)),
            body: body(lock),
        }
    }
}

/// One step of [`DealBook::walk_locks`].
pub enum LockWalk<'a> {
    /// The next lock of the deal.
    Lock(LockEntry<'a>),
    /// The deal gives no lock: it granted none, or it is terminated and
    /// none of its locks can bind at the time asked.
    PassedOver,
}

/// One lock of a [`DealLocks`], as [`DealLocks::entries`] gives it: its id,
/// kind and whether it binds at a time are known without reading it back.
#[derive(Clone, Copy)]
pub struct LockEntry<'a> {
    pub(super) id: &'a Id,
    at: LockAt<'a>,
    pub(super) locks: &'a DealLocks,
}

#[derive(Clone, Copy)]
enum LockAt<'a> {
    NotEnded(&'a Lock),
    Ended(&'a EndedLock),
}

impl<'a> LockEntry<'a> {
    /// The lock's id.
    pub fn id(&self) -> &'a Id {
        self.id
    }

    /// Its kind.
    pub fn kind(&self) -> LockKind {
        match self.at {
            LockAt::NotEnded(lock) => lock.kind,
            LockAt::Ended(e) => e.kind,
        }
    }

    /// Whether it binds at `t` ([`Lock::active_at`]).
    pub fn active_at(&self, t: Timestamp) -> bool {
        match self.at {
            LockAt::NotEnded(lock) => lock.active_at(t),
            LockAt::Ended(e) => e.from <= t && t < e.until,
        }
    }

    /// The lock, if it has not ended (it is then in memory).
    pub fn not_ended(&self) -> Option<&'a Lock> {
        match self.at {
            LockAt::NotEnded(lock) => Some(lock),
            LockAt::Ended(_) => None,
        }
    }

    /// What the lock timeline needs of it, without reading it back.
    pub fn span(&self, deal: &Id) -> crate::timeline::LockSpan {
        let (from, end, ended) = match self.at {
            LockAt::NotEnded(lock) => (lock.valid_from, lock.valid_until, false),
            LockAt::Ended(e) => (e.from, Some(e.until), true),
        };
        crate::timeline::LockSpan {
            deal: deal.clone(),
            lock: self.id.clone(),
            from,
            end,
            ended,
        }
    }

    /// The lock itself (read from the store if it was moved there; `None`
    /// if that read failed, see [`DealLocks`]).
    pub fn load(&self) -> Option<Cow<'a, Lock>> {
        match self.at {
            LockAt::NotEnded(lock) => Some(Cow::Borrowed(lock)),
            LockAt::Ended(e) => self.locks.body(e),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum LockBody {
    /// In memory: no store attached.
    Kept(Box<Lock>),
    /// Its JSON, in the store.
    Stored(SegmentRef),
}

impl DealLocks {
    /// How many locks the deal granted, ended or not.
    pub fn len(&self) -> usize {
        self.held.len() + self.ended.len()
    }

    /// Whether the deal granted none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the deal granted lock `id`.
    pub fn contains(&self, id: &Id) -> bool {
        self.held.contains_key(id) || self.ended.contains_key(id)
    }

    /// Lock `id` (read from the store if it ended and was moved there).
    pub fn get(&self, id: &Id) -> Option<Cow<'_, Lock>> {
        match self.held.get(id) {
            Some(lock) => Some(Cow::Borrowed(lock)),
            None => self.ended.get(id).and_then(|e| self.body(e)),
        }
    }

    /// When lock `id` ended, if it did.
    pub fn ended_at(&self, id: &Id) -> Option<Timestamp> {
        self.ended.get(id).map(|e| e.at)
    }

    /// Lock `id`, if the deal granted it and it has not ended.
    pub fn not_ended_get(&self, id: &Id) -> Option<&Lock> {
        self.held.get(id)
    }

    /// The locks that have not ended, in id order.
    pub fn not_ended(&self) -> impl Iterator<Item = &Lock> {
        self.held.values()
    }

    /// Every lock, in id order, as entries that tell its id, kind and
    /// binding interval without reading it back.
    pub fn entries(&self) -> impl Iterator<Item = LockEntry<'_>> {
        merged(&self.held, &self.ended).map(|entry| match entry {
            Either::First(id, lock) => LockEntry {
                id,
                at: LockAt::NotEnded(lock),
                locks: self,
            },
            Either::Second(id, ended) => LockEntry {
                id,
                at: LockAt::Ended(ended),
                locks: self,
            },
        })
    }

    /// Every lock, in id order (ended ones read from the store; one whose
    /// read failed is left out, see the type's docs).
    pub fn iter(&self) -> impl Iterator<Item = Cow<'_, Lock>> {
        self.entries().filter_map(|entry| entry.load())
    }

    fn body<'a>(&'a self, ended: &'a EndedLock) -> Option<Cow<'a, Lock>> {
        match &ended.body {
            LockBody::Kept(lock) => Some(Cow::Borrowed(&**lock)),
            LockBody::Stored(at) => {
                let store = self.store.as_ref().expect("stored locks have a store");
                let mut bytes = Vec::new();
                if !store.read(*at, &mut bytes) {
                    return None;
                }
                // What this process wrote; anything else is a bug.
                let lock: Lock = serde_json::from_slice(&bytes)
                    .expect("a stored lock decodes: this process wrote it");
                Some(Cow::Owned(lock))
            }
        }
    }

    /// Records a newly granted lock.
    pub(super) fn grant(&mut self, lock: Lock) {
        debug_assert!(lock.ended.is_none());
        let previous = self.held.insert(lock.lock_id.clone(), lock);
        assert!(previous.is_none(), "checked: lock id is new");
    }

    /// Ends lock `id`, which must be held.
    pub(super) fn end(&mut self, id: &Id, end: LockEnd) {
        let mut lock = self
            .held
            .remove(id)
            .expect("checked: the lock exists and has not ended");
        lock.ended = Some(end);
        let ended = EndedLock::of(lock, |lock| self.body_of(lock));
        self.ended.insert(id.clone(), ended);
    }

    /// Ends every lock not ended yet at `end`.
    pub(super) fn end_all(&mut self, end: &LockEnd) {
        let ids: Vec<Id> = self.held.keys().cloned().collect();
        for id in ids {
            self.end(&id, end.clone());
        }
    }

    fn body_of(&self, lock: Lock) -> LockBody {
        match &self.store {
            None => LockBody::Kept(Box::new(lock)),
            Some(store) => {
                let json = serde_json::to_vec(&lock).expect("a lock serializes");
                LockBody::Stored(store.append(&json))
            }
        }
    }

    /// Moves the ended locks to `store`, and those that end from now on.
    pub(super) fn store_ended_in(&mut self, store: &Arc<dyn SegmentStore>) {
        assert!(self.store.is_none(), "ended locks stored twice");
        self.store = Some(Arc::clone(store));
        for (_, ended) in self.ended.iter_mut() {
            if let LockBody::Kept(lock) = &ended.body {
                let json = serde_json::to_vec(&**lock).expect("a lock serializes");
                ended.body = LockBody::Stored(store.append(&json));
            }
        }
    }

    /// The record a terminated deal's locks are stored as
    /// ([`StoredDeal`]): what [`EndedLock`] keeps of each, in id order, in
    /// binary (a lock walk reads it, and parsing it as JSON doubled the
    /// time of `locks/active`): the id's length (one byte) and bytes, the
    /// end, start and end of binding as (seconds: i64, nanoseconds: u32),
    /// the kind (0 exclusive, 1 right of first refusal), the body's offset
    /// (u64) and length (u32), all big-endian. Every lock must have ended
    /// with its body in the store.
    pub(super) fn stored_record(&self) -> Vec<u8> {
        assert!(self.held.is_empty(), "a terminated deal's locks all ended");
        let mut out = Vec::with_capacity(self.ended.len() * 80);
        for (id, e) in self.ended.iter() {
            let LockBody::Stored(body) = e.body else {
                panic!("lock {id} ended with a store attached: its body is in the store")
            };
            let id = id.as_str().as_bytes();
            out.push(u8::try_from(id.len()).expect("an id is at most 128 bytes"));
            out.extend_from_slice(id);
            for t in [e.at, e.from, e.until] {
                let (secs, nanos) = t.unix_parts();
                out.extend_from_slice(&secs.to_be_bytes());
                out.extend_from_slice(&nanos.to_be_bytes());
            }
            out.push(match e.kind {
                LockKind::Exclusive => 0,
                LockKind::RightOfFirstRefusal => 1,
            });
            out.extend_from_slice(&body.offset.to_be_bytes());
            out.extend_from_slice(&body.len.to_be_bytes());
        }
        out
    }

    /// The locks [`DealLocks::stored_record`] wrote into `bytes`, their
    /// bodies in `store`.
    pub(super) fn from_stored_record(bytes: &[u8], store: &Arc<dyn SegmentStore>) -> DealLocks {
        // What this process wrote; anything else is a bug.
        const BUG: &str = "stored locks decode: this process wrote them";
        fn cut<'b>(rest: &mut &'b [u8], n: usize) -> &'b [u8] {
            let (head, tail) = rest.split_at_checked(n).expect(BUG);
            *rest = tail;
            head
        }
        let mut rest = bytes;
        let mut ended = IdMap::default();
        while !rest.is_empty() {
            let mut take = |n: usize| cut(&mut rest, n);
            let id_len = usize::from(take(1)[0]);
            let id = std::str::from_utf8(take(id_len))
                .ok()
                .and_then(|s| Id::parse(s).ok())
                .expect(BUG);
            let mut times = [None; 3];
            for t in &mut times {
                let secs = i64::from_be_bytes(take(8).try_into().expect("8 bytes"));
                let nanos = u32::from_be_bytes(take(4).try_into().expect("4 bytes"));
                *t = Timestamp::from_unix_parts(secs, nanos);
            }
            let [Some(at), Some(from), Some(until)] = times else {
                panic!("{BUG}")
            };
            let kind = match take(1)[0] {
                0 => LockKind::Exclusive,
                1 => LockKind::RightOfFirstRefusal,
                _ => panic!("{BUG}"),
            };
            let offset = u64::from_be_bytes(take(8).try_into().expect("8 bytes"));
            let len = u32::from_be_bytes(take(4).try_into().expect("4 bytes"));
            let lock = EndedLock {
                at,
                kind,
                from,
                until,
                body: LockBody::Stored(SegmentRef { offset, len }),
            };
            ended.insert(id, lock);
        }
        DealLocks {
            held: IdMap::default(),
            ended,
            store: Some(Arc::clone(store)),
        }
    }

    /// Asserts that every lock belongs to `deal` and ended ones say so.
    pub(super) fn assert_invariants(&self, deal: &Deal) {
        assert!(self.held.values().all(|l| l.ended.is_none()));
        for (id, e) in self.ended.iter() {
            assert!(!self.held.contains_key(id), "lock {id} both held and ended");
            if let LockBody::Kept(l) = &e.body {
                let at = l.ended.as_ref().map(|end| end.at);
                assert_eq!((at, l.kind, l.valid_from), (Some(e.at), e.kind, e.from));
                assert_eq!(l.valid_until.map_or(e.at, |u| u.min(e.at)), e.until);
            }
        }
        for lock in self.iter() {
            assert_eq!(lock.deal_id, deal.id);
            assert!(deal.is_party(&lock.holder) && deal.is_party(&lock.bound_party));
        }
    }
}

impl FromIterator<Lock> for DealLocks {
    fn from_iter<I: IntoIterator<Item = Lock>>(locks: I) -> Self {
        let mut out = DealLocks::default();
        for lock in locks {
            match &lock.ended {
                None => {
                    out.held.insert(lock.lock_id.clone(), lock);
                }
                Some(_) => {
                    let id = lock.lock_id.clone();
                    let ended = EndedLock::of(lock, |lock| LockBody::Kept(Box::new(lock)));
                    out.ended.insert(id, ended);
                }
            }
        }
        out
    }
}

/// Equal when they hold the same locks, wherever they keep them.
impl PartialEq for DealLocks {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for DealLocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|l| (l.lock_id.clone(), l)))
            .finish()
    }
}

impl Serialize for DealLocks {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for lock in self.iter() {
            map.serialize_entry(&lock.lock_id, &*lock)?;
        }
        // A lock that could not be read is missing: the store recorded
        // the failure, and the shell refuses to keep what was written.
        map.end()
    }
}

impl<'de> Deserialize<'de> for DealLocks {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let locks = IdMap::<Lock>::deserialize(deserializer)?;
        for (id, lock) in locks.iter() {
            if *id != lock.lock_id {
                return Err(serde::de::Error::custom(format!(
                    "lock {id} holds lock {}",
                    lock.lock_id
                )));
            }
        }
        Ok(locks.entries.into_iter().map(|(_, lock)| lock).collect())
    }
}
