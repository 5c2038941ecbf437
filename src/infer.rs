//! Loading a model to run it (eval, generate): the base, quantized on load when asked, an
//! optional LoRA adapter on top, and dropout off.
use crate::error::{OctetError, Result};
use crate::load::{load_model, LoadOptions, LoadedModel, QuantizeOptions};
use crate::peft::load_adapter;
use std::path::Path;

/// How a model is loaded for inference; also the flags `eval` and `generate` share.
#[derive(clap::Args, Clone, Debug)]
pub struct InferOptions {
    /// Quantize float modules to 8-bit while loading (as training does).
    #[arg(long)]
    pub quantize: bool,
    /// Architecture name, or `auto`.
    #[arg(long, default_value = "auto")]
    pub arch: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", help = crate::device::FLAG_HELP)]
    pub device: String,
}

impl InferOptions {
    /// The load options these settings give on `device` (resolved once by the caller, so a
    /// second model goes to the same one).
    pub fn load_options(&self, device: tch::Device) -> Result<LoadOptions> {
        Ok(LoadOptions {
            arch: self.arch.clone(),
            kind: crate::device::parse_dtype(&self.dtype)?,
            device,
            quantize: self.quantize.then(QuantizeOptions::default),
        })
    }
}

/// Loads the model in `dir` with `opts`, applies the adapter in `adapter` when given (saying
/// so on stderr) and turns dropout off.
pub fn load_for_inference(
    dir: &Path,
    adapter: Option<&Path>,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let mut m = load_model(dir, opts)?;
    if let Some(a) = adapter {
        let cfg = load_adapter(m.model.as_mut(), a).map_err(|e| {
            OctetError::InvalidArgument(format!(
                "adapter {} does not fit the model {}: {e}",
                a.display(),
                dir.display()
            ))
        })?;
        eprintln!(
            "adapter {} (r {}, alpha {}) applied",
            a.display(),
            cfg.r,
            cfg.lora_alpha
        );
    }
    m.model.visit_layers(&mut |_, l| l.set_training(false));
    Ok(m)
}
