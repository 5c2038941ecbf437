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
    /// head count, so that reads undo it.
    fn permuted_heads(&self, file: &GgufFile, raw: &str) -> Result<Option<usize>>;
    /// The Hugging Face config.json the file's metadata implies.
    fn config(&self, file: &GgufFile) -> Result<serde_json::Value>;
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
