//! Quantization codes: the 256 values a stored byte stands for, as a fraction of the block's absmax.
use crate::error::{OctetError, Result};
use tch::{Kind, Tensor};

/// Number of entries in an 8-bit code.
pub const CODE_LEN: usize = 256;

/// A sorted table of 256 f32 values in [-1, 1]; byte `q` de-quantizes to `code[q] * absmax`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantCode {
    values: Vec<f32>,
}

/// How a code was obtained; recorded in the octet manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeKind {
    /// bitsandbytes' signed dynamic map.
    Dynamic,
    /// A per-tensor code fitted to the tensor's own normalized values.
    Fitted,
}

impl std::str::FromStr for CodeKind {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dynamic" => Ok(CodeKind::Dynamic),
            "fitted" => Ok(CodeKind::Fitted),
            other => Err(OctetError::InvalidArgument(format!(
                "unknown code kind '{other}': expected 'dynamic' or 'fitted'"
            ))),
        }
    }
}

impl QuantCode {
    /// Wraps 256 values, checking they are finite, within [-1, 1] and sorted ascending
    /// (the quantizer's nearest-code search relies on the order).
    pub fn new(values: Vec<f32>) -> Result<Self> {
        if values.len() != CODE_LEN {
            return Err(OctetError::InvalidCode(format!(
                "expected {CODE_LEN} entries, found {}",
                values.len()
            )));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite() || v.abs() > 1.0) {
            return Err(OctetError::InvalidCode(format!(
                "entry {v} is outside [-1, 1]"
            )));
        }
        if values.windows(2).any(|w| w[0] > w[1]) {
            return Err(OctetError::InvalidCode(
                "entries are not sorted ascending".into(),
            ));
        }
        Ok(QuantCode { values })
    }

    /// Reads a code from a 1-d f32 tensor of 256 entries (e.g. a checkpoint's `.code`).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        if t.size() != [CODE_LEN as i64] {
            return Err(OctetError::ShapeMismatch {
                what: "quantization code".into(),
                expected: format!("[{CODE_LEN}]"),
                found: format!("{:?}", t.size()),
            });
        }
        let t = t
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .contiguous();
        Self::new(Vec::<f32>::try_from(&t)?)
    }

    /// bitsandbytes' dynamic map, `create_dynamic_map(signed, 7, 8)`.
    ///
    /// Built with libtorch's own `linspace` and f32 arithmetic so that every value equals
    /// bitsandbytes' float32 table bit for bit.
    pub fn dynamic(signed: bool) -> Self {
        let mut data: Vec<f64> = Vec::with_capacity(CODE_LEN);
        for i in 0..7i32 {
            let items = if signed {
                (1i64 << i) + 1
            } else {
                (1i64 << (i + 1)) + 1
            };
            let bounds = Tensor::linspace(0.1, 1.0, items, (Kind::Float, tch::Device::Cpu));
            let means = (bounds.narrow(0, 0, items - 1) + bounds.narrow(0, 1, items - 1)) / 2.0;
            let scale = 10f64.powi(i - 6);
            let pos = Vec::<f32>::try_from(&(&means * scale)).expect("f32 tensor to vec");
            data.extend(pos.iter().map(|&v| v as f64));
            if signed {
                let neg = Vec::<f32>::try_from(&(&means * -scale)).expect("f32 tensor to vec");
                data.extend(neg.iter().map(|&v| v as f64));
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.resize(CODE_LEN, 0.0);
        data.sort_by(|a, b| a.total_cmp(b));
        QuantCode {
            values: data.into_iter().map(|v| v as f32).collect(),
        }
    }

    /// The signed dynamic code used for weights and Adam's first moment.
    pub fn dynamic_signed() -> Self {
        Self::dynamic(true)
    }

    /// The unsigned dynamic code used for Adam's second moment.
    pub fn dynamic_unsigned() -> Self {
        Self::dynamic(false)
    }

    /// The 256 values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The code as a 1-d f32 CPU tensor.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.values)
    }

    /// Index of the code value nearest to `v` (ties go to the lower index), by exhaustive search.
    /// The reference the fast quantizer is tested against.
    pub fn nearest_exhaustive(&self, v: f32) -> u8 {
        let mut best = 0usize;
        let mut best_d = f64::INFINITY;
        for (i, &c) in self.values.iter().enumerate() {
            let d = (v as f64 - c as f64).abs();
            if d < best_d {
                best_d = d;
                best = i;
            }
        }
        best as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_dynamic_code_has_documented_landmarks() {
        let c = QuantCode::dynamic_signed();
        assert_eq!(c.values()[0], -0.99296875);
        assert_eq!(c.values()[127], 0.0);
        assert_eq!(c.values()[255], 1.0);
    }

    #[test]
    fn unsigned_dynamic_code_spans_zero_to_one() {
        let c = QuantCode::dynamic_unsigned();
        assert_eq!(c.values()[0], 0.0);
        assert_eq!(c.values()[255], 1.0);
        assert!(c.values().windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn rejects_unsorted_or_short_codes() {
        assert!(QuantCode::new(vec![0.0; 10]).is_err());
        let mut v = QuantCode::dynamic_signed().values().to_vec();
        v.swap(3, 4);
        assert!(QuantCode::new(v).is_err());
    }
}
