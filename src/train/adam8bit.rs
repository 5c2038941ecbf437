//! 8-bit Adam: bitsandbytes' `Adam8bit` (0.50.2), blockwise-quantized moments.
//!
//! Each parameter with at least [`MIN_8BIT_SIZE`] elements keeps its first moment `m` in
//! bitsandbytes' signed dynamic code and its second moment `v` in the unsigned one, blockwise with
//! [`STATE_BLOCK`]-element blocks: 1 byte per element per moment plus one f32 absmax per block,
//! ≈2.03 bytes per parameter instead of 8. Smaller tensors keep f32 moments.
//!
//! The arithmetic is bitsandbytes' CPU backend (`backends/cpu/ops.py`), operation for operation
//! and in f32 (`m`, `v` are de-quantized first; scalars are rounded to f32 as libtorch does):
//!
//! ```text
//! m  = fma(g, 1−β1, m·β1)                         v  = fma((1−β2)·g, g, v·β2)
//! c1 = 1 − β1^t   c2 = √(1 − β2^t)   (f64)
//! 8-bit state:  p = p·(1 − lr·wd);  p = p + (−lr/c1 · m) / (√v / c2 + eps)
//! f32 state:    p = p·(1 − lr·wd);  p = fma(m / (√v + eps·c2), −lr·c2/c1, p)
//! ```
//!
//! then the new `m` and `v` are re-quantized (absmax = max |x| per block, fresh each step).
//! Weight decay is *decoupled* even though the class is "Adam": bitsandbytes multiplies the
//! parameter by `1 − lr·wd` before the update (its CUDA kernel does so after the update).
//!
//! **Rounding.** bitsandbytes 0.50's CPU quantizer does not round to the nearest code: it snaps
//! `x·(1/absmax)` to one of 65,536 evenly spaced points in [−1, 1] and takes the code nearest
//! that point. [`StateRounding::BitsandbytesCpu`], the default, reproduces it bit for bit. Near
//! a midpoint that can pick the other neighbour, and |x/absmax| below ≈3·10⁻⁵ lands on a coarse
//! grid: an exact 0 becomes code 131 of the signed map (+2.1·10⁻⁵·absmax) and code 7 of the
//! unsigned one (1.6·10⁻⁵·absmax). That floor under `v` is load-bearing.
//! [`StateRounding::Nearest`] (octet's exact nearest-code kernels, which is what bitsandbytes'
//! CUDA kernel computes) lets a small `v` round to exactly 0 while `m` stays non-zero. If that
//! element's gradient then vanishes, the step is `lr·m/eps`: 4.6·10⁴·lr on the oracle vectors.
//! bitsandbytes' CUDA optimizer has the same hazard. Choose `Nearest` for CUDA-bitsandbytes
//! parity or finer small-value resolution; on the oracle vectors it changes ~0.5% of the `m`
//! bytes and ~2% of the `v` bytes.
//!
//! **Non-finite gradients** follow bitsandbytes' CUDA kernels and the design notes: an element
//! whose gradient is NaN or ±inf gets `m = v = 0` (then stored as whatever code 0.0 rounds to)
//! and its parameter is left untouched (no update, no weight decay). bitsandbytes' CPU backend has no such guard and lets the NaN into the
//! parameter. The same rule applies to f32-state tensors.
//!
//! CPU parameters go through a fused Rust kernel (de-quantize → update → re-quantize per
//! 16,384-element chunk, in parallel, with no full-size temporaries); its one deviation from
//! bitsandbytes' CPU results is that `√v` is IEEE-exact here while libtorch's vectorised sqrt
//! is off by one ulp on ~1% of inputs, which moves a parameter by at most an ulp or so.
//! Other devices (and non-contiguous parameters) use libtorch ops in bitsandbytes' exact order.
use super::optim::{
    check_lr, check_params, cpu_snapshot, grad_f32, owned_on, pow_libm, state_field, state_step,
    step_tensor, zero_grads, AdamConfig, Optimizer, StateEntries,
};
use crate::error::{OctetError, Result};
use crate::quant::blockwise::{cpu_slice, cpu_slice_mut};
use crate::quant::code::CODE_LEN;
use crate::quant::kernels::{self, NearestTable};
use crate::quant::{self, BlockSize, QuantCode};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Elements per quantization block of the 8-bit states (bitsandbytes ≥ 0.44).
pub const STATE_BLOCK: usize = 256;
/// Tensors with fewer elements keep f32 states (bitsandbytes' `min_8bit_size` default).
pub const MIN_8BIT_SIZE: usize = 4096;
/// Blocks handed to one parallel task of the CPU kernel.
const CHUNK_BLOCKS: usize = 64;
/// Entries of bitsandbytes' CPU quantization table.
const LUT_SIZE: usize = 1 << 16;

/// How the 8-bit moments are rounded back to codes after each step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StateRounding {
    /// bitsandbytes 0.50's CPU quantizer: `x·(1/absmax)` clamped to [−1, 1], snapped to the
    /// nearest of 65,536 evenly spaced points, then to the code nearest that point. Reproduces
    /// bitsandbytes' CPU optimizer states bit for bit, and keeps a floor under small `v`.
    #[default]
    BitsandbytesCpu,
    /// The nearest code value (ties to the lower code), with octet's quantization kernels; what
    /// bitsandbytes' CUDA kernel computes. See the [module docs](self) for its hazard.
    Nearest,
}

/// One moment's code, prepared for both rounding modes.
#[derive(Debug)]
struct MomentCode {
    code: QuantCode,
    values: [f32; CODE_LEN],
    table: NearestTable,
    /// bitsandbytes' CPU lookup table (64 KiB; cheap enough to build unconditionally).
    lut: Vec<u8>,
}

impl MomentCode {
    fn new(code: QuantCode) -> Self {
        let values = kernels::code_array(&code);
        MomentCode {
            table: NearestTable::new(&code),
            lut: bnb_cpu_lut(&values),
            values,
            code,
        }
    }

    /// Re-quantizes a block-aligned slice of new moment values (CPU).
    fn requantize(&self, rounding: StateRounding, x: &[f32], q: &mut [u8], absmax: &mut [f32]) {
        match rounding {
            StateRounding::Nearest => {
                kernels::quantize_into(&self.table, STATE_BLOCK, x, q, absmax)
            }
            StateRounding::BitsandbytesCpu => {
                for ((xb, qb), a) in x
                    .chunks(STATE_BLOCK)
                    .zip(q.chunks_mut(STATE_BLOCK))
                    .zip(absmax.iter_mut())
                {
                    *a = lut_quantize_block(&self.lut, xb, qb);
                }
            }
        }
    }

    /// Re-quantizes a moment tensor with libtorch ops (any device): (q like `x`, absmax).
    fn requantize_torch(&self, rounding: StateRounding, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let block = state_block()?;
        match rounding {
            StateRounding::Nearest => {
                let qz = quant::quantize(&x.f_contiguous()?, block, &self.code)?;
                Ok((qz.q, qz.absmax))
            }
            StateRounding::BitsandbytesCpu => {
                let n = x.numel() as i64;
                let b = STATE_BLOCK as i64;
                let nb = block.blocks_for(n as usize) as i64;
                let rows = x
                    .f_flatten(0, -1)?
                    .f_constant_pad_nd([0, nb * b - n])?
                    .f_reshape([nb, b])?;
                let am = rows.f_abs()?.f_amax([1i64].as_slice(), false)?;
                let zero = am.f_eq(0.0)?;
                // All-zero blocks store code 0 with absmax 0; give them a harmless divisor.
                let inv = am
                    .f_where_scalarother(&zero.f_logical_not()?, 1.0)?
                    .f_reciprocal()?;
                let bin = rows
                    .f_mul(&inv.f_unsqueeze(1)?)?
                    .f_clamp(-1.0, 1.0)?
                    .f_add_scalar(1.0)?
                    .f_mul_scalar(0.5)?
                    .f_mul_scalar((LUT_SIZE - 1) as f64)?
                    .f_add_scalar(0.5)?
                    .f_trunc()?
                    .f_to_kind(Kind::Int64)?
                    .f_clamp(0, (LUT_SIZE - 1) as i64)?;
                let lut = Tensor::from_slice(&self.lut).f_to_device(x.device())?;
                let q = lut
                    .f_index_select(0, &bin.f_flatten(0, -1)?)?
                    .f_reshape([nb, b])?
                    .f_masked_fill(&zero.f_unsqueeze(1)?, 0)?
                    .f_flatten(0, -1)?
                    .f_narrow(0, 0, n)?
                    .f_reshape(x.size().as_slice())?;
                Ok((q, am))
            }
        }
    }
}

/// bitsandbytes' `build_quantize_lut`: bin `i` covers `−1 + 2i/65535` and holds the first code
/// whose upper midpoint (computed in f32) is not below the bin's value.
fn bnb_cpu_lut(code: &[f32; CODE_LEN]) -> Vec<u8> {
    let mids: Vec<f32> = code.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
    let mut lut = vec![0u8; LUT_SIZE];
    let mut idx = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
        while idx < CODE_LEN - 1 && mids[idx] < val {
            idx += 1;
        }
        *slot = idx as u8;
    }
    lut
}

/// bitsandbytes' `norm_to_lut_index`; `as u16` truncates like the C++ cast (NaN → 0).
#[inline(always)]
fn lut_bin(v: f32) -> usize {
    ((v.clamp(-1.0, 1.0) + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as u16 as usize
}

/// One block through bitsandbytes' CPU quantizer; returns the block's absmax.
fn lut_quantize_block(lut: &[u8], x: &[f32], q: &mut [u8]) -> f32 {
    let am = kernels::absmax(x);
    if am == 0.0 {
        q.fill(0);
        return am;
    }
    let inv = 1.0 / am;
    for (o, &v) in q.iter_mut().zip(x) {
        *o = lut[lut_bin(v * inv)];
    }
    am
}

fn state_block() -> Result<BlockSize> {
    BlockSize::new(STATE_BLOCK as i64)
}

/// The per-step scalars, rounded to f32 exactly as libtorch rounds bitsandbytes' Python floats.
#[derive(Clone, Copy, Debug)]
struct StepScalars {
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    eps: f32,
    /// `1 − lr·wd`, applied only when `weight_decay > 0` (as bitsandbytes tests it).
    decay: Option<f32>,
    /// 8-bit path: `√(1 − β2^t)` and `−lr / (1 − β1^t)`.
    c2: f32,
    neg_lr_over_c1: f32,
    /// f32 path: `eps·c2` and `−lr·c2 / c1`.
    eps_c2: f32,
    step_size: f32,
}

impl StepScalars {
    fn new(cfg: &AdamConfig, lr: f64, step: u64) -> Self {
        let (b1, b2) = cfg.betas;
        let t = step as f64;
        let c1 = 1.0 - pow_libm(b1, t);
        let c2 = (1.0 - pow_libm(b2, t)).sqrt();
        StepScalars {
            b1: b1 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            eps: cfg.eps as f32,
            decay: (cfg.weight_decay > 0.0).then_some((1.0 - lr * cfg.weight_decay) as f32),
            c2: c2 as f32,
            neg_lr_over_c1: (-lr / c1) as f32,
            eps_c2: (cfg.eps * c2) as f32,
            step_size: (-lr * c2 / c1) as f32,
        }
    }
}

/// Optimizer state of one parameter.
#[derive(Debug)]
enum ParamState {
    /// f32 moments (tensors under the 8-bit threshold).
    Full { step: u64, m: Tensor, v: Tensor },
    /// Blockwise 8-bit moments.
    Quant {
        step: u64,
        q1: Tensor,
        q2: Tensor,
        absmax1: Tensor,
        absmax2: Tensor,
    },
}

impl ParamState {
    fn fresh(p: &Tensor, min_8bit_size: usize) -> Result<Self> {
        let dev = p.device();
        let shape = p.size();
        if p.numel() < min_8bit_size {
            return Ok(ParamState::Full {
                step: 0,
                m: Tensor::f_zeros(shape.as_slice(), (Kind::Float, dev))?,
                v: Tensor::f_zeros(shape.as_slice(), (Kind::Float, dev))?,
            });
        }
        let nb = state_block()?.blocks_for(p.numel()) as i64;
        // Zero bytes with zero absmax de-quantize to 0 whatever the code says.
        Ok(ParamState::Quant {
            step: 0,
            q1: Tensor::f_zeros(shape.as_slice(), (Kind::Uint8, dev))?,
            q2: Tensor::f_zeros(shape.as_slice(), (Kind::Uint8, dev))?,
            absmax1: Tensor::f_zeros([nb], (Kind::Float, dev))?,
            absmax2: Tensor::f_zeros([nb], (Kind::Float, dev))?,
        })
    }

    /// The step count and the state tensors under their saved field names (bitsandbytes').
    fn fields(&self) -> (u64, Vec<(&'static str, &Tensor)>) {
        match self {
            ParamState::Full { step, m, v } => (*step, vec![("state1", m), ("state2", v)]),
            ParamState::Quant {
                step,
                q1,
                q2,
                absmax1,
                absmax2,
            } => (
                *step,
                vec![
                    ("state1", q1),
                    ("state2", q2),
                    ("absmax1", absmax1),
                    ("absmax2", absmax2),
                ],
            ),
        }
    }

    fn bytes(&self) -> usize {
        self.fields()
            .1
            .iter()
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}

/// bitsandbytes' 8-bit Adam; see the [module docs](self) for the exact semantics.
///
/// ```no_run
/// # use octet::train::{adam8bit::Adam8bit, optim::{AdamConfig, Optimizer}};
/// # fn demo(params: Vec<tch::Tensor>) -> octet::Result<()> {
/// let mut opt = Adam8bit::new(params, AdamConfig::default())?;
/// // ... loss.backward() ...
/// opt.step(1e-5)?;
/// opt.zero_grad();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Adam8bit {
    params: Vec<Tensor>,
    cfg: AdamConfig,
    rounding: StateRounding,
    min_8bit_size: usize,
    m_code: MomentCode,
    v_code: MomentCode,
    states: Vec<Option<ParamState>>,
    /// Route CPU parameters through the libtorch-op path too (tests compare the two paths).
    force_torch_ops: bool,
}

impl Adam8bit {
    /// An optimizer over `params` (leaf f32 tensors, CPU or CUDA). State is allocated on a
    /// parameter's first step with a gradient, on its device, as bitsandbytes does.
    pub fn new(params: Vec<Tensor>, cfg: AdamConfig) -> Result<Self> {
        cfg.validate()?;
        check_params(&params, "Adam8bit")?;
        let states = params.iter().map(|_| None).collect();
        Ok(Adam8bit {
            params,
            cfg,
            rounding: StateRounding::default(),
            min_8bit_size: MIN_8BIT_SIZE,
            m_code: MomentCode::new(QuantCode::dynamic_signed()),
            v_code: MomentCode::new(QuantCode::dynamic_unsigned()),
            states,
            force_torch_ops: false,
        })
    }

    /// Chooses how moments are re-quantized (default [`StateRounding::BitsandbytesCpu`]).
    pub fn with_rounding(mut self, rounding: StateRounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// Tensors with fewer elements than this keep f32 states (default [`MIN_8BIT_SIZE`]).
    /// Applies to states created afterwards.
    pub fn with_min_8bit_size(mut self, n: usize) -> Self {
        self.min_8bit_size = n;
        self
    }

    /// The rounding mode in use.
    pub fn rounding(&self) -> StateRounding {
        self.rounding
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// The parameters, in the order given.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Steps taken by parameter `i` (None before its first step or for an unknown index).
    pub fn step_count(&self, i: usize) -> Option<u64> {
        match self.states.get(i)?.as_ref()? {
            ParamState::Full { step, .. } | ParamState::Quant { step, .. } => Some(*step),
        }
    }

    /// Whether parameter `i` keeps (or will keep) 8-bit state.
    pub fn is_8bit(&self, i: usize) -> bool {
        match self.states.get(i) {
            Some(Some(ParamState::Quant { .. })) => true,
            Some(Some(ParamState::Full { .. })) => false,
            Some(None) => self.params[i].numel() >= self.min_8bit_size,
            None => false,
        }
    }

    fn step_param(&mut self, i: usize, lr: f64) -> Result<()> {
        let p = &self.params[i];
        let Some(g) = grad_f32(p, i)? else {
            return Ok(());
        };
        if self.states[i].is_none() {
            self.states[i] = Some(ParamState::fresh(p, self.min_8bit_size)?);
        }
        let Some(state) = self.states[i].as_mut() else {
            return Ok(());
        };
        match state {
            ParamState::Full { step, m, v } => {
                *step += 1;
                let k = StepScalars::new(&self.cfg, lr, *step);
                full_step_torch(&k, p, &g, m, v)
            }
            ParamState::Quant {
                step,
                q1,
                q2,
                absmax1,
                absmax2,
            } => {
                *step += 1;
                let k = StepScalars::new(&self.cfg, lr, *step);
                let fused =
                    !self.force_torch_ops && quant::uses_cpu_kernels(p) && p.is_contiguous();
                if fused {
                    // SAFETY: p is a contiguous f32 CPU tensor (checked at construction and just
                    // above), g was made contiguous f32 by `grad_f32`, and the state tensors are
                    // contiguous CPU tensors of the kinds read, created or copied by this
                    // optimizer; all six are distinct allocations.
                    unsafe {
                        quant_step_cpu(
                            &k,
                            &self.m_code,
                            &self.v_code,
                            self.rounding,
                            cpu_slice_mut::<f32>(p),
                            cpu_slice::<f32>(&g),
                            cpu_slice_mut::<u8>(q1),
                            cpu_slice_mut::<u8>(q2),
                            cpu_slice_mut::<f32>(absmax1),
                            cpu_slice_mut::<f32>(absmax2),
                        );
                    }
                    Ok(())
                } else {
                    let (n1, a1, n2, a2) = quant_step_torch(
                        &k,
                        &self.m_code,
                        &self.v_code,
                        self.rounding,
                        p,
                        &g,
                        (&*q1, &*absmax1),
                        (&*q2, &*absmax2),
                    )?;
                    (*q1, *absmax1, *q2, *absmax2) = (n1, a1, n2, a2);
                    Ok(())
                }
            }
        }
    }

    /// Builds the state of parameter `i` from checkpoint fields (validated, on p's device).
    fn state_from_fields(
        &self,
        i: usize,
        fields: &std::collections::BTreeMap<&str, &Tensor>,
    ) -> Result<ParamState> {
        let p = &self.params[i];
        let dev = p.device();
        let shape = p.size();
        let step = state_step(fields, i)?;
        let s1 = fields.get("state1").copied().ok_or_else(|| {
            OctetError::InvalidArgument(format!("optimizer state for parameter {i} lacks 'state1'"))
        })?;
        if s1.kind() == Kind::Float {
            if fields.contains_key("absmax1") || fields.contains_key("absmax2") {
                return Err(OctetError::InvalidArgument(format!(
                    "optimizer state for parameter {i}: f32 moments with absmax entries"
                )));
            }
            let m = state_field(fields, i, "state1", Kind::Float, &shape)?;
            let v = state_field(fields, i, "state2", Kind::Float, &shape)?;
            return Ok(ParamState::Full {
                step,
                m: owned_on(m, dev)?,
                v: owned_on(v, dev)?,
            });
        }
        let nb = [state_block()?.blocks_for(p.numel()) as i64];
        Ok(ParamState::Quant {
            step,
            q1: owned_on(state_field(fields, i, "state1", Kind::Uint8, &shape)?, dev)?,
            q2: owned_on(state_field(fields, i, "state2", Kind::Uint8, &shape)?, dev)?,
            absmax1: owned_on(state_field(fields, i, "absmax1", Kind::Float, &nb)?, dev)?,
            absmax2: owned_on(state_field(fields, i, "absmax2", Kind::Float, &nb)?, dev)?,
        })
    }
}

impl Optimizer for Adam8bit {
    fn step(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        tch::no_grad(|| (0..self.params.len()).try_for_each(|i| self.step_param(i, lr)))
    }

    fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    fn state_bytes(&self) -> usize {
        self.states.iter().flatten().map(ParamState::bytes).sum()
    }

    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, st) in self.states.iter().enumerate() {
            let Some(st) = st else { continue };
            let (step, fields) = st.fields();
            out.push((format!("state.{i}.step"), step_tensor(step)));
            for (f, t) in fields {
                out.push((format!("state.{i}.{f}"), cpu_snapshot(t)));
            }
        }
        out
    }

    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let entries = StateEntries::parse(
            state,
            self.params.len(),
            &["step", "state1", "state2", "absmax1", "absmax2"],
        )?;
        // Build everything first so that a bad entry leaves the optimizer as it was.
        let new_states = (0..self.params.len())
            .map(|i| {
                entries
                    .param(i)
                    .map(|fields| self.state_from_fields(i, fields))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        self.states = new_states;
        Ok(())
    }
}

/// The fused CPU step over one parameter: per chunk of blocks, de-quantize, update `p`, and
/// re-quantize, so that no full-size f32 moment ever exists.
#[allow(clippy::too_many_arguments)]
fn quant_step_cpu(
    k: &StepScalars,
    m_code: &MomentCode,
    v_code: &MomentCode,
    rounding: StateRounding,
    p: &mut [f32],
    g: &[f32],
    q1: &mut [u8],
    q2: &mut [u8],
    absmax1: &mut [f32],
    absmax2: &mut [f32],
) {
    let chunk = CHUNK_BLOCKS * STATE_BLOCK;
    p.par_chunks_mut(chunk)
        .zip(g.par_chunks(chunk))
        .zip(q1.par_chunks_mut(chunk))
        .zip(q2.par_chunks_mut(chunk))
        .zip(absmax1.par_chunks_mut(CHUNK_BLOCKS))
        .zip(absmax2.par_chunks_mut(CHUNK_BLOCKS))
        .for_each(|(((((p, g), q1), q2), a1), a2)| {
            let mut m = vec![0f32; p.len()];
            let mut v = vec![0f32; p.len()];
            let moments = Moments {
                m_code: &m_code.values,
                v_code: &v_code.values,
                q1,
                q2,
                absmax1: a1,
                absmax2: a2,
            };
            update_chunk(k, &moments, g, p, &mut m, &mut v);
            m_code.requantize(rounding, &m, q1, a1);
            v_code.requantize(rounding, &v, q2, a2);
        });
}

/// The old quantized moments of one chunk, read by the update.
struct Moments<'a> {
    m_code: &'a [f32; CODE_LEN],
    v_code: &'a [f32; CODE_LEN],
    q1: &'a [u8],
    q2: &'a [u8],
    absmax1: &'a [f32],
    absmax2: &'a [f32],
}

fn update_chunk(
    k: &StepScalars,
    old: &Moments,
    g: &[f32],
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA (checked just above).
        unsafe { update_chunk_fma(k, old, g, p, m, v) };
        return;
    }
    update_chunk_body(k, old, g, p, m, v);
}

/// The same loop compiled with hardware FMA (`mul_add` otherwise becomes a libm call).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn update_chunk_fma(
    k: &StepScalars,
    old: &Moments,
    g: &[f32],
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    update_chunk_body(k, old, g, p, m, v)
}

/// Per element, bitsandbytes' CPU arithmetic (see the module docs); `m`, `v` receive the new
/// unquantized moments. `fma` where libtorch's kernels fuse (`add_` with alpha, `addcmul_`).
#[inline(always)]
fn update_chunk_body(
    k: &StepScalars,
    old: &Moments,
    g: &[f32],
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let blocks = g
        .chunks(STATE_BLOCK)
        .zip(p.chunks_mut(STATE_BLOCK))
        .zip(old.q1.chunks(STATE_BLOCK).zip(old.q2.chunks(STATE_BLOCK)))
        .zip(m.chunks_mut(STATE_BLOCK).zip(v.chunks_mut(STATE_BLOCK)))
        .zip(old.absmax1.iter().zip(old.absmax2.iter()));
    for ((((g, p), (q1, q2)), (m, v)), (&s1, &s2)) in blocks {
        let elems = g
            .iter()
            .zip(p.iter_mut())
            .zip(q1.iter().zip(q2))
            .zip(m.iter_mut().zip(v.iter_mut()));
        for (((&gi, pi), (&c1, &c2)), (mi, vi)) in elems {
            if !gi.is_finite() {
                *mi = 0.0;
                *vi = 0.0;
                continue;
            }
            let m_old = old.m_code[c1 as usize] * s1;
            let v_old = old.v_code[c2 as usize] * s2;
            let m_new = gi.mul_add(k.one_minus_b1, m_old * k.b1);
            let v_new = (k.one_minus_b2 * gi).mul_add(gi, v_old * k.b2);
            let denom = v_new.sqrt() / k.c2 + k.eps;
            let mut x = *pi;
            if let Some(d) = k.decay {
                x *= d;
            }
            *pi = x + (k.neg_lr_over_c1 * m_new) / denom;
            *mi = m_new;
            *vi = v_new;
        }
    }
}

/// A 0-dim f32 tensor on `dev` (a broadcast factor for `addcmul_`, whose own scalar tch fixes
/// at 1: `addcmul_(a, s)` then computes `fma(a, s, self)` like `add_(a, alpha=s)`).
fn scalar_on(x: f32, dev: Device) -> Result<Tensor> {
    Ok(Tensor::from(x).f_to_device(dev)?)
}

/// The new `m` and `v` with bitsandbytes' op order, for any device; non-finite gradients
/// contribute nothing (their elements are masked afterwards).
fn moments_torch(
    k: &StepScalars,
    g: &Tensor,
    m_old: &Tensor,
    v_old: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = g.device();
    let finite = g.f_isfinite()?;
    let g0 = g.f_where_scalarother(&finite, 0.0)?;
    let mut m = m_old.f_mul_scalar(k.b1 as f64)?;
    let _ = m.f_addcmul_(&g0, &scalar_on(k.one_minus_b1, dev)?)?;
    let mut v = v_old.f_mul_scalar(k.b2 as f64)?;
    let _ = v.f_addcmul_(&g0.f_mul_scalar(k.one_minus_b2 as f64)?, &g0)?;
    Ok((m, v, finite))
}

/// Writes `new` into `p` where the gradient was finite, and zeroes the moments elsewhere.
fn commit_torch(
    p: &Tensor,
    new: &Tensor,
    finite: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
) -> Result<()> {
    let mut dst = p.shallow_clone();
    dst.f_copy_(&new.f_where_self(finite, p)?)?;
    let nonfinite = finite.f_logical_not()?;
    let _ = m.f_masked_fill_(&nonfinite, 0.0)?;
    let _ = v.f_masked_fill_(&nonfinite, 0.0)?;
    Ok(())
}

/// `p·(1 − lr·wd)` when weight decay is on, else a copy of `p`.
fn decayed(k: &StepScalars, p: &Tensor) -> Result<Tensor> {
    Ok(match k.decay {
        Some(d) => p.f_mul_scalar(d as f64)?,
        None => p.f_detach_copy()?,
    })
}

/// bitsandbytes' 32-bit Adam step (tensors under the 8-bit threshold), with libtorch ops: the
/// same ops bitsandbytes' CPU backend runs, so on the CPU the result is bit-identical.
fn full_step_torch(
    k: &StepScalars,
    p: &Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
) -> Result<()> {
    let (mut m_new, mut v_new, finite) = moments_torch(k, g, m, v)?;
    let update = m_new.f_div(&v_new.f_sqrt()?.f_add_scalar(k.eps_c2 as f64)?)?;
    let mut p_new = decayed(k, p)?;
    let _ = p_new.f_addcmul_(&update, &scalar_on(k.step_size, p.device())?)?;
    commit_torch(p, &p_new, &finite, &mut m_new, &mut v_new)?;
    m.f_copy_(&m_new)?;
    v.f_copy_(&v_new)?;
    Ok(())
}

/// The 8-bit step with libtorch ops (non-CPU or non-contiguous parameters): returns the new
/// (q1, absmax1, q2, absmax2).
#[allow(clippy::too_many_arguments)]
fn quant_step_torch(
    k: &StepScalars,
    m_code: &MomentCode,
    v_code: &MomentCode,
    rounding: StateRounding,
    p: &Tensor,
    g: &Tensor,
    (q1, absmax1): (&Tensor, &Tensor),
    (q2, absmax2): (&Tensor, &Tensor),
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let block = state_block()?;
    let m_old = quant::dequantize(q1, absmax1, &m_code.code, block, Kind::Float)?;
    let v_old = quant::dequantize(q2, absmax2, &v_code.code, block, Kind::Float)?;
    let (mut m, mut v, finite) = moments_torch(k, g, &m_old, &v_old)?;
    let denom = v
        .f_sqrt()?
        .f_div_scalar(k.c2 as f64)?
        .f_add_scalar(k.eps as f64)?;
    let mut p_new = decayed(k, p)?;
    let _ = p_new.f_addcdiv_(&m.f_mul_scalar(k.neg_lr_over_c1 as f64)?, &denom)?;
    commit_torch(p, &p_new, &finite, &mut m, &mut v)?;
    let (n1, a1) = m_code.requantize_torch(rounding, &m)?;
    let (n2, a2) = v_code.requantize_torch(rounding, &v)?;
    Ok((n1, a1, n2, a2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lut_code(code: &QuantCode, x: f32) -> u8 {
        let mc = MomentCode::new(code.clone());
        mc.lut[lut_bin(x)]
    }

    #[test]
    fn bnb_cpu_table_matches_its_documented_quirks() {
        let s = QuantCode::dynamic_signed();
        let u = QuantCode::dynamic_unsigned();
        assert_eq!(lut_code(&s, 0.0), 131);
        assert_eq!(lut_code(&u, 0.0), 7);
        assert_eq!(lut_code(&s, -1.0), 0);
        assert_eq!(lut_code(&s, 1.0), 255);
        assert_eq!(lut_code(&u, 1.0), 255);
        // Away from zero and from midpoints, the table agrees with nearest rounding.
        for x in [-0.7f32, -0.31, 0.123, 0.5, 0.9] {
            assert_eq!(lut_code(&s, x), s.nearest_exhaustive(x), "x = {x}");
        }
    }

    fn leaf(values: &Tensor) -> Tensor {
        values.detach().copy().set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &Tensor) {
        let mut p = p.shallow_clone();
        p.zero_grad();
        (&p * g).sum(Kind::Float).backward();
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        Vec::<f32>::try_from(&t.flatten(0, -1))
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// Runs `steps` steps on two copies, one through the fused CPU kernel and one through the
    /// libtorch-op path, and checks that they agree.
    fn paths_agree(rounding: StateRounding) {
        tch::manual_seed(7);
        let init = Tensor::randn([10_000], (Kind::Float, Device::Cpu)) * 0.02;
        let (pa, pb) = (leaf(&init), leaf(&init));
        let cfg = AdamConfig {
            weight_decay: 0.01,
            ..AdamConfig::default()
        };
        let mut a = Adam8bit::new(vec![pa.shallow_clone()], cfg)
            .unwrap()
            .with_rounding(rounding);
        let mut b = Adam8bit::new(vec![pb.shallow_clone()], cfg)
            .unwrap()
            .with_rounding(rounding);
        b.force_torch_ops = true;
        for t in 0..5 {
            let g = Tensor::randn([10_000], (Kind::Float, Device::Cpu)) * 10f64.powi(t - 2);
            set_grad(&pa, &g);
            set_grad(&pb, &g);
            a.step(1e-3).unwrap();
            b.step(1e-3).unwrap();
        }
        let (sa, sb) = (a.state_dict(), b.state_dict());
        for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
            assert_eq!(na, nb);
            assert!(
                ta.equal(tb),
                "{na} differs between the fused and libtorch paths"
            );
        }
        // Only √v may differ (libtorch's vectorised sqrt is not correctly rounded).
        let d = (&pa - &pb).abs().max().double_value(&[]);
        assert!(d < 1e-8, "params differ by {d}");
    }

    #[test]
    fn fused_cpu_kernel_agrees_with_torch_ops_nearest() {
        paths_agree(StateRounding::Nearest);
    }

    #[test]
    fn fused_cpu_kernel_agrees_with_torch_ops_bnb_cpu() {
        paths_agree(StateRounding::BitsandbytesCpu);
    }

    #[test]
    fn non_finite_gradients_zero_the_state_and_leave_the_parameter() {
        let cases = [
            (false, 5000i64, StateRounding::BitsandbytesCpu),
            (true, 5000, StateRounding::BitsandbytesCpu),
            (false, 5000, StateRounding::Nearest),
            (true, 5000, StateRounding::Nearest),
            (false, 100, StateRounding::BitsandbytesCpu),
        ];
        for (force, numel, rounding) in cases {
            tch::manual_seed(3);
            let p = leaf(&Tensor::randn([numel], (Kind::Float, Device::Cpu)));
            let cfg = AdamConfig {
                weight_decay: 0.1,
                ..AdamConfig::default()
            };
            let mut opt = Adam8bit::new(vec![p.shallow_clone()], cfg)
                .unwrap()
                .with_rounding(rounding);
            opt.force_torch_ops = force;
            set_grad(&p, &Tensor::randn([numel], (Kind::Float, Device::Cpu)));
            opt.step(1e-2).unwrap();
            let before = p.detach().copy();
            let g = Tensor::randn([numel], (Kind::Float, Device::Cpu));
            let _ = g.get(3).fill_(f64::NAN);
            let _ = g.get(70).fill_(f64::INFINITY);
            let _ = g.get(71).fill_(f64::NEG_INFINITY);
            set_grad(&p, &g);
            opt.step(1e-2).unwrap();
            let what = format!("force_torch_ops={force}, {numel} elements, {rounding:?}");
            assert_eq!(p.isfinite().all().int64_value(&[]), 1, "{what}");
            let (b, a) = (bits(&before), bits(&p.detach()));
            for i in [3, 70, 71] {
                assert_eq!(a[i], b[i], "element {i} moved ({what})");
            }
            assert_ne!(a[4], b[4], "{what}");
            // The masked moments are stored as whatever 0.0 quantizes to.
            let sd = opt.state_dict();
            let get = |f: &str| {
                let t = &sd.iter().find(|(n, _)| n.ends_with(f)).unwrap().1;
                t.flatten(0, -1)
            };
            let (s1, s2) = (get("state1"), get("state2"));
            let zero_codes = |mc: &MomentCode| match rounding {
                StateRounding::Nearest => mc.table.nearest(0.0) as i64,
                StateRounding::BitsandbytesCpu => mc.lut[lut_bin(0.0)] as i64,
            };
            for i in [3i64, 70, 71] {
                if numel as usize >= MIN_8BIT_SIZE {
                    assert_eq!(s1.int64_value(&[i]), zero_codes(&opt.m_code), "{what}");
                    assert_eq!(s2.int64_value(&[i]), zero_codes(&opt.v_code), "{what}");
                } else {
                    assert_eq!(s1.double_value(&[i]), 0.0, "{what}");
                    assert_eq!(s2.double_value(&[i]), 0.0, "{what}");
                }
            }
        }
    }

    /// Documents the hazard described in the module docs: with nearest rounding a tiny `v`
    /// rounds to 0 while `m` does not, and a vanishing gradient then moves the parameter by
    /// lr·m/eps; bitsandbytes' CPU table keeps a floor under `v` and a bounded step.
    #[test]
    fn nearest_rounding_can_take_a_huge_step_after_v_underflows() {
        let step_size = |rounding| {
            let p = leaf(&Tensor::zeros([256], (Kind::Float, Device::Cpu)));
            let mut opt = Adam8bit::new(vec![p.shallow_clone()], AdamConfig::default())
                .unwrap()
                .with_min_8bit_size(0)
                .with_rounding(rounding);
            let mut g = vec![0f32; 256];
            g[0] = 1.0;
            g[1] = 1e-4; // v/absmax = 1e-8 rounds to code 0; m/absmax = 1e-4 does not
            set_grad(&p, &Tensor::from_slice(&g));
            opt.step(1e-3).unwrap();
            let before = p.double_value(&[1]);
            g[1] = 0.0;
            set_grad(&p, &Tensor::from_slice(&g));
            opt.step(1e-3).unwrap();
            (p.double_value(&[1]) - before).abs()
        };
        let nearest = step_size(StateRounding::Nearest);
        let table = step_size(StateRounding::BitsandbytesCpu);
        assert!(nearest > 1.0, "nearest step {nearest}");
        assert!(table < 1e-3, "table step {table}");
    }
}
