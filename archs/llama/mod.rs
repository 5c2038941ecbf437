//! Llama (`LlamaForCausalLM`): RMSNorm, SwiGLU MLP, grouped-query attention, rotary
//! embeddings with Llama 3's, linear and dynamic (NTK) scaling, optional biases, `head_dim`
//! apart from hidden / heads, optionally tied embeddings. Also read from llama.cpp GGUF files.
mod gguf;

use crate::archs::decoder::{DecoderPlugin, Family, Layout};
use crate::io::gguf::GgufMapping;

/// The Llama family.
pub struct Llama;

impl Family for Llama {
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/llama/spec.toml";
    const DESCRIPTION: &'static str = "Llama 1-3.x (also from GGUF): convert, inspect, train (LoRA), eval, generate, merge; rope scaling llama3/linear/dynamic; 8-bit Linear + Embedding, tied heads";
    const LAYOUT: Layout = Layout::LLAMA;
    const DEFAULTS: &'static str = r#"{"vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false}"#;
    fn gguf() -> Option<&'static dyn GgufMapping> {
        Some(&gguf::LlamaGguf)
    }
}

/// The Llama plugin.
pub type LlamaPlugin = DecoderPlugin<Llama>;

crate::register_architecture!(LlamaPlugin);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archs::decoder::Scaling;

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
        let c = Llama::config(&serde_json::json!({
            "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}
        }))
        .unwrap();
        assert_eq!(
            (c.head_dim, c.num_key_value_heads, c.rope.theta),
            (16, 2, 500.0)
        );
        let c = Llama::config(&serde_json::json!({
            "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 20.0
        }))
        .unwrap();
        assert_eq!(c.rope.scaling, Scaling::Linear { factor: 2.0 });
        for bad in [
            serde_json::json!({"rope_scaling": {"type": "su", "factor": 2.0}}),
            serde_json::json!({"rope_parameters": {"rope_type": "llama3"}}),
            serde_json::json!({"num_attention_heads": 6, "num_key_value_heads": 4}),
            serde_json::json!({"hidden_act": "relu"}),
        ] {
            assert!(Llama::config(&bad).is_err(), "{bad}");
        }
    }
}
