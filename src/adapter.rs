//! LoRA adapters on a model: attaching them by target, and the PEFT folder format
//! (`adapter_config.json` + `adapter_model.safetensors`) that Hugging Face peft loads.
use crate::error::{OctetError, Result};
use crate::io::safetensors::{save_tensors, SafetensorsFile};
use crate::io::TensorStore;
use crate::model::CausalLm;
use crate::nn::{Layer, LoraConfig, LoraLayer, Vacant};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

/// PEFT's prefix for every adapter tensor name.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Which modules get adapters: PEFT's two forms.
#[derive(Clone, Debug)]
pub enum Targets {
    /// Module names: a path matches when it equals a name or ends with `.name`.
    Names(Vec<String>),
    /// A regular expression that must match the whole path.
    Regex(String),
}

impl Targets {
    /// Parses `--targets`: a comma-separated list of names, or a regex when it contains
    /// regex syntax.
    pub fn parse(s: &str) -> Result<Self> {
        if s.chars().any(|c| "*+?()[]|^$\\".contains(c)) {
            Regex::new(&format!("^(?:{s})$"))
                .map_err(|e| OctetError::InvalidArgument(format!("--targets '{s}': {e}")))?;
            Ok(Targets::Regex(s.to_string()))
        } else {
            let names: Vec<String> = s
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            if names.is_empty() {
                return Err(OctetError::InvalidArgument("--targets is empty".into()));
            }
            Ok(Targets::Names(names))
        }
    }

    /// Whether module `path` is targeted.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Targets::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Targets::Regex(r) => {
                Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(path))
            }
        }
    }

    /// The JSON value PEFT stores in `target_modules`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Targets::Names(n) => serde_json::json!(n),
            Targets::Regex(r) => serde_json::json!(r),
        }
    }

    /// From PEFT's `target_modules`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        match v {
            serde_json::Value::String(s) => Ok(Targets::Regex(s.clone())),
            serde_json::Value::Array(a) => Ok(Targets::Names(
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
            )),
            _ => Err(OctetError::InvalidArgument(
                "target_modules must be a list or a string".into(),
            )),
        }
    }
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Names(n) => write!(f, "{}", n.join(",")),
            Targets::Regex(r) => write!(f, "{r}"),
        }
    }
}

/// Wraps every targeted layer of `model` with a fresh adapter. Returns the wrapped paths;
/// targets that match no adaptable module are an error listing the modules there are.
pub fn attach_lora(
    model: &mut dyn CausalLm,
    targets: &Targets,
    cfg: LoraConfig,
) -> Result<Vec<String>> {
    let mut wrapped = Vec::new();
    let mut all = Vec::new();
    let mut failure = None;
    model.visit_layers(&mut |path, layer| {
        all.push(path.to_string());
        if failure.is_some() || !targets.matches(path) || layer.adapter_shape().is_none() {
            return;
        }
        let base = std::mem::replace(layer, Box::new(Vacant));
        match LoraLayer::wrap(base, cfg) {
            Ok(l) => {
                *layer = Box::new(l);
                wrapped.push(path.to_string());
            }
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if wrapped.is_empty() {
        return Err(OctetError::InvalidArgument(format!(
            "targets '{targets}' match no module; modules are: {}",
            all.join(", ")
        )));
    }
    Ok(wrapped)
}

/// Makes norms and/or biases trainable; returns how many tensors that added.
pub fn train_extras(model: &mut dyn CausalLm, norms: bool, biases: bool) -> usize {
    let mut n = 0;
    if biases {
        model.visit_layers(&mut |_, layer| {
            if layer.train_bias(true) {
                n += 1;
            }
        });
    }
    if norms {
        model.visit_norms(&mut |_, norm| {
            norm.set_trainable(true);
            n += 1;
        });
    }
    n
}

/// Every trainable tensor with its full PEFT name.
pub fn trainable_tensors(model: &mut dyn CausalLm) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    model.visit_layers(&mut |path, layer| {
        for (name, t) in layer.trainable() {
            out.push((format!("{PEFT_PREFIX}{path}.{name}"), t));
        }
    });
    model.visit_norms(&mut |path, norm| {
        for (name, t) in norm.trainable() {
            out.push((format!("{PEFT_PREFIX}{path}.{name}"), t));
        }
    });
    out
}

/// The subset of PEFT's `adapter_config.json` octet reads and writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always "LORA".
    pub peft_type: String,
    /// Always "CAUSAL_LM".
    pub task_type: String,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub lora_alpha: f64,
    /// Dropout.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Targets (a list of names or a regex).
    pub target_modules: serde_json::Value,
    /// "none", "all" or "lora_only".
    #[serde(default = "bias_none")]
    pub bias: String,
    /// Whether the base weights are stored [in, out].
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// alpha/√r scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (not supported by octet; refused on load).
    #[serde(default)]
    pub use_dora: bool,
    /// Extra modules trained in full (octet saves trained norms here).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// peft's inference flag.
    #[serde(default)]
    pub inference_mode: bool,
    /// Anything else peft wrote, kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn bias_none() -> String {
    "none".into()
}

impl AdapterConfig {
    /// A config for octet-trained adapters.
    pub fn new(lora: LoraConfig, targets: &Targets, base: &str, biases: bool) -> Self {
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r: lora.r,
            lora_alpha: lora.alpha,
            lora_dropout: lora.dropout,
            target_modules: targets.to_json(),
            bias: if biases { "all".into() } else { "none".into() },
            fan_in_fan_out: false,
            use_rslora: lora.rslora,
            use_dora: false,
            modules_to_save: None,
            base_model_name_or_path: Some(base.to_string()),
            inference_mode: true,
            extra: BTreeMap::new(),
        }
    }

    /// The LoRA hyper-parameters.
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            rslora: self.use_rslora,
        }
    }

    /// Reads `dir/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&p).map_err(|e| OctetError::io(&p, e))?;
        let c: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| OctetError::bad_file(&p, format!("invalid adapter config: {e}")))?;
        if c.peft_type != "LORA" {
            return Err(OctetError::bad_file(
                &p,
                format!("peft_type {} is not supported (only LORA)", c.peft_type),
            ));
        }
        if c.use_dora {
            return Err(OctetError::bad_file(&p, "DoRA adapters are not supported"));
        }
        if c.r == 0 || c.r as u64 > crate::sizes::MAX_SIZE {
            return Err(OctetError::bad_file(
                &p,
                format!(
                    "LoRA rank r = {} must be between 1 and {}",
                    c.r,
                    crate::sizes::MAX_SIZE
                ),
            ));
        }
        if !c.lora_alpha.is_finite() {
            return Err(OctetError::bad_file(
                &p,
                format!("lora_alpha {} must be finite", c.lora_alpha),
            ));
        }
        Ok(c)
    }
}

/// Writes the model's trainable tensors and `config` as a PEFT adapter folder in `dir`.
pub fn save_adapter(model: &mut dyn CausalLm, config: &AdapterConfig, dir: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = trainable_tensors(model)
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu)))
        .collect();
    save_tensors(
        &dir.join(ADAPTER_WEIGHTS),
        &tensors,
        &[("format".into(), "pt".into())],
    )?;
    let p = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
    std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
}

/// Reads one adapter tensor, refusing what would silently compute garbage: a non-float dtype
/// (integers would be taken as values) or NaN/Inf.
pub fn read_adapter_tensor(store: &dyn TensorStore, name: &str) -> Result<Tensor> {
    let bad = |m: String| OctetError::bad_file(store.path(), m);
    let meta = store.require_float_meta(name, ", not floating point")?;
    let bytes = store.bytes(name)?;
    crate::validate::check_finite(name, meta.dtype, &bytes).map_err(bad)?;
    crate::io::dtype::tensor_from_bytes(meta.dtype, &meta.shape, &bytes)
}

/// Loads a PEFT LoRA adapter folder onto `model`: wraps each module the file names, checks
/// every shape, and loads trained biases and norms. Every tensor in the file must be used.
pub fn load_adapter(model: &mut dyn CausalLm, dir: &Path) -> Result<AdapterConfig> {
    let config = AdapterConfig::read(dir)?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    let store = SafetensorsFile::open(&weights)?;
    let mut pending: BTreeMap<String, Tensor> = BTreeMap::new();
    for name in store.names() {
        // peft may insert the adapter name ("default") before .weight in some versions.
        let key = name.replace(".default.", ".").replace(".default", "");
        let key = key.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
            OctetError::bad_file(
                &weights,
                format!("tensor {name} lacks the {PEFT_PREFIX} prefix"),
            )
        })?;
        pending.insert(key.to_string(), read_adapter_tensor(&store, &name)?);
    }
    let lora = config.lora();
    let mut failure: Option<OctetError> = None;
    model.visit_layers(&mut |path, layer| {
        if failure.is_some() {
            return;
        }
        let pair = [
            ("lora_A.weight", "lora_B.weight"),
            ("lora_embedding_A", "lora_embedding_B"),
        ]
        .into_iter()
        .find(|(a, _)| pending.contains_key(&format!("{path}.{a}")));
        if let Some((a, b)) = pair {
            let ta = pending.remove(&format!("{path}.{a}"));
            let tb = pending.remove(&format!("{path}.{b}"));
            let (Some(ta), Some(tb)) = (ta, tb) else {
                failure = Some(OctetError::bad_file(
                    &weights,
                    format!("{path}: {a} without {b}"),
                ));
                return;
            };
            let base = std::mem::replace(layer, Box::new(Vacant));
            match LoraLayer::with_weights(base, lora, ta, tb, path) {
                Ok(l) => *layer = Box::new(l),
                Err(e) => failure = Some(OctetError::bad_file(&weights, e.to_string())),
            }
        }
        if let Some(bias) = pending.remove(&format!("{path}.bias")) {
            if let Err(e) = replace_bias(layer.as_mut(), bias, path) {
                failure = Some(OctetError::bad_file(&weights, e.to_string()));
            }
        }
    });
    model.visit_norms(&mut |path, norm| {
        for (name, slot) in [
            ("weight", Some(&mut norm.weight)),
            ("bias", norm.bias.as_mut()),
        ] {
            if let (Some(t), Some(slot)) = (pending.remove(&format!("{path}.{name}")), slot) {
                if t.size() != slot.size() && failure.is_none() {
                    failure = Some(OctetError::bad_file(
                        &weights,
                        format!(
                            "{path}.{name}: shape {:?}, model has {:?}",
                            t.size(),
                            slot.size()
                        ),
                    ));
                    return;
                }
                *slot = t.to_kind(tch::Kind::Float).to_device(slot.device());
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(unused) = pending.keys().next() {
        return Err(OctetError::bad_file(
            &weights,
            format!(
                "tensor {unused} matches no module of this model ({} unused)",
                pending.len()
            ),
        ));
    }
    Ok(config)
}

fn replace_bias(layer: &mut dyn Layer, bias: Tensor, path: &str) -> Result<()> {
    let current = layer
        .tensors()
        .into_iter()
        .find(|(n, _)| n == "bias")
        .map(|(_, t)| t);
    match current {
        Some(t) if t.size() == bias.size() => {
            tch::no_grad(|| {
                let mut t = t;
                t.copy_(&bias.to_kind(t.kind()));
            });
            Ok(())
        }
        Some(t) => Err(OctetError::InvalidArgument(format!(
            "{path}.bias: shape {:?}, model has {:?}",
            bias.size(),
            t.size()
        ))),
        None => Err(OctetError::InvalidArgument(format!("{path} has no bias"))),
    }
}
