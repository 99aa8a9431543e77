//! `dealledger export` and `dealledger import` (being written).

use std::process::ExitCode;

use clap::Args;

/// Arguments of `dealledger export`.
#[derive(Debug, Args)]
pub struct ExportArgs {}

/// Arguments of `dealledger import`.
#[derive(Debug, Args)]
pub struct ImportArgs {}

/// `dealledger export`.
pub fn export(_args: ExportArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("export is not implemented yet")
}

/// `dealledger import`.
pub fn import(_args: ImportArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("import is not implemented yet")
}
