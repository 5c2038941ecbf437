//! Tensor-level blockwise quantization: CPU tensors go through the Rust kernels over raw
//! memory, other devices through equivalent libtorch ops.
use super::code::{QuantCode, CODE_LEN};
use super::dispatch::uses_cpu_kernels;
use super::kernels::{self, NearestTable};
use crate::error::{OctetError, Result};
use half::{bf16, f16};
use tch::{Device, Kind, Tensor};

/// A validated block size: a power of two between 64 and 4096.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct BlockSize(usize);

impl BlockSize {
    /// The block size the original GPT-J 8-bit checkpoint used.
    pub const DEFAULT: BlockSize = BlockSize(4096);

    /// Checks `n` is one of 64, 128, …, 4096.
    pub fn new(n: i64) -> Result<Self> {
        if (64..=4096).contains(&n) && (n as u64).is_power_of_two() {
            Ok(BlockSize(n as usize))
        } else {
            Err(OctetError::InvalidBlockSize(n))
        }
    }

    /// The size in elements.
    pub fn get(self) -> usize {
        self.0
    }

    /// Number of blocks covering `numel` elements.
    pub fn blocks_for(self, numel: usize) -> usize {
        numel.div_ceil(self.0)
    }
}

impl TryFrom<i64> for BlockSize {
    type Error = OctetError;
    fn try_from(n: i64) -> Result<Self> {
        BlockSize::new(n)
    }
}

impl From<BlockSize> for i64 {
    fn from(b: BlockSize) -> i64 {
        b.0 as i64
    }
}

/// A tensor in blockwise 8-bit form: `q` has the original shape, `absmax` one f32 per block.
#[derive(Debug)]
pub struct Quantized {
    /// The code indices, uint8, in the original shape.
    pub q: Tensor,
    /// Per-block scale, f32 `[ceil(numel / block)]`.
    pub absmax: Tensor,
    /// The code the indices refer to.
    pub code: QuantCode,
    /// Elements per block.
    pub block: BlockSize,
}

impl Quantized {
    /// Checks that the parts fit together (lengths, dtypes) before any kernel reads them.
    pub fn from_parts(
        q: Tensor,
        absmax: Tensor,
        code: QuantCode,
        block: BlockSize,
    ) -> Result<Self> {
        if q.kind() != Kind::Uint8 {
            return Err(OctetError::UnsupportedDtype {
                op: "dequantize",
                found: q.kind(),
                expected: "uint8",
            });
        }
        let numel = q.numel();
        let want = block.blocks_for(numel) as i64;
        if absmax.size() != [want] {
            return Err(OctetError::ShapeMismatch {
                what: format!("absmax for {numel} elements in blocks of {}", block.get()),
                expected: format!("[{want}]"),
                found: format!("{:?}", absmax.size()),
            });
        }
        let absmax = if absmax.kind() == Kind::Float {
            absmax
        } else {
            absmax.to_kind(Kind::Float)
        };
        Ok(Quantized {
            q,
            absmax,
            code,
            block,
        })
    }

    /// Element count of the original tensor.
    pub fn numel(&self) -> usize {
        self.q.numel()
    }

    /// The original shape.
    pub fn shape(&self) -> Vec<i64> {
        self.q.size()
    }

    /// Bytes held: the indices, the scales and the code.
    pub fn nbytes(&self) -> usize {
        self.numel() + 4 * self.absmax.numel() + 4 * CODE_LEN
    }

    /// De-quantizes the whole tensor to `kind` (f32, bf16 or f16) on the tensor's device.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        dequantize(&self.q, &self.absmax, &self.code, self.block, kind)
    }

    /// De-quantizes into an existing contiguous CPU tensor of the same shape (f32, bf16 or
    /// f16), so a caller can reuse one buffer instead of paying for fresh pages each time.
    pub fn dequantize_into(&self, out: &mut Tensor) -> Result<()> {
        if out.size() != self.q.size() || out.device() != Device::Cpu || !out.is_contiguous() {
            return Err(OctetError::ShapeMismatch {
                what: "dequantize_into output".into(),
                expected: format!("contiguous CPU tensor of shape {:?}", self.q.size()),
                found: format!("{:?} on {:?}", out.size(), out.device()),
            });
        }
        dequantize_cpu(&self.q, &self.absmax, &self.code, self.block, out)
    }

    /// De-quantizes selected rows of a 2-d tensor (an embedding lookup): `ids` of any shape
    /// gives `[..ids, cols]`, touching only those rows' bytes.
    pub fn dequantize_rows(&self, ids: &Tensor, kind: Kind) -> Result<Tensor> {
        let shape = self.shape();
        if shape.len() != 2 {
            return Err(OctetError::ShapeMismatch {
                what: "embedding table".into(),
                expected: "2-d".into(),
                found: format!("{shape:?}"),
            });
        }
        let (rows, cols) = (shape[0], shape[1]);
        let flat_ids = ids.f_flatten(0, -1)?.f_to_kind(Kind::Int64)?;
        let out_of_range = |bad: i64| {
            OctetError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {rows}"
            ))
        };
        if !uses_cpu_kernels(&self.q) {
            let dev = self.q.device();
            let flat_ids = flat_ids.f_to_device(dev)?;
            // An out-of-range index is a fatal device-side assert on a GPU: check first.
            if flat_ids.numel() > 0 {
                let (lo, hi) = (
                    flat_ids.f_min()?.int64_value(&[]),
                    flat_ids.f_max()?.int64_value(&[]),
                );
                if lo < 0 || hi >= rows {
                    return Err(out_of_range(if lo < 0 { lo } else { hi }));
                }
            }
            let rows_q = self.q.f_index_select(0, &flat_ids)?;
            let elem0 = flat_ids
                .f_unsqueeze(1)?
                .f_mul_scalar(cols)?
                .f_add(&Tensor::f_arange(cols, (Kind::Int64, dev))?)?;
            let scale = self.absmax.f_to_device(dev)?.f_index_select(
                0,
                &elem0
                    .f_flatten(0, -1)?
                    .f_div_scalar_mode(self.block.get() as i64, "floor")?,
            )?;
            let (code_t, _) = self.code.tables_on(dev)?;
            let vals = code_t.f_index_select(0, &rows_q.f_flatten(0, -1)?.f_to_kind(Kind::Int)?)?;
            let out = vals.f_mul(&scale)?.f_to_kind(kind)?;
            let mut out_shape = ids.size();
            out_shape.push(cols);
            return Ok(out.f_reshape(out_shape.as_slice())?);
        }
        let id_vec = Vec::<i64>::try_from(&flat_ids)?;
        if let Some(&bad) = id_vec.iter().find(|&&i| i < 0 || i >= rows) {
            return Err(out_of_range(bad));
        }
        // SAFETY: the CPU-kernel branch: `q` (uint8) and `absmax` (f32) are CPU tensors made
        // contiguous here, owned by this frame and only read while the slices live.
        let q = self.q.contiguous();
        let qs = unsafe { cpu_slice::<u8>(&q) };
        let absmax = self.absmax.contiguous();
        let am = unsafe { cpu_slice::<f32>(&absmax) };
        let code = kernels::code_array(&self.code);
        let mut out_shape = ids.size();
        out_shape.push(cols);
        let cols = cols as usize;
        let out = Tensor::empty(out_shape.as_slice(), (kind, Device::Cpu));
        macro_rules! rows_into {
            ($t:ty) => {{
                // SAFETY: `out` was just allocated contiguous on the CPU with the element type
                // `$t` stands for, and this is the only view of it.
                let dst = unsafe { cpu_slice_mut::<$t>(&out) };
                for (row_out, &id) in dst.chunks_mut(cols).zip(&id_vec) {
                    let start = id as usize * cols;
                    kernels::dequantize_into(
                        &code,
                        am,
                        self.block.get(),
                        start,
                        &qs[start..start + cols],
                        row_out,
                    );
                }
            }};
        }
        match kind {
            Kind::Float => rows_into!(f32),
            Kind::BFloat16 => rows_into!(bf16),
            Kind::Half => rows_into!(f16),
            other => {
                return Err(OctetError::UnsupportedDtype {
                    op: "dequantize",
                    found: other,
                    expected: "f32, bf16 or f16",
                })
            }
        }
        Ok(out)
    }
}

/// A read-only view of a contiguous CPU tensor's memory.
///
/// # Safety
/// The tensor must be contiguous, on the CPU, of element type `T`, and not written while the
/// slice lives.
pub(crate) unsafe fn cpu_slice<T>(t: &Tensor) -> &[T] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    std::slice::from_raw_parts(t.data_ptr() as *const T, n)
}

/// A mutable view of a contiguous CPU tensor's memory.
///
/// # Safety
/// As [`cpu_slice`], and no other view of the tensor may be alive.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn cpu_slice_mut<T>(t: &Tensor) -> &mut [T] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n)
}

fn check_float_input(x: &Tensor) -> Result<()> {
    match x.kind() {
        Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double => {}
        other => {
            return Err(OctetError::UnsupportedDtype {
                op: "quantize",
                found: other,
                expected: "a floating-point tensor",
            })
        }
    }
    if !x.is_contiguous() {
        return Err(OctetError::NotContiguous { op: "quantize" });
    }
    Ok(())
}

/// Quantizes a floating-point tensor blockwise with `code`, rounding to the nearest code value.
pub fn quantize(x: &Tensor, block: BlockSize, code: &QuantCode) -> Result<Quantized> {
    check_float_input(x)?;
    if !uses_cpu_kernels(x) {
        return quantize_with_torch_ops(x, block, code);
    }
    let owned;
    let xf = if x.kind() == Kind::Float {
        x
    } else {
        owned = x.to_kind(Kind::Float);
        &owned
    };
    let numel = xf.numel();
    let q = Tensor::empty(xf.size().as_slice(), (Kind::Uint8, Device::Cpu));
    let absmax = Tensor::empty([block.blocks_for(numel) as i64], (Kind::Float, Device::Cpu));
    let table = NearestTable::new(code);
    // SAFETY: `xf` is a contiguous f32 CPU tensor (checked above; a cast copy is contiguous),
    // only read; `q` and `absmax` were just allocated contiguous on the CPU with their element
    // types, and each has exactly one view.
    unsafe {
        kernels::quantize_into(
            &table,
            block.get(),
            cpu_slice(xf),
            cpu_slice_mut(&q),
            cpu_slice_mut(&absmax),
        );
    }
    Ok(Quantized {
        q,
        absmax,
        code: code.clone(),
        block,
    })
}

/// The device-generic path: the same rounding through libtorch ops (used off the CPU, or when
/// [`super::with_generic_ops`] forces it; public so tests can hold it to the CPU kernels).
pub fn quantize_with_torch_ops(
    x: &Tensor,
    block: BlockSize,
    code: &QuantCode,
) -> Result<Quantized> {
    let numel = x.numel() as i64;
    let b = block.get() as i64;
    let nblocks = block.blocks_for(numel as usize) as i64;
    let flat = x.to_kind(Kind::Float).flatten(0, -1);
    let padded = flat
        .constant_pad_nd([0, nblocks * b - numel])
        .reshape([nblocks, b]);
    let absmax = padded.abs().amax([1i64].as_slice(), false);
    let safe = absmax.where_scalarother(&absmax.ne(0.0), 1.0);
    let v = &padded / safe.unsqueeze(1);
    // Count of thresholds <= v: the nearest code, ties to the lower index, as on the CPU.
    let (_, thresholds) = code.tables_on(x.device())?;
    let idx = v
        .contiguous()
        .f_searchsorted(&thresholds, false, true, "right", None::<&Tensor>)?;
    let q = idx
        .to_kind(Kind::Uint8)
        .flatten(0, -1)
        .narrow(0, 0, numel)
        .reshape(x.size().as_slice());
    Ok(Quantized {
        q,
        absmax,
        code: code.clone(),
        block,
    })
}

/// De-quantizes `(q, absmax, code)` to `kind`: `code[q] * absmax[i / block]` in f32, then cast.
pub fn dequantize(
    q: &Tensor,
    absmax: &Tensor,
    code: &QuantCode,
    block: BlockSize,
    kind: Kind,
) -> Result<Tensor> {
    if q.kind() != Kind::Uint8 {
        return Err(OctetError::UnsupportedDtype {
            op: "dequantize",
            found: q.kind(),
            expected: "uint8",
        });
    }
    let numel = q.numel();
    let want = block.blocks_for(numel) as i64;
    if absmax.size() != [want] {
        return Err(OctetError::ShapeMismatch {
            what: format!("absmax for {numel} elements in blocks of {}", block.get()),
            expected: format!("[{want}]"),
            found: format!("{:?}", absmax.size()),
        });
    }
    if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(OctetError::UnsupportedDtype {
            op: "dequantize",
            found: kind,
            expected: "f32, bf16 or f16",
        });
    }
    if !uses_cpu_kernels(q) {
        return dequantize_with_torch_ops(q, absmax, code, block, kind);
    }
    let mut out = Tensor::empty(q.size().as_slice(), (kind, Device::Cpu));
    dequantize_cpu(q, absmax, code, block, &mut out)?;
    Ok(out)
}

/// The device-generic de-quantizer (what a GPU runs), as the CPU kernel computes it: the code
/// scaled by each block's absmax in f32 and cast once per block (a `[blocks, 256]` table, the
/// code itself cached on the device), then one lookup per byte straight into `kind`. No host
/// round-trip and no full-size f32 temporary when `kind` is 16-bit.
pub fn dequantize_with_torch_ops(
    q: &Tensor,
    absmax: &Tensor,
    code: &QuantCode,
    block: BlockSize,
    kind: Kind,
) -> Result<Tensor> {
    let dev = q.device();
    let numel = q.numel() as i64;
    let b = block.get() as i64;
    let nblocks = block.blocks_for(numel as usize) as i64;
    let (code_t, _) = code.tables_on(dev)?;
    let table = absmax
        .f_to_kind(Kind::Float)?
        .f_to_device(dev)?
        .f_unsqueeze(1)?
        .f_mul(&code_t.f_unsqueeze(0)?)?
        .f_to_kind(kind)?;
    let flat = q.f_flatten(0, -1)?;
    let rows = if numel == nblocks * b {
        flat.f_view([nblocks, b])?
    } else {
        flat.f_constant_pad_nd([0, nblocks * b - numel])?
            .f_view([nblocks, b])?
    };
    // Index of (block, byte) in the flattened table; int32 halves the index memory where the
    // table is small enough for it.
    let table_len = nblocks * CODE_LEN as i64;
    let index_kind = if table_len <= i64::from(i32::MAX) {
        Kind::Int
    } else {
        Kind::Int64
    };
    let offsets = Tensor::f_arange_start_step(0, table_len, CODE_LEN as i64, (index_kind, dev))?;
    let idx = rows
        .f_to_kind(index_kind)?
        .f_add_(&offsets.f_unsqueeze(1)?)?;
    let out = table
        .f_flatten(0, -1)?
        .f_index_select(0, &idx.f_flatten(0, -1)?)?
        .f_narrow(0, 0, numel)?;
    Ok(out.f_reshape(q.size().as_slice())?)
}

/// The CPU kernel behind [`dequantize`]; `out` is contiguous, on the CPU, of q's shape.
fn dequantize_cpu(
    q: &Tensor,
    absmax: &Tensor,
    code: &QuantCode,
    block: BlockSize,
    out: &mut Tensor,
) -> Result<()> {
    let qc = q.contiguous();
    let am = absmax.to_kind(Kind::Float).contiguous();
    let code = kernels::code_array(code);
    // SAFETY: all three tensors are contiguous CPU tensors of the element types read, and
    // `out` is exclusively borrowed.
    unsafe {
        let (qs, ams) = (cpu_slice::<u8>(&qc), cpu_slice::<f32>(&am));
        match out.kind() {
            Kind::Float => {
                kernels::dequantize_into(&code, ams, block.get(), 0, qs, cpu_slice_mut::<f32>(out))
            }
            Kind::BFloat16 => {
                kernels::dequantize_into(&code, ams, block.get(), 0, qs, cpu_slice_mut::<bf16>(out))
            }
            Kind::Half => {
                kernels::dequantize_into(&code, ams, block.get(), 0, qs, cpu_slice_mut::<f16>(out))
            }
            other => {
                return Err(OctetError::UnsupportedDtype {
                    op: "dequantize",
                    found: other,
                    expected: "f32, bf16 or f16",
                })
            }
        }
    }
    Ok(())
}
