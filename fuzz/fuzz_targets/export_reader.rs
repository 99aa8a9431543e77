//! Fuzz target: the streaming export reader (`ExportReader`) and the offline
//! verifier built on it (`verify_export`), over arbitrary bytes.
//!
//! The first input byte chooses how the file is opened: with its length
//! known (a file) or unknown (standard input); the rest is the file.
//! Properties: never panics, never loops forever, and memory stays bounded
//! by the input (the runner's `-malloc_limit_mb` and `-rss_limit_mb`).
#![no_main]

use dealledger::export::{ExportReader, verify_export};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let opened = if mode & 1 == 0 {
        ExportReader::with_len(file, file.len() as u64)
    } else {
        ExportReader::new(file)
    };
    let mut reader = match opened {
        Ok(reader) => reader,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    match verify_export(&mut reader, |_| {}) {
        Ok(report) => {
            let _ = format!("{report:?}");
        }
        Err(error) => {
            assert!(!error.to_string().is_empty());
            let _ = (error.kind(), error.location(), error.byte_offset());
        }
    }
    assert!(reader.bytes_read() <= file.len() as u64);
});
