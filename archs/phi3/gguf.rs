//! Phi-3 in llama.cpp's GGUF files: the fused `attn_qkv` (Hugging Face's `qkv_proj`) and
//! `ffn_up` (Hugging Face's `gate_up_proj`, gate rows then up rows), partial rotary
//! embeddings, and longrope scaling kept as the `rope_factors_long` / `rope_factors_short`
//! tensors plus `phi3.rope.scaling.*` keys; read and written alike.
use crate::archs::decoder::{gguf as export, DecoderConfig, Family, Scaling};
use crate::error::Result;
use crate::io::gguf::{
    decoder_gguf_name, decoder_hf_name, settings_values, DecoderSizes, GgufFile, GgufMapping,
    GgufValue, NameTable,
};

/// The Phi-3 GGUF mapping (`general.architecture = "phi3"`).
pub struct Phi3Gguf;

const ARCH: &str = "phi3";
const LONG: &str = "rope_factors_long.weight";
const SHORT: &str = "rope_factors_short.weight";

/// `phi3.<key>`.
fn key(k: &str) -> String {
    format!("{ARCH}.{k}")
}

/// Phi-3's block modules, (llama.cpp part, Hugging Face module under `model.layers.N`).
const BLOCK: NameTable = NameTable(&[
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_up", "mlp.gate_up_proj"),
    ("ffn_down", "mlp.down_proj"),
]);

/// longrope's attention factor as llama.cpp's converter computes it from the context lengths
/// (and as transformers does when config.json gives none).
fn longrope_attn_factor(context: u64, original: u64) -> f64 {
    let scale = context as f64 / original as f64;
    if scale > 1.0 {
        (1.0 + scale.ln() / (original as f64).ln()).sqrt()
    } else {
        1.0
    }
}

/// The pre-training context llama.cpp's converter writes: longrope's, else config.json's
/// `original_max_position_embeddings` (top level or in `rope_parameters`), else the context.
fn original_context(dc: &DecoderConfig, config: &serde_json::Value) -> u64 {
    if let Scaling::LongRope { original, .. } = dc.rope.scaling {
        return original as u64;
    }
    config["original_max_position_embeddings"]
        .as_u64()
        .or_else(|| config["rope_parameters"]["original_max_position_embeddings"].as_u64())
        .unwrap_or(dc.max_position_embeddings as u64)
}

impl GgufMapping for Phi3Gguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        decoder_hf_name(raw, |p| BLOCK.module(p))
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

    fn exports(&self) -> &'static [&'static str] {
        &["phi3"]
    }

    fn gguf_tensor_name(&self, hf: &str) -> Option<String> {
        decoder_gguf_name(hf, |m| BLOCK.part(m))
    }

    /// What llama.cpp's converter writes for a Phi-3 config: the sizes (no head size: Phi-3's
    /// is hidden / heads), the rotary dimensions, the pre-training context, the sliding window
    /// (0 for none) and, for longrope, the attention factor (the factor tensors are
    /// [`GgufMapping::settings_tensors`]). Other rope scalings, and an attention factor other
    /// than the one llama.cpp derives, are refused.
    fn metadata(&self, config: &serde_json::Value) -> Result<Vec<(String, GgufValue)>> {
        let dc = super::Phi3::config(config)?;
        if dc.head_dim * dc.num_attention_heads != dc.hidden_size {
            return Err(export::cannot_hold(
                ARCH,
                format!(
                    "head size {} other than hidden / heads = {}",
                    dc.head_dim,
                    dc.hidden_size / dc.num_attention_heads
                ),
            ));
        }
        let original = original_context(&dc, config);
        let u = |v: u64| GgufValue::U32(v as u32);
        let mut m = export::sizes(&dc).metadata(ARCH, false);
        m.push((key("rope.dimension_count"), u(dc.rope.dim as u64)));
        m.push((key("rope.scaling.original_context_length"), u(original)));
        let window = dc.windows.iter().flatten().next().copied().unwrap_or(0);
        m.push((key("attention.sliding_window"), u(window as u64)));
        match &dc.rope.scaling {
            Scaling::Default => {}
            Scaling::LongRope {
                attention_factor, ..
            } => {
                let want = longrope_attn_factor(dc.max_position_embeddings as u64, original);
                if (attention_factor - want).abs() > 1e-6 * want {
                    return Err(export::cannot_hold(
                        ARCH,
                        format!(
                            "longrope attention_factor {attention_factor} (it derives {want} \
                             from the context lengths)"
                        ),
                    ));
                }
                m.push((key("rope.scaling.attn_factor"), GgufValue::F32(want as f32)));
            }
            other => return Err(export::cannot_hold(ARCH, format!("rope scaling {other:?}"))),
        }
        Ok(m)
    }

    /// longrope's per-frequency divisors as `rope_factors_long` / `rope_factors_short`.
    fn settings_tensors(&self, config: &serde_json::Value) -> Result<Vec<(String, Vec<f32>)>> {
        let dc = super::Phi3::config(config)?;
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        Ok(match &dc.rope.scaling {
            Scaling::LongRope { short, long, .. } => {
                vec![
                    (LONG.to_string(), f32s(long)),
                    (SHORT.to_string(), f32s(short)),
                ]
            }
            _ => Vec::new(),
        })
    }
}

/// transformers derives longrope's attention factor from the context lengths; a file whose
/// `phi3.rope.scaling.attn_factor` says otherwise cannot be expressed, so it is refused.
fn check_attn_factor(file: &GgufFile, context: u64, original: u64) -> Result<()> {
    let k = key("rope.scaling.attn_factor");
    let Some(stored) = file.positive_f64(&k)? else {
        return Ok(());
    };
    let want = longrope_attn_factor(context, original);
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
