//! Quantization codes: the 256 values a stored byte stands for, as a fraction of the block's absmax.
use crate::error::{OctetError, Result};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// Number of entries in an 8-bit code.
pub const CODE_LEN: usize = 256;

/// A sorted table of 256 f32 values in [-1, 1]; byte `q` de-quantizes to `code[q] * absmax`.
#[derive(Clone, Debug)]
pub struct QuantCode {
    values: Vec<f32>,
    /// The code and its rounding thresholds as tensors, made once per device and shared by
    /// clones, so the generic (GPU) path never re-uploads the table per call.
    on_device: Arc<Mutex<Vec<DeviceTables>>>,
}

#[derive(Debug)]
struct DeviceTables {
    device: Device,
    code: Tensor,
    thresholds: Tensor,
}

impl PartialEq for QuantCode {
    fn eq(&self, other: &Self) -> bool {
        self.values == other.values
    }
}

/// How a code was obtained; recorded in the octet manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeKind {
    /// bitsandbytes' signed dynamic map.
    Dynamic,
    /// A per-tensor code fitted to the tensor's own normalized values.
    Fitted,
    /// Evenly spaced levels `k / 127`, k = −127…127 (llama.cpp's Q8_0 rounding grid).
    Linear,
}

impl CodeKind {
    /// Whether readers of format version 1 know this kind's name.
    pub fn known_to_version_one(self) -> bool {
        matches!(self, CodeKind::Dynamic | CodeKind::Fitted)
    }
}

impl std::str::FromStr for CodeKind {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dynamic" => Ok(CodeKind::Dynamic),
            "fitted" => Ok(CodeKind::Fitted),
            "linear" => Ok(CodeKind::Linear),
            other => Err(OctetError::InvalidArgument(format!(
                "unknown code kind '{other}': expected 'dynamic', 'fitted' or 'linear'"
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
        Ok(Self::from_sorted(values))
    }

    fn from_sorted(values: Vec<f32>) -> Self {
        QuantCode {
            values,
            on_device: Arc::default(),
        }
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
        Self::from_sorted(data.into_iter().map(|v| v as f32).collect())
    }

    /// The linear code: `k / 127` for k = −127…127, with −1 also at index 0 (256 entries, one
    /// repeated), so rounding is llama.cpp Q8_0's `round(x / absmax · 127)`.
    pub fn linear() -> Self {
        let mut v = vec![-1.0f32];
        v.extend((-127..=127).map(|k| k as f32 / 127.0));
        Self::from_sorted(v)
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

    /// The code as a 1-d f32 CPU tensor (a fresh copy).
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.values)
    }

    /// `thresholds[j]`: the smallest f32 strictly above the midpoint of codes j and j+1, so a
    /// value rounds above code j exactly when it is `>=` it (ties go to the lower code).
    pub fn thresholds(&self) -> Vec<f32> {
        self.values
            .windows(2)
            .map(|w| {
                let mid = (w[0] as f64 + w[1] as f64) / 2.0;
                let r = mid as f32;
                if (r as f64) > mid {
                    r
                } else {
                    r.next_up()
                }
            })
            .collect()
    }

    /// (code, thresholds) as f32 tensors on `device`, uploaded on first use and cached. The
    /// returned tensors share storage with the cache: read them, never write them.
    pub fn tables_on(&self, device: Device) -> Result<(Tensor, Tensor)> {
        let mut cache = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.iter().find(|t| t.device == device) {
            return Ok((t.code.shallow_clone(), t.thresholds.shallow_clone()));
        }
        let code = Tensor::from_slice(&self.values).f_to_device(device)?;
        let thresholds = Tensor::from_slice(&self.thresholds()).f_to_device(device)?;
        cache.push(DeviceTables {
            device,
            code: code.shallow_clone(),
            thresholds: thresholds.shallow_clone(),
        });
        Ok((code, thresholds))
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
