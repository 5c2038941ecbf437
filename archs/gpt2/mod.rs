//! GPT-2 (`GPT2LMHeadModel`): learned position embeddings, pre-norm blocks with sequential
//! residuals, fused `c_attn` q/k/v, gelu_new, and an LM head tied to `transformer.wte`.
//! Its projections are Hugging Face `Conv1D`s (weights stored `[in, out]`); the layer kind and
//! its 8-bit replacement are registered by this plugin (see [`conv1d`]).
mod config;
pub mod conv1d;
mod model;

pub use config::Gpt2Config;
pub use model::{weight_shapes, Gpt2};

use crate::arch::Spec;
use crate::arch::{Architecture, ArchitectureRegistration};
use crate::error::Result;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use std::sync::OnceLock;
use tch::Kind;

struct Gpt2Arch;

impl Architecture for Gpt2Arch {
    fn spec(&self) -> &Spec {
        static SPEC: OnceLock<Spec> = OnceLock::new();
        SPEC.get_or_init(|| {
            Spec::parse(
                include_str!("spec.toml"),
                std::path::Path::new("archs/gpt2/spec.toml"),
            )
            .expect("the bundled GPT-2 spec is valid (checked by tests)")
        })
    }
    fn description(&self) -> &'static str {
        "GPT-2: convert, inspect, train (LoRA), eval, generate, merge; 8-bit Conv1D + Embedding, tied head"
    }
    fn check(&self, config: &serde_json::Value, graph: &crate::nn::ModuleGraph) -> Result<()> {
        let cfg = Gpt2Config::from_json(config)?;
        crate::nn::graph::check_weight_shapes(graph, &weight_shapes(&cfg))
    }
    fn build(
        &self,
        config: &serde_json::Value,
        layers: &mut LayerMap,
        kind: Kind,
    ) -> Result<Box<dyn CausalLm>> {
        let cfg = Gpt2Config::from_json(config)?;
        Ok(Box::new(Gpt2::new(cfg, layers, kind)?))
    }
    /// Conv1D weights are `[in, out]`: PEFT adapters for them say `fan_in_fan_out = true`.
    fn fan_in_fan_out(&self) -> bool {
        true
    }
}

static GPT2: Gpt2Arch = Gpt2Arch;

inventory::submit! { ArchitectureRegistration { get: || &GPT2 } }
