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

/// Estimated bytes of the activations one training micro-batch of `batch` sequences of
/// `seq_len` tokens takes (f32): logits with their softmax and gradient, the block inputs
/// kept for the backward pass (all of a block's activations without `checkpointing`), and one
/// block's working set including attention scores (heads guessed at hidden / 64). An
/// order-of-magnitude figure meant to refuse the impossible before allocating.
pub fn training_batch_bytes(
    info: &crate::model::ModelInfo,
    batch: usize,
    seq_len: usize,
    checkpointing: bool,
) -> u64 {
    let (b, t) = (batch as u128, seq_len as u128);
    let (d, v, layers) = (
        info.hidden as u128,
        info.vocab_size as u128,
        info.blocks as u128,
    );
    let tokens = b * t;
    let block = tokens * d * 16 + b * t * t * (d / 64).max(1) * 2;
    let kept = if checkpointing {
        layers * tokens * d
    } else {
        layers * block
    };
    let bytes = 4 * (3 * tokens * v + kept + block);
    u64::try_from(bytes).unwrap_or(u64::MAX)
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
    fn batch_estimate_grows_with_the_batch_and_refuses_absurd_ones() {
        let info = crate::model::ModelInfo {
            vocab_size: 1000,
            max_positions: 64,
            hidden: 64,
            blocks: 2,
        };
        let one = training_batch_bytes(&info, 1, 16, true);
        // The logits alone: 3 copies of 16 x 1000 f32.
        assert!(one >= 3 * 16 * 1000 * 4, "{one}");
        assert_eq!(training_batch_bytes(&info, 8, 16, true), 8 * one);
        assert!(training_batch_bytes(&info, 1, 16, false) > one);
        let huge = training_batch_bytes(&info, 100_000_000, 16, true);
        assert!(ensure_fits("a batch", huge, Device::Cpu, "").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 * 1024 * 1024 * 1024 / 2), "1.50 GiB");
    }
}
