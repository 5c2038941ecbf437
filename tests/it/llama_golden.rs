//! Llama forward against transformers (scripts/gen_tiny_llama.py): tied and untied heads, GQA,
//! biases with a custom head_dim, the KV cache, 8-bit conversion, and `inspect` snapshots.
use crate::common;
use crate::common::{convert_ok, max_abs_diff};

use octet::load::{load_model, LoadOptions};
use octet::model::LayerCache;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

const VARIANTS: [&str; 3] = ["tied", "untied", "bias"];

fn tiny(rel: &str) -> PathBuf {
    common::fixture(&format!("tiny_llama/{rel}"))
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
    for v in VARIANTS {
        let l = logits(&tiny(v), &LoadOptions::default());
        let want = &r[&format!("logits_{v}")];
        assert_eq!(l.size(), want.size());
        let d = max_abs_diff(&l, want);
        assert!(d < 1e-4, "{v}: max |diff| {d}");
    }
}

#[test]
fn kv_cache_gives_the_same_logits_as_the_full_pass() {
    let r = reference();
    let ids = &r["input_ids"];
    for v in ["tied", "bias"] {
        let m = load_model(&tiny(v), &LoadOptions::default()).unwrap();
        let full = tch::no_grad(|| m.model.forward(ids).unwrap());
        let n = m.model.info().blocks;
        let mut caches: Vec<LayerCache> = (0..n).map(|_| LayerCache::default()).collect();
        let mut steps = Vec::new();
        // A 5-token prompt, then one token at a time.
        let mut start = 0;
        for len in [5, 1, 1, 3, 1, 1, 1] {
            let chunk = ids.narrow(1, start, len);
            let out = tch::no_grad(|| {
                let mut h = m.model.embed(&chunk).unwrap();
                for (i, c) in caches.iter_mut().enumerate() {
                    h = m.model.block(i, &h, Some(c)).unwrap();
                }
                m.model.head(&h).unwrap()
            });
            steps.push(out);
            start += len;
        }
        assert_eq!(caches[0].len(), start);
        // Cached keys keep the kv-head count (grouped-query attention).
        assert_eq!(caches[0].k.as_ref().unwrap().size()[1], 2);
        let cached = Tensor::cat(&steps, 1);
        let d = max_abs_diff(&cached, &full.narrow(1, 0, start));
        assert!(d < 1e-4, "{v}: max |diff| {d}");
    }
}

#[test]
fn eight_bit_models_match_transformers_on_the_same_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let ids_file = tmp.path().join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", &reference()["input_ids"])], &ids_file).unwrap();
    for v in ["tied", "bias"] {
        let out = tmp.path().join(format!("octet-{v}"));
        convert_ok(&tiny(v), &out, &["--block-size", "64"]);
        let m = load_model(&out, &LoadOptions::default()).unwrap();
        assert_eq!(
            m.graph.node("model.embed_tokens").unwrap().kind,
            "Bnb8Embedding"
        );
        assert_eq!(m.graph.node("lm_head").is_some(), v != "tied");
        let ours = tch::no_grad(|| m.model.forward(&reference()["input_ids"]).unwrap());
        let hf = tmp.path().join(format!("hf-{v}"));
        octet::export::export_hf(&out, &hf, Kind::Float, false, |_, _| Ok(())).unwrap();
        let ref_file = tmp.path().join(format!("ref-{v}.safetensors"));
        common::run_script(
            "hf_logits.py",
            &[hf.as_os_str(), ids_file.as_os_str(), ref_file.as_os_str()],
        );
        let want = &common::load_safetensors(&ref_file)["logits"];
        let d = max_abs_diff(&ours, want);
        assert!(d < 1e-4, "{v}: max |diff| {d}");
        // 8-bit is close to, but not the same as, the f32 model.
        let f32_diff = max_abs_diff(&ours, &reference()[&format!("logits_{v}")]);
        assert!(f32_diff > 0.0 && f32_diff < 1.0, "{v}: {f32_diff}");
    }
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let r = reference();
    let opts = LoadOptions {
        kind: Kind::BFloat16,
        ..Default::default()
    };
    let l = logits(&tiny("untied"), &opts);
    assert_eq!(l.kind(), Kind::Float);
    let want = &r["logits_untied"];
    let rel = max_abs_diff(&l, want) / want.abs().max().double_value(&[]);
    assert!(rel < 0.05, "bf16 relative max diff {rel}");
}

#[test]
fn unsupported_configs_and_mismatched_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str); 3] = [
        (
            "\"rope_parameters\": {",
            "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 2.0},\n  \"rope_parameters\": null, \"x\": {",
            "yarn",
        ),
        (
            "\"attention_bias\": false",
            "\"attention_bias\": true",
            "attention_bias",
        ),
        (
            "\"tie_word_embeddings\": true",
            "\"tie_word_embeddings\": false",
            "lm_head",
        ),
    ];
    for (i, (from, to, needle)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        common::copy_dir(&tiny("tied"), &dir);
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(cfg.contains(from), "{from}");
        std::fs::write(dir.join("config.json"), cfg.replace(from, to)).unwrap();
        let err = match load_model(&dir, &LoadOptions::default()) {
            Ok(_) => panic!("case {i} should be refused"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "case {i}: {err}");
    }
}

#[test]
fn lora_targets_and_tied_head_with_adapters() {
    let mut m = load_model(&tiny("tied"), &LoadOptions::default()).unwrap();
    let spec = m.arch.spec();
    assert_eq!(spec.lora_targets, ["q_proj", "v_proj"]);
    let mut paths = Vec::new();
    m.model.visit_layers(&mut |p, _| paths.push(p.to_string()));
    assert!(paths.contains(&"model.layers.1.self_attn.q_proj".to_string()));
    assert!(
        !paths.contains(&"lm_head".to_string()),
        "tied: no separate head"
    );
    let mut norms = Vec::new();
    m.model.visit_norms(&mut |p, _| norms.push(p.to_string()));
    assert_eq!(norms.len(), 5);
}

/// Gradients of every trainable tensor after one forward/backward.
fn grads(checkpointing: bool) -> Vec<(String, Tensor)> {
    let opts = LoadOptions {
        quantize: Some(octet::load::QuantizeOptions {
            block: Some(octet::quant::BlockSize::new(64).unwrap()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut m = load_model(&tiny("tied"), &opts).unwrap();
    let _rng = common::global_rng();
    tch::manual_seed(0);
    let targets = octet::peft::Targets::parse("q_proj,v_proj,embed_tokens").unwrap();
    let cfg = octet::nn::LoraConfig::default();
    let wrapped = octet::peft::attach_lora(m.model.as_mut(), &targets, cfg).unwrap();
    assert_eq!(wrapped.len(), 5);
    octet::peft::train_extras(m.model.as_mut(), true, false);
    let ids = reference()["input_ids"].shallow_clone();
    let loss = octet::train::step::forward_backward(
        m.model.as_ref(),
        &ids,
        &ids,
        1.0,
        checkpointing,
        0,
        0,
    )
    .unwrap();
    assert!(loss.is_finite());
    octet::peft::trainable_tensors(m.model.as_mut())
        .into_iter()
        .map(|(n, t)| (n, t.grad().copy()))
        .collect()
}

#[test]
fn lora_training_step_through_the_8bit_tied_head() {
    let plain = grads(false);
    let checkpointed = grads(true);
    assert_eq!(plain.len(), 5 * 2 + 5, "adapters (A, B) and norm scales");
    for ((n, a), (_, b)) in plain.iter().zip(&checkpointed) {
        assert!(a.defined(), "{n} has no gradient");
        let d = max_abs_diff(a, b);
        assert!(d < 1e-5, "{n}: checkpointed gradient differs by {d}");
    }
    // B starts at zero, so its gradient is what moves first; norms get gradients too.
    for (n, g) in &plain {
        if n.ends_with("lora_B.weight") || n.ends_with("norm.weight") {
            assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{n}");
        }
    }
}

#[test]
fn inspect_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("octet");
    convert_ok(&tiny("tied"), &out, &[]);
    let (ok, hf, stderr) = common::octet(&["inspect", tiny("untied").to_str().unwrap()]);
    assert!(ok, "{stderr}");
    insta::assert_snapshot!("inspect_tiny_llama_hf", hf);
    let (ok, converted, stderr) = common::octet(&["inspect", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    insta::assert_snapshot!("inspect_tiny_llama_converted", converted);
}
