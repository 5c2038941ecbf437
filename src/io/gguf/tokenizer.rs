//! The tokenizer a GGUF's metadata describes, and the side files (tokenizer.json,
//! tokenizer_config.json) written for it.
use super::GgufFile;
use crate::error::{OctetError, Result};
use std::collections::HashMap;
use std::path::Path;

impl GgufFile {
    fn tokens(&self) -> Result<Vec<&str>> {
        let arr = self
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| {
                OctetError::bad_file(&self.path, "no tokenizer.ggml.tokens in the metadata")
            })?;
        arr.iter()
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    OctetError::bad_file(&self.path, "tokenizer.ggml.tokens holds a non-string")
                })
            })
            .collect()
    }

    /// The tokenizer the metadata describes, as a `tokenizers` tokenizer: byte-level BPE
    /// (`tokenizer.ggml.model = "gpt2"`) from `tokens` and `merges`, pre-tokenized the way
    /// llama.cpp does for `tokenizer.ggml.pre`; control tokens (type 3) become special added
    /// tokens and user-defined ones (type 4) plain added tokens, matched whole in text. No
    /// BOS/EOS are added by the tokenizer itself.
    pub fn hf_tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::{decoders, processors, AddedToken};
        let bad = |p: String| OctetError::bad_file(&self.path, p);
        let model = self
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .unwrap_or("(none)");
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model '{model}' is not supported (octet builds byte-level BPE, 'gpt2', tokenizers)"
            )));
        }
        let tokens = self.tokens()?;
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.to_string()).or_insert(i as u32);
        }
        let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
        let mut merges = Vec::new();
        if let Some(arr) = self.get("tokenizer.ggml.merges").and_then(|v| v.as_array()) {
            merges.reserve(arr.len());
            for (i, m) in arr.iter().enumerate() {
                let pair = m
                    .as_str()
                    .and_then(|s| s.split_once(' '))
                    .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' '))
                    .ok_or_else(|| bad(format!("tokenizer.ggml.merges[{i}] is not 'a b'")))?;
                merges.push((pair.0.to_string(), pair.1.to_string()));
            }
        }
        let pre = self
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let (pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre).map_err(bad)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| bad(format!("cannot build the BPE tokenizer: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(decoders::byte_level::ByteLevel::default()))
            .with_post_processor(Some(processors::byte_level::ByteLevel::new(
                false, false, true,
            )));
        let types: Vec<i64> = self
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let added = |ty: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == ty)
                .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
                .collect()
        };
        tok.add_special_tokens(&added(3, true));
        tok.add_tokens(&added(4, false));
        Ok(tok)
    }

    /// The end- and beginning-of-sequence ids the metadata names
    /// (`tokenizer.ggml.eos_token_id` / `bos_token_id`), each `None` when absent.
    pub fn special_token_ids(&self) -> (Option<u32>, Option<u32>) {
        let id = |key: &str| self.meta_u64(key).map(|v| v as u32);
        (
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.bos_token_id"),
        )
    }

    /// Writes `config.json`, `tokenizer.json` and `tokenizer_config.json` into `dir`, so a
    /// model converted from this file is self-contained; returns the names written. A
    /// tokenizer octet cannot build (not byte-level BPE) is left out rather than failing the
    /// conversion of the weights.
    pub fn write_side_files(&self, dir: &Path) -> Result<Vec<String>> {
        let write = |name: &str, text: String| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
        };
        let json = |v: &serde_json::Value| {
            serde_json::to_string_pretty(v).map_err(|e| OctetError::InvalidArgument(e.to_string()))
        };
        write("config.json", json(&self.config()?)?)?;
        if self.get("tokenizer.ggml.model").and_then(|v| v.as_str()) != Some("gpt2") {
            return Ok(vec!["config.json".into()]);
        }
        let tok = self.hf_tokenizer()?;
        let text = tok.to_string(true).map_err(|e| {
            OctetError::InvalidArgument(format!("cannot serialize the tokenizer: {e}"))
        })?;
        write("tokenizer.json", text)?;
        let tokens = self.tokens()?;
        let token = |key: &str| {
            self.meta_u64(&format!("tokenizer.ggml.{key}"))
                .and_then(|i| tokens.get(i as usize))
                .map(|t| serde_json::Value::String(t.to_string()))
                .unwrap_or(serde_json::Value::Null)
        };
        let mut tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
            "add_bos_token": self.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
        });
        if let Some(t) = self.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            tc["chat_template"] = t.into();
        }
        write("tokenizer_config.json", json(&tc)?)?;
        Ok(vec![
            "config.json".into(),
            "tokenizer.json".into(),
            "tokenizer_config.json".into(),
        ])
    }
}

/// GPT-2's split, as tokenizers' ByteLevel applies it.
fn gpt2_pre() -> tokenizers::PreTokenizerWrapper {
    tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true).into()
}

/// A regex split (isolated pieces) followed by the byte-level mapping.
fn split_pre(regex: &str) -> std::result::Result<tokenizers::PreTokenizerWrapper, String> {
    use tokenizers::pre_tokenizers::{byte_level::ByteLevel, sequence::Sequence, split};
    let s = split::Split::new(
        split::SplitPattern::Regex(regex.into()),
        tokenizers::SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| format!("bad pre-tokenizer regex: {e}"))?;
    Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, true, false).into()]).into())
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, and whether whole words found in
/// the vocabulary skip the merges (llama.cpp's `ignore_merges`).
fn pre_tokenizer_for(
    pre: &str,
) -> std::result::Result<(tokenizers::PreTokenizerWrapper, bool), String> {
    use tokenizers::pre_tokenizers::{digits::Digits, sequence::Sequence};
    Ok(match pre {
        // Files without the key predate it; like transformers, read them as GPT-2.
        "default" | "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" => (gpt2_pre(), false),
        // Every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone"
        | "minerva-7b" => (
            Sequence::new(vec![Digits::new(true).into(), gpt2_pre()]).into(),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            (split_pre(LLAMA3_SPLIT)?, true)
        }
        "qwen2" | "deepseek-r1-qwen" => (split_pre(QWEN2_SPLIT)?, false),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre '{other}' is not supported (octet knows gpt2, smollm/starcoder, llama-bpe, qwen2 and their aliases)"
            ))
        }
    })
}
