//! octet: fine-tune big causal language models with frozen blockwise 8-bit weights,
//! gradient checkpointing and LoRA adapters, on libtorch.
#![warn(missing_docs)]

pub mod error;
pub mod io;
pub mod quant;

pub use error::{OctetError, Result};
