//! Qwen2 in llama.cpp's GGUF files: Llama's tensor names without the q/k permutation (the
//! converter leaves Qwen's rows as they are), q/k/v biases, and the config.json the
//! `qwen2.*` metadata implies.
use crate::archs::decoder::{gguf as export, Family};
use crate::error::Result;
use crate::io::gguf::{
    decoder_gguf_name, decoder_hf_name, refuse_rope_changes, DecoderSizes, GgufFile, GgufMapping,
    GgufValue, LLAMA_BLOCK,
};

/// The Qwen2 GGUF mapping (`general.architecture = "qwen2"`).
pub struct Qwen2Gguf;

const ARCH: &str = "qwen2";

/// The llama.cpp part of a Qwen2 block module (Llama's).
fn part(module: &str) -> Option<&'static str> {
    LLAMA_BLOCK.part(module)
}

impl GgufMapping for Qwen2Gguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        decoder_hf_name(raw, |p| LLAMA_BLOCK.module(p))
    }

    /// Sizes from the `qwen2.*` keys; tied embeddings when there is no `output.weight`. Qwen2
    /// has no head size of its own (always hidden / heads) and no sliding window in use.
    fn config(&self, file: &GgufFile) -> Result<serde_json::Value> {
        let sizes = DecoderSizes::read(file, ARCH)?;
        if sizes.head_dim != sizes.hidden / sizes.heads {
            return Err(file.bad(format!(
                "qwen2.attention.key_length {} is not hidden / heads = {}, which Qwen2 requires",
                sizes.head_dim,
                sizes.hidden / sizes.heads
            )));
        }
        refuse_rope_changes(file, ARCH, sizes.head_dim)?;
        let mut cfg = sizes.config(file, ARCH, "Qwen2ForCausalLM", "qwen2")?;
        cfg["hidden_act"] = "silu".into();
        cfg["use_sliding_window"] = false.into();
        cfg["sliding_window"] = serde_json::Value::Null;
        Ok(cfg)
    }

    fn exports(&self) -> &'static [&'static str] {
        &["qwen2"]
    }

    fn gguf_tensor_name(&self, hf: &str) -> Option<String> {
        decoder_gguf_name(hf, part)
    }

    /// The sizes, as llama.cpp's converter writes them; sliding windows and rope scaling,
    /// which `qwen2` files do not hold, are refused.
    fn metadata(&self, config: &serde_json::Value) -> Result<Vec<(String, GgufValue)>> {
        let dc = super::Qwen2::config(config)?;
        export::refuse_rope(ARCH, &dc, |_| false)?;
        export::refuse_windows(ARCH, &dc)?;
        // Qwen2's head size is always hidden / heads: the converter never writes it.
        Ok(export::sizes(&dc).metadata(ARCH, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_llama_modules_and_biases() {
        let m = Qwen2Gguf;
        assert_eq!(
            m.tensor_name("blk.3.attn_k.bias").as_deref(),
            Some("model.layers.3.self_attn.k_proj.bias")
        );
        assert_eq!(
            m.tensor_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(m.tensor_name("blk.0.attn_q_norm.weight"), None);
    }
}
