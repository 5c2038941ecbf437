//! Architecture specs (`archs/<name>/spec.toml`): layer kinds by path pattern, what is quantized, the
//! default LoRA targets and block size.
use crate::error::{OctetError, Result};
use crate::quant::BlockSize;
use regex::Regex;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A path pattern: `*` matches any run of characters within one dotted segment.
/// A pattern without a leading anchor also matches any dotted suffix of a path, so
/// `lm_head` and `attn.q_proj` match `transformer.h.0.attn.q_proj`'s tail.
#[derive(Clone, Debug)]
pub struct PathPattern {
    source: String,
    regex: Regex,
}

impl PathPattern {
    /// Compiles a glob-style pattern.
    pub fn new(pattern: &str) -> Result<Self> {
        if pattern.is_empty() || pattern.split('.').any(str::is_empty) {
            return Err(OctetError::InvalidArgument(format!(
                "invalid module pattern '{pattern}'"
            )));
        }
        let body: String = pattern
            .split('*')
            .map(regex::escape)
            .collect::<Vec<_>>()
            .join("[^.]*");
        let regex = Regex::new(&format!(r"(^|\.){body}$")).map_err(|e| {
            OctetError::InvalidArgument(format!("invalid module pattern '{pattern}': {e}"))
        })?;
        Ok(PathPattern {
            source: pattern.to_string(),
            regex,
        })
    }

    /// Whether `path` (a module or tensor path) matches.
    pub fn matches(&self, path: &str) -> bool {
        self.regex.is_match(path)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    hf_architectures: Vec<String>,
    model_types: Vec<String>,
    block_size: i64,
    modules: BTreeMap<String, String>,
    quantize: RawQuantize,
    lora: RawLora,
    #[serde(default)]
    ignore: RawIgnore,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuantize {
    include: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLora {
    targets: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIgnore {
    #[serde(default)]
    tensors: Vec<String>,
}

/// A parsed architecture spec.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The architecture's registry name.
    pub name: String,
    /// Hugging Face `architectures` entries it serves.
    pub hf_architectures: Vec<String>,
    /// Hugging Face `model_type` values it serves.
    pub model_types: Vec<String>,
    /// Default quantization block size.
    pub block_size: BlockSize,
    /// Layer kind by module pattern; patterns should not overlap (the first in sorted order wins).
    pub modules: Vec<(PathPattern, String)>,
    /// Modules quantized by default.
    pub quantize: Vec<PathPattern>,
    /// Default LoRA target names.
    pub lora_targets: Vec<String>,
    /// Tensors in checkpoints that are not parameters.
    pub ignore: Vec<PathPattern>,
}

impl Spec {
    /// Parses a spec; errors name `origin`, the key and the problem.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let bad = |problem: String| OctetError::Config {
            path: PathBuf::from(origin),
            problem,
        };
        let raw: RawSpec =
            toml::from_str(text).map_err(|e| bad(e.to_string().trim().to_string()))?;
        let block_size =
            BlockSize::new(raw.block_size).map_err(|e| bad(format!("key `block_size`: {e}")))?;
        let pattern =
            |key: &str, p: &str| PathPattern::new(p).map_err(|e| bad(format!("key `{key}`: {e}")));
        let mut modules = Vec::new();
        for (p, kind) in &raw.modules {
            modules.push((pattern("modules", p)?, kind.clone()));
        }
        if modules.is_empty() {
            return Err(bad("key `modules`: no module kinds listed".into()));
        }
        let quantize = raw
            .quantize
            .include
            .iter()
            .map(|p| pattern("quantize.include", p))
            .collect::<Result<_>>()?;
        let ignore = raw
            .ignore
            .tensors
            .iter()
            .map(|p| pattern("ignore.tensors", p))
            .collect::<Result<_>>()?;
        if raw.lora.targets.is_empty() {
            return Err(bad(
                "key `lora.targets`: at least one default target is needed".into(),
            ));
        }
        Ok(Spec {
            name: raw.name,
            hf_architectures: raw.hf_architectures,
            model_types: raw.model_types,
            block_size,
            modules,
            quantize,
            lora_targets: raw.lora.targets,
            ignore,
        })
    }

    /// Reads and parses a spec file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| OctetError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// The layer kind of module `path`, if the spec names it.
    pub fn module_kind(&self, path: &str) -> Option<&str> {
        self.modules
            .iter()
            .find(|(p, _)| p.matches(path))
            .map(|(_, k)| k.as_str())
    }

    /// Whether module `path` is quantized by default.
    pub fn quantizes(&self, path: &str) -> bool {
        self.quantize.iter().any(|p| p.matches(path))
    }

    /// Whether tensor `name` is a known non-parameter to skip.
    pub fn ignores(&self, name: &str) -> bool {
        self.ignore.iter().any(|p| p.matches(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_segments_and_suffixes() {
        let p = PathPattern::new("transformer.h.*.attn.*_proj").unwrap();
        assert!(p.matches("transformer.h.12.attn.q_proj"));
        assert!(!p.matches("transformer.h.12.mlp.fc_in"));
        assert!(PathPattern::new("lm_head").unwrap().matches("lm_head"));
        assert!(PathPattern::new("q_proj")
            .unwrap()
            .matches("transformer.h.0.attn.q_proj"));
        assert!(!PathPattern::new("proj")
            .unwrap()
            .matches("transformer.h.0.attn.q_proj"));
        assert!(PathPattern::new("a..b").is_err());
    }

    #[test]
    fn invalid_spec_names_file_and_key() {
        let text = include_str!("../../archs/gptj/spec.toml")
            .replace("block_size = 4096", "block_size = 1000");
        let err = Spec::parse(&text, Path::new("archs/broken/spec.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("archs/broken/spec.toml") && err.contains("block_size"),
            "{err}"
        );
        let text = include_str!("../../archs/gptj/spec.toml").replace("[lora]", "[lora]\nrank = 3");
        let err = Spec::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank"), "{err}");
    }

    #[test]
    fn gptj_spec_selects_the_documented_modules() {
        let s = Spec::parse(
            include_str!("../../archs/gptj/spec.toml"),
            Path::new("archs/gptj/spec.toml"),
        )
        .unwrap();
        for m in [
            "transformer.wte",
            "transformer.h.3.attn.out_proj",
            "transformer.h.3.mlp.fc_out",
            "lm_head",
        ] {
            assert!(s.quantizes(m), "{m}");
        }
        assert!(!s.quantizes("transformer.h.3.ln_1"));
        assert_eq!(s.module_kind("transformer.h.3.mlp.fc_in"), Some("Linear"));
        assert!(s.ignores("transformer.h.0.attn.masked_bias"));
    }
}
