//! `octet merge`: a LoRA adapter folded into its base, as a Hugging Face checkpoint or a
//! re-quantized octet folder.
use octet::merge::{merge, MergeFormat, MergeOptions};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base model folder (octet 8-bit, or Hugging Face float), or Hugging Face cache id
    /// `org/name[@revision]`.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder (must not exist or be empty, unless --force); for gguf-* a GGUF file
    /// (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// hf-f16 or hf-f32 (a Hugging Face checkpoint), octet8 (re-quantized 8-bit), octet4
    /// (Linear weights re-quantized to 4 bits: the base's code and block, else nf4/64), or
    /// gguf-f16, gguf-bf16, gguf-q8_0 (one llama.cpp GGUF file).
    #[arg(long, default_value = "hf-f16")]
    format: MergeFormat,
    /// Replace a non-empty output folder.
    #[arg(long)]
    force: bool,
    #[arg(long, default_value = "auto", help = super::DEVICE_HELP)]
    device: String,
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    a.model = octet::hub::resolve_model(&a.model)?;
    let started = std::time::Instant::now();
    let opts = MergeOptions {
        format: a.format,
        force: a.force,
        device: super::parse_device(&a.device)?,
    };
    let report = merge(&a.model, &a.adapter, &a.out, &opts)?;
    eprintln!(
        "merged {} into {} ({}) -> {} [{}]",
        a.adapter.display(),
        a.model.display(),
        report.arch,
        report.out.display(),
        report.format
    );
    if !report.requantized.is_empty() {
        println!(
            "{:<44} {:>12} {:>12}",
            "re-quantized tensor", "rel MSE", "max |err|"
        );
        for e in &report.requantized {
            println!(
                "{:<44} {:>12.3e} {:>12.3e}",
                e.name, e.rel_mse, e.max_abs_err
            );
        }
        let (n, mean, max) = report.error_summary();
        println!(
            "{:<12} {n} tensors, {mean:.3e} mean, {max:.3e} max relative MSE added by \
             re-quantizing the merge",
            "error"
        );
    }
    println!("{:<12} {:>8}", "merged", report.merged.len());
    println!("{:<12} {:>8}", "replaced", report.replaced.len());
    println!("{:<12} {:>14} bytes", "written", report.bytes_written);
    println!("{:<12} {:>14.1} s", "time", started.elapsed().as_secs_f64());
    Ok(())
}
