//! The tokenizer a GGUF's metadata describes, and the side files (tokenizer.json,
//! tokenizer_config.json) written for it.
use super::{sentencepiece, GgufFile};
use crate::error::{OctetError, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::AddedToken;

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

    /// Which tokenizer the metadata describes (`tokenizer.ggml.model`); `None` when the file
    /// carries no tokenizer at all. A kind octet cannot build is an error naming the key.
    pub fn tokenizer_kind(&self) -> Result<Option<TokenizerKind>> {
        let Some(v) = self.get("tokenizer.ggml.model") else {
            return Ok(None);
        };
        match v.as_str() {
            Some("gpt2") => Ok(Some(TokenizerKind::ByteLevelBpe)),
            Some("llama") => Ok(Some(TokenizerKind::SentencePiece)),
            other => Err(OctetError::bad_file(
                &self.path,
                format!(
                    "tokenizer.ggml.model {} is not supported: octet builds 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers",
                    other.map_or_else(|| format!("{v:?}"), |s| format!("'{s}'"))
                ),
            )),
        }
    }

    /// The tokenizer the metadata describes, as transformers builds it from the same file
    /// (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`):
    /// - byte-level BPE (`tokenizer.ggml.model = "gpt2"`) from `tokens` and `merges`,
    ///   pre-tokenized the way llama.cpp does for `tokenizer.ggml.pre`;
    /// - SentencePiece (`"llama"`) from `tokens` and `scores`, with byte fallback, in the
    ///   shape of the model family (Llama/Mistral, Phi-3 or Gemma, by `general.architecture`).
    ///
    /// Control tokens (type 3) and the named BOS/EOS/unknown/padding tokens become special
    /// added tokens, user-defined ones (type 4) plain added tokens, matched whole in text.
    /// The post-processor adds BOS / EOS as `tokenizer.ggml.add_bos_token` /
    /// `add_eos_token` say (BOS by default for SentencePiece); it only acts when an encoding
    /// asks for special tokens.
    pub fn hf_tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let bad = |p: String| OctetError::bad_file(&self.path, p);
        let kind = self
            .tokenizer_kind()?
            .ok_or_else(|| bad("no tokenizer.ggml.model in the metadata".into()))?;
        let tokens = self.tokens()?;
        let mut tok = match kind {
            TokenizerKind::ByteLevelBpe => self.byte_level_bpe(&tokens)?,
            TokenizerKind::SentencePiece => {
                let scores = self.scores(tokens.len())?;
                let flavour = sentencepiece::Flavour::of(self.architecture());
                let unk = self.special_token(&tokens, "unknown_token_id");
                sentencepiece::build(&tokens, &scores, flavour, unk).map_err(bad)?
            }
        };
        let types = self.token_types();
        let marked = |ty: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == ty)
                .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
                .collect()
        };
        tok.add_special_tokens(&marked(3, true));
        tok.add_tokens(&marked(4, false));
        // The tokens the metadata names are special even when not typed as control (a
        // SentencePiece <unk> is type 2), as transformers registers its named tokens.
        let added: Vec<String> = tok
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .collect();
        let named: Vec<AddedToken> = SPECIAL_KEYS
            .iter()
            .filter_map(|(_, key)| self.special_token(&tokens, key))
            .filter(|t| !added.iter().any(|a| a == t))
            .map(|t| AddedToken::from(t.to_string(), true).normalized(false))
            .collect();
        tok.add_special_tokens(&named);
        let (add_bos, add_eos) = self.adds_bos_eos(kind);
        let named_id = |key: &str| {
            self.special_token_id(&tokens, key)
                .map(|id| (tokens[id as usize], id))
        };
        let bos = add_bos.then(|| named_id("bos_token_id")).flatten();
        let eos = add_eos.then(|| named_id("eos_token_id")).flatten();
        if bos.is_some() || eos.is_some() {
            tok.with_post_processor(Some(bos_eos_template(bos, eos).map_err(bad)?));
        }
        Ok(tok)
    }

    /// Byte-level BPE from `tokens` and `tokenizer.ggml.merges`.
    fn byte_level_bpe(&self, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::{decoders, processors};
        let bad = |p: String| OctetError::bad_file(&self.path, p);
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
        Ok(tok)
    }

    /// `tokenizer.ggml.scores`, one per token.
    fn scores(&self, n: usize) -> Result<Vec<f32>> {
        let bad = |p: &str| OctetError::bad_file(&self.path, p);
        let arr = self
            .get("tokenizer.ggml.scores")
            .and_then(|v| v.as_array())
            .ok_or_else(|| {
                bad("no tokenizer.ggml.scores in the metadata (a SentencePiece vocabulary needs them)")
            })?;
        if arr.len() != n {
            return Err(OctetError::bad_file(
                &self.path,
                format!(
                    "tokenizer.ggml.scores has {} entries for {n} tokens",
                    arr.len()
                ),
            ));
        }
        arr.iter()
            .map(|v| {
                v.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| bad("tokenizer.ggml.scores holds a non-number"))
            })
            .collect()
    }

    /// `tokenizer.ggml.token_type`, normal (1) where absent or not an integer.
    fn token_types(&self) -> Vec<i64> {
        self.get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
            .unwrap_or_default()
    }

    /// The id under `tokenizer.ggml.<key>`, when it names a token of the vocabulary.
    fn special_token_id(&self, tokens: &[&str], key: &str) -> Option<u32> {
        self.meta_u64(&format!("tokenizer.ggml.{key}"))
            .filter(|&i| (i as usize) < tokens.len())
            .map(|i| i as u32)
    }

    /// The text of the token under `tokenizer.ggml.<key>`, when it names one.
    fn special_token<'a>(&self, tokens: &[&'a str], key: &str) -> Option<&'a str> {
        self.special_token_id(tokens, key)
            .map(|i| tokens[i as usize])
    }

    /// Whether encodings with special tokens start with BOS and end with EOS:
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token`; a SentencePiece vocabulary that does
    /// not say adds BOS, as llama.cpp and transformers do.
    fn adds_bos_eos(&self, kind: TokenizerKind) -> (bool, bool) {
        let flag = |key: &str| self.get(key).and_then(|v| v.as_bool());
        (
            flag("tokenizer.ggml.add_bos_token").unwrap_or(kind == TokenizerKind::SentencePiece),
            flag("tokenizer.ggml.add_eos_token").unwrap_or(false),
        )
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
    /// model converted from this file is self-contained; returns the names written. A file
    /// without tokenizer metadata gives `config.json` only. The tokenizer files load in
    /// transformers (`AutoTokenizer.from_pretrained(dir)`) with the ids octet gives, and
    /// `tokenizer.chat_template` is kept as `chat_template`.
    pub fn write_side_files(&self, dir: &Path) -> Result<Vec<String>> {
        let write = |name: &str, text: String| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
        };
        let json = |v: &serde_json::Value| {
            serde_json::to_string_pretty(v).map_err(|e| OctetError::InvalidArgument(e.to_string()))
        };
        write("config.json", json(&self.config()?)?)?;
        let Some(kind) = self.tokenizer_kind()? else {
            return Ok(vec!["config.json".into()]);
        };
        let tok = self.hf_tokenizer()?;
        let text = tok.to_string(true).map_err(|e| {
            OctetError::InvalidArgument(format!("cannot serialize the tokenizer: {e}"))
        })?;
        write("tokenizer.json", text)?;
        let tokens = self.tokens()?;
        let mut tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
        });
        for (name, key) in SPECIAL_KEYS {
            tc[name] = self.special_token(&tokens, key).into();
        }
        let (add_bos, add_eos) = self.adds_bos_eos(kind);
        tc["add_bos_token"] = add_bos.into();
        tc["add_eos_token"] = add_eos.into();
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

/// The tokenizer kinds octet builds from GGUF metadata (`tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// `"gpt2"`: byte-level BPE with merges (GPT-2, Llama 3, Qwen2, SmolLM, ...).
    ByteLevelBpe,
    /// `"llama"`: a SentencePiece vocabulary with scores (Llama 1/2, Mistral, Phi-3, Gemma).
    SentencePiece,
}

/// transformers' names for the special tokens and the metadata keys holding their ids.
pub(super) const SPECIAL_KEYS: [(&str, &str); 4] = [
    ("bos_token", "bos_token_id"),
    ("eos_token", "eos_token_id"),
    ("unk_token", "unknown_token_id"),
    ("pad_token", "padding_token_id"),
];

/// A post-processor that puts `bos` before and `eos` after each sequence (each a token's text
/// and id), as transformers' `add_bos_token` / `add_eos_token` do. Built from its serialized
/// form so that any token text works (the template string syntax splits on spaces and colons).
fn bos_eos_template(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
) -> std::result::Result<tokenizers::PostProcessorWrapper, String> {
    use serde_json::json;
    let seq = |seq: &str, type_id: u32| {
        let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": type_id}});
        let mut v = Vec::new();
        v.extend(bos.map(|(t, _)| special(t)));
        v.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        v.extend(eos.map(|(t, _)| special(t)));
        v
    };
    let mut special = serde_json::Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        special.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    let mut pair = seq("A", 0);
    pair.extend(seq("B", 1));
    serde_json::from_value(json!({
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": pair,
        "special_tokens": special,
    }))
    .map_err(|e| format!("cannot build the BOS/EOS template: {e}"))
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
pub(super) fn pre_tokenizer_for(
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
