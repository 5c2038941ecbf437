//! octet: fine-tune big causal language models with frozen blockwise 8-bit weights,
//! gradient checkpointing and LoRA adapters, on libtorch.
#![warn(missing_docs)]

pub mod adapter;
pub mod convert;
pub mod device;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod infer;
pub mod io;
pub mod load;
pub mod manifest;
pub mod memory;
pub mod merge;
pub mod model;
pub mod nn;
pub mod outdir;
pub mod quant;
pub mod registry;
pub mod sizes;
pub mod spec;
pub mod tokenizer;
pub mod train;
pub mod validate;

#[path = "../adapters/mod.rs"]
pub mod adapters;

pub use error::{OctetError, Result};
