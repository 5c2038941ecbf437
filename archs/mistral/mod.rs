//! Mistral (`MistralForCausalLM`): Llama's block with sliding-window attention
//! (`sliding_window`), in training and with the KV cache in generation. Mistral GGUFs are
//! written as `llama` and read by that plugin.
use crate::archs::decoder::{BiasRule, DecoderPlugin, Family, Layout, WindowLayers};

/// The Mistral family.
pub struct Mistral;

impl Family for Mistral {
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/mistral/spec.toml";
    const DESCRIPTION: &'static str = "Mistral: convert, inspect, train (LoRA), eval, generate, merge; sliding-window attention; 8-bit Linear + Embedding";
    const LAYOUT: Layout = Layout {
        name: "Mistral",
        qkv_bias: BiasRule::Never,
        o_bias: BiasRule::Never,
        mlp_bias: BiasRule::Never,
        windows: WindowLayers::All,
        ..Layout::LLAMA
    };
    const DEFAULTS: &'static str = r#"{"vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "sliding_window": 4096}"#;
}

/// The Mistral plugin.
pub type MistralPlugin = DecoderPlugin<Mistral>;

crate::register_architecture!(MistralPlugin);
