//! GGUF tokenizer metadata (`tokenizer.ggml.*`) from a HF `tokenizer.json`, through
//! `ds4_tokenizer`.

use std::path::Path;

use ds4_gguf::MetaValue;

use crate::error::{ConvertError, Result};

/// The `tokenizer.ggml.*` records for `tokenizer_json`.
pub fn vocab_metadata(tokenizer_json: &Path) -> Result<Vec<(String, MetaValue)>> {
    let tok = ds4_tokenizer::Tokenizer::from_tokenizer_json(tokenizer_json).map_err(|e| {
        ConvertError::Tokenizer {
            path: tokenizer_json.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    Ok(tok.gguf_vocab_metadata())
}

/// Number of tokens in tokenizer metadata (length of `tokenizer.ggml.tokens`).
pub fn vocab_size(md: &[(String, MetaValue)]) -> usize {
    md.iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map(|(_, items)| items.len())
        .unwrap_or(0)
}
