//! GPT-J (`GPTJForCausalLM`): rotary attention over `rotary_dim`, parallel attention + MLP
//! from one LayerNorm, gelu_new, an LM head with bias.
mod config;
mod model;

pub use config::GptjConfig;
pub use model::Gptj;

use crate::error::Result;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use crate::registry::{Architecture, ArchitectureRegistration};
use crate::spec::Spec;
use std::sync::OnceLock;
use tch::Kind;

struct GptjArch;

impl Architecture for GptjArch {
    fn spec(&self) -> &Spec {
        static SPEC: OnceLock<Spec> = OnceLock::new();
        SPEC.get_or_init(|| {
            Spec::parse(
                include_str!("../../specs/gptj.toml"),
                std::path::Path::new("specs/gptj.toml"),
            )
            .expect("the bundled GPT-J spec is valid (checked by tests)")
        })
    }
    fn description(&self) -> &'static str {
        "GPT-J: convert, inspect, train (LoRA), eval, generate, merge; 8-bit Linear + Embedding"
    }
    fn check(&self, config: &serde_json::Value, graph: &crate::nn::ModuleGraph) -> Result<()> {
        let cfg = GptjConfig::from_json(config)?;
        crate::nn::graph::check_weight_shapes(graph, &model::weight_shapes(&cfg))
    }
    fn build(
        &self,
        config: &serde_json::Value,
        layers: &mut LayerMap,
        kind: Kind,
    ) -> Result<Box<dyn CausalLm>> {
        let cfg = GptjConfig::from_json(config)?;
        Ok(Box::new(Gptj::new(cfg, layers, kind)?))
    }
}

static GPTJ: GptjArch = GptjArch;

inventory::submit! { ArchitectureRegistration { get: || &GPTJ } }

/// Layers of a GPT-J with random frozen weights, for benchmarks, created on `on.1`: 8-bit
/// weights are drawn directly as bytes (never materialised in float), so a 6B-parameter shape
/// fits in ~6 GB; float weights are drawn in `on.0` (norms and biases stay f32).
pub fn random_layers(
    cfg: &GptjConfig,
    eight_bit: bool,
    on: (Kind, tch::Device),
) -> Result<LayerMap> {
    use crate::nn::bnb8::{Bnb8Embedding, Bnb8Linear};
    use crate::nn::float::{Embedding, LayerNorm, Linear};
    use crate::quant::{BlockSize, QuantCode, Quantized};
    use tch::Tensor;
    let (weight_kind, device) = on;
    let f32_on = (Kind::Float, device);
    let quantized = |shape: &[i64]| -> Result<Quantized> {
        let block = BlockSize::DEFAULT;
        let numel: i64 = shape.iter().product();
        let q = Tensor::randint_low(0, 256, shape, (Kind::Uint8, device));
        let absmax = Tensor::rand([block.blocks_for(numel as usize) as i64], f32_on) * 0.05 + 0.01;
        Quantized::from_parts(q, absmax, QuantCode::dynamic_signed(), block)
    };
    let mut layers = LayerMap::default();
    for (path, shape) in model::weight_shapes(cfg) {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let has_bias = path.ends_with("fc_in")
            || path.ends_with("fc_out")
            || path == "lm_head"
            || path.ends_with("out_proj");
        let bias = (has_bias && !path.ends_with("out_proj")).then(|| Tensor::zeros([s[0]], f32_on));
        let layer: Box<dyn crate::nn::Layer> = if s.len() == 1 {
            Box::new(LayerNorm {
                weight: Tensor::ones([s[0]], f32_on),
                bias: Some(Tensor::zeros([s[0]], f32_on)),
                eps: cfg.layer_norm_epsilon,
            })
        } else if path == "transformer.wte" {
            if eight_bit {
                Box::new(Bnb8Embedding {
                    weight: quantized(&s)?.into(),
                })
            } else {
                Box::new(Embedding {
                    weight: Tensor::randn(s.as_slice(), (weight_kind, device)) * 0.02,
                })
            }
        } else if eight_bit {
            Box::new(Bnb8Linear::new(quantized(&s)?.into(), bias))
        } else {
            Box::new(Linear {
                weight: Tensor::randn(s.as_slice(), (weight_kind, device)) * 0.02,
                bias,
            })
        };
        layers.insert(path, layer);
    }
    Ok(layers)
}
