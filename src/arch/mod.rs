//! The architecture core: the registry plugins submit themselves to, their specs (layer kind
//! per module pattern, what is quantized, default LoRA targets), the one list of modules each
//! plugin declares, and the generic [`Plugin`] glue every architecture shares.
//!
//! The plugins themselves live in `archs/<name>/` (one folder each, see
//! docs/adding-an-architecture.md).
pub mod modules;
pub mod plugin;
pub mod registry;

pub use crate::nn::spec::{PathPattern, Spec};
pub use modules::{Bias, DeclaredModule, ModuleDecl, Modules};
pub use plugin::{Plugin, Registered};
pub use registry::{architectures, detect, find, resolve, Architecture, ArchitectureRegistration};
