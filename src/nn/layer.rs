//! The runtime side of a module: a [`Layer`] built from its tensors.
use crate::error::{OctetError, Result};
use std::collections::BTreeMap;
use tch::{Device, Tensor};

/// Shape information a layer exposes so an adapter can be attached to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterShape {
    /// A projection from `in_features` to `out_features`.
    Linear {
        /// Input width.
        in_features: usize,
        /// Output width.
        out_features: usize,
    },
    /// A lookup table of `vocab` rows of width `dim`.
    Embedding {
        /// Rows.
        vocab: usize,
        /// Row width.
        dim: usize,
    },
}

/// A built module. Layers are called with activations of the compute dtype and return the
/// same dtype; frozen weights are converted (or de-quantized) to it just in time.
pub trait Layer: Send {
    /// The kind name (the name its layer kind is registered under).
    fn kind(&self) -> &'static str;
    /// Applies the layer: a projection of `x`, or an embedding lookup when `x` holds ids. An
    /// input that does not fit (a width, an id past the table) is an error, not a panic.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The tensors the layer holds, under their parameter names (shallow clones).
    fn tensors(&self) -> Vec<(String, Tensor)>;
    /// Moves every tensor to `device`.
    fn to_device(&mut self, device: Device);
    /// The layer as `Any`, for architecture code that needs the concrete type.
    fn as_any(&self) -> &dyn std::any::Any;
    /// The boxed layer as `Any`, to take ownership of the concrete type.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
    /// How a LoRA adapter attaches to this layer, if it can.
    fn adapter_shape(&self) -> Option<AdapterShape> {
        None
    }
    /// The device the layer's tensors live on.
    fn device(&self) -> Device {
        self.tensors()
            .first()
            .map_or(Device::Cpu, |(_, t)| t.device())
    }
    /// Switches training behaviour (dropout) on or off.
    fn set_training(&mut self, _on: bool) {}
    /// Tensors being trained, under their PEFT-style names relative to the module path.
    fn trainable(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// Makes the bias trainable (or frozen again); false when the layer has no bias.
    fn train_bias(&mut self, _on: bool) -> bool {
        false
    }
    /// Stores frozen float weights in `kind` (the compute dtype), so a bf16 run does not cast
    /// every f32 weight on every call. 8-bit weights, biases and trained tensors are unchanged.
    fn store_frozen_in(&mut self, _kind: tch::Kind) {}
    /// `forward(x)` plus the low-rank update `scale·(x·Aᵀ)·Bᵀ` in one pass, when the layer has
    /// such a path for `x` (an 8-bit linear given a few rows and no gradient to track); `None`
    /// leaves the update to the caller. Only called where no autograd graph is built.
    fn forward_plus_low_rank(
        &self,
        _x: &Tensor,
        _update: &crate::quant::LowRank,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// `weight` in `kind` when it is a frozen floating-point tensor of another dtype.
pub(crate) fn frozen_in(weight: &Tensor, kind: tch::Kind) -> Option<Tensor> {
    (weight.is_floating_point() && !weight.requires_grad() && weight.kind() != kind)
        .then(|| weight.to_kind(kind))
}

/// A placeholder left briefly in a slot while its layer is being wrapped.
pub struct Vacant;

impl Layer for Vacant {
    fn kind(&self) -> &'static str {
        "Vacant"
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.shallow_clone())
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn to_device(&mut self, _device: Device) {}
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// A module's tensors by parameter name, handed to a layer kind's `build`.
pub struct LayerTensors {
    path: String,
    tensors: BTreeMap<String, Tensor>,
}

impl LayerTensors {
    /// Wraps the tensors of module `path`.
    pub fn new(path: impl Into<String>, tensors: BTreeMap<String, Tensor>) -> Self {
        LayerTensors {
            path: path.into(),
            tensors,
        }
    }

    /// Takes a required tensor.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors.remove(name).ok_or_else(|| {
            OctetError::InvalidArgument(format!("module {} has no tensor '{name}'", self.path))
        })
    }

    /// Takes an optional tensor.
    pub fn take_opt(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// The module path.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Built layers by module path; an architecture takes the ones it needs.
#[derive(Default)]
pub struct LayerMap {
    layers: BTreeMap<String, Box<dyn Layer>>,
}

impl LayerMap {
    /// Adds the layer for `path`.
    pub fn insert(&mut self, path: String, layer: Box<dyn Layer>) {
        self.layers.insert(path, layer);
    }

    /// Takes the layer at `path`; an error names the missing module.
    pub fn take(&mut self, path: &str) -> Result<Box<dyn Layer>> {
        self.layers.remove(path).ok_or_else(|| {
            OctetError::InvalidArgument(format!("the checkpoint has no module {path}"))
        })
    }

    /// Takes the layer at `path` as concrete type `T`; an error names the module and the kind
    /// found.
    pub fn take_as<T: Layer + 'static>(&mut self, path: &str) -> Result<T> {
        let layer = self.take(path)?;
        let kind = layer.kind();
        layer.into_any().downcast::<T>().map(|b| *b).map_err(|_| {
            OctetError::InvalidArgument(format!(
                "module {path} is a {kind}, not the kind this architecture expects"
            ))
        })
    }

    /// Takes the layer at `path`, checking its weight against the shape config.json implies.
    pub fn take_checked(&mut self, path: &str, want: &[usize]) -> Result<Box<dyn Layer>> {
        let l = self.take(path)?;
        expect_weight_shape(path, l.as_ref(), want)?;
        Ok(l)
    }

    /// Paths not taken yet.
    pub fn remaining(&self) -> Vec<&str> {
        self.layers.keys().map(String::as_str).collect()
    }
}

/// Checks that a module has exactly the tensors `required` (+ `optional`), with the given
/// ranks.
pub fn check_params(
    node: &super::node::Node,
    required: &[(&str, usize)],
    optional: &[(&str, usize)],
) -> std::result::Result<(), String> {
    for (name, rank) in required {
        match node.param(name) {
            None => return Err(format!("{} is missing tensor '{name}'", node.kind)),
            Some(p) if p.shape.len() != *rank => {
                return Err(format!(
                    "tensor '{name}' has shape {:?}, expected {rank} dimensions",
                    p.shape
                ))
            }
            _ => {}
        }
    }
    for p in &node.params {
        match required.iter().chain(optional).find(|(n, _)| *n == p.name) {
            None => {
                return Err(format!(
                    "unexpected tensor '{}' for a {}",
                    p.name, node.kind
                ))
            }
            Some((_, rank)) if p.shape.len() != *rank => {
                return Err(format!(
                    "tensor '{}' has shape {:?}, expected {rank} dimensions",
                    p.name, p.shape
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The shape of a layer's `weight` tensor (empty when it has none).
pub fn weight_shape(layer: &dyn Layer) -> Vec<i64> {
    layer
        .tensors()
        .into_iter()
        .find(|(n, _)| n == "weight")
        .map(|(_, t)| {
            let stored: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            super::q4::logical_weight_shape(layer.kind(), &stored)
                .iter()
                .map(|&d| d as i64)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks that `layer`'s weight has the shape config.json implies for module `path`.
pub fn expect_weight_shape(path: &str, layer: &dyn Layer, want: &[usize]) -> Result<()> {
    let got = weight_shape(layer);
    let want: Vec<i64> = want.iter().map(|&d| d as i64).collect();
    if got != want {
        return Err(OctetError::ShapeMismatch {
            what: format!("{path}.weight (against the config)"),
            expected: format!("{want:?}"),
            found: format!("{got:?}"),
        });
    }
    Ok(())
}
