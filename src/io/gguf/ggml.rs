//! ggml's tensor types: their ids and names, their block layouts and their de-quantization
//! to f32 (the K-quant blocks in `kquants`).
use super::kquants::{self, QK_K};
use super::Dtype;
use crate::error::{OctetError, Result};
use rayon::prelude::*;

/// A ggml tensor type octet reads.
// Variants are spelled as ggml spells them: `Debug` prints them in messages.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: f16 scale `d`, 32 × i8; `x = d·q`.
    Q8_0,
    /// Blocks of 32: f16 scale `d`, 32 × 4 bits; `x = d·(q − 8)`.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 32 × 4 bits; `x = d·q + m`.
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 32 fifth bits, 32 × 4 bits; `x = d·(q − 16)`.
    Q5_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 32 fifth bits, 32 × 4 bits; `x = d·q + m`.
    Q5_1,
    /// K-quant blocks of 256: 16 sub-blocks of 2-bit codes with 4-bit scales and mins.
    Q2_K,
    /// K-quant blocks of 256: 16 sub-blocks of 3-bit codes with 6-bit scales.
    Q3_K,
    /// K-quant blocks of 256: 8 sub-blocks of 4-bit codes with 6-bit scales and mins.
    Q4_K,
    /// K-quant blocks of 256: 8 sub-blocks of 5-bit codes with 6-bit scales and mins.
    Q5_K,
    /// K-quant blocks of 256: 16 sub-blocks of 6-bit codes with 8-bit scales.
    Q6_K,
    /// K-quant blocks of 256: f32 scale, 256 × i8 (and their sums); `x = d·q`.
    Q8_K,
}

/// Every ggml type id with its name, read or not (ggml.h's `ggml_type`, including ids ggml
/// has since removed), so a refusal can name the type.
const GGML_TYPE_NAMES: [(u32, &str); 42] = [
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (4, "Q4_2"),
    (5, "Q4_3"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (31, "Q4_0_4_4"),
    (32, "Q4_0_4_8"),
    (33, "Q4_0_8_8"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (36, "IQ4_NL_4_4"),
    (37, "IQ4_NL_4_8"),
    (38, "IQ4_NL_8_8"),
    (39, "MXFP4"),
    (40, "NVFP4"),
    (41, "Q1_0"),
];

/// The name of ggml type `id`, or `None` for an id ggml never had.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    GGML_TYPE_NAMES
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, n)| *n)
}

impl GgmlType {
    /// Every type octet reads, in ggml id order.
    pub const READ: [GgmlType; 14] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::BF16,
    ];

    /// ggml's id of the type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// The type with ggml id `id`; an error names the id, its type name and the types octet
    /// reads.
    pub fn from_id(id: u32) -> std::result::Result<Self, String> {
        if let Some(t) = Self::READ.into_iter().find(|t| t.id() == id) {
            return Ok(t);
        }
        let name = ggml_type_name(id).unwrap_or("unknown");
        let read: Vec<String> = Self::READ.iter().map(|t| format!("{t:?}")).collect();
        Err(format!(
            "ggml type {id} ({name}) cannot be read (octet reads {})",
            read.join(", ")
        ))
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                32
            }
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
        }
    }

    /// The dtype octet serves the tensor as (quantized types are de-quantized to f32).
    pub fn served_dtype(self) -> Dtype {
        match self {
            GgmlType::F16 => Dtype::F16,
            GgmlType::BF16 => Dtype::BF16,
            _ => Dtype::F32,
        }
    }

    /// Whether the type is stored as plain floats, served as stored.
    pub fn is_float(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }
}

/// The f16 at byte `i` of `b`, exactly as f32.
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 5-bit codes of a Q5_0/Q5_1 block: low nibbles of `qs` (elements 0..16 then 16..32)
/// with bit `j` of the little-endian `qh` as element `j`'s fifth bit.
fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    std::array::from_fn(|j| {
        let low = (qs[j % 16] >> (4 * (j / 16))) & 0x0F;
        low | ((((high >> j) & 1) as u8) << 4)
    })
}

/// De-quantizes one block of stored bytes into `out` (its elements).
fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => out[0] = f16_at(b, 0),
        GgmlType::BF16 => out[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            // Two roundings (multiply, then add), as ggml and gguf-py compute it.
            for (j, &q) in b[4..20].iter().enumerate() {
                out[j] = d * (q & 0x0F) as f32 + m;
                out[j + 16] = d * (q >> 4) as f32 + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = f16_at(b, 0);
            for (o, q) in out.iter_mut().zip(q5_codes(&b[2..6], &b[6..22])) {
                *o = d * (q as i32 - 16) as f32;
            }
        }
        GgmlType::Q5_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (o, q) in out.iter_mut().zip(q5_codes(&b[4..8], &b[8..24])) {
                *o = d * q as f32 + m;
            }
        }
        GgmlType::Q2_K => kquants::q2_k(b, out),
        GgmlType::Q3_K => kquants::q3_k(b, out),
        GgmlType::Q4_K => kquants::q4_k(b, out),
        GgmlType::Q5_K => kquants::q5_k(b, out),
        GgmlType::Q6_K => kquants::q6_k(b, out),
        GgmlType::Q8_K => kquants::q8_k(b, out),
    }
}

/// Checks that `data` holds exactly `numel` elements of `ty`.
fn check_extent(ty: GgmlType, data: &[u8], numel: usize) -> Result<()> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    if !numel.is_multiple_of(be) || data.len() != numel / be * bb {
        return Err(OctetError::InvalidArgument(format!(
            "{} bytes of {ty:?} do not hold {numel} elements",
            data.len()
        )));
    }
    Ok(())
}

/// De-quantizes `data` in parallel chunks of whole blocks; `out` holds `width` items per
/// element and `store` writes one block's values into its items.
fn par_dequantize<T: Send>(
    ty: GgmlType,
    data: &[u8],
    out: &mut [T],
    width: usize,
    store: impl Fn(&[f32], &mut [T]) + Sync,
) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    // Chunks of many blocks keep rayon's overhead small.
    let per = 4096 / be * be;
    out.par_chunks_mut(per * width)
        .zip(data.par_chunks(per / be * bb))
        .for_each(|(o, d)| {
            let mut vals = [0f32; QK_K];
            let vals = &mut vals[..be];
            for (ob, db) in o.chunks_exact_mut(be * width).zip(d.chunks_exact(bb)) {
                dequantize_block(ty, db, vals);
                store(vals, ob);
            }
        });
}

/// De-quantizes stored bytes of type `ty` into `out`, whose length must be the element count.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    check_extent(ty, data, out.len())?;
    par_dequantize(ty, data, out, 1, |v, o| o.copy_from_slice(v));
    Ok(())
}

/// De-quantizes `numel` elements of type `ty` straight into little-endian f32 bytes: the one
/// f32 copy of the tensor is the returned buffer.
pub fn dequantize_to_le_bytes(ty: GgmlType, data: &[u8], numel: usize) -> Result<Vec<u8>> {
    check_extent(ty, data, numel)?;
    let mut out = vec![0u8; numel * 4];
    par_dequantize(ty, data, &mut out, 4, |v, o| {
        for (b, x) in o.chunks_exact_mut(4).zip(v) {
            b.copy_from_slice(&x.to_le_bytes());
        }
    });
    Ok(out)
}

/// The types octet writes from f32 values ([`quantize_f32`]).
pub const WRITTEN: [GgmlType; 4] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0];

/// f32 → f16 bits, rounded to nearest even as numpy's `astype(float16)` rounds (overflow to
/// infinity, gradual underflow; a quiet NaN keeps its payload's top bits).
pub fn f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// f32 → bf16 bits as gguf (and ggml's `ggml_compute_fp32_to_bf16`) computes them: a NaN is
/// made quiet, everything else rounded to nearest even (so the largest f32s round to
/// infinity), not truncated.
pub fn bf16_bits(x: f32) -> u16 {
    let mut n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | (64 << 16);
    }
    ((u64::from(n) + 0x7fff + u64::from((n >> 16) & 1)) >> 16) as u16
}

/// gguf's `np_roundf`: rounds half away from zero through `floor`, so an infinity becomes NaN
/// (∞ − ∞), exactly as gguf computes it, rather than staying infinite as `f32::round` would.
fn np_roundf(n: f32) -> f32 {
    let a = n.abs();
    let floored = a.floor();
    let b = floored + (2.0 * (a - floored)).floor();
    let sign = if n > 0.0 {
        1.0
    } else if n < 0.0 {
        -1.0
    } else {
        n
    };
    sign * b
}

/// One Q8_0 block of 32 values, step for step as `gguf.quants.Q8_0.quantize_blocks`: the
/// scale `d = max|x| / 127` in f32 (a NaN in the block propagates, as numpy's `max` does),
/// stored as f16; codes `roundf(x · (1/d))` (0 where d = 0). A NaN code is stored as 0, as
/// numpy's cast gives on x86 and ARM: that happens only for non-finite blocks and blocks whose
/// scale is so small (|x| < 2⁻¹²¹) that 1/d overflows.
fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let mut amax = 0f32;
    for &v in x {
        let a = v.abs();
        if !amax.is_nan() && (a.is_nan() || a > amax) {
            amax = a;
        }
    }
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out[..2].copy_from_slice(&f16_bits(d).to_le_bytes());
    for (o, &v) in out[2..].iter_mut().zip(x) {
        // Codes lie within ±127; `as` maps NaN to 0.
        *o = np_roundf(v * id) as i8 as u8;
    }
}

/// Converts f32 `values` to type `ty` (one of [`WRITTEN`]), bit-identical to
/// `gguf.quants.quantize` (F16 as numpy's `astype`), into `out`, whose length must be the
/// stored size. Q8_0 blocks run along the values in order, so whole rows (of a multiple of
/// 32) give ggml's layout.
pub fn quantize_f32(ty: GgmlType, values: &[f32], out: &mut [u8]) -> Result<()> {
    if !WRITTEN.contains(&ty) {
        let names: Vec<String> = WRITTEN.iter().map(|t| format!("{t:?}")).collect();
        return Err(OctetError::InvalidArgument(format!(
            "octet does not write {ty:?} tensors (it writes {})",
            names.join(", ")
        )));
    }
    check_extent(ty, out, values.len())?;
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let per = 4096 / be * be;
    out.par_chunks_mut(per / be * bb)
        .zip(values.par_chunks(per))
        .for_each(|(o, v)| match ty {
            GgmlType::Q8_0 => {
                for (ob, vb) in o.chunks_exact_mut(bb).zip(v.chunks_exact(be)) {
                    q8_0_block(vb, ob);
                }
            }
            _ => {
                for (ob, &x) in o.chunks_exact_mut(bb).zip(v) {
                    match ty {
                        GgmlType::F16 => ob.copy_from_slice(&f16_bits(x).to_le_bytes()),
                        GgmlType::BF16 => ob.copy_from_slice(&bf16_bits(x).to_le_bytes()),
                        _ => ob.copy_from_slice(&x.to_le_bytes()),
                    }
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_formulas() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x3A; // low nibble 10, high 3
        let mut out = [0f32; 32];
        dequantize_block(GgmlType::Q4_1, &b, &mut out);
        assert_eq!((out[0], out[16]), (4.0, 0.5));
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&half::f16::from_f32(2.0).to_le_bytes());
        b[2] = 0xF0;
        dequantize_block(GgmlType::Q4_0, &b, &mut out);
        assert_eq!((out[0], out[16]), (-16.0, 14.0));
    }

    #[test]
    fn ids_names_and_layouts() {
        for t in GgmlType::READ {
            assert_eq!(GgmlType::from_id(t.id()), Ok(t));
            assert_eq!(ggml_type_name(t.id()), Some(format!("{t:?}").as_str()));
            assert!(t.block_elems() <= QK_K);
        }
        let ids: std::collections::BTreeSet<u32> = GGML_TYPE_NAMES.iter().map(|p| p.0).collect();
        assert_eq!(ids.len(), GGML_TYPE_NAMES.len());
        let e = GgmlType::from_id(19).unwrap_err();
        assert!(
            e.contains("ggml type 19 (IQ1_S)") && e.contains("Q6_K"),
            "{e}"
        );
        assert!(GgmlType::from_id(1000).unwrap_err().contains("(unknown)"));
    }

    #[test]
    fn quantizers_round_as_gguf_does() {
        // Ties: 1 + 2^-8 is halfway between two bf16s; even wins, and 1 + 3·2^-8 rounds up.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80);
        assert_eq!(bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f16_bits(65520.0), 0x7c00);
        assert_eq!(f16_bits(65519.0), 0x7bff);
        // A block with 127 has d = 1: x.5 rounds away from zero.
        let mut x = [0f32; 32];
        x[..4].copy_from_slice(&[127.0, 2.5, -2.5, 0.49]);
        let mut b = [0u8; 34];
        quantize_f32(GgmlType::Q8_0, &x, &mut b).unwrap();
        assert_eq!(&b[..6], &[0x00, 0x3c, 127, 3, (-3i8) as u8, 0]);
        let mut back = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut back).unwrap();
        assert_eq!(&back[..3], &[127.0, 3.0, -3.0]);
        assert!(quantize_f32(GgmlType::Q4_0, &x, &mut b).is_err());
        assert!(quantize_f32(GgmlType::Q8_0, &x[..31], &mut b).is_err());
    }

    #[test]
    fn short_or_long_data_is_refused() {
        let mut out = vec![0f32; 256];
        assert!(dequantize(GgmlType::Q4_K, &[0u8; 143], &mut out).is_err());
        assert!(dequantize(GgmlType::Q4_K, &[0u8; 145], &mut out).is_err());
        assert!(dequantize_to_le_bytes(GgmlType::Q6_K, &[0u8; 210], 255).is_err());
        // A zero Q6_K block is d·(0 − 32) with d = 0: negative zeros, as ggml gives.
        let neg_zero = (-0f32).to_le_bytes().repeat(256);
        assert_eq!(
            dequantize_to_le_bytes(GgmlType::Q6_K, &[0u8; 210], 256).unwrap(),
            neg_zero
        );
    }
}
