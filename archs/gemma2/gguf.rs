//! Gemma 2 in llama.cpp's GGUF files: the sandwich norms' names, RMSNorm scales stored as
//! `1 + w` (Hugging Face keeps `w` and multiplies by `1 + w`), and the config.json the
//! `gemma2.*` metadata implies, with llama.cpp's defaults for what the converter leaves out.
use crate::error::Result;
use crate::io::gguf::{decoder_hf_name, refuse_rope_changes, DecoderSizes, GgufFile, GgufMapping};

/// The Gemma 2 GGUF mapping (`general.architecture = "gemma2"`).
pub struct Gemma2Gguf;

const ARCH: &str = "gemma2";

/// `gemma2.<key>`.
fn key(k: &str) -> String {
    format!("{ARCH}.{k}")
}

/// Gemma 2's block modules (llama.cpp's `ffn_norm` is the pre-feed-forward norm).
fn module(part: &str) -> Option<&'static str> {
    Some(match part {
        "attn_norm" => "input_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    })
}

/// Gemma 2 27B, the one size whose queries llama.cpp scales by hidden / heads rather than by
/// the head size; it knows the model by its 46 layers.
const LAYERS_27B: u64 = 46;

impl GgufMapping for Gemma2Gguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        decoder_hf_name(raw, module)
    }

    fn stored_offset(&self, raw: &str) -> Option<f32> {
        raw.ends_with("norm.weight").then_some(1.0)
    }

    /// Sizes from the `gemma2.*` keys. What llama.cpp's converter does not write takes the
    /// value llama.cpp itself assumes: soft-caps 50 / 30 and window 4096 when absent, queries
    /// scaled by the head size (by hidden / heads for the 46-layer 27B), sliding attention on
    /// even layers unless `attention.sliding_window_pattern` says otherwise, tanh-GELU.
    fn config(&self, file: &GgufFile) -> Result<serde_json::Value> {
        let sizes = DecoderSizes::read(file, ARCH)?;
        refuse_rope_changes(file, ARCH, sizes.head_dim)?;
        if let (Some(swa), Some(base)) = (
            file.positive_f64(&key("rope.freq_base_swa"))?,
            sizes.rope_theta,
        ) {
            if swa != base {
                return Err(file.bad(format!(
                    "gemma2.rope.freq_base_swa {swa} differs from gemma2.rope.freq_base {base}; Gemma 2 has one rope base"
                )));
            }
        }
        let number = |k: &str, default: f64| -> Result<f64> {
            Ok(file.positive_f64(&key(k))?.unwrap_or(default))
        };
        let query_scale = if sizes.layers == LAYERS_27B {
            sizes.hidden / sizes.heads
        } else {
            sizes.head_dim
        };
        let mut cfg = sizes.config(file, ARCH, "Gemma2ForCausalLM", "gemma2")?;
        cfg["hidden_activation"] = "gelu_pytorch_tanh".into();
        cfg["hidden_act"] = "gelu_pytorch_tanh".into();
        cfg["attention_bias"] = false.into();
        cfg["query_pre_attn_scalar"] = query_scale.into();
        cfg["attn_logit_softcapping"] = number("attn_logit_softcapping", 50.0)?.into();
        cfg["final_logit_softcapping"] = number("final_logit_softcapping", 30.0)?.into();
        cfg["sliding_window"] = file
            .meta_u64(&key("attention.sliding_window"))
            .unwrap_or(4096)
            .into();
        cfg["layer_types"] = layer_types(file, sizes.layers)?.into();
        Ok(cfg)
    }
}

/// `sliding_attention` / `full_attention` per layer, as llama.cpp decides: a per-layer bool
/// array or a period `n` in `gemma2.attention.sliding_window_pattern` (layer `i` slides iff
/// `i % n < n - 1`; 0 means every layer), by default 2.
fn layer_types(file: &GgufFile, layers: u64) -> Result<Vec<&'static str>> {
    let k = key("attention.sliding_window_pattern");
    let name = |slides: bool| {
        if slides {
            "sliding_attention"
        } else {
            "full_attention"
        }
    };
    let Some(v) = file.get(&k) else {
        return Ok((0..layers).map(|i| name(i % 2 == 0)).collect());
    };
    match v.as_array() {
        Some(flags) => {
            if flags.len() as u64 != layers {
                return Err(file.bad(format!(
                    "metadata {k} has {} entries for {layers} layers",
                    flags.len()
                )));
            }
            flags
                .iter()
                .map(|f| {
                    f.as_bool()
                        .map(name)
                        .ok_or_else(|| file.bad(format!("metadata {k} holds a non-boolean")))
                })
                .collect()
        }
        None => {
            let n = v.as_u64().ok_or_else(|| {
                file.bad(format!("metadata {k} is neither an array nor an integer"))
            })?;
            Ok((0..layers).map(|i| name(n == 0 || i % n < n - 1)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_are_renamed_and_shifted_back() {
        let m = Gemma2Gguf;
        for (raw, hf) in [
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.0.post_attention_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.0.post_ffw_norm.weight",
                "model.layers.0.post_feedforward_layernorm.weight",
            ),
            ("output_norm.weight", "model.norm.weight"),
        ] {
            assert_eq!(m.tensor_name(raw).as_deref(), Some(hf));
            assert_eq!(m.stored_offset(raw), Some(1.0), "{raw}");
        }
        assert_eq!(m.stored_offset("blk.0.attn_q.weight"), None);
        assert_eq!(m.stored_offset("token_embd.weight"), None);
    }
}
