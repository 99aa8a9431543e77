//! The floor for `ops/bench replay`: read every stored entry of a ledger
//! folder straight from sled and blake3-hash its bytes, nothing else (no
//! decoding, no chain checks, no fold). `verify` and `replay` are compared
//! with this.
//!
//! Usage: cargo run --release --example read_baseline -- LEDGER_DIR

use std::time::Instant;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: read_baseline LEDGER_DIR");
    let db = sled::Config::new()
        .path(&dir)
        .open()
        .expect("open the ledger folder");
    let tree = db.open_tree("ledger").expect("the ledger tree");
    let started = Instant::now();
    let (mut values, mut bytes) = (0u64, 0u64);
    let mut digest = [0u8; 32];
    for item in tree.scan_prefix(b"E") {
        let (_, value) = item.expect("read");
        let hash = blake3::hash(&value);
        digest[0] ^= hash.as_bytes()[0];
        values += 1;
        bytes += value.len() as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"values\":{values},\"bytes\":{bytes},\"seconds\":{seconds:.3},\"check\":{}}}",
        digest[0]
    );
}
