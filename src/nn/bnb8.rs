//! Frozen blockwise 8-bit layers: the weight stays uint8 + absmax + code ([`Q8Weight`]) and is
//! de-quantized just in time, living only for the multiplication (or, for embeddings, only
//! the rows looked up).
use super::float::{set_bias_trainable, trainable_bias};
use super::kinds::LayerKind;
use super::layer::{AdapterShape, Layer, LayerTensors};
use super::node::Node;
use super::q8::{Layout, Q8Weight};
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// A Linear whose frozen weight is blockwise 8-bit, stored `[out, in]` (`nn.Linear`) or, as
/// another registered kind, `[in, out]` (GPT-2's `Conv1D`): the bytes keep the checkpoint's
/// layout and only the multiplication differs.
pub struct Bnb8Linear {
    /// The quantized weight.
    pub weight: Q8Weight,
    /// `[out]`, if any (kept in float).
    pub bias: Option<Tensor>,
    layout: Layout,
    kind: &'static str,
}

impl Bnb8Linear {
    /// An `[out, in]` 8-bit Linear.
    pub fn new(weight: Q8Weight, bias: Option<Tensor>) -> Self {
        Bnb8Linear {
            weight,
            bias,
            layout: Layout::OutIn,
            kind: "Bnb8Linear",
        }
    }

    /// An 8-bit linear of the registered kind `kind` whose weight is stored in `layout`.
    pub fn with_layout(
        kind: &'static str,
        layout: Layout,
        weight: Q8Weight,
        bias: Option<Tensor>,
    ) -> Self {
        Bnb8Linear {
            weight,
            bias,
            layout,
            kind,
        }
    }

    /// How the weight is stored: `[out, in]` or `[in, out]`.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The weight de-quantized to `kind`, in its stored layout.
    pub fn dequantized_weight(&self, kind: Kind) -> Result<Tensor> {
        self.weight.dequantized(kind)
    }
}

impl Layer for Bnb8Linear {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.matmul(x, self.bias.as_ref(), self.layout)
    }
    fn forward_plus_low_rank(
        &self,
        x: &Tensor,
        update: &crate::quant::LowRank,
    ) -> Result<Option<Tensor>> {
        self.weight
            .matmul_plus_low_rank(x, self.bias.as_ref(), self.layout, update)
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = self.weight.tensors();
        if let Some(b) = &self.bias {
            v.push(("bias".into(), b.shallow_clone()));
        }
        v
    }
    fn to_device(&mut self, device: Device) {
        self.weight.to_device(device);
        self.bias = self.bias.as_ref().map(|b| {
            b.to_device(device)
                .detach()
                .set_requires_grad(b.requires_grad())
        });
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        let s = self.weight.shape();
        let (in_features, out_features) = match self.layout {
            Layout::OutIn => (s[1], s[0]),
            Layout::InOut => (s[0], s[1]),
        };
        Some(AdapterShape::Linear {
            in_features: in_features as usize,
            out_features: out_features as usize,
        })
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

/// An Embedding whose frozen table is blockwise 8-bit; a lookup de-quantizes only its rows.
pub struct Bnb8Embedding {
    /// The quantized `[vocab, dim]` table.
    pub weight: Q8Weight,
}

impl Layer for Bnb8Embedding {
    fn kind(&self) -> &'static str {
        "Bnb8Embedding"
    }
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.rows(ids)
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.weight.tensors()
    }
    fn to_device(&mut self, device: Device) {
        self.weight.to_device(device);
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        let s = self.weight.shape();
        Some(AdapterShape::Embedding {
            vocab: s[0] as usize,
            dim: s[1] as usize,
        })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Checks an 8-bit linear node: the 8-bit weight, and a bias with one entry per output
/// (`out_dim` indexes the stored weight's output dimension).
pub fn check_linear(node: &Node, out_dim: usize) -> std::result::Result<(), String> {
    Q8Weight::check(node, 2, &[("bias", 1)])?;
    let w = &node.param("weight").ok_or("no weight")?.shape;
    match node.param("bias") {
        Some(b) if b.shape[0] != w[out_dim] => Err(format!(
            "bias has {} entries for {} outputs (the weight is {w:?})",
            b.shape[0], w[out_dim]
        )),
        _ => Ok(()),
    }
}

/// Builds an 8-bit linear of kind `kind` in `layout` from a module's tensors.
pub fn build_linear(
    kind: &'static str,
    layout: Layout,
    mut t: LayerTensors,
) -> Result<Box<dyn Layer>> {
    let weight = Q8Weight::take(&mut t)?;
    let bias = t.take_opt("bias").map(|b| b.to_kind(Kind::Float));
    Ok(Box::new(Bnb8Linear::with_layout(
        kind, layout, weight, bias,
    )))
}

fn build_embedding(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    Ok(Box::new(Bnb8Embedding {
        weight: Q8Weight::take(&mut t)?,
    }))
}

inventory::submit! { LayerKind { name: "Bnb8Linear", check: |n| check_linear(n, 0), build: |_, t| build_linear("Bnb8Linear", Layout::OutIn, t) } }
inventory::submit! { LayerKind { name: "Bnb8Embedding", check: |n| Q8Weight::check(n, 2, &[]), build: build_embedding } }
