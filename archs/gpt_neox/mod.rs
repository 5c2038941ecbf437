//! GPT-NeoX (`GPTNeoXForCausalLM`; the Pythia family): fused per-head `query_key_value`,
//! partial rotary embeddings (rotate_half convention), parallel or sequential residuals with
//! two LayerNorms per block, and an untied `embed_out` head.
mod config;
mod model;

pub use config::{GptNeoxConfig, RopeParameters};
pub use model::{weight_shapes, GptNeox};

use crate::arch::Spec;
use crate::arch::{Architecture, ArchitectureRegistration};
use crate::error::Result;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use std::sync::OnceLock;
use tch::Kind;

struct GptNeoxArch;

impl Architecture for GptNeoxArch {
    fn spec(&self) -> &Spec {
        static SPEC: OnceLock<Spec> = OnceLock::new();
        SPEC.get_or_init(|| {
            Spec::parse(
                include_str!("spec.toml"),
                std::path::Path::new("archs/gpt_neox/spec.toml"),
            )
            .expect("the bundled GPT-NeoX spec is valid (checked by tests)")
        })
    }
    fn description(&self) -> &'static str {
        "GPT-NeoX/Pythia: convert, inspect, train (LoRA), eval, generate, merge; 8-bit Linear + Embedding"
    }
    fn check(&self, config: &serde_json::Value, graph: &crate::nn::ModuleGraph) -> Result<()> {
        let cfg = GptNeoxConfig::from_json(config)?;
        let head = model::head_name(&cfg, |p| graph.node(p).is_some());
        crate::nn::graph::check_weight_shapes(graph, &weight_shapes(&cfg, head))
    }
    fn build(
        &self,
        config: &serde_json::Value,
        layers: &mut LayerMap,
        kind: Kind,
    ) -> Result<Box<dyn CausalLm>> {
        let cfg = GptNeoxConfig::from_json(config)?;
        Ok(Box::new(GptNeox::new(cfg, layers, kind)?))
    }
}

static GPT_NEOX: GptNeoxArch = GptNeoxArch;

inventory::submit! { ArchitectureRegistration { get: || &GPT_NEOX } }
