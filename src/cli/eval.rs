//! `octet eval`: sliding-window perplexity of a model (optionally with an adapter) on a text
//! file, optionally beside a second model on the same tokens.
use super::parse_device;
use super::train::parse_dtype;
use anyhow::{bail, Context};
use octet::eval::{check_window, perplexity, Perplexity};
use octet::load::{load_model, LoadOptions, LoadedModel, QuantizeOptions};
use octet::peft::load_adapter;
use octet::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// Flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder (Hugging Face or octet 8-bit).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder to apply to --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Text file, tokenized whole (no BOS).
    #[arg(long)]
    data: PathBuf,
    /// Window length [default: the model's max positions].
    #[arg(long)]
    ctx: Option<usize>,
    /// Tokens between window starts; only the new tokens of each window are scored
    /// [default: --ctx, i.e. disjoint windows].
    #[arg(long)]
    stride: Option<usize>,
    /// Evaluate only the first K tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Windows of equal length run together.
    #[arg(long, default_value_t = 8, value_parser = super::at_least(1))]
    batch_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Second model folder evaluated on the same tokens.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Quantize float modules to 8-bit while loading (as training does).
    #[arg(long)]
    quantize: bool,
    /// Architecture name, or `auto`.
    #[arg(long, default_value = "auto")]
    arch: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "auto", help = super::DEVICE_HELP)]
    device: String,
}

/// Loads a model for inference: optional on-load quantization, optional adapter, dropout off.
pub fn load_for_inference(
    dir: &Path,
    adapter: Option<&Path>,
    arch: &str,
    dtype: &str,
    device: tch::Device,
    quantize: bool,
) -> anyhow::Result<LoadedModel> {
    let opts = LoadOptions {
        arch: arch.to_string(),
        kind: parse_dtype(dtype)?,
        device,
        quantize: quantize.then(QuantizeOptions::default),
    };
    let mut m = load_model(dir, &opts).with_context(|| format!("loading {}", dir.display()))?;
    if let Some(a) = adapter {
        let cfg = load_adapter(m.model.as_mut(), a).with_context(|| {
            format!(
                "adapter {} does not fit the model {}",
                a.display(),
                dir.display()
            )
        })?;
        eprintln!(
            "adapter {} (r {}, alpha {}) applied",
            a.display(),
            cfg.r,
            cfg.lora_alpha
        );
    }
    m.model.visit_layers(&mut |_, l| l.set_training(false));
    Ok(m)
}

/// Tokens of `text` under `dir`'s tokenizer, as model ids.
fn tokenize(dir: &Path, text: &str) -> anyhow::Result<Vec<i64>> {
    let tok = Tokenizer::from_dir(dir)?;
    Ok(tok.encode(text)?.into_iter().map(i64::from).collect())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    octet::model::check_model_path(&a.model)?;
    let device = parse_device(&a.device)?;
    let text = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading {}", a.data.display()))?;
    if text.is_empty() {
        bail!("{}: the evaluation file is empty", a.data.display());
    }
    let mut ids = tokenize(&a.model, &text)?;
    if let Some(k) = a.max_tokens {
        ids.truncate(k);
    }
    if let Some(c) = &a.compare {
        // Perplexities over different tokenizations are not comparable.
        if c.join("tokenizer.json").is_file() || c.join("vocab.json").is_file() {
            let mut other = tokenize(c, &text)?;
            if let Some(k) = a.max_tokens {
                other.truncate(k);
            }
            if other != ids {
                bail!(
                    "{} and {} tokenize the text differently; their perplexities are not comparable",
                    a.model.display(),
                    c.display()
                );
            }
        }
    }

    let m = load_for_inference(
        &a.model,
        a.adapter.as_deref(),
        &a.arch,
        &a.dtype,
        device,
        a.quantize,
    )?;
    let max_pos = m.model.info().max_positions;
    let ctx = a.ctx.unwrap_or(max_pos);
    let stride = a.stride.unwrap_or(ctx);
    check_window(ctx, stride, max_pos, ids.len())
        .with_context(|| format!("evaluating {}", a.model.display()))?;
    let base = perplexity(m.model.as_ref(), &ids, ctx, stride, a.batch_size)?;
    drop(m);

    let compare = match &a.compare {
        Some(c) => {
            let m = load_for_inference(c, None, &a.arch, &a.dtype, device, a.quantize)?;
            let r = perplexity(m.model.as_ref(), &ids, ctx, stride, a.batch_size)
                .with_context(|| format!("evaluating {}", c.display()))?;
            Some((c.clone(), r))
        }
        None => None,
    };

    if a.json {
        let mut v = serde_json::json!({
            "model": a.model.display().to_string(),
            "perplexity": base.perplexity,
            "nll": base.nll,
            "tokens": base.tokens,
            "ctx": base.ctx,
            "stride": base.stride,
            "windows": base.windows,
        });
        if let Some((c, r)) = &compare {
            v["compare"] = serde_json::json!({
                "model": c.display().to_string(),
                "perplexity": r.perplexity,
                "nll": r.nll,
                "tokens": r.tokens,
                "relative_diff": relative(r, &base),
            });
        }
        println!("{v}");
    } else {
        let line = |name: &Path, r: &Perplexity| {
            println!(
                "{}: perplexity {:.4} (nll {:.6} nats/token over {} tokens; ctx {}, stride {}, {} windows)",
                name.display(),
                r.perplexity,
                r.nll,
                r.tokens,
                r.ctx,
                r.stride,
                r.windows
            )
        };
        line(&a.model, &base);
        if let Some((c, r)) = &compare {
            line(c, r);
            println!(
                "relative difference {:+.4}% ((compare - model) / model)",
                100.0 * relative(r, &base)
            );
        }
    }
    Ok(())
}

/// (other - base) / base of the perplexities.
fn relative(other: &Perplexity, base: &Perplexity) -> f64 {
    (other.perplexity - base.perplexity) / base.perplexity
}
