//! `dealledger generate`: writes a synthetic, valid JSONL event stream.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use clap::Args;

use crate::generate::{Generator, MAX_LIFETIME, MIN_LIFETIME};

/// Arguments of `dealledger generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// How many events to write.
    #[arg(long, default_value_t = 1_000)]
    events: u64,
    /// How many deals the events are spread over.
    #[arg(long, default_value_t = 100)]
    deals: usize,
    /// Seed: the same seed gives the same stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give each deal a life of about this many events (half to one and a
    /// half times it): then it is terminated and a fresh deal takes its
    /// place, so `--deals` is the number of deals open at a time. Without
    /// it, the same deals gather events for the whole stream.
    #[arg(long, value_name = "EVENTS",
          value_parser = clap::value_parser!(u32).range(i64::from(MIN_LIFETIME)..=i64::from(MAX_LIFETIME)))]
    deal_lifetime: Option<u32>,
}

/// `dealledger generate`.
pub fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.deals >= 1, "--deals must be at least 1");
    let mut out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    let generator = match args.deal_lifetime {
        Some(events) => Generator::with_deal_lifetime(args.deals, args.seed, events),
        None => Generator::new(args.deals, args.seed),
    };
    for event in generator.take(args.events as usize) {
        out.write_all(&event.to_json())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
