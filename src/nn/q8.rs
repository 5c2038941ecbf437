//! The frozen 8-bit weight through its whole life: which modules are quantized and with which
//! code (the policy), quantized from float (whole, or streamed chunk by chunk from a file),
//! rebuilt from its stored `weight` + `absmax` + `code` with every value checked, de-quantized
//! just in time (whole, into a pooled buffer, selected rows, or fused with the
//! multiplication), de-quantized again to be merged into and re-quantized afterwards.
use super::float::{in_kind, linear_in_out};
use super::graph::ModuleGraph;
use super::layer::{check_params, LayerTensors};
use super::node::Node;
use super::spec::{PathPattern, Spec};
use crate::error::{OctetError, Result};
use crate::io::TensorStore;
use crate::quant::double_quant::{self as dq, DoubleQuantized};
use crate::quant::{
    fit_code, BlockSize, CodeKind, FitOptions, QuantCode, QuantError, Quantized, StreamOutput,
    StreamingQuantizer, CODE_LEN,
};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// How float modules are quantized (on load, or by `convert`).
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// Block size; the architecture's default when `None`.
    pub block: Option<BlockSize>,
    /// Which code to use.
    pub code: CodeKind,
    /// Modules kept in float beyond what the spec leaves out.
    pub skip: Vec<PathPattern>,
    /// Store the block scales double-quantized (a written folder only; in memory they are
    /// always f32).
    pub double_quant: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            block: None,
            code: CodeKind::Dynamic,
            skip: Vec::new(),
            double_quant: false,
        }
    }
}

impl QuantizeOptions {
    /// Turns the modules `spec` quantizes, minus `skip`, into their 8-bit kinds in `graph`;
    /// returns the block size used and the replaced paths.
    pub fn apply(&self, graph: &mut ModuleGraph, spec: &Spec) -> (BlockSize, Vec<String>) {
        let block = self.block.unwrap_or(spec.block_size);
        let replaced = graph.quantize_where(block, |p| {
            spec.quantizes(p) && !self.skip.iter().any(|s| s.matches(p))
        });
        if self.double_quant {
            graph.double_quantize_absmax(&replaced);
        }
        (block, replaced)
    }
}

/// The code to quantize `x` with.
pub fn choose_code(kind: CodeKind, x: &[f32], block: BlockSize) -> Result<QuantCode> {
    match kind {
        CodeKind::Dynamic => Ok(QuantCode::dynamic_signed()),
        CodeKind::Fitted => fit_code(x, block, FitOptions::default()),
        CodeKind::Linear => Ok(QuantCode::linear()),
    }
}

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

/// The block size of a stored 8-bit tensor: the manifest's when it fits the stored lengths,
/// else the one they imply (files written before the manifest recorded it, or modules that
/// kept their own block size).
pub fn stored_block_size(
    numel: usize,
    absmax_len: usize,
    manifest: Option<BlockSize>,
) -> Option<BlockSize> {
    manifest
        .filter(|b| b.blocks_for(numel) == absmax_len)
        .or_else(|| infer_block_size(numel, absmax_len))
}

/// Elements per chunk when quantizing a stream (16 MiB of f32).
pub const CHUNK_ELEMS: usize = 4 << 20;

/// Which way a stored 8-bit matrix runs. Blocks follow the stored layout, so the bytes keep
/// the checkpoint's orientation and only the multiplication differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[out, in]`, as `nn.Linear` stores it: `y = x · Wᵀ`.
    OutIn,
    /// `[in, out]`, as GPT-2's `Conv1D` stores it: `y = x · W`.
    InOut,
}

/// A frozen blockwise 8-bit weight (uint8 indices, one f32 absmax per block, a 256-entry
/// code), checked when built. Dereferences to the [`Quantized`] tensor it holds.
#[derive(Debug)]
pub struct Q8Weight(Quantized);

impl From<Quantized> for Q8Weight {
    fn from(q: Quantized) -> Self {
        Q8Weight(q)
    }
}

impl std::ops::Deref for Q8Weight {
    type Target = Quantized;
    fn deref(&self) -> &Quantized {
        &self.0
    }
}

impl Q8Weight {
    /// A stored 8-bit weight of `module` from its tensors, every value checked as it enters:
    /// the code sorted and finite, absmax finite and non-negative, the block size implied by
    /// the lengths.
    pub fn from_stored(module: &str, q: Tensor, absmax: Tensor, code: &Tensor) -> Result<Self> {
        let bad =
            |problem: String| OctetError::InvalidArgument(format!("module {module}: {problem}"));
        let code = QuantCode::from_tensor(code).map_err(|e| bad(format!("{module}.code: {e}")))?;
        let block = infer_block_size(q.numel(), absmax.numel())
            .ok_or_else(|| bad("absmax length fits no block size".into()))?;
        let absmax = absmax.f_to_kind(Kind::Float)?.f_contiguous()?;
        let values = Vec::<f32>::try_from(&absmax)?;
        crate::validate::check_absmax(&format!("{module}.absmax"), &values).map_err(bad)?;
        Ok(Q8Weight(Quantized::from_parts(q, absmax, code, block)?))
    }

    /// Takes the module's `weight`, `absmax` and `code` out of `t` (see [`Self::from_stored`]).
    pub fn take(t: &mut LayerTensors) -> Result<Self> {
        let q = t.take("weight")?;
        let absmax = take_absmax(t)?;
        let code = t.take("code")?;
        Self::from_stored(t.path(), q, absmax, &code)
    }

    /// Quantizes the float tensor `x` with a code of `kind`.
    pub fn quantize(x: &Tensor, block: BlockSize, kind: CodeKind) -> Result<Self> {
        let code = match kind {
            CodeKind::Fitted => {
                let flat = x.f_to_kind(Kind::Float)?.f_contiguous()?.f_flatten(0, -1)?;
                choose_code(kind, &Vec::<f32>::try_from(&flat)?, block)?
            }
            CodeKind::Dynamic | CodeKind::Linear => choose_code(kind, &[], block)?,
        };
        Ok(Q8Weight(crate::quant::quantize(x, block, &code)?))
    }

    /// Quantizes `numel` values read chunk by chunk (`read(start, buf)` fills `buf` with the
    /// values from element `start` on), holding only one chunk of f32 at a time; measures the
    /// error against the source.
    pub fn quantize_stream(
        numel: usize,
        block: BlockSize,
        code: &QuantCode,
        read: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<StreamOutput> {
        StreamingQuantizer::new(code, block).quantize(numel, CHUNK_ELEMS, true, read)
    }

    /// As [`Self::quantize_stream`], the block scales double-quantized (two passes over
    /// `read`; see [`StreamingQuantizer::quantize_double`]).
    pub fn quantize_stream_double(
        numel: usize,
        block: BlockSize,
        code: &QuantCode,
        read: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<StreamOutput> {
        StreamingQuantizer::new(code, block).quantize_double(numel, CHUNK_ELEMS, true, read)
    }

    /// Re-quantizes a merged f32 weight with the dynamic code; returns the bytes of `weight`,
    /// `absmax` and `code` and the error against the exact merge.
    pub fn requantize(w: &Tensor, block: BlockSize) -> Result<([Vec<u8>; 3], QuantError)> {
        let n = w.numel();
        let mut x = vec![0f32; n];
        w.f_contiguous()?.f_copy_data(&mut x, n)?;
        if let Some((i, v)) = crate::validate::first_nonfinite_f32(&x) {
            return Err(OctetError::InvalidArgument(format!(
                "the merged weight holds {v} at element {i}; it cannot be quantized"
            )));
        }
        let code = QuantCode::dynamic_signed();
        let out = Self::quantize_stream(n, block, &code, |start, buf| {
            buf.copy_from_slice(&x[start..start + buf.len()]);
            Ok(())
        })?;
        let err = out.error.unwrap_or_default();
        Ok((
            [out.q, f32_bytes(&out.absmax), f32_bytes(code.values())],
            err,
        ))
    }

    /// Checks a module node holding an 8-bit weight of rank `weight_rank` (plus the optional
    /// tensors in `optional`): the tensors present with their ranks, an absmax length that
    /// fits a block size, a full code.
    pub fn check(
        node: &Node,
        weight_rank: usize,
        optional: &[(&str, usize)],
    ) -> std::result::Result<(), String> {
        let mut required = vec![("weight", weight_rank)];
        required.extend_from_slice(scale_params(node));
        required.push(("code", 1));
        check_params(node, &required, optional)?;
        let w = node.param("weight").ok_or("no weight")?;
        let numel: usize = w.shape.iter().product();
        let absmax = check_scales(node)?;
        if infer_block_size(numel, absmax).is_none() {
            return Err(format!(
                "absmax has {absmax} entries, which fits no block size for {numel} elements"
            ));
        }
        if node.param("code").ok_or("no code")?.shape != [CODE_LEN] {
            return Err(format!("code must have {CODE_LEN} entries"));
        }
        Ok(())
    }

    /// The weight de-quantized to `kind`: into a pooled buffer inside a
    /// [`super::scratch`] scope (nothing outlives the multiplication there), else into a
    /// fresh tensor.
    pub fn dequantized(&self, kind: Kind) -> Result<Tensor> {
        if super::scratch::active() && crate::quant::uses_cpu_kernels(&self.q) {
            let mut result = Ok(());
            let t = super::scratch::with_buffer(&self.shape(), kind, |buf| {
                result = self.dequantize_into(buf);
            });
            return result.map(|()| t);
        }
        self.dequantize(kind)
    }

    /// The rows `ids` (token ids of any shape) of a `[vocab, dim]` table in f32, `[..ids, dim]`;
    /// an id outside the table is an error naming it.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        super::ids::check_token_tensor(ids, self.shape()[0], "the model's input")?;
        self.dequantize_rows(ids, Kind::Float)
    }

    /// `x · W (+ bias)` over the last dimension of `x`, for `W` stored in `layout`. A few rows
    /// that need no gradient (token-by-token generation) take one pass over the bytes instead
    /// of writing out the whole f32 weight.
    pub fn matmul(&self, x: &Tensor, bias: Option<&Tensor>, layout: Layout) -> Result<Tensor> {
        let fused = !x.requires_grad() && !bias.is_some_and(Tensor::requires_grad);
        match layout {
            Layout::OutIn if fused && crate::quant::fused::applies(x, self) => {
                crate::quant::fused::linear(x, self, bias)
            }
            Layout::InOut if fused && crate::quant::fused_in_out::applies(x, self) => {
                crate::quant::fused_in_out::linear(x, self, bias)
            }
            Layout::OutIn => {
                let k = x.kind();
                let b = bias.map(|b| in_kind(b, k)).transpose()?;
                Ok(x.f_linear(&self.dequantized(k)?, b.as_ref())?)
            }
            Layout::InOut => linear_in_out(x, &self.dequantized(x.kind())?, bias),
        }
    }

    /// [`Self::matmul`] plus the low-rank update `scale·(x·Aᵀ)·Bᵀ`, in one pass when the
    /// fused kernels take `x` (few rows, no gradient) and the update's factors are plain CPU
    /// f32; `None` otherwise, leaving the update to the caller.
    pub fn matmul_plus_low_rank(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        layout: Layout,
        update: &crate::quant::LowRank,
    ) -> Result<Option<Tensor>> {
        let fused = !x.requires_grad()
            && !bias.is_some_and(Tensor::requires_grad)
            && update.applies()
            && match layout {
                Layout::OutIn => crate::quant::fused::applies(x, self),
                Layout::InOut => crate::quant::fused_in_out::applies(x, self),
            };
        if !fused {
            return Ok(None);
        }
        // The fused kernels return a fresh contiguous tensor, which the update may write into.
        let y = self.matmul(x, bias, layout)?.f_contiguous()?;
        update.add_to(&x.f_contiguous()?, &y)?;
        Ok(Some(y))
    }

    /// The stored tensors: `weight` (uint8), `absmax`, `code`.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("weight".to_string(), self.q.shallow_clone()),
            ("absmax".to_string(), self.absmax.shallow_clone()),
            ("code".to_string(), self.code.to_tensor()),
        ]
    }

    /// Moves the indices and scales to `device` (the code is prepared per device on use).
    pub fn to_device(&mut self, device: Device) {
        self.0.q = self.0.q.to_device(device);
        self.0.absmax = self.0.absmax.to_device(device);
    }

    /// A module's stored tensors in f32 on `device`, its 8-bit parameter (if the node's kind
    /// is an 8-bit one) de-quantized under its own name: what merging and exporting edit.
    pub fn read_module_f32(
        store: &dyn TensorStore,
        node: &Node,
        device: Device,
    ) -> Result<BTreeMap<String, Tensor>> {
        if node.kind == super::q4::KIND {
            return super::q4::read_module_f32(store, node, device);
        }
        let mut params = BTreeMap::new();
        for p in &node.params {
            let t = store.tensor(&node.tensor_name(&p.name))?;
            params.insert(p.name.clone(), t.f_to_device(device)?);
        }
        if let Some(rep) = super::kinds::quantized_param(&node.kind) {
            let missing = |what: &str| {
                OctetError::bad_file(store.path(), format!("module {}: no {what}", node.path))
            };
            let q = params.remove(rep).ok_or_else(|| missing(rep))?;
            let absmax = remove_absmax(store, node, &mut params)?;
            let code = params.remove("code").ok_or_else(|| missing("code"))?;
            let w = Self::from_stored(&node.path, q, absmax, &code)
                .map_err(|e| OctetError::bad_file(store.path(), e.to_string()))?
                .dequantize(Kind::Float)?;
            params.insert(rep.to_string(), w);
        }
        for t in params.values_mut() {
            if t.is_floating_point() {
                *t = t.f_to_kind(Kind::Float)?;
            }
        }
        Ok(params)
    }
}

/// A module's stored double-quantized scales as the f32 absmax its 8-bit weight uses
/// ([`DoubleQuantized::block_scales`]); a table that does not fit together is an error naming
/// the module.
pub fn decode_absmax(module: &str, q: &Tensor, scale: &Tensor, offset: &Tensor) -> Result<Tensor> {
    let what = format!("module {module}: {}", dq::STORED_Q);
    let table = DoubleQuantized::from_tensors(&what, q, scale, offset)?;
    Ok(Tensor::from_slice(&table.block_scales()))
}

/// The block-scale tensors a quantized module stores, with their ranks: `absmax`, or the
/// three double-quantized ones.
pub fn scale_params(node: &Node) -> &'static [(&'static str, usize)] {
    if node.param(dq::STORED_Q).is_some() {
        &[
            (dq::STORED_Q, 1),
            (dq::STORED_SCALE, 1),
            (dq::STORED_OFFSET, 1),
        ]
    } else {
        &[("absmax", 1)]
    }
}

/// Checks that a quantized module's stored block scales fit together (one group scale per
/// [`dq::GROUP`] double-quantized scales, one offset); returns how many block scales it holds.
pub fn check_scales(node: &Node) -> std::result::Result<usize, String> {
    let Some(q) = node.param(dq::STORED_Q) else {
        return Ok(node.param("absmax").ok_or("no absmax")?.shape[0]);
    };
    let blocks = q.shape[0];
    let groups = node.param(dq::STORED_SCALE).ok_or("no absmax_scale")?.shape[0];
    if groups != blocks.div_ceil(dq::GROUP) {
        return Err(format!(
            "{} has {groups} entries for {blocks} double-quantized block scales \
             (expected {}, one per {})",
            dq::STORED_SCALE,
            blocks.div_ceil(dq::GROUP),
            dq::GROUP
        ));
    }
    if node
        .param(dq::STORED_OFFSET)
        .ok_or("no absmax_offset")?
        .shape
        != [1]
    {
        return Err(format!("{} must have 1 entry", dq::STORED_OFFSET));
    }
    Ok(blocks)
}

/// Takes a module's block scales out of `t` as one f32 absmax per block, de-quantizing
/// double-quantized ones (see [`decode_absmax`]).
pub fn take_absmax(t: &mut LayerTensors) -> Result<Tensor> {
    match t.take_opt(dq::STORED_Q) {
        Some(aq) => {
            let scale = t.take(dq::STORED_SCALE)?;
            let offset = t.take(dq::STORED_OFFSET)?;
            decode_absmax(t.path(), &aq, &scale, &offset)
        }
        None => t.take("absmax"),
    }
}

/// Removes a module's block scales, read from `store`, from `params` as one f32 absmax per
/// block (see [`take_absmax`]); a missing or corrupted table is an error naming the file.
pub fn remove_absmax(
    store: &dyn TensorStore,
    node: &Node,
    params: &mut BTreeMap<String, Tensor>,
) -> Result<Tensor> {
    let missing =
        |what: &str| OctetError::bad_file(store.path(), format!("module {}: no {what}", node.path));
    match params.remove(dq::STORED_Q) {
        Some(aq) => {
            let scale = params
                .remove(dq::STORED_SCALE)
                .ok_or_else(|| missing(dq::STORED_SCALE))?;
            let offset = params
                .remove(dq::STORED_OFFSET)
                .ok_or_else(|| missing(dq::STORED_OFFSET))?;
            decode_absmax(&node.path, &aq, &scale, &offset)
                .map_err(|e| OctetError::bad_file(store.path(), e.to_string()))
        }
        None => params.remove("absmax").ok_or_else(|| missing("absmax")),
    }
}

/// Little-endian bytes of f32 values, as safetensors stores them.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
