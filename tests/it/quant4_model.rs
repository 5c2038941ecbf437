//! 4-bit folders end to end on the tiny GPT-J: convert (codes and absmax equal to
//! bitsandbytes' `quantize_4bit` of the source weights), inspect, eval, generate, QLoRA train,
//! merge to hf-f16, octet8 and octet4, double-quantized scales (bitsandbytes'
//! `compress_statistics`), and the refusals of bad 4-bit input.
use crate::common::{self, s};
use octet::nn::q4::Q4Weight;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn hf() -> PathBuf {
    common::fixture("tiny_gptj/hf_safetensors")
}

fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("data.txt");
    std::fs::write(
        &p,
        "the quick brown fox jumps over the lazy dog. ".repeat(60),
    )
    .unwrap();
    p
}

fn ppl(model: &Path, data: &Path) -> f64 {
    let (ok, out, err) = common::octet(&["eval", "--json", "--model", s(model), "--data", s(data)]);
    assert!(ok, "eval {}: {err}", model.display());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["perplexity"]
        .as_f64()
        .unwrap_or_else(|| panic!("no perplexity in {out}"))
}

#[test]
fn four_bit_folders_convert_like_bitsandbytes_and_run_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let eight = tmp.path().join("q8");
    common::convert_ok(&hf(), &eight, &[]);
    let base = ppl(&eight, &data);
    for (code, block) in [("nf4", "64"), ("fp4", "32"), ("fitted", "256")] {
        let out = tmp.path().join(format!("q4_{code}"));
        common::convert_ok(
            &hf(),
            &out,
            &["--bits", "4", "--code", code, "--block-size", block],
        );
        let manifest = std::fs::read_to_string(out.join("octet.toml")).unwrap();
        common::assert_mentions(
            &manifest,
            &["[four_bit]", "bits = 4", &format!("code = \"{code}\"")],
        );
        let (ok, inspect, err) = common::octet(&["inspect", s(&out)]);
        assert!(ok, "{err}");
        assert!(inspect.contains("Bnb4Linear"), "{inspect}");
        assert!(
            inspect.contains(&format!("4-bit Linear weights: {code} code")),
            "{inspect}"
        );
        if code != "fitted" {
            let v = common::script_json(
                "bnb4_folder_check.py",
                &[
                    hf().join("model.safetensors").as_os_str(),
                    out.as_os_str(),
                    OsStr::new(code),
                    OsStr::new(block),
                ],
            );
            assert!(v["modules"].as_u64().unwrap() >= 8, "{v}");
            assert_eq!(v["mismatches"], serde_json::json!([]), "{code}");
        }
        // Bit-identity with bitsandbytes is checked above; this is a sanity band. On this
        // random 72-wide model 4-bit moves perplexity by several percent (nf4: -8.3% at
        // block 64), so the band only catches a broken load.
        let p = ppl(&out, &data);
        assert!(
            (p / base - 1.0).abs() < 0.25,
            "{code}: ppl {p} vs 8-bit {base}"
        );
    }
    let q4 = tmp.path().join("q4_nf4");
    let (ok, text, err) = common::octet(&[
        "generate",
        "--model",
        s(&q4),
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "5",
    ]);
    assert!(ok && !text.is_empty(), "{err}");

    let run = tmp.path().join("run");
    let (ok, _, err) = common::octet(&[
        "train",
        "--model",
        s(&q4),
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--steps",
        "4",
        "--seq-len",
        "32",
        // Large enough that the merged delta outgrows half a 4-bit code step: a smaller one
        // re-quantizes back to the base codes, and octet4 would then equal the base.
        "--lr",
        "3e-2",
        "--lora-r",
        "4",
        "--targets",
        "q_proj,v_proj",
    ]);
    assert!(ok, "QLoRA train on a 4-bit folder: {err}");
    let adapter = run.clone();
    let mut merged_ppl = Vec::new();
    for format in ["hf-f16", "octet8", "octet4"] {
        let merged = tmp.path().join(format!("merged_{format}"));
        let (ok, _, err) = common::octet(&[
            "merge",
            "--model",
            s(&q4),
            "--adapter",
            s(&adapter),
            "--out",
            s(&merged),
            "--format",
            format,
        ]);
        assert!(ok, "merge {format}: {err}");
        let p = ppl(&merged, &data);
        assert!(p.is_finite() && p > 1.0, "{format}: {p}");
        merged_ppl.push(p);
    }
    // octet4 re-quantizes the merged Linear weights to 4 bits. A second 4-bit rounding moves
    // this random tiny model's perplexity by several percent, so the reference is the float
    // merge converted to the same 4-bit code (quantizer bit-identical to bitsandbytes, above):
    // the two differ only where the f16 rounding of the float merge flips a code.
    let requant = tmp.path().join("merged_hf-f16_nf4");
    common::convert_ok(
        &tmp.path().join("merged_hf-f16"),
        &requant,
        &["--bits", "4", "--code", "nf4", "--block-size", "64"],
    );
    let reference = ppl(&requant, &data);
    let untrained = ppl(&q4, &data);
    assert!(
        merged_ppl[2] < 0.8 * untrained,
        "octet4 merge {} lost the adapter (base {untrained})",
        merged_ppl[2]
    );
    assert!(
        (merged_ppl[2] / reference - 1.0).abs() < 0.01,
        "octet4 merge {} vs the float merge converted to nf4 {reference} (float merge {})",
        merged_ppl[2],
        merged_ppl[0]
    );
    let octet4 = tmp.path().join("merged_octet4");
    let manifest = std::fs::read_to_string(octet4.join("octet.toml")).unwrap();
    common::assert_mentions(
        &manifest,
        &["format_version = 3", "[four_bit]", "code = \"nf4\""],
    );
    let before = common::load_safetensors(&q4.join("model.safetensors"));
    let after = common::load_safetensors(&octet4.join("model.safetensors"));
    for p in ["weight", "absmax", "code"] {
        // Left alone by the adapter: its bytes as stored. Adapted: re-quantized.
        let kept = format!("transformer.h.0.mlp.fc_in.{p}");
        assert!(after[&kept].equal(&before[&kept]), "{kept}");
    }
    let adapted = "transformer.h.0.attn.q_proj.weight";
    assert_eq!(after[adapted].kind(), Kind::Uint8);
    assert!(
        !after[adapted].equal(&before[adapted]),
        "{adapted} kept its base bytes"
    );
    // A module the adapter leaves alone comes out of hf-f16 as its 4-bit values in f16.
    let stored = common::load_safetensors(&q4.join("model.safetensors"));
    let merged = common::load_safetensors(&tmp.path().join("merged_hf-f16/model.safetensors"));
    let m = "transformer.h.0.mlp.fc_in";
    let w = Q4Weight::from_stored(
        m,
        stored[&format!("{m}.weight")].shallow_clone(),
        stored[&format!("{m}.absmax")].shallow_clone(),
        &stored[&format!("{m}.code")],
    )
    .unwrap()
    .dequantize(Kind::Half)
    .unwrap();
    let got: &Tensor = &merged[&format!("{m}.weight")];
    assert_eq!(got.kind(), Kind::Half);
    assert!(got.equal(&w), "{m} differs from its 4-bit values");
}

#[test]
fn bad_four_bit_input_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = common::convert(&hf(), &tmp.path().join("a"), &["--bits", "3"]);
    assert!(!ok);
    common::assert_mentions(&err, &["--bits 3", "8 or 4"]);
    let (ok, _, err) = common::convert(
        &hf(),
        &tmp.path().join("b"),
        &["--bits", "4", "--block-size", "48"],
    );
    assert!(!ok);
    common::assert_mentions(&err, &["block size 48", "not supported"]);
    let (ok, _, err) = common::convert(
        &hf(),
        &tmp.path().join("c"),
        &["--bits", "4", "--code", "dynamic"],
    );
    assert!(!ok);
    common::assert_mentions(&err, &["dynamic", "nf4"]);
    assert!(!tmp.path().join("a").exists() && !tmp.path().join("b").exists());

    // An absmax table cut short no longer fits the weight: refused naming file and module.
    let good = tmp.path().join("q4");
    common::convert_ok(&hf(), &good, &["--bits", "4"]);
    let file = good.join("model.safetensors");
    let mut all: Vec<(String, Tensor)> = common::load_safetensors(&file).into_iter().collect();
    let m = "transformer.h.1.attn.q_proj.absmax";
    for (n, t) in &mut all {
        if n == m {
            *t = t.narrow(0, 0, t.size()[0] - 1);
        }
    }
    Tensor::write_safetensors(&all, &file).unwrap();
    let data = text_file(tmp.path());
    let (ok, _, err) = common::octet(&["eval", "--model", s(&good), "--data", s(&data)]);
    assert!(!ok);
    common::assert_mentions(
        &err,
        &["model.safetensors", "transformer.h.1.attn.q_proj", "absmax"],
    );
}

#[test]
fn double_quantized_four_bit_scales_match_bitsandbytes_and_load() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let plain = tmp.path().join("plain");
    common::convert_ok(&hf(), &plain, &["--bits", "4"]);
    let dq = tmp.path().join("dq");
    common::convert_ok(&hf(), &dq, &["--bits", "4", "--double-quant", "true"]);
    let stored = common::load_safetensors(&dq.join("model.safetensors"));
    let m = "transformer.h.1.attn.q_proj";
    assert_eq!(stored[&format!("{m}.absmax_q")].kind(), Kind::Uint8);
    assert!(!stored.contains_key(&format!("{m}.absmax")));
    // Codes, 8-bit scales, group absmax and offset as quantize_4bit(compress_statistics=True).
    let v = common::script_json(
        "bnb4_folder_check.py",
        &[
            hf().join("model.safetensors").as_os_str(),
            dq.as_os_str(),
            OsStr::new("nf4"),
            OsStr::new("64"),
        ],
    );
    assert!(v["modules"].as_u64().unwrap() >= 8, "{v}");
    assert_eq!(v["mismatches"], serde_json::json!([]));
    // Fewer bytes, nearly the same model.
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&dq) < size(&plain),
        "{} vs {}",
        size(&dq),
        size(&plain)
    );
    let (p, q) = (ppl(&plain, &data), ppl(&dq, &data));
    assert!((q / p - 1.0).abs() < 0.02, "double-quantized {q} vs {p}");
    let (ok, inspect, err) = common::octet(&["inspect", s(&dq)]);
    assert!(ok && inspect.contains("absmax_q"), "{err}{inspect}");
}

#[test]
fn a_four_bit_folder_needs_a_reader_that_knows_four_bit() {
    use octet::manifest::{FormatFeature, Manifest, FORMAT_VERSION};
    let tmp = tempfile::tempdir().unwrap();
    let q4 = tmp.path().join("q4");
    common::convert_ok(&hf(), &q4, &["--bits", "4"]);
    let q8 = tmp.path().join("q8");
    common::convert_ok(&hf(), &q8, &["--double-quant", "true"]);
    assert_eq!(FormatFeature::FourBit.since(), FORMAT_VERSION);
    assert_eq!(Manifest::read(&q4).unwrap().unwrap().format_version, 3);
    // The last reader without 4-bit weights (format version 2) refuses it by its manifest,
    // before reading any tensor; it still reads an 8-bit folder.
    let e = common::err_text(Manifest::check_readable_by(&q4, 2));
    common::assert_mentions(&e, &["octet.toml", "format_version 3", "newer octet"]);
    Manifest::check_readable_by(&q8, 2).unwrap();
    Manifest::check_readable_by(&q4, FORMAT_VERSION).unwrap();
}

#[test]
fn a_corrupted_double_quant_table_in_a_four_bit_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dq = tmp.path().join("dq");
    common::convert_ok(&hf(), &dq, &["--bits", "4", "--double-quant", "true"]);
    let file = dq.join("model.safetensors");
    let mut all: Vec<(String, Tensor)> = common::load_safetensors(&file).into_iter().collect();
    let m = "transformer.h.1.mlp.fc_in.absmax_q";
    for (n, t) in &mut all {
        if n == m {
            *t = t.narrow(0, 0, t.size()[0] - 1);
        }
    }
    Tensor::write_safetensors(&all, &file).unwrap();
    let data = text_file(tmp.path());
    let (ok, _, err) = common::octet(&["eval", "--model", s(&dq), "--data", s(&data)]);
    assert!(!ok);
    common::assert_mentions(
        &err,
        &["model.safetensors", "transformer.h.1.mlp.fc_in", "absmax"],
    );
}
