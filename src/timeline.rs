//! The lock timeline: which exclusivity locks bind at a given business time,
//! found without looking at every lock ever granted.
//!
//! Why this module exists: "who held which locks on 2025-01-15?" is one of
//! the questions compliance officers ask most. Answered by testing every
//! lock of every deal, its cost grows with the ledger (every lock ever
//! granted stays in the deal book, ended or not): 1.6 ms per query at a
//! million events with none binding, and growing. The timeline keeps each
//! lock's binding interval `[valid_from, end)`, `end` the earlier of
//! `valid_until` and when it was released or its deal terminated. Locks
//! with no end yet bind from their start on: they are kept by start, and a
//! query takes those that started by `t`. The others sit in small chunks
//! sorted by start, each knowing the latest end among its locks; a query
//! for `t` stops at the first chunk that starts after `t` and skips every
//! chunk whose locks all ended by `t`. Its cost follows the locks that
//! bind at `t` (each may keep one chunk of 32 in the scan), not
//! all the locks ever granted.
//!
//! Derived data, part of the pure core: the query index
//! ([`crate::index::DealIndex`]) updates it as locks are granted and end,
//! and rebuilds it from the deal book on restore; it is never encoded.
//! [`LockTimeline::active_at`] answers exactly what testing
//! [`Lock::active_at`] on every lock answers (a property test holds it to
//! that).

use std::collections::BTreeSet;

use crate::deal::Lock;
use crate::event::{Id, Timestamp};

/// Most locks in one chunk; a chunk that grows past it splits in two.
/// A query scans every lock of a chunk that holds one binding lock, so
/// chunks are kept small; updating a chunk's latest end is a scan of it.
const CHUNK_MAX: usize = 32;

/// One ended or expiring lock's binding interval.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Span {
    /// `valid_from` (inclusive).
    from: Timestamp,
    /// The lock binds before this (exclusive).
    end: Timestamp,
    deal: Id,
    lock: Id,
}

impl Span {
    fn binds_at(&self, t: Timestamp) -> bool {
        self.from <= t && t < self.end
    }

    fn key(&self) -> (Timestamp, &Id, &Id) {
        (self.from, &self.deal, &self.lock)
    }
}

/// Spans sorted by (from, deal, lock), and the latest end among them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Chunk {
    spans: Vec<Span>,
    latest_end: Timestamp,
}

impl Chunk {
    fn new(spans: Vec<Span>) -> Chunk {
        let latest_end = latest_end(&spans);
        Chunk { spans, latest_end }
    }

    fn first_from(&self) -> Timestamp {
        self.spans[0].from
    }
}

fn latest_end(spans: &[Span]) -> Timestamp {
    spans
        .iter()
        .map(|s| s.end)
        .max()
        .expect("a chunk is never empty")
}

/// The binding intervals of locks. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockTimeline {
    /// Locks with no end yet (not ended, no `valid_until`), by (from,
    /// deal, lock): all of them bind at every time from their start on.
    /// Kept apart so that they do not make every chunk look live.
    open: BTreeSet<(Timestamp, Id, Id)>,
    /// Locks with an end, sorted and non-overlapping: every span of a
    /// chunk sorts before every span of the next. No chunk is empty.
    chunks: Vec<Chunk>,
    /// Spans in `chunks`.
    ended: usize,
}

/// When `lock` stops binding: the earlier of its `valid_until` and its end.
fn binding_end(lock: &Lock) -> Option<Timestamp> {
    match (lock.valid_until, lock.ended.as_ref().map(|e| e.at)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl LockTimeline {
    /// An empty timeline.
    pub fn new() -> LockTimeline {
        LockTimeline::default()
    }

    /// The timeline of `locks`, built at once: full chunks, in order.
    pub fn from_locks<'a>(locks: impl Iterator<Item = &'a Lock>) -> LockTimeline {
        let mut timeline = LockTimeline::new();
        let mut spans = Vec::new();
        for lock in locks {
            let (deal, id) = (lock.deal_id.clone(), lock.lock_id.clone());
            match binding_end(lock) {
                None => {
                    timeline.open.insert((lock.valid_from, deal, id));
                }
                Some(end) => spans.push(Span {
                    from: lock.valid_from,
                    end,
                    deal,
                    lock: id,
                }),
            }
        }
        spans.sort_unstable_by(|a, b| a.key().cmp(&b.key()));
        spans.dedup_by(|a, b| a.key() == b.key());
        timeline.ended = spans.len();
        let mut spans = spans.into_iter().peekable();
        while spans.peek().is_some() {
            let chunk: Vec<Span> = spans.by_ref().take(CHUNK_MAX).collect();
            timeline.chunks.push(Chunk::new(chunk));
        }
        timeline
    }

    /// How many locks it holds.
    pub fn len(&self) -> usize {
        self.open.len() + self.ended
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `lock`'s interval, or sets it if the lock is there: a lock's
    /// start never changes, only its end (when it is released or its deal
    /// terminated), so this also records that a lock ended.
    pub fn insert(&mut self, lock: &Lock) {
        self.put(
            &lock.deal_id,
            &lock.lock_id,
            lock.valid_from,
            binding_end(lock),
        );
    }

    /// Records that `lock` (as it was before it ended) ended at `at`.
    pub fn ended(&mut self, lock: &Lock, at: Timestamp) {
        let end = lock.valid_until.map_or(at, |until| until.min(at));
        self.put(&lock.deal_id, &lock.lock_id, lock.valid_from, Some(end));
    }

    /// Adds the lock `lock` of deal `deal`, just granted: it binds from
    /// `valid_from` until `valid_until`, if given.
    pub fn granted(
        &mut self,
        deal: &Id,
        lock: &Id,
        valid_from: Timestamp,
        valid_until: Option<Timestamp>,
    ) {
        self.put(deal, lock, valid_from, valid_until);
    }

    fn put(&mut self, deal: &Id, lock: &Id, from: Timestamp, end: Option<Timestamp>) {
        let key = (from, deal.clone(), lock.clone());
        let Some(end) = end else {
            self.open.insert(key);
            return;
        };
        self.open.remove(&key);
        let (from, deal, lock) = key;
        let span = Span {
            from,
            end,
            deal,
            lock,
        };
        if self.chunks.is_empty() {
            self.chunks.push(Chunk::new(vec![span]));
            self.ended = 1;
            return;
        }
        // The last chunk whose first span sorts at or before this one (the
        // first chunk for a span before all).
        let c = self
            .chunks
            .partition_point(|c| c.spans[0].key() <= span.key())
            .saturating_sub(1);
        let last = c + 1 == self.chunks.len();
        let chunk = &mut self.chunks[c];
        match chunk.spans.binary_search_by(|s| s.key().cmp(&span.key())) {
            Ok(at) => chunk.spans[at].end = span.end,
            // Locks mostly end in the order they started: a span after
            // every other one starts a new chunk once the last is full,
            // instead of splitting it into two half-empty ones.
            Err(at) if last && at == CHUNK_MAX => {
                self.chunks.push(Chunk::new(vec![span]));
                self.ended += 1;
                return;
            }
            Err(at) => {
                chunk.spans.insert(at, span);
                self.ended += 1;
            }
        }
        chunk.latest_end = latest_end(&chunk.spans);
        if chunk.spans.len() > CHUNK_MAX {
            let upper = chunk.spans.split_off(chunk.spans.len() / 2);
            chunk.latest_end = latest_end(&chunk.spans);
            self.chunks.insert(c + 1, Chunk::new(upper));
        }
    }

    /// The (deal, lock) ids of every lock binding at `t`, in no particular
    /// order: exactly the locks whose [`Lock::active_at`] is true.
    pub fn active_at(&self, t: Timestamp) -> impl Iterator<Item = (&Id, &Id)> + '_ {
        let open = self
            .open
            .iter()
            .take_while(move |(from, _, _)| *from <= t)
            .map(|(_, deal, lock)| (deal, lock));
        let ended = self
            .chunks
            .iter()
            .take_while(move |c| c.first_from() <= t)
            .filter(move |c| t < c.latest_end)
            .flat_map(move |c| c.spans.iter().filter(move |s| s.binds_at(t)))
            .map(|s| (&s.deal, &s.lock));
        open.chain(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deal::LockEnd;
    use crate::event::{LockKind, Text};
    use proptest::prelude::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_unix_millis(secs * 1000).expect("in range")
    }

    fn lock(deal: u32, lock: u32, from: i64, until: Option<i64>) -> Lock {
        Lock {
            deal_id: Id::new(format!("d{deal}")).expect("id"),
            lock_id: Id::new(format!("l{lock}")).expect("id"),
            holder: Id::new("h").expect("id"),
            bound_party: Id::new("b").expect("id"),
            scope: Id::new("s").expect("id"),
            kind: LockKind::Exclusive,
            valid_from: ts(from),
            valid_until: until.map(ts),
            granted_at: ts(from),
            ended: None,
        }
    }

    fn ended(mut l: Lock, at: i64) -> Lock {
        l.ended = Some(LockEnd {
            at: ts(at),
            reason: Text::new("done").expect("text"),
        });
        l
    }

    fn sorted(mut v: Vec<(Id, Id)>) -> Vec<(Id, Id)> {
        v.sort();
        v
    }

    #[test]
    fn a_lock_binds_from_its_start_until_it_expires_or_ends() {
        let mut t = LockTimeline::new();
        let open = lock(1, 1, 100, None);
        let expiring = lock(2, 1, 100, Some(200));
        let released = lock(3, 1, 150, None);
        for l in [&open, &expiring, &released] {
            t.insert(l);
        }
        t.insert(&ended(released.clone(), 180));
        let at = |s| -> Vec<String> {
            t.active_at(ts(s))
                .map(|(d, l)| format!("{d}/{l}"))
                .collect()
        };
        assert!(at(99).is_empty());
        assert_eq!(at(100), ["d1/l1", "d2/l1"]);
        assert_eq!(at(179), ["d1/l1", "d2/l1", "d3/l1"]);
        assert_eq!(at(180), ["d1/l1", "d2/l1"]);
        assert_eq!(at(200), ["d1/l1"]);
        assert_eq!(t.len(), 3);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Grant {
            deal: u32,
            from: i64,
            until: Option<i64>,
        },
        End {
            pick: usize,
            at: i64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..40, 0i64..1_000, proptest::option::of(0i64..1_200))
                .prop_map(|(deal, from, until)| Op::Grant { deal, from, until }),
            1 => (any::<usize>(), 0i64..1_200).prop_map(|(pick, at)| Op::End { pick, at }),
        ]
    }

    proptest! {
        /// Over grants (many enough to split chunks) and ends in any order,
        /// the timeline answers what testing every lock answers, at every
        /// time, chunk edges included.
        #[test]
        fn answers_what_testing_every_lock_answers(
            ops in proptest::collection::vec(op(), 0..600),
            probes in proptest::collection::vec(-10i64..1_300, 1..40),
        ) {
            let mut timeline = LockTimeline::new();
            let mut locks: Vec<Lock> = Vec::new();
            for op in ops {
                match op {
                    Op::Grant { deal, from, until } => {
                        let l = lock(deal, locks.len() as u32, from, until);
                        timeline.insert(&l);
                        locks.push(l);
                    }
                    Op::End { pick, at } if !locks.is_empty() => {
                        let i = pick % locks.len();
                        if locks[i].ended.is_none() {
                            locks[i] = ended(locks[i].clone(), at);
                            timeline.insert(&locks[i]);
                        }
                    }
                    Op::End { .. } => {}
                }
            }
            prop_assert_eq!(timeline.len(), locks.len());
            let rebuilt = LockTimeline::from_locks(locks.iter());
            prop_assert_eq!(rebuilt.len(), locks.len());
            prop_assert!(timeline.chunks.iter().all(|c| !c.spans.is_empty() && c.spans.len() <= CHUNK_MAX));
            prop_assert_eq!(timeline.ended, timeline.chunks.iter().map(|c| c.spans.len()).sum::<usize>());
            for p in probes.into_iter().chain(locks.iter().map(|l| l.valid_from.unix_millis() / 1000)) {
                let t = ts(p);
                let expected = sorted(locks.iter().filter(|l| l.active_at(t)).map(|l| (l.deal_id.clone(), l.lock_id.clone())).collect());
                let found = sorted(timeline.active_at(t).map(|(d, l)| (d.clone(), l.clone())).collect());
                prop_assert_eq!(&found, &expected, "at {}", p);
                let found = sorted(rebuilt.active_at(t).map(|(d, l)| (d.clone(), l.clone())).collect());
                prop_assert_eq!(found, expected, "rebuilt, at {}", p);
            }
        }
    }
}
