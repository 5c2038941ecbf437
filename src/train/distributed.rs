//! What data-parallel training adds to a run besides the collectives: the same base on every
//! rank, per-rank dropout seeds, resuming after a launcher's restart, and a fault-injection
//! hook for the restart tests.
use super::checkpoint::find_checkpoint;
use super::options::TrainOptions;
use crate::dist::{Dist, ReduceOp};
use crate::error::{OctetError, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Bytes of the base fingerprint compared across ranks.
const FINGERPRINT_BYTES: usize = 12;

/// Checks that every rank loaded the same frozen base (`fingerprint`: 24 hex digits), naming
/// the first rank whose base differs from rank 0's.
pub fn check_same_base(dist: &Dist, fingerprint: &str, model: &Path) -> Result<()> {
    let world = dist.world();
    if world == 1 {
        return Ok(());
    }
    let mine: Vec<f64> = (0..FINGERPRINT_BYTES)
        .map(|i| {
            let byte = fingerprint.get(2 * i..2 * i + 2).unwrap_or("00");
            u8::from_str_radix(byte, 16).map_or(0.0, f64::from)
        })
        .collect();
    // Each rank fills its own row; the sum is everyone's rows on every rank.
    let mut table = vec![0.0; world * FINGERPRINT_BYTES];
    table[dist.rank() * FINGERPRINT_BYTES..][..FINGERPRINT_BYTES].copy_from_slice(&mine);
    let table = dist.all_reduce_f64(&table, ReduceOp::Sum)?;
    let row = |r: usize| &table[r * FINGERPRINT_BYTES..(r + 1) * FINGERPRINT_BYTES];
    let hex = |r: usize| {
        row(r)
            .iter()
            .map(|b| format!("{:02x}", *b as u8))
            .collect::<String>()
    };
    match (1..world).find(|&r| row(r) != row(0)) {
        None => Ok(()),
        Some(r) => Err(OctetError::Distributed(format!(
            "rank {r} loaded a different base model than rank 0 (fingerprint {} against {}); \
             every rank must load the same --model (this is rank {}, with {})",
            hex(r),
            hex(0),
            dist.rank(),
            model.display()
        ))),
    }
}

/// The dropout seed of `rank`: rank 0 keeps the run's seed (so one rank is an ordinary run),
/// the others draw masks of their own.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        return seed;
    }
    seed ^ (rank as u64).wrapping_mul(0xA24B_AED4_963E_E407)
}

/// The options of an attempt that torchrun restarted (`TORCHELASTIC_RESTART_COUNT` > 0):
/// continuing from the last complete checkpoint in `--out`, when there is one and no
/// `--resume` was given. `None`: run as given.
pub fn resume_after_restart(opts: &TrainOptions, dist: &Dist) -> Option<TrainOptions> {
    if dist.restart_count() == 0 || opts.resume.is_some() {
        return None;
    }
    find_checkpoint(&opts.out).ok()?;
    if dist.is_main() {
        eprintln!(
            "restart {}: resuming from the last checkpoint in {}",
            dist.restart_count(),
            opts.out.display()
        );
    }
    Some(TrainOptions {
        resume: Some(opts.out.clone()),
        ..opts.clone()
    })
}

/// Fault injection for the restart tests: with `OCTET_TEST_CRASH_AT_STEP=K` (and
/// `OCTET_TEST_CRASH_RANK=R`, default 0), rank R of the first attempt dies without clean-up
/// right after step K, as a killed or crashed process would.
pub fn crash_for_test(dist: &Dist, step: usize) {
    if dist.restart_count() > 0 {
        return;
    }
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let Some(at) = var("OCTET_TEST_CRASH_AT_STEP") else {
        return;
    };
    if step == at && dist.rank() == var("OCTET_TEST_CRASH_RANK").unwrap_or(0) {
        eprintln!(
            "rank {}: crashing at step {step} (OCTET_TEST_CRASH_AT_STEP)",
            dist.rank()
        );
        // SAFETY: `_exit` ends the process at once; nothing of it is used afterwards.
        unsafe { libc::_exit(86) }
    }
}

/// SHA-256 (first 16 hex digits) of the tensors' values as f32, in order.
pub fn digest(tensors: &[Tensor]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in tensors {
        let flat = t
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .reshape([-1]);
        for v in Vec::<f32>::try_from(&flat).unwrap_or_default() {
            h.update(v.to_le_bytes());
        }
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_zero_keeps_the_seed_and_others_differ() {
        assert_eq!(rank_seed(7, 0), 7);
        assert_ne!(rank_seed(7, 1), 7);
        assert_ne!(rank_seed(7, 1), rank_seed(7, 2));
    }

    #[test]
    fn one_rank_checks_nothing_and_is_never_restarted() {
        let d = Dist::single();
        check_same_base(&d, "zz", Path::new("m")).unwrap();
        assert!(resume_after_restart(&TrainOptions::default(), &d).is_none());
    }
}
