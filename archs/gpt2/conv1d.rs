//! GPT-2's `Conv1D` (a linear layer whose weight is stored `[in, out]`) and its frozen 8-bit
//! form, registered from this plugin: the core knows nothing about either.
//!
//! The 8-bit form is the core's 8-bit linear in the `[in, out]` layout
//! ([`Layout::InOut`]): the bytes keep the checkpoint's layout (blocks run along it), so
//! conversion, export and merge see the tensor exactly as Hugging Face stores it, and token
//! by token generation multiplies straight from the bytes as for any 8-bit Linear. For LoRA
//! both report `AdapterShape::Linear { in, out }`: `lora_A` is `[r, in]`, `lora_B` `[out, r]`
//! and the update applies to `x` as for any Linear — PEFT's `fan_in_fan_out = true`
//! semantics, where only merging transposes the delta.
use crate::error::Result;
use crate::nn::bnb8::{build_linear, check_linear};
use crate::nn::float::{in_kind, linear_in_out, set_bias_trainable, trainable_bias};
use crate::nn::kinds::{LayerKind, Replacement};
use crate::nn::layer::{check_params, frozen_in};
use crate::nn::node::Node;
use crate::nn::q8::Layout;
use crate::nn::{AdapterShape, Layer, LayerTensors};
use tch::{Device, Kind, Tensor};

/// `y = x·W + b` with `W` stored `[in, out]` (Hugging Face's `pytorch_utils.Conv1D`).
pub struct Conv1D {
    /// `[in, out]`.
    pub weight: Tensor,
    /// `[out]`, if any.
    pub bias: Option<Tensor>,
}

impl Layer for Conv1D {
    fn kind(&self) -> &'static str {
        "Conv1D"
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_in_out(x, &in_kind(&self.weight, x.kind())?, self.bias.as_ref())
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
        match self.weight.size()[..] {
            [n_in, n_out] => Some(AdapterShape::Linear {
                in_features: n_in as usize,
                out_features: n_out as usize,
            }),
            _ => None,
        }
    }
    fn train_bias(&mut self, on: bool) -> bool {
        set_bias_trainable(&mut self.bias, on)
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        trainable_bias(&self.bias)
    }
    fn store_frozen_in(&mut self, kind: Kind) {
        if let Some(w) = frozen_in(&self.weight, kind) {
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

fn check_conv1d(node: &Node) -> std::result::Result<(), String> {
    check_params(node, &[("weight", 2)], &[("bias", 1)])?;
    let w = &node.param("weight").ok_or("no weight")?.shape;
    match node.param("bias") {
        Some(b) if b.shape[0] != w[1] => Err(format!(
            "bias has {} entries for {} outputs (Conv1D weights are [in, out])",
            b.shape[0], w[1]
        )),
        _ => Ok(()),
    }
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

inventory::submit! { LayerKind { name: "Conv1D", check: check_conv1d, build: build_conv1d } }
inventory::submit! { LayerKind { name: "Bnb8Conv1D", check: |n| check_linear(n, 1), build: |_, t| build_linear("Bnb8Conv1D", Layout::InOut, t) } }
inventory::submit! { Replacement { from: "Conv1D", to: "Bnb8Conv1D", quantized_param: "weight" } }
