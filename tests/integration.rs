//! The one integration-test binary: every test that needs the built binary or
//! a real Kafka broker lives in a module here, so CI links once.
//! `common` starts what they need (see its docs).

mod api;
mod audit;
mod common;
mod faults;
mod ingest;
mod produce;
mod purity;
mod query;
mod replay;
mod schemas;
mod security;
