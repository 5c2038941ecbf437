//! Build-time set-up of every binary:
//! - an rpath to libtorch's lib dir, so `octet` runs without LD_LIBRARY_PATH;
//! - libtorch's CUDA libraries linked even though nothing references them by symbol (the
//!   linker's default `--as-needed` would drop them, and then CUDA is never registered and
//!   `cuda::is_available()` is false on a GPU machine); skipped for a CPU-only libtorch;
//! - the git commit and libtorch version, for `octet env` (empty when unknown);
//! - the c10d shim (`src/dist/shim*.cpp`) when libtorch ships c10d's headers and the gloo
//!   headers are found (`make build` fetches them into `.deps/gloo/include`); the NCCL half
//!   too when libtorch has CUDA. Without them octet builds without distributed training.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Libraries whose presence makes a libtorch a CUDA build; linked in this order.
const CUDA_LIBS: [&str; 2] = ["torch_cuda", "c10_cuda"];

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(octet_dist)");
    println!("cargo:rustc-check-cfg=cfg(octet_nccl)");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let root = PathBuf::from(libtorch);
        let lib = root.join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        let cuda = link_cuda(&lib);
        build_dist_shim(&root, cuda);
        if let Some(v) = libtorch_version(&root, "__version__") {
            println!("cargo:rustc-env=OCTET_LIBTORCH_VERSION={v}");
        }
        if let Some(v) = libtorch_version(&root, "cuda") {
            println!("cargo:rustc-env=OCTET_LIBTORCH_CUDA={v}");
        }
    }
    embed_git_commit();
}

/// Links libtorch's CUDA libraries when it has them; returns whether it does.
fn link_cuda(lib: &Path) -> bool {
    let present: Vec<&str> = CUDA_LIBS
        .iter()
        .copied()
        .filter(|l| lib.join(format!("lib{l}.so")).is_file())
        .collect();
    if present.is_empty() {
        return false;
    }
    println!("cargo:rustc-link-arg=-L{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for l in &present {
        println!("cargo:rustc-link-arg=-l{l}");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    println!("cargo:rustc-env=OCTET_LINKED_CUDA=1");
    true
}

/// Where the gloo headers are: `$OCTET_GLOO_INCLUDE`, the `.deps` folder `make build` fills,
/// or the system's (Debian's libgloo-dev).
fn gloo_include() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=OCTET_GLOO_INCLUDE");
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").ok()?);
    let candidates = [
        std::env::var("OCTET_GLOO_INCLUDE").ok().map(PathBuf::from),
        Some(here.join(".deps/gloo/include")),
        Some(PathBuf::from("/usr/include")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("gloo/config.h").is_file())
}

/// CUDA and NCCL header folders for the NCCL half: a pip torch's `nvidia/*/include`
/// siblings, then triton's CUDA headers (the wheels' `cuda_runtime.h` includes `crt/`
/// headers that only the nvcc package and triton ship), else `$CUDA_HOME/include`.
fn cuda_includes(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let site = root.parent();
    if let Some(nvidia) = site.map(|p| p.join("nvidia")) {
        if let Ok(rd) = std::fs::read_dir(&nvidia) {
            let mut found: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path().join("include"))
                .filter(|p| p.is_dir())
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    // CUDA's C++ core headers (<nv/target>), which `make build` fetches beside the gloo ones.
    if let Ok(here) = std::env::var("CARGO_MANIFEST_DIR") {
        dirs.push(PathBuf::from(here).join(".deps/cuda/include"));
    }
    dirs.extend(site.map(|p| p.join("triton/backends/nvidia/include")));
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(h) = std::env::var(var) {
            dirs.push(PathBuf::from(h).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.retain(|d| d.is_dir());
    dirs
}

fn has_header(dirs: &[PathBuf], name: &str) -> bool {
    dirs.iter().any(|d| d.join(name).is_file())
}

fn build_dist_shim(root: &Path, cuda: bool) {
    for f in [
        "src/dist/shim.h",
        "src/dist/shim.cpp",
        "src/dist/shim_nccl.cpp",
        ".deps",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    let include = root.join("include");
    let c10d = include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
    if !c10d.is_file() {
        println!(
            "cargo:warning=libtorch at {} has no c10d headers: building without distributed training",
            root.display()
        );
        return;
    }
    let Some(gloo) = gloo_include() else {
        println!(
            "cargo:warning=no gloo headers (run `make build`, or set OCTET_GLOO_INCLUDE): \
             building without distributed training"
        );
        return;
    };
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .warnings(false)
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .file("src/dist/shim.cpp");
    let cuda_dirs = if cuda {
        cuda_includes(root)
    } else {
        Vec::new()
    };
    let nccl = cuda
        && ["cuda_runtime.h", "crt/host_config.h", "nv/target", "nccl.h"]
            .iter()
            .all(|h| has_header(&cuda_dirs, h));
    if cuda && !nccl {
        println!(
            "cargo:warning=libtorch has CUDA but not all of cuda_runtime.h, crt/host_config.h, \
             nv/target and nccl.h were found (run `make build`, or set CUDA_HOME): building \
             distributed training with Gloo only"
        );
    }
    if nccl {
        b.define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("OCTET_WITH_NCCL", None)
            .includes(&cuda_dirs)
            .file("src/dist/shim_nccl.cpp");
        println!("cargo:rustc-cfg=octet_nccl");
    }
    b.compile("octet_dist");
    println!("cargo:rustc-cfg=octet_dist");
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
