//! `octet convert`: a Hugging Face checkpoint to octet's 8-bit format, streamed tensor by
//! tensor so that peak memory is bounded by a few times the largest tensor.
use crate::calibrate::{
    calibration_rows, CalibratedWeight, Calibration, CalibrationOptions, CalibrationText,
};
use crate::error::{OctetError, Result};
use crate::io::safetensors::SafetensorsWriter;
use crate::io::{dtype, Dtype, TensorStore};
use crate::load::{choose_code, QuantizeOptions};
use crate::manifest::{CalibrationRecord, FourBitRecord, Manifest, SourceFile, TensorError};
use crate::nn::q4::{FourBitOptions, Q4Weight};
use crate::nn::q8::Q8Weight;
use crate::nn::{kinds, ModuleGraph, Node};
use crate::outdir::OutputDir;
use crate::quant::double_quant::{self as dq, DoubleQuantized};
use crate::quant::{BlockSize, CodeKind, QuantError};
use crate::source::ModelSource;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Options of [`convert`].
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// `auto` or a registry name.
    pub arch: String,
    /// Block size, code and extra skips.
    pub quantize: QuantizeOptions,
    /// Replace a non-empty output folder.
    pub force: bool,
    /// Start a new shard above this many bytes.
    pub shard_bytes: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Keep NaN/Inf in tensors that stay in float instead of refusing the source.
    pub allow_nonfinite: bool,
    /// Store Linear weights in 4 bits (`--bits 4`).
    pub four_bit: Option<FourBitOptions>,
    /// Round 8-bit weights with GPTQ against a calibration text (`--calibrate`).
    pub calibrate: Option<CalibrationOptions>,
}

/// What a conversion stores by default: the linear code in blocks of 64 with double-quantized
/// scales (8.13 bits per weight), rounded with GPTQ against the built-in calibration text. On
/// SmolLM2-135M that is the one 8-bit scheme measured within 0.15% perplexity of the float
/// model on both quality texts (README, "8-bit codes").
impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            arch: "auto".into(),
            quantize: QuantizeOptions {
                block: Some(BlockSize::new(64).expect("64 is a block size")),
                code: CodeKind::Linear,
                double_quant: true,
                ..Default::default()
            },
            force: false,
            shard_bytes: 2 << 30,
            progress: false,
            allow_nonfinite: false,
            four_bit: None,
            calibrate: Some(CalibrationOptions::default()),
        }
    }
}

/// One row of the conversion summary.
#[derive(Clone, Debug)]
pub struct ConvertedTensor {
    /// Tensor name.
    pub name: String,
    /// Bytes read.
    pub bytes_in: usize,
    /// Bytes written (weight + absmax + code for quantized tensors).
    pub bytes_out: usize,
    /// Error, for quantized tensors.
    pub error: Option<QuantError>,
    /// The code kind, for quantized tensors.
    pub code: Option<CodeKind>,
    /// Rounded with GPTQ against the calibration text rather than to nearest.
    pub calibrated: bool,
}

/// What a conversion did.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    /// The output folder.
    pub out: PathBuf,
    /// The architecture used.
    pub arch: String,
    /// Per-tensor rows, in write order.
    pub tensors: Vec<ConvertedTensor>,
    /// Shard files written.
    pub shards: Vec<String>,
    /// Things the user should know about the result (a missing tokenizer).
    pub warnings: Vec<String>,
    /// Calibration tokens used, when calibrated.
    pub calibration_tokens: Option<usize>,
}

impl ConvertReport {
    /// Total bytes read.
    pub fn bytes_in(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes_in).sum()
    }
    /// Total bytes written.
    pub fn bytes_out(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes_out).sum()
    }
    /// Mean and max relative MSE over quantized tensors.
    pub fn error_summary(&self) -> (usize, f64, f64) {
        let errs: Vec<f64> = self
            .tensors
            .iter()
            .filter_map(|t| t.error.map(|e| e.rel_mse()))
            .collect();
        let mean = if errs.is_empty() {
            0.0
        } else {
            errs.iter().sum::<f64>() / errs.len() as f64
        };
        (errs.len(), mean, errs.iter().cloned().fold(0.0, f64::max))
    }
}

fn plan_shards(
    tensors: &[(String, Dtype, Vec<usize>)],
    limit: usize,
) -> Vec<Vec<(String, Dtype, Vec<usize>)>> {
    let mut shards: Vec<Vec<_>> = vec![Vec::new()];
    let mut size = 0usize;
    for t in tensors {
        let n = t.2.iter().product::<usize>() * t.1.size();
        if size > 0 && size + n > limit {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards
            .last_mut()
            .expect("one shard at least")
            .push(t.clone());
    }
    shards
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

/// Converts the checkpoint in `model` into an octet folder at `out`.
pub fn convert(model: &Path, out: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    if let Some(CalibrationText::File(path)) = opts.calibrate.as_ref().map(|c| &c.text) {
        if opts.four_bit.is_some() {
            return Err(OctetError::InvalidArgument(
                "--calibrate rounds 8-bit weights; it does not combine with --bits 4".into(),
            ));
        }
        std::fs::metadata(path).map_err(|e| OctetError::io(path, e))?;
    }
    let source = ModelSource::open(model, &opts.arch)?;
    let outdir = OutputDir::create(out, opts.force, &[model])?;
    let mut graph = source.graph.clone();
    // 4-bit modules are made from the 8-bit plan, so their scales are double-quantized after.
    let mut quantize = opts.quantize.clone();
    quantize.double_quant &= opts.four_bit.is_none();
    let (block, replaced) = quantize.apply(&mut graph, source.arch.spec());
    if let Some(fb) = opts.four_bit {
        crate::nn::q4::to_four_bit(&mut graph, &replaced, fb.block);
        if opts.quantize.double_quant {
            graph.double_quantize_absmax(&replaced);
        }
    }
    // Hashing the sources is I/O-bound; it overlaps the conversion on its own thread.
    let paths = source.source_paths()?;
    let hashing = std::thread::spawn(move || {
        paths
            .iter()
            .map(|p| SourceFile::describe(p))
            .collect::<Result<Vec<_>>>()
    });
    // Side files first: calibration reads the tokenizer from them.
    source.write_side_files(outdir.path())?;
    let mut warnings = Vec::new();
    // 4-bit weights are never calibrated, nor weights already 8-bit in the source; the
    // built-in text needs the model's tokenizer.
    let calibrate_with = opts
        .calibrate
        .as_ref()
        .filter(|_| opts.four_bit.is_none() && !replaced.is_empty());
    let calibration = match calibrate_with {
        Some(c) if c.text == CalibrationText::Builtin && !has_tokenizer(outdir.path()) => {
            warnings.push(format!(
                "{} has no tokenizer, so the 8-bit weights were rounded to nearest instead of \
                 against the built-in calibration text",
                model.display()
            ));
            None
        }
        Some(c) => match calibrate(model, &source, block, opts, c, outdir.path()) {
            Ok(done) => Some(done),
            // The built-in text is only a default: a model it does not suit (a tokenizer
            // that is not the model's, activations that are not finite) is still converted,
            // and whatever is wrong with the source is reported as without calibration.
            Err(e) if c.text == CalibrationText::Builtin => {
                warnings.push(format!(
                    "calibrating on the built-in text failed, so the 8-bit weights were \
                     rounded to nearest: {e}"
                ));
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let calibration_tokens = calibration.as_ref().map(|c| c.tokens);
    let calibrated = calibration.map(|c| c.weights).unwrap_or_default();
    let (rows, shard_names) =
        write_weights(&source, &graph, block, opts, calibrated, outdir.path())?;
    if !has_tokenizer(outdir.path()) {
        warnings.push(format!(
            "{} has no tokenizer (tokenizer.json or vocab.json + merges.txt): eval, generate \
             and train of {} need one copied into it",
            model.display(),
            out.display()
        ));
    }
    let manifest = Manifest {
        format_version: crate::manifest::required_version(crate::manifest::graph_features(
            &graph,
            opts.quantize.code,
        )),
        arch: source.arch.name().to_string(),
        block_size: block.get() as i64,
        code: opts.quantize.code,
        four_bit: opts.four_bit.map(|fb| FourBitRecord {
            bits: 4,
            code: fb.code,
            block_size: fb.block as i64,
        }),
        octet_version: env!("CARGO_PKG_VERSION").to_string(),
        source: hashing.join().map_err(|_| {
            OctetError::InvalidArgument("hashing the source files panicked".into())
        })??,
        tensors: rows
            .iter()
            .filter_map(|r| {
                r.error.map(|e| TensorError {
                    name: r.name.clone(),
                    rel_mse: e.rel_mse(),
                    max_abs_err: e.max_abs_err,
                    code: r.code,
                    calibrated: r.calibrated,
                })
            })
            .collect(),
        calibration: match (calibrate_with, calibration_tokens) {
            (Some(c), Some(tokens)) => Some(CalibrationRecord {
                data: c.describe()?,
                tokens,
                weights: rows.iter().filter(|r| r.calibrated).count(),
            }),
            _ => None,
        },
    };
    manifest.write(outdir.path())?;
    let out = outdir.commit()?;
    Ok(ConvertReport {
        out,
        arch: source.arch.name().to_string(),
        tensors: rows,
        shards: shard_names,
        warnings,
        calibration_tokens,
    })
}

/// Rounds the 8-bit weights of the model at `model` with GPTQ against `c`'s text, tokenized
/// with the tokenizer already written to `dir` (see [`crate::calibrate`]).
fn calibrate(
    model: &Path,
    source: &ModelSource,
    block: BlockSize,
    opts: &ConvertOptions,
    c: &CalibrationOptions,
    dir: &Path,
) -> Result<Calibration> {
    // In memory the scales are plain f32 whatever is stored; the model only feeds the
    // calibration activations forward.
    let quantize = QuantizeOptions {
        double_quant: false,
        ..opts.quantize.clone()
    };
    let mut loaded = crate::load::load_model(
        model,
        &crate::load::LoadOptions {
            arch: opts.arch.clone(),
            quantize: Some(quantize),
            ..Default::default()
        },
    )?;
    let rows = calibration_rows(c, dir, loaded.model.info().max_positions)?;
    let pb = if opts.progress {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} blocks calibrated",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let nearest = |name: &str| quantize_tensor(source.store.as_ref(), name, block, &opts.quantize);
    crate::calibrate::calibrate(
        loaded.model.as_mut(),
        &rows,
        source.store.as_ref(),
        &source.graph,
        block,
        &nearest,
        &pb,
    )
}

/// Writes the converted weights of `graph` into `dir`, in shards of at most
/// `opts.shard_bytes` (with an index when there are several); returns the per-tensor rows and
/// the shard names.
fn write_weights(
    source: &ModelSource,
    graph: &ModuleGraph,
    block: BlockSize,
    opts: &ConvertOptions,
    calibrated: HashMap<String, CalibratedWeight>,
    dir: &Path,
) -> Result<(Vec<ConvertedTensor>, Vec<String>)> {
    // Module index and parameter name of each planned tensor.
    let owner: HashMap<String, (usize, String)> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.params
                .iter()
                .map(move |p| (n.tensor_name(&p.name), (i, p.name.clone())))
        })
        .collect();
    let shards = plan_shards(&graph.tensor_plan(), opts.shard_bytes);
    let shard_names: Vec<String> = if shards.len() == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=shards.len())
            .map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len()))
            .collect()
    };
    let meta = [
        ("format".to_string(), "pt".to_string()),
        ("octet_arch".to_string(), source.arch.name().to_string()),
    ];
    let mut conv = TensorConverter {
        store: source.store.as_ref(),
        opts,
        block,
        pb: progress_bar(opts.progress, source.graph.nbytes() as u64),
        rows: Vec::new(),
        pending: None,
        calibrated,
    };
    for (shard, file) in shards.iter().zip(&shard_names) {
        let mut w = SafetensorsWriter::create(&dir.join(file), shard, &meta)?;
        for (name, _, _) in shard {
            let (i, pname) = &owner[name];
            conv.write(
                &mut w,
                name,
                &source.graph.nodes[*i],
                &graph.nodes[*i],
                pname,
            )?;
            conv.store.release(name);
        }
        w.finish()?;
    }
    conv.pb.finish_and_clear();
    if shards.len() > 1 {
        write_index(dir, &shards, &shard_names)?;
    }
    Ok((conv.rows, shard_names))
}

/// Writes a conversion's tensors one by one: quantized, with its absmax and code, or copied.
struct TensorConverter<'a> {
    store: &'a dyn TensorStore,
    opts: &'a ConvertOptions,
    block: BlockSize,
    pb: indicatif::ProgressBar,
    rows: Vec<ConvertedTensor>,
    /// The scales and code of the current module's quantized weight, written as its tensors
    /// come up.
    pending: Option<PendingScales>,
    /// Weights already rounded with GPTQ, by tensor name, taken as they are written.
    calibrated: HashMap<String, CalibratedWeight>,
}

/// The scales and code of a module whose quantized weight was just written.
struct PendingScales {
    /// The module's path.
    path: String,
    /// One f32 scale per block (written when `double` is `None`).
    absmax: Vec<f32>,
    /// The scales in stored double-quantized form, when asked for.
    double: Option<DoubleQuantized>,
    /// The code's values.
    code: Vec<f32>,
}

impl TensorConverter<'_> {
    /// Writes tensor `name`, parameter `pname` of stored module `s`, as output module `t`.
    fn write(
        &mut self,
        w: &mut SafetensorsWriter,
        name: &str,
        s: &Node,
        t: &Node,
        pname: &str,
    ) -> Result<()> {
        let rep = (s.kind != t.kind)
            .then(|| kinds::replacement_for(&s.kind))
            .flatten();
        if t.kind == crate::nn::q4::KIND && pname == "weight" {
            let fb = self.opts.four_bit.unwrap_or_default();
            let double_quant = self.opts.quantize.double_quant;
            let (q, double, err) = quantize_tensor4(self.store, name, s, fb, double_quant)?;
            let bytes_in = s.param(pname).map_or(0, |p| p.nbytes());
            let packed = Vec::<u8>::try_from(&q.packed)?;
            w.write(name, &packed)?;
            let absmax = Vec::<f32>::try_from(&q.absmax)?;
            let scale_bytes = double.as_ref().map_or(4 * absmax.len(), |d| d.nbytes());
            self.rows.push(ConvertedTensor {
                name: name.to_string(),
                bytes_in,
                bytes_out: packed.len() + scale_bytes + 4 * crate::quant::CODE4_LEN,
                error: Some(err),
                code: None,
                calibrated: false,
            });
            self.pb.inc(bytes_in as u64);
            self.pending = Some(PendingScales {
                path: t.path.clone(),
                absmax,
                double,
                code: q.code.values().to_vec(),
            });
            return Ok(());
        }
        if rep.is_some_and(|r| r.quantized_param == pname) {
            let calibrated = self.calibrated.remove(name);
            let was_calibrated = calibrated.is_some();
            let (out, code) = match calibrated {
                Some(c) => c.into_output()?,
                None => quantize_tensor(self.store, name, self.block, &self.opts.quantize)?,
            };
            let bytes_in = s.param(pname).map_or(0, |p| p.nbytes());
            w.write(name, &out.q)?;
            let scale_bytes = match &out.double {
                Some(d) => d.nbytes(),
                None => 4 * out.absmax.len(),
            };
            self.rows.push(ConvertedTensor {
                name: name.to_string(),
                bytes_in,
                bytes_out: out.q.len() + scale_bytes + 4 * code.len(),
                error: out.error,
                code: Some(self.opts.quantize.code),
                calibrated: was_calibrated,
            });
            self.pb.inc(bytes_in as u64);
            self.pending = Some(PendingScales {
                path: t.path.clone(),
                absmax: out.absmax,
                double: out.double,
                code,
            });
            return Ok(());
        }
        if let Some(q) = &self.pending {
            if q.path == t.path {
                let f32s = |vals: &[f32]| -> Vec<u8> {
                    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
                };
                let bytes = match (pname, &q.double) {
                    ("absmax", None) => Some(f32s(&q.absmax)),
                    ("code", _) => Some(f32s(&q.code)),
                    (dq::STORED_Q, Some(d)) => Some(d.q.clone()),
                    (dq::STORED_SCALE, Some(d)) => Some(f32s(&d.group_absmax)),
                    (dq::STORED_OFFSET, Some(d)) => Some(f32s(&[d.offset])),
                    _ => None,
                };
                if let Some(bytes) = bytes {
                    return w.write(name, &bytes);
                }
            }
        }
        if pname == "absmax" || pname == "code" {
            // Already 8-bit in the source: copied as stored, once its values are known to
            // load back.
            let b = self.store.bytes(name)?;
            check_stored_8bit(self.store, name, pname, &b)?;
            return self.copy(w, name, &b);
        }
        let b = self.store.bytes(name)?;
        if !self.opts.allow_nonfinite {
            let dtype = s.param(pname).map_or(Dtype::U8, |p| p.dtype);
            crate::validate::check_finite(name, dtype, &b).map_err(|m| {
                OctetError::bad_file(
                    self.store.path(),
                    format!("{m} (pass --allow-nonfinite to keep it)"),
                )
            })?;
        }
        self.copy(w, name, &b)
    }

    /// Writes a tensor's stored bytes unchanged.
    fn copy(&mut self, w: &mut SafetensorsWriter, name: &str, b: &[u8]) -> Result<()> {
        w.write(name, b)?;
        self.rows.push(ConvertedTensor {
            name: name.to_string(),
            bytes_in: b.len(),
            bytes_out: b.len(),
            error: None,
            code: None,
            calibrated: false,
        });
        self.pb.inc(b.len() as u64);
        Ok(())
    }
}

/// Whether `dir` holds a tokenizer octet can read.
fn has_tokenizer(dir: &Path) -> bool {
    dir.join("tokenizer.json").is_file()
        || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
}

/// Checks the absmax or code of a weight that is already 8-bit in the source (the GPT-J
/// 8-bit .bin) before it is copied: what is written must load back.
fn check_stored_8bit(store: &dyn TensorStore, name: &str, pname: &str, bytes: &[u8]) -> Result<()> {
    let bad = |m: String| OctetError::bad_file(store.path(), m);
    let meta = store.require_float_meta(
        name,
        &format!("; an 8-bit weight's {pname} must be floating point"),
    )?;
    let mut values = vec![0f32; meta.numel()];
    dtype::float_bytes_to_f32(meta.dtype, bytes, &mut values)?;
    if pname == "code" {
        crate::validate::check_code(name, values).map_err(bad)?;
    } else {
        crate::validate::check_absmax(name, &values).map_err(bad)?;
    }
    Ok(())
}

/// Quantizes one stored float tensor chunk by chunk; returns the bytes and the code used.
fn quantize_tensor(
    store: &dyn TensorStore,
    name: &str,
    block: crate::quant::BlockSize,
    q: &QuantizeOptions,
) -> Result<(crate::quant::StreamOutput, Vec<f32>)> {
    let meta = store.require_float_meta(name, "; only float tensors can be quantized")?;
    // An 8-bit block cannot hold NaN or Inf (its scale would be non-finite), so these are
    // refused even with --allow-nonfinite; --skip keeps such a module in float.
    let nonfinite = |i: usize, v: f32| {
        OctetError::bad_file(
            store.path(),
            format!(
                "tensor {name} holds {v} at element {i}; it cannot be quantized \
                 (--skip its module to keep it in float)"
            ),
        )
    };
    let code = match q.code {
        // Fitting samples the whole tensor, so it is read once in f32 first.
        crate::quant::CodeKind::Fitted => {
            let x = store.f32_values(name)?;
            if let Some((i, v)) = crate::validate::first_nonfinite_f32(&x) {
                return Err(nonfinite(i, v));
            }
            choose_code(q.code, &x, block)?
        }
        crate::quant::CodeKind::Dynamic | crate::quant::CodeKind::Linear => {
            choose_code(q.code, &[], block)?
        }
    };
    let bytes = store.bytes(name)?;
    let size = meta.dtype.size();
    let read = |start: usize, buf: &mut [f32]| -> Result<()> {
        dtype::float_bytes_to_f32(
            meta.dtype,
            &bytes[start * size..(start + buf.len()) * size],
            buf,
        )?;
        match crate::validate::first_nonfinite_f32(buf) {
            Some((i, v)) => Err(nonfinite(start + i, v)),
            None => Ok(()),
        }
    };
    let out = if q.double_quant {
        Q8Weight::quantize_stream_double(meta.numel(), block, &code, read)?
    } else {
        Q8Weight::quantize_stream(meta.numel(), block, &code, read)?
    };
    Ok((out, code.values().to_vec()))
}

/// Quantizes one stored float Linear weight to 4 bits (read whole in f32: the 4-bit rounding
/// and a fitted code both need it); returns it with its double-quantized scales, when asked
/// for, and its error.
fn quantize_tensor4(
    store: &dyn TensorStore,
    name: &str,
    s: &Node,
    fb: FourBitOptions,
    double_quant: bool,
) -> Result<(
    crate::quant::Quantized4,
    Option<DoubleQuantized>,
    QuantError,
)> {
    store.require_float_meta(name, "; only float tensors can be quantized")?;
    let x = store.f32_values(name)?;
    if let Some((i, v)) = crate::validate::first_nonfinite_f32(&x) {
        return Err(OctetError::bad_file(
            store.path(),
            format!(
                "tensor {name} holds {v} at element {i}; it cannot be quantized \
                 (--skip its module to keep it in float)"
            ),
        ));
    }
    let shape: Vec<i64> = s
        .param("weight")
        .map(|p| p.shape.iter().map(|&d| d as i64).collect())
        .unwrap_or_default();
    let t = tch::Tensor::f_from_slice(&x)?.f_reshape(shape.as_slice())?;
    drop(x);
    let (q, double, err) = Q4Weight::quantize_scales(&t, fb.block, fb.code, double_quant)?;
    Ok((q.into_inner(), double, err))
}

fn write_index(
    dir: &Path,
    shards: &[Vec<(String, Dtype, Vec<usize>)>],
    names: &[String],
) -> Result<()> {
    let mut map = serde_json::Map::new();
    let mut total = 0usize;
    for (shard, file) in shards.iter().zip(names) {
        for (n, d, s) in shard {
            total += s.iter().product::<usize>() * d.size();
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
    let p = dir.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
    std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
}
