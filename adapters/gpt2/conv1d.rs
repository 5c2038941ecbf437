//! GPT-2's `Conv1D` (a linear layer whose weight is stored `[in, out]`) and its frozen 8-bit
//! form, registered from this plugin: the core knows nothing about either.
//!
//! The 8-bit form keeps the bytes in the checkpoint's `[in, out]` layout (blocks run along
//! that layout), so conversion, export and merge see the tensor exactly as Hugging Face stores
//! it. For LoRA both report `AdapterShape::Linear { in, out }`: `lora_A` is `[r, in]`,
//! `lora_B` `[out, r]` and the update applies to `x` as for any Linear — PEFT's
//! `fan_in_fan_out = true` semantics, where only merging transposes the delta.
use crate::error::Result;
use crate::nn::bnb8::infer_block_size;
use crate::nn::graph::Node;
use crate::nn::kinds::{LayerKind, Replacement};
use crate::nn::layer::check_params;
use crate::nn::{AdapterShape, Layer, LayerTensors};
use crate::quant::{Quantized, CODE_LEN};
use tch::{Device, Kind, Tensor};

/// `y = x·W + b` with `W` stored `[in, out]` (Hugging Face's `pytorch_utils.Conv1D`).
pub struct Conv1D {
    /// `[in, out]`.
    pub weight: Tensor,
    /// `[out]`, if any.
    pub bias: Option<Tensor>,
}

/// A [`Conv1D`] whose frozen `[in, out]` weight is blockwise 8-bit.
pub struct Bnb8Conv1D {
    /// The quantized `[in, out]` weight.
    pub weight: Quantized,
    /// `[out]`, if any (kept in float).
    pub bias: Option<Tensor>,
}

fn in_kind(t: &Tensor, k: Kind) -> Tensor {
    if t.kind() == k {
        t.shallow_clone()
    } else {
        t.to_kind(k)
    }
}

/// `x·W + b` over the last dimension of `x`, as transformers' `addmm` does it.
fn conv1d_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let k = x.kind();
    let mut out_shape = x.size();
    let n_in = out_shape.pop().unwrap_or(1);
    out_shape.push(w.size()[1]);
    let x2 = x.reshape([-1, n_in]);
    let y = match bias {
        Some(b) => Tensor::addmm(&in_kind(b, k), &x2, w),
        None => x2.matmul(w),
    };
    y.reshape(out_shape.as_slice())
}

/// Makes the bias trainable (or frozen again); false without a bias.
fn set_bias_trainable(bias: &mut Option<Tensor>, on: bool) -> bool {
    match bias {
        Some(b) => {
            *b = b.detach().set_requires_grad(on);
            true
        }
        None => false,
    }
}

/// The bias under its PEFT name while it is being trained.
fn trainable_bias(bias: &Option<Tensor>) -> Vec<(String, Tensor)> {
    bias.iter()
        .filter(|b| b.requires_grad())
        .map(|b| ("bias".to_string(), b.shallow_clone()))
        .collect()
}

fn bias_to_device(bias: &Option<Tensor>, device: Device) -> Option<Tensor> {
    bias.as_ref().map(|b| {
        b.to_device(device)
            .detach()
            .set_requires_grad(b.requires_grad())
    })
}

fn linear_shape(weight_shape: &[i64]) -> Option<AdapterShape> {
    match weight_shape {
        [n_in, n_out] => Some(AdapterShape::Linear {
            in_features: *n_in as usize,
            out_features: *n_out as usize,
        }),
        _ => None,
    }
}

impl Layer for Conv1D {
    fn kind(&self) -> &'static str {
        "Conv1D"
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        conv1d_forward(x, &in_kind(&self.weight, x.kind()), self.bias.as_ref())
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
        self.bias = bias_to_device(&self.bias, device);
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        linear_shape(&self.weight.size())
    }
    fn train_bias(&mut self, on: bool) -> bool {
        set_bias_trainable(&mut self.bias, on)
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        trainable_bias(&self.bias)
    }
    fn store_frozen_in(&mut self, kind: Kind) {
        if let Some(w) = crate::nn::layer::frozen_in(&self.weight, kind) {
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

impl Bnb8Conv1D {
    /// The `[in, out]` weight de-quantized to `kind` (into a reused buffer under
    /// [`crate::nn::scratch::inference`], where nothing outlives the multiplication).
    pub fn dequantized_weight(&self, kind: Kind) -> Tensor {
        if crate::nn::scratch::active() && self.weight.q.device() == Device::Cpu {
            let shape = self.weight.shape();
            return crate::nn::scratch::with_buffer(&shape, kind, |buf| {
                self.weight
                    .dequantize_into(buf)
                    .expect("8-bit weight validated when built");
            });
        }
        self.weight
            .dequantize(kind)
            .expect("8-bit weight validated when built")
    }
}

impl Layer for Bnb8Conv1D {
    fn kind(&self) -> &'static str {
        "Bnb8Conv1D"
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        conv1d_forward(x, &self.dequantized_weight(x.kind()), self.bias.as_ref())
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("weight".to_string(), self.weight.q.shallow_clone()),
            ("absmax".to_string(), self.weight.absmax.shallow_clone()),
            ("code".to_string(), self.weight.code.to_tensor()),
        ];
        if let Some(b) = &self.bias {
            v.push(("bias".into(), b.shallow_clone()));
        }
        v
    }
    fn to_device(&mut self, device: Device) {
        self.weight.q = self.weight.q.to_device(device);
        self.weight.absmax = self.weight.absmax.to_device(device);
        self.bias = bias_to_device(&self.bias, device);
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        linear_shape(&self.weight.shape())
    }
    fn train_bias(&mut self, on: bool) -> bool {
        set_bias_trainable(&mut self.bias, on)
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        trainable_bias(&self.bias)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// The bias, if any, must have one entry per output (the weight's second dimension).
fn check_bias(node: &Node, w: &[usize]) -> std::result::Result<(), String> {
    match node.param("bias") {
        Some(b) if b.shape[0] != w[1] => Err(format!(
            "bias has {} entries for {} outputs (Conv1D weights are [in, out])",
            b.shape[0], w[1]
        )),
        _ => Ok(()),
    }
}

fn check_conv1d(node: &Node) -> std::result::Result<(), String> {
    check_params(node, &[("weight", 2)], &[("bias", 1)])?;
    let w = &node.param("weight").ok_or("no weight")?.shape;
    check_bias(node, w)
}

fn check_bnb8_conv1d(node: &Node) -> std::result::Result<(), String> {
    check_params(
        node,
        &[("weight", 2), ("absmax", 1), ("code", 1)],
        &[("bias", 1)],
    )?;
    let w = &node.param("weight").ok_or("no weight")?.shape;
    let numel: usize = w.iter().product();
    let absmax = node.param("absmax").ok_or("no absmax")?.shape[0];
    if infer_block_size(numel, absmax).is_none() {
        return Err(format!(
            "absmax has {absmax} entries, which fits no block size for {numel} elements"
        ));
    }
    if node.param("code").ok_or("no code")?.shape != [CODE_LEN] {
        return Err(format!("code must have {CODE_LEN} entries"));
    }
    check_bias(node, w)
}

fn f32_tensor(t: Tensor) -> Tensor {
    if t.is_floating_point() && t.kind() != Kind::Float {
        t.to_kind(Kind::Float)
    } else {
        t
    }
}

fn build_conv1d(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    Ok(Box::new(Conv1D {
        weight: f32_tensor(t.take("weight")?),
        bias: t.take_opt("bias").map(f32_tensor),
    }))
}

fn build_bnb8_conv1d(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    let q = t.take("weight")?;
    let absmax = t.take("absmax")?;
    let code = t.take("code")?;
    let weight = crate::nn::bnb8::stored_quantized(t.path(), q, absmax, &code)?;
    Ok(Box::new(Bnb8Conv1D {
        weight,
        bias: t.take_opt("bias").map(f32_tensor),
    }))
}

inventory::submit! { LayerKind { name: "Conv1D", check: check_conv1d, build: build_conv1d } }
inventory::submit! { LayerKind { name: "Bnb8Conv1D", check: check_bnb8_conv1d, build: build_bnb8_conv1d } }
inventory::submit! { Replacement { from: "Conv1D", to: "Bnb8Conv1D", quantized_param: "weight" } }
