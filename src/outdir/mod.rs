//! Writing an output folder safely, the one way every command that writes goes:
//!
//! - the output is resolved with symlinks followed and must neither be, contain nor lie
//!   inside any input, nor be the current folder ([`target`]);
//! - one writer at a time: a lock beside the output names the holder's PID ([`lock`]);
//! - leftovers of killed runs beside it are cleaned up ([`leftovers`]);
//! - a new output is written into a hidden temporary sibling and renamed into place only when
//!   complete ([`OutputDir`]); a folder written in place (a training run) is
//!   [`InPlaceOutput`];
//! - every output carries the marker file [`MARKER`], and `force` replaces only a folder
//!   octet wrote.
pub mod leftovers;
pub mod lock;
pub mod target;

use crate::error::{OctetError, Result};
pub use lock::OutputLock;
use std::path::{Path, PathBuf};

/// The file octet writes into every output folder it creates; `--force` replaces only folders
/// that hold it (or an octet manifest, or a training run's files).
pub const MARKER: &str = ".octet-output";

fn write_marker(dir: &Path, what: &str) -> Result<()> {
    let p = dir.join(MARKER);
    let text = format!(
        "# written by octet {} ({what}); `--force` may replace this folder\n",
        env!("CARGO_PKG_VERSION")
    );
    std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
}

/// Checks shared by every output: resolves `target`, refuses it next to the inputs, takes
/// its lock, cleans leftovers, and refuses an existing non-empty folder unless `force` and
/// octet wrote it (`in_place_ok`: an existing folder may be continued without `force`).
fn prepare(
    target: &Path,
    force: bool,
    inputs: &[&Path],
    in_place_ok: bool,
) -> Result<(PathBuf, OutputLock)> {
    let abs = target::resolve(target)?;
    target::check_apart(target, &abs, inputs)?;
    if abs.exists() && !abs.is_dir() {
        return Err(OctetError::InvalidArgument(format!(
            "--out {}: exists and is not a folder; nothing was written",
            target.display()
        )));
    }
    let parent = abs.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(|e| OctetError::io(parent, e))?;
    let lock = OutputLock::acquire(&abs)?;
    leftovers::clean(&abs)?;
    if !in_place_ok && target::is_non_empty(&abs)? {
        if !force {
            return Err(OctetError::InvalidArgument(format!(
                "--out {}: exists and is not empty (pass --force to replace an output octet \
                 wrote)",
                target.display()
            )));
        }
        target::check_replaceable(target, &abs)?;
    }
    Ok((abs, lock))
}

/// A folder being written; dropped without [`OutputDir::commit`], it is removed.
pub struct OutputDir {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
    _lock: OutputLock,
}

impl OutputDir {
    /// Prepares to write `target`, which must not be, contain or lie inside any of `inputs`.
    /// An existing non-empty folder is refused unless `force`, and then replaced (at
    /// [`OutputDir::commit`]) only if octet wrote it.
    pub fn create(target: &Path, force: bool, inputs: &[&Path]) -> Result<Self> {
        let (abs, lock) = prepare(target, force, inputs, false)?;
        let tmp = leftovers::tmp_path(&abs, std::process::id());
        if tmp.exists() {
            // Left by an earlier process with this PID; removed only if octet made it.
            if !leftovers::made_by_octet(&tmp) {
                return Err(OctetError::InvalidArgument(format!(
                    "{}: is in the way of octet's temporary folder and octet did not write it; \
                     move it away",
                    tmp.display()
                )));
            }
            std::fs::remove_dir_all(&tmp).map_err(|e| OctetError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| OctetError::io(&tmp, e))?;
        let out = OutputDir {
            target: abs,
            tmp,
            committed: false,
            _lock: lock,
        };
        write_marker(&out.tmp, "model output")?;
        Ok(out)
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished folder into place (replacing an old one only now, when allowed).
    /// Should the process die between the two renames, the next run puts the old folder back.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            let mut old = self.tmp.clone().into_os_string();
            old.push(".old");
            let old = PathBuf::from(old);
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

/// A folder written in place over a long run (training: checkpoints appear as it goes),
/// locked for as long as this value lives.
pub struct InPlaceOutput {
    dir: PathBuf,
    _lock: OutputLock,
}

impl InPlaceOutput {
    /// Opens `target` for writing in place. `continuing`: the folder holds the run being
    /// continued, so its contents stay. Otherwise an existing non-empty folder needs `force`
    /// and must be octet's, and its files are removed first.
    pub fn open(target: &Path, force: bool, continuing: bool, inputs: &[&Path]) -> Result<Self> {
        let (dir, lock) = prepare(target, force, inputs, continuing)?;
        if !continuing && dir.is_dir() {
            // check_replaceable has vouched that everything here is octet's.
            for e in std::fs::read_dir(&dir).map_err(|e| OctetError::io(&dir, e))? {
                let p = e.map_err(|e| OctetError::io(&dir, e))?.path();
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.map_err(|e| OctetError::io(&p, e))?;
            }
        }
        std::fs::create_dir_all(&dir).map_err(|e| OctetError::io(&dir, e))?;
        write_marker(&dir, "training run")?;
        Ok(InPlaceOutput { dir, _lock: lock })
    }

    /// The folder (resolved).
    pub fn path(&self) -> &Path {
        &self.dir
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
