//! Qwen3 in llama.cpp's GGUF files: Qwen2's names plus the per-head q/k RMSNorms
//! (`attn_q_norm`, `attn_k_norm`), an explicit head size, and the config.json the `qwen3.*`
//! metadata implies.
use crate::archs::decoder::{gguf as export, Family};
use crate::error::Result;
use crate::io::gguf::{
    decoder_gguf_name, decoder_hf_name, refuse_rope_changes, DecoderSizes, GgufFile, GgufMapping,
    GgufValue, NameTable, LLAMA_BLOCK,
};

/// The Qwen3 GGUF mapping (`general.architecture = "qwen3"`).
pub struct Qwen3Gguf;

const ARCH: &str = "qwen3";

/// Qwen3's own block modules, beside Llama's.
const QK_NORMS: NameTable = NameTable(&[
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
]);

/// Qwen3's block modules: Llama's plus the q/k norms.
fn module(part: &str) -> Option<&'static str> {
    QK_NORMS.module(part).or_else(|| LLAMA_BLOCK.module(part))
}

/// The inverse of [`module`], through the same tables.
fn part(module: &str) -> Option<&'static str> {
    QK_NORMS.part(module).or_else(|| LLAMA_BLOCK.part(module))
}

impl GgufMapping for Qwen3Gguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        decoder_hf_name(raw, module)
    }

    /// Sizes from the `qwen3.*` keys (the head size from `attention.key_length`); attention
    /// biases when the first block has them; tied embeddings when there is no `output.weight`.
    fn config(&self, file: &GgufFile) -> Result<serde_json::Value> {
        let sizes = DecoderSizes::read(file, ARCH)?;
        refuse_rope_changes(file, ARCH, sizes.head_dim)?;
        let mut cfg = sizes.config(file, ARCH, "Qwen3ForCausalLM", "qwen3")?;
        cfg["hidden_act"] = "silu".into();
        cfg["attention_bias"] = file.tensor_info("blk.0.attn_q.bias").is_some().into();
        cfg["use_sliding_window"] = false.into();
        cfg["sliding_window"] = serde_json::Value::Null;
        Ok(cfg)
    }

    fn exports(&self) -> &'static [&'static str] {
        &["qwen3"]
    }

    fn gguf_tensor_name(&self, hf: &str) -> Option<String> {
        decoder_gguf_name(hf, part)
    }

    /// The sizes, as llama.cpp's converter writes them; sliding windows and rope scaling,
    /// which `qwen3` files do not hold, are refused.
    fn metadata(&self, config: &serde_json::Value) -> Result<Vec<(String, GgufValue)>> {
        let dc = super::Qwen3::config(config)?;
        export::refuse_rope(ARCH, &dc, |_| false)?;
        export::refuse_windows(ARCH, &dc)?;
        Ok(export::size_metadata(ARCH, &dc, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_include_the_q_and_k_norms() {
        let m = Qwen3Gguf;
        assert_eq!(
            m.tensor_name("blk.1.attn_q_norm.weight").as_deref(),
            Some("model.layers.1.self_attn.q_norm.weight")
        );
        assert_eq!(
            m.tensor_name("blk.1.attn_k_norm.weight").as_deref(),
            Some("model.layers.1.self_attn.k_norm.weight")
        );
        assert_eq!(
            m.tensor_name("output.weight").as_deref(),
            Some("lm_head.weight")
        );
    }
}
