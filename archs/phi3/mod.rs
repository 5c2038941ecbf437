//! Phi-3 (`Phi3ForCausalLM`): Llama's block with fused `qkv_proj` and `gate_up_proj`, partial
//! rotary embeddings, LongRoPE scaling, and an optional sliding window over every layer.
mod gguf;

use crate::archs::decoder::{BiasRule, DecoderPlugin, Family, Layout, WindowLayers};
use crate::io::gguf::GgufMapping;

/// The Phi-3 family.
pub struct Phi3;

impl Family for Phi3 {
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/phi3/spec.toml";
    const DESCRIPTION: &'static str = "Phi-3 (also from GGUF): convert, inspect, train (LoRA), eval, generate, merge; fused qkv/gate_up, partial rotary, longrope; 8-bit Linear + Embedding";
    const LAYOUT: Layout = Layout {
        name: "Phi-3",
        fused_qkv: true,
        fused_gate_up: true,
        qkv_bias: BiasRule::Never,
        o_bias: BiasRule::Never,
        mlp_bias: BiasRule::Never,
        windows: WindowLayers::All,
        window_may_exceed_context: true,
        ..Layout::LLAMA
    };
    const DEFAULTS: &'static str = r#"{"vocab_size": 32064, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "sliding_window": null,
        "original_max_position_embeddings": 4096}"#;
    fn gguf() -> Option<&'static dyn GgufMapping> {
        Some(&gguf::Phi3Gguf)
    }
}

/// The Phi-3 plugin.
pub type Phi3Plugin = DecoderPlugin<Phi3>;

crate::register_architecture!(Phi3Plugin);
