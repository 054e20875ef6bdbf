//! GGUF v3 reading and writing over memory maps, with no model knowledge.

mod types;

pub use types::GgmlType;
