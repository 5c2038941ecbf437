//! octet's module graph, layer kinds and the 8-bit replacements.
pub mod bnb8;
pub mod float;
pub mod graph;
pub mod ids;
pub mod kinds;
pub mod layer;
pub mod lora;
pub mod node;
pub mod q4;
pub mod q8;
pub mod rmsnorm;
pub mod scratch;
pub mod spec;
pub mod tied;

pub use graph::{ModuleGraph, Node, ParamInfo};
pub use layer::{AdapterShape, Layer, LayerMap, LayerTensors, Vacant};
pub use lora::{LoraConfig, LoraLayer};
