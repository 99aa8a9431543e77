//! Durable storage of a ledger: chain entries, chain heads, batch records and
//! verdicts in one sled tree, written one atomic, fsynced batch at a time.
//!
//! Why this module exists: [`crate::ledger`] is a pure state machine that
//! says *what* one batch adds ([`BatchWrite`]); this shell makes exactly that
//! durable, all or nothing, and reads it back: for queries, for offline
//! verification ([`Store::verify`]) and for rebuilding the in-memory state on
//! restart ([`Store::load_state`]). Exactly-once ingestion rests on one rule:
//! a stream's head, which is also its Kafka consumer position, is written in
//! the same atomic batch as the entries it covers.
//!
//! # Layout
//!
//! One sled tree named [`TREE_NAME`], so one `apply_batch` is one atomic
//! write. Keys start with a family byte; the exact encodings are specified in
//! `docs/FORMAT.md`, section "Storage layout":
//!
//! - `M` + name: metadata (`format` = u32 BE [`STORE_FORMAT_VERSION`],
//!   `topic` = the topic's UTF-8). A ledger holds one topic.
//! - `E` + partition u32 BE + first seq u64 BE: a page of up to
//!   [`MAX_PAGE_ENTRIES`] consecutive entries of the partition (at most
//!   [`MAX_PAGE_BYTES`] unless it holds one larger entry; writers fill
//!   pages to [`PAGE_FILL_BYTES`]), each as [`chain::encode_entry`] bytes.
//!   Pages, not one key per entry, because sled 0.34's cost is per key, not
//!   per byte: every insert clones a tree node, so writing and memory grow
//!   with the number of keys. Pages are append-only: a batch's entries of a
//!   partition go into new pages, and a page is never rewritten (a stream's
//!   last page may be short; the next batch starts a new one). Readers keep
//!   an entry-level API ([`Store::entry`], [`Store::entries`]); there are no
//!   per-entry index keys.
//! - `H` + partition: the stream's head after the last batch (next seq, last
//!   offset, head hash); the next offset to consume is last offset + 1.
//! - `B` + batch number u64 BE: the batch's runs (ledger order across
//!   partitions) and identity fingerprints.
//! - `V` + partition + seq: the verdict as JSON, only when it is not
//!   `Accepted`; absence means accepted (it is written atomically with the
//!   entry, so absence cannot mean "not yet judged").
//! - Snapshots of the derived state are files in `snapshots/`, not sled
//!   values ([`Store::write_snapshot`]; at most [`SNAPSHOTS_KEPT`]), from
//!   which [`Store::load_state`] and replays start instead of genesis.
//!
//! # Durability: which fsyncs, and why
//!
//! sled 0.34's `Db::flush()` writes its log buffers with `pwrite` followed by
//! `sync_file_range` (spacejam/sled#1452, #1351). That survives a process
//! kill but not a power loss: `sync_file_range` neither flushes the drive's
//! volatile cache nor persists file metadata (such as the size of a `db` file
//! that just grew). sled's background flusher would `fsync`, but it runs on a
//! timer we disable (`flush_every_ms(None)`), because we need durability at a
//! known point: before the batch's offsets count as consumed. So after every
//! `apply_batch`, [`Store::write_batch`] does, in this order:
//!
//! 1. `fsync` every file that appeared in `blobs/` since the last batch, then
//!    `blobs/` itself. sled writes values and tree nodes larger than about
//!    128 KiB to `blobs/<lsn>` with plain `write`, never fsynced, while the
//!    log record pointing at the blob becomes durable with the log; a power
//!    loss could otherwise leave a durable pointer to a lost blob (sled then
//!    reports corruption). Doing this before step 2 keeps that window as
//!    small as we can from outside sled. The directory fsync makes the new
//!    directory entries themselves durable.
//! 2. `db.flush()`: moves sled's in-memory log buffers into the `db` file.
//! 3. `fsync` of `db` (a handle kept open for the store's lifetime): flushes
//!    the drive cache and the file's metadata, which `sync_file_range` does
//!    not. This is the fsync that makes the batch survive power loss.
//!
//! At open (and creation) the store also fsyncs `conf` (sled writes it once,
//! at creation, without fsync; sled#1229's fix is not in 0.34.7), `db`,
//! every existing blob, `blobs/`, the ledger folder (sled creates `db`,
//! `conf`, `blobs/` and renames `snap.*` snapshot files there while opening)
//! and, when the folder was just created, its parent. sled 0.34 creates or
//! renames files in the ledger folder only while opening, so no per-batch
//! fsync of the folder is needed (it would not be free: an fsync of the
//! unchanged folder measured 0.2 to 5 ms here, depending on other disk
//! traffic, about as much as steps 1-3 together).
//!
//! Power loss cannot be tested here; the tests check that a batch survives
//! a SIGKILL of the writing process right after `write_batch` returns.
//!
//! One process per ledger: sled takes an exclusive `flock` on `db` and we
//! report a second opener as [`StoreError::Locked`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;

mod keys;
mod open;
mod pages;
mod replay;
mod snapshot;
#[cfg(test)]
mod tests;
mod verify;

use keys::*;
pub use keys::{BatchRecord, Run};
use open::*;
use pages::*;
use replay::*;
pub use replay::{QueryIndex, ReplayFrom, Replayed, SnapshotStats};
use snapshot::*;
pub use snapshot::{
    MAX_SNAPSHOT_BYTES, SNAPSHOT_CONTEXT, SNAPSHOT_DIR_NAME, SNAPSHOT_FORMAT, SNAPSHOTS_KEPT,
};
pub use verify::{ProblemKind, StreamProblem, StreamReport, VerifyReport};

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::chain::{
    self, BreakKind, ChainBreak, ChainHead, ChainVerifier, DecodeEntryError, Entry, HASH_LEN, Hash,
    StreamId,
};
use crate::deal::{AmendmentSet, Deal, DealBook};
use crate::identities;
use crate::index::DealIndex;
use crate::index::SegmentStore;
use crate::ledger::{
    self, BatchWrite, IdentityIndex, LedgerParts, LedgerState, Location, MAX_BATCH_RECORDS,
    OriginalLookup, Outcome, Verdict,
};
use crate::segments;

/// Version of the storage layout (the `M format` key). Bump it whenever a
/// key family or value encoding changes. Version 2 stores entries in pages;
/// version 1 (one key per entry) is refused, see
/// [`StoreError::ObsoleteFormat`].
pub const STORE_FORMAT_VERSION: u32 = 2;

/// Name of the one sled tree holding the ledger.
pub const TREE_NAME: &str = "ledger";

/// Name of the sled tree where earlier versions kept format-2 snapshots
/// (`S` keys); snapshots are files now ([`SNAPSHOT_DIR_NAME`]), and the
/// next snapshot written removes what is left in this tree.
pub const SNAPSHOT_TREE_NAME: &str = "snapshots";

/// sled page-cache size: a real bound since sled is patched
/// (`third_party/sled/PATCHES.md`); besides it, at most 256 recent node
/// reads (~32 MB of leaves at worst) are not yet counted. Measured before
/// the patch (release, 2 cores): a 200,000-event ingest peaked at 215-247
/// MB RSS with 32 MiB and 234-261 MB with 64 MiB, at the same speed.
pub const CACHE_CAPACITY_BYTES: u64 = 32 * 1024 * 1024;

/// Format byte at the start of every entry page (`E` value).
pub const PAGE_FORMAT: u8 = 1;

/// Most entries in one page.
pub const MAX_PAGE_ENTRIES: usize = 32;

/// Largest page holding more than one entry, in bytes (header included):
/// the format's limit, which readers enforce. Writers fill pages only to
/// [`PAGE_FILL_BYTES`].
pub const MAX_PAGE_BYTES: usize = 64 * 1024;

/// How full a writer makes a page, in bytes (header included): a page is
/// closed before an entry that would take it over this size (or when it
/// holds [`MAX_PAGE_ENTRIES`]); an entry too large for that gets a page of
/// its own. Well below [`MAX_PAGE_BYTES`] because of how sled 0.34 stores
/// tree nodes: a leaf whose serialized size exceeds a quarter of sled's
/// 512 KiB segment is written to a file of its own in `blobs/` every time
/// sled rewrites it, which [`Store::write_batch`] must fsync. Upstream sled
/// splits leaves past 16 keys; 17 pages of 7 KiB stay under that, and our
/// patched sled splits past 4 (`third_party/sled/PATCHES.md`: a point read
/// pulls the whole leaf). With 64 KiB pages (about 32 entries of ~700
/// bytes) nearly every leaf became a blob. Measured with 17-key leaves
/// (release, 2 cores, 5,000-entry
/// batches of ~700-byte entries, `time_write_batch`): 64 KiB pages 110-123k
/// entries/s, 20 ms of each batch's fsyncs; 7 KiB pages 205-225k entries/s,
/// 1.5-2 ms; and a 200,000-event ingest peaked at 295-323 MB RSS with
/// 64 KiB pages, 221 MB with 7 KiB (one key per entry: 257-288 MB).
pub const PAGE_FILL_BYTES: usize = 7 * 1024;

/// Bytes of a page's header: format byte, u32 entry count.
const PAGE_HEADER_BYTES: usize = 1 + 4;

/// Bytes before each entry in a page: its u32 length.
const PAGE_LENGTH_BYTES: usize = 4;

/// Largest page of one entry: header, length, the largest stored entry.
const MAX_SINGLE_ENTRY_PAGE_BYTES: usize =
    PAGE_HEADER_BYTES + PAGE_LENGTH_BYTES + chain::MAX_ENCODED_ENTRY_BYTES;

/// Format byte at the start of every batch record (`B` value).
pub const BATCH_RECORD_FORMAT: u8 = 1;

/// Most runs in one batch record: every run holds at least one entry.
pub const MAX_BATCH_RUNS: usize = MAX_BATCH_RECORDS;

/// Most fingerprints in one batch record: at most one per entry.
pub const MAX_BATCH_FINGERPRINTS: usize = MAX_BATCH_RECORDS;

/// Largest stored verdict (`V` value). A reason may quote part of the event
/// (at most `event::limits::MAX_EVENT_BYTES`, 64 KiB, which JSON escaping can
/// grow sixfold), so 1 MiB is never reached in practice; a longer reason is
/// cut on write, and reading refuses more (a damaged value).
pub const MAX_VERDICT_BYTES: usize = 1024 * 1024;

/// Longest a dropped [`Store`] waits for sled to release the ledger's lock
/// (measured: well under a millisecond).
pub const MAX_LOCK_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// How often a dropped [`Store`] checks whether sled released the lock.
const LOCK_RELEASE_POLL: Duration = Duration::from_millis(1);

/// Highest partition the ledger supports: [`LedgerState`] packs a location
/// into 16 bits of partition and 48 of sequence.
pub const MAX_PARTITION: i32 = u16::MAX as i32;

/// How many entries [`Store::verify`] reads ahead into memory per round
/// (shared among the streams): about 35 MB of entry pages.
pub const VERIFY_ROUND_ENTRIES: u64 = 50_000;

/// Most threads [`Store::verify`] reads and hashes streams on (at most the
/// machine's cores).
pub const MAX_VERIFY_THREADS: usize = 4;

/// One stream's verification in progress, carried across
/// [`Store::verify`]'s rounds.
struct StreamCheck {
    partition: i32,
    verifier: ChainVerifier,
    problem: Option<StreamProblem>,
}

/// Whole pages of one stream read ahead for a verify round.
struct PagesRead {
    pages: Vec<RawPage>,
    /// The stream has no further pages.
    ended: bool,
}

/// Where a verify's read-ahead of one stream stands.
enum ReadPosition {
    /// Nothing read yet.
    Start,
    /// Pages read up to this page key.
    After(sled::IVec),
    /// Every page read.
    Done,
}

/// Family byte of metadata keys.
const FAMILY_META: u8 = b'M';
/// Family byte of entry keys.
const FAMILY_ENTRY: u8 = b'E';
/// Family byte of stream head keys.
const FAMILY_HEAD: u8 = b'H';
/// Family byte of batch record keys.
const FAMILY_BATCH: u8 = b'B';
/// Family byte of verdict keys.
const FAMILY_VERDICT: u8 = b'V';

/// Metadata name of the format version.
const META_FORMAT: &[u8] = b"format";
/// Metadata name of the topic.
const META_TOPIC: &[u8] = b"topic";

/// Length of an `E` or `V` key: family, partition, (first) seq.
const LOCATION_KEY_LEN: usize = 1 + 4 + 8;
/// Length of an `H` key: family, partition.
const HEAD_KEY_LEN: usize = 1 + 4;
/// Length of a `B` key: family, batch number.
const BATCH_KEY_LEN: usize = 1 + 8;
/// Length of an `H` value: next seq, last-offset presence and value, hash.
const HEAD_VALUE_LEN: usize = 8 + 1 + 8 + HASH_LEN;
/// Bytes of one run in a batch record: partition, first seq, count.
const RUN_BYTES: usize = 4 + 8 + 4;
/// Bytes of one fingerprint triple in a batch record: fp, partition, seq.
const FINGERPRINT_BYTES: usize = 8 + 4 + 8;

/// The hint every corruption message ends with.
const CORRUPT_HINT: &str = "run `dealledger verify` for a full report of the damage, or rebuild the ledger from the topic with `dealledger rebuild --from-kafka`";

/// Why a store operation failed. Every message names the ledger folder, and
/// where it applies the partition, seq and offset.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds sled's exclusive lock on the ledger.
    #[error(
        "ledger folder {} is in use by another dealledger process (sled allows one process per ledger): stop that process, or query the running daemon instead",
        .dir.display()
    )]
    Locked {
        /// The ledger folder.
        dir: PathBuf,
    },
    /// The path exists but is not a dealledger ledger (or, for
    /// [`Store::open_existing`], does not exist).
    #[error("{} is not a dealledger ledger: {reason}", .dir.display())]
    NotALedger {
        /// The folder.
        dir: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The ledger holds another topic.
    #[error(
        "ledger {} holds topic {found:?}, not {expected:?}: a ledger holds exactly one topic; use another folder for this topic",
        .dir.display()
    )]
    TopicMismatch {
        /// The ledger folder.
        dir: PathBuf,
        /// The topic asked for.
        expected: String,
        /// The topic stored in the ledger.
        found: String,
    },
    /// The ledger was written by an older dealledger in a storage format
    /// this one does not read (and does not convert).
    #[error(
        "ledger {} has storage format version {found}, written by an older dealledger; this dealledger reads version {supported} only and does not convert ledgers: rebuild it with `dealledger rebuild --from-kafka` or import an export of it (`dealledger import`)",
        .dir.display()
    )]
    ObsoleteFormat {
        /// The ledger folder.
        dir: PathBuf,
        /// The stored format version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The ledger was written by a newer dealledger.
    #[error(
        "ledger {} has storage format version {found}, but this dealledger reads version {supported} only: use a newer dealledger",
        .dir.display()
    )]
    UnsupportedFormat {
        /// The ledger folder.
        dir: PathBuf,
        /// The stored format version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The topic name cannot be a ledger's topic.
    #[error("cannot open ledger {} for topic {topic:?}: {reason}", .dir.display())]
    InvalidTopic {
        /// The ledger folder.
        dir: PathBuf,
        /// The topic asked for.
        topic: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Stored data is damaged or inconsistent.
    #[error("ledger {} is corrupt: {detail}; {CORRUPT_HINT}", .dir.display())]
    Corrupt {
        /// The ledger folder.
        dir: PathBuf,
        /// The damaged entry, when the damage is at one.
        location: Option<Location>,
        /// What is wrong, naming partition, seq and offset where known.
        detail: String,
    },
    /// The ledger's files cannot be opened: sled refused them or panicked
    /// reading them, or its database came back without the ledger's data.
    /// A ledger that cannot be opened is never replaced by a fresh one.
    #[error(
        "ledger {} cannot be opened: {detail}. {UNREADABLE_HINT}",
        .dir.display()
    )]
    Unreadable {
        /// The ledger folder.
        dir: PathBuf,
        /// What sled reported, or what is missing.
        detail: String,
    },
    /// The filesystem holding the ledger is full (or over quota).
    #[error(
        "ledger {}: the disk is full while {action} ({error}): free at least {} MiB on the filesystem holding {} (an estimate: twice the write that failed plus sled's working space), then start dealledger again; a batch whose write failed was not acknowledged and is read again from Kafka",
        .dir.display(),
        .needed_bytes.div_ceil(1024 * 1024),
        .dir.display()
    )]
    DiskFull {
        /// The ledger folder.
        dir: PathBuf,
        /// What was being done, e.g. `applying batch 11 (1000 entries)`.
        action: String,
        /// Free space needed to continue, estimated.
        needed_bytes: u64,
        /// The underlying error (`ENOSPC` or `EDQUOT`), quoted in the
        /// message (not a `source`, so it is not printed twice).
        error: io::Error,
    },
    /// A file-system operation failed.
    #[error("ledger {}: {action}: {source}", .dir.display())]
    Io {
        /// The ledger folder.
        dir: PathBuf,
        /// What was being done, e.g. `fsync of db`.
        action: String,
        /// The underlying error.
        source: io::Error,
    },
    /// sled failed (other than I/O or corruption).
    #[error("ledger {}: {action}: sled error: {source}", .dir.display())]
    Sled {
        /// The ledger folder.
        dir: PathBuf,
        /// What was being done.
        action: String,
        /// The underlying error.
        source: sled::Error,
    },
    /// An earlier write failed after it started; the on-disk state of that
    /// batch is unknown, so the store refuses further writes.
    #[error(
        "ledger {}: an earlier write failed and may be partly applied ({cause}); no further writes are accepted: restart dealledger, which reloads the ledger from disk",
        .dir.display()
    )]
    Poisoned {
        /// The ledger folder.
        dir: PathBuf,
        /// The earlier failure.
        cause: String,
    },
}

/// A [`StoreError::DiskFull`] of a write of `bytes` bytes needs twice
/// that (sled logs the batch, then rewrites the tree nodes it changed) plus
/// [`DISK_FULL_HEADROOM_BYTES`]; other errors pass unchanged.
fn needing(error: StoreError, bytes: usize) -> StoreError {
    match error {
        StoreError::DiskFull {
            dir, action, error, ..
        } => StoreError::DiskFull {
            dir,
            action,
            needed_bytes: (bytes as u64)
                .saturating_mul(2)
                .saturating_add(DISK_FULL_HEADROOM_BYTES),
            error,
        },
        other => other,
    }
}

/// What an unopenable ledger's error says to do.
const UNREADABLE_HINT: &str = "If the folder held a ledger, its files are damaged: rebuild the ledger from the topic into a new folder with `dealledger rebuild --from-kafka --data NEW_DIR` (or import an export with `dealledger import`) and use that folder instead; dealledger never starts a fresh ledger over one it cannot read";

/// Free space a full disk must regain beyond twice the failed write: sled
/// grows its `db` file by whole segments (512 KiB in sled 0.34) and needs a
/// few of them to open, recover and write.
pub const DISK_FULL_HEADROOM_BYTES: u64 = 4 * 512 * 1024;

/// Whether `error` says the filesystem is full or over quota.
fn is_disk_full(error: &io::Error) -> bool {
    /// `ENOSPC` and `EDQUOT` on Linux.
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(error.raw_os_error(), Some(ENOSPC | EDQUOT))
}

/// Converts a sled error into a [`StoreError`] for `dir`.
fn sled_error(dir: &Path, action: impl Into<String>, error: sled::Error) -> StoreError {
    let action = action.into();
    match error {
        sled::Error::Io(error) if is_disk_full(&error) => StoreError::DiskFull {
            dir: dir.to_path_buf(),
            action,
            needed_bytes: DISK_FULL_HEADROOM_BYTES,
            error,
        },
        // sled keeps large values in `blobs/<lsn>`; one that is gone is damage.
        sled::Error::Io(source) if source.kind() == io::ErrorKind::NotFound => {
            StoreError::Corrupt {
                dir: dir.to_path_buf(),
                location: None,
                detail: format!("a file of the sled database is missing while {action}: {source}"),
            }
        }
        // A file sled reads that ends early (a cut blob) is damage too.
        sled::Error::Io(source) if source.kind() == io::ErrorKind::UnexpectedEof => {
            StoreError::Corrupt {
                dir: dir.to_path_buf(),
                location: None,
                detail: format!(
                    "a file of the sled database is cut short while {action}: {source}"
                ),
            }
        }
        sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            dir: dir.to_path_buf(),
            location: None,
            detail: format!("sled reports corruption while {action} (at {at:?})"),
        },
        sled::Error::Io(source) => StoreError::Io {
            dir: dir.to_path_buf(),
            action,
            source,
        },
        other => StoreError::Sled {
            dir: dir.to_path_buf(),
            action,
            source: other,
        },
    }
}

/// Removes the scratch files of the derived state (identity index folders,
/// history segment files) that a process which died left in the ledger
/// folder `dir`. Only while holding the ledger's lock: a live one of this
/// process would go too.
fn remove_scratch_leftovers(dir: &Path) -> io::Result<()> {
    for item in fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(identities::FOLDER_PREFIX) {
            fs::remove_dir_all(item.path())?;
        } else if name.starts_with(segments::FILE_PREFIX) {
            fs::remove_file(item.path())?;
        }
    }
    Ok(())
}

fn io_error(dir: &Path, action: impl Into<String>, source: io::Error) -> StoreError {
    if is_disk_full(&source) {
        return StoreError::DiskFull {
            dir: dir.to_path_buf(),
            action: action.into(),
            needed_bytes: DISK_FULL_HEADROOM_BYTES,
            error: source,
        };
    }
    StoreError::Io {
        dir: dir.to_path_buf(),
        action: action.into(),
        source,
    }
}

fn corrupt(dir: &Path, location: Option<Location>, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        dir: dir.to_path_buf(),
        location,
        detail: detail.into(),
    }
}

// ---------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------

/// What one [`Store::write_batch`] wrote and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Entries written.
    pub entries: usize,
    /// Key and value bytes handed to sled (entries, heads, verdicts, batch record).
    pub bytes: usize,
    /// Building the sled batch and applying it (in memory).
    pub apply: Duration,
    /// Making it durable: blob fsyncs, `flush()`, fsync of `db`.
    pub durable: Duration,
}

/// Files kept open for fsync, and the writer's state. Behind a mutex, which
/// also serialises writers.
struct Durability {
    /// `db`, sled's one data file.
    db_file: File,
    /// Blob files already fsynced.
    synced_blobs: HashSet<OsString>,
    /// Set when a write failed after it started changing sled.
    poisoned: Option<String>,
}

/// sled's handles; dropped before [`Store`]'s drop waits for sled's lock.
struct Sled {
    db: sled::Db,
    tree: sled::Tree,
    snapshots: sled::Tree,
}

/// A ledger on disk: one folder, one sled database, one topic.
///
/// Dropping a store waits (up to [`MAX_LOCK_RELEASE_WAIT`]) until sled's
/// background threads have closed the database, so the same process can
/// reopen the ledger right away.
pub struct Store {
    dir: PathBuf,
    topic: String,
    /// sled's handles. Always `Some` until dropped, when [`Drop`] takes
    /// them out to close sled before waiting for its lock to go. Every user
    /// holds the `Arc` for as long as it uses them, iterators included.
    sled: Option<Arc<Sled>>,
    durability: Mutex<Durability>,
    /// The ledger folder, `flock`ed for the store's lifetime (see [`lock_folder`]).
    _folder_lock: File,
    /// Entries [`Store::verify`] reads per round: [`VERIFY_ROUND_ENTRIES`]
    /// unless a test sets it lower.
    verify_round: AtomicU64,
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.lock_durability().poisoned.is_some() {
            // A write failed (a full disk, an I/O error): sled's handles
            // would flush on drop, and sled 0.34 waits forever for a log
            // buffer it could not write (seen after ENOSPC). Nothing unwritten
            // was acknowledged; the process is on its way out with the
            // error, and the OS releases sled's files and lock at exit.
            std::mem::forget(self.sled.take());
            return;
        }
        drop(self.sled.take());
        wait_for_sled_lock_release(&self.lock_durability().db_file);
    }
}

/// Waits (up to [`MAX_LOCK_RELEASE_WAIT`]) until sled's lock on `db` is
/// free: sled's background threads hold the file (and its flock) for a
/// moment after the last handle is gone. Returns whether it is free.
fn wait_for_sled_lock_release(db_file: &File) -> bool {
    let started = Instant::now();
    loop {
        match db_file.try_lock() {
            Ok(()) => {
                let _ = db_file.unlock();
                return true;
            }
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < MAX_LOCK_RELEASE_WAIT => {
                std::thread::sleep(LOCK_RELEASE_POLL);
            }
            Err(_) => return false,
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// What an opened sled database holds.
enum Contents {
    /// Nothing yet (new, or creation interrupted before the metadata).
    Blank,
    /// A ledger with this format version and topic.
    Ledger { topic: String },
}

/// Whether [`Store::open`] may create a ledger.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    CreateIfNew,
    ExistingOnly,
}

/// sled's file names inside a ledger folder.
const SLED_DB_FILE: &str = "db";
const SLED_CONF_FILE: &str = "conf";
const SLED_BLOBS_DIR: &str = "blobs";
/// Start of the names of sled's snapshot files (`snap.<lsn hex>`).
const SLED_SNAPSHOT_PREFIX: &str = "snap.";
/// End of the name of a snapshot file sled has not finished writing.
const SLED_UNFINISHED_SNAPSHOT_SUFFIX: &str = ".generating";

impl Store {
    /// Opens the ledger of `topic` in `dir`, creating the folder and the
    /// ledger if they do not exist yet (an existing empty folder is fine).
    ///
    /// Errors: [`StoreError::Locked`] if another process has it open,
    /// [`StoreError::NotALedger`] for a folder holding something else,
    /// [`StoreError::Unreadable`] for damaged or missing sled files (never
    /// a fresh ledger over them), [`StoreError::DiskFull`],
    /// [`StoreError::TopicMismatch`], [`StoreError::UnsupportedFormat`],
    /// [`StoreError::Corrupt`].
    pub fn open(dir: &Path, topic: &str) -> Result<Store, StoreError> {
        if topic.is_empty() || topic.len() > chain::MAX_TOPIC_LEN {
            return Err(StoreError::InvalidTopic {
                dir: dir.to_path_buf(),
                topic: topic.to_owned(),
                reason: format!(
                    "a topic name has 1 to {} bytes, this one has {}",
                    chain::MAX_TOPIC_LEN,
                    topic.len()
                ),
            });
        }
        Store::open_mode(dir, Some(topic), Mode::CreateIfNew)
    }

    /// Opens an existing ledger for offline tools (verify, queries); never
    /// creates anything. The topic is read from the ledger's metadata.
    pub fn open_existing(dir: &Path) -> Result<Store, StoreError> {
        Store::open_mode(dir, None, Mode::ExistingOnly)
    }

    /// Deletes `dir`, a ledger folder being built (an import's or rebuild's
    /// staging folder) that was left behind by a killed run, unless a
    /// process still has it open (sled's lock on `db` is held: then
    /// [`StoreError::Locked`]). Returns whether there was one to delete.
    /// Only for staging folders: a folder that held a finished ledger is
    /// never deleted by dealledger.
    pub fn remove_abandoned(dir: &Path) -> Result<bool, StoreError> {
        if fs::symlink_metadata(dir).is_err() {
            return Ok(false);
        }
        drop(lock_folder(dir)?);
        match File::open(dir.join(SLED_DB_FILE)) {
            Ok(db) => match db.try_lock() {
                Ok(()) => {
                    let _ = db.unlock();
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Locked {
                        dir: dir.to_path_buf(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(io_error(dir, "checking whether the folder is in use", e));
                }
            },
            // Killed before sled created `db`.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(dir, "opening db to check its lock", e)),
        }
        fs::remove_dir_all(dir).map_err(|e| io_error(dir, "deleting the abandoned folder", e))?;
        Ok(true)
    }

    fn open_mode(dir: &Path, topic: Option<&str>, mode: Mode) -> Result<Store, StoreError> {
        let folder = prepare_folder(dir, mode)?;
        let folder_lock = lock_folder(dir)?;
        let db = open_sled(dir)?;
        // sled reads lazily: damage may show only now, as an error (a
        // missing blob is `NotFound`) or a panic. Either way the ledger
        // cannot be opened.
        let opened = quietly(|| {
            let tree = db
                .open_tree(TREE_NAME)
                .map_err(|e| sled_error(dir, format!("opening sled tree {TREE_NAME:?}"), e))?;
            let contents = read_contents(dir, &db, &tree)?;
            let snapshots = db.open_tree(SNAPSHOT_TREE_NAME).map_err(|e| {
                sled_error(dir, format!("opening sled tree {SNAPSHOT_TREE_NAME:?}"), e)
            })?;
            Ok((tree, snapshots, contents))
        });
        let (tree, snapshots, contents) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return Err(unreadable_at_open(e)),
            Err(panic) => {
                return Err(StoreError::Unreadable {
                    dir: dir.to_path_buf(),
                    detail: format!("sled failed reading its files: {}", panic_message(&*panic)),
                });
            }
        };
        let topic = match (contents, topic) {
            (Contents::Ledger { topic: found }, Some(expected)) if found != expected => {
                return Err(StoreError::TopicMismatch {
                    dir: dir.to_path_buf(),
                    expected: expected.to_owned(),
                    found,
                });
            }
            (Contents::Ledger { topic }, _) => topic,
            (Contents::Blank, Some(topic)) if mode == Mode::CreateIfNew && !folder.had_db => {
                let mut batch = sled::Batch::default();
                batch.insert(meta_key(META_FORMAT), &STORE_FORMAT_VERSION.to_be_bytes());
                batch.insert(meta_key(META_TOPIC), topic.as_bytes());
                tree.apply_batch(batch)
                    .map_err(|e| sled_error(dir, "writing the ledger metadata", e))?;
                db.flush()
                    .map_err(|e| sled_error(dir, "flushing the ledger metadata", e))?;
                tracing::info!(dir = %dir.display(), topic, "created a new, empty ledger");
                topic.to_owned()
            }
            (Contents::Blank, _) => {
                // Never initialise over an existing `db`: it may be a damaged
                // ledger that sled recovered as empty.
                let size = fs::metadata(dir.join(SLED_DB_FILE)).map_or(0, |m| m.len());
                return Err(StoreError::Unreadable {
                    dir: dir.to_path_buf(),
                    detail: format!(
                        "its sled database (`db`, {size} bytes) holds no ledger data, not even the ledger's metadata: sled found nothing it could read (a folder whose ledger creation was interrupted before the first write looks the same; if it never held events, delete it and start again)"
                    ),
                });
            }
        };
        let db_file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(SLED_DB_FILE))
            .map_err(|e| io_error(dir, "opening db for fsync", e))?;
        let store = Store {
            dir: dir.to_path_buf(),
            topic,
            sled: Some(Arc::new(Sled {
                db,
                tree,
                snapshots,
            })),
            durability: Mutex::new(Durability {
                db_file,
                synced_blobs: HashSet::new(),
                poisoned: None,
            }),
            _folder_lock: folder_lock,
            verify_round: AtomicU64::new(VERIFY_ROUND_ENTRIES),
        };
        store.sync_at_open(folder.created)?;
        // Scratch files a process that died left behind (we hold the
        // ledger's lock: none of them is in use).
        remove_scratch_leftovers(dir)
            .map_err(|e| io_error(dir, "removing scratch files left by an earlier run", e))?;
        Ok(store)
    }

    /// An empty identity index for a state of this ledger: on disk, in a
    /// folder of its own inside the ledger folder (see [`crate::identities`]),
    /// its filter sized for `expected` identities.
    pub fn new_identities(&self, expected: u64) -> Result<Box<dyn IdentityIndex>, StoreError> {
        let expected = usize::try_from(expected).unwrap_or(usize::MAX);
        let index = identities::SpilledIdentities::create_for(&self.dir, expected)
            .map_err(|e| io_error(&self.dir, "creating an identity index", e))?;
        Ok(Box::new(index))
    }

    /// An empty set of amendment fingerprints for a state of this ledger:
    /// on disk, like an identity index (see [`crate::deal::AmendmentSet`]).
    pub fn new_amendment_set(&self) -> Result<Box<dyn AmendmentSet>, StoreError> {
        let set = identities::SpilledIdentities::create(&self.dir)
            .map_err(|e| io_error(&self.dir, "creating an amendment set", e))?;
        Ok(Box::new(set))
    }

    /// Number of entries stored: the sum of the streams' stored heads.
    pub fn stored_entries(&self) -> Result<u64, StoreError> {
        Ok(self.heads()?.iter().map(ChainHead::next_seq).sum())
    }

    /// An empty state of this ledger whose identity index and history
    /// items live in scratch files in the ledger folder, not in memory.
    pub fn new_state(&self) -> Result<LedgerState, StoreError> {
        self.new_state_with(QueryIndex::Kept)
    }

    /// [`Store::new_state`], or without the query index (and so without a
    /// scratch file for its history items).
    /// Its identity filter is sized for the entries stored now: the most a
    /// replay from genesis folds.
    pub fn new_state_with(&self, index: QueryIndex) -> Result<LedgerState, StoreError> {
        let identities = self.new_identities(self.stored_entries()?)?;
        let mut state = LedgerState::with_identities(self.topic.clone(), identities);
        state.keep_amendments_in(self.new_amendment_set()?);
        match index {
            QueryIndex::Kept => self.spill_history(&mut state)?,
            QueryIndex::Dropped => state.drop_query_index(),
        }
        Ok(state)
    }

    /// Moves `state`'s history items to a new scratch file in the ledger
    /// folder (see [`crate::segments`]).
    pub fn spill_history(&self, state: &mut LedgerState) -> Result<(), StoreError> {
        state.spill_history_to(Arc::new(self.new_segment_file()?));
        Ok(())
    }

    /// A new scratch file for a state's history items, ended locks and
    /// the timeline's runs (see [`crate::segments`]).
    fn new_segment_file(&self) -> Result<segments::SegmentFile, StoreError> {
        segments::SegmentFile::create(&self.dir)
            .map_err(|e| io_error(&self.dir, "creating a history segment file", e))
    }

    /// [`StoreError`] for the first failure of `state`'s scratch files (its
    /// identity index or history segments), if they met one: the state
    /// must then not be stored or trusted.
    pub fn check_derived(&self, state: &LedgerState) -> Result<(), StoreError> {
        let failed = |what: &str, failure: &ledger::ScratchFailure| {
            // A copy of the error (io::Error is not Clone) that keeps what
            // tells a full disk: its OS code or kind.
            let error = match failure.error.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(failure.error.kind(), failure.error.to_string()),
            };
            Err(io_error(
                &self.dir,
                format!("{what}: {}", failure.action),
                error,
            ))
        };
        if let Some(failure) = state.identity_failure() {
            return failed("identity index", failure);
        }
        if let Some(failure) = state.amendment_failure() {
            return failed("amendment set", failure);
        }
        if let Some(failure) = state.index().segment_failure() {
            return failed("history segments", failure);
        }
        Ok(())
    }

    /// The fsyncs done once at open; see the module documentation.
    fn sync_at_open(&self, created_folder: bool) -> Result<(), StoreError> {
        let dir = &self.dir;
        let mut durability = self.lock_durability();
        // sled writes `conf` once, at creation, without fsync.
        sync_path(dir, &dir.join(SLED_CONF_FILE), "conf")?;
        // Blobs written by an earlier run that may have died before fsyncing them.
        self.sync_new_blobs(&mut durability)?;
        sync_path(dir, &dir.join(SLED_BLOBS_DIR), "the blobs folder")?;
        durability
            .db_file
            .sync_all()
            .map_err(|e| io_error(dir, "fsync of db", e))?;
        // sled created db, conf and blobs/ here and renamed a snapshot file.
        sync_path(dir, dir, "the ledger folder")?;
        if created_folder && let Some(parent) = dir.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            sync_path(dir, parent, "the parent of the new ledger folder")?;
        }
        Ok(())
    }

    /// sled's handles, held by the caller for as long as it uses them.
    fn sled(&self) -> Arc<Sled> {
        Arc::clone(self.sled.as_ref().expect("open until dropped"))
    }

    fn lock_durability(&self) -> std::sync::MutexGuard<'_, Durability> {
        // A panic while holding the lock (a contract assertion) leaves the
        // files intact; the poisoned flag, not the mutex, tracks failed writes.
        self.durability
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The topic this ledger holds.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The ledger folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn stream(&self, partition: i32) -> StreamId {
        StreamId::new(self.topic.clone(), partition)
    }

    fn sled_error(&self, action: impl Into<String>, error: sled::Error) -> StoreError {
        sled_error(&self.dir, action, error)
    }

    fn corrupt(&self, location: Option<Location>, detail: impl Into<String>) -> StoreError {
        corrupt(&self.dir, location, detail)
    }

    // ---- heads and batch numbers -------------------------------------------

    /// The stored head of `partition`, if the ledger has one.
    pub fn head(&self, partition: i32) -> Result<Option<ChainHead>, StoreError> {
        let value = self.sled().tree.get(head_key(partition)).map_err(|e| {
            self.sled_error(format!("reading the head of partition {partition}"), e)
        })?;
        value
            .map(|bytes| {
                decode_head(self.stream(partition), &bytes).map_err(|reason| {
                    self.corrupt(None, format!("head of partition {partition}: {reason}"))
                })
            })
            .transpose()
    }

    /// The stored head of every stream, by partition. The next Kafka offset
    /// to consume is each head's last offset + 1 (0 for no entries).
    pub fn heads(&self) -> Result<Vec<ChainHead>, StoreError> {
        let mut heads = Vec::new();
        for item in self.sled().tree.scan_prefix([FAMILY_HEAD]) {
            let (key, value) = item.map_err(|e| self.sled_error("reading stream heads", e))?;
            let partition = parse_head_key(&key).ok_or_else(|| {
                self.corrupt(None, format!("malformed head key {:02x?}", &key[..]))
            })?;
            let head = decode_head(self.stream(partition), &value).map_err(|reason| {
                self.corrupt(None, format!("head of partition {partition}: {reason}"))
            })?;
            heads.push(head);
        }
        Ok(heads)
    }

    /// Partitions that have a stored head, ascending.
    pub fn partitions(&self) -> Result<Vec<i32>, StoreError> {
        Ok(self.heads()?.iter().map(|h| h.stream().partition).collect())
    }

    /// Number of entries of `partition` (its head's next seq; 0 if none).
    pub fn stream_len(&self, partition: i32) -> Result<u64, StoreError> {
        Ok(self.head(partition)?.map_or(0, |h| h.next_seq()))
    }

    /// The number the next [`Store::write_batch`] must carry: the last
    /// batch record's number + 1, or 0 for a new ledger.
    pub fn next_batch_no(&self) -> Result<u64, StoreError> {
        match self.sled().tree.scan_prefix([FAMILY_BATCH]).next_back() {
            None => Ok(0),
            Some(item) => {
                let (key, _) =
                    item.map_err(|e| self.sled_error("reading the last batch key", e))?;
                let last = parse_batch_key(&key).ok_or_else(|| {
                    self.corrupt(None, format!("malformed batch key {:02x?}", &key[..]))
                })?;
                last.checked_add(1)
                    .ok_or_else(|| self.corrupt(None, "batch number u64::MAX is stored"))
            }
        }
    }

    // ---- writing -------------------------------------------------------------

    /// Writes one batch from [`LedgerState::apply_batch`] atomically (entries,
    /// non-accepted verdicts, heads and the batch record in one sled batch)
    /// and makes it durable before returning (see the module documentation).
    /// A batch without entries (every record was stale) still writes its
    /// batch record, so batch numbers stay gap-free and match
    /// [`LedgerState::next_batch`].
    ///
    /// # Panics
    /// If the batch breaks the contract: its number is not
    /// [`Store::next_batch_no`], a partition's entries do not continue its
    /// stored head contiguously (seq, prev hash, offsets), outcomes or
    /// fingerprints do not match the entries, or `batch.heads` are not the
    /// heads after the last entries. These are bugs in the caller, never
    /// properties of the data.
    pub fn write_batch(&self, batch: &BatchWrite) -> Result<WriteStats, StoreError> {
        let mut durability = self.lock_durability();
        if let Some(cause) = &durability.poisoned {
            return Err(StoreError::Poisoned {
                dir: self.dir.clone(),
                cause: cause.clone(),
            });
        }
        let expected_no = self.next_batch_no()?;
        assert_eq!(
            batch.batch_no,
            expected_no,
            "write_batch: ledger {}: batch number {} is not the next one, {expected_no}; batches are written in order, each once",
            self.dir.display(),
            batch.batch_no
        );
        let runs = self.check_batch(batch)?;

        let started = Instant::now();
        let mut writes = sled::Batch::default();
        let mut bytes = 0usize;
        // Each partition's entries, in seq order (check_batch made sure they
        // continue its stored head without gaps).
        let mut by_partition: BTreeMap<i32, Vec<&Entry>> = BTreeMap::new();
        for (entry, outcome) in batch.entries.iter().zip(&batch.outcomes) {
            by_partition
                .entry(entry.record.partition)
                .or_default()
                .push(entry);
            if outcome.verdict != Verdict::Accepted {
                let json = verdict_json(&outcome.verdict);
                bytes += LOCATION_KEY_LEN + json.len();
                writes.insert(&verdict_key(outcome.location), json);
            }
        }
        for (&partition, entries) in &by_partition {
            self.refuse_overwrite(partition, entries[0].seq)?;
            for (first_seq, page) in encode_pages(entries) {
                bytes += LOCATION_KEY_LEN + page.len();
                writes.insert(&page_key(partition, first_seq), page);
            }
        }
        for head in &batch.heads {
            bytes += HEAD_KEY_LEN + HEAD_VALUE_LEN;
            writes.insert(&head_key(head.stream().partition), &encode_head(head)[..]);
        }
        let record = encode_batch_record(&runs, &batch.fingerprints);
        bytes += BATCH_KEY_LEN + record.len();
        writes.insert(&batch_key(batch.batch_no), record);

        let result = self.sled().tree.apply_batch(writes).map_err(|e| {
            self.sled_error(
                format!(
                    "applying batch {} ({} entries)",
                    batch.batch_no,
                    batch.entries.len()
                ),
                e,
            )
        });
        if let Err(error) = result {
            // sled may have applied part of the batch in memory.
            let error = needing(error, bytes);
            durability.poisoned = Some(error.to_string());
            return Err(error);
        }
        let apply = started.elapsed();

        let started = Instant::now();
        if let Err(error) = self.make_durable(&mut durability, batch.batch_no) {
            let error = needing(error, bytes);
            durability.poisoned = Some(error.to_string());
            return Err(error);
        }
        Ok(WriteStats {
            entries: batch.entries.len(),
            bytes,
            apply,
            durable: started.elapsed(),
        })
    }

    /// Pages are append-only: refuses (as damage) to write a page of
    /// `partition` at `first_seq` when a page is stored at or after it,
    /// beyond the stored head, instead of overwriting it.
    fn refuse_overwrite(&self, partition: i32, first_seq: u64) -> Result<(), StoreError> {
        let Some(item) = self
            .sled()
            .tree
            .range(page_key(partition, first_seq)..=page_key(partition, u64::MAX))
            .next()
        else {
            return Ok(());
        };
        let (key, _) = item.map_err(|e| {
            self.sled_error(
                format!("reading the entry pages of partition {partition}"),
                e,
            )
        })?;
        let found = parse_page_key(&key).map_or_else(
            || format!("under malformed key {:02x?}", &key[..]),
            |seq| format!("at seq {seq}"),
        );
        Err(self.corrupt(
            Some(Location {
                partition,
                seq: first_seq,
            }),
            format!(
                "partition {partition} has an entry page stored {found}, at or beyond its stored head (next seq {first_seq}); pages are never rewritten, so this batch is not written"
            ),
        ))
    }

    /// Checks the write contract (panics on a violation) and returns the runs.
    fn check_batch(&self, batch: &BatchWrite) -> Result<Vec<Run>, StoreError> {
        /// Where a partition's chain stands while the batch is checked.
        struct Tip {
            first_seq: u64,
            next_seq: u64,
            head: Hash,
            last_offset: Option<i64>,
        }
        let no = batch.batch_no;
        let dir = self.dir.display();
        assert!(
            batch.entries.len() <= MAX_BATCH_RECORDS,
            "write_batch: ledger {dir}: batch {no} has {} entries, more than MAX_BATCH_RECORDS ({MAX_BATCH_RECORDS})",
            batch.entries.len()
        );
        assert_eq!(
            batch.entries.len(),
            batch.outcomes.len(),
            "write_batch: ledger {dir}: batch {no} has {} entries but {} outcomes; there is one outcome per entry",
            batch.entries.len(),
            batch.outcomes.len()
        );
        let mut tips: BTreeMap<i32, Tip> = BTreeMap::new();
        for (i, (entry, outcome)) in batch.entries.iter().zip(&batch.outcomes).enumerate() {
            let partition = entry.record.partition;
            let offset = entry.record.offset;
            // Formatted only if an assertion fails (this runs for every entry).
            let seq = entry.seq;
            let at = format_args!(
                "write_batch: ledger {dir}: batch {no} entry {i} (partition {partition} seq {seq} offset {offset})"
            );
            assert!(
                entry.record.topic == self.topic,
                "{at} is of topic {:?}, but the ledger holds topic {:?}",
                entry.record.topic,
                self.topic
            );
            assert!(
                (0..=MAX_PARTITION).contains(&partition),
                "{at}: partition outside the supported range 0..={MAX_PARTITION}"
            );
            let tip = match tips.entry(partition) {
                std::collections::btree_map::Entry::Occupied(slot) => slot.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let stored = self
                        .head(partition)?
                        .unwrap_or_else(|| ChainHead::genesis(self.stream(partition)));
                    slot.insert(Tip {
                        first_seq: stored.next_seq(),
                        next_seq: stored.next_seq(),
                        head: stored.head(),
                        last_offset: stored.last_offset(),
                    })
                }
            };
            assert_eq!(
                entry.seq, tip.next_seq,
                "{at}: expected seq {}; each partition's entries must continue its stored head without gaps",
                tip.next_seq
            );
            assert!(
                entry.prev_hash == tip.head,
                "{at}: prev hash {} is not the hash {} of the entry before it",
                entry.prev_hash.short(),
                tip.head.short()
            );
            if let Some(last) = tip.last_offset {
                assert!(
                    offset > last,
                    "{at}: offset is not greater than the previous entry's offset {last}"
                );
            }
            assert_eq!(
                outcome.location,
                Location {
                    partition,
                    seq: entry.seq
                },
                "{at}: its outcome is for {}",
                outcome.location
            );
            tip.next_seq += 1;
            tip.head = entry.hash;
            tip.last_offset = Some(offset);
        }
        let mut headed = BTreeSet::new();
        for head in &batch.heads {
            let partition = head.stream().partition;
            let at =
                format!("write_batch: ledger {dir}: batch {no}: head of partition {partition}");
            assert!(
                head.stream().topic == self.topic,
                "{at} is of topic {:?}, but the ledger holds topic {:?}",
                head.stream().topic,
                self.topic
            );
            assert!(headed.insert(partition), "{at} is given twice");
            let tip = tips
                .get(&partition)
                .unwrap_or_else(|| panic!("{at} is given, but the batch has no entries of it"));
            assert!(
                head.next_seq() == tip.next_seq
                    && head.head() == tip.head
                    && head.last_offset() == tip.last_offset,
                "{at} says next seq {}, last offset {:?}, hash {}, but its last entry gives next seq {}, last offset {:?}, hash {}",
                head.next_seq(),
                head.last_offset(),
                head.head().short(),
                tip.next_seq,
                tip.last_offset,
                tip.head.short()
            );
        }
        if let Some(missing) = tips.keys().find(|p| !headed.contains(p)) {
            panic!(
                "write_batch: ledger {dir}: batch {no} has entries of partition {missing} but no head for it"
            );
        }
        assert!(
            batch.fingerprints.len() <= MAX_BATCH_FINGERPRINTS,
            "write_batch: ledger {dir}: batch {no} has {} fingerprints, more than MAX_BATCH_FINGERPRINTS ({MAX_BATCH_FINGERPRINTS})",
            batch.fingerprints.len()
        );
        for (fp, location) in &batch.fingerprints {
            let inside = tips
                .get(&location.partition)
                .is_some_and(|tip| (tip.first_seq..tip.next_seq).contains(&location.seq));
            assert!(
                inside,
                "write_batch: ledger {dir}: batch {no}: fingerprint {fp:016x} points at {location}, which is not an entry of this batch"
            );
        }
        Ok(runs_of(&batch.entries))
    }

    /// Steps 1-3 of the module documentation's durability list.
    fn make_durable(&self, durability: &mut Durability, batch_no: u64) -> Result<(), StoreError> {
        // 1. New blob files and their directory entries: sled never fsyncs them.
        if self.sync_new_blobs(durability)? {
            sync_path(
                &self.dir,
                &self.dir.join(SLED_BLOBS_DIR),
                "the blobs folder",
            )?;
        }
        // 2. sled's log buffers into `db` (pwrite + sync_file_range only).
        self.sled()
            .db
            .flush()
            .map_err(|e| self.sled_error(format!("flushing batch {batch_no}"), e))?;
        // 3. The fsync that makes it survive power loss: drive cache and metadata.
        durability
            .db_file
            .sync_all()
            .map_err(|e| io_error(&self.dir, format!("fsync of db after batch {batch_no}"), e))
    }

    /// fsyncs every blob file not fsynced yet; returns whether there was one.
    fn sync_new_blobs(&self, durability: &mut Durability) -> Result<bool, StoreError> {
        let blobs = self.dir.join(SLED_BLOBS_DIR);
        let listing = fs::read_dir(&blobs).map_err(|e| io_error(&self.dir, "listing blobs", e))?;
        let mut present = HashSet::new();
        let mut new = false;
        for item in listing {
            let item = item.map_err(|e| io_error(&self.dir, "listing blobs", e))?;
            let name = item.file_name();
            if !durability.synced_blobs.contains(&name) {
                match File::open(item.path()) {
                    Ok(file) => file.sync_all().map_err(|e| {
                        io_error(
                            &self.dir,
                            format!("fsync of blob {}", item.path().display()),
                            e,
                        )
                    })?,
                    // sled removed it meanwhile (blob garbage collection).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(io_error(
                            &self.dir,
                            format!("opening blob {} for fsync", item.path().display()),
                            e,
                        ));
                    }
                }
                new = true;
            }
            present.insert(name);
        }
        durability.synced_blobs = present;
        Ok(new)
    }

    // ---- reading ---------------------------------------------------------------

    /// Checks that the entry decoded from the bytes at `location` (its
    /// page's first seq + its place in the page) says it is that entry.
    fn stored_entry(
        &self,
        location: Location,
        decoded: Result<Entry, DecodeEntryError>,
    ) -> Result<Entry, StoreError> {
        let entry = decoded.map_err(|e| {
            self.corrupt(
                Some(location),
                format!("entry at {location} does not decode: {e}"),
            )
        })?;
        if entry.seq != location.seq || entry.record.partition != location.partition {
            return Err(self.corrupt(
                Some(location),
                format!(
                    "entry stored at {location} (offset {}) says it is partition {} seq {} (entry or page moved, copied or swapped)",
                    entry.record.offset, entry.record.partition, entry.seq
                ),
            ));
        }
        Ok(entry)
    }

    /// A damaged page of `partition`, as an error at the seq it hides.
    fn page_damaged(&self, partition: i32, damage: PageDamage) -> StoreError {
        self.corrupt(
            Some(Location {
                partition,
                seq: damage.seq,
            }),
            format!(
                "the entry page stored at {} is damaged: {}",
                Location {
                    partition,
                    seq: damage.page_seq
                },
                damage.reason
            ),
        )
    }

    /// A [`CursorFault`] of `partition` as an error; `at` is what was being
    /// read.
    fn cursor_fault(&self, partition: i32, at: &str, fault: CursorFault) -> StoreError {
        match fault {
            CursorFault::Read(e) => self.sled_error(format!("reading {at}"), e),
            CursorFault::MalformedKey(key) => self.corrupt(
                None,
                format!("malformed entry key {key:02x?} among the pages of partition {partition}"),
            ),
            CursorFault::Page(damage) => self.page_damaged(partition, damage),
        }
    }

    /// The entry at `location`, if stored: read from the page holding it
    /// (the last page of the partition whose first seq is at most the
    /// entry's).
    pub fn entry(&self, location: Location) -> Result<Option<Entry>, StoreError> {
        let Location { partition, seq } = location;
        let prefix = entry_prefix(partition);
        // The page holding `seq` is the last page key at or before it: one
        // `get_lt` on the key just after it (cheaper than a range iterator).
        let after = match seq.checked_add(1) {
            Some(next) => page_key(partition, next),
            None => return Ok(None),
        };
        let Some((key, value)) = self
            .sled()
            .tree
            .get_lt(after)
            .map_err(|e| self.sled_error(format!("reading the entry at {location}"), e))?
        else {
            return Ok(None);
        };
        if !key.starts_with(&prefix) {
            return Ok(None);
        }
        let first_seq = parse_page_key(&key).ok_or_else(|| {
            self.corrupt(
                None,
                format!(
                    "malformed entry key {:02x?} among the pages of partition {partition}",
                    &key[..]
                ),
            )
        })?;
        let mut page =
            PageReader::open(first_seq, value).map_err(|d| self.page_damaged(partition, d))?;
        if seq >= page.end_seq() {
            return Ok(None);
        }
        loop {
            match page.next_entry() {
                Some(Ok((at, range))) if at == seq => {
                    let decoded = chain::decode_entry(&page.value[range]);
                    return self.stored_entry(location, decoded).map(Some);
                }
                Some(Ok(_)) => {}
                Some(Err(damage)) => return Err(self.page_damaged(partition, damage)),
                None => unreachable!("the page holds the entries before its end seq"),
            }
        }
    }

    /// The entries of `partition` from `from_seq` on, in seq order, each
    /// checked to be the entry its place says (a missing page shows as a
    /// jump in the seqs, which callers check).
    pub fn entries(
        &self,
        partition: i32,
        from_seq: u64,
    ) -> impl Iterator<Item = Result<Entry, StoreError>> {
        PageCursor::at(self.sled(), partition, from_seq).map(move |item| {
            let (seq, decoded, _) = item.map_err(|fault| {
                self.cursor_fault(
                    partition,
                    &format!("entries of partition {partition}"),
                    fault,
                )
            })?;
            self.stored_entry(Location { partition, seq }, decoded)
        })
    }

    /// The batch records from batch `from` on, in order.
    pub fn batches(&self, from: u64) -> impl Iterator<Item = Result<BatchRecord, StoreError>> {
        let sled = self.sled();
        sled.tree
            .range(batch_key(from)..=batch_key(u64::MAX))
            .map(move |item| {
                let _held = &sled;
                let (key, value) = item.map_err(|e| self.sled_error("reading batch records", e))?;
                let batch_no = parse_batch_key(&key).ok_or_else(|| {
                    self.corrupt(None, format!("malformed batch key {:02x?}", &key[..]))
                })?;
                decode_batch_record(batch_no, &value).map_err(|reason| {
                    self.corrupt(None, format!("batch record {batch_no}: {reason}"))
                })
            })
    }

    fn decode_verdict(&self, location: Location, bytes: &[u8]) -> Result<Verdict, StoreError> {
        if bytes.len() > MAX_VERDICT_BYTES {
            return Err(self.corrupt(
                Some(location),
                format!(
                    "verdict of {location} is {} bytes, more than MAX_VERDICT_BYTES ({MAX_VERDICT_BYTES})",
                    bytes.len()
                ),
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| {
            self.corrupt(
                Some(location),
                format!("verdict of {location} is not a valid verdict: {e}"),
            )
        })
    }

    /// The verdict of the entry at `location`: `Accepted` unless a
    /// non-accepted verdict is stored. Does not check that the entry exists.
    pub fn verdict(&self, location: Location) -> Result<Verdict, StoreError> {
        match self
            .sled()
            .tree
            .get(verdict_key(location))
            .map_err(|e| self.sled_error(format!("reading the verdict of {location}"), e))?
        {
            None => Ok(Verdict::Accepted),
            Some(bytes) => self.decode_verdict(location, &bytes),
        }
    }

    /// Every stored (non-accepted) verdict, by partition and seq.
    pub fn verdicts(&self) -> impl Iterator<Item = Result<(Location, Verdict), StoreError>> {
        let sled = self.sled();
        sled.tree.scan_prefix([FAMILY_VERDICT]).map(move |item| {
            let _held = &sled;
            let (key, value) = item.map_err(|e| self.sled_error("reading verdicts", e))?;
            let location = parse_location_key(FAMILY_VERDICT, &key).ok_or_else(|| {
                self.corrupt(None, format!("malformed verdict key {:02x?}", &key[..]))
            })?;
            Ok((location, self.decode_verdict(location, &value)?))
        })
    }

    /// Partitions that have at least one `E` key, ascending (one seek per
    /// partition, not a scan of every page).
    fn entry_partitions(&self) -> Result<Vec<i32>, StoreError> {
        let mut partitions = Vec::new();
        let mut from = entry_prefix(0).to_vec();
        loop {
            let next = self
                .sled()
                .tree
                .range(from.as_slice()..[FAMILY_ENTRY + 1].as_slice())
                .next();
            let Some(item) = next else { break };
            let (key, _) = item.map_err(|e| self.sled_error("listing entry partitions", e))?;
            let location = parse_location_key(FAMILY_ENTRY, &key).ok_or_else(|| {
                self.corrupt(None, format!("malformed entry page key {:02x?}", &key[..]))
            })?;
            partitions.push(location.partition);
            if location.partition == i32::MAX {
                break;
            }
            from = entry_prefix(location.partition + 1).to_vec();
        }
        Ok(partitions)
    }
}

impl OriginalLookup for Store {
    /// Reads the entry and its event identity. A read or decode failure
    /// counts as "no identity": the caller then treats the event as new,
    /// and [`Store::verify`] reports the damaged entry.
    fn identity(&self, location: Location) -> Option<(String, String)> {
        ledger::identity_of(&self.entry(location).ok()??)
    }
}

impl crate::query::Evidence for Store {
    fn entry_at(&self, location: Location) -> Result<Entry, String> {
        match self.entry(location) {
            Ok(Some(entry)) => Ok(entry),
            Ok(None) => Err(format!(
                "ledger {}: entry {location} is not stored (yet); retry, or run `dealledger verify --data {}`",
                self.dir.display(),
                self.dir.display()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    fn verdict_at(&self, location: Location) -> Result<Verdict, String> {
        self.verdict(location).map_err(|e| e.to_string())
    }
}
