//! The registered layer kinds and their 8-bit replacements, collected with `inventory` so a plugin can add
//! its own (e.g. GPT-2's Conv1D) without touching the core.
use super::layer::{Layer, LayerTensors};
use super::node::Node;
use crate::error::Result;

/// A layer kind: how to check a module's tensors and build its runtime layer.
pub struct LayerKind {
    /// Kind name as it appears in specs and the graph (`Linear`, `Bnb8Linear`, …).
    pub name: &'static str,
    /// Checks the module's tensor names and shapes; the error text names the problem.
    pub check: fn(&Node) -> std::result::Result<(), String>,
    /// Builds the layer from its tensors.
    pub build: fn(&Node, LayerTensors) -> Result<Box<dyn Layer>>,
}
inventory::collect!(LayerKind);

/// An 8-bit replacement: modules of kind `from` become `to`, with `quantized_param` stored
/// as uint8 + absmax + code.
pub struct Replacement {
    /// The float kind replaced.
    pub from: &'static str,
    /// The 8-bit kind it becomes.
    pub to: &'static str,
    /// The tensor that is quantized (the others stay as they are).
    pub quantized_param: &'static str,
}
inventory::collect!(Replacement);

/// The registered kind named `name` (the first registration if, wrongly, there are several;
/// [`duplicate_kinds`] reports those).
pub fn layer_kind(name: &str) -> Option<&'static LayerKind> {
    inventory::iter::<LayerKind>
        .into_iter()
        .find(|k| k.name == name)
}

/// The replacement for kind `from`, if one is registered.
pub fn replacement_for(from: &str) -> Option<&'static Replacement> {
    inventory::iter::<Replacement>
        .into_iter()
        .find(|r| r.from == from)
}

/// The replacement that produces the 8-bit kind `to`, if `to` is one.
pub fn replacement_to(to: &str) -> Option<&'static Replacement> {
    inventory::iter::<Replacement>
        .into_iter()
        .find(|r| r.to == to)
}

/// The quantized parameter of the 8-bit kind `kind` (`weight`), if `kind` is one.
pub fn quantized_param(kind: &str) -> Option<&'static str> {
    replacement_to(kind).map(|r| r.quantized_param)
}

/// Kind names registered more than once (a plugin bug, reported by `octet archs`).
pub fn duplicate_kinds() -> Vec<&'static str> {
    let mut seen = std::collections::BTreeMap::new();
    for k in inventory::iter::<LayerKind> {
        *seen.entry(k.name).or_insert(0) += 1;
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(k, _)| k)
        .collect()
}

/// All registered kind names, sorted.
pub fn kind_names() -> Vec<&'static str> {
    let mut v: Vec<_> = inventory::iter::<LayerKind>
        .into_iter()
        .map(|k| k.name)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}
