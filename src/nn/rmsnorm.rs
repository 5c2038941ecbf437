//! Root-mean-square normalisation (Llama's `LlamaRMSNorm`): `x · rsqrt(mean(x²) + eps) · weight`,
//! the statistics computed in f32 and the scale applied after casting back, as Hugging Face does.
//! Gemma's variant scales by `1 + weight`, in f32 before the cast.
use super::float::LayerNorm;
use super::kinds::LayerKind;
use super::layer::{check_params, Layer, LayerTensors};
use super::node::Node;
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// An RMSNorm over the last dimension.
///
/// Its scale lives in a [`LayerNorm`] (whose `bias` is always `None`) because
/// [`crate::model::CausalLm::visit_norms`] hands norms out as `LayerNorm`s to train them and to
/// load adapter weights into them; only `weight` and `eps` are used here.
pub struct RmsNorm {
    /// The scale `[dim]` (in `params.weight`) and epsilon (`params.eps`).
    pub params: LayerNorm,
    /// Gemma's convention: the stored weight is an offset from 1, applied in f32.
    pub unit_offset: bool,
}

impl RmsNorm {
    /// An RMSNorm with scale `weight` `[dim]` and epsilon `eps`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            params: LayerNorm {
                weight,
                bias: None,
                eps,
            },
            unit_offset: false,
        }
    }
}

impl Layer for RmsNorm {
    fn kind(&self) -> &'static str {
        "RMSNorm"
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.kind();
        let xf = x.f_to_kind(Kind::Float)?;
        let var = xf.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = xf.f_mul(&(var + self.params.eps).f_rsqrt()?)?;
        if self.unit_offset {
            let scale = self.params.weight.f_to_kind(Kind::Float)? + 1.0;
            return normed.f_mul(&scale)?.f_to_kind(k).map_err(Into::into);
        }
        let normed = normed.f_to_kind(k)?;
        // HF multiplies by the weight in the activations' dtype, after the cast back.
        let w = &self.params.weight;
        Ok(if w.kind() == k {
            normed.f_mul(w)?
        } else {
            normed.f_mul(&w.f_to_kind(k)?)?
        })
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![("weight".to_string(), self.params.weight.shallow_clone())]
    }
    fn to_device(&mut self, device: Device) {
        self.params.to_device(device);
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        self.params.trainable()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

fn check_rmsnorm(node: &Node) -> std::result::Result<(), String> {
    check_params(node, &[("weight", 1)], &[])
}

fn build_rmsnorm(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    let w = t.take("weight")?;
    let w = if w.kind() == Kind::Float {
        w
    } else {
        w.to_kind(Kind::Float)
    };
    // The epsilon is the architecture's to set from its config.
    Ok(Box::new(RmsNorm::new(w, 1e-6)))
}

inventory::submit! { LayerKind { name: "RMSNorm", check: check_rmsnorm, build: build_rmsnorm } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_formula() {
        let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([8], (Kind::Float, Device::Cpu));
        let n = RmsNorm::new(w.shallow_clone(), 1e-5);
        let want = &x / (x.square().mean_dim(-1, true, Kind::Float) + 1e-5).sqrt() * &w;
        let d = (n.forward(&x).unwrap() - want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-5, "{d}");
        let bf = n.forward(&x.to_kind(Kind::BFloat16)).unwrap();
        assert_eq!(bf.kind(), Kind::BFloat16);
    }
}
