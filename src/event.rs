//! Deal events: the CloudEvents 1.0 envelope and the typed `data` of every deal
//! event type, decoded from bytes with errors that name the offending field.
//!
//! This is the contract with event producers. `schemas/` holds the same
//! contract as JSON Schema for producers in other languages; a test holds the
//! two against each other. Decoding is pure (no I/O, no clock) and bounded:
//! every string, list and the whole event have explicit limits ([`limits`]).
//!
//! Decoding happens in three steps, each with its own error kind:
//! 1. bytes → UTF-8 → JSON ([`DecodeError::TooLarge`], [`DecodeError::NotUtf8`],
//!    [`DecodeError::NotJson`], and [`DecodeError::TooDeep`] for nesting past
//!    [`limits::MAX_JSON_DEPTH`]);
//! 2. JSON → CloudEvents envelope ([`DecodeError::NotCloudEvent`],
//!    [`DecodeError::UnknownType`]);
//! 3. `data` → the typed payload of that event type, then the rules a single
//!    event must satisfy on its own, such as `end` after `start`
//!    ([`DecodeError::Schema`], [`DecodeError::Invalid`]).
//!
//! Every reason is cut to [`limits::MAX_REASON_CHARS`], so what the ledger
//! records about a refused event stays small whatever the producer sent.
//!
//! Rules that need the deal's history (who may accept what, and when) belong
//! to the fold in [`crate::deal`], not here.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, Utc};
use compact_str::CompactString;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

/// Explicit bounds on everything a producer controls.
pub mod limits {
    /// Largest encoded event accepted, in bytes (the whole CloudEvent JSON).
    pub const MAX_EVENT_BYTES: usize = 64 * 1024;
    /// Longest identifier (deal, party, proposal, lock, scope ids), in characters.
    pub const MAX_ID_CHARS: usize = 128;
    /// Longest CloudEvents `id`, `source` or `dataschema`, in characters.
    pub const MAX_ATTRIBUTE_CHARS: usize = 256;
    /// Longest free text (descriptions, reasons, names), in characters.
    pub const MAX_TEXT_CHARS: usize = 1024;
    /// Most entries in any list inside `data` (partners, signatories, ...).
    pub const MAX_LIST_LEN: usize = 16;
    /// Most CloudEvents extension attributes on one event.
    pub const MAX_EXTENSIONS: usize = 16;
    /// Largest amount or quantity: 2^53 - 1, so producers in languages whose
    /// numbers are doubles (JavaScript) never lose precision.
    pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;
    /// Deepest nesting of JSON arrays and objects, counting the envelope as
    /// level 1. The deepest valid event nests 4 levels (envelope, `data`,
    /// `terms`, `capacity`; or `data`, `signatories`, a signatory), so any
    /// deeper event is refused as `too_deep`, before the parser's own
    /// recursion limit (128) is ever reached.
    pub const MAX_JSON_DEPTH: usize = 8;
    /// Longest field path or reason in a [`DecodeError`](super::DecodeError),
    /// in characters. Reasons quote the offending value, which a producer
    /// controls; a longer one is cut, so a rejection recorded in the ledger
    /// never grows with hostile input.
    pub const MAX_REASON_CHARS: usize = 512;
}

/// The only CloudEvents version accepted.
pub const SPEC_VERSION: &str = "1.0";
/// The only `datacontenttype` accepted (it may also be absent).
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// Base URI of the JSON Schemas in `schemas/`; `dataschema` values point below it.
pub const SCHEMA_BASE_URI: &str = "https://schemas.dealledger.example/v1/";

// ---------------------------------------------------------------------------
// Scalars: identifiers, text, time, money.
// ---------------------------------------------------------------------------

/// An identifier of a deal, party, proposal, lock or scope: 1 to
/// [`limits::MAX_ID_CHARS`] characters of `A-Z a-z 0-9 . _ : -`, starting
/// with a letter or digit.
///
/// Held as a [`CompactString`]: 24 bytes, the characters inline when there
/// are at most 24 of them (most ids: `deal-42-0000042`, `lock-7`,
/// `google-cloud`), on the heap otherwise. The deal book, the index and the
/// timeline hold several per deal, lock and proposal, and every decoded event
/// makes a few: inline, they cost no allocation (a `Box<str>` was 16 bytes
/// plus a 16- or 32-byte allocation).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(CompactString);

impl Id {
    /// Describes the identifier rule; used in error messages and docs.
    pub const RULE: &'static str = "an identifier of 1-128 characters from A-Z a-z 0-9 . _ : -, starting with a letter or digit";

    /// Checks `s` against [`Id::RULE`].
    pub fn new(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        Self::parse(&s)
    }

    /// Checks `s` against [`Id::RULE`], copying it only when it passes
    /// (inline when short: no allocation).
    pub fn parse(s: &str) -> Result<Self, String> {
        // Every character the rule allows is ASCII, so bytes suffice: a
        // byte of a multi-byte character fails both tests.
        let mut bytes = s.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
        let rest_ok =
            bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if first_ok && rest_ok && s.len() <= limits::MAX_ID_CHARS {
            Ok(Id(CompactString::new(s)))
        } else {
            Err(format!("{s:?} is not {}", Self::RULE))
        }
    }

    /// The identifier as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Honours width and alignment (`{:<28}`), as the CLI's tables ask.
impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for Id {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Id::parse(s)
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl de::Visitor<'_> for IdVisitor {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            // Borrowed or not, the characters are checked and copied once.
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Id, E> {
                Id::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(IdVisitor)
    }
}

/// Free text (descriptions, reasons, names): 1 to [`limits::MAX_TEXT_CHARS`] characters.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(Box<str>);

impl Text {
    /// Checks that `s` is non-empty and within [`limits::MAX_TEXT_CHARS`].
    pub fn new(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        let n = s.chars().count();
        if n == 0 {
            Err("must not be empty".to_string())
        } else if n > limits::MAX_TEXT_CHARS {
            Err(format!(
                "is {n} characters long, over the limit of {}",
                limits::MAX_TEXT_CHARS
            ))
        } else {
            Ok(Text(s.into_boxed_str()))
        }
    }

    /// The text as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Honours width and alignment, as [`Id`] does.
impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Text::new(s).map_err(de::Error::custom)
    }
}

/// An instant in business time, parsed from strict RFC 3339
/// (`2025-05-20T09:30:00Z`, `2025-05-20T11:30:00.250+02:00`) and kept in UTC.
///
/// Strict means: upper-case `T` and `Z`, seconds present, an explicit offset,
/// at most 9 fraction digits. Anything else is rejected rather than guessed.
///
/// Two further rules keep every `Timestamp` writable back as the same strict
/// RFC 3339 (in UTC, with `Z`) that [`Timestamp::parse`] accepts:
/// - no leap seconds: second `60` is refused everywhere (chrono would take it
///   in any minute, and it has no place on the Unix time line);
/// - the instant's year in UTC is within 0000–9999 ([`Timestamp::MIN_YEAR`],
///   [`Timestamp::MAX_YEAR`]); `9999-12-31T23:59:59-01:00` is year 10000 in UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// Describes the accepted format; used in error messages.
    pub const RULE: &'static str = "an RFC 3339 timestamp such as 2025-05-20T09:30:00Z (upper-case T, seconds, and Z or ±HH:MM)";

    /// Earliest UTC year of a timestamp.
    pub const MIN_YEAR: i32 = 0;
    /// Latest UTC year of a timestamp.
    pub const MAX_YEAR: i32 = 9999;

    /// Parses strict RFC 3339, refusing leap seconds and instants whose UTC
    /// year is outside [`Timestamp::MIN_YEAR`]..=[`Timestamp::MAX_YEAR`].
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::parse_with(s, shaped_rfc3339_to_utc)
    }

    /// [`Timestamp::parse`], reading the instant of a string of the right
    /// shape with `read`; where it gives `None`, chrono reads it and words
    /// what is wrong. (Tests pass `|_| None` to parse with chrono alone.)
    fn parse_with(s: &str, read: impl Fn(&[u8]) -> Option<DateTime<Utc>>) -> Result<Self, String> {
        let b = s.as_bytes();
        if !has_rfc3339_shape(b) {
            return Err(format!("{s:?} is not {}", Self::RULE));
        }
        if &b[17..19] == b"60" {
            return Err(format!(
                "{s:?} has second 60: leap seconds are not accepted; use :59"
            ));
        }
        let utc = match read(b) {
            Some(utc) => utc,
            // Not a valid date, time or offset: chrono says what is wrong.
            None => DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("{s:?} is not a valid date and time: {e}"))?
                .with_timezone(&Utc),
        };
        Timestamp::in_range(utc).ok_or_else(|| {
            format!(
                "{s:?} is in the year {} in UTC, outside {:04}-{:04}: it could not be written back as an RFC 3339 timestamp in UTC",
                utc.year(),
                Self::MIN_YEAR,
                Self::MAX_YEAR
            )
        })
    }

    /// The instant `ms` milliseconds after the Unix epoch, if its UTC year is
    /// within [`Timestamp::MIN_YEAR`]..=[`Timestamp::MAX_YEAR`].
    pub fn from_unix_millis(ms: i64) -> Option<Self> {
        DateTime::from_timestamp_millis(ms).and_then(Timestamp::in_range)
    }

    /// `t` as a timestamp, if its year is in range.
    fn in_range(t: DateTime<Utc>) -> Option<Self> {
        (Self::MIN_YEAR..=Self::MAX_YEAR)
            .contains(&t.year())
            .then_some(Timestamp(t))
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(&self) -> i64 {
        self.0.timestamp_millis()
    }

    /// Microseconds since the Unix epoch (exact to the microsecond; every
    /// year 0000-9999 fits).
    pub fn unix_micros(&self) -> i64 {
        self.0.timestamp_micros()
    }

    /// The instant `us` microseconds after the Unix epoch, if its UTC year
    /// is within [`Timestamp::MIN_YEAR`]..=[`Timestamp::MAX_YEAR`].
    pub fn from_unix_micros(us: i64) -> Option<Self> {
        DateTime::from_timestamp_micros(us).and_then(Timestamp::in_range)
    }

    /// Whole seconds since the Unix epoch and the nanoseconds past them:
    /// the instant exactly ([`Timestamp::from_unix_parts`] reads it back).
    pub fn unix_parts(&self) -> (i64, u32) {
        (self.0.timestamp(), self.0.timestamp_subsec_nanos())
    }

    /// The instant `secs` seconds and `nanos` nanoseconds (below 10^9)
    /// after the Unix epoch, if its UTC year is within
    /// [`Timestamp::MIN_YEAR`]..=[`Timestamp::MAX_YEAR`].
    pub fn from_unix_parts(secs: i64, nanos: u32) -> Option<Self> {
        if nanos >= 1_000_000_000 {
            return None;
        }
        DateTime::from_timestamp(secs, nanos).and_then(Timestamp::in_range)
    }

    /// The underlying chrono value.
    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)`, checked byte by byte.
fn has_rfc3339_shape(b: &[u8]) -> bool {
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(digits(0..4)
        && at(4, b'-')
        && digits(5..7)
        && at(7, b'-')
        && digits(8..10)
        && at(10, b'T')
        && digits(11..13)
        && at(13, b':')
        && digits(14..16)
        && at(16, b':')
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if at(i, b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start || i - start > 9 {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z') => i + 1 == b.len(),
        Some(b'+') | Some(b'-') => {
            b.len() == i + 6 && digits(i + 1..i + 3) && at(i + 3, b':') && digits(i + 4..i + 6)
        }
        _ => false,
    }
}

/// The instant a string of [`has_rfc3339_shape`] names, read straight from
/// its digits, or `None` if its date, time or offset is out of range (month
/// 13, February 30, hour 24, minute 60, an offset of a day or more...).
/// `Some` only where chrono's `DateTime::parse_from_rfc3339` gives the same
/// instant (a property test holds it to that); three to four times faster,
/// which matters: every event has two or three timestamps.
fn shaped_rfc3339_to_utc(b: &[u8]) -> Option<DateTime<Utc>> {
    debug_assert!(has_rfc3339_shape(b));
    let two = |i: usize| u32::from(b[i] - b'0') * 10 + u32::from(b[i + 1] - b'0');
    let year = i32::try_from(two(0) * 100 + two(2)).ok()?;
    let date = NaiveDate::from_ymd_opt(year, two(5), two(8))?;
    let mut i = 19;
    let mut nanos = 0u32;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while b[i].is_ascii_digit() {
            nanos = nanos * 10 + u32::from(b[i] - b'0');
            i += 1;
        }
        nanos *= 10u32.pow((9 - (i - start)) as u32);
    }
    let (hour, minute, second) = (two(11), two(14), two(17));
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let time = chrono::NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    let offset_seconds = match b[i] {
        b'Z' => 0,
        sign => {
            let (hours, minutes) = (two(i + 1), two(i + 4));
            if minutes > 59 {
                return None;
            }
            let seconds = i32::try_from(hours * 3600 + minutes * 60).ok()?;
            if sign == b'-' { -seconds } else { seconds }
        }
    };
    let offset = chrono::FixedOffset::east_opt(offset_seconds)?;
    let utc = date.and_time(time).checked_sub_offset(offset)?;
    Some(DateTime::from_naive_utc_and_offset(utc, Utc))
}

/// Honours width and alignment, as [`Id`] does.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Timestamp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Timestamp::parse(s)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(Timestamp::RULE)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Timestamp, E> {
                Timestamp::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A calendar date, strictly `YYYY-MM-DD`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date(NaiveDate);

impl Date {
    /// Parses strict `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let b = s.as_bytes();
        let shape = b.len() == 10
            && b[4] == b'-'
            && b[7] == b'-'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
        if !shape {
            return Err(format!("{s:?} is not a date of the form YYYY-MM-DD"));
        }
        NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map(Date)
            .map_err(|e| format!("{s:?} is not a valid date: {e}"))
    }

    /// Midnight UTC at the start of this date.
    pub fn start(&self) -> Timestamp {
        Timestamp(
            self.0
                .and_hms_opt(0, 0, 0)
                .expect("midnight exists")
                .and_utc(),
        )
    }
}

/// Honours width and alignment, as [`Id`] does.
impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0.format("%Y-%m-%d").to_string())
    }
}

impl fmt::Debug for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Date::parse(&s).map_err(de::Error::custom)
    }
}

/// A whole, non-negative number no larger than [`limits::MAX_SAFE_INTEGER`]:
/// money in minor units, capacity quantities. Never a float.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct Amount(u64);

impl Amount {
    /// Checks the upper bound.
    pub fn new(n: u64) -> Result<Self, String> {
        if n > limits::MAX_SAFE_INTEGER {
            Err(format!(
                "{n} is over the limit of {} (2^53 - 1)",
                limits::MAX_SAFE_INTEGER
            ))
        } else {
            Ok(Amount(n))
        }
    }

    /// The value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number from 0 to 2^53 - 1")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Amount, E> {
                Amount::new(n).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Amount, E> {
                if n < 0 {
                    Err(E::custom(format!("{n} is negative; must be 0 or more")))
                } else {
                    self.visit_u64(n as u64)
                }
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Amount, E> {
                Err(E::custom(format!(
                    "{n} is not a whole number; amounts are integers (money in minor units, e.g. cents)"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// An ISO 4217 currency code: three upper-case letters such as `USD`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Checks the three-upper-case-letters shape.
    pub fn new(s: &str) -> Result<Self, String> {
        match s.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => {
                Ok(Currency([*a, *b, *c]))
            }
            _ => Err(format!(
                "{s:?} is not an ISO 4217 currency code (three upper-case letters, e.g. USD)"
            )),
        }
    }

    /// The code as a string slice.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("checked ASCII at construction")
    }
}

/// Honours width and alignment, as [`Id`] does.
impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Currency::new(&s).map_err(de::Error::custom)
    }
}

/// A list of at most [`limits::MAX_LIST_LEN`] items, checked while decoding
/// so a hostile list is refused before it is fully materialised.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(transparent)]
pub struct BoundedList<T>(Vec<T>);

impl<T> BoundedList<T> {
    /// Checks the length bound.
    pub fn new(items: Vec<T>) -> Result<Self, String> {
        if items.len() > limits::MAX_LIST_LEN {
            Err(format!(
                "has {} items, over the limit of {}",
                items.len(),
                limits::MAX_LIST_LEN
            ))
        } else {
            Ok(BoundedList(items))
        }
    }

    /// The items.
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }
}

impl<T> Default for BoundedList<T> {
    fn default() -> Self {
        BoundedList(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for BoundedList<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = BoundedList<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {} items", limits::MAX_LIST_LEN)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == limits::MAX_LIST_LEN {
                        return Err(de::Error::custom(format!(
                            "has more than {} items",
                            limits::MAX_LIST_LEN
                        )));
                    }
                    items.push(item);
                }
                Ok(BoundedList(items))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// Why an optional field given as `null` is refused.
const NULL_OPTIONAL: &str =
    "is null; an optional field is either left out or given a value, never null";

/// `deserialize_with` for an optional field that has a default: reached only
/// when the field is present, so `null` is refused instead of read as absent.
/// With `#[serde(default)]`, a field left out still gets its default.
fn not_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Option::<T>::deserialize(d)?.ok_or_else(|| de::Error::custom(NULL_OPTIONAL))
}

/// `deserialize_with` for an `Option` field: present means `Some(value)`;
/// `null` is refused (see [`not_null`]). Pair with `#[serde(default)]`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    not_null(d).map(Some)
}

// ---------------------------------------------------------------------------
// The data of each event type.
// ---------------------------------------------------------------------------

/// A unit in which capacity is sold.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum CapacityUnit {
    /// GPU hours.
    #[serde(rename = "gpu-hours")]
    GpuHours,
    /// Dedicated GPUs.
    #[serde(rename = "gpus")]
    Gpus,
    /// Dedicated TPU chips.
    #[serde(rename = "tpu-chips")]
    TpuChips,
    /// TPU chip hours.
    #[serde(rename = "tpu-hours")]
    TpuHours,
    /// Virtual CPU hours.
    #[serde(rename = "vcpu-hours")]
    VcpuHours,
    /// Data-centre power, megawatts.
    #[serde(rename = "MW")]
    Megawatts,
    /// Data-centre power, gigawatts.
    #[serde(rename = "GW")]
    Gigawatts,
}

/// How much capacity a deal covers.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// How many units; at least 1.
    pub quantity: Amount,
    /// The unit.
    pub unit: CapacityUnit,
}

/// An amount of money in integer minor units (cents for USD): never a float.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Money {
    /// Minor units of `currency`.
    pub amount_minor: Amount,
    /// ISO 4217 code.
    pub currency: Currency,
}

/// The commercial terms of a proposal, counter-proposal or amendment.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terms {
    /// Capacity sold.
    pub capacity: Capacity,
    /// Total contract value.
    pub price: Money,
    /// When the capacity becomes available.
    pub start: Timestamp,
    /// When it ends; strictly after `start`.
    pub end: Timestamp,
}

/// Whether a lock forbids dealing with others or only gives first refusal.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum LockKind {
    /// The bound party may not deal with anyone else in the scope.
    #[serde(rename = "exclusive")]
    Exclusive,
    /// The holder must be offered any deal in the scope first.
    #[serde(rename = "right-of-first-refusal")]
    RightOfFirstRefusal,
}

impl LockKind {
    /// The kind as events and answers spell it: `exclusive` or
    /// `right-of-first-refusal`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::Exclusive => "exclusive",
            LockKind::RightOfFirstRefusal => "right-of-first-refusal",
        }
    }
}

/// Honours width and alignment, as [`Id`] does.
impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// `deal.negotiation.opened`: the first event of every deal.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NegotiationOpened {
    /// The party buying capacity.
    pub customer: Id,
    /// The party selling it.
    pub provider: Id,
    /// Further parties to a multi-party deal (e.g. a joint venture's investors).
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "BoundedList::is_empty"
    )]
    pub partners: BoundedList<Id>,
    /// What the deal is about, as a comparable identifier (e.g. `cloud-compute`);
    /// exclusivity locks name the same scopes.
    pub scope: Id,
    /// Human description.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<Text>,
}

impl<T> BoundedList<T> {
    /// True when the list has no items.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `deal.terms.proposed`: a party puts terms on the table.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermsProposed {
    /// Identifier of this proposal, unique within the deal.
    pub proposal_id: Id,
    /// The party proposing.
    pub proposer: Id,
    /// The terms.
    pub terms: Terms,
}

/// `deal.terms.countered`: a party answers a proposal with new terms,
/// superseding it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermsCountered {
    /// Identifier of the counter-proposal, unique within the deal.
    pub proposal_id: Id,
    /// The proposal being countered.
    pub counters: Id,
    /// The party countering.
    pub proposer: Id,
    /// The new terms.
    pub terms: Terms,
}

/// `deal.terms.accepted`: a party accepts another party's open proposal.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermsAccepted {
    /// The proposal accepted.
    pub proposal_id: Id,
    /// The accepting party.
    pub accepted_by: Id,
}

/// `deal.terms.rejected`: a party turns down another party's open proposal.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TermsRejected {
    /// The proposal rejected.
    pub proposal_id: Id,
    /// The rejecting party.
    pub rejected_by: Id,
    /// Why.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub reason: Option<Text>,
}

/// `deal.exclusivity.granted`: the deal gives `holder` a lock over `bound_party`
/// in `scope`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExclusivityGranted {
    /// Identifier of the lock, unique within the deal.
    pub lock_id: Id,
    /// The party holding the lock.
    pub holder: Id,
    /// The party it binds; different from `holder`.
    pub bound_party: Id,
    /// What it covers (compared with deals' `scope`).
    pub scope: Id,
    /// Exclusive or right of first refusal.
    pub kind: LockKind,
    /// Start of validity (business time).
    pub valid_from: Timestamp,
    /// End of validity, if fixed; strictly after `valid_from`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_until: Option<Timestamp>,
}

/// `deal.exclusivity.released`: an active lock of this deal ends.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExclusivityReleased {
    /// The lock released.
    pub lock_id: Id,
    /// Why.
    pub reason: Text,
}

/// Someone who signed a finalized deal on behalf of a party.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signatory {
    /// The party signed for.
    pub party: Id,
    /// The person's name.
    pub name: Text,
    /// Their title, if given.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub title: Option<Text>,
}

/// `deal.finalized`: the deal is signed on an accepted proposal.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finalized {
    /// The accepted proposal the deal is signed on.
    pub proposal_id: Id,
    /// Who signed; at least one.
    pub signatories: BoundedList<Signatory>,
    /// When the contract takes effect.
    pub effective_date: Date,
    /// The terms as signed, if the producer states them (compliance compares
    /// them with the accepted proposal).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub terms: Option<Terms>,
}

/// `deal.amended`: a finalized deal's terms change.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amended {
    /// Identifier of the amendment, unique within the deal.
    pub amendment_id: Id,
    /// The new terms.
    pub terms: Terms,
    /// The parties that agreed to it; at least one.
    pub agreed_by: BoundedList<Id>,
    /// Why.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub reason: Option<Text>,
}

/// `deal.terminated`: the deal (or its negotiation) ends for good.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terminated {
    /// The party ending it.
    pub terminated_by: Id,
    /// Why.
    pub reason: Text,
}

// ---------------------------------------------------------------------------
// Event types and the decoded event.
// ---------------------------------------------------------------------------

/// Every deal event type, with its CloudEvents `type` string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum EventType {
    /// `deal.negotiation.opened`
    NegotiationOpened,
    /// `deal.terms.proposed`
    TermsProposed,
    /// `deal.terms.countered`
    TermsCountered,
    /// `deal.terms.accepted`
    TermsAccepted,
    /// `deal.terms.rejected`
    TermsRejected,
    /// `deal.exclusivity.granted`
    ExclusivityGranted,
    /// `deal.exclusivity.released`
    ExclusivityReleased,
    /// `deal.finalized`
    Finalized,
    /// `deal.amended`
    Amended,
    /// `deal.terminated`
    Terminated,
}

impl EventType {
    /// All types, in lifecycle order.
    pub const ALL: [EventType; 10] = [
        EventType::NegotiationOpened,
        EventType::TermsProposed,
        EventType::TermsCountered,
        EventType::TermsAccepted,
        EventType::TermsRejected,
        EventType::ExclusivityGranted,
        EventType::ExclusivityReleased,
        EventType::Finalized,
        EventType::Amended,
        EventType::Terminated,
    ];

    /// The CloudEvents `type` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::NegotiationOpened => "deal.negotiation.opened",
            EventType::TermsProposed => "deal.terms.proposed",
            EventType::TermsCountered => "deal.terms.countered",
            EventType::TermsAccepted => "deal.terms.accepted",
            EventType::TermsRejected => "deal.terms.rejected",
            EventType::ExclusivityGranted => "deal.exclusivity.granted",
            EventType::ExclusivityReleased => "deal.exclusivity.released",
            EventType::Finalized => "deal.finalized",
            EventType::Amended => "deal.amended",
            EventType::Terminated => "deal.terminated",
        }
    }

    /// The type for a CloudEvents `type` attribute, if it is a deal event type.
    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The `dataschema` URI of this type's data schema in `schemas/`.
    pub fn schema_uri(self) -> String {
        format!("{SCHEMA_BASE_URI}data/{}.schema.json", self.as_str())
    }
}

/// Honours width and alignment, as [`Id`] does.
impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The typed `data` of a deal event.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(untagged)]
pub enum Payload {
    /// `deal.negotiation.opened`
    NegotiationOpened(NegotiationOpened),
    /// `deal.terms.proposed`
    TermsProposed(TermsProposed),
    /// `deal.terms.countered`
    TermsCountered(TermsCountered),
    /// `deal.terms.accepted`
    TermsAccepted(TermsAccepted),
    /// `deal.terms.rejected`
    TermsRejected(TermsRejected),
    /// `deal.exclusivity.granted`
    ExclusivityGranted(ExclusivityGranted),
    /// `deal.exclusivity.released`
    ExclusivityReleased(ExclusivityReleased),
    /// `deal.finalized`
    Finalized(Finalized),
    /// `deal.amended`
    Amended(Amended),
    /// `deal.terminated`
    Terminated(Terminated),
}

impl Payload {
    /// The event type this payload belongs to.
    pub fn event_type(&self) -> EventType {
        match self {
            Payload::NegotiationOpened(_) => EventType::NegotiationOpened,
            Payload::TermsProposed(_) => EventType::TermsProposed,
            Payload::TermsCountered(_) => EventType::TermsCountered,
            Payload::TermsAccepted(_) => EventType::TermsAccepted,
            Payload::TermsRejected(_) => EventType::TermsRejected,
            Payload::ExclusivityGranted(_) => EventType::ExclusivityGranted,
            Payload::ExclusivityReleased(_) => EventType::ExclusivityReleased,
            Payload::Finalized(_) => EventType::Finalized,
            Payload::Amended(_) => EventType::Amended,
            Payload::Terminated(_) => EventType::Terminated,
        }
    }

    /// Decodes `data` JSON as the payload of `event_type`.
    fn decode(event_type: EventType, data: &str) -> Result<Payload, DecodeError> {
        // Fast path without path tracking; only a failure pays for the
        // second, tracked parse that names the field.
        let mut de = serde_json::Deserializer::from_str(data);
        if let Ok(payload) = Payload::deserialize_inline(event_type, &mut de)
            && de.end().is_ok()
        {
            return Ok(payload);
        }
        let mut de = serde_json::Deserializer::from_str(data);
        let mut track = serde_path_to_error::Track::new();
        let tracked = serde_path_to_error::Deserializer::new(&mut de, &mut track);
        let error = match Payload::deserialize_inline(event_type, tracked) {
            Ok(payload) => return Ok(payload),
            Err(error) => error,
        };
        let path = join_path("data", &track.path().to_string());
        let message = clean_serde_message(&error.to_string());
        // serde reports a missing field at its parent; name the field itself.
        Err(
            match message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
            {
                Some(field) => DecodeError::Schema {
                    path: format!("{path}.{field}"),
                    reason: "missing (required)".into(),
                },
                None => DecodeError::Schema {
                    path,
                    reason: message,
                },
            },
        )
    }

    /// Deserializes `data` as the payload of `event_type` from `d` (the
    /// envelope's deserializer, or one over `data` alone), refusing anything
    /// but a JSON object (the derived struct impls would also take an
    /// array). Errors name no field unless `d` tracks the path.
    fn deserialize_inline<'de, D: Deserializer<'de>>(
        event_type: EventType,
        d: D,
    ) -> Result<Payload, D::Error> {
        let d = ObjectOnly(d);
        Ok(match event_type {
            EventType::NegotiationOpened => {
                Payload::NegotiationOpened(Deserialize::deserialize(d)?)
            }
            EventType::TermsProposed => Payload::TermsProposed(Deserialize::deserialize(d)?),
            EventType::TermsCountered => Payload::TermsCountered(Deserialize::deserialize(d)?),
            EventType::TermsAccepted => Payload::TermsAccepted(Deserialize::deserialize(d)?),
            EventType::TermsRejected => Payload::TermsRejected(Deserialize::deserialize(d)?),
            EventType::ExclusivityGranted => {
                Payload::ExclusivityGranted(Deserialize::deserialize(d)?)
            }
            EventType::ExclusivityReleased => {
                Payload::ExclusivityReleased(Deserialize::deserialize(d)?)
            }
            EventType::Finalized => Payload::Finalized(Deserialize::deserialize(d)?),
            EventType::Amended => Payload::Amended(Deserialize::deserialize(d)?),
            EventType::Terminated => Payload::Terminated(Deserialize::deserialize(d)?),
        })
    }

    /// The rules a payload must satisfy on its own (beyond its schema).
    fn validate(&self) -> Result<(), DecodeError> {
        let invalid = |path: &str, reason: String| {
            Err(DecodeError::Invalid {
                path: path.to_string(),
                reason,
            })
        };
        match self {
            Payload::NegotiationOpened(p) => {
                let mut seen = vec![&p.customer, &p.provider];
                if p.customer == p.provider {
                    return invalid(
                        "data.provider",
                        format!(
                            "{} is also the customer; a deal needs two different parties",
                            p.provider
                        ),
                    );
                }
                for (i, partner) in p.partners.as_slice().iter().enumerate() {
                    if seen.contains(&partner) {
                        return invalid(
                            &format!("data.partners[{i}]"),
                            format!("{partner} is named twice among the deal's parties"),
                        );
                    }
                    seen.push(partner);
                }
                Ok(())
            }
            Payload::TermsProposed(p) => validate_terms("data.terms", &p.terms),
            Payload::TermsCountered(p) => {
                if p.proposal_id == p.counters {
                    return invalid(
                        "data.counters",
                        format!("a proposal cannot counter itself ({})", p.counters),
                    );
                }
                validate_terms("data.terms", &p.terms)
            }
            Payload::ExclusivityGranted(g) => {
                if g.holder == g.bound_party {
                    return invalid(
                        "data.bound_party",
                        format!("{} cannot hold a lock over itself", g.holder),
                    );
                }
                if let Some(until) = g.valid_until
                    && until <= g.valid_from
                {
                    return invalid(
                        "data.valid_until",
                        format!("{until} is not after valid_from {}", g.valid_from),
                    );
                }
                Ok(())
            }
            Payload::Finalized(f) => {
                if f.signatories.is_empty() {
                    return invalid("data.signatories", "needs at least one signatory".into());
                }
                match &f.terms {
                    Some(t) => validate_terms("data.terms", t),
                    None => Ok(()),
                }
            }
            Payload::Amended(a) => {
                if a.agreed_by.is_empty() {
                    return invalid("data.agreed_by", "needs at least one party".into());
                }
                validate_terms("data.terms", &a.terms)
            }
            Payload::TermsAccepted(_)
            | Payload::TermsRejected(_)
            | Payload::ExclusivityReleased(_)
            | Payload::Terminated(_) => Ok(()),
        }
    }
}

fn validate_terms(path: &str, t: &Terms) -> Result<(), DecodeError> {
    if t.capacity.quantity.get() == 0 {
        return Err(DecodeError::Invalid {
            path: format!("{path}.capacity.quantity"),
            reason: "must be at least 1".into(),
        });
    }
    if t.end <= t.start {
        return Err(DecodeError::Invalid {
            path: format!("{path}.end"),
            reason: format!("{} is not after start {}", t.end, t.start),
        });
    }
    Ok(())
}

/// A CloudEvents extension attribute value (string, integer or boolean).
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(untagged)]
pub enum ExtensionValue {
    /// A string.
    String(String),
    /// An integer.
    Integer(i64),
    /// A boolean.
    Boolean(bool),
}

/// A decoded, validated deal event: the CloudEvents envelope with typed data.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DealEvent {
    /// CloudEvents `id`; with `source` it identifies the event (duplicates share both).
    pub id: String,
    /// CloudEvents `source`: the producer.
    pub source: String,
    /// CloudEvents `subject`: the deal this event belongs to.
    pub deal_id: Id,
    /// CloudEvents `time`: business time, when it happened in the world.
    pub time: Timestamp,
    /// CloudEvents `dataschema`, if given.
    pub dataschema: Option<String>,
    /// Extension attributes, in the order received.
    pub extensions: Vec<(String, ExtensionValue)>,
    /// The typed data.
    pub payload: Payload,
}

impl DealEvent {
    /// A new event with `dataschema` pointing at this type's schema and no extensions.
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        deal_id: Id,
        time: Timestamp,
        payload: Payload,
    ) -> Self {
        let dataschema = Some(payload.event_type().schema_uri());
        DealEvent {
            id: id.into(),
            source: source.into(),
            deal_id,
            time,
            dataschema,
            extensions: Vec::new(),
            payload,
        }
    }

    /// The event type.
    pub fn event_type(&self) -> EventType {
        self.payload.event_type()
    }

    /// Decodes and validates one encoded CloudEvent (JSON structured mode).
    pub fn decode(bytes: &[u8]) -> Result<DealEvent, DecodeError> {
        Self::decode_with(bytes, EnvelopeSeed { inline_data: true })
    }

    /// [`DealEvent::decode`], trying `first` before the slower parses: the
    /// result must not depend on it (tested).
    fn decode_with(bytes: &[u8], first: EnvelopeSeed) -> Result<DealEvent, DecodeError> {
        if bytes.len() > limits::MAX_EVENT_BYTES {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit: limits::MAX_EVENT_BYTES,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::NotUtf8 {
            byte: e.valid_up_to(),
        })?;
        let decoded = parse_envelope(text, first).and_then(|raw| {
            let event = raw.into_event()?;
            event.payload.validate()?;
            Ok(event)
        });
        match decoded {
            Ok(event) => {
                // No accepted event nests deeper than the limit (the schema is
                // closed and 4 levels deep), so the depth is measured only for
                // a refused one; tests and fuzzing check the claim here.
                debug_assert!(too_deep(bytes, limits::MAX_JSON_DEPTH).is_none());
                Ok(event)
            }
            Err(error) => Err(match too_deep(bytes, limits::MAX_JSON_DEPTH) {
                Some(at) => DecodeError::TooDeep {
                    at,
                    limit: limits::MAX_JSON_DEPTH,
                },
                None => error.bounded(),
            }),
        }
    }

    /// Encodes as a CloudEvents JSON structured-mode document.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Out<'a> {
            specversion: &'static str,
            id: &'a str,
            source: &'a str,
            #[serde(rename = "type")]
            event_type: &'static str,
            subject: &'a Id,
            time: Timestamp,
            datacontenttype: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            dataschema: Option<&'a str>,
            data: &'a Payload,
            #[serde(flatten)]
            extensions: Extensions<'a>,
        }
        /// Extension attributes serialized as map entries, in received order.
        struct Extensions<'a>(&'a [(String, ExtensionValue)]);
        impl Serialize for Extensions<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
            }
        }
        let out = Out {
            specversion: SPEC_VERSION,
            id: &self.id,
            source: &self.source,
            event_type: self.event_type().as_str(),
            subject: &self.deal_id,
            time: self.time,
            datacontenttype: DATA_CONTENT_TYPE,
            dataschema: self.dataschema.as_deref(),
            data: &self.payload,
            extensions: Extensions(&self.extensions),
        };
        serde_json::to_vec(&out).expect("deal events always serialize")
    }
}

/// Why bytes are not a valid deal event. Every variant names where the
/// problem is; [`DecodeError::kind`] gives a stable code for metrics.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum DecodeError {
    /// The encoded event is larger than [`limits::MAX_EVENT_BYTES`].
    #[error("event is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Arrays and objects nest deeper than [`limits::MAX_JSON_DEPTH`].
    #[error(
        "event nests arrays and objects more than {limit} levels deep (from byte {at}); no deal event nests more than 4"
    )]
    TooDeep {
        /// Byte offset of the `[` or `{` that opens level `limit + 1`.
        at: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not UTF-8.
    #[error("event is not UTF-8: invalid byte at offset {byte}")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        byte: usize,
    },
    /// The text is not JSON.
    #[error("event is not JSON: {reason}")]
    NotJson {
        /// The parser's message, with line and column.
        reason: String,
    },
    /// JSON, but not a CloudEvents 1.0 envelope this ledger accepts.
    #[error("field {path}: {reason}")]
    NotCloudEvent {
        /// The envelope attribute at fault.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A CloudEvent whose `type` is not a deal event type.
    #[error("field type: unknown event type {event_type:?}; expected one of {}", EventType::ALL.map(EventType::as_str).join(", "))]
    UnknownType {
        /// The type received.
        event_type: String,
    },
    /// `data` does not match its type's schema.
    #[error("field {path}: {reason}")]
    Schema {
        /// Path of the field in the event, e.g. `data.terms.price.amount_minor`.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Matches the schema but breaks a rule of a single event (e.g. `end` before `start`).
    #[error("field {path}: {reason}")]
    Invalid {
        /// Path of the field in the event.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl DecodeError {
    /// A stable, short code for metrics and machine consumers.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::TooDeep { .. } => "too_deep",
            DecodeError::NotUtf8 { .. } => "not_utf8",
            DecodeError::NotJson { .. } => "not_json",
            DecodeError::NotCloudEvent { .. } => "not_cloudevent",
            DecodeError::UnknownType { .. } => "unknown_type",
            DecodeError::Schema { .. } => "schema",
            DecodeError::Invalid { .. } => "invalid",
        }
    }

    /// The field path at fault, when there is one.
    pub fn path(&self) -> Option<&str> {
        match self {
            DecodeError::NotCloudEvent { path, .. }
            | DecodeError::Schema { path, .. }
            | DecodeError::Invalid { path, .. } => Some(path),
            DecodeError::UnknownType { .. } => Some("type"),
            _ => None,
        }
    }
}

impl DecodeError {
    /// The same error with every producer-controlled string (path, reason,
    /// type) cut to [`limits::MAX_REASON_CHARS`].
    fn bounded(self) -> Self {
        match self {
            DecodeError::NotJson { reason } => DecodeError::NotJson {
                reason: cut(reason),
            },
            DecodeError::NotCloudEvent { path, reason } => DecodeError::NotCloudEvent {
                path: cut(path),
                reason: cut(reason),
            },
            DecodeError::UnknownType { event_type } => DecodeError::UnknownType {
                event_type: cut(event_type),
            },
            DecodeError::Schema { path, reason } => DecodeError::Schema {
                path: cut(path),
                reason: cut(reason),
            },
            DecodeError::Invalid { path, reason } => DecodeError::Invalid {
                path: cut(path),
                reason: cut(reason),
            },
            other @ (DecodeError::TooLarge { .. }
            | DecodeError::TooDeep { .. }
            | DecodeError::NotUtf8 { .. }) => other,
        }
    }
}

/// `s` if it has at most [`limits::MAX_REASON_CHARS`] characters; otherwise
/// its beginning and how long it was, within the limit.
fn cut(s: String) -> String {
    let Some((end, _)) = s.char_indices().nth(limits::MAX_REASON_CHARS) else {
        return s;
    };
    let total = s.chars().count();
    let note = format!("… (cut; {total} characters in all)");
    let keep = limits::MAX_REASON_CHARS - note.chars().count();
    let end = s.char_indices().nth(keep).map_or(end, |(i, _)| i);
    format!("{}{note}", &s[..end])
}

/// Byte offset of the `[` or `{` that opens nesting level `limit + 1` in
/// JSON text, if any (brackets inside strings do not count). A linear scan
/// with no allocation; it also works on text that is not valid JSON.
fn too_deep(bytes: &[u8], limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// `data` + `.` + `rest`, where serde_path_to_error writes the root as `.`.
fn join_path(prefix: &str, rest: &str) -> String {
    if rest == "." || rest.is_empty() {
        prefix.to_string()
    } else if rest.starts_with('[') {
        format!("{prefix}{rest}")
    } else {
        format!("{prefix}.{rest}")
    }
}

/// serde_json appends " at line L column C" to messages; inside an event the
/// field path is more useful, so it is dropped.
fn clean_serde_message(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(" column ") => msg[..i].to_string(),
        _ => msg.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Envelope parsing.
// ---------------------------------------------------------------------------

/// The envelope as parsed, before the required attributes are checked.
/// Attributes that only get checked borrow from the input when they can;
/// those kept in the event are owned.
#[derive(Default)]
struct RawEnvelope<'a> {
    specversion: Option<Cow<'a, str>>,
    id: Option<String>,
    source: Option<String>,
    event_type: Option<Cow<'a, str>>,
    subject: Option<Cow<'a, str>>,
    time: Option<Cow<'a, str>>,
    datacontenttype: Option<Cow<'a, str>>,
    dataschema: Option<String>,
    /// `data` as written, when it was not decoded while parsing.
    data: Option<&'a RawValue>,
    /// `data` decoded while parsing ([`EnvelopeSeed::inline_data`]).
    payload: Option<Payload>,
    extensions: Vec<(String, ExtensionValue)>,
}

fn parse_envelope(text: &str, first: EnvelopeSeed) -> Result<RawEnvelope<'_>, DecodeError> {
    // Fastest path, taken by valid events: one untracked parse that decodes
    // `data` as the type's payload on the way (when `type` comes first, as
    // producers write it). Any failure, whatever its cause, falls back to the
    // paths below, which decide as if this one had not been tried: it only
    // succeeds where they would, with the same payload (see `into_event`).
    let mut de = serde_json::Deserializer::from_str(text);
    if first.inline_data
        && let Ok(envelope) = first.deserialize(&mut de)
        && de.end().is_ok()
    {
        return Ok(envelope);
    }
    // Fast path: one untracked parse keeping `data` as text. Only on failure
    // do we work out whether the text is JSON at all ("not JSON" vs "not a
    // CloudEvent") and, with a second, path-tracking parse, which attribute
    // is at fault.
    if let Ok(envelope) = serde_json::from_str(text) {
        return Ok(envelope);
    }
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(DecodeError::NotJson {
            reason: e.to_string(),
        });
    }
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        DecodeError::NotCloudEvent {
            path: if path == "." { "(event)".into() } else { path },
            reason: clean_serde_message(&e.inner().to_string()),
        }
    })
}

impl<'a> RawEnvelope<'a> {
    fn into_event(self) -> Result<DealEvent, DecodeError> {
        fn required<T>(v: Option<T>, name: &str) -> Result<T, DecodeError> {
            v.ok_or_else(|| DecodeError::NotCloudEvent {
                path: name.to_string(),
                reason: "missing (a required CloudEvents attribute)".into(),
            })
        }
        fn attribute(v: String, name: &str) -> Result<String, DecodeError> {
            if !is_attribute_value(&v) {
                return Err(DecodeError::NotCloudEvent {
                    path: name.to_string(),
                    reason: format!(
                        "must be 1-{} characters without spaces",
                        limits::MAX_ATTRIBUTE_CHARS
                    ),
                });
            }
            Ok(v)
        }
        let bad = |path: &str, reason: String| DecodeError::NotCloudEvent {
            path: path.to_string(),
            reason,
        };

        let specversion = required(self.specversion, "specversion")?;
        if specversion != SPEC_VERSION {
            return Err(bad(
                "specversion",
                format!("{specversion:?} is not supported; expected \"{SPEC_VERSION}\""),
            ));
        }
        let id = attribute(required(self.id, "id")?, "id")?;
        let source = attribute(required(self.source, "source")?, "source")?;
        let type_name = required(self.event_type, "type")?;
        let subject = required(self.subject, "subject")?;
        let deal_id = Id::parse(&subject).map_err(|e| bad("subject", e))?;
        let time = required(self.time, "time")?;
        let time = Timestamp::parse(&time).map_err(|e| bad("time", e))?;
        if let Some(ct) = &self.datacontenttype
            && ct != DATA_CONTENT_TYPE
        {
            return Err(bad(
                "datacontenttype",
                format!("{ct:?} is not supported; expected \"{DATA_CONTENT_TYPE}\""),
            ));
        }
        let dataschema = self
            .dataschema
            .map(|s| attribute(s, "dataschema"))
            .transpose()?;
        let event_type = EventType::parse(&type_name).ok_or_else(|| DecodeError::UnknownType {
            event_type: type_name.into_owned(),
        })?;
        let payload = match self.payload {
            // Decoded while parsing, as the type's payload from a JSON object:
            // what the branch below accepts, and the same value.
            Some(payload) => {
                debug_assert_eq!(payload.event_type(), event_type);
                payload
            }
            None => {
                let data = self.data.ok_or_else(|| {
                    bad(
                        "data",
                        format!("missing; a {event_type} event carries its details in data"),
                    )
                })?;
                if !data.get().starts_with('{') {
                    return Err(DecodeError::Schema {
                        path: "data".into(),
                        reason: "must be a JSON object".into(),
                    });
                }
                Payload::decode(event_type, data.get())?
            }
        };
        Ok(DealEvent {
            id,
            source,
            deal_id,
            time,
            dataschema,
            extensions: self.extensions,
            payload,
        })
    }
}

/// The names of the envelope's attributes, as seen while parsing.
enum Attribute {
    Specversion,
    Id,
    Source,
    Type,
    Subject,
    Time,
    Datacontenttype,
    Dataschema,
    Data,
    Extension(String),
}

impl<'de> Deserialize<'de> for Attribute {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Attribute;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CloudEvents attribute name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Attribute, E> {
                Ok(match s {
                    "specversion" => Attribute::Specversion,
                    "id" => Attribute::Id,
                    "source" => Attribute::Source,
                    "type" => Attribute::Type,
                    "subject" => Attribute::Subject,
                    "time" => Attribute::Time,
                    "datacontenttype" => Attribute::Datacontenttype,
                    "dataschema" => Attribute::Dataschema,
                    "data" => Attribute::Data,
                    other => Attribute::Extension(other.to_string()),
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawEnvelope<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        EnvelopeSeed { inline_data: false }.deserialize(d)
    }
}

/// How an envelope is parsed.
struct EnvelopeSeed {
    /// Decode `data` as the payload of the event's type while parsing, when
    /// `type` came before it and names a known type; otherwise `data` is
    /// kept as text and decoded afterwards. Any error in `data` then fails
    /// the parse, without saying where: only for a first, fast attempt.
    inline_data: bool,
}

impl<'de> de::DeserializeSeed<'de> for EnvelopeSeed {
    type Value = RawEnvelope<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct V {
            inline_data: bool,
        }
        impl<'de> Visitor<'de> for V {
            type Value = RawEnvelope<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CloudEvents 1.0 JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                fn set<T, E: de::Error>(slot: &mut Option<T>, v: T, name: &str) -> Result<(), E> {
                    if slot.is_some() {
                        return Err(E::custom(format!("attribute {name} appears twice")));
                    }
                    *slot = Some(v);
                    Ok(())
                }
                let mut env = RawEnvelope::default();
                while let Some(key) = map.next_key::<Attribute>()? {
                    match key {
                        Attribute::Specversion => {
                            let v: BorrowedStr<'de> = map.next_value()?;
                            set(&mut env.specversion, v.0, "specversion")?
                        }
                        Attribute::Id => set(&mut env.id, map.next_value()?, "id")?,
                        Attribute::Source => set(&mut env.source, map.next_value()?, "source")?,
                        Attribute::Type => {
                            let v: BorrowedStr<'de> = map.next_value()?;
                            set(&mut env.event_type, v.0, "type")?
                        }
                        Attribute::Subject => {
                            let v: BorrowedStr<'de> = map.next_value()?;
                            set(&mut env.subject, v.0, "subject")?
                        }
                        Attribute::Time => {
                            let v: BorrowedStr<'de> = map.next_value()?;
                            set(&mut env.time, v.0, "time")?
                        }
                        Attribute::Datacontenttype => {
                            let v: BorrowedStr<'de> = map.next_value()?;
                            set(&mut env.datacontenttype, v.0, "datacontenttype")?
                        }
                        Attribute::Dataschema => {
                            set(&mut env.dataschema, map.next_value()?, "dataschema")?
                        }
                        Attribute::Data => {
                            let inline_type = env
                                .event_type
                                .as_deref()
                                .filter(|_| self.inline_data)
                                .and_then(EventType::parse);
                            match inline_type {
                                Some(_) if env.payload.is_some() => {
                                    return Err(de::Error::custom("attribute data appears twice"));
                                }
                                Some(event_type) => {
                                    let payload = map.next_value_seed(PayloadSeed(event_type))?;
                                    env.payload = Some(payload);
                                }
                                None => {
                                    let raw: &'de RawValue = map.next_value()?;
                                    set(&mut env.data, raw, "data")?
                                }
                            }
                        }
                        Attribute::Extension(name) => {
                            let valid_name = (1..=20).contains(&name.len())
                                && name
                                    .bytes()
                                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                            if !valid_name {
                                return Err(de::Error::custom(format!(
                                    "{name:?} is not a CloudEvents attribute: extension names are 1-20 lower-case letters or digits"
                                )));
                            }
                            if env.extensions.len() == limits::MAX_EXTENSIONS {
                                return Err(de::Error::custom(format!(
                                    "more than {} extension attributes",
                                    limits::MAX_EXTENSIONS
                                )));
                            }
                            if env.extensions.iter().any(|(n, _)| *n == name) {
                                return Err(de::Error::custom(format!(
                                    "attribute {name} appears twice"
                                )));
                            }
                            let value: ExtensionValueIn = map.next_value()?;
                            env.extensions.push((name, value.0));
                        }
                    }
                }
                Ok(env)
            }
        }
        d.deserialize_map(V {
            inline_data: self.inline_data,
        })
    }
}

/// Whether `v` is a valid `id`, `source` or `dataschema`: 1 to
/// [`limits::MAX_ATTRIBUTE_CHARS`] characters, none of them white space.
fn is_attribute_value(v: &str) -> bool {
    if v.is_ascii() {
        // The ASCII characters `char::is_whitespace` matches.
        let white = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r');
        return (1..=limits::MAX_ATTRIBUTE_CHARS).contains(&v.len())
            && !v.as_bytes().iter().any(white);
    }
    let n = v.chars().count();
    (1..=limits::MAX_ATTRIBUTE_CHARS).contains(&n) && !v.chars().any(char::is_whitespace)
}

/// A JSON string, borrowed from the input unless it has escapes.
struct BorrowedStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for BorrowedStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BorrowedStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedStr(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(BorrowedStr(Cow::Owned(s.to_string())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(BorrowedStr(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Decodes `data` as the payload of a known event type
/// ([`EnvelopeSeed::inline_data`]).
struct PayloadSeed(EventType);

impl<'de> de::DeserializeSeed<'de> for PayloadSeed {
    type Value = Payload;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Payload, D::Error> {
        Payload::deserialize_inline(self.0, d)
    }
}

/// A deserializer that reads a struct only from a JSON object (a map): the
/// derived impls would also read one from an array, which `data` must not be.
struct ObjectOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Deserializes an extension value, refusing objects, arrays, null and floats.
struct ExtensionValueIn(ExtensionValue);

impl<'de> Deserialize<'de> for ExtensionValueIn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ExtensionValueIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, integer or boolean (a CloudEvents extension value)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                if s.chars().count() > limits::MAX_ATTRIBUTE_CHARS {
                    return Err(E::custom(format!(
                        "is over {} characters",
                        limits::MAX_ATTRIBUTE_CHARS
                    )));
                }
                Ok(ExtensionValueIn(ExtensionValue::String(s.to_string())))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
                Ok(ExtensionValueIn(ExtensionValue::Boolean(b)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Ok(ExtensionValueIn(ExtensionValue::Integer(n)))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                i64::try_from(n)
                    .map(|n| ExtensionValueIn(ExtensionValue::Integer(n)))
                    .map_err(|_| E::custom(format!("{n} does not fit a signed 64-bit integer")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn display_honours_width_and_alignment_for_table_columns() {
        let id = Id::parse("openai").unwrap();
        assert_eq!(format!("[{id:<8}]"), "[openai  ]");
        assert_eq!(format!("[{id:>8}]"), "[  openai]");
        let text = Text::new("why").unwrap();
        assert_eq!(format!("[{text:<5}]"), "[why  ]");
        let at = Timestamp::parse("2025-01-15T00:00:00Z").unwrap();
        assert_eq!(format!("[{at:<22}]"), "[2025-01-15T00:00:00Z  ]");
        let day = Date::parse("2025-01-15").unwrap();
        assert_eq!(format!("[{day:<12}]"), "[2025-01-15  ]");
        assert_eq!(format!("[{:<5}]", Currency::new("USD").unwrap()), "[USD  ]");
        assert_eq!(
            format!("[{:<25}]", EventType::Amended),
            "[deal.amended             ]"
        );
        for kind in [LockKind::Exclusive, LockKind::RightOfFirstRefusal] {
            let wire = serde_json::to_string(&kind).unwrap();
            assert_eq!(wire, format!("\"{kind}\""));
        }
        // Without a width, nothing is added.
        assert_eq!(format!("{id}|{at}"), "openai|2025-01-15T00:00:00Z");
    }

    /// Valid events of every type, as producers write them.
    fn generated(seed: u64) -> Vec<Vec<u8>> {
        crate::generate::Generator::new(20, seed)
            .take(300)
            .map(|e| e.to_json())
            .collect()
    }

    /// `bytes` with `data` moved before `type`, so a parse meets it first.
    fn data_first(bytes: &[u8]) -> Vec<u8> {
        let mut value: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(bytes).unwrap();
        let data = value.remove("data").unwrap();
        let mut out = serde_json::Map::new();
        out.insert("data".into(), data);
        out.extend(value);
        serde_json::to_vec(&out).unwrap()
    }

    /// Decodes with and without the inline fast path and checks both agree.
    fn same_either_way(bytes: &[u8]) -> Result<DealEvent, DecodeError> {
        let fast = DealEvent::decode(bytes);
        let slow = DealEvent::decode_with(bytes, EnvelopeSeed { inline_data: false });
        assert_eq!(fast, slow, "input {:?}", String::from_utf8_lossy(bytes));
        fast
    }

    /// Timestamps of the RFC 3339 shape whose fields run a little past their
    /// ranges (month 0-13, day 0-32, hour 0-24, minute 0-60, second 0-61,
    /// offsets to ±24:60), with 0-9 fraction digits.
    fn shaped_timestamp() -> impl Strategy<Value = String> {
        (
            (0u32..=9999, 0u32..=13, 0u32..=32),
            (0u32..=24, 0u32..=60, 0u32..=61),
            proptest::option::of("[0-9]{1,9}"),
            prop_oneof![
                Just(None),
                (any::<bool>(), 0u32..=24, 0u32..=60).prop_map(Some)
            ],
        )
            .prop_map(|((y, mo, d), (h, mi, sec), fraction, offset)| {
                let fraction = fraction.map_or(String::new(), |f| format!(".{f}"));
                let offset = match offset {
                    None => "Z".to_string(),
                    Some((minus, oh, om)) => {
                        format!("{}{oh:02}:{om:02}", if minus { '-' } else { '+' })
                    }
                };
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{sec:02}{fraction}{offset}")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Reading the digits directly gives what chrono gives: the same
        /// instant, or the same error (chrono still words every error).
        #[test]
        fn timestamps_parse_as_chrono_parses_them(s in shaped_timestamp()) {
            prop_assert_eq!(Timestamp::parse(&s), Timestamp::parse_with(&s, |_| None));
            let fast = shaped_rfc3339_to_utc(s.as_bytes());
            let chrono = DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc));
            if &s.as_bytes()[17..19] != b"60" {
                prop_assert_eq!(fast, chrono.ok(), "{}", s);
            }
            // Seconds and nanoseconds give the instant back exactly.
            if let Ok(t) = Timestamp::parse(&s) {
                let (secs, nanos) = t.unix_parts();
                prop_assert_eq!(Timestamp::from_unix_parts(secs, nanos), Some(t));
                prop_assert_eq!(Timestamp::from_unix_parts(secs, 1_000_000_000), None);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Decoding `data` while parsing the envelope is only a shortcut:
        /// valid events, the same events with `data` first, and damaged
        /// copies (bytes overwritten, cut, `data` an array) decode to the
        /// same event or the same error with it as without it.
        #[test]
        fn decoding_data_inline_changes_no_outcome(
            seed in any::<u64>(),
            pick in any::<prop::sample::Index>(),
            damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<Option<prop::sample::Index>>(),
        ) {
            let events = generated(seed);
            let original = &events[pick.index(events.len())];
            let event = same_either_way(original).expect("generated events are valid");
            prop_assert_eq!(&same_either_way(&data_first(original)).unwrap(), &event);

            let mut damaged = original.clone();
            for (at, byte) in &damage {
                let i = at.index(damaged.len());
                damaged[i] = *byte;
            }
            if let Some(cut) = cut {
                damaged.truncate(cut.index(damaged.len()));
            }
            let _ = same_either_way(&damaged);

        }
    }

    fn event(ty: &str, data: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"e1","source":"urn:test","type":"{ty}","subject":"deal-1","time":"2025-01-15T10:00:00Z","datacontenttype":"application/json","data":{data}}}"#
        )
    }

    const TERMS: &str = r#"{"capacity":{"quantity":1000,"unit":"gpu-hours"},"price":{"amount_minor":250000,"currency":"USD"},"start":"2025-06-01T00:00:00Z","end":"2026-06-01T00:00:00Z"}"#;

    fn proposal(terms: &str) -> String {
        event(
            "deal.terms.proposed",
            &format!(r#"{{"proposal_id":"p1","proposer":"openai","terms":{terms}}}"#),
        )
    }

    /// serde's derived impls read a struct from an array of its fields too;
    /// `data` must be an object on every path.
    #[test]
    fn data_as_an_array_of_its_fields_is_refused() {
        for bytes in [
            event("deal.terms.rejected", r#"["p1","openai"]"#),
            event("deal.terms.rejected", r#"["p1","openai","too high"]"#),
        ] {
            let want = DecodeError::Schema {
                path: "data".into(),
                reason: "must be a JSON object".into(),
            };
            assert_eq!(same_either_way(bytes.as_bytes()), Err(want.clone()));
            let first = data_first(bytes.as_bytes());
            assert_eq!(same_either_way(&first), Err(want));
        }
    }

    #[test]
    fn decodes_a_proposal_and_round_trips() {
        let ev = DealEvent::decode(proposal(TERMS).as_bytes()).expect("valid");
        assert_eq!(ev.event_type(), EventType::TermsProposed);
        assert_eq!(ev.deal_id.as_str(), "deal-1");
        let again = DealEvent::decode(&ev.to_json()).expect("re-decodes");
        assert_eq!(again.payload, ev.payload);
        assert_eq!(again.time, ev.time);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                proposal(&TERMS.replace("250000", "-5")),
                "schema",
                "data.terms.price.amount_minor",
            ),
            (
                proposal(&TERMS.replace("250000", "2.5")),
                "schema",
                "data.terms.price.amount_minor",
            ),
            (
                proposal(&TERMS.replace("USD", "usd")),
                "schema",
                "data.terms.price.currency",
            ),
            (
                proposal(&TERMS.replace("gpu-hours", "bananas")),
                "schema",
                "data.terms.capacity.unit",
            ),
            (
                proposal(&TERMS.replace("2026-06-01T00:00:00Z", "2024-06-01T00:00:00Z")),
                "invalid",
                "data.terms.end",
            ),
            (
                proposal(&TERMS.replace(
                    "\"start\":\"2025-06-01T00:00:00Z\"",
                    "\"start\":\"2025-06-01\"",
                )),
                "schema",
                "data.terms.start",
            ),
            (
                event("deal.terms.proposed", r#"{"proposer":"openai","terms":{}}"#),
                "schema",
                "data.terms.capacity",
            ),
            (event("deal.nope", "{}"), "unknown_type", "type"),
            (
                proposal(TERMS).replace("2025-01-15T10:00:00Z", "2025-01-15 10:00"),
                "not_cloudevent",
                "time",
            ),
            (
                proposal(TERMS).replace("\"specversion\":\"1.0\",", ""),
                "not_cloudevent",
                "specversion",
            ),
            (
                proposal(TERMS).replace("\"deal-1\"", "\"deal 1\""),
                "not_cloudevent",
                "subject",
            ),
            (
                proposal(TERMS).replace("\"id\":\"e1\"", "\"id\":7"),
                "not_cloudevent",
                "id",
            ),
            (
                proposal(TERMS).replace("\"id\":\"e1\"", "\"Bad-Ext\":1"),
                "not_cloudevent",
                "(event)",
            ),
            (event("deal.terms.proposed", "[1]"), "schema", "data"),
        ];
        for (json, kind, path) in cases {
            let err = DealEvent::decode(json.as_bytes()).expect_err(&json);
            assert_eq!(err.kind(), kind, "{json}: {err}");
            assert_eq!(err.path(), Some(path), "{json}: {err}");
        }
    }

    #[test]
    fn bytes_level_errors() {
        assert_eq!(
            DealEvent::decode(b"\xff\xfe").unwrap_err().kind(),
            "not_utf8"
        );
        assert_eq!(DealEvent::decode(b"{nope").unwrap_err().kind(), "not_json");
        assert_eq!(
            DealEvent::decode(b"42").unwrap_err().kind(),
            "not_cloudevent"
        );
        let big = vec![b' '; limits::MAX_EVENT_BYTES + 1];
        assert_eq!(DealEvent::decode(&big).unwrap_err().kind(), "too_large");
    }

    #[test]
    fn lists_are_bounded_while_decoding() {
        let partners: Vec<String> = (0..=limits::MAX_LIST_LEN)
            .map(|i| format!("\"p{i}\""))
            .collect();
        let json = event(
            "deal.negotiation.opened",
            &format!(
                r#"{{"customer":"a","provider":"b","scope":"cloud-compute","partners":[{}]}}"#,
                partners.join(",")
            ),
        );
        let err = DealEvent::decode(json.as_bytes()).unwrap_err();
        assert_eq!(err.path(), Some("data.partners"), "{err}");
    }

    /// Every producer-controlled limit: a value at the limit is accepted, one
    /// past it is refused with a stable kind, the field's path and a reason
    /// naming the limit.
    #[test]
    fn every_limit_rejects_with_a_precise_reason() {
        let opened = |data: String| event("deal.negotiation.opened", &data);
        let with_id =
            |id: &str| proposal(TERMS).replace("\"id\":\"e1\"", &format!("\"id\":\"{id}\""));
        let with_ext =
            |exts: &str| proposal(TERMS).replace("\"id\":\"e1\"", &format!("\"id\":\"e1\",{exts}"));
        let exts = |n: usize| {
            (0..n)
                .map(|i| format!("\"x{i}\":1"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let signatories = |n: usize| {
            let one = r#"{"party":"a","name":"N"}"#;
            event(
                "deal.finalized",
                &format!(
                    r#"{{"proposal_id":"p1","signatories":[{}],"effective_date":"2025-06-01"}}"#,
                    vec![one; n].join(",")
                ),
            )
        };
        let id = |n: usize| "a".repeat(n);
        let text = |n: usize| "é".repeat(n);
        let amount = |n: u64| proposal(&TERMS.replace("250000", &n.to_string()));
        // (name, at the limit, past it, kind, path, reason contains)
        let cases: Vec<(&str, String, String, &str, &str, String)> = vec![
            (
                "MAX_ID_CHARS (subject)",
                proposal(TERMS).replace("deal-1", &id(limits::MAX_ID_CHARS)),
                proposal(TERMS).replace("deal-1", &id(limits::MAX_ID_CHARS + 1)),
                "not_cloudevent",
                "subject",
                "an identifier of 1-128 characters".into(),
            ),
            (
                "MAX_ID_CHARS (data)",
                opened(format!(
                    r#"{{"customer":"{}","provider":"b","scope":"s"}}"#,
                    id(128)
                )),
                opened(format!(
                    r#"{{"customer":"{}","provider":"b","scope":"s"}}"#,
                    id(129)
                )),
                "schema",
                "data.customer",
                "an identifier of 1-128 characters".into(),
            ),
            (
                "MAX_ATTRIBUTE_CHARS (id)",
                with_id(&id(limits::MAX_ATTRIBUTE_CHARS)),
                with_id(&id(limits::MAX_ATTRIBUTE_CHARS + 1)),
                "not_cloudevent",
                "id",
                "must be 1-256 characters without spaces".into(),
            ),
            (
                "MAX_TEXT_CHARS",
                opened(format!(
                    r#"{{"customer":"a","provider":"b","scope":"s","description":"{}"}}"#,
                    text(limits::MAX_TEXT_CHARS)
                )),
                opened(format!(
                    r#"{{"customer":"a","provider":"b","scope":"s","description":"{}"}}"#,
                    text(limits::MAX_TEXT_CHARS + 1)
                )),
                "schema",
                "data.description",
                "is 1025 characters long, over the limit of 1024".into(),
            ),
            (
                "MAX_LIST_LEN",
                signatories(limits::MAX_LIST_LEN),
                signatories(limits::MAX_LIST_LEN + 1),
                "schema",
                "data.signatories",
                "has more than 16 items".into(),
            ),
            (
                "MAX_EXTENSIONS",
                with_ext(&exts(limits::MAX_EXTENSIONS)),
                with_ext(&exts(limits::MAX_EXTENSIONS + 1)),
                "not_cloudevent",
                "(event)",
                "more than 16 extension attributes".into(),
            ),
            (
                "extension value length (MAX_ATTRIBUTE_CHARS)",
                with_ext(&format!("\"ext\":\"{}\"", id(limits::MAX_ATTRIBUTE_CHARS))),
                with_ext(&format!(
                    "\"ext\":\"{}\"",
                    id(limits::MAX_ATTRIBUTE_CHARS + 1)
                )),
                "not_cloudevent",
                "ext",
                "is over 256 characters".into(),
            ),
            (
                "extension name length",
                with_ext(&format!("\"{}\":1", id(20))),
                with_ext(&format!("\"{}\":1", id(21))),
                "not_cloudevent",
                "(event)",
                "extension names are 1-20 lower-case letters or digits".into(),
            ),
            (
                "MAX_SAFE_INTEGER",
                amount(limits::MAX_SAFE_INTEGER),
                amount(limits::MAX_SAFE_INTEGER + 1),
                "schema",
                "data.terms.price.amount_minor",
                "9007199254740992 is over the limit of 9007199254740991".into(),
            ),
        ];
        for (name, at_limit, past_limit, kind, path, reason) in cases {
            if let Err(e) = DealEvent::decode(at_limit.as_bytes()) {
                panic!("{name}: at the limit refused: {e}");
            }
            let err = DealEvent::decode(past_limit.as_bytes()).expect_err(name);
            assert_eq!(
                (err.kind(), err.path()),
                (kind, Some(path)),
                "{name}: {err}"
            );
            assert!(err.to_string().contains(&reason), "{name}: {err}");
        }
        // The whole event: MAX_EVENT_BYTES, counted in bytes.
        let pad = |n: usize| {
            let base = opened(r#"{"customer":"a","provider":"b","scope":"s"}"#.into());
            format!("{base}{}", " ".repeat(n - base.len()))
        };
        DealEvent::decode(pad(limits::MAX_EVENT_BYTES).as_bytes()).expect("at the limit");
        let err = DealEvent::decode(pad(limits::MAX_EVENT_BYTES + 1).as_bytes()).unwrap_err();
        assert_eq!(err.kind(), "too_large");
        assert_eq!(
            err.to_string(),
            "event is 65537 bytes, over the limit of 65536 bytes"
        );
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused_as_too_deep() {
        // The deepest valid shapes nest 4 levels.
        let deepest = event(
            "deal.finalized",
            &format!(
                r#"{{"proposal_id":"p1","signatories":[{{"party":"a","name":"N"}}],"effective_date":"2025-06-01","terms":{TERMS}}}"#
            ),
        );
        DealEvent::decode(deepest.as_bytes()).expect("valid");
        assert_eq!(too_deep(deepest.as_bytes(), 4), None);
        assert!(too_deep(deepest.as_bytes(), 3).is_some());
        for line in include_str!("../schemas/examples/scenario.jsonl").lines() {
            assert_eq!(too_deep(line.as_bytes(), 4), None, "{line}");
        }

        // Nested to exactly the limit: refused for its schema, not its depth.
        let nest = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
        let at_limit = event(
            "deal.terms.proposed",
            &format!(r#"{{"proposer":{}}}"#, nest(6)),
        );
        let err = DealEvent::decode(at_limit.as_bytes()).unwrap_err();
        assert_eq!((err.kind(), err.path()), ("schema", Some("data.proposer")));
        // One level more: too deep, naming the byte where level 9 opens.
        let past = event(
            "deal.terms.proposed",
            &format!(r#"{{"proposer":{}}}"#, nest(7)),
        );
        let err = DealEvent::decode(past.as_bytes()).unwrap_err();
        let at = past.find("[[[[[[[").unwrap() + 6;
        assert_eq!(err, DecodeError::TooDeep { at, limit: 8 });
        assert_eq!((err.kind(), err.path()), ("too_deep", None));
        assert_eq!(
            err.to_string(),
            format!(
                "event nests arrays and objects more than 8 levels deep (from byte {at}); no deal event nests more than 4"
            )
        );
        // In an extension, and even when the text is not valid JSON.
        let in_extension =
            proposal(TERMS).replace("\"id\":\"e1\"", &format!("\"id\":\"e1\",\"x\":{}", nest(8)));
        assert_eq!(
            DealEvent::decode(in_extension.as_bytes())
                .unwrap_err()
                .kind(),
            "too_deep"
        );
        assert_eq!(
            DealEvent::decode("[".repeat(100).as_bytes()).unwrap_err(),
            DecodeError::TooDeep { at: 8, limit: 8 }
        );
        // Brackets inside strings (escaped quotes too) do not count.
        let bracketed = event(
            "deal.negotiation.opened",
            &format!(
                r#"{{"customer":"a","provider":"b","scope":"s","description":"\"{}"}}"#,
                "[{".repeat(100)
            ),
        );
        DealEvent::decode(bracketed.as_bytes()).expect("brackets in text are text");
    }

    #[test]
    fn hostile_depth_and_length_within_the_size_limit_stay_bounded() {
        // As deep as 64 KiB allows: no stack overflow, no recursion-limit
        // message, just too_deep.
        for open in ["[", "{\"a\":"] {
            let n = limits::MAX_EVENT_BYTES / open.len();
            let err = DealEvent::decode(open.repeat(n).as_bytes()).unwrap_err();
            assert_eq!(err.kind(), "too_deep", "{open}");
            let data = format!(
                r#"{{"proposer":{}}}"#,
                open.repeat((limits::MAX_EVENT_BYTES - 500) / open.len())
            );
            let err =
                DealEvent::decode(event("deal.terms.proposed", &data).as_bytes()).unwrap_err();
            assert_eq!(err.kind(), "too_deep", "{open}");
        }
        // A long flat array: refused at the 17th item of a bounded list.
        let items = vec!["1"; 30_000].join(",");
        let json = event(
            "deal.negotiation.opened",
            &format!(r#"{{"customer":"a","provider":"b","scope":"s","partners":[{items}]}}"#),
        );
        assert!(json.len() <= limits::MAX_EVENT_BYTES);
        let err = DealEvent::decode(json.as_bytes()).unwrap_err();
        assert_eq!(err.path(), Some("data.partners[0]"), "{err}");
        // Reasons quote producer values; they are cut, never 60 KB long.
        let long = "x".repeat(60_000);
        for json in [
            proposal(TERMS).replace("deal.terms.proposed", &long),
            proposal(TERMS).replace("deal-1", &long),
            proposal(TERMS).replace("\"1.0\"", &format!("\"{long}\"")),
            proposal(TERMS).replace("\"proposer\"", &format!("\"{long}\"")),
            proposal(TERMS).replace("2025-01-15T10:00:00Z", &long),
            proposal(TERMS).replace("USD", &long),
        ] {
            let err = DealEvent::decode(json.as_bytes()).unwrap_err();
            let message = err.to_string();
            assert!(
                message.chars().count() <= 2 * limits::MAX_REASON_CHARS + 300,
                "{} characters: {}",
                message.len(),
                &message[..200]
            );
            assert!(message.contains("… (cut; "), "{}", &message[..200]);
        }
        assert_eq!(cut("short".into()), "short");
        let exactly = "é".repeat(limits::MAX_REASON_CHARS);
        assert_eq!(cut(exactly.clone()), exactly);
        let over = cut("é".repeat(limits::MAX_REASON_CHARS + 1));
        assert_eq!(over.chars().count(), limits::MAX_REASON_CHARS);
        assert!(over.ends_with("… (cut; 513 characters in all)"), "{over}");
    }

    #[test]
    fn timestamp_shape_is_strict() {
        for ok in [
            "2025-01-15T10:00:00Z",
            "2025-01-15T10:00:00.123456789+02:00",
            "2025-01-15T10:00:00-05:30",
        ] {
            assert!(Timestamp::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "2025-01-15",
            "2025-01-15T10:00Z",
            "2025-01-15t10:00:00z",
            "2025-01-15T10:00:00",
            "2025-13-15T10:00:00Z",
            "2025-01-15T10:00:00.Z",
            "2025-01-15T10:00:00.1234567890Z",
            "2025-01-15T10:00:00+0200",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn leap_seconds_are_refused_everywhere() {
        for t in [
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            "2017-01-01T00:59:60+01:00",
            "2016-12-31T23:59:60-01:00",
            "2025-01-15T10:00:60Z",
        ] {
            let err = Timestamp::parse(t).expect_err(t);
            assert!(
                err.contains("leap seconds are not accepted; use :59"),
                "{t}: {err}"
            );
            let in_time = proposal(TERMS).replace("2025-01-15T10:00:00Z", t);
            let err = DealEvent::decode(in_time.as_bytes()).expect_err(t);
            assert_eq!((err.kind(), err.path()), ("not_cloudevent", Some("time")));
            assert!(err.to_string().contains("leap seconds"), "{err}");
            let in_data = proposal(&TERMS.replace("2025-06-01T00:00:00Z", t));
            let err = DealEvent::decode(in_data.as_bytes()).expect_err(t);
            assert_eq!(
                (err.kind(), err.path()),
                ("schema", Some("data.terms.start"))
            );
            assert!(err.to_string().contains("leap seconds"), "{err}");
        }
        assert!(Timestamp::parse("2016-12-31T23:59:59.999999999Z").is_ok());
    }

    #[test]
    fn utc_year_stays_within_0000_to_9999() {
        for t in ["9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00+01:00"] {
            let err = Timestamp::parse(t).expect_err(t);
            assert!(err.contains("outside 0000-9999"), "{t}: {err}");
            let json = proposal(TERMS).replace("2025-01-15T10:00:00Z", t);
            let err = DealEvent::decode(json.as_bytes()).expect_err(t);
            assert_eq!((err.kind(), err.path()), ("not_cloudevent", Some("time")));
        }
        // The edges themselves, written in any offset that stays in range,
        // are accepted and written back in a form that parses again.
        for t in [
            "9999-12-31T23:59:59.999999999Z",
            "9999-12-31T23:59:59+01:00",
            "0000-01-01T00:00:00Z",
            "0000-01-01T00:00:00-01:00",
        ] {
            let ts = Timestamp::parse(t).expect(t);
            assert_eq!(Timestamp::parse(&ts.to_string()), Ok(ts), "{t} as {ts}");
        }
        let first_ms = -62_167_219_200_000; // 0000-01-01T00:00:00Z
        let end_ms = 253_402_300_800_000; // 10000-01-01T00:00:00Z
        assert!(Timestamp::from_unix_millis(first_ms).is_some());
        assert!(Timestamp::from_unix_millis(first_ms - 1).is_none());
        assert!(Timestamp::from_unix_millis(end_ms - 1).is_some());
        assert!(Timestamp::from_unix_millis(end_ms).is_none());
    }

    #[test]
    fn null_for_an_optional_field_is_refused_but_absence_is_fine() {
        let signed = r#"{"proposal_id":"p1","signatories":[{"party":"a","name":"N","title":null}],"effective_date":"2025-06-01"}"#;
        let amended =
            format!(r#"{{"amendment_id":"a1","terms":{TERMS},"agreed_by":["a"],"reason":null}}"#);
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "deal.negotiation.opened",
                r#"{"customer":"a","provider":"b","scope":"s","description":null}"#.into(),
                "data.description",
            ),
            (
                "deal.negotiation.opened",
                r#"{"customer":"a","provider":"b","scope":"s","partners":null}"#.into(),
                "data.partners",
            ),
            (
                "deal.terms.rejected",
                r#"{"proposal_id":"p1","rejected_by":"a","reason":null}"#.into(),
                "data.reason",
            ),
            (
                "deal.exclusivity.granted",
                r#"{"lock_id":"l1","holder":"a","bound_party":"b","scope":"s","kind":"exclusive","valid_from":"2025-01-01T00:00:00Z","valid_until":null}"#.into(),
                "data.valid_until",
            ),
            ("deal.finalized", signed.into(), "data.signatories[0].title"),
            (
                "deal.finalized",
                signed.replace(r#","title":null"#, "").replace(
                    r#""effective_date""#,
                    r#""terms":null,"effective_date""#,
                ),
                "data.terms",
            ),
            ("deal.amended", amended, "data.reason"),
        ];
        for (ty, data, path) in cases {
            let json = event(ty, &data);
            let err = DealEvent::decode(json.as_bytes()).expect_err(&json);
            assert_eq!((err.kind(), err.path()), ("schema", Some(path)), "{err}");
            assert_eq!(
                err.to_string(),
                format!("field {path}: {NULL_OPTIONAL}"),
                "{json}"
            );
            // Left out, the same field is simply absent.
            let key = path.rsplit('.').next().unwrap();
            let without = data.replace(&format!(r#","{key}":null"#), "");
            assert_ne!(without, data);
            DealEvent::decode(event(ty, &without).as_bytes()).expect(&without);
        }
    }

    #[test]
    fn extensions_are_kept_and_checked() {
        let json = proposal(TERMS).replace(
            "\"id\":\"e1\"",
            "\"id\":\"e1\",\"traceparent\":\"00-ab\",\"seq\":3",
        );
        let ev = DealEvent::decode(json.as_bytes()).unwrap();
        assert_eq!(ev.extensions.len(), 2);
        let back = DealEvent::decode(&ev.to_json()).unwrap();
        assert_eq!(back.extensions, ev.extensions);
        let nested = proposal(TERMS).replace("\"id\":\"e1\"", "\"id\":\"e1\",\"x\":{}");
        assert_eq!(
            DealEvent::decode(nested.as_bytes()).unwrap_err().path(),
            Some("x")
        );
    }
}
