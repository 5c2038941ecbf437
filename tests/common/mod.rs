//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

/// Path of a generated fixture; fails with a hint when `make fixtures` has not run.
pub fn fixture(rel: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/generated")
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
