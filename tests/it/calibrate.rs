//! `octet convert --calibrate`: GPTQ rounding against an independent float64 reference
//! (scripts/gen_gptq_reference.py: transformers + bitsandbytes), and its bad inputs.
use crate::common;
use crate::common::{assert_mentions, convert, convert_ok, s};
use octet::manifest::Manifest;
use std::path::Path;
use tch::{Kind, Tensor};

const SCHEME: [&str; 6] = [
    "--code",
    "linear",
    "--block-size",
    "64",
    "--double-quant",
    "true",
];

fn reference(rel: &str) -> std::path::PathBuf {
    common::fixture(&format!("gptq/{rel}"))
}

/// Each 8-bit weight's code values (`code[q]`, stored layout) in an octet folder.
fn code_values(dir: &Path, name: &str) -> Tensor {
    let t = common::load_safetensors(&dir.join("model.safetensors"));
    let module = name.strip_suffix(".weight").unwrap();
    let code = &t[&format!("{module}.code")];
    code.index_select(0, &t[name].to_kind(Kind::Int64).flatten(0, -1))
        .view(t[name].size().as_slice())
}

fn agreement(a: &Tensor, b: &Tensor) -> f64 {
    a.eq_tensor(b)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

#[test]
fn calibrated_weights_are_rounded_like_the_gptq_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = reference("calib.txt");
    // A tied Llama (its token table rounded through the LM head's inputs) and GPT-2, whose
    // Conv1D weights are stored [in, out] with blocks running across the rows.
    for (model, weights) in [("llama", 15), ("gpt2", 9)] {
        let src = reference(model);
        let ours = tmp.path().join(format!("{model}-gptq"));
        let mut args = SCHEME.to_vec();
        args.extend(["--calibrate", s(&calib)]);
        let (ok, stdout, stderr) = convert(&src, &ours, &args);
        assert!(ok, "{stderr}");
        assert_mentions(
            &stdout,
            &[&format!("{weights} of {weights} weights rounded with GPTQ")],
        );
        let nearest = tmp.path().join(format!("{model}-nearest"));
        let mut plain = SCHEME.to_vec();
        plain.extend(["--calibrate", "none"]);
        convert_ok(&src, &nearest, &plain);

        let gptq = common::load_safetensors(&src.join("gptq.safetensors"));
        let rtn = common::load_safetensors(&src.join("nearest.safetensors"));
        assert_eq!(gptq.len(), weights);
        let (ours_t, nearest_t) = (
            common::load_safetensors(&ours.join("model.safetensors")),
            common::load_safetensors(&nearest.join("model.safetensors")),
        );
        // f32 here against float64 there: a value on a rounding boundary may round the other
        // way, and the difference is fed forward along its row.
        let mut all = 0.0;
        for (name, want) in &gptq {
            let got = code_values(&ours, name);
            let same = agreement(&got, want);
            all += same / weights as f64;
            assert!(
                same >= 0.99,
                "{model} {name}: {same} of codes as the reference"
            );
            // GPTQ really moved codes, and round-to-nearest is the reference's.
            assert!(agreement(want, &rtn[name]) < 0.95, "{model} {name}");
            assert!(agreement(&code_values(&nearest, name), &rtn[name]) >= 0.999);
            // The stored scales are round-to-nearest's, byte for byte.
            let module = name.strip_suffix(".weight").unwrap();
            for p in ["absmax_q", "absmax_scale", "absmax_offset", "code"] {
                let key = format!("{module}.{p}");
                assert!(ours_t[&key].equal(&nearest_t[&key]), "{key}");
            }
        }
        assert!(all >= 0.998, "{model}: {all} of codes as the reference");
        let m = Manifest::read(&ours).unwrap().unwrap();
        let cal = m.calibration.expect("calibration recorded");
        assert_eq!((cal.tokens, cal.weights), (2048, weights));
        assert_eq!(cal.data.name, "calib.txt");
        assert!(m.tensors.iter().all(|t| t.calibrated));
        assert!(Manifest::read(&nearest)
            .unwrap()
            .unwrap()
            .calibration
            .is_none());
        // What is written reads back and runs.
        let (ok, _, stderr) = common::octet(&[
            "eval",
            "--model",
            s(&ours),
            "--data",
            s(&calib),
            "--max-tokens",
            "256",
        ]);
        assert!(ok, "{stderr}");
    }
}

#[test]
fn calibration_refuses_bad_input_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let model = reference("llama");
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| {
        let mut args = if extra.contains(&"--bits") {
            Vec::new()
        } else {
            SCHEME.to_vec()
        };
        args.extend_from_slice(extra);
        let r = convert(&model, &out, &args);
        assert!(!r.0, "accepted {extra:?}");
        assert!(!out.exists(), "{extra:?} left {}", out.display());
        r.2
    };
    let missing = tmp.path().join("missing.txt");
    assert_mentions(&run(&["--calibrate", s(&missing)]), &["missing.txt"]);
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "hi").unwrap();
    assert_mentions(&run(&["--calibrate", s(&short)]), &["short.txt", "tokens"]);
    let binary = tmp.path().join("binary.txt");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80].repeat(64)).unwrap();
    assert_mentions(&run(&["--calibrate", s(&binary)]), &["binary.txt", "UTF-8"]);
    let calib = reference("calib.txt");
    let four = run(&["--calibrate", s(&calib), "--bits", "4"]);
    assert_mentions(&four, &["--calibrate", "--bits 4"]);
    // A model folder without a tokenizer cannot tokenize the text.
    let bare = tmp.path().join("bare");
    common::copy_dir(&model, &bare);
    std::fs::remove_file(bare.join("tokenizer.json")).unwrap();
    let mut args = SCHEME.to_vec();
    args.extend(["--calibrate", s(&calib)]);
    let (ok, _, stderr) = convert(&bare, &out, &args);
    assert!(!ok && !out.exists());
    assert_mentions(&stderr, &["--calibrate", "tokenizer"]);
}
