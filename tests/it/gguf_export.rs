//! Exporting to llama.cpp GGUF (`octet export`, `merge --format gguf-*`, `export-adapter`):
//! against llama.cpp's own converter output (keys, names, bytes), transformers loading the
//! exported files, octet reading them back, and the adapter applied in numpy.
use crate::common::{self, max_abs_diff, s};
use std::path::{Path, PathBuf};

fn decoders(rel: &str) -> PathBuf {
    common::fixture(&format!("tiny_decoders/{rel}"))
}

fn export(model: &Path, out: &Path, format: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "export",
        "--model",
        s(model),
        "--out",
        s(out),
        "--format",
        format,
    ];
    args.extend_from_slice(extra);
    common::octet(&args)
}

fn export_ok(model: &Path, out: &Path, format: &str) {
    let (ok, _, err) = export(model, out, format, &[]);
    assert!(ok, "export {} {format}: {err}", model.display());
}

fn check(args: &[&str]) -> serde_json::Value {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    common::script_json("gguf_export_check.py", &args)
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// Files in `dir` (every name), to see that nothing was left behind.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Re-exporting llama.cpp's f32 files as Q8_0 gives llama.cpp's own Q8_0 files: the same
/// metadata keys and values (config-derived, not copied: only the tokenizer is), the same
/// tensor names, types and bytes; and octet reads the result back to transformers' logits.
#[test]
fn q8_0_exports_equal_llama_cpp_converter_output() {
    use octet::load::{load_model, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    let r = common::load_safetensors(&decoders("gguf/reference.safetensors"));
    for v in ["llama3", "mistral", "qwen2", "qwen3"] {
        let ours = dir.path().join(format!("{v}.q8_0.gguf"));
        export_ok(&decoders(&format!("gguf/{v}.gguf")), &ours, "gguf-q8_0");
        let theirs = decoders(&format!("gguf/{v}.q8_0.gguf"));
        let c = check(&["compare", s(&ours), s(&theirs)]);
        assert!(strings(&c["keys_only_ours"]).is_empty(), "{v}: {c}");
        // The converter's size label ("91K") is a display string octet does not write.
        assert_eq!(
            strings(&c["keys_only_theirs"]),
            ["general.size_label"],
            "{v}: {c}"
        );
        for k in ["values_differ", "tensors_only_ours", "tensors_only_theirs"] {
            assert!(strings(&c[k]).is_empty(), "{v} {k}: {c}");
        }
        // Llama 3's rope divisors: the converter computes them in f32 torch, octet in f64
        // rounded once; every weight is bit-identical.
        for t in strings(&c["tensors_differ"]) {
            assert_eq!(t, "rope_freqs.weight", "{v}: {c}");
            assert!(c["max_rel_diff"][&t].as_f64().unwrap() < 1e-6, "{v}: {c}");
        }
        let m = load_model(&ours, &LoadOptions::default()).unwrap();
        let logits = tch::no_grad(|| m.model.forward(&r[&format!("{v}.input_ids")]).unwrap());
        let d = max_abs_diff(&logits, &r[&format!("{v}.logits")]);
        eprintln!("{v}: octet on its own Q8_0 export vs transformers {d:.2e}");
        assert!(d < 1e-4, "{v}: {d}");
    }
}

/// F16 and BF16 exports hold exactly what gguf's conversions of the f32 tensors give.
#[test]
fn f16_and_bf16_exports_are_gguf_conversions_of_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let src = decoders("gguf/llama3.gguf");
    for fmt in ["gguf-f16", "gguf-bf16"] {
        let ours = dir.path().join(format!("{fmt}.gguf"));
        export_ok(&src, &ours, fmt);
        let c = check(&["cast", s(&ours), s(&src)]);
        // rope_freqs.weight is computed from the config (see the Q8_0 test), not copied.
        assert_eq!(strings(&c["differ"]), ["rope_freqs.weight"], "{fmt}: {c}");
        assert!(c["checked"].as_u64().unwrap() > 10, "{c}");
    }
}

/// transformers loads exports of Hugging Face folders (Llama, Mistral, Qwen2, GPT-2) and
/// gives the source model's logits on the same rounded weights (1e-4).
#[test]
fn transformers_loads_exports_of_hf_folders() {
    let dir = tempfile::tempdir().unwrap();
    let r = common::load_safetensors(&decoders("reference.safetensors"));
    let ids = common::ids_file(dir.path(), &r["mistral.input_ids"]);
    // transformers reads a GGUF whose general.name mentions Mistral with a loader gguf-py
    // lacks; the name comes from the folder, so the Mistral model is exported from a copy.
    let mistral = dir.path().join("tiny_m");
    common::copy_dir(&decoders("mistral"), &mistral);
    let cases = [
        (
            common::fixture("tiny_llama/untied"),
            "gguf-f16",
            "f16",
            true,
        ),
        (
            common::fixture("tiny_llama/tied"),
            "gguf-bf16",
            "bf16",
            true,
        ),
        (mistral, "gguf-f16", "f16", true),
        // No tokenizer, so transformers cannot tell the vocabulary size from the metadata.
        (decoders("qwen2"), "gguf-bf16", "bf16", false),
        // Its 257-token tokenizer is not padded to the model's 301 rows (llama.cpp's converter
        // pads with [PADn]), so transformers cannot tell the vocabulary size either.
        (
            common::fixture("tiny_gpt2/hf_safetensors"),
            "gguf-f16",
            "f16",
            false,
        ),
    ];
    for (i, (src, fmt, round, own_config)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("m{i}.gguf"));
        export_ok(src, &out, fmt);
        let c = check(&["logits", s(src), s(&out), s(&ids), round]);
        eprintln!("{} {fmt}: {c}", src.display());
        assert!(
            c["same_weights"].as_f64().unwrap() < 1e-4,
            "{} {fmt}: {c}",
            src.display()
        );
        let (diff, scale) = (
            c["source"].as_f64().unwrap(),
            c["logit_scale"].as_f64().unwrap(),
        );
        // Against the unrounded source: f16 keeps 11 significant bits, bf16 8.
        let tol = if *round == "f16" { 1e-2 } else { 5e-2 };
        assert!(diff < tol * scale, "{} {fmt}: {c}", src.display());
        if *own_config {
            assert_eq!(c["config_from"], "gguf", "{}: {c}", src.display());
        }
    }
}

/// The adapter GGUF holds PEFT's A and B (B's q/k rows permuted as llama.cpp permutes the
/// weights), marked as llama.cpp's LoRA layout; applying it to the exported base in numpy
/// gives `merge --format gguf-f16`.
#[test]
fn adapter_gguf_applied_in_numpy_gives_the_merge() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::fixture("tiny_llama/untied");
    let adapter = dir.path().join("adapter");
    check_status(&["make-adapter", s(&base), s(&adapter)]);
    let base_gguf = dir.path().join("base.gguf");
    export_ok(&base, &base_gguf, "gguf-f16");
    let merged = dir.path().join("merged.gguf");
    let (ok, _, err) = common::octet(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
        "--format",
        "gguf-f16",
    ]);
    assert!(ok, "merge: {err}");
    let lora = dir.path().join("lora.gguf");
    let (ok, out, err) = common::octet(&[
        "export-adapter",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&lora),
    ]);
    assert!(ok, "export-adapter: {err}");
    assert!(out.contains("28 F32"), "{out}");
    // tiny_llama/untied: 4 heads, 2 key/value heads.
    let c = check(&[
        "lora",
        s(&base_gguf),
        s(&lora),
        s(&merged),
        s(&adapter),
        "4",
        "2",
    ]);
    eprintln!("adapter: {c}");
    assert_eq!(c["targets"], 14, "{c}");
    assert_eq!(c["general.type"], "adapter");
    assert_eq!(c["adapter.type"], "lora");
    assert!(c["tensor_diff"].as_f64().unwrap() == 0.0, "{c}");
    assert!(c["merge_diff"].as_f64().unwrap() < 1e-3, "{c}");
    assert_eq!(c["alpha_over_r"], c["peft_scale"]);
}

fn check_status(args: &[&str]) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    common::run_script("gguf_export_check.py", &args);
}

/// Bad input: an architecture llama.cpp lacks, an adapter of another base, an existing
/// output without --force, a full disk. Each is refused with a clear error and leaves no
/// partial file behind.
#[test]
fn bad_exports_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.gguf");

    let (ok, _, err) = export(
        &common::fixture("tiny_gptj/hf_safetensors"),
        &out,
        "gguf-f16",
        &[],
    );
    assert!(!ok);
    common::assert_mentions(&err, &["cannot export 'gptj'", "llama, mistral"]);
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));

    let adapter = dir.path().join("adapter");
    check_status(&[
        "make-adapter",
        s(&common::fixture("tiny_llama/untied")),
        s(&adapter),
    ]);
    let (ok, _, err) = common::octet(&[
        "export-adapter",
        "--model",
        s(&decoders("qwen2")),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
    ]);
    assert!(!ok);
    assert!(err.contains("adapter"), "{err}");
    assert!(!out.exists());

    std::fs::write(&out, b"precious").unwrap();
    let (ok, _, err) = export(&common::fixture("tiny_llama/untied"), &out, "gguf-f16", &[]);
    assert!(!ok);
    common::assert_mentions(&err, &["exists", "--force"]);
    // Not a GGUF file: not replaced even with --force.
    let (ok, _, err) = export(
        &common::fixture("tiny_llama/untied"),
        &out,
        "gguf-f16",
        &["--force"],
    );
    assert!(!ok, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    std::fs::remove_file(&out).unwrap();
    export_ok(&common::fixture("tiny_llama/untied"), &out, "gguf-f16");
    let (ok, _, err) = export(
        &common::fixture("tiny_llama/untied"),
        &out,
        "gguf-q8_0",
        &["--force"],
    );
    assert!(ok, "{err}");

    // A full disk, as a file-size limit makes writes fail (SIGXFSZ ignored, so write() errs).
    let full = dir.path().join("full.gguf");
    let cmd = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{}' export --model '{}' --out '{}' --format gguf-f16",
        env!("CARGO_BIN_EXE_octet"),
        s(&common::fixture("tiny_llama/untied")),
        s(&full)
    );
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    common::assert_mentions(&err, &["full.gguf", "File too large"]);
    assert_eq!(listing(dir.path()), ["adapter", "x.gguf"], "{err}");
}

/// A folder's tokenizer written as GGUF metadata reads back to the same ids and text: a
/// SentencePiece vocabulary (byte fallback, scores from the merges) and a byte-level BPE
/// (merges and the pre-tokenizer's name), each converted from a GGUF to a folder and exported.
#[test]
fn exported_tokenizers_give_the_same_ids() {
    use octet::tokenizer::Tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let texts = [
        "Hello world, this is a test.",
        "  leading spaces and\nnew lines\t tabs 12345 ÿ€ 日本語 <s> </s>",
        "don't stop-believing!! 3.14159",
    ];
    for name in ["llama", "bpe"] {
        let src = common::fixture(&format!("spm_gguf/{name}.gguf"));
        let folder = dir.path().join(name);
        common::convert_ok(&src, &folder, &[]);
        let out = dir.path().join(format!("{name}.gguf"));
        export_ok(&folder, &out, "gguf-f16");
        let (a, b) = (
            Tokenizer::from_dir(&src).unwrap(),
            Tokenizer::from_dir(&out).unwrap(),
        );
        assert_eq!((a.bos_id(), a.eos_id()), (b.bos_id(), b.eos_id()), "{name}");
        for t in texts {
            let ids = a.encode(t).unwrap();
            assert_eq!(ids, b.encode(t).unwrap(), "{name}: {t:?}");
            assert_eq!(
                a.decode(&ids).unwrap(),
                b.decode(&ids).unwrap(),
                "{name}: {t:?}"
            );
            let special = a.encode_with_special_tokens(t).unwrap();
            assert_eq!(
                special,
                b.encode_with_special_tokens(t).unwrap(),
                "{name}: {t:?}"
            );
        }
    }
}
