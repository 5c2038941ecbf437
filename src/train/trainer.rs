//! The LoRA fine-tuning loop: data, adapters, checkpointed backward, optimizer, schedule,
//! evaluation, metrics, atomic checkpoints, exact resume and a clean stop on Ctrl-C.
use super::adam8bit::{Adam8bit, StateRounding};
use super::adamw::AdamW;
use super::checkpoint::{
    find_checkpoint, fingerprint_data, save_checkpoint, RunSettings, RunState, OPTIMIZER_FILE,
    STATE_FILE,
};
use super::data::{
    data_files, load_sequences_with, pad_id, template_for, Batch, Batcher, BatcherState,
    DataFormat, Dataset, LoadStats, ReadOptions, Sequence,
};
use super::optim::{AdamConfig, Optimizer};
use super::schedule::LrSchedule;
use super::step::{causal_lm_nll, forward_backward_with, labelled_positions, micro_batch_weights};
use super::stream::{DataOrder, Reader, Stream};
use crate::dist::{Dist, ReduceOp};
use crate::error::{OctetError, Result};
use crate::io::safetensors::SafetensorsFile;
use crate::io::TensorStore;
use crate::load::{load_model, LoadOptions, LoadedModel, QuantizeOptions};
use crate::model::{CausalLm, Packing};
use crate::nn::Layer;
use crate::outdir::InPlaceOutput;
use crate::peft::{
    attach_lora, load_adapter, train_extras, trainable_tensors, AdapterConfig, Targets,
};
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub use super::options::{OptimKind, TrainOptions};

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (1-based: the number of updates applied).
    pub step: usize,
    /// Mean training loss over the step's labelled tokens (all micro-batches together).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Token positions per second (padding included: batch × sequence length).
    pub tokens_per_s: f64,
    /// Tokens the loss was taken on per second (no padding, no untrained prompt tokens), all
    /// ranks together: what `--pack` speeds up.
    #[serde(default)]
    pub trained_tokens_per_s: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Held-out loss, when evaluated at this step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// GPU memory in use after the step, MiB (the run's high-water mark so far: the caching
    /// allocator keeps what it reserved); only on a GPU.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peak_gpu_mib: Option<f64>,
    /// Ranks of a data-parallel run (its loss is their mean, its tokens/s their sum); absent
    /// for a run of one process.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub world_size: Option<usize>,
    /// With `--pack`: the fraction of the step's token positions (every micro-batch of every
    /// rank) that hold a record rather than padding.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub packing_efficiency: Option<f64>,
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
    let (nll, n) = evaluate_sums(model, data, batch_size)?;
    Ok((n > 0).then(|| nll / n as f64))
}

/// The summed negative log-likelihood of `model` over `data` and the labelled positions it
/// covers (no grad, no dropout); what ranks add up to evaluate a sharded held-out set.
pub fn evaluate_sums(
    model: &mut dyn CausalLm,
    data: &[Sequence],
    batch_size: usize,
) -> Result<(f64, i64)> {
    if data.is_empty() {
        return Ok((0.0, 0));
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
    Ok((nll, n))
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
        inputs.extend(opts.eval_data.as_deref());
        inputs.extend(opts.resume.as_deref());
    }
    InPlaceOutput::open(&opts.out, opts.force, continuing, &inputs)
}

/// Runs (or resumes) a training run.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    train_on(opts, &Dist::single())
}

/// Runs (or resumes) this rank's part of a data-parallel run; every rank calls it with the
/// same options. A run that its launcher restarted (torchrun `--max-restarts`) resumes from
/// the last checkpoint in `--out` by itself.
pub fn train_on(opts: &TrainOptions, dist: &Dist) -> Result<TrainSummary> {
    let restarted;
    let opts = match super::distributed::resume_after_restart(opts, dist) {
        Some(o) => {
            restarted = o;
            &restarted
        }
        None => opts,
    };
    // De-quantization buffers live for the whole run rather than being re-faulted every step.
    crate::nn::scratch::retain(|| train_run(opts, dist))
}

/// What a run is set to before anything is written: the resolved device, dtype and targets,
/// the settings a resume is checked against, and the checkpoint to resume.
struct Plan {
    device: Device,
    kind: Kind,
    targets: Targets,
    settings: RunSettings,
    base_fp: String,
    fan_in_fan_out: bool,
    checkpoint: Option<(PathBuf, RunState)>,
    /// The training data when streamed (`--stream`).
    stream: Option<Stream>,
}

/// Validates the options, loads the base model and the data, and finds the checkpoint to
/// resume (refusing one whose settings do not fit), all before the output is touched.
fn setup(opts: &TrainOptions, dist: &Dist) -> Result<(LoadedModel, Dataset, Plan)> {
    opts.validate()?;
    crate::model::check_model_path(&opts.model)?;
    let kind = opts.kind()?;
    let device = dist.training_device(crate::device::from_flag(&opts.device)?);
    let tokenizer = Tokenizer::from_dir(&opts.model)?;
    let mut loaded = load_base(opts, kind, device)?;
    let vocab = loaded.model.info().vocab_size;
    let (dataset, stream) = if opts.stream {
        let (d, s) = load_stream(opts, &tokenizer, vocab)?;
        (d, Some(s))
    } else {
        (load_data(opts, &tokenizer, vocab)?, None)
    };
    let base_fp = fingerprint(&mut loaded);
    super::distributed::check_same_base(dist, &base_fp, &opts.model)?;
    let targets = match opts.targets()? {
        Some(t) => t,
        None => Targets::Names(loaded.arch.spec().lora_targets.clone()),
    };
    let data_fp = match &stream {
        Some(s) => s.fingerprint()?,
        None => fingerprint_data(&dataset),
    };
    let settings = RunSettings::of(opts, &targets, data_fp)?;
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
    let fan_in_fan_out = loaded.arch.fan_in_fan_out();
    let plan = Plan {
        device,
        kind,
        targets,
        settings,
        base_fp,
        fan_in_fan_out,
        checkpoint,
        stream,
    };
    Ok((loaded, dataset, plan))
}

/// Loads the base model (8-bit unless `--no-quantize`) and checks that the run's shapes fit
/// it and a micro-batch fits the device, before any batch is built or run.
fn load_base(opts: &TrainOptions, kind: Kind, device: Device) -> Result<LoadedModel> {
    let load = LoadOptions {
        arch: opts.arch.clone(),
        kind,
        device,
        quantize: (!opts.no_quantize).then(QuantizeOptions::default),
    };
    let loaded = load_model(&opts.model, &load)?;
    let info = loaded.model.info();
    if opts.seq_len > info.max_positions {
        return Err(OctetError::InvalidArgument(format!(
            "--seq-len {} is larger than the model's {} positions (config.json n_positions)",
            opts.seq_len, info.max_positions
        )));
    }
    if opts.lora_r > info.hidden {
        return Err(OctetError::InvalidArgument(format!(
            "--lora-r {}: larger than the model's hidden width {}",
            opts.lora_r, info.hidden
        )));
    }
    let (batch, seq) = (opts.batch_size, opts.seq_len);
    crate::memory::ensure_fits(
        &format!("a micro-batch of {batch} x {seq} tokens"),
        info.training_batch_bytes(batch, seq, !opts.no_checkpointing),
        device,
        "lower --batch-size or --seq-len (--grad-accum keeps the effective batch)",
    )?;
    Ok(loaded)
}

/// Tokenizes and splits the data (or reads `--eval-data` as the held-out set); every token id
/// must have a row in the model.
fn load_data(opts: &TrainOptions, tokenizer: &Tokenizer, vocab: usize) -> Result<Dataset> {
    let forced = opts.data_format()?;
    let format_of = |path: &Path| match &forced {
        Some(f) => Ok(f.clone()),
        None => DataFormat::detect(path),
    };
    let format = format_of(&opts.data)?;
    let eval_format = opts.eval_data.as_deref().map(format_of).transpose()?;
    let formats: Vec<&DataFormat> = std::iter::once(&format).chain(&eval_format).collect();
    let template = template_for(
        &formats,
        &opts.model,
        opts.chat_template.as_deref(),
        tokenizer,
    )?;
    let read = ReadOptions {
        format: Some(&format),
        template: template.as_ref(),
        train_on_prompt: opts.train_on_prompt,
        drop_long: opts.drop_long,
    };
    let (seq_len, seed) = (opts.seq_len, opts.seed);
    let mut dataset = match (&opts.eval_data, &eval_format) {
        (Some(eval), Some(f)) => {
            let mut d = Dataset::load_with(&opts.data, tokenizer, seq_len, 0.0, seed, &read)?;
            let read_eval = ReadOptions {
                format: Some(f),
                ..read
            };
            d.eval = load_sequences_with(eval, tokenizer, seq_len, &read_eval)?.0;
            d
        }
        _ => Dataset::load_with(
            &opts.data,
            tokenizer,
            seq_len,
            opts.eval_fraction,
            seed,
            &read,
        )?,
    };
    report_load(opts, &dataset);
    if opts.pack {
        let st = dataset.pack_train(pad_id(tokenizer));
        eprintln!(
            "packing: {} training records into {} sequences of {} tokens; padding {:.1}% -> {:.1}%",
            st.records,
            st.sequences,
            opts.seq_len,
            100.0 * st.padding_before,
            100.0 * st.padding_after
        );
    }
    if dataset.train.is_empty() {
        return Err(OctetError::bad_file(
            &opts.data,
            "no training sequences after the held-out split",
        ));
    }
    let all = dataset.train.iter().chain(&dataset.eval);
    crate::model::check_token_ids(
        all.flat_map(|s| &s.input_ids),
        vocab,
        &opts.data.display().to_string(),
    )?;
    Ok(dataset)
}

/// Indexes the data for streaming (`--stream`) and reads the held-out set (`--eval-data`,
/// or the held-out records).
fn load_stream(
    opts: &TrainOptions,
    tokenizer: &Tokenizer,
    vocab: usize,
) -> Result<(Dataset, Stream)> {
    let started = Instant::now();
    let forced = opts.data_format()?;
    let format = match &forced {
        Some(f) => f.clone(),
        None => DataFormat::detect(&opts.data)?,
    };
    if format == DataFormat::Text {
        return Err(OctetError::bad_file(
            &opts.data,
            "--stream reads JSON Lines (one record per line); plain text is read whole \
             (drop --stream)",
        ));
    }
    let eval_format = match &opts.eval_data {
        Some(p) => Some(match &forced {
            Some(f) => f.clone(),
            None => DataFormat::detect(p)?,
        }),
        None => None,
    };
    let template = template_for(
        &[&format],
        &opts.model,
        opts.chat_template.as_deref(),
        tokenizer,
    )?;
    let reader = Reader {
        format: format.clone(),
        tokenizer: tokenizer.clone(),
        template: template.map(std::sync::Arc::new),
        seq_len: opts.seq_len,
        train_on_prompt: opts.train_on_prompt,
        drop_long: opts.drop_long,
        pack: opts.pack,
        vocab,
    };
    let files = data_files(&opts.data)?;
    let fraction = if opts.eval_data.is_some() {
        0.0
    } else {
        opts.eval_fraction
    };
    let stream = Stream::open(&files, reader, fraction, opts.seed)?;
    let eval = match (&opts.eval_data, &eval_format) {
        (Some(p), Some(f)) => {
            let template =
                template_for(&[f], &opts.model, opts.chat_template.as_deref(), tokenizer)?;
            let read = ReadOptions {
                format: Some(f),
                template: template.as_ref(),
                train_on_prompt: opts.train_on_prompt,
                drop_long: opts.drop_long,
            };
            load_sequences_with(p, tokenizer, opts.seq_len, &read)?.0
        }
        _ => stream.eval_sequences()?,
    };
    crate::model::check_token_ids(
        eval.iter().flat_map(|s| &s.input_ids),
        vocab,
        "held-out data",
    )?;
    eprintln!(
        "data: {} as {format}, streamed: {} training records, {} held-out sequences ({} \
         indexed in {:.1}s)",
        opts.data.display(),
        stream.train_records(),
        eval.len(),
        crate::memory::human(stream.bytes()),
        started.elapsed().as_secs_f64()
    );
    let dataset = Dataset {
        train: Vec::new(),
        eval,
        stats: LoadStats::new(format, stream.train_records()),
        segments: None,
    };
    Ok((dataset, stream))
}

/// Says on stderr how the data was read and what was cut or dropped.
fn report_load(opts: &TrainOptions, dataset: &Dataset) {
    let st = &dataset.stats;
    let mut notes = Vec::new();
    if st.truncated > 0 {
        notes.push(format!(
            "{} cut to --seq-len {} (--drop-long drops them instead)",
            st.truncated, opts.seq_len
        ));
    }
    if st.dropped_long > 0 {
        notes.push(format!(
            "{} longer than --seq-len {} dropped",
            st.dropped_long, opts.seq_len
        ));
    }
    if st.dropped > 0 {
        notes.push(format!("{} without a trained token dropped", st.dropped));
    }
    let trained_on = match st.format.record_kind() {
        Some(_) if opts.train_on_prompt => ", loss on every token",
        Some(_) => ", loss on the assistant's tokens",
        None => "",
    };
    eprintln!(
        "data: {} as {} ({} records{trained_on}){}",
        opts.data.display(),
        st.format,
        st.documents,
        if notes.is_empty() {
            String::new()
        } else {
            format!("; records {}", notes.join(", "))
        }
    );
}

/// Where a run starts: its checkpoint's adapters and data position, or fresh adapters.
struct Start {
    step: usize,
    batcher: DataOrder,
    wrapped: Vec<String>,
    resumed: Option<RunState>,
    resumed_from: Option<PathBuf>,
}

/// Attaches fresh adapters, or restores the checkpoint's after checking that it was trained
/// on this base with this rank.
fn begin(
    model: &mut dyn CausalLm,
    opts: &TrainOptions,
    plan: &mut Plan,
    train_len: usize,
    world: usize,
) -> Result<Start> {
    let global_batch = opts.batch_size * world;
    let checkpoint = plan.checkpoint.take();
    let order = |state: Option<BatcherState>| -> Result<DataOrder> {
        let state = state.unwrap_or(BatcherState {
            epoch: 0,
            cursor: 0,
            seed: opts.seed,
            within: 0,
        });
        Ok(match &plan.stream {
            Some(s) => DataOrder::Streamed(s.batches(state, global_batch)?),
            None => DataOrder::Memory(Batcher::restore(state, train_len, global_batch)?),
        })
    };
    // Every rank walks the global batch (world x batch size) and keeps its slice of it.
    tch::manual_seed(opts.seed as i64);
    let Some((sdir, st)) = checkpoint else {
        let wrapped = attach_lora(model, &plan.targets, opts.lora())?;
        train_extras(model, opts.train_norms, opts.train_biases);
        let batcher = order(None)?;
        return Ok(Start {
            step: 0,
            batcher,
            wrapped,
            resumed: None,
            resumed_from: None,
        });
    };
    let p = sdir.join(STATE_FILE);
    if st.base_fingerprint != plan.base_fp {
        let why = format!(
            "this run was trained on another base model ({}); refusing to resume onto {}",
            st.base,
            opts.model.display()
        );
        return Err(OctetError::bad_file(&p, why));
    }
    if st.r != opts.lora_r {
        let why = format!(
            "this run has LoRA rank {}, not --lora-r {}",
            st.r, opts.lora_r
        );
        return Err(OctetError::bad_file(&p, why));
    }
    load_adapter(model, &sdir)?;
    train_extras(model, st.train_norms, st.train_biases);
    Ok(Start {
        step: st.step,
        batcher: order(Some(st.batcher))?,
        wrapped: st.targets.clone(),
        resumed: Some(st),
        resumed_from: Some(sdir),
    })
}

/// Loads an optimizer's saved state from `path`.
fn restore_optimizer(optimizer: &mut dyn Optimizer, path: &Path) -> Result<()> {
    let store = SafetensorsFile::open(path)?;
    let state: Vec<(String, Tensor)> = store
        .names()
        .into_iter()
        .map(|n| Ok((n.clone(), store.tensor(&n)?)))
        .collect::<Result<_>>()?;
    optimizer
        .load_state_dict(&state)
        .map_err(|e| OctetError::bad_file(path, e.to_string()))
}

/// metrics.jsonl of the run folder, opened for appending after the lines past `step`.
fn open_metrics(out_dir: &Path, step: usize) -> Result<(PathBuf, std::fs::File)> {
    let path = out_dir.join(METRICS_FILE);
    keep_metrics_through(&path, step)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| OctetError::io(&path, e))?;
    Ok((path, file))
}

fn progress_bar(opts: &TrainOptions, step: usize, main: bool) -> indicatif::ProgressBar {
    let pb = if opts.progress && main {
        indicatif::ProgressBar::new(opts.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(step as u64);
    pb
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A run in progress: the model with its adapters, the optimizer, and where output goes.
struct Run<'a> {
    opts: &'a TrainOptions,
    /// This rank's place in the run (one rank: every collective is a no-op).
    dist: &'a Dist,
    /// The loss of a micro-batch on this rank was not finite (a data-parallel run stops all
    /// ranks together at the end of the step).
    nonfinite: bool,
    model: &'a mut dyn CausalLm,
    device: Device,
    params: Vec<Tensor>,
    optimizer: Box<dyn Optimizer>,
    adapter_cfg: AdapterConfig,
    schedule: LrSchedule,
    /// The state saved with each checkpoint, but for its step and data position.
    state: RunState,
    batcher: DataOrder,
    step: usize,
    /// The locked run folder (rank 0 alone writes).
    output: Option<InPlaceOutput>,
    metrics: Option<(PathBuf, std::fs::File)>,
    peak_gpu: Option<u64>,
    pb: indicatif::ProgressBar,
}

impl<'a> Run<'a> {
    /// Opens the output (once the settings, checkpoint and targets are known good, so a
    /// refused run writes nothing) and builds the optimizer, with its saved state on resume.
    fn prepare(
        opts: &'a TrainOptions,
        dist: &'a Dist,
        model: &'a mut dyn CausalLm,
        plan: Plan,
        start: Start,
    ) -> Result<Self> {
        let output = dist.is_main().then(|| open_output(opts)).transpose()?;
        model.visit_layers(&mut |_, l| l.set_training(true));
        if plan.kind != Kind::Float {
            model.store_frozen_in(plan.kind);
        }
        let params: Vec<Tensor> = trainable_tensors(model)
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        // Rank 0's adapters (fresh or resumed) are everyone's.
        dist.broadcast_all(&params, 0)?;
        let resumed = start.resumed.as_ref();
        let optim = resumed.map_or(opts.optim, |st| st.optim);
        let copies = params.iter().map(|p| p.shallow_clone()).collect();
        let mut optimizer = build_optimizer(optim, copies, opts.weight_decay, plan.device)?;
        if let Some(sdir) = &start.resumed_from {
            restore_optimizer(optimizer.as_mut(), &sdir.join(OPTIMIZER_FILE))?;
        }
        let base = opts.model.display().to_string();
        let train_biases = opts.train_biases || resumed.is_some_and(|st| st.train_biases);
        let mut adapter_cfg = AdapterConfig::new(opts.lora(), &plan.targets, &base, train_biases);
        adapter_cfg.fan_in_fan_out = plan.fan_in_fan_out;
        let state = RunState {
            step: start.step,
            batcher: start.batcher.state(),
            seed: opts.seed,
            base,
            base_fingerprint: plan.base_fp,
            r: opts.lora_r,
            targets: start.wrapped,
            optim,
            train_norms: opts.train_norms || resumed.is_some_and(|st| st.train_norms),
            train_biases: adapter_cfg.bias == "all",
            settings: Some(plan.settings),
            files: Default::default(),
        };
        Ok(Run {
            schedule: LrSchedule::new(opts.schedule, opts.lr, opts.warmup, opts.steps)?,
            metrics: match &output {
                Some(o) => Some(open_metrics(o.path(), start.step)?),
                None => None,
            },
            pb: progress_bar(opts, start.step, dist.is_main()),
            opts,
            dist,
            nonfinite: false,
            model,
            device: plan.device,
            params,
            optimizer,
            adapter_cfg,
            state,
            batcher: start.batcher,
            step: start.step,
            output,
            peak_gpu: None,
        })
    }

    /// Saves a checkpoint of the current step with data position `batcher` (rank 0), then
    /// waits for every rank, so none runs ahead of a checkpoint being written.
    fn save(&mut self, batcher: BatcherState) -> Result<()> {
        self.write_checkpoint(batcher)?;
        self.dist.barrier()
    }

    /// Rank 0 writes a checkpoint of the current step with data position `batcher`.
    fn write_checkpoint(&mut self, batcher: BatcherState) -> Result<()> {
        let Some(output) = &self.output else {
            return Ok(());
        };
        let state = RunState {
            step: self.step,
            batcher,
            ..self.state.clone()
        };
        let (model, optimizer) = (&mut *self.model, self.optimizer.as_ref());
        save_checkpoint(model, optimizer, &self.adapter_cfg, &state, output.path())
    }

    /// One optimizer step: its micro-batches, clipping and update, then evaluation and
    /// logging as they fall due.
    fn advance(&mut self, data: &Dataset) -> Result<StepMetrics> {
        let opts = self.opts;
        let started = Instant::now();
        let batcher_before = self.batcher.state();
        self.optimizer.zero_grad();
        // All of the step's micro-batches are drawn first: the loss is the mean over the
        // labelled tokens of the whole step on every rank, so each is weighted by its share of
        // them (see `micro_batch_weights`) and the ranks' gradients are then summed.
        let (rank, world) = (self.dist.rank(), self.dist.world());
        let batches: Vec<Batch> = (0..opts.grad_accum)
            .map(|_| self.batcher.next_shard(data, rank, world))
            .collect::<Result<_>>()?;
        // Positions that hold a record, for the packing efficiency.
        let filled: i64 = batches
            .iter()
            .filter_map(|b| b.segment_ids.as_ref())
            .map(|s| s.ne(0).sum(Kind::Int64).int64_value(&[]))
            .sum();
        let counts: Vec<i64> = batches
            .iter()
            .map(|b| labelled_positions(&b.labels))
            .collect();
        let local = counts.iter().sum::<i64>() as f64;
        let total = self.dist.all_reduce_f64(&[local], ReduceOp::Sum)?[0] as i64;
        let weights = micro_batch_weights(&counts, total);
        let mut loss_sum = 0.0;
        for (micro, (batch, w)) in batches.into_iter().zip(weights).enumerate() {
            if w > 0.0 {
                loss_sum += w * self.micro_batch(batch, micro, w, batcher_before)?;
            }
        }
        // One gradient on every rank, so clipping sees one norm and every optimizer one update.
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.grad()).collect();
        self.dist.sum_all(&grads)?;
        let grad_norm = clip_grad_norm(&self.params, opts.max_grad_norm);
        let lr = self.schedule.lr(self.step);
        self.optimizer.step(lr)?;
        self.step += 1;
        let tokens = (opts.batch_size * opts.seq_len * opts.grad_accum) as f64;
        // Each rank holds its token-weighted share of the step's loss; speeds add up.
        let secs = started.elapsed().as_secs_f64();
        let speed = tokens / secs;
        let summed = self
            .dist
            .all_reduce_f64(&[loss_sum, speed, filled as f64], ReduceOp::Sum)?;
        let (loss, tokens_per_s) = (summed[0], summed[1]);
        let world = self.dist.world();
        let positions = (world * opts.batch_size * opts.seq_len * opts.grad_accum) as f64;
        let mut m = StepMetrics {
            step: self.step,
            loss,
            lr,
            tokens_per_s,
            trained_tokens_per_s: total as f64 / secs,
            grad_norm,
            eval_loss: None,
            peak_gpu_mib: self.track_gpu_memory(),
            world_size: (world > 1).then_some(world),
            packing_efficiency: opts.pack.then(|| summed[2] / positions),
        };
        if (opts.eval_every > 0 && self.step.is_multiple_of(opts.eval_every))
            || self.step == opts.steps
        {
            m.eval_loss = self.evaluate_sharded(&data.eval)?;
            if let Some(e) = m.eval_loss.filter(|e| !e.is_finite()) {
                self.pb.abandon();
                return Err(OctetError::InvalidArgument(format!(
                    "the held-out loss became {e} at step {}; stopping (the last good \
                     checkpoint in {} is kept)",
                    self.step,
                    opts.out.display()
                )));
            }
        }
        self.log(&m)?;
        Ok(m)
    }

    /// Forward and backward of one micro-batch, its gradient scaled by `weight`; returns its
    /// mean loss. Running out of memory saves the last good checkpoint (data position `before`
    /// the step) and names the flags to lower.
    fn micro_batch(
        &mut self,
        batch: Batch,
        micro: usize,
        weight: f64,
        before: BatcherState,
    ) -> Result<f64> {
        let opts = self.opts;
        let rank = self.dist.rank();
        // Built on the host, copied to the device once per micro-batch.
        let ids = batch.input_ids.to_device(self.device);
        let labels = batch.labels.to_device(self.device);
        // Positions and the block-diagonal mask are built where the model runs.
        let packing = batch
            .segment_ids
            .map(|s| Packing::from_segments(&s.to_device(self.device)))
            .transpose()?;
        let micro_id = (self.step * opts.grad_accum + micro) as u64;
        let model = &*self.model;
        let seed = super::distributed::rank_seed(opts.seed, rank);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            forward_backward_with(
                model,
                &ids,
                &labels,
                packing.as_ref(),
                weight,
                !opts.no_checkpointing,
                seed,
                micro_id,
            )
        }));
        let loss = match run {
            Ok(loss) => loss?,
            Err(panic) => {
                if !is_out_of_memory(&panic_message(&*panic)) {
                    std::panic::resume_unwind(panic);
                }
                return Err(self.out_of_memory(before)?);
            }
        };
        if !loss.is_finite() && self.dist.world() > 1 {
            // Every rank learns of it in the step's stop vote and stops with it.
            self.nonfinite = true;
        } else if !loss.is_finite() {
            self.pb.abandon();
            return Err(OctetError::InvalidArgument(format!(
                "the loss became {loss} at step {}; stopping (the last good checkpoint in {} is kept)",
                self.step + 1,
                opts.out.display()
            )));
        }
        Ok(loss)
    }

    /// The error for running out of memory, after saving the last completed step.
    fn out_of_memory(&mut self, before: BatcherState) -> Result<OctetError> {
        let opts = self.opts;
        self.pb.abandon();
        self.optimizer.zero_grad();
        let step = self.step;
        let kept = if step > 0 {
            // No barrier: the other ranks are not at a checkpoint.
            self.write_checkpoint(before)?;
            format!(
                "the last good checkpoint (step {step}) is saved in {}; continue it with --resume {}",
                opts.out.display(),
                opts.out.display()
            )
        } else {
            "no step had completed, so nothing was saved".to_string()
        };
        Ok(OctetError::InvalidArgument(format!(
            "{} ran out of memory in step {} (batch size {}, seq len {}): {kept}. \
             Lower --batch-size or --seq-len; raising --grad-accum keeps the \
             effective batch of {} sequences",
            crate::device::name(self.device),
            step + 1,
            opts.batch_size,
            opts.seq_len,
            opts.batch_size * opts.grad_accum
        )))
    }

    /// The step's stop vote: one MAX all-reduce of what this rank saw (a non-finite loss,
    /// Ctrl-C, `--stop-after`), so that every rank stops at the same step, none waiting
    /// forever for another.
    fn agree_on_stop(&mut self, stop_after: bool) -> Result<StopReason> {
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        let mine = [self.nonfinite, interrupted, stop_after]
            .iter()
            .position(|&b| b)
            .map_or(0.0, |i| (3 - i) as f64);
        let agreed = self.dist.all_reduce_f64(&[mine], ReduceOp::Max)?[0];
        match agreed as u8 {
            3 => {
                self.pb.abandon();
                Err(OctetError::InvalidArgument(format!(
                    "the loss became non-finite on a rank at step {}; stopping (the last good \
                     checkpoint in {} is kept)",
                    self.step,
                    self.opts.out.display()
                )))
            }
            2 => Ok(StopReason::Interrupted),
            1 => Ok(StopReason::StopAfter),
            _ => Ok(StopReason::Finished),
        }
    }

    /// Held-out loss, each rank evaluating its contiguous share of the held-out set and the
    /// (nll sum, token count) pairs added up.
    fn evaluate_sharded(&mut self, eval: &[Sequence]) -> Result<Option<f64>> {
        let (rank, world) = (self.dist.rank(), self.dist.world());
        let bs = self.opts.batch_size;
        if world == 1 {
            return evaluate(&mut *self.model, eval, bs);
        }
        let share = &eval[eval.len() * rank / world..eval.len() * (rank + 1) / world];
        let (nll, n) = evaluate_sums(&mut *self.model, share, bs)?;
        let total = self.dist.all_reduce_f64(&[nll, n as f64], ReduceOp::Sum)?;
        Ok((total[1] > 0.0).then(|| total[0] / total[1]))
    }

    /// The GPU memory high-water mark so far, in MiB; `None` off a GPU.
    fn track_gpu_memory(&mut self) -> Option<f64> {
        let Device::Cuda(n) = self.device else {
            return None;
        };
        let used = crate::device::used_bytes(n)?;
        let peak = self.peak_gpu.map_or(used, |p| p.max(used));
        self.peak_gpu = Some(peak);
        Some(mib(peak))
    }

    /// Appends the step to metrics.jsonl when due and moves the progress bar.
    fn log(&mut self, m: &StepMetrics) -> Result<()> {
        let (step, opts) = (self.step, self.opts);
        if step.is_multiple_of(opts.log_every.max(1)) || m.eval_loss.is_some() || step == opts.steps
        {
            let line =
                serde_json::to_string(m).map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
            if let Some((path, file)) = &mut self.metrics {
                writeln!(file, "{line}").map_err(|e| OctetError::io(&*path, e))?;
            }
        }
        self.pb.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        ));
        self.pb.set_position(step as u64);
        Ok(())
    }
}

fn train_run(opts: &TrainOptions, dist: &Dist) -> Result<TrainSummary> {
    let (mut loaded, dataset, mut plan) = setup(opts, dist)?;
    let model = loaded.model.as_mut();
    let start = begin(
        &mut *model,
        opts,
        &mut plan,
        dataset.train.len(),
        dist.world(),
    )?;
    let mut run = Run::prepare(opts, dist, model, plan, start)?;
    install_interrupt_handler();
    INTERRUPTED.store(false, Ordering::SeqCst);
    let mut metrics = Vec::new();
    let mut stop = StopReason::Finished;
    let mut last_eval = None;
    let at_stop_after =
        |step: usize| opts.stop_after.is_some_and(|n| step >= n) && step < opts.steps;
    if at_stop_after(run.step) {
        // A resumed run already at its --stop-after: nothing to do, nothing to save.
        stop = StopReason::StopAfter;
    }
    while run.step < opts.steps && stop == StopReason::Finished {
        let m = run.advance(&dataset)?;
        last_eval = m.eval_loss.or(last_eval);
        metrics.push(m);
        super::distributed::crash_for_test(dist, run.step);
        stop = run.agree_on_stop(at_stop_after(run.step))?;
        let step = run.step;
        if (opts.save_every > 0 && step.is_multiple_of(opts.save_every))
            || step == opts.steps
            || stop != StopReason::Finished
        {
            run.save(run.batcher.state())?;
        }
    }
    run.pb.finish_and_clear();
    if dist.world() > 1 {
        // Every rank says what it holds: equal digests are ranks in step.
        let digest = super::distributed::digest(&run.params);
        let line = format!(
            "rank {} of {}: adapter digest {digest}\n",
            dist.rank(),
            dist.world()
        );
        // One write (shorter than a pipe's atomic size), so ranks sharing a pipe or terminal
        // never interleave inside the line; `eprintln!` writes its pieces separately.
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
    Ok(TrainSummary {
        steps: run.step,
        metrics,
        eval_loss: last_eval,
        trainable_params: run.params.iter().map(|p| p.numel()).sum(),
        optimizer_bytes: run.optimizer.state_bytes(),
        stop,
        targets: run.state.targets.clone(),
        peak_gpu_mib: run.peak_gpu.map(mib),
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
