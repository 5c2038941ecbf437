//! `octet.toml`: what a converted model folder holds and how it was made.
use crate::error::{OctetError, Result};
use crate::quant::CodeKind;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the manifest inside a converted model folder.
pub const MANIFEST_FILE: &str = "octet.toml";

/// The highest folder format version this build reads. Folders record the lowest version a
/// reader needs ([`Manifest::format_version`]); one above this is refused before anything
/// else in it is parsed.
pub const FORMAT_VERSION: u32 = 3;

/// Something a folder may use that readers older than a given format version cannot read.
/// A writer lists what it used and records [`required_version`] of them, so a folder that
/// uses nothing new stays readable by old readers. A new feature gets a variant here whose
/// [`FormatFeature::since`] is the version that introduces it (raising [`FORMAT_VERSION`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatFeature {
    /// Blockwise 8-bit weights with f32 absmax and a stored code: every folder (version 1).
    Blockwise8,
    /// Block scales stored double-quantized (`absmax_q`, `absmax_scale`, `absmax_offset`).
    DoubleQuantAbsmax,
    /// A code kind in `code` that version-1 readers do not know (`linear`).
    NewCodeKind,
    /// Linear weights in 4 bits (`Bnb4Linear`: two codes per byte, a 16-entry code).
    FourBit,
}

impl FormatFeature {
    /// The first format version that has this feature.
    pub const fn since(self) -> u32 {
        match self {
            FormatFeature::Blockwise8 => 1,
            FormatFeature::DoubleQuantAbsmax | FormatFeature::NewCodeKind => 2,
            FormatFeature::FourBit => 3,
        }
    }
}

/// The lowest reader version that can read a folder using `features` (1 when none is new).
pub fn required_version(features: impl IntoIterator<Item = FormatFeature>) -> u32 {
    features
        .into_iter()
        .map(FormatFeature::since)
        .fold(1, u32::max)
}

/// What a folder holding `graph` with `code` as its manifest's code kind uses.
pub fn graph_features(graph: &crate::nn::ModuleGraph, code: CodeKind) -> Vec<FormatFeature> {
    let mut f = vec![FormatFeature::Blockwise8];
    if graph
        .nodes
        .iter()
        .any(|n| n.param(crate::quant::double_quant::STORED_Q).is_some())
    {
        f.push(FormatFeature::DoubleQuantAbsmax);
    }
    if !code.known_to_version_one() {
        f.push(FormatFeature::NewCodeKind);
    }
    if graph.nodes.iter().any(|n| n.kind == crate::nn::q4::KIND) {
        f.push(FormatFeature::FourBit);
    }
    f
}

/// The format version of folders written before manifests recorded one.
fn version_one() -> u32 {
    1
}

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
    /// The code kind the tensor was quantized with (absent in folders written before it was
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeKind>,
    /// Rounded with GPTQ against calibration inputs rather than to nearest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub calibrated: bool,
}

/// The manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The lowest reader format version that can read this folder (1 when absent: folders
    /// written before the field existed).
    #[serde(default = "version_one")]
    pub format_version: u32,
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
    /// The text 8-bit weights were rounded against (`convert --calibrate`), if any. The
    /// stored format is the same either way; only the code bytes differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
}

/// What a calibrated conversion rounded against.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CalibrationRecord {
    /// The calibration text file.
    pub data: SourceFile,
    /// Tokens of it that went through the model.
    pub tokens: usize,
    /// Weights rounded with GPTQ (the other quantized ones were rounded to nearest).
    pub weights: usize,
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
        check_format_version(&p, &text, FORMAT_VERSION)?;
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| OctetError::Config {
                path: p,
                problem: e.to_string(),
            })
    }

    /// Refuses `dir` when its manifest needs a newer reader (no manifest: readable).
    pub fn check_readable(dir: &Path) -> Result<()> {
        Self::read(dir).map(|_| ())
    }

    /// Refuses `dir` as a reader of format version `reader` would: what an older octet does
    /// with a folder that uses something it cannot read.
    pub fn check_readable_by(dir: &Path, reader: u32) -> Result<()> {
        let p = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| OctetError::io(&p, e))?;
        check_format_version(&p, &text, reader)
    }

    /// Writes `dir/octet.toml`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join(MANIFEST_FILE);
        let text = toml::to_string(self).map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
        std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
    }
}

/// Checks the `format_version` of manifest text read from `path` against a reader of format
/// version `reader` before the rest is parsed (a newer folder may use fields or values that
/// reader cannot parse).
fn check_format_version(path: &Path, text: &str, reader: u32) -> Result<()> {
    let bad = |problem: String| OctetError::Config {
        path: path.to_path_buf(),
        problem,
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    let version = match table.get("format_version") {
        None => return Ok(()),
        Some(toml::Value::Integer(v)) if *v >= 1 => *v,
        Some(other) => {
            return Err(bad(format!(
                "format_version must be a whole number from 1 up, found {other}"
            )))
        }
    };
    if version > i64::from(reader) {
        return Err(bad(format!(
            "format_version {version}: this folder needs a newer octet (octet {} reads \
             format versions up to {reader})",
            env!("CARGO_PKG_VERSION")
        )));
    }
    Ok(())
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
