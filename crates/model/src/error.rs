//! The one error type of the model crate. Every fallible public function returns it, so the
//! CLI and the server map each kind to an exit code or HTTP status in exactly one place.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the checkpoint needs is missing or unreadable.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// A configuration file exists but does not say what we need.
    #[error("invalid {file}: {reason}")]
    Config { file: String, reason: String },

    /// The hub could not provide the model (offline and not cached, unknown id, network).
    #[error("cannot fetch {repo}/{file} from the hub: {reason}")]
    Hub { repo: String, file: String, reason: String },

    /// Weights are missing, misshapen or of an unsupported kind.
    #[error("weights: {0}")]
    Weights(String),

    /// The image cannot be used: unknown format, corrupt, too large, bad aspect ratio.
    #[error(transparent)]
    Image(#[from] ImageError),

    /// The request itself is invalid (bad dtype name, prompt too long, bad sampling values).
    #[error("{0}")]
    InvalidRequest(String),

    /// A LoRA adapter that cannot be used as it is.
    #[error("adapter `{name}`: {reason}")]
    Adapter { name: String, reason: String },

    /// Every adapter slot is taken by one that cannot be unloaded now (pinned, or in use).
    #[error("cannot load adapter `{name}`: {resident} adapters are resident, the limit, and none can be unloaded now")]
    AdaptersFull { name: String, resident: usize },
    /// A JSON Schema that does not parse, or uses what cannot be enforced.
    #[error("invalid JSON schema: {0}")]
    Schema(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Image problems are their own type because the server maps them to distinct statuses
/// (415 for formats, 413 for size, 400 for the rest).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unsupported or unrecognised image format")]
    UnsupportedFormat,
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit}")]
    TooLarge { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("aspect ratio {ratio:.1} of {width}x{height} exceeds 200")]
    AspectRatio { width: u32, height: u32, ratio: f64 },
    #[error("image is corrupt or truncated: {0}")]
    Corrupt(String),
    #[error("image has zero width or height")]
    Empty,
    /// Resize bounds (from the configuration or an adapter's profile) that no image can meet.
    #[error("cannot resize within min_pixels {min_pixels} and max_pixels {max_pixels}: {reason}")]
    PixelBounds { min_pixels: u64, max_pixels: u64, reason: &'static str },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }

    pub(crate) fn config(file: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Config { file: file.into(), reason: reason.to_string() }
    }
}
