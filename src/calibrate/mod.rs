//! Calibrated conversion (`convert --calibrate`): every 8-bit Linear weight rounded with GPTQ
//! ([`crate::quant::gptq`]) against the inputs it sees on a calibration text, instead of to
//! nearest.
//!
//! The model is loaded already rounded to nearest (the memory of the result, never the float
//! model), and the calibration tokens go through it one block at a time, as GPTQ does:
//! - while block i runs, its Linears record `XᵀX` of their inputs;
//! - each of their weights is read again in f32 from the source and rounded against the same
//!   block scales round-to-nearest chose, so the stored scales do not change;
//! - the rounded weights replace the block's, and block i runs again, so block i+1 sees the
//!   inputs the rounded model gives it;
//! - last, the LM head's weight (or the tied embedding) is rounded against the final norm's
//!   outputs.
//!
//! Peak memory beyond the 8-bit model: one weight in f32 (in row chunks), the Hessians of one
//! block's Linears, and the calibration activations (tokens × hidden, f32).
pub mod recorder;

use crate::error::{OctetError, Result};
use crate::io::TensorStore;
use crate::manifest::SourceFile;
use crate::model::CausalLm;
use crate::nn::bnb8::Bnb8Linear;
use crate::nn::q8::{Layout, Q8Weight};
use crate::nn::{ModuleGraph, Vacant};
use crate::quant::double_quant::DoubleQuantized;
use crate::quant::{gptq, BlockSize, QuantCode, QuantError, StreamOutput};
use recorder::{RecordSwitch, Recorder};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use tch::{Kind, Tensor};

/// Tokens read from the calibration text when not told otherwise.
pub const DEFAULT_TOKENS: usize = 2048;
/// Longest row of calibration tokens put through the model at once.
pub const ROW_TOKENS: usize = 512;
/// Fewest tokens a calibration is run on.
pub const MIN_TOKENS: usize = 16;
/// Elements of a weight rounded at once (rows are independent in GPTQ).
const CHUNK_ELEMS: usize = 1 << 24;

/// Quantizes a source tensor, by name, to nearest as the conversion does: its bytes and
/// scales, and the code's values.
pub type Nearest<'a> = dyn Fn(&str) -> Result<(StreamOutput, Vec<f32>)> + 'a;

/// The text a default conversion calibrates on: about 2,000 words of varied English prose
/// (a story, explanations, minutes, instructions, a letter, questions and answers, a little
/// Python, a recipe) written for octet and shipped in the binary. It shares nothing with the
/// texts the quality tables are measured on.
pub const BUILTIN_TEXT: &str = include_str!("default_text.txt");

/// Where the calibration text comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CalibrationText {
    /// [`BUILTIN_TEXT`]: a conversion falls back to rounding to nearest, with a warning, when
    /// the model has no tokenizer to read it with.
    Builtin,
    /// A UTF-8 text file; a model without a tokenizer is an error.
    File(PathBuf),
}

/// What `convert --calibrate` rounds against.
#[derive(Clone, Debug)]
pub struct CalibrationOptions {
    /// The text.
    pub text: CalibrationText,
    /// How many of its first tokens to use.
    pub tokens: usize,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            text: CalibrationText::Builtin,
            tokens: DEFAULT_TOKENS,
        }
    }
}

impl CalibrationOptions {
    /// The text, read and checked (a file must be UTF-8).
    pub fn read(&self) -> Result<String> {
        match &self.text {
            CalibrationText::Builtin => Ok(BUILTIN_TEXT.to_string()),
            CalibrationText::File(path) => crate::train::data::read_text(path),
        }
    }

    /// The text as a manifest records it: its file, or the built-in text by name.
    pub fn describe(&self) -> Result<SourceFile> {
        match &self.text {
            CalibrationText::Builtin => Ok(SourceFile {
                name: BUILTIN_NAME.to_string(),
                bytes: BUILTIN_TEXT.len() as u64,
                sha256: format!("{:x}", Sha256::digest(BUILTIN_TEXT.as_bytes())),
            }),
            CalibrationText::File(path) => SourceFile::describe(path),
        }
    }

    /// How messages name the text.
    fn origin(&self) -> PathBuf {
        match &self.text {
            CalibrationText::Builtin => PathBuf::from(BUILTIN_NAME),
            CalibrationText::File(path) => path.clone(),
        }
    }
}

/// The name the built-in text goes by in manifests and messages.
pub const BUILTIN_NAME: &str = "builtin";

/// One weight rounded with GPTQ, in the form the writer stores.
pub struct CalibratedWeight {
    /// Code indices in the stored layout (shared with the model while it is being calibrated).
    pub codes: Tensor,
    /// The block scales (their de-quantized values when `double` is set).
    pub absmax: Vec<f32>,
    /// The scales in stored double-quantized form, when asked for.
    pub double: Option<DoubleQuantized>,
    /// The code's values.
    pub code: Vec<f32>,
    /// Error against the source weight.
    pub error: QuantError,
}

impl CalibratedWeight {
    /// The weight as a round-to-nearest quantizer would have returned it, and its code.
    pub fn into_output(self) -> Result<(StreamOutput, Vec<f32>)> {
        Ok((
            StreamOutput {
                q: Vec::<u8>::try_from(self.codes.f_flatten(0, -1)?)?,
                absmax: self.absmax,
                error: Some(self.error),
                double: self.double,
            },
            self.code,
        ))
    }
}

/// The calibration's results by tensor name, and how many tokens it ran on.
pub struct Calibration {
    /// GPTQ-rounded weights by tensor name; quantized weights not here are rounded to nearest.
    pub weights: HashMap<String, CalibratedWeight>,
    /// Tokens of the calibration text used.
    pub tokens: usize,
}

/// The calibration token ids of `opts.data`, tokenized with the tokenizer in `tokenizer_dir`,
/// as rows of at most [`ROW_TOKENS`] (and the model's context).
pub fn calibration_rows(
    opts: &CalibrationOptions,
    tokenizer_dir: &Path,
    context: usize,
) -> Result<Vec<Vec<i64>>> {
    let bad = |m: String| OctetError::bad_file(opts.origin(), m);
    let text = opts.read()?;
    let tokenizer = crate::tokenizer::Tokenizer::from_dir(tokenizer_dir).map_err(|e| {
        OctetError::InvalidArgument(format!(
            "--calibrate needs the model's tokenizer, which the source does not provide: {e}"
        ))
    })?;
    let mut ids = tokenizer.encode(&text)?;
    if ids.len() < MIN_TOKENS {
        return Err(bad(format!(
            "calibration text has {} tokens; at least {MIN_TOKENS} are needed",
            ids.len()
        )));
    }
    ids.truncate(opts.tokens.max(MIN_TOKENS));
    let row = ROW_TOKENS.min(context.max(1));
    Ok(ids
        .chunks(row)
        .map(|c| c.iter().map(|&i| i as i64).collect())
        .collect())
}

/// Rounds every 8-bit weight of `graph` that calibration reaches with GPTQ.
///
/// `model` is the model loaded with its 8-bit modules rounded to nearest; `store` and `stored`
/// are the source checkpoint and its module graph, quantized in blocks of `block`;
/// `nearest(name)` quantizes tensor `name` to nearest as the conversion does (its scales are
/// kept, its codes re-chosen).
pub fn calibrate(
    model: &mut dyn CausalLm,
    rows: &[Vec<i64>],
    store: &dyn TensorStore,
    stored: &ModuleGraph,
    block: BlockSize,
    nearest: &Nearest,
    progress: &indicatif::ProgressBar,
) -> Result<Calibration> {
    // Nothing here is trained: no autograd graph may hold the calibration activations.
    let _no_grad = tch::no_grad_guard();
    let tokens = rows.iter().map(Vec::len).sum();
    let on = RecordSwitch::default();
    wrap_linears(model, &on);
    let mut weights = HashMap::new();
    let mut h: Vec<Tensor> = rows
        .iter()
        .map(|r| model.embed(&Tensor::from_slice(r).unsqueeze(0)))
        .collect::<Result<_>>()?;
    let blocks = model.info().blocks;
    progress.set_length(blocks as u64 + 1);
    for i in 0..blocks {
        on.store(true, Ordering::Relaxed);
        for x in &h {
            let _ = model.block(i, x, None)?;
        }
        on.store(false, Ordering::Relaxed);
        let mut hessians = Vec::new();
        model.visit_layers(&mut |path, layer| {
            if let Some(r) = layer.as_any().downcast_ref::<Recorder>() {
                if let Some(hs) = r.take_hessian() {
                    hessians.push((path.to_string(), hs));
                }
            }
        });
        // A module already 8-bit in the source has no float weight to round again.
        hessians.retain(|(path, _)| float_in_source(stored, path));
        for (path, hessian) in hessians {
            check_finite(&path, &hessian)?;
            let name = weight_name(stored, &path)?;
            let layout = layout_of(model, &path);
            let w = round_weight(store, &name, block.get(), layout, &hessian, tokens, nearest)?;
            replace_weight(model, &path, &w)?;
            weights.insert(name, w);
        }
        h = h
            .iter()
            .map(|x| model.block(i, x, None))
            .collect::<Result<_>>()?;
        progress.inc(1);
    }
    let mut hessian = None;
    let mut head = None;
    for x in &h {
        if let Some((input, path)) = model.head_input(x)? {
            recorder::accumulate(&mut hessian, &input)?;
            head = Some(path);
        }
    }
    if let (Some(path), Some(hessian)) = (head, hessian) {
        check_finite(&path, &hessian)?;
        // Only a quantized head (or tied table) is rounded; a float one stays as it is.
        if float_in_source(stored, &path) && is_quantized(model, &path) {
            let name = weight_name(stored, &path)?;
            let w = round_weight(
                store,
                &name,
                block.get(),
                Layout::OutIn,
                &hessian,
                tokens,
                nearest,
            )?;
            weights.insert(name, w);
        }
    }
    progress.inc(1);
    Ok(Calibration { weights, tokens })
}

/// Refuses a Hessian that is not finite: the model's activations on the calibration text
/// overflowed or met a NaN in the source.
fn check_finite(path: &str, hessian: &Tensor) -> Result<()> {
    if hessian.f_isfinite()?.f_all()?.int64_value(&[]) == 1 {
        return Ok(());
    }
    Err(OctetError::InvalidArgument(format!(
        "the inputs of {path} on the calibration text are not finite (does the source hold \
         NaN or Inf? `--calibrate none` converts without running the model)"
    )))
}

/// Puts a [`Recorder`] in place of every 8-bit Linear.
fn wrap_linears(model: &mut dyn CausalLm, on: &RecordSwitch) {
    model.visit_layers(&mut |_, layer| {
        if !layer.as_any().is::<Bnb8Linear>() {
            return;
        }
        let taken = std::mem::replace(layer, Box::new(Vacant));
        if let Ok(lin) = taken.into_any().downcast::<Bnb8Linear>() {
            *layer = Box::new(Recorder::new(*lin, on.clone()));
        }
    });
}

/// Whether module `path` is stored in float in the source (so this conversion quantizes it).
fn float_in_source(stored: &ModuleGraph, path: &str) -> bool {
    stored
        .node(path)
        .is_some_and(|n| crate::nn::kinds::quantized_param(&n.kind).is_none())
}

/// The source tensor name of module `path`'s weight.
fn weight_name(stored: &ModuleGraph, path: &str) -> Result<String> {
    stored
        .node(path)
        .map(|n| n.tensor_name("weight"))
        .ok_or_else(|| OctetError::InvalidArgument(format!("module {path} is not in the source")))
}

/// The stored layout of module `path`'s 8-bit weight.
fn layout_of(model: &mut dyn CausalLm, path: &str) -> Layout {
    let mut layout = Layout::OutIn;
    model.visit_layers(&mut |p, layer| {
        if p == path {
            if let Some(r) = layer.as_any().downcast_ref::<Recorder>() {
                layout = r.inner.layout();
            }
        }
    });
    layout
}

/// Whether module `path` holds an 8-bit weight in the model.
fn is_quantized(model: &mut dyn CausalLm, path: &str) -> bool {
    let mut found = false;
    model.visit_layers(&mut |p, layer| {
        if p == path {
            found = crate::nn::kinds::quantized_param(layer.kind()).is_some();
        }
    });
    found
}

/// Rounds tensor `name` with GPTQ against `hessian` (from `tokens` tokens), keeping the scales
/// `nearest` chooses.
fn round_weight(
    store: &dyn TensorStore,
    name: &str,
    block: usize,
    layout: Layout,
    hessian: &Tensor,
    tokens: usize,
    nearest: &Nearest,
) -> Result<CalibratedWeight> {
    let (rtn, code_values) = nearest(name)?;
    let code = QuantCode::new(code_values.clone())?;
    let meta = store.require_float_meta(name, "; only float tensors can be quantized")?;
    let [rows, cols] = meta.shape[..] else {
        return Err(OctetError::bad_file(
            store.path(),
            format!("tensor {name} is not 2-d; GPTQ rounds matrices"),
        ));
    };
    let stored =
        Tensor::f_from_slice(&store.f32_values(name)?)?.f_view([rows as i64, cols as i64])?;
    store.release(name);
    // GPTQ works on [out, in]; GPT-2's Conv1D stores [in, out].
    let (out, n_in) = match layout {
        Layout::OutIn => (rows, cols),
        Layout::InOut => (cols, rows),
    };
    let u = gptq::inverse_cholesky(hessian, gptq::dampening(n_in, tokens))?;
    let codes = Tensor::f_zeros([rows as i64, cols as i64], (Kind::Uint8, tch::Device::Cpu))?;
    let mut error = QuantError::default();
    let chunk = (CHUNK_ELEMS / n_in.max(1)).max(1);
    for o0 in (0..out).step_by(chunk) {
        let n = chunk.min(out - o0);
        let (w, scales) = match layout {
            Layout::OutIn => (
                stored.f_narrow(0, o0 as i64, n as i64)?,
                gptq::element_scales(&rtn.absmax, block, (o0, n), (out, n_in), false)?,
            ),
            Layout::InOut => (
                stored.f_narrow(1, o0 as i64, n as i64)?.f_tr()?,
                gptq::element_scales(&rtn.absmax, block, (o0, n), (out, n_in), true)?,
            ),
        };
        let (q, e) = gptq::round(&w, &scales, &u, &code)?;
        error.merge(&e);
        let q = Tensor::f_from_slice(&q)?.f_view([n as i64, n_in as i64])?;
        match layout {
            Layout::OutIn => codes.f_narrow(0, o0 as i64, n as i64)?.f_copy_(&q)?,
            Layout::InOut => codes
                .f_narrow(1, o0 as i64, n as i64)?
                .f_copy_(&q.f_tr()?)?,
        }
    }
    Ok(CalibratedWeight {
        codes,
        absmax: rtn.absmax,
        double: rtn.double,
        code: code_values,
        error,
    })
}

/// Puts `w` in place of the weight of the 8-bit Linear at `path`.
fn replace_weight(model: &mut dyn CausalLm, path: &str, w: &CalibratedWeight) -> Result<()> {
    let weight = Q8Weight::from_stored(
        path,
        w.codes.shallow_clone(),
        Tensor::f_from_slice(&w.absmax)?,
        &Tensor::f_from_slice(&w.code)?,
    )?;
    let mut weight = Some(weight);
    model.visit_layers(&mut |p, layer| {
        if p != path || !layer.as_any().is::<Recorder>() {
            return;
        }
        let taken = std::mem::replace(layer, Box::new(Vacant));
        if let Ok(mut r) = taken.into_any().downcast::<Recorder>() {
            if let Some(w) = weight.take() {
                r.inner.weight = w;
            }
            *layer = r;
        }
    });
    Ok(())
}
