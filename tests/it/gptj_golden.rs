//! GPT-J forward against transformers (scripts/gen_tiny_gptj.py): float, 8-bit, every
//! checkpoint form.
use crate::common;
use crate::common::max_abs_diff;

use octet::load::{load_model, LoadOptions, QuantizeOptions};
use tch::{Kind, Tensor};

fn reference() -> std::collections::BTreeMap<String, Tensor> {
    common::load_safetensors(&common::fixture("tiny_gptj/reference.safetensors"))
}

fn logits_of(dir: &str, quantize: Option<QuantizeOptions>) -> Tensor {
    let r = reference();
    let opts = LoadOptions {
        quantize,
        ..Default::default()
    };
    let m = load_model(&common::fixture(dir), &opts).unwrap();
    tch::no_grad(|| m.model.forward(&r["input_ids"]).unwrap())
}

#[test]
fn f32_forward_matches_transformers_for_every_checkpoint_form() {
    let r = reference();
    for dir in [
        "tiny_gptj/hf_safetensors",
        "tiny_gptj/hf_bin",
        "tiny_gptj/hf_sharded_safetensors",
        "tiny_gptj/hf_sharded_bin",
    ] {
        let logits = logits_of(dir, None);
        assert_eq!(logits.size(), r["logits"].size());
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d < 1e-4, "{dir}: max |diff| {d}");
    }
}

#[test]
fn original_gptj_8bit_layout_loads_as_converted() {
    let r = reference();
    let m = load_model(
        &common::fixture("tiny_gptj/gptj8bit"),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(m.graph.nodes.iter().any(|n| n.kind == "Bnb8Embedding"));
    assert_eq!(
        m.graph
            .nodes
            .iter()
            .filter(|n| n.kind == "Bnb8Linear")
            .count(),
        13
    );
    let logits = tch::no_grad(|| m.model.forward(&r["input_ids"]).unwrap());
    let d = max_abs_diff(&logits, &r["logits_dequant_b4096"]);
    assert!(d < 1e-4, "max |diff| {d}");
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let r = reference();
    let opts = LoadOptions {
        kind: Kind::BFloat16,
        ..Default::default()
    };
    let m = load_model(&common::fixture("tiny_gptj/hf_safetensors"), &opts).unwrap();
    let logits = tch::no_grad(|| m.model.forward(&r["input_ids"]).unwrap());
    assert_eq!(logits.kind(), Kind::Float);
    let rel = max_abs_diff(&logits, &r["logits"]) / r["logits"].abs().max().double_value(&[]);
    assert!(rel < 0.05, "bf16 relative max diff {rel}");
}
