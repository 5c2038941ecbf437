//! `octet.toml`: what a converted model folder holds and how it was made.
use crate::error::{OctetError, Result};
use crate::quant::CodeKind;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the manifest inside a converted model folder.
pub const MANIFEST_FILE: &str = "octet.toml";

/// A source file and its SHA-256.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceFile {
    /// File name relative to the source folder.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the contents.
    pub sha256: String,
}

impl SourceFile {
    /// The name, size and SHA-256 of the file at `path`.
    pub fn describe(path: &Path) -> Result<Self> {
        let bytes = std::fs::metadata(path)
            .map_err(|e| OctetError::io(path, e))?
            .len();
        Ok(SourceFile {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes,
            sha256: sha256_file(path)?,
        })
    }
}

/// The quantization error of one tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorError {
    /// Tensor name.
    pub name: String,
    /// Σ(x − x̂)² / Σx².
    pub rel_mse: f64,
    /// max |x − x̂|.
    pub max_abs_err: f32,
}

/// The manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Architecture registry name.
    pub arch: String,
    /// Quantization block size.
    pub block_size: i64,
    /// Code kind used for newly quantized tensors.
    pub code: CodeKind,
    /// octet version that wrote it.
    pub octet_version: String,
    /// Where the weights came from.
    pub source: Vec<SourceFile>,
    /// Linear weights stored in 4 bits, and how (absent for an 8-bit folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub four_bit: Option<FourBitRecord>,
    /// Per-tensor quantization error of the tensors quantized by this conversion.
    #[serde(default)]
    pub tensors: Vec<TensorError>,
}

/// How a folder's 4-bit Linear weights were made (embeddings and Linear modules with an odd
/// input width stay 8-bit, at the manifest's `block_size`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct FourBitRecord {
    /// Bits per weight code: 4.
    pub bits: u8,
    /// `nf4`, `fp4` or `fitted`.
    pub code: crate::quant::Code4Kind,
    /// Elements per 4-bit block.
    pub block_size: i64,
}

impl Manifest {
    /// Reads `dir/octet.toml`, if present.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(MANIFEST_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| OctetError::io(&p, e))?;
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| OctetError::Config {
                path: p,
                problem: e.to_string(),
            })
    }

    /// Writes `dir/octet.toml`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join(MANIFEST_FILE);
        let text = toml::to_string(self).map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
        std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
    }
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| OctetError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| OctetError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
