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

/// Returns every arena's unused pages to the OS now.
fn purge() {
    // SAFETY: a NUL-terminated mallctl name that takes no old or new value.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// What `make` returns, and how much the resident size grew while it made it.
fn copied<T>(make: impl FnOnce() -> T) -> (T, usize) {
    let before = resident();
    let made = make();
    (made, resident().saturating_sub(before))
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: state_sizes LEDGER_DIR");
    let at_start = resident();
    let store = Store::open_existing(std::path::Path::new(&dir)).expect("open the ledger");
    purge();
    let opened = resident();
    let state = store.load_state().expect("load the state");
    // Loading frees what it decoded from (the snapshot's parts); return
    // those pages to the OS now (the daemon leaves it to jemalloc's decay,
    // over ~10 s by default), so what follows is what the state
    // holds.
    purge();
    let resident_pages: u64 = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    // What each part costs, measured as the resident growth of a copy of
    // it (all kept until the end, so no copy reuses another's freed pages).
    // The book's copies are of every deal as read: terminated deals that
    // the book keeps in the segment file are read back for them.
    let book = state.book();
    let (book_locks, book_locks_heap) = copied(|| {
        book.iter()
            .map(|(_, d)| d.locks.clone())
            .collect::<Vec<_>>()
    });
    let (index_locks, index_locks_heap) = copied(|| {
        let deals = state.index().deals();
        deals.map(|(_, e)| e.locks.clone()).collect::<Vec<_>>()
    });
    let (proposal_maps, proposals_heap) = copied(|| {
        book.iter()
            .map(|(_, d)| d.proposals.clone())
            .collect::<Vec<_>>()
    });
    let amendment_count = book.amendments().len();
    // The deals, not `book.clone()`: a clone copies the amendment
    // fingerprints into memory, which the book keeps on disk.
    let (book_copy, book_heap) = copied(|| {
        book.iter()
            .map(|(id, d)| (id.clone(), d.clone()))
            .collect::<Vec<_>>()
    });
    let (index_copy, index_heap) = copied(|| state.index().clone());
    drop((book_copy, index_copy));
    drop((book_locks, index_locks, proposal_maps));
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
    println!(
        "deals:              {} ({} terminated, in the segment file)",
        state.book().len(),
        state.book().stored_deals()
    );
    let (indexed, indexed_stored) = state.index().deal_counts();
    println!(
        "indexed deal ids:   {indexed} ({indexed_stored} with their entries in the segment file)"
    );
    println!("proposals:          {proposals}");
    println!("locks:              {locks}");
    println!("deal book (JSON):   {book_json} bytes");
    println!("index (encoded):    {} bytes", index.len());
    println!(
        "history items:      {items} in {item_bytes} bytes ({:.1} per item)",
        item_bytes as f64 / items.max(1) as f64
    );
    println!(
        "  a copy of every deal:    +{} MiB resident (as read back)",
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
    println!("    (its {amendment_count} amendment fingerprints are on disk, and not in its copy)");
    println!(
        "    the index's LockRefs:  +{} MiB resident",
        index_locks_heap >> 20
    );
    println!(
        "resident once loaded: {} MiB ({} MiB before the store was opened, {} MiB once it was, before its state loaded)",
        resident_pages * 4096 / (1024 * 1024),
        at_start >> 20,
        opened >> 20
    );
}
