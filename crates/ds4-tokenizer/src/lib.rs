//! ds4-tokenizer: the DeepSeek V4 tokenizer (HF `tokenizers` BPE with the official pre-tokenizer),
//! ds4's chat-template rendering (server, CLI, completion and REPL forms) and DSML tool calls
//! (canonical rendering, one-shot parsing and a streaming parser).
//!
//! * [`Tokenizer`] — construction from a token table ([`Tokenizer::from_vocab`]), a HF
//!   `tokenizer.json` ([`Tokenizer::from_tokenizer_json`]) or GGUF metadata
//!   ([`Tokenizer::from_gguf`]); [`Tokenizer::encode`] (HF semantics: every added token in the
//!   text is recognised), [`Tokenizer::encode_plain`] (none), [`Tokenizer::encode_ds4_chat`] (the
//!   seven ds4 specials only, like `ds4_tokenize_rendered_chat`); [`Tokenizer::decode`] (bytes,
//!   ds4's `ds4_token_text` rule); [`Tokenizer::gguf_vocab_metadata`] for writing a vocab GGUF.
//! * [`chat`] — [`render_chat`] (server prompt), [`render_chat_tail`] (live tool-result
//!   continuation), [`render_completion_prompt`], [`render_cli_prompt`] / [`encode_cli_prompt`],
//!   and the REPL transcript functions ([`chat_append_message`] …).
//! * [`dsml`] — [`render_tool_calls`] (canonical DSML) and [`parse_generated`] (final parse of a
//!   generation: reasoning, content, tool calls, raw block for replay, failure outcomes).
//! * [`stream`] — [`StreamParser`]: the same parse as a stream of [`StreamEvent`]s from byte
//!   chunks, never emitting a partial marker, entity or UTF-8 character.

pub mod bytelevel;
pub mod chat;
pub mod dsml;
mod error;
pub mod json;
pub mod stream;
mod tokenizer;

pub use chat::{
    DEFAULT_SYSTEM_PROMPT, Message, Role, THINK_MAX_PREFIX, ThinkMode, ToolCall, ToolSchemas,
    chat_append_assistant_prefix, chat_append_max_prefix, chat_append_message, chat_begin,
    chat_message_text, encode_cli_prompt, render_chat, render_chat_tail, render_cli_prompt,
    render_completion_prompt,
};
pub use dsml::{ParseOptions, ParseOutcome, ParsedMessage, parse_generated, render_tool_calls};
pub use error::{Result, TokenizerError};
pub use stream::{StreamEvent, StreamParser};
pub use tokenizer::{
    ACCEPTED_GGUF_PRE, ASSISTANT_TEXT, BOS_TEXT, DS4_SPECIAL_TEXTS, DSML_TEXT, EOS_TEXT, GgufVocab,
    PRE_TOKENIZER_REGEXES, SpecialTokens, THINK_END_TEXT, THINK_START_TEXT, TokenKind, Tokenizer,
    USER_TEXT, infer_token_kinds, official_pre_tokenizer, token_index, vocab_from_gguf_metadata,
};
