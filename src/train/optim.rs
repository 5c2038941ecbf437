//! The optimizer interface shared by [`Adam8bit`](super::adam8bit::Adam8bit) and
//! [`AdamW`](super::adamw::AdamW), their common configuration, and checkpoint helpers.
use crate::error::{OctetError, Result};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// A first-order optimizer over a fixed list of parameters.
pub trait Optimizer {
    /// Applies one update to every parameter from its current `.grad()` (params without a grad
    /// are skipped), with learning rate `lr` for this step.
    fn step(&mut self, lr: f64) -> Result<()>;
    /// Zeroes the gradients of all parameters.
    fn zero_grad(&mut self);
    /// Bytes of optimizer state currently held.
    fn state_bytes(&self) -> usize;
    /// Named state tensors (CPU) for checkpointing (include the step count), and the inverse.
    fn state_dict(&self) -> Vec<(String, Tensor)>;
    /// Restores what [`state_dict`](Optimizer::state_dict) returned, onto each parameter's
    /// device. Parameters without entries start fresh; unknown or inconsistent entries are errors.
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()>;
}

/// Adam's hyper-parameters (the learning rate is passed to each [`Optimizer::step`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AdamConfig {
    /// Decay rates of the first and second moment estimates.
    pub betas: (f64, f64),
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the parameter by `1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamConfig {
    /// Checks the ranges bitsandbytes and PyTorch accept: betas in [0, 1), eps and
    /// weight_decay finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        let (b1, b2) = self.betas;
        for (name, b) in [("beta1", b1), ("beta2", b2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(OctetError::InvalidArgument(format!(
                    "Adam {name} = {b} is outside [0, 1)"
                )));
            }
        }
        for (name, x) in [("eps", self.eps), ("weight_decay", self.weight_decay)] {
            if !x.is_finite() || x < 0.0 {
                return Err(OctetError::InvalidArgument(format!(
                    "Adam {name} = {x} must be finite and non-negative"
                )));
            }
        }
        Ok(())
    }
}

/// Rejects a learning rate that is negative or not finite.
pub(crate) fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(OctetError::InvalidArgument(format!(
            "learning rate {lr} must be finite and non-negative"
        )))
    }
}

/// Checks every parameter is an f32 tensor (the optimizers update f32 master weights).
pub(crate) fn check_params(params: &[Tensor], op: &'static str) -> Result<()> {
    for p in params {
        if p.kind() != Kind::Float {
            return Err(OctetError::UnsupportedDtype {
                op,
                found: p.kind(),
                expected: "f32 parameters",
            });
        }
    }
    Ok(())
}

/// Parameter `i`'s gradient as a contiguous f32 tensor, or `None` when it has none; a
/// gradient whose shape differs from the parameter's is an error.
pub(crate) fn grad_f32(p: &Tensor, i: usize) -> Result<Option<Tensor>> {
    let g = p.grad();
    if !g.defined() {
        return Ok(None);
    }
    if g.size() != p.size() {
        return Err(OctetError::ShapeMismatch {
            what: format!("gradient of parameter {i}"),
            expected: format!("{:?}", p.size()),
            found: format!("{:?}", g.size()),
        });
    }
    let g = if g.kind() == Kind::Float {
        g
    } else {
        g.to_kind(Kind::Float)
    };
    Ok(Some(g.contiguous()))
}

/// Zeroes each parameter's gradient in place (keeping the buffer, like PyTorch's
/// `zero_grad(set_to_none=False)`).
pub(crate) fn zero_grads(params: &mut [Tensor]) {
    for p in params.iter_mut() {
        p.zero_grad();
    }
}

/// `x^y` through the C library's `pow`, as Python's `float ** float` computes it.
///
/// `black_box` keeps LLVM from rewriting `pow(x, 0.5)` into `sqrt(x)` or an integral exponent
/// into repeated multiplication; either can differ from libm's `pow` in the last bit, and the
/// bias corrections must equal bitsandbytes' and PyTorch's exactly.
pub(crate) fn pow_libm(x: f64, y: f64) -> f64 {
    x.powf(std::hint::black_box(y))
}

/// A CPU snapshot of a state tensor that later in-place updates cannot reach.
pub(crate) fn cpu_snapshot(t: &Tensor) -> Tensor {
    if t.device() == Device::Cpu {
        t.copy()
    } else {
        t.to_device(Device::Cpu)
    }
}

/// A contiguous copy of `t` on `dev` that shares no memory with `t` (a loaded state must not
/// alias the caller's tensors, which `to_device` to the same device would).
pub(crate) fn owned_on(t: &Tensor, dev: Device) -> Result<Tensor> {
    let t = if t.device() == dev {
        t.f_detach_copy()?
    } else {
        t.f_to_device(dev)?
    };
    Ok(t.f_contiguous()?)
}

/// The step count as a checkpoint tensor.
pub(crate) fn step_tensor(step: u64) -> Tensor {
    Tensor::from_slice(&[step as i64])
}

/// The entries of a state dict grouped by parameter index: `state.{i}.{field}` → (i, field).
pub(crate) struct StateEntries<'a> {
    by_param: BTreeMap<usize, BTreeMap<&'a str, &'a Tensor>>,
}

impl<'a> StateEntries<'a> {
    /// Parses names of the form `state.{i}.{field}`; `fields` lists the accepted field names.
    pub(crate) fn parse(
        state: &'a [(String, Tensor)],
        n_params: usize,
        fields: &[&str],
    ) -> Result<Self> {
        let mut by_param: BTreeMap<usize, BTreeMap<&'a str, &'a Tensor>> = BTreeMap::new();
        for (name, t) in state {
            let bad = || {
                OctetError::InvalidArgument(format!(
                    "optimizer state entry '{name}': expected state.<param index>.<{}>",
                    fields.join("|")
                ))
            };
            let rest = name.strip_prefix("state.").ok_or_else(bad)?;
            let (idx, field) = rest.split_once('.').ok_or_else(bad)?;
            let idx: usize = idx.parse().map_err(|_| bad())?;
            if !fields.contains(&field) {
                return Err(bad());
            }
            if idx >= n_params {
                return Err(OctetError::InvalidArgument(format!(
                    "optimizer state entry '{name}' refers to parameter {idx}, but the optimizer has {n_params}"
                )));
            }
            if by_param.entry(idx).or_default().insert(field, t).is_some() {
                return Err(OctetError::InvalidArgument(format!(
                    "optimizer state entry '{name}' appears twice"
                )));
            }
        }
        Ok(StateEntries { by_param })
    }

    /// The fields recorded for parameter `i` (None when it has no state).
    pub(crate) fn param(&self, i: usize) -> Option<&BTreeMap<&'a str, &'a Tensor>> {
        self.by_param.get(&i)
    }
}

/// Looks up a required field of parameter `i` and checks its dtype and shape.
pub(crate) fn state_field<'a>(
    fields: &BTreeMap<&str, &'a Tensor>,
    i: usize,
    field: &str,
    kind: Kind,
    shape: &[i64],
) -> Result<&'a Tensor> {
    let t = fields.get(field).copied().ok_or_else(|| {
        OctetError::InvalidArgument(format!("optimizer state for parameter {i} lacks '{field}'"))
    })?;
    if t.kind() != kind {
        return Err(OctetError::UnsupportedDtype {
            op: "load_state_dict",
            found: t.kind(),
            expected: match kind {
                Kind::Uint8 => "uint8",
                Kind::Int64 => "int64",
                _ => "f32",
            },
        });
    }
    if t.size() != shape {
        return Err(OctetError::ShapeMismatch {
            what: format!("optimizer state state.{i}.{field}"),
            expected: format!("{shape:?}"),
            found: format!("{:?}", t.size()),
        });
    }
    Ok(t)
}

/// Reads the `step` field of parameter `i`.
pub(crate) fn state_step(fields: &BTreeMap<&str, &Tensor>, i: usize) -> Result<u64> {
    let t = state_field(fields, i, "step", Kind::Int64, &[1])?;
    let s = t.int64_value(&[0]);
    u64::try_from(s).map_err(|_| {
        OctetError::InvalidArgument(format!("optimizer state for parameter {i}: step {s} < 0"))
    })
}
