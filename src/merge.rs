//! `octet merge`: folds a PEFT LoRA adapter into its base model, giving either a Hugging Face
//! checkpoint (f16 or f32, what transformers loads with no peft) or a re-quantized octet 8-bit
//! folder with the error the re-quantization added, per tensor.
//!
//! Merges are computed in f32 from the de-quantized base, one module at a time, and written
//! tensor by tensor, so peak memory is a few times the largest module, not the model.
use crate::adapter::{AdapterConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX};
use crate::error::{OctetError, Result};
use crate::io::safetensors::SafetensorsWriter;
use crate::io::{open_checkpoint, open_file, Dtype, TensorStore};
use crate::load::{read_config, resolve_arch, QuantizeOptions};
use crate::manifest::{sha256_file, Manifest, SourceFile, TensorError};
use crate::nn::kinds::{quantized_param, replacement_to};
use crate::nn::q8::{stored_block_size, Q8Weight};
use crate::nn::{ModuleGraph, Node};
use crate::outdir::{copy_side_files, OutputDir};
use crate::quant::{BlockSize, CodeKind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// What `octet merge` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MergeFormat {
    /// A Hugging Face checkpoint in float16.
    #[default]
    HfF16,
    /// A Hugging Face checkpoint in float32.
    HfF32,
    /// An octet folder with the merged weights re-quantized to blockwise 8-bit.
    Octet8,
}

impl MergeFormat {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MergeFormat::HfF16 => "hf-f16",
            MergeFormat::HfF32 => "hf-f32",
            MergeFormat::Octet8 => "octet8",
        }
    }

    /// The float dtype of a Hugging Face output; `None` for octet8 (floats keep their dtype).
    fn hf_dtype(self) -> Option<Dtype> {
        match self {
            MergeFormat::HfF16 => Some(Dtype::F16),
            MergeFormat::HfF32 => Some(Dtype::F32),
            MergeFormat::Octet8 => None,
        }
    }
}

impl std::str::FromStr for MergeFormat {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hf-f16" => Ok(MergeFormat::HfF16),
            "hf-f32" => Ok(MergeFormat::HfF32),
            "octet8" => Ok(MergeFormat::Octet8),
            other => Err(OctetError::InvalidArgument(format!(
                "unknown merge format '{other}': expected hf-f16, hf-f32 or octet8"
            ))),
        }
    }
}

impl std::fmt::Display for MergeFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Options of [`merge`].
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Output format.
    pub format: MergeFormat,
    /// Replace a non-empty output folder.
    pub force: bool,
    /// Where each module is de-quantized and merged (one module at a time; results come back
    /// to the host to be written).
    pub device: Device,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            format: MergeFormat::default(),
            force: false,
            device: Device::Cpu,
        }
    }
}

/// What a merge did.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// The output folder.
    pub out: PathBuf,
    /// The architecture of the base.
    pub arch: String,
    /// The format written.
    pub format: MergeFormat,
    /// Modules whose weight received a LoRA update.
    pub merged: Vec<String>,
    /// Tensors replaced by trained values from the adapter (biases, norms, saved modules).
    pub replaced: Vec<String>,
    /// octet8 only: each re-quantized merged weight against the exact f32 merge.
    pub requantized: Vec<TensorError>,
    /// Bytes of all files written.
    pub bytes_written: u64,
}

impl MergeReport {
    /// Count, mean and max relative MSE over the re-quantized tensors.
    pub fn error_summary(&self) -> (usize, f64, f64) {
        let n = self.requantized.len();
        let sum: f64 = self.requantized.iter().map(|e| e.rel_mse).sum();
        let max = self
            .requantized
            .iter()
            .map(|e| e.rel_mse)
            .fold(0.0, f64::max);
        (n, if n == 0 { 0.0 } else { sum / n as f64 }, max)
    }
}

/// A LoRA pair for one module, as stored (f32).
struct LoraPair {
    a: Tensor,
    b: Tensor,
    a_name: String,
    b_name: String,
    embedding: bool,
}

/// What the adapter changes in one module.
#[derive(Default)]
struct ModuleEdit {
    lora: Option<LoraPair>,
    /// Parameter name → (adapter tensor name, trained value).
    replace: BTreeMap<String, (String, Tensor)>,
}

/// A parsed adapter folder.
struct Adapter {
    config: AdapterConfig,
    weights: PathBuf,
    modules: BTreeMap<String, ModuleEdit>,
}

/// The adapter's weight file: safetensors, or the older pickled `adapter_model.bin`.
fn adapter_weights(dir: &Path) -> Result<PathBuf> {
    ["adapter_model.safetensors", "adapter_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            OctetError::bad_file(
                dir,
                format!("not a PEFT adapter folder (no {ADAPTER_WEIGHTS} or adapter_model.bin)"),
            )
        })
}

/// Reads an adapter folder and sorts its tensors by module. Half-pairs are refused here.
fn read_adapter(dir: &Path) -> Result<Adapter> {
    if !dir.join(ADAPTER_CONFIG).is_file() {
        return Err(OctetError::bad_file(
            dir,
            format!("not a PEFT adapter folder (no {ADAPTER_CONFIG})"),
        ));
    }
    let config = AdapterConfig::read(dir)?;
    for key in ["rank_pattern", "alpha_pattern"] {
        if config
            .extra
            .get(key)
            .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        {
            return Err(OctetError::bad_file(
                dir.join(ADAPTER_CONFIG),
                format!("per-module ranks or alphas ({key}) are not supported"),
            ));
        }
    }
    let weights = adapter_weights(dir)?;
    let store = open_file(&weights)?;
    let mut halves: BTreeMap<String, [Option<(String, Tensor)>; 2]> = BTreeMap::new();
    let mut embedding: BTreeMap<String, bool> = BTreeMap::new();
    let mut modules: BTreeMap<String, ModuleEdit> = BTreeMap::new();
    for name in store.names() {
        // peft drops the adapter name ("default") and the modules_to_save wrapper when it
        // saves, but not in every version.
        let key = name
            .replace(".modules_to_save.", ".")
            .replace(".default.", ".")
            .replace(".default", "");
        let key = key.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
            OctetError::bad_file(
                &weights,
                format!("tensor {name} lacks the {PEFT_PREFIX} prefix"),
            )
        })?;
        let t = crate::adapter::read_adapter_tensor(store.as_ref(), &name)?.to_kind(Kind::Float);
        let lora = [
            (".lora_A.weight", 0, false),
            (".lora_B.weight", 1, false),
            (".lora_embedding_A", 0, true),
            (".lora_embedding_B", 1, true),
        ]
        .into_iter()
        .find_map(|(suffix, i, emb)| key.strip_suffix(suffix).map(|p| (p, i, emb)));
        if let Some((path, i, emb)) = lora {
            if *embedding.entry(path.to_string()).or_insert(emb) != emb {
                return Err(OctetError::bad_file(
                    &weights,
                    format!("{path} has both Linear and Embedding LoRA tensors"),
                ));
            }
            halves.entry(path.to_string()).or_default()[i] = Some((name.clone(), t));
        } else if key.contains("lora_") {
            return Err(OctetError::bad_file(
                &weights,
                format!("tensor {name} is no LoRA tensor octet knows (DoRA or another variant?)"),
            ));
        } else {
            let (path, param) = key.rsplit_once('.').ok_or_else(|| {
                OctetError::bad_file(&weights, format!("tensor {name} names no module"))
            })?;
            modules
                .entry(path.to_string())
                .or_default()
                .replace
                .insert(param.to_string(), (name.clone(), t));
        }
    }
    for (path, [a, b]) in halves {
        let embedding = embedding.get(&path).copied().unwrap_or(false);
        let (an, bn) = if embedding {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        let ((a_name, a), (b_name, b)) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some((n, _)), None) => {
                return Err(OctetError::bad_file(
                    &weights,
                    format!("tensor {n}: {path} has {an} without {bn}"),
                ))
            }
            (None, Some((n, _))) => {
                return Err(OctetError::bad_file(
                    &weights,
                    format!("tensor {n}: {path} has {bn} without {an}"),
                ))
            }
            (None, None) => continue,
        };
        modules.entry(path).or_default().lora = Some(LoraPair {
            a,
            b,
            a_name,
            b_name,
            embedding,
        });
    }
    if modules.is_empty() {
        return Err(OctetError::bad_file(
            &weights,
            "the adapter holds no tensors",
        ));
    }
    Ok(Adapter {
        config,
        weights,
        modules,
    })
}

fn is_embedding_kind(kind: &str) -> bool {
    kind.ends_with("Embedding")
}

fn shape_error(what: &str, expected: String, found: &[i64]) -> OctetError {
    OctetError::ShapeMismatch {
        what: what.to_string(),
        expected,
        found: format!("{found:?}"),
    }
}

/// Checks, before anything is written, that every adapter tensor lands on a module of this
/// model with a fitting shape.
fn check_adapter(adapter: &Adapter, graph: &ModuleGraph, arch: &str) -> Result<()> {
    let weights = &adapter.weights;
    if adapter.modules.keys().all(|p| graph.node(p).is_none()) {
        let first = adapter.modules.keys().next().cloned().unwrap_or_default();
        let trained_on = adapter
            .config
            .base_model_name_or_path
            .as_deref()
            .map(|b| format!(" (it was trained on {b})"))
            .unwrap_or_default();
        return Err(OctetError::bad_file(
            weights,
            format!(
                "the adapter does not fit this {arch} model: none of its {} modules (e.g. {first}) \
                 exists here; was it trained for another architecture{trained_on}?",
                adapter.modules.len()
            ),
        ));
    }
    let r = adapter.config.r as i64;
    let fifo = adapter.config.fan_in_fan_out;
    for (path, edit) in &adapter.modules {
        let node = graph.node(path).ok_or_else(|| {
            let name = edit
                .lora
                .as_ref()
                .map(|l| l.a_name.clone())
                .or_else(|| edit.replace.values().next().map(|(n, _)| n.clone()))
                .unwrap_or_default();
            OctetError::bad_file(
                weights,
                format!("tensor {name}: this {arch} model has no module {path}"),
            )
        })?;
        if let Some(l) = &edit.lora {
            let w = node
                .param(quantized_param(&node.kind).unwrap_or("weight"))
                .filter(|p| p.shape.len() == 2)
                .ok_or_else(|| {
                    OctetError::bad_file(
                        weights,
                        format!(
                            "tensor {}: {path} ({}) has no 2-d weight to merge into",
                            l.a_name, node.kind
                        ),
                    )
                })?;
            let (w0, w1) = (w.shape[0] as i64, w.shape[1] as i64);
            if l.embedding != is_embedding_kind(&node.kind) {
                let form = if l.embedding { "Embedding" } else { "Linear" };
                return Err(OctetError::bad_file(
                    weights,
                    format!(
                        "tensor {}: a {form} adapter, but {path} is a {}",
                        l.a_name, node.kind
                    ),
                ));
            }
            // [r, in] / [out, r] for Linear (weight [out, in], or [in, out] with
            // fan_in_fan_out); [r, vocab] / [dim, r] for Embedding (weight [vocab, dim]).
            let (fan_in, fan_out) = if l.embedding || fifo {
                (w0, w1)
            } else {
                (w1, w0)
            };
            let want_a = [r, fan_in];
            let want_b = [fan_out, r];
            let shape = format!("{w:?}", w = w.shape);
            if l.a.size() != want_a {
                return Err(shape_error(
                    &format!(
                        "adapter tensor {} ({path}.weight is {shape}, r = {r})",
                        l.a_name
                    ),
                    format!("{want_a:?}"),
                    &l.a.size(),
                ));
            }
            if l.b.size() != want_b {
                return Err(shape_error(
                    &format!(
                        "adapter tensor {} ({path}.weight is {shape}, r = {r})",
                        l.b_name
                    ),
                    format!("{want_b:?}"),
                    &l.b.size(),
                ));
            }
        }
        for (param, (name, t)) in &edit.replace {
            let p = node.param(param).ok_or_else(|| {
                OctetError::bad_file(
                    weights,
                    format!("tensor {name}: {path} ({}) has no {param}", node.kind),
                )
            })?;
            let q = quantized_param(&node.kind);
            if !(p.dtype.is_float() || q == Some(param.as_str())) {
                return Err(OctetError::bad_file(
                    weights,
                    format!("tensor {name}: {path}.{param} is not a trainable float tensor"),
                ));
            }
            let want: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
            if t.size() != want {
                return Err(shape_error(
                    &format!("adapter tensor {name}"),
                    format!("{want:?} (as {path}.{param})"),
                    &t.size(),
                ));
            }
        }
    }
    Ok(())
}

/// Applies one module's edit to its f32 tensors: replacements first, then W += ΔW.
fn apply_edit(
    edit: &ModuleEdit,
    weight: &str,
    params: &mut BTreeMap<String, Tensor>,
    scale: f64,
    fan_in_fan_out: bool,
) -> Result<()> {
    for (param, (_, t)) in &edit.replace {
        params.insert(param.clone(), t.shallow_clone());
    }
    if let Some(l) = &edit.lora {
        let w = params.get(weight).ok_or_else(|| {
            OctetError::InvalidArgument(format!("no {weight} to merge {} into", l.a_name))
        })?;
        let dev = w.device();
        let ba = l.b.f_to_device(dev)?.f_matmul(&l.a.f_to_device(dev)?)? * scale;
        // PEFT's get_delta_weight: transposed for embeddings and fan_in_fan_out layers.
        let delta = if l.embedding || fan_in_fan_out {
            ba.tr()
        } else {
            ba
        };
        params.insert(weight.to_string(), (w + delta).contiguous());
    }
    Ok(())
}

/// Contiguous little-endian bytes of a CPU tensor.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.contiguous();
    let n = t.numel() * Dtype::from_kind(t.kind())?.size();
    let mut buf = vec![0u8; n];
    t.f_copy_data_u8(&mut buf, t.numel())?;
    Ok(buf)
}

/// The output graph: for octet8 from a float base, the spec's modules become 8-bit; an 8-bit
/// base keeps its own layout. Also returns the block size for newly quantized modules.
fn output_graph(
    model: &Path,
    stored: &ModuleGraph,
    arch: &dyn crate::registry::Architecture,
    format: MergeFormat,
) -> Result<(ModuleGraph, BlockSize)> {
    let block = match Manifest::read(model)? {
        Some(m) => BlockSize::new(m.block_size)?,
        None => arch.spec().block_size,
    };
    let mut graph = stored.clone();
    match format.hf_dtype() {
        Some(dtype) => {
            for node in &mut graph.nodes {
                if let Some(rep) = replacement_to(&node.kind) {
                    node.kind = rep.from.to_string();
                    node.params
                        .retain(|p| p.name != "absmax" && p.name != "code");
                    if let Some(p) = node
                        .params
                        .iter_mut()
                        .find(|p| p.name == rep.quantized_param)
                    {
                        p.dtype = dtype;
                    }
                }
                for p in &mut node.params {
                    if p.dtype.is_float() {
                        p.dtype = dtype;
                    }
                }
            }
        }
        None => {
            if !stored
                .nodes
                .iter()
                .any(|n| quantized_param(&n.kind).is_some())
            {
                let opts = QuantizeOptions {
                    block: Some(block),
                    ..Default::default()
                };
                opts.apply(&mut graph, arch.spec());
            }
        }
    }
    Ok((graph, block))
}

/// The bytes of one module's output tensors, in the output node's parameter order.
#[allow(clippy::too_many_arguments)]
fn module_outputs(
    store: &dyn TensorStore,
    s: &Node,
    t: &Node,
    edit: Option<&ModuleEdit>,
    config: &AdapterConfig,
    block: BlockSize,
    device: Device,
    errors: &mut Vec<TensorError>,
) -> Result<Vec<(String, Vec<u8>)>> {
    let stored_q = quantized_param(&s.kind);
    let out_q = quantized_param(&t.kind);
    let weight_changes = edit
        .is_some_and(|e| e.lora.is_some() || stored_q.is_some_and(|q| e.replace.contains_key(q)));
    // An 8-bit module the adapter leaves alone keeps its bytes exactly: no added error.
    if stored_q.is_some() && out_q.is_some() && !weight_changes {
        return t
            .params
            .iter()
            .map(|p| {
                let bytes = match edit.and_then(|e| e.replace.get(&p.name)) {
                    Some((_, v)) => tensor_bytes(&v.to_kind(p.dtype.kind()))?,
                    None => store.bytes(&s.tensor_name(&p.name))?.into_owned(),
                };
                Ok((p.name.clone(), bytes))
            })
            .collect();
    }
    let mut params = Q8Weight::read_module_f32(store, s, device)?;
    let weight = stored_q.or(out_q).unwrap_or("weight");
    if let Some(e) = edit {
        apply_edit(
            e,
            weight,
            &mut params,
            config.lora().scale(),
            config.fan_in_fan_out,
        )?;
    }
    for t in params.values_mut() {
        *t = t.f_to_device(Device::Cpu)?;
    }
    let mut requantized: Option<[Vec<u8>; 3]> = None;
    if let Some(q) = out_q {
        let w = params.get(q).ok_or_else(|| {
            OctetError::bad_file(store.path(), format!("module {}: no {q}", s.path))
        })?;
        // The base's own block size where it was 8-bit; the manifest's for new modules.
        let block = match (s.param(q), s.param("absmax")) {
            (Some(p), Some(a)) if stored_q.is_some() => {
                stored_block_size(p.shape.iter().product(), a.shape[0], Some(block))
                    .unwrap_or(block)
            }
            _ => block,
        };
        let (bytes, err) = Q8Weight::requantize(w, block)?;
        errors.push(TensorError {
            name: s.tensor_name(q),
            rel_mse: err.rel_mse(),
            max_abs_err: err.max_abs_err,
        });
        requantized = Some(bytes);
    }
    let mut out = Vec::with_capacity(t.params.len());
    for p in &t.params {
        let bytes = match (&mut requantized, p.name.as_str()) {
            (Some(b), n) if Some(n) == out_q => std::mem::take(&mut b[0]),
            (Some(b), "absmax") => std::mem::take(&mut b[1]),
            (Some(b), "code") => std::mem::take(&mut b[2]),
            _ => {
                let v = params.get(&p.name).ok_or_else(|| {
                    OctetError::bad_file(store.path(), format!("module {}: no {}", s.path, p.name))
                })?;
                // A value past f16's range would silently become ±inf in the checkpoint.
                if p.dtype == Dtype::F16
                    && v.numel() > 0
                    && v.is_floating_point()
                    && v.abs().max().double_value(&[]) > f64::from(half::f16::MAX)
                {
                    return Err(OctetError::InvalidArgument(format!(
                        "{}: merged values exceed the float16 range; use --format hf-f32",
                        s.tensor_name(&p.name)
                    )));
                }
                tensor_bytes(&v.to_kind(p.dtype.kind()))?
            }
        };
        out.push((p.name.clone(), bytes));
    }
    Ok(out)
}

/// Refuses to write a tensor octet (or transformers) could not use: non-finite float values,
/// or an 8-bit module's code or absmax that would not load back.
fn check_output(t: &Node, param: &str, bytes: &[u8]) -> Result<()> {
    let name = t.tensor_name(param);
    let refuse = |m: String| {
        OctetError::InvalidArgument(format!("the merge would write an unusable model: {m}"))
    };
    let Some(p) = t.param(param) else {
        return Ok(());
    };
    let is_8bit = quantized_param(&t.kind).is_some();
    match param {
        "code" if is_8bit => {
            crate::validate::check_code(&name, crate::validate::f32_values(bytes))
                .map_err(refuse)?;
        }
        "absmax" if is_8bit => {
            crate::validate::check_absmax(&name, &crate::validate::f32_values(bytes))
                .map_err(refuse)?;
        }
        _ => crate::validate::check_finite(&name, p.dtype, bytes).map_err(refuse)?,
    }
    Ok(())
}

/// Sets the config's dtype entries to `name`, so transformers loads the weights as stored.
fn set_config_dtype(config: &mut serde_json::Value, name: &str) {
    if let Some(obj) = config.as_object_mut() {
        let keys: Vec<&str> = ["dtype", "torch_dtype"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        let keys = if keys.is_empty() {
            vec!["torch_dtype"]
        } else {
            keys
        };
        for k in keys {
            obj.insert(k.to_string(), serde_json::Value::String(name.to_string()));
        }
    }
}

fn source_entry(path: &Path) -> Result<SourceFile> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| OctetError::io(path, e))?
        .len();
    Ok(SourceFile {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes,
        sha256: sha256_file(path)?,
    })
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).map_err(|e| OctetError::io(dir, e))? {
        let e = e.map_err(|e| OctetError::io(dir, e))?;
        n += e
            .metadata()
            .map_err(|err| OctetError::io(e.path(), err))?
            .len();
    }
    Ok(n)
}

/// Merges the LoRA adapter in `adapter` into the model in `model` (octet 8-bit or Hugging
/// Face float) and writes the result to `out` in `opts.format`. Every adapter tensor must
/// land on a module of the model with a fitting shape; this is checked before anything is
/// written, and a failed merge leaves no output behind.
pub fn merge(model: &Path, adapter: &Path, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    let ad = read_adapter(adapter)?;
    let config = read_config(model)?;
    let arch = resolve_arch(model, "auto", &config)?;
    let store = open_checkpoint(model)?;
    let stored = ModuleGraph::from_store(store.as_ref(), arch.spec())?;
    crate::load::check_checkpoint(arch, &config, model, store.as_ref(), &stored)?;
    check_adapter(&ad, &stored, arch.name())?;
    let (graph, block) = output_graph(model, &stored, arch, opts.format)?;
    let outdir = OutputDir::create(out, opts.force, &[model, adapter])?;

    let plan: Vec<(String, Dtype, Vec<usize>)> = graph
        .nodes
        .iter()
        .flat_map(|n| {
            n.params
                .iter()
                .map(move |p| (n.tensor_name(&p.name), p.dtype, p.shape.clone()))
        })
        .collect();
    let mut meta = vec![("format".to_string(), "pt".to_string())];
    if opts.format == MergeFormat::Octet8 {
        meta.push(("octet_arch".to_string(), arch.name().to_string()));
    }
    let mut w = SafetensorsWriter::create(&outdir.path().join("model.safetensors"), &plan, &meta)?;
    let mut errors = Vec::new();
    for (s, t) in stored.nodes.iter().zip(&graph.nodes) {
        let edit = ad.modules.get(&s.path);
        for (name, bytes) in module_outputs(
            store.as_ref(),
            s,
            t,
            edit,
            &ad.config,
            block,
            opts.device,
            &mut errors,
        )? {
            check_output(t, &name, &bytes)?;
            w.write(&t.tensor_name(&name), &bytes)?;
        }
        for p in &s.params {
            store.release(&s.tensor_name(&p.name));
        }
    }
    w.finish()?;

    copy_side_files(model, outdir.path())?;
    match opts.format.hf_dtype() {
        Some(dtype) => {
            let mut cfg = config.clone();
            set_config_dtype(
                &mut cfg,
                if dtype == Dtype::F16 {
                    "float16"
                } else {
                    "float32"
                },
            );
            let p = outdir.path().join("config.json");
            let text = serde_json::to_string_pretty(&cfg)
                .map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
            std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))?;
        }
        None => {
            let mut source = vec![
                source_entry(store.path())?,
                source_entry(&model.join("config.json"))?,
            ];
            source.push(source_entry(&adapter.join(ADAPTER_CONFIG))?);
            source.push(source_entry(&ad.weights)?);
            Manifest {
                arch: arch.name().to_string(),
                block_size: block.get() as i64,
                code: CodeKind::Dynamic,
                octet_version: env!("CARGO_PKG_VERSION").to_string(),
                source,
                tensors: errors.clone(),
            }
            .write(outdir.path())?;
        }
    }
    let bytes_written = dir_bytes(outdir.path())?;
    let out = outdir.commit()?;

    let mut merged = Vec::new();
    let mut replaced = Vec::new();
    for (path, e) in &ad.modules {
        if e.lora.is_some() {
            merged.push(path.clone());
        }
        replaced.extend(e.replace.keys().map(|p| format!("{path}.{p}")));
    }
    Ok(MergeReport {
        out,
        arch: arch.name().to_string(),
        format: opts.format,
        merged,
        replaced,
        requantized: errors,
        bytes_written,
    })
}
