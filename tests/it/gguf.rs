//! GGUF input (scripts/gen_tiny_llama.py writes the files with the `gguf` package): de-quantized
//! tensors against gguf's own de-quantizer, logits against transformers on the same weights,
//! config and tokenizer from the metadata, conversion to a self-contained octet folder.
use crate::common;
use crate::common::{convert, max_abs_diff};

use octet::io::gguf::{GgufFile, GgufValue};
use octet::io::{Dtype, TensorStore};
use octet::load::{load_model, LoadOptions};
use octet::source::read_config;
use octet::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn tiny(rel: &str) -> PathBuf {
    common::fixture(&format!("tiny_llama/{rel}"))
}

fn gguf_reference() -> std::collections::BTreeMap<String, Tensor> {
    common::load_safetensors(&tiny("gguf_reference.safetensors"))
}

fn input_ids() -> Tensor {
    common::load_safetensors(&tiny("reference.safetensors"))["input_ids"].shallow_clone()
}

fn stored_f32(store: &dyn TensorStore, name: &str) -> Tensor {
    let meta = store.meta(name).unwrap();
    let bytes = store.bytes(name).unwrap();
    octet::io::dtype::tensor_from_bytes(meta.dtype, &meta.shape, &bytes)
        .unwrap()
        .to_kind(Kind::Float)
}

#[test]
fn dequantized_tensors_equal_gguf_py_exactly() {
    let r = gguf_reference();
    for v in ["tied", "bias"] {
        let g = GgufFile::open(&tiny(&format!("{v}.gguf"))).unwrap();
        assert_eq!(g.version(), 3);
        let names = g.names();
        let want: Vec<&String> = r
            .keys()
            .filter(|k| k.starts_with(&format!("{v}.")))
            .collect();
        assert_eq!(names.len(), want.len(), "{v}: {names:?}");
        for name in &names {
            let ours = stored_f32(&g, name);
            let theirs = &r[&format!("{v}.{name}")];
            assert_eq!(ours.size(), theirs.size(), "{v} {name}");
            // Bit-identical, not merely close.
            assert!(
                ours.equal(theirs),
                "{v} {name}: max |diff| {}",
                max_abs_diff(&ours, theirs)
            );
            // The f32 read (de-quantized straight into f32, permuted while quantized) agrees.
            let values = Tensor::from_slice(&g.f32_values(name).unwrap());
            assert!(values.equal(&ours.flatten(0, -1)), "{v} {name}: f32_values");
        }
        // Quantized types are served as f32, float types as stored.
        let m = |n: &str| g.meta(n).unwrap().dtype;
        assert_eq!(m("model.embed_tokens.weight"), Dtype::F32);
        assert_eq!(m("model.layers.0.self_attn.v_proj.weight"), Dtype::F16);
        assert_eq!(m("model.layers.0.mlp.down_proj.weight"), Dtype::BF16);
    }
    let g = GgufFile::open(&tiny("bias.gguf")).unwrap();
    assert_eq!(g.alignment(), 64);
    assert!(g
        .names()
        .contains(&"model.layers.1.self_attn.k_proj.bias".to_string()));
}

#[test]
fn logits_match_transformers_on_the_same_weights() {
    let r = gguf_reference();
    for v in ["tied", "bias"] {
        let m = load_model(&tiny(&format!("{v}.gguf")), &LoadOptions::default()).unwrap();
        assert_eq!(m.arch.name(), "llama");
        let logits = tch::no_grad(|| m.model.forward(&input_ids()).unwrap());
        let d = max_abs_diff(&logits, &r[&format!("logits_{v}")]);
        assert!(d < 1e-4, "{v}: max |diff| {d}");
    }
}

#[test]
fn config_comes_from_the_metadata() {
    for v in ["tied", "bias"] {
        let ours = read_config(&tiny(&format!("{v}.gguf"))).unwrap();
        let text = std::fs::read_to_string(tiny(&format!("{v}/config.json"))).unwrap();
        let hf: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "architectures",
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "attention_bias",
            "mlp_bias",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
        ] {
            assert_eq!(ours[key], hf[key], "{v}: {key}");
        }
        assert_eq!(ours["rope_theta"], hf["rope_parameters"]["rope_theta"]);
        let eps = ours["rms_norm_eps"].as_f64().unwrap();
        assert!((eps - 1e-5).abs() < 1e-12, "{eps}");
    }
    let g = GgufFile::open(&tiny("tied.gguf")).unwrap();
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(
        g.get("general.name"),
        Some(&GgufValue::Str("tiny llama".into()))
    );
    let tokens = g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(tokens.len(), 301);
}

#[test]
fn tokenizer_comes_from_the_metadata() {
    let r = gguf_reference();
    let text = "<|im_start|>The 2 foxes ran 1234 miles; the dog didn't.<|im_end|> héllo\n\n  x";
    for v in ["tied", "bias"] {
        let t =
            Tokenizer::from_gguf(&GgufFile::open(&tiny(&format!("{v}.gguf"))).unwrap()).unwrap();
        let ids = t.encode(text).unwrap();
        let want: Vec<i64> = Vec::try_from(&r[&format!("tokens_{v}")]).unwrap();
        let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ids64, want, "{v}");
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert_eq!(t.eos_id(), Some(2));
        assert_eq!(t.vocab_size(), 301);
    }
}

#[test]
fn converting_a_gguf_gives_a_self_contained_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let ids_file = tmp.path().join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", &input_ids())], &ids_file).unwrap();
    let gguf = tiny("tied.gguf");
    let out = tmp.path().join("octet");
    let (ok, _, stderr) = convert(&gguf, &out, &["--block-size", "64"]);
    assert!(ok, "{stderr}");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "octet.toml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let manifest = std::fs::read_to_string(out.join("octet.toml")).unwrap();
    assert!(manifest.contains("tied.gguf") && manifest.contains("arch = \"llama\""));
    // The written tokenizer is the one the metadata describes.
    let from_dir = Tokenizer::from_dir(&out).unwrap();
    let from_gguf = Tokenizer::from_gguf(&GgufFile::open(&gguf).unwrap()).unwrap();
    let text = "Stratford 1564: <|im_start|>hello<|im_end|>";
    assert_eq!(
        from_dir.encode(text).unwrap(),
        from_gguf.encode(text).unwrap()
    );
    // The metadata's EOS / BOS (<|im_end|> 2, <|im_start|> 1) survive the conversion, though
    // the vocabulary starts with <|endoftext|>, which a guess from the vocabulary would pick.
    assert_eq!((from_gguf.eos_id(), from_gguf.bos_id()), (Some(2), Some(1)));
    assert_eq!((from_dir.eos_id(), from_dir.bos_id()), (Some(2), Some(1)));

    let m = load_model(&out, &LoadOptions::default()).unwrap();
    assert_eq!(
        m.graph.node("model.embed_tokens").unwrap().kind,
        "Bnb8Embedding"
    );
    let ours = tch::no_grad(|| m.model.forward(&input_ids()).unwrap());
    let hf = tmp.path().join("hf");
    octet::export::export_hf(&out, &hf, Kind::Float, false, |_, _| Ok(())).unwrap();
    let ref_file = tmp.path().join("ref.safetensors");
    common::run_script(
        "hf_logits.py",
        &[hf.as_os_str(), ids_file.as_os_str(), ref_file.as_os_str()],
    );
    let d = max_abs_diff(&ours, &common::load_safetensors(&ref_file)["logits"]);
    assert!(d < 1e-4, "max |diff| {d}");
}

#[test]
fn quantizing_on_load_equals_converting() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("octet");
    let flags = common::nearest_dynamic(&["--block-size", "64"]);
    assert!(convert(&tiny("bias.gguf"), &out, &flags).0);
    let opts = LoadOptions {
        quantize: Some(octet::load::QuantizeOptions {
            block: Some(octet::quant::BlockSize::new(64).unwrap()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let on_load = load_model(&tiny("bias.gguf"), &opts).unwrap();
    let converted = load_model(&out, &LoadOptions::default()).unwrap();
    let (a, b) = tch::no_grad(|| {
        (
            on_load.model.forward(&input_ids()).unwrap(),
            converted.model.forward(&input_ids()).unwrap(),
        )
    });
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn version_2_files_read_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("v2.gguf");
    let mut bytes = std::fs::read(tiny("tied.gguf")).unwrap();
    // v2 and v3 share the little-endian layout; only the version field differs.
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.version(), 2);
    let l2 = tch::no_grad(|| {
        load_model(&p, &LoadOptions::default())
            .unwrap()
            .model
            .forward(&input_ids())
            .unwrap()
    });
    let d = max_abs_diff(&l2, &gguf_reference()["logits_tied"]);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn inspect_snapshot() {
    let (ok, text, stderr) = common::octet(&["inspect", tiny("bias.gguf").to_str().unwrap()]);
    assert!(ok, "{stderr}");
    insta::assert_snapshot!("inspect_tiny_llama_gguf", text);
}

#[test]
fn bad_files_are_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |p: &Path| GgufFile::open(p).unwrap_err().to_string();

    let e = err(&common::fixture("ggml_vectors/bad_iq2_xxs.gguf"));
    assert!(
        e.contains("token_embd.weight") && e.contains("IQ2_XXS"),
        "{e}"
    );

    let bytes = std::fs::read(tiny("tied.gguf")).unwrap();
    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let e = err(&truncated);
    assert!(
        e.contains("truncated.gguf") && e.contains("past the end"),
        "{e}"
    );

    // Cut inside the metadata: the reader must stop at the end, not trust the lengths.
    for cut in [200, 3000] {
        let header_only = tmp.path().join("header.gguf");
        std::fs::write(&header_only, &bytes[..cut]).unwrap();
        let e = err(&header_only);
        assert!(
            e.contains("header.gguf") && (e.contains("truncated") || e.contains("exceeds")),
            "{e}"
        );
    }

    let big_endian = tmp.path().join("be.gguf");
    let mut be = bytes.clone();
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    std::fs::write(&big_endian, &be).unwrap();
    assert!(err(&big_endian).contains("big-endian"));

    let not_gguf = tmp.path().join("x.gguf");
    std::fs::write(&not_gguf, b"GGML\x01\0\0\0").unwrap();
    assert!(err(&not_gguf).contains("magic"));

    // Conversion of a refused file leaves nothing behind.
    let out = tmp.path().join("out");
    let (ok, _, stderr) = convert(&truncated, &out, &[]);
    assert!(!ok && stderr.contains("truncated.gguf"), "{stderr}");
    assert!(!out.exists());
}
