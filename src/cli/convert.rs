//! `octet convert`: a Hugging Face checkpoint to octet's 8-bit format.
use super::parse_patterns;
use octet::calibrate::{CalibrationOptions, CalibrationText};
use octet::convert::{convert, ConvertOptions};
use octet::load::QuantizeOptions;
use octet::nn::q4::FourBitOptions;
use octet::quant::{block4, BlockSize, Code4Kind, CodeKind};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture name, or `auto` to read it from config.json.
    #[arg(long, default_value = "auto")]
    arch: String,
    /// Hugging Face model folder (config.json + safetensors or pytorch_model.bin, sharded or
    /// not), GGUF file, or Hugging Face cache id `org/name[@revision]`.
    #[arg(long)]
    model: PathBuf,
    /// Output folder (must not exist or be empty, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Elements per quantization block (a power of two, 64…4096; 32…4096 with --bits 4);
    /// 64 if unset.
    #[arg(long)]
    block_size: Option<i64>,
    /// 8-bit: `linear` (the default: evenly spaced levels, like llama.cpp's Q8_0), `dynamic`
    /// (bitsandbytes' code) or `fitted` (a per-tensor code fitted to the weights). With
    /// `--bits 4`: `nf4` (the default), `fp4` or `fitted`.
    #[arg(long)]
    code: Option<String>,
    /// Bits per Linear weight: 8, or 4 (two codes per byte; embeddings stay 8-bit).
    #[arg(long, default_value_t = 8)]
    bits: u8,
    /// Store the block scales double-quantized (8-bit, one f32 per 256 blocks: block 64 costs
    /// 8.13 bits per weight instead of 8.5) instead of one f32 per block. Default: true for
    /// 8-bit weights, false with --bits 4.
    #[arg(long, action = clap::ArgAction::Set)]
    double_quant: Option<bool>,
    /// What 8-bit weights are rounded against: `builtin` (the default: GPTQ against the inputs
    /// each weight sees on about 2,000 words of English shipped with octet; to nearest, with
    /// a warning, for a model without a tokenizer), a UTF-8 text file of text like the
    /// model's use (a path; write `./none` for a file named `none`), or `none` (round to
    /// nearest: faster, less accurate). Calibration runs the model once, one block at a time.
    #[arg(long, value_name = "builtin|none|TEXT_FILE")]
    calibrate: Option<String>,
    /// Tokens of the --calibrate text to use (its first ones).
    #[arg(long, default_value_t = octet::calibrate::DEFAULT_TOKENS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(octet::calibrate::MIN_TOKENS as u64..=1 << 20))]
    calibrate_tokens: usize,
    /// Keep modules matching this pattern in float (repeatable; `*` matches within a segment).
    #[arg(long = "skip")]
    skip: Vec<String>,
    /// Replace a non-empty output folder.
    #[arg(long)]
    force: bool,
    /// Keep NaN/Inf found in tensors that stay in float (refused by default).
    #[arg(long)]
    allow_nonfinite: bool,
    /// Start a new shard above this many MiB.
    #[arg(long, default_value_t = 2048, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1 << 30))]
    shard_mib: usize,
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    a.model = octet::hub::resolve_model(&a.model)?;
    let defaults = ConvertOptions::default();
    let (block, code, four_bit) = match a.bits {
        8 => (
            a.block_size
                .map(BlockSize::new)
                .transpose()?
                .or(defaults.quantize.block),
            a.code
                .as_deref()
                .map(str::parse::<CodeKind>)
                .transpose()?
                .unwrap_or(defaults.quantize.code),
            None,
        ),
        4 => {
            let code = a.code.as_deref().unwrap_or("nf4").parse::<Code4Kind>()?;
            let block = a.block_size.map(block4).transpose()?.unwrap_or(64);
            // Embeddings stay 8-bit, at the architecture's 8-bit block size.
            (
                None,
                CodeKind::Dynamic,
                Some(FourBitOptions { code, block }),
            )
        }
        other => anyhow::bail!("--bits {other} is not supported: use 8 or 4"),
    };
    let opts = ConvertOptions {
        arch: a.arch,
        four_bit,
        quantize: QuantizeOptions {
            block,
            code,
            skip: parse_patterns(&a.skip)?,
            double_quant: a
                .double_quant
                .unwrap_or(four_bit.is_none() && defaults.quantize.double_quant),
        },
        force: a.force,
        shard_bytes: a.shard_mib << 20,
        progress: true,
        allow_nonfinite: a.allow_nonfinite,
        calibrate: match a.calibrate.as_deref() {
            Some("none") => None,
            None | Some("builtin") => defaults.calibrate.map(|c| CalibrationOptions {
                tokens: a.calibrate_tokens,
                ..c
            }),
            Some(path) => Some(CalibrationOptions {
                text: CalibrationText::File(PathBuf::from(path)),
                tokens: a.calibrate_tokens,
            }),
        },
    };
    let started = std::time::Instant::now();
    let report = convert(&a.model, &a.out, &opts)?;
    let secs = started.elapsed().as_secs_f64();
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let (n_q, mean, max) = report.error_summary();
    let (bin, bout) = (report.bytes_in(), report.bytes_out());
    eprintln!(
        "converted {} ({}) -> {}",
        a.model.display(),
        report.arch,
        report.out.display()
    );
    println!("{:<12} {:>8}", "tensors", report.tensors.len());
    println!("{:<12} {:>8}", "quantized", n_q);
    println!("{:<12} {:>14} bytes", "before", bin);
    println!(
        "{:<12} {:>14} bytes ({:.2}x smaller)",
        "after",
        bout,
        bin as f64 / bout.max(1) as f64
    );
    println!(
        "{:<12} {:>14.3e} mean, {:.3e} max (relative MSE over quantized tensors)",
        "error", mean, max
    );
    println!(
        "{:<12} {:>14.1} s ({:.0} MB/s of input)",
        "time",
        secs,
        bin as f64 / 1e6 / secs.max(1e-9)
    );
    println!("{:<12} {}", "shards", report.shards.join(", "));
    let mut worst: Vec<_> = report
        .tensors
        .iter()
        .filter_map(|t| Some((t.error?.rel_mse(), t.code?, &t.name)))
        .collect();
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (i, (err, code, name)) in worst.iter().take(5).enumerate() {
        let label = if i == 0 { "worst" } else { "" };
        let code = format!("{code:?}").to_lowercase();
        println!("{label:<12} {err:>14.3e} {code:<8} {name}");
    }
    if opts.quantize.double_quant && n_q > 0 {
        println!("{:<12} double-quantized (8-bit, groups of 256)", "scales");
    }
    if let Some(tokens) = report.calibration_tokens {
        let n = report.tensors.iter().filter(|t| t.calibrated).count();
        println!(
            "{:<12} {n} of {n_q} weights rounded with GPTQ on {tokens} tokens (the rest to nearest)",
            "calibrated"
        );
    }
    Ok(())
}
