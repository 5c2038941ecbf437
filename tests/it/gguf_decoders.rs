//! GGUF files of Llama 3, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 2 written by llama.cpp's own
//! converter (scripts/gen_tiny_decoders_gguf.py): the tensors each architecture's mapping
//! serves against gguf-py's de-quantization with llama.cpp's changes undone, and the
//! config.json it derives against the source model's.
use crate::common;
use crate::common::max_abs_diff;

use octet::io::gguf::GgufFile;
use octet::io::{Dtype, TensorStore};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use tch::{Kind, Tensor};

const VARIANTS: [&str; 6] = ["llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2"];
/// Reference entries that are not weights.
const NOT_WEIGHTS: [&str; 4] = ["input_ids", "logits", "logits_f32", "logits_sliding"];

fn fixture(rel: &str) -> PathBuf {
    common::fixture(&format!("tiny_decoders/gguf/{rel}"))
}

fn open(file: &str) -> GgufFile {
    GgufFile::open(&fixture(file)).unwrap()
}

/// gguf-py's de-quantization of `<v>.q8_0.gguf` under Hugging Face names, per variant.
fn reference_weights(v: &str) -> BTreeMap<String, Tensor> {
    common::load_safetensors(&fixture("reference.safetensors"))
        .into_iter()
        .filter_map(|(k, t)| {
            let name = k.strip_prefix(&format!("{v}."))?.to_string();
            (!NOT_WEIGHTS.contains(&name.as_str())).then_some((name, t))
        })
        .collect()
}

fn source_config(v: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("configs.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()[v].clone()
}

fn stored_f32(store: &dyn TensorStore, name: &str) -> Tensor {
    let meta = store.meta(name).unwrap();
    let bytes = store.bytes(name).unwrap();
    octet::io::dtype::tensor_from_bytes(meta.dtype, &meta.shape, &bytes)
        .unwrap()
        .to_kind(Kind::Float)
}

#[test]
fn q8_0_tensors_equal_gguf_py_with_llama_cpp_changes_undone() {
    for v in VARIANTS {
        let g = open(&format!("{v}.q8_0.gguf"));
        let want = reference_weights(v);
        let names: BTreeSet<String> = g.names().into_iter().collect();
        assert_eq!(
            names,
            want.keys().cloned().collect::<BTreeSet<_>>(),
            "{v}: served names"
        );
        for (name, theirs) in &want {
            let ours = stored_f32(&g, name);
            assert_eq!(ours.size(), theirs.size(), "{v} {name}");
            // Bit-identical: un-permuted rows (llama, mistral), norms minus 1 (gemma2).
            assert!(
                ours.equal(theirs),
                "{v} {name}: max |diff| {}",
                max_abs_diff(&ours, theirs)
            );
        }
    }
    let g = open("gemma2.q8_0.gguf");
    // An offset is undone in f32, so shifted norms are served as f32.
    assert_eq!(
        g.meta("model.layers.0.pre_feedforward_layernorm.weight")
            .unwrap()
            .dtype,
        Dtype::F32
    );
}

#[test]
fn f32_files_hold_the_same_weights() {
    for v in VARIANTS {
        let g = open(&format!("{v}.gguf"));
        let want = reference_weights(v);
        assert_eq!(g.names().len(), want.len(), "{v}");
        for (name, q8) in &want {
            // The Q8_0 copy differs by its rounding only; a wrong permutation, offset or
            // name would differ by far more.
            let d = max_abs_diff(&stored_f32(&g, name), q8);
            assert!(d < 0.01, "{v} {name}: max |f32 - q8_0| {d}");
        }
    }
}

#[test]
fn rope_settings_tensors_are_config_not_weights() {
    for (v, raw) in [
        ("llama3", "rope_freqs.weight"),
        ("phi3", "rope_factors_long.weight"),
        ("phi3", "rope_factors_short.weight"),
    ] {
        let g = open(&format!("{v}.q8_0.gguf"));
        assert!(g.tensor_info(raw).is_some(), "{v} stores {raw}");
        assert!(!g.names().iter().any(|n| n.contains("rope")), "{v}");
    }
}

/// The keys every mapping derives exactly as the source config.json has them.
const SHARED_KEYS: [&str; 9] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
];

#[test]
fn configs_follow_the_source_models() {
    for v in VARIANTS {
        let ours = open(&format!("{v}.q8_0.gguf")).config().unwrap();
        let hf = source_config(v);
        for key in SHARED_KEYS {
            assert_eq!(ours[key], hf[key], "{v}: {key}");
        }
        if hf.get("head_dim").is_some() {
            assert_eq!(ours["head_dim"], hf["head_dim"], "{v}: head_dim");
        }
        let rope = &hf["rope_parameters"];
        assert_eq!(ours["rope_theta"], rope["rope_theta"], "{v}");
        let eps = ours["rms_norm_eps"].as_f64().unwrap();
        assert!((eps - 1e-5).abs() < 1e-12, "{v}: {eps}");
        // llama.cpp's converter drops Mistral's sliding window: the file is a Llama.
        let model_type = match v {
            "mistral" => "llama",
            _ => hf["model_type"].as_str().unwrap(),
        };
        assert_eq!(ours["model_type"], model_type, "{v}");
        match v {
            "llama3" => {
                assert_eq!(ours["attention_bias"], true);
                for k in [
                    "rope_type",
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                ] {
                    assert_eq!(ours["rope_scaling"][k], rope[k], "llama3 rope {k}");
                }
            }
            "mistral" => {
                assert_eq!(ours["architectures"][0], "LlamaForCausalLM");
                assert!(ours.get("sliding_window").is_none());
                assert_eq!(ours["rope_scaling"], serde_json::Value::Null);
            }
            "qwen3" => assert_eq!(ours["attention_bias"], false),
            "phi3" => {
                for k in ["partial_rotary_factor", "original_max_position_embeddings"] {
                    assert_eq!(ours[k], hf[k], "phi3 {k}");
                }
                for k in ["short_factor", "long_factor"] {
                    assert_eq!(ours["rope_scaling"][k], rope[k], "phi3 {k}");
                }
                assert_eq!(ours["rope_scaling"]["rope_type"], "longrope");
                assert_eq!(ours["sliding_window"], serde_json::Value::Null);
            }
            "gemma2" => {
                for k in [
                    "query_pre_attn_scalar",
                    "attn_logit_softcapping",
                    "final_logit_softcapping",
                    "sliding_window",
                    "layer_types",
                    "hidden_activation",
                ] {
                    assert_eq!(ours[k], hf[k], "gemma2 {k}");
                }
            }
            _ => {}
        }
        let class = match v {
            "mistral" => "LlamaForCausalLM",
            _ => hf["architectures"][0].as_str().unwrap(),
        };
        assert_eq!(ours["architectures"][0], class, "{v}");
    }
}

#[test]
fn a_sliding_window_in_llama_metadata_makes_a_mistral() {
    let g = open("mistral_swa.q8_0.gguf");
    let cfg = g.config().unwrap();
    assert_eq!(cfg["architectures"][0], "MistralForCausalLM");
    assert_eq!(cfg["model_type"], "mistral");
    assert_eq!(
        cfg["sliding_window"],
        source_config("mistral")["sliding_window"]
    );
    for (name, theirs) in reference_weights("mistral") {
        assert!(stored_f32(&g, &name).equal(&theirs), "{name}");
    }
}

/// A copy of fixture `file` in `dir` with the f32 tensor `raw` overwritten by `values`.
fn with_values(dir: &std::path::Path, file: &str, raw: &str, values: &[f32]) -> PathBuf {
    let mut bytes = std::fs::read(fixture(file)).unwrap();
    let t = open(file).tensor_info(raw).unwrap().clone();
    assert_eq!(t.nbytes, 4 * values.len());
    for (i, v) in values.iter().enumerate() {
        bytes[t.offset + 4 * i..t.offset + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    let p = dir.join(file);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn rope_settings_llama_cpp_cannot_mean_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |p: PathBuf| {
        GgufFile::open(&p)
            .unwrap()
            .config()
            .unwrap_err()
            .to_string()
    };
    // Every frequency divided by 4 is linear scaling, not Llama 3's rule.
    let e = err(with_values(
        tmp.path(),
        "llama3.q8_0.gguf",
        "rope_freqs.weight",
        &[4.0; 12],
    ));
    assert!(
        e.contains("llama3.q8_0.gguf") && e.contains("rope_freqs.weight") && e.contains("llama3"),
        "{e}"
    );
    let mut factors = [1.0f32; 4];
    factors[2] = f32::NAN;
    let e = err(with_values(
        tmp.path(),
        "phi3.q8_0.gguf",
        "rope_factors_long.weight",
        &factors,
    ));
    assert!(
        e.contains("phi3.q8_0.gguf")
            && e.contains("rope_factors_long.weight")
            && e.contains("finite"),
        "{e}"
    );
    // All ones: no scaling at all.
    let ones = with_values(
        tmp.path(),
        "llama3.q8_0.gguf",
        "rope_freqs.weight",
        &[1.0; 12],
    );
    let cfg = GgufFile::open(&ones).unwrap().config().unwrap();
    assert_eq!(cfg["rope_scaling"], serde_json::Value::Null);
}

#[test]
fn byte_level_tokenizers_come_from_the_metadata() {
    // llama.cpp's converter writes the BPE tokenizers of the Llama and Qwen files as "gpt2";
    // Phi-3's and Gemma 2's are SentencePiece ("llama").
    for v in ["llama3", "mistral", "qwen2", "qwen3"] {
        let g = open(&format!("{v}.q8_0.gguf"));
        let t = octet::tokenizer::Tokenizer::from_gguf(&g).unwrap();
        let ids = t.encode("The quick brown fox").unwrap();
        assert!(!ids.is_empty(), "{v}");
        assert_eq!(t.decode(&ids).unwrap(), "The quick brown fox", "{v}");
    }
    for v in ["phi3", "gemma2"] {
        let g = open(&format!("{v}.q8_0.gguf"));
        assert_eq!(
            g.get("tokenizer.ggml.model").and_then(|m| m.as_str()),
            Some("llama"),
            "{v}"
        );
    }
}

/// Each architecture's model, loaded straight from its GGUF files, gives transformers' logits
/// on the same weights: the Q8_0 file against gguf-py's de-quantization, the f32 file against
/// the source model, and the Mistral file with a window against the windowed model.
#[test]
fn models_load_from_gguf_and_match_transformers() {
    use octet::load::{load_model, LoadOptions};
    let r = common::load_safetensors(&fixture("reference.safetensors"));
    let mut cases: Vec<(String, String)> = Vec::new();
    for v in VARIANTS {
        cases.push((format!("{v}.q8_0.gguf"), format!("{v}.logits")));
        cases.push((format!("{v}.gguf"), format!("{v}.logits_f32")));
    }
    cases.push((
        "mistral_swa.q8_0.gguf".into(),
        "mistral.logits_sliding".into(),
    ));
    for (file, key) in cases {
        let v = key.split('.').next().unwrap();
        let m = load_model(&fixture(&file), &LoadOptions::default()).unwrap();
        let ids = &r[&format!("{v}.input_ids")];
        let ours = tch::no_grad(|| m.model.forward(ids).unwrap());
        let d = max_abs_diff(&ours, &r[&key]);
        eprintln!("{file}: max |logit diff| vs transformers {d:.2e}");
        assert!(d < 1e-4, "{file} vs {key}: {d}");
    }
}
