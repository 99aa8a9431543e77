//! Per-partition blake3 hash chains over Kafka records.
//!
//! Why this module exists: the ledger must prove that nothing it stored was
//! altered, deleted, inserted or reordered after ingestion. Every Kafka
//! partition ("stream") gets its own chain, in offset order, with a contiguous
//! sequence number from 0. Each entry's hash commits to the previous hash, its
//! sequence number and exactly what Kafka itself stores for the record (topic,
//! partition, offset, timestamp type and value, key, value, headers in order).
//! Nothing from the ingesting machine (clock, host, batch) enters a hash, so
//! anyone who re-reads the topic from the chain's first offset recomputes the
//! same chain heads.
//!
//! The exact byte-level rules live in `docs/FORMAT.md`; the known-answer vectors
//! in `tests/vectors/chain.json` are checked both here and by the independent
//! Python implementation in `tests/format/recompute.py`.
//!
//! This module is part of the pure core: no I/O, no clock, no async. It offers:
//! - [`genesis`] and [`entry_hash`]: the hashing rule;
//! - [`ChainHead`]: builds a chain one record at a time (used by the ingester);
//! - [`encode_entry`] / [`decode_entry`]: the stored entry format (version 1);
//! - [`ChainVerifier`]: re-checks a stored chain in O(1) state.

use std::fmt;
use std::str::FromStr;

/// Length of a chain hash in bytes (blake3's default output).
pub const HASH_LEN: usize = 32;

/// blake3 `derive_key` context for a stream's genesis hash. Never change it:
/// it is part of every chain head ever computed.
pub const GENESIS_CONTEXT: &str = "dealledger 2026-11 genesis v1";

/// blake3 `derive_key` context for an entry hash. Never change it: it is part
/// of every chain head ever computed.
pub const ENTRY_CONTEXT: &str = "dealledger 2026-11 entry v1";

/// First byte of every stored entry produced by [`encode_entry`].
pub const ENTRY_FORMAT_VERSION: u8 = 1;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Longest topic name in bytes; Kafka's own limit (topic names are ASCII, so
/// bytes equal characters for every topic Kafka accepts).
pub const MAX_TOPIC_LEN: usize = 249;

/// Largest record key in bytes. Kafka bounds a whole record batch by
/// `message.max.bytes` (default about 1 MiB); 16 MiB leaves room for brokers
/// configured larger while keeping one stored entry bounded.
pub const MAX_KEY_BYTES: usize = 16 * MIB;

/// Largest record value in bytes (same reasoning as [`MAX_KEY_BYTES`]).
pub const MAX_VALUE_BYTES: usize = 16 * MIB;

/// Most headers on one record: as many as fit [`MAX_RECORD_BYTES`] when
/// each counts its framing. Kafka has no limit of its own beyond the
/// record's size, so neither has the ledger: a producer must not be able to
/// stop ingestion with a record the broker accepted (a lower count limit
/// would refuse such a record, and a refused record halts its partition).
pub const MAX_HEADERS: usize = MAX_RECORD_BYTES / HEADER_FRAMING_BYTES;

/// Longest header name in bytes (bounded by the record's size only).
pub const MAX_HEADER_NAME_LEN: usize = MAX_RECORD_BYTES;

/// Largest header value in bytes (bounded by the record's size only).
pub const MAX_HEADER_VALUE_BYTES: usize = MAX_RECORD_BYTES;

/// Largest size of one record as the ledger counts it: key, value, and each
/// header's name, value and framing ([`HEADER_FRAMING_BYTES`]). A Kafka
/// record header takes at least 2 bytes on the wire, so a record of S bytes
/// on the wire counts at most 4.5 × S here: any record a broker with
/// `message.max.bytes` (or the topic's `max.message.bytes`) of at most
/// 3 MiB accepts fits (the default is about 1 MiB).
pub const MAX_RECORD_BYTES: usize = 16 * MIB;

/// Fixed-size part of a stored entry: version, seq, prev hash, topic length,
/// partition, offset, timestamp type, timestamp, key and value presence and
/// length, header count, stored hash.
const ENTRY_FIXED_BYTES: usize = 1 + 8 + HASH_LEN + 4 + 4 + 8 + 1 + 8 + 5 + 5 + 4 + HASH_LEN;

/// Per-header framing: name length, value presence, value length.
pub const HEADER_FRAMING_BYTES: usize = 4 + 1 + 4;

/// Largest stored entry [`encode_entry`] can produce and [`decode_entry`]
/// accepts (header framing is part of [`MAX_RECORD_BYTES`]).
pub const MAX_ENCODED_ENTRY_BYTES: usize = ENTRY_FIXED_BYTES + MAX_TOPIC_LEN + MAX_RECORD_BYTES;

// Invariants of the limits, checked at compile time.
const _: () = {
    assert!(MAX_KEY_BYTES <= MAX_RECORD_BYTES);
    assert!(MAX_VALUE_BYTES <= MAX_RECORD_BYTES);
    assert!(MAX_HEADER_VALUE_BYTES <= MAX_RECORD_BYTES);
    assert!(MAX_HEADER_NAME_LEN <= MAX_RECORD_BYTES);
    // Every length prefix is a u32, and so is any whole entry.
    assert!(MAX_ENCODED_ENTRY_BYTES <= u32::MAX as usize);
    assert!(MAX_HEADERS <= u32::MAX as usize);
};

// ---------------------------------------------------------------------------
// Streams, records, hashes
// ---------------------------------------------------------------------------

/// One Kafka partition: the unit that owns one hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    /// Kafka topic name.
    pub topic: String,
    /// Kafka partition number within the topic.
    pub partition: i32,
}

impl StreamId {
    /// Builds a stream id from a topic and partition.
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        StreamId {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for StreamId {
    /// Formats as `topic/partition`, e.g. `deal-events/3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Kafka's record timestamp type, with stable one-byte codes used in hashes and
/// stored entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimestampType {
    /// The record carries no timestamp (code 0); `timestamp_ms` must be 0.
    NotAvailable,
    /// The producer set the timestamp (code 1).
    CreateTime,
    /// The broker set the timestamp on append (code 2).
    LogAppendTime,
}

impl TimestampType {
    /// The stable code written into hashes and stored entries.
    pub fn code(self) -> u8 {
        match self {
            TimestampType::NotAvailable => 0,
            TimestampType::CreateTime => 1,
            TimestampType::LogAppendTime => 2,
        }
    }

    /// The timestamp type for a stable code, or `None` for an unknown code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(TimestampType::NotAvailable),
            1 => Some(TimestampType::CreateTime),
            2 => Some(TimestampType::LogAppendTime),
            _ => None,
        }
    }
}

/// One Kafka record header. Names are strings, values may be null; Kafka keeps
/// header order and allows duplicate names, and so does the chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// Header name (UTF-8).
    pub name: String,
    /// Header value; `None` is Kafka's null, distinct from an empty value.
    pub value: Option<Vec<u8>>,
}

/// Exactly what Kafka stores for one record, and nothing from the ingesting
/// machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    /// Topic the record was read from.
    pub topic: String,
    /// Partition the record was read from.
    pub partition: i32,
    /// Kafka offset within the partition (never negative).
    pub offset: i64,
    /// How `timestamp_ms` was set.
    pub timestamp_type: TimestampType,
    /// Milliseconds since the Unix epoch; 0 when `timestamp_type` is
    /// `NotAvailable`. May be negative (Kafka does not forbid it).
    pub timestamp_ms: i64,
    /// Record key; `None` is a null key, distinct from an empty key.
    pub key: Option<Vec<u8>>,
    /// Record value; `None` is a null value (a tombstone), distinct from empty.
    pub value: Option<Vec<u8>>,
    /// Headers in the order Kafka delivered them.
    pub headers: Vec<Header>,
}

impl Record {
    /// The stream (topic and partition) this record belongs to.
    pub fn stream(&self) -> StreamId {
        StreamId::new(self.topic.clone(), self.partition)
    }

    /// Whether this record belongs to `stream`, without allocating.
    pub fn belongs_to(&self, stream: &StreamId) -> bool {
        self.partition == stream.partition && self.topic == stream.topic
    }
}

/// A 32-byte blake3 chain hash. Displays and parses as 64 lower-case hex
/// digits; equality is constant time (via `blake3::Hash`).
#[derive(Clone, Copy)]
pub struct Hash(pub [u8; HASH_LEN]);

impl Hash {
    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; HASH_LEN] {
        &self.0
    }

    /// A short form for one-line messages: the first 8 hex digits and `…`.
    pub fn short(&self) -> ShortHash {
        ShortHash(*self)
    }
}

impl From<blake3::Hash> for Hash {
    fn from(hash: blake3::Hash) -> Self {
        Hash(*hash.as_bytes())
    }
}

impl PartialEq for Hash {
    fn eq(&self, other: &Self) -> bool {
        // blake3::Hash compares in constant time.
        blake3::Hash::from_bytes(self.0) == blake3::Hash::from_bytes(other.0)
    }
}

impl Eq for Hash {}

impl std::hash::Hash for Hash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Display for Hash {
    /// Lowercase hex, 64 characters. Written in one piece: query answers
    /// cite a hash per entry, and formatting byte by byte through
    /// `{:02x}` showed up in their profile.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; HASH_LEN * 2];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        f.pad(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

/// Error parsing a [`Hash`](struct@Hash) from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseHashError {
    /// The text is not 64 characters long.
    #[error("hash must be 64 lower-case hex digits, got {len} characters")]
    WrongLength {
        /// Length of the text in bytes.
        len: usize,
    },
    /// A character is not a lower-case hex digit.
    #[error("hash has {found:?} at character {at}; expected a lower-case hex digit (0-9, a-f)")]
    InvalidDigit {
        /// Zero-based byte position of the bad character.
        at: usize,
        /// The bad character.
        found: char,
    },
}

impl FromStr for Hash {
    type Err = ParseHashError;

    /// Parses exactly 64 lower-case hex digits.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() != 2 * HASH_LEN {
            return Err(ParseHashError::WrongLength { len: text.len() });
        }
        let digit = |at: usize| -> Result<u8, ParseHashError> {
            let byte = text.as_bytes()[at];
            match byte {
                b'0'..=b'9' => Ok(byte - b'0'),
                b'a'..=b'f' => Ok(byte - b'a' + 10),
                _ => Err(ParseHashError::InvalidDigit {
                    at,
                    found: text[at..].chars().next().unwrap_or('\u{fffd}'),
                }),
            }
        };
        let mut bytes = [0u8; HASH_LEN];
        for (i, out) in bytes.iter_mut().enumerate() {
            *out = (digit(2 * i)? << 4) | digit(2 * i + 1)?;
        }
        Ok(Hash(bytes))
    }
}

/// Display adapter showing the first 8 hex digits of a hash followed by `…`.
#[derive(Clone, Copy)]
pub struct ShortHash(Hash);

impl fmt::Display for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0.0[..4] {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("…")
    }
}

// ---------------------------------------------------------------------------
// Fields and record validation
// ---------------------------------------------------------------------------

/// A field of a record or stored entry, named in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The stored entry's format version byte.
    Version,
    /// The sequence number.
    Seq,
    /// The previous entry's hash.
    PrevHash,
    /// The topic name.
    Topic,
    /// The partition number.
    Partition,
    /// The Kafka offset.
    Offset,
    /// The timestamp type code.
    TimestampType,
    /// The timestamp in milliseconds.
    Timestamp,
    /// The record key.
    Key,
    /// The record value.
    Value,
    /// The header count.
    Headers,
    /// The name of the header at this zero-based index.
    HeaderName(usize),
    /// The value of the header at this zero-based index.
    HeaderValue(usize),
    /// The stored entry hash.
    Hash,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Version => f.write_str("version"),
            Field::Seq => f.write_str("seq"),
            Field::PrevHash => f.write_str("prev_hash"),
            Field::Topic => f.write_str("topic"),
            Field::Partition => f.write_str("partition"),
            Field::Offset => f.write_str("offset"),
            Field::TimestampType => f.write_str("timestamp_type"),
            Field::Timestamp => f.write_str("timestamp_ms"),
            Field::Key => f.write_str("key"),
            Field::Value => f.write_str("value"),
            Field::Headers => f.write_str("headers"),
            Field::HeaderName(i) => write!(f, "headers[{i}].name"),
            Field::HeaderValue(i) => write!(f, "headers[{i}].value"),
            Field::Hash => f.write_str("hash"),
        }
    }
}

impl Field {
    /// The length limit of a variable-length field, if it has one.
    fn max_len(self) -> Option<usize> {
        match self {
            Field::Topic => Some(MAX_TOPIC_LEN),
            Field::Key => Some(MAX_KEY_BYTES),
            Field::Value => Some(MAX_VALUE_BYTES),
            Field::Headers => Some(MAX_HEADERS),
            Field::HeaderName(_) => Some(MAX_HEADER_NAME_LEN),
            Field::HeaderValue(_) => Some(MAX_HEADER_VALUE_BYTES),
            _ => None,
        }
    }
}

/// Why a record cannot enter a chain (limits and Kafka invariants).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A field is longer than its limit (for `headers`: more headers than
    /// [`MAX_HEADERS`]).
    #[error("field `{field}` has length {len}, more than the limit {max}")]
    FieldTooLong {
        /// The field.
        field: Field,
        /// Its length in bytes (or count, for `headers`).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Key, value and headers together exceed [`MAX_RECORD_BYTES`].
    #[error(
        "key, value and headers total {total} bytes, more than MAX_RECORD_BYTES ({max}); keep the topic's max.message.bytes at or below 3 MiB (docs/FORMAT.md, \"Validity rules and limits\")"
    )]
    RecordTooLarge {
        /// The total in bytes.
        total: usize,
        /// The limit.
        max: usize,
    },
    /// The partition is negative (Kafka partitions start at 0).
    #[error("field `partition` is {partition}; Kafka partitions are never negative")]
    NegativePartition {
        /// The partition.
        partition: i32,
    },
    /// The offset is negative (Kafka offsets start at 0).
    #[error("field `offset` is {offset}; Kafka offsets are never negative")]
    NegativeOffset {
        /// The offset.
        offset: i64,
    },
    /// The timestamp type is `NotAvailable` but the timestamp is not 0.
    #[error(
        "field `timestamp_ms` is {timestamp_ms} but `timestamp_type` is NotAvailable; expected 0"
    )]
    TimestampWithoutType {
        /// The timestamp.
        timestamp_ms: i64,
    },
}

/// Checks a record against the limits and Kafka's invariants. [`ChainHead`]
/// and [`decode_entry`] accept exactly the records this accepts.
pub fn validate_record(record: &Record) -> Result<(), RecordError> {
    let check = |field: Field, len: usize| -> Result<(), RecordError> {
        let max = field.max_len().expect("every checked field has a limit");
        if len > max {
            return Err(RecordError::FieldTooLong { field, len, max });
        }
        Ok(())
    };
    check(Field::Topic, record.topic.len())?;
    if record.partition < 0 {
        return Err(RecordError::NegativePartition {
            partition: record.partition,
        });
    }
    if record.offset < 0 {
        return Err(RecordError::NegativeOffset {
            offset: record.offset,
        });
    }
    if record.timestamp_type == TimestampType::NotAvailable && record.timestamp_ms != 0 {
        return Err(RecordError::TimestampWithoutType {
            timestamp_ms: record.timestamp_ms,
        });
    }
    let key_len = record.key.as_ref().map_or(0, Vec::len);
    let value_len = record.value.as_ref().map_or(0, Vec::len);
    check(Field::Key, key_len)?;
    check(Field::Value, value_len)?;
    check(Field::Headers, record.headers.len())?;
    // Each term is bounded by its limit above, so the sum cannot overflow.
    let mut total = key_len + value_len;
    for (i, header) in record.headers.iter().enumerate() {
        let value_len = header.value.as_ref().map_or(0, Vec::len);
        check(Field::HeaderName(i), header.name.len())?;
        check(Field::HeaderValue(i), value_len)?;
        total = total.saturating_add(header.name.len() + value_len + HEADER_FRAMING_BYTES);
    }
    if total > MAX_RECORD_BYTES {
        return Err(RecordError::RecordTooLarge {
            total,
            max: MAX_RECORD_BYTES,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Canonical encoding and hashing
// ---------------------------------------------------------------------------

/// Where canonical bytes go: a hasher (for hashes) or a buffer (for storage).
/// Sharing one writer guarantees the stored body equals the hashed input.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for blake3::Hasher {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

fn put_len(sink: &mut impl Sink, field: Field, len: usize) {
    assert!(
        len <= u32::MAX as usize,
        "field `{field}` has length {len}, which does not fit the u32 length prefix"
    );
    sink.put(&(len as u32).to_be_bytes());
}

fn put_bytes(sink: &mut impl Sink, field: Field, bytes: &[u8]) {
    put_len(sink, field, bytes.len());
    sink.put(bytes);
}

fn put_optional(sink: &mut impl Sink, field: Field, bytes: Option<&[u8]>) {
    match bytes {
        None => sink.put(&[0]),
        Some(bytes) => {
            sink.put(&[1]);
            put_bytes(sink, field, bytes);
        }
    }
}

/// The canonical entry body: the exact input of [`entry_hash`] and the middle
/// of a stored entry. Field order and encoding are specified in FORMAT.md.
fn put_entry_body(sink: &mut impl Sink, prev: &Hash, seq: u64, record: &Record) {
    sink.put(&prev.0);
    sink.put(&seq.to_be_bytes());
    put_bytes(sink, Field::Topic, record.topic.as_bytes());
    sink.put(&record.partition.to_be_bytes());
    sink.put(&record.offset.to_be_bytes());
    sink.put(&[record.timestamp_type.code()]);
    sink.put(&record.timestamp_ms.to_be_bytes());
    put_optional(sink, Field::Key, record.key.as_deref());
    put_optional(sink, Field::Value, record.value.as_deref());
    put_len(sink, Field::Headers, record.headers.len());
    for (i, header) in record.headers.iter().enumerate() {
        put_bytes(sink, Field::HeaderName(i), header.name.as_bytes());
        put_optional(sink, Field::HeaderValue(i), header.value.as_deref());
    }
}

/// The hash a stream's chain starts from (the `prev_hash` of seq 0):
/// blake3 `derive_key` with [`GENESIS_CONTEXT`] over the topic (u32 BE length
/// and UTF-8 bytes) and the partition (i32 BE).
///
/// # Panics
/// If the topic is longer than `u32::MAX` bytes.
pub fn genesis(stream: &StreamId) -> Hash {
    let mut hasher = blake3::Hasher::new_derive_key(GENESIS_CONTEXT);
    put_bytes(&mut hasher, Field::Topic, stream.topic.as_bytes());
    hasher.put(&stream.partition.to_be_bytes());
    Hash::from(hasher.finalize())
}

/// The hash of the entry at `seq` holding `record`, chained to `prev`:
/// blake3 `derive_key` with [`ENTRY_CONTEXT`] over the canonical encoding in
/// FORMAT.md. Fed incrementally; allocates nothing.
///
/// # Panics
/// If any length (topic, key, value, header count, header name or value) does
/// not fit a u32. Records that pass [`validate_record`] always fit.
pub fn entry_hash(prev: &Hash, seq: u64, record: &Record) -> Hash {
    let mut sink = BufferedHasher {
        hasher: entry_hasher(),
        buffer: [0; HASH_BUFFER_BYTES],
        len: 0,
    };
    put_entry_body(&mut sink, prev, seq, record);
    sink.flush();
    Hash::from(sink.hasher.finalize())
}

/// The entry hash of an entry's stored bytes (the output of
/// [`encode_entry`]: version byte, body, hash), computed over the body as
/// stored. For bytes that [`decode_entry`] accepted this equals
/// [`entry_hash`] of the decoded entry, because decoding accepts only the
/// canonical encoding (the `entry_decode` fuzz target checks it), and it
/// spares encoding the entry again: what verifying a stored chain does.
///
/// # Panics
/// If `stored` is too short to hold a version byte and a hash, which no
/// accepted entry is.
pub fn stored_entry_hash(stored: &[u8]) -> Hash {
    assert!(
        stored.len() > 1 + HASH_LEN,
        "an encoded entry is longer than its version byte and hash"
    );
    let mut hasher = entry_hasher();
    hasher.update(&stored[1..stored.len() - HASH_LEN]);
    Hash::from(hasher.finalize())
}

/// [`stored_entry_hash`] of each of `stored`, the same hashes, computed
/// several at a time: blake3 hashes one short input a 64-byte block after
/// another, but can compress the blocks of up to 8 (AVX2) or 16 (AVX-512)
/// inputs side by side. Entries of up to one blake3 chunk (1 KiB of body;
/// nearly all of them) go through `EntryLanes`; longer ones through
/// [`stored_entry_hash`]. Verifying a stored chain is mostly this hashing.
///
/// # Panics
/// As [`stored_entry_hash`], for an item too short to be an encoded entry.
pub fn stored_entry_hashes(stored: &[&[u8]]) -> Vec<Hash> {
    let lanes = EntryLanes::get();
    let mut hashes = vec![Hash([0; HASH_LEN]); stored.len()];
    let mut group: Vec<(usize, &[u8])> = Vec::with_capacity(EntryLanes::MAX_LANES);
    for (i, entry) in stored.iter().enumerate() {
        assert!(
            entry.len() > 1 + HASH_LEN,
            "an encoded entry is longer than its version byte and hash"
        );
        let body = &entry[1..entry.len() - HASH_LEN];
        if body.len() > EntryLanes::CHUNK_LEN {
            hashes[i] = stored_entry_hash(entry);
            continue;
        }
        group.push((i, body));
        if group.len() == lanes.degree {
            lanes.hash_group(&group, &mut hashes);
            group.clear();
        }
    }
    if !group.is_empty() {
        lanes.hash_group(&group, &mut hashes);
    }
    hashes
}

/// blake3 `derive_key` for [`ENTRY_CONTEXT`] over inputs of at most one
/// chunk, several side by side, with the compression functions of
/// `blake3::platform` (the crate's own SIMD code; that module is public but
/// undocumented, which is why `Cargo.toml` pins the blake3 version).
///
/// An input of one chunk is hashed as the BLAKE3 spec says: the key is the
/// first chaining value; each 64-byte block (the last one zero-padded, an
/// empty input being one empty block) is compressed into it with counter 0,
/// flag `DERIVE_KEY_MATERIAL`, plus `CHUNK_START` on the first block and
/// `CHUNK_END | ROOT` on the last; the hash is the final chaining value.
/// The blocks all inputs of a group have before their last one are
/// compressed for the whole group at once (`hash_many`), the rest input by
/// input. Tested against `blake3::Hasher` for every length.
struct EntryLanes {
    platform: blake3::platform::Platform,
    /// The derived context key, as little-endian words.
    key: [u32; 8],
    /// Inputs per group: the platform's SIMD width.
    degree: usize,
}

impl EntryLanes {
    const BLOCK_LEN: usize = 64;
    const CHUNK_LEN: usize = 1024;
    /// The widest SIMD degree blake3 has (AVX-512).
    const MAX_LANES: usize = 16;
    const CHUNK_START: u8 = 1 << 0;
    const CHUNK_END: u8 = 1 << 1;
    const ROOT: u8 = 1 << 3;
    const DERIVE_KEY_MATERIAL: u8 = 1 << 6;

    fn get() -> &'static EntryLanes {
        static LANES: std::sync::OnceLock<EntryLanes> = std::sync::OnceLock::new();
        LANES.get_or_init(|| {
            let platform = blake3::platform::Platform::detect();
            let context_key = blake3::hazmat::hash_derive_key_context(ENTRY_CONTEXT);
            EntryLanes {
                platform,
                key: Self::words(&context_key),
                degree: platform.simd_degree().clamp(1, Self::MAX_LANES),
            }
        })
    }

    /// Blocks of a `len`-byte input (at least one).
    fn blocks(len: usize) -> usize {
        len.div_ceil(Self::BLOCK_LEN).max(1)
    }

    /// Hashes each `(i, body)` of `group` (at most [`EntryLanes::MAX_LANES`]
    /// bodies of at most one chunk) into `hashes[i]`.
    fn hash_group(&self, group: &[(usize, &[u8])], hashes: &mut [Hash]) {
        debug_assert!(group.len() <= Self::MAX_LANES);
        let mut cvs = [self.key; Self::MAX_LANES];
        // Whole blocks every body has before its last one, compressed side
        // by side (a body alone gains nothing from that).
        let shared = match group {
            [_, _, ..] => group
                .iter()
                .map(|(_, body)| Self::blocks(body.len()) - 1)
                .min()
                .unwrap_or(0),
            _ => 0,
        };
        if shared > 0 {
            self.compress_shared(group, shared, &mut cvs);
        }
        for ((i, body), cv) in group.iter().zip(cvs.iter_mut()) {
            let blocks = Self::blocks(body.len());
            for b in shared..blocks {
                let bytes = &body[b * Self::BLOCK_LEN..body.len().min((b + 1) * Self::BLOCK_LEN)];
                let mut block = [0u8; Self::BLOCK_LEN];
                block[..bytes.len()].copy_from_slice(bytes);
                let mut flags = Self::DERIVE_KEY_MATERIAL;
                if b == 0 {
                    flags |= Self::CHUNK_START;
                }
                if b + 1 == blocks {
                    flags |= Self::CHUNK_END | Self::ROOT;
                }
                let len = u8::try_from(bytes.len()).expect("a block is at most 64 bytes");
                self.platform.compress_in_place(cv, &block, len, 0, flags);
            }
            let mut hash = [0u8; HASH_LEN];
            for (out, word) in hash.chunks_exact_mut(4).zip(cv.iter()) {
                out.copy_from_slice(&word.to_le_bytes());
            }
            hashes[*i] = Hash(hash);
        }
    }

    /// Compresses the first `shared` blocks of every body of `group` at
    /// once, leaving each body's chaining value in `cvs`.
    fn compress_shared(&self, group: &[(usize, &[u8])], shared: usize, cvs: &mut [[u32; 8]]) {
        // hash_many takes inputs of a length fixed at compile time.
        macro_rules! many {
            ($($blocks:literal)*) => {
                match shared {
                    $($blocks => self.many::<{ $blocks * 64 }>(group, cvs),)*
                    _ => unreachable!("a chunk has 16 blocks, so at most 15 before the last"),
                }
            };
        }
        many!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    }

    fn many<const N: usize>(&self, group: &[(usize, &[u8])], cvs: &mut [[u32; 8]]) {
        let inputs: Vec<&[u8; N]> = group
            .iter()
            .map(|(_, body)| body[..N].try_into().expect("N bytes before the last block"))
            .collect();
        let mut out = [0u8; HASH_LEN * Self::MAX_LANES];
        self.platform.hash_many(
            &inputs,
            &self.key,
            0,
            blake3::IncrementCounter::No,
            Self::DERIVE_KEY_MATERIAL,
            Self::CHUNK_START,
            0,
            &mut out[..HASH_LEN * group.len()],
        );
        for (cv, bytes) in cvs.iter_mut().zip(out.chunks_exact(HASH_LEN)) {
            *cv = Self::words(bytes);
        }
    }

    /// A 32-byte key or chaining value as blake3's little-endian words.
    fn words(bytes: &[u8]) -> [u32; 8] {
        let mut words = [0u32; 8];
        for (word, b) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *word = u32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        words
    }
}

/// blake3 in `derive_key` mode for [`ENTRY_CONTEXT`]. Deriving the context
/// key costs a hash of its own: it is done once, and the keyed hasher (a
/// copy of its state) cloned for every entry.
fn entry_hasher() -> blake3::Hasher {
    static ENTRY_HASHER: std::sync::OnceLock<blake3::Hasher> = std::sync::OnceLock::new();
    ENTRY_HASHER
        .get_or_init(|| blake3::Hasher::new_derive_key(ENTRY_CONTEXT))
        .clone()
}

/// Bytes gathered before they are fed to blake3 (whose per-call cost is
/// large next to the 1- to 8-byte fields of an entry body).
const HASH_BUFFER_BYTES: usize = 1024;

/// A [`Sink`] that feeds a hasher in large pieces: small fields are
/// gathered in a buffer, large ones (a record value) go straight through.
/// The hash is that of the concatenation either way.
struct BufferedHasher {
    hasher: blake3::Hasher,
    buffer: [u8; HASH_BUFFER_BYTES],
    len: usize,
}

impl BufferedHasher {
    fn flush(&mut self) {
        self.hasher.update(&self.buffer[..self.len]);
        self.len = 0;
    }
}

impl Sink for BufferedHasher {
    fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() <= HASH_BUFFER_BYTES {
            self.buffer[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            self.flush();
            if bytes.len() < HASH_BUFFER_BYTES {
                self.buffer[..bytes.len()].copy_from_slice(bytes);
                self.len = bytes.len();
            } else {
                self.hasher.update(bytes);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Entries and chain building
// ---------------------------------------------------------------------------

/// One chain entry: a record at its place in its stream's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the chain, contiguous from 0.
    pub seq: u64,
    /// The Kafka record.
    pub record: Record,
    /// Hash of the entry at `seq - 1`, or the stream's genesis hash for seq 0.
    pub prev_hash: Hash,
    /// `entry_hash(prev_hash, seq, record)`.
    pub hash: Hash,
}

/// Why [`ChainHead::append`] refused a record. The chain is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The record belongs to another topic or partition.
    #[error(
        "{stream} seq {seq} (offset {offset}): record belongs to stream {found}, not to this chain"
    )]
    WrongStream {
        /// This chain's stream.
        stream: StreamId,
        /// The seq the record would have taken.
        seq: u64,
        /// The record's offset.
        offset: i64,
        /// The record's stream.
        found: StreamId,
    },
    /// The record's offset is not greater than the last appended offset.
    #[error(
        "{stream} seq {seq} (offset {offset}): offset is not greater than the last appended offset {last_offset}; Kafka offsets never go back"
    )]
    OffsetNotIncreasing {
        /// This chain's stream.
        stream: StreamId,
        /// The seq the record would have taken.
        seq: u64,
        /// The record's offset.
        offset: i64,
        /// The offset of the chain's last entry.
        last_offset: i64,
    },
    /// The record breaks a limit or a Kafka invariant.
    #[error("{stream} seq {seq} (offset {offset}): {source}")]
    InvalidRecord {
        /// This chain's stream.
        stream: StreamId,
        /// The seq the record would have taken.
        seq: u64,
        /// The record's offset.
        offset: i64,
        /// What is wrong with the record.
        source: RecordError,
    },
}

/// Why a persisted chain head cannot be resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// `next_seq` and `last_offset` disagree about whether the chain is empty.
    #[error(
        "{stream}: persisted head has next_seq {next_seq} but last_offset {last_offset:?}; an empty chain has next_seq 0 and no last offset, a non-empty one both"
    )]
    EmptinessMismatch {
        /// The stream.
        stream: StreamId,
        /// Persisted next seq.
        next_seq: u64,
        /// Persisted last offset.
        last_offset: Option<i64>,
    },
    /// An empty chain's head is not the stream's genesis hash.
    #[error(
        "{stream}: persisted head of an empty chain is {found}, expected the genesis hash {expected}"
    )]
    NotGenesis {
        /// The stream.
        stream: StreamId,
        /// The stream's genesis hash.
        expected: Hash,
        /// The persisted head.
        found: Hash,
    },
    /// The persisted last offset is negative.
    #[error("{stream}: persisted last_offset {last_offset} is negative; Kafka offsets never are")]
    NegativeOffset {
        /// The stream.
        stream: StreamId,
        /// Persisted last offset.
        last_offset: i64,
    },
}

/// Builds one stream's chain, one record at a time. The ingester keeps one per
/// partition and persists `(next_seq, last_offset, head)` with each batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    stream: StreamId,
    next_seq: u64,
    last_offset: Option<i64>,
    head: Hash,
}

impl ChainHead {
    /// An empty chain for `stream`: next seq 0, head = [`genesis`].
    pub fn genesis(stream: StreamId) -> Self {
        let head = genesis(&stream);
        ChainHead {
            stream,
            next_seq: 0,
            last_offset: None,
            head,
        }
    }

    /// Resumes a chain from its persisted state, checking that the state is
    /// self-consistent (it cannot check the head of a non-empty chain; use
    /// [`ChainVerifier::check_head`] for that).
    pub fn resume(
        stream: StreamId,
        next_seq: u64,
        last_offset: Option<i64>,
        head: Hash,
    ) -> Result<Self, ResumeError> {
        if (next_seq == 0) != last_offset.is_none() {
            return Err(ResumeError::EmptinessMismatch {
                stream,
                next_seq,
                last_offset,
            });
        }
        if let Some(last_offset) = last_offset
            && last_offset < 0
        {
            return Err(ResumeError::NegativeOffset {
                stream,
                last_offset,
            });
        }
        if next_seq == 0 {
            let expected = genesis(&stream);
            if head != expected {
                return Err(ResumeError::NotGenesis {
                    stream,
                    expected,
                    found: head,
                });
            }
        }
        Ok(ChainHead {
            stream,
            next_seq,
            last_offset,
            head,
        })
    }

    /// Checks that `record` may come next in this chain (its stream, an
    /// offset after the last one, [`validate_record`]); returns its seq.
    fn check_next(&self, record: &Record) -> Result<u64, AppendError> {
        let seq = self.next_seq;
        let offset = record.offset;
        if !record.belongs_to(&self.stream) {
            return Err(AppendError::WrongStream {
                stream: self.stream.clone(),
                seq,
                offset,
                found: record.stream(),
            });
        }
        if let Some(last_offset) = self.last_offset
            && offset <= last_offset
        {
            return Err(AppendError::OffsetNotIncreasing {
                stream: self.stream.clone(),
                seq,
                offset,
                last_offset,
            });
        }
        self.validate_next(record, seq)?;
        Ok(seq)
    }

    /// [`validate_record`] for `record`, to be entry `seq` of this chain.
    fn validate_next(&self, record: &Record, seq: u64) -> Result<(), AppendError> {
        validate_record(record).map_err(|source| AppendError::InvalidRecord {
            stream: self.stream.clone(),
            seq,
            offset: record.offset,
            source,
        })
    }

    /// Appends `record` as the next entry and returns it. Refuses a record of
    /// another stream, an offset not strictly greater than the last one
    /// (gaps are fine: transaction markers, compaction), or a record breaking
    /// [`validate_record`]. On error the chain is unchanged.
    pub fn append(&mut self, record: Record) -> Result<Entry, AppendError> {
        let seq = self.check_next(&record)?;
        let offset = record.offset;
        assert!(
            seq < u64::MAX,
            "{} seq {seq}: sequence numbers exhausted",
            self.stream
        );

        let hash = entry_hash(&self.head, seq, &record);
        let entry = Entry {
            seq,
            record,
            prev_hash: self.head,
            hash,
        };
        self.next_seq = seq + 1;
        self.last_offset = Some(offset);
        self.head = hash;
        assert!(self.next_seq > 0 && self.last_offset.is_some());
        Ok(entry)
    }

    /// Moves the head over `entry`, an entry already appended once that the
    /// caller's [`ChainVerifier`] has just checked (stream, seq, offset
    /// order, links, hash; a replay): the record's limits are checked as by
    /// [`ChainHead::append`]; the verifier's checks are only asserted in
    /// debug builds (this runs once per replayed entry).
    ///
    /// # Panics
    /// If `entry` does not continue this chain (`seq`, `prev_hash`): the
    /// caller's verifier would have refused it.
    pub fn advance_verified(&mut self, entry: &Entry) -> Result<(), AppendError> {
        let record = &entry.record;
        let seq = self.next_seq;
        let offset = record.offset;
        debug_assert_eq!(self.check_next(record).ok(), Some(seq));
        self.validate_next(record, seq)?;
        assert_eq!(entry.seq, seq, "{}: entry out of order", self.stream);
        assert!(
            entry.prev_hash == self.head,
            "{} seq {seq}: entry does not link to the head",
            self.stream
        );
        self.next_seq = seq + 1;
        self.last_offset = Some(offset);
        self.head = entry.hash;
        Ok(())
    }

    /// The stream this chain covers.
    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    /// The seq the next appended record will get (= number of entries).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Offset of the last entry, `None` while the chain is empty.
    pub fn last_offset(&self) -> Option<i64> {
        self.last_offset
    }

    /// Hash of the last entry, or the genesis hash while the chain is empty.
    pub fn head(&self) -> Hash {
        self.head
    }
}

// ---------------------------------------------------------------------------
// Stored entry codec (version 1)
// ---------------------------------------------------------------------------

/// Encodes an entry for storage: [`ENTRY_FORMAT_VERSION`], the canonical body
/// (exactly the bytes [`entry_hash`] hashes), then the stored hash.
///
/// # Panics
/// If the record fails [`validate_record`]; entries from [`ChainHead::append`]
/// and [`decode_entry`] never do.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    if let Err(error) = validate_record(&entry.record) {
        panic!(
            "encode_entry: {} seq {} (offset {}): {error}",
            entry.record.stream(),
            entry.seq,
            entry.record.offset
        );
    }
    let mut out = Vec::with_capacity(encoded_len(&entry.record));
    out.push(ENTRY_FORMAT_VERSION);
    put_entry_body(&mut out, &entry.prev_hash, entry.seq, &entry.record);
    out.extend_from_slice(&entry.hash.0);
    assert_eq!(out.len(), encoded_len(&entry.record));
    assert!(out.len() <= MAX_ENCODED_ENTRY_BYTES);
    out
}

/// Length of [`encode_entry`]'s output for `record`, field by field.
fn encoded_len(record: &Record) -> usize {
    let optional = |bytes: &Option<Vec<u8>>| 1 + bytes.as_ref().map_or(0, |b| 4 + b.len());
    let headers: usize = record
        .headers
        .iter()
        .map(|h| 4 + h.name.len() + optional(&h.value))
        .sum();
    let version = 1;
    let prev_seq = HASH_LEN + 8;
    let topic = 4 + record.topic.len();
    let partition_offset_timestamp = 4 + 8 + 1 + 8;
    let key_value = optional(&record.key) + optional(&record.value);
    version + prev_seq + topic + partition_offset_timestamp + key_value + 4 + headers + HASH_LEN
}

/// Why stored bytes are not a valid version-1 entry. Every variant names the
/// field and the byte position where decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeEntryError {
    /// The first byte is not a known format version.
    #[error(
        "entry has unknown format version {version} at byte 0; this build reads version {ENTRY_FORMAT_VERSION}"
    )]
    UnknownVersion {
        /// The version byte found.
        version: u8,
    },
    /// The input is larger than any valid entry.
    #[error("entry is {len} bytes, more than MAX_ENCODED_ENTRY_BYTES ({max})")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input ends inside a field.
    #[error("entry truncated in field `{field}` at byte {at}: need {need} bytes, {remain} remain")]
    Truncated {
        /// The field being read.
        field: Field,
        /// Byte position of the read.
        at: usize,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the input.
        remain: usize,
    },
    /// A length prefix (or the header count) exceeds the field's limit.
    #[error("entry field `{field}` at byte {at}: length {len} is more than the limit {max}")]
    TooLong {
        /// The field.
        field: Field,
        /// Byte position of the length prefix.
        at: usize,
        /// The length read.
        len: u32,
        /// The limit.
        max: usize,
    },
    /// Key, value and headers together exceed [`MAX_RECORD_BYTES`].
    #[error(
        "entry field `{field}` at byte {at}: key, value and headers so far total {total} bytes, more than MAX_RECORD_BYTES ({max})"
    )]
    RecordTooLarge {
        /// The field that crossed the limit.
        field: Field,
        /// Byte position of its length prefix.
        at: usize,
        /// Running total in bytes.
        total: usize,
        /// The limit.
        max: usize,
    },
    /// A string field is not valid UTF-8.
    #[error("entry field `{field}` at byte {at}: not valid UTF-8")]
    InvalidUtf8 {
        /// The field.
        field: Field,
        /// Byte position of the string's first byte.
        at: usize,
    },
    /// A presence byte is neither 0 nor 1.
    #[error(
        "entry field `{field}` at byte {at}: presence byte is {found}, expected 0 (absent) or 1 (present)"
    )]
    InvalidPresence {
        /// The field.
        field: Field,
        /// Byte position of the presence byte.
        at: usize,
        /// The byte found.
        found: u8,
    },
    /// The timestamp type code is unknown.
    #[error("entry field `timestamp_type` at byte {at}: unknown code {found}, expected 0, 1 or 2")]
    InvalidTimestampType {
        /// Byte position of the code.
        at: usize,
        /// The code found.
        found: u8,
    },
    /// A decoded value breaks a Kafka invariant (negative partition or
    /// offset, timestamp without type).
    #[error("entry field `{field}` at byte {at}: {source}")]
    InvalidRecord {
        /// The field.
        field: Field,
        /// Byte position of the field.
        at: usize,
        /// What is wrong.
        source: RecordError,
    },
    /// Bytes remain after the stored hash.
    #[error("entry has {count} trailing bytes after the stored hash, from byte {at}")]
    TrailingBytes {
        /// Byte position of the first trailing byte.
        at: usize,
        /// Number of trailing bytes.
        count: usize,
    },
}

/// Bounds-checked cursor over untrusted bytes. Never panics, never allocates.
struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remain(&self) -> usize {
        self.input.len() - self.pos
    }

    fn take(&mut self, field: Field, need: usize) -> Result<&'a [u8], DecodeEntryError> {
        let remain = self.remain();
        if need > remain {
            return Err(DecodeEntryError::Truncated {
                field,
                at: self.pos,
                need,
                remain,
            });
        }
        let bytes = &self.input[self.pos..self.pos + need];
        self.pos += need;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], DecodeEntryError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: Field) -> Result<u8, DecodeEntryError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// Reads a u32 BE length prefix and checks it against the field's limit
    /// before anything is allocated. Returns the length and its position.
    fn len(&mut self, field: Field) -> Result<(usize, usize), DecodeEntryError> {
        let at = self.pos;
        let len = u32::from_be_bytes(self.array(field)?);
        let max = field
            .max_len()
            .expect("every length-prefixed field has a limit");
        if len as usize > max {
            return Err(DecodeEntryError::TooLong {
                field,
                at,
                len,
                max,
            });
        }
        Ok((len as usize, at))
    }

    fn string(&mut self, field: Field) -> Result<String, DecodeEntryError> {
        let (len, _) = self.len(field)?;
        let at = self.pos;
        let bytes = self.take(field, len)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_owned()),
            Err(_) => Err(DecodeEntryError::InvalidUtf8 { field, at }),
        }
    }

    /// Reads a presence byte and, if present, a length-prefixed byte string.
    /// Adds its length to `total` and checks [`MAX_RECORD_BYTES`].
    fn optional(
        &mut self,
        field: Field,
        total: &mut usize,
    ) -> Result<Option<Vec<u8>>, DecodeEntryError> {
        let at = self.pos;
        match self.u8(field)? {
            0 => Ok(None),
            1 => {
                let (len, len_at) = self.len(field)?;
                add_to_total(total, len, field, len_at)?;
                Ok(Some(self.take(field, len)?.to_vec()))
            }
            found => Err(DecodeEntryError::InvalidPresence { field, at, found }),
        }
    }
}

fn add_to_total(
    total: &mut usize,
    len: usize,
    field: Field,
    at: usize,
) -> Result<(), DecodeEntryError> {
    *total = total.saturating_add(len);
    if *total > MAX_RECORD_BYTES {
        return Err(DecodeEntryError::RecordTooLarge {
            field,
            at,
            total: *total,
            max: MAX_RECORD_BYTES,
        });
    }
    Ok(())
}

/// Decodes a stored entry. Accepts exactly the outputs of [`encode_entry`]
/// (so `encode_entry(&decode_entry(b)?) == b`). Never panics on any input and
/// never allocates more than the input's own size. Does not check the stored
/// hash: that is [`ChainVerifier`]'s job.
pub fn decode_entry(input: &[u8]) -> Result<Entry, DecodeEntryError> {
    let mut reader = Reader { input, pos: 0 };
    let version = reader.u8(Field::Version)?;
    if version != ENTRY_FORMAT_VERSION {
        return Err(DecodeEntryError::UnknownVersion { version });
    }
    if input.len() > MAX_ENCODED_ENTRY_BYTES {
        return Err(DecodeEntryError::TooLarge {
            len: input.len(),
            max: MAX_ENCODED_ENTRY_BYTES,
        });
    }
    let invalid = |field: Field, at: usize, source: RecordError| DecodeEntryError::InvalidRecord {
        field,
        at,
        source,
    };

    let prev_hash = Hash(reader.array(Field::PrevHash)?);
    let seq = u64::from_be_bytes(reader.array(Field::Seq)?);
    let topic = reader.string(Field::Topic)?;

    let at = reader.pos;
    let partition = i32::from_be_bytes(reader.array(Field::Partition)?);
    if partition < 0 {
        return Err(invalid(
            Field::Partition,
            at,
            RecordError::NegativePartition { partition },
        ));
    }

    let at = reader.pos;
    let offset = i64::from_be_bytes(reader.array(Field::Offset)?);
    if offset < 0 {
        return Err(invalid(
            Field::Offset,
            at,
            RecordError::NegativeOffset { offset },
        ));
    }

    let at = reader.pos;
    let code = reader.u8(Field::TimestampType)?;
    let timestamp_type = TimestampType::from_code(code)
        .ok_or(DecodeEntryError::InvalidTimestampType { at, found: code })?;

    let at = reader.pos;
    let timestamp_ms = i64::from_be_bytes(reader.array(Field::Timestamp)?);
    if timestamp_type == TimestampType::NotAvailable && timestamp_ms != 0 {
        return Err(invalid(
            Field::Timestamp,
            at,
            RecordError::TimestampWithoutType { timestamp_ms },
        ));
    }

    let mut total = 0usize;
    let key = reader.optional(Field::Key, &mut total)?;
    let value = reader.optional(Field::Value, &mut total)?;

    let (count, _) = reader.len(Field::Headers)?;
    // Each header takes at least its framing, so the input bounds the count.
    let mut headers = Vec::with_capacity(count.min(reader.remain() / (4 + 1)));
    for i in 0..count {
        let name_at = reader.pos;
        add_to_total(
            &mut total,
            HEADER_FRAMING_BYTES,
            Field::HeaderName(i),
            name_at,
        )?;
        let name = reader.string(Field::HeaderName(i))?;
        add_to_total(&mut total, name.len(), Field::HeaderName(i), name_at)?;
        let value = reader.optional(Field::HeaderValue(i), &mut total)?;
        headers.push(Header { name, value });
    }

    let hash = Hash(reader.array(Field::Hash)?);
    if reader.remain() > 0 {
        return Err(DecodeEntryError::TrailingBytes {
            at: reader.pos,
            count: reader.remain(),
        });
    }

    let record = Record {
        topic,
        partition,
        offset,
        timestamp_type,
        timestamp_ms,
        key,
        value,
        headers,
    };
    // The checks above are exactly validate_record's. Checked in debug builds
    // only (the property tests exercise it): decoding must never panic.
    debug_assert!(validate_record(&record).is_ok());
    Ok(Entry {
        seq,
        record,
        prev_hash,
        hash,
    })
}

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------

/// What kind of break [`ChainVerifier`] found, with expected and found values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakKind {
    /// The entry's seq is not the next one.
    #[error(
        "seq gap: expected seq {expected}, found seq {found} (entry deleted, inserted, duplicated or reordered)"
    )]
    SeqGap {
        /// The seq the verifier expected.
        expected: u64,
        /// The entry's seq.
        found: u64,
    },
    /// The entry belongs to another stream.
    #[error("entry belongs to stream {found} (entry from another chain)")]
    WrongStream {
        /// The entry's stream.
        found: StreamId,
    },
    /// The entry's offset is not greater than the previous entry's.
    #[error(
        "offset {found} is not greater than the previous entry's offset {previous} (entries duplicated or reordered)"
    )]
    OffsetNotIncreasing {
        /// The previous entry's offset.
        previous: i64,
        /// The entry's offset.
        found: i64,
    },
    /// The entry's `prev_hash` is not the previous entry's hash.
    #[error("prev hash mismatch: expected {}, found {} (an earlier entry was replaced, or entries were deleted or inserted before this one)", .expected.short(), .found.short())]
    PrevHashMismatch {
        /// The previous entry's hash (genesis for seq 0).
        expected: Hash,
        /// The entry's `prev_hash`.
        found: Hash,
    },
    /// The entry's stored hash is not the hash of its contents.
    #[error("hash mismatch: expected {}, found {} (entry bytes altered)", .expected.short(), .found.short())]
    HashMismatch {
        /// The hash recomputed from the entry's contents.
        expected: Hash,
        /// The stored hash.
        found: Hash,
    },
    /// The chain has a different length than the expected head says.
    #[error("{}", head_seq_message(*.expected_next_seq, *.found_next_seq))]
    HeadSeqMismatch {
        /// The expected number of entries.
        expected_next_seq: u64,
        /// The number of entries verified.
        found_next_seq: u64,
    },
    /// The chain has the expected length but a different head hash.
    #[error("head hash mismatch: expected {}, found {} (chain rewritten and re-hashed)", .expected.short(), .found.short())]
    HeadHashMismatch {
        /// The expected head hash.
        expected: Hash,
        /// The head hash of the verified chain.
        found: Hash,
    },
}

fn head_seq_message(expected: u64, found: u64) -> String {
    if found < expected {
        format!(
            "chain ends early: expected next seq {expected}, found {found} ({} entries missing: tail truncated)",
            expected - found
        )
    } else {
        format!(
            "chain runs past the expected head: expected next seq {expected}, found {found} ({} unexpected entries)",
            found - expected
        )
    }
}

/// A place where a stored chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{stream} seq {seq} ({}): {kind}", OffsetLabel(*.offset))]
pub struct ChainBreak {
    /// The stream being verified.
    pub stream: StreamId,
    /// The chain position of the break: the seq the verifier expected next.
    pub seq: u64,
    /// The offending entry's offset; `None` for head checks at the chain end.
    pub offset: Option<i64>,
    /// What is wrong, with expected and found values (boxed to keep
    /// `Result<(), ChainBreak>` small on the per-entry path).
    pub kind: Box<BreakKind>,
}

struct OffsetLabel(Option<i64>);

impl fmt::Display for OffsetLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(offset) => write!(f, "offset {offset}"),
            None => f.write_str("end of chain"),
        }
    }
}

/// Verifies one stream's stored entries, fed in stored order, keeping O(1)
/// state. Stop at the first [`ChainBreak`]: a failed push leaves the state
/// unchanged, so later entries would be judged against the last good one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainVerifier {
    stream: StreamId,
    next_seq: u64,
    last_offset: Option<i64>,
    head: Hash,
}

impl ChainVerifier {
    /// A verifier for `stream`, expecting seq 0 chained to [`genesis`].
    pub fn new(stream: StreamId) -> Self {
        let head = genesis(&stream);
        ChainVerifier {
            stream,
            next_seq: 0,
            last_offset: None,
            head,
        }
    }

    /// A verifier that continues after `head` (a snapshot's head, say):
    /// it takes the entries before it as given, and checks the next ones
    /// exactly as a verifier from genesis would. Tying `head` to the stored
    /// chain is the caller's part.
    pub fn resume(head: &ChainHead) -> Self {
        ChainVerifier {
            stream: head.stream().clone(),
            next_seq: head.next_seq(),
            last_offset: head.last_offset(),
            head: head.head(),
        }
    }

    /// Checks the next stored entry: stream, seq contiguity, offset order,
    /// `prev_hash` linkage, then the stored hash against the recomputed one.
    pub fn push(&mut self, entry: &Entry) -> Result<(), ChainBreak> {
        self.push_checked(entry, || {
            entry_hash(&entry.prev_hash, entry.seq, &entry.record)
        })
    }

    /// [`ChainVerifier::push`] for an entry decoded from stored bytes, given
    /// [`stored_entry_hash`] of those bytes (which spares encoding it again).
    pub fn push_stored(&mut self, entry: &Entry, recomputed: Hash) -> Result<(), ChainBreak> {
        debug_assert_eq!(
            recomputed,
            entry_hash(&entry.prev_hash, entry.seq, &entry.record),
            "stored_entry_hash of an entry's stored bytes equals its entry_hash"
        );
        self.push_checked(entry, || recomputed)
    }

    /// The checks of [`ChainVerifier::push`], with the recomputed hash
    /// asked for only once the links before it hold.
    fn push_checked(
        &mut self,
        entry: &Entry,
        recompute: impl FnOnce() -> Hash,
    ) -> Result<(), ChainBreak> {
        let brk = |kind: BreakKind| ChainBreak {
            stream: self.stream.clone(),
            seq: self.next_seq,
            offset: Some(entry.record.offset),
            kind: Box::new(kind),
        };
        if !entry.record.belongs_to(&self.stream) {
            return Err(brk(BreakKind::WrongStream {
                found: entry.record.stream(),
            }));
        }
        if entry.seq != self.next_seq {
            return Err(brk(BreakKind::SeqGap {
                expected: self.next_seq,
                found: entry.seq,
            }));
        }
        if let Some(previous) = self.last_offset
            && entry.record.offset <= previous
        {
            return Err(brk(BreakKind::OffsetNotIncreasing {
                previous,
                found: entry.record.offset,
            }));
        }
        if entry.prev_hash != self.head {
            return Err(brk(BreakKind::PrevHashMismatch {
                expected: self.head,
                found: entry.prev_hash,
            }));
        }
        let recomputed = recompute();
        if entry.hash != recomputed {
            return Err(brk(BreakKind::HashMismatch {
                expected: recomputed,
                found: entry.hash,
            }));
        }
        assert!(self.next_seq < u64::MAX);
        self.next_seq += 1;
        self.last_offset = Some(entry.record.offset);
        self.head = entry.hash;
        Ok(())
    }

    /// Checks that the verified chain ends where the caller expects: exactly
    /// `expected_next_seq` entries with head `expected_head` (as persisted by
    /// [`ChainHead`]). Detects a truncated tail, extra entries, or a chain
    /// rewritten and re-hashed from some point on.
    pub fn check_head(
        &self,
        expected_next_seq: u64,
        expected_head: &Hash,
    ) -> Result<(), ChainBreak> {
        let brk = |kind: BreakKind| ChainBreak {
            stream: self.stream.clone(),
            seq: self.next_seq,
            offset: None,
            kind: Box::new(kind),
        };
        if self.next_seq != expected_next_seq {
            return Err(brk(BreakKind::HeadSeqMismatch {
                expected_next_seq,
                found_next_seq: self.next_seq,
            }));
        }
        if self.head != *expected_head {
            return Err(brk(BreakKind::HeadHashMismatch {
                expected: *expected_head,
                found: self.head,
            }));
        }
        Ok(())
    }

    /// The stream being verified.
    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    /// The seq the next entry must have (= number of entries verified).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Offset of the last verified entry, `None` before the first.
    pub fn last_offset(&self) -> Option<i64> {
        self.last_offset
    }

    /// Hash of the last verified entry, or the genesis hash before the first.
    pub fn head(&self) -> Hash {
        self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// `body` framed as a stored entry: version byte, body, hash bytes.
    fn framed(body: &[u8]) -> Vec<u8> {
        let mut stored = vec![ENTRY_FORMAT_VERSION];
        stored.extend_from_slice(body);
        stored.extend_from_slice(&[0xEE; HASH_LEN]);
        stored
    }

    #[test]
    fn hashing_side_by_side_equals_one_at_a_time_at_every_block_edge() {
        let lengths = [
            1, 2, 63, 64, 65, 127, 128, 500, 959, 960, 961, 1023, 1024, 1025, 2048, 3000,
        ];
        let bodies: Vec<Vec<u8>> = lengths
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        let stored: Vec<Vec<u8>> = bodies.iter().map(|b| framed(b)).collect();
        // Every length in a group with every other, and alone.
        let all: Vec<&[u8]> = stored.iter().map(Vec::as_slice).collect();
        let want: Vec<Hash> = all.iter().map(|s| stored_entry_hash(s)).collect();
        assert_eq!(stored_entry_hashes(&all), want);
        for s in &all {
            assert_eq!(stored_entry_hashes(&[s]), vec![stored_entry_hash(s)]);
        }
        assert!(stored_entry_hashes(&[]).is_empty());
    }

    proptest! {
        #[test]
        fn hashing_side_by_side_equals_one_at_a_time(
            bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..1300), 0..40),
        ) {
            let stored: Vec<Vec<u8>> = bodies.iter().map(|b| framed(b)).collect();
            let all: Vec<&[u8]> = stored.iter().map(Vec::as_slice).collect();
            let want: Vec<Hash> = all.iter().map(|s| stored_entry_hash(s)).collect();
            prop_assert_eq!(stored_entry_hashes(&all), want);
        }
    }
    use serde_json::{Value as Json, json};

    // ---- helpers ---------------------------------------------------------

    fn header(name: &str, value: Option<&[u8]>) -> Header {
        Header {
            name: name.to_owned(),
            value: value.map(<[u8]>::to_vec),
        }
    }

    fn record(stream: &StreamId, offset: i64) -> Record {
        Record {
            topic: stream.topic.clone(),
            partition: stream.partition,
            offset,
            timestamp_type: TimestampType::CreateTime,
            timestamp_ms: 1_795_000_000_000,
            key: Some(b"deal-42".to_vec()),
            value: Some(br#"{"deal":42}"#.to_vec()),
            headers: vec![],
        }
    }

    fn build(stream: &StreamId, records: Vec<Record>) -> (ChainHead, Vec<Entry>) {
        let mut head = ChainHead::genesis(stream.clone());
        let entries = records
            .into_iter()
            .map(|r| head.append(r).expect("test records are valid"))
            .collect();
        (head, entries)
    }

    /// Verifies all entries and the expected head; returns the first break.
    fn verify(
        stream: &StreamId,
        entries: &[Entry],
        expected_next_seq: u64,
        expected_head: &Hash,
    ) -> Result<(), ChainBreak> {
        let mut verifier = ChainVerifier::new(stream.clone());
        for entry in entries {
            verifier.push(entry)?;
        }
        verifier.check_head(expected_next_seq, expected_head)
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn body_bytes(prev: &Hash, seq: u64, record: &Record) -> Vec<u8> {
        let mut body = Vec::new();
        put_entry_body(&mut body, prev, seq, record);
        body
    }

    // ---- known-answer vectors ------------------------------------------

    /// The records behind tests/vectors/chain.json and docs/FORMAT.md.
    fn vector_chains() -> Vec<(StreamId, Vec<Record>)> {
        let deals = StreamId::new("deal-events", 3);
        let base = |offset: i64| record(&deals, offset);

        // 0: a typical record (the FORMAT.md worked example).
        let mut r0 = base(0);
        r0.headers = vec![header("source", Some(b"crm"))];
        // 1: absent (null) key.
        let mut r1 = base(1);
        r1.key = None;
        r1.value = Some(br#"{"deal":43}"#.to_vec());
        // 2: empty key, otherwise like 1.
        let mut r2 = base(2);
        r2.key = Some(vec![]);
        r2.value = Some(br#"{"deal":43}"#.to_vec());
        // 3: offset gap; null vs empty header value, duplicate names.
        let mut r3 = base(5);
        r3.timestamp_type = TimestampType::LogAppendTime;
        r3.timestamp_ms = 1_795_000_000_123;
        r3.key = Some(b"k".to_vec());
        r3.headers = vec![
            header("h", None),
            header("h", Some(b"")),
            header("H", Some(b"x")),
        ];
        // 4: negative timestamp, 300-byte value, empty key.
        let mut r4 = base(6);
        r4.timestamp_ms = -1_234_567_890_123;
        r4.key = Some(vec![]);
        r4.value = Some((0..300u32).map(|i| (i % 256) as u8).collect());
        // 5: no timestamp, tombstone (null value), 40 headers.
        let mut r5 = base(9);
        r5.timestamp_type = TimestampType::NotAvailable;
        r5.timestamp_ms = 0;
        r5.value = None;
        r5.headers = (0..40)
            .map(|i| {
                let value = match i % 3 {
                    0 => None,
                    1 => Some(vec![]),
                    _ => Some(vec![i as u8; i % 7]),
                };
                Header {
                    name: format!("h{i:02}"),
                    value,
                }
            })
            .collect();
        // 6: large offset (compaction gap).
        let mut r6 = base((1i64 << 40) + 7);
        r6.headers = vec![header("traceparent", Some(b"00-0af7651916cd43dd-01"))];

        let unicode = StreamId::new("取引-événements-сделки", 0);
        let mut u0 = record(&unicode, 100);
        u0.key = Some("ключ".as_bytes().to_vec());
        u0.value = Some("値 🚀".as_bytes().to_vec());
        u0.headers = vec![header("ключ-заголовка", Some("ü".as_bytes()))];
        let mut u1 = record(&unicode, 101);
        u1.key = None;
        u1.value = None;

        let max_partition = StreamId::new("deal-events", i32::MAX);
        let mut m0 = record(&max_partition, 0);
        m0.timestamp_type = TimestampType::NotAvailable;
        m0.timestamp_ms = 0;
        m0.key = None;
        m0.value = Some(vec![]);

        vec![
            (deals, vec![r0, r1, r2, r3, r4, r5, r6]),
            (unicode, vec![u0, u1]),
            (max_partition, vec![m0]),
        ]
    }

    /// Expected genesis and entry hashes for [`vector_chains`], computed once
    /// and cross-checked by tests/format/recompute.py.
    const EXPECTED: &[(&str, &[&str])] = &[
        (
            "eea6b471b7c2ff813cee319fbf63e95841adb9247cd382db41365faece09672e",
            &[
                "7d96c0b2f2e095838fedf9dc30f5cf1167cfa36dc81b3907d4aeefc0c2381407",
                "dc7f1bce986e7e85381f78a8dea1fc6d91b53d11a63bd40d5a96895cfbc841f5",
                "7342670711a835b69f625f3004e8c4ae0547a5d590a892d075f6cc1cba47436d",
                "7a8dfaa59fdfa2b3659a643c2268d0a6fda56a49f33d5a5b33f706a33de5345d",
                "aa55e81b953b2544f67b89d188fedca5b39109b7573088c10a2fa391f72a0c9f",
                "bd7b298aec5b2ca0297e370dedfe1348c205310f982766965df703f6be99eb76",
                "3ea4716e830b8def5b62ccf353bcb711d882fd64526a82093d8761446e9fbc23",
            ],
        ),
        (
            "af15ad8dc91365d4ecff2133c4d2e7f6073dbe06993be02617d890a1438d2297",
            &[
                "144a7b7f4498f5914add50167b0b9c173590bbb4cefce8c0978ade4c45fb7fe2",
                "eb65fd82744e32f7c5dd8982fc8c611bc969e08f44538500b99f86c03362a57c",
            ],
        ),
        (
            "2bdd8a30d35438396c2d5a98074a0dae817c2eb43e307b9be4eaec0759efdf05",
            &["b9a9e53fe59cc289516d020b7fbb41c132b0f22ff573ebba139b35dcb3c5b91a"],
        ),
    ];

    fn vectors_json() -> Json {
        let opt_hex = |bytes: &Option<Vec<u8>>| match bytes {
            None => Json::Null,
            Some(bytes) => Json::String(hex(bytes)),
        };
        let chains: Vec<Json> = vector_chains()
            .into_iter()
            .map(|(stream, records)| {
                let genesis_hash = genesis(&stream);
                let (_, entries) = build(&stream, records);
                let entries: Vec<Json> = entries
                    .iter()
                    .map(|e| {
                        let r = &e.record;
                        let headers: Vec<Json> = r
                            .headers
                            .iter()
                            .map(|h| json!({"name": h.name, "value": opt_hex(&h.value)}))
                            .collect();
                        json!({
                            "seq": e.seq,
                            "prev": e.prev_hash.to_string(),
                            "record": {
                                "topic": r.topic,
                                "partition": r.partition,
                                "offset": r.offset,
                                "timestamp_type": format!("{:?}", r.timestamp_type),
                                "timestamp_ms": r.timestamp_ms,
                                "key": opt_hex(&r.key),
                                "value": opt_hex(&r.value),
                                "headers": headers,
                            },
                            "hash": e.hash.to_string(),
                            "encoded": hex(&encode_entry(e)),
                        })
                    })
                    .collect();
                json!({
                    "stream": {"topic": stream.topic, "partition": stream.partition},
                    "genesis": genesis_hash.to_string(),
                    "entries": entries,
                })
            })
            .collect();
        json!({
            "description": "dealledger hash-chain known-answer vectors; rules in docs/FORMAT.md. \
                Byte strings are lower-case hex, null means absent. \
                Regenerate: cargo test --lib chain::tests::print_vectors_json -- --ignored --nocapture",
            "genesis_context": GENESIS_CONTEXT,
            "entry_context": ENTRY_CONTEXT,
            "entry_format_version": ENTRY_FORMAT_VERSION,
            "chains": chains,
        })
    }

    #[test]
    fn known_answer_vectors() {
        let chains = vector_chains();
        assert_eq!(chains.len(), EXPECTED.len());
        for ((stream, records), (genesis_hex, entry_hexes)) in chains.into_iter().zip(EXPECTED) {
            assert_eq!(
                genesis(&stream).to_string(),
                *genesis_hex,
                "genesis of {stream}"
            );
            let (head, entries) = build(&stream, records);
            assert_eq!(entries.len(), entry_hexes.len());
            for (entry, expected) in entries.iter().zip(entry_hexes.iter()) {
                assert_eq!(
                    entry.hash.to_string(),
                    *expected,
                    "{stream} seq {}",
                    entry.seq
                );
            }
            verify(&stream, &entries, head.next_seq(), &head.head()).unwrap();
        }
    }

    #[test]
    fn vectors_file_matches() {
        let file: Json = serde_json::from_str(include_str!("../tests/vectors/chain.json"))
            .expect("tests/vectors/chain.json is valid JSON");
        assert!(
            file == vectors_json(),
            "tests/vectors/chain.json is stale; regenerate with print_vectors_json"
        );
    }

    /// Prints tests/vectors/chain.json between marker lines.
    #[test]
    #[ignore = "generator, run by hand"]
    fn print_vectors_json() {
        let text = serde_json::to_string_pretty(&vectors_json()).unwrap();
        println!("-----BEGIN chain.json-----\n{text}\n-----END chain.json-----");
        for (stream, records) in vector_chains() {
            let (_, entries) = build(&stream, records);
            let hashes: Vec<String> = entries.iter().map(|e| format!("\"{}\"", e.hash)).collect();
            println!(
                "EXPECTED (\"{}\", &[{}]),",
                genesis(&stream),
                hashes.join(", ")
            );
        }
    }

    /// Keeps the worked example in docs/FORMAT.md honest.
    #[test]
    fn worked_example_bytes() {
        let (stream, records) = vector_chains().swap_remove(0);
        let genesis_input = {
            let mut bytes = Vec::new();
            put_bytes(&mut bytes, Field::Topic, stream.topic.as_bytes());
            bytes.put(&stream.partition.to_be_bytes());
            bytes
        };
        assert_eq!(
            hex(&genesis_input),
            "0000000b6465616c2d6576656e747300000003"
        );
        let body = body_bytes(&genesis(&stream), 0, &records[0]);
        let doc = include_str!("../docs/FORMAT.md");
        let doc_hex: String = doc
            .split("<!-- worked-example-body -->")
            .nth(1)
            .expect("FORMAT.md has the worked example body")
            .lines()
            .skip_while(|l| !l.starts_with("```"))
            .skip(1)
            .take_while(|l| !l.starts_with("```"))
            .flat_map(|l| l.split('#').next().unwrap_or("").split_whitespace())
            .collect();
        assert_eq!(doc_hex, hex(&body));
    }

    // ---- hashing rule ----------------------------------------------------

    #[test]
    fn absent_and_empty_differ() {
        let stream = StreamId::new("deal-events", 0);
        let prev = genesis(&stream);
        let mut absent = record(&stream, 0);
        absent.key = None;
        let mut empty = absent.clone();
        empty.key = Some(vec![]);
        assert_ne!(entry_hash(&prev, 0, &absent), entry_hash(&prev, 0, &empty));

        let mut absent = record(&stream, 0);
        absent.value = None;
        let mut empty = absent.clone();
        empty.value = Some(vec![]);
        assert_ne!(entry_hash(&prev, 0, &absent), entry_hash(&prev, 0, &empty));

        let mut null = record(&stream, 0);
        null.headers = vec![header("h", None)];
        let mut empty = null.clone();
        empty.headers = vec![header("h", Some(b""))];
        assert_ne!(entry_hash(&prev, 0, &null), entry_hash(&prev, 0, &empty));
    }

    #[test]
    fn header_order_matters() {
        let stream = StreamId::new("deal-events", 0);
        let prev = genesis(&stream);
        let mut ab = record(&stream, 0);
        ab.headers = vec![header("a", Some(b"1")), header("b", Some(b"2"))];
        let mut ba = ab.clone();
        ba.headers.reverse();
        assert_ne!(entry_hash(&prev, 0, &ab), entry_hash(&prev, 0, &ba));
        // Moving bytes between adjacent fields changes the hash (length prefixes).
        let mut shifted = ab.clone();
        shifted.headers = vec![header("a1", Some(b"")), header("b", Some(b"2"))];
        assert_ne!(entry_hash(&prev, 0, &ab), entry_hash(&prev, 0, &shifted));
    }

    #[test]
    fn every_hashed_input_matters() {
        let stream = StreamId::new("deal-events", 1);
        let prev = genesis(&stream);
        let base = record(&stream, 7);
        let h = entry_hash(&prev, 3, &base);
        assert_ne!(h, entry_hash(&Hash([1; 32]), 3, &base));
        assert_ne!(h, entry_hash(&prev, 4, &base));
        let variants: Vec<fn(&mut Record)> = vec![
            |r| r.topic.push('x'),
            |r| r.partition += 1,
            |r| r.offset += 1,
            |r| r.timestamp_type = TimestampType::LogAppendTime,
            |r| r.timestamp_ms += 1,
            |r| r.key = Some(b"deal-43".to_vec()),
            |r| r.value = Some(b"{}".to_vec()),
            |r| r.headers.push(header("x", None)),
        ];
        for change in variants {
            let mut r = base.clone();
            change(&mut r);
            assert_ne!(h, entry_hash(&prev, 3, &r), "{r:?}");
        }
        assert_ne!(
            genesis(&StreamId::new("deal-events", 1)),
            genesis(&StreamId::new("deal-events", 2))
        );
        assert_ne!(
            genesis(&StreamId::new("deal-events", 1)),
            genesis(&StreamId::new("deal-event", 1))
        );
    }

    #[test]
    fn stored_body_is_the_hash_input() {
        let stream = StreamId::new("deal-events", 3);
        let (_, entries) = build(&stream, vec![record(&stream, 0), record(&stream, 4)]);
        for entry in &entries {
            let bytes = encode_entry(entry);
            let body = &bytes[1..bytes.len() - HASH_LEN];
            let mut hasher = blake3::Hasher::new_derive_key(ENTRY_CONTEXT);
            hasher.update(body);
            assert_eq!(Hash::from(hasher.finalize()), entry.hash);
            assert_eq!(&bytes[bytes.len() - HASH_LEN..], entry.hash.as_bytes());
        }
    }

    // ---- Hash and StreamId -----------------------------------------------

    #[test]
    fn hash_hex_round_trip() {
        let h = genesis(&StreamId::new("deal-events", 3));
        let text = h.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<Hash>().unwrap(), h);
        // The same digits as blake3's own hex, byte for byte.
        assert_eq!(text, blake3::Hash::from_bytes(h.0).to_hex().as_str());
        assert_eq!(format!("{h:?}"), format!("Hash({text})"));
        assert_eq!(h.short().to_string(), format!("{}…", &text[..8]));
        assert_eq!(
            "abc".parse::<Hash>(),
            Err(ParseHashError::WrongLength { len: 3 })
        );
        let upper = text.to_uppercase();
        assert!(matches!(
            upper.parse::<Hash>(),
            Err(ParseHashError::InvalidDigit { at: _, found: _ })
        ));
        let bad = format!("{}g", &text[..63]);
        assert_eq!(
            bad.parse::<Hash>().unwrap_err().to_string(),
            "hash has 'g' at character 63; expected a lower-case hex digit (0-9, a-f)"
        );
        // Multi-byte characters do not panic.
        let wide = format!("é{}", &text[..62]);
        assert!(wide.parse::<Hash>().is_err());
    }

    /// A record with more headers than a fixed count limit would allow,
    /// which a broker accepts (about 2 bytes each on the wire), enters the
    /// chain and decodes back: a producer cannot stop ingestion with it.
    #[test]
    fn many_small_headers_enter_the_chain() {
        let stream = StreamId::new("deal-events", 0);
        let mut head = ChainHead::genesis(stream.clone());
        let many = Record {
            headers: vec![header("h", None); 100_000],
            ..record(&stream, 0)
        };
        let entry = head.append(many).unwrap();
        let bytes = encode_entry(&entry);
        assert_eq!(decode_entry(&bytes).unwrap(), entry);
    }

    /// The limits table in docs/FORMAT.md states these numbers.
    #[test]
    fn limits_match_the_format_document() {
        assert_eq!(MAX_TOPIC_LEN, 249);
        assert_eq!(MAX_KEY_BYTES, 16_777_216);
        assert_eq!(MAX_VALUE_BYTES, 16_777_216);
        assert_eq!(MAX_HEADERS, 1_864_135);
        assert_eq!(MAX_HEADER_NAME_LEN, 16_777_216);
        assert_eq!(MAX_HEADER_VALUE_BYTES, 16_777_216);
        assert_eq!(MAX_RECORD_BYTES, 16_777_216);
        assert_eq!(MAX_ENCODED_ENTRY_BYTES, 16_777_577);
        let doc = include_str!("../docs/FORMAT.md");
        assert!(doc.contains("| one stored entry | 16,777,577 bytes"));
    }

    #[test]
    fn stream_display() {
        assert_eq!(StreamId::new("deal-events", 3).to_string(), "deal-events/3");
    }

    #[test]
    fn timestamp_codes_are_stable() {
        for (t, code) in [
            (TimestampType::NotAvailable, 0),
            (TimestampType::CreateTime, 1),
            (TimestampType::LogAppendTime, 2),
        ] {
            assert_eq!(t.code(), code);
            assert_eq!(TimestampType::from_code(code), Some(t));
        }
        assert_eq!(TimestampType::from_code(3), None);
    }

    // ---- ChainHead -------------------------------------------------------

    #[test]
    fn append_builds_a_linked_chain_with_gaps() {
        let stream = StreamId::new("deal-events", 2);
        let mut head = ChainHead::genesis(stream.clone());
        assert_eq!(head.head(), genesis(&stream));
        assert_eq!((head.next_seq(), head.last_offset()), (0, None));
        let e0 = head.append(record(&stream, 10)).unwrap();
        let e1 = head.append(record(&stream, 13)).unwrap();
        assert_eq!((e0.seq, e1.seq), (0, 1));
        assert_eq!(e0.prev_hash, genesis(&stream));
        assert_eq!(e1.prev_hash, e0.hash);
        assert_eq!(head.head(), e1.hash);
        assert_eq!((head.next_seq(), head.last_offset()), (2, Some(13)));
        assert_eq!(head.stream(), &stream);
    }

    #[test]
    fn append_rejects_wrong_stream_and_backward_offsets() {
        let stream = StreamId::new("deal-events", 2);
        let mut head = ChainHead::genesis(stream.clone());
        head.append(record(&stream, 5)).unwrap();
        let before = head.clone();

        let other = StreamId::new("deal-events", 1);
        let err = head.append(record(&other, 6)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "deal-events/2 seq 1 (offset 6): record belongs to stream deal-events/1, not to this chain"
        );
        for offset in [5, 4] {
            let err = head.append(record(&stream, offset)).unwrap_err();
            assert!(matches!(
                err,
                AppendError::OffsetNotIncreasing { last_offset: 5, .. }
            ));
        }
        assert_eq!(
            head.append(record(&stream, 5)).unwrap_err().to_string(),
            "deal-events/2 seq 1 (offset 5): offset is not greater than the last appended offset 5; Kafka offsets never go back"
        );
        assert_eq!(head, before, "a refused record leaves the chain unchanged");
    }

    #[test]
    fn append_enforces_limits_and_invariants() {
        let stream = StreamId::new("deal-events", 0);
        let mut head = ChainHead::genesis(stream.clone());
        let cases: Vec<(Record, &str)> = vec![
            (
                Record {
                    offset: -1,
                    ..record(&stream, 0)
                },
                "deal-events/0 seq 0 (offset -1): field `offset` is -1; Kafka offsets are never negative",
            ),
            (
                Record {
                    timestamp_type: TimestampType::NotAvailable,
                    ..record(&stream, 0)
                },
                "deal-events/0 seq 0 (offset 0): field `timestamp_ms` is 1795000000000 but `timestamp_type` is NotAvailable; expected 0",
            ),
            (
                Record {
                    value: Some(vec![0; MAX_VALUE_BYTES + 1]),
                    ..record(&stream, 0)
                },
                "deal-events/0 seq 0 (offset 0): field `value` has length 16777217, more than the limit 16777216",
            ),
            (
                Record {
                    headers: vec![header(&"h".repeat(160), None); 100_000],
                    ..record(&stream, 0)
                },
                "deal-events/0 seq 0 (offset 0): key, value and headers total 16900018 bytes, more than MAX_RECORD_BYTES (16777216); keep the topic's max.message.bytes at or below 3 MiB (docs/FORMAT.md, \"Validity rules and limits\")",
            ),
            (
                Record {
                    headers: vec![
                        header("ok", None),
                        header(&"n".repeat(MAX_HEADER_NAME_LEN + 1), None),
                    ],
                    ..record(&stream, 0)
                },
                "deal-events/0 seq 0 (offset 0): field `headers[1].name` has length 16777217, more than the limit 16777216",
            ),
            (
                Record {
                    key: Some(vec![0; MAX_KEY_BYTES]),
                    value: Some(vec![0; 1]),
                    ..record(&stream, 0)
                },
                "deal-events/0 seq 0 (offset 0): key, value and headers total 16777217 bytes, more than MAX_RECORD_BYTES (16777216); keep the topic's max.message.bytes at or below 3 MiB (docs/FORMAT.md, \"Validity rules and limits\")",
            ),
        ];
        for (bad, message) in cases {
            assert_eq!(head.append(bad).unwrap_err().to_string(), message);
        }
        let long_topic = StreamId::new("t".repeat(MAX_TOPIC_LEN + 1), 0);
        let mut long = ChainHead::genesis(long_topic.clone());
        assert!(matches!(
            long.append(record(&long_topic, 0)),
            Err(AppendError::InvalidRecord {
                source: RecordError::FieldTooLong {
                    field: Field::Topic,
                    len: 250,
                    max: 249
                },
                ..
            })
        ));
        assert_eq!(head.next_seq(), 0);

        // Exactly at the limits is fine and round-trips through storage.
        let mut big = record(&stream, 0);
        big.topic = stream.topic.clone();
        big.key = None;
        big.value = Some(vec![7; MAX_VALUE_BYTES]);
        let entry = head.append(big).unwrap();
        assert_eq!(decode_entry(&encode_entry(&entry)).unwrap(), entry);
    }

    #[test]
    fn resume_continues_the_same_chain() {
        let stream = StreamId::new("deal-events", 4);
        let (full, entries) = build(&stream, (0..5).map(|o| record(&stream, o * 2)).collect());
        let (partial, _) = build(&stream, (0..3).map(|o| record(&stream, o * 2)).collect());
        let mut resumed = ChainHead::resume(
            stream.clone(),
            partial.next_seq(),
            partial.last_offset(),
            partial.head(),
        )
        .unwrap();
        for o in 3..5 {
            resumed.append(record(&stream, o * 2)).unwrap();
        }
        assert_eq!(resumed, full);
        verify(&stream, &entries, full.next_seq(), &full.head()).unwrap();

        assert_eq!(
            ChainHead::resume(stream.clone(), 0, None, genesis(&stream)).unwrap(),
            ChainHead::genesis(stream.clone())
        );
        assert!(matches!(
            ChainHead::resume(stream.clone(), 0, Some(3), genesis(&stream)),
            Err(ResumeError::EmptinessMismatch { .. })
        ));
        assert!(matches!(
            ChainHead::resume(stream.clone(), 2, None, full.head()),
            Err(ResumeError::EmptinessMismatch { .. })
        ));
        assert!(matches!(
            ChainHead::resume(stream.clone(), 0, None, full.head()),
            Err(ResumeError::NotGenesis { .. })
        ));
        assert_eq!(
            ChainHead::resume(stream.clone(), 1, Some(-2), full.head())
                .unwrap_err()
                .to_string(),
            "deal-events/4: persisted last_offset -2 is negative; Kafka offsets never are"
        );
    }

    // ---- decoding --------------------------------------------------------

    fn sample_entry() -> Entry {
        let stream = StreamId::new("deal-events", 3);
        let mut r = record(&stream, 0);
        r.headers = vec![header("a", Some(b"xy")), header("b", None)];
        build(&stream, vec![r]).1.remove(0)
    }

    /// Byte position of the key's presence byte in a version-1 entry.
    fn key_at(topic_len: usize) -> usize {
        1 + HASH_LEN + 8 + 4 + topic_len + 4 + 8 + 1 + 8
    }

    #[test]
    fn decode_names_field_and_byte() {
        let entry = sample_entry();
        let good = encode_entry(&entry);
        let k = key_at(entry.record.topic.len());
        assert_eq!(good[k], 1);

        // Hostile length prefix: within the limit, larger than the input.
        let mut hostile = good.clone();
        hostile[k + 1..k + 5].copy_from_slice(&1_000_000u32.to_be_bytes());
        let remain = good.len() - (k + 5);
        assert_eq!(
            decode_entry(&hostile).unwrap_err().to_string(),
            format!(
                "entry truncated in field `key` at byte {}: need 1000000 bytes, {remain} remain",
                k + 5
            )
        );
        // Length prefix beyond the limit: rejected before any allocation.
        hostile[k + 1..k + 5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode_entry(&hostile).unwrap_err(),
            DecodeEntryError::TooLong {
                field: Field::Key,
                at: k + 1,
                len: u32::MAX,
                max: MAX_KEY_BYTES
            }
        );
        // Header count beyond the limit.
        let mut many = good.clone();
        let count_at = k + (1 + 4 + 7) + (1 + 4 + 11);
        assert_eq!(&many[count_at..count_at + 4], &2u32.to_be_bytes());
        many[count_at..count_at + 4].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert!(matches!(
            decode_entry(&many),
            Err(DecodeEntryError::TooLong {
                field: Field::Headers,
                ..
            })
        ));
        // Header count within the limit but more than the input holds.
        many[count_at..count_at + 4].copy_from_slice(&1000u32.to_be_bytes());
        many.truncate(count_at + 4);
        assert_eq!(
            decode_entry(&many).unwrap_err().to_string(),
            format!(
                "entry truncated in field `headers[0].name` at byte {}: need 4 bytes, 0 remain",
                count_at + 4
            )
        );

        let mut presence = good.clone();
        presence[k] = 2;
        assert_eq!(
            decode_entry(&presence).unwrap_err().to_string(),
            format!(
                "entry field `key` at byte {k}: presence byte is 2, expected 0 (absent) or 1 (present)"
            )
        );
        let mut ts = good.clone();
        ts[k - 9] = 9;
        assert_eq!(
            decode_entry(&ts).unwrap_err(),
            DecodeEntryError::InvalidTimestampType {
                at: k - 9,
                found: 9
            }
        );
        let mut utf8 = good.clone();
        utf8[1 + HASH_LEN + 8 + 4] = 0xff;
        assert_eq!(
            decode_entry(&utf8).unwrap_err(),
            DecodeEntryError::InvalidUtf8 {
                field: Field::Topic,
                at: 1 + HASH_LEN + 8 + 4
            }
        );
        let mut version = good.clone();
        version[0] = 7;
        assert_eq!(
            decode_entry(&version).unwrap_err().to_string(),
            "entry has unknown format version 7 at byte 0; this build reads version 1"
        );
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"zz");
        assert_eq!(
            decode_entry(&trailing).unwrap_err().to_string(),
            format!(
                "entry has 2 trailing bytes after the stored hash, from byte {}",
                good.len()
            )
        );
        assert_eq!(
            decode_entry(&good[..good.len() - 1]).unwrap_err(),
            DecodeEntryError::Truncated {
                field: Field::Hash,
                at: good.len() - HASH_LEN,
                need: HASH_LEN,
                remain: HASH_LEN - 1
            }
        );
        assert_eq!(
            decode_entry(&[]).unwrap_err(),
            DecodeEntryError::Truncated {
                field: Field::Version,
                at: 0,
                need: 1,
                remain: 0
            }
        );
        assert_eq!(decode_entry(&good).unwrap(), entry);
    }

    // ---- verification ----------------------------------------------------

    #[test]
    fn chain_break_messages() {
        let stream = StreamId::new("deal-events", 2);
        let (head, mut entries) = build(&stream, (0..20).map(|o| record(&stream, o)).collect());
        entries[17].record.value = Some(b"altered".to_vec());
        let err = verify(&stream, &entries, head.next_seq(), &head.head()).unwrap_err();
        let expected = entry_hash(&entries[17].prev_hash, 17, &entries[17].record);
        assert_eq!(
            err.to_string(),
            format!(
                "deal-events/2 seq 17 (offset 17): hash mismatch: expected {}, found {} (entry bytes altered)",
                expected.short(),
                entries[17].hash.short()
            )
        );
        assert_eq!(
            *err.kind,
            BreakKind::HashMismatch {
                expected,
                found: entries[17].hash
            }
        );

        let (head, entries) = build(&stream, (0..20).map(|o| record(&stream, o)).collect());
        let err = verify(&stream, &entries[..17], head.next_seq(), &head.head()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "deal-events/2 seq 17 (end of chain): chain ends early: expected next seq 20, found 17 (3 entries missing: tail truncated)"
        );
        let mut gap = entries.clone();
        gap.remove(4);
        assert_eq!(
            verify(&stream, &gap, 20, &head.head())
                .unwrap_err()
                .to_string(),
            "deal-events/2 seq 4 (offset 5): seq gap: expected seq 4, found seq 5 (entry deleted, inserted, duplicated or reordered)"
        );
        let mut foreign = entries.clone();
        foreign[0].record.partition = 9;
        assert_eq!(
            verify(&stream, &foreign, 20, &head.head())
                .unwrap_err()
                .to_string(),
            "deal-events/2 seq 0 (offset 0): entry belongs to stream deal-events/9 (entry from another chain)"
        );
    }

    #[test]
    fn verifier_accepts_what_was_built() {
        for (stream, records) in vector_chains() {
            let (head, entries) = build(&stream, records);
            let mut verifier = ChainVerifier::new(stream.clone());
            for e in &entries {
                verifier.push(e).unwrap();
            }
            assert_eq!(verifier.head(), head.head());
            assert_eq!(verifier.next_seq(), head.next_seq());
            assert_eq!(verifier.last_offset(), head.last_offset());
            assert_eq!(verifier.stream(), &stream);
            verifier.check_head(head.next_seq(), &head.head()).unwrap();
        }
    }

    /// A verifier resumed at the head after any prefix ends where the one
    /// from genesis does, and reports a break after it exactly as that one
    /// does.
    #[test]
    fn a_resumed_verifier_checks_what_follows_like_one_from_genesis() {
        for (stream, records) in vector_chains() {
            let (_, entries) = build(&stream, records);
            let mut from_genesis = ChainVerifier::new(stream.clone());
            let mut prefix = ChainHead::genesis(stream.clone());
            for cut in 0..=entries.len() {
                let mut resumed = ChainVerifier::resume(&prefix);
                assert_eq!(resumed, from_genesis, "cut {cut}");
                for e in &entries[cut..] {
                    resumed.push(e).unwrap();
                }
                let mut all = ChainVerifier::new(stream.clone());
                for e in &entries {
                    all.push(e).unwrap();
                }
                assert_eq!(resumed, all, "cut {cut}");
                if let Some(next) = entries.get(cut) {
                    let mut damaged = next.clone();
                    damaged.record.offset += 1_000;
                    assert_eq!(
                        ChainVerifier::resume(&prefix).push(&damaged),
                        from_genesis.clone().push(&damaged),
                        "cut {cut}"
                    );
                    from_genesis.push(next).unwrap();
                    prefix.append(next.record.clone()).unwrap();
                }
            }
        }
    }

    // ---- property tests --------------------------------------------------

    fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        ("[a-zé漢-]{0,6}", proptest::option::of(arb_bytes(12)))
            .prop_map(|(name, value)| Header { name, value })
    }

    fn arb_timestamp() -> impl Strategy<Value = (TimestampType, i64)> {
        prop_oneof![
            Just((TimestampType::NotAvailable, 0)),
            any::<i64>().prop_map(|t| (TimestampType::CreateTime, t)),
            any::<i64>().prop_map(|t| (TimestampType::LogAppendTime, t)),
        ]
    }

    /// A stream and the entries of a valid chain of `len` records.
    fn arb_chain(len: std::ops::Range<usize>) -> impl Strategy<Value = (StreamId, Vec<Entry>)> {
        let stream = ("[a-z.é_-]{0,12}", 0..=i32::MAX).prop_map(|(t, p)| StreamId::new(t, p));
        let item = (
            1i64..1000,
            arb_timestamp(),
            proptest::option::of(arb_bytes(16)),
            proptest::option::of(arb_bytes(40)),
            proptest::collection::vec(arb_header(), 0..4),
        );
        (stream, 0i64..1000, proptest::collection::vec(item, len)).prop_map(
            |(stream, first, items)| {
                let mut offset = first;
                let records = items
                    .into_iter()
                    .map(
                        |(gap, (timestamp_type, timestamp_ms), key, value, headers)| {
                            offset += gap;
                            Record {
                                topic: stream.topic.clone(),
                                partition: stream.partition,
                                offset,
                                timestamp_type,
                                timestamp_ms,
                                key,
                                value,
                                headers,
                            }
                        },
                    )
                    .collect();
                let (_, entries) = build(&stream, records);
                (stream, entries)
            },
        )
    }

    /// What an attacker (or a bug) might do to stored entries.
    #[derive(Debug, Clone)]
    enum Tamper {
        Value(Index, u8),
        ToggleKey(Index),
        AddHeader(Index),
        SwapHeaders(Index),
        Timestamp(Index, i64),
        Offset(Index, i64),
        Seq(Index, u64),
        PrevHash(Index, u8),
        StoredHash(Index, u8),
        Delete(Index),
        Duplicate(Index),
        Swap(Index),
        Truncate(Index),
    }

    fn arb_tamper() -> impl Strategy<Value = Tamper> {
        let i = any::<Index>();
        prop_oneof![
            (i.clone(), any::<u8>()).prop_map(|(i, b)| Tamper::Value(i, b)),
            i.clone().prop_map(Tamper::ToggleKey),
            i.clone().prop_map(Tamper::AddHeader),
            i.clone().prop_map(Tamper::SwapHeaders),
            (i.clone(), any::<i64>()).prop_map(|(i, t)| Tamper::Timestamp(i, t)),
            (i.clone(), -3i64..3).prop_map(|(i, d)| Tamper::Offset(i, d)),
            (i.clone(), 0u64..4).prop_map(|(i, d)| Tamper::Seq(i, d)),
            (i.clone(), 1u8..=255).prop_map(|(i, m)| Tamper::PrevHash(i, m)),
            (i.clone(), 1u8..=255).prop_map(|(i, m)| Tamper::StoredHash(i, m)),
            i.clone().prop_map(Tamper::Delete),
            i.clone().prop_map(Tamper::Duplicate),
            i.clone().prop_map(Tamper::Swap),
            i.prop_map(Tamper::Truncate),
        ]
    }

    fn apply(entries: &mut Vec<Entry>, tamper: &Tamper) {
        if entries.is_empty() {
            return;
        }
        let n = entries.len();
        match tamper {
            Tamper::Value(i, b) => entries[i.index(n)]
                .record
                .value
                .get_or_insert_with(Vec::new)
                .push(*b),
            Tamper::ToggleKey(i) => {
                let key = &mut entries[i.index(n)].record.key;
                *key = match key.take() {
                    None => Some(vec![]),
                    Some(_) => None,
                };
            }
            Tamper::AddHeader(i) => entries[i.index(n)].record.headers.push(header("x", None)),
            Tamper::SwapHeaders(i) => entries[i.index(n)].record.headers.reverse(),
            Tamper::Timestamp(i, t) => entries[i.index(n)].record.timestamp_ms = *t,
            Tamper::Offset(i, d) => entries[i.index(n)].record.offset += d,
            Tamper::Seq(i, d) => {
                let seq = &mut entries[i.index(n)].seq;
                *seq = seq.wrapping_add(*d);
            }
            Tamper::PrevHash(i, m) => entries[i.index(n)].prev_hash.0[0] ^= m,
            Tamper::StoredHash(i, m) => entries[i.index(n)].hash.0[31] ^= m,
            Tamper::Delete(i) => {
                entries.remove(i.index(n));
            }
            Tamper::Duplicate(i) => {
                let i = i.index(n);
                entries.insert(i + 1, entries[i].clone());
            }
            Tamper::Swap(i) => {
                if n > 1 {
                    let i = i.index(n - 1);
                    entries.swap(i, i + 1);
                }
            }
            Tamper::Truncate(i) => entries.truncate(i.index(n)),
        }
    }

    /// Recomputes every prev hash and hash, as an attacker rewriting the store
    /// would (seq and records stay as tampered).
    fn rehash(stream: &StreamId, entries: &mut [Entry]) {
        let mut prev = genesis(stream);
        for e in entries {
            e.prev_hash = prev;
            e.hash = entry_hash(&prev, e.seq, &e.record);
            prev = e.hash;
        }
    }

    proptest! {
        #[test]
        fn prop_encode_decode_round_trip((_stream, entries) in arb_chain(0..6)) {
            for entry in &entries {
                let bytes = encode_entry(entry);
                prop_assert!(bytes.len() <= MAX_ENCODED_ENTRY_BYTES);
                let decoded = decode_entry(&bytes).unwrap();
                prop_assert_eq!(&decoded, entry);
                prop_assert_eq!(&encode_entry(&decoded), &bytes);
                // Hashing the stored bytes gives the entry hash.
                prop_assert_eq!(stored_entry_hash(&bytes), entry.hash);
                prop_assert_eq!(
                    stored_entry_hash(&bytes),
                    entry_hash(&entry.prev_hash, entry.seq, &entry.record)
                );
            }
        }

        #[test]
        fn prop_decode_arbitrary_bytes_never_panics(
            mut bytes in arb_bytes(400),
            versioned in any::<bool>(),
        ) {
            if versioned && !bytes.is_empty() {
                bytes[0] = ENTRY_FORMAT_VERSION;
            }
            if let Ok(entry) = decode_entry(&bytes) {
                // Canonical: whatever decodes re-encodes to the same bytes,
                // so the hash of its stored bytes is its entry hash.
                prop_assert_eq!(&encode_entry(&entry), &bytes);
                prop_assert_eq!(
                    stored_entry_hash(&bytes),
                    entry_hash(&entry.prev_hash, entry.seq, &entry.record)
                );
            }
        }

        #[test]
        fn prop_decode_edited_entries_never_panics(
            (_stream, entries) in arb_chain(1..2),
            edits in proptest::collection::vec((any::<Index>(), any::<u8>(), 0u8..4), 1..6),
        ) {
            let mut bytes = encode_entry(&entries[0]);
            for (at, byte, op) in edits {
                if bytes.is_empty() {
                    break;
                }
                let at = at.index(bytes.len());
                match op {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    2 => { bytes.remove(at); }
                    _ => bytes.truncate(at),
                }
            }
            if let Ok(entry) = decode_entry(&bytes) {
                prop_assert_eq!(encode_entry(&entry), bytes);
            }
        }

        #[test]
        fn prop_any_flipped_byte_is_caught_at_its_entry(
            (stream, entries) in arb_chain(1..6),
            which in any::<Index>(),
            at in any::<Index>(),
            mask in 1u8..=255,
        ) {
            let head = entries.last().unwrap().hash;
            let n = entries.len() as u64;
            let mut stored: Vec<Vec<u8>> = entries.iter().map(encode_entry).collect();
            let i = which.index(stored.len());
            let b = at.index(stored[i].len());
            stored[i][b] ^= mask;
            let mut decoded = Vec::new();
            for (j, bytes) in stored.iter().enumerate() {
                match decode_entry(bytes) {
                    Ok(entry) => decoded.push(entry),
                    Err(_) => {
                        prop_assert_eq!(j, i, "only the flipped entry may fail to decode");
                        return Ok(());
                    }
                }
            }
            let err = verify(&stream, &decoded, n, &head).unwrap_err();
            prop_assert_eq!(err.seq, i as u64, "{}", err);
            prop_assert_eq!(err.offset, Some(decoded[i].record.offset));
        }

        #[test]
        fn prop_delete_duplicate_swap_reported_at_right_seq(
            (stream, entries) in arb_chain(2..8),
            which in any::<Index>(),
            op in 0u8..3,
        ) {
            let n = entries.len();
            let head = entries[n - 1].hash;
            let mut tampered = entries.clone();
            let (i, expected_seq, found_seq) = match op {
                0 => {
                    let i = which.index(n);
                    tampered.remove(i);
                    (i, i as u64, i as u64 + 1)
                }
                1 => {
                    let i = which.index(n);
                    tampered.insert(i + 1, entries[i].clone());
                    (i, i as u64 + 1, i as u64)
                }
                _ => {
                    let i = which.index(n - 1);
                    tampered.swap(i, i + 1);
                    (i, i as u64, i as u64 + 1)
                }
            };
            let err = verify(&stream, &tampered, n as u64, &head).unwrap_err();
            prop_assert_eq!(err.seq, expected_seq, "{}", err);
            if op == 0 && i == n - 1 {
                // Deleting the last entry leaves a valid prefix: only the head check sees it.
                prop_assert_eq!(*err.kind, BreakKind::HeadSeqMismatch {
                    expected_next_seq: n as u64,
                    found_next_seq: n as u64 - 1,
                });
            } else {
                prop_assert_eq!(*err.kind, BreakKind::SeqGap {
                    expected: expected_seq,
                    found: found_seq,
                });
            }
        }

        #[test]
        fn prop_verifier_never_accepts_a_different_chain(
            (stream, entries) in arb_chain(1..6),
            tampers in proptest::collection::vec(arb_tamper(), 1..4),
            rehashed in any::<bool>(),
        ) {
            let head = entries.last().unwrap().hash;
            let n = entries.len() as u64;
            let mut tampered = entries.clone();
            for t in &tampers {
                apply(&mut tampered, t);
            }
            if rehashed {
                rehash(&stream, &mut tampered);
            }
            let result = verify(&stream, &tampered, n, &head);
            if tampered == entries {
                prop_assert!(result.is_ok());
            } else {
                prop_assert!(result.is_err(), "accepted a tampered chain: {:?}", tampers);
            }
        }
    }
}
