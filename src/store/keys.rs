//! The ledger's sled keys and the small values stored under them (heads,
//! batch records): their byte encodings, as `docs/FORMAT.md` specifies.

use super::*;

/// A partition as its key bytes (u32 BE). Partitions are never negative.
pub(super) fn partition_bytes(partition: i32) -> [u8; 4] {
    assert!(
        partition >= 0,
        "partition {partition} is negative; Kafka partitions never are"
    );
    (partition as u32).to_be_bytes()
}

fn location_key(family: u8, partition: i32, seq: u64) -> [u8; LOCATION_KEY_LEN] {
    let mut key = [0u8; LOCATION_KEY_LEN];
    key[0] = family;
    key[1..5].copy_from_slice(&partition_bytes(partition));
    key[5..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The key of the entry page of `partition` whose first entry is `first_seq`.
pub(super) fn page_key(partition: i32, first_seq: u64) -> [u8; LOCATION_KEY_LEN] {
    location_key(FAMILY_ENTRY, partition, first_seq)
}

/// Parses an `E` key into its page's first seq (the partition is the
/// caller's prefix).
pub(super) fn parse_page_key(key: &[u8]) -> Option<u64> {
    parse_location_key(FAMILY_ENTRY, key).map(|l| l.seq)
}

pub(super) fn verdict_key(location: Location) -> [u8; LOCATION_KEY_LEN] {
    location_key(FAMILY_VERDICT, location.partition, location.seq)
}

/// The prefix of all `E` keys of a partition.
pub(super) fn entry_prefix(partition: i32) -> [u8; HEAD_KEY_LEN] {
    let mut key = [0u8; HEAD_KEY_LEN];
    key[0] = FAMILY_ENTRY;
    key[1..].copy_from_slice(&partition_bytes(partition));
    key
}

pub(super) fn head_key(partition: i32) -> [u8; HEAD_KEY_LEN] {
    let mut key = entry_prefix(partition);
    key[0] = FAMILY_HEAD;
    key
}

pub(super) fn batch_key(batch_no: u64) -> [u8; BATCH_KEY_LEN] {
    let mut key = [0u8; BATCH_KEY_LEN];
    key[0] = FAMILY_BATCH;
    key[1..].copy_from_slice(&batch_no.to_be_bytes());
    key
}

pub(super) fn meta_key(name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(FAMILY_META);
    key.extend_from_slice(name);
    key
}

/// Reads a partition from 4 key or value bytes; `None` above `i32::MAX`.
pub(super) fn read_partition(bytes: &[u8]) -> Option<i32> {
    let raw = u32::from_be_bytes(bytes.try_into().ok()?);
    i32::try_from(raw).ok()
}

/// Parses an `E` or `V` key into its location.
pub(super) fn parse_location_key(family: u8, key: &[u8]) -> Option<Location> {
    if key.len() != LOCATION_KEY_LEN || key[0] != family {
        return None;
    }
    Some(Location {
        partition: read_partition(&key[1..5])?,
        seq: u64::from_be_bytes(key[5..].try_into().ok()?),
    })
}

/// Parses an `H` key into its partition.
pub(super) fn parse_head_key(key: &[u8]) -> Option<i32> {
    if key.len() != HEAD_KEY_LEN || key[0] != FAMILY_HEAD {
        return None;
    }
    read_partition(&key[1..])
}

/// Parses a `B` key into its batch number.
pub(super) fn parse_batch_key(key: &[u8]) -> Option<u64> {
    if key.len() != BATCH_KEY_LEN || key[0] != FAMILY_BATCH {
        return None;
    }
    Some(u64::from_be_bytes(key[1..].try_into().ok()?))
}

/// Encodes a stream head (`H` value).
pub(super) fn encode_head(head: &ChainHead) -> [u8; HEAD_VALUE_LEN] {
    let mut out = [0u8; HEAD_VALUE_LEN];
    out[..8].copy_from_slice(&head.next_seq().to_be_bytes());
    if let Some(offset) = head.last_offset() {
        out[8] = 1;
        out[9..17].copy_from_slice(&offset.to_be_bytes());
    }
    out[17..].copy_from_slice(head.head().as_bytes());
    out
}

/// Decodes a stream head (`H` value) of `stream`; the error says what is wrong.
pub(super) fn decode_head(stream: StreamId, bytes: &[u8]) -> Result<ChainHead, String> {
    if bytes.len() != HEAD_VALUE_LEN {
        return Err(format!(
            "stored head is {} bytes, expected {HEAD_VALUE_LEN}",
            bytes.len()
        ));
    }
    let next_seq = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let offset = i64::from_be_bytes(bytes[9..17].try_into().expect("8 bytes"));
    let last_offset = match bytes[8] {
        0 if offset == 0 => None,
        0 => {
            return Err(format!(
                "stored head has no last offset but offset bytes {offset} (expected 0)"
            ));
        }
        1 => Some(offset),
        other => {
            return Err(format!(
                "stored head has last-offset presence byte {other}, expected 0 or 1"
            ));
        }
    };
    let hash = Hash(bytes[17..].try_into().expect("32 bytes"));
    ChainHead::resume(stream, next_seq, last_offset, hash).map_err(|e| e.to_string())
}

/// One run of a batch: consecutive entries of one partition in ledger order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The partition.
    pub partition: i32,
    /// Seq of the run's first entry.
    pub first_seq: u64,
    /// Number of entries (at least 1).
    pub count: u32,
}

/// A stored batch record (`B` key): what one [`Store::write_batch`] added,
/// in ledger order, and the identity fingerprints it recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    /// The batch number (from 0, without gaps).
    pub batch_no: u64,
    /// The batch's entries as runs, in ledger order.
    pub runs: Vec<Run>,
    /// `(fingerprint, first location)` of the identities the batch recorded.
    pub fingerprints: Vec<(u64, Location)>,
}

impl BatchRecord {
    /// Number of entries the batch holds.
    pub fn entry_count(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.count)).sum()
    }
}

/// Splits a batch's entries (in ledger order) into runs.
pub(super) fn runs_of(entries: &[Entry]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for entry in entries {
        let partition = entry.record.partition;
        match runs.last_mut() {
            Some(run)
                if run.partition == partition
                    && run.first_seq + u64::from(run.count) == entry.seq
                    && run.count < u32::MAX =>
            {
                run.count += 1;
            }
            _ => runs.push(Run {
                partition,
                first_seq: entry.seq,
                count: 1,
            }),
        }
    }
    runs
}

/// Encodes a batch record (`B` value).
pub(super) fn encode_batch_record(runs: &[Run], fingerprints: &[(u64, Location)]) -> Vec<u8> {
    assert!(runs.len() <= MAX_BATCH_RUNS);
    assert!(fingerprints.len() <= MAX_BATCH_FINGERPRINTS);
    let mut out = Vec::with_capacity(
        1 + 4 + runs.len() * RUN_BYTES + 4 + fingerprints.len() * FINGERPRINT_BYTES,
    );
    out.push(BATCH_RECORD_FORMAT);
    out.extend_from_slice(&(runs.len() as u32).to_be_bytes());
    for run in runs {
        out.extend_from_slice(&partition_bytes(run.partition));
        out.extend_from_slice(&run.first_seq.to_be_bytes());
        out.extend_from_slice(&run.count.to_be_bytes());
    }
    out.extend_from_slice(&(fingerprints.len() as u32).to_be_bytes());
    for (fp, location) in fingerprints {
        out.extend_from_slice(&fp.to_be_bytes());
        out.extend_from_slice(&partition_bytes(location.partition));
        out.extend_from_slice(&location.seq.to_be_bytes());
    }
    out
}

/// Decodes a batch record (`B` value); the error says what is wrong.
pub(super) fn decode_batch_record(batch_no: u64, bytes: &[u8]) -> Result<BatchRecord, String> {
    let mut at = 0usize;
    let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
        if bytes.len() - at < n {
            return Err(format!(
                "record ends inside {what} at byte {at} (needs {n} bytes, {} remain)",
                bytes.len() - at
            ));
        }
        at += n;
        Ok(&bytes[at - n..at])
    };
    let format = take(1, "the format byte")?[0];
    if format != BATCH_RECORD_FORMAT {
        return Err(format!(
            "record has format {format}, this build reads {BATCH_RECORD_FORMAT}"
        ));
    }
    let u32_at = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    let u64_at = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    let run_count = u32_at(take(4, "the run count")?) as usize;
    if run_count > MAX_BATCH_RUNS {
        return Err(format!(
            "record has {run_count} runs, more than MAX_BATCH_RUNS ({MAX_BATCH_RUNS})"
        ));
    }
    let mut runs = Vec::with_capacity(run_count);
    for i in 0..run_count {
        let raw = take(RUN_BYTES, "a run")?;
        let partition = read_partition(&raw[..4])
            .ok_or_else(|| format!("run {i} has partition above i32::MAX"))?;
        let run = Run {
            partition,
            first_seq: u64_at(&raw[4..12]),
            count: u32_at(&raw[12..]),
        };
        if run.count == 0 {
            return Err(format!("run {i} (partition {partition}) has no entries"));
        }
        runs.push(run);
    }
    let fp_count = u32_at(take(4, "the fingerprint count")?) as usize;
    if fp_count > MAX_BATCH_FINGERPRINTS {
        return Err(format!(
            "record has {fp_count} fingerprints, more than MAX_BATCH_FINGERPRINTS ({MAX_BATCH_FINGERPRINTS})"
        ));
    }
    let mut fingerprints = Vec::with_capacity(fp_count);
    for i in 0..fp_count {
        let raw = take(FINGERPRINT_BYTES, "a fingerprint")?;
        let partition = read_partition(&raw[8..12])
            .ok_or_else(|| format!("fingerprint {i} has partition above i32::MAX"))?;
        fingerprints.push((
            u64_at(&raw[..8]),
            Location {
                partition,
                seq: u64_at(&raw[12..]),
            },
        ));
    }
    if at != bytes.len() {
        return Err(format!(
            "record has {} trailing bytes from byte {at}",
            bytes.len() - at
        ));
    }
    Ok(BatchRecord {
        batch_no,
        runs,
        fingerprints,
    })
}
