//! Writing an output folder safely: everything goes into a hidden temporary sibling that is
//! renamed into place only when complete, and an existing non-empty folder is never
//! overwritten without `force`.
use crate::error::{OctetError, Result};
use std::path::{Path, PathBuf};

/// A folder being written; dropped without [`OutputDir::commit`], it is removed.
pub struct OutputDir {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

impl OutputDir {
    /// Prepares to write `target`. Refuses a non-empty existing folder unless `force`, and a
    /// target inside (or equal to) any of `inputs`.
    pub fn create(target: &Path, force: bool, inputs: &[&Path]) -> Result<Self> {
        let abs = absolute(target);
        for input in inputs {
            let inp = input.canonicalize().unwrap_or_else(|_| absolute(input));
            let parent = abs
                .parent()
                .and_then(|p| p.canonicalize().ok())
                .map(|p| p.join(abs.file_name().unwrap_or_default()));
            let t = parent.unwrap_or_else(|| abs.clone());
            if t.starts_with(&inp) {
                return Err(OctetError::InvalidArgument(format!(
                    "{}: the output folder must not be inside the input {}",
                    target.display(),
                    input.display()
                )));
            }
        }
        if target.is_file() {
            return Err(OctetError::InvalidArgument(format!(
                "{}: exists and is a file",
                target.display()
            )));
        }
        let non_empty = target.is_dir()
            && std::fs::read_dir(target)
                .map_err(|e| OctetError::io(target, e))?
                .next()
                .is_some();
        if non_empty && !force {
            return Err(OctetError::InvalidArgument(format!(
                "{}: exists and is not empty (pass --force to replace it)",
                target.display()
            )));
        }
        let name = abs.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let parent = abs.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| OctetError::io(parent, e))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| OctetError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| OctetError::io(&tmp, e))?;
        Ok(OutputDir {
            target: abs,
            tmp,
            committed: false,
        })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished folder into place (replacing an old one only now, when allowed).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.target, &old).map_err(|e| OctetError::io(&self.target, e))?;
            std::fs::rename(&self.tmp, &self.target)
                .map_err(|e| OctetError::io(&self.target, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.target)
                .map_err(|e| OctetError::io(&self.target, e))?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Files besides the weights that travel with a model: config and tokenizer.
pub const SIDE_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Copies the side files present in `from` into `to`; returns the names copied.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for f in SIDE_FILES {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f)).map_err(|e| OctetError::io(&src, e))?;
            copied.push(f.to_string());
        }
    }
    Ok(copied)
}
