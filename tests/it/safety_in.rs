//! Bad input files: each case is the exact bad input, refused with a message naming the file
//! and the problem, a plain error exit (1, never a panic's 101 or an abort), and nothing
//! written.
use super::common::{copy_dir, err_text, fixture, load_safetensors, python, s};
use octet::load::{load_model, LoadOptions};
use octet::nn::LoraConfig;
use octet::peft::{attach_lora, save_adapter, AdapterConfig, Targets};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Runs the octet binary; returns (exit code, stderr).
fn octet(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_octet"))
        .args(args)
        .output()
        .expect("run octet");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a refusal: exit code 1 and every `needle` in the message.
fn assert_refused(res: &(Option<i32>, String), needles: &[&str]) {
    let (code, err) = res;
    assert_eq!(*code, Some(1), "expected exit 1, got {code:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "message lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// Asserts `out` was not created and no temporary sibling was left next to it.
fn assert_nothing_written(out: &Path) {
    assert!(!out.exists(), "{} was written", out.display());
    let parent = out.parent().unwrap();
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}")))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A copy of the tiny GPT-J with `config.json`'s `n_layer` set to `value` (verbatim JSON).
fn gptj_with_n_layer(tmp: &Path, value: &str) -> PathBuf {
    let m = tmp.join("model");
    copy_dir(&fixture("tiny_gptj/hf_safetensors"), &m);
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    let cfg = cfg.replace("\"n_layer\": 2", &format!("\"n_layer\": {value}"));
    assert!(cfg.contains(value));
    std::fs::write(m.join("config.json"), cfg).unwrap();
    m
}

#[test]
fn convert_refuses_n_layer_1e8_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let m = gptj_with_n_layer(tmp.path(), "100000000");
    let out = tmp.path().join("out");
    let started = std::time::Instant::now();
    let r = octet(&["convert", "--model", s(&m), "--out", s(&out)]);
    assert_refused(
        &r,
        &[
            "config.json",
            "n_layer 100000000",
            "model.safetensors holds",
        ],
    );
    assert!(
        started.elapsed().as_secs() < 20,
        "took {:?}",
        started.elapsed()
    );
    assert_nothing_written(&out);
}

#[test]
fn convert_refuses_n_layer_2_pow_63() {
    let tmp = tempfile::tempdir().unwrap();
    let m = gptj_with_n_layer(tmp.path(), "9223372036854775808");
    let out = tmp.path().join("out");
    let r = octet(&["convert", "--model", s(&m), "--out", s(&out)]);
    assert_refused(&r, &["config.json", "n_layer is 9223372036854775808"]);
    assert_nothing_written(&out);
}

/// A copy of the GPT-J 8-bit folder whose pytorch_model.bin is `make_bad_bin.py KIND`'s.
fn bad_gptj8bit(tmp: &Path, kind: &str) -> PathBuf {
    let m = tmp.join(kind);
    copy_dir(&fixture("tiny_gptj/gptj8bit"), &m);
    make_bad_bin(kind, &m.join("pytorch_model.bin"));
    m
}

fn make_bad_bin(kind: &str, out: &Path) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/make_bad_bin.py");
    let src = fixture("tiny_gptj/gptj8bit/pytorch_model.bin");
    let st = std::process::Command::new(python())
        .arg(script)
        .args([kind, s(&src), s(out)])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn convert_refuses_a_gptj8bit_bin_with_an_unsorted_code() {
    let tmp = tempfile::tempdir().unwrap();
    let m = bad_gptj8bit(tmp.path(), "unsorted-code");
    let out = tmp.path().join("out");
    let r = octet(&["convert", "--model", s(&m), "--out", s(&out)]);
    assert_refused(
        &r,
        &[
            "pytorch_model.bin",
            "transformer.h.0.attn.q_proj.code",
            "not sorted",
        ],
    );
    assert_nothing_written(&out);
    // Loading it directly (eval, generate) is refused the same way.
    let err = err_text(load_model(&m, &LoadOptions::default()));
    assert!(
        err.contains("pytorch_model.bin") && err.contains("q_proj.code"),
        "{err}"
    );
}

#[test]
fn convert_refuses_a_gptj8bit_bin_with_a_negative_absmax() {
    let tmp = tempfile::tempdir().unwrap();
    let m = bad_gptj8bit(tmp.path(), "negative-absmax");
    let out = tmp.path().join("out");
    let r = octet(&["convert", "--model", s(&m), "--out", s(&out)]);
    assert_refused(
        &r,
        &[
            "pytorch_model.bin",
            "transformer.h.1.mlp.fc_out.absmax",
            "-1 at block 0",
        ],
    );
    assert_nothing_written(&out);
}

/// A copy of the tiny GPT-J safetensors folder with element 5 of `tensor` set to `value`.
fn gptj_with_value(tmp: &Path, tensor: &str, value: f32) -> PathBuf {
    let m = tmp.join("model");
    copy_dir(&fixture("tiny_gptj/hf_safetensors"), &m);
    let mut ts = load_safetensors(&m.join("model.safetensors"));
    let t = ts.get_mut(tensor).unwrap();
    let flat = t.view([-1]);
    let _ = flat.get(5).fill_(value as f64);
    let named: Vec<(String, Tensor)> = ts.into_iter().collect();
    Tensor::write_safetensors(&named, m.join("model.safetensors")).unwrap();
    m
}

#[test]
fn convert_refuses_nan_in_a_weight_to_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    let m = gptj_with_value(tmp.path(), "transformer.h.0.attn.q_proj.weight", f32::NAN);
    let out = tmp.path().join("out");
    let r = octet(&["convert", "--model", s(&m), "--out", s(&out)]);
    assert_refused(
        &r,
        &[
            "model.safetensors",
            "transformer.h.0.attn.q_proj.weight",
            "NaN at element 5",
        ],
    );
    assert_nothing_written(&out);
    // --allow-nonfinite cannot make an 8-bit block hold it.
    let r = octet(&[
        "convert",
        "--model",
        s(&m),
        "--out",
        s(&out),
        "--allow-nonfinite",
    ]);
    assert_refused(&r, &["cannot be quantized", "--skip"]);
    assert_nothing_written(&out);
}

#[test]
fn convert_refuses_inf_in_a_float_tensor_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let m = gptj_with_value(tmp.path(), "transformer.h.0.ln_1.weight", f32::INFINITY);
    let out = tmp.path().join("out");
    let r = octet(&["convert", "--model", s(&m), "--out", s(&out)]);
    assert_refused(
        &r,
        &[
            "model.safetensors",
            "transformer.h.0.ln_1.weight",
            "inf at element 5",
            "--allow-nonfinite",
        ],
    );
    assert_nothing_written(&out);
    let (code, err) = octet(&[
        "convert",
        "--model",
        s(&m),
        "--out",
        s(&out),
        "--allow-nonfinite",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let kept = load_safetensors(&out.join("model.safetensors"));
    let v = kept["transformer.h.0.ln_1.weight"]
        .view([-1])
        .double_value(&[5]);
    assert_eq!(v, f64::INFINITY);
}

#[test]
fn convert_without_a_tokenizer_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let m = fixture("tiny_llama/tied");
    let (code, err) = octet(&["convert", "--model", s(&m), "--out", s(&out)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning") && err.contains("no tokenizer"),
        "{err}"
    );
}

/// The tiny GPT-J converted to octet's format, and a rank-4 q/v adapter for it.
fn octet_model_and_adapter(tmp: &Path) -> (PathBuf, PathBuf) {
    let m = tmp.join("octet");
    octet::convert::convert(
        &fixture("tiny_gptj/hf_safetensors"),
        &m,
        &Default::default(),
    )
    .unwrap();
    let a = tmp.join("adapter");
    std::fs::create_dir_all(&a).unwrap();
    let _rng = super::common::global_rng();
    let mut loaded = load_model(&m, &LoadOptions::default()).unwrap();
    let targets = Targets::parse("q_proj,v_proj").unwrap();
    let cfg = LoraConfig {
        r: 4,
        ..Default::default()
    };
    attach_lora(loaded.model.as_mut(), &targets, cfg).unwrap();
    save_adapter(
        loaded.model.as_mut(),
        &AdapterConfig::new(cfg, &targets, "tiny", false),
        &a,
    )
    .unwrap();
    (m, a)
}

/// Rewrites one tensor of a safetensors file.
fn edit_tensor(file: &Path, name: &str, f: impl FnOnce(&Tensor) -> Tensor) {
    let mut ts = load_safetensors(file);
    let t = ts.remove(name).unwrap_or_else(|| panic!("no {name}"));
    ts.insert(name.to_string(), f(&t));
    let named: Vec<(String, Tensor)> = ts.into_iter().collect();
    Tensor::write_safetensors(&named, file).unwrap();
}

#[test]
fn merge_octet8_refuses_to_write_a_code_holding_inf() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, a) = octet_model_and_adapter(tmp.path());
    // A module the adapter does not touch: merge would copy its bytes as they are.
    edit_tensor(
        &m.join("model.safetensors"),
        "transformer.h.1.mlp.fc_in.code",
        |t| {
            let t = t.copy();
            let _ = t.get(255).fill_(f64::INFINITY);
            t
        },
    );
    let out = tmp.path().join("merged");
    let r = octet(&[
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&a),
        "--out",
        s(&out),
        "--format",
        "octet8",
    ]);
    assert_refused(&r, &["transformer.h.1.mlp.fc_in.code", "inf"]);
    assert_nothing_written(&out);
}

#[test]
fn merge_hf_f32_refuses_an_adapter_holding_inf() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, a) = octet_model_and_adapter(tmp.path());
    let name = "base_model.model.transformer.h.0.attn.q_proj.lora_B.weight";
    edit_tensor(&a.join("adapter_model.safetensors"), name, |t| {
        t.ones_like() * f64::INFINITY
    });
    let out = tmp.path().join("merged");
    let r = octet(&[
        "merge",
        "--model",
        s(&m),
        "--adapter",
        s(&a),
        "--out",
        s(&out),
        "--format",
        "hf-f32",
    ]);
    assert_refused(&r, &["adapter_model.safetensors", name, "inf"]);
    assert_nothing_written(&out);
}

#[test]
fn eval_and_generate_refuse_an_i32_adapter_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, a) = octet_model_and_adapter(tmp.path());
    let name = "base_model.model.transformer.h.0.attn.q_proj.lora_A.weight";
    edit_tensor(&a.join("adapter_model.safetensors"), name, |t| {
        (t * 1000.0).to_kind(Kind::Int)
    });
    std::fs::copy(
        fixture("tiny_gptj/hf_safetensors/tokenizer.json"),
        m.join("tokenizer.json"),
    )
    .ok();
    let r = octet(&[
        "generate",
        "--model",
        s(&m),
        "--adapter",
        s(&a),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    assert_refused(
        &r,
        &["adapter_model.safetensors", name, "I32, not floating point"],
    );
    let data = tmp.path().join("text.txt");
    std::fs::write(
        &data,
        "some held-out text to score, long enough for a window",
    )
    .unwrap();
    let r = octet(&[
        "eval",
        "--model",
        s(&m),
        "--adapter",
        s(&a),
        "--data",
        s(&data),
        "--ctx",
        "16",
        "--stride",
        "8",
    ]);
    assert_refused(
        &r,
        &["adapter_model.safetensors", name, "I32, not floating point"],
    );
}

#[test]
fn an_adapter_rank_of_2_pow_32_or_2_pow_63_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, a) = octet_model_and_adapter(tmp.path());
    let cfg_path = a.join("adapter_config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    for r in ["4294967296", "9223372036854775808"] {
        let bad = cfg.replace("\"r\": 4", &format!("\"r\": {r}"));
        assert!(bad.contains(r));
        std::fs::write(&cfg_path, bad).unwrap();
        let res = octet(&[
            "generate",
            "--model",
            s(&m),
            "--adapter",
            s(&a),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ]);
        assert_refused(&res, &["adapter_config.json", "LoRA rank r = ", r]);
        let out = tmp.path().join("merged");
        let res = octet(&[
            "merge",
            "--model",
            s(&m),
            "--adapter",
            s(&a),
            "--out",
            s(&out),
        ]);
        assert_refused(&res, &["adapter_config.json", r]);
        assert_nothing_written(&out);
    }
}

/// The tiny GPT-J (vocabulary 301) with GPT-2's 50257-token tokenizer: text tokenizes to ids
/// past the embedding.
fn model_with_a_larger_tokenizer(tmp: &Path) -> PathBuf {
    let m = tmp.join("model");
    copy_dir(&fixture("tiny_gptj/hf_safetensors"), &m);
    std::fs::copy(
        fixture("tiny_gptj/gpt2_tokenizer/tokenizer.json"),
        m.join("tokenizer.json"),
    )
    .unwrap();
    m
}

#[test]
fn eval_and_generate_refuse_token_ids_outside_the_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with_a_larger_tokenizer(tmp.path());
    let data = tmp.path().join("text.txt");
    std::fs::write(
        &data,
        "The quick brown fox jumps over the lazy dog again and again.",
    )
    .unwrap();
    let r = octet(&[
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--ctx",
        "8",
        "--stride",
        "4",
    ]);
    assert_refused(&r, &["outside the model's vocabulary of 301"]);
    let r = octet(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "2",
    ]);
    assert_refused(
        &r,
        &[
            "the prompt: token id",
            "outside the model's vocabulary of 301",
        ],
    );
}

#[test]
fn train_refuses_held_out_token_ids_outside_the_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with_a_larger_tokenizer(tmp.path());
    let data = tmp.path().join("train.txt");
    let text: String = (0..200)
        .map(|i| format!("Line {i}: the quick brown fox.\n"))
        .collect();
    std::fs::write(&data, text).unwrap();
    let out = tmp.path().join("run");
    let r = octet(&[
        "train",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--steps",
        "1",
        "--seq-len",
        "16",
    ]);
    assert_refused(&r, &["train.txt", "outside the model's vocabulary of 301"]);
    assert_nothing_written(&out);
}

/// Ids past the vocabulary that reach the model itself, past every entry check (a library
/// caller, held-out data handed to `evaluate()`), are an error naming the id from the float
/// and the 8-bit embedding alike, never a panic; `octet eval` of the converted 8-bit model
/// refuses them with exit 1.
#[test]
fn ids_outside_the_vocabulary_reaching_the_embedding_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_with_a_larger_tokenizer(tmp.path());
    let q8 = tmp.path().join("q8");
    let (code, err) = octet(&["convert", "--model", s(&m), "--out", s(&q8)]);
    assert_eq!(code, Some(0), "{err}");
    let data = tmp.path().join("text.txt");
    std::fs::write(&data, "The quick brown fox jumps over the lazy dog.").unwrap();
    let r = octet(&[
        "eval",
        "--model",
        s(&q8),
        "--data",
        s(&data),
        "--ctx",
        "8",
        "--stride",
        "4",
    ]);
    assert_refused(&r, &["outside the model's vocabulary of 301"]);
    for (dir, embedding) in [(&m, "Embedding"), (&q8, "Bnb8Embedding")] {
        let mut loaded = load_model(dir, &LoadOptions::default()).unwrap();
        assert_eq!(
            loaded.graph.node("transformer.wte").unwrap().kind,
            embedding
        );
        let ids = Tensor::from_slice(&[5i64, 301, 2]).reshape([1, 3]);
        let err = tch::no_grad(|| loaded.model.forward(&ids))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("token id 301") && err.contains("vocabulary of 301"),
            "{embedding}: {err}"
        );
        let held_out = [octet::train::data::Sequence {
            input_ids: vec![1, 2, 400],
            labels: vec![1, 2, 400],
        }];
        let err = octet::train::trainer::evaluate(loaded.model.as_mut(), &held_out, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token id 400"), "{embedding}: {err}");
    }
}

#[test]
fn an_unknown_arch_in_octet_toml_names_octet_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("octet");
    octet::convert::convert(
        &fixture("tiny_gptj/hf_safetensors"),
        &m,
        &Default::default(),
    )
    .unwrap();
    let toml = std::fs::read_to_string(m.join("octet.toml")).unwrap();
    std::fs::write(
        m.join("octet.toml"),
        toml.replace("arch = \"gptj\"", "arch = \"nosuch\""),
    )
    .unwrap();
    let err = err_text(load_model(&m, &LoadOptions::default()));
    assert!(
        err.contains("octet.toml") && err.contains("nosuch"),
        "{err}"
    );
}

/// The tied tiny Llama GGUF with the value of metadata `key` overwritten by `value`'s bytes
/// (same width as the stored type).
fn gguf_with(tmp: &Path, key: &str, value: &[u8]) -> PathBuf {
    let mut b = std::fs::read(fixture("tiny_llama/tied.gguf")).unwrap();
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("no {key}"));
    let v = at + key.len() + 4; // the u32 type tag, then the value
    b[v..v + value.len()].copy_from_slice(value);
    let p = tmp.join("m.gguf");
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn gguf_inf_epsilon_is_refused_naming_the_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let g = gguf_with(
        tmp.path(),
        "llama.attention.layer_norm_rms_epsilon",
        &f32::INFINITY.to_le_bytes(),
    );
    let out = tmp.path().join("out");
    let r = octet(&["convert", "--model", s(&g), "--out", s(&out)]);
    assert_refused(
        &r,
        &["m.gguf", "llama.attention.layer_norm_rms_epsilon is inf"],
    );
    assert!(
        !r.1.contains("null") && !r.1.contains("config.json"),
        "{}",
        r.1
    );
    assert_nothing_written(&out);
}

#[test]
fn gguf_inf_rope_freq_base_is_refused_not_defaulted() {
    let tmp = tempfile::tempdir().unwrap();
    let g = gguf_with(
        tmp.path(),
        "llama.rope.freq_base",
        &f32::INFINITY.to_le_bytes(),
    );
    let err = octet::io::gguf::GgufFile::open(&g)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("m.gguf") && err.contains("llama.rope.freq_base is inf"),
        "{err}"
    );
}

#[test]
fn gguf_config_errors_name_the_gguf_file_not_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let g = gguf_with(tmp.path(), "llama.block_count", &u32::MAX.to_le_bytes());
    let out = tmp.path().join("out");
    let r = octet(&["convert", "--model", s(&g), "--out", s(&out)]);
    assert_refused(&r, &["m.gguf", "num_hidden_layers is 4294967295"]);
    assert!(!r.1.contains("config.json"), "{}", r.1);
    assert_nothing_written(&out);
    // A size the plugin's own check refuses is reported against the GGUF file too.
    let g = gguf_with(
        tmp.path(),
        "llama.attention.head_count",
        &3u32.to_le_bytes(),
    );
    let err = err_text(load_model(&g, &LoadOptions::default()));
    assert!(
        err.contains("m.gguf") && !err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn a_deflated_entry_declaring_more_than_deflate_can_encode_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("lying-size.bin");
    make_bad_bin("lying-size", &p);
    let err = err_text(octet::io::torch_bin::TorchBinFile::open(&p));
    assert!(
        err.contains("lying-size.bin") && err.contains("beyond what deflate can encode"),
        "{err}"
    );
}

#[test]
fn a_zip_bomb_storage_inflates_only_what_the_pickle_needs() {
    super::fuzz::run_isolated("safety_in::read_a_zip_bomb");
}

#[test]
#[ignore = "run in its own process by a_zip_bomb_storage_inflates_only_what_the_pickle_needs"]
fn read_a_zip_bomb() {
    use octet::io::TensorStore;
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bomb.bin");
    make_bad_bin("bomb", &p);
    assert!(std::fs::metadata(&p).unwrap().len() < 1 << 20);
    let before = super::fuzz_support::peak_rss_kib();
    let f = octet::io::torch_bin::TorchBinFile::open(&p).unwrap();
    assert_eq!(f.bytes("w").unwrap().as_ref(), &[0u8; 16]);
    let grown_mib = (super::fuzz_support::peak_rss_kib() - before) / 1024;
    assert!(
        grown_mib < 64,
        "peak RSS grew {grown_mib} MiB reading a 512 MiB bomb"
    );
}

#[test]
fn a_truncated_safetensors_file_is_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.safetensors");
    let b = std::fs::read(fixture("torch_bin/state.safetensors")).unwrap();
    std::fs::write(&p, &b[..b.len() - 100]).unwrap();
    let err = err_text(octet::io::safetensors::SafetensorsFile::open(&p));
    assert!(
        err.contains("t.safetensors")
            && (err.contains("truncated") || err.contains("not fully covered")),
        "{err}"
    );
}

/// Found by the fuzz suite (case 2962 of seed 0xc7e7f22): tokenizers 0.21 panics with
/// `Helper: Error("expected value", ...)` on malformed JSON inside `decoder`.
#[test]
fn a_tokenizer_json_with_a_malformed_decoder_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(fixture("tiny_gptj/hf_safetensors/tokenizer.json")).unwrap();
    let bad = good.replacen("\"decoder\": {", "\"decoder\": y", 1);
    assert_ne!(good, bad);
    std::fs::write(tmp.path().join("tokenizer.json"), bad).unwrap();
    let err = err_text(octet::tokenizer::Tokenizer::from_dir(tmp.path()));
    assert!(
        err.contains("tokenizer.json") && err.contains("invalid JSON"),
        "{err}"
    );
}

/// Found by the fuzz suite (cases 22337 and 157452 of seed 12345): `"n_positions": 0` in the
/// GPT-J 8-bit folder's config.json built a model whose rotary table libtorch could not narrow
/// (a panic from tch on the first forward pass).
#[test]
fn a_config_with_zero_positions_is_refused_naming_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("model");
    copy_dir(&fixture("tiny_gptj/gptj8bit"), &m);
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    let bad = cfg.replace("\"n_positions\": 64", "\"n_positions\": 0");
    assert_ne!(cfg, bad);
    std::fs::write(m.join("config.json"), bad).unwrap();
    let err = err_text(load_model(&m, &LoadOptions::default()));
    assert!(
        err.contains("config.json") && err.contains("n_positions is 0"),
        "{err}"
    );
}

/// GGUFs whose `token_embd.weight` or `blk.0.attn_q.weight` has no dimensions: reading the
/// vocabulary from the embedding's first dimension, and undoing the q row permutation,
/// indexed an empty shape.
#[test]
fn a_gguf_tensor_without_dimensions_is_an_error_not_a_panic() {
    use octet::io::TensorStore;
    let tmp = tempfile::tempdir().unwrap();
    for name in ["token_embd.weight", "blk.0.attn_q.weight"] {
        let mut b = std::fs::read(fixture("tiny_llama/tied.gguf")).unwrap();
        let at = b
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .unwrap()
            + name.len();
        let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        b.splice(at..at + 4 + 8 * n_dims, 0u32.to_le_bytes());
        let p = tmp.path().join("m.gguf");
        std::fs::write(&p, b).unwrap();
        match octet::io::gguf::GgufFile::open(&p) {
            Err(e) => assert!(e.to_string().contains("m.gguf"), "{name}: {e}"),
            Ok(g) => {
                let _ = g.config();
                for n in g.names() {
                    let _ = g.bytes(&n);
                }
                let err = err_text(load_model(&p, &LoadOptions::default()));
                assert!(err.contains("m.gguf"), "{name}: {err}");
            }
        }
    }
}
