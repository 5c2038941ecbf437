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

/// Fits a code to `x` (the whole tensor, flattened) for blocks of `block`, starting from the
/// signed dynamic code. −1, 0 and +1 stay exactly representable, so every block's absmax
/// element and every zero are reproduced exactly.
pub fn fit_code(x: &[f32], block: BlockSize, opts: FitOptions) -> Result<QuantCode> {
    let b = block.get();
    let stride = (x.len() / opts.max_samples.max(1)).max(1);
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
    let mut code = QuantCode::dynamic_signed().values().to_vec();
    code[0] = -1.0;
    let pinned = |v: f32| v == -1.0 || v == 0.0 || v == 1.0;
    for _ in 0..opts.iterations {
        let table = NearestTable::new(&QuantCode::new(code.clone())?);
        let mut sum_wv = [0f64; CODE_LEN];
        let mut sum_w = [0f64; CODE_LEN];
        for &(v, w) in &samples {
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
    QuantCode::new(code)
}
