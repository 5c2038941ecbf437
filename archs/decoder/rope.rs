//! Rotary position embeddings as transformers computes them for the Llama-style decoders:
//! the default rope, `linear`, `dynamic` (NTK), `llama3` and `longrope` (Phi-3) scaling, over
//! all of a head or its first part (`partial_rotary_factor`).
//!
//! The frequency tables are computed with the same f32 tensor operations as transformers, so
//! the angles agree to the last bit or two. `dynamic` and `longrope` depend on the length of the
//! sequence a call sees (cached positions plus new ones), as transformers' forward-time update
//! does for a fresh model.
use crate::error::{OctetError, Result};
use tch::{Device, Kind, Tensor};

/// How the frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum Scaling {
    /// Plain rope.
    Default,
    /// Frequencies divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// NTK-aware: the base grows once a sequence is longer than the context.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth band between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context.
        original: f64,
    },
    /// Phi-3's LongRoPE: per-frequency divisors, short ones up to the original context and
    /// long ones past it, and cos/sin scaled by `attention_factor`.
    LongRope {
        /// Divisors for sequences within `original`.
        short: Vec<f64>,
        /// Divisors for longer sequences.
        long: Vec<f64>,
        /// The pre-training context.
        original: usize,
        /// Multiplier of cos and sin.
        attention_factor: f64,
    },
}

/// The rotary embedding a config describes.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    /// The base (`rope_theta`).
    pub theta: f64,
    /// How many leading dimensions of each head rotate (even).
    pub dim: usize,
    /// The frequency scaling.
    pub scaling: Scaling,
    /// `max_position_embeddings` (dynamic scaling starts past it).
    pub max_positions: usize,
}

fn bad(problem: String) -> OctetError {
    OctetError::config_value(problem)
}

fn num(p: &serde_json::Value, key: &str, rope_type: &str) -> Result<f64> {
    p.get(key)
        .and_then(|v| v.as_f64())
        .filter(|v| v.is_finite())
        .ok_or_else(|| {
            bad(format!(
                "rope_scaling type '{rope_type}' needs a numeric '{key}'"
            ))
        })
}

fn factors(p: &serde_json::Value, key: &str, len: usize) -> Result<Vec<f64>> {
    let list: Option<Vec<f64>> = p
        .get(key)
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect());
    match list {
        Some(l) if l.len() == len && l.iter().all(|f| *f > 0.0 && f.is_finite()) => Ok(l),
        _ => Err(bad(format!(
            "rope_scaling type 'longrope' needs '{key}': {len} positive numbers (rotary dim / 2)"
        ))),
    }
}

impl RopeSpec {
    /// Reads the rope settings: `rope_parameters` (transformers ≥ 5) or `rope_scaling` with a
    /// top-level `rope_theta` (earlier files), and `partial_rotary_factor` from either place.
    pub fn from_config(
        parameters: Option<&serde_json::Value>,
        scaling: Option<&serde_json::Value>,
        top_theta: Option<f64>,
        top_partial: Option<f64>,
        top_original: Option<usize>,
        head_dim: usize,
        max_positions: usize,
    ) -> Result<Self> {
        let empty = serde_json::json!({});
        let params = parameters
            .filter(|p| !p.is_null())
            .or(scaling.filter(|s| !s.is_null()))
            .unwrap_or(&empty);
        if !params.is_object() {
            return Err(bad(format!("rope_scaling {params} is not an object")));
        }
        let theta = params
            .get("rope_theta")
            .and_then(|t| t.as_f64())
            .or(top_theta)
            .unwrap_or(10000.0);
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(bad(format!("rope_theta {theta} must be positive")));
        }
        let partial = params
            .get("partial_rotary_factor")
            .and_then(|t| t.as_f64())
            .or(top_partial)
            .unwrap_or(1.0);
        // transformers: int(head_dim * partial_rotary_factor).
        let dim = (head_dim as f64 * partial) as usize;
        if !(partial > 0.0 && partial <= 1.0) || dim == 0 || !dim.is_multiple_of(2) {
            return Err(bad(format!(
                "partial_rotary_factor {partial} gives a rotary dim of {dim} for head_dim {head_dim} (must be even and positive)"
            )));
        }
        let ty = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let original = params
            .get("original_max_position_embeddings")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .or(top_original);
        let scaling = match ty {
            "default" => Scaling::Default,
            "linear" => Scaling::Linear {
                factor: positive(num(params, "factor", ty)?, "factor")?,
            },
            "dynamic" => Scaling::Dynamic {
                factor: positive(num(params, "factor", ty)?, "factor")?,
            },
            "llama3" => {
                let low = num(params, "low_freq_factor", ty)?;
                let high = num(params, "high_freq_factor", ty)?;
                if high <= low {
                    return Err(bad(format!(
                        "rope_scaling: high_freq_factor {high} must exceed low_freq_factor {low}"
                    )));
                }
                Scaling::Llama3 {
                    factor: positive(num(params, "factor", ty)?, "factor")?,
                    low_freq_factor: positive(low, "low_freq_factor")?,
                    high_freq_factor: high,
                    original: positive(num(params, "original_max_position_embeddings", ty)?, "original_max_position_embeddings")?,
                }
            }
            "longrope" => {
                let original = original.filter(|o| *o > 0).ok_or_else(|| {
                    bad("rope_scaling type 'longrope' needs original_max_position_embeddings".into())
                })?;
                let factor = params
                    .get("factor")
                    .and_then(|f| f.as_f64())
                    .unwrap_or(max_positions as f64 / original as f64);
                let attention_factor = match params.get("attention_factor").and_then(|f| f.as_f64()) {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                Scaling::LongRope {
                    short: factors(params, "short_factor", dim / 2)?,
                    long: factors(params, "long_factor", dim / 2)?,
                    original,
                    attention_factor,
                }
            }
            other => {
                return Err(bad(format!(
                    "rope_scaling type '{other}' is not supported (default, linear, dynamic, llama3, longrope)"
                )))
            }
        };
        Ok(RopeSpec {
            theta,
            dim,
            scaling,
            max_positions,
        })
    }
}

impl RopeSpec {
    /// The longest sequence the rope is meant for: dynamic NTK scaling stretches the context
    /// by its factor (that is what it is for); the others keep `max_position_embeddings`.
    pub fn context(&self) -> usize {
        match self.scaling {
            Scaling::Dynamic { factor } if factor > 1.0 => {
                (self.max_positions as f64 * factor) as usize
            }
            _ => self.max_positions,
        }
    }

    /// Where a cached generation must start over: LongRoPE's switch to its long table.
    pub fn cache_reset_at(&self) -> Option<i64> {
        match self.scaling {
            Scaling::LongRope { original, .. } => Some(original as i64),
            _ => None,
        }
    }
}

fn positive(v: f64, key: &str) -> Result<f64> {
    if v > 0.0 {
        Ok(v)
    } else {
        Err(bad(format!("rope_scaling: {key} {v} must be positive")))
    }
}

/// `arange(0, dim, 2) / dim` in f32, as transformers builds the exponents.
fn exponents(dim: usize) -> Tensor {
    Tensor::arange_start_step(0, dim as i64, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float)
        / dim as f64
}

/// `1 / base^(2j/dim)` with a scalar base.
fn default_inv_freq(theta: f64, dim: usize) -> Tensor {
    Tensor::pow_scalar(theta, &exponents(dim)).reciprocal()
}

fn llama3_inv_freq(inv: &Tensor, factor: f64, low: f64, high: f64, original: f64) -> Tensor {
    let (low_wl, high_wl) = (original / low, original / high);
    let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
    let scaled = inv.where_self(&wavelen.le(low_wl), &(inv / factor));
    let smooth = ((wavelen.reciprocal() * original) - low) / (high - low);
    let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
    let medium = wavelen.ge(high_wl).logical_and(&wavelen.le(low_wl));
    smoothed.where_self(&medium, &scaled)
}

/// The frequencies for a sequence of `len` positions and the cos/sin multiplier.
pub struct Frequencies {
    /// `[dim / 2]` f32.
    pub inv_freq: Tensor,
    /// cos and sin are multiplied by it.
    pub attention_factor: f64,
}

/// A rotary embedding ready to apply: the tables that do not depend on the length.
pub struct Rope {
    spec: RopeSpec,
    /// The table for sequences within the context (all of them but dynamic/longrope past it).
    base: Tensor,
    /// LongRoPE's table past the original context.
    long: Option<Tensor>,
}

impl Rope {
    /// Builds the tables.
    pub fn new(spec: &RopeSpec) -> Self {
        let plain = default_inv_freq(spec.theta, spec.dim);
        let divided = |f: &[f64]| {
            let ext = Tensor::from_slice(&f.iter().map(|&x| x as f32).collect::<Vec<_>>());
            (ext * Tensor::pow_scalar(spec.theta, &exponents(spec.dim))).reciprocal()
        };
        let (base, long) = match &spec.scaling {
            Scaling::Default | Scaling::Dynamic { .. } => (plain, None),
            Scaling::Linear { factor } => (plain / *factor, None),
            Scaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original,
            } => (
                llama3_inv_freq(
                    &plain,
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original,
                ),
                None,
            ),
            Scaling::LongRope { short, long, .. } => (divided(short), Some(divided(long))),
        };
        Rope {
            spec: spec.clone(),
            base,
            long,
        }
    }

    /// The frequencies a call covering positions `0..len` uses.
    pub fn frequencies(&self, len: i64) -> Frequencies {
        match &self.spec.scaling {
            Scaling::Dynamic { factor } if len > self.spec.max_positions as i64 => {
                // transformers computes the grown base from tensors: f32 all the way.
                let max = self.spec.max_positions as f64;
                let dim = self.spec.dim as f64;
                let grown = (Tensor::from(len as f32) * *factor / max - (*factor - 1.0))
                    .pow_tensor_scalar(dim / (dim - 2.0))
                    * self.spec.theta;
                Frequencies {
                    inv_freq: grown.pow(&exponents(self.spec.dim)).reciprocal(),
                    attention_factor: 1.0,
                }
            }
            Scaling::LongRope {
                original,
                attention_factor,
                ..
            } => Frequencies {
                inv_freq: if len > *original as i64 {
                    self.long.as_ref().unwrap_or(&self.base).shallow_clone()
                } else {
                    self.base.shallow_clone()
                },
                attention_factor: *attention_factor,
            },
            _ => Frequencies {
                inv_freq: self.base.shallow_clone(),
                attention_factor: 1.0,
            },
        }
    }

    /// Rotates q and k `[B, heads, T, head_dim]` at `positions` (`[1, T]`, or `[B, T]` for
    /// packed rows) with the frequencies of a call covering `0..len`: the first `dim`
    /// dimensions in HF's `rotate_half` convention (the two halves pair up), the rest as is.
    /// The cos/sin tables are built once for both.
    pub fn apply_at(
        &self,
        q: &Tensor,
        k: &Tensor,
        positions: &Tensor,
        len: i64,
    ) -> (Tensor, Tensor) {
        let dim = self.spec.dim as i64;
        let dev = q.device();
        let f = self.frequencies(len);
        let pos = positions.to_device(dev).to_kind(Kind::Float);
        let freqs = pos.unsqueeze(-1) * f.inv_freq.to_device(dev).view([1, 1, -1]);
        // [1 or B, 1, T, dim]
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let (mut cos, mut sin) = (emb.cos(), emb.sin());
        if f.attention_factor != 1.0 {
            cos *= f.attention_factor;
            sin *= f.attention_factor;
        }
        let kind = q.kind();
        let (cos, sin) = (cos.to_kind(kind), sin.to_kind(kind));
        (rotate(q, &cos, &sin, dim), rotate(k, &cos, &sin, dim))
    }
}

/// `x·cos + rotate_half(x)·sin` over the first `dim` dimensions of each head.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, dim: i64) -> Tensor {
    let hd = x.size()[3];
    let rot = x.narrow(3, 0, dim);
    let half = dim / 2;
    let rotated = Tensor::cat(&[-rot.narrow(3, half, half), rot.narrow(3, 0, half)], 3);
    let out = rot * cos + rotated * sin;
    if dim == hd {
        out
    } else {
        Tensor::cat(&[out, x.narrow(3, dim, hd - dim)], 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(params: serde_json::Value) -> Result<RopeSpec> {
        RopeSpec::from_config(Some(&params), None, None, None, None, 16, 64)
    }

    #[test]
    fn types_and_refusals() {
        assert_eq!(spec(json!({})).unwrap().scaling, Scaling::Default);
        let s = RopeSpec::from_config(
            None,
            Some(&json!({"type": "linear", "factor": 2.0})),
            Some(500.0),
            Some(0.5),
            None,
            16,
            64,
        )
        .unwrap();
        assert_eq!((s.theta, s.dim), (500.0, 8));
        assert_eq!(s.scaling, Scaling::Linear { factor: 2.0 });
        for bad in [
            json!({"rope_type": "yarn", "factor": 2.0}),
            json!({"rope_type": "linear"}),
            json!({"rope_type": "llama3", "factor": 8.0}),
            json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                   "original_max_position_embeddings": 16}),
            json!({"rope_type": "default", "partial_rotary_factor": 0.1}),
        ] {
            let e = spec(bad.clone()).unwrap_err().to_string();
            assert!(e.contains("rope") || e.contains("rotary"), "{bad}: {e}");
        }
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let s = spec(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}))
        .unwrap();
        let rope = Rope::new(&s);
        let plain = default_inv_freq(10000.0, 16);
        let f = rope.frequencies(8).inv_freq;
        let ratio: Vec<f64> = Vec::try_from(&plain / &f).unwrap();
        assert!((ratio[0] - 1.0).abs() < 1e-6, "{ratio:?}");
        assert!((ratio[7] - 8.0).abs() < 1e-5, "{ratio:?}");
        assert!(ratio.iter().any(|r| *r > 1.01 && *r < 7.99), "{ratio:?}");
    }

    #[test]
    fn dynamic_grows_the_base_only_past_the_context() {
        let s = RopeSpec::from_config(
            Some(&json!({"rope_type": "dynamic", "factor": 2.0})),
            None,
            None,
            None,
            None,
            16,
            16,
        )
        .unwrap();
        let rope = Rope::new(&s);
        let within: Vec<f64> = Vec::try_from(rope.frequencies(16).inv_freq).unwrap();
        let past: Vec<f64> = Vec::try_from(rope.frequencies(24).inv_freq).unwrap();
        assert_eq!(within[0], 1.0);
        assert!(past[7] < within[7]);
    }
}
