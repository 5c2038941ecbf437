//! Frozen 4-bit Linear weights (NF4, FP4 or a fitted 16-level code): the graph rewrite that
//! turns 8-bit Linear modules into 4-bit ones, the weight rebuilt from its stored `weight`
//! (two codes per byte, `[out, in / 2]`) + `absmax` + `code` (16 entries) with every value
//! checked, and the layer that de-quantizes it just in time.
//!
//! Embeddings stay 8-bit: a lookup de-quantizes only its rows, so 4 bits would save memory
//! but no time, and the (often tied) table is where 4 bits cost the most quality.
use super::float::{in_kind, set_bias_trainable, trainable_bias};
use super::graph::ModuleGraph;
use super::kinds::LayerKind;
use super::layer::{check_params, AdapterShape, Layer, LayerTensors};
use super::node::Node;
use crate::error::{OctetError, Result};
use crate::io::TensorStore;
use crate::quant::double_quant::DoubleQuantized;
use crate::quant::{
    fit_code4, quantize4, Code4, Code4Kind, FitOptions, QuantError, Quantized4, BLOCK4_SIZES,
    CODE4_LEN,
};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// The registered kind of a 4-bit Linear.
pub const KIND: &str = "Bnb4Linear";

/// What `convert --bits 4` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FourBitOptions {
    /// The 16-level code.
    pub code: Code4Kind,
    /// Elements per block (one of 32, 64, …, 4096).
    pub block: usize,
}

impl Default for FourBitOptions {
    fn default() -> Self {
        FourBitOptions {
            code: Code4Kind::Nf4,
            block: 64,
        }
    }
}

/// The weight shape a module stands for: a 4-bit weight's stored `[out, in / 2]` is
/// `[out, in]`; every other kind's stored shape is its own.
pub fn logical_weight_shape(kind: &str, stored: &[usize]) -> Vec<usize> {
    let mut s = stored.to_vec();
    if kind == KIND {
        if let Some(last) = s.last_mut() {
            *last *= 2;
        }
    }
    s
}

/// Turns the 8-bit Linear modules among `paths` into 4-bit ones (blocks of `block`); a Linear
/// with an odd input width stays 8-bit (its rows would not pack into whole bytes). Returns
/// the paths made 4-bit.
pub fn to_four_bit(graph: &mut ModuleGraph, paths: &[String], block: usize) -> Vec<String> {
    let mut done = Vec::new();
    for node in &mut graph.nodes {
        if node.kind != "Bnb8Linear" || !paths.contains(&node.path) {
            continue;
        }
        let Some(w) = node.params.iter().find(|p| p.name == "weight") else {
            continue;
        };
        if w.shape.len() != 2 || w.shape[1] % 2 != 0 {
            continue;
        }
        let numel: usize = w.shape.iter().product();
        for p in &mut node.params {
            match p.name.as_str() {
                "weight" => p.shape[1] /= 2,
                "absmax" => p.shape = vec![numel.div_ceil(block)],
                "code" => p.shape = vec![CODE4_LEN],
                _ => {}
            }
        }
        node.kind = KIND.to_string();
        done.push(node.path.clone());
    }
    done
}

/// Makes a 4-bit Linear node a float `Linear` of `dtype` with its `[out, in]` weight (what a
/// merge into a Hugging Face checkpoint writes); other nodes are left alone.
pub fn to_float_node(node: &mut Node, dtype: crate::io::Dtype) {
    if node.kind != KIND {
        return;
    }
    node.kind = "Linear".to_string();
    node.params
        .retain(|p| p.name != "absmax" && p.name != "code");
    if let Some(w) = node.params.iter_mut().find(|p| p.name == "weight") {
        w.shape = logical_weight_shape(KIND, &w.shape);
        w.dtype = dtype;
    }
}

/// Makes a 4-bit Linear node an 8-bit one in blocks of `block` (what an `octet8` merge
/// writes); other nodes are left alone.
pub fn to_eight_bit_node(node: &mut Node, block: crate::quant::BlockSize) {
    if node.kind != KIND {
        return;
    }
    node.kind = "Bnb8Linear".to_string();
    let Some(w) = node.params.iter_mut().find(|p| p.name == "weight") else {
        return;
    };
    w.shape = logical_weight_shape(KIND, &w.shape);
    let numel: usize = w.shape.iter().product();
    for p in &mut node.params {
        match p.name.as_str() {
            "absmax" => p.shape = vec![block.blocks_for(numel)],
            "code" => p.shape = vec![crate::quant::CODE_LEN],
            _ => {}
        }
    }
}

/// The block size implied by `absmax_len` scales for `numel` elements (the smallest that fits;
/// when one block covers everything every larger size de-quantizes the same).
pub fn infer_block4(numel: usize, absmax_len: usize) -> Option<usize> {
    BLOCK4_SIZES
        .iter()
        .copied()
        .find(|b| numel.div_ceil(*b) == absmax_len)
}

/// A frozen 4-bit weight, checked when built. Dereferences to its [`Quantized4`].
#[derive(Debug)]
pub struct Q4Weight(Quantized4);

impl std::ops::Deref for Q4Weight {
    type Target = Quantized4;
    fn deref(&self) -> &Quantized4 {
        &self.0
    }
}

impl Q4Weight {
    /// A stored 4-bit weight of `module`: `packed` `[out, in / 2]` uint8, `absmax` one per
    /// block, `code` 16 entries; every value checked as it enters.
    pub fn from_stored(
        module: &str,
        packed: Tensor,
        absmax: Tensor,
        code: &Tensor,
    ) -> Result<Self> {
        let bad = |p: String| OctetError::InvalidArgument(format!("module {module}: {p}"));
        let code = Code4::from_tensor(code).map_err(|e| bad(format!("{module}.code: {e}")))?;
        let size = packed.size();
        if size.len() != 2 {
            return Err(bad(format!("a 4-bit weight is 2-d, found {size:?}")));
        }
        let shape = vec![size[0], size[1] * 2];
        let numel = (shape[0] * shape[1]) as usize;
        let block = infer_block4(numel, absmax.numel()).ok_or_else(|| {
            bad(format!(
                "absmax has {} entries, which fits no 4-bit block size for {numel} elements",
                absmax.numel()
            ))
        })?;
        let absmax = absmax.f_to_kind(Kind::Float)?.f_contiguous()?;
        let values = Vec::<f32>::try_from(&absmax)?;
        crate::validate::check_absmax(&format!("{module}.absmax"), &values).map_err(bad)?;
        let packed = packed.f_flatten(0, -1)?;
        Ok(Q4Weight(Quantized4::from_parts(
            packed, absmax, code, block, shape,
        )?))
    }

    /// Quantizes a float `[out, in]` weight with a code of `kind` in blocks of `block`; also
    /// returns the error against `x`.
    pub fn quantize(x: &Tensor, block: usize, kind: Code4Kind) -> Result<(Self, QuantError)> {
        let (w, _, err) = Self::quantize_scales(x, block, kind, false)?;
        Ok((w, err))
    }

    /// As [`Self::quantize`]; with `double_quant` the block scales are then double-quantized
    /// as bitsandbytes' `compress_statistics=True` does (the codes are rounded against the
    /// exact scales, the weight de-quantizes through the double-quantized ones, which it
    /// holds), and their stored form is returned too. The error is measured on what loads.
    pub fn quantize_scales(
        x: &Tensor,
        block: usize,
        kind: Code4Kind,
        double_quant: bool,
    ) -> Result<(Self, Option<DoubleQuantized>, QuantError)> {
        let xf = x.f_to_kind(Kind::Float)?.f_contiguous()?;
        let flat = Vec::<f32>::try_from(&xf.f_flatten(0, -1)?)?;
        let code = match Code4::fixed(kind) {
            Some(c) => c,
            None => fit_code4(&flat, block, FitOptions::default())?,
        };
        let mut q = quantize4(&xf, block, &code)?;
        let double = if double_quant {
            let d = DoubleQuantized::quantize(&Vec::<f32>::try_from(&q.absmax)?);
            q.absmax = Tensor::from_slice(&d.block_scales());
            Some(d)
        } else {
            None
        };
        let d = Vec::<f32>::try_from(&q.dequantize(Kind::Float)?.f_flatten(0, -1)?)?;
        let mut err = QuantError::default();
        for (a, b) in flat.iter().zip(&d) {
            let e = f64::from(a - b);
            err.sum_sq_err += e * e;
            err.sum_sq += f64::from(*a) * f64::from(*a);
            err.max_abs_err = err.max_abs_err.max((a - b).abs());
        }
        Ok((Q4Weight(q), double, err))
    }

    /// The quantized tensor itself.
    pub fn into_inner(self) -> Quantized4 {
        self.0
    }

    /// The weight de-quantized to `kind`: into a pooled buffer inside a
    /// [`super::scratch`] scope, else into a fresh tensor.
    pub fn dequantized(&self, kind: Kind) -> Result<Tensor> {
        if super::scratch::active() && crate::quant::uses_cpu_kernels(&self.packed) {
            let mut result = Ok(());
            let t = super::scratch::with_buffer(&self.shape, kind, |buf| {
                result = self.dequantize_into(buf);
            });
            return result.map(|()| t);
        }
        self.dequantize(kind)
    }

    /// The stored tensors: `weight` (uint8 `[out, in / 2]`), `absmax`, `code`.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (
                "weight".to_string(),
                self.packed.reshape([self.shape[0], self.shape[1] / 2]),
            ),
            ("absmax".to_string(), self.absmax.shallow_clone()),
            ("code".to_string(), self.code.to_tensor()),
        ]
    }

    /// Moves the packed codes and scales to `device`.
    pub fn to_device(&mut self, device: Device) {
        self.0.packed = self.0.packed.to_device(device);
        self.0.absmax = self.0.absmax.to_device(device);
    }

    /// Checks a 4-bit Linear node: `weight` `[out, in / 2]`, block scales (f32 or
    /// double-quantized) that fit a 4-bit block size, a 16-entry code, a bias with one entry
    /// per output.
    pub fn check(node: &Node) -> std::result::Result<(), String> {
        let mut required = vec![("weight", 2)];
        required.extend_from_slice(super::q8::scale_params(node));
        required.push(("code", 1));
        check_params(node, &required, &[("bias", 1)])?;
        let w = &node.param("weight").ok_or("no weight")?.shape;
        let numel = w[0] * w[1] * 2;
        let absmax = super::q8::check_scales(node)?;
        if infer_block4(numel, absmax).is_none() {
            return Err(format!(
                "absmax has {absmax} entries, which fits no 4-bit block size for {numel} \
                 elements (a corrupted or truncated table)"
            ));
        }
        if node.param("code").ok_or("no code")?.shape != [CODE4_LEN] {
            return Err(format!("a 4-bit code must have {CODE4_LEN} entries"));
        }
        match node.param("bias") {
            Some(b) if b.shape[0] != w[0] => Err(format!(
                "bias has {} entries for {} outputs",
                b.shape[0], w[0]
            )),
            _ => Ok(()),
        }
    }
}

/// A Linear whose frozen `[out, in]` weight is 4-bit.
pub struct Bnb4Linear {
    /// The quantized weight.
    pub weight: Q4Weight,
    /// `[out]`, if any (kept in float).
    pub bias: Option<Tensor>,
}

impl Layer for Bnb4Linear {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.kind();
        let b = self.bias.as_ref().map(|b| in_kind(b, k)).transpose()?;
        Ok(x.f_linear(&self.weight.dequantized(k)?, b.as_ref())?)
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
        Some(AdapterShape::Linear {
            in_features: self.weight.shape[1] as usize,
            out_features: self.weight.shape[0] as usize,
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

fn build(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    let q = t.take("weight")?;
    let absmax = super::q8::take_absmax(&mut t)?;
    let code = t.take("code")?;
    let weight = Q4Weight::from_stored(t.path(), q, absmax, &code)?;
    let bias = t.take_opt("bias").map(|b| b.to_kind(Kind::Float));
    Ok(Box::new(Bnb4Linear { weight, bias }))
}

inventory::submit! { LayerKind { name: KIND, check: Q4Weight::check, build } }

/// A 4-bit module's stored tensors in f32 on `device`, its weight de-quantized under its own
/// name (what merging and exporting edit).
pub fn read_module_f32(
    store: &dyn TensorStore,
    node: &Node,
    device: Device,
) -> Result<BTreeMap<String, Tensor>> {
    let mut params = BTreeMap::new();
    for p in &node.params {
        let t = store.tensor(&node.tensor_name(&p.name))?;
        params.insert(p.name.clone(), t.f_to_device(device)?);
    }
    let missing =
        |what: &str| OctetError::bad_file(store.path(), format!("module {}: no {what}", node.path));
    let q = params.remove("weight").ok_or_else(|| missing("weight"))?;
    let absmax = super::q8::remove_absmax(store, node, &mut params)?;
    let code = params.remove("code").ok_or_else(|| missing("code"))?;
    let w = Q4Weight::from_stored(&node.path, q, absmax, &code)
        .map_err(|e| OctetError::bad_file(store.path(), e.to_string()))?
        .dequantize(Kind::Float)?;
    params.insert("weight".to_string(), w);
    for t in params.values_mut() {
        if t.is_floating_point() {
            *t = t.f_to_kind(Kind::Float)?;
        }
    }
    Ok(params)
}
