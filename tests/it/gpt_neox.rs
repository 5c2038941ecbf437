//! The GPT-NeoX plugin against transformers (scripts/gen_tiny_gpt2_neox.py): both config
//! forms, parallel and sequential residuals, 8-bit, cached decoding, `octet inspect`, and a
//! trained adapter that Hugging Face peft loads.
use crate::common;
use crate::common::{cached_logits, convert, hf_logits, ids_file, max_abs_diff};

use octet::load::{load_model, LoadOptions, QuantizeOptions};

use std::path::PathBuf;
use tch::{Kind, Tensor};

fn tiny(dir: &str) -> PathBuf {
    common::fixture(&format!("tiny_gpt_neox/{dir}"))
}

fn reference() -> std::collections::BTreeMap<String, Tensor> {
    common::load_safetensors(&tiny("reference.safetensors"))
}

#[test]
fn f32_forward_matches_transformers_for_both_config_forms_and_residual_styles() {
    let r = reference();
    for (dir, want) in [
        ("hf_safetensors", "logits"),
        ("hf_bin", "logits"),
        ("hf_sequential", "logits_sequential"),
    ] {
        let m = load_model(&tiny(dir), &LoadOptions::default()).unwrap();
        assert_eq!(m.arch.name(), "gpt_neox");
        let l = tch::no_grad(|| m.model.forward(&r["input_ids"]).unwrap());
        assert_eq!(l.size(), r[want].size());
        let d = max_abs_diff(&l, &r[want]);
        assert!(d < 1e-4, "{dir}: max |diff| {d}");
    }
}

#[test]
fn a_head_stored_as_lm_head_is_read_like_embed_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("renamed");
    common::copy_dir(&tiny("hf_safetensors"), &dir);
    let tensors: Vec<(String, Tensor)> = common::load_safetensors(&dir.join("model.safetensors"))
        .into_iter()
        .map(|(n, t)| (n.replace("embed_out.", "lm_head."), t))
        .collect();
    octet::io::safetensors::save_tensors(&dir.join("model.safetensors"), &tensors, &[]).unwrap();
    let mut m = load_model(&dir, &LoadOptions::default()).unwrap();
    let r = reference();
    let l = tch::no_grad(|| m.model.forward(&r["input_ids"]).unwrap());
    let d = max_abs_diff(&l, &r["logits"]);
    assert!(d < 1e-4, "max |diff| {d}");
    let mut paths = Vec::new();
    m.model.visit_layers(&mut |p, _| paths.push(p.to_string()));
    assert_eq!(paths.last().map(String::as_str), Some("lm_head"));
}

#[test]
fn rotary_settings_are_read_from_either_config_form() {
    let read = |dir: &str| {
        let cfg = octet::source::read_config(&tiny(dir)).unwrap();
        octet::archs::gpt_neox::GptNeoxConfig::from_json(&cfg).unwrap()
    };
    for dir in ["hf_safetensors", "hf_bin"] {
        let c = read(dir);
        assert_eq!((c.rotary_dims(), c.rotary_base()), (4, 5000.0), "{dir}");
    }
    let odd = serde_json::json!({"hidden_size": 48, "num_attention_heads": 4, "rotary_pct": 0.25});
    let err = octet::archs::gpt_neox::GptNeoxConfig::from_json(&odd)
        .expect_err("3 rotated dimensions cannot be paired")
        .to_string();
    assert!(err.contains("even"), "{err}");
}

#[test]
fn converted_8bit_matches_transformers_on_the_same_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ids_file(tmp.path(), &reference()["input_ids"]);
    for block in ["4096", "64"] {
        let out = tmp.path().join(format!("octet-{block}"));
        let (ok, _, stderr) = convert(&tiny("hf_safetensors"), &out, &["--block-size", block]);
        assert!(ok, "{stderr}");
        let m = load_model(&out, &LoadOptions::default()).unwrap();
        let kinds = |k: &str| m.graph.nodes.iter().filter(|n| n.kind == k).count();
        assert_eq!((kinds("Bnb8Linear"), kinds("Bnb8Embedding")), (9, 1));
        let ours = tch::no_grad(|| m.model.forward(&reference()["input_ids"]).unwrap());
        let hf = tmp.path().join(format!("hf-{block}"));
        octet::export::export_hf(&out, &hf, Kind::Float, false, |_, _| Ok(())).unwrap();
        let theirs = hf_logits(
            &hf,
            &ids,
            &tmp.path().join(format!("ref-{block}.safetensors")),
            None,
        );
        let d = max_abs_diff(&ours, &theirs);
        assert!(d < 1e-4, "block {block}: max |diff| {d}");
    }
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    let r = reference();
    for dir in ["hf_safetensors", "hf_sequential"] {
        let opts = LoadOptions {
            quantize: Some(QuantizeOptions::default()),
            ..Default::default()
        };
        let m = load_model(&tiny(dir), &opts).unwrap();
        let (full, cached) = tch::no_grad(|| {
            (
                m.model.forward(&r["input_ids"]).unwrap(),
                cached_logits(m.model.as_ref(), &r["input_ids"], 6),
            )
        });
        let d = max_abs_diff(&full, &cached);
        assert!(d < 1e-4, "{dir}: cached vs full max |diff| {d}");
    }
}

#[test]
fn inspect_snapshot_of_the_converted_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("octet");
    assert!(convert(&tiny("hf_safetensors"), &out, &[]).0);
    let (ok, text, err) = common::octet(&["inspect", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    insta::assert_snapshot!("inspect_tiny_gpt_neox_converted", text);
    let (ok, text, err) = common::octet(&["inspect", tiny("hf_bin").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        !text.contains("inv_freq") && !text.contains("masked_bias"),
        "{text}"
    );
}

#[test]
fn trained_adapter_loads_in_peft_with_matching_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let base8 = t.join("base8");
    assert!(convert(&tiny("hf_safetensors"), &base8, &["--block-size", "64"]).0);
    let hf = t.join("hf");
    octet::export::export_hf(&base8, &hf, Kind::Float, false, |_, _| Ok(())).unwrap();
    let data = t.join("data.txt");
    std::fs::write(
        &data,
        "pack my box with five dozen liquor jugs. ".repeat(100),
    )
    .unwrap();
    let run = t.join("run");
    let (ok, _, err) = common::octet(&[
        "train",
        "--model",
        base8.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "10",
        "--seq-len",
        "32",
        "--lr",
        "5e-3",
        "--lora-r",
        "4",
        "--targets",
        "query_key_value,dense,dense_h_to_4h,embed_in",
    ]);
    assert!(ok, "{err}");
    let cfg = std::fs::read_to_string(run.join("adapter_config.json")).unwrap();
    assert!(cfg.contains("\"fan_in_fan_out\": false"), "{cfg}");
    let ids = &reference()["input_ids"];
    let mut m = load_model(&base8, &LoadOptions::default()).unwrap();
    octet::peft::load_adapter(m.model.as_mut(), &run).unwrap();
    let ours = tch::no_grad(|| m.model.forward(ids).unwrap());
    let theirs = hf_logits(
        &hf,
        &ids_file(t, &reference()["input_ids"]),
        &t.join("peft.safetensors"),
        Some(&run),
    );
    let d = max_abs_diff(&ours, &theirs);
    assert!(d < 1e-4, "octet vs peft max |diff| {d}");
}
