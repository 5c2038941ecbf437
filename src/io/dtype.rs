//! Element types found in checkpoint files, and conversion of their bytes to f32.
use crate::error::{OctetError, Result};
use half::{bf16, f16};

/// A stored element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// Unsigned byte.
    U8,
    /// Signed byte.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// Boolean, one byte each.
    Bool,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::U8 | Dtype::I8 | Dtype::Bool => 1,
        }
    }

    /// Whether the type is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
    }

    /// The matching libtorch kind.
    pub fn kind(self) -> tch::Kind {
        use tch::Kind;
        match self {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::U8 => Kind::Uint8,
            Dtype::I8 => Kind::Int8,
            Dtype::I16 => Kind::Int16,
            Dtype::I32 => Kind::Int,
            Dtype::I64 => Kind::Int64,
            Dtype::Bool => Kind::Bool,
        }
    }

    /// The dtype of a libtorch kind, if octet stores that kind.
    pub fn from_kind(kind: tch::Kind) -> Result<Self> {
        use tch::Kind;
        Ok(match kind {
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Double => Dtype::F64,
            Kind::Uint8 => Dtype::U8,
            Kind::Int8 => Dtype::I8,
            Kind::Int16 => Dtype::I16,
            Kind::Int => Dtype::I32,
            Kind::Int64 => Dtype::I64,
            Kind::Bool => Dtype::Bool,
            other => {
                return Err(OctetError::InvalidArgument(format!(
                    "unsupported tensor kind {other:?}"
                )))
            }
        })
    }

    /// The name safetensors uses.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F64 => "F64",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
            Dtype::Bool => "BOOL",
        }
    }
}

/// Converts floating-point elements `bytes` (little-endian `dtype`) into `out`, which must hold
/// exactly `bytes.len() / dtype.size()` values.
pub fn float_bytes_to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let n = bytes.len() / dtype.size();
    if n != out.len() || !bytes.len().is_multiple_of(dtype.size()) {
        return Err(OctetError::InvalidArgument(format!(
            "byte length {} does not hold {} elements of {dtype:?}",
            bytes.len(),
            out.len()
        )));
    }
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                *o = f64::from_le_bytes(a) as f32;
            }
        }
        other => {
            return Err(OctetError::InvalidArgument(format!(
                "{other:?} is not a floating-point type"
            )));
        }
    }
    Ok(())
}

/// Builds a CPU tensor of `dtype` and `shape` from contiguous little-endian bytes (copied).
pub fn tensor_from_bytes(dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<tch::Tensor> {
    let numel: usize = shape.iter().product();
    if numel * dtype.size() != bytes.len() {
        return Err(OctetError::InvalidArgument(format!(
            "{} bytes do not hold a {dtype:?} tensor of shape {shape:?}",
            bytes.len()
        )));
    }
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Ok(tch::Tensor::f_from_data_size(bytes, &dims, dtype.kind())?)
}
