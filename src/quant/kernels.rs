//! Slice-level CPU kernels for blockwise quantization, parallel over blocks.
//!
//! Rounding is to the exact nearest code value (ties to the lower index). A 2×16,257-entry
//! table keyed by the top 16 bits of the normalized value narrows each lookup to the one or two
//! codes whose rounding threshold can fall inside that float range, so most elements cost one
//! table load and one comparison instead of a binary search.
use super::code::{QuantCode, CODE_LEN};
use half::{bf16, f16};
use rayon::prelude::*;

/// Number of 16-bit float prefixes covering |v| in [0, 1] (`1.0f32.to_bits() >> 16` is 0x3F80).
const KEYS: usize = 0x3F81;
/// Elements handed to one parallel task; a multiple of every supported block size.
const TASK_ELEMS: usize = 1 << 16;

/// A code prepared for fast nearest-value lookup.
#[derive(Clone, Debug)]
pub struct NearestTable {
    /// `thresholds[j]` is the smallest f32 strictly above the midpoint of codes j and j+1:
    /// a value rounds above code j exactly when it is `>=` this.
    thresholds: [f32; CODE_LEN - 1],
    /// Per (sign, prefix): the first candidate index and how many thresholds may need checking.
    start: Vec<u8>,
    span: Vec<u8>,
    /// The index zero rounds to; used for all-zero blocks.
    zero_index: u8,
    /// For the vector path: per slot, the first candidate and the one threshold to compare
    /// (+inf when there is none); only valid when `single_threshold`.
    vec_start: Vec<u32>,
    vec_threshold: Vec<f32>,
    single_threshold: bool,
}

impl NearestTable {
    /// Prepares `code` for lookups.
    pub fn new(code: &QuantCode) -> Self {
        let mut thresholds = [0f32; CODE_LEN - 1];
        thresholds.copy_from_slice(&code.thresholds());
        let count_le = |v: f32| thresholds.iter().take_while(|&&t| t <= v).count();
        let mut start = vec![0u8; 2 * KEYS];
        let mut span = vec![0u8; 2 * KEYS];
        for key in 0..KEYS {
            let lo = f32::from_bits((key as u32) << 16);
            let hi = f32::from_bits(((key as u32) << 16) | 0xFFFF).min(1.0);
            for (sign, (a, b)) in [(0usize, (lo, hi)), (1, (-hi, -lo))] {
                let (first, last) = (count_le(a), count_le(b));
                start[sign * KEYS + key] = first.min(CODE_LEN - 1) as u8;
                span[sign * KEYS + key] = (last - first) as u8;
            }
        }
        let zero_index = count_le(0.0) as u8;
        let single_threshold = span.iter().all(|&s| s <= 1);
        let vec_start = start.iter().map(|&s| s as u32).collect();
        let vec_threshold = start
            .iter()
            .zip(&span)
            .map(|(&s, &n)| {
                if n == 1 {
                    thresholds[s as usize]
                } else {
                    f32::INFINITY
                }
            })
            .collect();
        NearestTable {
            thresholds,
            start,
            span,
            zero_index,
            vec_start,
            vec_threshold,
            single_threshold,
        }
    }

    /// Index of the code value nearest to `v`, for `v` in [-1, 1]. NaN maps to a valid index.
    #[inline(always)]
    pub fn nearest(&self, v: f32) -> u8 {
        let bits = v.to_bits();
        let key = ((bits & 0x7FFF_FFFF) >> 16).min(KEYS as u32 - 1) as usize;
        let slot = ((bits >> 31) as usize) * KEYS + key;
        let mut q = self.start[slot] as usize;
        let end = q + self.span[slot] as usize;
        while q < end && v >= self.thresholds[q] {
            q += 1;
        }
        q as u8
    }
}

/// The de-quantization kernel this CPU runs: `"avx512-vbmi"` (byte-permute table lookup),
/// `"avx512-gather"`, or `"portable"` (no AVX-512, or `OCTET_NO_SIMD` set).
pub fn cpu_kernel_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::vbmi() {
            return "avx512-vbmi";
        }
        if super::simd::available() {
            return "avx512-gather";
        }
    }
    "portable"
}

/// Largest absolute value in `x` (0 for an empty slice; NaN is ignored).
#[inline]
pub fn absmax(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { super::simd::absmax(x) };
    }
    absmax_scalar(x)
}

fn absmax_scalar(x: &[f32]) -> f32 {
    // Eight independent lanes let the compiler vectorize the reduction.
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for ch in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(ch) {
            *l = l.max(v.abs());
        }
    }
    let tail = chunks.remainder().iter().fold(0f32, |m, v| m.max(v.abs()));
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

fn quantize_block(table: &NearestTable, x: &[f32], q: &mut [u8]) -> f32 {
    let amax = absmax(x);
    if amax == 0.0 {
        q.fill(table.zero_index);
        return amax;
    }
    #[cfg(target_arch = "x86_64")]
    if table.single_threshold && super::simd::available() {
        // SAFETY: AVX-512 is present, lengths match, and the slot tables have 2 * KEYS entries.
        unsafe {
            super::simd::quantize_block(
                &table.vec_start,
                &table.vec_threshold,
                KEYS as u32,
                amax,
                x,
                q,
                |v| table.nearest(v),
            )
        };
        return amax;
    }
    for (o, &v) in q.iter_mut().zip(x) {
        *o = table.nearest(v / amax);
    }
    amax
}

/// Quantizes `x` block by block into `q` (same length) and `absmax` (one per block, the last
/// block may be partial). `x` must start on a block boundary of the tensor it comes from.
pub fn quantize_into(
    table: &NearestTable,
    block: usize,
    x: &[f32],
    q: &mut [u8],
    absmax: &mut [f32],
) {
    assert_eq!(
        x.len(),
        q.len(),
        "quantize_into: input and output lengths differ"
    );
    assert_eq!(
        absmax.len(),
        x.len().div_ceil(block),
        "quantize_into: absmax length"
    );
    let per_task = TASK_ELEMS.max(block);
    x.par_chunks(per_task)
        .zip(q.par_chunks_mut(per_task))
        .zip(absmax.par_chunks_mut(per_task / block))
        .for_each(|((xs, qs), am)| {
            for ((xb, qb), a) in xs
                .chunks(block)
                .zip(qs.chunks_mut(block))
                .zip(am.iter_mut())
            {
                *a = quantize_block(table, xb, qb);
            }
        });
}

/// Quantizes `x` block by block into `q` against given per-block `scales` (e.g. de-quantized
/// double-quantized absmax) instead of each block's own absmax: `nearest(clamp(x / s, −1, 1))`,
/// a zero scale giving the code's zero. `x` must start on a block boundary.
pub fn quantize_with_scales(
    table: &NearestTable,
    block: usize,
    x: &[f32],
    scales: &[f32],
    q: &mut [u8],
) {
    assert_eq!(x.len(), q.len(), "quantize_with_scales: lengths differ");
    assert_eq!(
        scales.len(),
        x.len().div_ceil(block),
        "quantize_with_scales: scales"
    );
    let per_task = TASK_ELEMS.max(block);
    x.par_chunks(per_task)
        .zip(q.par_chunks_mut(per_task))
        .zip(scales.par_chunks(per_task / block))
        .for_each(|((xs, qs), ss)| {
            for ((xb, qb), &s) in xs.chunks(block).zip(qs.chunks_mut(block)).zip(ss) {
                if s == 0.0 {
                    qb.fill(table.zero_index);
                    continue;
                }
                for (o, &v) in qb.iter_mut().zip(xb) {
                    *o = table.nearest((v / s).clamp(-1.0, 1.0));
                }
            }
        });
}

/// An output element type the dequantizer can write directly.
pub trait DequantTarget: Copy + Send + Sync + Default {
    /// Converts the f32 product `code * absmax` (rounding to nearest even).
    fn from_f32(v: f32) -> Self;
    /// The matching vector-kernel format.
    #[cfg(target_arch = "x86_64")]
    const FORMAT: super::simd::Format;
}

impl DequantTarget for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    const FORMAT: super::simd::Format = super::simd::Format::F32;
}
impl DequantTarget for bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    const FORMAT: super::simd::Format = super::simd::Format::Bf16;
}
impl DequantTarget for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    const FORMAT: super::simd::Format = super::simd::Format::F16;
}

#[inline(always)]
fn dequantize_block<T: DequantTarget>(code: &[f32; CODE_LEN], amax: f32, q: &[u8], out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        // SAFETY: AVX-512 present; `out` holds q.len() elements of T's format.
        unsafe {
            super::simd::dequantize_block(code, amax, q, out.as_mut_ptr() as *mut u8, T::FORMAT)
        };
        return;
    }
    // Scale the code once per block, then each element is a byte-indexed load.
    let mut scaled = [T::default(); CODE_LEN];
    for (s, &c) in scaled.iter_mut().zip(code.iter()) {
        *s = T::from_f32(c * amax);
    }
    for (o, &b) in out.iter_mut().zip(q) {
        *o = scaled[b as usize];
    }
}

/// De-quantizes `q` into `out`: `out[i] = code[q[i]] * absmax[(offset + i) / block]`, computed
/// in f32 and then converted. `offset` is the element index of `q[0]` in the whole tensor and
/// need not be block-aligned (embedding rows).
pub fn dequantize_into<T: DequantTarget>(
    code: &[f32; CODE_LEN],
    absmax: &[f32],
    block: usize,
    offset: usize,
    q: &[u8],
    out: &mut [T],
) {
    assert_eq!(
        q.len(),
        out.len(),
        "dequantize_into: input and output lengths differ"
    );
    if q.is_empty() {
        return;
    }
    // Split at the first block boundary so the parallel part is block-aligned.
    let head = ((block - offset % block) % block).min(q.len());
    let (qh, qt) = q.split_at(head);
    let (oh, ot) = out.split_at_mut(head);
    if head > 0 {
        dequantize_block(code, absmax[offset / block], qh, oh);
    }
    let first_block = (offset + head) / block;
    let per_task = TASK_ELEMS.max(block);
    qt.par_chunks(per_task)
        .zip(ot.par_chunks_mut(per_task))
        .enumerate()
        .for_each(|(t, (qs, os))| {
            let base = first_block + t * (per_task / block);
            for (i, (qb, ob)) in qs.chunks(block).zip(os.chunks_mut(block)).enumerate() {
                dequantize_block(code, absmax[base + i], qb, ob);
            }
        });
}

/// The code as a fixed-size array (for the dequantizer's per-block table).
pub fn code_array(code: &QuantCode) -> [f32; CODE_LEN] {
    let mut a = [0f32; CODE_LEN];
    a.copy_from_slice(code.values());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lookup_equals_exhaustive_search() {
        for code in [QuantCode::dynamic_signed(), QuantCode::dynamic_unsigned()] {
            let table = NearestTable::new(&code);
            let mut v = -1.0f32;
            while v <= 1.0 {
                assert_eq!(table.nearest(v), code.nearest_exhaustive(v), "v = {v}");
                v += 1.0 / 4099.0;
            }
            for (j, t) in table.thresholds.iter().enumerate() {
                for probe in [t.next_down(), *t, t.next_up()] {
                    if probe.abs() <= 1.0 {
                        assert_eq!(
                            table.nearest(probe),
                            code.nearest_exhaustive(probe),
                            "threshold {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dequantize_with_unaligned_offset_uses_the_right_block() {
        let code = code_array(&QuantCode::dynamic_signed());
        let absmax = [1.0f32, 2.0, 4.0];
        let q = [255u8; 100];
        let mut out = [0f32; 100];
        dequantize_into(&code, &absmax, 64, 60, &q, &mut out);
        assert_eq!(out[0], 1.0);
        assert_eq!(out[4], 2.0);
        assert_eq!(out[67], 2.0);
        assert_eq!(out[68], 4.0);
    }
}
