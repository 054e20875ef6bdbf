//! Typed errors of the model crate.

use ds4_gguf::GgmlType;

use crate::shape::ShapeError;
use crate::snapshot::SnapshotError;

/// Errors from loading a model, evaluating tokens or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Gguf(#[from] ds4_gguf::GgufError),
    #[error("tensor {name} is missing")]
    MissingTensor { name: String },
    #[error("tensor {name} has type {found}, expected {expected}")]
    WrongType {
        name: String,
        expected: String,
        found: GgmlType,
    },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor {name}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("token id {token} at position {pos} is outside the vocabulary (size {n_vocab})")]
    TokenOutOfRange {
        token: u32,
        pos: usize,
        n_vocab: usize,
    },
    #[error("context is full: {needed} tokens do not fit in a context of {ctx}")]
    ContextFull { ctx: usize, needed: usize },
    #[error("invalid option: {0}")]
    BadOption(String),
    #[error("directional steering: {0}")]
    Steering(String),
    #[error("no logits are available (evaluate at least one token first)")]
    NoLogits,
    #[error("stopped after {done} of {total} tokens")]
    Stopped { done: usize, total: usize },
    #[error("backend {backend}: {reason}")]
    Backend { backend: String, reason: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
