//! Writing models and LoRA adapters as llama.cpp GGUF files: `octet export` (an octet 8-bit or
//! Hugging Face folder, or a GGUF file), `octet merge --format gguf-*` (the same with an
//! adapter folded in) and `octet export-adapter --format gguf`.
//!
//! Names, the q/k row permutation and the metadata come from the architecture's
//! [`GgufMapping`], the same one that reads llama.cpp's files, run in the export direction.
//! Tensors stream one module at a time: each is read (8-bit de-quantized) in f32, merged,
//! permuted and converted to its GGUF type by [`GgufWriter`], which writes a temporary file
//! renamed into place only when complete.
use crate::error::{OctetError, Result};
use crate::io::gguf::{
    exported_architectures, mapping_exporting, tokenizer_metadata, GgmlType, GgufFile, GgufMapping,
    GgufTensorSpec, GgufValue, GgufWriter, IfExists,
};
use crate::io::TensorStore;
use crate::merge::{apply_edit, output_graph, MergeFormat, MergeReport};
use crate::nn::q8::Q8Weight;
use crate::peft::Adapter;
use crate::source::ModelSource;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The tensor types of an exported model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufFormat {
    /// Matrices in F16, vectors in F32.
    F16,
    /// Matrices in BF16, vectors in F32.
    Bf16,
    /// Matrices in Q8_0 (F16 where rows are not whole blocks of 32, as llama.cpp's converter
    /// falls back), vectors in F32.
    Q8_0,
}

impl GgufFormat {
    /// The command-line name (`gguf-f16`, `gguf-bf16`, `gguf-q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            GgufFormat::F16 => "gguf-f16",
            GgufFormat::Bf16 => "gguf-bf16",
            GgufFormat::Q8_0 => "gguf-q8_0",
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufFormat::F16 => 1,
            GgufFormat::Q8_0 => 7,
            GgufFormat::Bf16 => 32,
        }
    }

    /// The type a tensor of `shape` (outermost first) is stored in.
    pub fn tensor_type(self, shape: &[usize]) -> GgmlType {
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        match self {
            GgufFormat::F16 => GgmlType::F16,
            GgufFormat::Bf16 => GgmlType::BF16,
            GgufFormat::Q8_0 if shape[shape.len() - 1].is_multiple_of(32) => GgmlType::Q8_0,
            GgufFormat::Q8_0 => GgmlType::F16,
        }
    }
}

impl std::str::FromStr for GgufFormat {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gguf-f16" => Ok(GgufFormat::F16),
            "gguf-bf16" => Ok(GgufFormat::Bf16),
            "gguf-q8_0" => Ok(GgufFormat::Q8_0),
            other => Err(OctetError::InvalidArgument(format!(
                "unknown GGUF format '{other}': expected gguf-f16, gguf-bf16 or gguf-q8_0"
            ))),
        }
    }
}

impl std::fmt::Display for GgufFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct GgufReport {
    /// The file written.
    pub out: PathBuf,
    /// The octet architecture of the source.
    pub arch: String,
    /// `general.architecture` written.
    pub gguf_arch: String,
    /// Tensors written, with their types.
    pub tensors: Vec<(String, GgmlType)>,
    /// Modules whose weight received a LoRA update (merges only).
    pub merged: Vec<String>,
    /// Size of the file.
    pub bytes: u64,
}

/// The mapping that writes `source`'s architecture, or the refusal naming the ones octet
/// writes.
fn exporting(source: &ModelSource) -> Result<&'static dyn GgufMapping> {
    let arch = source.arch.name();
    mapping_exporting(arch).ok_or_else(|| {
        OctetError::InvalidArgument(format!(
            "{}: octet cannot export '{arch}' models to GGUF (llama.cpp has no such \
             architecture, or octet does not write it); it exports {}",
            source.path.display(),
            exported_architectures().join(", ")
        ))
    })
}

/// Head counts of a config (query heads, key/value heads), for the q/k permutation.
fn head_counts(config: &serde_json::Value) -> (usize, usize) {
    let heads = config["num_attention_heads"].as_u64().unwrap_or(1) as usize;
    let kv = config["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |v| v as usize);
    (heads, kv)
}

/// `general.*` keys every export writes.
fn general(name: &str, gguf_arch: &str, kind: &str) -> Vec<(String, GgufValue)> {
    vec![
        (
            "general.architecture".into(),
            GgufValue::Str(gguf_arch.into()),
        ),
        ("general.type".into(), GgufValue::Str(kind.into())),
        ("general.name".into(), GgufValue::Str(name.into())),
    ]
}

/// The name a model is known by: its folder's or file's name.
fn model_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The tokenizer metadata of a source: a GGUF file's own `tokenizer.*` keys, or a folder's
/// tokenizer files written as such, padded to the config's `vocab_size`. A folder without a
/// tokenizer gives none.
fn source_tokenizer(source: &ModelSource) -> Result<Vec<(String, GgufValue)>> {
    if source.is_gguf() {
        let file = GgufFile::open(&source.path)?;
        return Ok(file
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect());
    }
    let vocab_size = source.config["vocab_size"].as_u64().map(|v| v as usize);
    Ok(tokenizer_metadata(&source.path, vocab_size)?.unwrap_or_default())
}

/// A CPU f32 tensor's values.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    let t = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(tch::Kind::Float)?
        .f_contiguous()?;
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.f_copy_data(&mut v, n)?;
    Ok(v)
}

/// Writes the model at `model` (with the LoRA adapter at `adapter` folded in, if given) to
/// the GGUF file `out` in `format`. An existing `out` is refused unless `force` (and then only
/// a GGUF file is replaced); a failed export leaves nothing behind.
pub fn export_gguf(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    format: GgufFormat,
    force: bool,
    device: Device,
) -> Result<GgufReport> {
    let source = ModelSource::open(model, "auto")?;
    let mapping = exporting(&source)?;
    let ad = adapter.map(Adapter::read).transpose()?;
    if let Some(ad) = &ad {
        ad.check_fits(&source.graph, &format!("this {} model", source.arch.name()))?;
    }
    let (graph, _) = output_graph(model, &source.graph, source.arch, MergeFormat::HfF32)?;
    let heads = head_counts(&source.config);

    let settings = mapping.settings_tensors(&source.config)?;
    let mut plan: Vec<GgufTensorSpec> = settings
        .iter()
        .map(|(name, v)| GgufTensorSpec::new(name, GgmlType::F32, &[v.len()]))
        .collect();
    let mut raw_names = Vec::new();
    for node in &graph.nodes {
        let mut names = Vec::new();
        for p in &node.params {
            let hf = node.tensor_name(&p.name);
            let raw = mapping.gguf_tensor_name(&hf).ok_or_else(|| {
                OctetError::InvalidArgument(format!(
                    "{}: tensor {hf} has no place in a llama.cpp '{}' model",
                    model.display(),
                    mapping.gguf_name()
                ))
            })?;
            let shape = match mapping.transposed(&hf) {
                true => p.shape.iter().rev().copied().collect(),
                false => p.shape.clone(),
            };
            plan.push(GgufTensorSpec::new(
                &raw,
                format.tensor_type(&shape),
                &shape,
            ));
            names.push(raw);
        }
        raw_names.push(names);
    }

    let mut meta = general(&model_name(model), mapping.gguf_name(), "model");
    meta.extend(mapping.metadata(&source.config)?);
    meta.push((
        "general.file_type".into(),
        GgufValue::U32(format.file_type()),
    ));
    meta.push(("general.quantization_version".into(), GgufValue::U32(2)));
    meta.extend(source_tokenizer(&source)?);

    let if_exists = if force {
        IfExists::Replace
    } else {
        IfExists::Refuse
    };
    let mut inputs: Vec<&Path> = vec![model];
    inputs.extend(adapter);
    let mut w = GgufWriter::create(out, &meta, &plan, if_exists, &inputs)?;
    for (name, v) in &settings {
        w.write_f32(name, v)?;
    }
    let store: &dyn TensorStore = source.store.as_ref();
    let scale = ad.as_ref().map_or(1.0, |a| a.config.lora().scale());
    let fan_in_fan_out = ad.as_ref().is_some_and(|a| a.config.fan_in_fan_out);
    for ((s, t), names) in source.graph.nodes.iter().zip(&graph.nodes).zip(&raw_names) {
        let mut params = Q8Weight::read_module_f32(store, s, device)?;
        if let Some(edit) = ad.as_ref().and_then(|a| a.modules.get(&s.path)) {
            apply_edit(edit, "weight", &mut params, scale, fan_in_fan_out)?;
        }
        for (p, raw) in t.params.iter().zip(names) {
            let tensor = params.remove(&p.name).ok_or_else(|| {
                OctetError::bad_file(store.path(), format!("module {}: no {}", s.path, p.name))
            })?;
            let tensor = match mapping.transposed(&t.tensor_name(&p.name)) {
                true => tensor.f_transpose(0, 1)?,
                false => tensor,
            };
            let mut v = values(&tensor)?;
            drop(tensor);
            if let Some(h) = mapping.permuted_head_count(raw, heads.0, heads.1) {
                v = crate::io::gguf::permute_rows(&v, p.shape[0], h);
            }
            if let Some(order) = mapping.stored_row_order(raw, &source.config) {
                v = crate::io::gguf::gather_rows(&v, &order);
            }
            if let Some(offset) = mapping.stored_offset(raw) {
                v.iter_mut().for_each(|x| *x += offset);
            }
            w.write_f32(raw, &v)?;
        }
        for p in &s.params {
            store.release(&s.tensor_name(&p.name));
        }
    }
    let tensors = plan.iter().map(|t| (t.name.clone(), t.ty)).collect();
    let out = w.finish()?;
    let bytes = std::fs::metadata(&out)
        .map_err(|e| OctetError::io(&out, e))?
        .len();
    let merged = ad
        .map(|a| {
            a.modules
                .iter()
                .filter(|(_, e)| e.lora.is_some())
                .map(|(p, _)| p.clone())
                .collect()
        })
        .unwrap_or_default();
    Ok(GgufReport {
        out,
        arch: source.arch.name().to_string(),
        gguf_arch: mapping.gguf_name().to_string(),
        tensors,
        merged,
        bytes,
    })
}

/// `octet merge --format gguf-*`: [`export_gguf`] with the adapter, reported as a merge.
pub fn merge_to_gguf(
    model: &Path,
    adapter: &Path,
    out: &Path,
    merge_format: MergeFormat,
    format: GgufFormat,
    force: bool,
    device: Device,
) -> Result<MergeReport> {
    let r = export_gguf(model, Some(adapter), out, format, force, device)?;
    let ad = Adapter::read(adapter)?;
    let replaced = ad
        .modules
        .iter()
        .flat_map(|(path, e)| e.replace.keys().map(move |p| format!("{path}.{p}")))
        .collect();
    Ok(MergeReport {
        out: r.out,
        arch: r.arch,
        format: merge_format,
        merged: r.merged,
        replaced,
        requantized: Vec::new(),
        bytes_written: r.bytes,
    })
}

/// Writes the LoRA adapter at `adapter`, trained on the model at `model`, as a llama.cpp LoRA
/// GGUF (`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per target
/// `<name>.lora_a` / `<name>.lora_b` in llama.cpp's names), laid out as llama.cpp's
/// `convert_lora_to_gguf.py` lays out a PEFT adapter: `lora_a` is PEFT's A `[r, in]`,
/// `lora_b` its B `[out, r]` with the rows permuted as the target's weight rows are (Llama's
/// q/k), and an embedding's A transposed. llama.cpp scales by alpha / r, so an rsLoRA
/// adapter (alpha / √r) is written with alpha · √r. Tensors are stored in F32, exactly.
///
/// Refused: an adapter that does not fit the model (another base), one that replaces
/// parameters (trained biases or norms, `modules_to_save`: llama.cpp adapters hold only LoRA
/// pairs; merge it instead), and architectures octet does not export.
pub fn export_adapter_gguf(
    model: &Path,
    adapter: &Path,
    out: &Path,
    force: bool,
) -> Result<GgufReport> {
    let source = ModelSource::open(model, "auto")?;
    let mapping = exporting(&source)?;
    let ad = Adapter::read(adapter)?;
    ad.check_fits(&source.graph, &format!("this {} model", source.arch.name()))?;
    if let Some((path, e)) = ad.modules.iter().find(|(_, e)| !e.replace.is_empty()) {
        return Err(OctetError::bad_file(
            &ad.weights,
            format!(
                "{} replaces {path}.{} (a trained bias, norm or saved module), which a \
                 llama.cpp LoRA adapter cannot hold; fold it in with `octet merge --format \
                 gguf-f16` instead",
                e.first_name(),
                e.replace.keys().next().map_or("", |k| k.as_str())
            ),
        ));
    }
    if ad.modules.is_empty() {
        return Err(OctetError::bad_file(
            &ad.weights,
            "the adapter holds no LoRA pairs",
        ));
    }
    let lora = ad.config.lora();
    // llama.cpp scales by alpha / r: the alpha that gives the adapter's own scale.
    let alpha = lora.scale() * lora.r as f64;
    let heads = head_counts(&source.config);
    let mut plan = Vec::new();
    let mut pairs = Vec::new();
    for (path, e) in &ad.modules {
        let Some(l) = &e.lora else { continue };
        let hf = format!("{path}.weight");
        let raw = mapping.gguf_tensor_name(&hf).ok_or_else(|| {
            OctetError::bad_file(
                &ad.weights,
                format!("{}: {hf} has no place in a llama.cpp model", l.a_name),
            )
        })?;
        let a = if l.embedding {
            l.a.tr()
        } else {
            l.a.shallow_clone()
        };
        let mut b_vals = values(&l.b)?;
        let b_shape: Vec<usize> = l.b.size().iter().map(|&d| d as usize).collect();
        if let Some(h) = mapping.permuted_head_count(&raw, heads.0, heads.1) {
            b_vals = crate::io::gguf::permute_rows(&b_vals, b_shape[0], h);
        }
        if let Some(order) = mapping.stored_row_order(&raw, &source.config) {
            b_vals = crate::io::gguf::gather_rows(&b_vals, &order);
        }
        let a_shape: Vec<usize> = a.size().iter().map(|&d| d as usize).collect();
        plan.push(GgufTensorSpec::new(
            format!("{raw}.lora_a"),
            GgmlType::F32,
            &a_shape,
        ));
        plan.push(GgufTensorSpec::new(
            format!("{raw}.lora_b"),
            GgmlType::F32,
            &b_shape,
        ));
        pairs.push((raw, values(&a)?, b_vals));
    }
    let mut meta = general(&model_name(adapter), mapping.gguf_name(), "adapter");
    meta.push(("adapter.type".into(), GgufValue::Str("lora".into())));
    meta.push(("adapter.lora.alpha".into(), GgufValue::F32(alpha as f32)));
    meta.push(("general.quantization_version".into(), GgufValue::U32(2)));
    let if_exists = if force {
        IfExists::Replace
    } else {
        IfExists::Refuse
    };
    let mut w = GgufWriter::create(out, &meta, &plan, if_exists, &[model, adapter])?;
    for (raw, a, b) in &pairs {
        w.write_f32(&format!("{raw}.lora_a"), a)?;
        w.write_f32(&format!("{raw}.lora_b"), b)?;
    }
    let tensors = plan.iter().map(|t| (t.name.clone(), t.ty)).collect();
    let out = w.finish()?;
    let bytes = std::fs::metadata(&out)
        .map_err(|e| OctetError::io(&out, e))?
        .len();
    Ok(GgufReport {
        out,
        arch: source.arch.name().to_string(),
        gguf_arch: mapping.gguf_name().to_string(),
        tensors,
        merged: Vec::new(),
        bytes,
    })
}
