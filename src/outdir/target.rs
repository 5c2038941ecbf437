//! Where an output goes and whether octet may write or replace it: the path resolved with
//! symlinks followed, never an input or a folder around one, never the current folder, and
//! an existing folder replaced only when octet wrote it.
use super::{MARKER, SIDE_FILES};
use crate::error::{OctetError, Result};
use std::path::{Component, Path, PathBuf};

/// `target` as an absolute path with every existing part canonicalised (symlinks resolved);
/// the not-yet-existing tail is appended as written, `.` and `..` applied.
pub fn resolve(target: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(target).map_err(|e| OctetError::io(target, e))?;
    let mut base = abs.as_path();
    let mut tail: Vec<Component> = Vec::new();
    let resolved = loop {
        if std::fs::symlink_metadata(base).is_ok() {
            break base.canonicalize().map_err(|e| OctetError::io(base, e))?;
        }
        let Some(parent) = base.parent() else {
            break PathBuf::from("/");
        };
        tail.extend(base.components().next_back());
        base = parent;
    };
    let mut out = resolved;
    for c in tail.into_iter().rev() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    if out.file_name().is_none() {
        return Err(OctetError::InvalidArgument(format!(
            "--out {}: the file-system root cannot be an output folder",
            target.display()
        )));
    }
    Ok(out)
}

/// Refuses an output (resolved by [`resolve`]) that is, contains or lies inside any input,
/// or that is the current folder or one around it.
pub fn check_apart(shown: &Path, out: &Path, inputs: &[&Path]) -> Result<()> {
    let refuse = |why: String| {
        Err(OctetError::InvalidArgument(format!(
            "--out {}: {why}; nothing was written",
            shown.display()
        )))
    };
    if let Ok(cwd) = std::env::current_dir().and_then(|d| d.canonicalize()) {
        if cwd.starts_with(out) {
            return refuse(if cwd == out {
                "is the current folder".into()
            } else {
                format!("contains the current folder {}", cwd.display())
            });
        }
    }
    for input in inputs {
        // An input that does not exist cannot be harmed (and its reader reports it).
        let Ok(inp) = input.canonicalize() else {
            continue;
        };
        if out == inp {
            return refuse(format!("is the input {}", input.display()));
        }
        if out.starts_with(&inp) {
            return refuse(format!("lies inside the input {}", input.display()));
        }
        if inp.starts_with(out) {
            return refuse(format!("contains the input {}", input.display()));
        }
        for file in linked_files(&inp) {
            if file.starts_with(out) {
                return refuse(format!(
                    "contains {}, a file the input {} links to",
                    file.display(),
                    input.display()
                ));
            }
        }
    }
    Ok(())
}

/// Where the links in an input folder lead (a Hugging Face cache snapshot's files are links
/// into its repository's `blobs/`): those files are part of the input wherever they lie.
fn linked_files(input: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(input) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        .filter_map(|e| e.path().canonicalize().ok())
        .collect()
}

/// Whether `dir` exists and holds anything.
pub fn is_non_empty(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    Ok(std::fs::read_dir(dir)
        .map_err(|e| OctetError::io(dir, e))?
        .next()
        .is_some())
}

/// Names octet writes into its outputs (converted models, merges, exports, training runs).
fn octet_writes(name: &str) -> bool {
    const OWN: [&str; 10] = [
        MARKER,
        crate::manifest::MANIFEST_FILE,
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "resume",
        ".resume-old",
        ".save-tmp",
    ];
    let shard = name
        .strip_prefix("model-")
        .and_then(|n| n.strip_suffix(".safetensors"))
        .is_some_and(|n| {
            let parts: Vec<&str> = n.split("-of-").collect();
            parts.len() == 2
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        });
    OWN.contains(&name) || SIDE_FILES.contains(&name) || shard
}

/// Refuses to replace `dir` unless octet wrote it: it holds the output marker, an octet
/// manifest or a training run's files, and nothing octet does not write.
pub fn check_replaceable(shown: &Path, dir: &Path) -> Result<()> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| OctetError::io(dir, e))? {
        let e = e.map_err(|e| OctetError::io(dir, e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    let has = |n: &str| names.iter().any(|x| x == n);
    let owned = has(MARKER)
        || has(crate::manifest::MANIFEST_FILE)
        || (has("adapter_config.json") && (has("resume") || has("metrics.jsonl")));
    if !owned {
        return Err(OctetError::InvalidArgument(format!(
            "--out {}: exists, is not empty and was not written by octet (no {MARKER} or {} \
             in it); --force replaces only octet's own outputs, so nothing was touched: \
             choose another --out or empty it yourself",
            shown.display(),
            crate::manifest::MANIFEST_FILE
        )));
    }
    names.sort();
    if let Some(foreign) = names.iter().find(|n| !octet_writes(n)) {
        return Err(OctetError::InvalidArgument(format!(
            "--out {}: holds {foreign}, which octet does not write; --force would delete it, \
             so nothing was touched: move it away or choose another --out",
            shown.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_missing_tails_and_dots() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let p = resolve(&tmp.path().join("a/b/../c")).unwrap();
        assert_eq!(p, root.join("a/c"));
        assert!(resolve(Path::new("/")).is_err());
    }

    #[test]
    fn refuses_outputs_around_or_inside_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let model = root.join("p/model");
        std::fs::create_dir_all(&model).unwrap();
        for (out, why) in [
            (root.join("p"), "contains the input"),
            (model.clone(), "is the input"),
            (model.join("sub"), "lies inside the input"),
        ] {
            let err = check_apart(&out, &out, &[&model]).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        check_apart(&root.join("q"), &root.join("q"), &[&model]).unwrap();
    }

    #[test]
    fn recognises_shard_names() {
        assert!(octet_writes("model-00001-of-00002.safetensors"));
        assert!(!octet_writes("model-notes.safetensors"));
        assert!(!octet_writes("train.txt"));
    }
}
