//! A model folder's tokenizer (tokenizer.json, or vocab.json + merges.txt, with
//! tokenizer_config.json) as GGUF `tokenizer.*` metadata, the inverse of what
//! [`super::GgufFile::hf_tokenizer`] reads: byte-level BPE as `tokenizer.ggml.model = "gpt2"`
//! with its merges and the `tokenizer.ggml.pre` whose split it matches, a BPE with byte
//! fallback (SentencePiece as transformers holds it) as `"llama"` with scores that rank its
//! merges, special tokens as control tokens, and the chat template.
use super::tokenizer::{pre_tokenizer_for, SPECIAL_KEYS};
use super::GgufValue;
use crate::error::{OctetError, Result};
use std::path::Path;

/// The `tokenizer.ggml.pre` names octet writes, each tried against the folder's own
/// pre-tokenizer on [`PROBE`].
const PRE_NAMES: [&str; 4] = ["llama-bpe", "qwen2", "smollm", "gpt2"];

/// Text whose split tells the supported pre-tokenizers apart (digit runs, contractions,
/// letters after punctuation, newlines and runs of spaces).
const PROBE: &str = "Hello world's 12345 x  y\n\n\tz!?ab 3.14159 I'M  ok\r\n   end";

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The `tokenizer.*` metadata of the tokenizer in `dir`; `None` when the folder has none.
/// The token list is padded to `vocab_size` (the model's embedding rows, when larger than the
/// tokenizer) with unused `[PADn]` tokens, as llama.cpp's converter pads it, so that readers
/// that take the vocabulary size from the token list (transformers, llama.cpp) see the
/// model's.
pub fn tokenizer_metadata(
    dir: &Path,
    vocab_size: Option<usize>,
) -> Result<Option<Vec<(String, GgufValue)>>> {
    let has = dir.join("tokenizer.json").is_file()
        || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file());
    if !has {
        return Ok(None);
    }
    let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let shown = dir.join("tokenizer.json");
    let bad = |p: String| OctetError::bad_file(&shown, p);
    let json: serde_json::Value = serde_json::from_str(
        &tok.inner()
            .to_string(false)
            .map_err(|e| bad(format!("cannot serialize the tokenizer: {e}")))?,
    )
    .map_err(|e| bad(e.to_string()))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "a {} tokenizer model cannot be written to GGUF (octet writes BPE: byte-level, or \
             with byte fallback as SentencePiece)",
            model["type"]
        )));
    }
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let n = tok
        .inner()
        .get_vocab_size(true)
        .max(vocab_size.unwrap_or(0));
    let mut tokens = vec![None::<String>; n];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    for (t, id) in vocab {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some(t.clone());
        }
    }
    let mut types: Vec<i32> = tokens
        .iter()
        .map(|t| if t.is_some() { NORMAL } else { UNUSED })
        .collect();
    for (id, added) in tok.inner().get_added_tokens_decoder() {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(added.content.clone());
            types[id as usize] = if added.special { CONTROL } else { USER_DEFINED };
        }
    }
    // Ids no token holds (gaps and the padding) are unused `[PADn]`, as llama.cpp's converter
    // writes them.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges = merge_pairs(&model["merges"]).map_err(bad)?;
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    let str_key = |k: &str| -> Option<String> {
        match config.get(k)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
            _ => None,
        }
    };
    let id_of = |t: &str| tokens.iter().position(|x| x == t).map(|i| i as u32);
    let mut m: Vec<(String, GgufValue)> = Vec::new();
    let mut push = |k: &str, v: GgufValue| m.push((format!("tokenizer.{k}"), v));
    if byte_fallback {
        let unk = model["unk_token"].as_str().map(String::from);
        for (i, t) in tokens.iter().enumerate() {
            if is_byte_piece(t) {
                types[i] = BYTE;
            } else if unk.as_deref() == Some(t.as_str()) {
                types[i] = UNKNOWN;
            }
        }
        push("ggml.model", GgufValue::Str("llama".into()));
        push("ggml.tokens", strings(&tokens));
        push(
            "ggml.scores",
            GgufValue::Array(
                scores_from_merges(&tokens, &merges)
                    .into_iter()
                    .map(GgufValue::F32)
                    .collect(),
            ),
        );
        push(
            "ggml.token_type",
            GgufValue::Array(types.iter().map(|&t| GgufValue::I32(t)).collect()),
        );
    } else {
        let pre = pre_name(&tok).ok_or_else(|| {
            bad(format!(
                "its pre-tokenizer splits text like none of llama.cpp's {} (tokenizer.ggml.pre), \
                 so llama.cpp would tokenize differently",
                PRE_NAMES.join(", ")
            ))
        })?;
        push("ggml.model", GgufValue::Str("gpt2".into()));
        push("ggml.pre", GgufValue::Str(pre.into()));
        push("ggml.tokens", strings(&tokens));
        push(
            "ggml.token_type",
            GgufValue::Array(types.iter().map(|&t| GgufValue::I32(t)).collect()),
        );
        // No merges (a byte-level vocabulary) means no key, as the converter writes it.
        if !merges.is_empty() {
            let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
            push("ggml.merges", strings(&merges));
        }
    }
    let named = |name: &str| str_key(name).and_then(|t| id_of(&t));
    // Last, the model's config.json ids, as the converter falls back to them.
    let model_config = read_json(&dir.join("config.json"))?;
    let config_id = |key: &str| {
        model_config[key]
            .as_u64()
            .filter(|&id| (id as usize) < tokens.len())
            .map(|id| id as u32)
    };
    let ids = [
        named("bos_token")
            .or(tok.bos_id())
            .or_else(|| config_id("bos_token_id")),
        named("eos_token")
            .or(tok.eos_id())
            .or_else(|| config_id("eos_token_id")),
        named("unk_token").or_else(|| model["unk_token"].as_str().and_then(id_of)),
        named("pad_token"),
    ];
    for ((_, key), id) in SPECIAL_KEYS.iter().zip(ids) {
        if let Some(id) = id {
            push(&format!("ggml.{key}"), GgufValue::U32(id));
        }
    }
    for k in ["add_bos_token", "add_eos_token"] {
        if let Some(b) = config.get(k).and_then(|v| v.as_bool()) {
            push(&format!("ggml.{k}"), GgufValue::Bool(b));
        }
    }
    let template = match config.get("chat_template").and_then(|v| v.as_str()) {
        Some(t) => Some(t.to_string()),
        None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        push("chat_template", GgufValue::Str(t));
    }
    Ok(Some(m))
}

/// A JSON file's object, or an empty one when the file is absent.
fn read_json(p: &Path) -> Result<serde_json::Value> {
    match std::fs::read_to_string(p) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| OctetError::bad_file(p, format!("invalid JSON: {e}"))),
        Err(_) => Ok(serde_json::json!({})),
    }
}

fn strings(v: &[String]) -> GgufValue {
    GgufValue::Array(v.iter().map(|s| GgufValue::Str(s.clone())).collect())
}

/// `<0xAB>`: a byte-fallback piece.
fn is_byte_piece(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && u8::from_str_radix(&t[3..5], 16).is_ok()
}

/// The merges of a serialized BPE model, either `"a b"` strings or `[a, b]` pairs.
fn merge_pairs(v: &serde_json::Value) -> std::result::Result<Vec<(String, String)>, String> {
    let Some(arr) = v.as_array() else {
        return Ok(Vec::new());
    };
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                serde_json::Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(p) if p.len() == 2 => p[0]
                    .as_str()
                    .zip(p[1].as_str())
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                _ => None,
            };
            pair.ok_or_else(|| format!("model.merges[{i}] is not a pair of tokens"))
        })
        .collect()
}

/// SentencePiece scores that rank the merges as given: a piece made by merge `k` scores
/// `-k`, so that rebuilding the merges from the scores (every split of a piece, ranked by the
/// merged piece's score) finds the same order; pieces no merge makes score below all of them.
fn scores_from_merges(tokens: &[String], merges: &[(String, String)]) -> Vec<f32> {
    let mut rank = std::collections::HashMap::new();
    for (k, (a, b)) in merges.iter().enumerate() {
        rank.entry(format!("{a}{b}")).or_insert(k);
    }
    let floor = -(merges.len() as f32) - 1.0;
    tokens
        .iter()
        .map(|t| rank.get(t).map_or(floor, |&k| -(k as f32)))
        .collect()
}

/// The `tokenizer.ggml.pre` whose split (as octet builds it when reading) equals `tok`'s own
/// pre-tokenizer's on [`PROBE`].
fn pre_name(tok: &crate::tokenizer::Tokenizer) -> Option<&'static str> {
    use tokenizers::{PreTokenizedString, PreTokenizer};
    let split = |p: &dyn PreTokenizer| -> Option<Vec<String>> {
        let mut s = PreTokenizedString::from(PROBE);
        p.pre_tokenize(&mut s).ok()?;
        Some(
            s.get_splits(
                tokenizers::OffsetReferential::Original,
                tokenizers::OffsetType::Byte,
            )
            .into_iter()
            .map(|(t, _, _)| t.to_string())
            .collect(),
        )
    };
    let own = split(tok.inner().get_pre_tokenizer()?)?;
    PRE_NAMES.into_iter().find(|name| {
        pre_tokenizer_for(name)
            .ok()
            .and_then(|(p, _)| split(&p))
            .is_some_and(|s| s == own)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_rank_pieces_by_their_merge() {
        let tokens: Vec<String> = ["a", "b", "ab", "abb", "<0x41>"].map(String::from).to_vec();
        let merges = vec![("a".into(), "b".into()), ("ab".into(), "b".into())];
        assert_eq!(
            scores_from_merges(&tokens, &merges),
            vec![-3.0, -3.0, 0.0, -1.0, -3.0]
        );
        assert!(is_byte_piece("<0x41>") && !is_byte_piece("<0xZZ>") && !is_byte_piece("a"));
    }
}
