//! Which implementation a tensor gets: the Rust CPU kernels (CPU tensors) or the generic
//! libtorch-op path that every other device (CUDA) runs.
//!
//! The generic path can be forced on CPU tensors, so that the code a GPU runs is tested against
//! the CPU kernels on a machine without one: for the whole process with `OCTET_FORCE_GENERIC=1`,
//! or for one closure on the current thread with [`with_generic_ops`] (tests in one process do
//! not disturb each other). The choice is made on the calling thread, before any parallel work.
use std::cell::Cell;
use std::sync::OnceLock;
use tch::{Device, Tensor};

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the generic path is forced on CPU tensors (environment or [`with_generic_ops`]).
pub fn generic_forced() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    FORCED.with(Cell::get)
        || *ENV.get_or_init(|| {
            std::env::var("OCTET_FORCE_GENERIC").is_ok_and(|v| !v.is_empty() && v != "0")
        })
}

/// Runs `f` with the generic path forced on CPU tensors on this thread.
pub fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(true)));
    f()
}

/// Whether `t` goes through the CPU kernels (a CPU tensor, generic path not forced).
pub fn uses_cpu_kernels(t: &Tensor) -> bool {
    t.device() == Device::Cpu && !generic_forced()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_is_scoped_to_the_closure() {
        let t = Tensor::zeros([1], (tch::Kind::Float, Device::Cpu));
        let outside = uses_cpu_kernels(&t);
        assert!(with_generic_ops(|| !uses_cpu_kernels(&t)));
        assert_eq!(uses_cpu_kernels(&t), outside);
    }
}
