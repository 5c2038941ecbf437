//! Per-tensor fitted 16-level codes: a weighted Lloyd-Max fit of the 4-bit code to the
//! tensor's own normalized values, started from NF4.
//!
//! As for the 8-bit fit, each sample x/absmax is weighted by its block's absmax², so the fit
//! minimises the error in weight space; −1, 0 and +1 stay in the code so each block's absmax
//! element and every zero are reproduced exactly.
use super::fit::FitOptions;
use super::fourbit::{block4, Code4, CODE4_LEN};
use super::kernels::absmax;
use crate::error::Result;

/// Fits a 16-level code to `x` (the whole tensor, flattened) for 4-bit blocks of `block`.
pub fn fit_code4(x: &[f32], block: usize, opts: FitOptions) -> Result<Code4> {
    block4(block as i64)?;
    let stride = (x.len() / opts.max_samples.max(1)).max(1);
    let mut samples: Vec<(f32, f64)> = Vec::with_capacity(x.len() / stride + 1);
    for (bi, chunk) in x.chunks(block).enumerate() {
        let amax = absmax(chunk);
        if amax == 0.0 || !amax.is_finite() {
            continue;
        }
        let w = f64::from(amax) * f64::from(amax);
        let first = (bi * block).div_ceil(stride) * stride - bi * block;
        samples.extend(
            chunk
                .iter()
                .skip(first)
                .step_by(stride)
                .map(|&v| ((v / amax).clamp(-1.0, 1.0), w)),
        );
    }
    let mut code = *Code4::nf4().values();
    let pinned = |v: f32| v == -1.0 || v == 0.0 || v == 1.0;
    for _ in 0..opts.iterations {
        let table = Code4::new(code)?;
        let mut sum_wv = [0f64; CODE4_LEN];
        let mut sum_w = [0f64; CODE4_LEN];
        for &(v, w) in &samples {
            let j = table.nearest(v) as usize;
            sum_wv[j] += w * f64::from(v);
            sum_w[j] += w;
        }
        for j in 0..CODE4_LEN {
            if sum_w[j] > 0.0 && !pinned(code[j]) {
                code[j] = ((sum_wv[j] / sum_w[j]) as f32).clamp(-1.0, 1.0);
            }
        }
        code.sort_by(f32::total_cmp);
    }
    Code4::new(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::fourbit::quantize4;
    use tch::{Kind, Tensor};

    /// Weight-like data: rows of different scales, heavy tails, a few outlier columns.
    fn weight_like() -> Tensor {
        tch::manual_seed(17);
        let (rows, cols) = (256i64, 512i64);
        let t = Tensor::randn([rows, cols], (Kind::Float, tch::Device::Cpu));
        // Student-t-like tails: normal over sqrt(chi²/ν) with ν = 4.
        let chi = Tensor::randn([4, rows, cols], (Kind::Float, tch::Device::Cpu))
            .square()
            .mean_dim(0, false, Kind::Float);
        let row_scale = Tensor::rand([rows, 1], (Kind::Float, tch::Device::Cpu)) * 0.04 + 0.01;
        let w = t / chi.sqrt() * row_scale;
        let _ = w.narrow(1, 100, 3).g_mul_scalar_(8.0);
        w.contiguous()
    }

    fn rmse(x: &Tensor, code: &Code4, block: usize) -> f64 {
        let q = quantize4(x, block, code).unwrap();
        let d = q.dequantize(Kind::Float).unwrap();
        (x - d).square().mean(Kind::Double).sqrt().double_value(&[])
    }

    #[test]
    fn fitted_code_beats_nf4_on_weight_like_data() {
        let x = weight_like();
        let flat = Vec::<f32>::try_from(&x.flatten(0, -1)).unwrap();
        for block in [32, 64, 256] {
            let fitted = fit_code4(&flat, block, FitOptions::default()).unwrap();
            let (f, n) = (rmse(&x, &fitted, block), rmse(&x, &Code4::nf4(), block));
            assert!(f < 0.97 * n, "block {block}: fitted {f:.4e} vs nf4 {n:.4e}");
            assert!(fitted.values().contains(&0.0) && fitted.values()[15] == 1.0);
        }
    }
}
