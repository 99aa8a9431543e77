//! The identity index on disk: the first location of every event identity
//! the ledger has seen, kept in sorted files beside the ledger instead of in
//! memory.
//!
//! Duplicate detection needs every identity (`source`, `id`) ever recorded:
//! it is the one part of the derived state that grows with each event, not
//! with the deals (a hash map of a million fingerprints is 34 MB). A daemon
//! that runs for years cannot keep it in memory, so [`SpilledIdentities`]
//! keeps it as a small log-structured merge tree:
//!
//! - new fingerprints go to a bounded hash map in memory
//!   ([`PENDING_LIMIT`]); when it is full they are sorted and written as a
//!   *run*: a file of 16-byte records (fingerprint, packed location), in
//!   increasing fingerprint order;
//! - runs of equal size are merged (a streaming merge of two sorted files),
//!   so there are at most log2(identities / [`PENDING_LIMIT`]) + 1 runs and
//!   each record is rewritten about that many times;
//! - a blocked Bloom filter over every identity ([`FILTER_BITS_PER_IDENTITY`]
//!   bits each, one cache line per lookup) answers "never seen" for almost
//!   every new event without touching a file; the rare "maybe" reads one
//!   4 KiB block per run, found through the run's fences (the first
//!   fingerprint of each block, kept in memory).
//!
//! Memory: the filter (1.5 to 3 bytes per identity), the fences (8 bytes per
//! 256 identities) and the pending map (at most [`PENDING_LIMIT`] entries).
//! The files are read with `pread` (they live in the page cache, which the
//! kernel can reclaim, not in the process), never mapped.
//!
//! The files are scratch, not part of the ledger: derived, never hashed,
//! never exported. Each index lives in its own folder, removed when the
//! index is dropped; the store removes folders left by a process that died
//! (named [`FOLDER_PREFIX`]...) and rebuilds the index from a snapshot or a
//! replay on every start, so nothing here has to survive a crash and
//! nothing is fsynced.
//!
//! I/O errors cannot reach the pure fold, which calls
//! [`IdentityIndex`] methods that do not fail: the first one is kept
//! ([`IdentityIndex::failure`]) and the shell checks it before it stores
//! anything derived from the state. A failed spill keeps the identities
//! in memory, so lookups stay right until the shell stops; a sorted load
//! (a restore) holds nothing to keep, and the restore fails its check.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ledger::{
    FingerprintMap, IdentityIndex, Location, MemoryIdentities, ScratchFailure, pack, unpack,
};

/// Most fingerprints held in memory before they are written as a run: 2 MiB
/// of map, and the size of the smallest run.
pub const PENDING_LIMIT: usize = 1 << 16;

/// Bits of Bloom filter per identity at the filter's capacity; it doubles
/// when full, so between 12 and 24. About 1 % of lookups of a new
/// identity then read a block per run.
pub const FILTER_BITS_PER_IDENTITY: usize = 12;

/// Identities the first filter is sized for.
const INITIAL_FILTER_CAPACITY: usize = 1 << 18;

/// Largest number of expected identities a new index sizes its filter for
/// ([`SpilledIdentities::create_for`]): 16 Mi identities, a 24 MiB filter.
/// Beyond it the filter grows as identities come.
pub const MAX_EXPECTED_IDENTITIES: usize = 1 << 24;

/// Bits the filter sets per identity, all in one 512-bit block.
const FILTER_HASHES: usize = 8;

/// Bytes of one record: fingerprint, packed location, both big-endian.
const RECORD_BYTES: usize = 16;

/// Records per block: the unit of a lookup's read (4 KiB).
const BLOCK_RECORDS: usize = 256;

/// Bytes read or written at a time when streaming a run.
const STREAM_BUFFER_BYTES: usize = 256 * 1024;

/// A stream of records (fingerprint, packed location) read from a run or
/// memory.
type Records<'a> = Box<dyn Iterator<Item = io::Result<(u64, u64)>> + 'a>;

/// Prefix of the folders indexes live in (`identities-<pid>-<n>`).
pub const FOLDER_PREFIX: &str = "identities-";

/// An [`IdentityIndex`] on disk; see the module documentation.
pub struct SpilledIdentities {
    /// The folder of this index's runs; removed on drop.
    dir: PathBuf,
    /// Fingerprints not written to a run yet: fingerprint -> packed location.
    pending: FingerprintMap,
    /// Sorted runs, oldest (largest) first.
    runs: Vec<Run>,
    filter: Filter,
    /// Fingerprints recorded, in runs and pending.
    len: usize,
    /// Number of the next run file.
    next_run: u64,
    failure: OnceLock<ScratchFailure>,
}

impl SpilledIdentities {
    /// An empty index in a new folder under `parent` (created if missing).
    pub fn create(parent: &Path) -> io::Result<SpilledIdentities> {
        Self::create_for(parent, 0)
    }

    /// [`SpilledIdentities::create`] with a filter sized for `expected`
    /// identities (at most [`MAX_EXPECTED_IDENTITIES`] are taken into
    /// account): a replay knows how many entries it will fold, and a filter
    /// that doubles on the way re-reads every run each time.
    pub fn create_for(parent: &Path, expected: usize) -> io::Result<SpilledIdentities> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(parent)?;
        let dir = parent.join(format!(
            "{FOLDER_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir)?;
        Ok(SpilledIdentities {
            dir,
            pending: FingerprintMap::default(),
            runs: Vec::new(),
            filter: Filter::with_capacity(
                expected
                    .min(MAX_EXPECTED_IDENTITIES)
                    .next_power_of_two()
                    .max(INITIAL_FILTER_CAPACITY),
            ),
            len: 0,
            next_run: 0,
            failure: OnceLock::new(),
        })
    }

    /// Loads the records (fingerprint, packed location) `records` gives,
    /// in strictly increasing fingerprint order, into this empty index: one
    /// run written as they come (pending, below a run's size), with a filter
    /// sized for `count` (a hint). They are not held: a failed write is
    /// recorded and loses them, and the shell stops on the failure. Returns
    /// how many were loaded.
    fn load_records(&mut self, count: usize, records: impl Iterator<Item = (u64, u64)>) -> usize {
        assert!(
            self.len == 0,
            "a sorted load into an index that is not empty"
        );
        let capacity = count.next_power_of_two().max(INITIAL_FILTER_CAPACITY);
        let mut filter = Filter::with_capacity(capacity);
        let mut loaded = 0usize;
        let mut previous: Option<u64> = None;
        let mut records = records.inspect(|&(fp, _)| {
            assert!(
                previous.is_none_or(|p| p < fp),
                "a sorted load: fingerprints not strictly increasing"
            );
            previous = Some(fp);
            filter.insert(fp);
            loaded += 1;
        });
        if count < PENDING_LIMIT {
            self.pending.extend(&mut records);
        } else {
            let path = self.run_path();
            match Run::write(&path, records.map(Ok)) {
                Ok(run) => self.runs.push(run),
                Err(e) => self.fail(
                    format!("writing {} ({count} fingerprints)", path.display()),
                    e,
                ),
            }
        }
        self.filter = filter;
        self.len = loaded;
        loaded
    }

    /// The folder holding the runs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of runs on disk (for tests and diagnostics).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Bytes of memory the index holds: filter, fences and pending map
    /// (estimated from their capacities).
    pub fn heap_bytes(&self) -> usize {
        self.filter.blocks.len() * 64
            + self
                .runs
                .iter()
                .map(|r| r.fences.capacity() * 8)
                .sum::<usize>()
            + self.pending.capacity() * 17
    }

    fn fail(&self, action: String, error: io::Error) {
        // The first failure is the one to report; later ones follow from it.
        let _ = self.failure.set(ScratchFailure { action, error });
    }

    fn run_path(&mut self) -> PathBuf {
        let path = self.dir.join(format!("run-{:06}", self.next_run));
        self.next_run += 1;
        path
    }

    /// Writes `records` as a new run; `None`, with the failure recorded
    /// (`what` says what was written), if it cannot.
    fn write_run(
        &mut self,
        what: &str,
        records: impl Iterator<Item = io::Result<(u64, u64)>>,
    ) -> Option<Run> {
        let path = self.run_path();
        match Run::write(&path, records) {
            Ok(run) => Some(run),
            Err(e) => {
                self.fail(format!("writing {} ({what})", path.display()), e);
                None
            }
        }
    }

    /// Writes the pending fingerprints as a run, then merges runs of equal
    /// size. On failure what was to be written stays where it was: the
    /// pending ones in memory, the runs to merge on disk.
    fn spill(&mut self) {
        if self.failure.get().is_some() {
            // Stopped: keep everything in memory, the shell stops soon.
            return;
        }
        let mut records: Vec<(u64, u64)> = self.pending.iter().map(|(f, p)| (*f, *p)).collect();
        records.sort_unstable();
        let what = format!("{} identities", records.len());
        let Some(run) = self.write_run(&what, records.into_iter().map(Ok)) else {
            return;
        };
        self.runs.push(run);
        self.pending.clear();
        while self.runs.len() >= 2
            && self.runs[self.runs.len() - 2].len <= self.runs[self.runs.len() - 1].len
        {
            let newer = self.runs.pop().expect("two runs");
            let older = self.runs.pop().expect("two runs");
            let merged = merge(vec![older.records(), newer.records()]);
            match self.write_run("merging two runs", merged) {
                Some(run) => {
                    debug_assert_eq!(run.len, older.len + newer.len);
                    self.runs.push(run);
                    older.remove();
                    newer.remove();
                }
                None => {
                    self.runs.push(older);
                    self.runs.push(newer);
                    return;
                }
            }
        }
    }

    /// Doubles the filter, refilling it from every identity.
    fn grow_filter(&mut self) {
        let mut filter = Filter::with_capacity(self.filter.capacity * 2);
        for (fp, _) in IdentityIndex::sorted(self) {
            filter.insert(fp);
        }
        // After a read failure some identities are missing from the new
        // filter: keep the old one, which has them all.
        if self.failure.get().is_none() {
            self.filter = filter;
        }
    }
}

impl IdentityIndex for SpilledIdentities {
    fn get(&self, fp: u64) -> Option<Location> {
        if let Some(packed) = self.pending.get(&fp) {
            return Some(unpack(*packed));
        }
        if !self.filter.may_contain(fp) {
            return None;
        }
        for run in self.runs.iter().rev() {
            match run.find(fp) {
                Ok(Some(packed)) => return Some(unpack(packed)),
                Ok(None) => {}
                Err(e) => {
                    self.fail(format!("reading {}", run.path.display()), e);
                    return None;
                }
            }
        }
        None
    }

    fn insert(&mut self, fp: u64, location: Location) {
        debug_assert!(
            self.get(fp).is_none(),
            "fingerprint {fp:016x} inserted twice"
        );
        self.pending.insert(fp, pack(location));
        self.filter.insert(fp);
        self.len += 1;
        if self.len > self.filter.capacity {
            self.grow_filter();
        }
        if self.pending.len() >= PENDING_LIMIT {
            self.spill();
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// One run written straight from `sorted` (a snapshot's list), with a
    /// filter sized for it: no sorting, no merges.
    fn load_sorted(&mut self, sorted: Vec<(u64, Location)>) {
        let count = sorted.len();
        self.load_records(count, sorted.into_iter().map(|(fp, l)| (fp, pack(l))));
    }

    /// [`IdentityIndex::load_sorted`], as `next` gives the records: they
    /// are never all held.
    fn load_sorted_from(
        &mut self,
        count: usize,
        next: &mut dyn FnMut() -> Option<(u64, Location)>,
    ) -> usize {
        self.load_records(count, std::iter::from_fn(next).map(|(fp, l)| (fp, pack(l))))
    }

    fn sorted(&self) -> Box<dyn Iterator<Item = (u64, Location)> + '_> {
        let mut pending: Vec<(u64, u64)> = self.pending.iter().map(|(f, p)| (*f, *p)).collect();
        pending.sort_unstable();
        let mut sources: Vec<Records<'_>> = self.runs.iter().map(|run| run.records()).collect();
        sources.push(Box::new(pending.into_iter().map(Ok)));
        let merged = merge(sources);
        Box::new(
            merged
                .map_while(|record| match record {
                    Ok(record) => Some(record),
                    Err(e) => {
                        self.fail("reading a run in order".to_string(), e);
                        None
                    }
                })
                .map(|(fp, packed)| (fp, unpack(packed))),
        )
    }

    fn failure(&self) -> Option<&ScratchFailure> {
        self.failure.get()
    }
}

/// The same files and filter remember the fold's amendment fingerprints
/// (each set in its own index): they have no location, so each record's
/// location is [`AMENDMENT_LOCATION`].
impl crate::deal::AmendmentSet for SpilledIdentities {
    fn contains(&self, fingerprint: u64) -> bool {
        IdentityIndex::get(self, fingerprint).is_some()
    }

    fn insert(&mut self, fingerprint: u64) {
        IdentityIndex::insert(self, fingerprint, AMENDMENT_LOCATION);
    }

    fn len(&self) -> usize {
        self.len
    }

    fn load_sorted(&mut self, sorted: Vec<u64>) {
        let location = pack(AMENDMENT_LOCATION);
        let count = sorted.len();
        self.load_records(count, sorted.into_iter().map(|fp| (fp, location)));
    }

    fn load_sorted_from(&mut self, count: usize, next: &mut dyn FnMut() -> Option<u64>) -> usize {
        let location = pack(AMENDMENT_LOCATION);
        self.load_records(
            count,
            std::iter::from_fn(next)
                .take(count)
                .map(|fp| (fp, location)),
        )
    }

    fn sorted(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        Box::new(IdentityIndex::sorted(self).map(|(fp, _)| fp))
    }

    fn failure(&self) -> Option<&ScratchFailure> {
        self.failure.get()
    }
}

/// The location an amendment fingerprint's record carries.
pub const AMENDMENT_LOCATION: Location = Location {
    partition: 0,
    seq: 0,
};

impl Drop for SpilledIdentities {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// An index for a ledger state: on disk in a folder under `parent`, or in
/// memory when `parent` is `None`.
pub fn identity_index(parent: Option<&Path>) -> io::Result<Box<dyn IdentityIndex>> {
    Ok(match parent {
        Some(parent) => Box::new(SpilledIdentities::create(parent)?),
        None => Box::new(MemoryIdentities::default()),
    })
}

/// One sorted file of records.
struct Run {
    path: PathBuf,
    file: File,
    /// Records in the file.
    len: usize,
    /// The fingerprint of the first record of each block.
    fences: Vec<u64>,
}

impl Run {
    /// Writes `records` (strictly increasing fingerprints) to a new file at
    /// `path`; on failure the file is removed again.
    fn write(
        path: &Path,
        records: impl Iterator<Item = io::Result<(u64, u64)>>,
    ) -> io::Result<Run> {
        let written = Self::write_file(path, records);
        if written.is_err() {
            let _ = fs::remove_file(path);
        }
        written
    }

    fn write_file(
        path: &Path,
        records: impl Iterator<Item = io::Result<(u64, u64)>>,
    ) -> io::Result<Run> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut out = BufWriter::with_capacity(STREAM_BUFFER_BYTES, &file);
        let mut fences = Vec::new();
        let mut len = 0usize;
        let mut last: Option<u64> = None;
        for record in records {
            let (fp, packed) = record?;
            assert!(
                last.is_none_or(|last| fp > last),
                "identity run {}: fingerprints out of order or repeated at {fp:016x}",
                path.display()
            );
            last = Some(fp);
            if len.is_multiple_of(BLOCK_RECORDS) {
                fences.push(fp);
            }
            out.write_all(&fp.to_be_bytes())?;
            out.write_all(&packed.to_be_bytes())?;
            len += 1;
        }
        out.flush()?;
        drop(out);
        fences.shrink_to_fit();
        Ok(Run {
            path: path.to_path_buf(),
            file,
            len,
            fences,
        })
    }

    /// The packed location recorded for `fp`: one read of the block that
    /// may hold it.
    fn find(&self, fp: u64) -> io::Result<Option<u64>> {
        let block = match self.fences.partition_point(|&first| first <= fp) {
            0 => return Ok(None),
            n => n - 1,
        };
        let start = block * BLOCK_RECORDS;
        let count = BLOCK_RECORDS.min(self.len - start);
        let mut buf = [0u8; BLOCK_RECORDS * RECORD_BYTES];
        let buf = &mut buf[..count * RECORD_BYTES];
        self.file
            .read_exact_at(buf, (start * RECORD_BYTES) as u64)?;
        let record = |i: usize| {
            let r = &buf[i * RECORD_BYTES..(i + 1) * RECORD_BYTES];
            (
                u64::from_be_bytes(r[..8].try_into().expect("8 bytes")),
                u64::from_be_bytes(r[8..].try_into().expect("8 bytes")),
            )
        };
        let (mut lo, mut hi) = (0usize, count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let (found, packed) = record(mid);
            match found.cmp(&fp) {
                std::cmp::Ordering::Equal => return Ok(Some(packed)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Every record, in order, read in large pieces.
    fn records(&self) -> Records<'_> {
        Box::new(RunReader {
            run: self,
            buf: Vec::new(),
            at: 0,
            next: 0,
            failed: false,
        })
    }

    /// Deletes the file (merged into a bigger run).
    fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Reads a run's records in order, [`STREAM_BUFFER_BYTES`] at a time.
struct RunReader<'a> {
    run: &'a Run,
    buf: Vec<u8>,
    /// Position of the next record in `buf`.
    at: usize,
    /// Index of the first record not read into `buf` yet.
    next: usize,
    failed: bool,
}

impl Iterator for RunReader<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.at == self.buf.len() {
            let count = (STREAM_BUFFER_BYTES / RECORD_BYTES).min(self.run.len - self.next);
            if count == 0 {
                return None;
            }
            self.buf.resize(count * RECORD_BYTES, 0);
            if let Err(e) = self
                .run
                .file
                .read_exact_at(&mut self.buf, (self.next * RECORD_BYTES) as u64)
            {
                self.failed = true;
                return Some(Err(e));
            }
            self.next += count;
            self.at = 0;
        }
        let r = &self.buf[self.at..self.at + RECORD_BYTES];
        self.at += RECORD_BYTES;
        Some(Ok((
            u64::from_be_bytes(r[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(r[8..].try_into().expect("8 bytes")),
        )))
    }
}

/// Merges sorted record streams into one sorted stream. A fingerprint is
/// in at most one source (the index inserts only absent ones). The first
/// error ends the stream after it is yielded.
fn merge<'a>(sources: Vec<Records<'a>>) -> impl Iterator<Item = io::Result<(u64, u64)>> + 'a {
    let mut sources = sources;
    let mut heads: Vec<Option<(u64, u64)>> = Vec::with_capacity(sources.len());
    let mut error: Option<io::Error> = None;
    for source in &mut sources {
        match source.next() {
            Some(Ok(record)) => heads.push(Some(record)),
            Some(Err(e)) => {
                error.get_or_insert(e);
                heads.push(None);
            }
            None => heads.push(None),
        }
    }
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        if let Some(e) = error.take() {
            done = true;
            return Some(Err(e));
        }
        // Few sources (at most a run per bit of the count): a linear scan.
        let (i, record) = heads
            .iter()
            .enumerate()
            .filter_map(|(i, head)| head.map(|r| (i, r)))
            .min_by_key(|(_, (fp, _))| *fp)?;
        heads[i] = match sources[i].next() {
            Some(Ok(next)) => {
                debug_assert!(next.0 > record.0, "a run out of order");
                Some(next)
            }
            Some(Err(e)) => {
                error = Some(e);
                None
            }
            None => None,
        };
        Some(Ok(record))
    })
}

/// A blocked Bloom filter: each fingerprint sets [`FILTER_HASHES`] bits in
/// one 512-bit block (one cache line), so a lookup costs one memory access.
struct Filter {
    blocks: Vec<[u64; 8]>,
    /// Identities it is sized for.
    capacity: usize,
}

impl Filter {
    fn with_capacity(capacity: usize) -> Filter {
        let bits = capacity.saturating_mul(FILTER_BITS_PER_IDENTITY);
        let blocks = bits.div_ceil(512).next_power_of_two().max(1);
        Filter {
            blocks: vec![[0u64; 8]; blocks],
            capacity,
        }
    }

    /// The block of `fp` and the bits to set or test in it. Fingerprints
    /// are uniformly distributed (blake3): the block comes from the low
    /// bits, the positions from a multiply-xorshift sequence seeded by it.
    fn bits(&self, fp: u64) -> (usize, [u64; 8]) {
        let block = (fp as usize) & (self.blocks.len() - 1);
        let mut mask = [0u64; 8];
        let mut x = fp;
        for _ in 0..FILTER_HASHES {
            x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            let bit = (x >> 55) as usize; // 0..512
            mask[bit / 64] |= 1 << (bit % 64);
        }
        (block, mask)
    }

    fn insert(&mut self, fp: u64) {
        let (block, mask) = self.bits(fp);
        for (word, m) in self.blocks[block].iter_mut().zip(mask) {
            *word |= m;
        }
    }

    fn may_contain(&self, fp: u64) -> bool {
        let (block, mask) = self.bits(fp);
        self.blocks[block]
            .iter()
            .zip(mask)
            .all(|(word, m)| word & m == m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn location(i: u64) -> Location {
        Location {
            partition: (i % 7) as i32,
            seq: i,
        }
    }

    /// A fingerprint per number, spread like blake3's.
    fn fp(i: u64) -> u64 {
        let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().expect("a temporary folder")
    }

    #[test]
    fn finds_what_it_holds_across_spills_and_merges() {
        let parent = scratch();
        let mut index = SpilledIdentities::create(parent.path()).unwrap();
        let n = PENDING_LIMIT as u64 * 5 + 123;
        for i in 0..n {
            index.insert(fp(i), location(i));
        }
        assert_eq!(index.len(), n as usize);
        // 5 full runs merge to a run of 4 and one of 1; 123 stay pending.
        assert_eq!(index.run_count(), 2);
        for i in (0..n).step_by(97) {
            assert_eq!(index.get(fp(i)), Some(location(i)), "identity {i}");
        }
        let absent = (n..n + 10_000)
            .filter(|i| index.get(fp(*i)).is_some())
            .count();
        assert_eq!(absent, 0);
        let sorted: Vec<(u64, Location)> = index.sorted().collect();
        assert_eq!(sorted.len(), n as usize);
        assert!(sorted.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(index.failure().is_none());
        // The filter grew past its first capacity and still knows everyone.
        assert!(index.filter.capacity >= n as usize);
    }

    #[test]
    fn an_index_sized_ahead_never_grows_its_filter_and_finds_the_same() {
        let parent = scratch();
        let n = PENDING_LIMIT as u64 * 5 + 123;
        let mut sized = SpilledIdentities::create_for(parent.path(), n as usize).unwrap();
        let capacity = sized.filter.capacity;
        assert!(capacity >= n as usize, "sized for {n}: capacity {capacity}");
        let mut grown = SpilledIdentities::create(parent.path()).unwrap();
        for i in 0..n {
            sized.insert(fp(i), location(i));
            grown.insert(fp(i), location(i));
        }
        // No doubling (which re-reads every run) on the way.
        assert_eq!(sized.filter.capacity, capacity);
        assert!(grown.filter.capacity > INITIAL_FILTER_CAPACITY);
        for i in (0..n + 10_000).step_by(37) {
            assert_eq!(sized.get(fp(i)), grown.get(fp(i)), "identity {i}");
        }
        assert!(sized.sorted().eq(grown.sorted()));
        // The hint is capped: a huge count does not allocate a huge filter.
        let capped = SpilledIdentities::create_for(parent.path(), usize::MAX).unwrap();
        assert_eq!(capped.filter.capacity, MAX_EXPECTED_IDENTITIES);
    }

    #[test]
    fn a_sorted_load_is_one_run_and_inserts_continue_after_it() {
        let parent = scratch();
        let mut index = SpilledIdentities::create(parent.path()).unwrap();
        let n = PENDING_LIMIT as u64 * 3;
        let mut sorted: Vec<(u64, Location)> = (0..n).map(|i| (fp(i), location(i))).collect();
        sorted.sort_unstable();
        index.load_sorted(sorted);
        assert_eq!(index.run_count(), 1);
        assert_eq!(index.len(), n as usize);
        for i in n..n + PENDING_LIMIT as u64 {
            index.insert(fp(i), location(i));
        }
        // The loaded run (3 units) is not merged with the new one (1 unit).
        assert_eq!(index.run_count(), 2);
        for i in (0..n + PENDING_LIMIT as u64).step_by(61) {
            assert_eq!(index.get(fp(i)), Some(location(i)), "identity {i}");
        }
        assert_eq!(index.sorted().count(), (n + PENDING_LIMIT as u64) as usize);
    }

    /// Loading from a stream gives what loading the list gives, in one run
    /// (or pending, below a run's size).
    #[test]
    fn a_streamed_load_equals_a_listed_one() {
        let parent = scratch();
        for n in [0, 100, PENDING_LIMIT as u64 * 2 + 5] {
            let mut sorted: Vec<(u64, Location)> = (0..n).map(|i| (fp(i), location(i))).collect();
            sorted.sort_unstable();
            let mut listed = SpilledIdentities::create(parent.path()).unwrap();
            listed.load_sorted(sorted.clone());
            let mut streamed = SpilledIdentities::create(parent.path()).unwrap();
            let mut items = sorted.iter().copied();
            let loaded = streamed.load_sorted_from(sorted.len(), &mut || items.next());
            assert_eq!(loaded, n as usize);
            assert_eq!(streamed.len(), n as usize);
            assert_eq!(streamed.run_count(), listed.run_count());
            assert!(IdentityIndex::sorted(&streamed).eq(IdentityIndex::sorted(&listed)));
            for i in (0..n + 1000).step_by(7) {
                assert_eq!(streamed.get(fp(i)), listed.get(fp(i)), "{i}");
            }
            assert!(streamed.failure().is_none());
        }
    }

    /// As an amendment set it answers as a set in memory does, loaded or
    /// filled, across runs on disk.
    #[test]
    fn as_an_amendment_set_it_answers_like_one_in_memory() {
        use crate::deal::{AmendmentSet, MemoryAmendments};
        let parent = scratch();
        let n = PENDING_LIMIT as u64 * 2 + 7;
        let mut spilled: Box<dyn AmendmentSet> =
            Box::new(SpilledIdentities::create(parent.path()).unwrap());
        let mut memory = MemoryAmendments::default();
        for i in 0..n {
            assert!(!spilled.contains(fp(i)));
            spilled.insert(fp(i));
            memory.insert(fp(i));
        }
        assert_eq!(spilled.len(), n as usize);
        for i in (0..n + 10_000).step_by(13) {
            assert_eq!(spilled.contains(fp(i)), memory.contains(fp(i)), "{i}");
        }
        assert!(spilled.sorted().eq(memory.sorted()));
        let mut loaded: Box<dyn AmendmentSet> =
            Box::new(SpilledIdentities::create(parent.path()).unwrap());
        loaded.load_sorted(memory.sorted().collect());
        assert!(loaded.sorted().eq(memory.sorted()));
        assert!(loaded.contains(fp(n - 1)) && !loaded.contains(fp(n)));
        assert!(spilled.failure().is_none() && loaded.failure().is_none());
    }

    #[test]
    fn the_filter_passes_few_strangers() {
        let mut filter = Filter::with_capacity(100_000);
        for i in 0..100_000 {
            filter.insert(fp(i));
        }
        assert!((0..100_000).all(|i| filter.may_contain(fp(i))));
        let false_positives = (100_000..200_000)
            .filter(|i| filter.may_contain(fp(*i)))
            .count();
        // 12 bits per identity, 8 hashes in one block: about 0.5-1 %.
        assert!(
            false_positives < 2_000,
            "{false_positives} false positives in 100,000"
        );
    }

    #[test]
    fn drop_removes_the_folder() {
        let parent = scratch();
        let index = SpilledIdentities::create(parent.path()).unwrap();
        let dir = index.dir().to_path_buf();
        assert!(dir.is_dir());
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(FOLDER_PREFIX), "{name}");
        drop(index);
        assert!(!dir.exists());
    }

    #[test]
    fn a_failed_read_is_kept_and_reported() {
        let parent = scratch();
        let mut index = SpilledIdentities::create(parent.path()).unwrap();
        for i in 0..PENDING_LIMIT as u64 {
            index.insert(fp(i), location(i));
        }
        assert_eq!(index.run_count(), 1);
        // Cut the run short behind the index's back.
        let run = &index.runs[0];
        run.file.set_len(0).unwrap();
        let lost = (0..PENDING_LIMIT as u64).find(|i| index.get(fp(*i)).is_none());
        assert!(lost.is_some());
        let failure = index.failure().expect("the failed read is reported");
        assert!(failure.to_string().contains("run-000000"), "{failure}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// The index on disk answers every lookup as the one in memory does,
        /// and lists the same identities in order.
        #[test]
        fn agrees_with_the_index_in_memory(
            count in 0usize..(3 * PENDING_LIMIT),
            probes in proptest::collection::vec(any::<u64>(), 0..200),
        ) {
            let parent = scratch();
            let mut spilled = SpilledIdentities::create(parent.path()).unwrap();
            let mut memory = MemoryIdentities::default();
            for i in 0..count as u64 {
                spilled.insert(fp(i), location(i));
                memory.insert(fp(i), location(i));
            }
            prop_assert_eq!(spilled.len(), memory.len());
            for i in probes.iter().map(|p| p % (2 * count as u64 + 1)) {
                prop_assert_eq!(spilled.get(fp(i)), memory.get(fp(i)));
            }
            prop_assert!(spilled.sorted().eq(memory.sorted()));
            prop_assert!(spilled.failure().is_none());
        }
    }
}
