//! Which modules of a model get LoRA adapters: PEFT's `target_modules`, as names or a regex.
use crate::error::{OctetError, Result};
use regex::Regex;

/// Which modules get adapters: PEFT's two forms.
#[derive(Clone, Debug)]
pub enum Targets {
    /// Module names: a path matches when it equals a name or ends with `.name`.
    Names(Vec<String>),
    /// A regular expression that must match the whole path.
    Regex(String),
}

impl Targets {
    /// Parses `--targets`: a comma-separated list of names, or a regex when it contains
    /// regex syntax.
    pub fn parse(s: &str) -> Result<Self> {
        if s.chars().any(|c| "*+?()[]|^$\\".contains(c)) {
            Regex::new(&format!("^(?:{s})$"))
                .map_err(|e| OctetError::InvalidArgument(format!("--targets '{s}': {e}")))?;
            Ok(Targets::Regex(s.to_string()))
        } else {
            let names: Vec<String> = s
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            if names.is_empty() {
                return Err(OctetError::InvalidArgument("--targets is empty".into()));
            }
            Ok(Targets::Names(names))
        }
    }

    /// Whether module `path` is targeted.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Targets::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Targets::Regex(r) => {
                Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(path))
            }
        }
    }

    /// The JSON value PEFT stores in `target_modules`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Targets::Names(n) => serde_json::json!(n),
            Targets::Regex(r) => serde_json::json!(r),
        }
    }

    /// From PEFT's `target_modules`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        match v {
            serde_json::Value::String(s) => Ok(Targets::Regex(s.clone())),
            serde_json::Value::Array(a) => Ok(Targets::Names(
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
            )),
            _ => Err(OctetError::InvalidArgument(
                "target_modules must be a list or a string".into(),
            )),
        }
    }
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Names(n) => write!(f, "{}", n.join(",")),
            Targets::Regex(r) => write!(f, "{r}"),
        }
    }
}
