//! Writing a Hugging Face checkpoint (safetensors + config + tokenizer) from any model folder,
//! with 8-bit modules de-quantized: what transformers loads directly.
use crate::error::Result;
use crate::io::open_checkpoint;
use crate::load::{read_config, resolve_arch};
use crate::nn::q8::Q8Weight;
use crate::nn::ModuleGraph;
use crate::outdir::{copy_side_files, OutputDir};

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
    let config = read_config(model)?;
    let arch = resolve_arch(model, "auto", &config)?;
    let outdir = OutputDir::create(out, force, &[model])?;
    let store = open_checkpoint(model)?;
    let graph = ModuleGraph::from_store(store.as_ref(), arch.spec())?;
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
    copy_side_files(model, outdir.path())?;
    outdir.commit()
}
