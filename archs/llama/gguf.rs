//! Llama in llama.cpp's GGUF files: tensor names, the q/k row permutation its converter
//! applies, and the config.json the `llama.*` metadata implies.
use crate::error::Result;
use crate::io::gguf::{GgufFile, GgufMapping};

/// The Llama GGUF mapping (`general.architecture = "llama"`).
pub struct LlamaGguf;

/// `llama.<key>`.
fn key(k: &str) -> String {
    format!("llama.{k}")
}

impl GgufMapping for LlamaGguf {
    fn gguf_name(&self) -> &'static str {
        "llama"
    }

    fn tensor_name(&self, raw: &str) -> Option<String> {
        hf_name(raw)
    }

    fn permuted_heads(&self, file: &GgufFile, raw: &str) -> Result<Option<usize>> {
        let heads = file.required_u64(&key("attention.head_count"))? as usize;
        let kv = file
            .meta_u64(&key("attention.head_count_kv"))
            .map_or(heads, |v| v as usize);
        Ok(if raw.contains(".attn_q.") {
            Some(heads)
        } else if raw.contains(".attn_k.") {
            Some(kv)
        } else {
            None
        })
    }

    /// Sizes from the `llama.*` keys, tied embeddings when there is no `output.weight`,
    /// biases when the first block has them, token ids from the tokenizer keys.
    fn config(&self, file: &GgufFile) -> Result<serde_json::Value> {
        let hidden = file.required_u64(&key("embedding_length"))?;
        let layers = file.required_u64(&key("block_count"))?;
        let heads = file.required_u64(&key("attention.head_count"))?;
        let kv = file
            .meta_u64(&key("attention.head_count_kv"))
            .unwrap_or(heads);
        let inter = file.required_u64(&key("feed_forward_length"))?;
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let eps = file
            .positive_f64(&eps_key)?
            .ok_or_else(|| file.bad(format!("metadata {eps_key} is missing")))?;
        let theta = file.positive_f64(&key("rope.freq_base"))?;
        let context = file.meta_u64(&key("context_length")).unwrap_or(2048);
        if heads == 0 {
            return Err(file.bad("llama.attention.head_count is 0"));
        }
        let head_dim = file
            .meta_u64(&key("attention.key_length"))
            .unwrap_or(hidden / heads);
        refuse_unsupported_rope(file, head_dim)?;
        let mut cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size(file)?,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": context,
            "rms_norm_eps": eps,
            "rope_theta": theta.unwrap_or(10000.0),
            "rope_scaling": null,
            "attention_bias": file.tensor_info("blk.0.attn_q.bias").is_some(),
            "mlp_bias": file.tensor_info("blk.0.ffn_gate.bias").is_some(),
            "tie_word_embeddings": file.tensor_info("output.weight").is_none(),
            "torch_dtype": "float32",
        });
        for (ours, theirs) in [
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        ] {
            if let Some(id) = file.meta_u64(&format!("tokenizer.ggml.{theirs}")) {
                cfg[ours] = id.into();
            }
        }
        Ok(cfg)
    }
}

/// Refuses partial rotary and rope scaling, which the Llama plugin does not implement.
fn refuse_unsupported_rope(file: &GgufFile, head_dim: u64) -> Result<()> {
    if let Some(rd) = file.meta_u64(&key("rope.dimension_count")) {
        if rd != head_dim {
            return Err(file.bad(format!(
                "partial rotary (llama.rope.dimension_count {rd} of head size {head_dim}) is not supported"
            )));
        }
    }
    if let Some(s) = file
        .get(&key("rope.scaling.type"))
        .and_then(|v| v.as_str())
        .filter(|s| *s != "none")
    {
        return Err(file.bad(format!("rope scaling '{s}' is not supported")));
    }
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err(file.bad("rope_freqs.weight (Llama 3.1 rope scaling) is not supported"));
    }
    Ok(())
}

/// The vocabulary size: `llama.vocab_size`, else the embedding's rows (what the model needs;
/// a vocabulary may be padded), else the tokenizer's token count.
fn vocab_size(file: &GgufFile) -> Result<u64> {
    let embd_rows = file
        .tensor_info("token_embd.weight")
        .and_then(|t| t.shape.first().map(|&d| d as u64));
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .map(|a| a.len() as u64);
    file.meta_u64(&key("vocab_size"))
        .or(embd_rows)
        .or(tokens)
        .ok_or_else(|| file.bad("cannot tell the vocabulary size"))
}

/// `blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`, and so on.
fn hf_name(raw: &str) -> Option<String> {
    match raw {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = raw.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let (part, param) = rest.split_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let module = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{n}.{module}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama() {
        assert_eq!(
            hf_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
