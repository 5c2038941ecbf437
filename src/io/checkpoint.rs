//! Finding the weights of a model folder, whatever form they come in.
use super::safetensors::SafetensorsFile;
use super::sharded::ShardedStore;
use super::torch_bin::TorchBinFile;
use super::TensorStore;
use crate::error::{OctetError, Result};
use std::path::Path;

/// Weight files looked for in a model folder, in order of preference.
pub const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
];

/// Opens one weight file: GGUF by [`super::gguf::is_gguf`], the others by their extension.
pub fn open_file(path: &Path) -> Result<Box<dyn TensorStore>> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if super::gguf::is_gguf(path) {
        Ok(Box::new(super::gguf::GgufFile::open(path)?))
    } else if name.ends_with(".index.json") {
        Ok(Box::new(ShardedStore::open(path)?))
    } else if name.ends_with(".safetensors") {
        Ok(Box::new(SafetensorsFile::open(path)?))
    } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
        Ok(Box::new(TorchBinFile::open(path)?))
    } else {
        Err(OctetError::bad_file(
            path,
            "unknown weight file type (expected .safetensors, .bin, .gguf or an .index.json)",
        ))
    }
}

/// Opens the weights of the model folder `dir` (or a single weight file).
pub fn open_checkpoint(dir: &Path) -> Result<Box<dyn TensorStore>> {
    if dir.is_file() {
        return open_file(dir);
    }
    for f in WEIGHT_FILES {
        let p = dir.join(f);
        if p.exists() {
            return open_file(&p);
        }
    }
    Err(OctetError::bad_file(
        dir,
        format!("no weights found (looked for {})", WEIGHT_FILES.join(", ")),
    ))
}
