//! Rebuilding the state: from the latest snapshot or genesis, replaying
//! the stored entries in ledger order and checking every chain link.

use super::*;

impl Store {
    // ---- rebuilding state ----------------------------------------------------

    /// Rebuilds the in-memory state for a restart: starts from the latest
    /// usable snapshot (genesis when there is none, or none is usable; see
    /// [`Store::replay_with`]), replays the entries after it in ledger order
    /// (following the batch records' runs), verifying their chain links,
    /// and checks that the replay ends at the stored heads. Any damage found
    /// is [`StoreError::Corrupt`]; never panics on stored data.
    pub fn load_state(&self) -> Result<LedgerState, StoreError> {
        Ok(self
            .replay_with(
                ReplayFrom::LatestSnapshot,
                QueryIndex::Kept,
                None,
                |_, _| {},
            )?
            .state)
    }

    /// Rebuilds the state from genesis, ignoring snapshots, calling `visit`
    /// with every replayed entry and its recomputed outcome, in ledger order.
    pub fn replay(&self, visit: impl FnMut(&Entry, &Outcome)) -> Result<LedgerState, StoreError> {
        Ok(self
            .replay_with(ReplayFrom::Genesis, QueryIndex::Kept, None, visit)?
            .state)
    }

    /// Rebuilds the state, from the latest usable snapshot or from genesis.
    ///
    /// From genesis, every entry is read, its link verified and folded again,
    /// in ledger order, with `visit` called for each. From a snapshot (taken
    /// after batch N), only the entries after it are, and the snapshot is
    /// tied to the stored chain instead: for each stream, the entry at the
    /// snapshot's head must be stored, hash to its stored hash and carry the
    /// head's hash and offset; the entries after it then chain on from that
    /// head, and every stream must end at its stored `H` head. The links
    /// *before* a snapshot's heads are not re-verified (that is what makes a
    /// snapshot fast: verifying every link of a million entries takes
    /// seconds); [`ReplayFrom::Genesis`] and [`Store::verify`] check them
    /// all. A snapshot that does not decode, does not fit together, lies
    /// beyond the stored batches or whose heads are not the stored chain is
    /// skipped (logged, and listed in [`Replayed::skipped`]) for the one
    /// before it, then genesis. A broken chain is an error from any start.
    /// `progress` is called now and then with the number of entries done
    /// since its last call (those a snapshot covers count as done at once).
    /// `index` says whether the query index is rebuilt as well.
    pub fn replay_with(
        &self,
        from: ReplayFrom,
        index: QueryIndex,
        progress: Option<&(dyn Fn(u64) + Sync)>,
        mut visit: impl FnMut(&Entry, &Outcome),
    ) -> Result<Replayed, StoreError> {
        let mut skipped = Vec::new();
        if from == ReplayFrom::LatestSnapshot {
            for batch_no in self.snapshot_batches()?.into_iter().rev() {
                let (mut state, cursors) = match self.start_at_snapshot(batch_no, index)? {
                    Ok(start) => {
                        debug_assert_eq!(start.0.keeps_query_index(), index == QueryIndex::Kept);
                        if let Some(progress) = progress {
                            progress(start.0.entry_count());
                        }
                        start
                    }
                    Err(reason) => {
                        tracing::warn!(
                            ledger = %self.dir.display(),
                            snapshot = batch_no,
                            "snapshot not used: {reason}"
                        );
                        skipped.push((batch_no, reason));
                        continue;
                    }
                };
                self.walk_pipelined(batch_no + 1, cursors, progress, true, |step, value| {
                    replay_step(&mut state, self, step, value, &mut visit)
                })?;
                self.check_derived(&state)?;
                return Ok(Replayed {
                    state,
                    snapshot: Some(batch_no),
                    skipped,
                });
            }
        }
        let mut state = self.new_state_with(index)?;
        self.walk_pipelined(0, BTreeMap::new(), progress, true, |step, value| {
            replay_step(&mut state, self, step, value, &mut visit)
        })?;
        self.check_derived(&state)?;
        Ok(Replayed {
            state,
            snapshot: None,
            skipped,
        })
    }

    /// Visits every stored entry in ledger order from genesis, verifying
    /// every stream's chain as it goes and checking that the walk ends at the
    /// stored heads, exactly as [`Store::replay`] does, but folds nothing:
    /// for replays that fold only some entries (cut at a time). `progress`
    /// as for [`Store::replay_with`].
    pub fn walk_entries(
        &self,
        progress: Option<&(dyn Fn(u64) + Sync)>,
        mut visit: impl FnMut(&Entry),
    ) -> Result<(), StoreError> {
        self.walk_pipelined(0, BTreeMap::new(), progress, false, |step, _| {
            if let WalkStep::Entry(entry) = step {
                visit(&entry);
            }
        })
    }

    /// [`Store::walk`] on a second thread: reading pages and recomputing
    /// hashes there overlaps with whatever `visit` does (folding) on this
    /// one. With `decode`, a third thread decodes each entry's value
    /// ([`ledger::decode_record`]) between the two, and `visit` gets it;
    /// without, `visit` gets `None`. Same steps, same order, same errors.
    fn walk_pipelined(
        &self,
        from_batch: u64,
        cursors: BTreeMap<i32, Cursor>,
        progress: Option<&(dyn Fn(u64) + Sync)>,
        decode: bool,
        mut visit: impl FnMut(WalkStep, Option<ledger::Decoded>),
    ) -> Result<(), StoreError> {
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<WalkStep>>(WALK_CHUNKS_IN_FLIGHT);
            let walker = std::thread::Builder::new()
                .name("ledger-walk".into())
                .spawn_scoped(scope, move || {
                    let mut chunk = Vec::with_capacity(WALK_CHUNK_STEPS);
                    let walked = self.walk(from_batch, cursors, progress, |step| {
                        chunk.push(step);
                        if chunk.len() == WALK_CHUNK_STEPS {
                            let full =
                                std::mem::replace(&mut chunk, Vec::with_capacity(WALK_CHUNK_STEPS));
                            // A closed channel means the folder stopped: nothing to do.
                            let _ = tx.send(full);
                        }
                    });
                    if !chunk.is_empty() {
                        let _ = tx.send(chunk);
                    }
                    walked
                })
                .expect("can start the ledger walking thread");
            if decode {
                let (dtx, drx) = std::sync::mpsc::sync_channel::<
                    Vec<(WalkStep, Option<ledger::Decoded>)>,
                >(WALK_CHUNKS_IN_FLIGHT);
                let decoder = std::thread::Builder::new()
                    .name("ledger-decode".into())
                    .spawn_scoped(scope, move || {
                        for chunk in rx {
                            let decoded = chunk
                                .into_iter()
                                .map(|step| {
                                    let value = match &step {
                                        WalkStep::Entry(entry) => {
                                            Some(ledger::decode_record(&entry.record))
                                        }
                                        WalkStep::BatchEnd => None,
                                    };
                                    (step, value)
                                })
                                .collect();
                            if dtx.send(decoded).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("can start the ledger decoding thread");
                for chunk in drx {
                    for (step, value) in chunk {
                        visit(step, value);
                    }
                }
                decoder.join().expect("the ledger decoding thread panicked");
            } else {
                for chunk in rx {
                    for step in chunk {
                        visit(step, None);
                    }
                }
            }
            walker.join().expect("the ledger walking thread panicked")
        })
    }

    /// The walk behind every replay: follows the batch records from
    /// `from_batch` on, reading each run's entries with its partition's
    /// cursor (created at genesis for a partition not in `cursors`) and
    /// verifying each link; then checks that every stream ends exactly at
    /// its stored head and that no stored entry is left unlisted.
    fn walk(
        &self,
        from_batch: u64,
        mut cursors: BTreeMap<i32, Cursor>,
        progress: Option<&(dyn Fn(u64) + Sync)>,
        mut visit: impl FnMut(WalkStep),
    ) -> Result<(), StoreError> {
        let mut unreported = 0u64;
        for (expected_no, record) in (from_batch..).zip(self.batches(from_batch)) {
            let record = record?;
            if record.batch_no != expected_no {
                return Err(self.corrupt(
                    None,
                    format!(
                        "batch record {expected_no} is missing: the next stored batch record is {}",
                        record.batch_no
                    ),
                ));
            }
            for run in &record.runs {
                let partition = run.partition;
                if partition > MAX_PARTITION {
                    return Err(self.corrupt(
                        None,
                        format!(
                            "batch record {} lists partition {partition}, outside the supported range 0..={MAX_PARTITION}",
                            record.batch_no
                        ),
                    ));
                }
                let cursor = cursors.entry(partition).or_insert_with(|| Cursor {
                    pages: PageCursor::from_start(self.sled(), partition).hashing(),
                    verifier: ChainVerifier::new(self.stream(partition)),
                });
                if run.first_seq != cursor.verifier.next_seq() {
                    return Err(self.corrupt(
                        Some(Location {
                            partition,
                            seq: cursor.verifier.next_seq(),
                        }),
                        format!(
                            "batch record {} says partition {partition} continues at seq {}, but its chain stands at seq {}",
                            record.batch_no,
                            run.first_seq,
                            cursor.verifier.next_seq()
                        ),
                    ));
                }
                for _ in 0..run.count {
                    let location = Location {
                        partition,
                        seq: cursor.verifier.next_seq(),
                    };
                    let missing = |found: &str| {
                        self.corrupt(
                            Some(location),
                            format!(
                                "batch record {} lists the entry at {location}, but {found} (entry deleted)",
                                record.batch_no
                            ),
                        )
                    };
                    let (seq, decoded, recomputed) = match cursor.pages.next() {
                        None => return Err(missing("no entry is stored there")),
                        // A damaged page after a gap: the gap comes first.
                        Some(Err(CursorFault::Page(damage))) if damage.seq > location.seq => {
                            return Err(missing(&format!(
                                "the next stored page is at seq {}",
                                damage.page_seq
                            )));
                        }
                        Some(Err(CursorFault::MalformedKey(key))) => {
                            return Err(self.corrupt(
                                Some(location),
                                format!("malformed entry page key {key:02x?}"),
                            ));
                        }
                        Some(Err(fault)) => {
                            return Err(self.cursor_fault(
                                partition,
                                &format!("the entry at {location}"),
                                fault,
                            ));
                        }
                        Some(Ok(item)) => item,
                    };
                    if seq != location.seq {
                        return Err(missing(&format!("the next stored entry is seq {seq}")));
                    }
                    let entry = self.stored_entry(location, decoded)?;
                    let recomputed = recomputed.expect("a hashing cursor hashes decoded entries");
                    cursor
                        .verifier
                        .push_stored(&entry, recomputed)
                        .map_err(|brk| self.chain_broken(&brk))?;
                    visit(WalkStep::Entry(entry));
                    unreported += 1;
                    if unreported == PROGRESS_STEP {
                        if let Some(progress) = progress {
                            progress(unreported);
                        }
                        unreported = 0;
                    }
                }
            }
            visit(WalkStep::BatchEnd);
        }
        if let Some(progress) = progress
            && unreported > 0
        {
            progress(unreported);
        }

        let stored: BTreeMap<i32, ChainHead> = self
            .heads()?
            .into_iter()
            .map(|h| (h.stream().partition, h))
            .collect();
        for (partition, head) in &stored {
            let (next_seq, last_offset, hash) = match cursors.get(partition) {
                Some(c) => (
                    c.verifier.next_seq(),
                    c.verifier.last_offset(),
                    c.verifier.head(),
                ),
                None => (0, None, chain::genesis(head.stream())),
            };
            if head.next_seq() != next_seq
                || head.last_offset() != last_offset
                || head.head() != hash
            {
                return Err(self.corrupt(
                    Some(Location {
                        partition: *partition,
                        seq: next_seq,
                    }),
                    format!(
                        "stored head of partition {partition} says next seq {}, last offset {}, hash {}; the chain the batch records list ends at next seq {next_seq}, last offset {}, hash {}",
                        head.next_seq(),
                        offset_text(head.last_offset()),
                        head.head().short(),
                        offset_text(last_offset),
                        hash.short()
                    ),
                ));
            }
        }
        for (partition, cursor) in &mut cursors {
            if !stored.contains_key(partition) {
                return Err(self.corrupt(
                    None,
                    format!(
                        "partition {partition} has entries listed in batch records but no stored head"
                    ),
                ));
            }
            match cursor.pages.next() {
                None => {}
                Some(Ok((seq, _, _))) => {
                    let extra = Location {
                        partition: *partition,
                        seq,
                    };
                    return Err(self.corrupt(
                        Some(extra),
                        format!(
                            "an entry is stored at {extra}, beyond its head (next seq {}), and no batch record lists it",
                            cursor.verifier.next_seq()
                        ),
                    ));
                }
                Some(Err(CursorFault::MalformedKey(key))) => {
                    return Err(self.corrupt(
                        None,
                        format!(
                            "an entry page is stored under malformed key {key:02x?}, beyond the head of partition {partition} (next seq {}), and no batch record lists it",
                            cursor.verifier.next_seq()
                        ),
                    ));
                }
                Some(Err(fault)) => {
                    return Err(self.cursor_fault(
                        *partition,
                        &format!("the entries of partition {partition}"),
                        fault,
                    ));
                }
            }
        }
        for partition in self.entry_partitions()? {
            if !cursors.contains_key(&partition) {
                return Err(self.corrupt(
                    Some(Location { partition, seq: 0 }),
                    format!("partition {partition} has stored entries that no batch record lists"),
                ));
            }
        }
        Ok(())
    }
}

/// Where [`Store::replay_with`] starts folding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The latest usable snapshot; genesis when there is none.
    LatestSnapshot,
    /// Genesis: every entry is folded again; snapshots are ignored.
    Genesis,
}

/// Whether [`Store::replay_with`] rebuilds the query index too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryIndex {
    /// Rebuilt: the state answers queries and can be snapshotted.
    Kept,
    /// Not rebuilt ([`LedgerState::drop_query_index`]): for a replay that
    /// only needs the deals; about a fifth less CPU from genesis.
    Dropped,
}

/// What [`Store::replay_with`] rebuilt, and from where.
pub struct Replayed {
    /// The state after the last stored batch.
    pub state: LedgerState,
    /// The batch after which the snapshot the fold started from was taken;
    /// `None` when it started from genesis.
    pub snapshot: Option<u64>,
    /// Snapshots found unusable, newest first: their batch number and why.
    pub skipped: Vec<(u64, String)>,
}

/// What one [`Store::write_snapshot`] wrote and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    /// The snapshot was taken after this batch (its `S` key).
    pub batch_no: u64,
    /// Size of the stored value.
    pub bytes: usize,
    /// Encoding the state and writing it to its file.
    pub encode: Duration,
    /// Making the file durable (fsync).
    pub sync: Duration,
    /// Putting it in place: the rename, older snapshots removed, the
    /// folder synced.
    pub durable: Duration,
}

/// One step of a walk over the ledger in ledger order.
enum WalkStep {
    /// The next entry, its link verified.
    Entry(Entry),
    /// The end of a batch record.
    BatchEnd,
}

/// Folds one step of a replay walk into `state` (`value`: the entry's
/// value, decoded on the walk's decoding thread) and shows the entry and
/// its outcome to `visit`.
fn replay_step(
    state: &mut LedgerState,
    store: &Store,
    step: WalkStep,
    value: Option<ledger::Decoded>,
    visit: &mut impl FnMut(&Entry, &Outcome),
) {
    match step {
        WalkStep::Entry(entry) => {
            let value = value.unwrap_or_else(|| ledger::decode_record(&entry.record));
            let outcome = state.replay_decoded(&entry, value, store);
            visit(&entry, &outcome);
        }
        WalkStep::BatchEnd => state.replayed_batch(),
    }
}

/// Steps handed from one thread of a pipelined walk to the next at a time:
/// 12-16 KB a chunk (192 bytes a step, 248 with its decoding).
const WALK_CHUNK_STEPS: usize = 64;

/// Chunks in flight between two threads of a pipelined walk: bounds its
/// memory to about 2 × 256 × 64 entries (~30 MB of 400-byte events, with
/// their decodings). Enough for the walker and decoder to run ahead while
/// the fold writes an identity run (at 16 × 256 they waited for it).
const WALK_CHUNKS_IN_FLIGHT: usize = 256;

/// A replay's start at a snapshot: the restored state and a cursor per
/// stream, resuming at the snapshot's heads.
pub(super) type SnapshotStart = (LedgerState, BTreeMap<i32, Cursor>);

/// One partition's read position and verifier during a walk.
pub(super) struct Cursor {
    pub(super) pages: PageCursor,
    pub(super) verifier: ChainVerifier,
}

/// How many verified entries a walk counts before reporting progress.
const PROGRESS_STEP: u64 = 4096;
