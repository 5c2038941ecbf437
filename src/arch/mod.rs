//! The architecture core: the registry plugins submit themselves to and their specs (layer
//! kind per module pattern, what is quantized, default LoRA targets). The plugins themselves
//! live in `archs/<name>/`, one folder each.
pub mod registry;
pub mod spec;

pub use registry::{architectures, detect, find, resolve, Architecture, ArchitectureRegistration};
pub use spec::{PathPattern, Spec};
