//! octet: fine-tune big causal language models with frozen blockwise 8-bit weights,
//! gradient checkpointing and LoRA adapters, on libtorch.
#![warn(missing_docs)]

pub mod arch;
pub mod calibrate;
pub mod chat;
pub mod convert;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod export;
pub mod export_gguf;
pub mod generate;
pub mod hub;
pub mod infer;
pub mod io;
pub mod load;
pub mod manifest;
pub mod memory;
pub mod merge;
pub mod model;
pub mod nn;
pub mod outdir;
pub mod peft;
pub mod quant;
pub mod sizes;
pub mod source;
pub mod tokenizer;
pub mod train;
pub mod validate;

/// The architecture plugins compiled into the crate, one folder each under `archs/`; each
/// registers itself (see docs/adding-an-architecture.md), so adding one is its folder and
/// one line here.
#[path = "../archs"]
pub mod archs {
    pub mod decoder;
    pub mod gemma2;
    pub mod gpt2;
    pub mod gpt_neox;
    pub mod gptj;
    pub mod llama;
    pub mod mistral;
    pub mod phi3;
    pub mod qwen2;
    pub mod qwen3;
}

/// Re-exported for [`register_architecture!`] and out-of-crate plugins.
#[doc(hidden)]
pub use inventory;

pub use error::{OctetError, Result};
