//! Writing a Hugging Face checkpoint (safetensors + config + tokenizer) from any model folder,
//! with 8-bit modules de-quantized: what transformers loads directly.
use crate::error::{OctetError, Result};
use crate::io::open_checkpoint;
use crate::load::{read_config, read_tensor, resolve_arch};
use crate::nn::{kinds, ModuleGraph};
use crate::outdir::{copy_side_files, OutputDir};

use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Float tensors of a model folder, 8-bit modules de-quantized to `kind`, others cast to it.
/// `edit` may change each module's tensors (e.g. merge an adapter) before they are written.
pub fn export_hf(
    model: &Path,
    out: &Path,
    kind: Kind,
    force: bool,
    mut edit: impl FnMut(&str, &mut BTreeMap<String, Tensor>) -> Result<()>,
) -> Result<std::path::PathBuf> {
    let config = read_config(model)?;
    let arch = resolve_arch(model, "auto", &config)?;
    let outdir = OutputDir::create(out, force, &[model])?;
    let store = open_checkpoint(model)?;
    let graph = ModuleGraph::from_store(store.as_ref(), arch.spec())?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for node in &graph.nodes {
        let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
        for p in &node.params {
            params.insert(
                p.name.clone(),
                read_tensor(store.as_ref(), &node.tensor_name(&p.name))?,
            );
        }
        if let Some(rep) = kinds::quantized_param(&node.kind) {
            let q = params
                .remove(rep)
                .ok_or_else(|| OctetError::InvalidArgument(format!("{}: no {rep}", node.path)))?;
            let absmax = params
                .remove("absmax")
                .ok_or_else(|| OctetError::InvalidArgument(format!("{}: no absmax", node.path)))?;
            let code = params
                .remove("code")
                .ok_or_else(|| OctetError::InvalidArgument(format!("{}: no code", node.path)))?;
            let w = crate::nn::bnb8::stored_quantized(&node.path, q, absmax, &code)
                .map_err(|e| OctetError::bad_file(store.path(), e.to_string()))?
                .dequantize(Kind::Float)?;
            params.insert(rep.to_string(), w);
        }
        for t in params.values_mut() {
            if t.is_floating_point() {
                *t = t.to_kind(Kind::Float);
            }
        }
        edit(&node.path, &mut params)?;
        for (name, t) in params {
            let t = if t.is_floating_point() {
                t.to_kind(kind)
            } else {
                t
            };
            tensors.push((node.tensor_name(&name), t));
        }
    }
    crate::io::safetensors::save_tensors(
        &outdir.path().join("model.safetensors"),
        &tensors,
        &[("format".into(), "pt".into())],
    )?;
    copy_side_files(model, outdir.path())?;
    outdir.commit()
}
