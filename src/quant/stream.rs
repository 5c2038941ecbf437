//! Low-memory quantization of a big tensor, one block-aligned chunk at a time, so that only a
//! chunk of f32 input is ever held (the source may be f16/bf16 bytes in a memory-mapped file).
use super::blockwise::BlockSize;
use super::code::QuantCode;
use super::double_quant::DoubleQuantized;
use super::kernels::{self, NearestTable};
use crate::error::Result;

/// How far a quantized tensor is from its source.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantError {
    /// Σ (x − x̂)².
    pub sum_sq_err: f64,
    /// Σ x².
    pub sum_sq: f64,
    /// max |x − x̂|.
    pub max_abs_err: f32,
}

impl QuantError {
    /// Relative mean squared error Σ(x − x̂)² / Σx² (0 for an all-zero tensor).
    pub fn rel_mse(&self) -> f64 {
        if self.sum_sq == 0.0 {
            0.0
        } else {
            self.sum_sq_err / self.sum_sq
        }
    }

    /// Adds the error measured over another part of the same tensor.
    pub fn merge(&mut self, other: &QuantError) {
        self.sum_sq_err += other.sum_sq_err;
        self.sum_sq += other.sum_sq;
        self.max_abs_err = self.max_abs_err.max(other.max_abs_err);
    }

    /// Adds the error of one chunk.
    pub fn accumulate(&mut self, x: &[f32], xhat: &[f32]) {
        for (&a, &b) in x.iter().zip(xhat) {
            let d = a - b;
            self.sum_sq_err += (d as f64) * (d as f64);
            self.sum_sq += (a as f64) * (a as f64);
            self.max_abs_err = self.max_abs_err.max(d.abs());
        }
    }
}

/// The bytes of a quantized tensor, built in plain vectors.
#[derive(Debug)]
pub struct StreamOutput {
    /// Code indices, one per element.
    pub q: Vec<u8>,
    /// One scale per block.
    pub absmax: Vec<f32>,
    /// Error against the source, when measured.
    pub error: Option<QuantError>,
    /// The scales in stored double-quantized form, when asked for; `absmax` then holds
    /// their de-quantized values, which the elements were quantized against.
    pub double: Option<DoubleQuantized>,
}

/// Quantizes tensors chunk by chunk with a fixed code and block size.
pub struct StreamingQuantizer {
    table: NearestTable,
    code: [f32; 256],
    block: BlockSize,
}

impl StreamingQuantizer {
    /// Prepares the lookup table for `code`.
    pub fn new(code: &QuantCode, block: BlockSize) -> Self {
        StreamingQuantizer {
            table: NearestTable::new(code),
            code: kernels::code_array(code),
            block,
        }
    }

    /// Quantizes `numel` elements that `read(start, buf)` fills in, `buf.len()` at a time from
    /// element `start`. Chunks are `chunk_elems` rounded down to whole blocks (at least one),
    /// so the bytes equal a one-shot quantization. With `measure_error`, each chunk is also
    /// de-quantized and compared.
    pub fn quantize(
        &self,
        numel: usize,
        chunk_elems: usize,
        measure_error: bool,
        mut read: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<StreamOutput> {
        let b = self.block.get();
        let chunk = (chunk_elems / b).max(1) * b;
        let mut q = vec![0u8; numel];
        let mut absmax = vec![0f32; self.block.blocks_for(numel)];
        let mut buf = vec![0f32; chunk.min(numel)];
        let mut back = if measure_error {
            vec![0f32; chunk.min(numel)]
        } else {
            Vec::new()
        };
        let mut error = measure_error.then(QuantError::default);
        let mut start = 0;
        while start < numel {
            let len = chunk.min(numel - start);
            let xs = &mut buf[..len];
            read(start, xs)?;
            let (qs, am) = (
                &mut q[start..start + len],
                &mut absmax[start / b..(start + len).div_ceil(b)],
            );
            kernels::quantize_into(&self.table, b, xs, qs, am);
            if let Some(err) = error.as_mut() {
                let xhat = &mut back[..len];
                kernels::dequantize_into(&self.code, am, b, 0, qs, xhat);
                err.accumulate(xs, xhat);
            }
            start += len;
        }
        Ok(StreamOutput {
            q,
            absmax,
            error,
            double: None,
        })
    }

    /// As [`Self::quantize`], with the block scales double-quantized: a first pass over the
    /// chunks finds every block's absmax, those are double-quantized, and a second pass
    /// quantizes the elements against the de-quantized scales (so the stored scales and
    /// bytes agree, and the measured error is the error a reader sees).
    pub fn quantize_double(
        &self,
        numel: usize,
        chunk_elems: usize,
        measure_error: bool,
        mut read: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<StreamOutput> {
        let b = self.block.get();
        let chunk = (chunk_elems / b).max(1) * b;
        let mut buf = vec![0f32; chunk.min(numel)];
        let mut absmax = Vec::with_capacity(self.block.blocks_for(numel));
        let mut start = 0;
        while start < numel {
            let len = chunk.min(numel - start);
            let xs = &mut buf[..len];
            read(start, xs)?;
            absmax.extend(xs.chunks(b).map(kernels::absmax));
            start += len;
        }
        let double = DoubleQuantized::quantize(&absmax);
        let scales = double.block_scales();
        let mut q = vec![0u8; numel];
        let mut back = if measure_error {
            vec![0f32; chunk.min(numel)]
        } else {
            Vec::new()
        };
        let mut error = measure_error.then(QuantError::default);
        let mut start = 0;
        while start < numel {
            let len = chunk.min(numel - start);
            let xs = &mut buf[..len];
            read(start, xs)?;
            let (qs, sc) = (
                &mut q[start..start + len],
                &scales[start / b..(start + len).div_ceil(b)],
            );
            kernels::quantize_with_scales(&self.table, b, xs, sc, qs);
            if let Some(err) = error.as_mut() {
                let xhat = &mut back[..len];
                kernels::dequantize_into(&self.code, sc, b, 0, qs, xhat);
                err.accumulate(xs, xhat);
            }
            start += len;
        }
        Ok(StreamOutput {
            q,
            absmax: scales,
            error,
            double: Some(double),
        })
    }
}
