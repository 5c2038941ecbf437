//! Blockwise dynamic 8-bit quantization (the bitsandbytes scheme) and its fast CPU kernels.
pub mod blockwise;
pub mod code;
pub mod dispatch;
pub mod double_quant;
pub mod fit;
pub mod fused;
pub mod fused_in_out;
pub mod kernels;
pub mod low_rank;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod stream;

pub use blockwise::{dequantize, quantize, BlockSize, Quantized};
pub use code::{CodeKind, QuantCode, CODE_LEN};
pub use dispatch::{generic_forced, uses_cpu_kernels, with_generic_ops};
pub use fit::{fit_code, FitOptions};
pub use low_rank::LowRank;
pub use stream::{QuantError, StreamOutput, StreamingQuantizer};
