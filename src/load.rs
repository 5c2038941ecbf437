//! Loading a model folder (Hugging Face, octet-converted, or GPT-J 8-bit .bin) into a runnable
//! model, optionally quantizing float modules module by module as they are read.
use crate::arch::Architecture;
use crate::error::{OctetError, Result};
use crate::io::TensorStore;
use crate::model::CausalLm;
use crate::nn::q8::Q8Weight;
use crate::nn::{kinds, LayerMap, LayerTensors, ModuleGraph, Node};
use crate::quant::{BlockSize, CodeKind};
use crate::source::{config_origin, ModelSource};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

// The quantization policy lives with the 8-bit weight; re-exported for the loader's callers.
pub use crate::nn::q8::{choose_code, QuantizeOptions};

/// Options of [`load_model`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// `auto` or a registry name.
    pub arch: String,
    /// Compute dtype.
    pub kind: Kind,
    /// Device to put the model on.
    pub device: Device,
    /// Quantize float modules the spec selects while loading.
    pub quantize: Option<QuantizeOptions>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            arch: "auto".into(),
            kind: Kind::Float,
            device: Device::Cpu,
            quantize: None,
        }
    }
}

/// A loaded model and what it was made from.
pub struct LoadedModel {
    /// The plugin that built it.
    pub arch: &'static dyn Architecture,
    /// The module graph of what was built.
    pub graph: ModuleGraph,
    /// The parsed config.json.
    pub config: serde_json::Value,
    /// The model.
    pub model: Box<dyn CausalLm>,
    /// The folder it came from.
    pub dir: PathBuf,
}

/// Builds one module's layer: reads its tensors, quantizing the weight when `target` is an
/// 8-bit kind and the stored module is float.
fn build_node(
    store: &dyn TensorStore,
    stored: &Node,
    target: &Node,
    block: BlockSize,
    code: CodeKind,
) -> Result<Box<dyn crate::nn::Layer>> {
    let mut tensors = BTreeMap::new();
    let rep = (stored.kind != target.kind)
        .then(|| kinds::replacement_for(&stored.kind))
        .flatten();
    for p in &stored.params {
        let name = stored.tensor_name(&p.name);
        if rep.is_some_and(|r| r.quantized_param == p.name) {
            let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
            let x = Tensor::f_from_slice(&store.f32_values(&name)?)?.f_reshape(shape.as_slice())?;
            for (pname, t) in Q8Weight::quantize(&x, block, code)?.tensors() {
                tensors.insert(pname, t);
            }
        } else {
            tensors.insert(p.name.clone(), store.tensor(&name)?);
        }
        store.release(&name);
    }
    let kind = kinds::layer_kind(&target.kind).ok_or_else(|| {
        OctetError::InvalidArgument(format!(
            "module {}: no layer kind {} is registered",
            target.path, target.kind
        ))
    })?;
    (kind.build)(target, LayerTensors::new(&target.path, tensors))
        .map_err(|e| OctetError::bad_file(store.path(), e.to_string()))
}

/// Loads the model in `dir`.
pub fn load_model(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let ModelSource {
        config,
        arch,
        store,
        graph: stored,
        ..
    } = ModelSource::open(dir, &opts.arch)?;
    crate::memory::ensure_fits(
        &format!("loading the model in {}", dir.display()),
        crate::sizes::model_bytes(&config, &stored),
        Device::Cpu,
        "check the config's sizes, or use a smaller model",
    )?;
    let mut graph = stored.clone();
    let (block, code) = match &opts.quantize {
        Some(q) => (q.apply(&mut graph, arch.spec()).0, q.code),
        None => (arch.spec().block_size, CodeKind::Dynamic),
    };
    if let Device::Cuda(_) = opts.device {
        // Refuse before reading a byte rather than fail deep inside the first step. The
        // estimate is the weights as they will sit on the device (8-bit where quantized).
        crate::memory::ensure_fits(
            &format!("the model {}", dir.display()),
            graph.nbytes() as u64,
            opts.device,
            "quantize it to 8-bit (octet convert, or --quantize), or use --device cpu",
        )?;
    }
    let mut layers = LayerMap::default();
    for (s, t) in stored.nodes.iter().zip(&graph.nodes) {
        let mut layer = build_node(store.as_ref(), s, t, block, code)?;
        layer.to_device(opts.device);
        layers.insert(t.path.clone(), layer);
    }
    let model = arch
        .build(&config, &mut layers, opts.kind)
        .map_err(|e| e.in_config(&config_origin(dir)))?;
    Ok(LoadedModel {
        arch,
        graph,
        config,
        model,
        dir: dir.to_path_buf(),
    })
}
