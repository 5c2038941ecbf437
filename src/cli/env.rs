//! `octet env`: what this build is and what it can use here (for bug reports and for scripts
//! that decide where to run), like PyTorch's `collect_env`.
use octet::device;
use octet::memory::{host_available_bytes, human};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn version_string((major, minor): (i32, i32)) -> String {
    format!("{major}.{minor}")
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let gpus = device::gpus();
    let v = facts(&gpus);
    if a.json {
        println!("{v}");
    } else {
        print_text(&v, &gpus);
    }
    Ok(())
}

/// Everything `env` reports, as the JSON object `--json` prints.
fn facts(gpus: &[device::GpuInfo]) -> serde_json::Value {
    let commit = env!("OCTET_GIT_COMMIT");
    let libtorch_path = device::loaded_library("libtorch_cpu.so")
        .and_then(|p| p.parent().map(|d| d.display().to_string()));
    let linked = device::cuda_linked();
    let available = tch::Cuda::is_available();
    let cudnn = device::cudnn_version().map(|(a, b, c)| format!("{a}.{b}.{c}"));
    json!({
        "octet": {
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": (!commit.is_empty()).then_some(commit),
        },
        "libtorch": {
            "built_against": option_env!("OCTET_LIBTORCH_VERSION"),
            "cuda_built_with": option_env!("OCTET_LIBTORCH_CUDA"),
            "path": libtorch_path,
        },
        "cuda": {
            "linked": linked,
            "available": available,
            "unavailable_reason": (!available).then(device::cuda_unavailable_reason),
            "device_count": if available { tch::Cuda::device_count() } else { 0 },
            "driver_version": device::driver_version().map(version_string),
            "runtime_version": device::runtime_version().map(version_string),
            "cudnn_available": available && tch::Cuda::cudnn_is_available(),
            "cudnn_version": cudnn,
            "devices": gpus.iter().map(|g| json!({
                "index": g.index,
                "name": g.name,
                "total_mib": g.total_bytes / (1 << 20),
                "free_mib": g.free_bytes.map(|f| f / (1 << 20)),
                "used_mib": g.free_bytes.map(|f| g.total_bytes.saturating_sub(f) / (1 << 20)),
                "compute_capability": format!("{}.{}", g.capability.0, g.capability.1),
            })).collect::<Vec<_>>(),
        },
        "cpu": {
            "dequantize_kernel": octet::quant::kernels::cpu_kernel_path(),
            "generic_ops_forced": octet::quant::generic_forced(),
            "torch_threads": tch::get_num_threads(),
            "kernel_threads": rayon::current_num_threads(),
            "available_memory_mib": host_available_bytes().map(|b| b / (1 << 20)),
        },
    })
}

/// The report as aligned text lines.
fn print_text(v: &serde_json::Value, gpus: &[device::GpuInfo]) {
    println!(
        "octet            {} (commit {})",
        env!("CARGO_PKG_VERSION"),
        s(&v["octet"]["git_commit"])
    );
    println!(
        "libtorch         {} (CUDA {}) at {}",
        s(&v["libtorch"]["built_against"]),
        s(&v["libtorch"]["cuda_built_with"]),
        s(&v["libtorch"]["path"])
    );
    print_cuda(v, gpus);
    println!(
        "CPU kernels      {}{}, {} torch threads, {} kernel threads",
        octet::quant::kernels::cpu_kernel_path(),
        if octet::quant::generic_forced() {
            " (generic tensor ops forced by OCTET_FORCE_GENERIC)"
        } else {
            ""
        },
        tch::get_num_threads(),
        rayon::current_num_threads()
    );
    println!(
        "host memory      {} available",
        host_available_bytes().map_or("unknown".into(), human)
    );
}

/// The CUDA lines: linking, availability, versions and one line per device.
fn print_cuda(v: &serde_json::Value, gpus: &[device::GpuInfo]) {
    let linked = v["cuda"]["linked"].as_bool().unwrap_or(false);
    let available = v["cuda"]["available"].as_bool().unwrap_or(false);
    println!("CUDA linked      {}", yn(linked));
    match available {
        true => println!(
            "CUDA available   yes, {} device(s)",
            tch::Cuda::device_count()
        ),
        false => println!(
            "CUDA available   no: {}",
            s(&v["cuda"]["unavailable_reason"])
        ),
    }
    println!(
        "CUDA driver      {}, runtime {}",
        s(&v["cuda"]["driver_version"]),
        s(&v["cuda"]["runtime_version"])
    );
    println!(
        "cuDNN            {} (usable: {})",
        s(&v["cuda"]["cudnn_version"]),
        yn(available && tch::Cuda::cudnn_is_available())
    );
    for g in gpus {
        println!(
            "  cuda:{}  {}  {} total, {} free, compute capability {}.{}",
            g.index,
            g.name,
            human(g.total_bytes),
            g.free_bytes.map_or("unknown".into(), human),
            g.capability.0,
            g.capability.1
        );
    }
}

/// A JSON value as text; `unknown` for null.
fn s(x: &serde_json::Value) -> String {
    match x {
        serde_json::Value::Null => "unknown".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn yn(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
