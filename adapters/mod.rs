//! Architecture plugins compiled into the crate. Each registers itself with `inventory`.
pub mod gpt2;
pub mod gpt_neox;
pub mod gptj;
pub mod llama;
