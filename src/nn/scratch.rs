//! Reusable de-quantization buffers.
//!
//! A freshly allocated multi-hundred-megabyte weight costs page faults and kernel zeroing on
//! every call (several times the de-quantization itself), so 8-bit layers de-quantize into
//! pooled buffers inside two kinds of scope:
//!
//! - [`inference`] (no autograd graph): nothing keeps a reference to a weight after its
//!   multiplication, so every layer of one shape shares a single buffer.
//! - [`recompute`] (autograd on, as in a checkpointed block's recompute): the graph holds each
//!   weight until the backward pass, so every call gets a buffer of its own, lent until the
//!   scope ends. The scope's caller must have run the backward pass through everything built
//!   inside it before it returns; the buffers are then handed to the next block.
//!
//! Free buffers are dropped when the outermost scope ends, unless a [`retain`] scope (a whole
//! training run) keeps them for the next step.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use tch::{Kind, Tensor};

type Key = (Vec<i64>, Kind);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Shared,
    Lend,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Off) };
    static RETAIN: Cell<usize> = const { Cell::new(0) };
    static FREE: RefCell<HashMap<Key, Vec<Tensor>>> = RefCell::new(HashMap::new());
    static LENT: RefCell<Vec<(Key, Tensor)>> = const { RefCell::new(Vec::new()) };
}

fn scoped<T>(mode: Mode, f: impl FnOnce() -> T) -> T {
    let outer = MODE.with(|m| m.replace(mode));
    let lent_before = LENT.with(|l| l.borrow().len());
    let out = f();
    // Return what this scope lent (a panic skips this; the buffers are then simply dropped).
    let lent: Vec<(Key, Tensor)> = LENT.with(|l| l.borrow_mut().split_off(lent_before));
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        for (key, t) in lent {
            free.entry(key).or_default().push(t);
        }
    });
    MODE.with(|m| m.set(outer));
    if outer == Mode::Off && RETAIN.with(Cell::get) == 0 {
        release();
    }
    out
}

/// Runs `f` under `tch::no_grad` with one de-quantization buffer per weight shape shared by
/// every layer.
pub fn inference<T>(f: impl FnOnce() -> T) -> T {
    scoped(Mode::Shared, || tch::no_grad(f))
}

/// Runs `f` with autograd on, giving every de-quantization its own pooled buffer until `f`
/// returns. `f` must finish the backward pass through every graph it builds (nothing it
/// returns may hold a de-quantized weight), because the buffers are overwritten afterwards.
pub(crate) fn recompute<T>(f: impl FnOnce() -> T) -> T {
    scoped(Mode::Lend, f)
}

/// Keeps free buffers across the scopes inside `f` (e.g. the steps of a training run) instead
/// of dropping them whenever the outermost scope ends. Memory stays at one block's worth of
/// de-quantized weights plus one buffer per shape.
pub fn retain<T>(f: impl FnOnce() -> T) -> T {
    RETAIN.with(|r| r.set(r.get() + 1));
    let out = f();
    let left = RETAIN.with(|r| {
        r.set(r.get() - 1);
        r.get()
    });
    if left == 0 && MODE.with(Cell::get) == Mode::Off {
        release();
    }
    out
}

/// Drops every free buffer of this thread.
pub fn release() {
    FREE.with(|f| f.borrow_mut().clear());
}

/// Whether the current thread is inside [`inference`] or [`recompute`].
pub fn active() -> bool {
    MODE.with(Cell::get) != Mode::Off
}

/// Whether the current thread is inside [`inference`] (so under `no_grad`: nothing computed
/// here needs an autograd graph).
pub fn inference_active() -> bool {
    MODE.with(Cell::get) == Mode::Shared
}

/// Calls `fill` on a pooled buffer of `shape`/`kind` (allocated on first use) and returns a
/// shallow handle to it: under [`inference`] valid until the next call for the same shape,
/// under [`recompute`] until that scope ends.
pub fn with_buffer(shape: &[i64], kind: Kind, fill: impl FnOnce(&mut Tensor)) -> Tensor {
    let key = (shape.to_vec(), kind);
    let mut t = FREE
        .with(|f| f.borrow_mut().get_mut(&key).and_then(Vec::pop))
        .unwrap_or_else(|| Tensor::empty(shape, (kind, tch::Device::Cpu)));
    fill(&mut t);
    let handle = t.shallow_clone();
    match MODE.with(Cell::get) {
        Mode::Lend => LENT.with(|l| l.borrow_mut().push((key, t))),
        _ => FREE.with(|f| f.borrow_mut().entry(key).or_default().push(t)),
    }
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptr(t: &Tensor) -> usize {
        t.data_ptr() as usize
    }

    #[test]
    fn inference_shares_and_recompute_lends_distinct_buffers() {
        let fill = |t: &mut Tensor| {
            let _ = t.fill_(1.0);
        };
        let (a, b) = inference(|| {
            (
                ptr(&with_buffer(&[4, 4], Kind::Float, fill)),
                ptr(&with_buffer(&[4, 4], Kind::Float, fill)),
            )
        });
        assert_eq!(a, b, "one shared buffer per shape under inference");
        retain(|| {
            let first = recompute(|| {
                let x = ptr(&with_buffer(&[4, 4], Kind::Float, fill));
                let y = ptr(&with_buffer(&[4, 4], Kind::Float, fill));
                assert_ne!(x, y, "buffers lent in one scope must be distinct");
                [x, y]
            });
            let second = recompute(|| {
                [
                    ptr(&with_buffer(&[4, 4], Kind::Float, fill)),
                    ptr(&with_buffer(&[4, 4], Kind::Float, fill)),
                ]
            });
            let mut f = first.to_vec();
            let mut s = second.to_vec();
            f.sort();
            s.sort();
            assert_eq!(f, s, "the next scope reuses the returned buffers");
        });
        assert!(
            FREE.with(|f| f.borrow().is_empty()),
            "released after retain"
        );
    }
}
