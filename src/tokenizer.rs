//! Text ↔ token ids, through the Hugging Face `tokenizers` crate.
//!
//! A model folder either carries a full `tokenizer.json`, or only the classic GPT-2 pair
//! `vocab.json` + `merges.txt`; the latter is rebuilt here exactly as transformers'
//! `GPT2TokenizerFast(vocab_file, merges_file)` does (byte-level BPE, no prefix space).
use crate::error::{OctetError, Result};
use crate::io::gguf::GgufFile;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::{decoders, pre_tokenizers, processors, AddedToken};

/// Tokens taken as end-of-sequence, in order of preference, when present in the vocabulary.
const EOS_CANDIDATES: [&str; 4] = ["<|endoftext|>", "</s>", "<|im_end|>", "<|eos|>"];

/// A loaded tokenizer plus the end-of-sequence id octet uses to separate documents (and the
/// beginning-of-sequence id, when the model states one).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Option<u32>,
    bos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos", &self.eos)
            .field("bos", &self.bos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads the tokenizer of a model folder: `dir/tokenizer.json` when present, otherwise a
    /// GPT-2 style byte-level BPE built from `dir/vocab.json` + `dir/merges.txt`; a `.gguf`
    /// file gives the tokenizer stored in its metadata. The EOS / BOS tokens named by
    /// `tokenizer_config.json` (or `special_tokens_map.json`) win over the vocabulary guess,
    /// as in transformers' `AutoTokenizer`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        // A GGUF file carries its tokenizer in its metadata.
        if crate::io::gguf::is_gguf(dir) {
            return Self::from_gguf(&GgufFile::open(dir)?);
        }
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let mut tok = if json.is_file() {
            let text = std::fs::read(&json).map_err(|e| OctetError::io(&json, e))?;
            // Syntax first: tokenizers 0.21 panics (instead of erring) on malformed JSON inside
            // its `decoder` field when parsing from text, but not from a parsed value.
            let value: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| OctetError::bad_file(&json, format!("invalid JSON: {e}")))?;
            let inner: tokenizers::Tokenizer = serde_json::from_value(value)
                .map_err(|e| OctetError::bad_file(&json, format!("not a usable tokenizer: {e}")))?;
            Self::from_tokenizers(inner)
        } else if vocab.is_file() && merges.is_file() {
            Self::from_vocab_merges(&vocab, &merges)?
        } else {
            return Err(OctetError::bad_file(
                dir,
                "no tokenizer found: expected tokenizer.json, or vocab.json + merges.txt",
            ));
        };
        // A folder converted from a GGUF (or any HF folder) names its specials here; SmolLM2's
        // vocabulary starts with <|endoftext|> (id 0) while its EOS is <|im_end|> (id 2).
        if let Some(id) = tok.named_special(dir, "eos_token")? {
            tok.eos = Some(id);
        }
        if let Some(id) = tok.named_special(dir, "bos_token")? {
            tok.bos = Some(id);
        }
        Ok(tok)
    }

    /// The id of the token that `dir/tokenizer_config.json`, else `dir/special_tokens_map.json`,
    /// names under `key` (a string, or an object with `content`); `None` when neither names
    /// one. A named token missing from the vocabulary is an error: the model has no row for it.
    fn named_special(&self, dir: &Path, key: &str) -> Result<Option<u32>> {
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(file);
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| OctetError::bad_file(&p, format!("invalid JSON: {e}")))?;
            let name = match v.get(key) {
                Some(serde_json::Value::String(s)) => s.as_str(),
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    _ => continue,
                },
                _ => continue,
            };
            return match self.inner.token_to_id(name) {
                Some(id) => Ok(Some(id)),
                None => Err(OctetError::bad_file(
                    &p,
                    format!("{key} {name:?} is not in the tokenizer's vocabulary"),
                )),
            };
        }
        Ok(None)
    }

    /// Builds a GPT-2 style byte-level BPE from a `vocab.json` (token → id) and a `merges.txt`
    /// (one "left right" pair per line, optional `#version` header).
    pub fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(vocab_path).map_err(|e| OctetError::io(vocab_path, e))?;
        let map: HashMap<String, u32> = serde_json::from_str(&text).map_err(|e| {
            OctetError::bad_file(vocab_path, format!("not a JSON object of token → id: {e}"))
        })?;
        if map.is_empty() {
            return Err(OctetError::bad_file(vocab_path, "the vocabulary is empty"));
        }
        let vocab: Vocab = map.into_iter().collect();

        let text =
            std::fs::read_to_string(merges_path).map_err(|e| OctetError::io(merges_path, e))?;
        let mut merges: Merges = Vec::new();
        for (i, line) in text.lines().enumerate() {
            // Same rules as tokenizers' own reader: skip the version header; blank lines carry
            // nothing (the GPT-2 file ends with one).
            if line.starts_with("#version") || line.is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    merges.push((a.to_string(), b.to_string()))
                }
                _ => {
                    return Err(OctetError::bad_file(
                        merges_path,
                        format!("line {}: expected two tokens separated by one space", i + 1),
                    ))
                }
            }
        }

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| OctetError::bad_file(merges_path, format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(pre_tokenizers::byte_level::ByteLevel::new(
                false, true, true,
            )))
            .with_decoder(Some(decoders::byte_level::ByteLevel::default()))
            .with_post_processor(Some(processors::byte_level::ByteLevel::new(
                false, false, true,
            )));
        // transformers registers the GPT-2 eos/bos/unk (<|endoftext|>) as a special token, so a
        // literal "<|endoftext|>" in text maps to its id instead of being split into pieces.
        let specials: Vec<AddedToken> = EOS_CANDIDATES
            .iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(Self::from_tokenizers(inner))
    }

    /// Wraps a tokenizer built elsewhere (e.g. from GGUF metadata). The EOS id is guessed from
    /// the vocabulary and there is no BOS; override them with [`Tokenizer::set_eos_id`] and
    /// [`Tokenizer::set_bos_id`].
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        let eos = EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t));
        Self {
            inner,
            eos,
            bos: None,
        }
    }

    /// The tokenizer a GGUF file's metadata describes (byte-level BPE or SentencePiece, see
    /// [`GgufFile::hf_tokenizer`]), with the end- and beginning-of-sequence ids it names (the
    /// vocabulary guess otherwise).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let mut t = Self::from_tokenizers(file.hf_tokenizer()?);
        let (eos, bos) = file.special_token_ids();
        if eos.is_some() {
            t.eos = eos;
        }
        t.bos = bos;
        Ok(t)
    }

    /// Sets (or clears) the end-of-sequence id, for callers that know it from model metadata.
    pub fn set_eos_id(&mut self, eos: Option<u32>) {
        self.eos = eos;
    }

    /// Sets (or clears) the beginning-of-sequence id, for callers that know it from model
    /// metadata.
    pub fn set_bos_id(&mut self, bos: Option<u32>) {
        self.bos = bos;
    }

    /// Token ids of `text`, without any special tokens added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| OctetError::InvalidArgument(format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with the special tokens the tokenizer's own post-processor adds
    /// around it (the BOS of a SentencePiece GGUF, for one), as transformers'
    /// `encode(text, add_special_tokens=True)` gives them.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| OctetError::InvalidArgument(format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether the tokenizer's own post-processor puts a BOS first, as transformers'
    /// `add_bos_token` does (Llama, Gemma and SentencePiece GGUFs do; GPT-2, Qwen2 and SmolLM2
    /// do not).
    pub fn adds_bos(&self) -> bool {
        let Some(bos) = self.bos else {
            return false;
        };
        let first = |ids: Result<Vec<u32>>| ids.ok().and_then(|v| v.first().copied());
        first(self.encode_with_special_tokens("a")) == Some(bos)
            && first(self.encode("a")) != Some(bos)
    }

    /// Token ids of `text` with the BOS in front when [`Tokenizer::adds_bos`], and no other
    /// special token: what transformers feeds a model for a text, a prompt or a training
    /// document (an EOS a post-processor might append is left out; octet places EOS itself).
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if self.adds_bos() {
            ids.insert(0, self.bos.expect("adds_bos implies a BOS id"));
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens included). Ids outside the vocabulary are an error
    /// rather than being silently dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(OctetError::InvalidArgument(format!(
                "token id {bad} is not in the vocabulary (size {})",
                self.vocab_size()
            )));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| OctetError::InvalidArgument(format!("detokenization failed: {e}")))
    }

    /// The end-of-sequence id: the one the model folder or GGUF metadata names, else
    /// `<|endoftext|>`, `</s>`, `<|im_end|>` or `<|eos|>`, the first found in the vocabulary.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The beginning-of-sequence id the model folder or GGUF metadata names, if any; see
    /// [`Tokenizer::encode_with_bos`] for where octet adds it.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
