//! Fuzz target: `DealEvent::decode` (CloudEvents envelope, typed data and the
//! single-event rules) over arbitrary bytes.
//!
//! Properties: never panics; an error always has a kind and a message; every
//! accepted event re-encodes (`to_json`) to bytes that decode to the same
//! event, and encoding is then a fixed point.
#![no_main]

use dealledger::event::{DealEvent, limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match DealEvent::decode(data) {
        Ok(event) => {
            let json = event.to_json();
            // `to_json` always writes `datacontenttype`, so an accepted event
            // right at the size limit may re-encode a few bytes over it.
            if json.len() <= limits::MAX_EVENT_BYTES {
                let again = DealEvent::decode(&json)
                    .unwrap_or_else(|e| panic!("to_json output does not decode: {e}"));
                assert_eq!(again, event, "round trip changed the event");
                assert_eq!(again.to_json(), json, "to_json is not a fixed point");
            }
        }
        Err(error) => {
            assert!(!error.kind().is_empty());
            assert!(!error.to_string().is_empty());
            let _ = error.path();
        }
    }
});
