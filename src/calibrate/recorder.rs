//! An 8-bit Linear that, while recording is on, adds `XᵀX` of its inputs to a Hessian.
use crate::error::Result;
use crate::nn::bnb8::Bnb8Linear;
use crate::nn::{AdapterShape, Layer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// Turns recording on and off for every [`Recorder`] made with it.
pub type RecordSwitch = Arc<AtomicBool>;

/// Wraps a model's 8-bit Linear in place of it, so the architecture's code calls it as usual.
pub struct Recorder {
    /// The wrapped layer, replaced once its weight is rounded.
    pub inner: Bnb8Linear,
    /// `Σ XᵀX` over the recorded inputs, `[in, in]` f64.
    hessian: Mutex<Option<Tensor>>,
    on: RecordSwitch,
}

impl Recorder {
    /// Wraps `inner`; it records while `on` is set.
    pub fn new(inner: Bnb8Linear, on: RecordSwitch) -> Self {
        Recorder {
            inner,
            hessian: Mutex::new(None),
            on,
        }
    }

    /// Takes the Hessian recorded so far (`None` when the layer saw no input).
    pub fn take_hessian(&self) -> Option<Tensor> {
        self.hessian
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Adds `XᵀX` of the rows of `x` (any leading shape, width last) to `sum`.
pub fn accumulate(sum: &mut Option<Tensor>, x: &Tensor) -> Result<()> {
    let width = x.size().last().copied().unwrap_or(0);
    let rows = x.f_reshape([-1, width])?.f_to_kind(Kind::Float)?;
    let xtx = rows.f_tr()?.f_matmul(&rows)?.f_to_kind(Kind::Double)?;
    *sum = Some(match sum.take() {
        Some(s) => s.f_add(&xtx)?,
        None => xtx,
    });
    Ok(())
}

impl Layer for Recorder {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.on.load(Ordering::Relaxed) {
            let mut h = self.hessian.lock().unwrap_or_else(|e| e.into_inner());
            accumulate(&mut h, x)?;
        }
        self.inner.forward(x)
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.inner.tensors()
    }
    fn to_device(&mut self, device: Device) {
        self.inner.to_device(device)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
    fn adapter_shape(&self) -> Option<AdapterShape> {
        self.inner.adapter_shape()
    }
}
