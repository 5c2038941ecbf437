//! A LoRA update added onto the output of a fused 8-bit linear for a few rows of activations:
//! `y += scale · (x·Aᵀ)·Bᵀ`, computed from the raw f32 values in plain loops.
//!
//! Token-by-token generation with an adapter otherwise runs five more tensor operations per
//! adapted module (two small matmuls, a scale, casts, an add). Each costs a libtorch dispatch,
//! and a matmul may wake libtorch's OpenMP workers, which then spin on the cores the fused
//! kernel's own threads need: with 120 adapted modules that halved the decode speed. Here the
//! update is `r·(in + out)` multiply-adds per row, negligible beside the weight's `in·out`.
use super::blockwise::{cpu_slice, cpu_slice_mut};
use crate::error::{OctetError, Result};
use tch::{Device, Kind, Tensor};

/// The factors of a low-rank update `scale · B·A` of a `[out, in]` weight.
pub struct LowRank<'a> {
    /// `[r, in]`.
    pub a: &'a Tensor,
    /// `[out, r]`.
    pub b: &'a Tensor,
    /// The factor applied to `B·A`.
    pub scale: f64,
}

impl LowRank<'_> {
    /// Whether [`Self::add_to`] can read the factors directly: contiguous f32 on the CPU.
    pub fn applies(&self) -> bool {
        [self.a, self.b].iter().all(|t| {
            t.device() == Device::Cpu
                && t.kind() == Kind::Float
                && t.dim() == 2
                && t.is_contiguous()
        })
    }

    /// Adds `scale · (x·Aᵀ)·Bᵀ` to `y` in place, for `x` `[..., in]` and `y` `[..., out]`, both
    /// contiguous f32 on the CPU with the same leading dimensions. `y` must be a tensor the
    /// caller owns alone (a fresh result), since it is written through its memory.
    pub fn add_to(&self, x: &Tensor, y: &Tensor) -> Result<()> {
        let (a_size, b_size) = (self.a.size(), self.b.size());
        let (xs, ys) = (x.size(), y.size());
        let (r, k, n) = (a_size[0], a_size[1], b_size[0]);
        let fits = self.applies()
            && b_size[1] == r
            && xs.last() == Some(&k)
            && ys.last() == Some(&n)
            && xs[..xs.len() - 1] == ys[..ys.len() - 1];
        let flat_f32 =
            |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous();
        if !fits || !flat_f32(x) || !flat_f32(y) {
            return Err(OctetError::ShapeMismatch {
                what: "low-rank update".into(),
                expected: format!(
                    "contiguous CPU f32 x [..., {k}] and y [..., {n}] for A {a_size:?}, B {b_size:?}"
                ),
                found: format!(
                    "x {xs:?} {:?}, y {ys:?} {:?}",
                    x.kind(),
                    y.kind()
                ),
            });
        }
        let (r, k, n) = (r as usize, k as usize, n as usize);
        let m = x.numel().checked_div(k).unwrap_or(0);
        if m == 0 || n == 0 || r == 0 {
            return Ok(());
        }
        // SAFETY: the four tensors are contiguous CPU f32 (checked above) and alive for the
        // whole call; `y` is the caller's own fresh tensor, distinct from the others, and is
        // written only through `yv` while no other view of it is read.
        let (av, bv, xv, yv) = unsafe {
            (
                cpu_slice::<f32>(self.a),
                cpu_slice::<f32>(self.b),
                cpu_slice::<f32>(x),
                cpu_slice_mut::<f32>(y),
            )
        };
        let scale = self.scale as f32;
        let mut u = vec![0f32; r];
        for (xr, yr) in xv.chunks_exact(k).zip(yv.chunks_exact_mut(n)) {
            for (uj, aj) in u.iter_mut().zip(av.chunks_exact(k)) {
                *uj = dot(xr, aj) * scale;
            }
            for (yo, bo) in yr.iter_mut().zip(bv.chunks_exact(r)) {
                *yo += dot(&u, bo);
            }
        }
        Ok(())
    }
}

/// A dot product over eight independent lanes, so the compiler vectorizes it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..8 {
            lanes[j] += x[j] * y[j];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_scaled_update_as_the_tensor_ops_compute_it() {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        for (rows, r, k, n) in [(1, 8, 64, 48), (3, 3, 19, 33), (16, 1, 7, 5)] {
            let a = Tensor::randn([r, k], opts);
            let b = Tensor::randn([n, r], opts);
            let x = Tensor::randn([1, rows, k], opts);
            let y = Tensor::randn([1, rows, n], opts);
            let want = &y + x.matmul(&a.tr()).matmul(&b.tr()) * 0.75;
            let update = LowRank {
                a: &a,
                b: &b,
                scale: 0.75,
            };
            update.add_to(&x, &y).unwrap();
            assert!(y.allclose(&want, 1e-5, 1e-5, false), "{rows} {r} {k} {n}");
        }
    }

    #[test]
    fn refuses_mismatched_operands() {
        let opts = (Kind::Float, Device::Cpu);
        let a = Tensor::zeros([2, 4], opts);
        let b = Tensor::zeros([3, 2], opts);
        let update = LowRank {
            a: &a,
            b: &b,
            scale: 1.0,
        };
        let x = Tensor::zeros([1, 4], opts);
        assert!(update.add_to(&x, &Tensor::zeros([1, 4], opts)).is_err());
        assert!(update.add_to(&Tensor::zeros([1, 5], opts), &x).is_err());
        assert!(update
            .add_to(&x, &Tensor::zeros([1, 3], (Kind::Double, Device::Cpu)))
            .is_err());
        let bt = b.tr();
        let strided = LowRank { b: &bt, ..update };
        assert!(!strided.applies());
    }
}
