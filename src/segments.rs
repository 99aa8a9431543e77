//! The deals' history items on disk: sealed segments of the query index
//! ([`crate::index::HistoryItems`]) appended to one scratch file beside the
//! ledger instead of kept in memory.
//!
//! Every entry adds an item (about 12.5 bytes) to the history of the deal
//! it names; in memory that is the one part of the index that grows with
//! every event however few deals there are. The index seals each deal's
//! items in segments of 64 (each decodable on its own) and hands them to a
//! [`SegmentStore`]; [`SegmentFile`] appends them to a file and reads them
//! back with `pread` when a query pages through a history, a snapshot is
//! written or findings are counted. Memory keeps 16 bytes per segment and
//! each deal's last, unsealed one.
//!
//! The same store takes what the state keeps of each lock that ended, which
//! never changes again: the lock itself ([`crate::deal::DealLocks`]) and the
//! entries that granted and ended it ([`crate::index::LockEntries`]).
//!
//! Like the identity index's runs ([`crate::identities`]), the file is
//! scratch: derived, never hashed or exported, rebuilt from a snapshot or a
//! replay on every start, removed when dropped, and removed at open when a
//! process that died left it (named [`FILE_PREFIX`]...). Nothing is
//! fsynced. A write that fails keeps the segment in memory and records the
//! failure ([`SegmentStore::failure`]); the shell checks it before it
//! stores anything derived from the state.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::index::{SegmentRef, SegmentStore};
use crate::ledger::ScratchFailure;

/// Prefix of the files segment stores write (`history-<pid>-<n>`).
pub const FILE_PREFIX: &str = "history-";

/// Appended bytes gathered before one write: ended locks come one at a
/// time (~300 bytes), and a `pwrite` each cost ingest ~0.5-1 s of system
/// time per million events.
pub const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// A [`SegmentStore`] in a scratch file; see the module documentation.
pub struct SegmentFile {
    path: PathBuf,
    file: File,
    /// Appended bytes not written yet (at most about
    /// [`WRITE_BUFFER_BYTES`]), served to reads from here.
    pending: Mutex<Pending>,
    /// Runs of bytes whose write failed, by offset: kept so reads stay
    /// right until the shell stops.
    kept: Mutex<BTreeMap<u64, Vec<u8>>>,
    failure: OnceLock<ScratchFailure>,
}

/// The bytes of a [`SegmentFile`] from offset `start` on, not written yet.
#[derive(Default)]
struct Pending {
    start: u64,
    bytes: Vec<u8>,
}

impl SegmentFile {
    /// An empty store in a new file under `parent`.
    pub fn create(parent: &Path) -> io::Result<SegmentFile> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = parent.join(format!(
            "{FILE_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(SegmentFile {
            path,
            file,
            pending: Mutex::new(Pending::default()),
            kept: Mutex::new(BTreeMap::new()),
            failure: OnceLock::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        let pending = self.pending();
        pending.start + pending.bytes.len() as u64
    }

    /// Whether nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the pending bytes; on failure records it and keeps them.
    fn write_pending(&self, pending: &mut Pending) {
        if pending.bytes.is_empty() {
            return;
        }
        let (start, len) = (pending.start, pending.bytes.len());
        if let Err(e) = self.file.write_all_at(&pending.bytes, start) {
            self.fail(
                format!("writing {len} bytes at {start} of {}", self.path.display()),
                e,
            );
            self.kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(start, std::mem::take(&mut pending.bytes));
        }
        pending.bytes.clear();
        pending.start += len as u64;
    }

    fn fail(&self, action: String, error: io::Error) {
        // The first failure is the one to report; later ones follow from it.
        let _ = self.failure.set(ScratchFailure { action, error });
    }
}

impl SegmentStore for SegmentFile {
    fn append(&self, bytes: &[u8]) -> SegmentRef {
        let len = u32::try_from(bytes.len())
            .expect("a segment (64 items, or one lock) is far below 4 GiB");
        let mut pending = self.pending();
        let offset = pending.start + pending.bytes.len() as u64;
        pending.bytes.extend_from_slice(bytes);
        if pending.bytes.len() >= WRITE_BUFFER_BYTES {
            self.write_pending(&mut pending);
        }
        SegmentRef { offset, len }
    }

    fn read(&self, at: SegmentRef, out: &mut Vec<u8>) -> bool {
        out.clear();
        let (start, end) = (at.offset, at.offset + u64::from(at.len));
        {
            let pending = self.pending();
            if start >= pending.start {
                let from = (start - pending.start) as usize;
                out.extend_from_slice(&pending.bytes[from..from + at.len as usize]);
                return true;
            }
        }
        if self.failure.get().is_some() {
            let kept = self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((&run, bytes)) = kept.range(..=start).next_back()
                && end <= run + bytes.len() as u64
            {
                let from = (start - run) as usize;
                out.extend_from_slice(&bytes[from..from + at.len as usize]);
                return true;
            }
        }
        out.resize(at.len as usize, 0);
        match self.file.read_exact_at(out, at.offset) {
            Ok(()) => true,
            Err(e) => {
                self.fail(
                    format!(
                        "reading {} bytes at {} of {}",
                        at.len,
                        at.offset,
                        self.path.display()
                    ),
                    e,
                );
                out.clear();
                false
            }
        }
    }

    fn failure(&self) -> Option<&ScratchFailure> {
        self.failure.get()
    }
}

impl Drop for SegmentFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_come_back_as_written() {
        let parent = tempfile::tempdir().unwrap();
        let store = SegmentFile::create(parent.path()).unwrap();
        let a = store.append(b"first segment");
        let b = store.append(b"second");
        let mut out = Vec::new();
        assert!(store.read(b, &mut out));
        assert_eq!(out, b"second");
        assert!(store.read(a, &mut out));
        assert_eq!(out, b"first segment");
        assert_eq!(store.len(), 19);
        assert!(store.failure().is_none());
    }

    #[test]
    fn segments_read_back_from_the_buffer_the_file_and_a_failed_write() {
        let parent = tempfile::tempdir().unwrap();
        let mut store = SegmentFile::create(parent.path()).unwrap();
        let segment =
            |i: usize| -> Vec<u8> { (0..40 + i % 900).map(|j| (i * 7 + j) as u8).collect() };
        let mut refs = Vec::new();
        for i in 0..1_000 {
            if i == 600 {
                // From here on every write fails: the file is read-only.
                assert!(store.failure().is_none());
                store.file = OpenOptions::new().read(true).open(store.path()).unwrap();
            }
            refs.push(store.append(&segment(i)));
        }
        assert!(
            store.len() > WRITE_BUFFER_BYTES as u64 * 3,
            "several writes"
        );
        let failure = store.failure().expect("a write failed").to_string();
        assert!(failure.starts_with("writing "), "{failure}");
        // Written, kept after a failed write, or still pending: all read back.
        let mut out = Vec::new();
        for (i, at) in refs.iter().enumerate() {
            assert!(store.read(*at, &mut out), "segment {i}");
            assert_eq!(out, segment(i), "segment {i}");
        }
    }

    #[test]
    fn a_failed_read_is_reported_and_drop_removes_the_file() {
        let parent = tempfile::tempdir().unwrap();
        let store = SegmentFile::create(parent.path()).unwrap();
        let a = store.append(b"0123456789");
        // Written once the buffer is full.
        store.append(&vec![7u8; WRITE_BUFFER_BYTES]);
        store.file.set_len(4).unwrap();
        let mut out = Vec::new();
        assert!(!store.read(a, &mut out));
        assert!(out.is_empty());
        let failure = store.failure().expect("the failure is kept").to_string();
        assert!(failure.contains("history-"), "{failure}");
        let path = store.path().to_path_buf();
        assert!(path.exists());
        drop(store);
        assert!(!path.exists());
    }
}
