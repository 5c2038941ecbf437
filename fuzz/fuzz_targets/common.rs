//! Shared by the targets: the readers take paths, so each input is written to a file first.
use octet::io::TensorStore;
use std::path::PathBuf;

/// Writes `data` as `name` in a fresh temporary folder (kept alive by the returned guard).
pub fn as_file(name: &str, data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let p = dir.path().join(name);
    std::fs::write(&p, data).expect("write the input");
    (dir, p)
}

/// Reads every tensor of a store; errors are fine, panics are findings.
pub fn read_all(store: &dyn TensorStore) {
    for name in store.names() {
        let _ = store.meta(&name);
        let _ = octet::load::read_tensor(store, &name);
    }
}
