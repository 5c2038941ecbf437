//! Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): Llama's block with biases on q/k/v (never on o or
//! the MLP), tied or untied head, sliding windows only where `use_sliding_window` or
//! `layer_types` ask for them.
mod gguf;

use crate::archs::decoder::{BiasRule, DecoderPlugin, Family, Layout, WindowLayers};
use crate::io::gguf::GgufMapping;

/// The Qwen2 family.
pub struct Qwen2;

impl Family for Qwen2 {
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/qwen2/spec.toml";
    const DESCRIPTION: &'static str = "Qwen2/Qwen2.5 (also from GGUF): convert, inspect, train (LoRA), eval, generate, merge; q/k/v biases, tied or untied head; 8-bit Linear + Embedding";
    const LAYOUT: Layout = Layout {
        name: "Qwen2",
        qkv_bias: BiasRule::Always,
        o_bias: BiasRule::Never,
        mlp_bias: BiasRule::Never,
        windows: WindowLayers::FromMaxWindowLayers,
        ..Layout::LLAMA
    };
    const DEFAULTS: &'static str = r#"{"vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "sliding_window": null, "use_sliding_window": false,
        "max_window_layers": 28}"#;
    fn gguf() -> Option<&'static dyn GgufMapping> {
        Some(&gguf::Qwen2Gguf)
    }
}

/// The Qwen2 plugin.
pub type Qwen2Plugin = DecoderPlugin<Qwen2>;

crate::register_architecture!(Qwen2Plugin);
