//! Helpers shared by the `make bench` binaries.

/// Peak resident set (VmHWM) of this process in MiB, NaN where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The environment variable `name` parsed as `T`, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The device the benches run on: `OCTET_BENCH_DEVICE` (auto, cpu, cuda, cuda:N), default cpu.
#[allow(dead_code)]
pub fn bench_device() -> tch::Device {
    let s = std::env::var("OCTET_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    octet::device::from_flag(&s).unwrap_or_else(|e| {
        eprintln!("OCTET_BENCH_DEVICE: {e}");
        std::process::exit(2)
    })
}

/// Waits for queued GPU work, so that wall-clock times cover it.
#[allow(dead_code)]
pub fn sync(device: tch::Device) {
    if let tch::Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

/// GPU memory in use on `device` in MiB (context + everything the caching allocator holds,
/// i.e. its high-water mark after a run); NaN off a GPU.
#[allow(dead_code)]
pub fn gpu_used_mib(device: tch::Device) -> f64 {
    match device {
        tch::Device::Cuda(n) => {
            octet::device::used_bytes(n).map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0))
        }
        _ => f64::NAN,
    }
}

/// The Python that runs the reference scripts: `OCTET_PYTHON`, else the project venv's.
#[allow(dead_code)]
pub fn python() -> std::path::PathBuf {
    std::env::var_os("OCTET_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python").into())
}

/// A reference script: under `OCTET_SCRIPTS` when set (a copy on another machine), else the
/// project's scripts/.
#[allow(dead_code)]
pub fn script(name: &str) -> std::path::PathBuf {
    std::env::var_os("OCTET_SCRIPTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/scripts").into())
        .join(name)
}

/// The last line of a failed child's stderr, shortened: enough to say why, short enough to
/// keep a report pasteable.
#[allow(dead_code)]
pub fn short_error(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("out of memory"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("");
    line.chars().take(160).collect()
}
