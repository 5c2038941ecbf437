//! GPT-NeoX's Hugging Face config.json (Pythia and friends), with Hugging Face's defaults.
//! Rotary settings are read from either form: the original `rotary_pct` / `rotary_emb_base`
//! keys, or transformers 5's `rope_parameters` (which win when both are present, as there).
use crate::error::{OctetError, Result};
use serde::Deserialize;

fn d_vocab() -> usize {
    50432
}
fn d_hidden() -> usize {
    6144
}
fn d_layers() -> usize {
    44
}
fn d_heads() -> usize {
    64
}
fn d_inner() -> usize {
    24576
}
fn d_act() -> String {
    "gelu".into()
}
fn d_positions() -> usize {
    2048
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}

/// transformers 5's `rope_parameters` (or the older `rope_scaling`) object.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeParameters {
    /// The rotary base.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Fraction of each head that is rotated.
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Only "default" is supported.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
}

/// The fields of GPT-NeoX's config that the model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct GptNeoxConfig {
    /// Vocabulary size.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Hidden width.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Number of blocks.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// MLP width.
    #[serde(default = "d_inner")]
    pub intermediate_size: usize,
    /// MLP activation.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Longest sequence.
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Attention and MLP both read the block input (true) or run one after the other.
    #[serde(default = "d_true")]
    pub use_parallel_residual: bool,
    /// Whether the head shares `gpt_neox.embed_in` (Pythia: no).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether the attention projections have biases (informational: biases are taken as
    /// stored).
    #[serde(default = "d_true")]
    pub attention_bias: bool,
    /// Original key: fraction of each head that is rotated.
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    /// Original key: the rotary base.
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    /// transformers 5's rotary settings.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Older name of the same object (read as transformers does, ahead of rope_parameters).
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
}

impl GptNeoxConfig {
    /// Parses and checks the config.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let c: GptNeoxConfig = serde_json::from_value(v.clone())
            .map_err(|e| OctetError::config_value(format!("invalid GPT-NeoX config: {e}")))?;
        let bad = |m: String| Err(OctetError::config_value(m));
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ));
        }
        if c.vocab_size == 0 || c.max_position_embeddings == 0 {
            return bad("vocab_size and max_position_embeddings must be at least 1".into());
        }
        if let Some(t) = c.rope().rope_type.as_deref() {
            if t != "default" {
                return bad(format!("rope type '{t}' is not supported (only default)"));
            }
        }
        let pct = c.rotary_fraction();
        if !(0.0..=1.0).contains(&pct) {
            return bad(format!("rotary_pct {pct} must lie in [0, 1]"));
        }
        if !c.rotary_dims().is_multiple_of(2) {
            return bad(format!(
                "rotary_pct {pct} gives {} rotated dimensions per head; they must be even",
                c.rotary_dims()
            ));
        }
        if c.rotary_base() <= 0.0 {
            return bad(format!("rotary base {} must be positive", c.rotary_base()));
        }
        if !matches!(
            c.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "relu"
        ) {
            return bad(format!("unsupported hidden_act '{}'", c.hidden_act));
        }
        Ok(c)
    }

    fn rope(&self) -> RopeParameters {
        self.rope_scaling
            .clone()
            .or_else(|| self.rope_parameters.clone())
            .unwrap_or_default()
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Fraction of each head that is rotated (default 0.25).
    pub fn rotary_fraction(&self) -> f64 {
        self.rope()
            .partial_rotary_factor
            .or(self.rotary_pct)
            .unwrap_or(0.25)
    }

    /// The rotary base (default 10000).
    pub fn rotary_base(&self) -> f64 {
        self.rope()
            .rope_theta
            .or(self.rotary_emb_base)
            .unwrap_or(10000.0)
    }

    /// Rotated dimensions per head: `int(head_dim × rotary_pct)`, as transformers computes it.
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_fraction()) as usize
    }
}
