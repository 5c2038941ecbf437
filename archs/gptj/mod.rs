//! GPT-J (`GPTJForCausalLM`): rotary attention over `rotary_dim`, parallel attention + MLP
//! from one LayerNorm, gelu_new, an LM head with bias.
mod config;
mod model;

pub use config::GptjConfig;
pub use model::{modules, Gptj};

use crate::arch::{Modules, Plugin};
use crate::error::Result;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use tch::Kind;

/// The GPT-J plugin.
pub struct GptjPlugin;

impl Plugin for GptjPlugin {
    type Config = GptjConfig;
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/gptj/spec.toml";
    const DESCRIPTION: &'static str =
        "GPT-J: convert, inspect, train (LoRA), eval, generate, merge; 8-bit Linear + Embedding";
    fn config(json: &serde_json::Value) -> Result<GptjConfig> {
        GptjConfig::from_json(json)
    }
    fn modules(cfg: &GptjConfig, _has: &dyn Fn(&str) -> bool) -> Modules {
        model::modules(cfg)
    }
    fn build(cfg: GptjConfig, layers: &mut LayerMap, kind: Kind) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Gptj::new(cfg, layers, kind)?))
    }
}

crate::register_architecture!(GptjPlugin);

/// How [`random_layers`] stores the frozen weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomFrozen {
    /// Float, in the requested kind.
    Float,
    /// 8-bit Linear and Embedding weights (dynamic code).
    EightBit,
    /// 4-bit Linear weights (NF4, blocks of 64) and an 8-bit embedding, as `convert --bits 4`.
    FourBit,
}

/// Layers of a GPT-J with random frozen weights, for benchmarks, created on `on.1`: 8- and
/// 4-bit weights are drawn directly as bytes (never materialised in float), so a 6B-parameter
/// shape fits in ~6 GB (8-bit) or ~3.5 GB (4-bit); float weights are drawn in `on.0` (norms
/// and biases stay f32).
pub fn random_layers(
    cfg: &GptjConfig,
    frozen: RandomFrozen,
    on: (Kind, tch::Device),
) -> Result<LayerMap> {
    use crate::nn::bnb8::{Bnb8Embedding, Bnb8Linear};
    use crate::nn::float::{Embedding, LayerNorm, Linear};
    use crate::nn::q4::{Bnb4Linear, Q4Weight};
    use crate::quant::{BlockSize, Code4, QuantCode, Quantized};
    use tch::Tensor;
    let (weight_kind, device) = on;
    let f32_on = (Kind::Float, device);
    let scales = |blocks: usize| Tensor::rand([blocks as i64], f32_on) * 0.05 + 0.01;
    let quantized = |shape: &[i64]| -> Result<Quantized> {
        let block = BlockSize::DEFAULT;
        let numel: i64 = shape.iter().product();
        let q = Tensor::randint_low(0, 256, shape, (Kind::Uint8, device));
        Quantized::from_parts(
            q,
            scales(block.blocks_for(numel as usize)),
            QuantCode::dynamic_signed(),
            block,
        )
    };
    let four_bit = |module: &str, shape: &[i64]| -> Result<Q4Weight> {
        const BLOCK: usize = 64;
        let packed = Tensor::randint_low(0, 256, [shape[0], shape[1] / 2], (Kind::Uint8, device));
        let numel = (shape[0] * shape[1]) as usize;
        Q4Weight::from_stored(
            module,
            packed,
            scales(numel.div_ceil(BLOCK)),
            &Code4::nf4().to_tensor(),
        )
    };
    let spec = crate::arch::find("gptj")?.spec();
    let mut layers = LayerMap::default();
    for m in model::modules(cfg).iter() {
        let s: Vec<i64> = m.shape.iter().map(|&d| d as i64).collect();
        let bias = m.bias.present().then(|| Tensor::zeros([s[0]], f32_on));
        let layer: Box<dyn crate::nn::Layer> = if m.norm {
            Box::new(LayerNorm {
                weight: Tensor::ones([s[0]], f32_on),
                bias: Some(Tensor::zeros([s[0]], f32_on)),
                eps: cfg.layer_norm_epsilon,
            })
        } else if spec.module_kind(&m.path) == Some("Embedding") {
            if frozen != RandomFrozen::Float {
                Box::new(Bnb8Embedding {
                    weight: quantized(&s)?.into(),
                })
            } else {
                Box::new(Embedding {
                    weight: Tensor::randn(s.as_slice(), (weight_kind, device)) * 0.02,
                })
            }
        } else if frozen == RandomFrozen::EightBit {
            Box::new(Bnb8Linear::new(quantized(&s)?.into(), bias))
        } else if frozen == RandomFrozen::FourBit {
            Box::new(Bnb4Linear {
                weight: four_bit(&m.path, &s)?,
                bias,
            })
        } else {
            Box::new(Linear {
                weight: Tensor::randn(s.as_slice(), (weight_kind, device)) * 0.02,
                bias,
            })
        };
        layers.insert(m.path.clone(), layer);
    }
    Ok(layers)
}
