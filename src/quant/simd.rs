//! AVX-512 versions of the per-block loops, chosen at run time (the binary itself targets
//! baseline x86-64 so it also runs on machines without AVX-512).
//!
//! De-quantization gathers 16 values at a time from the block's scaled 256-entry table;
//! quantization gathers each element's candidate index and rounding threshold from the
//! prefix table and settles the rounding with one vector compare.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this CPU has the AVX-512 subsets the kernels use.
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("OCTET_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
    })
}

/// Largest |x| of a slice.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn absmax(x: &[f32]) -> f32 {
    let n = x.len() / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        acc = _mm512_max_ps(acc, _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(i))));
        i += 16;
    }
    let mut m = _mm512_reduce_max_ps(acc);
    for &v in &x[n..] {
        m = m.max(v.abs());
    }
    m
}

/// Rounds `x / amax` to the nearest code: `q = start[slot] + (v >= threshold[slot])`, valid
/// when no prefix range holds more than one rounding threshold (the caller checks).
///
/// # Safety
/// The CPU must support AVX-512F/BW; `x` and `q` must have equal lengths; `start` and
/// `threshold` must have `2 * keys` entries.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_block(
    start: &[u32],
    threshold: &[f32],
    keys: u32,
    amax: f32,
    x: &[f32],
    q: &mut [u8],
    scalar: impl Fn(f32) -> u8,
) {
    let n = x.len() / 16 * 16;
    let va = _mm512_set1_ps(amax);
    let magnitude = _mm512_set1_epi32(0x7FFF_FFFF);
    let last_key = _mm512_set1_epi32(keys as i32 - 1);
    let neg_offset = _mm512_set1_epi32(keys as i32);
    let one = _mm512_set1_epi32(1);
    let (sp, tp) = (start.as_ptr() as *const i32, threshold.as_ptr());
    let mut i = 0;
    while i < n {
        let v = _mm512_div_ps(_mm512_loadu_ps(x.as_ptr().add(i)), va);
        let bits = _mm512_castps_si512(v);
        let key = _mm512_min_epu32(
            _mm512_srli_epi32::<16>(_mm512_and_si512(bits, magnitude)),
            last_key,
        );
        let negative = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
        let slot = _mm512_mask_add_epi32(key, negative, key, neg_offset);
        let base = _mm512_i32gather_epi32::<4>(slot, sp);
        let thr = _mm512_i32gather_ps::<4>(slot, tp);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, thr);
        let idx = _mm512_mask_add_epi32(base, up, base, one);
        _mm_storeu_si128(
            q.as_mut_ptr().add(i) as *mut __m128i,
            _mm512_cvtepi32_epi8(idx),
        );
        i += 16;
    }
    for j in n..x.len() {
        q[j] = scalar(x[j] / amax);
    }
}

/// Output formats of [`dequantize_block`].
#[derive(Clone, Copy)]
pub enum Format {
    /// f32.
    F32,
    /// bfloat16, rounded to nearest even.
    Bf16,
    /// IEEE half, rounded to nearest even.
    F16,
}

/// `out[i] = convert(code[q[i]] * amax)`: a gather from the shared 256-entry code and one
/// multiply per 16 values, so small blocks need no per-block table. `out` points at
/// `q.len()` elements of the format's width.
///
/// # Safety
/// The CPU must support AVX-512F/BW; `out` must be valid for `q.len()` writes.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dequantize_block(
    code: &[f32; 256],
    amax: f32,
    q: &[u8],
    out: *mut u8,
    format: Format,
) {
    let n = q.len() / 16 * 16;
    let va = _mm512_set1_ps(amax);
    let qp = q.as_ptr();
    let mut i = 0;
    while i < n {
        let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(i) as *const __m128i));
        let v = _mm512_mul_ps(_mm512_i32gather_ps::<4>(idx, code.as_ptr()), va);
        match format {
            Format::F32 => _mm512_storeu_ps((out as *mut f32).add(i), v),
            Format::Bf16 => {
                // Round to nearest even on the bit pattern, as libtorch's conversion does
                // (products of finite codes and a finite absmax are never NaN).
                let bits = _mm512_castps_si512(v);
                let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
                let rounded =
                    _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
                let h = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(rounded));
                _mm256_storeu_si256((out as *mut u16).add(i) as *mut __m256i, h);
            }
            Format::F16 => {
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                _mm256_storeu_si256((out as *mut u16).add(i) as *mut __m256i, h);
            }
        }
        i += 16;
    }
    for j in n..q.len() {
        let v = code[q[j] as usize] * amax;
        match format {
            Format::F32 => *(out as *mut f32).add(j) = v,
            Format::Bf16 => *(out as *mut u16).add(j) = half::bf16::from_f32(v).to_bits(),
            Format::F16 => *(out as *mut u16).add(j) = half::f16::from_f32(v).to_bits(),
        }
    }
}
