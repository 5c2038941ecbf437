//! Build-time set-up of every binary:
//! - an rpath to libtorch's lib dir, so `octet` runs without LD_LIBRARY_PATH;
//! - libtorch's CUDA libraries linked even though nothing references them by symbol (the
//!   linker's default `--as-needed` would drop them, and then CUDA is never registered and
//!   `cuda::is_available()` is false on a GPU machine); skipped for a CPU-only libtorch;
//! - the git commit and libtorch version, for `octet env` (empty when unknown).
use std::path::{Path, PathBuf};
use std::process::Command;

/// Libraries whose presence makes a libtorch a CUDA build; linked in this order.
const CUDA_LIBS: [&str; 2] = ["torch_cuda", "c10_cuda"];

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let root = PathBuf::from(libtorch);
        let lib = root.join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        link_cuda(&lib);
        if let Some(v) = libtorch_version(&root, "__version__") {
            println!("cargo:rustc-env=OCTET_LIBTORCH_VERSION={v}");
        }
        if let Some(v) = libtorch_version(&root, "cuda") {
            println!("cargo:rustc-env=OCTET_LIBTORCH_CUDA={v}");
        }
    }
    embed_git_commit();
}

fn link_cuda(lib: &Path) {
    let present: Vec<&str> = CUDA_LIBS
        .iter()
        .copied()
        .filter(|l| lib.join(format!("lib{l}.so")).is_file())
        .collect();
    if present.is_empty() {
        return;
    }
    println!("cargo:rustc-link-arg=-L{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for l in &present {
        println!("cargo:rustc-link-arg=-l{l}");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-env=OCTET_LINKED_CUDA=1");
}

/// A field of a pip torch's `version.py` at `root` (`__version__`, `cuda`); for a standalone
/// libtorch, its `build-version` stands for `__version__`.
fn libtorch_version(root: &Path, field: &str) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let line = text
            .lines()
            .find(|l| l.split(['=', ':']).next().map(str::trim) == Some(field))?;
        return Some(line.split(['\'', '"']).nth(1)?.to_string());
    }
    let text = std::fs::read_to_string(root.join("build-version")).ok()?;
    (field == "__version__").then(|| text.trim().to_string())
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn embed_git_commit() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_default();
    println!("cargo:rustc-env=OCTET_GIT_COMMIT={commit}");
    // A new commit moves the worktree's HEAD reflog; re-running then keeps the hash current.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        for f in ["HEAD", "logs/HEAD"] {
            let p = Path::new(&dir).join(f);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}
