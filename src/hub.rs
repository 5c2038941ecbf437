//! Hugging Face cache ids: a model named `org/name` or `org/name@revision` instead of a path
//! is found, offline, in the local Hugging Face cache that `huggingface-cli download` (and
//! transformers) fill.
//!
//! The cache holds one folder per repository, `models--org--name/`, with `blobs/` (files
//! named by their hash), `snapshots/<commit>/` (the repository's files as links into
//! `../../blobs`) and `refs/<branch or tag>` (a file holding the commit the branch or tag
//! pointed to when it was downloaded). The folder name comes from the `hf-hub` crate; this
//! module adds what it lacks: resolving a whole snapshot folder rather than one file, a
//! commit hash (full or abbreviated) as revision, `HF_HUB_CACHE`, and errors that say why
//! nothing was found and how to get it.
//!
//! Every command resolves its model arguments here, at the command line, so everything
//! after it reads an ordinary folder (whose files happen to be symlinks).
use crate::error::{OctetError, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The branch a bare `org/name` means.
pub const DEFAULT_REVISION: &str = "main";

/// Shortest abbreviated commit hash taken as a revision (git's default abbreviation).
const MIN_ABBREVIATED_HASH: usize = 7;

/// A model repository id as the hub names it, `org/name`, optionally at a revision (a
/// branch, a tag or a commit hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// What followed `@`, if anything.
    pub revision: Option<String>,
}

impl HubId {
    /// Parses `org/name[@revision]`; `None` for anything else (a path such as `./x`, `/x`,
    /// `a/b/c` or `model`), so a string is only ever taken for an id when it has an id's
    /// shape.
    pub fn parse(s: &str) -> Option<HubId> {
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (s, None),
        };
        let (org, name) = repo.split_once('/')?;
        if !is_name(org) || !is_name(name) {
            return None;
        }
        if let Some(rev) = revision {
            // A revision becomes a path under refs/: no empty, `.` or `..` component.
            let bad = |c: &str| c.is_empty() || c == "." || c == "..";
            if rev.split('/').any(bad) || rev.chars().any(char::is_whitespace) {
                return None;
            }
        }
        Some(HubId {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    /// The revision looked up: the one given, or `main`.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }

    /// The command that downloads this id into the cache.
    pub fn download_command(&self) -> String {
        match &self.revision {
            Some(rev) => format!("huggingface-cli download {} --revision {rev}", self.repo),
            None => format!("huggingface-cli download {}", self.repo),
        }
    }

    /// The repository's folder in `cache` (`models--org--name`).
    pub fn repo_dir(&self, cache: &Path) -> PathBuf {
        let repo = hf_hub::Repo::model(self.repo.clone());
        cache.join(repo.folder_name())
    }

    /// The model of this id in `cache`: the snapshot folder of the commit that
    /// `refs/<revision>` names, else of the one cached commit that starts with the revision;
    /// a snapshot without config.json that holds one GGUF file is that file.
    pub fn snapshot_in(&self, cache: &Path) -> Result<PathBuf> {
        let not_cached = |problem: String| OctetError::NotCached {
            id: self.to_string(),
            cache: cache.to_path_buf(),
            problem,
            command: self.download_command(),
        };
        let dir = self.repo_dir(cache);
        if !dir.is_dir() {
            return Err(not_cached(format!("it holds no {}", file_name(&dir))));
        }
        let rev = self.revision();
        let commit = match read_ref(&dir, rev)? {
            Some(c) => c,
            None => {
                let matches = snapshots_starting_with(&dir, rev)?;
                match matches.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return Err(not_cached(format!(
                            "revision {rev} is not there: no {} and no snapshot whose commit \
                             starts with it (cached: {})",
                            dir.join("refs").join(rev).display(),
                            cached_revisions(&dir)?
                        )))
                    }
                    many => {
                        return Err(not_cached(format!(
                            "revision {rev} abbreviates {} cached commits ({}); give more of \
                             the hash",
                            many.len(),
                            many.join(", ")
                        )))
                    }
                }
            }
        };
        let snapshot = dir.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(not_cached(format!(
                "{} points to commit {commit}, whose snapshot {} is missing",
                dir.join("refs").join(rev).display(),
                snapshot.display()
            )));
        }
        if snapshot.join("config.json").is_file() {
            return Ok(snapshot);
        }
        // A GGUF repository downloaded with `--include "*Q4_K_M.gguf"`: the one file is the model.
        let ggufs = gguf_files(&snapshot)?;
        match ggufs.as_slice() {
            [one] => Ok(snapshot.join(one)),
            [] => Err(not_cached(format!(
                "its snapshot {} holds no config.json and no GGUF file (a partial download?)",
                snapshot.display()
            ))),
            many => Err(OctetError::InvalidArgument(format!(
                "{self}: the cached snapshot {} holds {} GGUF files ({}); give the path of the \
                 one to use",
                snapshot.display(),
                many.len(),
                many.join(", ")
            ))),
        }
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{}@{rev}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// One part of `org/name`: what the hub allows in names (letters, digits, `-`, `_`, `.`),
/// not starting with `.` or `-` (so `../x` and `./x` stay paths).
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['.', '-'])
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The commit `refs/<rev>` names, if that file exists.
fn read_ref(repo_dir: &Path, rev: &str) -> Result<Option<String>> {
    let path = repo_dir.join("refs").join(rev);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| OctetError::io(&path, e))?;
    let commit = text.trim();
    if commit.is_empty() || commit.contains(['/', '\\']) || commit == ".." {
        return Err(OctetError::bad_file(&path, "does not hold a commit hash"));
    }
    Ok(Some(commit.to_string()))
}

/// The names of the `.gguf` files in `dir`, sorted.
fn gguf_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| OctetError::io(dir, e))? {
        let name = e.map_err(|e| OctetError::io(dir, e))?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".gguf") {
            out.push(name.into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// The snapshot folder names (commit hashes), sorted.
fn snapshot_commits(repo_dir: &Path) -> Result<Vec<String>> {
    let dir = repo_dir.join("snapshots");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| OctetError::io(&dir, e))? {
        let e = e.map_err(|e| OctetError::io(&dir, e))?;
        if e.path().is_dir() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// The cached commits that `rev` is (a prefix of), when `rev` looks like a commit hash.
fn snapshots_starting_with(repo_dir: &Path, rev: &str) -> Result<Vec<String>> {
    let looks_like_hash =
        rev.len() >= MIN_ABBREVIATED_HASH && rev.chars().all(|c| c.is_ascii_hexdigit());
    if !looks_like_hash {
        return Ok(Vec::new());
    }
    let rev = rev.to_ascii_lowercase();
    Ok(snapshot_commits(repo_dir)?
        .into_iter()
        .filter(|c| c.starts_with(&rev))
        .collect())
}

/// What is cached of a repository, for an error: `main -> 1a2b3c4, …` and the commits.
fn cached_revisions(repo_dir: &Path) -> Result<String> {
    let refs = repo_dir.join("refs");
    let mut names = Vec::new();
    if refs.is_dir() {
        list_refs(&refs, "", &mut names)?;
    }
    names.sort();
    let mut parts = Vec::new();
    for name in names {
        if let Some(c) = read_ref(repo_dir, &name)? {
            parts.push(format!("{name} -> {}", short(&c)));
        }
    }
    let commits = snapshot_commits(repo_dir)?;
    if !commits.is_empty() {
        let shown: Vec<&str> = commits.iter().map(|c| short(c)).collect();
        parts.push(format!("commits {}", shown.join(", ")));
    }
    Ok(if parts.is_empty() {
        "nothing".to_string()
    } else {
        parts.join("; ")
    })
}

/// The ref files under `dir` (revisions may hold `/`, e.g. `refs/pr/1`), as names.
fn list_refs(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| OctetError::io(dir, e))? {
        let e = e.map_err(|e| OctetError::io(dir, e))?;
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            list_refs(&e.path(), &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}

fn short(commit: &str) -> &str {
    commit.get(..MIN_ABBREVIATED_HASH).unwrap_or(commit)
}

/// The Hugging Face hub cache folder as `huggingface_hub` finds it from the environment
/// `var`: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`. `None` when none is set and there is no home folder.
pub fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    let home = set("HOME").map(PathBuf::from);
    // huggingface_hub expands a leading `~` in these variables.
    let expand = |v: OsString| -> PathBuf {
        let p = PathBuf::from(v);
        match (p.strip_prefix("~"), &home) {
            (Ok(rest), Some(h)) => h.join(rest),
            _ => p,
        }
    };
    if let Some(v) = set("HF_HUB_CACHE") {
        return Some(expand(v));
    }
    if let Some(v) = set("HF_HOME") {
        return Some(expand(v).join("hub"));
    }
    let cache_home = match set("XDG_CACHE_HOME") {
        Some(v) => expand(v),
        None => home?.join(".cache"),
    };
    Some(cache_home.join("huggingface").join("hub"))
}

/// The Hugging Face hub cache folder of this process's environment (see [`cache_dir_from`]).
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name)).ok_or_else(|| {
        OctetError::InvalidArgument(
            "no Hugging Face cache folder: set HF_HUB_CACHE or HF_HOME (there is no home \
             folder to default to)"
                .into(),
        )
    })
}

/// A model argument as a path: an existing file or folder is itself (a folder named
/// `org/name` in the current folder wins over the cache); `org/name[@revision]` that is no
/// existing path is the snapshot folder of that revision in the Hugging Face cache, or an
/// error naming the id, the cache searched and the command that downloads it; anything
/// else is returned as given (its reader reports a missing path).
pub fn resolve_model(arg: &Path) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let Some(id) = arg.to_str().and_then(HubId::parse) else {
        return Ok(arg.to_path_buf());
    };
    let cache = cache_dir()?;
    match id.snapshot_in(&cache) {
        #[cfg(feature = "hub-download")]
        Err(OctetError::NotCached { .. }) if !offline() => {
            download::model(&id, &cache)?;
            id.snapshot_in(&cache)
        }
        found => found,
    }
}

/// `HF_HUB_OFFLINE` set to a true value, as `huggingface_hub` reads it.
#[cfg(feature = "hub-download")]
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Downloading an id that is not cached (the `hub-download` feature, off by default).
#[cfg(feature = "hub-download")]
mod download {
    use super::HubId;
    use crate::error::{OctetError, Result};
    use std::path::Path;

    /// Weight formats octet does not read; skipped so a download fetches one copy of the
    /// weights rather than every format the repository offers.
    const UNUSED: [&str; 7] = [".h5", ".msgpack", ".onnx", ".ot", ".gguf", ".pt", ".pth"];

    /// Downloads the files octet reads of `id` into `cache`, in the hub's own layout: the
    /// top-level files, with pickled `.bin` weights only when there are no safetensors.
    pub fn model(id: &HubId, cache: &Path) -> Result<()> {
        let failed = |e: hf_hub::api::sync::ApiError| {
            OctetError::InvalidArgument(format!("downloading {id} into {}: {e}", cache.display()))
        };
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.into()))
            .build()
            .map_err(failed)?;
        let repo = api.repo(hf_hub::Repo::with_revision(
            id.repo.clone(),
            hf_hub::RepoType::Model,
            id.revision().to_string(),
        ));
        let files: Vec<String> = repo
            .info()
            .map_err(failed)?
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|f| !f.contains('/') && !UNUSED.iter().any(|x| f.ends_with(x)))
            .collect();
        let has_safetensors = files.iter().any(|f| f.ends_with(".safetensors"));
        for f in files {
            if has_safetensors && f.ends_with(".bin") && f.starts_with("pytorch_model") {
                continue;
            }
            repo.get(&f).map_err(failed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_one_slash_and_paths_stay_paths() {
        let id = HubId::parse("meta-llama/Llama-3.2-1B").unwrap();
        assert_eq!(id.repo, "meta-llama/Llama-3.2-1B");
        assert_eq!(id.revision(), "main");
        let id = HubId::parse("Qwen/Qwen2.5-0.5B@refs/pr/1").unwrap();
        assert_eq!(id.revision.as_deref(), Some("refs/pr/1"));
        assert_eq!(id.to_string(), "Qwen/Qwen2.5-0.5B@refs/pr/1");
        for path in [
            "model",
            "./org/name",
            "../org/name",
            "/org/name",
            "a/b/c",
            "org/",
            "/name",
            "org/name@",
            "org/name@../../x",
            "org/name@a//b",
            "org/na me",
            ".hidden/name",
            "org/..",
        ] {
            assert_eq!(HubId::parse(path), None, "{path}");
        }
    }

    #[test]
    fn download_command_carries_the_revision() {
        let id = HubId::parse("org/name@v2").unwrap();
        assert_eq!(
            id.download_command(),
            "huggingface-cli download org/name --revision v2"
        );
        let id = HubId::parse("org/name").unwrap();
        assert_eq!(id.download_command(), "huggingface-cli download org/name");
    }

    #[test]
    fn the_repository_folder_follows_the_hub_layout() {
        let id = HubId::parse("org/name@abc").unwrap();
        assert_eq!(
            id.repo_dir(Path::new("/c")),
            Path::new("/c/models--org--name")
        );
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn cache_folder_precedence_follows_huggingface_hub() {
        let all = [
            ("HF_HUB_CACHE", "/hub"),
            ("HF_HOME", "/hf"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        let dir = |pairs: &[(&str, &str)]| cache_dir_from(env(pairs));
        assert_eq!(dir(&all), Some(PathBuf::from("/hub")));
        assert_eq!(dir(&all[1..]), Some(PathBuf::from("/hf/hub")));
        assert_eq!(dir(&all[2..]), Some(PathBuf::from("/xdg/huggingface/hub")));
        assert_eq!(
            dir(&all[3..]),
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        assert_eq!(dir(&[]), None);
        // Empty variables count as unset; `~` is the home folder.
        assert_eq!(
            dir(&[("HF_HUB_CACHE", ""), ("HF_HOME", "~/hf"), ("HOME", "/h")]),
            Some(PathBuf::from("/h/hf/hub"))
        );
    }
}
