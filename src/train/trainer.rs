//! The LoRA fine-tuning loop: data, adapters, checkpointed backward, optimizer, schedule,
//! evaluation, metrics, atomic checkpoints, exact resume and a clean stop on Ctrl-C.
use super::adam8bit::{Adam8bit, StateRounding};
use super::adamw::AdamW;
use super::checkpoint::{
    find_checkpoint, fingerprint_data, save_checkpoint, RunSettings, RunState, OPTIMIZER_FILE,
    STATE_FILE,
};
use super::data::{Batcher, Dataset, Sequence};
use super::optim::{AdamConfig, Optimizer};
use super::schedule::{LrSchedule, ScheduleKind};
use super::step::{causal_lm_nll, forward_backward};
use crate::adapter::{
    attach_lora, load_adapter, train_extras, trainable_tensors, AdapterConfig, Targets,
};
use crate::error::{OctetError, Result};
use crate::io::safetensors::SafetensorsFile;
use crate::io::TensorStore;
use crate::load::{load_model, read_tensor, LoadOptions, LoadedModel, QuantizeOptions};
use crate::model::CausalLm;
use crate::nn::{Layer, LoraConfig};
use crate::outdir::InPlaceOutput;
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
    /// GPU memory in use after the step, MiB (the run's high-water mark so far: the caching
    /// allocator keeps what it reserved); only on a GPU.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peak_gpu_mib: Option<f64>,
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
    /// Why the run stopped.
    pub stop: StopReason,
    /// Wrapped modules.
    pub targets: Vec<String>,
    /// Peak GPU memory of the run in MiB (see [`StepMetrics::peak_gpu_mib`]); `None` off a GPU.
    pub peak_gpu_mib: Option<f64>,
}

/// Why a run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// It reached `steps`.
    Finished,
    /// Ctrl-C: a checkpoint was saved.
    Interrupted,
    /// It reached `stop_after` (a checkpoint was saved, or the resumed run was already there).
    StopAfter,
}

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
        let flat = t.flatten(0, -1);
        let n = flat.numel() as i64;
        if n == 0 {
            return;
        }
        // Sampled where the tensor lives: only the 1,024 values cross to the host. The
        // indices are computed on the CPU so that every device samples the same elements.
        let idx = Tensor::linspace(
            0.0,
            (n - 1) as f64,
            n.min(1024),
            (Kind::Double, Device::Cpu),
        )
        .to_kind(Kind::Int64)
        .to_device(flat.device());
        let vals = flat
            .index_select(0, &idx)
            .to_device(Device::Cpu)
            .to_kind(Kind::Double);
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

fn build_optimizer(
    kind: OptimKind,
    params: Vec<Tensor>,
    wd: f64,
    device: Device,
) -> Result<Box<dyn Optimizer>> {
    let cfg = AdamConfig {
        weight_decay: wd,
        ..AdamConfig::default()
    };
    // On a GPU the states round to the nearest code, as bitsandbytes' CUDA kernel does; the
    // CPU keeps bitsandbytes' CPU rounding (bit-identical to its CPU optimizer).
    let rounding = match device {
        Device::Cpu => StateRounding::BitsandbytesCpu,
        _ => StateRounding::Nearest,
    };
    Ok(match kind {
        OptimKind::Adam8bit => Box::new(Adam8bit::new(params, cfg)?.with_rounding(rounding)),
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
    let device = crate::model::model_device(&*model)?;
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
        let ids = Tensor::from_slice(&ids)
            .reshape([chunk.len() as i64, t])
            .to_device(device);
        let labels = Tensor::from_slice(&labels).reshape([chunk.len() as i64, t]);
        let (s, c) = crate::nn::scratch::inference(|| -> Result<_> {
            Ok(causal_lm_nll(&model.forward(&ids)?, &labels))
        })?;
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

/// Opens the run folder: locked for the whole run; continued in place when it is the run
/// being resumed, else new (or, with `--force`, an old octet output replaced).
fn open_output(opts: &TrainOptions) -> Result<InPlaceOutput> {
    let resolve = |p: &Path| crate::outdir::target::resolve(p).ok();
    let continuing = opts
        .resume
        .as_deref()
        .is_some_and(|r| resolve(r).is_some() && resolve(r) == resolve(&opts.out));
    let mut inputs: Vec<&Path> = vec![&opts.model];
    if !continuing {
        inputs.push(&opts.data);
        inputs.extend(opts.resume.as_deref());
    }
    InPlaceOutput::open(&opts.out, opts.force, continuing, &inputs)
}

impl TrainOptions {
    /// Checks every setting against its range before anything is loaded or written.
    pub fn validate(&self) -> Result<()> {
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
        at_least("lora-r", self.lora.r, 1)?;
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
        finite("lr", self.lr, self.lr > 0.0, "a finite number > 0")?;
        finite(
            "lora-alpha",
            self.lora.alpha,
            self.lora.alpha > 0.0,
            "a finite number > 0",
        )?;
        let d = self.lora.dropout;
        finite("lora-dropout", d, (0.0..1.0).contains(&d), "in [0, 1)")?;
        let f = self.eval_fraction;
        finite("eval-fraction", f, (0.0..1.0).contains(&f), "in [0, 1)")?;
        let wd = self.weight_decay;
        finite("weight-decay", wd, wd >= 0.0, "a finite number ≥ 0")?;
        let g = self.max_grad_norm;
        finite(
            "max-grad-norm",
            g,
            g >= 0.0,
            "a finite number ≥ 0 (0: no clipping)",
        )?;
        if self.warmup > self.steps {
            return bad(format!(
                "--warmup {}: must not exceed --steps ({})",
                self.warmup, self.steps
            ));
        }
        Ok(())
    }
}

/// Runs (or resumes) a training run.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    // De-quantization buffers live for the whole run rather than being re-faulted every step.
    crate::nn::scratch::retain(|| train_run(opts))
}

fn train_run(opts: &TrainOptions) -> Result<TrainSummary> {
    opts.validate()?;
    crate::model::check_model_path(&opts.model)?;
    if opts.kind == Kind::Half {
        // f16 gradients underflow without loss scaling, which this loop does not do.
        return Err(OctetError::InvalidArgument(
            "--dtype f16 is not supported for training (its gradients underflow without loss \
             scaling): use --dtype bf16, which has f32's range, or f32; f16 works for eval and \
             generate"
                .into(),
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
    if opts.lora.r > info.hidden {
        return Err(OctetError::InvalidArgument(format!(
            "--lora-r {}: larger than the model's hidden width {}",
            opts.lora.r, info.hidden
        )));
    }
    // Refused before any batch is built or run.
    crate::memory::ensure_fits(
        &format!(
            "a micro-batch of {} x {} tokens",
            opts.batch_size, opts.seq_len
        ),
        crate::memory::training_batch_bytes(
            &info,
            opts.batch_size,
            opts.seq_len,
            opts.checkpointing,
        ),
        opts.device,
        "lower --batch-size or --seq-len (--grad-accum keeps the effective batch)",
    )?;
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
    let settings = RunSettings::of(opts, &targets, fingerprint_data(&dataset));
    let checkpoint = opts.resume.as_deref().map(find_checkpoint).transpose()?;
    if let Some((sdir, st)) = &checkpoint {
        let p = sdir.join(STATE_FILE);
        match &st.settings {
            Some(was) => was.check_resume(&settings, &p)?,
            None => eprintln!(
                "note: {} predates recorded settings; only the base and rank are checked",
                p.display()
            ),
        }
    }

    let model = loaded.model.as_mut();
    tch::manual_seed(opts.seed as i64);
    let (mut step, mut batcher, wrapped, resume_state) = match checkpoint {
        Some((sdir, st)) => {
            let p = sdir.join(STATE_FILE);
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
            (st.step, batcher, st.targets.clone(), Some((st, sdir)))
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
    // Opened once the settings, checkpoint and targets are known good, so a refused run
    // writes nothing.
    let output = open_output(opts)?;
    let out_dir = output.path().to_path_buf();
    model.visit_layers(&mut |_, l| l.set_training(true));
    if opts.kind != Kind::Float {
        model.store_frozen_in(opts.kind);
    }
    let named = trainable_tensors(model);
    let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let trainable_params: usize = params.iter().map(|p| p.numel()).sum();
    let optim_kind = resume_state.as_ref().map_or(opts.optim, |s| s.0.optim);
    let mut optimizer = build_optimizer(
        optim_kind,
        params.iter().map(|p| p.shallow_clone()).collect(),
        opts.weight_decay,
        opts.device,
    )?;
    if let Some((_, sdir)) = &resume_state {
        let p = sdir.join(OPTIMIZER_FILE);
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
        opts.train_biases || resume_state.as_ref().is_some_and(|s| s.0.train_biases),
    );
    adapter_cfg.fan_in_fan_out = loaded.arch.fan_in_fan_out();
    let schedule = LrSchedule::new(opts.schedule, opts.lr, opts.warmup, opts.steps)?;
    let metrics_path = out_dir.join(METRICS_FILE);
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
        train_norms: opts.train_norms || resume_state.as_ref().is_some_and(|s| s.0.train_norms),
        train_biases: adapter_cfg.bias == "all",
        settings: Some(settings.clone()),
        files: Default::default(),
    };
    let mut all_metrics = Vec::new();
    let mut stop = StopReason::Finished;
    let mut last_eval = None;
    if opts.stop_after.is_some_and(|n| step >= n) && step < opts.steps {
        // A resumed run already at its --stop-after: nothing to do, nothing to save.
        stop = StopReason::StopAfter;
    }
    let mut peak_gpu: Option<u64> = None;
    while step < opts.steps && stop == StopReason::Finished {
        let started = Instant::now();
        let batcher_before = batcher.state();
        optimizer.zero_grad();
        let mut loss_sum = 0.0;
        for micro in 0..opts.grad_accum {
            let (ids, labels) = batcher.next_batch(&dataset.train)?;
            // Built on the host, copied to the device once per micro-batch.
            let ids = ids.to_device(opts.device);
            let labels = labels.to_device(opts.device);
            let micro_id = (step * opts.grad_accum + micro) as u64;
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                forward_backward(
                    &*model,
                    &ids,
                    &labels,
                    1.0 / opts.grad_accum as f64,
                    opts.checkpointing,
                    opts.seed,
                    micro_id,
                )
            }));
            let loss = match run {
                Ok(loss) => loss?,
                Err(panic) => {
                    let msg = panic_message(&*panic);
                    if !is_out_of_memory(&msg) {
                        std::panic::resume_unwind(panic);
                    }
                    pb.abandon();
                    optimizer.zero_grad();
                    let kept = if step > 0 {
                        let mut st = state_of(step, &batcher);
                        st.batcher = batcher_before;
                        save_checkpoint(model, optimizer.as_ref(), &adapter_cfg, &st, &out_dir)?;
                        format!(
                            "the last good checkpoint (step {step}) is saved in {}; continue it with --resume {}",
                            opts.out.display(),
                            opts.out.display()
                        )
                    } else {
                        "no step had completed, so nothing was saved".to_string()
                    };
                    return Err(OctetError::InvalidArgument(format!(
                        "{} ran out of memory in step {} (batch size {}, seq len {}): {kept}. \
                         Lower --batch-size or --seq-len; raising --grad-accum keeps the \
                         effective batch of {} sequences",
                        crate::device::name(opts.device),
                        step + 1,
                        opts.batch_size,
                        opts.seq_len,
                        opts.batch_size * opts.grad_accum
                    )));
                }
            };
            if !loss.is_finite() {
                pb.abandon();
                return Err(OctetError::InvalidArgument(format!(
                    "the loss became {loss} at step {}; stopping (the last good checkpoint in {} is kept)",
                    step + 1,
                    out_dir.display()
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
            peak_gpu_mib: None,
        };
        if let Device::Cuda(n) = opts.device {
            if let Some(used) = crate::device::used_bytes(n) {
                let peak = peak_gpu.map_or(used, |p| p.max(used));
                peak_gpu = Some(peak);
                m.peak_gpu_mib = Some(peak as f64 / (1024.0 * 1024.0));
            }
        }
        if (opts.eval_every > 0 && step % opts.eval_every == 0) || step == opts.steps {
            m.eval_loss = evaluate(model, &dataset.eval, opts.batch_size)?;
            if let Some(e) = m.eval_loss.filter(|e| !e.is_finite()) {
                pb.abandon();
                return Err(OctetError::InvalidArgument(format!(
                    "the held-out loss became {e} at step {step}; stopping (the last good \
                     checkpoint in {} is kept)",
                    out_dir.display()
                )));
            }
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
        if INTERRUPTED.load(Ordering::SeqCst) {
            stop = StopReason::Interrupted;
        } else if opts.stop_after.is_some_and(|n| step >= n) && step < opts.steps {
            stop = StopReason::StopAfter;
        }
        if (opts.save_every > 0 && step % opts.save_every == 0)
            || step == opts.steps
            || stop != StopReason::Finished
        {
            save_checkpoint(
                model,
                optimizer.as_ref(),
                &adapter_cfg,
                &state_of(step, &batcher),
                &out_dir,
            )?;
        }
    }
    pb.finish_and_clear();
    Ok(TrainSummary {
        steps: step,
        metrics: all_metrics,
        eval_loss: last_eval,
        trainable_params,
        optimizer_bytes: optimizer.state_bytes(),
        stop,
        targets: wrapped,
        peak_gpu_mib: peak_gpu.map(|p| p as f64 / (1024.0 * 1024.0)),
    })
}

/// The text of a caught panic (libtorch errors arrive as panics from tch's non-`f_` calls).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Whether a libtorch error is an allocation failure (CUDA's caching allocator, or the CPU's).
fn is_out_of_memory(msg: &str) -> bool {
    msg.contains("out of memory") || msg.contains("can't allocate memory")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_allocation_failures_only() {
        assert!(is_out_of_memory(
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"
        ));
        assert!(is_out_of_memory(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ));
        assert!(!is_out_of_memory(
            "shape '[4, 8]' is invalid for input of size 3"
        ));
        let boxed: Box<dyn std::any::Any + Send> = Box::new(String::from("CUDA out of memory"));
        assert_eq!(panic_message(&*boxed), "CUDA out of memory");
    }
}
