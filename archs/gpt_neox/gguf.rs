//! GPT-NeoX as llama.cpp stores it (`general.architecture = "gptneox"`), in the export
//! direction: names, the fused q/k/v rows regrouped from Hugging Face's per-head interleaving
//! (head 0's q, k, v, then head 1's, …) into all q rows, all k rows, all v rows, as llama.cpp's
//! converter regroups them, and the `gptneox.*` sizes. Reading GPT-NeoX GGUF files back is
//! not supported.
use super::GptNeoxConfig;
use crate::error::{OctetError, Result};
use crate::io::gguf::{
    block_gguf_name, block_hf_name, split_block_name, GgufFile, GgufMapping, GgufValue, NameTable,
};

/// The GPT-NeoX GGUF mapping.
pub struct GptNeoxGguf;

const ARCH: &str = "gptneox";

/// The rope base llama.cpp assumes when a file names none (its converter never writes one).
const DEFAULT_ROPE_THETA: f64 = 10000.0;

/// The tensors outside the blocks, (llama.cpp name, Hugging Face name); transformers 5 calls
/// the head `lm_head` in a raw state dict, older checkpoints `embed_out`.
const TOP: NameTable = NameTable(&[
    ("token_embd.weight", "gpt_neox.embed_in.weight"),
    ("output_norm.weight", "gpt_neox.final_layer_norm.weight"),
    ("output_norm.bias", "gpt_neox.final_layer_norm.bias"),
    ("output.weight", "embed_out.weight"),
    ("output.weight", "lm_head.weight"),
]);

/// Block modules, (llama.cpp part, Hugging Face module under `gpt_neox.layers.N`).
const BLOCK: NameTable = NameTable(&[
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "attention.query_key_value"),
    ("attn_output", "attention.dense"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_up", "mlp.dense_h_to_4h"),
    ("ffn_down", "mlp.dense_4h_to_h"),
]);

/// For stored row `i` of the fused q/k/v (q rows of every head, then k, then v), the Hugging
/// Face row it holds (per head: its q, k and v rows).
fn qkv_row_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let mut order = Vec::with_capacity(3 * heads * head_dim);
    for part in 0..3 {
        for h in 0..heads {
            order.extend((0..head_dim).map(|r| (3 * h + part) * head_dim + r));
        }
    }
    order
}

impl GgufMapping for GptNeoxGguf {
    fn gguf_name(&self) -> &'static str {
        ARCH
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        block_hf_name(raw, &TOP, "gpt_neox.layers", |p| BLOCK.module(p))
    }

    fn config(&self, file: &GgufFile) -> Result<serde_json::Value> {
        Err(file.bad(
            "octet writes GPT-NeoX GGUF files but does not read them (their fused q/k/v rows \
             are regrouped)",
        ))
    }

    fn exports(&self) -> &'static [&'static str] {
        &["gpt_neox"]
    }

    fn gguf_tensor_name(&self, hf: &str) -> Option<String> {
        block_gguf_name(hf, &TOP, "gpt_neox.layers", |m| BLOCK.part(m))
    }

    fn stored_row_order(&self, raw: &str, config: &serde_json::Value) -> Option<Vec<usize>> {
        if split_block_name(raw)?.1 != "attn_qkv" {
            return None;
        }
        let c = GptNeoxConfig::from_json(config).ok()?;
        Some(qkv_row_order(c.num_attention_heads, c.head_dim()))
    }

    /// What llama.cpp's converter writes for a GPT-NeoX config, plus the rope base where it
    /// is not llama.cpp's assumed 10000 (the converter drops it, which changes the model).
    /// A tied head (llama.cpp's `gptneox` needs its own `output.weight`) and activations
    /// other than GELU are refused.
    fn metadata(&self, config: &serde_json::Value) -> Result<Vec<(String, GgufValue)>> {
        let c = GptNeoxConfig::from_json(config)?;
        let no = |what: String| {
            Err(OctetError::InvalidArgument(format!(
                "cannot export to GGUF: llama.cpp's '{ARCH}' architecture has no {what}"
            )))
        };
        if c.tie_word_embeddings {
            return no("tied head (it needs its own output.weight)".into());
        }
        if !c.hidden_act.starts_with("gelu") {
            return no(format!("{} activation (it uses GELU)", c.hidden_act));
        }
        let key = |k: &str| format!("{ARCH}.{k}");
        let u = |v: usize| GgufValue::U32(v as u32);
        let mut m = vec![
            (key("context_length"), u(c.max_position_embeddings)),
            (key("embedding_length"), u(c.hidden_size)),
            (key("block_count"), u(c.num_hidden_layers)),
            (key("feed_forward_length"), u(c.intermediate_size)),
            (key("rope.dimension_count"), u(c.rotary_dims())),
            (key("attention.head_count"), u(c.num_attention_heads)),
            (
                key("use_parallel_residual"),
                GgufValue::Bool(c.use_parallel_residual),
            ),
            (
                key("attention.layer_norm_epsilon"),
                GgufValue::F32(c.layer_norm_eps as f32),
            ),
        ];
        if c.rotary_base() != DEFAULT_ROPE_THETA {
            m.push((
                key("rope.freq_base"),
                GgufValue::F32(c.rotary_base() as f32),
            ));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let m = GptNeoxGguf;
        for (raw, hf) in [
            (
                "blk.1.attn_qkv.bias",
                "gpt_neox.layers.1.attention.query_key_value.bias",
            ),
            ("token_embd.weight", "gpt_neox.embed_in.weight"),
            (
                "blk.0.ffn_down.weight",
                "gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
            ),
        ] {
            assert_eq!(m.tensor_name(raw).as_deref(), Some(hf));
            assert_eq!(m.gguf_tensor_name(hf).as_deref(), Some(raw));
        }
        assert_eq!(
            m.gguf_tensor_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
    }

    #[test]
    fn qkv_rows_are_grouped_by_part() {
        // Two heads of two rows: Hugging Face holds q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1.
        assert_eq!(qkv_row_order(2, 2), [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
    }
}
