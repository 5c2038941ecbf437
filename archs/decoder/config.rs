//! The config.json fields of the Llama-style decoders, read once for every family: each family
//! supplies Hugging Face's defaults for its class, the file's own values win.
use super::rope::RopeSpec;
use crate::error::{OctetError, Result};
use serde::Deserialize;

/// The activation between the gate and up projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new` (GeGLU, tanh approximation).
    GeluTanh,
    /// `gelu` (exact erf).
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            _ => return None,
        })
    }
}

/// The raw fields, as config.json spells them (every family's keys; absent ones are `None`).
#[derive(Clone, Debug, Deserialize)]
struct Raw {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    hidden_activation: Option<String>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    max_window_layers: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default)]
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
}

/// Which layers a family's sliding window applies to when config.json has no `layer_types`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowLayers {
    /// Every layer, when `sliding_window` is set (Mistral, Phi-3).
    All,
    /// Layers 0, 2, 4, … (Gemma 2).
    Even,
    /// Layers from `max_window_layers` on, only with `use_sliding_window` (Qwen2).
    FromMaxWindowLayers,
    /// None: the class has no sliding window.
    Never,
}

/// A decoder's config, checked: sizes, rotary embedding, activation and per-layer windows.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// The MLP's activation.
    pub activation: Activation,
    /// Longest sequence the model takes.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// The rotary embedding.
    pub rope: RopeSpec,
    /// Biases on q/k/v/o (where the family reads the flag).
    pub attention_bias: bool,
    /// Biases on gate/up/down (where the family reads the flag).
    pub mlp_bias: bool,
    /// The LM head shares the embedding's weight.
    pub tie_word_embeddings: bool,
    /// Per layer, the sliding window it attends within (`None`: the whole past).
    pub windows: Vec<Option<usize>>,
    /// Attention scores are scaled by this (default `1/√head_dim`).
    pub attention_scale: f64,
    /// Gemma 2's `tanh` soft cap on attention scores.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2's `tanh` soft cap on the logits.
    pub final_logit_softcapping: Option<f64>,
}

fn bad(problem: String) -> OctetError {
    OctetError::config_value(problem)
}

/// `defaults` with every key of `file` written over it (a `null` in the file keeps it null).
fn merged(defaults: &serde_json::Value, file: &serde_json::Value) -> serde_json::Value {
    let mut out = defaults.clone();
    if let (Some(o), Some(f)) = (out.as_object_mut(), file.as_object()) {
        for (k, v) in f {
            o.insert(k.clone(), v.clone());
        }
    }
    out
}

impl DecoderConfig {
    /// Parses config.json over the family's `defaults` (Hugging Face's for the class) and
    /// checks it. `windows` says which layers a `sliding_window` applies to when the file has
    /// no `layer_types`; `window_may_exceed_context` lets a window at least as long as the
    /// context stand for full attention (Phi-3's 128k configs carry one).
    pub fn parse(
        file: &serde_json::Value,
        defaults: &serde_json::Value,
        windows: WindowLayers,
        window_may_exceed_context: bool,
    ) -> Result<Self> {
        let raw: Raw = serde_json::from_value(merged(defaults, file))
            .map_err(|e| bad(format!("invalid config: {e}")))?;
        let heads = raw.num_attention_heads;
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}"
            )));
        }
        if raw.head_dim.is_none() && !raw.hidden_size.is_multiple_of(heads) {
            return Err(bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {heads}",
                raw.hidden_size
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {head_dim} must be even and positive"
            )));
        }
        let act_name = raw
            .hidden_activation
            .clone()
            .or(raw.hidden_act.clone())
            .unwrap_or_else(|| "silu".into());
        let activation = Activation::parse(&act_name).ok_or_else(|| {
            bad(format!(
                "hidden_act '{act_name}' is not supported (silu, gelu, gelu_pytorch_tanh)"
            ))
        })?;
        let rope = RopeSpec::from_config(
            raw.rope_parameters.as_ref(),
            raw.rope_scaling.as_ref(),
            raw.rope_theta,
            raw.partial_rotary_factor,
            raw.original_max_position_embeddings,
            head_dim,
            raw.max_position_embeddings,
        )?;
        let layer_windows = layer_windows(&raw, windows)?;
        if let Some(w) = raw
            .sliding_window
            .filter(|_| layer_windows.iter().any(|w| w.is_some()))
        {
            if w == 0 {
                return Err(bad("sliding_window must be positive".into()));
            }
            if w > raw.max_position_embeddings && !window_may_exceed_context {
                return Err(bad(format!(
                    "sliding_window {w} is larger than max_position_embeddings {}",
                    raw.max_position_embeddings
                )));
            }
        }
        let scale = match raw.query_pre_attn_scalar {
            Some(s) if s > 0.0 && s.is_finite() => s.powf(-0.5),
            Some(s) => return Err(bad(format!("query_pre_attn_scalar {s} must be positive"))),
            None => (head_dim as f64).powf(-0.5),
        };
        for (key, cap) in [
            ("attn_logit_softcapping", raw.attn_logit_softcapping),
            ("final_logit_softcapping", raw.final_logit_softcapping),
        ] {
            if cap.is_some_and(|c| c <= 0.0 || !c.is_finite()) {
                return Err(bad(format!(
                    "{key} {} must be positive",
                    cap.unwrap_or(0.0)
                )));
            }
        }
        if raw.rms_norm_eps.is_nan() || raw.rms_norm_eps <= 0.0 {
            return Err(bad(format!(
                "rms_norm_eps {} must be positive",
                raw.rms_norm_eps
            )));
        }
        Ok(DecoderConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            activation,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope,
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            tie_word_embeddings: raw.tie_word_embeddings,
            windows: layer_windows,
            attention_scale: scale,
            attn_logit_softcapping: raw.attn_logit_softcapping,
            final_logit_softcapping: raw.final_logit_softcapping,
        })
    }

    /// Width of the query projection's output (`heads × head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projections' outputs (`kv_heads × head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// Each layer's window: from `layer_types` when the file has them, else by the family's rule.
fn layer_windows(raw: &Raw, rule: WindowLayers) -> Result<Vec<Option<usize>>> {
    let n = raw.num_hidden_layers;
    let window = raw.sliding_window;
    if let Some(types) = &raw.layer_types {
        if types.len() != n {
            return Err(bad(format!(
                "layer_types has {} entries for {n} layers",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => window
                    .map(Some)
                    .ok_or_else(|| bad("layer_types names sliding_attention but sliding_window is null".into())),
                other => Err(bad(format!(
                    "layer_types entry '{other}' is not supported (full_attention, sliding_attention)"
                ))),
            })
            .collect();
    }
    Ok((0..n)
        .map(|i| {
            let on = match rule {
                WindowLayers::All => true,
                WindowLayers::Even => i % 2 == 0,
                WindowLayers::FromMaxWindowLayers => {
                    raw.use_sliding_window == Some(true) && i >= raw.max_window_layers.unwrap_or(0)
                }
                WindowLayers::Never => false,
            };
            window.filter(|_| on)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(
        file: serde_json::Value,
        rule: WindowLayers,
        may_exceed: bool,
    ) -> Result<DecoderConfig> {
        let defaults = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 4, "num_attention_heads": 2, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6});
        DecoderConfig::parse(&file, &defaults, rule, may_exceed)
    }

    #[test]
    fn windows_follow_layer_types_or_the_family_rule() {
        // Qwen2.5's shape: a window is stated but not used.
        let c = parse(
            json!({"sliding_window": 131072, "use_sliding_window": false,
            "max_window_layers": 2}),
            WindowLayers::FromMaxWindowLayers,
            false,
        )
        .unwrap();
        assert_eq!(c.windows, vec![None; 4]);
        let c = parse(
            json!({"sliding_window": 8, "use_sliding_window": true,
            "max_window_layers": 2}),
            WindowLayers::FromMaxWindowLayers,
            false,
        )
        .unwrap();
        assert_eq!(c.windows, vec![None, None, Some(8), Some(8)]);
        let c = parse(json!({"sliding_window": 8}), WindowLayers::Even, false).unwrap();
        assert_eq!(c.windows, vec![Some(8), None, Some(8), None]);
        let c = parse(
            json!({"sliding_window": 8, "layer_types": ["full_attention",
            "sliding_attention", "full_attention", "full_attention"]}),
            WindowLayers::All,
            false,
        )
        .unwrap();
        assert_eq!(c.windows, vec![None, Some(8), None, None]);
        // Phi-3 128k: a window past the context stands for full attention there only.
        assert!(parse(json!({"sliding_window": 128}), WindowLayers::All, true).is_ok());
        let e = parse(json!({"sliding_window": 128}), WindowLayers::All, false).unwrap_err();
        assert!(e.to_string().contains("sliding_window 128"), "{e}");
        for bad in [
            json!({"layer_types": ["full_attention"]}),
            json!({"layer_types": ["sliding_attention", "full_attention", "full_attention",
                "full_attention"]}),
            json!({"layer_types": ["chunked_attention", "full_attention", "full_attention",
                "full_attention"], "sliding_window": 4}),
            json!({"sliding_window": 0}),
        ] {
            assert!(
                parse(bad.clone(), WindowLayers::All, false).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn gemma_scale_caps_and_activation() {
        let c = parse(
            json!({"query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "silu"}),
            WindowLayers::Never,
            false,
        )
        .unwrap();
        assert_eq!(c.attention_scale, 0.25);
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.activation, Activation::GeluTanh);
        assert!(parse(
            json!({"attn_logit_softcapping": -1.0}),
            WindowLayers::Never,
            false
        )
        .is_err());
        assert!(parse(json!({"hidden_act": "relu"}), WindowLayers::Never, false).is_err());
    }
}
