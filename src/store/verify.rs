//! Offline verification of a stored ledger: every page, entry and chain
//! link, and the report it gives (`dealledger verify`).

use super::*;

impl Store {
    pub(super) fn chain_broken(&self, brk: &ChainBreak) -> StoreError {
        self.corrupt(
            Some(Location {
                partition: brk.stream.partition,
                seq: brk.seq,
            }),
            format!("chain broken at {brk}"),
        )
    }

    // ---- verification ----------------------------------------------------------

    /// Verifies every stream: walks its pages in key order and their
    /// entries in page order (a page's key must be the next seq, its
    /// framing must add up exactly, and each entry must say it is the seq
    /// its place gives), checks each link with [`ChainVerifier`], then
    /// compares the end with the stored head. Damage is reported per stream
    /// in the [`VerifyReport`], at the exact seq it hides (docs/FORMAT.md,
    /// "Checks a reader makes"); the error is for failures to read at all.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        self.verify_with_progress(|_| {})
    }

    /// Verifies the entries of whole pages of one stream read ahead
    /// ([`Store::read_pages`]), continuing where its check stands; returns
    /// how many verified. Stops at the stream's first problem.
    fn verify_pages(
        &self,
        check: &mut StreamCheck,
        pages: Vec<RawPage>,
    ) -> Result<u64, StoreError> {
        let partition = check.partition;
        let stream = self.stream(partition);
        let verifier = &mut check.verifier;
        let problem_at = |seq: u64, offset: Option<i64>, kind: ProblemKind| StreamProblem {
            stream: stream.clone(),
            seq,
            offset,
            kind,
        };
        let mut checked = 0;
        for item in PageCursor::over(pages).hashing() {
            let expected = verifier.next_seq();
            let (seq, decoded, recomputed) = match item {
                Ok(item) => item,
                Err(CursorFault::Read(e)) => {
                    return Err(
                        self.sled_error(format!("reading entries of partition {partition}"), e)
                    );
                }
                Err(CursorFault::MalformedKey(key)) => {
                    check.problem = Some(problem_at(
                        expected,
                        None,
                        ProblemKind::MalformedKey { key },
                    ));
                    break;
                }
                // A damaged page after a gap: the gap comes first.
                Err(CursorFault::Page(damage)) if damage.seq != expected => {
                    check.problem = Some(problem_at(
                        expected,
                        None,
                        ProblemKind::Chain(BreakKind::SeqGap {
                            expected,
                            found: damage.page_seq,
                        }),
                    ));
                    break;
                }
                Err(CursorFault::Page(damage)) => {
                    check.problem = Some(problem_at(
                        damage.seq,
                        None,
                        ProblemKind::DamagedPage {
                            page_seq: damage.page_seq,
                            reason: damage.reason,
                        },
                    ));
                    break;
                }
            };
            if seq != expected {
                check.problem = Some(problem_at(
                    expected,
                    None,
                    ProblemKind::Chain(BreakKind::SeqGap {
                        expected,
                        found: seq,
                    }),
                ));
                break;
            }
            let entry = match decoded {
                Ok(entry) => entry,
                Err(error) => {
                    check.problem =
                        Some(problem_at(expected, None, ProblemKind::Undecodable(error)));
                    break;
                }
            };
            if entry.seq != seq {
                check.problem = Some(problem_at(
                    expected,
                    Some(entry.record.offset),
                    ProblemKind::MisplacedEntry {
                        key_seq: seq,
                        entry_seq: entry.seq,
                    },
                ));
                break;
            }
            let recomputed = recomputed.expect("a hashing cursor hashes decoded entries");
            if let Err(brk) = verifier.push_stored(&entry, recomputed) {
                check.problem = Some(problem_at(
                    brk.seq,
                    brk.offset,
                    ProblemKind::Chain(*brk.kind),
                ));
                break;
            }
            checked += 1;
        }
        Ok(checked)
    }

    /// Reads whole pages of `partition`, after the page key `after` (from
    /// its first page without), until they hold at least `budget` entries
    /// (by their headers) or the partition's keys end. Returns them, in key
    /// order, and whether the partition ended. A read error is returned as
    /// the last page, for [`Store::verify_pages`] to report in its place.
    fn read_pages(&self, partition: i32, after: Option<&[u8]>, budget: u64) -> PagesRead {
        let sled = self.sled();
        let prefix = entry_prefix(partition);
        let keys = match after {
            None => sled.tree.scan_prefix(prefix),
            Some(key) => sled
                .tree
                .range::<&[u8], _>((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded)),
        };
        let mut read = PagesRead {
            pages: Vec::new(),
            ended: true,
        };
        let mut entries = 0u64;
        for item in keys {
            let (key, value) = match item {
                Ok(page) => page,
                Err(e) => {
                    read.pages.push(Err(e));
                    return read;
                }
            };
            if !key.starts_with(&prefix) {
                return read;
            }
            // A damaged header counts as one entry; verify_pages reports it.
            let count = match value.get(..PAGE_HEADER_BYTES) {
                Some(header) if header[0] == PAGE_FORMAT => {
                    u32::from_be_bytes(header[1..].try_into().expect("4 bytes")).max(1)
                }
                _ => 1,
            };
            read.pages.push(Ok((key, value)));
            entries += u64::from(count);
            if entries >= budget {
                read.ended = false;
                return read;
            }
        }
        read
    }

    /// [`Store::verify`], calling `progress` with the number of entries
    /// checked so far now and then (after each round of about
    /// [`VERIFY_ROUND_ENTRIES`], for progress bars).
    ///
    /// In rounds: this thread reads each stream's next whole pages (its
    /// share of [`VERIFY_ROUND_ENTRIES`]) into memory while up to
    /// [`MAX_VERIFY_THREADS`] workers decode and hash the pages of the round
    /// before (streams in parallel, each stream's pages in order, each
    /// entry hashed as stored: [`chain::stored_entry_hash`]). Two rounds at
    /// most are in memory, so memory stays flat in the ledger's size.
    pub fn verify_with_progress(
        &self,
        mut progress: impl FnMut(u64),
    ) -> Result<VerifyReport, StoreError> {
        let mut checked = 0u64;
        let mut heads: BTreeMap<i32, Result<ChainHead, String>> = BTreeMap::new();
        for item in self.sled().tree.scan_prefix([FAMILY_HEAD]) {
            let (key, value) = item.map_err(|e| self.sled_error("reading stream heads", e))?;
            let partition = parse_head_key(&key).ok_or_else(|| {
                self.corrupt(None, format!("malformed head key {:02x?}", &key[..]))
            })?;
            heads.insert(partition, decode_head(self.stream(partition), &value));
        }
        let mut partitions: BTreeSet<i32> = heads.keys().copied().collect();
        partitions.extend(self.entry_partitions()?);

        let mut checks: Vec<StreamCheck> = partitions
            .into_iter()
            .map(|partition| StreamCheck {
                partition,
                verifier: ChainVerifier::new(self.stream(partition)),
                problem: None,
            })
            .collect();
        // Rounds: this thread reads each stream's next pages (a share of
        // the round) into memory while up to `threads` workers verify the
        // pages read in the round before (streams in parallel, each
        // stream's pages in order).
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_VERIFY_THREADS);
        let budget =
            (self.verify_round.load(Ordering::Relaxed) / checks.len().max(1) as u64).max(1);
        let partitions: Vec<i32> = checks.iter().map(|c| c.partition).collect();
        let mut positions: Vec<ReadPosition> = checks.iter().map(|_| ReadPosition::Start).collect();
        // One round: per stream (as `checks`), the pages read, if any.
        let read_round = |positions: &mut Vec<ReadPosition>| -> Vec<Option<Vec<RawPage>>> {
            positions
                .iter_mut()
                .zip(&partitions)
                .map(|(position, partition)| {
                    let after = match position {
                        ReadPosition::Start => None,
                        ReadPosition::After(key) => Some(&key[..]),
                        ReadPosition::Done => return None,
                    };
                    let read = self.read_pages(*partition, after, budget);
                    *position = match (read.ended, read.pages.last()) {
                        (false, Some(Ok((key, _)))) => ReadPosition::After(key.clone()),
                        _ => ReadPosition::Done,
                    };
                    (!read.pages.is_empty()).then_some(read.pages)
                })
                .collect()
        };
        let mut round = read_round(&mut positions);
        loop {
            // Streams with a problem take no further part.
            let parts: Vec<(&mut StreamCheck, Vec<RawPage>)> = checks
                .iter_mut()
                .zip(std::mem::take(&mut round))
                .filter_map(|(check, pages)| Some((check, pages?)))
                .filter(|(check, _)| check.problem.is_none())
                .collect();
            if parts.is_empty() {
                break;
            }
            let workers = threads.min(parts.len());
            let queue = Mutex::new(parts);
            let (done, next) = std::thread::scope(|scope| {
                let runs: Vec<_> = (0..workers)
                    .map(|_| {
                        std::thread::Builder::new()
                            .name("ledger-verify".into())
                            .spawn_scoped(scope, || {
                                let mut checked = 0u64;
                                loop {
                                    let next =
                                        queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
                                    let Some((check, pages)) = next else {
                                        return Ok(checked);
                                    };
                                    checked += self.verify_pages(check, pages)?;
                                }
                            })
                            .expect("can start a verifying thread")
                    })
                    .collect();
                let next = read_round(&mut positions);
                let mut total = 0;
                let mut first_error = None;
                for run in runs {
                    match run.join().expect("a verifying thread panicked") {
                        Ok(n) => total += n,
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                (first_error.map_or(Ok(total), Err), next)
            });
            drop(queue);
            checked += done?;
            progress(checked);
            round = next;
        }

        let mut streams = Vec::with_capacity(checks.len());
        for StreamCheck {
            partition,
            verifier,
            mut problem,
            ..
        } in checks
        {
            let stream = self.stream(partition);
            let problem_at = |seq: u64, offset: Option<i64>, kind: ProblemKind| StreamProblem {
                stream: stream.clone(),
                seq,
                offset,
                kind,
            };
            if problem.is_none() {
                let end = verifier.next_seq();
                problem = match heads.get(&partition) {
                    None => Some(problem_at(end, None, ProblemKind::HeadMissing)),
                    Some(Err(reason)) => Some(problem_at(
                        end,
                        None,
                        ProblemKind::HeadUnreadable {
                            reason: reason.clone(),
                        },
                    )),
                    Some(Ok(head)) => match verifier.check_head(head.next_seq(), &head.head()) {
                        Err(brk) => Some(problem_at(brk.seq, None, ProblemKind::Chain(*brk.kind))),
                        Ok(()) if head.last_offset() != verifier.last_offset() => Some(problem_at(
                            end,
                            None,
                            ProblemKind::HeadOffsetMismatch {
                                expected: head.last_offset(),
                                found: verifier.last_offset(),
                            },
                        )),
                        Ok(()) => None,
                    },
                };
            }
            let entries = verifier.next_seq();
            streams.push(StreamReport {
                partition,
                entries,
                head: entries.checked_sub(1).map(|last| (last, verifier.head())),
                problem,
            });
        }
        Ok(VerifyReport { streams })
    }
}

/// The result of [`Store::verify`]: one report per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Every stream with a stored head or stored entries, by partition.
    pub streams: Vec<StreamReport>,
}

impl VerifyReport {
    /// Whether every stream verified.
    pub fn is_intact(&self) -> bool {
        self.streams.iter().all(|s| s.problem.is_none())
    }

    /// The problems found, in partition order.
    pub fn problems(&self) -> impl Iterator<Item = &StreamProblem> {
        self.streams.iter().filter_map(|s| s.problem.as_ref())
    }
}

/// The verification result of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// The partition.
    pub partition: i32,
    /// Entries that verified, from seq 0 (all of them when intact).
    pub entries: u64,
    /// Seq and hash of the last entry that verified.
    pub head: Option<(u64, Hash)>,
    /// The first problem found, if any (verification of the stream stops there).
    pub problem: Option<StreamProblem>,
}

/// Where and how a stored stream does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{stream} seq {seq} ({}): {kind}", match .offset { Some(o) => format!("offset {o}"), None => "offset unknown".to_owned() })]
pub struct StreamProblem {
    /// The stream.
    pub stream: StreamId,
    /// The chain position of the problem (the seq expected there).
    pub seq: u64,
    /// The offending entry's offset, when it could be read.
    pub offset: Option<i64>,
    /// What is wrong, with expected and found values.
    pub kind: ProblemKind,
}

/// What [`Store::verify`] found wrong with a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    /// The chain is broken: a missing key shows as a seq gap; altered,
    /// inserted or reordered entries as link or hash mismatches; a deleted
    /// tail or re-hashed chain as a mismatch with the stored head.
    #[error(transparent)]
    Chain(BreakKind),
    /// The stored bytes are not a valid entry.
    #[error("stored entry does not decode: {0}")]
    Undecodable(DecodeEntryError),
    /// The entry stored at seq `key_seq` (its page's key + its place in the
    /// page) says it is seq `entry_seq`.
    #[error(
        "entry stored at seq {key_seq} says it is seq {entry_seq} (entry or page moved, copied or swapped)"
    )]
    MisplacedEntry {
        /// The seq its place gives: the page key's first seq + its index.
        key_seq: u64,
        /// The seq in the entry.
        entry_seq: u64,
    },
    /// The framing of an entry page is damaged: its header (reported at
    /// the page's first seq), an entry's length (at that entry's seq), or
    /// bytes after its last counted entry (at the seq after it).
    #[error("the entry page stored at seq {page_seq} is damaged: {reason}")]
    DamagedPage {
        /// The page's first seq (its key).
        page_seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// An entry page key of the wrong shape.
    #[error("malformed entry page key {key:02x?}")]
    MalformedKey {
        /// The key bytes.
        key: Vec<u8>,
    },
    /// The stream has entries but no stored head.
    #[error("entries are stored but the stream has no stored head (head deleted)")]
    HeadMissing,
    /// The stored head does not decode.
    #[error("stored head is unreadable: {reason}")]
    HeadUnreadable {
        /// What is wrong.
        reason: String,
    },
    /// The chain ends at the stored head's seq and hash but another offset.
    #[error(
        "stored head says last offset {}, the chain ends at offset {}",
        offset_text(*.expected),
        offset_text(*.found)
    )]
    HeadOffsetMismatch {
        /// The stored head's last offset.
        expected: Option<i64>,
        /// The last verified entry's offset.
        found: Option<i64>,
    },
}
