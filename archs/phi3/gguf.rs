//! Phi-3 in llama.cpp's GGUF files: the fused `attn_qkv` (Hugging Face's `qkv_proj`) and
//! `ffn_up` (Hugging Face's `gate_up_proj`, gate rows then up rows), partial rotary
//! embeddings, and longrope scaling kept as the `rope_factors_long` / `rope_factors_short`
//! tensors plus `phi3.rope.scaling.*` keys.
use crate::error::Result;
use crate::io::gguf::{decoder_hf_name, settings_values, DecoderSizes, GgufFile, GgufMapping};

/// The Phi-3 GGUF mapping (`general.architecture = "phi3"`).
pub struct Phi3Gguf;

const ARCH: &str = "phi3";
const LONG: &str = "rope_factors_long.weight";
const SHORT: &str = "rope_factors_short.weight";

/// `phi3.<key>`.
fn key(k: &str) -> String {
    format!("{ARCH}.{k}")
}

/// Phi-3's block modules.
fn module(part: &str) -> Option<&'static str> {
    Some(match part {
        "attn_norm" => "input_layernorm",
        "attn_qkv" => "self_attn.qkv_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_up" => "mlp.gate_up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    })
}

impl GgufMapping for Phi3Gguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        decoder_hf_name(raw, module)
    }

    fn is_settings_tensor(&self, raw: &str) -> bool {
        raw == LONG || raw == SHORT
    }

    /// Sizes from the `phi3.*` keys; `partial_rotary_factor` from `rope.dimension_count`;
    /// longrope from the factor tensors, `rope.scaling.original_context_length` and a check
    /// of `rope.scaling.attn_factor`; a sliding window unless it is 0 (no window).
    fn config(&self, file: &GgufFile) -> Result<serde_json::Value> {
        let sizes = DecoderSizes::read(file, ARCH)?;
        if sizes.head_dim != sizes.hidden / sizes.heads {
            return Err(file.bad(format!(
                "phi3.attention.key_length {} is not hidden / heads = {}, which Phi-3 requires",
                sizes.head_dim,
                sizes.hidden / sizes.heads
            )));
        }
        let rotary = file
            .meta_u64(&key("rope.dimension_count"))
            .unwrap_or(sizes.head_dim);
        if rotary == 0 || rotary > sizes.head_dim || !rotary.is_multiple_of(2) {
            return Err(file.bad(format!(
                "phi3.rope.dimension_count {rotary} is not an even size of at most the head size {}",
                sizes.head_dim
            )));
        }
        if let Some(s) = file
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.as_str())
            .filter(|s| !matches!(*s, "none" | "longrope"))
        {
            return Err(file.bad(format!(
                "rope scaling '{s}' (phi3.rope.scaling.type) is not supported"
            )));
        }
        let mut cfg = sizes.config(file, ARCH, "Phi3ForCausalLM", "phi3")?;
        cfg["hidden_act"] = "silu".into();
        cfg["partial_rotary_factor"] = (rotary as f64 / sizes.head_dim as f64).into();
        let original = file.meta_u64(&key("rope.scaling.original_context_length"));
        if let Some(o) = original {
            cfg["original_max_position_embeddings"] = o.into();
        }
        cfg["sliding_window"] = match file.meta_u64(&key("attention.sliding_window")) {
            Some(w) if w > 0 => w.into(),
            _ => serde_json::Value::Null,
        };
        let has = |raw| file.tensor_info(raw).is_some();
        if has(LONG) || has(SHORT) {
            let original = original.ok_or_else(|| {
                file.bad("longrope factors without phi3.rope.scaling.original_context_length")
            })?;
            check_attn_factor(file, sizes.context, original)?;
            let half = (rotary / 2) as usize;
            let list = |raw| -> Result<serde_json::Value> {
                let v = settings_values(file, raw, half)?;
                Ok(v.iter().map(|&x| x as f64).collect::<Vec<_>>().into())
            };
            cfg["rope_scaling"] = serde_json::json!({
                "type": "longrope",
                "rope_type": "longrope",
                "short_factor": list(SHORT)?,
                "long_factor": list(LONG)?,
            });
        }
        Ok(cfg)
    }
}

/// transformers derives longrope's attention factor from the context lengths; a file whose
/// `phi3.rope.scaling.attn_factor` says otherwise cannot be expressed, so it is refused.
fn check_attn_factor(file: &GgufFile, context: u64, original: u64) -> Result<()> {
    let k = key("rope.scaling.attn_factor");
    let Some(stored) = file.positive_f64(&k)? else {
        return Ok(());
    };
    let scale = context as f64 / original as f64;
    let want = if scale > 1.0 {
        (1.0 + scale.ln() / (original as f64).ln()).sqrt()
    } else {
        1.0
    };
    if (stored - want).abs() > 1e-5 * want {
        return Err(file.bad(format!(
            "metadata {k} {stored} is not longrope's sqrt(1 + ln({context}/{original}) / ln({original})) = {want}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_tensors_keep_their_hugging_face_names() {
        let m = Phi3Gguf;
        assert_eq!(
            m.tensor_name("blk.2.attn_qkv.weight").as_deref(),
            Some("model.layers.2.self_attn.qkv_proj.weight")
        );
        assert_eq!(
            m.tensor_name("blk.2.ffn_up.weight").as_deref(),
            Some("model.layers.2.mlp.gate_up_proj.weight")
        );
        assert_eq!(m.tensor_name("blk.2.attn_q.weight"), None);
        assert!(m.is_settings_tensor(LONG) && m.is_settings_tensor(SHORT));
    }
}
