//! The per-architecture GGUF hook: llama.cpp names and metadata to Hugging Face ones.
use super::GgufFile;
use crate::error::Result;

/// How one architecture's GGUF files map onto its Hugging Face checkpoints; an
/// architecture plugin provides it (`Plugin::gguf`).
pub trait GgufMapping: Sync {
    /// The `general.architecture` value it reads (`llama`).
    fn gguf_name(&self) -> &'static str;
    /// The Hugging Face name of the llama.cpp tensor `raw` (`blk.0.attn_q.weight` →
    /// `model.layers.0.self_attn.q_proj.weight`); `None` keeps the name.
    fn tensor_name(&self, raw: &str) -> Option<String>;
    /// For a tensor whose rows llama.cpp's converter permuted per head (llama's q/k), the
    /// head count, so that reads undo it (none by default: only llama's converter permutes).
    fn permuted_heads(&self, _file: &GgufFile, _raw: &str) -> Result<Option<usize>> {
        Ok(None)
    }
    /// The Hugging Face config.json the file's metadata implies.
    fn config(&self, file: &GgufFile) -> Result<serde_json::Value>;
    /// The constant llama.cpp's converter added to every stored value of `raw`, which reads
    /// subtract (Gemma stores its RMSNorm scales `w` as `1 + w`); `None` for most tensors.
    fn stored_offset(&self, _raw: &str) -> Option<f32> {
        None
    }
    /// Whether `raw` holds settings rather than weights (Llama 3's `rope_freqs.weight`, Phi-3's
    /// rope factor lists): [`GgufMapping::config`] turns them into config.json fields, so the
    /// tensor store does not serve them as Hugging Face tensors.
    fn is_settings_tensor(&self, _raw: &str) -> bool {
        false
    }
}

/// A GGUF mapping's registration (submitted by `register_architecture!` for every plugin;
/// `get` returns `None` for one that reads no GGUF).
pub struct GgufRegistration {
    /// Returns the plugin's mapping, if any.
    pub get: fn() -> Option<&'static dyn GgufMapping>,
}
inventory::collect!(GgufRegistration);

/// Every registered mapping.
pub(super) fn mappings() -> impl Iterator<Item = &'static dyn GgufMapping> {
    inventory::iter::<GgufRegistration>
        .into_iter()
        .filter_map(|r| (r.get)())
}

/// The mapping registered for `general.architecture = arch`.
pub(super) fn mapping_for(arch: &str) -> Option<&'static dyn GgufMapping> {
    mappings().find(|m| m.gguf_name() == arch)
}

/// `blk.N.<part>.<param>` split into the layer, the llama.cpp part (`attn_q`) and the
/// parameter (`weight` or `bias`); `None` for any other name.
pub fn split_block_name(raw: &str) -> Option<(usize, &str, &str)> {
    let rest = raw.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let layer = n.parse::<usize>().ok()?;
    let (part, param) = rest.split_once('.')?;
    matches!(param, "weight" | "bias").then_some((layer, part, param))
}

/// The Hugging Face name of a llama.cpp decoder tensor: the embedding, final norm and head by
/// their fixed names, block tensors through `module` (llama.cpp part → Hugging Face module
/// under `model.layers.N`); `None` for anything else.
pub fn decoder_hf_name(raw: &str, module: impl Fn(&str) -> Option<&'static str>) -> Option<String> {
    match raw {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let (layer, part, param) = split_block_name(raw)?;
    Some(format!("model.layers.{layer}.{}.{param}", module(part)?))
}

/// The Llama-family block modules most llama.cpp decoders share (Llama, Mistral, Qwen2/3).
pub fn llama_block_module(part: &str) -> Option<&'static str> {
    Some(match part {
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
    })
}

/// The sizes every llama.cpp decoder stores under `<arch>.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSizes {
    /// `embedding_length`.
    pub hidden: u64,
    /// `block_count`.
    pub layers: u64,
    /// `attention.head_count`.
    pub heads: u64,
    /// `attention.head_count_kv` (default: `heads`).
    pub kv_heads: u64,
    /// `feed_forward_length`.
    pub intermediate: u64,
    /// `attention.key_length` (default: `hidden / heads`).
    pub head_dim: u64,
    /// `context_length` (default 2048).
    pub context: u64,
    /// `attention.layer_norm_rms_epsilon`.
    pub rms_eps: f64,
    /// `rope.freq_base`, if stored.
    pub rope_theta: Option<f64>,
}

impl DecoderSizes {
    /// Reads the `<arch>.*` sizes; a missing or malformed key is an error naming the file.
    pub fn read(file: &GgufFile, arch: &str) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = file.required_u64(&key("embedding_length"))?;
        let heads = file.required_u64(&key("attention.head_count"))?;
        if heads == 0 {
            return Err(file.bad(format!("{arch}.attention.head_count is 0")));
        }
        let kv_heads = file
            .meta_u64(&key("attention.head_count_kv"))
            .unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(file.bad(format!(
                "{arch}.attention.head_count_kv {kv_heads} does not divide the {heads} heads"
            )));
        }
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let rms_eps = file
            .positive_f64(&eps_key)?
            .ok_or_else(|| file.bad(format!("metadata {eps_key} is missing")))?;
        Ok(DecoderSizes {
            hidden,
            layers: file.required_u64(&key("block_count"))?,
            heads,
            kv_heads,
            intermediate: file.required_u64(&key("feed_forward_length"))?,
            head_dim: file
                .meta_u64(&key("attention.key_length"))
                .unwrap_or(hidden / heads),
            context: file.meta_u64(&key("context_length")).unwrap_or(2048),
            rms_eps,
            rope_theta: file.positive_f64(&key("rope.freq_base"))?,
        })
    }

    /// The config.json fields these sizes give, plus the vocabulary size, a tied head when the
    /// file has no `output.weight`, and the tokenizer's special token ids.
    pub fn config(
        &self,
        file: &GgufFile,
        arch: &str,
        hf_class: &str,
        model_type: &str,
    ) -> Result<serde_json::Value> {
        let mut cfg = serde_json::json!({
            "architectures": [hf_class],
            "model_type": model_type,
            "vocab_size": vocab_size(file, arch)?,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.context,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta.unwrap_or(10000.0),
            "rope_scaling": null,
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

/// Refuses what a plain rotary model cannot express: a `<arch>.rope.scaling.type` other than
/// `none` and a rotary dimension other than the head size.
pub fn refuse_rope_changes(file: &GgufFile, arch: &str, head_dim: u64) -> Result<()> {
    if let Some(rd) = file.meta_u64(&format!("{arch}.rope.dimension_count")) {
        if rd != head_dim {
            return Err(file.bad(format!(
                "partial rotary ({arch}.rope.dimension_count {rd} of head size {head_dim}) is not supported"
            )));
        }
    }
    let key = format!("{arch}.rope.scaling.type");
    match file.get(&key).map(|v| v.as_str()) {
        None | Some(Some("none")) => Ok(()),
        Some(Some(s)) => Err(file.bad(format!("rope scaling '{s}' ({key}) is not supported"))),
        Some(None) => Err(file.bad(format!("metadata {key} is not a string"))),
    }
}

/// The vocabulary size: `<arch>.vocab_size`, else the embedding's rows (what the model needs;
/// a vocabulary may be padded), else the tokenizer's token count.
pub fn vocab_size(file: &GgufFile, arch: &str) -> Result<u64> {
    let embd_rows = file
        .tensor_info("token_embd.weight")
        .and_then(|t| t.shape.first().map(|&d| d as u64));
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .map(|a| a.len() as u64);
    file.meta_u64(&format!("{arch}.vocab_size"))
        .or(embd_rows)
        .or(tokens)
        .ok_or_else(|| file.bad("cannot tell the vocabulary size"))
}

/// A settings tensor's values (`rope_freqs.weight` and the like) as f32, refused unless it
/// is one-dimensional with `len` finite positive entries.
pub fn settings_values(file: &GgufFile, raw: &str, len: usize) -> Result<Vec<f32>> {
    let t = file
        .tensor_info(raw)
        .ok_or_else(|| file.bad(format!("no tensor named {raw}")))?;
    if t.shape != [len] {
        return Err(file.bad(format!(
            "tensor {raw} has shape {:?}; expected [{len}]",
            t.shape
        )));
    }
    let v = file.dequantize_raw(raw)?;
    if let Some(bad) = v.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        return Err(file.bad(format!(
            "tensor {raw} holds {bad}; every entry must be finite and positive"
        )));
    }
    Ok(v)
}

/// Undoes llama.cpp's q/k row permutation of a `[rows, …]` tensor's bytes: within each of `heads` heads, GGUF row `2i + j` is Hugging Face row
/// `j·(head_dim/2) + i` (the converter's `reshape(n_head, 2, hd/2, …).swapaxes(1, 2)`).
pub(super) fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let dst = h * hd + j * half + i;
                let src = h * hd + 2 * i + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_converter() {
        // Rows 0..8 of two heads of size 4; the converter orders each head [0, 2, 1, 3].
        let heads = 2;
        let hf: Vec<u8> = (0..8u8).collect();
        let permuted: Vec<u8> = [0, 2, 1, 3, 4, 6, 5, 7].to_vec();
        assert_eq!(unpermute_rows(&permuted, 8, heads), hf);
    }
}
