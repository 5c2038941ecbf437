//! What an architecture writes ([`Plugin`]) and what octet derives from it for every one of
//! them ([`Registered`]: spec parsed once, `check`, `build`), registered with one
//! [`register_architecture!`](crate::register_architecture) line.
use super::modules::Modules;
use super::registry::Architecture;
use crate::error::Result;
use crate::io::gguf::GgufMapping;
use crate::model::CausalLm;
use crate::nn::spec::Spec;
use crate::nn::{LayerMap, ModuleGraph};
use std::marker::PhantomData;
use std::path::Path;
use std::sync::OnceLock;
use tch::Kind;

/// An architecture plugin: its spec, its config, its one list of modules and its model.
pub trait Plugin: 'static {
    /// The parsed config.json.
    type Config;
    /// The spec TOML (`include_str!("spec.toml")`).
    const SPEC: &'static str;
    /// Where the spec comes from, named in errors (`archs/gptj/spec.toml`).
    const SPEC_PATH: &'static str;
    /// One line on what it supports, for `octet archs`.
    const DESCRIPTION: &'static str;
    /// Whether its adaptable weights are stored `[in, out]` (GPT-2's Conv1D): written as
    /// `fan_in_fan_out` in the PEFT adapter configs octet saves.
    const FAN_IN_FAN_OUT: bool = false;

    /// Parses and validates config.json.
    fn config(json: &serde_json::Value) -> Result<Self::Config>;

    /// Every module with the shape the config implies; `has` says whether the checkpoint
    /// holds a module, for the ones a checkpoint may or may not store (a tied head).
    fn modules(cfg: &Self::Config, has: &dyn Fn(&str) -> bool) -> Modules;

    /// Builds the model from its config and its built layers (taken by path).
    fn build(cfg: Self::Config, layers: &mut LayerMap, kind: Kind) -> Result<Box<dyn CausalLm>>;

    /// How its GGUF files map onto its Hugging Face checkpoints, if it reads GGUF.
    fn gguf() -> Option<&'static dyn GgufMapping> {
        None
    }
}

/// A registered plugin: the [`Architecture`] octet's pipelines use, derived from a [`Plugin`].
pub struct Registered<P> {
    spec: OnceLock<Spec>,
    plugin: PhantomData<fn() -> P>,
}

impl<P> Registered<P> {
    /// For `static`s (see [`register_architecture!`](crate::register_architecture)).
    pub const fn new() -> Self {
        Registered {
            spec: OnceLock::new(),
            plugin: PhantomData,
        }
    }
}

impl<P> Default for Registered<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Plugin> Architecture for Registered<P> {
    fn spec(&self) -> &Spec {
        self.spec.get_or_init(|| {
            Spec::parse(P::SPEC, Path::new(P::SPEC_PATH))
                .expect("a bundled spec is valid (checked by its plugin's tests)")
        })
    }
    fn description(&self) -> &'static str {
        P::DESCRIPTION
    }
    fn check(&self, config: &serde_json::Value, graph: &ModuleGraph) -> Result<()> {
        let cfg = P::config(config)?;
        let modules = P::modules(&cfg, &|p| graph.node(p).is_some());
        modules.check_spec(self.spec())?;
        modules.check_graph(graph)
    }
    fn build(
        &self,
        config: &serde_json::Value,
        layers: &mut LayerMap,
        kind: Kind,
    ) -> Result<Box<dyn CausalLm>> {
        P::build(P::config(config)?, layers, kind)
    }
    fn fan_in_fan_out(&self) -> bool {
        P::FAN_IN_FAN_OUT
    }
}

/// Registers a [`Plugin`] type as an architecture (and its GGUF mapping, if any): the one
/// line an architecture needs besides its folder. Works from any crate linked into the
/// binary.
#[macro_export]
macro_rules! register_architecture {
    ($plugin:ty) => {
        const _: () = {
            static ARCH: $crate::arch::Registered<$plugin> = $crate::arch::Registered::new();
            $crate::inventory::submit! {
                $crate::arch::ArchitectureRegistration { get: || &ARCH }
            }
            $crate::inventory::submit! {
                $crate::io::gguf::GgufRegistration {
                    get: <$plugin as $crate::arch::Plugin>::gguf,
                }
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archs::{gpt2::Gpt2Plugin, gpt_neox::GptNeoxPlugin, gptj::GptjPlugin};
    use crate::archs::{gptj, llama::LlamaPlugin};
    use serde_json::json;

    /// A plugin's modules for a tiny config, with every optional module stored and with none.
    fn declared<P: Plugin>(config: serde_json::Value) -> Vec<Modules> {
        let cfg = P::config(&config).unwrap();
        vec![P::modules(&cfg, &|_| true), P::modules(&cfg, &|_| false)]
    }

    fn tiny_configs() -> Vec<(&'static str, Vec<Modules>)> {
        vec![
            (
                "gptj",
                declared::<GptjPlugin>(json!({"vocab_size": 11, "n_embd": 8, "n_layer": 2,
                    "n_head": 2, "rotary_dim": 2, "n_positions": 16})),
            ),
            (
                "gpt2",
                declared::<Gpt2Plugin>(json!({"vocab_size": 11, "n_embd": 8, "n_layer": 2,
                    "n_head": 2, "n_positions": 16})),
            ),
            (
                "gpt_neox",
                declared::<GptNeoxPlugin>(json!({"vocab_size": 11, "hidden_size": 8,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                    "max_position_embeddings": 16, "rotary_pct": 0.5, "tie_word_embeddings": false})),
            ),
            (
                "llama",
                declared::<LlamaPlugin>(json!({"vocab_size": 11, "hidden_size": 8,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "intermediate_size": 16, "tie_word_embeddings": true})),
            ),
        ]
    }

    #[test]
    fn declared_modules_and_specs_agree() {
        for (name, lists) in tiny_configs() {
            let spec = crate::arch::find(name).unwrap().spec();
            for list in &lists {
                list.check_spec(spec).unwrap();
            }
            // Every pattern of the spec describes some declared module.
            for (pattern, kind) in &spec.modules {
                assert!(
                    lists
                        .iter()
                        .flat_map(|l| l.iter())
                        .any(|d| pattern.matches(&d.path)),
                    "{name}: spec module {} ({kind}) is declared nowhere",
                    pattern.as_str()
                );
            }
        }
    }

    #[test]
    fn spec_check_names_an_undeclared_kind_and_a_misdeclared_norm() {
        let spec = crate::arch::find("gptj").unwrap().spec();
        let mut m = Modules::new();
        m.push(crate::arch::ModuleDecl::layer(
            "transformer.h.0.attn.qkv",
            vec![2, 2],
        ));
        let err = m.check_spec(spec).unwrap_err().to_string();
        assert!(err.contains("transformer.h.0.attn.qkv"), "{err}");
        let mut m = Modules::new();
        m.push(crate::arch::ModuleDecl::layer(
            "transformer.h.0.ln_1",
            vec![2],
        ));
        let err = m.check_spec(spec).unwrap_err().to_string();
        assert!(err.contains("LayerNorm"), "{err}");
    }

    #[test]
    fn gptj_visitors_reach_exactly_the_declared_modules() {
        let cfg = gptj::GptjConfig::from_json(&json!({"vocab_size": 11, "n_embd": 8,
            "n_layer": 2, "n_head": 2, "rotary_dim": 2, "n_positions": 16}))
        .unwrap();
        let mut layers = gptj::random_layers(
            &cfg,
            gptj::RandomFrozen::Float,
            (Kind::Float, tch::Device::Cpu),
        )
        .unwrap();
        let mut model = gptj::Gptj::new(cfg.clone(), &mut layers, Kind::Float).unwrap();
        let mut visited = Vec::new();
        crate::model::CausalLm::visit_layers(&mut model, &mut |p, _| visited.push(p.to_string()));
        crate::model::CausalLm::visit_norms(&mut model, &mut |p, _| visited.push(p.to_string()));
        let mut declared: Vec<String> =
            gptj::modules(&cfg).iter().map(|d| d.path.clone()).collect();
        visited.sort();
        declared.sort();
        assert_eq!(visited, declared);
        // The loader's shape check comes from the same list: a wrong shape is refused.
        let mut layers = gptj::random_layers(
            &cfg,
            gptj::RandomFrozen::Float,
            (Kind::Float, tch::Device::Cpu),
        )
        .unwrap();
        let wide = gptj::GptjConfig {
            n_inner: Some(40),
            ..cfg
        };
        assert!(gptj::Gptj::new(wide, &mut layers, Kind::Float).is_err());
    }
}
