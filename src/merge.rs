//! `octet merge`: folds a PEFT LoRA adapter into its base model, giving either a Hugging Face
//! checkpoint (f16 or f32, what transformers loads with no peft) or a re-quantized octet 8-bit
//! folder with the error the re-quantization added, per tensor.
//!
//! Merges are computed in f32 from the de-quantized base, one module at a time, and written
//! tensor by tensor, so peak memory is a few times the largest module, not the model.
use crate::error::{OctetError, Result};
use crate::io::safetensors::SafetensorsWriter;
use crate::io::{Dtype, TensorStore};
use crate::load::QuantizeOptions;
use crate::manifest::{FourBitRecord, Manifest, SourceFile, TensorError};
use crate::nn::kinds::{quantized_param, replacement_to};
use crate::nn::q4::{self, FourBitOptions, Q4Weight};
use crate::nn::q8::{decode_absmax, stored_block_size, Q8Weight};
use crate::nn::{ModuleGraph, Node, ParamInfo};
use crate::outdir::OutputDir;
use crate::peft::{Adapter, AdapterConfig, ModuleEdit, ADAPTER_CONFIG};
use crate::quant::double_quant as dq;
use crate::quant::{BlockSize, CodeKind};
use crate::source::ModelSource;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

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
    /// An octet folder with the merged Linear weights re-quantized to 4 bits (the base's
    /// 4-bit code and block size, else NF4 in blocks of 64); the rest as `octet8`.
    Octet4,
    /// A llama.cpp GGUF file, matrices in F16.
    GgufF16,
    /// A llama.cpp GGUF file, matrices in BF16.
    GgufBf16,
    /// A llama.cpp GGUF file, matrices in Q8_0 (octet's quantizer, as gguf's).
    GgufQ8_0,
}

impl MergeFormat {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MergeFormat::HfF16 => "hf-f16",
            MergeFormat::HfF32 => "hf-f32",
            MergeFormat::Octet8 => "octet8",
            MergeFormat::Octet4 => "octet4",
            MergeFormat::GgufF16 => "gguf-f16",
            MergeFormat::GgufBf16 => "gguf-bf16",
            MergeFormat::GgufQ8_0 => "gguf-q8_0",
        }
    }

    /// The GGUF format of a `gguf-*` merge.
    pub fn gguf(self) -> Option<crate::export_gguf::GgufFormat> {
        use crate::export_gguf::GgufFormat;
        match self {
            MergeFormat::GgufF16 => Some(GgufFormat::F16),
            MergeFormat::GgufBf16 => Some(GgufFormat::Bf16),
            MergeFormat::GgufQ8_0 => Some(GgufFormat::Q8_0),
            _ => None,
        }
    }

    /// The float dtype of a Hugging Face output; `None` for octet8 and octet4 (floats keep
    /// their dtype).
    fn hf_dtype(self) -> Option<Dtype> {
        match self {
            MergeFormat::HfF16 => Some(Dtype::F16),
            MergeFormat::HfF32 => Some(Dtype::F32),
            _ => None,
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
            "octet4" => Ok(MergeFormat::Octet4),
            "gguf-f16" => Ok(MergeFormat::GgufF16),
            "gguf-bf16" => Ok(MergeFormat::GgufBf16),
            "gguf-q8_0" => Ok(MergeFormat::GgufQ8_0),
            other => Err(OctetError::InvalidArgument(format!(
                "unknown merge format '{other}': expected hf-f16, hf-f32, octet8, octet4, \
                 gguf-f16, gguf-bf16 or gguf-q8_0"
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

/// Applies one module's edit to its f32 tensors: replacements first, then W += ΔW.
pub(crate) fn apply_edit(
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
pub(crate) fn output_graph(
    model: &Path,
    stored: &ModuleGraph,
    arch: &dyn crate::arch::Architecture,
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
                crate::nn::q4::to_float_node(node, dtype);
                if let Some(rep) = replacement_to(&node.kind) {
                    node.kind = rep.from.to_string();
                    node.params.retain(|p| {
                        ![
                            "absmax",
                            "code",
                            dq::STORED_Q,
                            dq::STORED_SCALE,
                            dq::STORED_OFFSET,
                        ]
                        .contains(&p.name.as_str())
                    });
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
            // Merged folders keep one f32 absmax per block: a re-quantized weight is scaled by
            // its own absmax, and a kept one by its de-quantized double-quantized scales.
            graph.plain_absmax();
            // For octet8, 4-bit modules come out 8-bit, at the manifest's 8-bit block size.
            if format == MergeFormat::Octet8 {
                for node in &mut graph.nodes {
                    crate::nn::q4::to_eight_bit_node(node, block);
                }
            }
            if !stored
                .nodes
                .iter()
                .any(|n| quantized_param(&n.kind).is_some() || n.kind == crate::nn::q4::KIND)
            {
                let opts = QuantizeOptions {
                    block: Some(block),
                    ..Default::default()
                };
                opts.apply(&mut graph, arch.spec());
            }
            // For octet4, every 8-bit Linear becomes 4-bit, as `convert --bits 4` makes them.
            if format == MergeFormat::Octet4 {
                let linear: Vec<String> = graph
                    .nodes
                    .iter()
                    .filter(|n| n.kind == "Bnb8Linear")
                    .map(|n| n.path.clone())
                    .collect();
                let fb = four_bit_options(model)?;
                crate::nn::q4::to_four_bit(&mut graph, &linear, fb.block);
            }
        }
    }
    Ok((graph, block))
}

/// The 4-bit code and block size an `octet4` merge of `model` writes: the base's own when it
/// is 4-bit, else NF4 in blocks of 64.
fn four_bit_options(model: &Path) -> Result<FourBitOptions> {
    Ok(match Manifest::read(model)?.and_then(|m| m.four_bit) {
        Some(r) => FourBitOptions {
            code: r.code,
            block: crate::quant::block4(r.block_size)?,
        },
        None => FourBitOptions::default(),
    })
}

/// Merges module by module, keeping the re-quantization error of each 8-bit weight written.
struct Merger<'a> {
    store: &'a dyn TensorStore,
    config: &'a AdapterConfig,
    /// Block size for modules that become 8-bit.
    block: BlockSize,
    device: Device,
    /// How modules that become 4-bit are quantized.
    four_bit: FourBitOptions,
    errors: Vec<TensorError>,
}

impl Merger<'_> {
    /// The bytes of one module's output tensors, in the output node's parameter order.
    fn module_outputs(
        &mut self,
        s: &Node,
        t: &Node,
        edit: Option<&ModuleEdit>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        if t.kind == q4::KIND {
            return self.four_bit_outputs(s, t, edit);
        }
        let stored_q = quantized_param(&s.kind);
        let out_q = quantized_param(&t.kind);
        let weight_changes = edit.is_some_and(|e| {
            e.lora.is_some() || stored_q.is_some_and(|q| e.replace.contains_key(q))
        });
        // An 8-bit module the adapter leaves alone keeps its bytes exactly: no added error.
        if stored_q.is_some() && out_q.is_some() && !weight_changes {
            return self.kept_8bit(s, t, edit);
        }
        let mut params = Q8Weight::read_module_f32(self.store, s, self.device)?;
        let weight = stored_q.or(out_q).unwrap_or("weight");
        if let Some(e) = edit {
            apply_edit(
                e,
                weight,
                &mut params,
                self.config.lora().scale(),
                self.config.fan_in_fan_out,
            )?;
        }
        for t in params.values_mut() {
            *t = t.f_to_device(Device::Cpu)?;
        }
        let mut requantized = match out_q {
            Some(q) => Some(self.requantized(s, q, &params)?),
            None => None,
        };
        let mut out = Vec::with_capacity(t.params.len());
        for p in &t.params {
            let bytes = match (&mut requantized, p.name.as_str()) {
                (Some(b), n) if Some(n) == out_q => std::mem::take(&mut b[0]),
                (Some(b), "absmax") => std::mem::take(&mut b[1]),
                (Some(b), "code") => std::mem::take(&mut b[2]),
                _ => self.float_bytes(s, p, &params)?,
            };
            out.push((p.name.clone(), bytes));
        }
        Ok(out)
    }

    /// The output tensors of a module written 4-bit: a 4-bit module the adapter leaves alone
    /// keeps its bytes; any other is merged in f32 and re-quantized, its error kept.
    fn four_bit_outputs(
        &mut self,
        s: &Node,
        t: &Node,
        edit: Option<&ModuleEdit>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let weight_changes =
            edit.is_some_and(|e| e.lora.is_some() || e.replace.contains_key("weight"));
        if s.kind == q4::KIND && !weight_changes {
            return self.kept_8bit(s, t, edit);
        }
        let mut params = Q8Weight::read_module_f32(self.store, s, self.device)?;
        if let Some(e) = edit {
            apply_edit(
                e,
                "weight",
                &mut params,
                self.config.lora().scale(),
                self.config.fan_in_fan_out,
            )?;
        }
        let w = params
            .get("weight")
            .ok_or_else(|| {
                OctetError::bad_file(self.store.path(), format!("module {}: no weight", s.path))
            })?
            .f_to_device(Device::Cpu)?;
        let (q, err) = Q4Weight::quantize(&w, self.four_bit.block, self.four_bit.code)?;
        self.errors.push(TensorError {
            name: s.tensor_name("weight"),
            rel_mse: err.rel_mse(),
            max_abs_err: err.max_abs_err,
            code: None,
            calibrated: false,
        });
        let mut stored: BTreeMap<String, Tensor> = q.tensors().into_iter().collect();
        for v in params.values_mut() {
            *v = v.f_to_device(Device::Cpu)?;
        }
        t.params
            .iter()
            .map(|p| {
                let bytes = match stored.remove(&p.name) {
                    Some(v) => tensor_bytes(&v)?,
                    None => self.float_bytes(s, p, &params)?,
                };
                Ok((p.name.clone(), bytes))
            })
            .collect()
    }

    /// A quantized module whose weight the adapter leaves alone: its stored bytes, with any
    /// replaced parameter (a trained bias) in their place.
    fn kept_8bit(
        &self,
        s: &Node,
        t: &Node,
        edit: Option<&ModuleEdit>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        t.params
            .iter()
            .map(|p| {
                let bytes = match edit.and_then(|e| e.replace.get(&p.name)) {
                    Some((_, v)) => tensor_bytes(&v.to_kind(p.dtype.kind()))?,
                    None if p.name == "absmax" && s.param(dq::STORED_Q).is_some() => {
                        let t = |n: &str| self.store.tensor(&s.tensor_name(n));
                        let a = decode_absmax(
                            &s.path,
                            &t(dq::STORED_Q)?,
                            &t(dq::STORED_SCALE)?,
                            &t(dq::STORED_OFFSET)?,
                        )
                        .map_err(|e| OctetError::bad_file(self.store.path(), e.to_string()))?;
                        tensor_bytes(&a)?
                    }
                    None => self.store.bytes(&s.tensor_name(&p.name))?.into_owned(),
                };
                Ok((p.name.clone(), bytes))
            })
            .collect()
    }

    /// The merged weight `q` of stored module `s` re-quantized; its error is kept.
    fn requantized(
        &mut self,
        s: &Node,
        q: &str,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<[Vec<u8>; 3]> {
        let w = params.get(q).ok_or_else(|| {
            OctetError::bad_file(self.store.path(), format!("module {}: no {q}", s.path))
        })?;
        // The base's own block size where it was 8-bit; the manifest's for new modules.
        let block = match (s.param(q), s.param("absmax").or(s.param(dq::STORED_Q))) {
            (Some(p), Some(a)) if quantized_param(&s.kind).is_some() => {
                stored_block_size(p.shape.iter().product(), a.shape[0], Some(self.block))
                    .unwrap_or(self.block)
            }
            _ => self.block,
        };
        let (bytes, err) = Q8Weight::requantize(w, block)?;
        self.errors.push(TensorError {
            name: s.tensor_name(q),
            rel_mse: err.rel_mse(),
            max_abs_err: err.max_abs_err,
            code: Some(CodeKind::Dynamic),
            calibrated: false,
        });
        Ok(bytes)
    }

    /// A merged float parameter in its output dtype.
    fn float_bytes(
        &self,
        s: &Node,
        p: &ParamInfo,
        params: &BTreeMap<String, Tensor>,
    ) -> Result<Vec<u8>> {
        let v = params.get(&p.name).ok_or_else(|| {
            OctetError::bad_file(
                self.store.path(),
                format!("module {}: no {}", s.path, p.name),
            )
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
        tensor_bytes(&v.to_kind(p.dtype.kind()))
    }
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
    if let Some(g) = opts.format.gguf() {
        return crate::export_gguf::merge_to_gguf(
            model,
            adapter,
            out,
            opts.format,
            g,
            opts.force,
            opts.device,
        );
    }
    let ad = Adapter::read(adapter)?;
    let source = ModelSource::open(model, "auto")?;
    let arch = source.arch.name();
    ad.check_fits(&source.graph, &format!("this {arch} model"))?;
    let (graph, block) = output_graph(model, &source.graph, source.arch, opts.format)?;
    let outdir = OutputDir::create(out, opts.force, &[model, adapter])?;
    let errors = write_merged(&source, &graph, &ad, block, opts, outdir.path())?;
    source.write_side_files(outdir.path())?;
    match opts.format.hf_dtype() {
        Some(dtype) => write_hf_config(&source.config, dtype, outdir.path())?,
        None => Manifest {
            format_version: crate::manifest::required_version(crate::manifest::graph_features(
                &graph,
                CodeKind::Dynamic,
            )),
            arch: arch.to_string(),
            block_size: block.get() as i64,
            code: CodeKind::Dynamic,
            octet_version: env!("CARGO_PKG_VERSION").to_string(),
            source: [
                source.store.path(),
                &source.config_origin(),
                &adapter.join(ADAPTER_CONFIG),
                &ad.weights,
            ]
            .into_iter()
            .map(SourceFile::describe)
            .collect::<Result<_>>()?,
            four_bit: (opts.format == MergeFormat::Octet4)
                .then(|| four_bit_options(model))
                .transpose()?
                .map(|fb| FourBitRecord {
                    bits: 4,
                    code: fb.code,
                    block_size: fb.block as i64,
                }),
            tensors: errors.clone(),
            calibration: None,
        }
        .write(outdir.path())?,
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
        arch: arch.to_string(),
        format: opts.format,
        merged,
        replaced,
        requantized: errors,
        bytes_written,
    })
}

/// Writes the merged weights of every module of `graph` into `dir/model.safetensors`;
/// returns the re-quantization error of each 8-bit weight written.
fn write_merged(
    source: &ModelSource,
    graph: &ModuleGraph,
    ad: &Adapter,
    block: BlockSize,
    opts: &MergeOptions,
    dir: &Path,
) -> Result<Vec<TensorError>> {
    let mut meta = vec![("format".to_string(), "pt".to_string())];
    if matches!(opts.format, MergeFormat::Octet8 | MergeFormat::Octet4) {
        meta.push(("octet_arch".to_string(), source.arch.name().to_string()));
    }
    let plan = graph.tensor_plan();
    let mut w = SafetensorsWriter::create(&dir.join("model.safetensors"), &plan, &meta)?;
    let store = source.store.as_ref();
    let mut merger = Merger {
        store,
        config: &ad.config,
        block,
        device: opts.device,
        four_bit: four_bit_options(&source.path)?,
        errors: Vec::new(),
    };
    for (s, t) in source.graph.nodes.iter().zip(&graph.nodes) {
        for (name, bytes) in merger.module_outputs(s, t, ad.modules.get(&s.path))? {
            check_output(t, &name, &bytes)?;
            w.write(&t.tensor_name(&name), &bytes)?;
        }
        for p in &s.params {
            store.release(&s.tensor_name(&p.name));
        }
    }
    w.finish()?;
    Ok(merger.errors)
}

/// Writes the base's config with its dtype entries set to what the weights are stored in.
fn write_hf_config(config: &serde_json::Value, dtype: Dtype, dir: &Path) -> Result<()> {
    let mut cfg = config.clone();
    set_config_dtype(
        &mut cfg,
        if dtype == Dtype::F16 {
            "float16"
        } else {
            "float32"
        },
    );
    let p = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
    std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
}
