//! GGUF tokenizer metadata (`tokenizer.ggml.*`) from a HF `tokenizer.json`.

use std::path::Path;

use ds4_gguf::MetaValue;

use crate::error::{ConvertError, Result};

/// The `tokenizer.ggml.*` records for `tokenizer_json`.
pub fn vocab_metadata(tokenizer_json: &Path) -> Result<Vec<(String, MetaValue)>> {
    Err(ConvertError::Tokenizer {
        path: tokenizer_json.to_path_buf(),
        reason: "tokenizer metadata is not available in this build yet".into(),
    })
}

/// Number of tokens in tokenizer metadata (length of `tokenizer.ggml.tokens`).
pub fn vocab_size(md: &[(String, MetaValue)]) -> usize {
    md.iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map(|(_, items)| items.len())
        .unwrap_or(0)
}
