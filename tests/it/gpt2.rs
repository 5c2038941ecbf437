//! The GPT-2 plugin against transformers (scripts/gen_tiny_gpt2_neox.py): float and 8-bit
//! forward passes, the plugin's own Conv1D kinds, cached decoding, `octet inspect`, and LoRA
//! training whose adapter Hugging Face peft loads.
use crate::common;
use crate::common::{cached_logits, convert, hf_logits, ids_file, max_abs_diff};

use octet::load::{load_model, LoadOptions, QuantizeOptions};

use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn tiny(dir: &str) -> PathBuf {
    common::fixture(&format!("tiny_gpt2/{dir}"))
}

fn reference() -> std::collections::BTreeMap<String, Tensor> {
    common::load_safetensors(&tiny("reference.safetensors"))
}

fn logits(dir: &Path, opts: &LoadOptions) -> Tensor {
    let m = load_model(dir, opts).unwrap();
    tch::no_grad(|| m.model.forward(&reference()["input_ids"]).unwrap())
}

#[test]
fn f32_forward_matches_transformers() {
    let r = reference();
    for dir in ["hf_safetensors", "hf_bin"] {
        let m = load_model(&tiny(dir), &LoadOptions::default()).unwrap();
        assert_eq!(m.arch.name(), "gpt2");
        assert_eq!(
            m.graph.node("transformer.h.0.attn.c_attn").unwrap().kind,
            "Conv1D"
        );
        let l = tch::no_grad(|| m.model.forward(&r["input_ids"]).unwrap());
        assert_eq!(l.size(), r["logits"].size());
        let d = max_abs_diff(&l, &r["logits"]);
        assert!(d < 1e-4, "{dir}: max |diff| {d}");
    }
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
        assert_eq!(kinds("Bnb8Conv1D"), 8);
        assert_eq!(kinds("Bnb8Embedding"), 1, "only wte is quantized");
        assert_eq!(m.graph.node("transformer.wpe").unwrap().kind, "Embedding");
        // The 8-bit bytes keep the checkpoint's [in, out] layout.
        let w = m.graph.node("transformer.h.1.mlp.c_fc").unwrap();
        assert_eq!(w.param("weight").unwrap().shape, [48, 192]);
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
        let q = max_abs_diff(&ours, &reference()["logits"]);
        assert!(q > 1e-4, "block {block}: quantization changed nothing");
    }
}

#[test]
fn quantizing_on_load_equals_converting() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("octet");
    let flags = common::nearest_dynamic(&["--block-size", "64"]);
    assert!(convert(&tiny("hf_safetensors"), &out, &flags).0);
    let on_load = LoadOptions {
        quantize: Some(QuantizeOptions {
            block: Some(octet::quant::BlockSize::new(64).unwrap()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let a = logits(&tiny("hf_safetensors"), &on_load);
    let b = logits(&out, &LoadOptions::default());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn cached_decoding_sees_the_right_positions() {
    let r = reference();
    for quantize in [None, Some(QuantizeOptions::default())] {
        let opts = LoadOptions {
            quantize,
            ..Default::default()
        };
        let m = load_model(&tiny("hf_safetensors"), &opts).unwrap();
        let (full, cached) = tch::no_grad(|| {
            (
                m.model.forward(&r["input_ids"]).unwrap(),
                cached_logits(m.model.as_ref(), &r["input_ids"], 5),
            )
        });
        let d = max_abs_diff(&full, &cached);
        assert!(d < 1e-4, "cached vs full: max |diff| {d}");
    }
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let r = reference();
    let opts = LoadOptions {
        kind: Kind::BFloat16,
        ..Default::default()
    };
    let l = logits(&tiny("hf_safetensors"), &opts);
    assert_eq!(l.kind(), Kind::Float);
    let rel = max_abs_diff(&l, &r["logits"]) / r["logits"].abs().max().double_value(&[]);
    assert!(rel < 0.05, "bf16 relative max diff {rel}");
}

#[test]
fn inspect_snapshot_of_the_converted_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("octet");
    assert!(convert(&tiny("hf_safetensors"), &out, &[]).0);
    let (ok, text, err) = common::octet(&["inspect", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    insta::assert_snapshot!("inspect_tiny_gpt2_converted", text);
    // The old mask buffers are skipped, not reported as unknown modules.
    let (ok, text, err) = common::octet(&["inspect", tiny("hf_bin").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        text.contains("Conv1D") && !text.contains("masked_bias"),
        "{text}"
    );
}

#[test]
fn archs_lists_gpt2_and_its_layer_kinds() {
    let (ok, text, err) = common::octet(&["archs"]);
    assert!(ok, "{err}");
    assert!(
        text.contains("GPT2LMHeadModel") && text.contains("c_attn"),
        "{text}"
    );
    assert!(
        text.contains("Bnb8Conv1D") && text.contains(", Conv1D"),
        "{text}"
    );
}

#[test]
fn a_transposed_conv1d_weight_is_refused_naming_the_module() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    common::copy_dir(&tiny("hf_safetensors"), &bad);
    let mut tensors: Vec<(String, Tensor)> =
        common::load_safetensors(&bad.join("model.safetensors"))
            .into_iter()
            .collect();
    for (name, t) in tensors.iter_mut() {
        if name == "transformer.h.1.mlp.c_fc.weight" {
            *t = t.tr().contiguous();
        }
    }
    octet::io::safetensors::save_tensors(&bad.join("model.safetensors"), &tensors, &[]).unwrap();
    let (ok, _, err) = convert(&bad, &tmp.path().join("out"), &[]);
    assert!(!ok && err.contains("transformer.h.1.mlp.c_fc"), "{err}");
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
        "the quick brown fox jumps over the lazy dog. ".repeat(120),
    )
    .unwrap();
    let run = t.join("run");
    let (ok, _, err) = common::octet(&[
        "train",
        "--arch",
        "gpt2",
        "--model",
        base8.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "30",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--lora-r",
        "4",
        "--lora-alpha",
        "16",
        "--targets",
        "c_attn,c_proj,c_fc",
    ]);
    assert!(ok, "{err}");
    let losses: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 30);
    assert!(
        losses[29] < 0.7 * losses[0],
        "loss did not fall: {} -> {}",
        losses[0],
        losses[29]
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["fan_in_fan_out"], true, "{cfg}");
    let saved = common::load_safetensors(&run.join("adapter_model.safetensors"));
    // PEFT's Conv1D shapes: lora_A [r, in], lora_B [out, r].
    let a = &saved["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"];
    let b = &saved["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"];
    assert_eq!((a.size(), b.size()), (vec![4, 48], vec![144, 4]));

    let ids = &reference()["input_ids"];
    let mut m = load_model(&base8, &LoadOptions::default()).unwrap();
    let before = tch::no_grad(|| m.model.forward(ids).unwrap());
    octet::peft::load_adapter(m.model.as_mut(), &run).unwrap();
    let ours = tch::no_grad(|| m.model.forward(ids).unwrap());
    assert!(
        max_abs_diff(&ours, &before) > 1e-3,
        "the trained adapter changes nothing"
    );
    let theirs = hf_logits(
        &hf,
        &ids_file(t, &reference()["input_ids"]),
        &t.join("peft.safetensors"),
        Some(&run),
    );
    let d = max_abs_diff(&ours, &theirs);
    assert!(d < 1e-4, "octet vs peft max |diff| {d}");
}
