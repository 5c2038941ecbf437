//! Memory budgets: how much a device has free, and refusing work that cannot fit *before*
//! allocating it (a config with a huge `n_layer`, a huge batch), with a message that says what
//! was estimated and what is free.
use crate::error::{OctetError, Result};
use tch::Device;

/// Bytes available for new allocations on `device`, when it can be told.
///
/// CPU: `MemAvailable` from `/proc/meminfo` (Linux). CUDA: the free memory the runtime
/// reports (`cudaMemGetInfo`), `None` without a driver or device.
pub fn available_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => host_available_bytes(),
        Device::Cuda(n) => crate::device::mem_info(n).map(|(free, _)| free),
        _ => None,
    }
}

/// `MemAvailable` of the host, in bytes.
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes as a short human figure ("1.50 GiB").
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Refuses `what` when its estimated `needed` bytes exceed what `device` has available.
/// Passes when the available memory cannot be told. `hint` says what to lower.
pub fn ensure_fits(what: &str, needed: u64, device: Device, hint: &str) -> Result<()> {
    let Some(free) = available_bytes(device) else {
        return Ok(());
    };
    if needed > free {
        return Err(OctetError::InvalidArgument(format!(
            "{what} needs an estimated {} but {device:?} has {} available{}",
            human(needed),
            human(free),
            if hint.is_empty() {
                String::new()
            } else {
                format!(": {hint}")
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn refuses_what_cannot_fit_and_names_it() {
        let err = ensure_fits("the model", u64::MAX, Device::Cpu, "lower --batch-size")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the model") && err.contains("lower --batch-size"),
            "{err}"
        );
        ensure_fits("a byte", 1, Device::Cpu, "").unwrap();
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 * 1024 * 1024 * 1024 / 2), "1.50 GiB");
    }
}
