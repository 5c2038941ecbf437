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
/// tensor names, types and bytes (Phi-3's fused q/k/v and gate/up and longrope factors,
/// Gemma 2's norms stored as 1 + w, soft-caps and window included); and octet reads the
/// result back to transformers' logits.
#[test]
fn q8_0_exports_equal_llama_cpp_converter_output() {
    use octet::load::{load_model, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    let r = common::load_safetensors(&decoders("gguf/reference.safetensors"));
    for v in ["llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2"] {
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
        // Its 257-token tokenizer is padded to the model's 301 rows (checked below), but
        // transformers' GGUF loader maps gpt2.context_length to n_ctx, not n_positions, so it
        // builds 1024 positions for this model's 64 and needs the config.
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
    // GPT-2's token list is padded to its 301 embedding rows with unused [PADn] tokens, as
    // llama.cpp's converter pads it (llama.cpp refuses a token count other than the rows).
    let file = octet::io::gguf::GgufFile::open(&dir.path().join("m4.gguf")).unwrap();
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap();
    let types = file
        .get("tokenizer.ggml.token_type")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!((tokens.len(), types.len()), (301, 301));
    assert_eq!(tokens[300].as_str(), Some("[PAD300]"));
    assert_eq!(types[300].as_u64(), Some(5));
    assert_eq!(types[100].as_u64(), Some(1));
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

/// octet reads its own exports back to the source's perplexity. The source is an f32 Hugging
/// Face folder (tiny_llama/untied, whose rows are whole Q8_0 blocks); the oracle for each
/// format is that folder with its matrices rounded as the format stores them, computed in
/// Python without any GGUF file (torch's f16 / bf16 casts, gguf's Q8_0 quantize and
/// de-quantize). octet on the GGUF equals octet on the rounded folder within 1e-5 relative
/// (the same weights through the two readers), transformers on the rounded folder within
/// 1e-5, and the source itself within what the rounding costs.
#[test]
fn exports_read_back_to_the_perplexity_of_the_rounded_source() {
    use octet::eval::perplexity;
    use octet::load::{load_model, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture("tiny_llama/untied");
    // 128 fixed token ids (vocabulary 301), two windows of the model's 64 positions.
    let ids: Vec<i64> = (0..128i64).map(|i| (i * 37 + 11) % 298 + 3).collect();
    let ids_path = common::ids_file(dir.path(), &tch::Tensor::from_slice(&ids).unsqueeze(0));
    let ppl = |model: &Path| {
        let m = load_model(model, &LoadOptions::default()).unwrap();
        tch::no_grad(|| perplexity(m.model.as_ref(), &ids, 64, 64, 1).unwrap()).perplexity
    };
    let source = ppl(&src);
    let formats = [
        // (format, rounding, allowed cost against the unrounded source; measured on this
        // model: f16 7.7e-5, bf16 4.8e-5, q8_0 4.3e-3)
        ("gguf-f16", "f16", 3e-4),
        ("gguf-bf16", "bf16", 3e-3),
        ("gguf-q8_0", "q8_0", 1e-2),
    ];
    let mut args = vec!["round", s(&src), s(dir.path()), s(&ids_path), "64"];
    args.extend(formats.iter().map(|f| f.1));
    let hf = check(&args);
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(
        rel(hf["source"].as_f64().unwrap(), source) < 1e-5,
        "{hf} vs {source}"
    );
    for (fmt, round, cost) in formats {
        let out = dir.path().join(format!("{round}.gguf"));
        export_ok(&src, &out, fmt);
        let (ours, oracle) = (ppl(&out), ppl(&dir.path().join(round)));
        let hf_rounded = hf[round].as_f64().unwrap();
        eprintln!(
            "{fmt}: octet on the GGUF {ours:.8}, on the rounded folder {oracle:.8}, \
             transformers on it {hf_rounded:.8}; source {source:.8}, rounding cost {:.2e}",
            rel(ours, source)
        );
        assert!(rel(ours, oracle) < 1e-5, "{fmt}: {ours} vs {oracle}");
        assert!(
            rel(ours, hf_rounded) < 1e-5,
            "{fmt}: {ours} vs {hf_rounded}"
        );
        assert!(rel(ours, source) < cost, "{fmt}: {ours} vs source {source}");
        // The export did round: the file is not the source.
        assert!(ours != source, "{fmt}");
    }
}

/// GPT-NeoX exports equal llama.cpp's converter output for the tiny GPT-NeoX (F16 and Q8_0):
/// names, metadata, the fused q/k/v rows regrouped from per-head to per-part order, every
/// tensor's bytes, and the token list padded to the model's 301 rows. The one difference is
/// the rope base 5000, which the converter drops (llama.cpp would then rotate with 10000) and
/// octet writes.
#[test]
fn gpt_neox_exports_equal_llama_cpp_converter_output() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixture("tiny_gpt_neox/hf_safetensors");
    for (fmt, theirs) in [("gguf-f16", "f16"), ("gguf-q8_0", "q8_0")] {
        let ours = dir.path().join(format!("{theirs}.gguf"));
        export_ok(&src, &ours, fmt);
        let theirs = common::fixture(&format!("gguf_export/gpt_neox.{theirs}.gguf"));
        let c = check(&["compare", s(&ours), s(&theirs)]);
        // The converter's GPT-NeoX code writes no general.file_type, which every other
        // architecture's does; octet writes it for all.
        assert_eq!(
            strings(&c["keys_only_ours"]),
            ["general.file_type", "gptneox.rope.freq_base"],
            "{fmt}: {c}"
        );
        assert_eq!(
            strings(&c["keys_only_theirs"]),
            ["general.size_label"],
            "{fmt}: {c}"
        );
        for k in ["tensors_only_ours", "tensors_only_theirs", "tensors_differ"] {
            assert!(strings(&c[k]).is_empty(), "{fmt} {k}: {c}");
        }
        assert_eq!(c["types"]["blk.0.attn_qkv.weight"], theirs_type(fmt));
        // The token lists differ in one id: transformers' GPT-NeoX tokenizer class, which the
        // converter loads, adds a `<|padding|>` token (id 257) that tokenizer.json does not
        // hold; octet reads tokenizer.json and pads id 257 like 258..300.
        assert_eq!(
            strings(&c["values_differ"]),
            ["tokenizer.ggml.token_type", "tokenizer.ggml.tokens"],
            "{fmt}: {c}"
        );
        let (a, b) = (
            octet::io::gguf::GgufFile::open(&ours).unwrap(),
            octet::io::gguf::GgufFile::open(&theirs).unwrap(),
        );
        for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"] {
            let (x, y) = (
                a.get(key).unwrap().as_array().unwrap(),
                b.get(key).unwrap().as_array().unwrap(),
            );
            assert_eq!(x.len(), 301);
            let differ: Vec<usize> = (0..x.len()).filter(|&i| x[i] != y[i]).collect();
            assert_eq!(differ, [257], "{key}");
        }
        assert_eq!(
            b.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap()[257].as_str(),
            Some("<|padding|>")
        );
        assert_eq!(
            a.get("gptneox.rope.freq_base").and_then(|v| v.as_f64()),
            Some(5000.0)
        );
    }
}

fn theirs_type(fmt: &str) -> &'static str {
    match fmt {
        "gguf-q8_0" => "Q8_0",
        _ => "F16",
    }
}

/// A Phi-3 Hugging Face folder (longrope, partial rotary, fused q/k/v and gate/up) exported
/// and loaded by transformers (with the source's config: its GGUF loader reads Phi-3's rope
/// settings incompletely) gives the source's logits on the same rounded weights; a Gemma 2
/// whose query scale llama.cpp cannot express is refused by name.
#[test]
fn phi3_export_loads_in_transformers_and_gemma2_limits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = common::load_safetensors(&decoders("reference.safetensors"));
    let ids = common::ids_file(dir.path(), &r["phi3.input_ids"]);
    let src = decoders("phi3");
    let out = dir.path().join("phi3.gguf");
    export_ok(&src, &out, "gguf-bf16");
    let c = check(&["logits", s(&src), s(&out), s(&ids), "bf16", "source-config"]);
    eprintln!("phi3 bf16: {c}");
    assert!(c["same_weights"].as_f64().unwrap() < 1e-4, "{c}");

    // tiny_decoders/gemma2: query_pre_attn_scalar 32, head size 20.
    let out = dir.path().join("gemma2.gguf");
    let (ok, _, err) = export(&decoders("gemma2"), &out, "gguf-f16", &[]);
    assert!(!ok);
    common::assert_mentions(&err, &["gemma2", "query_pre_attn_scalar other than 20"]);
    assert!(!out.exists());
}

/// A linear-rope Llama exports with llama.rope.scaling.type / factor, and octet reads it back
/// with the scaling applied: its logits equal transformers' on the source with the same f16
/// rounding.
#[test]
fn linear_rope_exports_read_back() {
    use octet::load::{load_model, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    let r = common::load_safetensors(&decoders("reference.safetensors"));
    let ids_t = r["llama_linear.input_ids"].shallow_clone();
    let ids = common::ids_file(dir.path(), &ids_t);
    let src = decoders("llama_linear");
    let out = dir.path().join("linear.gguf");
    export_ok(&src, &out, "gguf-f16");
    let file = octet::io::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(
        file.get("llama.rope.scaling.type").and_then(|v| v.as_str()),
        Some("linear")
    );
    let m = load_model(&out, &LoadOptions::default()).unwrap();
    assert_eq!(m.config["rope_scaling"]["rope_type"], "linear");
    assert_eq!(m.config["rope_scaling"]["factor"], 2.0);
    let ours = tch::no_grad(|| m.model.forward(&ids_t).unwrap());
    let seq = ids_t.size()[1].to_string();
    check(&["round", s(&src), s(dir.path()), s(&ids), &seq, "f16"]);
    let theirs = common::hf_logits(
        &dir.path().join("f16"),
        &ids,
        &dir.path().join("l.st"),
        None,
    );
    let d = max_abs_diff(&ours, &theirs);
    eprintln!("linear rope: octet on the f16 GGUF vs transformers on the rounded source {d:.2e}");
    assert!(d < 1e-4, "{d}");
    // And the unrounded source's logits (transformers), within what f16 rounding costs.
    let source = &r["llama_linear.logits"];
    let scale = source.abs().max().double_value(&[]);
    assert!(max_abs_diff(&ours, source) < 1e-2 * scale);
}
