//! `octet train`: LoRA fine-tuning. Settings come from `--config FILE` (TOML) with flags
//! overriding it, then the defaults.
use octet::nn::LoraConfig;
use octet::peft::Targets;
use octet::train::schedule::ScheduleKind;
use octet::train::trainer::{train, OptimKind, StopReason, TrainOptions};
use serde::Deserialize;
use std::path::PathBuf;

/// Flags; every setting is optional here so a config file can supply it.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Args {
    /// TOML file with any of these settings (flags override it).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Architecture name, or `auto`.
    #[arg(long)]
    arch: Option<String>,
    /// Model folder (Hugging Face or octet).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: .txt, or .jsonl with "text" or "prompt"/"completion".
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder for the adapter, resume state and metrics.jsonl.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps [default: 100].
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per micro-batch [default: 4].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Tokens per sequence [default: 128].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps [default: 10, at most a tenth of --steps].
    #[arg(long)]
    warmup: Option<usize>,
    /// cosine, linear or constant [default: cosine].
    #[arg(long)]
    schedule: Option<String>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA alpha [default: 8].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA dropout [default: 0].
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Scale adapters by alpha/√r.
    #[arg(long)]
    rslora: Option<bool>,
    /// Comma-separated module names, or a regex over module paths [default: the spec's].
    #[arg(long)]
    targets: Option<String>,
    /// adam8bit or adamw [default: adam8bit].
    #[arg(long)]
    optim: Option<String>,
    /// Decoupled weight decay [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// f32 or bf16 [default: f32] (f16 is refused: no loss scaling).
    #[arg(long)]
    dtype: Option<String>,
    /// Seed [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Evaluate every N steps [default: only at the end].
    #[arg(long)]
    eval_every: Option<usize>,
    /// Save every N steps [default: only at the end].
    #[arg(long)]
    save_every: Option<usize>,
    /// Held-out fraction of the data [default: 0.1].
    #[arg(long)]
    eval_fraction: Option<f64>,
    /// Gradient-norm clip, 0 for none [default: 1.0].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Run plain autograd instead of block-level recompute.
    #[arg(long)]
    #[serde(default)]
    no_checkpointing: bool,
    /// Keep frozen weights in f32 instead of 8-bit.
    #[arg(long)]
    #[serde(default)]
    no_quantize: bool,
    /// Also train norm scales and shifts.
    #[arg(long)]
    #[serde(default)]
    train_norms: bool,
    /// Also train biases.
    #[arg(long)]
    #[serde(default)]
    train_biases: bool,
    /// Continue the run saved in this folder.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Replace a non-empty output folder.
    #[arg(long)]
    #[serde(default)]
    force: bool,
    /// auto, cpu, cuda or cuda:N [default: auto: cuda:0 when a GPU is usable, else cpu].
    #[arg(long)]
    device: Option<String>,
    /// Save and stop after this many steps in total (resume later with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
}

macro_rules! merge {
    ($cli:ident, $file:ident, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )* };
}

/// Parses `f32` / `bf16` / `f16`.
pub fn parse_dtype(s: &str) -> anyhow::Result<tch::Kind> {
    match s {
        "f32" | "float32" => Ok(tch::Kind::Float),
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        "f16" | "float16" => Ok(tch::Kind::Half),
        o => anyhow::bail!("unknown dtype '{o}': expected f32, bf16 or f16"),
    }
}

fn resolve(mut a: Args) -> anyhow::Result<TrainOptions> {
    if let Some(path) = a.config.clone() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut f: Args = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim()))?;
        merge!(
            a,
            f,
            arch,
            model,
            data,
            out,
            steps,
            batch_size,
            grad_accum,
            seq_len,
            lr,
            warmup,
            schedule,
            lora_r,
            lora_alpha,
            lora_dropout,
            rslora,
            targets,
            optim,
            weight_decay,
            dtype,
            seed,
            eval_every,
            save_every,
            eval_fraction,
            max_grad_norm,
            resume,
            device,
            stop_after
        );
        a.no_checkpointing |= f.no_checkpointing;
        a.no_quantize |= f.no_quantize;
        a.train_norms |= f.train_norms;
        a.train_biases |= f.train_biases;
        a.force |= f.force;
    }
    let d = TrainOptions::default();
    let steps = a.steps.unwrap_or(d.steps);
    let need = |v: Option<PathBuf>, flag: &str| {
        v.ok_or_else(|| anyhow::anyhow!("--{flag} is required (as a flag or in --config)"))
    };
    Ok(TrainOptions {
        model: need(a.model, "model")?,
        data: need(a.data, "data")?,
        out: need(a.out, "out")?,
        arch: a.arch.unwrap_or(d.arch),
        steps,
        batch_size: a.batch_size.unwrap_or(d.batch_size),
        grad_accum: a.grad_accum.unwrap_or(d.grad_accum),
        seq_len: a.seq_len.unwrap_or(d.seq_len),
        lr: a.lr.unwrap_or(d.lr),
        // A short run gets a proportionally short warm-up unless one is given.
        warmup: a.warmup.unwrap_or(d.warmup.min(steps / 10)),
        schedule: a
            .schedule
            .map(|s| s.parse::<ScheduleKind>())
            .transpose()?
            .unwrap_or(d.schedule),
        lora: LoraConfig {
            r: a.lora_r.unwrap_or(d.lora.r),
            alpha: a.lora_alpha.unwrap_or(d.lora.alpha),
            dropout: a.lora_dropout.unwrap_or(d.lora.dropout),
            rslora: a.rslora.unwrap_or(d.lora.rslora),
        },
        targets: a.targets.map(|t| Targets::parse(&t)).transpose()?,
        optim: a
            .optim
            .map(|o| o.parse::<OptimKind>())
            .transpose()?
            .unwrap_or(d.optim),
        weight_decay: a.weight_decay.unwrap_or(d.weight_decay),
        kind: a
            .dtype
            .map(|s| parse_dtype(&s))
            .transpose()?
            .unwrap_or(d.kind),
        seed: a.seed.unwrap_or(d.seed),
        eval_every: a.eval_every.unwrap_or(d.eval_every),
        save_every: a.save_every.unwrap_or(d.save_every),
        eval_fraction: a.eval_fraction.unwrap_or(d.eval_fraction),
        max_grad_norm: a.max_grad_norm.unwrap_or(d.max_grad_norm),
        checkpointing: !a.no_checkpointing,
        train_norms: a.train_norms,
        train_biases: a.train_biases,
        quantize: !a.no_quantize,
        resume: a.resume,
        force: a.force,
        device: super::parse_device(a.device.as_deref().unwrap_or("auto"))?,
        progress: true,
        log_every: 1,
        stop_after: a.stop_after,
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = resolve(a)?;
    let s = train(&opts)?;
    let last = s.metrics.last();
    let how = match s.stop {
        StopReason::Finished => "done".to_string(),
        StopReason::Interrupted => "stopped (Ctrl-C)".to_string(),
        StopReason::StopAfter => format!(
            "stopped at --stop-after {}",
            opts.stop_after.unwrap_or_default()
        ),
    };
    eprintln!(
        "{how} after {} steps in total ({} this run): {} trainable parameters on {} modules, optimizer state {} bytes ({:.2} bytes/param)",
        s.steps,
        s.metrics.len(),
        s.trainable_params,
        s.targets.len(),
        s.optimizer_bytes,
        s.optimizer_bytes as f64 / s.trainable_params.max(1) as f64
    );
    if let Some(p) = s.peak_gpu_mib {
        eprintln!("peak GPU memory {p:.0} MiB");
    }
    if let Some(m) = last {
        println!("final train loss {:.4}", m.loss);
    }
    if let Some(e) = s.eval_loss {
        println!("eval loss {e:.4} (perplexity {:.2})", e.exp());
    }
    println!("adapter written to {}", opts.out.display());
    Ok(())
}
