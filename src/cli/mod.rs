//! Subcommands of the `octet` binary; `anyhow` errors live only here.
mod archs;
mod chat;
mod convert;
mod env;
mod eval;
mod export;
mod generate;
mod inspect;
mod launch;
mod merge;
mod quant_report;
mod train;

use clap::{Parser, Subcommand};
use octet::arch::PathPattern;

/// octet: fine-tune big causal language models with frozen 8-bit weights and LoRA adapters.
#[derive(Parser, Debug)]
#[command(name = "octet", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert a Hugging Face checkpoint to octet's 8-bit format.
    Convert(convert::Args),
    /// Print the module graph of a model folder.
    Inspect(inspect::Args),
    /// Fine-tune LoRA adapters (8-bit frozen weights, 8-bit Adam, block recompute).
    Train(Box<train::Args>),
    /// Merge a LoRA adapter into its base (Hugging Face f16/f32, or re-quantized 8-bit).
    Merge(merge::Args),
    /// List the registered architectures.
    Archs,
    /// Quantize a weight-shaped random tensor and report size and error for both codes.
    QuantReport(quant_report::Args),
    /// Sliding-window perplexity of a model on a text file.
    Eval(eval::Args),
    /// Continue a prompt or answer a chat (KV cache, greedy or sampled), streaming to stdout.
    Generate(generate::Args),
    /// Chat with a model on stdin/stdout, keeping the KV cache across turns.
    Chat(chat::Args),
    /// Describe this build and machine: versions, CUDA devices, CPU kernels.
    Env(env::Args),
    /// Export a model (octet 8-bit, Hugging Face or GGUF) to a llama.cpp GGUF file.
    Export(export::Args),
    /// Export a LoRA adapter to llama.cpp's GGUF LoRA format (`llama-cli --lora`).
    ExportAdapter(export::AdapterArgs),
}

/// The flags naming the model `eval` and `generate` run, and how it is loaded.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Model folder (Hugging Face or octet 8-bit), GGUF file, or Hugging Face cache id
    /// `org/name[@revision]`.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// PEFT LoRA adapter folder to apply to --model.
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub load: octet::infer::InferOptions,
}

impl ModelArgs {
    /// The load settings of these flags, with `--device` resolved once (so a second model
    /// goes to the same device).
    pub fn load_options(&self) -> anyhow::Result<octet::load::LoadOptions> {
        Ok(self.load.load_options(parse_device(&self.load.device)?)?)
    }

    /// `--model`, with `--adapter` applied, loaded for inference with `opts`.
    pub fn load_model(
        &self,
        opts: &octet::load::LoadOptions,
    ) -> anyhow::Result<octet::load::LoadedModel> {
        Ok(octet::infer::load_for_inference(
            &self.model,
            self.adapter.as_deref(),
            opts,
        )?)
    }
}

/// Help text of every `--device` flag.
pub const DEVICE_HELP: &str = octet::device::FLAG_HELP;

/// Parses and resolves `--device` through the library (an unusable device is an error that
/// names `octet env`).
pub fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    Ok(octet::device::from_flag(s)?)
}

/// A parser for a count flag that refuses values below `min` (clap names the flag and exits
/// with status 2).
pub fn at_least(min: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(min..)
}

/// Compiles `--skip`/`--targets` style patterns.
pub fn parse_patterns(patterns: &[String]) -> anyhow::Result<Vec<PathPattern>> {
    Ok(patterns
        .iter()
        .map(|p| PathPattern::new(p))
        .collect::<Result<_, _>>()?)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Archs => archs::run(),
        Command::Train(a) => train::run(*a),
        Command::Merge(a) => merge::run(a),
        Command::QuantReport(a) => quant_report::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Env(a) => env::run(a),
        Command::Export(a) => export::run(a),
        Command::ExportAdapter(a) => export::run_adapter(a),
    }
}
