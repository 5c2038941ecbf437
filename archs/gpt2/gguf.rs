//! GPT-2 as llama.cpp stores it (`general.architecture = "gpt2"`), in the export direction:
//! names, the Conv1D weights transposed to `[out, in]` as llama.cpp's converter transposes
//! them, and the `gpt2.*` sizes. Reading GPT-2 GGUF files back is not supported.
use super::Gpt2Config;
use crate::arch::Plugin;
use crate::error::{OctetError, Result};
use crate::io::gguf::{
    block_gguf_name, block_hf_name, GgufFile, GgufMapping, GgufValue, NameTable,
};

/// The GPT-2 GGUF mapping.
pub struct Gpt2Gguf;

const ARCH: &str = "gpt2";

/// The tensors outside the blocks, (llama.cpp name, Hugging Face name).
const TOP: NameTable = NameTable(&[
    ("token_embd.weight", "transformer.wte.weight"),
    ("position_embd.weight", "transformer.wpe.weight"),
    ("output_norm.weight", "transformer.ln_f.weight"),
    ("output_norm.bias", "transformer.ln_f.bias"),
    ("output.weight", "lm_head.weight"),
]);

/// Block modules, (llama.cpp part, Hugging Face module under `transformer.h.N`).
const BLOCK: NameTable = NameTable(&[
    ("attn_norm", "ln_1"),
    ("attn_qkv", "attn.c_attn"),
    ("attn_output", "attn.c_proj"),
    ("ffn_norm", "ln_2"),
    ("ffn_up", "mlp.c_fc"),
    ("ffn_down", "mlp.c_proj"),
]);

impl GgufMapping for Gpt2Gguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        block_hf_name(raw, &TOP, "transformer.h", |p| BLOCK.module(p))
    }

    fn config(&self, file: &GgufFile) -> Result<serde_json::Value> {
        Err(file.bad(
            "octet writes GPT-2 GGUF files but does not read them (their Conv1D weights are \
             stored transposed)",
        ))
    }

    fn exports(&self) -> &'static [&'static str] {
        &["gpt2"]
    }

    fn gguf_tensor_name(&self, hf: &str) -> Option<String> {
        block_gguf_name(hf, &TOP, "transformer.h", |m| BLOCK.part(m))
    }

    fn transposed(&self, hf: &str) -> bool {
        hf.ends_with(".weight") && [".attn.c_", ".mlp.c_"].iter().any(|m| hf.contains(m))
    }

    /// The sizes llama.cpp's converter writes for GPT-2 (its MLP width is `n_inner`, else
    /// 4 × `n_embd`).
    fn metadata(&self, config: &serde_json::Value) -> Result<Vec<(String, GgufValue)>> {
        let c: Gpt2Config = super::Gpt2Plugin::config(config)?;
        if c.activation_function != "gelu_new" {
            return Err(OctetError::InvalidArgument(format!(
                "cannot export to GGUF: llama.cpp's gpt2 uses gelu, not {}",
                c.activation_function
            )));
        }
        let key = |k: &str| format!("{ARCH}.{k}");
        let u = |v: usize| GgufValue::U32(v as u32);
        Ok(vec![
            (key("block_count"), u(c.n_layer)),
            (key("context_length"), u(c.n_positions)),
            (key("embedding_length"), u(c.n_embd)),
            (
                key("feed_forward_length"),
                u(c.n_inner.unwrap_or(4 * c.n_embd)),
            ),
            (key("attention.head_count"), u(c.n_head)),
            (
                key("attention.layer_norm_epsilon"),
                GgufValue::F32(c.layer_norm_epsilon as f32),
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let m = Gpt2Gguf;
        for (raw, hf) in [
            ("blk.1.attn_qkv.bias", "transformer.h.1.attn.c_attn.bias"),
            ("position_embd.weight", "transformer.wpe.weight"),
            ("blk.0.ffn_down.weight", "transformer.h.0.mlp.c_proj.weight"),
        ] {
            assert_eq!(m.tensor_name(raw).as_deref(), Some(hf));
            assert_eq!(m.gguf_tensor_name(hf).as_deref(), Some(raw));
        }
        assert!(m.transposed("transformer.h.0.mlp.c_fc.weight"));
        assert!(!m.transposed("transformer.h.0.mlp.c_fc.bias"));
        assert!(!m.transposed("transformer.wte.weight"));
    }
}
