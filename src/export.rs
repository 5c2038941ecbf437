//! Writing a Hugging Face checkpoint (safetensors + config + tokenizer) from any model folder,
//! with 8-bit modules de-quantized: what transformers loads directly.
use crate::error::{OctetError, Result};
use crate::load::read_tensor;
use crate::nn::registry;
use crate::outdir::OutputDir;
use crate::source::ModelSource;

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
    let source = ModelSource::open(model, "auto")?;
    let outdir = OutputDir::create(out, force, &[model])?;
    let (store, graph) = (&source.store, &source.graph);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for node in &graph.nodes {
        let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
        for p in &node.params {
            params.insert(
                p.name.clone(),
                read_tensor(store.as_ref(), &node.tensor_name(&p.name))?,
            );
        }
        if let Some(rep) = inventory_from(&node.kind) {
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
    source.write_side_files(outdir.path())?;
    outdir.commit()
}

/// The quantized parameter of an 8-bit kind, if `kind` is one.
fn inventory_from(kind: &str) -> Option<&'static str> {
    inventory::iter::<registry::Replacement>
        .into_iter()
        .find(|r| r.to == kind)
        .map(|r| r.quantized_param)
}
