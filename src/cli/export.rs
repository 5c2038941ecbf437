//! `octet export` and `octet export-adapter`: a model, or a LoRA adapter, as a llama.cpp GGUF
//! file.
use octet::export_gguf::{export_adapter_gguf, export_gguf, GgufFormat, GgufReport};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder (octet 8-bit or Hugging Face float), GGUF file, or Hugging Face cache id
    /// `org/name[@revision]`.
    #[arg(long)]
    model: PathBuf,
    /// Output GGUF file (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// gguf-f16, gguf-bf16 or gguf-q8_0 (vectors stay F32 in all three).
    #[arg(long, default_value = "gguf-f16")]
    format: GgufFormat,
    /// Replace an existing GGUF file.
    #[arg(long)]
    force: bool,
    #[arg(long, default_value = "auto", help = super::DEVICE_HELP)]
    device: String,
}

#[derive(clap::Args, Debug)]
pub struct AdapterArgs {
    /// The base model the adapter was trained on (folder, GGUF file or cache id): its
    /// architecture and sizes give the llama.cpp names and layout.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output GGUF file (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// gguf (the only one: llama.cpp's LoRA layout, F32 tensors).
    #[arg(long, default_value = "gguf", value_parser = ["gguf"])]
    format: String,
    /// Replace an existing GGUF file.
    #[arg(long)]
    force: bool,
}

/// Prints what was written.
fn print_report(r: &GgufReport, started: std::time::Instant) {
    let mut counts = std::collections::BTreeMap::new();
    for (_, ty) in &r.tensors {
        *counts.entry(format!("{ty:?}")).or_insert(0usize) += 1;
    }
    let types: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!("{:<12} {} (llama.cpp '{}')", "arch", r.arch, r.gguf_arch);
    println!("{:<12} {}", "tensors", types.join(", "));
    println!("{:<12} {:>14} bytes", "written", r.bytes);
    println!("{:<12} {:>14.1} s", "time", started.elapsed().as_secs_f64());
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    a.model = octet::hub::resolve_model(&a.model)?;
    let started = std::time::Instant::now();
    let device = super::parse_device(&a.device)?;
    let r = export_gguf(&a.model, None, &a.out, a.format, a.force, device)?;
    eprintln!(
        "exported {} -> {} [{}]",
        a.model.display(),
        r.out.display(),
        a.format
    );
    print_report(&r, started);
    Ok(())
}

pub fn run_adapter(mut a: AdapterArgs) -> anyhow::Result<()> {
    a.model = octet::hub::resolve_model(&a.model)?;
    let started = std::time::Instant::now();
    let r = export_adapter_gguf(&a.model, &a.adapter, &a.out, a.force)?;
    eprintln!(
        "exported adapter {} (base {}) -> {} [{}]",
        a.adapter.display(),
        a.model.display(),
        r.out.display(),
        a.format
    );
    print_report(&r, started);
    Ok(())
}
