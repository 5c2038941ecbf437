//! The LoRA fine-tuning loop: data, adapters, checkpointed backward, optimizer, schedule,
//! evaluation, metrics, atomic checkpoints, exact resume and a clean stop on Ctrl-C.
use super::adam8bit::Adam8bit;
use super::adamw::AdamW;
use super::data::{Batcher, BatcherState, Dataset, Sequence};
use super::optim::{AdamConfig, Optimizer};
use super::schedule::{LrSchedule, ScheduleKind};
use super::step::{causal_lm_nll, forward_backward};
use crate::adapter::{
    attach_lora, load_adapter, save_adapter, train_extras, trainable_tensors, AdapterConfig,
    Targets, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
use crate::error::{OctetError, Result};
use crate::io::safetensors::{save_tensors, SafetensorsFile};
use crate::io::TensorStore;
use crate::load::{load_model, read_tensor, LoadOptions, LoadedModel, QuantizeOptions};
use crate::model::CausalLm;
use crate::nn::{Layer, LoraConfig};
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

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

/// Everything a training run needs, resolved.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Model folder (HF or octet).
    pub model: PathBuf,
    /// Text / JSONL data file.
    pub data: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// `auto` or a registry name.
    pub arch: String,
    /// Optimizer steps in total.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Decay after warm-up.
    pub schedule: ScheduleKind,
    /// Adapter hyper-parameters.
    pub lora: LoraConfig,
    /// Adapter targets; the spec's default when `None`.
    pub targets: Option<Targets>,
    /// Optimizer.
    pub optim: OptimKind,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Compute dtype (f32 or bf16).
    pub kind: Kind,
    /// Seed of adapters, data order and dropout.
    pub seed: u64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Save every this many steps (0: only at the end).
    pub save_every: usize,
    /// Fraction of sequences held out.
    pub eval_fraction: f64,
    /// Gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    /// Block-level recompute.
    pub checkpointing: bool,
    /// Also train norm scales/shifts.
    pub train_norms: bool,
    /// Also train biases.
    pub train_biases: bool,
    /// Store frozen weights in 8-bit (float modules are quantized on load).
    pub quantize: bool,
    /// Continue the run saved in this folder.
    pub resume: Option<PathBuf>,
    /// Replace a non-empty output folder.
    pub force: bool,
    /// Device.
    pub device: Device,
    /// Draw a progress bar.
    pub progress: bool,
    /// Log every this many steps to metrics.jsonl.
    pub log_every: usize,
    /// Save and stop after this many steps in total, as Ctrl-C would (time-boxed runs).
    pub stop_after: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            model: PathBuf::new(),
            data: PathBuf::new(),
            out: PathBuf::new(),
            arch: "auto".into(),
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            seq_len: 128,
            lr: 2e-4,
            warmup: 10,
            schedule: ScheduleKind::Cosine,
            lora: LoraConfig::default(),
            targets: None,
            optim: OptimKind::Adam8bit,
            weight_decay: 0.0,
            kind: Kind::Float,
            seed: 0,
            eval_every: 0,
            save_every: 0,
            eval_fraction: 0.1,
            max_grad_norm: 1.0,
            checkpointing: true,
            train_norms: false,
            train_biases: false,
            quantize: true,
            resume: None,
            force: false,
            device: Device::Cpu,
            progress: false,
            log_every: 1,
            stop_after: None,
        }
    }
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (1-based: the number of updates applied).
    pub step: usize,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Held-out loss, when evaluated at this step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Steps completed in total.
    pub steps: usize,
    /// Per-step metrics of this invocation.
    pub metrics: Vec<StepMetrics>,
    /// Final held-out loss.
    pub eval_loss: Option<f64>,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Optimizer state bytes.
    pub optimizer_bytes: usize,
    /// Whether the run stopped early on Ctrl-C.
    pub interrupted: bool,
    /// Wrapped modules.
    pub targets: Vec<String>,
}

/// Resume state kept beside the adapter.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RunState {
    step: usize,
    batcher: BatcherState,
    seed: u64,
    base: String,
    base_fingerprint: String,
    r: usize,
    targets: Vec<String>,
    optim: OptimKind,
    train_norms: bool,
    train_biases: bool,
}

const STATE_DIR: &str = "resume";
const METRICS_FILE: &str = "metrics.jsonl";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler once; the loop polls the flag between steps.
fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
}

/// A fingerprint of the base model: its module graph (paths, kinds, shapes) and up to 1,024
/// evenly spaced values of every frozen tensor, so resuming onto another base is refused
/// without hashing gigabytes.
fn fingerprint(m: &mut LoadedModel) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for n in &m.graph.nodes {
        h.update(n.path.as_bytes());
        for p in &n.params {
            h.update(format!("{}{:?}", p.name, p.shape).as_bytes());
        }
    }
    let mut sample = |t: &Tensor| {
        let flat = t.flatten(0, -1).to_device(Device::Cpu);
        let n = flat.numel() as i64;
        if n == 0 {
            return;
        }
        let idx = Tensor::linspace(
            0.0,
            (n - 1) as f64,
            n.min(1024),
            (Kind::Double, Device::Cpu),
        )
        .to_kind(Kind::Int64);
        let vals = flat.index_select(0, &idx).to_kind(Kind::Double);
        for v in Vec::<f64>::try_from(&vals).unwrap_or_default() {
            h.update(v.to_le_bytes());
        }
    };
    m.model
        .visit_layers(&mut |_, l| l.tensors().iter().for_each(|(_, t)| sample(t)));
    m.model
        .visit_norms(&mut |_, l| l.tensors().iter().for_each(|(_, t)| sample(t)));
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn build_optimizer(kind: OptimKind, params: Vec<Tensor>, wd: f64) -> Result<Box<dyn Optimizer>> {
    let cfg = AdamConfig {
        weight_decay: wd,
        ..AdamConfig::default()
    };
    Ok(match kind {
        OptimKind::Adam8bit => Box::new(Adam8bit::new(params, cfg)?),
        OptimKind::Adamw => Box::new(AdamW::new(params, cfg)?),
    })
}

/// Mean loss of `model` over `data` (no grad, no dropout).
pub fn evaluate(
    model: &mut dyn CausalLm,
    data: &[Sequence],
    batch_size: usize,
) -> Result<Option<f64>> {
    if data.is_empty() {
        return Ok(None);
    }
    let vocab = model.info().vocab_size;
    crate::model::check_token_ids(
        data.iter().flat_map(|s| &s.input_ids),
        vocab,
        "held-out data",
    )?;
    model.visit_layers(&mut |_, l| l.set_training(false));
    let (mut nll, mut n) = (0.0, 0i64);
    for chunk in data.chunks(batch_size.max(1)) {
        let ids: Vec<i64> = chunk
            .iter()
            .flat_map(|s| s.input_ids.iter().copied())
            .collect();
        let labels: Vec<i64> = chunk
            .iter()
            .flat_map(|s| s.labels.iter().copied())
            .collect();
        let t = chunk[0].input_ids.len() as i64;
        let ids = Tensor::from_slice(&ids).reshape([chunk.len() as i64, t]);
        let labels = Tensor::from_slice(&labels).reshape([chunk.len() as i64, t]);
        let (s, c) = crate::nn::scratch::inference(|| causal_lm_nll(&model.forward(&ids), &labels));
        nll += s;
        n += c;
    }
    model.visit_layers(&mut |_, l| l.set_training(true));
    Ok((n > 0).then(|| nll / n as f64))
}

fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    crate::nn::scratch::inference(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        let total: f64 = grads
            .iter()
            .map(|g| {
                g.to_kind(Kind::Double)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum::<f64>()
            .sqrt();
        if max_norm > 0.0 && total.is_finite() && total > max_norm {
            let scale = max_norm / (total + 1e-6);
            for mut g in grads {
                let _ = g.g_mul_scalar_(scale);
            }
        }
        total
    })
}

/// Writes adapter + resume state into `out` atomically: a fresh sibling folder is filled and
/// swapped in by rename, so a crash leaves the previous checkpoint intact.
fn save_checkpoint(
    model: &mut dyn CausalLm,
    opt: &dyn Optimizer,
    cfg: &AdapterConfig,
    state: &RunState,
    out: &Path,
) -> Result<()> {
    let tmp = out.join(".save-tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| OctetError::io(&tmp, e))?;
    }
    let tmp_state = tmp.join(STATE_DIR);
    std::fs::create_dir_all(&tmp_state).map_err(|e| OctetError::io(&tmp_state, e))?;
    save_adapter(model, cfg, &tmp)?;
    save_adapter(model, cfg, &tmp_state)?;
    save_tensors(
        &tmp_state.join("optimizer.safetensors"),
        &opt.state_dict(),
        &[],
    )?;
    let json = serde_json::to_string_pretty(state)
        .map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
    std::fs::write(tmp_state.join("state.json"), json)
        .map_err(|e| OctetError::io(&tmp_state, e))?;
    let old = out.join(".resume-old");
    let dst = out.join(STATE_DIR);
    if dst.exists() {
        std::fs::rename(&dst, &old).map_err(|e| OctetError::io(&dst, e))?;
    }
    std::fs::rename(&tmp_state, &dst).map_err(|e| OctetError::io(&dst, e))?;
    let _ = std::fs::remove_dir_all(&old);
    for f in [ADAPTER_WEIGHTS, ADAPTER_CONFIG] {
        std::fs::rename(tmp.join(f), out.join(f)).map_err(|e| OctetError::io(out.join(f), e))?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn prepare_out(opts: &TrainOptions) -> Result<()> {
    let out = &opts.out;
    if out.is_file() {
        return Err(OctetError::InvalidArgument(format!(
            "{}: exists and is a file",
            out.display()
        )));
    }
    let resuming_here = opts
        .resume
        .as_ref()
        .is_some_and(|r| std::path::absolute(r).ok() == std::path::absolute(out).ok());
    let non_empty = out.is_dir()
        && std::fs::read_dir(out)
            .map_err(|e| OctetError::io(out, e))?
            .next()
            .is_some();
    if non_empty && !opts.force && !resuming_here {
        return Err(OctetError::InvalidArgument(format!(
            "{}: exists and is not empty (pass --force, or --resume it)",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| OctetError::io(out, e))
}

/// Runs (or resumes) a training run.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    // De-quantization buffers live for the whole run rather than being re-faulted every step.
    crate::nn::scratch::retain(|| train_run(opts))
}

fn train_run(opts: &TrainOptions) -> Result<TrainSummary> {
    if opts.steps == 0 || opts.batch_size == 0 || opts.grad_accum == 0 || opts.seq_len < 2 {
        return Err(OctetError::InvalidArgument(
            "steps, batch size and grad accum must be ≥ 1 and seq len ≥ 2".into(),
        ));
    }
    let tokenizer = Tokenizer::from_dir(&opts.model)?;
    let quantize = opts.quantize.then(QuantizeOptions::default);
    let mut loaded = load_model(
        &opts.model,
        &LoadOptions {
            arch: opts.arch.clone(),
            kind: opts.kind,
            device: opts.device,
            quantize,
        },
    )?;
    let info = loaded.model.info();
    if opts.seq_len > info.max_positions {
        return Err(OctetError::InvalidArgument(format!(
            "--seq-len {} is larger than the model's {} positions (config.json n_positions)",
            opts.seq_len, info.max_positions
        )));
    }
    let dataset = Dataset::load(
        &opts.data,
        &tokenizer,
        opts.seq_len,
        opts.eval_fraction,
        opts.seed,
        None,
    )?;
    if dataset.train.is_empty() {
        return Err(OctetError::bad_file(
            &opts.data,
            "no training sequences after the held-out split",
        ));
    }
    let all = dataset.train.iter().chain(&dataset.eval);
    crate::model::check_token_ids(
        all.flat_map(|s| &s.input_ids),
        info.vocab_size,
        &opts.data.display().to_string(),
    )?;
    let base_fp = fingerprint(&mut loaded);
    let base_name = opts.model.display().to_string();
    let targets = opts
        .targets
        .clone()
        .unwrap_or_else(|| Targets::Names(loaded.arch.spec().lora_targets.clone()));
    prepare_out(opts)?;

    let model = loaded.model.as_mut();
    tch::manual_seed(opts.seed as i64);
    let (mut step, mut batcher, wrapped, resume_state) = match &opts.resume {
        Some(dir) => {
            let sdir = dir.join(STATE_DIR);
            let p = sdir.join("state.json");
            let text = std::fs::read_to_string(&p).map_err(|e| OctetError::io(&p, e))?;
            let st: RunState =
                serde_json::from_str(&text).map_err(|e| OctetError::bad_file(&p, e.to_string()))?;
            if st.base_fingerprint != base_fp {
                return Err(OctetError::bad_file(&p, format!("this run was trained on another base model ({}); refusing to resume onto {}", st.base, base_name)));
            }
            if st.r != opts.lora.r {
                return Err(OctetError::bad_file(
                    &p,
                    format!(
                        "this run has LoRA rank {}, not --lora-r {}",
                        st.r, opts.lora.r
                    ),
                ));
            }
            load_adapter(model, &sdir)?;
            train_extras(model, st.train_norms, st.train_biases);
            let batcher = Batcher::restore(st.batcher, dataset.train.len(), opts.batch_size)?;
            (st.step, batcher, st.targets.clone(), Some(st))
        }
        None => {
            let wrapped = attach_lora(model, &targets, opts.lora)?;
            train_extras(model, opts.train_norms, opts.train_biases);
            (
                0,
                Batcher::new(dataset.train.len(), opts.batch_size, opts.seed)?,
                wrapped,
                None,
            )
        }
    };
    model.visit_layers(&mut |_, l| l.set_training(true));
    if opts.kind != Kind::Float {
        model.store_frozen_in(opts.kind);
    }
    let named = trainable_tensors(model);
    let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let trainable_params: usize = params.iter().map(|p| p.numel()).sum();
    let optim_kind = resume_state.as_ref().map_or(opts.optim, |s| s.optim);
    let mut optimizer = build_optimizer(
        optim_kind,
        params.iter().map(|p| p.shallow_clone()).collect(),
        opts.weight_decay,
    )?;
    if let Some(dir) = &opts.resume {
        let p = dir.join(STATE_DIR).join("optimizer.safetensors");
        let store = SafetensorsFile::open(&p)?;
        let state: Vec<(String, Tensor)> = store
            .names()
            .into_iter()
            .map(|n| Ok((n.clone(), read_tensor(&store, &n)?)))
            .collect::<Result<_>>()?;
        optimizer
            .load_state_dict(&state)
            .map_err(|e| OctetError::bad_file(&p, e.to_string()))?;
    }
    let mut adapter_cfg = AdapterConfig::new(
        opts.lora,
        &targets,
        &base_name,
        opts.train_biases || resume_state.as_ref().is_some_and(|s| s.train_biases),
    );
    adapter_cfg.fan_in_fan_out = loaded.arch.fan_in_fan_out();
    let schedule = LrSchedule::new(opts.schedule, opts.lr, opts.warmup, opts.steps)?;
    let metrics_path = opts.out.join(METRICS_FILE);
    keep_metrics_through(&metrics_path, step)?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| OctetError::io(&metrics_path, e))?;
    install_interrupt_handler();
    INTERRUPTED.store(false, Ordering::SeqCst);

    let pb = if opts.progress {
        indicatif::ProgressBar::new(opts.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(step as u64);
    let state_of = |step: usize, batcher: &Batcher| RunState {
        step,
        batcher: batcher.state(),
        seed: opts.seed,
        base: base_name.clone(),
        base_fingerprint: base_fp.clone(),
        r: opts.lora.r,
        targets: wrapped.clone(),
        optim: optim_kind,
        train_norms: opts.train_norms || resume_state.as_ref().is_some_and(|s| s.train_norms),
        train_biases: adapter_cfg.bias == "all",
    };
    let mut all_metrics = Vec::new();
    let mut interrupted = false;
    let mut last_eval = None;
    while step < opts.steps {
        let started = Instant::now();
        optimizer.zero_grad();
        let mut loss_sum = 0.0;
        for micro in 0..opts.grad_accum {
            let (ids, labels) = batcher.next_batch(&dataset.train)?;
            let ids = ids.to_device(opts.device);
            let micro_id = (step * opts.grad_accum + micro) as u64;
            let loss = forward_backward(
                model,
                &ids,
                &labels,
                1.0 / opts.grad_accum as f64,
                opts.checkpointing,
                opts.seed,
                micro_id,
            );
            if !loss.is_finite() {
                pb.abandon();
                return Err(OctetError::InvalidArgument(format!(
                    "the loss became {loss} at step {}; stopping (the last good checkpoint in {} is kept)",
                    step + 1,
                    opts.out.display()
                )));
            }
            loss_sum += loss;
        }
        let grad_norm = clip_grad_norm(&params, opts.max_grad_norm);
        let lr = schedule.lr(step);
        optimizer.step(lr)?;
        step += 1;
        let tokens = (opts.batch_size * opts.seq_len * opts.grad_accum) as f64;
        let mut m = StepMetrics {
            step,
            loss: loss_sum / opts.grad_accum as f64,
            lr,
            tokens_per_s: tokens / started.elapsed().as_secs_f64(),
            grad_norm,
            eval_loss: None,
        };
        if (opts.eval_every > 0 && step % opts.eval_every == 0) || step == opts.steps {
            m.eval_loss = evaluate(model, &dataset.eval, opts.batch_size)?;
            last_eval = m.eval_loss;
        }
        if step % opts.log_every.max(1) == 0 || m.eval_loss.is_some() || step == opts.steps {
            let line = serde_json::to_string(&m)
                .map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
            writeln!(metrics_file, "{line}").map_err(|e| OctetError::io(&metrics_path, e))?;
        }
        pb.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss, lr, m.tokens_per_s
        ));
        pb.set_position(step as u64);
        all_metrics.push(m);
        interrupted =
            INTERRUPTED.load(Ordering::SeqCst) || opts.stop_after.is_some_and(|n| step >= n);
        if (opts.save_every > 0 && step % opts.save_every == 0) || step == opts.steps || interrupted
        {
            save_checkpoint(
                model,
                optimizer.as_ref(),
                &adapter_cfg,
                &state_of(step, &batcher),
                &opts.out,
            )?;
        }
        if interrupted {
            break;
        }
    }
    pb.finish_and_clear();
    Ok(TrainSummary {
        steps: step,
        metrics: all_metrics,
        eval_loss: last_eval,
        trainable_params,
        optimizer_bytes: optimizer.state_bytes(),
        interrupted,
        targets: wrapped,
    })
}

/// Drops metrics lines past `step` (from a run that went further than its last checkpoint).
fn keep_metrics_through(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| OctetError::io(path, e))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= step))
        .collect();
    let body = if kept.is_empty() {
        String::new()
    } else {
        kept.join("\n") + "\n"
    };
    std::fs::write(path, body).map_err(|e| OctetError::io(path, e))
}
