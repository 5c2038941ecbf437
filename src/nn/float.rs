//! Float layers as found in Hugging Face checkpoints: Linear, Embedding, LayerNorm.
use super::kinds::{LayerKind, Replacement};
use super::layer::AdapterShape;
use super::layer::{check_params, expect_weight_shape, Layer, LayerMap, LayerTensors};
use super::node::Node;
use crate::error::Result;
use tch::{Device, Tensor};

/// `y = x Wᵀ + b`, weight `[out, in]`, cast to the activations' dtype per call.
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, if any.
    pub bias: Option<Tensor>,
}

/// `t` in `kind`, without a copy when it already is (weights cast to the activations' dtype).
pub(crate) fn in_kind(t: &Tensor, kind: tch::Kind) -> Result<Tensor> {
    Ok(if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.f_to_kind(kind)?
    })
}

/// `x · W (+ bias)` over the last dimension of `x` for `W` stored `[in, out]` (GPT-2's
/// `Conv1D`), with `addmm` as transformers computes it; `W` already in `x`'s dtype.
pub(crate) fn linear_in_out(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut out_shape = x.size();
    let n_in = out_shape.pop().unwrap_or(1);
    out_shape.push(w.size()[1]);
    let x2 = x.f_reshape([-1, n_in])?;
    let y = match bias {
        Some(b) => Tensor::f_addmm(&in_kind(b, x.kind())?, &x2, w)?,
        None => x2.f_matmul(w)?,
    };
    Ok(y.f_reshape(out_shape.as_slice())?)
}

/// Shared by the linear-like layers: the bias as a trainable tensor (or frozen again).
pub(crate) fn set_bias_trainable(bias: &mut Option<Tensor>, on: bool) -> bool {
    match bias {
        Some(b) => {
            *b = b.detach().set_requires_grad(on);
            true
        }
        None => false,
    }
}

/// The bias under its PEFT name when it is being trained.
pub(crate) fn trainable_bias(bias: &Option<Tensor>) -> Vec<(String, Tensor)> {
    bias.iter()
        .filter(|b| b.requires_grad())
        .map(|b| ("bias".to_string(), b.shallow_clone()))
        .collect()
}

impl Layer for Linear {
    fn kind(&self) -> &'static str {
        "Linear"
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.kind();
        let b = self.bias.as_ref().map(|b| in_kind(b, k)).transpose()?;
        Ok(x.f_linear(&in_kind(&self.weight, k)?, b.as_ref())?)
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("weight".to_string(), self.weight.shallow_clone())];
        if let Some(b) = &self.bias {
            v.push(("bias".into(), b.shallow_clone()));
        }
        v
    }
    fn to_device(&mut self, device: Device) {
        self.weight = self.weight.to_device(device);
        self.bias = self.bias.as_ref().map(|b| {
            b.to_device(device)
                .detach()
                .set_requires_grad(b.requires_grad())
        });
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        let s = self.weight.size();
        Some(AdapterShape::Linear {
            in_features: s[1] as usize,
            out_features: s[0] as usize,
        })
    }
    fn train_bias(&mut self, on: bool) -> bool {
        set_bias_trainable(&mut self.bias, on)
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        trainable_bias(&self.bias)
    }
    fn store_frozen_in(&mut self, kind: tch::Kind) {
        if let Some(w) = super::layer::frozen_in(&self.weight, kind) {
            self.weight = w;
        }
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// A lookup table `[vocab, dim]`; returns rows in the table's dtype.
pub struct Embedding {
    /// `[vocab, dim]`.
    pub weight: Tensor,
}

impl Layer for Embedding {
    fn kind(&self) -> &'static str {
        "Embedding"
    }
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        super::ids::check_token_tensor(ids, self.weight.size()[0], "the model's input")?;
        Ok(Tensor::f_embedding(&self.weight, ids, -1, false, false)?)
    }
    fn store_frozen_in(&mut self, kind: tch::Kind) {
        if let Some(w) = super::layer::frozen_in(&self.weight, kind) {
            self.weight = w;
        }
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![("weight".into(), self.weight.shallow_clone())]
    }
    fn to_device(&mut self, device: Device) {
        self.weight = self.weight.to_device(device);
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        let s = self.weight.size();
        Some(AdapterShape::Embedding {
            vocab: s[0] as usize,
            dim: s[1] as usize,
        })
    }
}

/// Layer normalisation over the last dimension, computed in f32.
pub struct LayerNorm {
    /// Scale `[dim]`.
    pub weight: Tensor,
    /// Shift `[dim]`.
    pub bias: Option<Tensor>,
    /// Epsilon; set by the architecture from its config.
    pub eps: f64,
}

impl Layer for LayerNorm {
    fn kind(&self) -> &'static str {
        "LayerNorm"
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.weight.size();
        let xf = x.f_to_kind(tch::Kind::Float)?;
        Ok(xf
            .f_layer_norm(
                d.as_slice(),
                Some(&self.weight),
                self.bias.as_ref(),
                self.eps,
                false,
            )?
            .f_to_kind(x.kind())?)
    }
    fn set_training(&mut self, _on: bool) {}
    fn trainable(&self) -> Vec<(String, Tensor)> {
        self.tensors()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("weight".to_string(), self.weight.shallow_clone())];
        if let Some(b) = &self.bias {
            v.push(("bias".into(), b.shallow_clone()));
        }
        v
    }
    fn to_device(&mut self, device: Device) {
        let keep = self.weight.requires_grad();
        self.weight = self
            .weight
            .to_device(device)
            .detach()
            .set_requires_grad(keep);
        self.bias = self
            .bias
            .as_ref()
            .map(|b| b.to_device(device).detach().set_requires_grad(keep));
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

impl LayerNorm {
    /// Makes the scale and shift trainable (or frozen again).
    pub fn set_trainable(&mut self, on: bool) {
        self.weight = self.weight.detach().set_requires_grad(on);
        self.bias = self.bias.as_ref().map(|b| b.detach().set_requires_grad(on));
    }
}

fn f32_tensor(t: Tensor) -> Tensor {
    if t.is_floating_point() && t.kind() != tch::Kind::Float {
        t.to_kind(tch::Kind::Float)
    } else {
        t
    }
}

fn check_linear(node: &Node) -> std::result::Result<(), String> {
    check_params(node, &[("weight", 2)], &[("bias", 1)])?;
    let w = &node.param("weight").ok_or("no weight")?.shape;
    match node.param("bias") {
        Some(b) if b.shape[0] != w[0] => Err(format!(
            "bias has {} entries for {} outputs",
            b.shape[0], w[0]
        )),
        _ => Ok(()),
    }
}

fn build_linear(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    Ok(Box::new(Linear {
        weight: f32_tensor(t.take("weight")?),
        bias: t.take_opt("bias").map(f32_tensor),
    }))
}

fn check_embedding(node: &Node) -> std::result::Result<(), String> {
    check_params(node, &[("weight", 2)], &[])
}

fn build_embedding(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    Ok(Box::new(Embedding {
        weight: f32_tensor(t.take("weight")?),
    }))
}

fn check_norm(node: &Node) -> std::result::Result<(), String> {
    check_params(node, &[("weight", 1)], &[("bias", 1)])
}

fn build_norm(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    Ok(Box::new(LayerNorm {
        weight: f32_tensor(t.take("weight")?),
        bias: t.take_opt("bias").map(f32_tensor),
        eps: 1e-5,
    }))
}

inventory::submit! { LayerKind { name: "Linear", check: check_linear, build: build_linear } }
inventory::submit! { LayerKind { name: "Embedding", check: check_embedding, build: build_embedding } }
inventory::submit! { LayerKind { name: "LayerNorm", check: check_norm, build: build_norm } }
inventory::submit! { Replacement { from: "Linear", to: "Bnb8Linear", quantized_param: "weight" } }
inventory::submit! { Replacement { from: "Embedding", to: "Bnb8Embedding", quantized_param: "weight" } }

// The LayerNorm lookup lives beside LayerNorm, so the layer map needs no float layer.
impl LayerMap {
    /// Takes the LayerNorm at `path`, checking its width and setting its epsilon from the config.
    pub fn take_layer_norm(&mut self, path: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        let mut n: LayerNorm = self.take_as(path)?;
        expect_weight_shape(path, &n, &[dim])?;
        n.eps = eps;
        Ok(n)
    }
}
