//! Checks on tensor values where they enter octet and before octet writes them: float data
//! finite, quantization codes sorted and finite, absmax finite and non-negative. Each check
//! names the tensor; callers add the file.
use crate::io::Dtype;
use crate::quant::QuantCode;

/// The first non-finite element of little-endian `dtype` data, as (index, value); `None` when
/// all are finite or the dtype is not floating point. Tests the exponent bits directly, so it
/// costs one pass over the bytes with no conversion.
pub fn first_nonfinite(dtype: Dtype, bytes: &[u8]) -> Option<(usize, f64)> {
    fn scan<const N: usize>(
        bytes: &[u8],
        exp_mask: u64,
        value: impl Fn([u8; N]) -> f64,
    ) -> Option<(usize, f64)> {
        let word = |c: &[u8]| {
            let mut a = [0u8; 8];
            a[..N].copy_from_slice(c);
            u64::from_le_bytes(a)
        };
        // A branch-free "any" per 64 KiB run keeps the common all-finite case fast.
        for (run_i, run) in bytes.chunks(N << 14).enumerate() {
            let any = run
                .chunks_exact(N)
                .fold(false, |acc, c| acc | (word(c) & exp_mask == exp_mask));
            if any {
                let (i, c) = run
                    .chunks_exact(N)
                    .enumerate()
                    .find(|(_, c)| word(c) & exp_mask == exp_mask)?;
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                return Some((run_i * (1 << 14) + i, value(a)));
            }
        }
        None
    }
    match dtype {
        Dtype::F32 => scan::<4>(bytes, 0x7f80_0000, |a| f32::from_le_bytes(a) as f64),
        Dtype::F16 => scan::<2>(bytes, 0x7c00, |a| half::f16::from_le_bytes(a).to_f64()),
        Dtype::BF16 => scan::<2>(bytes, 0x7f80, |a| half::bf16::from_le_bytes(a).to_f64()),
        Dtype::F64 => scan::<8>(bytes, 0x7ff0_0000_0000_0000, f64::from_le_bytes),
        _ => None,
    }
}

/// The first non-finite value of `x`, as (index, value).
pub fn first_nonfinite_f32(x: &[f32]) -> Option<(usize, f32)> {
    if x.iter().fold(true, |acc, v| acc & v.is_finite()) {
        return None;
    }
    x.iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
        .map(|(i, &v)| (i, v))
}

/// Refuses non-finite float data of tensor `name`.
pub fn check_finite(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<(), String> {
    match first_nonfinite(dtype, bytes) {
        Some((i, v)) => Err(format!("tensor {name} holds {v} at element {i}")),
        None => Ok(()),
    }
}

/// Checks a code tensor's values (256 sorted finite values in [-1, 1]).
pub fn check_code(name: &str, values: Vec<f32>) -> Result<QuantCode, String> {
    QuantCode::new(values).map_err(|e| format!("tensor {name}: {e}"))
}

/// Checks absmax values: finite and non-negative (a block's scale is a magnitude).
pub fn check_absmax(name: &str, values: &[f32]) -> Result<(), String> {
    if values
        .iter()
        .fold(true, |acc, v| acc & (*v >= 0.0) & v.is_finite())
    {
        return Ok(());
    }
    let (i, v) = values
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        .map(|(i, &v)| (i, v))
        .unwrap_or((0, f32::NAN));
    Err(format!(
        "tensor {name}: absmax {v} at block {i} (scales must be finite and non-negative)"
    ))
}

/// Little-endian f32 bytes as values (a trailing partial element is ignored).
pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn finds_the_first_nonfinite_of_each_float_type() {
        let mut v = vec![1.0f32; 100_000];
        assert_eq!(first_nonfinite(Dtype::F32, &f32_bytes(&v)), None);
        v[70_001] = f32::NAN;
        v[90_000] = f32::INFINITY;
        let (i, x) = first_nonfinite(Dtype::F32, &f32_bytes(&v)).unwrap();
        assert_eq!(i, 70_001);
        assert!(x.is_nan());
        let h: Vec<u8> = [1.0, -65504.0, f32::NEG_INFINITY]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(
            first_nonfinite(Dtype::F16, &h),
            Some((2, f64::NEG_INFINITY))
        );
        let b: Vec<u8> = [3.0e38f32, f32::INFINITY]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(first_nonfinite(Dtype::BF16, &b), Some((1, f64::INFINITY)));
        let d: Vec<u8> = [f64::MAX, f64::NAN]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(first_nonfinite(Dtype::F64, &d).map(|p| p.0), Some(1));
        assert_eq!(first_nonfinite(Dtype::U8, &[255, 255]), None);
    }

    #[test]
    fn absmax_must_be_finite_and_non_negative() {
        assert!(check_absmax("a", &[0.0, 1.0]).is_ok());
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            let e = check_absmax("x.absmax", &[1.0, bad]).unwrap_err();
            assert!(e.contains("x.absmax") && e.contains("block 1"), "{e}");
        }
    }
}
