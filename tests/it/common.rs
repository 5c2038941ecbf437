//! Helpers shared by the integration tests.
#![allow(dead_code)]
use octet::model::{CausalLm, LayerCache};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Path of a generated fixture; fails with a hint when `make fixtures` has not run.
/// `OCTET_FIXTURES` points elsewhere (a test binary run on another machine, e.g. a GPU box).
pub fn fixture(rel: &str) -> PathBuf {
    let p = std::env::var_os("OCTET_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/generated"))
        .join(rel);
    assert!(
        p.exists(),
        "missing fixture {} (run `make fixtures`)",
        p.display()
    );
    p
}

/// Loads every tensor of a safetensors file into CPU tensors, keyed by name.
pub fn load_safetensors(path: &std::path::Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path)
        .expect("read safetensors")
        .into_iter()
        .collect()
}

/// Runs the `octet` binary; returns (success, stdout, stderr).
pub fn octet(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_octet"))
        .args(args)
        .output()
        .expect("run octet");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The project venv's Python.
pub fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

/// Runs a script from `scripts/` with the venv's Python; panics with its stderr on failure
/// and returns its stdout.
pub fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = std::process::Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs a script from `scripts/` and returns its stdout parsed as JSON.
pub fn script_json(script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let stdout = run_script(script, args);
    serde_json::from_slice(&stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&stdout)
        )
    })
}

/// Copies a folder's files (not recursive) into a new folder.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Serialises tests that seed libtorch's one global generator and then draw from it (LoRA
/// initialisation, dropout): all areas share one test process.
pub fn global_rng() -> std::sync::MutexGuard<'static, ()> {
    static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// A path as `&str`, for argument lists.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The golden tensors a fixture generator wrote for `family` (`tiny_gpt2`, …).
pub fn reference(family: &str) -> BTreeMap<String, Tensor> {
    load_safetensors(&fixture(&format!("{family}/reference.safetensors")))
}

/// `octet convert --model MODEL --out OUT EXTRA…`; returns (success, stdout, stderr).
pub fn convert(model: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["convert", "--model", s(model), "--out", s(out)];
    args.extend_from_slice(extra);
    octet(&args)
}

/// Writes `ids` as `input_ids` where the Python oracles (hf_logits.py, …) read them.
pub fn ids_file(dir: &Path, ids: &Tensor) -> PathBuf {
    let p = dir.join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", ids)], &p).unwrap();
    p
}

/// transformers' logits for a model folder (and optionally a PEFT adapter on it).
pub fn hf_logits(model: &Path, ids: &Path, out: &Path, adapter: Option<&Path>) -> Tensor {
    let mut args = vec![model.as_os_str(), ids.as_os_str(), out.as_os_str()];
    if let Some(a) = adapter {
        args.push(a.as_os_str());
    }
    run_script("hf_logits.py", &args);
    load_safetensors(out)["logits"].shallow_clone()
}

/// A model's logits when the ids are fed in two pieces, `[0, split)` then the rest, through
/// per-block KV caches: equal to one full forward pass when the cache is right.
pub fn cached_logits(model: &dyn CausalLm, ids: &Tensor, split: i64) -> Tensor {
    let n = model.info().blocks;
    let mut caches: Vec<LayerCache> = (0..n).map(|_| LayerCache::default()).collect();
    let t = ids.size()[1];
    let mut out = Vec::new();
    for (start, len) in [(0, split), (split, t - split)] {
        let mut h = model.embed(&ids.narrow(1, start, len)).unwrap();
        for (i, c) in caches.iter_mut().enumerate() {
            h = model.block(i, &h, Some(c)).unwrap();
        }
        out.push(model.head(&h).unwrap());
    }
    Tensor::cat(&out, 1)
}

/// A failed result's message.
pub fn err_text<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `text` mentions every needle.
pub fn assert_mentions(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "lacks {n:?}: {text}");
    }
}

/// Replaces `from` by `to` in a text file, asserting the text changed.
pub fn edit_text(path: &Path, from: &str, to: &str) {
    let old = std::fs::read_to_string(path).unwrap();
    let new = old.replacen(from, to, 1);
    assert_ne!(old, new, "{} has no {from:?}", path.display());
    std::fs::write(path, new).unwrap();
}

/// Flags for a conversion that rounds to nearest with bitsandbytes' dynamic code and f32
/// block scales (the default before calibrated conversion), for tests that compare it with
/// quantizing on load or with bitsandbytes.
pub const NEAREST_DYNAMIC: [&str; 6] = [
    "--code",
    "dynamic",
    "--double-quant",
    "false",
    "--calibrate",
    "none",
];

/// [`NEAREST_DYNAMIC`] followed by `extra`.
pub fn nearest_dynamic<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = NEAREST_DYNAMIC.to_vec();
    v.extend_from_slice(extra);
    v
}

/// As [`convert`], asserting success.
pub fn convert_ok(model: &Path, out: &Path, extra: &[&str]) {
    let (ok, _, stderr) = convert(model, out, extra);
    assert!(ok, "convert {}: {stderr}", model.display());
}
