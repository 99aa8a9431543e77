//! `dealledger verify` (being written).

use std::process::ExitCode;

use clap::Args;

/// Arguments of `dealledger verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {}

/// `dealledger verify`.
pub fn verify(_args: VerifyArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("verify is not implemented yet")
}
