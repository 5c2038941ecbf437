//! Writing a PEFT adapter folder that Hugging Face peft loads.
use super::attach::trainable_tensors;
use super::config::{AdapterConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{OctetError, Result};
use crate::io::safetensors::save_tensors;
use crate::model::CausalLm;
use std::path::Path;
use tch::Tensor;

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
