//! A new architecture plugged into octet from outside the crate: nothing in octet knows
//! about it, yet `convert`, `load_model`, 8-bit quantization and LoRA all work on it.
//!
//! The toy model ("toy_mlp") is a per-position MLP language model: token embedding, a stack
//! of gated residual MLP blocks, an LM head. Its gate is a layer kind of its own (`ToyGate`,
//! `y = x ⊙ w`), registered here too. The example writes a tiny random checkpoint, lists the
//! registered architectures and layer kinds (as `octet archs` does), converts the checkpoint
//! to 8-bit, and runs a forward pass on both.
//!
//! Run with `cargo run --release --example custom_arch`. See docs/adding-an-architecture.md.
use octet::arch::{Bias, ModuleDecl, Modules, Plugin};
use octet::convert::{convert, ConvertOptions};
use octet::error::Result;
use octet::load::{load_model, LoadOptions};
use octet::model::{CausalLm, LayerCache, ModelInfo};
use octet::nn::graph::Node;
use octet::nn::kinds::{kind_names, LayerKind};
use octet::nn::layer::check_params;
use octet::nn::{float::LayerNorm, Layer, LayerMap, LayerTensors, LoraConfig};
use octet::peft::{attach_lora, Targets};
use octet::OctetError;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------------------
// 1. A layer kind of our own: how to check a module's tensors and build its runtime layer.
// ---------------------------------------------------------------------------------------

/// `y = x ⊙ w`: a learned per-channel gate, weight `[dim]`.
struct ToyGate {
    weight: Tensor,
}

impl Layer for ToyGate {
    fn kind(&self) -> &'static str {
        "ToyGate"
    }
    fn forward(&self, x: &Tensor) -> octet::Result<Tensor> {
        Ok(x.f_mul(&self.weight.f_to_kind(x.kind())?)?)
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![("weight".into(), self.weight.shallow_clone())]
    }
    fn to_device(&mut self, device: Device) {
        self.weight = self.weight.to_device(device);
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

fn check_gate(node: &Node) -> std::result::Result<(), String> {
    check_params(node, &[("weight", 1)], &[])
}

fn build_gate(_: &Node, mut t: LayerTensors) -> Result<Box<dyn Layer>> {
    Ok(Box::new(ToyGate {
        weight: t.take("weight")?.to_kind(Kind::Float),
    }))
}

// No `Replacement` is submitted for ToyGate, so it always stays in float; the Linear and
// Embedding modules get octet's built-in 8-bit replacements.
inventory::submit! { LayerKind { name: "ToyGate", check: check_gate, build: build_gate } }

// ---------------------------------------------------------------------------------------
// 2. The spec: layer kind per module path, what is quantized, default LoRA targets. (An
//    in-crate plugin keeps it in archs/<name>/spec.toml and uses include_str!("spec.toml").)
// ---------------------------------------------------------------------------------------

const SPEC: &str = r#"
name = "toy_mlp"
hf_architectures = ["ToyMlpForCausalLM"]
model_types = ["toy_mlp"]
block_size = 64

[modules]
"embed" = "Embedding"
"blocks.*.gate" = "ToyGate"
"blocks.*.up" = "Linear"
"blocks.*.down" = "Linear"
"head" = "Linear"

[quantize]
include = ["embed", "blocks.*.up", "blocks.*.down", "head"]

[lora]
targets = ["up", "down"]
"#;

// ---------------------------------------------------------------------------------------
// 3. The config and the model.
// ---------------------------------------------------------------------------------------

/// The toy's config.json.
#[derive(Clone, Debug, Deserialize)]
struct ToyConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    max_positions: usize,
}

impl ToyConfig {
    fn from_json(v: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(v.clone()).map_err(|e| {
            OctetError::InvalidArgument(format!("config.json: invalid toy_mlp config: {e}"))
        })
    }
}

// The one list of modules: each block's modules with the shapes the config implies. It gives
// the graph and spec checks, the shape-checked `take`, and the visitors.
octet::declare_block! {
    /// One gated residual MLP block.
    struct ToyBlock(c: &ToyConfig) {
        gate: Box<dyn Layer> = "gate" [c.hidden_size],
        up: Box<dyn Layer> = "up" [4 * c.hidden_size, c.hidden_size] bias Bias::Always,
        down: Box<dyn Layer> = "down" [c.hidden_size, 4 * c.hidden_size] bias Bias::Always,
    }
}

const EMBED: &str = "embed";
const HEAD: &str = "head";

fn block_prefix(i: usize) -> String {
    format!("blocks.{i}")
}

/// Every module of a toy model, as its config implies.
fn modules(cfg: &ToyConfig) -> Modules {
    let (v, d) = (cfg.vocab_size, cfg.hidden_size);
    let mut out = Modules::new();
    out.push(ModuleDecl::layer(EMBED, vec![v, d]));
    for i in 0..cfg.num_layers {
        out.extend(ToyBlock::modules(cfg, &block_prefix(i)));
    }
    out.push(ModuleDecl::layer(HEAD, vec![v, d]));
    out
}

struct ToyMlp {
    cfg: ToyConfig,
    kind: Kind,
    embed: Box<dyn Layer>,
    blocks: Vec<ToyBlock>,
    head: Box<dyn Layer>,
}

impl CausalLm for ToyMlp {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            vocab_size: self.cfg.vocab_size,
            max_positions: self.cfg.max_positions,
            hidden: self.cfg.hidden_size,
            blocks: self.cfg.num_layers,
        }
    }
    fn compute_kind(&self) -> Kind {
        self.kind
    }
    fn set_compute_kind(&mut self, kind: Kind) {
        self.kind = kind;
    }
    fn embed(&self, ids: &Tensor) -> octet::Result<Tensor> {
        Ok(self.embed.forward(ids)?.to_kind(self.kind))
    }
    // Positions never mix, so there is nothing to cache.
    fn block(
        &self,
        i: usize,
        h: &Tensor,
        _cache: Option<&mut LayerCache>,
    ) -> octet::Result<Tensor> {
        let b = &self.blocks[i];
        let up = b.up.forward(&b.gate.forward(h)?)?.gelu("none");
        Ok(h + b.down.forward(&up)?)
    }
    fn head(&self, h: &Tensor) -> octet::Result<Tensor> {
        Ok(self.head.forward(h)?.to_kind(Kind::Float))
    }
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        f(EMBED, &mut self.embed);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_layers(&block_prefix(i), f);
        }
        f(HEAD, &mut self.head);
    }
    fn visit_norms(&mut self, _f: &mut dyn FnMut(&str, &mut LayerNorm)) {}
}

// ---------------------------------------------------------------------------------------
// 4. The plugin, registered with `inventory` like octet's own.
// ---------------------------------------------------------------------------------------

struct ToyPlugin;

impl Plugin for ToyPlugin {
    type Config = ToyConfig;
    const SPEC: &'static str = SPEC;
    const SPEC_PATH: &'static str = "examples/custom_arch.rs";
    const DESCRIPTION: &'static str = "toy per-position MLP LM (examples/custom_arch.rs)";
    fn config(json: &serde_json::Value) -> Result<ToyConfig> {
        ToyConfig::from_json(json)
    }
    fn modules(cfg: &ToyConfig, _has: &dyn Fn(&str) -> bool) -> Modules {
        modules(cfg)
    }
    fn build(cfg: ToyConfig, layers: &mut LayerMap, kind: Kind) -> Result<Box<dyn CausalLm>> {
        let top = modules(&cfg);
        let embed = top.take(layers, EMBED, 0.0)?;
        let blocks = (0..cfg.num_layers)
            .map(|i| ToyBlock::take(layers, &cfg, &block_prefix(i), 0.0))
            .collect::<Result<_>>()?;
        let head = top.take(layers, HEAD, 0.0)?;
        octet::arch::modules::refuse_leftovers(layers, "toy_mlp")?;
        Ok(Box::new(ToyMlp {
            cfg,
            kind,
            embed,
            blocks,
            head,
        }))
    }
}

// The one registration line (in-crate plugins have it in their mod.rs, plus `pub mod <name>;`
// in src/lib.rs).
octet::register_architecture!(ToyPlugin);

// ---------------------------------------------------------------------------------------
// 5. Using it.
// ---------------------------------------------------------------------------------------

/// Writes a random toy checkpoint (config.json + model.safetensors) into `dir`.
fn write_checkpoint(dir: &std::path::Path, cfg: &serde_json::Value) -> anyhow::Result<()> {
    tch::manual_seed(0);
    let toy = ToyConfig::from_json(cfg)?;
    let opts = (Kind::Float, Device::Cpu);
    let mut tensors = Vec::new();
    for m in modules(&toy).iter() {
        let shape: Vec<i64> = m.shape.iter().map(|&d| d as i64).collect();
        let w = if m.path.ends_with("gate") {
            Tensor::ones(shape.as_slice(), opts) + Tensor::randn(shape.as_slice(), opts) * 0.1
        } else {
            Tensor::randn(shape.as_slice(), opts) * 0.2
        };
        if m.bias.present() {
            tensors.push((
                format!("{}.bias", m.path),
                Tensor::randn([shape[0]], opts) * 0.05,
            ));
        }
        tensors.push((format!("{}.weight", m.path), w));
    }
    octet::io::safetensors::save_tensors(&dir.join("model.safetensors"), &tensors, &[])?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // What `octet archs` prints, from the same registries.
    print!("{}", octet::arch::registry::table());
    println!("\nlayer kinds: {}\n", kind_names().join(", "));
    anyhow::ensure!(
        octet::arch::find("toy_mlp").is_ok(),
        "toy_mlp is not registered"
    );

    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("toy");
    std::fs::create_dir_all(&src)?;
    let config = serde_json::json!({
        "architectures": ["ToyMlpForCausalLM"],
        "model_type": "toy_mlp",
        "vocab_size": 257,
        "hidden_size": 32,
        "num_layers": 2,
        "max_positions": 64
    });
    write_checkpoint(&src, &config)?;

    // Convert to 8-bit exactly as `octet convert` does; the spec picks what is quantized.
    let out = tmp.path().join("toy-8bit");
    let report = convert(&src, &out, &ConvertOptions::default())?;
    let (n, mean, max) = report.error_summary();
    println!(
        "converted {} -> {}: {} tensors quantized (rel. MSE mean {mean:.2e}, max {max:.2e}), \
         {} -> {} bytes",
        src.display(),
        out.display(),
        n,
        report.bytes_in(),
        report.bytes_out()
    );

    let float = load_model(&src, &LoadOptions::default())?;
    let mut eight = load_model(&out, &LoadOptions::default())?;
    println!("loaded as architecture '{}'; modules:", eight.arch.name());
    for node in &eight.graph.nodes {
        println!("  {:<16} {}", node.path, node.kind);
    }

    let ids = Tensor::from_slice(&[72i64, 101, 108, 108, 111]).unsqueeze(0);
    let (lf, l8) = tch::no_grad(|| -> octet::Result<_> {
        Ok((float.model.forward(&ids)?, eight.model.forward(&ids)?))
    })?;
    let diff = (&lf - &l8).abs().max().double_value(&[]);
    println!(
        "forward: logits {:?}; next tokens (float) {:?}, (8-bit) {:?}; max |float - 8-bit| {diff:.4}",
        l8.size(),
        Vec::<i64>::try_from(lf.argmax(-1, false).flatten(0, -1))?,
        Vec::<i64>::try_from(l8.argmax(-1, false).flatten(0, -1))?
    );

    // LoRA attaches through the layers' adapter shapes, with the spec's default targets.
    let targets = Targets::Names(eight.arch.spec().lora_targets.clone());
    let wrapped = attach_lora(eight.model.as_mut(), &targets, LoraConfig::default())?;
    let with_lora = tch::no_grad(|| eight.model.forward(&ids))?;
    println!(
        "LoRA on {} modules ({}); fresh adapters leave the logits unchanged: {}",
        wrapped.len(),
        wrapped.join(", "),
        (&with_lora - &l8).abs().max().double_value(&[]) == 0.0
    );
    Ok(())
}
