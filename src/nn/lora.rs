//! LoRA adapters with PEFT's semantics, wrapped around any linear-like or embedding layer:
//! `y = base(x) + (B·A·dropout(x))·s` with `s = alpha/r` (`alpha/√r` with rsLoRA).
//! The base stays frozen; only A and B are trained, in f32, whatever the compute dtype.
pub use super::layer::AdapterShape;
use super::layer::Layer;
use crate::error::{OctetError, Result};
use crate::quant::LowRank;
use tch::{Device, Kind, Tensor};

/// LoRA hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub alpha: f64,
    /// Dropout on the adapter's input (Linear only, as in PEFT).
    pub dropout: f64,
    /// Scale by alpha/√r instead of alpha/r.
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor applied to B·A.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// A frozen base layer plus a trainable low-rank update.
pub struct LoraLayer {
    base: Box<dyn Layer>,
    shape: AdapterShape,
    /// Linear: `lora_A` `[r, in]`; Embedding: `lora_embedding_A` `[r, vocab]`.
    pub a: Tensor,
    /// Linear: `lora_B` `[out, r]`; Embedding: `lora_embedding_B` `[dim, r]`.
    pub b: Tensor,
    /// Hyper-parameters.
    pub config: LoraConfig,
    training: bool,
}

/// The rank as a tensor dimension, refused when 0 or larger than the layer's widest side
/// (a larger rank adds nothing a full update could not, and only costs memory).
fn checked_rank(r: usize, shape: AdapterShape) -> Result<i64> {
    let widest = match shape {
        AdapterShape::Linear {
            in_features,
            out_features,
        } => in_features.max(out_features),
        AdapterShape::Embedding { vocab, dim } => vocab.max(dim),
    };
    if r == 0 || r > widest {
        return Err(OctetError::InvalidArgument(format!(
            "LoRA rank {r} must be between 1 and the layer's widest side ({widest})"
        )));
    }
    Ok(r as i64)
}

impl LoraLayer {
    /// Wraps `base` with freshly initialised adapters (PEFT's init: Linear A is
    /// kaiming-uniform(a=√5), i.e. U(±1/√in), B zeros; Embedding A zeros, B standard normal).
    pub fn wrap(base: Box<dyn Layer>, config: LoraConfig) -> Result<Self> {
        let shape = base.adapter_shape().ok_or_else(|| {
            OctetError::InvalidArgument(format!(
                "LoRA cannot be attached to a {} layer",
                base.kind()
            ))
        })?;
        let r = checked_rank(config.r, shape)?;
        let device = base.device();
        // Drawn on the CPU and moved, so one seed gives the same adapters on every device.
        let opts = (Kind::Float, Device::Cpu);
        let (a, b) = match shape {
            AdapterShape::Linear {
                in_features,
                out_features,
            } => {
                let bound = 1.0 / (in_features as f64).sqrt();
                (
                    Tensor::empty([r, in_features as i64], opts).uniform_(-bound, bound),
                    Tensor::zeros([out_features as i64, r], opts),
                )
            }
            AdapterShape::Embedding { vocab, dim } => (
                Tensor::zeros([r, vocab as i64], opts),
                Tensor::randn([dim as i64, r], opts),
            ),
        };
        Ok(LoraLayer {
            base,
            shape,
            a: a.to_device(device).set_requires_grad(true),
            b: b.to_device(device).set_requires_grad(true),
            config,
            training: false,
        })
    }

    /// Wraps `base` with given adapter weights (loading an adapter); shapes are checked.
    pub fn with_weights(
        base: Box<dyn Layer>,
        config: LoraConfig,
        a: Tensor,
        b: Tensor,
        path: &str,
    ) -> Result<Self> {
        let shape = base.adapter_shape().ok_or_else(|| {
            OctetError::InvalidArgument(format!(
                "{path}: LoRA cannot be attached to a {} layer",
                base.kind()
            ))
        })?;
        // The expected shapes come from the rank alone: nothing is allocated before the
        // tensors are known to fit (a rank of 2^32 in a config must not reach an allocator).
        let r = checked_rank(config.r, shape)?;
        let (ea, eb) = match shape {
            AdapterShape::Linear {
                in_features,
                out_features,
            } => ([r, in_features as i64], [out_features as i64, r]),
            AdapterShape::Embedding { vocab, dim } => ([r, vocab as i64], [dim as i64, r]),
        };
        if a.size() != ea || b.size() != eb {
            return Err(OctetError::ShapeMismatch {
                what: format!("adapter for {path} (A, B)"),
                expected: format!("{ea:?}, {eb:?}"),
                found: format!("{:?}, {:?}", a.size(), b.size()),
            });
        }
        for (which, t) in [("A", &a), ("B", &b)] {
            if !t.is_floating_point() {
                return Err(OctetError::InvalidArgument(format!(
                    "adapter for {path}: {which} is {:?}, not floating point",
                    t.kind()
                )));
            }
        }
        let device = base.device();
        let load = |t: Tensor| -> Result<Tensor> {
            Ok(t.f_to_kind(Kind::Float)?
                .f_to_device(device)?
                .detach()
                .set_requires_grad(true))
        };
        Ok(LoraLayer {
            base,
            shape,
            a: load(a)?,
            b: load(b)?,
            config,
            training: false,
        })
    }

    /// The frozen base layer.
    pub fn base(&self) -> &dyn Layer {
        self.base.as_ref()
    }

    /// Whether this wraps an embedding.
    pub fn is_embedding(&self) -> bool {
        matches!(self.shape, AdapterShape::Embedding { .. })
    }

    /// The update ΔW = (B·A)·s in the base weight's `[out, in]` (Linear) or `[vocab, dim]`
    /// (Embedding) layout, f32.
    pub fn delta_weight(&self) -> Tensor {
        let s = self.config.scale();
        tch::no_grad(|| match self.shape {
            AdapterShape::Linear { .. } => self.b.matmul(&self.a) * s,
            AdapterShape::Embedding { .. } => (self.b.matmul(&self.a) * s).tr(),
        })
    }
}

impl Layer for LoraLayer {
    fn kind(&self) -> &'static str {
        self.base.kind()
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.config.scale();
        // Generating: the base's fused pass adds the update itself, with no tensor ops.
        if matches!(self.shape, AdapterShape::Linear { .. })
            && !self.training
            && crate::nn::scratch::inference_active()
        {
            let update = LowRank {
                a: &self.a,
                b: &self.b,
                scale: s,
            };
            if let Some(y) = self.base.forward_plus_low_rank(x, &update)? {
                return Ok(y);
            }
        }
        let y = self.base.forward(x)?;
        match self.shape {
            AdapterShape::Linear { .. } => {
                let k = x.kind();
                let xd = if self.training && self.config.dropout > 0.0 {
                    x.f_dropout(self.config.dropout, true)?
                } else {
                    x.shallow_clone()
                };
                let delta = xd
                    .f_matmul(&self.a.f_to_kind(k)?.f_tr()?)?
                    .f_matmul(&self.b.f_to_kind(k)?.f_tr()?)?
                    * s;
                Ok(y.f_add(&delta)?)
            }
            AdapterShape::Embedding { .. } => {
                // The base lookup above has checked the ids against the table.
                let after_a = Tensor::f_embedding(&self.a.f_tr()?, x, -1, false, false)?;
                let delta = after_a.f_matmul(&self.b.f_tr()?)? * s;
                Ok(y.f_to_kind(Kind::Float)?.f_add(&delta)?)
            }
        }
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.base.tensors()
    }
    fn to_device(&mut self, device: Device) {
        self.base.to_device(device);
        self.a = self.a.to_device(device).detach().set_requires_grad(true);
        self.b = self.b.to_device(device).detach().set_requires_grad(true);
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        None
    }
    fn device(&self) -> Device {
        self.base.device()
    }
    fn set_training(&mut self, on: bool) {
        self.training = on;
        self.base.set_training(on);
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        let (a, b) = if self.is_embedding() {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        let mut v = vec![
            (a.to_string(), self.a.shallow_clone()),
            (b.to_string(), self.b.shallow_clone()),
        ];
        v.extend(self.base.trainable());
        v
    }
    fn train_bias(&mut self, on: bool) -> bool {
        self.base.train_bias(on)
    }
    fn store_frozen_in(&mut self, kind: Kind) {
        self.base.store_frozen_in(kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::bnb8::Bnb8Linear;
    use crate::nn::q8::{Layout, Q8Weight};
    use crate::quant::{BlockSize, CodeKind};

    /// Generation adds the adapter's update inside the 8-bit layer's fused pass; the result
    /// equals the update computed with tensor operations, for both stored layouts.
    #[test]
    fn fused_update_in_generation_equals_the_tensor_ops() {
        tch::manual_seed(11);
        let opts = (Kind::Float, Device::Cpu);
        let (inp, out, r) = (96i64, 40i64, 4i64);
        for layout in [Layout::OutIn, Layout::InOut] {
            let shape = match layout {
                Layout::OutIn => [out, inp],
                Layout::InOut => [inp, out],
            };
            let block = BlockSize::new(64).unwrap();
            let q = Q8Weight::quantize(&Tensor::randn(shape, opts), block, CodeKind::Dynamic);
            let bias = Some(Tensor::randn([out], opts));
            let base = Bnb8Linear::with_layout("Bnb8Linear", layout, q.unwrap(), bias);
            let cfg = LoraConfig {
                r: r as usize,
                alpha: 6.0,
                ..Default::default()
            };
            let (a, b) = (Tensor::randn([r, inp], opts), Tensor::randn([out, r], opts));
            let lora = LoraLayer::with_weights(Box::new(base), cfg, a, b, "m").unwrap();
            let update = LowRank {
                a: &lora.a,
                b: &lora.b,
                scale: cfg.scale(),
            };
            for (rows, fusable) in [(1, true), (5, true), (40, false)] {
                let x = Tensor::randn([1, rows, inp], opts);
                let fused = crate::nn::scratch::inference(|| {
                    let direct = lora.base().forward_plus_low_rank(&x, &update).unwrap();
                    assert_eq!(direct.is_some(), fusable, "{layout:?}, {rows} rows");
                    lora.forward(&x).unwrap()
                });
                // Outside an inference scope the update runs as tensor operations.
                let ops = tch::no_grad(|| lora.forward(&x).unwrap());
                assert!(
                    fused.allclose(&ops, 1e-5, 1e-5, false),
                    "{layout:?}, {rows} rows"
                );
            }
        }
    }
}
