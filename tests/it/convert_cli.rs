//! `octet convert` / `inspect` end to end: outputs against transformers, snapshots of the
//! module graph, and bad inputs.
use crate::common;
use crate::common::{convert, max_abs_diff};

use octet::load::{load_model, LoadOptions};
use std::path::Path;
use tch::Tensor;

fn tiny(dir: &str) -> std::path::PathBuf {
    common::fixture(&format!("tiny_gptj/{dir}"))
}

fn logits(dir: &Path) -> Tensor {
    let ids = &common::load_safetensors(&tiny("reference.safetensors"))["input_ids"];
    let m = load_model(dir, &LoadOptions::default()).unwrap();
    tch::no_grad(|| m.model.forward(ids).unwrap())
}

#[test]
fn converted_model_matches_transformers_on_the_same_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    for block in ["4096", "64"] {
        let out = tmp.path().join(format!("octet-{block}"));
        let (ok, stdout, stderr) = convert(&tiny("hf_safetensors"), &out, &["--block-size", block]);
        assert!(ok, "{stderr}");
        assert!(
            stdout.contains("quantized") && stdout.contains("14"),
            "{stdout}"
        );
        let ours = logits(&out);
        // transformers runs on exactly the weights octet de-quantizes.
        let hf = tmp.path().join(format!("hf-{block}"));
        octet::export::export_hf(&out, &hf, tch::Kind::Float, false, |_, _| Ok(())).unwrap();
        let ids_file = tmp.path().join("ids.safetensors");
        let ids =
            common::load_safetensors(&tiny("reference.safetensors"))["input_ids"].shallow_clone();
        Tensor::write_safetensors(&[("input_ids", &ids)], &ids_file).unwrap();
        let ref_file = tmp.path().join(format!("ref-{block}.safetensors"));
        common::run_script(
            "hf_logits.py",
            &[hf.as_os_str(), ids_file.as_os_str(), ref_file.as_os_str()],
        );
        let reference = &common::load_safetensors(&ref_file)["logits"];
        let d = max_abs_diff(&ours, reference);
        assert!(d < 1e-4, "block {block}: max |diff| {d}");
    }
}

#[test]
fn quantizing_on_load_equals_converting() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("octet");
    let flags = common::nearest_dynamic(&["--block-size", "64"]);
    assert!(convert(&tiny("hf_safetensors"), &out, &flags).0);
    let opts = LoadOptions {
        quantize: Some(octet::load::QuantizeOptions {
            block: Some(octet::quant::BlockSize::new(64).unwrap()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let ids = &common::load_safetensors(&tiny("reference.safetensors"))["input_ids"];
    let m = load_model(&tiny("hf_safetensors"), &opts).unwrap();
    let on_load = tch::no_grad(|| m.model.forward(ids).unwrap());
    assert_eq!(max_abs_diff(&on_load, &logits(&out)), 0.0);
}

#[test]
fn bin_and_safetensors_sources_convert_to_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut weights = Vec::new();
    for src in [
        "hf_safetensors",
        "hf_bin",
        "hf_sharded_bin",
        "hf_sharded_safetensors",
    ] {
        let out = tmp.path().join(src);
        // Not every source folder has a tokenizer to calibrate with.
        let (ok, _, stderr) = convert(&tiny(src), &out, &["--calibrate", "none"]);
        assert!(ok, "{src}: {stderr}");
        weights.push((
            src,
            std::fs::read(out.join("model.safetensors")).unwrap(),
            logits(&out),
        ));
        let manifest = std::fs::read_to_string(out.join("octet.toml")).unwrap();
        assert!(
            manifest.contains("sha256")
                && manifest.contains("rel_mse")
                && manifest.contains("arch = \"gptj\"")
        );
        assert!(out.join("config.json").exists());
    }
    for (src, bytes, l) in &weights[1..] {
        assert!(
            bytes == &weights[0].1,
            "{src}: model.safetensors differs from the safetensors source's"
        );
        assert_eq!(max_abs_diff(l, &weights[0].2), 0.0, "{src}");
    }
}

#[test]
fn sharded_output_and_skip_patterns() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sharded");
    // Shards of at most 0 MiB: every tensor starts a new shard.
    let (ok, _, stderr) = convert(
        &tiny("hf_safetensors"),
        &out,
        &["--shard-mib", "0", "--skip", "lm_head", "--code", "fitted"],
    );
    assert!(ok, "{stderr}");
    assert!(out.join("model.safetensors.index.json").exists());
    let m = load_model(&out, &LoadOptions::default()).unwrap();
    assert_eq!(m.graph.node("lm_head").unwrap().kind, "Linear");
    assert_eq!(
        m.graph.node("transformer.h.1.mlp.fc_in").unwrap().kind,
        "Bnb8Linear"
    );
}

#[test]
fn inspect_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("octet");
    assert!(convert(&tiny("hf_safetensors"), &out, &[]).0);
    let (ok, hf, _) = common::octet(&["inspect", tiny("hf_safetensors").to_str().unwrap()]);
    assert!(ok);
    insta::assert_snapshot!("inspect_tiny_hf", hf);
    let (ok, converted, _) = common::octet(&["inspect", out.to_str().unwrap()]);
    assert!(ok);
    insta::assert_snapshot!("inspect_tiny_converted", converted);
    let (ok, eightbit, _) = common::octet(&["inspect", tiny("gptj8bit").to_str().unwrap()]);
    assert!(ok);
    assert!(eightbit.contains("Bnb8Embedding") && !eightbit.contains("masked_bias"));
}

/// Runs a conversion that must fail; checks the message and that nothing was left behind.
fn assert_refused(model: &Path, out: &Path, needle: &str) {
    let (ok, _, stderr) = convert(model, out, &[]);
    assert!(!ok, "conversion of {} should fail", model.display());
    assert!(
        stderr.contains(needle),
        "stderr lacks '{needle}':\n{stderr}"
    );
    assert!(!out.exists(), "{} was left behind", out.display());
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary output left in {}",
        parent.display()
    );
}

#[test]
fn bad_inputs_are_refused_with_clear_errors_and_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("out");

    let no_config = t.join("no_config");
    common::copy_dir(&tiny("hf_safetensors"), &no_config);
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    assert_refused(&no_config, &out, "config.json");

    let unknown = t.join("unknown");
    common::copy_dir(&tiny("hf_safetensors"), &unknown);
    let cfg = std::fs::read_to_string(unknown.join("config.json"))
        .unwrap()
        .replace("\"gptj\"", "\"mamba\"")
        .replace("GPTJForCausalLM", "MambaForCausalLM");
    std::fs::write(unknown.join("config.json"), cfg).unwrap();
    assert_refused(&unknown, &out, "known: ");

    let corrupt = t.join("corrupt");
    common::copy_dir(&tiny("hf_safetensors"), &corrupt);
    let mut bytes = std::fs::read(corrupt.join("model.safetensors")).unwrap();
    bytes[8..24].copy_from_slice(b"not a json head!");
    std::fs::write(corrupt.join("model.safetensors"), &bytes).unwrap();
    assert_refused(&corrupt, &out, "model.safetensors");

    let truncated = t.join("truncated");
    common::copy_dir(&tiny("hf_safetensors"), &truncated);
    let bytes = std::fs::read(truncated.join("model.safetensors")).unwrap();
    std::fs::write(
        truncated.join("model.safetensors"),
        &bytes[..bytes.len() - 1000],
    )
    .unwrap();
    assert_refused(&truncated, &out, "model.safetensors");

    let wrong_shape = t.join("wrong_shape");
    common::copy_dir(&tiny("hf_safetensors"), &wrong_shape);
    let mut tensors: Vec<(String, Tensor)> =
        common::load_safetensors(&wrong_shape.join("model.safetensors"))
            .into_iter()
            .collect();
    for (name, tensor) in tensors.iter_mut() {
        if name == "transformer.h.1.attn.q_proj.weight" {
            *tensor = tensor.narrow(1, 0, 70).contiguous();
        }
    }
    octet::io::safetensors::save_tensors(&wrong_shape.join("model.safetensors"), &tensors, &[])
        .unwrap();
    assert_refused(&wrong_shape, &out, "transformer.h.1.attn.q_proj");

    let evil = t.join("evil");
    std::fs::create_dir_all(&evil).unwrap();
    std::fs::copy(tiny("hf_bin").join("config.json"), evil.join("config.json")).unwrap();
    std::fs::copy(
        common::fixture("torch_bin/evil.bin"),
        evil.join("pytorch_model.bin"),
    )
    .unwrap();
    assert_refused(&evil, &out, "system");

    let inside = t.join("inside");
    common::copy_dir(&tiny("hf_safetensors"), &inside);
    assert_refused(&inside, &inside.join("converted"), "inside");

    // An existing non-empty output is kept unless --force.
    let existing = t.join("existing");
    std::fs::create_dir_all(&existing).unwrap();
    std::fs::write(existing.join("keep.txt"), "mine").unwrap();
    let (ok, _, stderr) = convert(&tiny("hf_safetensors"), &existing, &[]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(existing.join("keep.txt")).unwrap(),
        "mine"
    );
    // --force replaces only octet's own outputs: the user's folder stays as it was.
    let (ok, _, stderr) = convert(&tiny("hf_safetensors"), &existing, &["--force"]);
    assert!(!ok && stderr.contains("not written by octet"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(existing.join("keep.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_file(existing.join("keep.txt")).unwrap();
    assert!(convert(&tiny("hf_safetensors"), &existing, &[]).0);
    assert!(convert(&tiny("hf_safetensors"), &existing, &["--force"]).0);
    assert!(existing.join("octet.toml").exists());
}
