//! ggml's tensor types: their block layouts and their de-quantization to f32.
use super::Dtype;
use crate::error::{OctetError, Result};
use rayon::prelude::*;

/// A ggml tensor type.
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
}

impl GgmlType {
    pub(super) fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => {
                const NAMES: [(u32, &str); 20] = [
                    (6, "Q5_0"),
                    (7, "Q5_1"),
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
                    (26, "I32"),
                    (28, "F64"),
                ];
                let name = NAMES
                    .iter()
                    .find(|(i, _)| *i == other)
                    .map_or("unknown", |(_, n)| n);
                return Err(format!("ggml type {other} ({name})"));
            }
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => 32,
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
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
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
    }
}

/// De-quantizes stored bytes of type `ty` into `out`, whose length must be the element count.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    if !out.len().is_multiple_of(be) || data.len() != out.len() / be * bb {
        return Err(OctetError::InvalidArgument(format!(
            "{} bytes of {ty:?} do not hold {} elements",
            data.len(),
            out.len()
        )));
    }
    // Chunks of many blocks keep rayon's overhead small.
    let per = 4096 / be.max(1) * be;
    out.par_chunks_mut(per)
        .zip(data.par_chunks(per / be * bb))
        .for_each(|(o, d)| {
            for (ob, db) in o.chunks_exact_mut(be).zip(d.chunks_exact(bb)) {
                dequantize_block(ty, db, ob);
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
}
