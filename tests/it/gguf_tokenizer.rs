//! GGUF tokenizers against transformers' (scripts/gen_spm_gguf.py writes the files and
//! transformers' ids): SentencePiece vocabularies in the Llama, Phi-3 and Gemma shapes and a
//! byte-level BPE, encoded with and without special tokens and decoded; the converted folder's
//! tokenizer files, loaded back in octet and in transformers; the chat template; refusals.
use crate::common;
use octet::io::gguf::GgufFile;
use octet::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn spm(rel: &str) -> PathBuf {
    common::fixture(&format!("spm_gguf/{rel}"))
}

/// transformers' record for one file of the fixture (hf_tokenize.py's JSON).
fn reference(file: &str) -> Value {
    let text = std::fs::read_to_string(spm("vectors.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    all[file].clone()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

/// Every difference between octet's tokenizer and transformers' record, one line each.
fn mismatches(tok: &Tokenizer, want: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for v in want["vectors"].as_array().unwrap() {
        let text = v["text"].as_str().unwrap();
        let (ids, ids_special) = (ids_of(&v["ids"]), ids_of(&v["ids_special"]));
        let got = tok.encode(text).unwrap();
        if got != ids {
            out.push(format!("encode {text:?}: {got:?}, transformers {ids:?}"));
        }
        let got = tok.encode_with_special_tokens(text).unwrap();
        if got != ids_special {
            out.push(format!(
                "encode with specials {text:?}: {got:?}, transformers {ids_special:?}"
            ));
        }
        for (ids, key) in [(&ids, "decoded"), (&ids_special, "decoded_special")] {
            let got = tok.decode(ids).unwrap();
            if got != v[key].as_str().unwrap() {
                out.push(format!(
                    "{key} of {text:?}: {got:?}, transformers {}",
                    v[key]
                ));
            }
        }
    }
    let special = |k: &str| want[k].as_u64().map(|i| i as u32);
    if (tok.bos_id(), tok.eos_id()) != (special("bos_token_id"), special("eos_token_id")) {
        out.push(format!(
            "bos/eos {:?}/{:?}, transformers {}/{}",
            tok.bos_id(),
            tok.eos_id(),
            want["bos_token_id"],
            want["eos_token_id"]
        ));
    }
    if tok.vocab_size() as u64 != want["vocab_size"].as_u64().unwrap() {
        out.push(format!(
            "vocabulary of {}, transformers {}",
            tok.vocab_size(),
            want["vocab_size"]
        ));
    }
    out
}

#[test]
fn gguf_tokenizers_match_transformers() {
    for file in ["llama.gguf", "phi3.gguf", "gemma2.gguf", "bpe.gguf"] {
        let want = reference(file);
        let n = want["vectors"].as_array().unwrap().len();
        assert!(n >= 15, "{file}: {n} strings");
        let tok = Tokenizer::from_gguf(&GgufFile::open(&spm(file)).unwrap()).unwrap();
        let bad = mismatches(&tok, &want);
        assert!(bad.is_empty(), "{file}:\n{}", bad.join("\n"));
    }
    // The strings do reach the byte fallback of every SentencePiece vocabulary.
    for file in ["llama.gguf", "phi3.gguf", "gemma2.gguf"] {
        assert!(reference(file)["byte_fallback_ids"].as_u64().unwrap() > 0);
    }
}

/// transformers' ids for `dir`'s tokenizer files on the fixture's strings.
fn transformers_on(dir: &Path, texts: &[&str], scratch: &Path) -> Value {
    let texts_file = scratch.join("texts.json");
    std::fs::write(&texts_file, serde_json::to_string(texts).unwrap()).unwrap();
    common::script_json("hf_tokenize.py", &[dir.as_os_str(), texts_file.as_os_str()])
}

#[test]
fn converted_folders_tokenize_alike_in_octet_and_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    for file in ["llama.gguf", "bpe.gguf"] {
        let want = reference(file);
        let out = tmp.path().join(file.replace('.', "_"));
        let (ok, _, stderr) = common::convert(&spm(file), &out, &["--block-size", "64"]);
        assert!(ok, "{file}: {stderr}");
        let octet_side = Tokenizer::from_dir(&out).unwrap();
        let bad = mismatches(&octet_side, &want);
        assert!(
            bad.is_empty(),
            "{file} converted, octet:\n{}",
            bad.join("\n")
        );

        let texts: Vec<&str> = want["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["text"].as_str().unwrap())
            .collect();
        let hf = transformers_on(&out, &texts, tmp.path());
        for (got, v) in hf["vectors"]
            .as_array()
            .unwrap()
            .iter()
            .zip(want["vectors"].as_array().unwrap())
        {
            for key in ["ids", "ids_special", "decoded", "decoded_special"] {
                assert_eq!(
                    got[key], v[key],
                    "{file} converted, transformers, {key} of {}",
                    v["text"]
                );
            }
        }
        for key in ["bos_token_id", "eos_token_id", "vocab_size"] {
            assert_eq!(hf[key], want[key], "{file} converted, transformers, {key}");
        }

        // The chat template travels with the tokenizer, in tokenizer_config.json.
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        let template = GgufFile::open(&spm(file))
            .unwrap()
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap();
        assert!(template.contains("<|im_start|>"));
        assert_eq!(
            config["chat_template"].as_str(),
            Some(template.as_str()),
            "{file}"
        );
        assert_eq!(
            hf["chat_template"].as_str(),
            Some(template.as_str()),
            "{file}"
        );
        assert_eq!(
            want["chat_template"].as_str(),
            Some(template.as_str()),
            "{file}"
        );
    }
}

/// `from`'s bytes with the `tokenizer.ggml.model` value (same length) replaced.
fn with_tokenizer_model(from: &Path, to: &Path, old: &str, new: &str) {
    assert_eq!(old.len(), new.len());
    let mut bytes = std::fs::read(from).unwrap();
    let key = b"tokenizer.ggml.model";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // type (u32, 8 = string), length (u64), then the value.
    let value = at + 4 + 8;
    assert_eq!(&bytes[value..value + old.len()], old.as_bytes());
    bytes[value..value + new.len()].copy_from_slice(new.as_bytes());
    std::fs::write(to, bytes).unwrap();
}

#[test]
fn unknown_tokenizer_models_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let odd = tmp.path().join("odd.gguf");
    with_tokenizer_model(&spm("llama.gguf"), &odd, "llama", "bogus");
    let g = GgufFile::open(&odd).unwrap();
    let e = common::err_text(Tokenizer::from_gguf(&g));
    common::assert_mentions(&e, &["odd.gguf", "tokenizer.ggml.model", "bogus"]);

    // Converting it stops before anything is written.
    let out = tmp.path().join("out");
    let (ok, _, stderr) = common::convert(&odd, &out, &[]);
    assert!(!ok);
    common::assert_mentions(&stderr, &["odd.gguf", "tokenizer.ggml.model", "bogus"]);
    assert!(!out.exists());
}
