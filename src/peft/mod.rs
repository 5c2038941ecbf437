//! PEFT LoRA adapters: the folder format Hugging Face peft reads and writes
//! (`adapter_config.json` + `adapter_model.safetensors`, or the older `adapter_model.bin`),
//! and what octet does with one.
//!
//! One reader ([`Adapter::read`]) and one fit check ([`Adapter::check_fits`]) serve both uses
//! of an adapter folder, so `eval`/`generate --adapter` (and a resumed `train`) accept
//! exactly the folders `merge` accepts:
//! - attached to a loaded model for inference or training: [`load_adapter`];
//! - folded into the base weights: [`crate::merge`].
//!
//! Training attaches fresh adapters ([`attach_lora`]) and writes the folder ([`save_adapter`]).
mod attach;
mod check;
mod config;
mod read;
mod save;
mod targets;

pub use attach::{attach_lora, load_adapter, train_extras, trainable_tensors};
pub use config::{
    AdapterConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, PEFT_PREFIX,
};
pub use read::{adapter_weights, read_adapter_tensor, Adapter, LoraPair, ModuleEdit};
pub use save::save_adapter;
pub use targets::Targets;
