//! The 8-bit folder format: version-1 folders (written without octet,
//! scripts/gen_octet_v1_folder.py) still load, newer versions are refused, every code × block
//! size × scale layout reads back what was written, and a corrupted double-quantized table is a
//! clear error.
use crate::common;
use crate::common::max_abs_diff;

use octet::convert::{convert, ConvertOptions};
use octet::load::{load_model, LoadOptions, QuantizeOptions};
use octet::manifest::{Manifest, FORMAT_VERSION};
use octet::nn::q8::Q8Weight;
use octet::quant::{BlockSize, CodeKind};
use octet::source::ModelSource;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn v1_folder() -> PathBuf {
    common::fixture("quant8/octet_v1_gptj")
}

fn tiny_gptj() -> PathBuf {
    common::fixture("tiny_gptj/hf_safetensors")
}

fn convert_with(out: &Path, code: CodeKind, block: i64, double_quant: bool) {
    let opts = ConvertOptions {
        quantize: QuantizeOptions {
            block: Some(BlockSize::new(block).unwrap()),
            code,
            double_quant,
            ..Default::default()
        },
        ..Default::default()
    };
    convert(&tiny_gptj(), out, &opts).unwrap();
}

#[test]
fn a_version_1_folder_loads_and_matches_transformers() {
    let dir = v1_folder();
    let m = Manifest::read(&dir).unwrap().unwrap();
    assert_eq!(
        m.format_version, 1,
        "folders without the field are version 1"
    );
    let reference = common::load_safetensors(&dir.join("reference.safetensors"));
    let model = load_model(&dir, &LoadOptions::default()).unwrap();
    let ours = tch::no_grad(|| model.model.forward(&reference["input_ids"]).unwrap());
    let d = max_abs_diff(&ours, &reference["logits"]);
    assert!(
        d < 1e-4,
        "max |diff| {d} against transformers on the same weights"
    );
    let (ok, stdout, stderr) = common::octet(&["inspect", dir.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("octet format: block size 64") && stdout.contains("Bnb8Linear"),
        "{stdout}"
    );
}

#[test]
fn a_newer_format_version_is_refused_naming_the_file_and_version() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("newer");
    common::copy_dir(&v1_folder(), &dir);
    let toml = dir.join("octet.toml");
    let newer = FORMAT_VERSION + 1;
    let text = std::fs::read_to_string(&toml).unwrap();
    // A newer writer may also use values this reader cannot parse: the version comes first.
    let text = text.replace("code = \"dynamic\"", "code = \"from-the-future\"");
    std::fs::write(&toml, format!("format_version = {newer}\n{text}")).unwrap();
    let d = dir.to_str().unwrap();
    for args in [
        vec!["inspect", d],
        vec!["inspect", d, "--arch", "gptj"],
        vec!["eval", "--model", d, "--data", toml.to_str().unwrap()],
    ] {
        let (ok, _, stderr) = common::octet(&args);
        assert!(!ok, "{args:?} accepted a version-{newer} folder");
        assert!(
            stderr.contains("octet.toml")
                && stderr.contains(&format!("format_version {newer}"))
                && stderr.contains("newer octet"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    std::fs::write(&toml, "format_version = \"two\"\n").unwrap();
    let (ok, _, stderr) = common::octet(&["inspect", d]);
    assert!(
        !ok && stderr.contains("octet.toml") && stderr.contains("format_version"),
        "{stderr}"
    );
}

/// Each quantized weight of `dir` de-quantized by the reader, against the source's floats:
/// the relative MSE must equal the one the writer recorded in octet.toml.
fn check_reads_back_what_was_written(dir: &Path) -> f64 {
    let src = ModelSource::open(&tiny_gptj(), "auto").unwrap();
    let out = ModelSource::open(dir, "auto").unwrap();
    let manifest = Manifest::read(dir).unwrap().unwrap();
    let mut worst = 0f64;
    let mut checked = 0;
    for node in &out.graph.nodes {
        if !node.kind.starts_with("Bnb8") {
            continue;
        }
        let name = node.tensor_name("weight");
        let ours = Q8Weight::read_module_f32(out.store.as_ref(), node, Device::Cpu).unwrap();
        let x = src.store.tensor(&name).unwrap().to_kind(Kind::Float);
        let err = (&ours["weight"] - &x)
            .square()
            .sum(Kind::Double)
            .double_value(&[])
            / x.square().sum(Kind::Double).double_value(&[]);
        let recorded = manifest.tensors.iter().find(|t| t.name == name).unwrap();
        assert!(
            (err - recorded.rel_mse).abs() <= 1e-6 * recorded.rel_mse.max(1e-12),
            "{}: read back {err}, written {}",
            name,
            recorded.rel_mse
        );
        assert_eq!(recorded.code, Some(manifest.code), "{name}");
        worst = worst.max(err);
        checked += 1;
    }
    assert_eq!(checked, 14, "{}", dir.display());
    worst
}

#[test]
fn every_code_block_size_and_scale_layout_reads_back_what_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    for code in [CodeKind::Dynamic, CodeKind::Fitted, CodeKind::Linear] {
        for block in [64, 256, 4096] {
            for dq in [false, true] {
                let out = tmp.path().join(format!("{code:?}-{block}-{dq}"));
                convert_with(&out, code, block, dq);
                let m = Manifest::read(&out).unwrap().unwrap();
                let needs_2 = dq || code == CodeKind::Linear;
                assert_eq!(m.format_version, if needs_2 { 2 } else { 1 }, "{out:?}");
                let stored = common::load_safetensors(&out.join("model.safetensors"));
                let key = "transformer.h.0.mlp.fc_in";
                assert_eq!(stored.contains_key(&format!("{key}.absmax")), !dq);
                assert_eq!(stored.contains_key(&format!("{key}.absmax_q")), dq);
                let worst = check_reads_back_what_was_written(&out);
                assert!(worst < 5e-3, "{out:?}: worst rel MSE {worst}");
                let model = load_model(&out, &LoadOptions::default()).unwrap();
                let ids = Tensor::from_slice(&[1i64, 5, 9, 200]).unsqueeze(0);
                let y = tch::no_grad(|| model.model.forward(&ids).unwrap());
                assert!(y.isfinite().all().int64_value(&[]) == 1);
            }
        }
    }
}

#[test]
fn a_corrupted_double_quant_table_is_refused_with_file_and_module() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dq");
    convert_with(&out, CodeKind::Fitted, 64, true);
    let file = out.join("model.safetensors");
    let mut tensors = common::load_safetensors(&file);
    let key = "transformer.h.1.mlp.fc_out.absmax_scale";
    let t = tensors[key].shallow_clone();
    let longer = Tensor::cat(&[&t, &t], 0);
    tensors.insert(key.to_string(), longer);
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&named, &file).unwrap();
    let (ok, _, stderr) = common::octet(&["inspect", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("model.safetensors")
            && stderr.contains("transformer.h.1.mlp.fc_out")
            && stderr.contains("absmax_scale"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn double_quantized_scales_cost_8_13_bits_and_convert_reports_the_worst_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dq64");
    let flags = [
        "--code",
        "linear",
        "--block-size",
        "64",
        "--double-quant",
        "true",
    ];
    let (ok, stdout, stderr) = common::convert(&tiny_gptj(), &out, &flags);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("worst") && stdout.contains("linear"),
        "{stdout}"
    );
    let m = Manifest::read(&out).unwrap().unwrap();
    assert_eq!(
        (m.block_size, m.code, m.format_version),
        (64, CodeKind::Linear, 2)
    );
    let stored = common::load_safetensors(&out.join("model.safetensors"));
    // Bits per weight of the biggest matrix: bytes, 8-bit scales, group scales, offset, code.
    let w = &stored["transformer.h.0.mlp.fc_in.weight"];
    let n = w.numel() as f64;
    let bytes: usize = ["weight", "absmax_q", "absmax_scale", "absmax_offset"]
        .iter()
        .map(|p| {
            let t = &stored[&format!("transformer.h.0.mlp.fc_in.{p}")];
            t.numel() * t.kind().elt_size_in_bytes()
        })
        .sum();
    let bits = 8.0 * bytes as f64 / n;
    assert!(bits <= 8.15, "{bits} bits per weight");
    let (ok, stdout, stderr) = common::octet(&["inspect", out.to_str().unwrap(), "--errors", "3"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("worst 3 of 14") && stdout.contains("linear"),
        "{stdout}"
    );
}
