//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

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

/// Runs a script from `scripts/` with the venv's Python; panics with its stderr on failure.
pub fn run_script(script: &str, args: &[&std::ffi::OsStr]) {
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
