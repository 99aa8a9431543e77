//! Export files: a streaming, versioned, self-describing copy of a ledger.
//!
//! Why this module exists: a ledger is a sled folder that only dealledger
//! (and only one process at a time) can read. An auditor needs the chains as
//! one plain file they can copy, archive, verify offline with nothing but
//! `docs/FORMAT.md` and a blake3 library, and turn back into a ledger that is
//! identical to the original (same entries, same batches, same heads). This
//! module writes ([`ExportWriter`], [`export_store`]), reads
//! ([`ExportReader`]), verifies ([`verify_export`]) and imports
//! ([`import_export`]) that file. The byte layout is specified in
//! `docs/FORMAT.md`, section "Export format":
//!
//! ```text
//! magic "DLEDGEX\n" ‖ u32 version (1) ‖ u32 header length ‖ header JSON
//! ‖ ( B frame ‖ E frame* )*  in ledger order
//! ‖ T frame (counts and the blake3 of every byte before it)
//! ```
//!
//! Every frame is `tag ‖ u32 body length ‖ body`. Memory stays constant
//! whatever the size of the ledger: the writer reads one entry at a time,
//! and the reader holds one frame (at most [`MAX_FRAME_BYTES`]) and, for
//! each stream, a few bytes of structure state. Export files are untrusted
//! input: the reader checks every length against its limit and against the
//! input that is left before it allocates, never panics, and names the byte
//! offset (and, where it applies, the stream, seq and Kafka offset) of every
//! problem.
//!
//! Verdicts are not exported: they are derived data, recomputed by
//! [`import_export`] through [`LedgerState::apply_batch`] exactly as the
//! ingester computed them.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::chain::{
    self, ChainBreak, ChainHead, ChainVerifier, DecodeEntryError, Entry, HASH_LEN, Hash, Record,
    StreamId,
};
use crate::ledger::{LedgerError, LedgerState, Location, MAX_BATCH_RECORDS};
use crate::store::{
    BATCH_RECORD_FORMAT, BatchRecord, MAX_BATCH_FINGERPRINTS, MAX_BATCH_RUNS, MAX_PARTITION, Run,
    Store, StoreError,
};

/// The first 8 bytes of every export file.
pub const MAGIC: [u8; 8] = *b"DLEDGEX\n";

/// The export format version this build writes and reads. A reader refuses
/// a higher version ("written by a newer dealledger").
pub const EXPORT_FORMAT_VERSION: u32 = 1;

/// Largest header JSON in bytes. A header lists one head per stream (about
/// 190 bytes each); 16 MiB holds every one of the 65,536 partitions the
/// ledger supports.
pub const MAX_HEADER_BYTES: usize = 16 * 1024 * 1024;

/// Tag byte of a batch frame.
pub const TAG_BATCH: u8 = b'B';
/// Tag byte of an entry frame.
pub const TAG_ENTRY: u8 = b'E';
/// Tag byte of the trailer frame.
pub const TAG_TRAILER: u8 = b'T';

/// Bytes of one run in a batch frame: partition, first seq, count.
const RUN_BYTES: usize = 4 + 8 + 4;
/// Bytes of one fingerprint in a batch frame: fingerprint, partition, seq.
const FINGERPRINT_BYTES: usize = 8 + 4 + 8;
/// Bytes of a batch frame body before its runs: batch number, record
/// format, run count.
const BATCH_FIXED_BYTES: usize = 8 + 1 + 4;

/// Largest batch frame body: batch number and a batch record with the most
/// runs and fingerprints a batch can have.
pub const MAX_BATCH_FRAME_BYTES: usize =
    BATCH_FIXED_BYTES + MAX_BATCH_RUNS * RUN_BYTES + 4 + MAX_BATCH_FINGERPRINTS * FINGERPRINT_BYTES;

/// Largest entry frame body: one stored entry.
pub const MAX_ENTRY_FRAME_BYTES: usize = chain::MAX_ENCODED_ENTRY_BYTES;

/// Size of the trailer frame body: batch count, entry count, blake3 hash.
pub const TRAILER_BODY_BYTES: usize = 8 + 8 + HASH_LEN;

/// Size of the whole trailer frame: tag, length, body.
pub const TRAILER_FRAME_BYTES: usize = 1 + 4 + TRAILER_BODY_BYTES;

/// Largest body of any frame.
pub const MAX_FRAME_BYTES: usize = max(
    MAX_ENTRY_FRAME_BYTES,
    max(MAX_BATCH_FRAME_BYTES, TRAILER_BODY_BYTES),
);

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

// Every length is written as a u32.
const _: () = {
    assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
    assert!(MAX_HEADER_BYTES <= u32::MAX as usize);
    assert!(MAX_BATCH_RUNS <= MAX_BATCH_RECORDS);
};

// ---------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------

/// The export's header: what the file holds, and the stored heads of the
/// ledger at export time (which the chains in the file must end at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportHeader {
    /// The ledger's topic.
    pub topic: String,
    /// The stored head of every stream, by ascending partition.
    pub streams: Vec<ChainHead>,
    /// Total number of entry frames (the sum of the streams' entries).
    pub entries: u64,
    /// Number of batch frames.
    pub batches: u64,
}

/// The header as JSON (field names and order as in FORMAT.md).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderJson {
    format_version: u32,
    topic: String,
    streams: Vec<StreamJson>,
    entries: u64,
    batches: u64,
}

/// One stream head in the header JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamJson {
    partition: i32,
    entries: u64,
    head_seq: Option<u64>,
    head_hash: String,
    last_offset: Option<i64>,
}

impl ExportHeader {
    /// The header of an export of `topic` with these stored heads and
    /// `batches` batch records.
    pub fn new(topic: impl Into<String>, mut streams: Vec<ChainHead>, batches: u64) -> Self {
        streams.sort_by_key(|h| h.stream().partition);
        let entries = streams.iter().map(ChainHead::next_seq).sum();
        ExportHeader {
            topic: topic.into(),
            streams,
            entries,
            batches,
        }
    }

    /// The header's head of `partition`, if it lists one.
    pub fn stream(&self, partition: i32) -> Option<&ChainHead> {
        self.streams
            .binary_search_by_key(&partition, |h| h.stream().partition)
            .ok()
            .map(|i| &self.streams[i])
    }

    fn to_json(&self) -> Vec<u8> {
        let json = HeaderJson {
            format_version: EXPORT_FORMAT_VERSION,
            topic: self.topic.clone(),
            streams: self
                .streams
                .iter()
                .map(|h| StreamJson {
                    partition: h.stream().partition,
                    entries: h.next_seq(),
                    head_seq: h.next_seq().checked_sub(1),
                    head_hash: h.head().to_string(),
                    last_offset: h.last_offset(),
                })
                .collect(),
            entries: self.entries,
            batches: self.batches,
        };
        serde_json::to_vec(&json).expect("a header serializes")
    }

    /// Parses and checks the header JSON; the error says what is wrong.
    fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let json: HeaderJson = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if json.format_version != EXPORT_FORMAT_VERSION {
            return Err(format!(
                "format_version is {}, but the file's version field says {EXPORT_FORMAT_VERSION}",
                json.format_version
            ));
        }
        if json.topic.is_empty() || json.topic.len() > chain::MAX_TOPIC_LEN {
            return Err(format!(
                "topic has {} bytes; a topic has 1 to {}",
                json.topic.len(),
                chain::MAX_TOPIC_LEN
            ));
        }
        let mut streams = Vec::with_capacity(json.streams.len());
        let mut total = 0u64;
        let mut previous: Option<i32> = None;
        for (i, s) in json.streams.iter().enumerate() {
            let at = format!("streams[{i}] (partition {})", s.partition);
            if !(0..=MAX_PARTITION).contains(&s.partition) {
                return Err(format!(
                    "{at}: partition outside the supported range 0..={MAX_PARTITION}"
                ));
            }
            if previous.is_some_and(|p| p >= s.partition) {
                return Err(format!(
                    "{at}: streams are not in strictly ascending partition order"
                ));
            }
            previous = Some(s.partition);
            if s.head_seq != s.entries.checked_sub(1) {
                return Err(format!(
                    "{at}: head_seq {:?} does not fit entries {} (head_seq is entries - 1, null for none)",
                    s.head_seq, s.entries
                ));
            }
            let hash: Hash = s
                .head_hash
                .parse()
                .map_err(|e| format!("{at}: head_hash: {e}"))?;
            let head = ChainHead::resume(
                StreamId::new(json.topic.clone(), s.partition),
                s.entries,
                s.last_offset,
                hash,
            )
            .map_err(|e| format!("{at}: {e}"))?;
            total = total
                .checked_add(s.entries)
                .ok_or_else(|| format!("{at}: entry counts overflow u64"))?;
            streams.push(head);
        }
        if total != json.entries {
            return Err(format!(
                "entries is {}, but the streams hold {total} entries",
                json.entries
            ));
        }
        Ok(ExportHeader {
            topic: json.topic,
            streams,
            entries: json.entries,
            batches: json.batches,
        })
    }
}

/// The trailer frame's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportTrailer {
    /// Number of batch frames in the file.
    pub batches: u64,
    /// Number of entry frames in the file.
    pub entries: u64,
    /// blake3 (plain hash mode) of every byte of the file before the
    /// trailer frame.
    pub hash: Hash,
}

// ---------------------------------------------------------------------------
// Batch frame codec
// ---------------------------------------------------------------------------

/// Encodes a batch frame body: batch number, then the batch record exactly
/// as the store keeps it (`B` value in FORMAT.md).
fn encode_batch_frame(record: &BatchRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        BATCH_FIXED_BYTES
            + record.runs.len() * RUN_BYTES
            + 4
            + record.fingerprints.len() * FINGERPRINT_BYTES,
    );
    out.extend_from_slice(&record.batch_no.to_be_bytes());
    out.push(BATCH_RECORD_FORMAT);
    out.extend_from_slice(&(record.runs.len() as u32).to_be_bytes());
    for run in &record.runs {
        out.extend_from_slice(&(run.partition as u32).to_be_bytes());
        out.extend_from_slice(&run.first_seq.to_be_bytes());
        out.extend_from_slice(&run.count.to_be_bytes());
    }
    out.extend_from_slice(&(record.fingerprints.len() as u32).to_be_bytes());
    for (fp, location) in &record.fingerprints {
        out.extend_from_slice(&fp.to_be_bytes());
        out.extend_from_slice(&(location.partition as u32).to_be_bytes());
        out.extend_from_slice(&location.seq.to_be_bytes());
    }
    out
}

/// Bounds-checked cursor over a frame body. Never panics.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let remain = self.bytes.len() - self.at;
        if n > remain {
            return Err(format!(
                "body ends inside {what} at body byte {} (needs {n} bytes, {remain} remain)",
                self.at
            ));
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn partition(&mut self, what: &str) -> Result<i32, String> {
        let raw = self.u32(what)?;
        match i32::try_from(raw) {
            Ok(p) if p <= MAX_PARTITION => Ok(p),
            _ => Err(format!(
                "{what} has partition {raw}, outside the supported range 0..={MAX_PARTITION}"
            )),
        }
    }
}

/// Decodes a batch frame body; the error says what is wrong. Checks counts
/// against their limits before allocating, and that the counts fill the
/// body exactly.
fn decode_batch_frame(bytes: &[u8]) -> Result<BatchRecord, String> {
    let mut c = Cursor { bytes, at: 0 };
    let batch_no = c.u64("the batch number")?;
    let format = c.take(1, "the batch record format")?[0];
    if format != BATCH_RECORD_FORMAT {
        return Err(format!(
            "batch record format is {format}, this build reads {BATCH_RECORD_FORMAT}"
        ));
    }
    let run_count = c.u32("the run count")? as usize;
    if run_count > MAX_BATCH_RUNS {
        return Err(format!(
            "{run_count} runs, more than MAX_BATCH_RUNS ({MAX_BATCH_RUNS})"
        ));
    }
    let mut runs = Vec::with_capacity(run_count.min((bytes.len() - c.at) / RUN_BYTES));
    for i in 0..run_count {
        let what = format!("run {i}");
        let partition = c.partition(&what)?;
        let first_seq = c.u64(&what)?;
        let count = c.u32(&what)?;
        if count == 0 {
            return Err(format!("run {i} (partition {partition}) has no entries"));
        }
        runs.push(Run {
            partition,
            first_seq,
            count,
        });
    }
    let fp_count = c.u32("the fingerprint count")? as usize;
    if fp_count > MAX_BATCH_FINGERPRINTS {
        return Err(format!(
            "{fp_count} fingerprints, more than MAX_BATCH_FINGERPRINTS ({MAX_BATCH_FINGERPRINTS})"
        ));
    }
    let mut fingerprints =
        Vec::with_capacity(fp_count.min((bytes.len() - c.at) / FINGERPRINT_BYTES));
    for i in 0..fp_count {
        let what = format!("fingerprint {i}");
        let fp = c.u64(&what)?;
        let partition = c.partition(&what)?;
        let seq = c.u64(&what)?;
        fingerprints.push((fp, Location { partition, seq }));
    }
    if c.at != bytes.len() {
        return Err(format!(
            "{} bytes follow the last fingerprint, from body byte {}",
            bytes.len() - c.at,
            c.at
        ));
    }
    Ok(BatchRecord {
        batch_no,
        runs,
        fingerprints,
    })
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Writing the output failed.
    #[error("writing the export failed at byte {at}: {source}")]
    Io {
        /// Bytes written before the failure.
        at: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The header JSON is larger than [`MAX_HEADER_BYTES`].
    #[error("the export header is {len} bytes, more than MAX_HEADER_BYTES ({MAX_HEADER_BYTES})")]
    HeaderTooLarge {
        /// Its length.
        len: usize,
    },
    /// Reading the ledger failed (including damage the store detects).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A chain of the ledger does not verify; nothing should be exported.
    #[error(
        "ledger {} is broken at {brk}; refusing to export it (run `dealledger verify --data {}` for a full report)",
        .dir.display(), .dir.display()
    )]
    Broken {
        /// The ledger folder.
        dir: PathBuf,
        /// The first break found.
        brk: ChainBreak,
    },
    /// The ledger's batch records, entries and heads disagree.
    #[error(
        "ledger {} is inconsistent: {detail}; refusing to export it (run `dealledger verify --data {}`)",
        .dir.display(), .dir.display()
    )]
    Inconsistent {
        /// The ledger folder.
        dir: PathBuf,
        /// The entry concerned, when there is one.
        location: Option<Location>,
        /// What disagrees, naming partition and seq.
        detail: String,
    },
}

impl WriteError {
    /// Whether the ledger itself is damaged (as opposed to unreadable or an
    /// output failure).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            WriteError::Broken { .. }
                | WriteError::Inconsistent { .. }
                | WriteError::Store(StoreError::Corrupt { .. })
        )
    }
}

/// Writes an export file frame by frame, hashing every byte for the
/// trailer. It writes what it is given; [`export_store`] gives it a ledger
/// in ledger order, and [`ExportReader`] checks the structure.
pub struct ExportWriter<W: Write> {
    out: W,
    hasher: blake3::Hasher,
    bytes: u64,
    batches: u64,
    entries: u64,
}

impl<W: Write> ExportWriter<W> {
    /// Starts an export: writes the magic bytes, the format version and the
    /// header.
    pub fn new(out: W, header: &ExportHeader) -> Result<Self, WriteError> {
        let json = header.to_json();
        if json.len() > MAX_HEADER_BYTES {
            return Err(WriteError::HeaderTooLarge { len: json.len() });
        }
        let mut writer = ExportWriter {
            out,
            hasher: blake3::Hasher::new(),
            bytes: 0,
            batches: 0,
            entries: 0,
        };
        writer.put(&MAGIC)?;
        writer.put(&EXPORT_FORMAT_VERSION.to_be_bytes())?;
        writer.put(&(json.len() as u32).to_be_bytes())?;
        writer.put(&json)?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.out.write_all(bytes).map_err(|source| WriteError::Io {
            at: self.bytes,
            source,
        })?;
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn frame(&mut self, tag: u8, body: &[u8]) -> Result<(), WriteError> {
        debug_assert!(body.len() <= MAX_FRAME_BYTES);
        self.put(&[tag])?;
        self.put(&(body.len() as u32).to_be_bytes())?;
        self.put(body)
    }

    /// Writes a batch frame: the batch number and its record (runs in
    /// ledger order, fingerprints).
    ///
    /// # Panics
    /// If the record has more runs or fingerprints than a batch can have.
    pub fn write_batch(&mut self, record: &BatchRecord) -> Result<(), WriteError> {
        assert!(
            record.runs.len() <= MAX_BATCH_RUNS
                && record.fingerprints.len() <= MAX_BATCH_FINGERPRINTS,
            "batch {} has {} runs and {} fingerprints; a batch has at most {MAX_BATCH_RUNS} of each",
            record.batch_no,
            record.runs.len(),
            record.fingerprints.len()
        );
        self.frame(TAG_BATCH, &encode_batch_frame(record))?;
        self.batches += 1;
        Ok(())
    }

    /// Writes an entry frame: the entry's stored encoding
    /// ([`chain::encode_entry`]).
    ///
    /// # Panics
    /// If the record breaks [`chain::validate_record`]; entries read from a
    /// store never do.
    pub fn write_entry(&mut self, entry: &Entry) -> Result<(), WriteError> {
        self.frame(TAG_ENTRY, &chain::encode_entry(entry))?;
        self.entries += 1;
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Writes the trailer (frame counts and the blake3 of everything
    /// before it), flushes, and returns the output and the trailer.
    pub fn finish(mut self) -> Result<(W, ExportTrailer), WriteError> {
        let trailer = ExportTrailer {
            batches: self.batches,
            entries: self.entries,
            hash: Hash::from(self.hasher.finalize()),
        };
        let mut body = Vec::with_capacity(TRAILER_BODY_BYTES);
        body.extend_from_slice(&trailer.batches.to_be_bytes());
        body.extend_from_slice(&trailer.entries.to_be_bytes());
        body.extend_from_slice(trailer.hash.as_bytes());
        self.frame(TAG_TRAILER, &body)?;
        self.out.flush().map_err(|source| WriteError::Io {
            at: self.bytes,
            source,
        })?;
        Ok((self.out, trailer))
    }
}

/// What [`export_store`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The header written (topic, stored heads, counts).
    pub header: ExportHeader,
    /// The trailer written.
    pub trailer: ExportTrailer,
    /// Size of the export in bytes.
    pub bytes: u64,
}

/// A partition's read position while exporting.
type EntryCursor<'a> = (
    u64,
    Box<dyn Iterator<Item = Result<Entry, StoreError>> + 'a>,
);

/// Exports a whole ledger to `out` in ledger order, verifying every chain
/// on the way (a broken ledger is refused, see [`WriteError::Broken`]).
/// Reads one entry at a time: memory does not grow with the ledger.
/// `progress` is called with the number of entries written so far.
pub fn export_store<W: Write>(
    store: &Store,
    out: W,
    mut progress: impl FnMut(u64),
) -> Result<(W, ExportSummary), WriteError> {
    let dir = store.dir().to_path_buf();
    let inconsistent = |location: Option<Location>, detail: String| WriteError::Inconsistent {
        dir: dir.clone(),
        location,
        detail,
    };
    // A ledger being ingested grows while it is exported: take heads that
    // belong to one batch count (a batch writes its record and heads in one
    // atomic apply), and export only those batches.
    let (heads, batches) = loop {
        let before = store.next_batch_no()?;
        let heads = store.heads()?;
        if store.next_batch_no()? == before {
            break (heads, before);
        }
    };
    let header = ExportHeader::new(store.topic(), heads, batches);
    let mut writer = ExportWriter::new(out, &header)?;
    let mut verifiers: BTreeMap<i32, ChainVerifier> = BTreeMap::new();
    let mut cursors: BTreeMap<i32, EntryCursor<'_>> = BTreeMap::new();
    let mut written = 0u64;
    for (expected_no, record) in (0u64..).zip(store.batches(0).take(batches as usize)) {
        let record = record?;
        if record.batch_no != expected_no {
            return Err(inconsistent(
                None,
                format!(
                    "batch record {expected_no} is missing: the next stored batch record is {}",
                    record.batch_no
                ),
            ));
        }
        writer.write_batch(&record)?;
        for run in &record.runs {
            let partition = run.partition;
            let verifier = verifiers
                .entry(partition)
                .or_insert_with(|| ChainVerifier::new(StreamId::new(store.topic(), partition)));
            let cursor = cursors.entry(partition).or_insert_with(|| {
                (
                    run.first_seq,
                    Box::new(store.entries(partition, run.first_seq)),
                )
            });
            if cursor.0 != run.first_seq {
                *cursor = (
                    run.first_seq,
                    Box::new(store.entries(partition, run.first_seq)),
                );
            }
            for _ in 0..run.count {
                let location = Location {
                    partition,
                    seq: cursor.0,
                };
                let entry = match cursor.1.next() {
                    None => {
                        return Err(inconsistent(
                            Some(location),
                            format!(
                                "batch record {} lists the entry at {location}, but no entry is stored there (entry deleted)",
                                record.batch_no
                            ),
                        ));
                    }
                    Some(entry) => entry?,
                };
                if entry.seq != location.seq {
                    return Err(inconsistent(
                        Some(location),
                        format!(
                            "batch record {} lists the entry at {location}, but the next stored entry is seq {} (entry deleted)",
                            record.batch_no, entry.seq
                        ),
                    ));
                }
                verifier.push(&entry).map_err(|brk| WriteError::Broken {
                    dir: dir.clone(),
                    brk,
                })?;
                writer.write_entry(&entry)?;
                cursor.0 += 1;
                written += 1;
                progress(written);
            }
        }
    }
    if writer.batches != header.batches {
        return Err(inconsistent(
            None,
            format!(
                "the last batch record is {} but only {} batch records were read",
                header.batches.saturating_sub(1),
                writer.batches
            ),
        ));
    }
    for head in &header.streams {
        let partition = head.stream().partition;
        let fresh;
        let verifier = match verifiers.get(&partition) {
            Some(v) => v,
            None => {
                fresh = ChainVerifier::new(head.stream().clone());
                &fresh
            }
        };
        verifier
            .check_head(head.next_seq(), &head.head())
            .map_err(|brk| WriteError::Broken {
                dir: dir.clone(),
                brk,
            })?;
        if verifier.last_offset() != head.last_offset() {
            return Err(inconsistent(
                Some(Location {
                    partition,
                    seq: head.next_seq(),
                }),
                format!(
                    "stored head of partition {partition} says last offset {:?}, its chain ends at offset {:?}",
                    head.last_offset(),
                    verifier.last_offset()
                ),
            ));
        }
    }
    if let Some(partition) = verifiers
        .keys()
        .find(|p| header.stream(**p).is_none())
        .copied()
    {
        return Err(inconsistent(
            Some(Location { partition, seq: 0 }),
            format!("partition {partition} has entries listed in batch records but no stored head"),
        ));
    }
    let bytes = writer.bytes_written() + TRAILER_FRAME_BYTES as u64;
    let (out, trailer) = writer.finish()?;
    Ok((
        out,
        ExportSummary {
            header,
            trailer,
            bytes,
        },
    ))
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// A part of an export file, named in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The magic bytes at the start.
    Magic,
    /// The format version.
    Version,
    /// The header length.
    HeaderLength,
    /// The header JSON.
    Header,
    /// The frame of this (expected) batch number.
    BatchFrame(u64),
    /// An entry frame, with the location the current batch frame lists
    /// for it (`None` when no batch frame lists one).
    EntryFrame(Option<Location>),
    /// The trailer frame.
    Trailer,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Magic => f.write_str("the magic bytes"),
            Part::Version => f.write_str("the format version"),
            Part::HeaderLength => f.write_str("the header length"),
            Part::Header => f.write_str("the header"),
            Part::BatchFrame(n) => write!(f, "the batch frame of batch {n}"),
            Part::EntryFrame(Some(l)) => write!(f, "an entry frame of {l}"),
            Part::EntryFrame(None) => f.write_str("an entry frame"),
            Part::Trailer => f.write_str("the trailer frame"),
        }
    }
}

/// Why an export file cannot be read, or where its content is damaged.
///
/// [`ReadError::is_damage`] separates the two: damage is a well-framed file
/// whose content fails a check (exit code 1 in the CLI); everything else
/// means the file cannot be read as an export at all (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading the input failed.
    #[error("cannot read the export at byte {at}: {source}")]
    Io {
        /// Byte offset of the failed read.
        at: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error(
        "not a dealledger export: it starts with {found}, not with the magic bytes \"DLEDGEX\\n\""
    )]
    NotAnExport {
        /// The first bytes found, escaped (or "nothing" for an empty file).
        found: String,
    },
    /// The file was written by a newer dealledger.
    #[error(
        "export has format version {found}, newer than the version {supported} this dealledger reads: use a newer dealledger"
    )]
    NewerVersion {
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The version field is 0, which no dealledger writes.
    #[error("export has format version 0 at byte 8, which no dealledger writes (damaged file)")]
    InvalidVersion,
    /// The input ends inside a part.
    #[error(
        "export truncated at byte {end} inside {part} (which starts at byte {start} and needs {need} bytes)"
    )]
    Truncated {
        /// Where the input ends.
        end: u64,
        /// Where the part starts.
        start: u64,
        /// Bytes the part needs.
        need: u64,
        /// The part.
        part: Part,
    },
    /// The input ends where the next frame should start, before the trailer.
    #[error("export truncated at byte {end}: it ends before its trailer frame")]
    MissingTrailer {
        /// Where the input ends.
        end: u64,
    },
    /// A length field is above its limit.
    #[error("export byte {at}: {part} has length {len}, more than the limit {max}")]
    TooLong {
        /// Byte offset of the length field.
        at: u64,
        /// The part.
        part: Part,
        /// The length read.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The header is not valid JSON or not a valid header.
    #[error("export header at byte {at} is not valid: {reason}")]
    BadHeader {
        /// Byte offset of the header JSON.
        at: u64,
        /// What is wrong.
        reason: String,
    },
    /// A frame starts with an unknown tag.
    #[error("export byte {at}: unknown frame tag {tag:#04x}, expected B, E or T (damaged framing)")]
    UnknownTag {
        /// Byte offset of the tag.
        at: u64,
        /// The tag found.
        tag: u8,
    },
    /// A frame's body does not fit its type.
    #[error("export byte {at}: {part}: {reason}")]
    BadFrame {
        /// Byte offset of the frame.
        at: u64,
        /// The frame.
        part: Part,
        /// What is wrong.
        reason: String,
    },
    /// Bytes follow the trailer.
    #[error("export has bytes after its trailer frame, from byte {at}")]
    TrailingBytes {
        /// Byte offset of the first extra byte.
        at: u64,
    },
    /// An entry frame's bytes are not a valid stored entry (damage).
    #[error(
        "export byte {at}: entry frame of {location} (batch {batch_no}) does not decode: {source}"
    )]
    BadEntry {
        /// Byte offset of the frame.
        at: u64,
        /// The batch that lists the entry.
        batch_no: u64,
        /// Where the batch frame says the entry belongs.
        location: Location,
        /// Why it does not decode.
        source: DecodeEntryError,
    },
    /// An entry frame holds another entry than its batch frame lists there
    /// (damage).
    #[error(
        "export byte {at}: batch {batch_no} lists {listed} here, but the entry frame holds partition {} seq {} (offset {offset}): entry moved, altered, inserted or deleted, or the batch frame altered",
        .found.partition, .found.seq
    )]
    Misplaced {
        /// Byte offset of the frame.
        at: u64,
        /// The batch that lists the entry.
        batch_no: u64,
        /// Where the batch frame says the entry belongs.
        listed: Location,
        /// What the entry says it is.
        found: Location,
        /// The entry's Kafka offset.
        offset: i64,
    },
    /// Frames, batch records, header and trailer disagree (damage).
    #[error("export byte {at}: {detail}")]
    Inconsistent {
        /// Byte offset of the frame where the disagreement shows.
        at: u64,
        /// The entry concerned, when there is one.
        location: Option<Location>,
        /// What disagrees.
        detail: String,
    },
    /// The trailer's hash is not the hash of the bytes before it (damage).
    #[error(
        "export trailer at byte {at}: the blake3 of bytes 0..{at} is {computed}, but the trailer says {stored} (export altered or damaged after it was written)"
    )]
    TrailerHashMismatch {
        /// Byte offset of the trailer frame.
        at: u64,
        /// The hash in the trailer.
        stored: Hash,
        /// The hash of the bytes read.
        computed: Hash,
    },
}

impl ReadError {
    /// Whether this is damage to a well-framed export (a failed integrity
    /// check), rather than a file that cannot be read as an export.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            ReadError::BadEntry { .. }
                | ReadError::Misplaced { .. }
                | ReadError::Inconsistent { .. }
                | ReadError::TrailerHashMismatch { .. }
        )
    }

    /// Whether the reader stops after this error. After the others (an
    /// entry frame that does not decode or is misplaced) it continues with
    /// the next frame.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            ReadError::BadEntry { .. } | ReadError::Misplaced { .. }
        )
    }

    /// The entry the error is about, when there is one.
    pub fn location(&self) -> Option<Location> {
        match self {
            ReadError::BadEntry { location, .. } => Some(*location),
            ReadError::Misplaced { listed, .. } => Some(*listed),
            ReadError::Inconsistent { location, .. } => *location,
            ReadError::Truncated {
                part: Part::EntryFrame(location),
                ..
            } => *location,
            _ => None,
        }
    }

    /// The byte offset the error is about.
    pub fn byte_offset(&self) -> u64 {
        match self {
            ReadError::Io { at, .. }
            | ReadError::TooLong { at, .. }
            | ReadError::BadHeader { at, .. }
            | ReadError::UnknownTag { at, .. }
            | ReadError::BadFrame { at, .. }
            | ReadError::TrailingBytes { at }
            | ReadError::BadEntry { at, .. }
            | ReadError::Misplaced { at, .. }
            | ReadError::Inconsistent { at, .. }
            | ReadError::TrailerHashMismatch { at, .. } => *at,
            ReadError::Truncated { end, .. } | ReadError::MissingTrailer { end } => *end,
            ReadError::NotAnExport { .. } => 0,
            ReadError::NewerVersion { .. } | ReadError::InvalidVersion => MAGIC.len() as u64,
        }
    }

    /// A stable code for the kind of error (for JSON output).
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Io { .. } => "io",
            ReadError::NotAnExport { .. } => "not_an_export",
            ReadError::NewerVersion { .. } => "newer_version",
            ReadError::InvalidVersion => "invalid_version",
            ReadError::Truncated { .. } | ReadError::MissingTrailer { .. } => "truncated",
            ReadError::TooLong { .. } => "too_long",
            ReadError::BadHeader { .. } => "bad_header",
            ReadError::UnknownTag { .. } => "unknown_tag",
            ReadError::BadFrame { .. } => "bad_frame",
            ReadError::TrailingBytes { .. } => "trailing_bytes",
            ReadError::BadEntry { .. } => "undecodable",
            ReadError::Misplaced { .. } => "misplaced_entry",
            ReadError::Inconsistent { .. } => "inconsistent",
            ReadError::TrailerHashMismatch { .. } => "trailer_hash_mismatch",
        }
    }
}

/// One item of an export, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportItem {
    /// A batch frame: the entry frames that follow are exactly its runs'
    /// entries, in order.
    Batch(BatchRecord),
    /// An entry frame, decoded; it is at the location its batch frame
    /// lists ([`ExportReader::frame_start`] gives its byte offset). Its
    /// hashes are not checked here: that is [`ChainVerifier`]'s job.
    Entry(Entry),
}

/// The entries the current batch frame still lists.
struct Pending {
    batch_no: u64,
    runs: Vec<Run>,
    /// Index of the current run.
    run: usize,
    /// Entries of the current run already read.
    done: u32,
}

impl Pending {
    fn next_location(&self) -> Option<Location> {
        let run = self.runs.get(self.run)?;
        Some(Location {
            partition: run.partition,
            seq: run.first_seq + u64::from(self.done),
        })
    }

    fn advance(&mut self) {
        if let Some(run) = self.runs.get(self.run) {
            self.done += 1;
            if self.done == run.count {
                self.run += 1;
                self.done = 0;
            }
        }
    }

    fn left(&self) -> u64 {
        self.runs
            .iter()
            .skip(self.run)
            .map(|r| u64::from(r.count))
            .sum::<u64>()
            - u64::from(self.done)
    }
}

/// Reads an export file as a stream of [`ExportItem`]s, checking its
/// structure on the way: framing and limits, batch numbering, that each
/// batch frame's runs continue every stream without gaps and that exactly
/// its entries follow it, the trailer's counts and hash, and nothing after
/// the trailer. Chain hashes are checked by the caller
/// ([`verify_export`], [`import_export`]).
///
/// As an iterator it yields `Err` for problems; after an error for which
/// [`ReadError::is_fatal`] is false it continues with the next frame,
/// after any other it ends. It ends without error only after a valid
/// trailer. Memory: one frame buffer plus one integer per stream.
pub struct ExportReader<R> {
    input: R,
    pos: u64,
    total_len: Option<u64>,
    hasher: blake3::Hasher,
    header: ExportHeader,
    buf: Vec<u8>,
    pending: Option<Pending>,
    next_batch_no: u64,
    /// Next seq of every stream seen in a batch frame.
    stream_next: BTreeMap<i32, u64>,
    entries: u64,
    frame_start: u64,
    trailer: Option<ExportTrailer>,
    done: bool,
}

impl<R: Read> ExportReader<R> {
    /// Starts reading an export of unknown length (e.g. standard input):
    /// reads and checks the magic bytes, version and header.
    pub fn new(input: R) -> Result<Self, ReadError> {
        Self::open(input, None)
    }

    /// Starts reading an export whose total length is known (a file): every
    /// length is also checked against the bytes left before reading.
    pub fn with_len(input: R, len: u64) -> Result<Self, ReadError> {
        Self::open(input, Some(len))
    }

    fn open(input: R, total_len: Option<u64>) -> Result<Self, ReadError> {
        let mut reader = ExportReader {
            input,
            pos: 0,
            total_len,
            hasher: blake3::Hasher::new(),
            header: ExportHeader::new("-", Vec::new(), 0),
            buf: Vec::new(),
            pending: None,
            next_batch_no: 0,
            stream_next: BTreeMap::new(),
            entries: 0,
            frame_start: 0,
            trailer: None,
            done: false,
        };
        // Magic: a foreign file is the common case, so say what it holds.
        let mut magic = [0u8; MAGIC.len()];
        let got = reader.fill_up(&mut magic)?;
        if got < MAGIC.len() && got > 0 && magic[..got] == MAGIC[..got] {
            return Err(ReadError::Truncated {
                end: got as u64,
                start: 0,
                need: MAGIC.len() as u64,
                part: Part::Magic,
            });
        }
        if got < MAGIC.len() || magic != MAGIC {
            return Err(ReadError::NotAnExport {
                found: if got == 0 {
                    "nothing (the file is empty)".to_owned()
                } else {
                    format!("\"{}\"", magic[..got].escape_ascii())
                },
            });
        }
        reader.hasher.update(&magic);
        let version = reader.read_u32(Part::Version, 0, 4 + 4, true)?;
        if version == 0 {
            return Err(ReadError::InvalidVersion);
        }
        if version > EXPORT_FORMAT_VERSION {
            return Err(ReadError::NewerVersion {
                found: version,
                supported: EXPORT_FORMAT_VERSION,
            });
        }
        let len_at = reader.pos;
        let len = reader.read_u32(Part::HeaderLength, len_at, 4, true)?;
        if len as usize > MAX_HEADER_BYTES {
            return Err(ReadError::TooLong {
                at: len_at,
                part: Part::Header,
                len: u64::from(len),
                max: MAX_HEADER_BYTES,
            });
        }
        let at = reader.pos;
        reader.read_body(len as usize, Part::Header, at, true)?;
        reader.header = ExportHeader::from_json(&reader.buf)
            .map_err(|reason| ReadError::BadHeader { at, reason })?;
        reader.buf = Vec::new();
        Ok(reader)
    }

    /// The header (topic, heads at export time, counts).
    pub fn header(&self) -> &ExportHeader {
        &self.header
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.pos
    }

    /// Byte offset of the frame of the last item or error returned.
    pub fn frame_start(&self) -> u64 {
        self.frame_start
    }

    /// Entry frames read so far.
    pub fn entries_read(&self) -> u64 {
        self.entries
    }

    /// The trailer, once it was read and checked.
    pub fn trailer(&self) -> Option<&ExportTrailer> {
        self.trailer.as_ref()
    }

    /// Reads until `buf` is full or the input ends; returns the bytes read.
    /// Does not hash.
    fn fill_up(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        let mut got = 0;
        while got < buf.len() {
            match self.input.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ReadError::Io {
                        at: self.pos + got as u64,
                        source,
                    });
                }
            }
        }
        self.pos += got as u64;
        Ok(got)
    }

    /// Reads a u32 that belongs to `part` (starting at `start`, `need`
    /// bytes long in all), hashing it if `hash`.
    fn read_u32(
        &mut self,
        part: Part,
        start: u64,
        need: u64,
        hash: bool,
    ) -> Result<u32, ReadError> {
        let mut bytes = [0u8; 4];
        let got = self.fill_up(&mut bytes)?;
        if got < bytes.len() {
            return Err(ReadError::Truncated {
                end: self.pos,
                start,
                need,
                part,
            });
        }
        if hash {
            self.hasher.update(&bytes);
        }
        Ok(u32::from_be_bytes(bytes))
    }

    /// Reads `len` bytes into `self.buf`. The buffer grows only as bytes
    /// arrive, so a hostile length cannot make it allocate more than the
    /// input holds; with a known total length, a length beyond the input's
    /// end is refused before reading.
    fn read_body(
        &mut self,
        len: usize,
        part: Part,
        start: u64,
        hash: bool,
    ) -> Result<(), ReadError> {
        let need = self.pos - start + len as u64;
        if let Some(total) = self.total_len
            && self.pos.saturating_add(len as u64) > total
        {
            return Err(ReadError::Truncated {
                end: total,
                start,
                need,
                part,
            });
        }
        self.buf.clear();
        let at = self.pos;
        let got = (&mut self.input)
            .take(len as u64)
            .read_to_end(&mut self.buf)
            .map_err(|source| ReadError::Io { at, source })?;
        self.pos += got as u64;
        if got < len {
            return Err(ReadError::Truncated {
                end: self.pos,
                start,
                need,
                part,
            });
        }
        if hash {
            self.hasher.update(&self.buf);
        }
        Ok(())
    }

    /// Reads a frame's length and body (the tag is read and hashed).
    fn read_frame(&mut self, part: Part, max: usize, hash: bool) -> Result<(), ReadError> {
        let start = self.frame_start;
        let len_at = self.pos;
        let len = self.read_u32(part, start, 1 + 4, hash)?;
        if len as usize > max {
            return Err(ReadError::TooLong {
                at: len_at,
                part,
                len: u64::from(len),
                max,
            });
        }
        self.read_body(len as usize, part, start, hash)
    }

    fn next_item(&mut self) -> Result<Option<ExportItem>, ReadError> {
        let start = self.pos;
        self.frame_start = start;
        let mut tag = [0u8; 1];
        if self.fill_up(&mut tag)? == 0 {
            return Err(ReadError::MissingTrailer { end: self.pos });
        }
        let tag = tag[0];
        match tag {
            TAG_BATCH => {
                self.hasher.update(&[tag]);
                self.check_batch_complete(start, "a batch frame")?;
                let part = Part::BatchFrame(self.next_batch_no);
                self.read_frame(part, MAX_BATCH_FRAME_BYTES, true)?;
                let record =
                    decode_batch_frame(&self.buf).map_err(|reason| ReadError::BadFrame {
                        at: start,
                        part,
                        reason,
                    })?;
                self.accept_batch(start, &record)?;
                Ok(Some(ExportItem::Batch(record)))
            }
            TAG_ENTRY => {
                self.hasher.update(&[tag]);
                let listed = self.pending.as_ref().and_then(Pending::next_location);
                self.read_frame(Part::EntryFrame(listed), MAX_ENTRY_FRAME_BYTES, true)?;
                let (Some(location), Some(pending)) = (listed, self.pending.as_mut()) else {
                    return Err(ReadError::Inconsistent {
                        at: start,
                        location: None,
                        detail: match &self.pending {
                            None => {
                                "an entry frame comes before the first batch frame (entry inserted)"
                                    .to_owned()
                            }
                            Some(p) => format!(
                                "batch {} lists no more entries, but an entry frame follows (entry inserted)",
                                p.batch_no
                            ),
                        },
                    });
                };
                let batch_no = pending.batch_no;
                pending.advance();
                self.entries += 1;
                let entry =
                    chain::decode_entry(&self.buf).map_err(|source| ReadError::BadEntry {
                        at: start,
                        batch_no,
                        location,
                        source,
                    })?;
                let found = Location {
                    partition: entry.record.partition,
                    seq: entry.seq,
                };
                if found != location {
                    return Err(ReadError::Misplaced {
                        at: start,
                        batch_no,
                        listed: location,
                        found,
                        offset: entry.record.offset,
                    });
                }
                Ok(Some(ExportItem::Entry(entry)))
            }
            TAG_TRAILER => {
                let computed = Hash::from(self.hasher.finalize());
                self.check_batch_complete(start, "the trailer")?;
                self.read_frame(Part::Trailer, TRAILER_BODY_BYTES, false)?;
                if self.buf.len() != TRAILER_BODY_BYTES {
                    return Err(ReadError::BadFrame {
                        at: start,
                        part: Part::Trailer,
                        reason: format!(
                            "body is {} bytes, expected {TRAILER_BODY_BYTES}",
                            self.buf.len()
                        ),
                    });
                }
                let mut c = Cursor {
                    bytes: &self.buf,
                    at: 0,
                };
                let batches = c.u64("the batch count").unwrap_or(0);
                let entries = c.u64("the entry count").unwrap_or(0);
                let mut stored = [0u8; HASH_LEN];
                stored.copy_from_slice(&self.buf[16..]);
                let trailer = ExportTrailer {
                    batches,
                    entries,
                    hash: Hash(stored),
                };
                self.check_trailer(start, &trailer, computed)?;
                let mut extra = [0u8; 1];
                let end = self.pos;
                if self.total_len.is_some_and(|t| t > end) || self.fill_up(&mut extra)? > 0 {
                    return Err(ReadError::TrailingBytes { at: end });
                }
                self.trailer = Some(trailer);
                Ok(None)
            }
            other => Err(ReadError::UnknownTag {
                at: start,
                tag: other,
            }),
        }
    }

    /// Refuses a new batch frame or the trailer while the current batch
    /// frame still lists entries.
    fn check_batch_complete(&self, at: u64, what: &str) -> Result<(), ReadError> {
        if let Some(p) = &self.pending
            && let Some(location) = p.next_location()
        {
            return Err(ReadError::Inconsistent {
                at,
                location: Some(location),
                detail: format!(
                    "batch {} lists {location} and {} more entries, but {what} follows (entries deleted)",
                    p.batch_no,
                    p.left() - 1
                ),
            });
        }
        Ok(())
    }

    /// Checks a batch frame's number and runs against what came before.
    fn accept_batch(&mut self, at: u64, record: &BatchRecord) -> Result<(), ReadError> {
        let bad_frame = |reason: String| ReadError::BadFrame {
            at,
            part: Part::BatchFrame(record.batch_no),
            reason,
        };
        if record.batch_no != self.next_batch_no {
            return Err(ReadError::Inconsistent {
                at,
                location: None,
                detail: format!(
                    "batch frame holds batch {}, expected batch {} (batch frames deleted, inserted or reordered)",
                    record.batch_no, self.next_batch_no
                ),
            });
        }
        let total: u64 = record.runs.iter().map(|r| u64::from(r.count)).sum();
        if total > MAX_BATCH_RECORDS as u64 {
            return Err(bad_frame(format!(
                "lists {total} entries, more than MAX_BATCH_RECORDS ({MAX_BATCH_RECORDS})"
            )));
        }
        // Check every run first, then commit, so a refused frame changes nothing.
        let mut next = BTreeMap::new();
        for (i, run) in record.runs.iter().enumerate() {
            let stands = next
                .get(&run.partition)
                .copied()
                .unwrap_or_else(|| self.stream_next.get(&run.partition).copied().unwrap_or(0));
            if run.first_seq != stands {
                return Err(ReadError::Inconsistent {
                    at,
                    location: Some(Location {
                        partition: run.partition,
                        seq: stands,
                    }),
                    detail: format!(
                        "batch {} run {i} says partition {} continues at seq {}, but its chain stands at seq {stands} (entries deleted or inserted, or the batch frame altered)",
                        record.batch_no, run.partition, run.first_seq
                    ),
                });
            }
            let end = stands
                .checked_add(u64::from(run.count))
                .ok_or_else(|| bad_frame(format!("run {i} overflows the sequence numbers")))?;
            next.insert(run.partition, end);
        }
        self.stream_next.extend(next);
        self.next_batch_no = self
            .next_batch_no
            .checked_add(1)
            .ok_or_else(|| bad_frame("batch numbers exhausted".to_owned()))?;
        self.pending = Some(Pending {
            batch_no: record.batch_no,
            runs: record.runs.clone(),
            run: 0,
            done: 0,
        });
        Ok(())
    }

    fn check_trailer(
        &self,
        at: u64,
        trailer: &ExportTrailer,
        computed: Hash,
    ) -> Result<(), ReadError> {
        let inconsistent = |detail: String| ReadError::Inconsistent {
            at,
            location: None,
            detail,
        };
        if trailer.batches != self.next_batch_no || trailer.entries != self.entries {
            return Err(inconsistent(format!(
                "the trailer counts {} batches and {} entries, the file holds {} batch frames and {} entry frames (frames deleted or inserted)",
                trailer.batches, trailer.entries, self.next_batch_no, self.entries
            )));
        }
        if self.header.batches != self.next_batch_no || self.header.entries != self.entries {
            return Err(inconsistent(format!(
                "the header counts {} batches and {} entries, the file holds {} batch frames and {} entry frames",
                self.header.batches, self.header.entries, self.next_batch_no, self.entries
            )));
        }
        if trailer.hash != computed {
            return Err(ReadError::TrailerHashMismatch {
                at,
                stored: trailer.hash,
                computed,
            });
        }
        Ok(())
    }
}

impl<R: Read> Iterator for ExportReader<R> {
    type Item = Result<ExportItem, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_item() {
            Ok(Some(item)) => Some(Ok(item)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(error) => {
                if error.is_fatal() {
                    self.done = true;
                }
                Some(Err(error))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Verifying
// ---------------------------------------------------------------------------

/// The first problem found in one stream of an export.
#[derive(Debug)]
pub enum StreamFault {
    /// A chain check failed ([`ChainVerifier`]); `at` is the byte offset of
    /// the entry frame (`None` for the head check at the end of the chain).
    Chain {
        /// The break.
        brk: ChainBreak,
        /// Byte offset of the entry frame.
        at: Option<u64>,
    },
    /// An entry frame is damaged, misplaced or missing.
    Frame(ReadError),
}

impl StreamFault {
    /// The seq where the stream breaks.
    pub fn seq(&self) -> u64 {
        match self {
            StreamFault::Chain { brk, .. } => brk.seq,
            StreamFault::Frame(e) => e.location().map_or(0, |l| l.seq),
        }
    }

    /// The Kafka offset of the offending entry, when known.
    pub fn offset(&self) -> Option<i64> {
        match self {
            StreamFault::Chain { brk, .. } => brk.offset,
            StreamFault::Frame(ReadError::Misplaced { offset, .. }) => Some(*offset),
            StreamFault::Frame(_) => None,
        }
    }

    /// The byte offset in the export, when known.
    pub fn byte_offset(&self) -> Option<u64> {
        match self {
            StreamFault::Chain { at, .. } => *at,
            StreamFault::Frame(e) => Some(e.byte_offset()),
        }
    }
}

impl fmt::Display for StreamFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamFault::Chain { brk, at: Some(at) } => write!(f, "{brk} (export byte {at})"),
            StreamFault::Chain { brk, at: None } => write!(f, "{brk}"),
            StreamFault::Frame(e) => write!(f, "{e}"),
        }
    }
}

/// The verification result of one stream of an export.
#[derive(Debug)]
pub struct ExportStreamReport {
    /// The partition.
    pub partition: i32,
    /// Entries that verified, from seq 0.
    pub entries: u64,
    /// Seq and hash of the last entry that verified.
    pub head: Option<(u64, Hash)>,
    /// The first problem, if any (the stream is not checked past it).
    pub fault: Option<StreamFault>,
}

/// The result of [`verify_export`].
#[derive(Debug)]
pub struct ExportReport {
    /// The export's header.
    pub header: ExportHeader,
    /// Every stream listed in the header or holding entries, by partition.
    pub streams: Vec<ExportStreamReport>,
    /// Problems that are not one stream's first break (trailer, counts,
    /// frame structure), in file order.
    pub faults: Vec<ReadError>,
    /// The trailer, when the file was read to its valid end.
    pub trailer: Option<ExportTrailer>,
    /// Bytes read.
    pub bytes: u64,
}

impl ExportReport {
    /// Whether every stream and the file as a whole verified.
    pub fn is_intact(&self) -> bool {
        self.faults.is_empty() && self.streams.iter().all(|s| s.fault.is_none())
    }
}

/// A stream's verifier and its first fault.
struct StreamCheck {
    verifier: ChainVerifier,
    fault: Option<StreamFault>,
}

/// The check of `partition`, created on first use.
fn stream_check<'a>(
    checks: &'a mut BTreeMap<i32, StreamCheck>,
    topic: &str,
    partition: i32,
) -> &'a mut StreamCheck {
    checks.entry(partition).or_insert_with(|| StreamCheck {
        verifier: ChainVerifier::new(StreamId::new(topic, partition)),
        fault: None,
    })
}

/// Verifies a whole export: its structure (via the reader), every chain
/// link of every stream, each stream's end against the header's head, and
/// the trailer. Damage is reported in the [`ExportReport`] (first problem
/// per stream, plus file-level problems); `Err` means the file cannot be
/// read as an export ([`ReadError::is_damage`] is false). `progress` is
/// called with the number of entry frames read so far.
pub fn verify_export<R: Read>(
    reader: &mut ExportReader<R>,
    mut progress: impl FnMut(u64),
) -> Result<ExportReport, ReadError> {
    let topic = reader.header().topic.clone();
    let mut checks: BTreeMap<i32, StreamCheck> = BTreeMap::new();
    let mut faults = Vec::new();
    while let Some(item) = reader.next() {
        match item {
            Ok(ExportItem::Batch(_)) => {}
            Ok(ExportItem::Entry(entry)) => {
                let partition = entry.record.partition;
                let s = stream_check(&mut checks, &topic, partition);
                if s.fault.is_none()
                    && let Err(brk) = s.verifier.push(&entry)
                {
                    s.fault = Some(StreamFault::Chain {
                        brk,
                        at: Some(reader.frame_start()),
                    });
                }
            }
            Err(error) if !error.is_damage() => return Err(error),
            Err(error) => match error.location() {
                Some(location) => {
                    let s = stream_check(&mut checks, &topic, location.partition);
                    if s.fault.is_none() {
                        s.fault = Some(StreamFault::Frame(error));
                    } else if error.is_fatal() {
                        faults.push(error);
                    }
                }
                None => faults.push(error),
            },
        }
        progress(reader.entries_read());
    }
    let trailer = reader.trailer().copied();
    let header = reader.header().clone();
    // Head checks only make sense for a file read to its end.
    if trailer.is_some() {
        for head in &header.streams {
            let partition = head.stream().partition;
            let s = stream_check(&mut checks, &topic, partition);
            if s.fault.is_some() {
                continue;
            }
            if let Err(brk) = s.verifier.check_head(head.next_seq(), &head.head()) {
                s.fault = Some(StreamFault::Chain { brk, at: None });
            } else if s.verifier.last_offset() != head.last_offset() {
                s.fault = Some(StreamFault::Frame(ReadError::Inconsistent {
                    at: 0,
                    location: Some(Location {
                        partition,
                        seq: head.next_seq(),
                    }),
                    detail: format!(
                        "the header says partition {partition} ends at offset {:?}, its chain ends at offset {:?}",
                        head.last_offset(),
                        s.verifier.last_offset()
                    ),
                }));
            }
        }
        for (partition, s) in &mut checks {
            if s.fault.is_none() && header.stream(*partition).is_none() {
                s.fault = Some(StreamFault::Frame(ReadError::Inconsistent {
                    at: 0,
                    location: Some(Location {
                        partition: *partition,
                        seq: 0,
                    }),
                    detail: format!(
                        "partition {partition} has entry frames but the header lists no head for it"
                    ),
                }));
            }
        }
    }
    let streams = checks
        .into_iter()
        .map(|(partition, s)| {
            let entries = s.verifier.next_seq();
            ExportStreamReport {
                partition,
                entries,
                head: entries.checked_sub(1).map(|last| (last, s.verifier.head())),
                fault: s.fault,
            }
        })
        .collect();
    Ok(ExportReport {
        header,
        streams,
        faults,
        trailer,
        bytes: reader.bytes_read(),
    })
}

// ---------------------------------------------------------------------------
// Importing
// ---------------------------------------------------------------------------

/// Why an import failed. Nothing of a failed import should be kept.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The export is unreadable or damaged.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A chain link does not verify.
    #[error("{brk} (export byte {at})")]
    Broken {
        /// The break.
        brk: ChainBreak,
        /// Byte offset of the entry frame (or of the trailer, for a head
        /// check at the end).
        at: u64,
    },
    /// Re-applying the export does not reproduce it.
    #[error("export byte {at}: batch {batch_no}: {detail}")]
    Differs {
        /// Byte offset of the batch frame.
        at: u64,
        /// The batch.
        batch_no: u64,
        /// The entry concerned, when there is one.
        location: Option<Location>,
        /// What differs.
        detail: String,
    },
    /// The target ledger is not new and empty.
    #[error(
        "ledger {} already holds entries or batches; an export is imported into a new ledger only",
        .dir.display()
    )]
    NotEmpty {
        /// The ledger folder.
        dir: PathBuf,
    },
    /// The ledger's state machine refused a record (a bug: verified
    /// entries are always accepted).
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Writing the new ledger failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImportError {
    /// Whether the export is damaged (as opposed to unreadable, or a
    /// failure of the target).
    pub fn is_damage(&self) -> bool {
        match self {
            ImportError::Read(e) => e.is_damage(),
            ImportError::Broken { .. } | ImportError::Differs { .. } => true,
            _ => false,
        }
    }
}

/// What [`import_export`] built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// The heads of the new ledger (equal to the header's).
    pub streams: Vec<ChainHead>,
    /// Entries imported.
    pub entries: u64,
    /// Batches imported.
    pub batches: u64,
    /// Bytes of the export read.
    pub bytes: u64,
}

/// A batch frame being imported and its entries' exported hashes.
struct ImportBatch {
    record: BatchRecord,
    at: u64,
    records: Vec<Record>,
    hashes: Vec<(Hash, u64)>,
}

/// Imports an export into `store`, which must be a new, empty ledger of
/// the export's topic. Verifies every link per stream as it reads,
/// re-applies each batch frame's records through
/// [`LedgerState::apply_batch`] (so verdicts and fingerprints are
/// recomputed exactly as ingestion computed them), checks the recomputed
/// entries and fingerprints equal the exported ones, and writes each batch
/// with [`Store::write_batch`]. At the end the heads equal the header's.
/// On error the store holds a partial ledger: the caller discards it.
/// `progress` is called with the number of entries read so far.
pub fn import_export<R: Read>(
    reader: &mut ExportReader<R>,
    store: &Store,
    mut progress: impl FnMut(u64),
) -> Result<ImportSummary, ImportError> {
    let header = reader.header().clone();
    if store.topic() != header.topic {
        return Err(StoreError::TopicMismatch {
            dir: store.dir().to_path_buf(),
            expected: header.topic.clone(),
            found: store.topic().to_owned(),
        }
        .into());
    }
    if store.next_batch_no()? != 0 || !store.heads()?.is_empty() {
        return Err(ImportError::NotEmpty {
            dir: store.dir().to_path_buf(),
        });
    }
    let mut state = store.new_state()?;
    let mut verifiers: BTreeMap<i32, ChainVerifier> = BTreeMap::new();
    let mut current: Option<ImportBatch> = None;
    while let Some(item) = reader.next() {
        match item? {
            ExportItem::Batch(record) => {
                if let Some(batch) = current.take() {
                    apply(&mut state, store, batch)?;
                }
                current = Some(ImportBatch {
                    record,
                    at: reader.frame_start(),
                    records: Vec::new(),
                    hashes: Vec::new(),
                });
            }
            ExportItem::Entry(entry) => {
                let at = reader.frame_start();
                let partition = entry.record.partition;
                verifiers
                    .entry(partition)
                    .or_insert_with(|| {
                        ChainVerifier::new(StreamId::new(header.topic.clone(), partition))
                    })
                    .push(&entry)
                    .map_err(|brk| ImportError::Broken { brk, at })?;
                // The reader only yields entries listed by a batch frame.
                if let Some(batch) = current.as_mut() {
                    batch.hashes.push((entry.hash, at));
                    batch.records.push(entry.record);
                }
                progress(reader.entries_read());
            }
        }
    }
    if let Some(batch) = current.take() {
        apply(&mut state, store, batch)?;
    }
    let end = reader.bytes_read();
    for head in &header.streams {
        let partition = head.stream().partition;
        let fresh;
        let verifier = match verifiers.get(&partition) {
            Some(v) => v,
            None => {
                fresh = ChainVerifier::new(head.stream().clone());
                &fresh
            }
        };
        verifier
            .check_head(head.next_seq(), &head.head())
            .map_err(|brk| ImportError::Broken { brk, at: end })?;
    }
    let streams = store.heads()?;
    if streams != header.streams {
        let first = streams
            .iter()
            .map(Some)
            .chain(std::iter::repeat(None))
            .zip(
                header
                    .streams
                    .iter()
                    .map(Some)
                    .chain(std::iter::repeat(None)),
            )
            .take(streams.len().max(header.streams.len()))
            .find(|(a, b)| a != b);
        return Err(ImportError::Differs {
            at: end,
            batch_no: header.batches.saturating_sub(1),
            location: None,
            detail: format!(
                "the imported ledger's heads differ from the header's: first difference {first:?}"
            ),
        });
    }
    Ok(ImportSummary {
        streams,
        entries: reader.entries_read(),
        batches: header.batches,
        bytes: reader.bytes_read(),
    })
}

/// Re-applies one exported batch and writes it.
fn apply(state: &mut LedgerState, store: &Store, batch: ImportBatch) -> Result<(), ImportError> {
    let ImportBatch {
        record,
        at,
        records,
        hashes,
    } = batch;
    let differs = |location: Option<Location>, detail: String| ImportError::Differs {
        at,
        batch_no: record.batch_no,
        location,
        detail,
    };
    let write = state.apply_batch(records, store)?;
    store.check_derived(state)?;
    if write.batch_no != record.batch_no || write.entries.len() != hashes.len() {
        return Err(differs(
            None,
            format!(
                "re-applied as batch {} with {} entries, the export has batch {} with {} entries",
                write.batch_no,
                write.entries.len(),
                record.batch_no,
                hashes.len()
            ),
        ));
    }
    for (entry, (hash, entry_at)) in write.entries.iter().zip(&hashes) {
        if entry.hash != *hash {
            return Err(ImportError::Differs {
                at: *entry_at,
                batch_no: record.batch_no,
                location: Some(Location {
                    partition: entry.record.partition,
                    seq: entry.seq,
                }),
                detail: format!(
                    "{} seq {} (offset {}): recomputed hash {} differs from the exported {}",
                    entry.record.stream(),
                    entry.seq,
                    entry.record.offset,
                    entry.hash.short(),
                    hash.short()
                ),
            });
        }
    }
    if write.fingerprints != record.fingerprints {
        let i = write
            .fingerprints
            .iter()
            .zip(&record.fingerprints)
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| write.fingerprints.len().min(record.fingerprints.len()));
        return Err(differs(
            record
                .fingerprints
                .get(i)
                .or(write.fingerprints.get(i))
                .map(|(_, l)| *l),
            format!(
                "identity fingerprints differ from the exported ones at index {i}: exported {:?}, recomputed {:?} (the batch frame was altered)",
                record.fingerprints.get(i),
                write.fingerprints.get(i)
            ),
        ));
    }
    store.write_batch(&write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{BreakKind, TimestampType};
    use crate::generate::Generator;
    use crate::ledger::Verdict;
    use proptest::prelude::*;
    use std::path::Path;

    const TOPIC: &str = "deal-events";

    /// Records over `partitions` partitions, interleaved, with offset gaps:
    /// mostly valid deal events, some junk, a duplicate and a tombstone.
    fn records(n: usize, partitions: i32, seed: u64) -> Vec<Record> {
        let mut generator = Generator::new(4, seed);
        let mut offsets = vec![0i64; partitions as usize];
        let mut first = None;
        (0..n)
            .map(|i| {
                let partition = (i as i32 * 7 + 3) % partitions;
                let offset = &mut offsets[partition as usize];
                *offset += 1 + (i as i64 % 3);
                let value = match i % 9 {
                    4 => Some(b"not json".to_vec()),
                    7 => None,
                    8 => first.clone(),
                    _ => Some(generator.next_event().to_json()),
                };
                if first.is_none() {
                    first = value.clone();
                }
                Record {
                    topic: TOPIC.into(),
                    partition,
                    offset: *offset,
                    timestamp_type: TimestampType::CreateTime,
                    timestamp_ms: 1_795_000_000_000 + i as i64,
                    key: Some(format!("deal-{}", i % 5).into_bytes()),
                    value,
                    headers: vec![chain::Header {
                        name: "h".into(),
                        value: (i % 2 == 0).then(|| vec![i as u8]),
                    }],
                }
            })
            .collect()
    }

    /// A ledger in a temporary folder with batches of these sizes.
    fn ledger(batches: &[usize], partitions: i32) -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("ledger"), TOPIC).unwrap();
        let total = batches.iter().sum();
        let mut all = records(total, partitions, 5).into_iter();
        let mut state = LedgerState::new(TOPIC);
        for &size in batches {
            let batch: Vec<Record> = all.by_ref().take(size).collect();
            let write = state.apply_batch(batch, &store).unwrap();
            store.write_batch(&write).unwrap();
        }
        (tmp, store)
    }

    fn export_bytes(store: &Store) -> Vec<u8> {
        let (bytes, summary) = export_store(store, Vec::new(), |_| {}).unwrap();
        assert_eq!(summary.bytes, bytes.len() as u64);
        bytes
    }

    fn verify_bytes(bytes: &[u8]) -> Result<ExportReport, ReadError> {
        let mut reader = ExportReader::with_len(bytes, bytes.len() as u64)?;
        verify_export(&mut reader, |_| {})
    }

    fn verify_stream(bytes: &[u8]) -> Result<ExportReport, ReadError> {
        // Unknown length: the checks must not depend on it.
        let mut reader = ExportReader::new(bytes)?;
        verify_export(&mut reader, |_| {})
    }

    fn items(bytes: &[u8]) -> Vec<(u64, ExportItem)> {
        let mut reader = ExportReader::new(bytes).unwrap();
        let mut out = Vec::new();
        while let Some(item) = reader.next() {
            out.push((reader.frame_start(), item.unwrap()));
        }
        assert!(reader.trailer().is_some());
        out
    }

    /// Imports `bytes` into a new ledger under `dir`.
    fn import_bytes(bytes: &[u8], dir: &Path) -> Result<(Store, ImportSummary), ImportError> {
        let mut reader = ExportReader::with_len(bytes, bytes.len() as u64)?;
        let store = Store::open(dir, &reader.header().topic.clone())?;
        let summary = import_export(&mut reader, &store, |_| {})?;
        Ok((store, summary))
    }

    fn verdicts(store: &Store) -> Vec<(Location, Verdict)> {
        store.verdicts().map(Result::unwrap).collect()
    }

    fn batches(store: &Store) -> Vec<BatchRecord> {
        store.batches(0).map(Result::unwrap).collect()
    }

    /// Rewrites an export item by item with `edit`, with a valid trailer
    /// (what an attacker who understands the format would do).
    fn rewrite(
        bytes: &[u8],
        header: impl FnOnce(&mut ExportHeader),
        mut edit: impl FnMut(ExportItem) -> Vec<ExportItem>,
    ) -> Vec<u8> {
        let mut reader = ExportReader::new(bytes).unwrap();
        let mut h = reader.header().clone();
        header(&mut h);
        let mut writer = ExportWriter::new(Vec::new(), &h).unwrap();
        for item in reader.by_ref() {
            for item in edit(item.unwrap()) {
                match item {
                    ExportItem::Batch(b) => writer.write_batch(&b).unwrap(),
                    ExportItem::Entry(e) => writer.write_entry(&e).unwrap(),
                }
            }
        }
        writer.finish().unwrap().0
    }

    #[test]
    fn export_round_trips_in_ledger_order_and_import_reproduces_the_store() {
        let (_tmp, store) = ledger(&[5, 1, 30, 12, 9], 3);
        let bytes = export_bytes(&store);
        assert_eq!(&bytes[..8], b"DLEDGEX\n");
        assert_eq!(&bytes[8..12], &[0, 0, 0, 1]);

        let header = ExportReader::new(bytes.as_slice())
            .unwrap()
            .header()
            .clone();
        assert_eq!(header.topic, TOPIC);
        assert_eq!(header.streams, store.heads().unwrap());
        assert_eq!(header.entries, 57);
        assert_eq!(header.batches, 5);

        // Frames come in ledger order: each batch, then its runs' entries.
        let items = items(&bytes);
        let mut expected = Vec::new();
        for record in batches(&store) {
            expected.push(ExportItem::Batch(record.clone()));
            for run in &record.runs {
                for seq in run.first_seq..run.first_seq + u64::from(run.count) {
                    let location = Location {
                        partition: run.partition,
                        seq,
                    };
                    expected.push(ExportItem::Entry(store.entry(location).unwrap().unwrap()));
                }
            }
        }
        let got: Vec<ExportItem> = items.into_iter().map(|(_, i)| i).collect();
        assert_eq!(got, expected);

        let report = verify_bytes(&bytes).unwrap();
        assert!(report.is_intact(), "{report:#?}");
        assert_eq!(report.streams.len(), 3);
        assert_eq!(report.bytes, bytes.len() as u64);
        for (s, head) in report.streams.iter().zip(store.heads().unwrap()) {
            assert_eq!(s.entries, head.next_seq());
            assert_eq!(s.head, Some((head.next_seq() - 1, head.head())));
        }
        assert!(verify_stream(&bytes).unwrap().is_intact());

        // The trailer hash is the plain blake3 of everything before the trailer.
        let cut = bytes.len() - TRAILER_FRAME_BYTES;
        assert_eq!(bytes[cut], TAG_TRAILER);
        assert_eq!(
            &bytes[bytes.len() - HASH_LEN..],
            blake3::hash(&bytes[..cut]).as_bytes()
        );

        let tmp = tempfile::tempdir().unwrap();
        let (imported, summary) = import_bytes(&bytes, &tmp.path().join("copy")).unwrap();
        assert_eq!(summary.entries, 57);
        assert_eq!(summary.batches, 5);
        assert_eq!(imported.heads().unwrap(), store.heads().unwrap());
        assert_eq!(batches(&imported), batches(&store));
        assert_eq!(verdicts(&imported), verdicts(&store));
        assert!(
            verdicts(&store)
                .iter()
                .any(|(_, v)| v.kind() == Some("duplicate"))
        );
        assert!(imported.verify().unwrap().is_intact());
        // Exporting the copy gives the same bytes: an export is a pure
        // function of the ledger.
        assert_eq!(export_bytes(&imported), bytes);
    }

    #[test]
    fn an_empty_ledger_exports_and_imports() {
        let (_tmp, store) = ledger(&[], 1);
        let bytes = export_bytes(&store);
        let report = verify_bytes(&bytes).unwrap();
        assert!(report.is_intact() && report.streams.is_empty());
        let tmp = tempfile::tempdir().unwrap();
        let (imported, summary) = import_bytes(&bytes, tmp.path()).unwrap();
        assert_eq!(summary.entries, 0);
        assert!(imported.heads().unwrap().is_empty());
    }

    #[test]
    fn a_stale_batch_without_runs_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), TOPIC).unwrap();
        let mut state = LedgerState::new(TOPIC);
        let all = records(4, 1, 1);
        for batch in [all.clone(), all[..2].to_vec()] {
            let write = state.apply_batch(batch, &store).unwrap();
            store.write_batch(&write).unwrap();
        }
        let bytes = export_bytes(&store);
        assert!(verify_bytes(&bytes).unwrap().is_intact());
        let out = tempfile::tempdir().unwrap();
        let (imported, _) = import_bytes(&bytes, out.path()).unwrap();
        assert_eq!(batches(&imported), batches(&store));
        assert!(batches(&imported)[1].runs.is_empty());
    }

    #[test]
    fn foreign_newer_and_empty_files_are_refused() {
        let (_tmp, store) = ledger(&[3], 1);
        let bytes = export_bytes(&store);
        let open = |b: &[u8]| ExportReader::new(b).map(|_| ()).unwrap_err();

        let e = open(b"");
        assert!(matches!(e, ReadError::NotAnExport { .. }));
        assert_eq!(
            e.to_string(),
            "not a dealledger export: it starts with nothing (the file is empty), not with the magic bytes \"DLEDGEX\\n\""
        );
        let e = open(b"PK\x03\x04 a zip file");
        assert_eq!(
            e.to_string(),
            "not a dealledger export: it starts with \"PK\\x03\\x04 a z\", not with the magic bytes \"DLEDGEX\\n\""
        );
        assert!(matches!(open(b"DLE"), ReadError::Truncated { .. }));

        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&2u32.to_be_bytes());
        let e = open(&newer);
        assert!(!e.is_damage());
        assert_eq!(
            e.to_string(),
            "export has format version 2, newer than the version 1 this dealledger reads: use a newer dealledger"
        );
        let mut zero = bytes.clone();
        zero[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(open(&zero), ReadError::InvalidVersion));

        let mut huge = bytes.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            open(&huge).to_string(),
            format!(
                "export byte 12: the header has length 4294967295, more than the limit {MAX_HEADER_BYTES}"
            )
        );
    }

    #[test]
    fn the_header_is_checked() {
        let (_tmp, store) = ledger(&[6], 2);
        let bytes = export_bytes(&store);
        let len = u32::from_be_bytes(bytes[12..16].try_into().unwrap()) as usize;
        let json: serde_json::Value = serde_json::from_slice(&bytes[16..16 + len]).unwrap();
        let with_header = |json: &serde_json::Value| {
            let text = serde_json::to_vec(json).unwrap();
            let mut out = bytes[..12].to_vec();
            out.extend_from_slice(&(text.len() as u32).to_be_bytes());
            out.extend_from_slice(&text);
            out.extend_from_slice(&bytes[16 + len..]);
            out
        };
        let reason = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut j = json.clone();
            edit(&mut j);
            match ExportReader::new(with_header(&j).as_slice()) {
                Err(ReadError::BadHeader { at: 16, reason }) => reason,
                other => panic!("{:?}", other.map(|r| r.header().clone())),
            }
        };
        assert!(reason(&|j| j["extra"] = 1.into()).contains("unknown field `extra`"));
        assert!(reason(&|j| j["format_version"] = 2.into()).contains("format_version is 2"));
        assert!(reason(&|j| j["entries"] = 5.into()).contains("entries is 5"));
        assert!(reason(&|j| j["streams"][0]["head_hash"] = "zz".into()).contains("head_hash"));
        assert!(reason(&|j| j["streams"][0]["partition"] = 70000.into()).contains("0..=65535"));
        assert!(reason(&|j| j["streams"][1]["partition"] = 0.into()).contains("ascending"));
        assert!(reason(&|j| j["streams"][0]["head_seq"] = 0.into()).contains("head_seq"));
        assert!(reason(&|j| j["topic"] = "".into()).contains("topic"));
        // The unchanged header still reads.
        ExportReader::new(with_header(&json).as_slice()).unwrap();
    }

    #[test]
    fn every_truncation_is_unreadable_and_names_where() {
        let (_tmp, store) = ledger(&[4, 3], 2);
        let bytes = export_bytes(&store);
        for cut in 0..bytes.len() {
            for result in [verify_bytes(&bytes[..cut]), verify_stream(&bytes[..cut])] {
                let error = result.unwrap_err();
                assert!(!error.is_damage(), "cut {cut}: {error}");
                assert!(
                    matches!(
                        error,
                        ReadError::Truncated { .. }
                            | ReadError::MissingTrailer { .. }
                            | ReadError::NotAnExport { .. }
                    ),
                    "cut {cut}: {error}"
                );
            }
        }
        // The message names the frame.
        let (start, entry) = items(&bytes)
            .into_iter()
            .find_map(|(at, item)| match item {
                ExportItem::Entry(e) => Some((at, e)),
                _ => None,
            })
            .unwrap();
        let cut = start as usize + 20;
        let msg = verify_stream(&bytes[..cut]).unwrap_err().to_string();
        let need = chain::encode_entry(&entry).len() + 5;
        assert_eq!(
            msg,
            format!(
                "export truncated at byte {cut} inside an entry frame of partition {} seq 0 (which starts at byte {start} and needs {need} bytes)",
                entry.record.partition
            )
        );
        let with_len = verify_bytes(&bytes[..cut]).unwrap_err().to_string();
        assert!(
            with_len.starts_with(&format!(
                "export truncated at byte {cut} inside an entry frame"
            )),
            "{with_len}"
        );
    }

    #[test]
    fn every_flipped_byte_is_detected_and_entry_damage_is_located() {
        let (_tmp, store) = ledger(&[4, 7, 2], 3);
        let bytes = export_bytes(&store);
        // Byte ranges of every entry frame's body and the entry there.
        let frames = items(&bytes);
        let mut bodies = Vec::new();
        for (i, (start, item)) in frames.iter().enumerate() {
            if let ExportItem::Entry(e) = item {
                let end = frames
                    .get(i + 1)
                    .map_or(bytes.len() - TRAILER_FRAME_BYTES, |(s, _)| *s as usize);
                bodies.push((*start as usize + 5..end, e.clone()));
            }
        }
        for at in 0..bytes.len() {
            for mask in [0x01u8, 0x80] {
                let mut damaged = bytes.clone();
                damaged[at] ^= mask;
                let report = match verify_bytes(&damaged) {
                    Err(_) => continue,
                    Ok(report) => report,
                };
                assert!(!report.is_intact(), "flip at {at} went unnoticed");
                if let Some((_, entry)) = bodies.iter().find(|(r, _)| r.contains(&at)) {
                    let partition = entry.record.partition;
                    let stream = report
                        .streams
                        .iter()
                        .find(|s| s.partition == partition)
                        .unwrap();
                    let fault = stream.fault.as_ref().unwrap_or_else(|| {
                        panic!("flip at {at}: no fault in partition {partition}: {report:#?}")
                    });
                    assert_eq!(fault.seq(), entry.seq, "flip at {at}: {fault}");
                }
            }
        }
    }

    #[test]
    fn a_flipped_value_byte_is_a_hash_mismatch_at_its_entry() {
        let (_tmp, store) = ledger(&[10], 2);
        let bytes = export_bytes(&store);
        let (start, entry) = items(&bytes)
            .into_iter()
            .filter_map(|(at, item)| match item {
                ExportItem::Entry(e) if e.seq == 2 => Some((at as usize, e)),
                _ => None,
            })
            .next()
            .unwrap();
        let value = entry.record.value.clone().unwrap();
        let frame = &bytes[start..];
        let in_frame = frame
            .windows(value.len())
            .position(|w| w == value.as_slice())
            .unwrap();
        let mut damaged = bytes.clone();
        damaged[start + in_frame + 3] ^= 0x20;
        let report = verify_bytes(&damaged).unwrap();
        let stream = report
            .streams
            .iter()
            .find(|s| s.partition == entry.record.partition)
            .unwrap();
        let fault = stream.fault.as_ref().unwrap();
        assert!(
            matches!(fault, StreamFault::Chain { brk, at: Some(at) }
                if matches!(*brk.kind, BreakKind::HashMismatch { .. }) && *at == start as u64),
            "{fault}"
        );
        assert_eq!(fault.offset(), Some(entry.record.offset));
        assert_eq!(stream.entries, 2);
        assert!(fault.to_string().starts_with(&format!(
            "deal-events/{} seq 2 (offset {}): hash mismatch",
            entry.record.partition, entry.record.offset
        )));
        assert!(
            report
                .faults
                .iter()
                .any(|f| matches!(f, ReadError::TrailerHashMismatch { .. }))
        );

        // Import refuses it at the same place and says where.
        let tmp = tempfile::tempdir().unwrap();
        let error = import_bytes(&damaged, &tmp.path().join("x")).unwrap_err();
        assert!(error.is_damage());
        assert!(
            matches!(&error, ImportError::Broken { brk, at } if brk.seq == 2 && *at == start as u64),
            "{error}"
        );
    }

    #[test]
    fn rewritten_exports_are_caught() {
        let (_tmp, store) = ledger(&[6, 6], 2);
        let bytes = export_bytes(&store);

        // An entry frame deleted (trailer recomputed): the batch frame
        // lists another entry where it was.
        let mut skipped = None;
        let deleted = rewrite(
            &bytes,
            |_| {},
            |item| match item {
                ExportItem::Entry(e) if skipped.is_none() && e.seq == 1 => {
                    skipped = Some(e.record.partition);
                    vec![]
                }
                other => vec![other],
            },
        );
        let report = verify_bytes(&deleted).unwrap();
        let partition = skipped.unwrap();
        let fault = report.streams[partition as usize].fault.as_ref().unwrap();
        assert_eq!(fault.seq(), 1, "{fault}");
        assert!(
            matches!(fault, StreamFault::Frame(ReadError::Misplaced { listed, .. })
                if *listed == Location { partition, seq: 1 }),
            "{fault}"
        );
        assert!(
            fault
                .to_string()
                .contains("entry moved, altered, inserted or deleted")
        );

        // The header's heads rewritten: the chain ends elsewhere.
        let lying = rewrite(
            &bytes,
            |h| {
                let s = &h.streams[1];
                h.streams[1] = ChainHead::resume(
                    s.stream().clone(),
                    s.next_seq(),
                    s.last_offset(),
                    Hash([7; 32]),
                )
                .unwrap();
            },
            |item| vec![item],
        );
        let report = verify_bytes(&lying).unwrap();
        assert!(report.faults.is_empty());
        let fault = report.streams[1].fault.as_ref().unwrap();
        assert!(
            matches!(fault, StreamFault::Chain { brk, at: None } if matches!(*brk.kind, BreakKind::HeadHashMismatch { .. })),
            "{fault}"
        );
        let tmp = tempfile::tempdir().unwrap();
        assert!(
            import_bytes(&lying, &tmp.path().join("x"))
                .unwrap_err()
                .is_damage()
        );

        // Fingerprints altered: the chain verifies, import refuses.
        let forged = rewrite(
            &bytes,
            |_| {},
            |item| match item {
                ExportItem::Batch(mut b) => {
                    if let Some(fp) = b.fingerprints.first_mut() {
                        fp.0 ^= 1;
                    }
                    vec![ExportItem::Batch(b)]
                }
                other => vec![other],
            },
        );
        assert!(verify_bytes(&forged).unwrap().is_intact());
        let error = import_bytes(&forged, &tmp.path().join("y")).unwrap_err();
        assert!(
            matches!(error, ImportError::Differs { batch_no: 0, .. }),
            "{error}"
        );

        // Batch frames swapped.
        let mut held = None;
        let swapped = rewrite(
            &bytes,
            |_| {},
            |item| match item {
                ExportItem::Batch(b) if b.batch_no == 0 => {
                    held = Some(b);
                    vec![]
                }
                other => vec![other],
            },
        );
        let _ = held;
        let error = verify_bytes(&swapped).unwrap_err_or_report();
        assert!(
            error.contains("expected batch 0") || error.contains("before the first batch frame"),
            "{error}"
        );

        // An extra entry frame appended to the last batch.
        let last = store
            .entry(Location {
                partition: 0,
                seq: 0,
            })
            .unwrap()
            .unwrap();
        let mut n = 0;
        let extra = rewrite(
            &bytes,
            |_| {},
            |item| {
                n += 1;
                if n == 14 {
                    vec![item, ExportItem::Entry(last.clone())]
                } else {
                    vec![item]
                }
            },
        );
        let report = verify_bytes(&extra).unwrap();
        assert!(!report.is_intact());
        assert!(
            report
                .faults
                .iter()
                .any(|f| f.to_string().contains("entry inserted")),
            "{report:#?}"
        );
    }

    /// Test helper: the message of an error, or of the report's first
    /// problem.
    trait Described {
        fn unwrap_err_or_report(self) -> String;
    }

    impl Described for Result<ExportReport, ReadError> {
        fn unwrap_err_or_report(self) -> String {
            match self {
                Err(e) => e.to_string(),
                Ok(r) => r
                    .faults
                    .first()
                    .map(ToString::to_string)
                    .or_else(|| {
                        r.streams
                            .iter()
                            .find_map(|s| s.fault.as_ref().map(ToString::to_string))
                    })
                    .expect("a problem"),
            }
        }
    }

    #[test]
    fn trailing_bytes_and_bad_frames_are_unreadable() {
        let (_tmp, store) = ledger(&[3], 1);
        let bytes = export_bytes(&store);
        let mut long = bytes.clone();
        long.push(0);
        for result in [verify_bytes(&long), verify_stream(&long)] {
            let e = result.unwrap_err();
            assert!(matches!(e, ReadError::TrailingBytes { at } if at == bytes.len() as u64));
        }
        // An unknown tag where the first batch frame should be.
        let header_end = {
            let reader = ExportReader::new(bytes.as_slice()).unwrap();
            reader.bytes_read() as usize
        };
        let mut tag = bytes.clone();
        tag[header_end] = b'X';
        let e = verify_bytes(&tag).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "export byte {header_end}: unknown frame tag 0x58, expected B, E or T (damaged framing)"
            )
        );
        // An entry frame claiming the largest size, in a short file.
        let frames = items(&bytes);
        let (entry_at, _) = frames[1];
        let mut claim = bytes.clone();
        let at = entry_at as usize + 1;
        claim[at..at + 4].copy_from_slice(&(MAX_ENTRY_FRAME_BYTES as u32).to_be_bytes());
        assert!(matches!(
            verify_bytes(&claim).unwrap_err(),
            ReadError::Truncated { .. }
        ));
        assert!(matches!(
            verify_stream(&claim).unwrap_err(),
            ReadError::Truncated { .. }
        ));
        claim[at..at + 4].copy_from_slice(&(MAX_ENTRY_FRAME_BYTES as u32 + 1).to_be_bytes());
        assert!(matches!(
            verify_stream(&claim).unwrap_err(),
            ReadError::TooLong { .. }
        ));
    }

    #[test]
    fn import_refuses_a_ledger_that_is_not_empty() {
        let (_tmp, store) = ledger(&[3], 1);
        let bytes = export_bytes(&store);
        let (_tmp2, other) = ledger(&[2], 1);
        let mut reader = ExportReader::new(bytes.as_slice()).unwrap();
        let error = import_export(&mut reader, &other, |_| {}).unwrap_err();
        assert!(matches!(error, ImportError::NotEmpty { .. }), "{error}");
    }

    #[test]
    fn a_broken_ledger_is_not_exported() {
        let (tmp, store) = ledger(&[5], 1);
        let dir = store.dir().to_path_buf();
        drop(store);
        {
            let db = sled::open(&dir).unwrap();
            let tree = db.open_tree(crate::store::TREE_NAME).unwrap();
            // The last byte (of the hash) of entry 3 of partition 0, in the
            // page holding it (docs/FORMAT.md, "Entry pages").
            let mut prefix = vec![b'E'];
            prefix.extend_from_slice(&0u32.to_be_bytes());
            let mut last = prefix.clone();
            last.extend_from_slice(&3u64.to_be_bytes());
            let (key, page) = tree.range(prefix..=last).next_back().unwrap().unwrap();
            let first_seq = u64::from_be_bytes(key[5..].try_into().unwrap());
            let mut at = 5;
            for _ in first_seq..=3 {
                at += 4 + u32::from_be_bytes(page[at..at + 4].try_into().unwrap()) as usize;
            }
            let mut value = page.to_vec();
            value[at - 1] ^= 1;
            tree.insert(key, value).unwrap();
            db.flush().unwrap();
        }
        let store = loop {
            match Store::open_existing(&dir) {
                Err(StoreError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                other => break other.unwrap(),
            }
        };
        let error = export_store(&store, Vec::new(), |_| {}).unwrap_err();
        assert!(error.is_damage());
        assert!(error.to_string().contains("deal-events/0 seq 3"), "{error}");
        drop(tmp);
    }

    #[test]
    fn format_md_documents_the_limits() {
        let doc = include_str!("../docs/FORMAT.md");
        let section = doc
            .split("## Export format")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .unwrap();
        for number in [
            MAX_HEADER_BYTES,
            MAX_BATCH_FRAME_BYTES,
            MAX_ENTRY_FRAME_BYTES,
            TRAILER_BODY_BYTES,
            TRAILER_FRAME_BYTES,
        ] {
            let text = number
                .to_string()
                .as_bytes()
                .rchunks(3)
                .rev()
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(",");
            assert!(section.contains(&text), "FORMAT.md should give {text}");
        }
        assert!(section.contains("DLEDGEX"));
    }

    proptest! {
        #[test]
        fn prop_arbitrary_input_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..300), keep in 0usize..400) {
            let (_tmp, store) = ledger(&[3], 2);
            let bytes = export_bytes(&store);
            let mut input = bytes[..keep.min(bytes.len())].to_vec();
            input.extend_from_slice(&tail);
            let _ = verify_bytes(&input);
            let _ = verify_stream(&input);
        }

        #[test]
        fn prop_edited_exports_never_verify_or_panic(
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>(), 0u8..3), 1..5),
        ) {
            let (_tmp, store) = ledger(&[4, 2], 2);
            let bytes = export_bytes(&store);
            let mut input = bytes.clone();
            for (at, byte, op) in edits {
                if input.is_empty() { break; }
                let at = at.index(input.len());
                match op {
                    0 => input[at] = byte,
                    1 => input.insert(at, byte),
                    _ => { input.remove(at); }
                }
            }
            if input != bytes {
                if let Ok(report) = verify_bytes(&input) {
                    prop_assert!(!report.is_intact());
                }
                let tmp = tempfile::tempdir().unwrap();
                prop_assert!(import_bytes(&input, &tmp.path().join("x")).is_err());
            }
        }
    }
}
