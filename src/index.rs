//! The query index: which ledger entries stand behind each deal.
//!
//! Why this module exists: the [`DealBook`](crate::deal::DealBook) holds each
//! deal's *current state*, which is all the fold needs. Compliance officers
//! also ask *where that state came from*: every query answer cites the
//! stream, sequence and hash of the entries behind it, `deal history` lists
//! every entry of a deal (accepted, rejected or duplicate), and findings look
//! at business and record times across a deal's events and at what each
//! producer sent. This index keeps exactly that, compactly: one fixed-size
//! [`HistoryItem`] per entry, plus the entries that opened, agreed, finalized
//! and terminated each deal and granted or ended each lock.
//!
//! It is derived data like the deal book: [`LedgerState`](crate::ledger::LedgerState)
//! updates it for every entry it judges (ingest and replay run the same
//! code), snapshots store it ([`DealIndex::encode`]), and a replay from
//! genesis rebuilds it. Part of the pure core: no I/O, no clock; the
//! storage shell gives it a [`SegmentStore`] to keep history items in.
//!
//! Memory: about 12 bytes per entry ([`HistoryItems`]: each entry's item
//! stored as its difference from the deal's previous one), most of which
//! goes to the [`SegmentStore`] once spilled
//! ([`DealIndex::spill_history_to`]: then 16 bytes per 64 entries and each
//! deal's last segment stay), plus a small record per deal and per lock
//! (a terminated deal's goes to the store too, whole); the
//! strings of producers (`source`) and rejection kinds are interned once
//! (see ARCHITECTURE.md, "Memory").

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::chain::{HASH_LEN, Hash};
use crate::deal::IdMap;
use crate::event::{DealEvent, EventType, Id, Payload, Timestamp};
use crate::ledger::{Location, ScratchFailure};
use crate::timeline::LockTimeline;

/// Largest number of distinct producers (`source` values) kept by name;
/// events of further sources are counted under [`OTHER_SOURCES`].
pub const MAX_SOURCES: usize = 65_536;

/// Largest number of distinct rejection kinds kept by name (the real number
/// is about thirty; the bound only guards the encoding).
pub const MAX_KINDS: usize = 250;

/// The name events of sources beyond [`MAX_SOURCES`] are counted under.
pub const OTHER_SOURCES: &str = "(other sources)";

/// The source of entries whose event did not decode.
pub const UNKNOWN_SOURCE: &str = "(not decodable)";

/// Fewest bytes one [`HistoryItem`] takes in its delta encoding: four
/// one-byte varints, the type and the verdict.
const MIN_ITEM_BYTES: usize = 4 + 1 + 1;

/// Format byte of [`DealIndex::encode`].
const INDEX_FORMAT: u8 = 2;

/// Size of the pieces [`DealIndex::encode_in_pieces`] hands out (a piece
/// ends after the deal that reaches it, so one deal with a long history
/// makes a longer piece).
pub const ENCODE_PIECE_BYTES: usize = 256 * 1024;

/// What became of one entry, compactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemVerdict {
    /// Folded into its deal.
    Accepted,
    /// The same `source` + `id` was recorded before.
    Duplicate,
    /// Refused; the kind is an index into [`DealIndex::kind_name`].
    Rejected(u8),
}

impl ItemVerdict {
    fn code(self) -> u8 {
        match self {
            ItemVerdict::Accepted => 0,
            ItemVerdict::Duplicate => 1,
            ItemVerdict::Rejected(k) => 2 + k,
        }
    }

    fn from_code(code: u8) -> Option<ItemVerdict> {
        match code {
            0 => Some(ItemVerdict::Accepted),
            1 => Some(ItemVerdict::Duplicate),
            2..=255 => Some(ItemVerdict::Rejected(code - 2)),
        }
    }
}

/// One entry as the index keeps it (32 bytes in memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryItem {
    /// Where the entry is, packed: partition in the top 16 bits, seq below.
    packed: u64,
    /// The event's business `time` in microseconds since the Unix epoch
    /// ([`HistoryItem::NO_TIME`] when it did not decode).
    pub time_micros: i64,
    /// Kafka's record timestamp in milliseconds.
    pub record_ms: i64,
    /// Index of the producer into [`DealIndex::source_name`].
    pub source: u32,
    /// The event type's position in [`EventType::ALL`], or `u8::MAX`.
    event_type: u8,
    /// What became of it.
    verdict: u8,
}

impl HistoryItem {
    /// `time_micros` of an entry whose event did not decode.
    pub const NO_TIME: i64 = i64::MIN;

    /// All fields zero: what the first item of a [`HistoryItems`] run is
    /// stored as a difference from.
    const ZERO: HistoryItem = HistoryItem {
        packed: 0,
        time_micros: 0,
        record_ms: 0,
        source: 0,
        event_type: 0,
        verdict: 0,
    };

    /// Where the entry is.
    pub fn location(&self) -> Location {
        unpack(self.packed)
    }

    /// The event type, when the event decoded.
    pub fn event_type(&self) -> Option<EventType> {
        EventType::ALL.get(usize::from(self.event_type)).copied()
    }

    /// What became of the entry.
    pub fn verdict(&self) -> ItemVerdict {
        ItemVerdict::from_code(self.verdict).expect("every code is a verdict")
    }

    /// The business time, when the event decoded.
    pub fn time(&self) -> Option<Timestamp> {
        (self.time_micros != Self::NO_TIME)
            .then(|| Timestamp::from_unix_micros(self.time_micros))
            .flatten()
    }
}

/// How often [`HistoryItems`] stores an item as a difference from zero
/// (all fields zero) and keeps its byte offset: reading from any position
/// decodes fewer than this many items in vain. Also the size of a sealed
/// segment.
pub const CHECKPOINT_ITEMS: usize = 64;

/// A deal's [`HistoryItem`]s, compactly: about 12 bytes each instead of 32
/// (the index's largest part: it grows with every entry, and the daemon
/// keeps it in memory). Each item is stored as its difference from the one
/// before (zigzag varints: a deal's consecutive entries have close
/// locations, times and producers), every [`CHECKPOINT_ITEMS`]-th as its
/// difference from zero, with its byte offset kept, so a page of a deal's
/// history can start anywhere.
///
/// With a [`SegmentStore`] ([`HistoryItems::spill_to`]), each run of
/// [`CHECKPOINT_ITEMS`] items from a checkpoint (a *segment*, decodable on
/// its own) goes to the store once the next item arrives; memory keeps the
/// segments' places (16 bytes per 64 items) and the unsealed last segment,
/// which can be parked in the store too ([`HistoryItems::park`]) while no
/// item is expected: a terminated deal's (read back if one comes).
#[derive(Clone, Default)]
pub struct HistoryItems {
    /// Without a store: every item. With one: the last segment's items.
    bytes: Vec<u8>,
    /// Without a store: byte offset of items 0, CHECKPOINT_ITEMS,
    /// 2 * CHECKPOINT_ITEMS, ... With one: empty (the last segment starts
    /// at byte 0).
    checkpoints: Vec<usize>,
    len: usize,
    /// The last item pushed; [`HistoryItem::ZERO`] while empty.
    last: HistoryItem,
    /// Where sealed segments go, once spilled.
    store: Option<Arc<dyn SegmentStore>>,
    /// The sealed segments, in order: items 0..64, 64..128, ...
    sealed: Vec<SegmentRef>,
    /// Where the last segment is while parked (`bytes` is then empty).
    parked: Option<SegmentRef>,
}

#[cfg(test)]
pub(crate) use tests::MemorySegments;

/// Where a sealed segment of history items is in a [`SegmentStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentRef {
    /// Where it starts.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u32,
}

/// Where the index keeps sealed segments of history items: the one part of
/// the index that grows with every event (12.5 bytes each), moved out of
/// memory by the storage shell (`segments::SegmentFile`). Appends and reads
/// do not fail from the fold's point of view: the store keeps what it could
/// not write in memory and records its first failure
/// ([`SegmentStore::failure`]), which the shell checks before it stores
/// anything derived from the state; a read that fails ends the iteration
/// early and is recorded the same way.
pub trait SegmentStore: Send + Sync {
    /// Stores `bytes` and says where.
    fn append(&self, bytes: &[u8]) -> SegmentRef;
    /// The bytes of the segment at `at` into `out` (replacing its
    /// contents); false, with the failure recorded, if it cannot.
    fn read(&self, at: SegmentRef, out: &mut Vec<u8>) -> bool;
    /// The first failure met, if any.
    fn failure(&self) -> Option<&ScratchFailure>;
}

impl fmt::Debug for HistoryItems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistoryItems")
            .field("len", &self.len)
            .field("sealed", &self.sealed.len())
            .field("spilled", &self.store.is_some())
            .field("parked", &self.parked.is_some())
            .finish()
    }
}

/// Equal when they hold the same items, wherever they keep them.
impl PartialEq for HistoryItems {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for HistoryItems {}

impl Default for HistoryItem {
    fn default() -> Self {
        HistoryItem::ZERO
    }
}

impl HistoryItems {
    /// Appends `item` (the deal's next entry in ledger order).
    pub fn push(&mut self, item: HistoryItem) {
        let base = if self.len.is_multiple_of(CHECKPOINT_ITEMS) {
            match &self.store {
                Some(store) => {
                    if let Some(parked) = self.parked.take() {
                        // The parked segment is whole: sealed where it is.
                        self.sealed.push(parked);
                    } else if self.len > 0 {
                        // The last segment is whole: seal it.
                        self.sealed.push(store.append(&self.bytes));
                        self.bytes.clear();
                    }
                }
                None => self.checkpoints.push(self.bytes.len()),
            }
            HistoryItem::ZERO
        } else {
            if let Some(parked) = self.parked.take() {
                let store = self.store.as_ref().expect("parked items have a store");
                // On a failed read (recorded by the store, which the shell
                // checks) the segment's items before this one are lost.
                store.read(parked, &mut self.bytes);
            }
            self.last
        };
        put_delta(&mut self.bytes, &base, &item);
        self.last = item;
        self.len += 1;
        debug_assert!(self.store.is_none() || self.sealed.len() * CHECKPOINT_ITEMS < self.len);
    }

    /// Moves the last segment's items, unsealed, to the store until the
    /// next item comes (then read back, or sealed where they are if the
    /// segment is whole): for a deal that is expected to get no more
    /// items. Nothing to do without a store or items in memory.
    pub fn park(&mut self) {
        let Some(store) = &self.store else {
            return;
        };
        if self.bytes.is_empty() {
            return;
        }
        debug_assert!(self.parked.is_none(), "parked with items in memory");
        self.parked = Some(store.append(&self.bytes));
        self.bytes = Vec::new();
    }

    /// Moves every whole segment but the last to `store`, and the segments
    /// sealed from now on. Items and their order stay as they are.
    pub fn spill_to(&mut self, store: &Arc<dyn SegmentStore>) {
        assert!(self.store.is_none(), "history items spilled twice");
        if self.len > 0 {
            // The segment of the last item stays in memory, unsealed.
            let last_segment = (self.len - 1) / CHECKPOINT_ITEMS;
            let starts = &self.checkpoints;
            for k in 0..last_segment {
                self.sealed
                    .push(store.append(&self.bytes[starts[k]..starts[k + 1]]));
            }
            self.bytes.drain(..starts[last_segment]);
            self.bytes.shrink_to_fit();
        }
        self.checkpoints = Vec::new();
        self.sealed.shrink_to_fit();
        self.store = Some(Arc::clone(store));
    }

    /// Byte offset, in `bytes`, of the segment starting at item
    /// `segment * CHECKPOINT_ITEMS`, which must be in memory.
    fn start_in_memory(&self, segment: usize) -> usize {
        match &self.store {
            Some(_) => {
                debug_assert_eq!(segment, self.sealed.len());
                0
            }
            None => self.checkpoints[segment],
        }
    }

    /// How many items there are.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The items in order.
    pub fn iter(&self) -> HistoryIter<'_> {
        self.iter_from(0)
    }

    /// The items from position `start` on (none when `start` is past the
    /// end): decodes from the checkpoint at or before `start`.
    pub fn iter_from(&self, start: usize) -> HistoryIter<'_> {
        let start = start.min(self.len);
        let mut iter = HistoryIter {
            items: self,
            buf: Cow::Borrowed(&[]),
            at: 0,
            prev: HistoryItem::ZERO,
            position: start - start % CHECKPOINT_ITEMS,
            failed: false,
        };
        for _ in iter.position..start {
            iter.next();
        }
        iter
    }

    /// The encoding of every item, as one piece (what [`put_history`]
    /// stores): the sealed segments read back, then the rest. `None` if a
    /// segment cannot be read (the store records why).
    fn encoded(&self) -> Option<Cow<'_, [u8]>> {
        let Some(store) = &self.store else {
            return Some(Cow::Borrowed(&self.bytes));
        };
        let total = self
            .sealed
            .iter()
            .chain(&self.parked)
            .map(|r| r.len as usize)
            .sum::<usize>()
            + self.bytes.len();
        let mut out = Vec::with_capacity(total);
        let mut segment = Vec::new();
        for at in self.sealed.iter().chain(&self.parked) {
            if !store.read(*at, &mut segment) {
                return None;
            }
            out.extend_from_slice(&segment);
        }
        out.extend_from_slice(&self.bytes);
        Some(Cow::Owned(out))
    }

    /// Gives back the room kept for items to come (after a restore).
    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.checkpoints.shrink_to_fit();
        self.sealed.shrink_to_fit();
    }

    /// Bytes held in memory (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity()
            + self.checkpoints.capacity() * std::mem::size_of::<usize>()
            + self.sealed.capacity() * std::mem::size_of::<SegmentRef>()
    }
}

impl FromIterator<HistoryItem> for HistoryItems {
    fn from_iter<I: IntoIterator<Item = HistoryItem>>(items: I) -> Self {
        let mut out = HistoryItems::default();
        for item in items {
            out.push(item);
        }
        out
    }
}

/// The items of a [`HistoryItems`], by value, in order. Ends early if a
/// sealed segment cannot be read (the store records why).
pub struct HistoryIter<'a> {
    items: &'a HistoryItems,
    /// The bytes of the segment being read: borrowed from memory, or read
    /// from the store.
    buf: Cow<'a, [u8]>,
    at: usize,
    prev: HistoryItem,
    /// Position of the next item.
    position: usize,
    failed: bool,
}

impl Iterator for HistoryIter<'_> {
    type Item = HistoryItem;

    fn next(&mut self) -> Option<HistoryItem> {
        if self.position == self.items.len || self.failed {
            return None;
        }
        let base = if self.position.is_multiple_of(CHECKPOINT_ITEMS) {
            // A segment starts: from the store, or from memory.
            let segment = self.position / CHECKPOINT_ITEMS;
            let stored = self
                .items
                .sealed
                .get(segment)
                .or(self.items.parked.as_ref());
            match (&self.items.store, stored) {
                (Some(store), Some(at)) => {
                    let mut buf = match std::mem::take(&mut self.buf) {
                        Cow::Owned(buf) => buf,
                        Cow::Borrowed(_) => Vec::new(),
                    };
                    if !store.read(*at, &mut buf) {
                        self.failed = true;
                        return None;
                    }
                    self.buf = Cow::Owned(buf);
                    self.at = 0;
                }
                _ => {
                    self.buf = Cow::Borrowed(&self.items.bytes);
                    self.at = self.items.start_in_memory(segment);
                }
            }
            HistoryItem::ZERO
        } else {
            self.prev
        };
        let Some(item) = get_delta(&self.buf, &mut self.at, &base) else {
            // Only a store that gave back other bytes than it was given.
            self.failed = true;
            return None;
        };
        self.prev = item;
        self.position += 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.items.len - self.position;
        (0, Some(left))
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint as [`put_varint`] writes it; `None` if the bytes end
/// first or it does not fit 64 bits (snapshots are read with this too, so
/// it must not panic on any input).
fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        if shift == 63 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// `item` as its difference from `base` (wrapping, so any values round-trip).
fn put_delta(out: &mut Vec<u8>, base: &HistoryItem, item: &HistoryItem) {
    put_varint(out, zigzag(item.packed.wrapping_sub(base.packed) as i64));
    put_varint(out, zigzag(item.time_micros.wrapping_sub(base.time_micros)));
    put_varint(out, zigzag(item.record_ms.wrapping_sub(base.record_ms)));
    put_varint(out, zigzag(i64::from(item.source) - i64::from(base.source)));
    out.push(item.event_type);
    out.push(item.verdict);
}

/// The inverse of [`put_delta`]; `None` for bytes it did not write.
fn get_delta(bytes: &[u8], at: &mut usize, base: &HistoryItem) -> Option<HistoryItem> {
    let packed = base
        .packed
        .wrapping_add(unzigzag(get_varint(bytes, at)?) as u64);
    let time_micros = base
        .time_micros
        .wrapping_add(unzigzag(get_varint(bytes, at)?));
    let record_ms = base
        .record_ms
        .wrapping_add(unzigzag(get_varint(bytes, at)?));
    let source = i64::from(base.source).checked_add(unzigzag(get_varint(bytes, at)?))?;
    let source = u32::try_from(source).ok()?;
    let [event_type, verdict] = *bytes.get(*at..*at + 2)? else {
        return None;
    };
    *at += 2;
    Some(HistoryItem {
        packed,
        time_micros,
        record_ms,
        source,
        event_type,
        verdict,
    })
}

/// An entry cited as evidence: where it is and its chain hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cited {
    /// Where the entry is.
    pub location: Location,
    /// Its entry hash.
    pub hash: Hash,
}

/// The entries that granted and ended one lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockRefs {
    /// The `deal.exclusivity.granted` entry.
    pub granted: Option<Cited>,
    /// The `deal.exclusivity.released` or `deal.terminated` entry that ended it.
    pub ended: Option<Cited>,
}

/// Everything the index keeps about one deal id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DealEntries {
    /// Every entry naming the deal, in ledger order.
    pub items: HistoryItems,
    /// The accepted `deal.negotiation.opened`.
    pub opened: Option<Cited>,
    /// The accepted `deal.terms.accepted`.
    pub agreed: Option<Cited>,
    /// The accepted `deal.finalized`.
    pub finalized: Option<Cited>,
    /// The accepted event that set the current terms (acceptance,
    /// finalization or the latest amendment).
    pub terms_from: Option<Cited>,
    /// The accepted `deal.terminated`.
    pub terminated: Option<Cited>,
    /// The last accepted event.
    pub last: Option<Cited>,
    /// Each lock granted by the deal.
    pub locks: LockEntries,
}

impl DealEntries {
    /// Moves what is final to `store`: whole segments of history items and
    /// ended locks' entries (a terminated deal's whole entries go there
    /// too: [`KeptEntries::close`]).
    fn spill_to(&mut self, store: &Arc<dyn SegmentStore>) {
        self.items.spill_to(store);
        self.locks.store_in(store);
    }

    /// The record [`KeptEntries::Stored`] points to, if these entries can
    /// be stored whole: terminated, and everything else already in the
    /// store (history items sealed or parked, every lock ended and
    /// stored). The six cited entries, then the items' count, last item
    /// and places, then the locks' fingerprints and places.
    fn stored_record(&self) -> Option<Vec<u8>> {
        let items = &self.items;
        let storable = self.terminated.is_some()
            && items.store.is_some()
            && items.bytes.is_empty()
            && self.locks.store.is_some()
            && self.locks.held.is_empty()
            && self.locks.ended.is_empty();
        if !storable {
            return None;
        }
        let mut out = Vec::with_capacity(
            6 * (8 + HASH_LEN) + 64 + 12 * items.sealed.len() + 16 * self.locks.stored.len(),
        );
        for cited in self.cited() {
            put_cited(&mut out, cited);
        }
        put_u64(&mut out, items.len as u64);
        put_delta(&mut out, &HistoryItem::ZERO, &items.last);
        put_u32(&mut out, items.sealed.len() as u32);
        for at in &items.sealed {
            put_segment_ref(&mut out, *at);
        }
        match items.parked {
            None => out.push(0),
            Some(at) => {
                out.push(1);
                put_segment_ref(&mut out, at);
            }
        }
        put_u32(&mut out, self.locks.stored.len() as u32);
        for (fingerprint, place) in &self.locks.stored {
            put_u64(&mut out, *fingerprint);
            put_u64(&mut out, place.0);
        }
        (out.len() < 1 << StoredPlace::LEN_BITS).then_some(out)
    }

    /// Entries read back from the record [`DealEntries::stored_record`]
    /// wrote at `place`; `None` if the read failed (the store records why).
    fn read_stored(store: &Arc<dyn SegmentStore>, place: StoredPlace) -> Option<DealEntries> {
        let mut bytes = Vec::new();
        if !store.read(place.at(), &mut bytes) {
            return None;
        }
        // What this process wrote; anything else is a bug.
        const BUG: &str = "a stored deal's entries decode";
        let mut r = Reader {
            bytes: &bytes,
            at: 0,
        };
        let mut cited = [None; 6];
        for c in &mut cited {
            *c = r.cited().expect(BUG);
        }
        let [opened, agreed, finalized, terms_from, terminated, last] = cited;
        let len = r.u64("").expect(BUG) as usize;
        let mut at = r.at;
        let last_item = get_delta(&bytes, &mut at, &HistoryItem::ZERO).expect(BUG);
        r.at = at;
        let n = r.u32("").expect(BUG) as usize;
        let mut sealed = Vec::with_capacity(n);
        for _ in 0..n {
            sealed.push(r.segment_ref().expect(BUG));
        }
        let parked = match r.u8("").expect(BUG) {
            0 => None,
            _ => Some(r.segment_ref().expect(BUG)),
        };
        let n = r.u32("").expect(BUG) as usize;
        let mut stored = Vec::with_capacity(n);
        for _ in 0..n {
            let fingerprint = r.u64("").expect(BUG);
            stored.push((fingerprint, StoredPlace(r.u64("").expect(BUG))));
        }
        Some(DealEntries {
            items: HistoryItems {
                bytes: Vec::new(),
                checkpoints: Vec::new(),
                len,
                last: last_item,
                store: Some(Arc::clone(store)),
                sealed,
                parked,
            },
            opened,
            agreed,
            finalized,
            terms_from,
            terminated,
            last,
            locks: LockEntries {
                held: IdMap::default(),
                ended: IdMap::default(),
                stored,
                store: Some(Arc::clone(store)),
            },
        })
    }

    /// The six cited entries, in the order encodings write them.
    fn cited(&self) -> [Option<Cited>; 6] {
        [
            self.opened,
            self.agreed,
            self.finalized,
            self.terms_from,
            self.terminated,
            self.last,
        ]
    }
}

/// A deal's entries as [`DealIndex`] keeps them.
#[derive(Clone, Debug)]
enum KeptEntries {
    /// In memory: every deal not terminated, and every deal of an index
    /// without a store.
    Open(Box<DealEntries>),
    /// A terminated deal's entries, whole in the store (a record of ~300
    /// bytes and 16 per lock: the cited entries and the places of its items
    /// and locks): 16 bytes in the map instead of a box of ~600. An entry
    /// recorded later for the deal (refused: it ended) reads it back and
    /// stores it again.
    Stored(StoredPlace),
}

impl KeptEntries {
    /// The entries, to change them: read back first if stored (on a failed
    /// read, recorded by the store, which the shell checks, they start
    /// empty).
    fn open(&mut self, store: Option<&Arc<dyn SegmentStore>>) -> &mut DealEntries {
        if let KeptEntries::Stored(place) = *self {
            let store = store.expect("stored entries have a store");
            let entries = DealEntries::read_stored(store, place).unwrap_or_else(|| {
                let mut empty = DealEntries::default();
                empty.spill_to(store);
                empty
            });
            *self = KeptEntries::Open(Box::new(entries));
        }
        match self {
            KeptEntries::Open(entries) => entries,
            KeptEntries::Stored(_) => unreachable!("read back above"),
        }
    }

    /// Moves the entries of a terminated deal to `store`, whole, if they
    /// can be ([`DealEntries::stored_record`]).
    fn close(&mut self, store: Option<&Arc<dyn SegmentStore>>) {
        let (KeptEntries::Open(entries), Some(store)) = (&mut *self, store) else {
            return;
        };
        if entries.terminated.is_none() {
            return;
        }
        entries.items.park();
        if let Some(record) = entries.stored_record() {
            *self = KeptEntries::Stored(StoredPlace::of(store.append(&record)));
        }
    }

    /// The entries, read back if stored; `None` if that read failed.
    fn get<'a>(&'a self, store: Option<&Arc<dyn SegmentStore>>) -> Option<Cow<'a, DealEntries>> {
        match self {
            KeptEntries::Open(entries) => Some(Cow::Borrowed(entries)),
            KeptEntries::Stored(place) => {
                DealEntries::read_stored(store.expect("stored entries have a store"), *place)
                    .map(Cow::Owned)
            }
        }
    }
}

/// The entries of each lock a deal granted, by lock id; those of ended
/// locks move out of memory once the index spills
/// ([`DealIndex::spill_history_to`]), as the deal book's ended locks do
/// ([`crate::deal::DealLocks`]).
///
/// A lock's entries are final once it ended: they are then written to the
/// store (two cited entries and the lock id) and read back by the queries
/// that cite them. In memory each stays as a 64-bit fingerprint of its id
/// and where it is, 16 bytes (~40 with the id before). A fingerprint only
/// picks the records to read: the id in the record decides, so two ids
/// with the same fingerprint are told apart. A failed read yields none and
/// is recorded by the store, which the shell checks
/// ([`DealIndex::segment_failure`]).
#[derive(Clone, Default)]
pub struct LockEntries {
    /// Locks not ended.
    held: IdMap<LockRefs>,
    /// Ended locks while no store is attached.
    ended: IdMap<LockRefs>,
    /// Ended locks whose entries are in the store: (fingerprint of the lock
    /// id, [`StoredPlace`]), in fingerprint order.
    stored: Vec<(u64, StoredPlace)>,
    /// Where ended locks' entries go, once spilled.
    store: Option<Arc<dyn SegmentStore>>,
}

/// A [`SegmentRef`] in 8 bytes: offset (below 2^40) and length (below
/// 2^24) of a stored record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StoredPlace(u64);

impl StoredPlace {
    const LEN_BITS: u32 = 24;

    fn of(at: SegmentRef) -> StoredPlace {
        assert!(
            at.offset < 1 << (64 - Self::LEN_BITS) && at.len < 1 << Self::LEN_BITS,
            "a lock record at {at:?} is past what 8 bytes place"
        );
        StoredPlace(at.offset << Self::LEN_BITS | u64::from(at.len))
    }

    fn at(self) -> SegmentRef {
        SegmentRef {
            offset: self.0 >> Self::LEN_BITS,
            len: (self.0 & ((1 << Self::LEN_BITS) - 1)) as u32,
        }
    }
}

/// The fingerprint of a lock id in [`LockEntries`]: the first 8 bytes of
/// its blake3 hash. In memory only, never written.
fn lock_fingerprint(id: &Id) -> u64 {
    let hash = blake3::hash(id.as_str().as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

impl LockEntries {
    /// How many locks.
    pub fn len(&self) -> usize {
        self.held.len() + self.ended.len() + self.stored.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries of lock `id` (read back if it ended and was moved out).
    pub fn get(&self, id: &Id) -> Option<LockRefs> {
        if let Some(refs) = self.held.get(id).or_else(|| self.ended.get(id)) {
            return Some(*refs);
        }
        let fingerprint = lock_fingerprint(id);
        let first = self.stored.partition_point(|(f, _)| *f < fingerprint);
        self.stored[first..]
            .iter()
            .take_while(|(f, _)| *f == fingerprint)
            .filter_map(|(_, place)| self.read(*place))
            .find(|(stored, _)| stored == id)
            .map(|(_, refs)| refs)
    }

    /// Every lock's id and entries, in id order (one whose read failed is
    /// left out).
    pub fn iter(&self) -> impl Iterator<Item = (Cow<'_, Id>, LockRefs)> {
        let mut all: Vec<(Cow<'_, Id>, LockRefs)> = self
            .held
            .iter()
            .chain(self.ended.iter())
            .map(|(id, refs)| (Cow::Borrowed(id), *refs))
            .chain(
                self.stored
                    .iter()
                    .filter_map(|(_, place)| self.read(*place))
                    .map(|(id, refs)| (Cow::Owned(id), refs)),
            )
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.into_iter()
    }

    /// The lock id and entries stored at `place` (`None` if the read failed).
    fn read(&self, place: StoredPlace) -> Option<(Id, LockRefs)> {
        let store = self.store.as_ref().expect("stored entries have a store");
        let mut bytes = Vec::new();
        if !store.read(place.at(), &mut bytes) {
            return None;
        }
        let mut r = Reader {
            bytes: &bytes,
            at: 0,
        };
        // What this process wrote; anything else is a bug.
        let refs = LockRefs {
            granted: r.cited().expect("stored lock entries decode"),
            ended: r.cited().expect("stored lock entries decode"),
        };
        let id = std::str::from_utf8(&bytes[r.at..])
            .ok()
            .and_then(|id| Id::parse(id).ok())
            .expect("a stored lock id decodes");
        Some((id, refs))
    }

    fn grant(&mut self, id: Id, granted: Option<Cited>) {
        self.held.insert(
            id,
            LockRefs {
                granted,
                ended: None,
            },
        );
    }

    /// Lock `id` ended at entry `ended`: its entries are final.
    fn end(&mut self, id: &Id, ended: Option<Cited>) {
        if let Some(mut refs) = self.held.remove(id) {
            refs.ended = ended;
            match &self.store {
                None => {
                    self.ended.insert(id.clone(), refs);
                }
                Some(store) => {
                    let place = StoredPlace::of(store.append(&Self::encoded(id, refs)));
                    self.insert_stored(lock_fingerprint(id), place);
                }
            }
        }
    }

    /// Every lock not ended ended at entry `ended`.
    fn end_all(&mut self, ended: Option<Cited>) {
        let ids: Vec<Id> = self.held.keys().cloned().collect();
        for id in ids {
            self.end(&id, ended);
        }
    }

    fn insert_stored(&mut self, fingerprint: u64, place: StoredPlace) {
        let at = self.stored.partition_point(|(f, _)| *f <= fingerprint);
        self.stored.insert(at, (fingerprint, place));
    }

    /// A stored record: the two cited entries, then the lock id's bytes.
    fn encoded(id: &Id, refs: LockRefs) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 * (8 + HASH_LEN) + id.as_str().len());
        put_cited(&mut out, refs.granted);
        put_cited(&mut out, refs.ended);
        out.extend_from_slice(id.as_str().as_bytes());
        out
    }

    /// Moves the ended locks' entries to `store`, and those of locks that
    /// end from now on.
    fn store_in(&mut self, store: &Arc<dyn SegmentStore>) {
        assert!(self.store.is_none(), "lock entries stored twice");
        for (id, refs) in std::mem::take(&mut self.ended).iter() {
            let place = StoredPlace::of(store.append(&Self::encoded(id, *refs)));
            self.insert_stored(lock_fingerprint(id), place);
        }
        self.store = Some(Arc::clone(store));
    }

    /// Sets the entries of lock `id` as read from an encoding.
    fn insert_decoded(&mut self, id: Id, refs: LockRefs) {
        assert!(
            self.store.is_none(),
            "decoded entries come before the store"
        );
        if refs.ended.is_some() {
            self.ended.insert(id, refs);
        } else {
            self.held.insert(id, refs);
        }
    }
}

/// Equal when they hold the same entries, wherever they keep them.
impl PartialEq for LockEntries {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for LockEntries {}

impl fmt::Debug for LockEntries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A string table: each distinct string once, referred to by position.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Interner {
    names: Vec<String>,
    positions: HashMap<String, u32>,
}

impl Interner {
    /// The position of `name`, adding it while fewer than `limit` are kept;
    /// beyond, the position of `overflow`.
    fn intern(&mut self, name: &str, limit: usize, overflow: &str) -> u32 {
        if let Some(p) = self.positions.get(name) {
            return *p;
        }
        let name = if self.names.len() + 1 >= limit {
            overflow
        } else {
            name
        };
        if let Some(p) = self.positions.get(name) {
            return *p;
        }
        let p = u32::try_from(self.names.len()).expect("bounded by the limit");
        self.names.push(name.to_string());
        self.positions.insert(name.to_string(), p);
        p
    }

    fn name(&self, p: u32) -> &str {
        self.names.get(p as usize).map_or("", String::as_str)
    }

    fn from_names(names: Vec<String>) -> Result<Interner, String> {
        let mut positions = HashMap::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            if positions.insert(n.clone(), i as u32).is_some() {
                return Err(format!("name {n:?} is listed twice"));
            }
        }
        Ok(Interner { names, positions })
    }
}

/// The query index of a whole ledger. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct DealIndex {
    deals: HashMap<Id, KeptEntries>,
    /// Where the deals' history items go once spilled
    /// ([`DealIndex::spill_history_to`]); not part of the index's value.
    segments: Segments,
    /// Locks not ended, by (the party they bind, scope): (granting deal,
    /// lock id). Derived from the book on restore, not encoded.
    in_force: HashMap<(Id, Id), BTreeSet<(Id, Id)>>,
    /// Every lock's binding interval, for "which locks bound at T".
    /// Derived from the book on restore, not encoded.
    timeline: LockTimeline,
    /// Entries whose event did not decode, so name no deal.
    unattributed: Vec<HistoryItem>,
    sources: Interner,
    kinds: Interner,
}

/// Equal when they hold the same entries, wherever they keep them.
impl PartialEq for DealIndex {
    fn eq(&self, other: &Self) -> bool {
        self.deals.len() == other.deals.len()
            && self
                .deals
                .keys()
                .all(|id| other.deals.contains_key(id) && self.deal(id) == other.deal(id))
            && self.in_force == other.in_force
            && self.timeline == other.timeline
            && self.unattributed == other.unattributed
            && self.sources == other.sources
            && self.kinds == other.kinds
    }
}

impl Eq for DealIndex {}

/// The [`SegmentStore`] of a [`DealIndex`], if any: compared equal and
/// printed as a flag, since it is where the index keeps items, not what.
#[derive(Clone, Default)]
struct Segments(Option<Arc<dyn SegmentStore>>);

impl PartialEq for Segments {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Segments {}

impl fmt::Debug for Segments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Segments(spilled: {})", self.0.is_some())
    }
}

/// How one judged entry is described to [`DealIndex::record`].
#[derive(Clone, Copy, Debug)]
pub enum Judged<'a> {
    /// The event decoded and the fold accepted it.
    Accepted(&'a DealEvent),
    /// The event decoded; the same identity was recorded before.
    Duplicate(&'a DealEvent),
    /// The event decoded and the fold refused it with this kind.
    Refused(&'a DealEvent, &'a str),
    /// The record is not a deal event at all; the decoding error's kind.
    Undecodable(&'a str),
}

impl DealIndex {
    /// An empty index.
    pub fn new() -> DealIndex {
        DealIndex::default()
    }

    /// Moves the deals' history items to `store`, all but each deal's
    /// last segment, and those of deals and entries recorded from now on:
    /// what keeps the index's memory from growing with every entry.
    pub fn spill_history_to(&mut self, store: Arc<dyn SegmentStore>) {
        assert!(self.segments.0.is_none(), "history spilled twice");
        for kept in self.deals.values_mut() {
            kept.open(None).spill_to(&store);
            kept.close(Some(&store));
        }
        self.timeline.store_in(Arc::clone(&store));
        self.segments = Segments(Some(store));
    }

    /// Whether the history items go to a store (spilled, or decoded into
    /// one).
    pub fn is_spilled(&self) -> bool {
        self.segments.0.is_some()
    }

    /// The first failure of the segment store, if the history is spilled
    /// and it met one: the index may then have lost items and must be
    /// neither stored nor trusted.
    pub fn segment_failure(&self) -> Option<&ScratchFailure> {
        self.segments.0.as_ref().and_then(|store| store.failure())
    }

    /// Records one judged entry. Entries come in ledger order.
    pub fn record(&mut self, location: Location, hash: Hash, record_ms: i64, judged: Judged<'_>) {
        let (event, verdict) = match judged {
            Judged::Accepted(e) => (Some(e), ItemVerdict::Accepted),
            Judged::Duplicate(e) => (Some(e), ItemVerdict::Duplicate),
            Judged::Refused(e, kind) => (Some(e), ItemVerdict::Rejected(self.kind(kind))),
            Judged::Undecodable(kind) => (None, ItemVerdict::Rejected(self.kind(kind))),
        };
        let Some(event) = event else {
            let source = self
                .sources
                .intern(UNKNOWN_SOURCE, MAX_SOURCES, OTHER_SOURCES);
            self.unattributed.push(HistoryItem {
                packed: pack(location),
                time_micros: HistoryItem::NO_TIME,
                record_ms,
                source,
                event_type: u8::MAX,
                verdict: verdict.code(),
            });
            return;
        };
        let source = self
            .sources
            .intern(&event.source, MAX_SOURCES, OTHER_SOURCES);
        let event_type = event.event_type();
        let position = EventType::ALL
            .iter()
            .position(|t| *t == event_type)
            .expect("every type is in ALL") as u8;
        let item = HistoryItem {
            packed: pack(location),
            time_micros: event.time.unix_micros(),
            record_ms,
            source,
            event_type: position,
            verdict: verdict.code(),
        };
        // Looked up by reference: `entry` would need a copy of the id for
        // every event, and nearly every event is of a deal seen before.
        if !self.deals.contains_key(&event.deal_id) {
            let mut deal = DealEntries::default();
            if let Some(store) = &self.segments.0 {
                deal.spill_to(store);
            }
            self.deals
                .insert(event.deal_id.clone(), KeptEntries::Open(Box::new(deal)));
        }
        let store = self.segments.0.as_ref();
        let kept = self
            .deals
            .get_mut(&event.deal_id)
            .expect("inserted above if it was missing");
        let deal = kept.open(store);
        deal.items.push(item);
        if verdict != ItemVerdict::Accepted {
            // An event after the end: the deal expects none; back to the
            // store.
            kept.close(store);
            return;
        }
        let cited = Some(Cited { location, hash });
        deal.last = cited;
        match &event.payload {
            Payload::NegotiationOpened(_) => deal.opened = cited,
            Payload::TermsAccepted(_) => {
                deal.agreed = cited;
                deal.terms_from = cited;
            }
            Payload::Finalized(_) => {
                deal.finalized = cited;
                deal.terms_from = cited;
            }
            Payload::Amended(_) => deal.terms_from = cited,
            Payload::ExclusivityGranted(g) => {
                self.timeline
                    .granted(&event.deal_id, &g.lock_id, g.valid_from, g.valid_until);
                self.in_force
                    .entry((g.bound_party.clone(), g.scope.clone()))
                    .or_default()
                    .insert((event.deal_id.clone(), g.lock_id.clone()));
                deal.locks.grant(g.lock_id.clone(), cited);
            }
            Payload::ExclusivityReleased(r) => deal.locks.end(&r.lock_id, cited),
            Payload::Terminated(_) => {
                deal.terminated = cited;
                deal.locks.end_all(cited);
            }
            Payload::TermsProposed(_) | Payload::TermsCountered(_) | Payload::TermsRejected(_) => {}
        }
        // A terminated deal's entries are final: none stay in memory.
        kept.close(self.segments.0.as_ref());
    }

    fn kind(&mut self, kind: &str) -> u8 {
        let p = self.kinds.intern(kind, MAX_KINDS, "other");
        u8::try_from(p).expect("MAX_KINDS fits a byte")
    }

    /// What the index holds about deal `id` (also for ids never opened,
    /// when events named them).
    ///
    /// A terminated deal's entries are read back from the store: `None` if
    /// that read fails (the store records why; check
    /// [`DealIndex::segment_failure`] before trusting an answer).
    pub fn deal(&self, id: &Id) -> Option<Cow<'_, DealEntries>> {
        self.deals.get(id)?.get(self.segments.0.as_ref())
    }

    /// Records that a lock ended (released, or its deal terminated): it is
    /// no longer in force, and binds only until then. Nothing changes in
    /// the table of locks in force for a lock not in it.
    pub fn lock_ended(&mut self, lock: &crate::deal::Lock, at: Timestamp) {
        self.timeline.ended(lock, at);
        let key = (lock.bound_party.clone(), lock.scope.clone());
        if let Some(set) = self.in_force.get_mut(&key) {
            set.remove(&(lock.deal_id.clone(), lock.lock_id.clone()));
            if set.is_empty() {
                self.in_force.remove(&key);
            }
        }
    }

    /// Rebuilds the tables of locks derived from the deal book's locks
    /// (after a restore: they are not part of the encoding): the locks in
    /// force and the lock timeline.
    pub fn rebuild_lock_tables(&mut self, book: &crate::deal::DealBook) {
        self.in_force.clear();
        // From what the book keeps of each lock: ended locks' bodies are not
        // read back (reading them took ~0.4 s at 3M events), only what a
        // terminated deal in the store keeps of its locks.
        let in_force = &mut self.in_force;
        let mut spans = Vec::new();
        book.for_each_lock(None, None, |deal_id, entry| {
            if let Some(lock) = entry.not_ended() {
                in_force
                    .entry((lock.bound_party.clone(), lock.scope.clone()))
                    .or_default()
                    .insert((lock.deal_id.clone(), lock.lock_id.clone()));
            }
            spans.push(entry.span(deal_id));
            std::ops::ControlFlow::Continue(())
        });
        self.timeline = LockTimeline::from_spans(spans.into_iter());
        if let Some(store) = &self.segments.0 {
            self.timeline.store_in(Arc::clone(store));
        }
    }

    /// The (deal, lock) ids of every lock binding at business time `t`
    /// ([`crate::deal::Lock::active_at`]), in no particular order.
    pub fn locks_active_at(&self, t: Timestamp) -> Vec<(Id, Id)> {
        self.timeline.active_at(t)
    }

    /// [`DealIndex::locks_active_at`] if at most `most` locks bind at `t`,
    /// else `None` ([`crate::timeline::LockTimeline::active_at_most`]).
    pub fn locks_active_at_most(&self, t: Timestamp, most: usize) -> Option<Vec<(Id, Id)>> {
        self.timeline.active_at_most(t, most)
    }

    /// How many locks not ended bind `party` in `scope`, and the first
    /// `n` of them in (granting deal, lock id) order.
    pub fn first_locks_in_force(
        &self,
        party: &Id,
        scope: &Id,
        n: usize,
    ) -> (usize, Vec<&(Id, Id)>) {
        match self.in_force.get(&(party.clone(), scope.clone())) {
            None => (0, Vec::new()),
            Some(set) => (set.len(), set.iter().take(n).collect()),
        }
    }

    /// Every deal id with its entries, in no particular order (terminated
    /// deals' read back; one whose read fails is left out, as in
    /// [`DealIndex::deal`]).
    pub fn deals(&self) -> impl Iterator<Item = (&Id, Cow<'_, DealEntries>)> {
        let store = self.segments.0.as_ref();
        self.deals
            .iter()
            .filter_map(move |(id, kept)| Some((id, kept.get(store)?)))
    }

    /// How many deal ids the index knows, and how many of them have their
    /// entries in the store (terminated).
    pub fn deal_counts(&self) -> (usize, usize) {
        let stored = self
            .deals
            .values()
            .filter(|kept| matches!(kept, KeptEntries::Stored(_)))
            .count();
        (self.deals.len(), stored)
    }

    /// Entries whose event did not decode, in ledger order.
    pub fn unattributed(&self) -> &[HistoryItem] {
        &self.unattributed
    }

    /// The producer (`source`) an item's position names.
    pub fn source_name(&self, p: u32) -> &str {
        self.sources.name(p)
    }

    /// The rejection kind a [`ItemVerdict::Rejected`] position names.
    pub fn kind_name(&self, p: u8) -> &str {
        self.kinds.name(u32::from(p))
    }

    /// Entries indexed.
    pub fn len(&self) -> usize {
        self.unattributed.len() + self.deals().map(|(_, d)| d.items.len()).sum::<usize>()
    }

    /// Whether no entry was indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // ---- encoding (for snapshots) -----------------------------------------

    /// Appends the index to `out`, deterministically (deals in id order).
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_in_pieces(|piece| out.extend_from_slice(piece));
    }

    /// Bytes [`DealIndex::encode`] writes (computed by encoding, discarding
    /// the bytes).
    pub fn encoded_len(&self) -> usize {
        let mut len = 0;
        self.encode_in_pieces(|piece| len += piece.len());
        len
    }

    /// [`DealIndex::encode`], handed to `emit` in pieces of about
    /// [`ENCODE_PIECE_BYTES`] (in order; their concatenation is the
    /// encoding), so that a snapshot can stream the index to its file
    /// without holding its whole encoding (about 12 bytes per entry) in memory.
    pub fn encode_in_pieces(&self, mut emit: impl FnMut(&[u8])) {
        let mut out = Vec::with_capacity(ENCODE_PIECE_BYTES);
        out.push(INDEX_FORMAT);
        for table in [&self.sources, &self.kinds] {
            put_u32(&mut out, table.names.len() as u32);
            for name in &table.names {
                put_bytes(&mut out, name.as_bytes());
            }
        }
        put_history(
            &mut out,
            &self.unattributed.iter().copied().collect::<HistoryItems>(),
        );
        let mut ids: Vec<&Id> = self.deals.keys().collect();
        ids.sort_unstable();
        put_u64(&mut out, ids.len() as u64);
        for id in ids {
            // On a failed read (recorded by the store) the deal is written
            // empty; whoever encodes checks the store and discards it.
            let deal = self.deal(id).unwrap_or_default();
            put_bytes(&mut out, id.as_str().as_bytes());
            for cited in deal.cited() {
                put_cited(&mut out, cited);
            }
            put_u32(&mut out, deal.locks.len() as u32);
            for (lock, refs) in deal.locks.iter() {
                put_bytes(&mut out, lock.as_str().as_bytes());
                put_cited(&mut out, refs.granted);
                put_cited(&mut out, refs.ended);
            }
            put_history(&mut out, &deal.items);
            if out.len() >= ENCODE_PIECE_BYTES {
                emit(&out);
                out.clear();
            }
        }
        if !out.is_empty() {
            emit(&out);
        }
    }

    /// Reads an index written by [`DealIndex::encode`] from the front of
    /// `bytes`; returns it and the bytes it took. Never panics on bad input;
    /// never allocates more than `bytes` can describe.
    pub fn decode(bytes: &[u8]) -> Result<(DealIndex, usize), String> {
        Self::decode_spilling(bytes, None)
    }

    /// [`DealIndex::decode`], moving each deal's history items and ended
    /// locks' entries to `store` (if given) as soon as the deal is read, as
    /// [`DealIndex::spill_history_to`] would after: a restore then never
    /// holds them all (~50 MB at 3M events).
    pub fn decode_spilling(
        bytes: &[u8],
        store: Option<&Arc<dyn SegmentStore>>,
    ) -> Result<(DealIndex, usize), String> {
        let mut r = Reader { bytes, at: 0 };
        let format = r.u8("the index format")?;
        if format != INDEX_FORMAT {
            return Err(format!(
                "index format {format} is not supported (expected {INDEX_FORMAT})"
            ));
        }
        let mut tables = Vec::with_capacity(2);
        for (what, limit) in [("sources", MAX_SOURCES), ("kinds", MAX_KINDS)] {
            let n = r.u32(what)? as usize;
            if n > limit {
                return Err(format!("{n} {what}, more than the limit {limit}"));
            }
            let mut names = Vec::with_capacity(n.min(r.remaining()));
            for _ in 0..n {
                names.push(r.string(what)?);
            }
            tables.push(Interner::from_names(names).map_err(|e| format!("{what}: {e}"))?);
        }
        let kinds = tables.pop().expect("two tables");
        let sources = tables.pop().expect("two tables");
        let unattributed = r.history("unattributed entries")?.iter().collect();
        let n = r.u64("the deal count")?;
        let mut deals = HashMap::with_capacity((n as usize).min(r.remaining() / 8));
        for _ in 0..n {
            let id = Id::new(r.string("a deal id")?).map_err(|e| format!("deal id: {e}"))?;
            let mut deal = DealEntries {
                opened: r.cited()?,
                agreed: r.cited()?,
                finalized: r.cited()?,
                terms_from: r.cited()?,
                terminated: r.cited()?,
                last: r.cited()?,
                ..DealEntries::default()
            };
            let locks = r.u32("the lock count")?;
            for _ in 0..locks {
                let lock = Id::new(r.string("a lock id")?).map_err(|e| format!("lock id: {e}"))?;
                let refs = LockRefs {
                    granted: r.cited()?,
                    ended: r.cited()?,
                };
                deal.locks.insert_decoded(lock, refs);
            }
            deal.items = r.history("deal entries")?;
            if let Some(store) = store {
                deal.spill_to(store);
            }
            let mut kept = KeptEntries::Open(Box::new(deal));
            kept.close(store);
            if deals.insert(id.clone(), kept).is_some() {
                return Err(format!("deal {id} is listed twice"));
            }
        }
        Ok((
            DealIndex {
                deals,
                segments: Segments(store.cloned()),
                in_force: HashMap::new(),
                timeline: LockTimeline::new(),
                unattributed,
                sources,
                kinds,
            },
            r.at,
        ))
    }
}

fn pack(location: Location) -> u64 {
    debug_assert!((0..=i32::from(u16::MAX)).contains(&location.partition));
    debug_assert!(location.seq < 1 << 48);
    ((location.partition as u64) << 48) | location.seq
}

fn unpack(packed: u64) -> Location {
    Location {
        partition: i32::from((packed >> 48) as u16),
        seq: packed & ((1 << 48) - 1),
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

/// Where a stored record is: its offset, then its length.
fn put_segment_ref(out: &mut Vec<u8>, at: SegmentRef) {
    put_u64(out, at.offset);
    put_u32(out, at.len);
}

/// `0` for none, else `1 + packed` and the hash: a packed location is
/// below 2^64 - 1.
fn put_cited(out: &mut Vec<u8>, cited: Option<Cited>) {
    match cited {
        None => put_u64(out, 0),
        Some(c) => {
            put_u64(out, pack(c.location) + 1);
            out.extend_from_slice(c.hash.as_bytes());
        }
    }
}

/// A deal's items as [`HistoryItems`] holds them: the count, the byte
/// length, the delta encoding (a pure function of the items, so the same
/// items always give the same bytes).
///
/// Items whose spilled segments cannot be read back are written as none:
/// the store has recorded the failure ([`DealIndex::segment_failure`]), and
/// whoever encodes checks it afterwards and discards the encoding.
fn put_history(out: &mut Vec<u8>, items: &HistoryItems) {
    let (len, bytes) = match items.encoded() {
        Some(bytes) => (items.len(), bytes),
        None => (0, Cow::Borrowed(&[][..])),
    };
    put_u64(out, len as u64);
    put_u64(out, bytes.len() as u64);
    out.extend_from_slice(&bytes);
}

/// Reads the encoding front to back; every error names what it was reading.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        if self.remaining() < n {
            return Err(format!(
                "the index ends at byte {} while reading {what}",
                self.bytes.len()
            ));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn segment_ref(&mut self) -> Result<SegmentRef, String> {
        let offset = self.u64("a record's offset")?;
        let len = self.u32("a record's length")?;
        Ok(SegmentRef { offset, len })
    }

    fn cited(&mut self) -> Result<Option<Cited>, String> {
        let v = self.u64("a cited entry")?;
        let Some(packed) = v.checked_sub(1) else {
            return Ok(None);
        };
        let hash: [u8; HASH_LEN] = self
            .take(HASH_LEN, "a cited entry's hash")?
            .try_into()
            .expect("HASH_LEN bytes");
        Ok(Some(Cited {
            location: unpack(packed),
            hash: Hash(hash),
        }))
    }

    /// Items written by [`put_history`]: every item is decoded with
    /// checks (counts, varints, event type codes) and pushed again, so what
    /// is kept is exactly the canonical encoding.
    fn history(&mut self, what: &str) -> Result<HistoryItems, String> {
        let n = self.u64(what)?;
        let len = self.u64(what)?;
        let fits = |n: u64, size: usize| {
            n.checked_mul(size as u64)
                .is_some_and(|b| b <= self.remaining() as u64)
        };
        if !fits(len, 1)
            || !fits(n, MIN_ITEM_BYTES)
            || n.saturating_mul(MIN_ITEM_BYTES as u64) > len
        {
            return Err(format!(
                "{what}: {n} items in {len} bytes do not fit in the {} bytes left",
                self.remaining()
            ));
        }
        let bytes = self.take(len as usize, what)?;
        let mut items = HistoryItems::default();
        items.bytes.reserve_exact(bytes.len());
        let mut at = 0;
        let mut prev = HistoryItem::ZERO;
        for i in 0..n as usize {
            let base = if i.is_multiple_of(CHECKPOINT_ITEMS) {
                HistoryItem::ZERO
            } else {
                prev
            };
            let item = get_delta(bytes, &mut at, &base)
                .ok_or_else(|| format!("{what}: item {i} does not decode"))?;
            if item.event_type != u8::MAX && usize::from(item.event_type) >= EventType::ALL.len() {
                return Err(format!(
                    "{what}: event type code {} is unknown",
                    item.event_type
                ));
            }
            items.push(item);
            prev = item;
        }
        if at != bytes.len() {
            return Err(format!(
                "{what}: {} bytes follow the last of its {n} items",
                bytes.len() - at
            ));
        }
        items.shrink_to_fit();
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> DealEvent {
        DealEvent::decode(json.as_bytes()).expect("a valid event")
    }

    fn opened(deal: &str, id: &str) -> DealEvent {
        event(&format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"urn:p","type":"deal.negotiation.opened","subject":"{deal}","time":"2025-01-01T00:00:00Z","data":{{"customer":"a","provider":"b","scope":"cloud-compute"}}}}"#
        ))
    }

    fn granted(deal: &str, id: &str, lock: &str) -> DealEvent {
        event(&format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"urn:q","type":"deal.exclusivity.granted","subject":"{deal}","time":"2025-01-02T00:00:00Z","data":{{"lock_id":"{lock}","holder":"b","bound_party":"a","scope":"cloud-compute","kind":"exclusive","valid_from":"2025-01-02T00:00:00Z"}}}}"#
        ))
    }

    fn released(deal: &str, id: &str, lock: &str) -> DealEvent {
        event(&format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"urn:q","type":"deal.exclusivity.released","subject":"{deal}","time":"2025-01-03T00:00:00Z","data":{{"lock_id":"{lock}","reason":"done"}}}}"#
        ))
    }

    fn terminated(deal: &str, id: &str) -> DealEvent {
        event(&format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"urn:q","type":"deal.terminated","subject":"{deal}","time":"2025-01-04T00:00:00Z","data":{{"terminated_by":"a","reason":"over"}}}}"#
        ))
    }

    fn loc(partition: i32, seq: u64) -> Location {
        Location { partition, seq }
    }

    impl DealIndex {
        /// `record` with a hash made from the location, for tests.
        fn record_at(&mut self, location: Location, record_ms: i64, judged: Judged<'_>) {
            let mut hash = [0u8; HASH_LEN];
            hash[..8].copy_from_slice(&location.seq.to_be_bytes());
            hash[8..12].copy_from_slice(&location.partition.to_be_bytes());
            self.record(location, Hash(hash), record_ms, judged);
        }
    }

    #[test]
    fn records_items_in_order_with_verdicts_and_references() {
        let mut index = DealIndex::new();
        let o = opened("d1", "e1");
        let g = granted("d1", "e2", "l1");
        index.record_at(loc(0, 0), 10, Judged::Accepted(&o));
        index.record_at(loc(1, 0), 11, Judged::Undecodable("not_json"));
        index.record_at(loc(0, 1), 12, Judged::Duplicate(&o));
        index.record_at(loc(2, 5), 13, Judged::Accepted(&g));
        index.record_at(loc(2, 6), 14, Judged::Refused(&g, "lock_exists"));

        let d1 = index.deal(&Id::new("d1").unwrap()).unwrap();
        let items: Vec<HistoryItem> = d1.items.iter().collect();
        let locations: Vec<Location> = items.iter().map(HistoryItem::location).collect();
        assert_eq!(locations, [loc(0, 0), loc(0, 1), loc(2, 5), loc(2, 6)]);
        assert_eq!(items[0].verdict(), ItemVerdict::Accepted);
        assert_eq!(items[1].verdict(), ItemVerdict::Duplicate);
        let ItemVerdict::Rejected(k) = items[3].verdict() else {
            panic!("refused")
        };
        assert_eq!(index.kind_name(k), "lock_exists");
        assert_eq!(d1.opened.unwrap().location, loc(0, 0));
        assert_eq!(d1.last.unwrap().location, loc(2, 5));
        assert_eq!(
            d1.locks
                .get(&Id::new("l1").unwrap())
                .unwrap()
                .granted
                .unwrap()
                .location,
            loc(2, 5),
            "the refused second grant does not replace the first"
        );
        assert_eq!(index.source_name(items[2].source), "urn:q");
        assert_eq!(items[0].event_type(), Some(EventType::NegotiationOpened));
        assert_eq!(items[0].record_ms, 10);
        assert_eq!(
            items[0].time().unwrap(),
            Timestamp::parse("2025-01-01T00:00:00Z").unwrap()
        );
        assert_eq!(index.unattributed().len(), 1);
        assert_eq!(
            index.source_name(index.unattributed()[0].source),
            UNKNOWN_SOURCE
        );
        assert_eq!(index.unattributed()[0].time(), None);
        assert_eq!(index.len(), 5);
    }

    #[test]
    fn encoding_in_pieces_is_the_encoding() {
        let mut index = DealIndex::new();
        for d in 0..2_000u64 {
            let deal = format!("deal-{d}");
            index.record_at(loc(0, d), 1, Judged::Accepted(&opened(&deal, "x")));
            for i in 0..30u64 {
                index.record_at(
                    loc((d % 3) as i32, 10_000 + d * 30 + i),
                    2,
                    Judged::Accepted(&granted(&deal, "y", "l")),
                );
            }
        }
        let mut whole = Vec::new();
        index.encode(&mut whole);
        let mut pieces = Vec::new();
        index.encode_in_pieces(|piece| pieces.push(piece.to_vec()));
        assert!(pieces.len() > 1, "more than one piece: {}", pieces.len());
        assert!(pieces.iter().all(|p| !p.is_empty()));
        assert_eq!(pieces.concat(), whole);
        assert_eq!(index.encoded_len(), whole.len());
    }

    #[test]
    fn encoding_round_trips_and_is_deterministic() {
        let mut index = DealIndex::new();
        for d in 0..20 {
            let deal = format!("d{d}");
            index.record_at(
                loc(d % 3, d as u64),
                1,
                Judged::Accepted(&opened(&deal, "x")),
            );
            index.record_at(
                loc(d % 3, 100 + d as u64),
                2,
                Judged::Accepted(&granted(&deal, "y", "l")),
            );
        }
        index.record_at(loc(4, 0), 3, Judged::Undecodable("not_utf8"));
        let mut a = Vec::new();
        index.encode(&mut a);
        let (back, used) = DealIndex::decode(&a).unwrap();
        assert_eq!(used, a.len());
        let (party, scope) = (Id::new("a").unwrap(), Id::new("cloud-compute").unwrap());
        assert_eq!(index.first_locks_in_force(&party, &scope, 5).0, 20);
        assert_eq!(index.first_locks_in_force(&party, &scope, 5).1.len(), 5);
        let mut expected = index.clone();
        expected.in_force.clear(); // rebuilt from the deal book on restore
        expected.timeline = LockTimeline::new();
        assert_eq!(back, expected);
        let mut b = Vec::new();
        back.encode(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn decoding_damaged_bytes_fails_cleanly() {
        let mut index = DealIndex::new();
        index.record_at(loc(0, 0), 1, Judged::Accepted(&opened("d1", "x")));
        let mut bytes = Vec::new();
        index.encode(&mut bytes);
        for cut in 0..bytes.len() {
            assert!(DealIndex::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = bytes.clone();
        // The unattributed count (after the two tables) claims 2^60 items.
        let at = 1 + 4 + (4 + "urn:p".len()) + 4;
        huge[at..at + 8].copy_from_slice(&(1u64 << 60).to_be_bytes());
        assert!(DealIndex::decode(&huge).unwrap_err().contains("do not fit"));
    }

    /// An index with many items per deal (several checkpoints) survives
    /// encoding; any flipped byte is refused or read, never a panic.
    #[test]
    fn encoded_history_round_trips_and_damage_never_panics() {
        let mut index = DealIndex::new();
        let o = opened("d1", "x");
        index.record_at(loc(0, 0), 1, Judged::Accepted(&o));
        for i in 1..200u64 {
            index.record_at(loc(0, i * 3), 1 + i as i64, Judged::Duplicate(&o));
        }
        index.record_at(loc(1, 9), 7, Judged::Undecodable("not_json"));
        let mut bytes = Vec::new();
        index.encode(&mut bytes);
        let (decoded, used) = DealIndex::decode(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        let mut again = Vec::new();
        decoded.encode(&mut again);
        assert_eq!(again, bytes, "the same index gives the same bytes");
        let id = Id::new("d1").unwrap();
        assert_eq!(
            decoded.deal(&id).unwrap().items.iter().collect::<Vec<_>>(),
            index.deal(&id).unwrap().items.iter().collect::<Vec<_>>()
        );
        for at in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[at] ^= flip;
                let _ = DealIndex::decode(&damaged);
            }
        }
    }

    #[test]
    fn sources_beyond_the_limit_are_counted_together() {
        let mut interner = Interner::default();
        for i in 0..10 {
            interner.intern(&format!("s{i}"), 4, OTHER_SOURCES);
        }
        assert_eq!(interner.names.len(), 4);
        assert_eq!(interner.names[3], OTHER_SOURCES);
        assert_eq!(interner.intern("s1", 4, OTHER_SOURCES), 1);
        assert_eq!(interner.intern("s9", 4, OTHER_SOURCES), 3);
    }

    fn arb_item() -> impl proptest::strategy::Strategy<Value = HistoryItem> {
        use proptest::prelude::*;
        (
            any::<u64>(),
            prop_oneof![any::<i64>(), Just(HistoryItem::NO_TIME), -5i64..5],
            any::<i64>(),
            any::<u32>(),
            any::<u8>(),
            any::<u8>(),
        )
            .prop_map(
                |(packed, time_micros, record_ms, source, event_type, verdict)| HistoryItem {
                    packed,
                    time_micros,
                    record_ms,
                    source,
                    event_type,
                    verdict,
                },
            )
    }

    proptest::proptest! {
        /// An index whose deals' entries go to a store (spilled at any
        /// point; a terminated deal's whole, read back for every entry
        /// recorded for it later) holds, answers and encodes the same as
        /// one that keeps everything in memory, and decodes into a store
        /// the same too.
        #[test]
        fn a_spilled_index_is_the_index_kept_in_memory(
            steps in proptest::collection::vec((0u8..3, 0u8..5, 0u8..4, 0u8..3), 0..120),
            spill_after in 0usize..120,
        ) {
            let store: Arc<dyn SegmentStore> = Arc::new(MemorySegments::default());
            let mut memory = DealIndex::new();
            let mut spilled = DealIndex::new();
            let mut granted_once = std::collections::HashSet::new();
            let mut ended = std::collections::HashSet::new();
            for (i, &(deal, kind, lock, verdict)) in steps.iter().enumerate() {
                if i == spill_after {
                    spilled.spill_history_to(Arc::clone(&store));
                }
                let (deal, id, lock) = (format!("d{deal}"), format!("e{i}"), format!("l{lock}"));
                let event = match kind {
                    0 => opened(&deal, &id),
                    1 | 2 => granted(&deal, &id, &lock),
                    3 => released(&deal, &id, &lock),
                    _ => terminated(&deal, &id),
                };
                // What the fold never accepts: a lock id granted twice by
                // a deal, an event after the deal's termination.
                let is_grant = matches!(kind, 1 | 2);
                let accepted = verdict == 0
                    && !ended.contains(&deal)
                    && (!is_grant || granted_once.insert((deal.clone(), lock.clone())));
                if accepted && kind == 4 {
                    ended.insert(deal.clone());
                }
                let judged = match verdict {
                    0 if accepted => Judged::Accepted(&event),
                    0 => Judged::Refused(&event, "deal_terminated"),
                    1 => Judged::Duplicate(&event),
                    _ => Judged::Refused(&event, "deal_terminated"),
                };
                for index in [&mut memory, &mut spilled] {
                    index.record_at(loc(i32::from(kind % 2), i as u64), i as i64, judged);
                }
            }
            proptest::prop_assert!(spilled.segment_failure().is_none());
            for (id, _) in memory.deals() {
                proptest::prop_assert_eq!(spilled.deal(id), memory.deal(id));
            }
            proptest::prop_assert_eq!(&spilled.timeline, &memory.timeline);
            proptest::prop_assert_eq!(&spilled.in_force, &memory.in_force);
            proptest::prop_assert_eq!(&spilled, &memory);
            proptest::prop_assert_eq!(spilled.len(), memory.len());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            spilled.encode(&mut a);
            memory.encode(&mut b);
            proptest::prop_assert_eq!(&a, &b);
            let (decoded, _) = DealIndex::decode_spilling(&b, Some(&store)).unwrap();
            let mut expected = memory.clone();
            expected.in_force.clear();
            expected.timeline = LockTimeline::new();
            proptest::prop_assert_eq!(decoded, expected);
            // Every terminated deal whose locks all ended is in the store.
            if spilled.is_spilled() {
                for (id, kept) in &spilled.deals {
                    let entries = spilled.deal(id).unwrap();
                    let whole = entries.terminated.is_some() && entries.locks.held.is_empty();
                    proptest::prop_assert_eq!(matches!(kept, KeptEntries::Stored(_)), whole, "{}", id);
                }
            }
        }

        /// Any items, extreme values included, come back exactly, in
        /// order, from the start and from every position.
        #[test]
        fn history_items_round_trip_from_any_position(
            items in proptest::collection::vec(arb_item(), 0..300),
        ) {
            let stored: HistoryItems = items.iter().copied().collect();
            proptest::prop_assert_eq!(stored.len(), items.len());
            proptest::prop_assert_eq!(stored.iter().collect::<Vec<_>>(), items.clone());
            for start in 0..=items.len() + 1 {
                let from: Vec<HistoryItem> = stored.iter_from(start).collect();
                proptest::prop_assert_eq!(&from[..], items.get(start..).unwrap_or(&[]));
            }
        }

        /// Spilled to a store, before or while they are pushed, and parked
        /// now and then (the last segment too in the store, read back when
        /// the next item comes), items come back the same from every
        /// position, and encode to the same bytes.
        #[test]
        fn spilled_history_items_are_the_same_items(
            items in proptest::collection::vec(arb_item(), 0..300),
            spill_after in 0usize..300,
            park_after in proptest::collection::vec(0usize..300, 0..6),
        ) {
            let store: Arc<dyn SegmentStore> = Arc::new(MemorySegments::default());
            let in_memory: HistoryItems = items.iter().copied().collect();
            let mut spilled = HistoryItems::default();
            let split = spill_after.min(items.len());
            let park = |spilled: &mut HistoryItems| {
                if park_after.contains(&spilled.len()) {
                    spilled.park();
                }
            };
            for item in &items[..split] {
                spilled.push(*item);
                park(&mut spilled);
            }
            spilled.spill_to(&store);
            park(&mut spilled);
            for item in &items[split..] {
                spilled.push(*item);
                park(&mut spilled);
            }
            if park_after.contains(&items.len()) {
                proptest::prop_assert!(spilled.bytes.is_empty());
                proptest::prop_assert_eq!(spilled.parked.is_some(), !items.is_empty());
            }
            proptest::prop_assert_eq!(&spilled, &in_memory);
            proptest::prop_assert_eq!(spilled.sealed.len(), items.len().saturating_sub(1) / CHECKPOINT_ITEMS);
            for start in 0..=items.len() + 1 {
                let from: Vec<HistoryItem> = spilled.iter_from(start).collect();
                proptest::prop_assert_eq!(&from[..], items.get(start..).unwrap_or(&[]));
            }
            let (mut a, mut b) = (Vec::new(), Vec::new());
            put_history(&mut a, &spilled);
            put_history(&mut b, &in_memory);
            proptest::prop_assert_eq!(a, b);
        }
    }

    /// A [`SegmentStore`] in memory, for tests; fails every read once told to.
    #[derive(Default)]
    pub(crate) struct MemorySegments {
        bytes: std::sync::Mutex<Vec<u8>>,
        pub(crate) fail_reads: std::sync::atomic::AtomicBool,
        failure: std::sync::OnceLock<ScratchFailure>,
    }

    impl SegmentStore for MemorySegments {
        fn append(&self, bytes: &[u8]) -> SegmentRef {
            let mut all = self.bytes.lock().unwrap();
            let at = SegmentRef {
                offset: all.len() as u64,
                len: bytes.len() as u32,
            };
            all.extend_from_slice(bytes);
            at
        }

        fn read(&self, at: SegmentRef, out: &mut Vec<u8>) -> bool {
            if self.fail_reads.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = self.failure.set(ScratchFailure {
                    action: "reading a segment".into(),
                    error: std::io::Error::other("reads fail"),
                });
                return false;
            }
            let all = self.bytes.lock().unwrap();
            out.clear();
            out.extend_from_slice(&all[at.offset as usize..at.offset as usize + at.len as usize]);
            true
        }

        fn failure(&self) -> Option<&ScratchFailure> {
            self.failure.get()
        }
    }

    #[test]
    fn stored_lock_entries_with_one_fingerprint_are_told_apart_by_their_ids() {
        let store: Arc<dyn SegmentStore> = Arc::new(MemorySegments::default());
        let mut locks = LockEntries::default();
        locks.store_in(&store);
        let cited = |seq| {
            Some(Cited {
                location: loc(0, seq),
                hash: Hash([seq as u8; HASH_LEN]),
            })
        };
        // Three ids filed under one fingerprint, as if they collided.
        for (n, id) in ["l1", "l2", "l3"].into_iter().enumerate() {
            let id = Id::new(id).unwrap();
            let refs = LockRefs {
                granted: cited(n as u64),
                ended: cited(10 + n as u64),
            };
            let place = StoredPlace::of(store.append(&LockEntries::encoded(&id, refs)));
            locks.insert_stored(7, place);
        }
        for (n, id) in ["l1", "l2", "l3"].into_iter().enumerate() {
            let id = Id::new(id).unwrap();
            // A real fingerprint differs from 7: look the records up by it.
            let f = lock_fingerprint(&id);
            locks.stored.iter_mut().for_each(|(g, _)| *g = f);
            let refs = locks.get(&id).expect("found by its id");
            assert_eq!(refs.granted, cited(n as u64));
            assert_eq!(refs.ended, cited(10 + n as u64));
        }
        assert_eq!(locks.get(&Id::new("l4").unwrap()), None);
        let ids: Vec<String> = locks.iter().map(|(id, _)| id.to_string()).collect();
        assert_eq!(ids, ["l1", "l2", "l3"]);
    }

    #[test]
    fn stored_places_keep_offset_and_length() {
        for (offset, len) in [
            (0, 0),
            (1, 1),
            ((1 << 40) - 1, (1 << 24) - 1),
            (123_456_789, 81),
        ] {
            let at = SegmentRef { offset, len };
            assert_eq!(StoredPlace::of(at).at(), at);
        }
    }

    #[test]
    fn a_spilled_index_records_and_encodes_as_one_in_memory() {
        let store = Arc::new(MemorySegments::default());
        let mut memory = DealIndex::new();
        let mut spilled = DealIndex::new();
        spilled.spill_history_to(store.clone());
        for i in 0..500u64 {
            // Locks granted, every third released the next entry; the
            // deal terminated at the end (ending the rest).
            let event = match i {
                0 => opened("d1", "e0"),
                499 => terminated("d1", "e499"),
                _ if i % 3 == 2 => released("d1", &format!("e{i}"), &format!("l{}", i - 1)),
                _ => granted("d1", &format!("e{i}"), &format!("l{i}")),
            };
            for index in [&mut memory, &mut spilled] {
                index.record_at(loc(0, i), 1_000 + i as i64, Judged::Accepted(&event));
            }
            if i == 250 {
                // Both hold some ended locks' entries: in the store, in memory.
                let (s, m) = (
                    spilled.deal(&Id::new("d1").unwrap()).unwrap(),
                    memory.deal(&Id::new("d1").unwrap()).unwrap(),
                );
                let (s, m) = (&s.locks, &m.locks);
                assert!(s.ended.is_empty() && m.stored.is_empty());
                assert!(s.stored.len() > 50 && !s.held.is_empty());
                assert_eq!(s.stored.len(), m.ended.len());
                assert!(s.stored.is_sorted_by_key(|(f, _)| *f));
                assert_eq!(s, m);
            }
        }
        assert_eq!(spilled, memory);
        // Terminated: nothing of it stays in memory.
        let d1 = Id::new("d1").unwrap();
        assert!(matches!(spilled.deals[&d1], KeptEntries::Stored(_)));
        assert!(matches!(memory.deals[&d1], KeptEntries::Open(_)));
        let items = spilled.deal(&d1).unwrap().items.clone();
        assert!(items.bytes.is_empty() && items.parked.is_some());
        let memory_d1 = memory.deal(&d1).unwrap();
        let locks = &memory_d1.locks;
        assert_eq!(locks.len(), 332);
        assert!(locks.iter().all(|(_, refs)| refs.ended.is_some()));
        assert_eq!(
            locks
                .get(&Id::new("l1").unwrap())
                .unwrap()
                .ended
                .unwrap()
                .location,
            loc(0, 2)
        );
        assert_eq!(
            spilled
                .deal(&Id::new("d1").unwrap())
                .unwrap()
                .items
                .sealed
                .len(),
            7
        );
        let (mut a, mut b) = (Vec::new(), Vec::new());
        spilled.encode(&mut a);
        memory.encode(&mut b);
        assert_eq!(a, b);
        assert!(spilled.segment_failure().is_none());
        // An entry refused after the end: read back, added, stored again.
        let late = granted("d1", "e500", "l500");
        for index in [&mut memory, &mut spilled] {
            index.record_at(
                loc(0, 500),
                1_500,
                Judged::Refused(&late, "deal_terminated"),
            );
        }
        assert!(matches!(spilled.deals[&d1], KeptEntries::Stored(_)));
        assert_eq!(spilled.deal(&d1).unwrap().items.len(), 501);
        assert_eq!(spilled, memory);
        // A store that cannot read: iteration ends early, a stored deal
        // is not found, the failure shows.
        let entries = spilled.deal(&d1).unwrap().into_owned();
        store
            .fail_reads
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(entries.items.iter().count() < 500);
        assert!(spilled.deal(&d1).is_none());
        assert_eq!(
            spilled
                .segment_failure()
                .map(ToString::to_string)
                .as_deref(),
            Some("reading a segment: reads fail")
        );
    }

    /// A deal's typical entries (close seqs and times, one producer) take
    /// well under half the 32 bytes of a `HistoryItem`.
    #[test]
    fn history_items_of_a_typical_deal_are_compact() {
        let items: HistoryItems = (0..1_000u64)
            .map(|i| HistoryItem {
                packed: pack(loc(3, 50_000 + i * 6)),
                time_micros: 1_735_689_600_000_000 + i as i64 * 3_600_000_000,
                record_ms: 1_764_000_000_000 + i as i64 * 40,
                source: 2,
                event_type: (i % 10) as u8,
                verdict: 0,
            })
            .collect();
        assert!(
            items.bytes.len() < 14 * 1_000,
            "{} bytes",
            items.bytes.len()
        );
    }
}
