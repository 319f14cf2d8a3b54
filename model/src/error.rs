//! The engine's one error type. Every variant names the input (file, tensor, key or request field)
//! and says what is wrong with it, so that a caller can print it as is.

use std::path::PathBuf;

/// Errors of the model engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model needs is not there.
    #[error("{path}: file not found ({what}); {hint}")]
    MissingFile {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
    },
    /// A file exists but could not be read or parsed (truncated, corrupt, wrong format).
    #[error("{path}: cannot read {what}: {reason}")]
    BadFile {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    /// The model's architecture is not one the engine implements.
    #[error("{path}: unsupported architecture '{arch}' (supported: llama family, qwen2)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// A tensor is missing from the weights.
    #[error("{path}: tensor '{name}' is missing")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor has a shape that does not fit the config.
    #[error(
        "{path}: tensor '{name}' has shape {found:?}, expected {expected:?} from the model config"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A config or metadata value is missing or out of range.
    #[error("{path}: config '{key}': {reason}")]
    BadConfig {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A LoRA adapter that cannot be used with this model.
    #[error("adapter {path}: {reason}")]
    BadAdapter { path: PathBuf, reason: String },
    /// A request that cannot be served (bad sampling parameter, empty or too long prompt, bad id).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A device that cannot be used: an unknown name, a build without its feature, no GPU.
    #[error("{0}")]
    Device(String),
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat template failure (syntax error in the template or `raise_exception` in it).
    #[error("chat template: {0}")]
    Template(String),
    /// A tensor operation failed: a bug or an exhausted resource, not bad input.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of the engine.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn bad_file(
        path: impl Into<PathBuf>,
        what: &'static str,
        reason: impl ToString,
    ) -> Self {
        Error::BadFile {
            path: path.into(),
            what,
            reason: reason.to_string(),
        }
    }
    pub(crate) fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::BadConfig {
            path: path.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}
