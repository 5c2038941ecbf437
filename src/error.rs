//! The library's error type. Every variant names what was wrong and, where a file is involved, which.
use std::path::PathBuf;

/// Errors raised by the octet library.
#[derive(Debug, thiserror::Error)]
pub enum OctetError {
    /// A block size outside the supported set.
    #[error("invalid block size {0}: must be a power of two between 64 and 4096")]
    InvalidBlockSize(i64),
    /// A tensor whose dtype an operation cannot take.
    #[error("unsupported dtype {found:?} for {op}: expected {expected}")]
    UnsupportedDtype {
        /// The operation that refused it.
        op: &'static str,
        /// The dtype it got.
        found: tch::Kind,
        /// What it accepts.
        expected: &'static str,
    },
    /// A tensor that must be contiguous in memory but is not.
    #[error("{op}: the input tensor is not contiguous (call .contiguous() first)")]
    NotContiguous {
        /// The operation that refused it.
        op: &'static str,
    },
    /// A length or shape that does not match what another argument implies.
    #[error("shape mismatch in {what}: expected {expected}, found {found}")]
    ShapeMismatch {
        /// What was being checked.
        what: String,
        /// The expected length or shape.
        expected: String,
        /// The length or shape found.
        found: String,
    },
    /// A quantization code that is not a sorted table of 256 finite values.
    #[error("invalid quantization code: {0}")]
    InvalidCode(String),
    /// A file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file whose contents are malformed.
    #[error("{path}: {problem}")]
    BadFile {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A configuration or spec problem.
    #[error("{path}: {problem}")]
    Config {
        /// The file (or flag) involved.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A model config value out of range or inconsistent, before the config's origin is known
    /// (an architecture plugin parsing a config); [`OctetError::in_config`] names the file.
    #[error("config.json: {0}")]
    ConfigValue(String),
    /// An architecture name that matches no registration, or more than one.
    #[error("{0}")]
    Architecture(String),
    /// A user-facing argument that cannot be honoured.
    #[error("{0}")]
    InvalidArgument(String),
    /// A Hugging Face cache id (`org/name[@revision]`) that is neither a local path nor in
    /// the cache.
    #[error(
        "{id}: no such local path, and not in the Hugging Face cache {cache}: {problem}; \
         download it with `{command}` (or point HF_HUB_CACHE or HF_HOME at the cache that \
         holds it)"
    )]
    NotCached {
        /// The id as given.
        id: String,
        /// The cache folder searched.
        cache: PathBuf,
        /// What is missing there.
        problem: String,
        /// The command that would download it.
        command: String,
    },
    /// An error raised inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A distributed-training failure: set-up, a collective, or another rank.
    #[error("distributed training: {0}")]
    Distributed(String),
}

impl OctetError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OctetError::Io {
            path: path.into(),
            source,
        }
    }

    /// A problem with a model config value (see [`OctetError::in_config`]).
    pub fn config_value(problem: impl Into<String>) -> Self {
        OctetError::ConfigValue(problem.into())
    }

    /// Names `origin` (config.json, or the GGUF file whose metadata stands for it) in a
    /// config-value error; other errors pass unchanged.
    pub fn in_config(self, origin: &std::path::Path) -> Self {
        match self {
            OctetError::ConfigValue(problem) => OctetError::Config {
                path: origin.to_path_buf(),
                problem,
            },
            other => other,
        }
    }

    /// A malformed-file error for `path`.
    pub fn bad_file(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        OctetError::BadFile {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

/// The library's result type.
pub type Result<T, E = OctetError> = std::result::Result<T, E>;
