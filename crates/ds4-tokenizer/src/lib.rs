//! ds4-tokenizer: the DeepSeek V4 tokenizer (HF `tokenizers` BPE with the official pre-tokenizer),
//! ds4's chat-template rendering (server, CLI, completion and REPL forms) and DSML tool calls
//! (canonical rendering, one-shot parsing and a streaming parser).

pub mod bytelevel;
mod error;
mod tokenizer;

pub use error::{Result, TokenizerError};
pub use tokenizer::{
    ACCEPTED_GGUF_PRE, ASSISTANT_TEXT, BOS_TEXT, DS4_SPECIAL_TEXTS, DSML_TEXT, EOS_TEXT,
    PRE_TOKENIZER_REGEXES, SpecialTokens, THINK_END_TEXT, THINK_START_TEXT, TokenKind, Tokenizer,
    USER_TEXT, infer_token_kinds, official_pre_tokenizer, token_index, vocab_from_gguf_metadata,
};
