//! Opening a model, whatever form it comes in: a Hugging Face folder, an octet (8-bit)
//! folder, a GPT-J 8-bit `.bin` folder or a single GGUF file. Every command that reads a model
//! (convert, load for train/eval/generate, merge, export, inspect) opens it here, so they all
//! find the config, the architecture and the weights the same way and refuse the same inputs.
use crate::arch::{resolve, Architecture};
use crate::error::{OctetError, Result};
use crate::io::checkpoint::WEIGHT_FILES;
use crate::io::gguf::{self, GgufFile};
use crate::io::{open_checkpoint, TensorStore};
use crate::manifest::Manifest;
use crate::nn::ModuleGraph;
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// An opened model: its config, the architecture that reads it, its weights and the module
/// graph of what is stored, checked against each other.
pub struct ModelSource {
    /// The folder, or the GGUF file.
    pub path: PathBuf,
    /// The parsed config.json (for a GGUF file, the config its metadata implies).
    pub config: serde_json::Value,
    /// The plugin of its architecture.
    pub arch: &'static dyn Architecture,
    /// Its weights.
    pub store: Box<dyn TensorStore>,
    /// The modules as stored (8-bit where the checkpoint is 8-bit).
    pub graph: ModuleGraph,
}

impl ModelSource {
    /// Opens the model at `path` with architecture `arch` (`auto`, or a registry name) and
    /// checks the config's sizes and every stored module before anything is built.
    pub fn open(path: &Path, arch: &str) -> Result<Self> {
        // A folder written for a newer reader is refused before any of it is read.
        if path.is_dir() {
            Manifest::check_readable(path)?;
        }
        let config = read_config(path)?;
        let arch = resolve_arch(path, arch, &config)?;
        let store = open_checkpoint(path)?;
        let graph = ModuleGraph::from_store(store.as_ref(), arch.spec())?;
        check_checkpoint(arch, &config, path, store.as_ref(), &graph)?;
        Ok(ModelSource {
            path: path.to_path_buf(),
            config,
            arch,
            store,
            graph,
        })
    }

    /// Whether the model is a single GGUF file.
    pub fn is_gguf(&self) -> bool {
        gguf::is_gguf(&self.path)
    }

    /// The file the config comes from: `config.json`, or the GGUF file itself.
    pub fn config_origin(&self) -> PathBuf {
        config_origin(&self.path)
    }

    /// The model's tokenizer (a folder's tokenizer files, or a GGUF file's metadata).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_dir(&self.path)
    }

    /// Writes the config and tokenizer files that go with the weights into `out`: copied
    /// from a folder, or written from a GGUF file's metadata. Returns the names written.
    pub fn write_side_files(&self, out: &Path) -> Result<Vec<String>> {
        let mut written = crate::outdir::copy_side_files(&self.path, out)?;
        if self.is_gguf() {
            written.extend(GgufFile::open(&self.path)?.write_side_files(out)?);
        }
        Ok(written)
    }

    /// The files the model is made of, for a manifest: see [`source_paths`].
    pub fn source_paths(&self) -> Result<Vec<PathBuf>> {
        source_paths(&self.path)
    }
}

/// The files a model is made of: the weight file found (an index with its shards) and the
/// config; a GGUF file is all of it by itself.
pub fn source_paths(path: &Path) -> Result<Vec<PathBuf>> {
    if gguf::is_gguf(path) {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    if let Some(p) = WEIGHT_FILES
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.exists())
    {
        if p.to_string_lossy().ends_with(".index.json") {
            files.push(p.clone());
            files.extend(shard_files(&p)?);
        } else {
            files.push(p);
        }
    }
    files.push(path.join("config.json"));
    Ok(files)
}

/// The shard files an `.index.json` names, each once, sorted.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| OctetError::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| OctetError::bad_file(index, e.to_string()))?;
    let mut shards: Vec<&str> = json["weight_map"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    shards.sort_unstable();
    shards.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(shards.iter().map(|s| dir.join(s)).collect())
}

/// Reads and parses `dir/config.json`; for a GGUF file, the config its metadata implies.
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    if gguf::is_gguf(dir) {
        return gguf::read_config(dir);
    }
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| OctetError::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| OctetError::bad_file(&p, format!("invalid JSON: {e}")))
}

/// The file a model's config comes from: `dir/config.json`, or the GGUF file itself.
pub fn config_origin(dir: &Path) -> PathBuf {
    if gguf::is_gguf(dir) {
        dir.to_path_buf()
    } else {
        dir.join("config.json")
    }
}

/// Checks a checkpoint against its config before anything is built: the config's sizes
/// within bounds and consistent with the stored tensors ([`crate::sizes::check_config`]),
/// then the plugin's own check of every module. Config problems name the config's file,
/// checkpoint problems the weights file.
fn check_checkpoint(
    arch: &dyn Architecture,
    config: &serde_json::Value,
    dir: &Path,
    store: &dyn TensorStore,
    stored: &ModuleGraph,
) -> Result<()> {
    let origin = config_origin(dir);
    crate::sizes::check_config(config, &origin, stored, store.path())?;
    arch.check(config, stored).map_err(|e| match e {
        OctetError::ConfigValue(_) => e.in_config(&origin),
        other => OctetError::bad_file(store.path(), other.to_string()),
    })
}

/// Picks the architecture of a model folder: `arch` unless `auto`, else octet.toml's, else
/// config.json's.
fn resolve_arch(
    dir: &Path,
    arch: &str,
    config: &serde_json::Value,
) -> Result<&'static dyn Architecture> {
    if arch == "auto" {
        if let Some(m) = Manifest::read(dir)? {
            return crate::arch::find(&m.arch).map_err(|e| OctetError::Config {
                path: dir.join(crate::manifest::MANIFEST_FILE),
                problem: format!("arch: {e}"),
            });
        }
    }
    resolve(arch, config, &config_origin(dir))
}
