//! Reading and writing checkpoints. Every reader exposes its tensors through [`TensorStore`]:
//! names, dtype + shape, and little-endian row-major bytes (borrowed from a memory map where
//! the file allows), so conversion can stream tensor by tensor.
pub mod checkpoint;
pub mod dtype;
pub mod gguf;
pub mod safetensors;
pub mod sharded;
pub mod torch_bin;

pub use checkpoint::{open_checkpoint, open_file};
pub use dtype::Dtype;

use crate::error::{OctetError, Result};
use std::borrow::Cow;
use std::path::Path;

/// Dtype and shape of a stored tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorMeta {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of bytes of the contiguous data.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// A read-only collection of named tensors in a checkpoint file (or a set of shards).
pub trait TensorStore {
    /// The file (or index) the tensors come from, for error messages.
    fn path(&self) -> &Path;
    /// Tensor names, in the file's order.
    fn names(&self) -> Vec<String>;
    /// Dtype and shape of `name`, or `None` if absent.
    fn meta(&self, name: &str) -> Option<TensorMeta>;
    /// The tensor's data as contiguous little-endian row-major bytes, of exactly
    /// `meta(name).nbytes()` bytes.
    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>>;
    /// Hints that `name`'s data will not be read again (lets memory-mapped pages go).
    fn release(&self, _name: &str) {}

    /// Reads tensor `name` as a CPU tensor of its own dtype.
    fn tensor(&self, name: &str) -> Result<tch::Tensor> {
        let meta = self.require_meta(name)?;
        let bytes = self.bytes(name)?;
        dtype::tensor_from_bytes(meta.dtype, &meta.shape, &bytes)
    }

    /// Reads float tensor `name`'s values as f32.
    fn f32_values(&self, name: &str) -> Result<Vec<f32>> {
        let meta = self.require_float_meta(name, ", not floating point")?;
        let bytes = self.bytes(name)?;
        let mut out = vec![0f32; meta.numel()];
        dtype::float_bytes_to_f32(meta.dtype, &bytes, &mut out)?;
        Ok(out)
    }

    /// Dtype and shape of `name`, or an error naming the file.
    fn require_meta(&self, name: &str) -> Result<TensorMeta> {
        self.meta(name)
            .ok_or_else(|| OctetError::bad_file(self.path(), format!("no tensor named {name}")))
    }

    /// As [`TensorStore::require_meta`], refusing a tensor that is not floating point; `why`
    /// ends the message "tensor NAME is DTYPE…".
    fn require_float_meta(&self, name: &str, why: &str) -> Result<TensorMeta> {
        let meta = self.require_meta(name)?;
        if !meta.dtype.is_float() {
            return Err(OctetError::bad_file(
                self.path(),
                format!("tensor {name} is {:?}{why}", meta.dtype),
            ));
        }
        Ok(meta)
    }
}
