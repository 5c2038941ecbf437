//! Frozen blockwise 8-bit layers: the weight stays uint8 + absmax + code and is de-quantized
//! just in time, living only for the multiplication (or, for embeddings, only the rows looked up).
use super::float::{set_bias_trainable, trainable_bias};
use super::kinds::LayerKind;
use super::layer::AdapterShape;
use super::layer::{check_params, Layer, LayerTensors};
use super::node::Node;
use crate::error::{OctetError, Result};
use crate::quant::{BlockSize, QuantCode, Quantized, CODE_LEN};
use tch::{Device, Kind, Tensor};

/// The block size implied by `absmax` entries for `numel` elements. When one block covers the
/// whole tensor every size ≥ numel is equivalent and 4096 is returned; otherwise the answer
/// is unique among the powers of two.
pub fn infer_block_size(numel: usize, absmax_len: usize) -> Option<BlockSize> {
    if absmax_len == 1 && numel <= 4096 {
        return BlockSize::new(4096).ok();
    }
    (6..=12)
        .map(|e| 1usize << e)
        .find(|b| numel.div_ceil(*b) == absmax_len)
        .and_then(|b| BlockSize::new(b as i64).ok())
}

fn check_8bit(node: &Node, weight_rank: usize, with_bias: bool) -> std::result::Result<(), String> {
    let optional: &[(&str, usize)] = if with_bias { &[("bias", 1)] } else { &[] };
    check_params(
        node,
        &[("weight", weight_rank), ("absmax", 1), ("code", 1)],
        optional,
    )?;
    let w = node.param("weight").ok_or("no weight")?;
    let numel: usize = w.shape.iter().product();
    let absmax = &node.param("absmax").ok_or("no absmax")?.shape;
    if infer_block_size(numel, absmax[0]).is_none() {
        return Err(format!(
            "absmax has {} entries, which fits no block size for {numel} elements",
            absmax[0]
        ));
    }
    if node.param("code").ok_or("no code")?.shape != [CODE_LEN] {
        return Err(format!("code must have {CODE_LEN} entries"));
    }
    if let Some(b) = node.param("bias") {
        if b.shape[0] != w.shape[0] {
            return Err(format!(
                "bias has {} entries for {} outputs",
                b.shape[0], w.shape[0]
            ));
        }
    }
    Ok(())
}

fn quantized_from(t: &mut LayerTensors) -> Result<Quantized> {
    let q = t.take("weight")?;
    let absmax = t.take("absmax")?;
    let code = t.take("code")?;
    stored_quantized(t.path(), q, absmax, &code)
}

/// A stored 8-bit weight of `module` from its tensors, every value checked as it enters: the
/// code sorted and finite, absmax finite and non-negative, the block size implied by the
/// lengths.
pub fn stored_quantized(
    module: &str,
    q: Tensor,
    absmax: Tensor,
    code: &Tensor,
) -> Result<Quantized> {
    let bad = |problem: String| OctetError::InvalidArgument(format!("module {module}: {problem}"));
    let code = QuantCode::from_tensor(code).map_err(|e| bad(format!("{module}.code: {e}")))?;
    let block = infer_block_size(q.numel(), absmax.numel())
        .ok_or_else(|| bad("absmax length fits no block size".into()))?;
    let absmax = absmax.f_to_kind(Kind::Float)?.f_contiguous()?;
    let values = Vec::<f32>::try_from(&absmax)?;
    crate::validate::check_absmax(&format!("{module}.absmax"), &values).map_err(bad)?;
    Quantized::from_parts(q, absmax, code, block)
}

/// A Linear whose frozen weight is blockwise 8-bit.
pub struct Bnb8Linear {
    /// The quantized `[out, in]` weight.
    pub weight: Quantized,
    /// `[out]`, if any (kept in float).
    pub bias: Option<Tensor>,
}

impl Bnb8Linear {
    /// The weight de-quantized to `kind`.
    pub fn dequantized_weight(&self, kind: Kind) -> Tensor {
        if super::scratch::active() && crate::quant::uses_cpu_kernels(&self.weight.q) {
            let shape = self.weight.shape();
            return super::scratch::with_buffer(&shape, kind, |buf| {
                self.weight
                    .dequantize_into(buf)
                    .expect("validated 8-bit weight");
            });
        }
        self.weight
            .dequantize(kind)
            .expect("validated 8-bit weight")
    }
}

impl Layer for Bnb8Linear {
    fn kind(&self) -> &'static str {
        "Bnb8Linear"
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        // A few rows that need no gradient (token-by-token generation): one pass over the
        // bytes instead of writing out the whole f32 weight.
        if !x.requires_grad()
            && !self.bias.as_ref().is_some_and(Tensor::requires_grad)
            && crate::quant::fused::applies(x, &self.weight)
        {
            return crate::quant::fused::linear(x, &self.weight, self.bias.as_ref())
                .expect("shapes checked by fused::applies");
        }
        let k = x.kind();
        let w = self.dequantized_weight(k);
        let b = self.bias.as_ref().map(|b| {
            if b.kind() == k {
                b.shallow_clone()
            } else {
                b.to_kind(k)
            }
        });
        x.linear(&w, b.as_ref())
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
        self.bias = self.bias.as_ref().map(|b| {
            b.to_device(device)
                .detach()
                .set_requires_grad(b.requires_grad())
        });
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        let s = self.weight.shape();
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
    pub weight: Quantized,
}

impl Layer for Bnb8Embedding {
    fn kind(&self) -> &'static str {
        "Bnb8Embedding"
    }
    fn forward(&self, ids: &Tensor) -> Tensor {
        self.weight
            .dequantize_rows(ids, Kind::Float)
            .expect("token ids checked by the model")
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("weight".to_string(), self.weight.q.shallow_clone()),
            ("absmax".to_string(), self.weight.absmax.shallow_clone()),
            ("code".to_string(), self.weight.code.to_tensor()),
        ]
    }
    fn to_device(&mut self, device: Device) {
        self.weight.q = self.weight.q.to_device(device);
        self.weight.absmax = self.weight.absmax.to_device(device);
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

fn build_linear(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    let weight = quantized_from(&mut t)?;
    let bias = t.take_opt("bias").map(|b| b.to_kind(Kind::Float));
    Ok(Box::new(Bnb8Linear { weight, bias }))
}

fn build_embedding(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    Ok(Box::new(Bnb8Embedding {
        weight: quantized_from(&mut t)?,
    }))
}

inventory::submit! { LayerKind { name: "Bnb8Linear", check: |n| check_8bit(n, 2, true), build: build_linear } }
inventory::submit! { LayerKind { name: "Bnb8Embedding", check: |n| check_8bit(n, 2, false), build: build_embedding } }
