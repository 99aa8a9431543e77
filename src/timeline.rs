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
//! Locks that ended never change again. Once a [`SegmentStore`] is
//! attached ([`LockTimeline::store_in`]) their spans leave memory: they
//! gather in a buffer of at most [`BUFFERED_SPANS`], which is then sorted
//! and written as a *run* of chunks; runs of equal size are merged (a
//! streaming merge, chunk by chunk), so there are few runs and each span
//! is rewritten a few times. In memory a run is, per chunk of 32 spans, its
//! first start, its latest end and where it is (~1.5 bytes a lock, against
//! ~72 for a span kept), and a query reads back only the chunks that may
//! hold a binding lock. Their order of arrival does not matter: a
//! catch-up ingest meets the partitions' locks far apart in business time,
//! which made keeping one sorted structure on disk rewrite a chunk for
//! half the locks. Locks not ended (those with a `valid_until` may still
//! end earlier) stay in memory, as do ended ones without a store.
//!
//! Derived data, part of the pure core: the query index
//! ([`crate::index::DealIndex`]) updates it as locks are granted and end,
//! and rebuilds it from the deal book on restore; it is never encoded
//! (chunks in the store are scratch, in this process's own encoding).
//! [`LockTimeline::active_at`] answers exactly what testing
//! [`Lock::active_at`] on every lock answers (a property test holds it to
//! that).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use crate::deal::Lock;
use crate::event::{Id, Timestamp};
use crate::index::{SegmentRef, SegmentStore};

/// Most locks in one chunk; a chunk that grows past it splits in two.
/// A query scans every lock of a chunk that holds one binding lock, so
/// chunks are kept small; updating a chunk's latest end is a scan of it.
const CHUNK_MAX: usize = 32;

/// Most spans of ended locks held in memory before they are written as a
/// run (~1.2 MB): the size of the smallest run.
pub const BUFFERED_SPANS: usize = 16_384;

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

/// What spans are sorted by: (from, deal, lock).
type SpanKey = (Timestamp, Id, Id);

impl Span {
    fn binds_at(&self, t: Timestamp) -> bool {
        self.from <= t && t < self.end
    }

    fn key(&self) -> (Timestamp, &Id, &Id) {
        (self.from, &self.deal, &self.lock)
    }

    /// The ids of those of `spans` binding at `t`.
    fn binding_at<'a>(
        spans: impl IntoIterator<Item = &'a Span>,
        t: Timestamp,
    ) -> impl Iterator<Item = (Id, Id)> {
        spans
            .into_iter()
            .filter(move |s| s.binds_at(t))
            .map(Span::ids)
    }

    fn ids(&self) -> (Id, Id) {
        (self.deal.clone(), self.lock.clone())
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

/// Whether a part of the timeline gave every lock binding at a time, or
/// stopped once more than asked for were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Collected {
    All,
    OverLimit,
}

/// Spans in memory: chunks sorted and non-overlapping (every span of a
/// chunk sorts before every span of the next), none empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Chunks {
    chunks: Vec<Chunk>,
    /// Spans in `chunks`.
    len: usize,
}

impl Chunks {
    /// Full chunks of `spans`, which are sorted by key and distinct.
    fn of_sorted(spans: Vec<Span>) -> Chunks {
        let len = spans.len();
        let mut chunks = Vec::with_capacity(len.div_ceil(CHUNK_MAX));
        let mut spans = spans.into_iter().peekable();
        while spans.peek().is_some() {
            chunks.push(Chunk::new(spans.by_ref().take(CHUNK_MAX).collect()));
        }
        Chunks { chunks, len }
    }

    /// The chunk `span` belongs in: the last whose first span sorts at or
    /// before it (the first for a span before all). `None` if empty.
    fn chunk_of(&self, key: (Timestamp, &Id, &Id)) -> Option<usize> {
        if self.chunks.is_empty() {
            return None;
        }
        Some(
            self.chunks
                .partition_point(|c| c.spans[0].key() <= key)
                .saturating_sub(1),
        )
    }

    /// Adds `span`, or sets its end if its lock is there.
    fn put(&mut self, span: Span) {
        let Some(c) = self.chunk_of(span.key()) else {
            self.chunks.push(Chunk::new(vec![span]));
            self.len = 1;
            return;
        };
        let last = c + 1 == self.chunks.len();
        let chunk = &mut self.chunks[c];
        match chunk.spans.binary_search_by(|s| s.key().cmp(&span.key())) {
            Ok(at) => chunk.spans[at].end = span.end,
            // Spans mostly come in the order of their start: one after
            // every other starts a new chunk once the last is full, instead
            // of splitting it into two half-empty ones.
            Err(at) if last && at == CHUNK_MAX => {
                self.chunks.push(Chunk::new(vec![span]));
                self.len += 1;
                return;
            }
            Err(at) => {
                chunk.spans.insert(at, span);
                self.len += 1;
            }
        }
        chunk.latest_end = latest_end(&chunk.spans);
        if chunk.spans.len() > CHUNK_MAX {
            let upper = chunk.spans.split_off(chunk.spans.len() / 2);
            chunk.latest_end = latest_end(&chunk.spans);
            self.chunks.insert(c + 1, Chunk::new(upper));
        }
    }

    /// Takes out the span of `key`'s lock, if there.
    fn remove(&mut self, key: (Timestamp, &Id, &Id)) -> Option<Span> {
        let c = self.chunk_of(key)?;
        let chunk = &mut self.chunks[c];
        let at = chunk.spans.binary_search_by(|s| s.key().cmp(&key)).ok()?;
        let span = chunk.spans.remove(at);
        self.len -= 1;
        if chunk.spans.is_empty() {
            self.chunks.remove(c);
        } else {
            chunk.latest_end = latest_end(&chunk.spans);
        }
        Some(span)
    }

    /// Adds the ids of its spans binding at `t` to `found`, stopping
    /// once `found` holds more than `most`.
    fn active_at(&self, t: Timestamp, most: usize, found: &mut Vec<(Id, Id)>) -> Collected {
        let live = self
            .chunks
            .iter()
            .take_while(|c| c.first_from() <= t)
            .filter(|c| t < c.latest_end);
        for chunk in live {
            found.extend(Span::binding_at(&chunk.spans, t));
            if found.len() > most {
                return Collected::OverLimit;
            }
        }
        Collected::All
    }

    fn spans(&self) -> impl Iterator<Item = &Span> {
        self.chunks.iter().flat_map(|c| c.spans.iter())
    }
}

/// Where one chunk of a run is, and what a query needs to skip it.
#[derive(Clone, Debug)]
struct ChunkRef {
    first_from: Timestamp,
    latest_end: Timestamp,
    at: SegmentRef,
    len: u8,
}

/// Spans sorted by key, in chunks of [`CHUNK_MAX`] in the store.
#[derive(Clone, Debug, Default)]
struct Run {
    chunks: Vec<ChunkRef>,
    /// Spans in it.
    len: usize,
}

/// Spans of ended locks, in the store: see the module docs.
#[derive(Clone)]
struct StoredSpans {
    store: Arc<dyn SegmentStore>,
    /// Not written yet, in arrival order; fewer than `buffer_limit`.
    buffered: Vec<Span>,
    /// [`BUFFERED_SPANS`] (tests make runs sooner).
    buffer_limit: usize,
    /// Oldest (largest) first; a later one is smaller than an earlier one.
    runs: Vec<Run>,
    /// Spans in all.
    len: usize,
}

impl StoredSpans {
    fn new(store: Arc<dyn SegmentStore>, buffer_limit: usize) -> StoredSpans {
        assert!(buffer_limit >= 1, "a run holds at least one span");
        StoredSpans {
            store,
            buffer_limit,
            buffered: Vec::new(),
            runs: Vec::new(),
            len: 0,
        }
    }

    fn push(&mut self, span: Span) {
        self.buffered.push(span);
        self.len += 1;
        if self.buffered.len() >= self.buffer_limit {
            let mut spans = std::mem::take(&mut self.buffered);
            spans.sort_unstable_by(|a, b| a.key().cmp(&b.key()));
            let run = self.write_run(spans.into_iter());
            self.runs.push(run);
            self.merge();
        }
    }

    /// Merges the newest runs while the newest is as large as the one
    /// before it.
    fn merge(&mut self) {
        while let [.., older, newer] = &self.runs[..]
            && newer.len >= older.len
        {
            let merged = {
                let (a, b) = (self.read_run(older), self.read_run(newer));
                self.write_run(Merged {
                    a: a.peekable(),
                    b: b.peekable(),
                })
            };
            self.runs.truncate(self.runs.len() - 2);
            self.runs.push(merged);
        }
    }

    /// Writes `spans` (sorted, distinct) as a run.
    fn write_run(&self, spans: impl Iterator<Item = Span>) -> Run {
        let mut run = Run::default();
        let mut chunk = Vec::with_capacity(CHUNK_MAX);
        let flush = |chunk: &mut Vec<Span>, run: &mut Run| {
            run.len += chunk.len();
            run.chunks.push(ChunkRef {
                first_from: chunk[0].from,
                latest_end: latest_end(chunk),
                at: self.store.append(&encode(chunk)),
                len: u8::try_from(chunk.len()).expect("CHUNK_MAX fits a byte"),
            });
            chunk.clear();
        };
        for span in spans {
            debug_assert!(chunk.last().is_none_or(|l: &Span| l.key() < span.key()));
            chunk.push(span);
            if chunk.len() == CHUNK_MAX {
                flush(&mut chunk, &mut run);
            }
        }
        if !chunk.is_empty() {
            flush(&mut chunk, &mut run);
        }
        run
    }

    /// A chunk's spans (none if the read failed: the store keeps the
    /// failure, and the shell stops on it).
    fn read_chunk(&self, chunk: &ChunkRef) -> Vec<Span> {
        let mut bytes = Vec::new();
        if !self.store.read(chunk.at, &mut bytes) {
            return Vec::new();
        }
        decode(&bytes, usize::from(chunk.len))
    }

    /// A run's spans in order, read a chunk at a time.
    fn read_run<'a>(&'a self, run: &'a Run) -> impl Iterator<Item = Span> + 'a {
        run.chunks.iter().flat_map(|c| self.read_chunk(c))
    }

    /// As [`Chunks::active_at`]; a chunk is read back only while `found`
    /// holds at most `most`.
    fn active_at(&self, t: Timestamp, most: usize, found: &mut Vec<(Id, Id)>) -> Collected {
        found.extend(Span::binding_at(&self.buffered, t));
        if found.len() > most {
            return Collected::OverLimit;
        }
        // One buffer for every chunk read: `read` replaces its contents.
        let mut bytes = Vec::new();
        for run in &self.runs {
            let live = run
                .chunks
                .iter()
                .take_while(|c| c.first_from <= t)
                .filter(|c| t < c.latest_end);
            for chunk in live {
                if self.store.read(chunk.at, &mut bytes) {
                    binding_in_encoded(&bytes, usize::from(chunk.len), t, found);
                }
                if found.len() > most {
                    return Collected::OverLimit;
                }
            }
        }
        Collected::All
    }

    /// Every span, in key order.
    fn spans(&self) -> Vec<Span> {
        let mut all: Vec<Span> = self
            .runs
            .iter()
            .flat_map(|run| self.read_run(run))
            .chain(self.buffered.iter().cloned())
            .collect();
        all.sort_unstable_by(|a, b| a.key().cmp(&b.key()));
        all
    }
}

/// Two sorted streams of spans merged into one.
struct Merged<A: Iterator<Item = Span>, B: Iterator<Item = Span>> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<A: Iterator<Item = Span>, B: Iterator<Item = Span>> Iterator for Merged<A, B> {
    type Item = Span;

    fn next(&mut self) -> Option<Span> {
        match (self.a.peek(), self.b.peek()) {
            (Some(x), Some(y)) if y.key() < x.key() => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

/// Bytes of a span's times: two (seconds, nanoseconds) pairs.
const SPAN_TIME_BYTES: usize = 2 * (8 + 4);

/// The encoding of spans in the store: per span, `from` and `end` as
/// big-endian seconds (i64) and nanoseconds (u32) since the Unix epoch,
/// then the deal id and the lock id, each a length byte and its bytes.
fn encode(spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::with_capacity(spans.len() * (SPAN_TIME_BYTES + 2 + 32));
    for span in spans {
        for t in [span.from, span.end] {
            let (secs, nanos) = t.unix_parts();
            out.extend_from_slice(&secs.to_be_bytes());
            out.extend_from_slice(&nanos.to_be_bytes());
        }
        for id in [&span.deal, &span.lock] {
            let bytes = id.as_str().as_bytes();
            out.push(u8::try_from(bytes.len()).expect("an id has at most 128 characters"));
            out.extend_from_slice(bytes);
        }
    }
    out
}

/// One span as [`encode`] stored it: its times as (seconds, nanoseconds)
/// since the epoch, which order instants as the timestamps do (nanoseconds
/// stay below 10^9: there are no leap seconds), and its ids' bytes.
struct RawSpan<'a> {
    from: (i64, u32),
    end: (i64, u32),
    deal: &'a [u8],
    lock: &'a [u8],
}

/// The `len` spans [`encode`] wrote into `bytes`, in order, undecoded (in
/// this process: anything else is a bug).
fn raw_spans(mut bytes: &[u8], len: usize) -> impl Iterator<Item = RawSpan<'_>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        head
    }
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            assert!(bytes.is_empty(), "a stored chunk has bytes after its spans");
            return None;
        }
        left -= 1;
        let mut time = || {
            let secs = i64::from_be_bytes(take(&mut bytes, 8).try_into().expect("8 bytes"));
            let nanos = u32::from_be_bytes(take(&mut bytes, 4).try_into().expect("4 bytes"));
            (secs, nanos)
        };
        let (from, end) = (time(), time());
        let mut id = || {
            let n = usize::from(take(&mut bytes, 1)[0]);
            take(&mut bytes, n)
        };
        let (deal, lock) = (id(), id());
        Some(RawSpan {
            from,
            end,
            deal,
            lock,
        })
    })
}

/// An id [`encode`] wrote.
fn stored_id(bytes: &[u8]) -> Id {
    let text = std::str::from_utf8(bytes).expect("an id this process wrote");
    Id::parse(text).expect("an id this process wrote")
}

/// A time [`encode`] wrote.
fn stored_time((secs, nanos): (i64, u32)) -> Timestamp {
    Timestamp::from_unix_parts(secs, nanos).expect("a span's time this process wrote")
}

/// Adds to `found` the ids of the spans in `bytes` ([`encode`]d, `len` of
/// them) that bind at `t`, as [`Span::binding_at`] over [`decode`] would,
/// but testing each span's times as they are stored, before anything is
/// decoded: only the ids of spans that bind are read into [`Id`]s. A
/// `locks active` page reads many chunks whose spans mostly do not bind.
fn binding_in_encoded(bytes: &[u8], len: usize, t: Timestamp, found: &mut Vec<(Id, Id)>) {
    let t = t.unix_parts();
    found.extend(
        raw_spans(bytes, len)
            .filter(|s| s.from <= t && t < s.end)
            .map(|s| (stored_id(s.deal), stored_id(s.lock))),
    );
}

/// Decodes what [`encode`] wrote (in this process: anything else is a bug).
fn decode(bytes: &[u8], len: usize) -> Vec<Span> {
    raw_spans(bytes, len)
        .map(|s| Span {
            from: stored_time(s.from),
            end: stored_time(s.end),
            deal: stored_id(s.deal),
            lock: stored_id(s.lock),
        })
        .collect()
}

/// Where the spans of ended locks are.
#[derive(Clone)]
enum Ended {
    Kept(Chunks),
    Stored(StoredSpans),
}

impl Default for Ended {
    fn default() -> Self {
        Ended::Kept(Chunks::default())
    }
}

/// The binding intervals of locks. See the module docs.
#[derive(Clone, Default)]
pub struct LockTimeline {
    /// Locks with no end yet (not ended, no `valid_until`), by (from,
    /// deal, lock): all of them bind at every time from their start on.
    /// Kept apart so that they do not make every chunk look live.
    open: BTreeSet<SpanKey>,
    /// Locks not ended that expire (`valid_until`): their end may still
    /// move earlier.
    expiring: Chunks,
    /// Locks that ended.
    ended: Ended,
}

impl fmt::Debug for LockTimeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ended, stored) = match &self.ended {
            Ended::Kept(chunks) => (chunks.len, false),
            Ended::Stored(stored) => (stored.len, true),
        };
        f.debug_struct("LockTimeline")
            .field("open", &self.open.len())
            .field("expiring", &self.expiring.len)
            .field("ended", &ended)
            .field("stored", &stored)
            .finish()
    }
}

/// Equal when they hold the same spans, however chunked, wherever kept.
impl PartialEq for LockTimeline {
    fn eq(&self, other: &Self) -> bool {
        let ended = |t: &LockTimeline| -> Vec<Span> {
            match &t.ended {
                Ended::Kept(chunks) => chunks.spans().cloned().collect(),
                Ended::Stored(stored) => stored.spans(),
            }
        };
        self.open == other.open
            && self.expiring.spans().eq(other.expiring.spans())
            && ended(self) == ended(other)
    }
}

impl Eq for LockTimeline {}

/// What the timeline needs of one lock ([`LockTimeline::from_spans`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockSpan {
    /// The deal that granted it.
    pub deal: Id,
    /// Its id.
    pub lock: Id,
    /// It binds from then (its `valid_from`).
    pub from: Timestamp,
    /// Until then (exclusive: the earlier of its `valid_until` and its
    /// end), or for ever.
    pub end: Option<Timestamp>,
    /// Whether it ended (released, or its deal terminated): final.
    pub ended: bool,
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

    /// The timeline of `locks` (each once), built at once: full chunks, in
    /// order.
    pub fn from_locks<L: std::borrow::Borrow<Lock>>(
        locks: impl Iterator<Item = L>,
    ) -> LockTimeline {
        LockTimeline::from_spans(locks.map(|lock| {
            let lock = lock.borrow();
            LockSpan {
                deal: lock.deal_id.clone(),
                lock: lock.lock_id.clone(),
                from: lock.valid_from,
                end: binding_end(lock),
                ended: lock.ended.is_some(),
            }
        }))
    }

    /// The timeline of the locks `spans` describe (each once), built at
    /// once: full chunks, in order.
    pub fn from_spans(spans: impl Iterator<Item = LockSpan>) -> LockTimeline {
        let mut timeline = LockTimeline::new();
        let (mut expiring, mut ended) = (Vec::new(), Vec::new());
        for lock in spans {
            let Some(end) = lock.end else {
                timeline.open.insert((lock.from, lock.deal, lock.lock));
                continue;
            };
            let span = Span {
                from: lock.from,
                end,
                deal: lock.deal,
                lock: lock.lock,
            };
            match lock.ended {
                false => expiring.push(span),
                true => ended.push(span),
            }
        }
        for spans in [&mut expiring, &mut ended] {
            spans.sort_unstable_by(|a, b| a.key().cmp(&b.key()));
            spans.dedup_by(|a, b| a.key() == b.key());
        }
        timeline.expiring = Chunks::of_sorted(expiring);
        timeline.ended = Ended::Kept(Chunks::of_sorted(ended));
        timeline
    }

    /// Moves the spans of ended locks to `store`, as one run, and those of
    /// locks that end from now on (see the module docs).
    pub fn store_in(&mut self, store: Arc<dyn SegmentStore>) {
        self.store_in_buffering(store, BUFFERED_SPANS);
    }

    /// [`LockTimeline::store_in`], writing a run every `buffer_limit` spans.
    fn store_in_buffering(&mut self, store: Arc<dyn SegmentStore>, buffer_limit: usize) {
        let Ended::Kept(kept) = &mut self.ended else {
            panic!("the lock timeline stored twice");
        };
        let kept = std::mem::take(kept);
        let mut stored = StoredSpans::new(store, buffer_limit);
        if kept.len > 0 {
            let run = stored.write_run(kept.chunks.into_iter().flat_map(|c| c.spans));
            stored.len = run.len;
            stored.runs.push(run);
        }
        self.ended = Ended::Stored(stored);
    }

    /// How many locks it holds.
    pub fn len(&self) -> usize {
        self.open.len()
            + self.expiring.len
            + match &self.ended {
                Ended::Kept(chunks) => chunks.len,
                Ended::Stored(stored) => stored.len,
            }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `lock` as it is now: granted, or ended (then it replaces what
    /// was recorded of it when granted). A lock ends once.
    pub fn insert(&mut self, lock: &Lock) {
        match &lock.ended {
            None => self.granted(
                &lock.deal_id,
                &lock.lock_id,
                lock.valid_from,
                lock.valid_until,
            ),
            Some(end) => {
                let mut granted = lock.clone();
                granted.ended = None;
                self.ended(&granted, end.at);
            }
        }
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
        let (deal, lock) = (deal.clone(), lock.clone());
        match valid_until {
            None => {
                self.open.insert((valid_from, deal, lock));
            }
            Some(end) => self.expiring.put(Span {
                from: valid_from,
                end,
                deal,
                lock,
            }),
        }
    }

    /// Records that `lock` (as it was before it ended) ended at `at`.
    pub fn ended(&mut self, lock: &Lock, at: Timestamp) {
        let key = (lock.valid_from, &lock.deal_id, &lock.lock_id);
        match lock.valid_until {
            None => {
                self.open
                    .remove(&(lock.valid_from, lock.deal_id.clone(), lock.lock_id.clone()));
            }
            Some(_) => {
                self.expiring.remove(key);
            }
        }
        let span = Span {
            from: lock.valid_from,
            end: lock.valid_until.map_or(at, |until| until.min(at)),
            deal: lock.deal_id.clone(),
            lock: lock.lock_id.clone(),
        };
        match &mut self.ended {
            Ended::Kept(chunks) => chunks.put(span),
            Ended::Stored(stored) => stored.push(span),
        }
    }

    /// The (deal, lock) ids of every lock binding at `t`, in no particular
    /// order: exactly the locks whose [`Lock::active_at`] is true (but
    /// those of a stored chunk that could not be read back: the store keeps
    /// that failure).
    pub fn active_at(&self, t: Timestamp) -> Vec<(Id, Id)> {
        self.active_at_most(t, usize::MAX)
            .expect("no more than usize::MAX locks")
    }

    /// [`LockTimeline::active_at`] if at most `most` locks bind at `t`;
    /// `None` if more do, found without collecting (or reading back) much
    /// more than `most`. A caller that wants a few of them can then look
    /// for them another way.
    pub fn active_at_most(&self, t: Timestamp, most: usize) -> Option<Vec<(Id, Id)>> {
        let mut found: Vec<(Id, Id)> = self
            .open
            .iter()
            .take_while(|(from, _, _)| *from <= t)
            .take(most.saturating_add(1))
            .map(|(_, deal, lock)| (deal.clone(), lock.clone()))
            .collect();
        if found.len() > most {
            return None;
        }
        if self.expiring.active_at(t, most, &mut found) == Collected::OverLimit {
            return None;
        }
        let collected = match &self.ended {
            Ended::Kept(chunks) => chunks.active_at(t, most, &mut found),
            Ended::Stored(stored) => stored.active_at(t, most, &mut found),
        };
        (collected == Collected::All).then_some(found)
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
                .iter()
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

    #[test]
    fn spans_binding_in_an_encoded_chunk_are_those_the_decoded_chunk_says() {
        // Times a nanosecond apart and whole seconds apart, so that the
        // stored (seconds, nanoseconds) order is tested at its edges.
        let at = |secs: i64, nanos: u32| Timestamp::from_unix_parts(secs, nanos).expect("in range");
        let times = [
            at(100, 0),
            at(100, 1),
            at(100, 999_999_999),
            at(101, 0),
            at(-5, 7),
        ];
        let mut spans = Vec::new();
        for (i, &from) in times.iter().enumerate() {
            for (j, &end) in times.iter().enumerate() {
                if from < end {
                    spans.push(Span {
                        from,
                        end,
                        deal: Id::new(format!("deal-{i}")).expect("id"),
                        lock: Id::new(format!("lock-{j}")).expect("id"),
                    });
                }
            }
        }
        let bytes = encode(&spans);
        let decoded = decode(&bytes, spans.len());
        for t in times.into_iter().chain([at(99, 0), at(102, 0)]) {
            let mut found = Vec::new();
            binding_in_encoded(&bytes, spans.len(), t, &mut found);
            let expected: Vec<(Id, Id)> = Span::binding_at(&decoded, t).collect();
            assert_eq!(found, expected, "at {t}");
        }
    }

    proptest! {
        /// Over grants (many enough to split chunks) and ends in any order,
        /// the timeline answers what testing every lock answers, at every
        /// time, chunk edges included.
        /// A store attached at any point (after `store_at` operations),
        /// with runs of any size, changes no answer.
        #[test]
        fn answers_what_testing_every_lock_answers(
            ops in proptest::collection::vec(op(), 0..600),
            probes in proptest::collection::vec(-10i64..1_300, 1..40),
            store_at in 0usize..700,
            buffer in 1usize..40,
        ) {
            let store = Arc::new(crate::index::MemorySegments::default());
            let mut timeline = LockTimeline::new();
            let mut stored = LockTimeline::new();
            let mut locks: Vec<Lock> = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                if i == store_at {
                    stored.store_in_buffering(store.clone(), buffer);
                }
                match *op {
                    Op::Grant { deal, from, until } => {
                        let l = lock(deal, locks.len() as u32, from, until);
                        timeline.insert(&l);
                        stored.insert(&l);
                        locks.push(l);
                    }
                    Op::End { pick, at } if !locks.is_empty() => {
                        let i = pick % locks.len();
                        if locks[i].ended.is_none() {
                            locks[i] = ended(locks[i].clone(), at);
                            timeline.insert(&locks[i]);
                            stored.insert(&locks[i]);
                        }
                    }
                    Op::End { .. } => {}
                }
            }
            if store_at >= ops.len() {
                stored.store_in_buffering(store.clone(), buffer);
            }
            prop_assert_eq!(timeline.len(), locks.len());
            prop_assert_eq!(stored.len(), locks.len());
            let rebuilt = LockTimeline::from_locks(locks.iter());
            prop_assert_eq!(rebuilt.len(), locks.len());
            let chunks_hold = |c: &Chunks| {
                c.chunks.iter().all(|c| !c.spans.is_empty() && c.spans.len() <= CHUNK_MAX)
                    && c.len == c.chunks.iter().map(|c| c.spans.len()).sum::<usize>()
                    && c.spans().zip(c.spans().skip(1)).all(|(a, b)| a.key() < b.key())
            };
            for t in [&timeline, &stored, &rebuilt] {
                prop_assert!(chunks_hold(&t.expiring));
                if let Ended::Kept(kept) = &t.ended {
                    prop_assert!(chunks_hold(kept));
                }
            }
            let Ended::Stored(s) = &stored.ended else { panic!("stored") };
            prop_assert!(s.buffered.len() < buffer);
            prop_assert!(s.runs.windows(2).all(|w| w[0].len > w[1].len), "runs shrink");
            prop_assert_eq!(s.len, s.buffered.len() + s.runs.iter().map(|r| r.len).sum::<usize>());
            for run in &s.runs {
                prop_assert_eq!(run.len, run.chunks.iter().map(|c| usize::from(c.len)).sum::<usize>());
                prop_assert!(run.chunks.iter().all(|c| usize::from(c.len) <= CHUNK_MAX));
                let spans: Vec<Span> = s.read_run(run).collect();
                prop_assert!(spans.windows(2).all(|w| w[0].key() < w[1].key()));
            }
            prop_assert!(stored == timeline && timeline == rebuilt);
            let starts = locks.iter().map(|l| l.valid_from.unix_millis() / 1000);
            for (i, p) in probes.into_iter().chain(starts).enumerate() {
                let t = ts(p);
                let expected = sorted(locks.iter().filter(|l| l.active_at(t)).map(|l| (l.deal_id.clone(), l.lock_id.clone())).collect());
                prop_assert_eq!(&sorted(timeline.active_at(t)), &expected, "at {}", p);
                prop_assert_eq!(&sorted(rebuilt.active_at(t)), &expected, "rebuilt, at {}", p);
                // Reading chunks back is slower: every 4th time (and the
                // times are random, chunk edges included).
                if i % 4 == 0 {
                    prop_assert_eq!(&sorted(stored.active_at(t)), &expected, "stored, at {}", p);
                }
                // Capped: the same answer up to the cap, none past it.
                let n = expected.len();
                for most in [0, n / 2, n.saturating_sub(1), n, n + 1] {
                    for (what, tl) in [("memory", &timeline), ("stored", &stored)] {
                        let got = tl.active_at_most(t, most).map(sorted);
                        let want = (n <= most).then(|| expected.clone());
                        prop_assert_eq!(got, want, "{} at {}, at most {}", what, p, most);
                    }
                }
            }
            prop_assert!(store.failure().is_none());
        }
    }
}
