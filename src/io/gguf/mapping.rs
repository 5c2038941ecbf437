//! The per-architecture GGUF hook: llama.cpp names and metadata to Hugging Face ones.
use super::{GgufFile, GgufValue};
use crate::error::Result;

/// How one architecture's GGUF files map onto its Hugging Face checkpoints; an
/// architecture plugin provides it (`Plugin::gguf`).
pub trait GgufMapping: Sync {
    /// The `general.architecture` value it reads (`llama`).
    fn gguf_name(&self) -> &'static str;
    /// The Hugging Face name of the llama.cpp tensor `raw` (`blk.0.attn_q.weight` →
    /// `model.layers.0.self_attn.q_proj.weight`); `None` keeps the name.
    fn tensor_name(&self, raw: &str) -> Option<String>;
    /// For a tensor whose rows llama.cpp's converter permutes per head (llama's q/k), the
    /// head count out of the model's `heads` and `kv_heads`; reads undo the permutation and
    /// exports apply it (none by default: only llama's converter permutes).
    fn permuted_head_count(&self, _raw: &str, _heads: usize, _kv_heads: usize) -> Option<usize> {
        None
    }
    /// [`GgufMapping::permuted_head_count`] with the head counts of `file`'s metadata.
    fn permuted_heads(&self, file: &GgufFile, raw: &str) -> Result<Option<usize>> {
        let arch = self.gguf_name();
        let heads = file.required_u64(&format!("{arch}.attention.head_count"))? as usize;
        let kv = file
            .meta_u64(&format!("{arch}.attention.head_count_kv"))
            .map_or(heads, |v| v as usize);
        Ok(self.permuted_head_count(raw, heads, kv))
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

    // The export direction: octet → llama.cpp.

    /// The octet architectures (registry names) this mapping writes as `gguf_name` (none by
    /// default: the mapping only reads).
    fn exports(&self) -> &'static [&'static str] {
        &[]
    }
    /// The llama.cpp name of the Hugging Face tensor `hf`, the inverse of
    /// [`GgufMapping::tensor_name`]; `None` for a tensor llama.cpp has no place for.
    fn gguf_tensor_name(&self, _hf: &str) -> Option<String> {
        None
    }
    /// Whether the Hugging Face tensor `hf` is stored `[in, out]` (GPT-2's Conv1D) and
    /// llama.cpp holds it transposed, `[out, in]`.
    fn transposed(&self, _hf: &str) -> bool {
        false
    }
    /// For a tensor whose rows llama.cpp's converter reorders other than by
    /// [`GgufMapping::permuted_head_count`] (GPT-NeoX's fused q/k/v, interleaved per head in
    /// Hugging Face's order), the Hugging Face row each stored row holds; `None` keeps them.
    fn stored_row_order(&self, _raw: &str, _config: &serde_json::Value) -> Option<Vec<usize>> {
        None
    }
    /// The `<arch>.*` metadata (sizes, rope, norms' epsilon) a Hugging Face `config` gives,
    /// the inverse of [`GgufMapping::config`].
    fn metadata(&self, _config: &serde_json::Value) -> Result<Vec<(String, GgufValue)>> {
        Err(crate::error::OctetError::InvalidArgument(format!(
            "octet does not write {} GGUF files",
            self.gguf_name()
        )))
    }
    /// The settings tensors (name, f32 values) a `config` gives, which
    /// [`GgufMapping::config`] reads back (Llama 3's `rope_freqs.weight`); none by default.
    fn settings_tensors(&self, _config: &serde_json::Value) -> Result<Vec<(String, Vec<f32>)>> {
        Ok(Vec::new())
    }
}

/// The mapping that writes the octet architecture `arch` (a registry name), if any.
pub fn mapping_exporting(arch: &str) -> Option<&'static dyn GgufMapping> {
    mappings().find(|m| m.exports().contains(&arch))
}

/// The octet architectures some mapping writes.
pub fn exported_architectures() -> Vec<&'static str> {
    let mut v: Vec<&str> = mappings()
        .flat_map(|m| m.exports().iter().copied())
        .collect();
    v.sort_unstable();
    v
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

/// The Hugging Face name of a llama.cpp tensor: the ones outside the blocks through `top`,
/// block tensors through `module` (llama.cpp part → Hugging Face module under
/// `{layers}.N`); `None` for anything else.
pub fn block_hf_name(
    raw: &str,
    top: &NameTable,
    layers: &str,
    module: impl Fn(&str) -> Option<&'static str>,
) -> Option<String> {
    if let Some(hf) = top.module(raw) {
        return Some(hf.into());
    }
    let (layer, part, param) = split_block_name(raw)?;
    Some(format!("{layers}.{layer}.{}.{param}", module(part)?))
}

/// The llama.cpp name of a Hugging Face tensor, the inverse of [`block_hf_name`] through the
/// same tables: `part` gives the llama.cpp part of a module under `{layers}.N`.
pub fn block_gguf_name(
    hf: &str,
    top: &NameTable,
    layers: &str,
    part: impl Fn(&str) -> Option<&'static str>,
) -> Option<String> {
    if let Some(raw) = top.part(hf) {
        return Some(raw.into());
    }
    let rest = hf.strip_prefix(layers)?.strip_prefix('.')?;
    let (n, rest) = rest.split_once('.')?;
    let layer = n.parse::<usize>().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    matches!(param, "weight" | "bias").then_some(())?;
    Some(format!("blk.{layer}.{}.{param}", part(module)?))
}

/// [`block_hf_name`] for the Llama-family decoders (`model.layers`).
pub fn decoder_hf_name(raw: &str, module: impl Fn(&str) -> Option<&'static str>) -> Option<String> {
    block_hf_name(raw, &DECODER_TOP, "model.layers", module)
}

/// [`block_gguf_name`] for the Llama-family decoders, the inverse of [`decoder_hf_name`].
pub fn decoder_gguf_name(hf: &str, part: impl Fn(&str) -> Option<&'static str>) -> Option<String> {
    block_gguf_name(hf, &DECODER_TOP, "model.layers", part)
}

/// Pairs of (llama.cpp name, Hugging Face name), read in both directions: reading GGUF
/// looks up the first, exporting the second.
#[derive(Clone, Copy, Debug)]
pub struct NameTable(pub &'static [(&'static str, &'static str)]);

impl NameTable {
    /// The Hugging Face name of the llama.cpp `part`.
    pub fn module(&self, part: &str) -> Option<&'static str> {
        self.0.iter().find(|(p, _)| *p == part).map(|(_, m)| *m)
    }
    /// The llama.cpp name of the Hugging Face `module`.
    pub fn part(&self, module: &str) -> Option<&'static str> {
        self.0.iter().find(|(_, m)| *m == module).map(|(p, _)| *p)
    }
}

/// The decoder tensors outside the blocks.
const DECODER_TOP: NameTable = NameTable(&[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]);

/// The Llama-family block modules most llama.cpp decoders share (Llama, Mistral, Qwen2/3).
pub const LLAMA_BLOCK: NameTable = NameTable(&[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
]);

/// The Hugging Face module of a Llama-family block part ([`LLAMA_BLOCK`]).
pub fn llama_block_module(part: &str) -> Option<&'static str> {
    LLAMA_BLOCK.module(part)
}

/// The head count whose rows llama.cpp's Llama converter permutes in `raw`: q's with the
/// query heads, k's with the key/value heads (weights and biases alike).
pub fn llama_qk_heads(raw: &str, heads: usize, kv_heads: usize) -> Option<usize> {
    match split_block_name(raw)?.1 {
        "attn_q" => Some(heads),
        "attn_k" => Some(kv_heads),
        _ => None,
    }
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

/// The `<arch>.*` keys of [`DecoderSizes`], read and written alike.
mod keys {
    pub const HIDDEN: &str = "embedding_length";
    pub const LAYERS: &str = "block_count";
    pub const HEADS: &str = "attention.head_count";
    pub const KV_HEADS: &str = "attention.head_count_kv";
    pub const INTERMEDIATE: &str = "feed_forward_length";
    pub const KEY_LENGTH: &str = "attention.key_length";
    pub const VALUE_LENGTH: &str = "attention.value_length";
    pub const CONTEXT: &str = "context_length";
    pub const RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
    pub const ROPE_THETA: &str = "rope.freq_base";
}

impl DecoderSizes {
    /// Reads the `<arch>.*` sizes; a missing or malformed key is an error naming the file.
    pub fn read(file: &GgufFile, arch: &str) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = file.required_u64(&key(keys::HIDDEN))?;
        let heads = file.required_u64(&key(keys::HEADS))?;
        if heads == 0 {
            return Err(file.bad(format!("{arch}.{} is 0", keys::HEADS)));
        }
        let kv_heads = file.meta_u64(&key(keys::KV_HEADS)).unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(file.bad(format!(
                "{arch}.{} {kv_heads} does not divide the {heads} heads",
                keys::KV_HEADS
            )));
        }
        let eps_key = key(keys::RMS_EPS);
        let rms_eps = file
            .positive_f64(&eps_key)?
            .ok_or_else(|| file.bad(format!("metadata {eps_key} is missing")))?;
        Ok(DecoderSizes {
            hidden,
            layers: file.required_u64(&key(keys::LAYERS))?,
            heads,
            kv_heads,
            intermediate: file.required_u64(&key(keys::INTERMEDIATE))?,
            head_dim: file
                .meta_u64(&key(keys::KEY_LENGTH))
                .unwrap_or(hidden / heads),
            context: file.meta_u64(&key(keys::CONTEXT)).unwrap_or(2048),
            rms_eps,
            rope_theta: file.positive_f64(&key(keys::ROPE_THETA))?,
        })
    }

    /// The sizes of a Hugging Face decoder `config` (the fields [`DecoderSizes::config`]
    /// writes); a missing or malformed field is an error naming it.
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        let int = |k: &str| {
            config[k].as_u64().ok_or_else(|| {
                crate::error::OctetError::InvalidArgument(format!(
                    "config.json: {k} must be a non-negative integer to write GGUF metadata"
                ))
            })
        };
        let (hidden, heads) = (int("hidden_size")?, int("num_attention_heads")?);
        if heads == 0 {
            return Err(crate::error::OctetError::InvalidArgument(
                "config.json: num_attention_heads is 0".into(),
            ));
        }
        let opt = |k: &str| config[k].as_u64();
        Ok(DecoderSizes {
            hidden,
            layers: int("num_hidden_layers")?,
            heads,
            kv_heads: opt("num_key_value_heads").unwrap_or(heads),
            intermediate: int("intermediate_size")?,
            head_dim: opt("head_dim").unwrap_or(hidden / heads),
            context: opt("max_position_embeddings").unwrap_or(2048),
            rms_eps: config["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta: config["rope_theta"].as_f64(),
        })
    }

    /// The `<arch>.*` metadata [`DecoderSizes::read`] reads back, typed as llama.cpp's
    /// converter types it; the head size (`key_length`, `value_length`) only when
    /// `explicit_head_dim` (the converter writes it only when config.json has `head_dim`).
    pub fn metadata(&self, arch: &str, explicit_head_dim: bool) -> Vec<(String, GgufValue)> {
        let key = |k: &str| format!("{arch}.{k}");
        let u32v = |v: u64| GgufValue::U32(v as u32);
        let mut m = vec![
            (key(keys::LAYERS), u32v(self.layers)),
            (key(keys::CONTEXT), u32v(self.context)),
            (key(keys::HIDDEN), u32v(self.hidden)),
            (key(keys::INTERMEDIATE), u32v(self.intermediate)),
            (key(keys::HEADS), u32v(self.heads)),
            (key(keys::KV_HEADS), u32v(self.kv_heads)),
            (
                key(keys::ROPE_THETA),
                GgufValue::F32(self.rope_theta.unwrap_or(10000.0) as f32),
            ),
            (key(keys::RMS_EPS), GgufValue::F32(self.rms_eps as f32)),
        ];
        if explicit_head_dim {
            m.push((key(keys::KEY_LENGTH), u32v(self.head_dim)));
            m.push((key(keys::VALUE_LENGTH), u32v(self.head_dim)));
        }
        m
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
    match rope_scaling(file, arch, head_dim)? {
        serde_json::Value::Null => Ok(()),
        _ => Err(file.bad(format!(
            "rope scaling 'linear' ({arch}.rope.scaling.type) is not supported"
        ))),
    }
}

/// The config.json `rope_scaling` of a whole-head rotary model's `<arch>.rope.scaling.*`
/// keys: `null` for none, linear scaling with its `factor` (frequencies divided by it, as
/// transformers and llama.cpp both apply it); other types, a missing or non-positive factor
/// and a rotary dimension other than the head size are refused.
pub fn rope_scaling(file: &GgufFile, arch: &str, head_dim: u64) -> Result<serde_json::Value> {
    if let Some(rd) = file.meta_u64(&format!("{arch}.rope.dimension_count")) {
        if rd != head_dim {
            return Err(file.bad(format!(
                "partial rotary ({arch}.rope.dimension_count {rd} of head size {head_dim}) is not supported"
            )));
        }
    }
    let key = format!("{arch}.rope.scaling.type");
    match file.get(&key).map(|v| v.as_str()) {
        None | Some(Some("none")) => Ok(serde_json::Value::Null),
        Some(Some("linear")) => {
            let fkey = format!("{arch}.rope.scaling.factor");
            let factor = file
                .positive_f64(&fkey)?
                .ok_or_else(|| file.bad(format!("linear rope scaling ({key}) without {fkey}")))?;
            Ok(serde_json::json!({"rope_type": "linear", "factor": factor}))
        }
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

/// Within one head of `hd` rows, the Hugging Face row that llama.cpp stores at row `r`: row
/// `2i + j` holds Hugging Face row `j·(hd/2) + i` (the converter's
/// `reshape(n_head, 2, hd/2, …).swapaxes(1, 2)`). The one statement of the permutation; reads
/// and exports both go through it.
fn hf_row_of_stored(r: usize, hd: usize) -> usize {
    (r % 2) * (hd / 2) + r / 2
}

/// Reorders the `rows` rows of `data` (any element type, rows of equal length) between
/// llama.cpp's q/k order and Hugging Face's, per head of `heads`.
fn reorder_head_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    heads: usize,
    to_hf: bool,
) -> Vec<T> {
    let row = data.len() / rows;
    let hd = rows / heads;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for r in 0..hd {
            let (stored, hf) = (h * hd + r, h * hd + hf_row_of_stored(r, hd));
            let (src, dst) = if to_hf { (stored, hf) } else { (hf, stored) };
            out[dst * row..(dst + 1) * row].copy_from_slice(&data[src * row..(src + 1) * row]);
        }
    }
    out
}

/// The rows of `values` (rows of equal length) in the order `order` gives: stored row `i` is
/// row `order[i]` of `values`.
pub fn gather_rows(values: &[f32], order: &[usize]) -> Vec<f32> {
    let row = values.len() / order.len().max(1);
    order
        .iter()
        .flat_map(|&r| values[r * row..(r + 1) * row].iter().copied())
        .collect()
}

/// Undoes llama.cpp's q/k row permutation of a `[rows, …]` tensor's bytes.
pub(super) fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    reorder_head_rows(bytes, rows, heads, true)
}

/// Applies llama.cpp's q/k row permutation to a `[rows, …]` tensor's values (in Hugging
/// Face order), as its converter does.
pub fn permute_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    reorder_head_rows(values, rows, heads, false)
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
        let hf_f: Vec<f32> = hf.iter().map(|&x| f32::from(x)).collect();
        let stored: Vec<f32> = permuted.iter().map(|&x| f32::from(x)).collect();
        assert_eq!(permute_rows(&hf_f, 8, heads), stored);
    }

    #[test]
    fn names_map_both_ways_through_one_table() {
        for raw in [
            "token_embd.weight",
            "blk.3.attn_k.bias",
            "blk.0.ffn_down.weight",
        ] {
            let hf = decoder_hf_name(raw, llama_block_module).unwrap();
            assert_eq!(
                decoder_gguf_name(&hf, |m| LLAMA_BLOCK.part(m)).as_deref(),
                Some(raw)
            );
        }
        assert_eq!(
            decoder_gguf_name("model.layers.0.self_attn.rotary.weight", |m| LLAMA_BLOCK
                .part(m)),
            None
        );
        assert_eq!(llama_qk_heads("blk.1.attn_k.weight", 4, 2), Some(2));
        assert_eq!(llama_qk_heads("blk.1.attn_v.weight", 4, 2), None);
    }
}
