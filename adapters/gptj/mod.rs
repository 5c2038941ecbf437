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
