//! De-quantize-and-multiply in one pass for a few rows of activations (token-by-token
//! generation): `y = x · dequant(W)ᵀ (+ b)` reading each 8-bit weight once, straight from its
//! bytes, instead of writing the whole f32 weight out and having a GEMM read it back.
//!
//! With one to a few rows the multiplication is bound by memory traffic, and the separate
//! de-quantization moves 1 + 4 + 4 bytes per weight (read bytes, write f32, GEMM reads f32)
//! against 1 here. With many rows (a prompt, a training batch) the GEMM's blocking wins, so
//! callers take this path only up to [`MAX_ROWS`].
//!
//! Each weight is computed exactly as the de-quantizer computes it (`code[q] * absmax` in
//! f32); only the order of the dot products' additions differs from the GEMM's.
use super::blockwise::{cpu_slice, Quantized};
use super::code::CODE_LEN;
use super::kernels::code_array;
use crate::error::{OctetError, Result};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Most activation rows (product of all dimensions but the last) for which [`applies`] holds.
/// Measured on a 2-core AVX-512 machine with GPT-J-width weights: the fused pass is several
/// times faster at one row and still ahead at 16; the de-quantize-then-GEMM path wins from
/// a few dozen rows on.
pub const MAX_ROWS: usize = 16;

/// Rows of `x` handled in one sweep over a weight row; more rows re-read the (cached) row.
const GROUP: usize = 8;

/// Whether [`linear`] is the better way to compute `x · dequant(w)ᵀ`: a CPU f32 input of at
/// most [`MAX_ROWS`] rows whose width matches a CPU 2-d weight. Elsewhere (a GPU, or the
/// generic path forced) callers de-quantize on the device and multiply.
pub fn applies(x: &Tensor, w: &Quantized) -> bool {
    applies_along(x, w, 1)
}

/// [`applies`] for a weight whose input dimension is `in_dim` (1 for `[out, in]`, 0 for
/// `[in, out]`).
pub(super) fn applies_along(x: &Tensor, w: &Quantized, in_dim: usize) -> bool {
    let xs = x.size();
    let ws = w.q.size();
    x.device() == Device::Cpu
        && super::uses_cpu_kernels(&w.q)
        && x.kind() == Kind::Float
        && ws.len() == 2
        && xs.last() == Some(&ws[in_dim])
        && (xs[..xs.len() - 1].iter().product::<i64>() as usize) <= MAX_ROWS
}

/// Refuses operands a fused pass cannot take: `x` `[..., in]` in f32 on the CPU for a CPU
/// 2-d weight whose input dimension is `in_dim`.
pub(super) fn check_operands(x: &Tensor, w: &Quantized, in_dim: usize) -> Result<()> {
    let ws = w.q.size();
    let xs = x.size();
    if ws.len() != 2 || xs.is_empty() || xs.last() != Some(&ws[in_dim]) {
        return Err(OctetError::ShapeMismatch {
            what: "fused 8-bit linear".into(),
            expected: format!(
                "input [..., {}] for a 2-d weight",
                ws.get(in_dim).unwrap_or(&0)
            ),
            found: format!("input {xs:?}, weight {ws:?}"),
        });
    }
    if x.kind() != Kind::Float {
        return Err(OctetError::UnsupportedDtype {
            op: "fused 8-bit linear",
            found: x.kind(),
            expected: "f32",
        });
    }
    if x.device() != Device::Cpu || w.q.device() != Device::Cpu {
        return Err(OctetError::InvalidArgument(
            "the fused 8-bit linear runs on the CPU only".into(),
        ));
    }
    Ok(())
}

/// `x · dequant(w)ᵀ + bias` for `x` `[..., in]` (f32, CPU) and `w` `[out, in]`: `[..., out]` in
/// f32. Works for any number of rows but is meant for few (see [`applies`]). The result does
/// not track `x` for autograd: use it under `no_grad`.
pub fn linear(x: &Tensor, w: &Quantized, bias: Option<&Tensor>) -> Result<Tensor> {
    check_operands(x, w, 1)?;
    let (ws, xs) = (w.q.size(), x.size());
    let (n, k) = (ws[0] as usize, ws[1] as usize);
    let xc = x.contiguous();
    let m = x.numel() / k.max(1);
    let q = w.q.contiguous();
    let absmax = w.absmax.contiguous();
    let code = code_array(&w.code);
    let out = Tensor::empty([m as i64, n as i64], (Kind::Float, Device::Cpu));
    if m > 0 && n > 0 {
        // SAFETY: all three are contiguous CPU tensors of the element types read, alive for
        // the whole call; `out` is fresh and written only through `dst`, at disjoint indices.
        let (qs, am, xv) = unsafe {
            (
                cpu_slice::<u8>(&q),
                cpu_slice::<f32>(&absmax),
                cpu_slice::<f32>(&xc),
            )
        };
        let dst = OutPtr(out.data_ptr() as *mut f32);
        matmul_t(&code, am, w.block.get(), qs, k, xv, m, n, &dst);
    }
    let mut shape = xs[..xs.len() - 1].to_vec();
    shape.push(n as i64);
    let mut y = out.reshape(shape.as_slice());
    if let Some(b) = bias {
        y += b.to_kind(Kind::Float);
    }
    Ok(y)
}

/// The output `[m, n]`, shared by the parallel tasks, each writing its own columns.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements and the buffer outlives them (rayon joins).
unsafe impl Sync for OutPtr {}

/// `out[r, j] = Σ_i x[r, i] · code[q[j, i]] · absmax[(j·k + i) / block]` for `q` `[n, k]`,
/// `x` `[m, k]`, in parallel over weight rows.
#[allow(clippy::too_many_arguments)]
fn matmul_t(
    code: &[f32; CODE_LEN],
    absmax: &[f32],
    block: usize,
    q: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    n: usize,
    out: &OutPtr,
) {
    let per_task = (n / (rayon::current_num_threads() * 4)).max(16);
    let isa = best_isa();
    let tables = Tables::new(*code);
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let mut acc = [0f32; GROUP];
        for j in t * per_task..((t + 1) * per_task).min(n) {
            let row = &q[j * k..(j + 1) * k];
            for g in (0..m).step_by(GROUP) {
                let rows = GROUP.min(m - g);
                let xg = &x[g * k..(g + rows) * k];
                row_dots(
                    isa,
                    &tables,
                    absmax,
                    block,
                    j * k,
                    row,
                    xg,
                    k,
                    &mut acc[..rows],
                );
                for (r, &v) in acc[..rows].iter().enumerate() {
                    // SAFETY: (g + r) < m and j < n index inside the [m, n] output, and no
                    // other task owns row j.
                    unsafe { *out.0.add((g + r) * n + j) = v };
                }
            }
        }
    });
}

/// The kernel variant this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    /// AVX-512F/BW: weights looked up by gather.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512 with VBMI: weights looked up by byte permutes.
    #[cfg(target_arch = "x86_64")]
    Vbmi,
}

fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        return if super::simd::vbmi() {
            Isa::Vbmi
        } else {
            Isa::Avx512
        };
    }
    Isa::Portable
}

/// The code, prepared once per call for whichever kernel runs.
struct Tables {
    code: [f32; CODE_LEN],
    #[cfg(target_arch = "x86_64")]
    planes: avx512::Planes,
}

impl Tables {
    fn new(code: [f32; CODE_LEN]) -> Self {
        Tables {
            #[cfg(target_arch = "x86_64")]
            planes: avx512::planes(&code),
            code,
        }
    }
}

/// Dot products of one weight row (`row`, whose first element is element `offset` of the
/// whole tensor) with each of `out.len()` rows of `x` (each `k` long).
#[allow(clippy::too_many_arguments)]
#[inline]
fn row_dots(
    isa: Isa,
    tables: &Tables,
    absmax: &[f32],
    block: usize,
    offset: usize,
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let code = &tables.code;
    macro_rules! dispatch {
        ($f:ident; $($r:literal)*) => {
            match out.len() {
                // SAFETY: the CPU has the kernel's features (`best_isa`); `x` holds
                // `out.len()` rows of `k`, `row` is `k` long.
                $($r => unsafe { avx512::$f::<$r>(&tables.planes, code, absmax, block, offset, row, x, k, out) },)*
                _ => unreachable!("groups hold 1..=GROUP rows"),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Vbmi => dispatch!(row_dots_vbmi; 1 2 3 4 5 6 7 8),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => dispatch!(row_dots; 1 2 3 4 5 6 7 8),
        Isa::Portable => row_dots_portable(code, absmax, block, offset, row, x, k, out),
    }
}

/// The portable kernel: weights of a chunk are scaled into a small buffer, then each row's
/// dot product runs over eight independent lanes so the compiler can vectorize it.
#[allow(clippy::too_many_arguments)]
fn row_dots_portable(
    code: &[f32; CODE_LEN],
    absmax: &[f32],
    block: usize,
    offset: usize,
    row: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    const CHUNK: usize = 64;
    let mut lanes = vec![[0f32; 8]; out.len()];
    let mut tail = vec![0f32; out.len()];
    let mut w = [0f32; CHUNK];
    let mut s = 0;
    while s < row.len() {
        let b = (offset + s) / block;
        let e = ((b + 1) * block - offset).min(row.len());
        let amax = absmax[b];
        let mut i = s;
        while i < e {
            let len = CHUNK.min(e - i);
            for (wv, &qb) in w.iter_mut().zip(&row[i..i + len]) {
                *wv = code[qb as usize] * amax;
            }
            for (r, l) in lanes.iter_mut().enumerate() {
                let xr = &x[r * k + i..r * k + i + len];
                let mut wc = w[..len].chunks_exact(8);
                let mut xcs = xr.chunks_exact(8);
                for (wv, xv) in (&mut wc).zip(&mut xcs) {
                    for j in 0..8 {
                        l[j] += wv[j] * xv[j];
                    }
                }
                for (wv, xv) in wc.remainder().iter().zip(xcs.remainder()) {
                    tail[r] += wv * xv;
                }
            }
            i += len;
        }
        s = e;
    }
    for ((o, l), t) in out.iter_mut().zip(&lanes).zip(&tail) {
        *o = l.iter().sum::<f32>() + t;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    #![allow(unsafe_op_in_unsafe_fn)]
    use super::CODE_LEN;
    use std::arch::x86_64::*;

    /// Byte `p` (little-endian) of every code value's f32 bits, for the VBMI lookup.
    pub type Planes = [[u8; CODE_LEN]; 4];

    /// The code split into byte planes.
    pub fn planes(code: &[f32; CODE_LEN]) -> Planes {
        let mut p = [[0u8; CODE_LEN]; 4];
        for (i, c) in code.iter().enumerate() {
            for (b, byte) in c.to_le_bytes().into_iter().enumerate() {
                p[b][i] = byte;
            }
        }
        p
    }

    /// Accumulates weights `[i, e)` of one block (scale `amax`) of a row: 16 per gather from
    /// the shared code, then one FMA per row of `x`; the last few one by one into `tail`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gather_span<const R: usize>(
        cp: *const f32,
        amax: f32,
        qp: *const u8,
        xp: *const f32,
        k: usize,
        mut i: usize,
        e: usize,
        acc: &mut [__m512; R],
        tail: &mut [f32; R],
    ) {
        let va = _mm512_set1_ps(amax);
        while i + 16 <= e {
            let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(i) as *const __m128i));
            let w = _mm512_mul_ps(_mm512_i32gather_ps::<4>(idx, cp), va);
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp.add(r * k + i)), *a);
            }
            i += 16;
        }
        while i < e {
            let w = *cp.add(*qp.add(i) as usize) * amax;
            for (r, t) in tail.iter_mut().enumerate() {
                *t += w * *xp.add(r * k + i);
            }
            i += 1;
        }
    }

    /// [`super::row_dots`] for `R` rows of `x`, looking weights up by gather (`_planes` is
    /// unused; it keeps the signature of [`row_dots_vbmi`]).
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW; `x` must hold `R` rows of `k`, `row` be `k` long
    /// and `out` `R` long.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn row_dots<const R: usize>(
        _planes: &Planes,
        code: &[f32; CODE_LEN],
        absmax: &[f32],
        block: usize,
        offset: usize,
        row: &[u8],
        x: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        debug_assert!(x.len() >= R * k && row.len() == k && out.len() == R);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut tail = [0f32; R];
        let (qp, xp, cp) = (row.as_ptr(), x.as_ptr(), code.as_ptr());
        let mut s = 0;
        while s < k {
            let b = (offset + s) / block;
            let e = ((b + 1) * block - offset).min(k);
            let amax = *absmax.get_unchecked(b);
            gather_span::<R>(cp, amax, qp, xp, k, s, e, &mut acc, &mut tail);
            s = e;
        }
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]) + tail[r];
        }
    }

    /// [`row_dots`] with the lookup done by byte permutes, 64 weights at a time: each of the
    /// four bytes of the f32 code values is a 256-entry table in four registers, looked up
    /// with two `vpermi2b` and a blend on the index's top bit, and the four bytes are then
    /// interleaved back into f32. No gather (the bottleneck of [`row_dots`]); the values are
    /// bit-identical.
    ///
    /// # Safety
    /// As [`row_dots`], and the CPU must support AVX-512 VBMI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn row_dots_vbmi<const R: usize>(
        planes: &Planes,
        code: &[f32; CODE_LEN],
        absmax: &[f32],
        block: usize,
        offset: usize,
        row: &[u8],
        x: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        debug_assert!(x.len() >= R * k && row.len() == k && out.len() == R);
        // Closures would not inherit this function's target features: plain loops and a macro.
        let mut t = [[_mm512_setzero_si512(); 4]; 4];
        for (p, regs) in t.iter_mut().enumerate() {
            for (j, reg) in regs.iter_mut().enumerate() {
                *reg = _mm512_loadu_si512(planes[p].as_ptr().add(64 * j) as *const _);
            }
        }
        let perm = _mm512_loadu_si512(crate::quant::simd::UNPACK32_ORDER.as_ptr() as *const _);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut tail = [0f32; R];
        let (qp, xp, cp) = (row.as_ptr(), x.as_ptr(), code.as_ptr());
        let mut s = 0;
        while s < k {
            let b = (offset + s) / block;
            let e = ((b + 1) * block - offset).min(k);
            let amax = *absmax.get_unchecked(b);
            let va = _mm512_set1_ps(amax);
            let mut i = s;
            while i + 64 <= e {
                let idx = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(qp.add(i) as *const _));
                let high = _mm512_movepi8_mask(idx);
                macro_rules! byte {
                    ($p:expr) => {{
                        let lo = _mm512_permutex2var_epi8(t[$p][0], idx, t[$p][1]);
                        let hi = _mm512_permutex2var_epi8(t[$p][2], idx, t[$p][3]);
                        _mm512_mask_blend_epi8(high, lo, hi)
                    }};
                }
                let (b0, b1, b2, b3) = (byte!(0), byte!(1), byte!(2), byte!(3));
                let (w01lo, w01hi) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
                let (w23lo, w23hi) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
                let w = [
                    _mm512_unpacklo_epi16(w01lo, w23lo),
                    _mm512_unpackhi_epi16(w01lo, w23lo),
                    _mm512_unpacklo_epi16(w01hi, w23hi),
                    _mm512_unpackhi_epi16(w01hi, w23hi),
                ];
                for (g, wg) in w.iter().enumerate() {
                    let wg = _mm512_mul_ps(_mm512_castsi512_ps(*wg), va);
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(wg, _mm512_loadu_ps(xp.add(r * k + i + 16 * g)), *a);
                    }
                }
                i += 64;
            }
            gather_span::<R>(cp, amax, qp, xp, k, i, e, &mut acc, &mut tail);
            s = e;
        }
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]) + tail[r];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, BlockSize, QuantCode};

    /// The reference: de-quantize whole, then libtorch's matmul.
    fn reference(x: &Tensor, w: &Quantized, bias: Option<&Tensor>) -> Tensor {
        x.linear(&w.dequantize(Kind::Float).unwrap(), bias)
    }

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]).max(1e-12);
        (a - b).abs().max().double_value(&[]) / scale
    }

    #[test]
    fn matches_dequantize_then_matmul_for_odd_shapes_blocks_and_rows() {
        tch::manual_seed(7);
        // (out, in, block): rows shorter than, equal to and longer than a block, widths that
        // are not multiples of 16, and a last partial block.
        for (n, k, block) in [
            (33, 576, 4096),
            (7, 4096, 4096),
            (5, 100, 64),
            (40, 257, 128),
            (3, 17, 64),
        ] {
            let wf = Tensor::randn([n, k], (Kind::Float, Device::Cpu));
            let w = quantize(
                &wf,
                BlockSize::new(block).unwrap(),
                &QuantCode::dynamic_signed(),
            )
            .unwrap();
            let bias = Tensor::randn([n], (Kind::Float, Device::Cpu));
            for rows in [1i64, 2, 5, 8, 9, 16, 17] {
                let x = Tensor::randn([rows, k], (Kind::Float, Device::Cpu));
                let got = linear(&x, &w, Some(&bias)).unwrap();
                let want = reference(&x, &w, Some(&bias));
                assert_eq!(got.size(), want.size());
                let err = close(&got, &want);
                assert!(err < 1e-5, "n {n} k {k} block {block} rows {rows}: {err}");
            }
        }
    }

    #[test]
    fn keeps_leading_dimensions_and_reads_strided_inputs() {
        tch::manual_seed(8);
        let wf = Tensor::randn([24, 64], (Kind::Float, Device::Cpu));
        let w = quantize(
            &wf,
            BlockSize::new(64).unwrap(),
            &QuantCode::dynamic_signed(),
        )
        .unwrap();
        // The last position of each sequence, as generation feeds the head: not contiguous.
        let h = Tensor::randn([3, 5, 64], (Kind::Float, Device::Cpu));
        let x = h.narrow(1, 4, 1);
        assert!(!x.is_contiguous());
        let got = linear(&x, &w, None).unwrap();
        assert_eq!(got.size(), [3, 1, 24]);
        assert!(close(&got, &reference(&x, &w, None)) < 1e-5);
    }

    /// Every kernel variant this CPU can run, on rows whose blocks mix 64-wide, 16-wide and
    /// single-element spans (k = 300 in blocks of 128: spans of 128, 44 + 84, ...).
    #[test]
    fn every_kernel_variant_agrees_with_the_reference() {
        tch::manual_seed(9);
        let (n, k, block) = (6usize, 300usize, 128usize);
        let wf = Tensor::randn([n as i64, k as i64], (Kind::Float, Device::Cpu));
        let w = quantize(
            &wf,
            BlockSize::new(block as i64).unwrap(),
            &QuantCode::dynamic_signed(),
        )
        .unwrap();
        let qv = Vec::<u8>::try_from(&w.q.flatten(0, -1)).unwrap();
        let am = Vec::<f32>::try_from(&w.absmax).unwrap();
        let tables = Tables::new(code_array(&w.code));
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if crate::quant::simd::available() {
            isas.push(Isa::Avx512);
            if crate::quant::simd::vbmi() {
                isas.push(Isa::Vbmi);
            }
        }
        for rows in 1..=GROUP {
            let x = Tensor::randn([rows as i64, k as i64], (Kind::Float, Device::Cpu));
            let xv = Vec::<f32>::try_from(&x.flatten(0, -1)).unwrap();
            let want = reference(&x, &w, None);
            for &isa in &isas {
                let mut got = vec![0f32; rows * n];
                for j in 0..n {
                    let mut o = vec![0f32; rows];
                    let row = &qv[j * k..(j + 1) * k];
                    row_dots(isa, &tables, &am, block, j * k, row, &xv, k, &mut o);
                    for r in 0..rows {
                        got[r * n + j] = o[r];
                    }
                }
                let got = Tensor::from_slice(&got).view([rows as i64, n as i64]);
                let err = close(&got, &want);
                assert!(err < 1e-5, "{isa:?}, {rows} rows: {err}");
            }
        }
    }

    #[test]
    fn applies_only_to_few_f32_cpu_rows_of_the_right_width() {
        let wf = Tensor::randn([8, 64], (Kind::Float, Device::Cpu));
        let w = quantize(
            &wf,
            BlockSize::new(64).unwrap(),
            &QuantCode::dynamic_signed(),
        )
        .unwrap();
        let x = |shape: &[i64], kind| Tensor::zeros(shape, (kind, Device::Cpu));
        assert!(applies(&x(&[1, 1, 64], Kind::Float), &w));
        assert!(applies(&x(&[2, 8, 64], Kind::Float), &w));
        assert!(!applies(&x(&[2, 9, 64], Kind::Float), &w));
        assert!(!applies(&x(&[1, 63], Kind::Float), &w));
        assert!(!applies(&x(&[1, 64], Kind::BFloat16), &w));
        assert!(linear(&x(&[1, 64], Kind::BFloat16), &w, None).is_err());
        assert!(linear(&x(&[1, 63], Kind::Float), &w, None).is_err());
    }
}
