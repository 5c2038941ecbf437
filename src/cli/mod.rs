//! Subcommands of the `octet` binary; `anyhow` errors live only here.
mod quant_report;

use clap::{Parser, Subcommand};

/// octet: fine-tune big causal language models with frozen 8-bit weights and LoRA adapters.
#[derive(Parser, Debug)]
#[command(name = "octet", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Quantize a weight-shaped random tensor and report size and error for both codes.
    QuantReport(quant_report::Args),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::QuantReport(a) => quant_report::run(a),
    }
}
