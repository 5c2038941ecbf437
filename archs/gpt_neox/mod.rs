//! GPT-NeoX (`GPTNeoXForCausalLM`; the Pythia family): fused per-head `query_key_value`,
//! partial rotary embeddings (rotate_half convention), parallel or sequential residuals with
//! two LayerNorms per block, and an untied `embed_out` head.
mod config;
mod gguf;
mod model;

pub use config::{GptNeoxConfig, RopeParameters};
pub use model::{modules, GptNeox};

use crate::arch::{Modules, Plugin};
use crate::error::Result;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use tch::Kind;

/// The GPT-NeoX plugin.
pub struct GptNeoxPlugin;

impl Plugin for GptNeoxPlugin {
    type Config = GptNeoxConfig;
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/gpt_neox/spec.toml";
    const DESCRIPTION: &'static str = "GPT-NeoX/Pythia: convert, inspect, train (LoRA), eval, generate, merge; 8-bit Linear + Embedding";
    fn config(json: &serde_json::Value) -> Result<GptNeoxConfig> {
        GptNeoxConfig::from_json(json)
    }
    fn modules(cfg: &GptNeoxConfig, has: &dyn Fn(&str) -> bool) -> Modules {
        model::modules(cfg, has)
    }
    fn build(cfg: GptNeoxConfig, layers: &mut LayerMap, kind: Kind) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(GptNeox::new(cfg, layers, kind)?))
    }
    fn gguf() -> Option<&'static dyn crate::io::gguf::GgufMapping> {
        Some(&gguf::GptNeoxGguf)
    }
}

crate::register_architecture!(GptNeoxPlugin);
