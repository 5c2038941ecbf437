//! Double-quantized block scales (QLoRA's "double quantization"), exactly as bitsandbytes 0.50
//! does it for `compress_statistics=True`.
//!
//! A blockwise quantizer keeps one f32 scale (absmax) per block; at block 64 those scales cost
//! 0.5 bits per weight. Double quantization stores them in 8 bits instead:
//!
//! 1. `offset` = the mean of all scales (libtorch's f32 `mean`, the very reduction bitsandbytes
//!    calls);
//! 2. `scale − offset` is quantized blockwise in groups of [`GROUP`] with the signed dynamic
//!    code, rounded as bitsandbytes' CPU kernel rounds (see [`quantize_blockwise_bnb`]);
//! 3. one f32 absmax per group is kept.
//!
//! De-quantization is `code[q] * group_absmax + offset` in f32, bit for bit bitsandbytes'
//! `dequantize_blockwise(...)` followed by `absmax += offset`. Usable by any block quantizer:
//! it only sees the scales.
use super::code::{QuantCode, CODE_LEN};
use crate::error::{OctetError, Result};
use tch::{Device, Kind, Tensor};

/// Scales per group of the second-level quantization (bitsandbytes' `blocksize=256`).
pub const GROUP: usize = 256;

/// Stored name of the uint8 scales in a module whose absmax is double-quantized (it replaces
/// `absmax`, so a reader that does not know the layout finds no `absmax` instead of
/// misreading bytes as scales).
pub const STORED_Q: &str = "absmax_q";
/// Stored name of the f32 per-group absmax.
pub const STORED_SCALE: &str = "absmax_scale";
/// Stored name of the f32 `[1]` offset.
pub const STORED_OFFSET: &str = "absmax_offset";

/// Points of the rounding grid bitsandbytes' CPU quantizer maps a normalized value onto.
const LUT_LEN: usize = 1 << 16;

/// Block scales in double-quantized form.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuantized {
    /// One byte per block scale: an index into the signed dynamic code.
    pub q: Vec<u8>,
    /// One f32 absmax per group of [`GROUP`] scales.
    pub group_absmax: Vec<f32>,
    /// The mean subtracted from every scale before quantizing.
    pub offset: f32,
}

impl DoubleQuantized {
    /// Quantizes block scales (bitsandbytes' `compress_statistics=True`).
    pub fn quantize(absmax: &[f32]) -> Self {
        let offset = if absmax.is_empty() {
            0.0
        } else {
            Tensor::from_slice(absmax)
                .mean(Kind::Float)
                .double_value(&[]) as f32
        };
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (q, group_absmax) =
            quantize_blockwise_bnb(&centred, GROUP, &QuantCode::dynamic_signed());
        DoubleQuantized {
            q,
            group_absmax,
            offset,
        }
    }

    /// Rebuilds from stored parts, checking the lengths agree (`group_absmax` must have one
    /// entry per [`GROUP`] of `q`) and that the f32 values are finite, so a corrupted table
    /// is an error here and never a wrong or out-of-bounds read later. `what` names the
    /// tensor in messages.
    pub fn from_parts(what: &str, q: Vec<u8>, group_absmax: Vec<f32>, offset: f32) -> Result<Self> {
        let want = q.len().div_ceil(GROUP);
        if group_absmax.len() != want {
            return Err(OctetError::ShapeMismatch {
                what: format!(
                    "{what}: double-quantized absmax of {} blocks in groups of {GROUP}",
                    q.len()
                ),
                expected: format!("{want} group scales"),
                found: format!("{}", group_absmax.len()),
            });
        }
        if let Some(v) = group_absmax
            .iter()
            .chain(std::iter::once(&offset))
            .find(|v| !v.is_finite())
        {
            return Err(OctetError::InvalidArgument(format!(
                "{what}: double-quantized absmax holds {v}"
            )));
        }
        Ok(DoubleQuantized {
            q,
            group_absmax,
            offset,
        })
    }

    /// The block scales back in f32: `code[q] * group_absmax + offset`.
    pub fn dequantize(&self) -> Vec<f32> {
        let code = QuantCode::dynamic_signed();
        let code = code.values();
        self.q
            .chunks(GROUP)
            .zip(&self.group_absmax)
            .flat_map(|(qs, &s)| qs.iter().map(move |&q| code[q as usize] * s + self.offset))
            .collect()
    }

    /// The block scales as octet's 8-bit layers use them: [`Self::dequantize`] with any
    /// negative value (possible only for a block whose absmax is within half a code step of
    /// zero) raised to 0. Writers quantize the elements against exactly these, so a reader
    /// reproduces what the writer measured.
    pub fn block_scales(&self) -> Vec<f32> {
        self.dequantize().into_iter().map(|a| a.max(0.0)).collect()
    }

    /// Number of block scales held.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether no scale is held.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Stored bytes: one per scale, four per group, four for the offset.
    pub fn nbytes(&self) -> usize {
        self.q.len() + 4 * self.group_absmax.len() + 4
    }

    /// The stored tensors: `q` (uint8), group absmax (f32) and the offset (f32 `[1]`).
    pub fn to_tensors(&self) -> (Tensor, Tensor, Tensor) {
        (
            Tensor::from_slice(&self.q),
            Tensor::from_slice(&self.group_absmax),
            Tensor::from_slice(&[self.offset]),
        )
    }

    /// Reads the stored tensors (any device, any float kind for the scales), checked as
    /// [`Self::from_parts`] checks.
    pub fn from_tensors(
        what: &str,
        q: &Tensor,
        group_absmax: &Tensor,
        offset: &Tensor,
    ) -> Result<Self> {
        if q.kind() != Kind::Uint8 {
            return Err(OctetError::UnsupportedDtype {
                op: "double-quantized absmax",
                found: q.kind(),
                expected: "uint8",
            });
        }
        if offset.numel() != 1 {
            return Err(OctetError::ShapeMismatch {
                what: format!("{what}: double-quantized absmax offset"),
                expected: "1 value".into(),
                found: format!("{:?}", offset.size()),
            });
        }
        let host = |t: &Tensor, k: Kind| -> Result<Tensor> {
            Ok(t.f_to_device(Device::Cpu)?
                .f_to_kind(k)?
                .f_contiguous()?
                .f_flatten(0, -1)?)
        };
        let q = Vec::<u8>::try_from(&host(q, Kind::Uint8)?)?;
        let scales = Vec::<f32>::try_from(&host(group_absmax, Kind::Float)?)?;
        let offset = Vec::<f32>::try_from(&host(offset, Kind::Float)?)?[0];
        Self::from_parts(what, q, scales, offset)
    }
}

/// bitsandbytes 0.50's CPU blockwise 8-bit quantizer, bit for bit: per block
/// `absmax = max |x|`, `v = clamp(x * (1 / absmax), −1, 1)`, then `v` goes to the nearest of
/// 65,536 evenly spaced grid points on [−1, 1] (`trunc((v + 1) · 0.5 · 65535 + 0.5)` in f32)
/// and the grid point to its nearest code value. An all-zero block gives index 0, as there.
///
/// This differs from [`super::quantize`] (exact nearest code) only for values within half a
/// grid step of a midpoint between two codes; it exists so that double-quantized scales equal
/// bitsandbytes' own.
pub fn quantize_blockwise_bnb(x: &[f32], block: usize, code: &QuantCode) -> (Vec<u8>, Vec<f32>) {
    let lut = grid_lut(code);
    let mut q = vec![0u8; x.len()];
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for (xs, qs) in x.chunks(block).zip(q.chunks_mut(block)) {
        let a = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        if a == 0.0 {
            continue;
        }
        let inv = 1.0 / a;
        for (&v, out) in xs.iter().zip(qs.iter_mut()) {
            let v = (v * inv).clamp(-1.0, 1.0);
            let k = ((v + 1.0) * 0.5 * 65535.0 + 0.5) as usize;
            *out = lut[k.min(LUT_LEN - 1)];
        }
    }
    (q, absmax)
}

/// For each of the 65,536 grid points `k / 65535 · 2 − 1`, the index of the nearest code
/// value (ties to the lower index).
fn grid_lut(code: &QuantCode) -> Vec<u8> {
    let values = code.values();
    (0..LUT_LEN)
        .map(|k| {
            let g = (k as f64 / 65535.0 * 2.0 - 1.0) as f32 as f64;
            let mut best = 0usize;
            for (j, &c) in values.iter().enumerate().skip(1) {
                if (g - c as f64).abs() < (g - values[best] as f64).abs() {
                    best = j;
                }
            }
            debug_assert!(best < CODE_LEN);
            best as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_small_relative_to_the_spread() {
        let absmax: Vec<f32> = (0..1000)
            .map(|i| 0.01 + (i as f32 * 0.37).sin().abs() * 0.05)
            .collect();
        let dq = DoubleQuantized::quantize(&absmax);
        assert_eq!(dq.len(), 1000);
        assert_eq!(dq.group_absmax.len(), 4);
        let back = dq.dequantize();
        let spread = 0.05;
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() <= spread * 0.01, "{a} vs {b}");
        }
    }

    #[test]
    fn length_mismatch_is_refused() {
        let err =
            DoubleQuantized::from_parts("w.absmax", vec![0; 300], vec![1.0], 0.0).unwrap_err();
        assert!(err.to_string().contains("w.absmax"), "{err}");
        assert!(DoubleQuantized::from_parts("w", vec![0; 300], vec![1.0, f32::NAN], 0.0).is_err());
    }

    #[test]
    fn constant_scales_come_back_exactly() {
        let dq = DoubleQuantized::quantize(&[0.5; 10]);
        assert_eq!(dq.dequantize(), vec![0.5; 10]);
    }
}
