//! Typed errors of this crate.

use thiserror::Error;

/// Everything that can go wrong while building or using a [`crate::Tokenizer`].
#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("I/O error reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tokenizer.json: {0}")]
    InvalidTokenizerJson(String),
    #[error("GGUF metadata key {key}: {problem}")]
    GgufKey { key: &'static str, problem: String },
    #[error(
        "unsupported pre-tokenizer: {0} (only the DeepSeek V4 / joyai-llm pre-tokenizer is supported)"
    )]
    UnsupportedPreTokenizer(String),
    #[error("empty vocabulary")]
    EmptyVocab,
    #[error("vocabulary too large: {0} tokens")]
    VocabTooLarge(usize),
    #[error("token string {token:?} appears twice (ids {first} and {second})")]
    DuplicateToken {
        token: String,
        first: u32,
        second: u32,
    },
    #[error("token_type has {got} entries but the vocabulary has {expected}")]
    TokenTypeLength { expected: usize, got: usize },
    #[error("merge #{index} {merge:?} is not of the form \"A B\"")]
    BadMerge { index: usize, merge: String },
    #[error("required special token {0:?} is missing from the vocabulary")]
    MissingSpecial(&'static str),
    #[error("added token id {id} is out of range (vocabulary size {size})")]
    AddedTokenOutOfRange { id: u32, size: usize },
    #[error("tokenizers library error: {0}")]
    Hf(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TokenizerError>;

impl TokenizerError {
    pub(crate) fn hf(e: impl std::fmt::Display) -> TokenizerError {
        TokenizerError::Hf(e.to_string())
    }
}
