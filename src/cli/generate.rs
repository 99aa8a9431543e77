//! `dealledger generate`: writes a synthetic, valid JSONL event stream.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use clap::Args;

use crate::generate::Generator;

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
}

/// `dealledger generate`.
pub fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.deals >= 1, "--deals must be at least 1");
    let mut out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    for event in Generator::new(args.deals, args.seed).take(args.events as usize) {
        out.write_all(&event.to_json())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
