//! GPT-2 (`GPT2LMHeadModel`): learned position embeddings, pre-norm blocks with sequential
//! residuals, fused `c_attn` q/k/v, gelu_new, and an LM head tied to `transformer.wte`.
//! Its projections are Hugging Face `Conv1D`s (weights stored `[in, out]`); the layer kind and
//! its 8-bit replacement are registered by this plugin (see [`conv1d`]).
mod config;
pub mod conv1d;
mod gguf;
mod model;

pub use config::Gpt2Config;
pub use model::{modules, Gpt2};

use crate::arch::{Modules, Plugin};
use crate::error::Result;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use tch::Kind;

/// The GPT-2 plugin.
pub struct Gpt2Plugin;

impl Plugin for Gpt2Plugin {
    type Config = Gpt2Config;
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/gpt2/spec.toml";
    const DESCRIPTION: &'static str = "GPT-2: convert, inspect, train (LoRA), eval, generate, merge; 8-bit Conv1D + Embedding, tied head";
    /// Conv1D weights are `[in, out]`: PEFT adapters for them say `fan_in_fan_out = true`.
    const FAN_IN_FAN_OUT: bool = true;
    fn config(json: &serde_json::Value) -> Result<Gpt2Config> {
        Gpt2Config::from_json(json)
    }
    fn modules(cfg: &Gpt2Config, _has: &dyn Fn(&str) -> bool) -> Modules {
        model::modules(cfg)
    }
    fn build(cfg: Gpt2Config, layers: &mut LayerMap, kind: Kind) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Gpt2::new(cfg, layers, kind)?))
    }
    fn gguf() -> Option<&'static dyn crate::io::gguf::GgufMapping> {
        Some(&gguf::Gpt2Gguf)
    }
}

crate::register_architecture!(Gpt2Plugin);
