//! Typed errors of the converter. Every error names the file, key or tensor it is about.

use std::path::PathBuf;

use ds4_gguf::GgmlType;

/// Errors from [`crate::convert_checkpoint`] and friends.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config.json: key {key:?} is missing")]
    ConfigMissing { key: String },
    #[error("config.json: key {key:?} has the wrong type (expected {expected}, found {found})")]
    ConfigType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("config.json: key {key:?} = {found} is not supported: {reason}")]
    ConfigValue {
        key: String,
        found: String,
        reason: String,
    },
    #[error("the model shape described by config.json is invalid: {0}")]
    Shape(#[from] ds4_model::ShapeError),
    #[error("{path}: bad safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: bad safetensors index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error(
        "checkpoint tensor {name:?} is listed in the index for shard {shard:?} but that shard does not hold it"
    )]
    NotInShard { name: String, shard: String },
    #[error("checkpoint tensor {name:?} is not part of the DeepSeek V4 layout for this config")]
    UnknownTensor { name: String },
    #[error("checkpoint tensor {name:?} is missing (needed for GGUF tensor {gguf:?})")]
    MissingTensor { name: String, gguf: String },
    #[error("checkpoint tensor {name:?}: dtype {found} is not accepted here (expected {expected})")]
    WrongDtype {
        name: String,
        expected: String,
        found: String,
    },
    #[error("checkpoint tensor {name:?}: shape {found:?}, expected {expected:?} for this config")]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("scale tensor {name:?}: shape {found:?}, expected {expected:?} for its weight")]
    ScaleShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "scale tensor {name:?} belongs to a weight that is not block-quantized ({weight_dtype})"
    )]
    UnexpectedScale { name: String, weight_dtype: String },
    #[error(
        "checkpoint tensor {name:?}: value {value} at index {index} is out of range ({reason})"
    )]
    ValueRange {
        name: String,
        index: usize,
        value: i64,
        reason: String,
    },
    #[error(
        "recipe {recipe} cannot store GGUF tensor {tensor:?} as {ty}: its rows have {ne0} values, not a multiple of the {ty} block size {block}"
    )]
    BlockSize {
        recipe: String,
        tensor: String,
        ty: GgmlType,
        ne0: u64,
        block: usize,
    },
    #[error("unknown recipe {0:?} (expected one of f32, f16, q8_0, q2, q4)")]
    UnknownRecipe(String),
    #[error("tensor {tensor:?}: cannot encode as {ty}: {reason}")]
    Encode {
        tensor: String,
        ty: GgmlType,
        reason: String,
    },
    #[error("imatrix {path}: {reason}")]
    Imatrix { path: PathBuf, reason: String },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error(
        "tokenizer {path} has {tokenizer_vocab} tokens but the model's vocab_size is {model_vocab}"
    )]
    VocabMismatch {
        path: PathBuf,
        tokenizer_vocab: usize,
        model_vocab: usize,
    },
    #[error("GGUF: {0}")]
    Gguf(#[from] ds4_gguf::GgufError),
    #[error("the written file does not read back as the converted model: {0}")]
    Verify(String),
}

/// Result alias.
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ConvertError {
    let path = path.into();
    move |source| ConvertError::Io { path, source }
}
