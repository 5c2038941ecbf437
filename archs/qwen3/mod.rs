//! Qwen3 (`Qwen3ForCausalLM`): Llama's block with an RMSNorm over each head of q and k before
//! the rotation, and an explicit `head_dim`.
mod gguf;

use crate::archs::decoder::{BiasRule, DecoderPlugin, Family, Layout, WindowLayers};
use crate::io::gguf::GgufMapping;

/// The Qwen3 family.
pub struct Qwen3;

impl Family for Qwen3 {
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/qwen3/spec.toml";
    const DESCRIPTION: &'static str = "Qwen3 (also from GGUF): convert, inspect, train (LoRA), eval, generate, merge; per-head q/k RMSNorm; 8-bit Linear + Embedding";
    const LAYOUT: Layout = Layout {
        name: "Qwen3",
        qk_norm: true,
        mlp_bias: BiasRule::Never,
        windows: WindowLayers::FromMaxWindowLayers,
        ..Layout::LLAMA
    };
    const DEFAULTS: &'static str = r#"{"vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "sliding_window": null,
        "use_sliding_window": false, "max_window_layers": 28}"#;
    fn gguf() -> Option<&'static dyn GgufMapping> {
        Some(&gguf::Qwen3Gguf)
    }
}

/// The Qwen3 plugin.
pub type Qwen3Plugin = DecoderPlugin<Qwen3>;

crate::register_architecture!(Qwen3Plugin);
