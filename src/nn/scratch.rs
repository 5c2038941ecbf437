//! Reusable de-quantization buffers for forward passes that keep no autograd graph.
//!
//! A freshly allocated multi-hundred-megabyte weight costs page faults and kernel zeroing on
//! every call (several times the de-quantization itself). Under [`inference`], 8-bit layers
//! de-quantize into one buffer per weight shape that lives on this thread, which is safe there
//! because nothing keeps a reference to the weight after its multiplication. With autograd
//! on, the graph holds the weight for the backward pass, so each call gets its own tensor.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use tch::{Kind, Tensor};

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static BUFFERS: RefCell<HashMap<(Vec<i64>, Kind), Tensor>> = RefCell::new(HashMap::new());
}

/// Runs `f` under `tch::no_grad` with de-quantization buffers reused across layers.
/// The buffers are released when the outermost scope ends.
pub fn inference<T>(f: impl FnOnce() -> T) -> T {
    let outer = ACTIVE.with(|a| a.replace(true));
    let out = tch::no_grad(f);
    ACTIVE.with(|a| a.set(outer));
    if !outer {
        BUFFERS.with(|b| b.borrow_mut().clear());
    }
    out
}

/// Whether the current thread is inside [`inference`].
pub fn active() -> bool {
    ACTIVE.with(Cell::get)
}

/// Calls `fill` on this thread's buffer of `shape`/`kind` (allocated on first use) and returns
/// a shallow handle to it, valid until the next call for the same shape.
pub fn with_buffer(shape: &[i64], kind: Kind, fill: impl FnOnce(&mut Tensor)) -> Tensor {
    BUFFERS.with(|b| {
        let mut map = b.borrow_mut();
        let t = map
            .entry((shape.to_vec(), kind))
            .or_insert_with(|| Tensor::empty(shape, (kind, tch::Device::Cpu)));
        fill(t);
        t.shallow_clone()
    })
}
