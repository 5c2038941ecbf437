//! AVX-512 4-bit de-quantization: the block's 16 scaled values sit in one register and every
//! 16 nibbles are one in-register permute, with no gather and no per-value arithmetic.
#![allow(unsafe_op_in_unsafe_fn)]

use super::simd::{half_bits, Format};
use std::arch::x86_64::*;

/// `out[i] = convert(code[nibble i] * amax)` for `len` elements, element `2i` in the high
/// nibble of `q[i]`.
///
/// # Safety
/// The CPU must support AVX-512F/BW; `q` must hold `ceil(len / 2)` bytes and `out` must be
/// valid for `len` writes of the format's width.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dequantize_block(
    code: &[f32; 16],
    amax: f32,
    q: &[u8],
    out: *mut u8,
    len: usize,
    format: Format,
) {
    let table = _mm512_mul_ps(_mm512_loadu_ps(code.as_ptr()), _mm512_set1_ps(amax));
    // 16-bit formats: each 32-bit lane holds the rounded 16-bit value in its low half.
    let table16 = match format {
        Format::F32 => _mm512_setzero_si512(),
        _ => half_bits(table, format),
    };
    let low = _mm_set1_epi8(0x0F);
    let n = len / 32 * 32;
    let mut i = 0;
    while i < n {
        let b = _mm_loadu_si128(q.as_ptr().add(i / 2) as *const __m128i);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), low);
        let lo = _mm_and_si128(b, low);
        for (h, nib) in [_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)]
            .into_iter()
            .enumerate()
        {
            let idx = _mm512_cvtepu8_epi32(nib);
            let at = i + 16 * h;
            match format {
                Format::F32 => {
                    _mm512_storeu_ps((out as *mut f32).add(at), _mm512_permutexvar_ps(idx, table))
                }
                _ => _mm256_storeu_si256(
                    (out as *mut u16).add(at) as *mut __m256i,
                    _mm512_cvtepi32_epi16(_mm512_permutexvar_epi32(idx, table16)),
                ),
            }
        }
        i += 32;
    }
    let mut scaled = [0f32; 16];
    _mm512_storeu_ps(scaled.as_mut_ptr(), table);
    for j in n..len {
        let b = q[j / 2];
        let v = scaled[if j % 2 == 0 { b >> 4 } else { b & 15 } as usize];
        match format {
            Format::F32 => *(out as *mut f32).add(j) = v,
            Format::Bf16 => *(out as *mut u16).add(j) = half::bf16::from_f32(v).to_bits(),
            Format::F16 => *(out as *mut u16).add(j) = half::f16::from_f32(v).to_bits(),
        }
    }
}
