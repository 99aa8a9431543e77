//! dealledger: an event-sourced, blake3 hash-chained ledger of compute and cloud deals.
//!
//! See ARCHITECTURE.md for the map of the code. The pure core (`event`, `deal`,
//! `chain`) does no I/O; everything else is a thin shell around it.

pub mod api;
pub mod chain;
pub mod cli;
pub mod deal;
pub mod event;
pub mod export;
pub mod generate;
pub mod identities;
pub mod index;
pub mod ingest;
pub mod kafka;
pub mod ledger;
pub mod metrics;
pub mod producer;
pub mod query;
pub mod replay;
pub mod segments;
pub mod store;
pub mod timeline;
