//! Entry pages: consecutive entries of a partition packed into one sled
//! value, and the readers and cursors that take them apart again.

use super::*;

/// Encodes one partition's new entries (consecutive seqs, ascending) as
/// pages: `(first seq, page)`. Each page takes entries while it has fewer
/// than [`MAX_PAGE_ENTRIES`] and the next one keeps it within
/// [`PAGE_FILL_BYTES`]; its first entry always fits, so an entry too large
/// for a shared page gets a page of its own.
pub(super) fn encode_pages(entries: &[&Entry]) -> Vec<(u64, Vec<u8>)> {
    encode_pages_filled_to(entries, PAGE_FILL_BYTES)
}

/// [`encode_pages`] with another fill size (at most [`MAX_PAGE_BYTES`]).
pub(super) fn encode_pages_filled_to(entries: &[&Entry], fill_bytes: usize) -> Vec<(u64, Vec<u8>)> {
    assert!(fill_bytes <= MAX_PAGE_BYTES);
    let encoded: Vec<Vec<u8>> = entries.iter().map(|e| chain::encode_entry(e)).collect();
    let mut pages = Vec::new();
    let mut start = 0;
    while start < encoded.len() {
        let mut len = PAGE_HEADER_BYTES + PAGE_LENGTH_BYTES + encoded[start].len();
        let mut end = start + 1;
        while end < encoded.len()
            && end - start < MAX_PAGE_ENTRIES
            && len + PAGE_LENGTH_BYTES + encoded[end].len() <= fill_bytes
        {
            len += PAGE_LENGTH_BYTES + encoded[end].len();
            end += 1;
        }
        let mut page = Vec::with_capacity(len);
        page.push(PAGE_FORMAT);
        page.extend_from_slice(&((end - start) as u32).to_be_bytes());
        for bytes in &encoded[start..end] {
            page.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            page.extend_from_slice(bytes);
        }
        debug_assert_eq!(page.len(), len);
        pages.push((entries[start].seq, page));
        start = end;
    }
    pages
}

/// Damage to a page's framing, at the chain position it hides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PageDamage {
    /// The page's first seq (its key).
    pub(super) page_seq: u64,
    /// The seq the damage is reported at: the page's first seq for its
    /// header, the entry's for an entry's length, the seq after the last
    /// counted entry for bytes after it.
    pub(super) seq: u64,
    /// What is wrong.
    pub(super) reason: String,
}

/// Reads one page's entries front to back, checking its framing exactly:
/// the header, then each entry's length against the bytes left, and at the
/// end that no bytes follow the last counted entry. Entries themselves are
/// not decoded here.
pub(super) struct PageReader {
    pub(super) first_seq: u64,
    pub(super) count: u32,
    pub(super) value: sled::IVec,
    /// Entries handed out so far.
    pub(super) index: u32,
    /// Byte position of the next entry's length.
    pub(super) at: usize,
    /// The end (or damage) was reported.
    pub(super) finished: bool,
    /// Entries framed by [`PageReader::read_ahead`], not yet handed out.
    pub(super) ahead: std::collections::VecDeque<Result<(u64, std::ops::Range<usize>), PageDamage>>,
}

impl PageReader {
    /// Checks the header of the page stored under `first_seq`.
    pub(super) fn open(first_seq: u64, value: sled::IVec) -> Result<PageReader, PageDamage> {
        let damage = |reason: String| PageDamage {
            page_seq: first_seq,
            seq: first_seq,
            reason,
        };
        let len = value.len();
        if len < PAGE_HEADER_BYTES {
            return Err(damage(format!(
                "it is {len} bytes, shorter than the {PAGE_HEADER_BYTES}-byte page header"
            )));
        }
        if value[0] != PAGE_FORMAT {
            return Err(damage(format!(
                "it has page format {}, this build reads {PAGE_FORMAT}",
                value[0]
            )));
        }
        let count = u32::from_be_bytes(value[1..PAGE_HEADER_BYTES].try_into().expect("4 bytes"));
        if count == 0 || count as usize > MAX_PAGE_ENTRIES {
            return Err(damage(format!(
                "its header says it holds {count} entries; a page holds 1 to {MAX_PAGE_ENTRIES}"
            )));
        }
        let max = if count == 1 {
            MAX_SINGLE_ENTRY_PAGE_BYTES
        } else {
            MAX_PAGE_BYTES
        };
        if len > max {
            return Err(damage(format!(
                "it holds {count} entries in {len} bytes, more than {max} (MAX_PAGE_BYTES is {MAX_PAGE_BYTES}; only a page of one entry may be larger)"
            )));
        }
        if first_seq.checked_add(u64::from(count)).is_none() {
            return Err(damage(format!(
                "its {count} entries would run past seq u64::MAX"
            )));
        }
        Ok(PageReader {
            first_seq,
            count,
            value,
            index: 0,
            at: PAGE_HEADER_BYTES,
            finished: false,
            ahead: std::collections::VecDeque::new(),
        })
    }

    /// Frames the rest of the page now, to be handed out by
    /// [`PageReader::next_entry`] as before, and returns the byte ranges of
    /// its entries up to the end or the first damage.
    fn read_ahead(&mut self) -> Vec<std::ops::Range<usize>> {
        let mut ahead = std::mem::take(&mut self.ahead);
        while let Some(item) = self.next_entry() {
            ahead.push_back(item);
        }
        self.ahead = ahead;
        self.ahead
            .iter()
            .filter_map(|item| item.as_ref().ok().map(|(_, range)| range.clone()))
            .collect()
    }

    /// The seq after the page's last entry.
    pub(super) fn end_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count)
    }

    /// The next entry's seq and byte range in [`PageReader::value`]; after
    /// the last entry, `None`, or damage if bytes follow it.
    pub(super) fn next_entry(
        &mut self,
    ) -> Option<Result<(u64, std::ops::Range<usize>), PageDamage>> {
        if let Some(item) = self.ahead.pop_front() {
            return Some(item);
        }
        if self.finished {
            return None;
        }
        let seq = self.first_seq + u64::from(self.index);
        let remain = self.value.len() - self.at;
        let mut damage = |reason: String| {
            self.finished = true;
            Some(Err(PageDamage {
                page_seq: self.first_seq,
                seq,
                reason,
            }))
        };
        if self.index == self.count {
            if remain > 0 {
                let count = self.count;
                return damage(format!(
                    "{remain} bytes follow its last entry (its header counts {count} entries, the last is seq {}): the count or an entry's length is wrong, or bytes were added",
                    seq - 1
                ));
            }
            self.finished = true;
            return None;
        }
        let index = self.index;
        if remain < PAGE_LENGTH_BYTES {
            return damage(format!(
                "it ends inside the length of its entry {index} (seq {seq}): {remain} of {PAGE_LENGTH_BYTES} bytes are there, its header counts {} entries",
                self.count
            ));
        }
        let at = self.at;
        let len = u32::from_be_bytes(
            self.value[at..at + PAGE_LENGTH_BYTES]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        let left = remain - PAGE_LENGTH_BYTES;
        if len > left {
            return damage(format!(
                "its entry {index} (seq {seq}) has length {len}, but only {left} bytes are left in the page"
            ));
        }
        let start = at + PAGE_LENGTH_BYTES;
        self.at = start + len;
        self.index += 1;
        Some(Ok((seq, start..self.at)))
    }
}

/// What stopped a [`PageCursor`].
pub(super) enum CursorFault {
    /// sled could not read.
    Read(sled::Error),
    /// A key under the partition's prefix that is no page key.
    MalformedKey(Vec<u8>),
    /// A page whose framing is damaged.
    Page(PageDamage),
}

/// One partition's entries, read page by page in key order: yields each
/// entry's seq (its page's first seq + its place in the page) and the
/// entry as decoded from its bytes. Does not check that pages continue
/// each other: callers compare the seqs with the ones they expect.
///
/// `P` yields the raw pages: a live sled iterator, or pages read ahead into
/// memory ([`PageCursor::over`], for [`Store::verify`]), which hold no
/// sled handle.
pub(super) struct PageCursor<P = sled::Iter> {
    /// Keeps sled's handles alive while the cursor reads from them (see
    /// [`Store::sled`]); `None` over pages read ahead.
    _sled: Option<Arc<Sled>>,
    pub(super) pages: P,
    pub(super) page: Option<PageReader>,
    /// A fault found while positioning, yielded first.
    pending: Option<CursorFault>,
    /// Whether items carry [`chain::stored_entry_hash`] of their bytes.
    hash_stored: bool,
    /// With `hash_stored`: the hashes of the current page's entries, in
    /// order, computed together when the page was opened
    /// ([`chain::stored_entry_hashes`]; `None` for bytes too short to be an
    /// entry). Empty for a page the cursor was positioned in.
    page_hashes: std::vec::IntoIter<Option<Hash>>,
}

/// One raw page as sled yields it: key and value.
pub(super) type RawPage = sled::Result<(sled::IVec, sled::IVec)>;

/// One item of a [`PageCursor`]: the entry's seq, its decoding and, from a
/// cursor made with [`PageCursor::hashing`], the entry hash of its stored
/// bytes ([`chain::stored_entry_hash`], for [`ChainVerifier::push_stored`]).
type RawEntry = (u64, Result<Entry, DecodeEntryError>, Option<Hash>);

impl PageCursor {
    /// All pages of `partition`, from the first.
    pub(super) fn from_start(sled: Arc<Sled>, partition: i32) -> PageCursor {
        PageCursor {
            pages: sled.tree.scan_prefix(entry_prefix(partition)),
            _sled: Some(sled),
            page: None,
            pending: None,
            hash_stored: false,
            page_hashes: Vec::new().into_iter(),
        }
    }

    /// Positioned at entry `seq` of `partition`: in the page holding it
    /// (found with one reverse seek when it starts before `seq`, its earlier
    /// entries skipped by their lengths) or, when `seq` is the end of that
    /// page, right after it (its end still checked for trailing bytes).
    pub(super) fn at(sled: Arc<Sled>, partition: i32, seq: u64) -> PageCursor {
        let tree = sled.tree.clone();
        let mut cursor = PageCursor {
            pages: tree.range(page_key(partition, seq)..=page_key(partition, u64::MAX)),
            _sled: Some(sled),
            page: None,
            pending: None,
            hash_stored: false,
            page_hashes: Vec::new().into_iter(),
        };
        let prefix = entry_prefix(partition);
        let start = page_key(partition, seq);
        let Some(before) = tree.range::<&[u8], _>(&prefix[..]..&start[..]).next_back() else {
            return cursor;
        };
        let (key, value) = match before {
            Ok(item) => item,
            Err(e) => {
                cursor.pending = Some(CursorFault::Read(e));
                return cursor;
            }
        };
        let Some(first_seq) = parse_page_key(&key) else {
            cursor.pending = Some(CursorFault::MalformedKey(key.to_vec()));
            return cursor;
        };
        let mut reader = match PageReader::open(first_seq, value) {
            Ok(reader) => reader,
            Err(damage) => {
                cursor.pending = Some(CursorFault::Page(damage));
                return cursor;
            }
        };
        if reader.end_seq() < seq {
            return cursor;
        }
        for _ in first_seq..seq {
            match reader.next_entry() {
                Some(Ok(_)) => {}
                Some(Err(damage)) => {
                    cursor.pending = Some(CursorFault::Page(damage));
                    return cursor;
                }
                None => unreachable!("the page holds the entries before its end seq"),
            }
        }
        cursor.page = Some(reader);
        cursor
    }
}

impl PageCursor<std::vec::IntoIter<RawPage>> {
    /// The entries of whole pages read ahead (in key order, one partition):
    /// the same items a cursor reading those pages from sled would yield.
    pub(super) fn over(pages: Vec<RawPage>) -> Self {
        PageCursor {
            _sled: None,
            pages: pages.into_iter(),
            page: None,
            pending: None,
            hash_stored: false,
            page_hashes: Vec::new().into_iter(),
        }
    }
}

impl<P> PageCursor<P> {
    /// The same cursor, its items carrying the entry hash of their stored
    /// bytes (for cursors whose entries are verified).
    pub(super) fn hashing(self) -> Self {
        PageCursor {
            hash_stored: true,
            ..self
        }
    }
}

impl<P: Iterator<Item = RawPage>> Iterator for PageCursor<P> {
    type Item = Result<RawEntry, CursorFault>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(fault) = self.pending.take() {
            return Some(Err(fault));
        }
        loop {
            if let Some(page) = &mut self.page {
                match page.next_entry() {
                    Some(Ok((seq, range))) => {
                        let bytes = &page.value[range];
                        let decoded = chain::decode_entry(bytes);
                        let computed = self.page_hashes.next().flatten();
                        let hash = (self.hash_stored && decoded.is_ok())
                            .then(|| computed.unwrap_or_else(|| chain::stored_entry_hash(bytes)));
                        return Some(Ok((seq, decoded, hash)));
                    }
                    Some(Err(damage)) => {
                        self.page = None;
                        return Some(Err(CursorFault::Page(damage)));
                    }
                    None => self.page = None,
                }
            }
            let (key, value) = match self.pages.next()? {
                Ok(item) => item,
                Err(e) => return Some(Err(CursorFault::Read(e))),
            };
            let Some(first_seq) = parse_page_key(&key) else {
                return Some(Err(CursorFault::MalformedKey(key.to_vec())));
            };
            match PageReader::open(first_seq, value) {
                Ok(mut reader) => {
                    if self.hash_stored {
                        self.page_hashes = page_hashes(&mut reader).into_iter();
                    }
                    self.page = Some(reader);
                }
                Err(damage) => return Some(Err(CursorFault::Page(damage))),
            }
        }
    }
}

/// The stored entry hash of each entry of a page the reader is opening, up
/// to its end or its first damage, hashed together
/// ([`chain::stored_entry_hashes`]); `None` for bytes too short to be an
/// entry (they do not decode either). The page is framed once: the reader
/// hands out what it framed here.
fn page_hashes(reader: &mut PageReader) -> Vec<Option<Hash>> {
    let ranges = reader.read_ahead();
    let long_enough = |r: &std::ops::Range<usize>| r.len() > 1 + HASH_LEN;
    let entries: Vec<&[u8]> = ranges
        .iter()
        .filter(|r| long_enough(r))
        .map(|r| &reader.value[r.clone()])
        .collect();
    let mut hashes = chain::stored_entry_hashes(&entries).into_iter();
    ranges
        .iter()
        .map(|r| if long_enough(r) { hashes.next() } else { None })
        .collect()
}
