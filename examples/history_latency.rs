//! The server-side cost of `deal history`, without HTTP: loads a (stopped)
//! ledger folder, answers the first history page (default size) of 20,000
//! random deals one after the other, each serialized to JSON as the API
//! does, and prints the latency percentiles. Compare with `ops/bench
//! query`, whose figures add HTTP, scheduling and the load generator.
//!
//! Usage: cargo run --release --example history_latency -- LEDGER_DIR

use std::time::Instant;

use dealledger::query::{self, PageRequest};
use dealledger::store::Store;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const QUERIES: usize = 20_000;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: history_latency LEDGER_DIR");
    let store = Store::open_existing(std::path::Path::new(&dir)).expect("open the ledger");
    let state = store.load_state().expect("load the state");
    let ids: Vec<_> = state.book().iter().map(|(id, _)| id.clone()).collect();
    assert!(!ids.is_empty(), "the ledger has no deals");
    let mut micros = Vec::with_capacity(QUERIES);
    // xorshift64: the same deals on every run.
    let mut x: u64 = 88_172_645_463_325_252;
    for _ in 0..QUERIES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = &ids[(x % ids.len() as u64) as usize];
        let started = Instant::now();
        let page = query::deal_history(&state, &store, id, &PageRequest::default())
            .expect("history of a deal that exists");
        std::hint::black_box(serde_json::to_vec(&page).expect("serialize"));
        micros.push(started.elapsed().as_micros() as u64);
    }
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    println!(
        "deal history, first page, {QUERIES} random deals: p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}
