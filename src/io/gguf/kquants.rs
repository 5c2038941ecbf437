//! ggml's K-quant blocks (256 elements each) de-quantized to f32.
//!
//! Each function reads one block's stored bytes and writes its 256 values. The float
//! operations and their order are ggml's, as the gguf Python package computes them: sub-block
//! scales are `d·sc` (and `dmin·m`) rounded to f32 first, then each value is `scale·q` (minus
//! the minimum, a second rounding). No fused multiply-add, so results are bit-identical.
use super::ggml::f16_at;

/// Elements per K-quant block.
pub const QK_K: usize = 256;

/// Q2_K (84 bytes): 16 bytes of 4-bit scale / 4-bit min pairs, 64 bytes of 2-bit codes, f16
/// `d`, f16 `dmin`. Sub-block `s` of 16: `x = (d·sc) · q − dmin·m`.
pub fn q2_k(b: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    // Codes: 2 halves of 128, each 32 bytes read 4 times at shifts 0, 2, 4, 6.
    for (i, o) in out.iter_mut().enumerate() {
        let (half, shift, l) = (i / 128, (i % 128) / 32, i % 32);
        let q = (qs[half * 32 + l] >> (2 * shift)) & 3;
        let sc = scales[i / 16];
        let dl = d * (sc & 0xF) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *o = dl * q as f32 - ml;
    }
}

/// Q3_K (110 bytes): 32 bytes of high bits, 64 bytes of low 2-bit codes, 12 bytes of 6-bit
/// signed scales, f16 `d`. Sub-block `s` of 16: `x = (d·(sc − 32)) · (q − 4·!hbit)`.
pub fn q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let mut dl = [0f32; 16];
    for (k, v) in dl.iter_mut().enumerate() {
        let low = (sc[k % 8] >> (4 * (k / 8))) & 0x0F;
        let high = (sc[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        *v = d * ((low | (high << 4)) as i8 - 32) as f32;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let (half, shift, l) = (i / 128, (i % 128) / 32, i % 32);
        let low = ((qs[half * 32 + l] >> (2 * shift)) & 3) as i8;
        // A set high bit means no offset; a clear one subtracts 4.
        let high = ((hmask[l] >> (i / 32)) & 1) ^ 1;
        *o = dl[i / 16] * (low - (high << 2) as i8) as f32;
    }
}

/// The eight 6-bit scales and mins of Q4_K and Q5_K, packed in 12 bytes.
fn scale_min_k4(sc: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut s, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        s[j] = sc[j] & 0x3F;
        m[j] = sc[4 + j] & 0x3F;
        s[4 + j] = (sc[8 + j] & 0x0F) | ((sc[j] >> 2) & 0x30);
        m[4 + j] = (sc[8 + j] >> 4) | ((sc[4 + j] >> 2) & 0x30);
    }
    (s, m)
}

/// The per-sub-block (scale, min) of Q4_K and Q5_K: `d·sc` and `dmin·m`, each rounded.
fn sub_scales_k4(b: &[u8]) -> [(f32, f32); 8] {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (s, m) = scale_min_k4(&b[4..16]);
    std::array::from_fn(|j| (d * s[j] as f32, dmin * m[j] as f32))
}

/// Q4_K (144 bytes): f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins, 128 bytes of
/// 4-bit codes. Sub-block `j` of 32: `x = (d·sc) · q − dmin·m`.
pub fn q4_k(b: &[u8], out: &mut [f32]) {
    let qs = &b[16..144];
    // 4 chunks of 32 bytes: low nibbles for sub-block 2c, high ones for 2c + 1.
    for (j, ((dl, ml), o)) in sub_scales_k4(b)
        .into_iter()
        .zip(out.chunks_exact_mut(32))
        .enumerate()
    {
        let shift = 4 * (j % 2);
        for (o, &q) in o.iter_mut().zip(&qs[(j / 2) * 32..][..32]) {
            *o = dl * ((q >> shift) & 0x0F) as f32 - ml;
        }
    }
}

/// Q5_K (176 bytes): as Q4_K with 32 bytes of fifth bits before the 128 bytes of nibbles.
pub fn q5_k(b: &[u8], out: &mut [f32]) {
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (j, ((dl, ml), o)) in sub_scales_k4(b)
        .into_iter()
        .zip(out.chunks_exact_mut(32))
        .enumerate()
    {
        let shift = 4 * (j % 2);
        let low = &qs[(j / 2) * 32..][..32];
        for ((o, &lo), &hi) in o.iter_mut().zip(low).zip(qh) {
            let q = ((lo >> shift) & 0x0F) | (((hi >> j) & 1) << 4);
            *o = dl * q as f32 - ml;
        }
    }
}

/// Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed 8-bit
/// scales, f16 `d`. Sub-block `s` of 16: `x = (d·sc) · (q − 32)`.
pub fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (i, o) in out.iter_mut().enumerate() {
        let (half, r) = (i / 128, i % 128);
        // Low nibbles: 64 bytes per half, read at shifts 0 and 4.
        let low = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
        // High bits: 32 bytes per half, read at shifts 0, 2, 4, 6.
        let high = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        *o = (d * sc[i / 16] as i8 as f32) * q as f32;
    }
}

/// Q8_K (292 bytes): f32 `d`, 256 signed bytes, 16 i16 sums (unused here). `x = d·q`.
pub fn q8_k(b: &[u8], out: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &q) in out.iter_mut().zip(&b[4..260]) {
        *o = q as i8 as f32 * d;
    }
}
