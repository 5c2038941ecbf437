//! Gemma 2 in llama.cpp's GGUF files: the sandwich norms' names, RMSNorm scales stored as
//! `1 + w` (Hugging Face keeps `w` and multiplies by `1 + w`), and the config.json the
//! `gemma2.*` metadata implies, with llama.cpp's defaults for what the converter leaves out.
use crate::archs::decoder::{gguf as export, Activation, DecoderConfig, Family};
use crate::error::Result;
use crate::io::gguf::{
    decoder_gguf_name, decoder_hf_name, refuse_rope_changes, DecoderSizes, GgufFile, GgufMapping,
    GgufValue, NameTable,
};

/// The Gemma 2 GGUF mapping (`general.architecture = "gemma2"`).
pub struct Gemma2Gguf;

const ARCH: &str = "gemma2";

/// `gemma2.<key>`.
fn key(k: &str) -> String {
    format!("{ARCH}.{k}")
}

/// Gemma 2's block modules, (llama.cpp part, Hugging Face module under `model.layers.N`);
/// llama.cpp's `ffn_norm` is the pre-feed-forward norm.
const BLOCK: NameTable = NameTable(&[
    ("attn_norm", "input_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
]);

/// The rope base llama.cpp assumes for Gemma 2 when the file names none (the converter never
/// writes it).
const DEFAULT_ROPE_THETA: f64 = 10000.0;

/// The query scale llama.cpp applies to a Gemma 2 of these sizes: 1/√head size, or
/// 1/√(hidden / heads) for the 46-layer 27B.
fn llama_cpp_query_scalar(layers: u64, hidden: u64, heads: u64, head_dim: u64) -> u64 {
    if layers == LAYERS_27B {
        hidden / heads
    } else {
        head_dim
    }
}

/// Gemma 2 27B, the one size whose queries llama.cpp scales by hidden / heads rather than by
/// the head size; it knows the model by its 46 layers.
const LAYERS_27B: u64 = 46;

impl GgufMapping for Gemma2Gguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        decoder_hf_name(raw, |p| BLOCK.module(p))
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
        let query_scale =
            llama_cpp_query_scalar(sizes.layers, sizes.hidden, sizes.heads, sizes.head_dim);
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

    fn exports(&self) -> &'static [&'static str] {
        &["gemma2"]
    }

    fn gguf_tensor_name(&self, hf: &str) -> Option<String> {
        decoder_gguf_name(hf, |m| BLOCK.part(m))
    }

    /// What llama.cpp's converter writes for a Gemma 2 config: the sizes with the head size,
    /// both soft-caps and the sliding window; the rope base only where it is not llama.cpp's
    /// assumed 10000 (the converter drops it). What a `gemma2` file cannot say is refused:
    /// rope scaling or partial rotary, a query scale other than the one llama.cpp derives
    /// from the sizes, windows on other layers than the even ones, a missing soft-cap, an
    /// activation other than tanh-GELU.
    fn metadata(&self, config: &serde_json::Value) -> Result<Vec<(String, GgufValue)>> {
        let dc = super::Gemma2::config(config)?;
        export::refuse_rope(ARCH, &dc, |_| false)?;
        refuse_what_llama_cpp_fixes(&dc)?;
        let f = |v: f64| GgufValue::F32(v as f32);
        let mut sizes = export::sizes(&dc);
        let theta = sizes.rope_theta.take().unwrap_or(DEFAULT_ROPE_THETA);
        let mut m: Vec<_> = sizes
            .metadata(ARCH, true)
            .into_iter()
            .filter(|(k, _)| k != &key("rope.freq_base"))
            .collect();
        if theta != DEFAULT_ROPE_THETA {
            m.push((key("rope.freq_base"), f(theta)));
        }
        let cap = |c: Option<f64>| c.unwrap_or_default();
        m.push((
            key("attn_logit_softcapping"),
            f(cap(dc.attn_logit_softcapping)),
        ));
        m.push((
            key("final_logit_softcapping"),
            f(cap(dc.final_logit_softcapping)),
        ));
        let window = dc.windows.iter().flatten().next().copied().unwrap_or(0);
        m.push((
            key("attention.sliding_window"),
            GgufValue::U32(window as u32),
        ));
        Ok(m)
    }
}

/// Refuses a Gemma 2 config whose behaviour llama.cpp fixes otherwise: its query scale, its
/// window layout (even layers slide), its soft-caps (always applied) and its activation.
fn refuse_what_llama_cpp_fixes(dc: &DecoderConfig) -> Result<()> {
    let no = |what: String| Err(export::cannot_hold(ARCH, what));
    let scalar = llama_cpp_query_scalar(
        dc.num_hidden_layers as u64,
        dc.hidden_size as u64,
        dc.num_attention_heads as u64,
        dc.head_dim as u64,
    );
    let want = 1.0 / (scalar as f64).sqrt();
    if (dc.attention_scale - want).abs() > 1e-9 * want {
        return no(format!(
            "query_pre_attn_scalar other than {scalar} (llama.cpp derives it from the sizes)"
        ));
    }
    let window = dc.windows.iter().flatten().next().copied();
    let even: Vec<Option<usize>> = (0..dc.num_hidden_layers)
        .map(|i| if i % 2 == 0 { window } else { None })
        .collect();
    if window.is_none() || dc.windows != even {
        return no(format!(
            "sliding windows other than on the even layers ({:?})",
            dc.windows
        ));
    }
    if dc.attn_logit_softcapping.is_none() || dc.final_logit_softcapping.is_none() {
        return no("switch for the soft-caps (a model without them)".into());
    }
    if dc.activation != Activation::GeluTanh {
        return no(format!(
            "{:?} activation (it uses tanh-GELU)",
            dc.activation
        ));
    }
    Ok(())
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
