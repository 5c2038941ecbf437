//! Slice-level CPU kernels for 4-bit quantization, parallel over blocks.
use super::fourbit::{Code4, CODE4_LEN};
use super::kernels::{absmax, DequantTarget};
use rayon::prelude::*;

/// Elements handed to one parallel task: a multiple of every 4-bit block size (so of 2).
const TASK_ELEMS: usize = 1 << 16;

/// bitsandbytes clamps a scale to this before dividing by it (an all-zero block then scales
/// to zeros).
const MIN_SCALE: f32 = 1e-38;

/// Rounds one block: `scale` maps x to [-1, 1] the way bitsandbytes does for that block.
fn nibbles(code: &Code4, x: &[f32], scale: impl Fn(f32) -> f32, out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = code.nearest(scale(v).clamp(-1.0, 1.0));
    }
}

/// Quantizes `x` into `packed` (`ceil(len / 2)` bytes) and `absmax` (one per block), exactly
/// as bitsandbytes' `quantize_4bit`: full blocks are multiplied by the reciprocal of their
/// absmax, the partial last block is divided by its absmax clamped to 1e-38 (and that clamped
/// value is what is stored).
pub fn quantize_into(
    code: &Code4,
    block: usize,
    x: &[f32],
    packed: &mut [u8],
    absmaxes: &mut [f32],
) {
    assert_eq!(
        packed.len(),
        x.len().div_ceil(2),
        "quantize_into: packed length"
    );
    assert_eq!(
        absmaxes.len(),
        x.len().div_ceil(block),
        "quantize_into: absmax length"
    );
    let full = x.len() / block * block;
    let per_task = TASK_ELEMS.max(block);
    x.par_chunks(per_task)
        .zip(packed.par_chunks_mut(per_task / 2))
        .zip(absmaxes.par_chunks_mut(per_task / block))
        .enumerate()
        .for_each(|(t, ((xs, ps), am))| {
            let mut idx = vec![0u8; block];
            for (i, (xb, a)) in xs.chunks(block).zip(am.iter_mut()).enumerate() {
                let start = t * per_task + i * block;
                let n = xb.len();
                if start < full {
                    *a = absmax(xb);
                    let recip = 1.0 / a.max(MIN_SCALE);
                    nibbles(code, xb, |v| v * recip, &mut idx[..n]);
                } else {
                    *a = absmax(xb).max(MIN_SCALE);
                    let am = *a;
                    nibbles(code, xb, |v| v / am, &mut idx[..n]);
                }
                let pad = code.nearest(0.0);
                let pb = &mut ps[i * block / 2..(i * block + n).div_ceil(2)];
                for (p, pair) in pb.iter_mut().zip(idx[..n].chunks(2)) {
                    *p = (pair[0] << 4) | pair.get(1).copied().unwrap_or(pad);
                }
            }
        });
}

/// De-quantizes one block (`out.len()` elements from `q`, element `2i` in the high nibble).
#[inline(always)]
fn dequantize_block<T: DequantTarget>(code: &[f32; CODE4_LEN], amax: f32, q: &[u8], out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        // SAFETY: AVX-512F/BW present; `q` holds ceil(out.len() / 2) bytes and `out` is
        // valid for out.len() writes of T's format.
        unsafe {
            super::simd4::dequantize_block(
                code,
                amax,
                q,
                out.as_mut_ptr() as *mut u8,
                out.len(),
                T::FORMAT,
            )
        };
        return;
    }
    let scaled: [T; CODE4_LEN] = std::array::from_fn(|k| T::from_f32(code[k] * amax));
    let mut pairs = out.chunks_exact_mut(2);
    for (o, &b) in (&mut pairs).zip(q) {
        o[0] = scaled[(b >> 4) as usize];
        o[1] = scaled[(b & 15) as usize];
    }
    if let [last] = pairs.into_remainder() {
        *last = scaled[(q[q.len() - 1] >> 4) as usize];
    }
}

/// De-quantizes `packed` into `out` (the whole tensor): `out[i] = code[nibble i] *
/// absmax[i / block]`, computed in f32 and then converted.
pub fn dequantize_into<T: DequantTarget>(
    code: &[f32; CODE4_LEN],
    absmax: &[f32],
    block: usize,
    packed: &[u8],
    out: &mut [T],
) {
    assert_eq!(
        packed.len(),
        out.len().div_ceil(2),
        "dequantize_into: packed length"
    );
    assert_eq!(
        absmax.len(),
        out.len().div_ceil(block),
        "dequantize_into: absmax length"
    );
    let per_task = TASK_ELEMS.max(block);
    packed
        .par_chunks(per_task / 2)
        .zip(out.par_chunks_mut(per_task))
        .zip(absmax.par_chunks(per_task / block))
        .for_each(|((qs, os), am)| {
            for ((qb, ob), &a) in qs.chunks(block / 2).zip(os.chunks_mut(block)).zip(am) {
                dequantize_block(code, a, qb, ob);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantize_reads_high_nibble_first_and_odd_tails() {
        let code = Code4::nf4();
        let q = [0x0Fu8, 0x7F, 0xF0];
        let mut out = [0f32; 5];
        dequantize_into(code.values(), &[2.0], 32, &q, &mut out);
        assert_eq!(out, [-2.0, 2.0, 0.0, 2.0, 2.0]);
    }

    #[test]
    fn dequantize_matches_the_formula_in_every_format() {
        // Bytes covering every nibble pair, a partial last block and an odd element count.
        let n = 3 * 64 + 45;
        let q: Vec<u8> = (0u32..(n as u32).div_ceil(2))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let code = Code4::fp4();
        let am = [0.37f32, 1.0e-3, 812.5, 3.1];
        let mut fast = vec![0f32; n];
        dequantize_into(code.values(), &am, 64, &q, &mut fast);
        for (i, &v) in fast.iter().enumerate() {
            let b = q[i / 2];
            let nib = if i % 2 == 0 { b >> 4 } else { b & 15 };
            assert_eq!(
                v.to_bits(),
                (code.values()[nib as usize] * am[i / 64]).to_bits(),
                "{i}"
            );
        }
        let mut fast16 = vec![half::bf16::ZERO; n];
        dequantize_into(code.values(), &am, 64, &q, &mut fast16);
        for (a, b) in fast16.iter().zip(&fast) {
            assert_eq!(a.to_bits(), half::bf16::from_f32(*b).to_bits());
        }
        let mut h = vec![half::f16::ZERO; n];
        dequantize_into(code.values(), &am, 64, &q, &mut h);
        for (a, b) in h.iter().zip(&fast) {
            assert_eq!(a.to_bits(), half::f16::from_f32(*b).to_bits());
        }
    }
}
