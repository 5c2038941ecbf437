//! Blockwise 4-bit quantization, two codes per byte: bitsandbytes' NF4 and FP4 (same codes,
//! same rounding, same nibble order, so its (q, absmax) de-quantize here bit for bit) and
//! per-tensor fitted 16-level codes.
//!
//! The rounding follows bitsandbytes' `quantize_4bit` exactly: a full block is scaled by the
//! f32 reciprocal of its absmax, a partial last block is divided by its absmax (stored clamped
//! to 1e-38), the result is clamped to [-1, 1] and bucketed against the f32 midpoints of the
//! sorted code (a value on a midpoint takes the lower code). Element `2i` goes to the high
//! nibble of byte `i`; an odd count pads the last low nibble with the code of 0.
use super::blockwise::{cpu_slice, cpu_slice_mut};
use super::dispatch::uses_cpu_kernels;
use super::fourbit_kernels as kernels;
use crate::error::{OctetError, Result};
use half::{bf16, f16};
use tch::{Device, Kind, Tensor};

/// Entries of a 4-bit code.
pub const CODE4_LEN: usize = 16;

/// The 4-bit block sizes bitsandbytes accepts (and so octet): 32, 64, …, 4096.
pub const BLOCK4_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// bitsandbytes' NF4 table (`get_4bit_type("nf4")`), index order = value order.
const NF4: [f32; CODE4_LEN] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 bit patterns (sign, 2 exponent bits, 1 mantissa bit) before scaling.
/// Entry 8 is +0.0, not -0.0: bitsandbytes writes it as the Python integer `-0`, so its
/// de-quantized zeros are positive and bit-identity needs the same.
const FP4_RAW: [f32; CODE4_LEN] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// Which 16-level code a 4-bit tensor uses; recorded in the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Code4Kind {
    /// bitsandbytes' NormalFloat4.
    Nf4,
    /// bitsandbytes' FP4 (e2m1).
    Fp4,
    /// A 16-level code fitted to each tensor.
    Fitted,
}

impl std::str::FromStr for Code4Kind {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(Code4Kind::Nf4),
            "fp4" => Ok(Code4Kind::Fp4),
            "fitted" => Ok(Code4Kind::Fitted),
            other => Err(OctetError::InvalidArgument(format!(
                "unknown 4-bit code '{other}': expected 'nf4', 'fp4' or 'fitted'"
            ))),
        }
    }
}

impl std::fmt::Display for Code4Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Code4Kind::Nf4 => "nf4",
            Code4Kind::Fp4 => "fp4",
            Code4Kind::Fitted => "fitted",
        })
    }
}

/// Checks a 4-bit block size: one of [`BLOCK4_SIZES`].
pub fn block4(n: i64) -> Result<usize> {
    BLOCK4_SIZES
        .iter()
        .copied()
        .find(|&b| b as i64 == n)
        .ok_or_else(|| {
            OctetError::InvalidArgument(format!(
                "4-bit block size {n} is not supported: bitsandbytes' NF4/FP4 layout takes \
                 32, 64, 128, 256, 512, 1024, 2048 or 4096"
            ))
        })
}

/// A 16-entry code: nibble `k` de-quantizes to `values[k] * absmax`. The entries need not be
/// sorted (FP4 is in bit-pattern order); rounding goes through the sorted order.
#[derive(Clone, Debug, PartialEq)]
pub struct Code4 {
    values: [f32; CODE4_LEN],
    /// `sorted[j]`: the nibble of the j-th smallest value (ties keep nibble order, as
    /// bitsandbytes' argsort does for FP4's +0 and −0).
    sorted: [u8; CODE4_LEN],
    /// f32 midpoints between consecutive sorted values.
    bounds: [f32; CODE4_LEN - 1],
}

impl Code4 {
    /// Wraps 16 values, checking they are finite and within [-1, 1].
    pub fn new(values: [f32; CODE4_LEN]) -> Result<Self> {
        if let Some(v) = values.iter().find(|v| !v.is_finite() || v.abs() > 1.0) {
            return Err(OctetError::InvalidCode(format!(
                "4-bit code entry {v} is outside [-1, 1]"
            )));
        }
        let mut order: Vec<u8> = (0..CODE4_LEN as u8).collect();
        order.sort_by(|&a, &b| {
            values[a as usize]
                .partial_cmp(&values[b as usize])
                .expect("finite values compare")
        });
        let mut sorted = [0u8; CODE4_LEN];
        sorted.copy_from_slice(&order);
        let mut bounds = [0f32; CODE4_LEN - 1];
        for (j, b) in bounds.iter_mut().enumerate() {
            *b = (values[sorted[j] as usize] + values[sorted[j + 1] as usize]) / 2.0;
        }
        Ok(Code4 {
            values,
            sorted,
            bounds,
        })
    }

    /// Reads a code from a stored 1-d tensor of 16 entries.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        if t.size() != [CODE4_LEN as i64] {
            return Err(OctetError::ShapeMismatch {
                what: "4-bit code".into(),
                expected: format!("[{CODE4_LEN}]"),
                found: format!("{:?}", t.size()),
            });
        }
        let v = Vec::<f32>::try_from(&t.f_to_kind(Kind::Float)?.f_contiguous()?)?;
        let mut values = [0f32; CODE4_LEN];
        values.copy_from_slice(&v);
        Self::new(values)
    }

    /// bitsandbytes' NF4.
    pub fn nf4() -> Self {
        Self::new(NF4).expect("NF4 is a valid code")
    }

    /// bitsandbytes' FP4: the e2m1 patterns divided by their largest magnitude in f32.
    pub fn fp4() -> Self {
        Self::new(FP4_RAW.map(|v| v / 12.0)).expect("FP4 is a valid code")
    }

    /// The code of a fixed kind (`None` for fitted codes, which depend on the tensor).
    pub fn fixed(kind: Code4Kind) -> Option<Self> {
        match kind {
            Code4Kind::Nf4 => Some(Self::nf4()),
            Code4Kind::Fp4 => Some(Self::fp4()),
            Code4Kind::Fitted => None,
        }
    }

    /// The 16 values in nibble order.
    pub fn values(&self) -> &[f32; CODE4_LEN] {
        &self.values
    }

    /// The code as a 1-d f32 CPU tensor.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.values)
    }

    /// The nibble `v` (a normalized value in [-1, 1]) rounds to: bitsandbytes' `bucketize`
    /// against the midpoints, so a value on a midpoint takes the lower code.
    #[inline(always)]
    pub fn nearest(&self, v: f32) -> u8 {
        let pos = self.bounds.iter().filter(|&&b| b < v).count();
        self.sorted[pos]
    }
}

/// A tensor in blockwise 4-bit form.
#[derive(Debug)]
pub struct Quantized4 {
    /// Two codes per byte, `[ceil(numel / 2)]` uint8, element `2i` in the high nibble.
    pub packed: Tensor,
    /// One f32 scale per block, `[ceil(numel / block)]`.
    pub absmax: Tensor,
    /// The code.
    pub code: Code4,
    /// Elements per block (one of [`BLOCK4_SIZES`]).
    pub block: usize,
    /// The original shape.
    pub shape: Vec<i64>,
}

impl Quantized4 {
    /// Checks that the parts fit together before any kernel reads them.
    pub fn from_parts(
        packed: Tensor,
        absmax: Tensor,
        code: Code4,
        block: usize,
        shape: Vec<i64>,
    ) -> Result<Self> {
        block4(block as i64)?;
        if packed.kind() != Kind::Uint8 {
            return Err(OctetError::UnsupportedDtype {
                op: "4-bit dequantize",
                found: packed.kind(),
                expected: "uint8",
            });
        }
        if shape.iter().any(|&d| d < 0) {
            return Err(OctetError::InvalidArgument(format!(
                "4-bit tensor shape {shape:?} has a negative dimension"
            )));
        }
        let numel: usize = shape.iter().map(|&d| d as usize).product();
        if packed.numel() != numel.div_ceil(2) {
            return Err(OctetError::ShapeMismatch {
                what: format!("packed 4-bit codes of a {shape:?} tensor"),
                expected: format!("{} bytes", numel.div_ceil(2)),
                found: format!("{} bytes", packed.numel()),
            });
        }
        let want = numel.div_ceil(block) as i64;
        if absmax.size() != [want] {
            return Err(OctetError::ShapeMismatch {
                what: format!("absmax for {numel} elements in 4-bit blocks of {block}"),
                expected: format!("[{want}]"),
                found: format!("{:?}", absmax.size()),
            });
        }
        let absmax = absmax.f_to_kind(Kind::Float)?;
        Ok(Quantized4 {
            packed,
            absmax,
            code,
            block,
            shape,
        })
    }

    /// Element count of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    /// Bytes held: the packed codes, the scales and the code.
    pub fn nbytes(&self) -> usize {
        self.packed.numel() + 4 * self.absmax.numel() + 4 * CODE4_LEN
    }

    /// De-quantizes the whole tensor to `kind` (f32, bf16 or f16) on its device.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(OctetError::UnsupportedDtype {
                op: "4-bit dequantize",
                found: kind,
                expected: "f32, bf16 or f16",
            });
        }
        if !uses_cpu_kernels(&self.packed) {
            return self.dequantize_with_torch_ops(kind);
        }
        let mut out = Tensor::empty(self.shape.as_slice(), (kind, Device::Cpu));
        self.dequantize_into(&mut out)?;
        Ok(out)
    }

    /// De-quantizes into an existing contiguous CPU tensor of the original shape (f32, bf16
    /// or f16), so a caller can reuse one buffer.
    pub fn dequantize_into(&self, out: &mut Tensor) -> Result<()> {
        if out.size() != self.shape || out.device() != Device::Cpu || !out.is_contiguous() {
            return Err(OctetError::ShapeMismatch {
                what: "4-bit dequantize_into output".into(),
                expected: format!("contiguous CPU tensor of shape {:?}", self.shape),
                found: format!("{:?} on {:?}", out.size(), out.device()),
            });
        }
        let packed = self.packed.f_to_device(Device::Cpu)?.f_contiguous()?;
        let am = self.absmax.f_to_device(Device::Cpu)?.f_contiguous()?;
        let code = self.code.values();
        // SAFETY: `packed` (uint8) and `am` (f32) are contiguous CPU tensors owned by this
        // frame and only read; `out` is a contiguous CPU tensor of the element type matched
        // below, exclusively borrowed.
        unsafe {
            let (qs, ams) = (cpu_slice::<u8>(&packed), cpu_slice::<f32>(&am));
            match out.kind() {
                Kind::Float => {
                    kernels::dequantize_into(code, ams, self.block, qs, cpu_slice_mut::<f32>(out))
                }
                Kind::BFloat16 => {
                    kernels::dequantize_into(code, ams, self.block, qs, cpu_slice_mut::<bf16>(out))
                }
                Kind::Half => {
                    kernels::dequantize_into(code, ams, self.block, qs, cpu_slice_mut::<f16>(out))
                }
                other => {
                    return Err(OctetError::UnsupportedDtype {
                        op: "4-bit dequantize",
                        found: other,
                        expected: "f32, bf16 or f16",
                    })
                }
            }
        }
        Ok(())
    }

    /// The device-generic de-quantizer (what a GPU runs), computing what the CPU kernel does:
    /// `code[nibble] * absmax` in f32, then one cast.
    pub fn dequantize_with_torch_ops(&self, kind: Kind) -> Result<Tensor> {
        let dev = self.packed.device();
        let numel = self.numel() as i64;
        let b = self.block as i64;
        let nblocks = (numel + b - 1) / b;
        let bytes = self.packed.f_flatten(0, -1)?.f_to_kind(Kind::Int64)?;
        let nibbles = Tensor::f_stack(
            &[
                bytes.f_bitwise_right_shift_tensor_scalar(4)?,
                bytes.f_bitwise_and(15)?,
            ],
            1,
        )?
        .f_flatten(0, -1)?
        .f_narrow(0, 0, numel)?;
        let code = self.code.to_tensor().f_to_device(dev)?;
        let vals = code.f_index_select(0, &nibbles)?;
        let vals = vals
            .f_constant_pad_nd([0, nblocks * b - numel])?
            .f_view([nblocks, b])?;
        let scale = self.absmax.f_to_device(dev)?.f_unsqueeze(1)?;
        let out = vals
            .f_mul(&scale)?
            .f_flatten(0, -1)?
            .f_narrow(0, 0, numel)?
            .f_to_kind(kind)?;
        Ok(out.f_reshape(self.shape.as_slice())?)
    }
}

/// Quantizes a floating-point tensor with `code` in blocks of `block` (one of
/// [`BLOCK4_SIZES`]), exactly as bitsandbytes' `quantize_4bit`. Runs on the CPU; the result
/// lives there.
pub fn quantize4(x: &Tensor, block: usize, code: &Code4) -> Result<Quantized4> {
    block4(block as i64)?;
    match x.kind() {
        Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double => {}
        other => {
            return Err(OctetError::UnsupportedDtype {
                op: "4-bit quantize",
                found: other,
                expected: "a floating-point tensor",
            })
        }
    }
    let xf = x
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let numel = xf.numel();
    let packed = Tensor::empty([numel.div_ceil(2) as i64], (Kind::Uint8, Device::Cpu));
    let absmax = Tensor::empty([numel.div_ceil(block) as i64], (Kind::Float, Device::Cpu));
    // SAFETY: `xf` is a contiguous f32 CPU tensor only read here; `packed` and `absmax` were
    // just allocated contiguous on the CPU with their element types, one view each.
    unsafe {
        kernels::quantize_into(
            code,
            block,
            cpu_slice::<f32>(&xf),
            cpu_slice_mut::<u8>(&packed),
            cpu_slice_mut::<f32>(&absmax),
        );
    }
    Ok(Quantized4 {
        packed,
        absmax,
        code: code.clone(),
        block,
        shape: x.size(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp4_sorted_order_matches_bitsandbytes_argsort() {
        // torch.argsort of get_4bit_type("fp4") on the CPU.
        assert_eq!(
            Code4::fp4().sorted,
            [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]
        );
        assert_eq!(Code4::nf4().sorted, core::array::from_fn(|i| i as u8));
    }

    #[test]
    fn midpoints_round_down_and_zero_keeps_its_nibble() {
        let c = Code4::nf4();
        let mid = c.bounds[7];
        assert_eq!(c.nearest(mid), 7);
        assert_eq!(c.nearest(mid.next_up()), 8);
        assert_eq!(c.nearest(0.0), 7);
        assert_eq!(Code4::fp4().nearest(0.0), 0);
        assert_eq!(c.nearest(1.0), 15);
        assert_eq!(c.nearest(-1.0), 0);
    }

    #[test]
    fn unsupported_block_sizes_are_refused() {
        for b in [0, 16, 48, 100, 8192] {
            let e = block4(b).unwrap_err().to_string();
            assert!(e.contains(&format!("block size {b}")), "{e}");
        }
        let x = Tensor::zeros([64], (Kind::Float, Device::Cpu));
        assert!(quantize4(&x, 96, &Code4::nf4()).is_err());
    }

    #[test]
    fn parts_that_do_not_fit_are_refused() {
        let p = Tensor::zeros([32], (Kind::Uint8, Device::Cpu));
        let am = Tensor::ones([2], (Kind::Float, Device::Cpu));
        assert!(Quantized4::from_parts(p.copy(), am.copy(), Code4::nf4(), 32, vec![64]).is_ok());
        let err = Quantized4::from_parts(p.copy(), am.narrow(0, 0, 1), Code4::nf4(), 32, vec![64])
            .unwrap_err()
            .to_string();
        assert!(err.contains("absmax"), "{err}");
        assert!(Quantized4::from_parts(p, am, Code4::nf4(), 32, vec![66]).is_err());
    }
}
