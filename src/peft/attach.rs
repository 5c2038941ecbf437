//! LoRA adapters on a loaded model: fresh ones for training, or an adapter folder attached
//! for inference or to resume training.
use super::config::{AdapterConfig, PEFT_PREFIX};
use super::read::{Adapter, ModuleEdit};
use super::targets::Targets;
use crate::error::{OctetError, Result};
use crate::io::Dtype;
use crate::model::CausalLm;
use crate::nn::float::LayerNorm;
use crate::nn::kinds::{layer_kind, replacement_to, Replacement};
use crate::nn::{Layer, LayerTensors, LoraConfig, LoraLayer, ModuleGraph, Node, ParamInfo, Vacant};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

/// Wraps every targeted layer of `model` with a fresh adapter. Returns the wrapped paths;
/// targets that match no adaptable module are an error listing the modules there are.
pub fn attach_lora(
    model: &mut dyn CausalLm,
    targets: &Targets,
    cfg: LoraConfig,
) -> Result<Vec<String>> {
    let mut wrapped = Vec::new();
    let mut all = Vec::new();
    let mut failure = None;
    model.visit_layers(&mut |path, layer| {
        all.push(path.to_string());
        if failure.is_some() || !targets.matches(path) || layer.adapter_shape().is_none() {
            return;
        }
        let base = std::mem::replace(layer, Box::new(Vacant));
        match LoraLayer::wrap(base, cfg) {
            Ok(l) => {
                *layer = Box::new(l);
                wrapped.push(path.to_string());
            }
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if wrapped.is_empty() {
        return Err(OctetError::InvalidArgument(format!(
            "targets '{targets}' match no module; modules are: {}",
            all.join(", ")
        )));
    }
    Ok(wrapped)
}

/// Makes norms and/or biases trainable; returns how many tensors that added.
pub fn train_extras(model: &mut dyn CausalLm, norms: bool, biases: bool) -> usize {
    let mut n = 0;
    if biases {
        model.visit_layers(&mut |_, layer| {
            if layer.train_bias(true) {
                n += 1;
            }
        });
    }
    if norms {
        model.visit_norms(&mut |_, norm| {
            norm.set_trainable(true);
            n += 1;
        });
    }
    n
}

/// Every trainable tensor with its full PEFT name.
pub fn trainable_tensors(model: &mut dyn CausalLm) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    model.visit_layers(&mut |path, layer| {
        for (name, t) in layer.trainable() {
            out.push((format!("{PEFT_PREFIX}{path}.{name}"), t));
        }
    });
    model.visit_norms(&mut |path, norm| {
        for (name, t) in norm.trainable() {
            out.push((format!("{PEFT_PREFIX}{path}.{name}"), t));
        }
    });
    out
}

/// Loads the PEFT adapter folder `dir` onto `model`, by the same rules `octet merge` folds it
/// in: its tensors are read ([`Adapter::read`]) and checked against the model's modules
/// ([`Adapter::check_fits`]) before anything changes; then replaced parameters (trained
/// biases and norms, `modules_to_save`) are set and each LoRA pair wraps its module.
pub fn load_adapter(model: &mut dyn CausalLm, dir: &Path) -> Result<AdapterConfig> {
    let adapter = Adapter::read(dir)?;
    adapter.check_fits(&model_graph(model)?, "this model")?;
    let Adapter {
        config,
        weights,
        mut modules,
    } = adapter;
    let lora = config.lora();
    let mut failure = None;
    model.visit_layers(&mut |path, layer| {
        if let (None, Some(edit)) = (&failure, modules.remove(path)) {
            failure = apply_to_layer(layer, path, edit, lora).err();
        }
    });
    model.visit_norms(&mut |path, norm| {
        if let (None, Some(edit)) = (&failure, modules.remove(path)) {
            failure = apply_to_norm(norm, path, edit).err();
        }
    });
    if let Some(e) = failure {
        return Err(OctetError::bad_file(&weights, e.to_string()));
    }
    if let Some(path) = modules.keys().next() {
        return Err(OctetError::bad_file(
            &weights,
            format!("{path} matches no module of this model"),
        ));
    }
    Ok(config)
}

/// The module graph of a built model (its layers and norms, as they hold their tensors now),
/// for checking an adapter against it.
fn model_graph(model: &mut dyn CausalLm) -> Result<ModuleGraph> {
    let mut nodes = Vec::new();
    let mut failure = None;
    model.visit_layers(
        &mut |path, layer| match node_of(path, layer.kind(), layer.tensors()) {
            Ok(n) => nodes.push(n),
            Err(e) => failure = Some(e),
        },
    );
    model.visit_norms(&mut |path, norm| {
        let mut tensors = vec![("weight".to_string(), norm.weight.shallow_clone())];
        tensors.extend(
            norm.bias
                .as_ref()
                .map(|b| ("bias".to_string(), b.shallow_clone())),
        );
        match node_of(path, norm.kind(), tensors) {
            Ok(n) => nodes.push(n),
            Err(e) => failure = Some(e),
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(ModuleGraph { nodes }),
    }
}

fn node_of(path: &str, kind: &str, tensors: Vec<(String, Tensor)>) -> Result<Node> {
    let params = tensors
        .iter()
        .map(|(name, t)| {
            Ok(ParamInfo {
                name: name.clone(),
                dtype: Dtype::from_kind(t.kind())?,
                shape: t.size().iter().map(|&d| d as usize).collect(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Node {
        path: path.to_string(),
        kind: kind.to_string(),
        params,
    })
}

/// Sets a layer's replaced parameters, then wraps it with its LoRA pair.
fn apply_to_layer(
    layer: &mut Box<dyn Layer>,
    path: &str,
    edit: ModuleEdit,
    lora: LoraConfig,
) -> Result<()> {
    if !edit.replace.is_empty() {
        replace_params(layer, path, edit.replace)?;
    }
    if let Some(l) = edit.lora {
        let base = std::mem::replace(layer, Box::new(Vacant));
        *layer = Box::new(LoraLayer::with_weights(base, lora, l.a, l.b, path)?);
    }
    Ok(())
}

/// Copies trained values into a layer's tensors. A new value for an 8-bit weight (a
/// `modules_to_save` module) makes the layer float again, as merge does before re-quantizing.
fn replace_params(
    layer: &mut Box<dyn Layer>,
    path: &str,
    replace: BTreeMap<String, (String, Tensor)>,
) -> Result<()> {
    if let Some(rep) =
        replacement_to(layer.kind()).filter(|r| replace.contains_key(r.quantized_param))
    {
        *layer = float_layer(layer.as_ref(), path, rep, replace)?;
        return Ok(());
    }
    let current: BTreeMap<String, Tensor> = layer.tensors().into_iter().collect();
    for (param, (name, value)) in replace {
        let mut slot = current
            .get(&param)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| {
                OctetError::InvalidArgument(format!("tensor {name}: {path} has no {param}"))
            })?;
        tch::no_grad(|| slot.f_copy_(&value.f_to_kind(slot.kind())?))?;
    }
    Ok(())
}

/// The float layer of an 8-bit `layer` with its quantized weight (and any other parameter)
/// replaced by the adapter's values.
fn float_layer(
    layer: &dyn Layer,
    path: &str,
    rep: &Replacement,
    replace: BTreeMap<String, (String, Tensor)>,
) -> Result<Box<dyn Layer>> {
    let device = layer.device();
    let mut tensors: BTreeMap<String, Tensor> = layer
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "absmax" && n != "code" && n != rep.quantized_param)
        .map(|(n, t)| (n, t.to_device(tch::Device::Cpu)))
        .collect();
    tensors.extend(replace.into_iter().map(|(param, (_, t))| (param, t)));
    let node = node_of(
        path,
        rep.from,
        tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
    )?;
    let kind = layer_kind(rep.from).ok_or_else(|| {
        OctetError::InvalidArgument(format!("{path}: no layer kind {} is registered", rep.from))
    })?;
    let mut float = (kind.build)(&node, LayerTensors::new(path, tensors))?;
    float.to_device(device);
    Ok(float)
}

/// Sets a norm's trained weight and bias.
fn apply_to_norm(norm: &mut LayerNorm, path: &str, edit: ModuleEdit) -> Result<()> {
    for (param, (name, value)) in edit.replace {
        let slot = match param.as_str() {
            "weight" => Some(&mut norm.weight),
            "bias" => norm.bias.as_mut(),
            _ => None,
        }
        .ok_or_else(|| {
            OctetError::InvalidArgument(format!("tensor {name}: {path} has no {param}"))
        })?;
        *slot = value
            .f_to_kind(tch::Kind::Float)?
            .f_to_device(slot.device())?;
    }
    Ok(())
}
