//! Architecture plugins compiled into the crate. Each registers itself with `inventory`.
pub mod gptj;
pub mod llama;
pub mod gpt2;
pub mod gpt_neox;
