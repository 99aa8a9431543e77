//! The amendments every deal applied, remembered book-wide as fingerprints
//! of (deal id, amendment id), so that a reused amendment id is refused.

use super::*;

/// Where a [`DealBook`] remembers the amendments its deals applied: the
/// fingerprint ([`amendment_fingerprint`]) of each (deal id, amendment id).
///
/// A reused amendment id is refused, so every one applied must be kept:
/// with the identity index, the one part of the book that grows with each
/// event rather than with the deals (2.4M amendments in the benchmark's 3M
/// events: 20 MB as a sorted vector per deal). [`MemoryAmendments`] keeps
/// them in a hash set (tests, folds of a few events); the storage shell
/// keeps them on disk, in sorted runs with a filter in memory
/// ([`crate::identities::SpilledIdentities`]), so the daemon's memory does
/// not grow with them.
pub trait AmendmentSet: Send + Sync {
    /// Whether `fingerprint` was recorded.
    fn contains(&self, fingerprint: u64) -> bool;
    /// Records `fingerprint`, which must be absent.
    fn insert(&mut self, fingerprint: u64);
    /// Number of fingerprints recorded.
    fn len(&self) -> usize;
    /// Whether none is recorded.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Records every fingerprint of `sorted`, which strictly increase, in
    /// this empty set.
    fn load_sorted(&mut self, sorted: Vec<u64>) {
        assert!(self.is_empty(), "load_sorted into a set that is not empty");
        for fingerprint in sorted {
            self.insert(fingerprint);
        }
    }
    /// [`AmendmentSet::load_sorted`] of the `count` fingerprints `next`
    /// gives (strictly increasing; fewer if it ends early), never all held
    /// at once. Returns how many it loaded.
    fn load_sorted_from(&mut self, count: usize, next: &mut dyn FnMut() -> Option<u64>) -> usize {
        assert!(
            self.is_empty(),
            "load_sorted_from into a set that is not empty"
        );
        let mut loaded = 0;
        while loaded < count
            && let Some(fingerprint) = next()
        {
            self.insert(fingerprint);
            loaded += 1;
        }
        loaded
    }
    /// Every fingerprint, in increasing order.
    fn sorted(&self) -> Box<dyn Iterator<Item = u64> + '_>;
    /// The first I/O failure met, if any: a lookup after it may have been
    /// wrong, so the shell must not store what the fold derived.
    fn failure(&self) -> Option<&ScratchFailure>;
}

/// An [`AmendmentSet`] in memory: a hash set of fingerprints.
#[derive(Clone, Debug, Default)]
pub struct MemoryAmendments(std::collections::HashSet<u64>);

impl AmendmentSet for MemoryAmendments {
    fn contains(&self, fingerprint: u64) -> bool {
        self.0.contains(&fingerprint)
    }

    fn insert(&mut self, fingerprint: u64) {
        let new = self.0.insert(fingerprint);
        debug_assert!(
            new,
            "amendment fingerprint {fingerprint:016x} inserted twice"
        );
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn sorted(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        let mut all: Vec<u64> = self.0.iter().copied().collect();
        all.sort_unstable();
        Box::new(all.into_iter())
    }

    fn failure(&self) -> Option<&ScratchFailure> {
        None
    }
}

/// The blake3 derive-key context of [`amendment_fingerprint`].
const AMENDMENT_CONTEXT: &str = "dealledger 2026-11 amendment of a deal v2";

/// The 64-bit fingerprint under which the book remembers that deal
/// `deal_id` applied amendment `amendment_id`: the first 8 bytes (big
/// endian) of blake3 in derive-key mode over the deal id's length (one
/// byte: ids have at most 128 characters), the deal id and the amendment
/// id. The length keeps `("d1", "2a")` and `("d12", "a")` apart.
pub fn amendment_fingerprint(deal_id: &Id, amendment_id: &Id) -> u64 {
    // The context key is derived once; the keyed hasher's state is cloned.
    static AMENDMENT_HASHER: std::sync::OnceLock<blake3::Hasher> = std::sync::OnceLock::new();
    let deal = deal_id.as_str().as_bytes();
    let len = u8::try_from(deal.len()).expect("an id has at most 128 characters");
    let mut h = AMENDMENT_HASHER
        .get_or_init(|| blake3::Hasher::new_derive_key(AMENDMENT_CONTEXT))
        .clone();
    h.update(&[len]);
    h.update(deal);
    h.update(amendment_id.as_str().as_bytes());
    u64::from_be_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}
