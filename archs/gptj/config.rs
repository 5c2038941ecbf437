//! GPT-J's Hugging Face config.json, with Hugging Face's defaults.
use crate::error::{OctetError, Result};
use serde::Deserialize;

fn d_vocab() -> usize {
    50400
}
fn d_positions() -> usize {
    2048
}
fn d_embd() -> usize {
    4096
}
fn d_layer() -> usize {
    28
}
fn d_head() -> usize {
    16
}
fn d_rotary() -> Option<usize> {
    Some(64)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_act() -> String {
    "gelu_new".into()
}

/// The fields of GPT-J's config that the model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct GptjConfig {
    /// Vocabulary size.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Maximum sequence length.
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
    /// Leading dimensions of each head that are rotated (all of them when null).
    #[serde(default = "d_rotary")]
    pub rotary_dim: Option<usize>,
    /// MLP width (4 × n_embd when null).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// MLP activation.
    #[serde(default = "d_act")]
    pub activation_function: String,
}

impl GptjConfig {
    /// Parses and checks the config.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let c: GptjConfig = serde_json::from_value(v.clone())
            .map_err(|e| OctetError::config_value(format!("invalid GPT-J config: {e}")))?;
        if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
            return Err(OctetError::config_value(format!(
                "n_embd {} is not divisible by n_head {}",
                c.n_embd, c.n_head
            )));
        }
        let rd = c.rotary_dim();
        if !rd.is_multiple_of(2) || rd > c.head_dim() {
            return Err(OctetError::config_value(format!(
                "rotary_dim {rd} must be even and at most the head size {}",
                c.head_dim()
            )));
        }
        if !matches!(c.activation_function.as_str(), "gelu_new" | "gelu" | "relu") {
            return Err(OctetError::config_value(format!(
                "unsupported activation_function '{}'",
                c.activation_function
            )));
        }
        Ok(c)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Rotated dimensions per head.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim())
    }

    /// MLP width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}
