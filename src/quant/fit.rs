//! Per-tensor fitted codes: a weighted Lloyd-Max fit of the 256 code values to the tensor's
//! own normalized values.
//!
//! Each sample x/absmax is weighted by its block's absmax², so the fit minimises the error in
//! weight space rather than in normalized space (an unweighted fit over-serves the many
//! small-scale blocks and is far worse than the dynamic code).
use super::blockwise::BlockSize;
use super::code::{QuantCode, CODE_LEN};
use super::kernels::{self, NearestTable};
use crate::error::Result;

/// Settings of the fit.
#[derive(Clone, Copy, Debug)]
pub struct FitOptions {
    /// At most this many values are sampled (evenly spaced) from the tensor.
    pub max_samples: usize,
    /// Lloyd iterations.
    pub iterations: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            max_samples: 400_000,
            iterations: 30,
        }
    }
}

/// Fits a code to `x` (the whole tensor, flattened) for blocks of `block`. −1, 0 and +1 stay
/// exactly representable, so every block's absmax element and every zero are reproduced
/// exactly.
///
/// Lloyd's iterations only move levels locally, so the start matters: the fit runs from both
/// the signed dynamic code (dense near zero: suits large blocks, where most values are small
/// next to the block's absmax) and an evenly spaced code (suits small blocks), and keeps the
/// one with the lower weighted squared error. The result is never worse than the dynamic code
/// on the sample it was fitted to.
pub fn fit_code(x: &[f32], block: BlockSize, opts: FitOptions) -> Result<QuantCode> {
    let samples = weighted_samples(x, block, opts.max_samples);
    let mut dynamic = QuantCode::dynamic_signed().values().to_vec();
    dynamic[0] = -1.0;
    // k / 127 for k = −127…127 plus one more level between 0 and 1/127: 256 distinct values.
    let mut even: Vec<f32> = (-127..=127).map(|k| k as f32 / 127.0).collect();
    even.push(0.5 / 127.0);
    even.sort_by(|a, b| a.total_cmp(b));
    let mut best: Option<(f64, Vec<f32>)> = None;
    for start in [dynamic, even] {
        let code = lloyd(start, &samples, opts.iterations)?;
        let err = distortion(&code, &samples)?;
        if best.as_ref().is_none_or(|(e, _)| err < *e) {
            best = Some((err, code));
        }
    }
    QuantCode::new(best.map(|(_, c)| c).unwrap_or_default())
}

/// Up to `max_samples` normalized values x/absmax, evenly spaced over the tensor, each with
/// its block's absmax² as weight (all-zero blocks carry no information and are skipped).
fn weighted_samples(x: &[f32], block: BlockSize, max_samples: usize) -> Vec<(f32, f64)> {
    let b = block.get();
    let stride = (x.len() / max_samples.max(1)).max(1);
    let mut samples: Vec<(f32, f64)> = Vec::with_capacity(x.len() / stride + 1);
    for (bi, chunk) in x.chunks(b).enumerate() {
        let amax = kernels::absmax(chunk);
        if amax == 0.0 {
            continue;
        }
        let w = (amax as f64) * (amax as f64);
        let first = (bi * b).div_ceil(stride) * stride - bi * b;
        for &v in chunk.iter().skip(first).step_by(stride) {
            samples.push((v / amax, w));
        }
    }
    samples
}

/// Weighted Lloyd-Max iterations from `code` (sorted, 256 entries), −1, 0, +1 pinned.
fn lloyd(mut code: Vec<f32>, samples: &[(f32, f64)], iterations: usize) -> Result<Vec<f32>> {
    let pinned = |v: f32| v == -1.0 || v == 0.0 || v == 1.0;
    for _ in 0..iterations {
        let table = NearestTable::new(&QuantCode::new(code.clone())?);
        let mut sum_wv = [0f64; CODE_LEN];
        let mut sum_w = [0f64; CODE_LEN];
        for &(v, w) in samples {
            let j = table.nearest(v) as usize;
            sum_wv[j] += w * v as f64;
            sum_w[j] += w;
        }
        for j in 0..CODE_LEN {
            if sum_w[j] > 0.0 && !pinned(code[j]) {
                code[j] = ((sum_wv[j] / sum_w[j]) as f32).clamp(-1.0, 1.0);
            }
        }
        code.sort_by(|a, b| a.total_cmp(b));
    }
    Ok(code)
}

/// Σ w·(v − code(v))² over the samples.
fn distortion(code: &[f32], samples: &[(f32, f64)]) -> Result<f64> {
    let c = QuantCode::new(code.to_vec())?;
    let table = NearestTable::new(&c);
    Ok(samples
        .iter()
        .map(|&(v, w)| {
            let d = v as f64 - c.values()[table.nearest(v) as usize] as f64;
            w * d * d
        })
        .sum())
}
