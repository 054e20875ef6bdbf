//! GGUF v3 reading and writing, with no model knowledge.
//!
//! * [`Gguf`] memory-maps a file (or wraps bytes), parses and validates the header, and hands out
//!   zero-copy views of tensor data.
//! * [`GgufBuilder`] fixes a header, then [`GgufDataWriter`] streams the tensor data in order.
//!
//! Malformed input of any kind yields a [`GgufError`] naming the offset and the key or tensor;
//! counts and lengths from the file are bounded by the bytes that remain before allocating.

mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::{GgufError, Result};
pub use reader::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, Gguf, GgufHeader, MAX_ARRAY_DEPTH,
    MAX_DIMS, TensorInfo, parse_header,
};
pub use types::GgmlType;
pub use value::{MetaType, MetaValue};
pub use writer::{GgufBuilder, GgufDataWriter};
