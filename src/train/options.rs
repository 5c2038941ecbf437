//! The settings of a training run, each named once: the same struct is the `octet train`
//! flags (clap), the `--config` TOML keys (serde, kebab-case like the flags) and the library's
//! options. A default is written once, in its `#[arg]` attribute; [`TrainOptions::default`]
//! and the TOML reader take it from there.
use crate::error::{OctetError, Result};
use crate::nn::LoraConfig;
use crate::peft::Targets;
use crate::train::schedule::ScheduleKind;
use clap::{Args, FromArgMatches};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which optimizer updates the adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    /// bitsandbytes-style 8-bit Adam.
    Adam8bit,
    /// f32 AdamW.
    Adamw,
}

impl std::str::FromStr for OptimKind {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adam8bit" => Ok(OptimKind::Adam8bit),
            "adamw" => Ok(OptimKind::Adamw),
            o => Err(OctetError::InvalidArgument(format!(
                "unknown optimizer '{o}': expected adam8bit or adamw"
            ))),
        }
    }
}

impl std::fmt::Display for OptimKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OptimKind::Adam8bit => "adam8bit",
            OptimKind::Adamw => "adamw",
        })
    }
}

/// A path flag that may be empty until a config file supplies it (clap's own path parser
/// refuses an empty default).
fn path_flag(s: &str) -> std::result::Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// Everything a training run needs. Field names are the flags (`--seq-len`) and the TOML
/// keys (`seq-len`).
#[derive(Args, Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainOptions {
    /// Architecture name, or `auto`.
    #[arg(long, default_value = "auto")]
    pub arch: String,
    /// Model folder (Hugging Face or octet), or Hugging Face cache id `org/name[@revision]`.
    #[arg(long, default_value = "", hide_default_value = true, value_parser = path_flag)]
    pub model: PathBuf,
    /// Training data: .txt, or .jsonl of "text", "prompt"/"completion", chat "messages",
    /// ShareGPT "conversations" or Alpaca "instruction"/"input"/"output".
    #[arg(long, default_value = "", hide_default_value = true, value_parser = path_flag)]
    pub data: PathBuf,
    /// Data format: auto, text, jsonl, jsonl:FIELD, prompt-completion, chat, sharegpt, alpaca.
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Held-out data file (same formats), instead of splitting off --eval-fraction.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Chat template (a Jinja file) instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Loss on every token of a conversation, not only the assistant's.
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Drop records longer than --seq-len instead of truncating them.
    #[arg(long)]
    pub drop_long: bool,
    /// Pack several records into each sequence, up to --seq-len (positions restart at each
    /// record and no record attends to another).
    #[arg(long)]
    pub pack: bool,
    /// Stream JSON Lines data: tokenized lazily in the background, so training starts at once
    /// and the data need not fit in memory (split and order drawn over records).
    #[arg(long)]
    pub stream: bool,
    /// Output folder for the adapter, resume state and metrics.jsonl.
    #[arg(long, default_value = "", hide_default_value = true, value_parser = path_flag)]
    pub out: PathBuf,
    /// Optimizer steps in total.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Warm-up steps (unless given: at most a tenth of --steps).
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Decay after warm-up: cosine, linear or constant.
    #[arg(long, default_value_t = ScheduleKind::Cosine)]
    pub schedule: ScheduleKind,
    /// LoRA rank.
    #[arg(long, default_value_t = LoraConfig::default().r)]
    pub lora_r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = LoraConfig::default().alpha)]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = LoraConfig::default().dropout)]
    pub lora_dropout: f64,
    /// Scale adapters by alpha/√r.
    #[arg(long, default_value_t = LoraConfig::default().rslora, action = clap::ArgAction::Set)]
    pub rslora: bool,
    /// Comma-separated module names, or a regex over module paths [default: the spec's].
    #[arg(long)]
    pub targets: Option<String>,
    /// Optimizer: adam8bit or adamw.
    #[arg(long, default_value_t = OptimKind::Adam8bit)]
    pub optim: OptimKind,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Compute dtype: f32 or bf16 (f16 is refused: no loss scaling).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seed of adapters, data split, data order and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Save every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Held-out fraction of the data.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Gradient-norm clip, 0 for none.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Run plain autograd instead of block-level recompute.
    #[arg(long)]
    pub no_checkpointing: bool,
    /// Keep frozen weights in f32 instead of 8-bit.
    #[arg(long)]
    pub no_quantize: bool,
    /// Also train norm scales and shifts.
    #[arg(long)]
    pub train_norms: bool,
    /// Also train biases.
    #[arg(long)]
    pub train_biases: bool,
    /// Continue the run saved in this folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Replace a non-empty output folder.
    #[arg(long)]
    pub force: bool,
    /// The device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", help = crate::device::FLAG_HELP)]
    pub device: String,
    /// Save and stop after this many steps in total (resume later with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Draw a progress bar (not a setting of the run).
    #[arg(skip)]
    #[serde(skip)]
    pub progress: bool,
    /// Log every this many steps to metrics.jsonl.
    #[arg(skip = 1usize)]
    #[serde(skip)]
    pub log_every: usize,
}

impl Default for TrainOptions {
    /// The defaults of the flags.
    fn default() -> Self {
        let cmd = TrainOptions::augment_args(clap::Command::new("train"));
        // Every flag has a default or is optional, so an empty command line always parses.
        cmd.try_get_matches_from(["train"])
            .and_then(|m| TrainOptions::from_arg_matches(&m))
            .expect("the defaults of the train flags parse")
    }
}

impl TrainOptions {
    /// Settles the settings from the flags (`self`, with `given` naming the ones actually on
    /// the command line, as TOML keys) and an optional TOML file: a flag wins over the file,
    /// the file over the default. A warm-up nobody gave is capped at a tenth of the steps.
    pub fn resolve(self, given: &[String], config: Option<&Path>) -> Result<Self> {
        let mut keys: Vec<String> = given.to_vec();
        let mut opts = self;
        if let Some(path) = config {
            let text = std::fs::read_to_string(path).map_err(|e| OctetError::io(path, e))?;
            let bad = |e: &dyn std::fmt::Display| OctetError::bad_file(path, e.to_string().trim());
            // Parsed as settings first, for errors that name the line and the key.
            toml::from_str::<TrainOptions>(&text).map_err(|e| bad(&e))?;
            let file: toml::Table = toml::from_str(&text).map_err(|e| bad(&e))?;
            let mut merged = toml::Table::try_from(&opts).map_err(|e| bad(&e))?;
            for (key, value) in file {
                if !given.contains(&key) {
                    keys.push(key.clone());
                    merged.insert(key, value);
                }
            }
            let (progress, log_every) = (opts.progress, opts.log_every);
            opts = merged.try_into().map_err(|e| bad(&e))?;
            (opts.progress, opts.log_every) = (progress, log_every);
        }
        if !keys.iter().any(|k| k == "warmup") {
            // A short run gets a proportionally short warm-up.
            opts.warmup = opts.warmup.min(opts.steps / 10);
        }
        Ok(opts)
    }

    /// The settings as TOML, the format `--config` reads.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| OctetError::InvalidArgument(e.to_string()))
    }

    /// The adapter hyper-parameters.
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            rslora: self.rslora,
        }
    }

    /// The adapter targets, when given (else the spec's default applies).
    pub fn targets(&self) -> Result<Option<Targets>> {
        self.targets.as_deref().map(Targets::parse).transpose()
    }

    /// The data format `--format` forces; `None` for `auto` (detected from the file).
    pub fn data_format(&self) -> Result<Option<crate::train::data::DataFormat>> {
        if self.format.trim().eq_ignore_ascii_case("auto") {
            return Ok(None);
        }
        self.format.parse().map(Some)
    }

    /// The compute dtype.
    pub fn kind(&self) -> Result<tch::Kind> {
        crate::device::parse_dtype(&self.dtype)
    }

    /// Checks every setting against its range before anything is loaded or written.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(OctetError::InvalidArgument(m));
        for (flag, path) in [
            ("model", &self.model),
            ("data", &self.data),
            ("out", &self.out),
        ] {
            if path.as_os_str().is_empty() {
                return bad(format!("--{flag} is required (as a flag or in --config)"));
            }
        }
        if self.kind()? == tch::Kind::Half {
            // f16 gradients underflow without loss scaling, which the loop does not do.
            return bad(
                "--dtype f16 is not supported for training (its gradients underflow \
                        without loss scaling): use --dtype bf16, which has f32's range, or f32; \
                        f16 works for eval and generate"
                    .into(),
            );
        }
        self.targets()?;
        self.data_format()?;
        self.check_ranges()
    }

    /// Each number within its range, named as its flag.
    fn check_ranges(&self) -> Result<()> {
        let bad = |m: String| Err(OctetError::InvalidArgument(m));
        let at_least = |flag: &str, v: usize, min: usize| {
            if v < min {
                bad(format!("--{flag} {v}: must be at least {min}"))
            } else {
                Ok(())
            }
        };
        at_least("steps", self.steps, 1)?;
        at_least("batch-size", self.batch_size, 1)?;
        at_least("grad-accum", self.grad_accum, 1)?;
        at_least("seq-len", self.seq_len, 2)?;
        at_least("lora-r", self.lora_r, 1)?;
        if let Some(n) = self.stop_after {
            at_least("stop-after", n, 1)?;
        }
        let finite = |flag: &str, v: f64, ok: bool, range: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                bad(format!("--{flag} {v}: must be {range}"))
            }
        };
        let positive = "a finite number > 0";
        finite("lr", self.lr, self.lr > 0.0, positive)?;
        finite(
            "lora-alpha",
            self.lora_alpha,
            self.lora_alpha > 0.0,
            positive,
        )?;
        let d = self.lora_dropout;
        finite("lora-dropout", d, (0.0..1.0).contains(&d), "in [0, 1)")?;
        let f = self.eval_fraction;
        finite("eval-fraction", f, (0.0..1.0).contains(&f), "in [0, 1)")?;
        let wd = self.weight_decay;
        finite("weight-decay", wd, wd >= 0.0, "a finite number ≥ 0")?;
        let g = self.max_grad_norm;
        let clip = "a finite number ≥ 0 (0: no clipping)";
        finite("max-grad-norm", g, g >= 0.0, clip)?;
        if self.warmup > self.steps {
            return bad(format!(
                "--warmup {}: must not exceed --steps ({})",
                self.warmup, self.steps
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_flags() {
        let d = TrainOptions::default();
        assert_eq!(
            (d.steps, d.batch_size, d.seq_len, d.warmup),
            (100, 4, 128, 10)
        );
        assert_eq!(
            (d.optim, d.schedule),
            (OptimKind::Adam8bit, ScheduleKind::Cosine)
        );
        assert_eq!(d.lora(), LoraConfig::default());
        assert_eq!(
            (d.log_every, d.progress, d.dtype.as_str()),
            (1, false, "f32")
        );
    }

    #[test]
    fn a_flag_beats_the_file_which_beats_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "steps = 7\nlr = 0.5\nno-quantize = true\n").unwrap();
        let flags = TrainOptions {
            lr: 0.25,
            ..TrainOptions::default()
        };
        let o = flags.resolve(&["lr".into()], Some(&file)).unwrap();
        assert_eq!((o.steps, o.lr, o.no_quantize), (7, 0.25, true));
        // No warm-up given: a tenth of 7 steps.
        assert_eq!((o.seq_len, o.warmup), (128, 0));
        std::fs::write(&file, "stepz = 7\n").unwrap();
        let e = TrainOptions::default()
            .resolve(&[], Some(&file))
            .unwrap_err();
        assert!(
            e.to_string().contains("t.toml") && e.to_string().contains("stepz"),
            "{e}"
        );
    }
}
