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

/// Whether the CPU also has AVX-512 VBMI (byte permutes).
pub fn vbmi() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| available() && is_x86_feature_detected!("avx512vbmi"))
}

/// Spans at least this long go through the per-block table kernels (measured: at 256-value
/// blocks the table still pays for itself about twice over against the gather).
const TABLE_MIN_LEN: usize = 256;

/// Orders 64 indices so that byte interleaves within 128-bit lanes (`unpack{lo,hi}_epi8`, then
/// `_epi16`) come out as four vectors of 16 consecutive 32-bit values: position
/// 16·lane + 4·g + t takes index 16·g + 4·lane + t.
pub(crate) const UNPACK32_ORDER: [u8; 64] = {
    let mut p = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let (lane, g, t) = (i / 16, (i / 4) % 4, i % 4);
        p[i] = (16 * g + 4 * lane + t) as u8;
        i += 1;
    }
    p
};

/// `out[i] = convert(code[q[i]] * amax)`. `out` points at `q.len()` elements of the format's
/// width.
///
/// # Safety
/// The CPU must support AVX-512F/BW ([`available`]); `out` must be valid for `q.len()` writes.
pub unsafe fn dequantize_block(
    code: &[f32; 256],
    amax: f32,
    q: &[u8],
    out: *mut u8,
    format: Format,
) {
    if q.len() < TABLE_MIN_LEN || !vbmi() {
        dequantize_block_gather(code, amax, q, out, format)
    } else if let Format::F32 = format {
        dequantize_block_table32(code, amax, q, out as *mut f32)
    } else {
        dequantize_block_table16(code, amax, q, out as *mut u16, format)
    }
}

/// Looks up 64 byte indices in a 256-entry byte table held in four registers: two
/// two-register permutes (an index's bit 6 picks the register) and a blend on bit 7.
macro_rules! lookup256 {
    ($t:expr, $idx:expr, $top:expr) => {
        _mm512_mask_blend_epi8(
            $top,
            _mm512_permutex2var_epi8($t[0], $idx, $t[1]),
            _mm512_permutex2var_epi8($t[2], $idx, $t[3]),
        )
    };
}

/// Loads 256-byte tables into four registers each.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn table_registers<const P: usize>(planes: &[[u8; 256]; P]) -> [[__m512i; 4]; P] {
    let mut t = [[_mm512_setzero_si512(); 4]; P];
    for (regs, plane) in t.iter_mut().zip(planes) {
        for (j, reg) in regs.iter_mut().enumerate() {
            *reg = _mm512_loadu_si512(plane.as_ptr().add(64 * j) as *const _);
        }
    }
    t
}

/// The block's 256 values `convert(code[i] * amax)` split into byte planes: plane `p` holds
/// byte `p` (little-endian) of each value's bits, `P` = 4 for f32 and 2 for the 16-bit formats.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn scaled_byte_planes<const P: usize>(
    code: &[f32; 256],
    amax: f32,
    format: Format,
) -> [[u8; 256]; P] {
    let va = _mm512_set1_ps(amax);
    let mut planes = [[0u8; 256]; P];
    for c in 0..16 {
        let v = _mm512_mul_ps(_mm512_loadu_ps(code.as_ptr().add(16 * c)), va);
        let bits = match format {
            Format::F32 => _mm512_castps_si512(v),
            _ => half_bits(v, format),
        };
        for (p, plane) in planes.iter_mut().enumerate() {
            let byte = _mm512_srlv_epi32(bits, _mm512_set1_epi32(8 * p as i32));
            _mm_storeu_si128(
                plane.as_mut_ptr().add(16 * c) as *mut __m128i,
                _mm512_cvtepi32_epi8(byte),
            );
        }
    }
    planes
}

/// f32 output by byte permutes: the block's 256 scaled values are split into four byte
/// tables; every 64 bytes of `q` then cost eight permutes, four blends and eight unpacks.
/// Bit-identical to [`dequantize_block_gather`] (the same f32 products).
///
/// # Safety
/// The CPU must support AVX-512F/BW/VBMI ([`vbmi`]); `out` must be valid for `q.len()` writes.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn dequantize_block_table32(code: &[f32; 256], amax: f32, q: &[u8], out: *mut f32) {
    let planes = scaled_byte_planes::<4>(code, amax, Format::F32);
    let t = table_registers(&planes);
    let order = _mm512_loadu_si512(UNPACK32_ORDER.as_ptr() as *const _);
    let qp = q.as_ptr();
    let n = q.len() / 64 * 64;
    let mut i = 0;
    while i < n {
        let idx = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(qp.add(i) as *const _));
        let top = _mm512_movepi8_mask(idx);
        let (b0, b1) = (lookup256!(t[0], idx, top), lookup256!(t[1], idx, top));
        let (b2, b3) = (lookup256!(t[2], idx, top), lookup256!(t[3], idx, top));
        let (w01lo, w01hi) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
        let (w23lo, w23hi) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
        let o = out.add(i) as *mut __m512i;
        _mm512_storeu_si512(o, _mm512_unpacklo_epi16(w01lo, w23lo));
        _mm512_storeu_si512(o.add(1), _mm512_unpackhi_epi16(w01lo, w23lo));
        _mm512_storeu_si512(o.add(2), _mm512_unpacklo_epi16(w01hi, w23hi));
        _mm512_storeu_si512(o.add(3), _mm512_unpackhi_epi16(w01hi, w23hi));
        i += 64;
    }
    for (j, &b) in q.iter().enumerate().skip(n) {
        *out.add(j) = code[b as usize] * amax;
    }
}

/// Rounds f32 lanes to bfloat16 or half bits (nearest even), in the low 16 bits of each
/// 32-bit lane.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(super) unsafe fn half_bits(v: __m512, format: Format) -> __m512i {
    match format {
        Format::F16 => _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(v)),
        _ => {
            // Round to nearest even on the bit pattern, as libtorch's conversion does
            // (products of finite codes and a finite absmax are never NaN).
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
            _mm512_srli_epi32::<16>(rounded)
        }
    }
}

/// Interleaves the low bytes `a` and high bytes `b` of 64 16-bit values: the first index
/// vector gives values 0..32, the second 32..64 (an index's bit 6 picks `b`).
const INTERLEAVE16: [[u8; 64]; 2] = {
    let mut p = [[0u8; 64]; 2];
    let mut h = 0;
    while h < 2 {
        let mut k = 0;
        while k < 32 {
            p[h][2 * k] = (32 * h + k) as u8;
            p[h][2 * k + 1] = (64 + 32 * h + k) as u8;
            k += 1;
        }
        h += 1;
    }
    p
};

/// 16-bit output by byte permutes: the block's 256 scaled and rounded values are built once,
/// split into a low-byte and a high-byte table; then every 64 bytes of `q` cost two
/// [`lookup256!`]s and two interleaving permutes, with no gather and no per-value arithmetic.
/// Bit-identical to [`dequantize_block_gather`].
///
/// # Safety
/// The CPU must support AVX-512F/BW/VBMI ([`vbmi`]); `out` must be valid for `q.len()` writes;
/// `format` must be a 16-bit one.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn dequantize_block_table16(
    code: &[f32; 256],
    amax: f32,
    q: &[u8],
    out: *mut u16,
    format: Format,
) {
    let planes = scaled_byte_planes::<2>(code, amax, format);
    let [l, h] = table_registers(&planes);
    let [lo, hi] = &planes;
    let first = _mm512_loadu_si512(INTERLEAVE16[0].as_ptr() as *const _);
    let second = _mm512_loadu_si512(INTERLEAVE16[1].as_ptr() as *const _);
    let qp = q.as_ptr();
    let n = q.len() / 64 * 64;
    let mut i = 0;
    while i < n {
        let idx = _mm512_loadu_si512(qp.add(i) as *const _);
        let top = _mm512_movepi8_mask(idx);
        let (lb, hb) = (lookup256!(l, idx, top), lookup256!(h, idx, top));
        _mm512_storeu_si512(
            out.add(i) as *mut _,
            _mm512_permutex2var_epi8(lb, first, hb),
        );
        _mm512_storeu_si512(
            out.add(i + 32) as *mut _,
            _mm512_permutex2var_epi8(lb, second, hb),
        );
        i += 64;
    }
    for (j, &b) in q.iter().enumerate().skip(n) {
        *out.add(j) = u16::from(lo[b as usize]) | (u16::from(hi[b as usize]) << 8);
    }
}

/// `out[i] = convert(code[q[i]] * amax)`: a gather from the shared 256-entry code and one
/// multiply per 16 values, so short spans need no per-block table.
///
/// # Safety
/// As [`dequantize_block`].
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dequantize_block_gather(
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
                let h = _mm512_cvtepi32_epi16(half_bits(v, format));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantCode;

    #[test]
    fn table_lookup_is_bit_identical_to_the_gather() {
        if !vbmi() {
            eprintln!("skipped: no AVX-512 VBMI");
            return;
        }
        let mut code = [0f32; 256];
        code.copy_from_slice(QuantCode::dynamic_signed().values());
        // A fixed pseudo-random byte stream covering every code index.
        let q: Vec<u8> = (0u32..4096 + 77)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for format in [Format::Bf16, Format::F16] {
            for amax in [1.0f32, 0.0123, 3.7e-5, 812.5] {
                for len in [1024, 1031, 4096, 4096 + 77] {
                    let (mut a, mut b) = (vec![0u16; len], vec![0u16; len]);
                    // SAFETY: VBMI was checked above; both buffers hold `len` 16-bit values.
                    unsafe {
                        dequantize_block_table16(&code, amax, &q[..len], a.as_mut_ptr(), format);
                        dequantize_block_gather(
                            &code,
                            amax,
                            &q[..len],
                            b.as_mut_ptr() as *mut u8,
                            format,
                        );
                    }
                    assert_eq!(a, b, "amax {amax}, len {len}");
                }
            }
        }
        for amax in [1.0f32, 0.0123, 812.5] {
            for len in [1024, 1031, 4096 + 77] {
                let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
                // SAFETY: VBMI was checked above; both buffers hold `len` f32 values.
                unsafe {
                    dequantize_block_table32(&code, amax, &q[..len], a.as_mut_ptr());
                    dequantize_block_gather(
                        &code,
                        amax,
                        &q[..len],
                        b.as_mut_ptr() as *mut u8,
                        Format::F32,
                    );
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "f32, amax {amax}, len {len}");
            }
        }
    }
}
