//! Blockwise dynamic 8-bit quantization (the bitsandbytes scheme), 4-bit NF4 / FP4 / fitted
//! codes, and their fast CPU kernels.
pub mod blockwise;
pub mod code;
pub mod dispatch;
pub mod double_quant;
pub mod fit;
pub mod fit4;
pub mod fourbit;
pub mod fourbit_kernels;
pub mod fused;
pub mod fused_in_out;
pub mod gptq;
pub mod kernels;
pub mod low_rank;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd4;
pub mod stream;

pub use blockwise::{dequantize, quantize, BlockSize, Quantized};
pub use code::{CodeKind, QuantCode, CODE_LEN};
pub use dispatch::{generic_forced, uses_cpu_kernels, with_generic_ops};
pub use fit::{fit_code, FitOptions};
pub use fit4::fit_code4;
pub use fourbit::{block4, quantize4, Code4, Code4Kind, Quantized4, BLOCK4_SIZES, CODE4_LEN};
pub use low_rank::LowRank;
pub use stream::{QuantError, StreamOutput, StreamingQuantizer};
