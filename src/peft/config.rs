//! `adapter_config.json`: the subset of PEFT's adapter config octet reads and writes, and what
//! it refuses to read.
use super::targets::Targets;
use crate::error::{OctetError, Result};
use crate::nn::LoraConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// PEFT's prefix for every adapter tensor name.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The adapter weights file octet writes (and reads first).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The older pickled adapter weights file peft wrote, read when there is no safetensors one.
pub const ADAPTER_WEIGHTS_BIN: &str = "adapter_model.bin";
/// The adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

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
        for key in ["rank_pattern", "alpha_pattern"] {
            if c.extra
                .get(key)
                .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
            {
                return Err(OctetError::bad_file(
                    &p,
                    format!("per-module ranks or alphas ({key}) are not supported"),
                ));
            }
        }
        Ok(c)
    }
}
