//! GPT-2's Hugging Face config.json, with Hugging Face's defaults.
use crate::error::{OctetError, Result};
use serde::Deserialize;

fn d_vocab() -> usize {
    50257
}
fn d_positions() -> usize {
    1024
}
fn d_embd() -> usize {
    768
}
fn d_layer() -> usize {
    12
}
fn d_head() -> usize {
    12
}
fn d_eps() -> f64 {
    1e-5
}
fn d_act() -> String {
    "gelu_new".into()
}
fn d_true() -> bool {
    true
}

/// The fields of GPT-2's config that the model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Learned positions (the longest sequence).
    #[serde(default = "d_positions")]
    pub n_positions: usize,
    /// Hidden width.
    #[serde(default = "d_embd")]
    pub n_embd: usize,
    /// Number of blocks.
    #[serde(default = "d_layer")]
    pub n_layer: usize,
    /// Attention heads.
    #[serde(default = "d_head")]
    pub n_head: usize,
    /// MLP width (4 × n_embd when null).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// MLP activation.
    #[serde(default = "d_act")]
    pub activation_function: String,
    /// Scale attention scores by 1/√head_dim.
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    /// Further divide the scores of block i by i + 1.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Whether the head shares `transformer.wte` (GPT-2 always does).
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Cross-attention blocks (encoder-decoder use; not supported).
    #[serde(default)]
    pub add_cross_attention: bool,
}

impl Gpt2Config {
    /// Parses and checks the config.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let c: Gpt2Config = serde_json::from_value(v.clone())
            .map_err(|e| OctetError::config_value(format!("invalid GPT-2 config: {e}")))?;
        let bad = |m: String| Err(OctetError::config_value(m));
        if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
            return bad(format!(
                "n_embd {} is not divisible by n_head {}",
                c.n_embd, c.n_head
            ));
        }
        // The position embeddings are added in block 0 (see the model), so it must exist.
        if c.n_layer == 0 || c.vocab_size == 0 || c.n_positions == 0 {
            return bad("n_layer, vocab_size and n_positions must be at least 1".into());
        }
        if !matches!(
            c.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu" | "relu"
        ) {
            return bad(format!(
                "unsupported activation_function '{}'",
                c.activation_function
            ));
        }
        if !c.tie_word_embeddings {
            return bad(
                "GPT-2 with an untied LM head (tie_word_embeddings = false) is not supported"
                    .into(),
            );
        }
        if c.add_cross_attention {
            return bad("GPT-2 with cross-attention (add_cross_attention) is not supported".into());
        }
        Ok(c)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// MLP width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// The factor attention scores of block `layer` are multiplied by.
    pub fn attn_scale(&self, layer: usize) -> f64 {
        let mut s = if self.scale_attn_weights {
            1.0 / (self.head_dim() as f64).sqrt()
        } else {
            1.0
        };
        if self.scale_attn_by_inverse_layer_idx {
            s /= (layer + 1) as f64;
        }
        s
    }
}
