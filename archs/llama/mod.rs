//! Llama (`LlamaForCausalLM`): RMSNorm, SwiGLU MLP, grouped-query attention, rotary
//! embeddings (default rope only), optional biases, optionally tied embeddings.
mod config;
mod model;

pub use config::LlamaConfig;
pub use model::{weight_shapes, Llama};

use crate::arch::Spec;
use crate::arch::{Architecture, ArchitectureRegistration};
use crate::error::Result;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use std::sync::OnceLock;
use tch::Kind;

struct LlamaArch;

impl Architecture for LlamaArch {
    fn spec(&self) -> &Spec {
        static SPEC: OnceLock<Spec> = OnceLock::new();
        SPEC.get_or_init(|| {
            Spec::parse(
                include_str!("spec.toml"),
                std::path::Path::new("archs/llama/spec.toml"),
            )
            .expect("the bundled Llama spec is valid (checked by tests)")
        })
    }
    fn description(&self) -> &'static str {
        "Llama (also from GGUF): convert, inspect, train (LoRA), eval, generate, merge; 8-bit Linear + Embedding, tied heads"
    }
    fn check(&self, config: &serde_json::Value, graph: &crate::nn::ModuleGraph) -> Result<()> {
        model::check_graph(&LlamaConfig::from_json(config)?, graph)
    }
    fn build(
        &self,
        config: &serde_json::Value,
        layers: &mut LayerMap,
        kind: Kind,
    ) -> Result<Box<dyn CausalLm>> {
        let cfg = LlamaConfig::from_json(config)?;
        Ok(Box::new(Llama::new(cfg, layers, kind)?))
    }
}

static LLAMA: LlamaArch = LlamaArch;

inventory::submit! { ArchitectureRegistration { get: || &LLAMA } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_selects_the_documented_modules() {
        let s = LLAMA.spec();
        for m in [
            "model.embed_tokens",
            "model.layers.3.self_attn.o_proj",
            "model.layers.3.mlp.gate_proj",
            "lm_head",
        ] {
            assert!(s.quantizes(m), "{m}");
        }
        assert!(!s.quantizes("model.layers.3.input_layernorm"));
        assert!(!s.quantizes("model.norm"));
        assert_eq!(s.module_kind("model.norm"), Some("RMSNorm"));
        assert_eq!(
            s.module_kind("model.layers.0.mlp.down_proj"),
            Some("Linear")
        );
    }

    #[test]
    fn config_defaults_and_refusals() {
        let c = LlamaConfig::from_json(&serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}
        }))
        .unwrap();
        assert_eq!((c.head_dim(), c.kv_heads(), c.rope_theta()), (16, 2, 500.0));
        for bad in [
            serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}),
            serde_json::json!({"rope_parameters": {"rope_type": "llama3"}}),
            serde_json::json!({"num_attention_heads": 6, "num_key_value_heads": 4}),
            serde_json::json!({"hidden_act": "gelu"}),
        ] {
            assert!(LlamaConfig::from_json(&bad).is_err(), "{bad}");
        }
    }
}
