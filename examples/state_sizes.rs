//! What a ledger's derived state holds, for memory work: loads the state
//! of a (stopped) ledger folder from its latest snapshot and prints the
//! sizes of its parts (fingerprints, deal book as JSON, query index
//! encoding, history items in memory, deals, proposals, locks) and the process's resident memory
//! once it is loaded.
//!
//! Usage: cargo run --release --example state_sizes -- LEDGER_DIR

use dealledger::store::Store;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The process's resident bytes (`/proc/self/statm`).
fn resident() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0)
        * 4096
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: state_sizes LEDGER_DIR");
    let store = Store::open_existing(std::path::Path::new(&dir)).expect("open the ledger");
    let state = store.load_state().expect("load the state");
    let resident_pages: u64 = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    // What each part costs, measured as the resident growth of a copy of
    // it (all kept until the end, so no copy reuses another's freed pages).
    // The locks alone: the book's (deal::Lock) and the index's (LockRefs).
    let before = resident();
    let book_locks: Vec<_> = state.book().iter().map(|(_, d)| d.locks.clone()).collect();
    let book_locks_heap = resident() - before;
    let before = resident();
    let index_locks: Vec<_> = state
        .index()
        .deals()
        .map(|(_, e)| e.locks.clone())
        .collect();
    let index_locks_heap = resident() - before;
    let before = resident();
    let proposals: Vec<_> = state
        .book()
        .iter()
        .map(|(_, d)| d.proposals.clone())
        .collect();
    let proposals_heap = resident() - before;
    let before = resident();
    let amendments: Vec<_> = state
        .book()
        .iter()
        .map(|(_, d)| d.amendment_ids.clone())
        .collect();
    let amendments_heap = resident() - before;
    let amendment_count: usize = amendments.iter().map(|a| a.len()).sum();
    let before = resident();
    let book = state.book().clone();
    let book_heap = resident() - before;
    let before = resident();
    let index_copy = state.index().clone();
    let index_heap = resident() - before;
    drop((book, index_copy));
    drop((book_locks, index_locks, proposals, amendments));
    let book_json = serde_json::to_vec(state.book()).expect("serialize").len();
    let mut index = Vec::new();
    state.index().encode(&mut index);
    let (mut items, mut item_bytes) = (0usize, 0usize);
    for (_, entries) in state.index().deals() {
        items += entries.items.len();
        item_bytes += entries.items.heap_bytes();
    }
    let (mut proposals, mut locks) = (0usize, 0usize);
    for (_, deal) in state.book().iter() {
        proposals += deal.proposals.len();
        locks += deal.locks.len();
    }
    println!("entries:            {}", state.entry_count());
    println!("fingerprints:       {}", state.fingerprints().count());
    println!("deals:              {}", state.book().len());
    println!("proposals:          {proposals}");
    println!("locks:              {locks}");
    println!("deal book (JSON):   {book_json} bytes");
    println!("index (encoded):    {} bytes", index.len());
    println!(
        "history items:      {items} in {item_bytes} bytes ({:.1} per item)",
        item_bytes as f64 / items.max(1) as f64
    );
    println!(
        "  a copy of the deal book: +{} MiB resident",
        book_heap >> 20
    );
    println!(
        "  a copy of the index:     +{} MiB resident",
        index_heap >> 20
    );
    println!(
        "    its locks:             +{} MiB resident",
        book_locks_heap >> 20
    );
    println!(
        "    its proposals:         +{} MiB resident",
        proposals_heap >> 20
    );
    println!(
        "    its amendment ids:     +{} MiB resident ({amendment_count} ids)",
        amendments_heap >> 20
    );
    println!(
        "    the index's LockRefs:  +{} MiB resident",
        index_locks_heap >> 20
    );
    println!(
        "resident once loaded: {} MiB",
        resident_pages * 4096 / (1024 * 1024)
    );
}
