//! The fused de-quantize-and-multiply of [`super::fused`] for a weight stored `[in, out]`
//! (GPT-2's `Conv1D`): `y = x · dequant(W) (+ b)` for a few rows of activations, reading each
//! weight byte once.
//!
//! A stored row of `W` is one input's contribution to every output, so each task owns a
//! range of output columns and sweeps the rows, adding `x[r, i] · w[i, j]` into its
//! accumulators; the weights of a row segment are scaled into a small buffer first so the
//! inner loop is a plain multiply-add the compiler vectorizes.
use super::blockwise::{cpu_slice, Quantized};
use super::kernels::code_array;
use crate::error::Result;
use rayon::prelude::*;
use tch::{Kind, Tensor};

/// Whether [`linear`] is the better way to compute `x · dequant(w)`: a CPU f32 input of at
/// most [`super::fused::MAX_ROWS`] rows whose width matches the rows of a CPU 2-d `[in, out]` weight.
pub fn applies(x: &Tensor, w: &Quantized) -> bool {
    super::fused::applies_along(x, w, 0)
}

/// `x · dequant(w) + bias` for `x` `[..., in]` (f32, CPU) and `w` `[in, out]`: `[..., out]` in
/// f32. The result does not track `x` for autograd: use it under `no_grad`.
pub fn linear(x: &Tensor, w: &Quantized, bias: Option<&Tensor>) -> Result<Tensor> {
    super::fused::check_operands(x, w, 0)?;
    let (ws, xs) = (w.q.size(), x.size());
    let (k, n) = (ws[0] as usize, ws[1] as usize);
    let xc = x.f_contiguous()?;
    let m = x.numel() / k.max(1);
    let q = w.q.f_contiguous()?;
    let absmax = w.absmax.f_contiguous()?;
    let code = code_array(&w.code);
    let mut y = vec![0f32; m * n];
    if m > 0 && n > 0 && k > 0 {
        // SAFETY: all three are contiguous CPU tensors of the element types read, alive for
        // the whole call and not written while the slices live.
        let (qs, am, xv) = unsafe {
            (
                cpu_slice::<u8>(&q),
                cpu_slice::<f32>(&absmax),
                cpu_slice::<f32>(&xc),
            )
        };
        matmul(&code, am, w.block.get(), qs, xv, (m, k, n), &mut y);
    }
    let mut shape = xs[..xs.len() - 1].to_vec();
    shape.push(n as i64);
    let mut out = Tensor::f_from_slice(&y)?.f_reshape(shape.as_slice())?;
    if let Some(b) = bias {
        out = out.f_add(&b.f_to_kind(Kind::Float)?)?;
    }
    Ok(out)
}

/// Output columns per task: enough that a row segment is worth a task, few enough that
/// every thread gets several.
fn columns_per_task(n: usize) -> usize {
    (n / (rayon::current_num_threads() * 4)).clamp(64, 1024)
}

/// `y[r, j] = Σ_i x[r, i] · code[q[i, j]] · absmax[(i·n + j) / block]` for `q` `[k, n]` and
/// `x` `[m, k]` into `y` `[m, n]`, in parallel over column ranges.
fn matmul(
    code: &[f32; super::CODE_LEN],
    absmax: &[f32],
    block: usize,
    q: &[u8],
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    y: &mut [f32],
) {
    let per_task = columns_per_task(n);
    let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(per_task))
        .into_par_iter()
        .map(|t| {
            let (c0, c1) = (t * per_task, ((t + 1) * per_task).min(n));
            let width = c1 - c0;
            let mut acc = vec![0f32; m * width];
            let mut w = vec![0f32; width];
            for i in 0..k {
                let start = i * n + c0;
                scale_segment(code, absmax, block, start, &q[start..start + width], &mut w);
                for r in 0..m {
                    let xi = x[r * k + i];
                    for (a, wv) in acc[r * width..(r + 1) * width].iter_mut().zip(&w) {
                        *a += xi * wv;
                    }
                }
            }
            (c0, acc)
        })
        .collect();
    for (c0, acc) in parts {
        let width = acc.len() / m;
        for r in 0..m {
            y[r * n + c0..r * n + c0 + width].copy_from_slice(&acc[r * width..(r + 1) * width]);
        }
    }
}

/// De-quantizes `seg`, whose first element is element `start` of the whole tensor, into `w`.
fn scale_segment(
    code: &[f32; super::CODE_LEN],
    absmax: &[f32],
    block: usize,
    start: usize,
    seg: &[u8],
    w: &mut [f32],
) {
    let mut s = 0;
    while s < seg.len() {
        let b = (start + s) / block;
        let e = ((b + 1) * block - start).min(seg.len());
        let amax = absmax[b];
        for (wv, &qb) in w[s..e].iter_mut().zip(&seg[s..e]) {
            *wv = code[qb as usize] * amax;
        }
        s = e;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, BlockSize, QuantCode};
    use tch::Device;

    #[test]
    fn matches_dequantize_then_matmul_for_odd_shapes_blocks_and_rows() {
        tch::manual_seed(11);
        // (in, out, block): segments inside one block, across blocks, a last partial block,
        // widths that split unevenly among tasks.
        for (k, n, block) in [(64, 192, 4096), (100, 5, 64), (257, 1100, 128), (3, 17, 64)] {
            let wf = Tensor::randn([k, n], (Kind::Float, Device::Cpu));
            let w = quantize(
                &wf,
                BlockSize::new(block).unwrap(),
                &QuantCode::dynamic_signed(),
            )
            .unwrap();
            let dense = w.dequantize(Kind::Float).unwrap();
            for rows in [1, 3, 16] {
                let x = Tensor::randn([rows, 1, k], (Kind::Float, Device::Cpu));
                let bias = Tensor::randn([n], (Kind::Float, Device::Cpu));
                assert!(applies(&x, &w));
                let ours = linear(&x, &w, Some(&bias)).unwrap();
                let want = x.matmul(&dense) + &bias;
                assert_eq!(ours.size(), [rows, 1, n]);
                let scale = want.abs().max().double_value(&[]);
                let diff = (&ours - &want).abs().max().double_value(&[]);
                assert!(diff <= 1e-5 * scale, "{k}x{n} b{block} rows {rows}: {diff}");
            }
        }
    }

    #[test]
    fn refuses_a_width_that_does_not_match() {
        let w = quantize(
            &Tensor::randn([8, 4], (Kind::Float, Device::Cpu)),
            BlockSize::new(64).unwrap(),
            &QuantCode::dynamic_signed(),
        )
        .unwrap();
        let x = Tensor::randn([1, 4], (Kind::Float, Device::Cpu));
        assert!(!applies(&x, &w));
        assert!(linear(&x, &w, None).is_err());
    }
}
