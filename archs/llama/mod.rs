//! Llama (`LlamaForCausalLM`): RMSNorm, SwiGLU MLP, grouped-query attention, rotary
//! embeddings (default rope only), optional biases, optionally tied embeddings.
mod config;
mod gguf;
mod model;

pub use config::LlamaConfig;
pub use model::{modules, Llama};

use crate::arch::{Modules, Plugin};
use crate::error::Result;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use tch::Kind;

/// The Llama plugin.
pub struct LlamaPlugin;

impl Plugin for LlamaPlugin {
    type Config = LlamaConfig;
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/llama/spec.toml";
    const DESCRIPTION: &'static str = "Llama (also from GGUF): convert, inspect, train (LoRA), eval, generate, merge; 8-bit Linear + Embedding, tied heads";
    fn config(json: &serde_json::Value) -> Result<LlamaConfig> {
        LlamaConfig::from_json(json)
    }
    fn modules(cfg: &LlamaConfig, has: &dyn Fn(&str) -> bool) -> Modules {
        model::modules(cfg, has)
    }
    fn build(cfg: LlamaConfig, layers: &mut LayerMap, kind: Kind) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Llama::new(cfg, layers, kind)?))
    }
    fn gguf() -> Option<&'static dyn crate::io::gguf::GgufMapping> {
        Some(&gguf::LlamaGguf)
    }
}

crate::register_architecture!(LlamaPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_selects_the_documented_modules() {
        let s = crate::arch::find("llama").unwrap().spec();
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
