//! Gemma 2 (`Gemma2ForCausalLM`): embeddings scaled by √hidden, RMSNorm scaling by `1 + w`,
//! sandwich norms around attention and the MLP, GeGLU, `tanh` soft-capping of attention
//! scores and logits, and sliding-window attention on alternate layers.
mod gguf;

use crate::archs::decoder::{BiasRule, DecoderPlugin, Family, Layout, WindowLayers};
use crate::io::gguf::GgufMapping;

/// The Gemma 2 family.
pub struct Gemma2;

impl Family for Gemma2 {
    const SPEC: &'static str = include_str!("spec.toml");
    const SPEC_PATH: &'static str = "archs/gemma2/spec.toml";
    const DESCRIPTION: &'static str = "Gemma 2 (also from GGUF): convert, inspect, train (LoRA), eval, generate, merge; soft-capping, sandwich norms, alternating sliding windows; 8-bit Linear + Embedding, tied head";
    const LAYOUT: Layout = Layout {
        name: "Gemma 2",
        sandwich_norms: true,
        unit_offset_norms: true,
        scaled_embedding: true,
        mlp_bias: BiasRule::Never,
        windows: WindowLayers::Even,
        ..Layout::LLAMA
    };
    const DEFAULTS: &'static str = r#"{"vocab_size": 256000, "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
        "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0}"#;
    fn gguf() -> Option<&'static dyn GgufMapping> {
        Some(&gguf::Gemma2Gguf)
    }
}

/// The Gemma 2 plugin.
pub type Gemma2Plugin = DecoderPlugin<Gemma2>;

crate::register_architecture!(Gemma2Plugin);
