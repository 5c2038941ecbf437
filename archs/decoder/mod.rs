//! The Llama-style decoder that llama, mistral, qwen2, qwen3, phi3 and gemma2 share: RMSNorm,
//! a gated MLP, grouped-query attention with rotary embeddings. Each of those plugins is a
//! [`Family`]: its spec, Hugging Face's config defaults for its class, and a [`Layout`] saying
//! which parts it has (fused projections, q/k norms, Gemma's sandwich norms, …). The config,
//! the module list, the loader's checks and the forward pass are written here once.
//!
//! This folder is not a plugin itself: it registers nothing.
mod config;
pub mod gguf;
mod model;
mod rope;

pub use config::{Activation, DecoderConfig, WindowLayers};
pub use model::{modules, Decoder};
pub use rope::{RopeSpec, Scaling};

use crate::arch::{Bias, Modules, Plugin};
use crate::error::Result;
use crate::io::gguf::GgufMapping;
use crate::model::CausalLm;
use crate::nn::LayerMap;
use std::marker::PhantomData;
use tch::Kind;

/// Where a group of projections gets its bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasRule {
    /// Never (Mistral, Phi-3).
    Never,
    /// Always (Qwen2's q/k/v).
    Always,
    /// As config.json's `attention_bias` says.
    AttentionFlag,
    /// As config.json's `mlp_bias` says.
    MlpFlag,
}

impl BiasRule {
    fn resolve(self, c: &DecoderConfig) -> Bias {
        match self {
            BiasRule::Never => Bias::Never,
            BiasRule::Always => Bias::Always,
            BiasRule::AttentionFlag => Bias::Config {
                key: "attention_bias",
                set: c.attention_bias,
            },
            BiasRule::MlpFlag => Bias::Config {
                key: "mlp_bias",
                set: c.mlp_bias,
            },
        }
    }
}

/// The parts of the decoder a family has.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// The model's name in messages.
    pub name: &'static str,
    /// One `qkv_proj` instead of q/k/v (Phi-3).
    pub fused_qkv: bool,
    /// One `gate_up_proj` instead of gate/up (Phi-3).
    pub fused_gate_up: bool,
    /// RMSNorm over each head of q and k before the rotation (Qwen3).
    pub qk_norm: bool,
    /// Norms after attention and around the MLP (Gemma 2).
    pub sandwich_norms: bool,
    /// Norm weights are offsets from 1 (Gemma).
    pub unit_offset_norms: bool,
    /// Embeddings are multiplied by √hidden (Gemma).
    pub scaled_embedding: bool,
    /// Bias of q/k/v.
    pub qkv_bias: BiasRule,
    /// Bias of o.
    pub o_bias: BiasRule,
    /// Bias of the MLP projections.
    pub mlp_bias: BiasRule,
    /// Which layers a `sliding_window` applies to when config.json lists no `layer_types`.
    pub windows: WindowLayers,
    /// A window at least as long as the context stands for full attention instead of being
    /// refused (Phi-3's 128k configs carry a 262144 window).
    pub window_may_exceed_context: bool,
}

impl Layout {
    /// Llama's: separate projections, biases as its flags say, no window.
    pub const LLAMA: Layout = Layout {
        name: "Llama",
        fused_qkv: false,
        fused_gate_up: false,
        qk_norm: false,
        sandwich_norms: false,
        unit_offset_norms: false,
        scaled_embedding: false,
        qkv_bias: BiasRule::AttentionFlag,
        o_bias: BiasRule::AttentionFlag,
        mlp_bias: BiasRule::MlpFlag,
        windows: WindowLayers::Never,
        window_may_exceed_context: false,
    };
}

/// One family of the decoder: what a plugin folder states.
pub trait Family: 'static {
    /// The spec TOML (`include_str!("spec.toml")`).
    const SPEC: &'static str;
    /// Where the spec comes from, named in errors.
    const SPEC_PATH: &'static str;
    /// One line on what it supports, for `octet archs`.
    const DESCRIPTION: &'static str;
    /// Its parts.
    const LAYOUT: Layout;
    /// Hugging Face's config defaults for the class, as JSON; config.json's values win.
    const DEFAULTS: &'static str;
    /// How its GGUF files map onto its checkpoints, if it reads GGUF.
    fn gguf() -> Option<&'static dyn GgufMapping> {
        None
    }
    /// Parses config.json over the family's defaults.
    fn config(json: &serde_json::Value) -> Result<DecoderConfig> {
        let defaults: serde_json::Value =
            serde_json::from_str(Self::DEFAULTS).expect("a family's defaults are valid JSON");
        DecoderConfig::parse(
            json,
            &defaults,
            Self::LAYOUT.windows,
            Self::LAYOUT.window_may_exceed_context,
        )
    }
}

/// The plugin of a decoder family (register it with
/// `register_architecture!(DecoderPlugin<MyFamily>)`).
pub struct DecoderPlugin<F>(PhantomData<fn() -> F>);

impl<F: Family> Plugin for DecoderPlugin<F> {
    type Config = DecoderConfig;
    const SPEC: &'static str = F::SPEC;
    const SPEC_PATH: &'static str = F::SPEC_PATH;
    const DESCRIPTION: &'static str = F::DESCRIPTION;
    fn config(json: &serde_json::Value) -> Result<DecoderConfig> {
        F::config(json)
    }
    fn modules(cfg: &DecoderConfig, has: &dyn Fn(&str) -> bool) -> Modules {
        model::modules(&F::LAYOUT, cfg, has)
    }
    fn build(cfg: DecoderConfig, layers: &mut LayerMap, kind: Kind) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Decoder::new(cfg, F::LAYOUT, layers, kind)?))
    }
    fn gguf() -> Option<&'static dyn GgufMapping> {
        F::gguf()
    }
}
