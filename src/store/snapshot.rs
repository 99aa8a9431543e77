//! Snapshots of the derived state: files in `snapshots/` that a restart
//! starts from instead of genesis; writing, reading and checking them.

use super::*;

/// Family byte of snapshot keys.
pub(super) const FAMILY_SNAPSHOT: u8 = b'S';

/// Format byte at the start of every snapshot (`S` value).
pub const SNAPSHOT_FORMAT: u8 = 6;

/// Snapshots kept: the newest, and the one before it as a fallback.
pub const SNAPSHOTS_KEPT: usize = 2;

/// Largest snapshot written or read. The state grows with deals and
/// distinct events (a 1M-event, 10k-deal ledger's is 72 MB, see
/// docs/FORMAT.md); a larger state is not snapshotted (logged), and a
/// larger stored value is damage.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 31;

/// Context string of a snapshot's checksum (blake3 derive_key mode).
pub const SNAPSHOT_CONTEXT: &str = "dealledger 2026-11 snapshot v1";

/// Bytes of one head in a snapshot: partition, then the `H` value.
const SNAPSHOT_HEAD_BYTES: usize = 4 + HEAD_VALUE_LEN;

/// Bytes of one collided identity's location in a snapshot: partition, seq.
const SNAPSHOT_LOCATION_BYTES: usize = 4 + 8;

/// Longest string (collided `source` or `id`) a snapshot may hold: the
/// CloudEvents attribute limit, in UTF-8 bytes.
const MAX_SNAPSHOT_STRING_BYTES: usize = 4 * crate::event::limits::MAX_ATTRIBUTE_CHARS;

/// Folder of the snapshot files, in the ledger folder.
pub const SNAPSHOT_DIR_NAME: &str = "snapshots";

/// File name of the snapshot taken after `batch_no`.
pub(super) fn snapshot_file_name(batch_no: u64) -> String {
    format!("after-batch-{batch_no:020}.snapshot")
}

/// The batch number in a snapshot's file name; `None` for any other file
/// (an unfinished `.partial` one among them).
pub(super) fn parse_snapshot_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix("after-batch-")?
        .strip_suffix(".snapshot")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Removes what a snapshot write that was interrupted (a crash, a full
/// disk) left in `folder`: `.partial` files, never read.
fn remove_partial_snapshots(dir: &Path, folder: &Path) -> Result<(), StoreError> {
    let listing = fs::read_dir(folder).map_err(|e| io_error(dir, "listing the snapshots", e))?;
    for item in listing {
        let item = item.map_err(|e| io_error(dir, "listing the snapshots", e))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".partial") {
            fs::remove_file(item.path()).map_err(|e| {
                io_error(dir, format!("removing the unfinished snapshot {name}"), e)
            })?;
        }
    }
    Ok(())
}

/// Key of a snapshot in the sled trees where earlier versions kept them.
#[cfg(test)]
pub(super) fn snapshot_key(batch_no: u64) -> [u8; BATCH_KEY_LEN] {
    let mut key = batch_key(batch_no);
    key[0] = FAMILY_SNAPSHOT;
    key
}

/// Encodes `state` as a snapshot in memory; see [`encode_snapshot_to`].
#[cfg(test)]
pub(super) fn encode_snapshot(state: &LedgerState) -> Vec<u8> {
    let mut out = io::Cursor::new(Vec::new());
    encode_snapshot_to(state, &mut out).expect("writing to memory cannot fail");
    out.into_inner()
}

/// Writes `state` as a snapshot (the bytes of docs/FORMAT.md, section
/// "Snapshots") to `file`, from its start, checksum included, and returns
/// its size. Deterministic: the same state gives the same bytes. Streamed:
/// no copy of the state's largest parts is held in memory: the deals are
/// written one JSON at a time, the index is encoded once, its length (which
/// comes first) written as a placeholder and filled in once known
/// ([`write_framed`]); the checksum is computed by reading the bytes back
/// ([`append_checksum`]), which costs less than a second encoding pass.
fn encode_snapshot_to<F>(state: &LedgerState, file: &mut F) -> io::Result<u64>
where
    F: io::Read + io::Write + io::Seek,
{
    use std::io::{Seek, Write};
    let mut collided: Vec<(&(String, String), Location)> = state.collided().collect();
    collided.sort_unstable();

    file.seek(io::SeekFrom::Start(0))?;
    let mut out = io::BufWriter::with_capacity(SNAPSHOT_WRITE_BUFFER_BYTES, &mut *file);
    out.write_all(&[SNAPSHOT_FORMAT])?;
    out.write_all(&state.entry_count().to_be_bytes())?;
    out.write_all(&(state.heads().len() as u32).to_be_bytes())?;
    for (partition, head) in state.heads() {
        out.write_all(&partition_bytes(*partition))?;
        out.write_all(&encode_head(head))?;
    }
    out.write_all(&(collided.len() as u32).to_be_bytes())?;
    for ((source, id), location) in collided {
        for text in [source, id] {
            out.write_all(&(text.len() as u32).to_be_bytes())?;
            out.write_all(text.as_bytes())?;
        }
        out.write_all(&partition_bytes(location.partition))?;
        out.write_all(&location.seq.to_be_bytes())?;
    }
    // The deals one by one, each its own JSON: a reader holds one at a time.
    let book = state.book();
    out.write_all(&(book.len() as u64).to_be_bytes())?;
    let mut json = Vec::new();
    for (_, deal) in book.iter() {
        json.clear();
        serde_json::to_writer(&mut json, &deal).map_err(io::Error::other)?;
        let len = u32::try_from(json.len())
            .map_err(|_| io::Error::other(format!("deal {} has over 4 GiB of JSON", deal.id)))?;
        out.write_all(&len.to_be_bytes())?;
        out.write_all(&json)?;
    }
    // Streamed from the amendment set, in increasing order: no copy.
    let amendments = state.book().amendments();
    let count = amendments.len() as u64;
    out.write_all(&count.to_be_bytes())?;
    let mut written = 0u64;
    for fp in amendments.sorted() {
        out.write_all(&fp.to_be_bytes())?;
        written += 1;
    }
    if written != count {
        return Err(listed_short(
            "the amendment set",
            written,
            count,
            amendments.failure(),
        ));
    }
    write_framed(&mut out, |out| {
        let mut failed = None;
        state.index().encode_in_pieces(|piece| {
            if failed.is_none()
                && let Err(e) = out.write_all(piece)
            {
                failed = Some(e);
            }
        });
        failed.map_or(Ok(()), Err)
    })?;
    // A spilled history segment that could not be read was encoded as no
    // items: such an encoding is never finished.
    if let Some(failure) = state.index().segment_failure() {
        return Err(io::Error::other(failure.to_string()));
    }
    // Streamed from the identity index, in increasing order: no copy.
    // Last, so that a restore reads the list when the book's and the
    // index's encodings are gone.
    let identities = state.identities() as u64;
    out.write_all(&identities.to_be_bytes())?;
    let mut written = 0u64;
    for (fp, location) in state.fingerprints() {
        out.write_all(&fp.to_be_bytes())?;
        out.write_all(&partition_bytes(location.partition))?;
        out.write_all(&location.seq.to_be_bytes())?;
        written += 1;
    }
    if written != identities {
        return Err(listed_short(
            "the identity index",
            written,
            identities,
            state.identity_failure(),
        ));
    }
    let end = out.stream_position()?;
    out.into_inner().map_err(io::IntoInnerError::into_error)?;
    append_checksum(file, end)
}

/// The error of a snapshot whose list of fingerprints from `what` (on
/// disk) came out short, `written` of `count`: a read failed, and `failure`
/// (kept by `what`) says which.
fn listed_short(
    what: &str,
    written: u64,
    count: u64,
    failure: Option<&ledger::ScratchFailure>,
) -> io::Error {
    io::Error::other(format!(
        "{what} gave {written} of its {count} fingerprints: {}",
        failure.map_or_else(|| "no failure recorded".to_string(), ToString::to_string)
    ))
}

/// Writes a `u64` big-endian length, then what `body` writes, and sets the
/// length to that of the body once it is known (by seeking back).
fn write_framed<W: io::Write + io::Seek>(
    out: &mut io::BufWriter<W>,
    body: impl FnOnce(&mut io::BufWriter<W>) -> io::Result<()>,
) -> io::Result<()> {
    use std::io::{Seek, Write};
    let at = out.stream_position()?;
    out.write_all(&0u64.to_be_bytes())?;
    body(out)?;
    let end = out.stream_position()?;
    let len = end - at - 8;
    out.seek(io::SeekFrom::Start(at))?;
    out.write_all(&len.to_be_bytes())?;
    out.seek(io::SeekFrom::Start(end))?;
    Ok(())
}

/// Reads back the `len` bytes `file` holds from its start, appends their
/// snapshot checksum (blake3, derived key [`SNAPSHOT_CONTEXT`]) and returns
/// the size of the whole.
fn append_checksum<F: io::Read + io::Write + io::Seek>(file: &mut F, len: u64) -> io::Result<u64> {
    file.seek(io::SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new_derive_key(SNAPSHOT_CONTEXT);
    let mut buf = vec![0u8; SNAPSHOT_WRITE_BUFFER_BYTES];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the snapshot file ended {left} bytes short of the {len} just written"),
            ));
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    file.seek(io::SeekFrom::Start(len))?;
    file.write_all(hasher.finalize().as_bytes())?;
    Ok(len + HASH_LEN as u64)
}

/// Buffer between a snapshot's encoder and its file, and for reading it
/// back for the checksum.
const SNAPSHOT_WRITE_BUFFER_BYTES: usize = 1 << 20;

/// The reason given for a snapshot whose checksum does not match.
fn checksum_mismatch() -> SnapshotFault {
    SnapshotFault::Invalid("its checksum does not match its contents (damaged)".into())
}

/// Feeds what is written to a hasher (draining a damaged snapshot's rest).
struct HashingSink<'a>(&'a mut blake3::Hasher);

impl io::Write for HashingSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Read buffer for snapshot files.
const SNAPSHOT_READ_BUFFER_BYTES: usize = 1024 * 1024;

/// Reads a snapshot file front to back, streaming: only one part (one
/// deal's JSON, the query index) is held as bytes at a time, never the
/// whole file. Every error says what is wrong. The checksum covers the
/// whole body and is checked at the end ([`SnapshotReader::finish`]); a
/// part that fails to decode first is reported as a checksum failure when
/// the checksum fails too (damage is the likelier story).
struct SnapshotReader<R: io::Read> {
    input: R,
    hasher: blake3::Hasher,
    /// Body bytes read so far.
    pub(super) at: u64,
    /// The body's length: the file's minus the checksum.
    body_len: u64,
}

/// Why a snapshot was not read: damaged or foreign (the reason), or the
/// file could not be read (an I/O error, reported as such).
enum SnapshotFault {
    Invalid(String),
    Io(io::Error),
}

impl From<String> for SnapshotFault {
    fn from(reason: String) -> Self {
        SnapshotFault::Invalid(reason)
    }
}

impl<R: io::Read> SnapshotReader<R> {
    /// Checks the size and the format byte; positions after the format.
    pub(super) fn open(input: R, file_len: u64) -> Result<Self, SnapshotFault> {
        if file_len > MAX_SNAPSHOT_BYTES as u64 {
            return Err(format!(
                "it is {file_len} bytes, more than MAX_SNAPSHOT_BYTES ({MAX_SNAPSHOT_BYTES})"
            )
            .into());
        }
        let Some(body_len) = file_len.checked_sub(HASH_LEN as u64) else {
            return Err(format!("it is only {file_len} bytes long").into());
        };
        let mut reader = SnapshotReader {
            input,
            hasher: blake3::Hasher::new_derive_key(SNAPSHOT_CONTEXT),
            at: 0,
            body_len,
        };
        let format = reader.array::<1>("the format byte")?[0];
        if format != SNAPSHOT_FORMAT {
            return Err(reader.damage_or(format!(
                "it has format {format}, this build reads {SNAPSHOT_FORMAT}"
            )));
        }
        Ok(reader)
    }

    /// Decodes the rest with `decode`, then checks that the body ends
    /// there and that the checksum matches. A decoding error is reported as
    /// the checksum's failure when the checksum fails too.
    fn decode_all<T>(
        mut self,
        decode: impl FnOnce(&mut Self) -> Result<T, SnapshotFault>,
    ) -> Result<T, SnapshotFault> {
        let decoded = match decode(&mut self) {
            Ok(decoded) => decoded,
            Err(SnapshotFault::Invalid(reason)) => return Err(self.damage_or(reason)),
            Err(io) => return Err(io),
        };
        if self.at != self.body_len {
            let extra = self.body_len - self.at;
            return Err(self.damage_or(format!(
                "it has {extra} bytes after the identity fingerprints"
            )));
        }
        match self.checksum_matches() {
            Ok(true) => Ok(decoded),
            Ok(false) => Err(checksum_mismatch()),
            Err(e) => Err(e),
        }
    }

    /// `reason`, unless the checksum (read to the end) does not match:
    /// then the checksum failure.
    fn damage_or(&mut self, reason: String) -> SnapshotFault {
        let rest = self.body_len - self.at;
        let drained = io::copy(
            &mut io::Read::take(&mut self.input, rest),
            &mut HashingSink(&mut self.hasher),
        );
        match drained {
            Ok(n) if n == rest => {
                self.at = self.body_len;
                match self.checksum_matches() {
                    Ok(true) => SnapshotFault::Invalid(reason),
                    Ok(false) => checksum_mismatch(),
                    Err(io) => io,
                }
            }
            Ok(_) => SnapshotFault::Invalid(reason),
            Err(e) => SnapshotFault::Io(e),
        }
    }

    /// Reads the stored checksum (the body must be read) and compares.
    fn checksum_matches(&mut self) -> Result<bool, SnapshotFault> {
        debug_assert_eq!(self.at, self.body_len);
        let mut stored = [0u8; HASH_LEN];
        self.input
            .read_exact(&mut stored)
            .map_err(SnapshotFault::Io)?;
        Ok(self.hasher.finalize().as_bytes() == &stored)
    }

    /// The next `n` body bytes into `out`.
    pub(super) fn fill(&mut self, out: &mut [u8], what: &str) -> Result<(), SnapshotFault> {
        let n = out.len() as u64;
        let remain = self.body_len - self.at;
        if remain < n {
            return Err(format!(
                "it ends inside {what} at byte {} (needs {n} bytes, {remain} remain)",
                self.at
            )
            .into());
        }
        self.input.read_exact(out).map_err(SnapshotFault::Io)?;
        self.hasher.update(out);
        self.at += n;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], SnapshotFault> {
        let mut out = [0u8; N];
        self.fill(&mut out, what)?;
        Ok(out)
    }

    /// The next `n` body bytes, as a new vector (`n` was checked against
    /// the remaining length by [`SnapshotReader::count`]).
    pub(super) fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>, SnapshotFault> {
        let mut out = vec![0u8; n];
        self.fill(&mut out, what)?;
        Ok(out)
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32, SnapshotFault> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64, SnapshotFault> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A count of items of `size` bytes each, refused if they cannot fit.
    pub(super) fn count(
        &mut self,
        wide: bool,
        size: usize,
        what: &str,
    ) -> Result<usize, SnapshotFault> {
        let count = if wide {
            self.u64(&format!("the {what} count"))?
        } else {
            u64::from(self.u32(&format!("the {what} count"))?)
        };
        let remain = self.body_len - self.at;
        if count.saturating_mul(size as u64) > remain {
            return Err(format!(
                "it claims {count} {what}s, more than its {remain} remaining bytes can hold"
            )
            .into());
        }
        Ok(count as usize)
    }

    pub(super) fn location(&mut self, what: &str) -> Result<Location, SnapshotFault> {
        let partition = read_partition(&self.array::<4>(what)?)
            .ok_or_else(|| format!("{what} has a partition above i32::MAX"))?;
        Ok(Location {
            partition,
            seq: self.u64(what)?,
        })
    }

    /// The entry count and the heads, by partition.
    pub(super) fn heads(&mut self, topic: &str) -> Result<(u64, Vec<ChainHead>), SnapshotFault> {
        let entries = self.u64("the entry count")?;
        let count = self.count(false, SNAPSHOT_HEAD_BYTES, "head")?;
        let mut heads = Vec::with_capacity(count);
        for i in 0..count {
            let raw = self.array::<SNAPSHOT_HEAD_BYTES>("a head")?;
            let partition = read_partition(&raw[..4])
                .filter(|p| *p <= MAX_PARTITION)
                .ok_or_else(|| format!("head {i} has a partition outside 0..={MAX_PARTITION}"))?;
            let head = decode_head(StreamId::new(topic, partition), &raw[4..])
                .map_err(|reason| format!("head of partition {partition}: {reason}"))?;
            heads.push(head);
        }
        Ok((entries, heads))
    }

    /// Everything after the heads, as the parts of a state; the identity
    /// and amendment fingerprints go into `sets` as they are read.
    pub(super) fn rest(
        &mut self,
        segments: Option<&Arc<dyn SegmentStore>>,
        sets: FingerprintSets<'_>,
        topic: &str,
        batch_no: u64,
        entries: u64,
        heads: Vec<ChainHead>,
    ) -> Result<LedgerParts, SnapshotFault> {
        let FingerprintSets {
            identities,
            amendments: amendment_set,
        } = sets;
        let count = self.count(false, 4 + 4 + SNAPSHOT_LOCATION_BYTES, "collided identity")?;
        let mut collided = Vec::with_capacity(count);
        for _ in 0..count {
            let mut text = || -> Result<String, SnapshotFault> {
                let len = self.u32("a collided identity")? as usize;
                if len > MAX_SNAPSHOT_STRING_BYTES {
                    return Err(format!(
                        "a collided identity has a {len}-byte string, more than {MAX_SNAPSHOT_STRING_BYTES}"
                    )
                    .into());
                }
                let raw = self.bytes(len, "a collided identity")?;
                String::from_utf8(raw)
                    .map_err(|_| "a collided identity is not UTF-8".to_string().into())
            };
            let identity = (text()?, text()?);
            collided.push((identity, self.location("a collided identity")?));
        }
        // Deal by deal, each ended lock leaving memory as its deal is read:
        // the book's whole JSON (~100 MB at 3M events) and its ended locks
        // (~75 MB) were most of a restart's peak.
        let deals = self.count(true, 4 + 2, "deal")?;
        let mut book = DealBook::new();
        if let Some(store) = segments {
            book.store_ended_in(Arc::clone(store));
        }
        let mut json = Vec::new();
        for i in 0..deals {
            let len = self.count(false, 1, "deal byte")?;
            json.resize(len, 0);
            self.fill(&mut json, "a deal")?;
            let deal: Deal = serde_json::from_slice(&json)
                .map_err(|e| format!("deal {i} of its book does not decode: {e}"))?;
            book.insert_restored(deal)
                .map_err(|e| format!("its deal book: {e}"))?;
        }
        // Loaded as they are read, not held in a list (20 MB at 3M events).
        let count = self.count(true, 8, "amendment fingerprint")?;
        load_checked(
            count,
            |previous| {
                let fp = self.u64("an amendment fingerprint")?;
                match previous {
                    Some(p) if p >= fp => Err(SnapshotFault::Invalid(format!(
                        "amendment fingerprints out of order or repeated: {p:016x} before {fp:016x}"
                    ))),
                    _ => Ok(fp),
                }
            },
            |next| amendment_set.load_sorted_from(count, next),
        )?;
        let len = self.count(true, 1, "query index byte")?;
        let (index, used) =
            DealIndex::decode_spilling(&self.bytes(len, "the query index")?, segments)
                .map_err(|e| format!("its query index does not decode: {e}"))?;
        if used != len {
            return Err(format!("its query index has {} bytes after its end", len - used).into());
        }
        // Last, when the book's and the index's encodings are gone: at 3M
        // events the list is 72 MB.
        // Loaded as they are read, not held in a list.
        let count = self.count(true, FINGERPRINT_BYTES, "fingerprint")?;
        let by_partition: BTreeMap<i32, ChainHead> = heads
            .iter()
            .map(|h| (h.stream().partition, h.clone()))
            .collect();
        load_checked(
            count,
            |previous: Option<(u64, Location)>| {
                let fp = self.u64("a fingerprint")?;
                let location = self.location("a fingerprint")?;
                ledger::check_fingerprint(&by_partition, previous.map(|(p, _)| p), fp, location)
                    .map_err(|e| SnapshotFault::Invalid(e.0))?;
                Ok((fp, location))
            },
            |next| identities.load_sorted_from(count, next),
        )?;
        Ok(LedgerParts {
            topic: topic.to_owned(),
            heads,
            collided,
            book,
            index,
            next_batch: batch_no + 1,
            entries,
        })
    }
}

/// Hands `load` the `count` items `read` gives (each read knowing the one
/// before, to check their order), as `load` asks for them; stops at the
/// first fault and returns it. No list of them is ever held.
fn load_checked<T: Copy>(
    count: usize,
    mut read: impl FnMut(Option<T>) -> Result<T, SnapshotFault>,
    load: impl FnOnce(&mut dyn FnMut() -> Option<T>) -> usize,
) -> Result<(), SnapshotFault> {
    let mut fault = None;
    let mut previous = None;
    let mut taken = 0usize;
    let mut next = || {
        if taken == count || fault.is_some() {
            return None;
        }
        match read(previous) {
            Ok(item) => {
                previous = Some(item);
                taken += 1;
                Some(item)
            }
            Err(f) => {
                fault = Some(f);
                None
            }
        }
    };
    let loaded = load(&mut next);
    if let Some(fault) = fault {
        return Err(fault);
    }
    debug_assert_eq!(loaded, count);
    Ok(())
}

/// The empty sets a snapshot reader loads the fingerprints into as it reads
/// them ([`SnapshotReader::rest`]), never holding them in a list.
struct FingerprintSets<'a> {
    pub(super) identities: &'a mut dyn IdentityIndex,
    pub(super) amendments: &'a mut dyn AmendmentSet,
}

impl Store {
    /// The batch numbers of the stored snapshots, ascending.
    pub fn snapshot_batches(&self) -> Result<Vec<u64>, StoreError> {
        let folder = self.dir.join(SNAPSHOT_DIR_NAME);
        let listing = match fs::read_dir(&folder) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&self.dir, "listing the snapshots", e)),
        };
        let mut batches = Vec::new();
        for item in listing {
            let item = item.map_err(|e| io_error(&self.dir, "listing the snapshots", e))?;
            if let Some(batch_no) = item.file_name().to_str().and_then(parse_snapshot_file_name) {
                batches.push(batch_no);
            }
        }
        batches.sort_unstable();
        Ok(batches)
    }

    /// The file of the snapshot taken after `batch_no`.
    pub fn snapshot_path(&self, batch_no: u64) -> PathBuf {
        self.dir
            .join(SNAPSHOT_DIR_NAME)
            .join(snapshot_file_name(batch_no))
    }

    /// Stores a snapshot of `state`, the state after the last stored batch,
    /// as the file `snapshots/after-batch-<N>.snapshot` (N: that batch's
    /// number, 20 digits), keeps only the newest [`SNAPSHOTS_KEPT`]
    /// snapshots, and makes it durable: written to a temporary file,
    /// fsynced, renamed into place, folder fsynced. Returns `None`, writing
    /// nothing, for a ledger without batches, when a snapshot after the last
    /// batch is stored already, or (logged) when the state's encoding
    /// exceeds [`MAX_SNAPSHOT_BYTES`].
    ///
    /// A file, not a sled value: the state is streamed to disk as it is
    /// encoded, where a sled value needed the whole encoding in memory plus
    /// sled's own copies (measured: +300 MB of peak RSS at 1M events).
    ///
    /// # Panics
    /// If `state` is not the state of this ledger after its last stored
    /// batch (another batch number or other heads): a bug in the caller.
    pub fn write_snapshot(&self, state: &LedgerState) -> Result<Option<SnapshotStats>, StoreError> {
        assert!(
            state.keeps_query_index(),
            "write_snapshot: ledger {}: the state dropped its query index; only a full state is stored",
            self.dir.display()
        );
        let mut durability = self.lock_durability();
        if let Some(cause) = &durability.poisoned {
            return Err(StoreError::Poisoned {
                dir: self.dir.clone(),
                cause: cause.clone(),
            });
        }
        let stored_next = self.next_batch_no()?;
        assert_eq!(
            state.next_batch(),
            stored_next,
            "write_snapshot: ledger {}: the state is at batch {}, but the ledger's next batch is {stored_next}; snapshot the state of the last written batch",
            self.dir.display(),
            state.next_batch()
        );
        let stored_heads = self.heads()?;
        assert!(
            stored_heads.iter().eq(state.heads().values()),
            "write_snapshot: ledger {}: the state's chain heads are not the stored heads",
            self.dir.display()
        );
        let Some(batch_no) = stored_next.checked_sub(1) else {
            return Ok(None);
        };
        let taken = self.snapshot_batches()?;
        if taken.contains(&batch_no) && self.snapshot_format(batch_no)? == Some(SNAPSHOT_FORMAT) {
            return Ok(None);
        }
        // A snapshot of an older format at this batch is replaced below.
        let started = Instant::now();
        let folder = self.dir.join(SNAPSHOT_DIR_NAME);
        let created = match fs::create_dir(&folder) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_error(&self.dir, "creating the snapshots folder", e)),
        };
        if created {
            sync_path(&self.dir, &self.dir, "the ledger folder")?;
        } else {
            remove_partial_snapshots(&self.dir, &folder)?;
        }
        let path = self.snapshot_path(batch_no);
        let partial = folder.join(format!(".{}.partial", snapshot_file_name(batch_no)));
        let writing = format!("writing the snapshot after batch {batch_no}");
        let mut encode = Duration::ZERO;
        let bytes = (|| -> io::Result<u64> {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&partial)?;
            let bytes = encode_snapshot_to(state, &mut file)?;
            encode = started.elapsed();
            file.sync_all()?;
            Ok(bytes)
        })();
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = fs::remove_file(&partial);
                return Err(io_error(&self.dir, writing, e));
            }
        };
        if bytes > MAX_SNAPSHOT_BYTES as u64 {
            let _ = fs::remove_file(&partial);
            tracing::warn!(
                ledger = %self.dir.display(),
                bytes,
                "state after batch {batch_no} not snapshotted: over MAX_SNAPSHOT_BYTES ({MAX_SNAPSHOT_BYTES})"
            );
            return Ok(None);
        }
        let sync = started.elapsed() - encode;
        let started = Instant::now();
        fs::rename(&partial, &path).map_err(|e| io_error(&self.dir, writing.clone(), e))?;
        let drop_count = (taken.len() + 1).saturating_sub(SNAPSHOTS_KEPT);
        for old in taken.iter().filter(|b| **b != batch_no).take(drop_count) {
            match fs::remove_file(self.snapshot_path(*old)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io_error(
                        &self.dir,
                        format!("removing the snapshot after batch {old}"),
                        e,
                    ));
                }
            }
        }
        sync_path(&self.dir, &folder, "the snapshots folder")?;
        self.drop_sled_snapshots(&mut durability, batch_no)?;
        let stats = SnapshotStats {
            batch_no,
            bytes: bytes as usize,
            encode,
            sync,
            durable: started.elapsed(),
        };
        tracing::debug!(ledger = %self.dir.display(), ?stats, "snapshot written");
        Ok(Some(stats))
    }

    /// Removes the snapshots earlier versions kept in sled (the `snapshots`
    /// tree, and format 1 in the ledger's tree): never read now.
    fn drop_sled_snapshots(
        &self,
        durability: &mut Durability,
        batch_no: u64,
    ) -> Result<(), StoreError> {
        let sled = self.sled();
        let mut in_tree = sled::Batch::default();
        let mut in_snapshot_tree = sled::Batch::default();
        let mut any = false;
        for (tree, batch) in [
            (&sled.tree, &mut in_tree),
            (&sled.snapshots, &mut in_snapshot_tree),
        ] {
            for item in tree.scan_prefix([FAMILY_SNAPSHOT]) {
                let (key, _) = item.map_err(|e| self.sled_error("listing old snapshots", e))?;
                batch.remove(key);
                any = true;
            }
        }
        if !any {
            return Ok(());
        }
        let removed = self
            .sled()
            .tree
            .apply_batch(in_tree)
            .and_then(|()| sled.snapshots.apply_batch(in_snapshot_tree))
            .map_err(|e| self.sled_error("removing the snapshots kept in sled", e));
        if let Err(error) = removed {
            durability.poisoned = Some(error.to_string());
            return Err(error);
        }
        if let Err(error) = self.make_durable(durability, batch_no) {
            durability.poisoned = Some(error.to_string());
            return Err(error);
        }
        Ok(())
    }

    /// The format byte of the snapshot taken after `batch_no`, if stored.
    fn snapshot_format(&self, batch_no: u64) -> Result<Option<u8>, StoreError> {
        use std::io::Read;
        let mut first = [0u8; 1];
        match File::open(self.snapshot_path(batch_no)).and_then(|mut f| f.read(&mut first)) {
            Ok(1) => Ok(Some(first[0])),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(
                &self.dir,
                format!("reading the snapshot after batch {batch_no}"),
                e,
            )),
        }
    }

    /// Reads the snapshot taken after `batch_no` and restores its state,
    /// without checking it against the chain. `Ok(Err(reason))` when it is
    /// missing, damaged or does not fit together.
    pub fn read_snapshot(&self, batch_no: u64) -> Result<Result<LedgerState, String>, StoreError> {
        self.read_snapshot_with(batch_no, QueryIndex::Kept)
    }

    /// [`Store::read_snapshot`]; with [`QueryIndex::Dropped`] the query
    /// index is dropped at once and nothing is moved to a scratch file (the
    /// book keeps its ended locks in memory, as a replay from genesis does).
    fn read_snapshot_with(
        &self,
        batch_no: u64,
        index: QueryIndex,
    ) -> Result<Result<LedgerState, String>, StoreError> {
        let path = self.snapshot_path(batch_no);
        let size = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Err("it is not stored".into()));
            }
            Err(e) => {
                return Err(io_error(
                    &self.dir,
                    format!("reading the snapshot after batch {batch_no}"),
                    e,
                ));
            }
        };
        if size > MAX_SNAPSHOT_BYTES as u64 {
            return Ok(Err(format!(
                "{} is {size} bytes, over MAX_SNAPSHOT_BYTES ({MAX_SNAPSHOT_BYTES})",
                path.display()
            )));
        }
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                return Ok(Err(format!("cannot read {}: {e}", path.display())));
            }
        };
        let input = io::BufReader::with_capacity(SNAPSHOT_READ_BUFFER_BYTES, file);
        // The scratch file of the state to be, from the start (see `rest`).
        let segments: Option<Arc<dyn SegmentStore>> = match index {
            QueryIndex::Kept => Some(Arc::new(self.new_segment_file()?)),
            QueryIndex::Dropped => None,
        };
        // No size hint: the snapshot's count sizes it.
        let mut identities = self.new_identities(0)?;
        let mut amendment_set = self.new_amendment_set()?;
        let parts = SnapshotReader::open(input, size).and_then(|reader| {
            reader.decode_all(|reader| {
                let (entries, heads) = reader.heads(&self.topic)?;
                reader.rest(
                    segments.as_ref(),
                    FingerprintSets {
                        identities: &mut *identities,
                        amendments: &mut *amendment_set,
                    },
                    &self.topic,
                    batch_no,
                    entries,
                    heads,
                )
            })
        });
        Ok(match parts {
            Ok(parts) => {
                let mut state = LedgerState::restore(parts, identities, amendment_set)
                    .map_err(|e| e.to_string());
                if let Ok(state) = &mut state {
                    match segments {
                        Some(segments) => state.spill_history_to(segments),
                        None => state.drop_query_index(),
                    }
                    self.check_derived(state)?;
                }
                state
            }
            Err(SnapshotFault::Invalid(reason)) => Err(reason),
            Err(SnapshotFault::Io(e)) => Err(format!("cannot read {}: {e}", path.display())),
        })
    }

    /// Prepares a replay from the snapshot taken after `batch_no`: decodes
    /// and restores it, and checks each of its heads against the stored
    /// chain: the entry at the head's seq must be stored, hash to its stored
    /// hash, and have the head's hash and offset. Returns the state and a
    /// cursor per stream resuming at the snapshot's head, or
    /// `Ok(Err(reason))` when the snapshot cannot be used. An entry that does
    /// not hash to its stored hash is an error (a broken chain).
    pub(super) fn start_at_snapshot(
        &self,
        batch_no: u64,
        index: QueryIndex,
    ) -> Result<Result<SnapshotStart, String>, StoreError> {
        let next_batch = self.next_batch_no()?;
        if batch_no >= next_batch {
            return Ok(Err(format!(
                "it was taken after batch {batch_no}, but the ledger's last batch is {}",
                offset_text(next_batch.checked_sub(1).map(|b| b as i64))
            )));
        }
        let state = match self.read_snapshot_with(batch_no, index)? {
            Ok(state) => state,
            Err(reason) => return Ok(Err(reason)),
        };
        let mut cursors = BTreeMap::new();
        for (partition, head) in state.heads() {
            let partition = *partition;
            if let Some(last) = head.next_seq().checked_sub(1) {
                let location = Location {
                    partition,
                    seq: last,
                };
                let Some(entry) = self.entry(location)? else {
                    return Ok(Err(format!(
                        "its head of partition {partition} is the entry at seq {last}, which is not stored"
                    )));
                };
                let recomputed = chain::entry_hash(&entry.prev_hash, entry.seq, &entry.record);
                if recomputed != entry.hash {
                    return Err(self.chain_broken(&ChainBreak {
                        stream: head.stream().clone(),
                        seq: last,
                        offset: Some(entry.record.offset),
                        kind: Box::new(BreakKind::HashMismatch {
                            expected: recomputed,
                            found: entry.hash,
                        }),
                    }));
                }
                if entry.hash != head.head() || Some(entry.record.offset) != head.last_offset() {
                    return Ok(Err(format!(
                        "its head of partition {partition} (seq {last}, offset {}, hash {}) is not the stored entry there (offset {}, hash {})",
                        offset_text(head.last_offset()),
                        head.head().short(),
                        entry.record.offset,
                        entry.hash.short()
                    )));
                }
            }
            cursors.insert(
                partition,
                Cursor {
                    pages: PageCursor::at(self.sled(), partition, head.next_seq()).hashing(),
                    verifier: ChainVerifier::resume(head),
                },
            );
        }
        Ok(Ok((state, cursors)))
    }
}

/// A verdict's stored JSON, its reason cut to fit [`MAX_VERDICT_BYTES`].
pub(super) fn verdict_json(verdict: &Verdict) -> Vec<u8> {
    let json = serde_json::to_vec(verdict).expect("a verdict serializes");
    if json.len() <= MAX_VERDICT_BYTES {
        return json;
    }
    let Verdict::Rejected { kind, reason } = verdict else {
        unreachable!("only a rejection's reason can be long");
    };
    // Escaping grows a character to at most 6 bytes (`\u00XX`).
    let mut end = (MAX_VERDICT_BYTES / 2 / 6).min(reason.len());
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let cut = Verdict::Rejected {
        kind: kind.clone(),
        reason: format!("{}… (reason cut to fit MAX_VERDICT_BYTES)", &reason[..end]),
    };
    serde_json::to_vec(&cut).expect("a verdict serializes")
}

pub(super) fn offset_text(offset: Option<i64>) -> String {
    offset.map_or_else(|| "none".to_owned(), |o| o.to_string())
}
