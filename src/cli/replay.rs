//! `dealledger replay` (being written).

use std::process::ExitCode;

use clap::Args;

/// Arguments of `dealledger replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {}

/// `dealledger replay`.
pub fn replay(_args: ReplayArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("replay is not implemented yet")
}
