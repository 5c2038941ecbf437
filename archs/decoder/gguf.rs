//! What the Llama-style decoders share when written as llama.cpp GGUF files: a parsed config's
//! sizes as the `<arch>.*` metadata that `DecoderSizes::read` reads back, and the refusal of
//! settings a llama.cpp architecture cannot hold.
use super::{DecoderConfig, Scaling};
use crate::error::{OctetError, Result};
use crate::io::gguf::{DecoderSizes, GgufValue};

/// The sizes of a parsed decoder config, as llama.cpp stores them.
pub fn sizes(dc: &DecoderConfig) -> DecoderSizes {
    DecoderSizes {
        hidden: dc.hidden_size as u64,
        layers: dc.num_hidden_layers as u64,
        heads: dc.num_attention_heads as u64,
        kv_heads: dc.num_key_value_heads as u64,
        intermediate: dc.intermediate_size as u64,
        head_dim: dc.head_dim as u64,
        context: dc.max_position_embeddings as u64,
        rms_eps: dc.rms_norm_eps,
        rope_theta: Some(dc.rope.theta),
    }
}

/// The `<arch>.*` sizes of `dc`, the head size written when config.json states one (as
/// llama.cpp's converter does).
pub fn size_metadata(
    arch: &str,
    dc: &DecoderConfig,
    config: &serde_json::Value,
) -> Vec<(String, GgufValue)> {
    sizes(dc).metadata(arch, config.get("head_dim").is_some_and(|v| !v.is_null()))
}

/// An export refused: `arch` GGUF files cannot hold `what`.
pub fn cannot_hold(arch: &str, what: impl std::fmt::Display) -> OctetError {
    OctetError::InvalidArgument(format!(
        "cannot export to GGUF: llama.cpp's '{arch}' architecture has no {what}"
    ))
}

/// Refuses rotary settings beyond plain rope over whole heads, unless `allowed` accepts the
/// scaling.
pub fn refuse_rope(
    arch: &str,
    dc: &DecoderConfig,
    allowed: impl Fn(&Scaling) -> bool,
) -> Result<()> {
    if dc.rope.dim != dc.head_dim {
        return Err(cannot_hold(
            arch,
            format!("partial rotary ({} of {} dims)", dc.rope.dim, dc.head_dim),
        ));
    }
    if dc.rope.scaling != Scaling::Default && !allowed(&dc.rope.scaling) {
        return Err(cannot_hold(
            arch,
            format!("rope scaling {:?}", dc.rope.scaling),
        ));
    }
    Ok(())
}

/// Refuses sliding-window attention, which `arch` files do not hold.
pub fn refuse_windows(arch: &str, dc: &DecoderConfig) -> Result<()> {
    match dc.windows.iter().flatten().next() {
        Some(w) => Err(cannot_hold(
            arch,
            format!("sliding window (sliding_window {w})"),
        )),
        None => Ok(()),
    }
}
