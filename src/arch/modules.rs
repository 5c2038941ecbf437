//! The one list of modules an architecture declares: every module's path, the weight shape its
//! config implies, whether it is a norm, and its bias. The graph check, the spec check, the
//! loader's shape checks and the layer visitors are all derived from it.
//!
//! Blocks are declared with [`declare_block!`](crate::declare_block), which writes the block
//! struct together with its module list; top-level modules are listed by the plugin's
//! `modules` function and taken through [`Modules::take`].
use crate::error::{OctetError, Result};
use crate::nn::float::LayerNorm;
use crate::nn::layer::expect_weight_shape;
use crate::nn::rmsnorm::RmsNorm;
use crate::nn::spec::Spec;
use crate::nn::{Layer, LayerMap, ModuleGraph};

/// Whether a module has a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bias {
    /// Not declared: the layer kind's own check accepts either.
    Any,
    /// The architecture always has one (GPT-J's MLP and head).
    Always,
    /// The architecture never has one.
    Never,
    /// As a config.json flag says; the graph check refuses a checkpoint that disagrees and
    /// names the flag.
    Config {
        /// The config.json key (`attention_bias`).
        key: &'static str,
        /// Its value.
        set: bool,
    },
}

impl Bias {
    /// Whether the module has a bias, as far as the declaration says.
    pub fn present(self) -> bool {
        matches!(self, Bias::Always | Bias::Config { set: true, .. })
    }
}

/// One module of a model, as its config implies.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleDecl {
    /// The Hugging Face module path (`transformer.h.0.attn.q_proj`).
    pub path: String,
    /// Its weight's shape.
    pub shape: Vec<usize>,
    /// Whether it is a norm (visited by `visit_norms`, not `visit_layers`).
    pub norm: bool,
    /// Its bias.
    pub bias: Bias,
}

impl ModuleDecl {
    /// A module kept as a `Box<dyn Layer>` (projection, embedding, head).
    pub fn layer(path: impl Into<String>, shape: Vec<usize>) -> Self {
        ModuleDecl {
            path: path.into(),
            shape,
            norm: false,
            bias: Bias::Any,
        }
    }

    /// A norm of width `dim`.
    pub fn norm(path: impl Into<String>, dim: usize) -> Self {
        ModuleDecl {
            norm: true,
            ..ModuleDecl::layer(path, vec![dim])
        }
    }

    /// The same module with its bias declared.
    pub fn with_bias(self, bias: Bias) -> Self {
        ModuleDecl { bias, ..self }
    }
}

/// A module type a model holds: how it is taken from the built layers (shape checked against
/// the declaration) and how the visitors reach it.
pub trait DeclaredModule: Sized {
    /// Whether it is a norm.
    const NORM: bool;
    /// Takes the module at `path` out of `layers`, checking its weight has `shape`; norms get
    /// their epsilon from the config.
    fn take(layers: &mut LayerMap, path: &str, shape: &[usize], eps: f64) -> Result<Self>;
    /// Hands it to a `visit_layers` callback (norms are skipped).
    fn visit_layer(&mut self, _path: &str, _f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {}
    /// Hands it to a `visit_norms` callback (only norms).
    fn visit_norm(&mut self, _path: &str, _f: &mut dyn FnMut(&str, &mut LayerNorm)) {}
}

impl DeclaredModule for Box<dyn Layer> {
    const NORM: bool = false;
    fn take(layers: &mut LayerMap, path: &str, shape: &[usize], _eps: f64) -> Result<Self> {
        layers.take_checked(path, shape)
    }
    fn visit_layer(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        f(path, self)
    }
}

impl DeclaredModule for LayerNorm {
    const NORM: bool = true;
    fn take(layers: &mut LayerMap, path: &str, shape: &[usize], eps: f64) -> Result<Self> {
        layers.take_layer_norm(path, shape[0], eps)
    }
    fn visit_norm(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        f(path, self)
    }
}

impl DeclaredModule for RmsNorm {
    const NORM: bool = true;
    fn take(layers: &mut LayerMap, path: &str, shape: &[usize], eps: f64) -> Result<Self> {
        let mut n: RmsNorm = layers.take_as(path)?;
        expect_weight_shape(path, &n, shape)?;
        n.params.eps = eps;
        Ok(n)
    }
    fn visit_norm(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        f(path, &mut self.params)
    }
}

/// Every module of one model, in declaration order.
#[derive(Clone, Debug, Default)]
pub struct Modules {
    list: Vec<ModuleDecl>,
}

impl Modules {
    /// Starts a list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a module.
    pub fn push(&mut self, decl: ModuleDecl) {
        self.list.push(decl);
    }

    /// Adds several (a block's).
    pub fn extend(&mut self, decls: impl IntoIterator<Item = ModuleDecl>) {
        self.list.extend(decls);
    }

    /// The declarations.
    pub fn iter(&self) -> impl Iterator<Item = &ModuleDecl> {
        self.list.iter()
    }

    /// The declaration of module `path`.
    pub fn get(&self, path: &str) -> Option<&ModuleDecl> {
        self.list.iter().find(|d| d.path == path)
    }

    /// `(path, weight shape)` of every module.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.list
            .iter()
            .map(|d| (d.path.clone(), d.shape.clone()))
            .collect()
    }

    /// Checks a checkpoint's graph: every declared module present with its shape, nothing
    /// undeclared, and biases present exactly where a config flag says.
    pub fn check_graph(&self, graph: &ModuleGraph) -> Result<()> {
        crate::nn::graph::check_weight_shapes(graph, &self.weight_shapes())?;
        for d in &self.list {
            let Bias::Config { key, set } = d.bias else {
                continue;
            };
            let has = graph
                .node(&d.path)
                .is_some_and(|n| n.param("bias").is_some());
            if has != set {
                return Err(OctetError::InvalidArgument(format!(
                    "{}: the checkpoint {} a bias but config.json has {key} = {set}",
                    d.path,
                    if has { "has" } else { "lacks" }
                )));
            }
        }
        Ok(())
    }

    /// Checks the list against the architecture's spec: every declared module has a layer
    /// kind there, and norms are declared where the spec names a norm kind.
    pub fn check_spec(&self, spec: &Spec) -> Result<()> {
        for d in &self.list {
            let kind = spec.module_kind(&d.path).ok_or_else(|| {
                OctetError::Architecture(format!(
                    "{}: module {} is declared but its spec gives it no layer kind",
                    spec.name, d.path
                ))
            })?;
            if d.norm != kind.ends_with("Norm") {
                return Err(OctetError::Architecture(format!(
                    "{}: module {} is declared {} but its spec kind is {kind}",
                    spec.name,
                    d.path,
                    if d.norm { "a norm" } else { "a layer" }
                )));
            }
        }
        Ok(())
    }

    /// Takes the declared module `path` out of `layers`, checked against its declaration.
    pub fn take<T: DeclaredModule>(
        &self,
        layers: &mut LayerMap,
        path: &str,
        eps: f64,
    ) -> Result<T> {
        let d = self
            .get(path)
            .ok_or_else(|| OctetError::Architecture(format!("module {path} is not declared")))?;
        T::take(layers, path, &d.shape, eps)
    }
}

/// Refuses layers nobody took: modules the checkpoint has and `model` does not.
pub fn refuse_leftovers(layers: &LayerMap, model: &str) -> Result<()> {
    let rest = layers.remaining();
    if rest.is_empty() {
        Ok(())
    } else {
        Err(OctetError::InvalidArgument(format!(
            "modules unknown to {model}: {}",
            rest.join(", ")
        )))
    }
}

/// Declares a transformer block: its struct and, from one list, the block's modules with the
/// shapes the config implies, how they are taken from the built layers, and how the visitors
/// reach them. Each entry is `field: Type = "relative.path" [dims] [bias EXPR],` where `Type`
/// is a [`DeclaredModule`] (`Box<dyn Layer>`, `LayerNorm`, `RmsNorm`) and the dims may use the
/// config binding.
///
/// ```ignore
/// octet::declare_block! {
///     /// One block.
///     struct Block(c: &MyConfig) {
///         ln: LayerNorm = "ln" [c.hidden],
///         up: Box<dyn Layer> = "mlp.up" [4 * c.hidden, c.hidden] bias Bias::Always,
///     }
/// }
/// ```
/// The block then has `modules(cfg, prefix)`, `take(layers, cfg, prefix, eps)`,
/// `visit_layers(prefix, f)` and `visit_norms(prefix, f)`, in declaration order.
#[macro_export]
macro_rules! declare_block {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident($c:ident: &$cty:ty) {
            $( $field:ident: $fty:ty = $path:literal [$($dim:expr),+ $(,)?] $(bias $bias:expr)?, )+
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $field: $fty, )+
        }

        #[allow(dead_code)]
        impl $name {
            /// The block's modules under `prefix`, with the shapes the config implies.
            fn modules($c: &$cty, prefix: &str) -> Vec<$crate::arch::ModuleDecl> {
                vec![$(
                    $crate::arch::ModuleDecl {
                        path: format!("{prefix}.{}", $path),
                        shape: vec![$($dim),+],
                        norm: <$fty as $crate::arch::DeclaredModule>::NORM,
                        bias: $crate::declare_block!(@bias $($bias)?),
                    },
                )+]
            }

            /// Takes the block's modules under `prefix`, each checked against its shape.
            fn take(
                layers: &mut $crate::nn::LayerMap,
                $c: &$cty,
                prefix: &str,
                eps: f64,
            ) -> $crate::error::Result<Self> {
                Ok($name {
                    $( $field: <$fty as $crate::arch::DeclaredModule>::take(
                        layers,
                        &format!("{prefix}.{}", $path),
                        &[$($dim),+],
                        eps,
                    )?, )+
                })
            }

            /// Hands the block's layers (not its norms) to `f` under their paths.
            fn visit_layers(
                &mut self,
                prefix: &str,
                f: &mut dyn FnMut(&str, &mut Box<dyn $crate::nn::Layer>),
            ) {
                $( $crate::arch::DeclaredModule::visit_layer(
                    &mut self.$field,
                    &format!("{prefix}.{}", $path),
                    f,
                ); )+
            }

            /// Hands the block's norms to `f` under their paths.
            fn visit_norms(
                &mut self,
                prefix: &str,
                f: &mut dyn FnMut(&str, &mut $crate::nn::float::LayerNorm),
            ) {
                $( $crate::arch::DeclaredModule::visit_norm(
                    &mut self.$field,
                    &format!("{prefix}.{}", $path),
                    f,
                ); )+
            }
        }
    };
    (@bias) => { $crate::arch::Bias::Any };
    (@bias $bias:expr) => { $bias };
}
