//! `octet merge`: merged Hugging Face checkpoints against peft's merge_and_unload, f16 output,
//! re-quantized 8-bit output, and refusal of bad inputs.
use crate::common;

use octet::load::{load_model, LoadOptions};
use octet::manifest::Manifest;
use octet::peft::load_adapter;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn tiny(dir: &str) -> PathBuf {
    common::fixture(&format!("tiny_gptj/{dir}"))
}

/// The tiny model in 8-bit, the same weights de-quantized for transformers, and test ids.
struct Base {
    base8: PathBuf,
    hf: PathBuf,
    ids_path: PathBuf,
    ids: Tensor,
}

fn base(t: &Path) -> Base {
    let base8 = t.join("base8");
    common::convert_ok(
        &tiny("hf_safetensors"),
        &base8,
        &common::nearest_dynamic(&["--block-size", "64"]),
    );
    let hf = t.join("hf");
    octet::export::export_hf(&base8, &hf, Kind::Float, false, |_, _| Ok(())).unwrap();
    let ids = common::load_safetensors(&tiny("reference.safetensors"))["input_ids"].shallow_clone();
    let ids_path = t.join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids)], &ids_path).unwrap();
    Base {
        base8,
        hf,
        ids_path,
        ids,
    }
}

/// An adapter trained by `octet train` with a high learning rate, so B ≠ 0.
fn trained(t: &Path, b: &Base, name: &str, extra: &[&str]) -> PathBuf {
    let data = t.join("data.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(120),
    )
    .unwrap();
    let run = t.join(name);
    let mut args = vec![
        "train",
        "--model",
        b.base8.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "8",
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--lora-alpha",
        "16",
        "--targets",
        "q_proj,v_proj,fc_in,wte",
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = common::octet(&args);
    assert!(ok, "{err}");
    run
}

/// An adapter made by peft itself (q_proj, v_proj, fc_in, wte; r = 4, alpha = 12) in
/// `t/name`, with make_peft_adapter.py's `extra` options; also returns the file of peft's
/// logits for `b.ids` with the adapter applied.
fn peft_made(t: &Path, b: &Base, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let made = t.join(name);
    let logits = t.join(format!("{name}_logits.safetensors"));
    let mut args = vec![
        b.hf.as_os_str(),
        made.as_os_str(),
        b.ids_path.as_os_str(),
        logits.as_os_str(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    common::run_script("make_peft_adapter.py", &args);
    (made, logits)
}

fn merge(model: &Path, adapter: &Path, out: &Path, format: &str) -> (bool, String, String) {
    common::octet(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        format,
    ])
}

fn hf_logits(model: &Path, ids: &Path, out: &Path) -> Tensor {
    common::run_script(
        "hf_logits.py",
        &[model.as_os_str(), ids.as_os_str(), out.as_os_str()],
    );
    common::load_safetensors(out)["logits"].shallow_clone()
}

fn octet_logits(model: &Path, ids: &Tensor) -> Tensor {
    let m = load_model(model, &LoadOptions::default()).unwrap();
    tch::no_grad(|| m.model.forward(ids).unwrap())
}

/// The number on the `key` line of the merge summary.
fn summary(stdout: &str, key: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' line in: {stdout}"))
}

fn config_dtype(dir: &Path) -> String {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c["dtype"].as_str().unwrap_or_default().to_string()
}

#[test]
fn hf_f32_merge_matches_peft_merge_and_unload() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let b = base(t);
    let base_logits = hf_logits(&b.hf, &b.ids_path, &t.join("base_logits.safetensors"));
    for adapter in [
        trained(t, &b, "trained", &[]),
        peft_made(t, &b, "peft_made", &[]).0,
    ] {
        let name = adapter.file_name().unwrap().to_str().unwrap().to_string();
        let out = t.join(format!("merged_{name}"));
        let (ok, stdout, err) = merge(&b.base8, &adapter, &out, "hf-f32");
        assert!(ok, "{err}");
        assert_eq!(summary(&stdout, "merged"), 7, "{stdout}");
        assert_eq!(config_dtype(&out), "float32");
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        assert!(!out.join("octet.toml").exists());
        let ours_w = common::load_safetensors(&out.join("model.safetensors"));
        assert!(ours_w
            .keys()
            .all(|k| !k.ends_with("absmax") && !k.ends_with(".code")));

        let ours = hf_logits(
            &out,
            &b.ids_path,
            &t.join(format!("{name}_merged.safetensors")),
        );
        let peft_logits = t.join(format!("{name}_peft_logits.safetensors"));
        let peft_weights = t.join(format!("{name}_peft_weights.safetensors"));
        common::run_script(
            "peft_merge_logits.py",
            &[
                b.hf.as_os_str(),
                adapter.as_os_str(),
                b.ids_path.as_os_str(),
                peft_logits.as_os_str(),
                peft_weights.as_os_str(),
            ],
        );
        let theirs = &common::load_safetensors(&peft_logits)["logits"];
        let d = common::max_abs_diff(&ours, theirs);
        eprintln!("{name}: hf-f32 merge vs peft merge_and_unload: max |logit diff| {d:.2e}");
        assert!(d < 1e-4, "{name}: merged logits differ from peft's by {d}");
        assert!(
            common::max_abs_diff(&ours, &base_logits) > 1e-3,
            "{name}: the merge changed nothing"
        );
        let theirs_w = common::load_safetensors(&peft_weights);
        for (k, w) in &ours_w {
            let tw = theirs_w
                .get(k)
                .unwrap_or_else(|| panic!("{name}: peft's merged model has no {k}"));
            assert_eq!(w.kind(), Kind::Float, "{k}");
            let d = common::max_abs_diff(w, tw);
            assert!(d < 1e-5, "{name}: {k} differs from peft's merge by {d}");
        }
    }

    // Trained biases and norms replace the base's: the merge equals the adapter applied.
    let extras = trained(
        t,
        &b,
        "trained_extras",
        &["--train-biases", "--train-norms"],
    );
    let out = t.join("merged_extras");
    let (ok, stdout, err) = merge(&b.base8, &extras, &out, "hf-f32");
    assert!(ok, "{err}");
    // fc_in and fc_out biases of 2 layers and lm_head's; ln_1 of 2 layers and ln_f, weight
    // and bias each.
    assert_eq!(summary(&stdout, "replaced"), 11, "{stdout}");
    let mut m = load_model(&b.base8, &LoadOptions::default()).unwrap();
    load_adapter(m.model.as_mut(), &extras).unwrap();
    let adapted = tch::no_grad(|| m.model.forward(&b.ids).unwrap());
    let merged = octet_logits(&out, &b.ids);
    let d = common::max_abs_diff(&adapted, &merged);
    assert!(
        d < 1e-4,
        "merge with biases and norms vs adapter applied: {d}"
    );
}

#[test]
fn hf_f16_merge_loads_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let b = base(t);
    let adapter = trained(t, &b, "trained", &[]);
    let (f16, f32) = (t.join("f16"), t.join("f32"));
    for (out, format) in [(&f16, "hf-f16"), (&f32, "hf-f32")] {
        let (ok, _, err) = merge(&b.base8, &adapter, out, format);
        assert!(ok, "{err}");
    }
    assert_eq!(config_dtype(&f16), "float16");
    let w = common::load_safetensors(&f16.join("model.safetensors"));
    assert!(w.values().all(|t| t.kind() == Kind::Half));
    let exact = hf_logits(&f32, &b.ids_path, &t.join("f32_logits.safetensors"));
    let half = hf_logits(&f16, &b.ids_path, &t.join("f16_logits.safetensors"));
    let rel = common::max_abs_diff(&half, &exact) / exact.abs().max().double_value(&[]);
    eprintln!("hf-f16 vs hf-f32 merge: max |logit diff| / max |logit| = {rel:.2e}");
    assert!(rel < 5e-2, "f16 merge is off by {rel} (relative)");
}

#[test]
fn octet8_merge_loads_in_octet_and_reports_the_added_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let b = base(t);
    let adapter = trained(t, &b, "trained", &[]);
    let (q8, f32) = (t.join("q8"), t.join("f32"));
    let (ok, stdout, err) = merge(&b.base8, &adapter, &q8, "octet8");
    assert!(ok, "{err}");
    eprintln!("{stdout}");
    assert!(stdout.contains("rel MSE") && stdout.contains("transformer.wte.weight"));
    let (ok, _, err) = merge(&b.base8, &adapter, &f32, "hf-f32");
    assert!(ok, "{err}");

    let manifest = Manifest::read(&q8).unwrap().expect("octet.toml");
    assert_eq!(manifest.arch, "gptj");
    assert_eq!(manifest.block_size, 64);
    let mut names: Vec<&str> = manifest.tensors.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    let mut want = vec!["transformer.wte.weight".to_string()];
    for l in 0..2 {
        for m in ["attn.q_proj", "attn.v_proj", "mlp.fc_in"] {
            want.push(format!("transformer.h.{l}.{m}.weight"));
        }
    }
    want.sort_unstable();
    assert_eq!(names, want);
    for e in &manifest.tensors {
        assert!(
            e.rel_mse > 0.0 && e.rel_mse < 1e-2 && e.max_abs_err.is_finite(),
            "{}: rel MSE {} max {}",
            e.name,
            e.rel_mse,
            e.max_abs_err
        );
    }

    // Modules the adapter does not touch keep their bytes exactly.
    let before = common::load_safetensors(&b.base8.join("model.safetensors"));
    let after = common::load_safetensors(&q8.join("model.safetensors"));
    assert_eq!(before.len(), after.len());
    for k in [
        "transformer.h.0.attn.k_proj.weight",
        "transformer.h.0.attn.k_proj.absmax",
        "lm_head.weight",
        "transformer.h.1.mlp.fc_out.weight",
    ] {
        assert!(before[k].equal(&after[k]), "{k} changed");
    }
    assert_eq!(
        after["transformer.h.0.attn.q_proj.weight"].kind(),
        Kind::Uint8
    );

    let exact = octet_logits(&f32, &b.ids);
    let requantized = octet_logits(&q8, &b.ids);
    let scale = exact.abs().max().double_value(&[]);
    let d = common::max_abs_diff(&requantized, &exact);
    let mean = (&requantized - &exact)
        .abs()
        .mean(Kind::Float)
        .double_value(&[]);
    eprintln!(
        "octet8 merge vs exact f32 merge: max |logit diff| {d:.3e} (relative {:.3e}), mean {mean:.3e}",
        d / scale
    );
    // For scale: what quantizing the original f32 model cost in the first place.
    let original = octet_logits(&tiny("hf_safetensors"), &b.ids);
    let base8 = octet_logits(&b.base8, &b.ids);
    let d0 = common::max_abs_diff(&base8, &original);
    eprintln!("for reference, 8-bit base vs original f32 model: max |logit diff| {d0:.3e}");
    assert!(d / scale < 5e-2, "re-quantized merge is off by {d}");
    assert!(
        d < 3.0 * d0,
        "re-quantizing the merge costs {d}, converting cost {d0}"
    );
}

/// Whether `dir` (or a temporary sibling of it) was left behind.
fn left_behind(dir: &Path) -> bool {
    let name = dir.file_name().unwrap().to_str().unwrap().to_string();
    dir.exists()
        || std::fs::read_dir(dir.parent().unwrap()).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(&format!(".{name}."))
        })
}

fn edited_adapter(from: &Path, to: &Path, edit: impl Fn(&mut Vec<(String, Tensor)>)) -> PathBuf {
    common::copy_dir(from, to);
    let p = to.join("adapter_model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = common::load_safetensors(&p).into_iter().collect();
    edit(&mut tensors);
    octet::io::safetensors::save_tensors(&p, &tensors, &[]).unwrap();
    to.to_path_buf()
}

#[test]
fn bad_inputs_are_refused_clearly_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let b = base(t);
    let good = trained(t, &b, "trained", &[]);
    let out = t.join("out");
    let refused = |adapter: &Path, out: &Path, format: &str, needles: &[&str]| {
        let (ok, _, err) = merge(&b.base8, adapter, out, format);
        assert!(!ok, "merge of {} should fail", adapter.display());
        for n in needles {
            assert!(err.contains(n), "'{n}' not in: {err}");
        }
    };

    // A tensor of the wrong shape.
    let bad = edited_adapter(&good, &t.join("bad_shape"), |ts| {
        for (n, v) in ts.iter_mut() {
            if n.ends_with("h.1.attn.v_proj.lora_A.weight") {
                *v = v.narrow(1, 0, 70);
            }
        }
    });
    for format in ["hf-f32", "octet8"] {
        refused(
            &bad,
            &out,
            format,
            &["v_proj.lora_A.weight", "[4, 72]", "[4, 70]"],
        );
        assert!(!left_behind(&out));
    }

    // Half a LoRA pair.
    let half = edited_adapter(&good, &t.join("half"), |ts| {
        ts.retain(|(n, _)| !n.ends_with("h.0.mlp.fc_in.lora_B.weight"))
    });
    refused(&half, &out, "hf-f16", &["fc_in", "without lora_B"]);
    assert!(!left_behind(&out));

    // An adapter trained for another architecture (Llama's module names).
    let llama = edited_adapter(&good, &t.join("llama"), |ts| {
        for (n, _) in ts.iter_mut() {
            *n = n
                .replace("transformer.h.", "model.layers.")
                .replace(".attn.", ".self_attn.")
                .replace("transformer.wte", "model.embed_tokens");
        }
    });
    refused(&llama, &out, "hf-f16", &["gptj", "another architecture"]);
    assert!(!left_behind(&out));

    // One module this model lacks.
    let extra = edited_adapter(&good, &t.join("extra"), |ts| {
        let a = ts[0].1.copy();
        ts.push((
            "base_model.model.transformer.h.7.attn.q_proj.bias".into(),
            a,
        ));
    });
    refused(&extra, &out, "hf-f16", &["h.7.attn.q_proj", "no module"]);
    assert!(!left_behind(&out));

    // No adapter_config.json.
    let no_cfg = t.join("no_cfg");
    common::copy_dir(&good, &no_cfg);
    std::fs::remove_file(no_cfg.join("adapter_config.json")).unwrap();
    refused(&no_cfg, &out, "hf-f16", &["no_cfg", "adapter_config.json"]);
    assert!(!left_behind(&out));

    // Output inside an input.
    let inside = b.base8.join("merged");
    refused(&good, &inside, "octet8", &["inside"]);
    assert!(!left_behind(&inside));
    let inside = good.join("merged");
    refused(&good, &inside, "hf-f16", &["inside"]);
    assert!(!left_behind(&inside));

    // An existing non-empty output needs --force, and is untouched without it.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    refused(&good, &out, "hf-f16", &["not empty", "--force"]);
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    // --force replaces only octet's own outputs: a folder holding the user's file stays.
    let force = |out: &Path| {
        common::octet(&[
            "merge",
            "--model",
            b.base8.to_str().unwrap(),
            "--adapter",
            good.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--force",
        ])
    };
    let (ok, _, err) = force(&out);
    assert!(!ok && err.contains("not written by octet"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    let (ok, _, err) = force(&out);
    assert!(ok, "{err}");
    assert!(out.join("model.safetensors").exists());
    let (ok, _, err) = force(&out);
    assert!(ok, "an octet merge output is replaced: {err}");

    // An unknown format.
    let (ok, _, err) = merge(&b.base8, &good, &t.join("o9"), "gguf");
    assert!(!ok && err.contains("gguf"), "{err}");
}

/// `merge` and `eval --adapter` accept the same folders and agree: a peft-made pickled
/// `adapter_model.bin` with a `modules_to_save` copy of the 8-bit lm_head merges like peft
/// applies it, and attached to the 8-bit base it gives the merged model's logits.
#[test]
fn bin_adapter_with_modules_to_save_merges_and_attaches_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let b = base(t);
    let (adapter, peft_logits) = peft_made(
        t,
        &b,
        "peft_bin",
        &["--bin", "--modules-to-save", "lm_head"],
    );
    assert!(adapter.join("adapter_model.bin").is_file());
    let theirs = &common::load_safetensors(&peft_logits)["logits"];

    let out = t.join("merged");
    let (ok, stdout, err) = merge(&b.base8, &adapter, &out, "hf-f32");
    assert!(ok, "{err}");
    assert_eq!(summary(&stdout, "merged"), 7, "{stdout}");
    // lm_head's weight and bias, from modules_to_save.
    assert_eq!(summary(&stdout, "replaced"), 2, "{stdout}");
    let merged = hf_logits(&out, &b.ids_path, &t.join("merged_logits.safetensors"));
    let d = common::max_abs_diff(&merged, theirs);
    assert!(d < 1e-4, "merged logits differ from peft's by {d}");

    let mut m = load_model(&b.base8, &LoadOptions::default()).unwrap();
    load_adapter(m.model.as_mut(), &adapter).unwrap();
    let adapted = tch::no_grad(|| m.model.forward(&b.ids).unwrap());
    let d = common::max_abs_diff(&adapted, theirs);
    assert!(
        d < 1e-4,
        "attached adapter's logits differ from peft's by {d}"
    );

    let (ok, _, err) = merge(&b.base8, &adapter, &t.join("merged8"), "octet8");
    assert!(ok, "{err}");
}
