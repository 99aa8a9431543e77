//! Fuzz target: the stored entry codec, `chain::decode_entry`, over arbitrary
//! bytes.
//!
//! Properties: never panics, never allocates more than the input's size (the
//! runner's `-malloc_limit_mb` catches a hostile length prefix); an accepted
//! entry passes `validate_record` and re-encodes to exactly the input bytes.
#![no_main]

use dealledger::chain::{decode_entry, encode_entry, validate_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode_entry(data) {
        Ok(entry) => {
            assert_eq!(validate_record(&entry.record), Ok(()));
            assert_eq!(encode_entry(&entry), data, "encode(decode(b)) != b");
        }
        Err(error) => {
            assert!(!error.to_string().is_empty());
        }
    }
});
