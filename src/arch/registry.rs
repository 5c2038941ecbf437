//! The architecture registry: plugins submit an [`ArchitectureRegistration`] with `inventory`,
//! and octet finds them by name or from a model's config.json.
use crate::error::{OctetError, Result};
use crate::model::CausalLm;
use crate::nn::spec::Spec;
use crate::nn::LayerMap;
use tch::Kind;

/// An architecture plugin.
pub trait Architecture: Sync {
    /// Its spec (name, HF names, layer kinds, what is quantized, LoRA targets, block size).
    fn spec(&self) -> &Spec;
    /// One line on what it supports, for `octet archs`.
    fn description(&self) -> &'static str;
    /// Builds the model from its Hugging Face config and its built layers (taken by path).
    fn build(
        &self,
        config: &serde_json::Value,
        layers: &mut LayerMap,
        kind: Kind,
    ) -> Result<Box<dyn CausalLm>>;

    /// Checks a checkpoint's module graph against the config (every module present, every
    /// weight of the shape the config implies) before anything is converted or built.
    fn check(&self, config: &serde_json::Value, graph: &crate::nn::ModuleGraph) -> Result<()>;

    /// Whether its adaptable weights are stored `[in, out]` (GPT-2's Conv1D): written as
    /// `fan_in_fan_out` in the PEFT adapter configs octet saves.
    fn fan_in_fan_out(&self) -> bool {
        false
    }

    /// The registry name.
    fn name(&self) -> &str {
        &self.spec().name
    }
}

/// A plugin's registration; `get` is a function so that `inventory::submit!` stays const.
pub struct ArchitectureRegistration {
    /// Returns the plugin.
    pub get: fn() -> &'static dyn Architecture,
}
inventory::collect!(ArchitectureRegistration);

/// Every registered architecture, sorted by name.
pub fn architectures() -> Vec<&'static dyn Architecture> {
    let mut v: Vec<_> = inventory::iter::<ArchitectureRegistration>
        .into_iter()
        .map(|r| (r.get)())
        .collect();
    v.sort_by(|a, b| a.name().cmp(b.name()));
    v
}

/// The table `octet archs` prints: one row per registered architecture (name, Hugging Face
/// names, block size, default LoRA targets, description), under a header.
pub fn table() -> String {
    let mut out = format!(
        "{:<10} {:<28} {:<10} {:<10} description\n",
        "name", "hf architectures", "block", "lora"
    );
    for a in architectures() {
        let s = a.spec();
        out += &format!(
            "{:<10} {:<28} {:<10} {:<10} {}\n",
            a.name(),
            s.hf_architectures.join(","),
            s.block_size.get(),
            s.lora_targets.join(","),
            a.description()
        );
    }
    out
}

fn known() -> String {
    architectures()
        .iter()
        .map(|a| a.name().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The architecture registered as `name`; an unknown or doubly registered name is an error
/// that lists the known ones.
pub fn find(name: &str) -> Result<&'static dyn Architecture> {
    let hits: Vec<_> = architectures()
        .into_iter()
        .filter(|a| a.name() == name)
        .collect();
    match hits.len() {
        1 => Ok(hits[0]),
        0 => Err(OctetError::Architecture(format!(
            "unknown architecture '{name}'; known: {}",
            known()
        ))),
        n => Err(OctetError::Architecture(format!(
            "architecture '{name}' is registered {n} times; known: {}",
            known()
        ))),
    }
}

/// Picks the architecture serving a config.json's `architectures` entries or `model_type`.
pub fn detect(
    config: &serde_json::Value,
    origin: &std::path::Path,
) -> Result<&'static dyn Architecture> {
    let hf_names: Vec<&str> = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let model_type = config.get("model_type").and_then(|v| v.as_str());
    let hits: Vec<_> = architectures()
        .into_iter()
        .filter(|a| {
            let s = a.spec();
            hf_names
                .iter()
                .any(|n| s.hf_architectures.iter().any(|h| h == n))
                || model_type.is_some_and(|m| s.model_types.iter().any(|t| t == m))
        })
        .collect();
    match hits.len() {
        1 => Ok(hits[0]),
        0 => Err(OctetError::Architecture(format!(
            "{}: no registered architecture serves model_type {:?} / architectures {:?}; known: {}",
            origin.display(),
            model_type.unwrap_or("(none)"),
            hf_names,
            known()
        ))),
        _ => Err(OctetError::Architecture(format!(
            "{}: ambiguous architecture, several plugins serve it: {}; pass --arch",
            origin.display(),
            hits.iter()
                .map(|a| a.name().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Resolves `--arch`: `auto` detects from the config, anything else is looked up by name.
pub fn resolve(
    arch: &str,
    config: &serde_json::Value,
    origin: &std::path::Path,
) -> Result<&'static dyn Architecture> {
    if arch == "auto" {
        detect(config, origin)
    } else {
        find(arch)
    }
}
