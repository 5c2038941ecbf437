//! GGUF mappings of architectures whose plugins are not wired up yet, registered here so
//! their GGUF files read under Hugging Face names. Each moves into its plugin (`mod gguf;`
//! in archs/<name>/mod.rs and `Plugin::gguf` returning it), and this file goes, once the
//! plugin exists.
#[path = "gemma2/gguf.rs"]
pub mod gemma2;
#[path = "phi3/gguf.rs"]
pub mod phi3;
#[path = "qwen2/gguf.rs"]
pub mod qwen2;
#[path = "qwen3/gguf.rs"]
pub mod qwen3;

use crate::io::gguf::GgufRegistration;

inventory::submit! { GgufRegistration { get: || Some(&qwen2::Qwen2Gguf) } }
inventory::submit! { GgufRegistration { get: || Some(&qwen3::Qwen3Gguf) } }
inventory::submit! { GgufRegistration { get: || Some(&phi3::Phi3Gguf) } }
inventory::submit! { GgufRegistration { get: || Some(&gemma2::Gemma2Gguf) } }
