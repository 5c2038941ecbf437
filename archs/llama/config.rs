//! Llama's Hugging Face config.json, with Hugging Face's defaults (`LlamaConfig`).
use crate::error::{OctetError, Result};
use serde::Deserialize;

fn d_vocab() -> usize {
    32000
}
fn d_hidden() -> usize {
    4096
}
fn d_inter() -> usize {
    11008
}
fn d_layers() -> usize {
    32
}
fn d_heads() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_positions() -> usize {
    2048
}
fn d_eps() -> f64 {
    1e-6
}
fn d_theta() -> f64 {
    10000.0
}

/// The fields of Llama's config that the model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Hidden width.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    /// Number of blocks.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); all heads when null.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Size of one head; hidden_size / num_attention_heads when null.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation (only `silu`).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Longest sequence the model was trained on.
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base (transformers ≤ 4 writes it at the top level).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary scaling (transformers ≤ 4); only null is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Rotary parameters (transformers ≥ 5: `rope_type` and `rope_theta`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate/up/down.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The LM head shares the embedding's weight.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn bad(problem: String) -> OctetError {
    OctetError::config_value(problem)
}

impl LlamaConfig {
    /// Parses and checks the config.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let c: LlamaConfig = serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("invalid Llama config: {e}")))?;
        let (h, kv) = (c.num_attention_heads, c.kv_heads());
        if h == 0 || kv == 0 || !h.is_multiple_of(kv) {
            return Err(bad(format!(
                "num_attention_heads {h} must be a positive multiple of num_key_value_heads {kv}"
            )));
        }
        if c.head_dim.is_none() && !c.hidden_size.is_multiple_of(h) {
            return Err(bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {h}",
                c.hidden_size
            )));
        }
        if c.head_dim() == 0 || !c.head_dim().is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} must be even and positive",
                c.head_dim()
            )));
        }
        if c.hidden_act != "silu" {
            return Err(bad(format!(
                "unsupported hidden_act '{}' (Llama uses silu)",
                c.hidden_act
            )));
        }
        if c.rope_scaling.as_ref().is_some_and(|s| !s.is_null()) {
            return Err(bad(format!(
                "rope_scaling {} is not supported (only null)",
                c.rope_scaling
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            )));
        }
        if let Some(p) = c.rope_parameters.as_ref().filter(|p| !p.is_null()) {
            let ty = p
                .get("rope_type")
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if ty != "default" {
                return Err(bad(format!(
                    "rope_parameters.rope_type '{ty}' is not supported (only default)"
                )));
            }
        }
        if !c.rope_theta().is_finite() || c.rope_theta() <= 0.0 {
            return Err(bad(format!(
                "rope_theta {} must be positive",
                c.rope_theta()
            )));
        }
        Ok(c)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of the query projection's output (`heads × head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// Width of the key and value projections' outputs (`kv_heads × head_dim`).
    pub fn kv_width(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }

    /// Rotary base: `rope_parameters.rope_theta`, else `rope_theta`, else 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(self.rope_theta)
            .unwrap_or_else(d_theta)
    }
}
