//! Writing a Hugging Face checkpoint (safetensors + config + tokenizer) from any model folder,
//! with 8-bit modules de-quantized: what transformers loads directly.
use crate::error::Result;
use crate::nn::q8::Q8Weight;
use crate::outdir::OutputDir;
use crate::source::ModelSource;

use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

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
        let mut params = Q8Weight::read_module_f32(store.as_ref(), node, Device::Cpu)?;
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
