//! `dealledger rebuild` (being written).

use std::process::ExitCode;

use clap::Args;

/// Arguments of `dealledger rebuild`.
#[derive(Debug, Args)]
pub struct RebuildArgs {}

/// `dealledger rebuild`.
pub fn rebuild(_args: RebuildArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("rebuild is not implemented yet")
}
