//! `ds4 convert`: official DeepSeek V4 checkpoint (FP8 / FP4 safetensors) → GGUF in ds4's layout.
//!
//! * [`convert_checkpoint`] validates a checkpoint folder against its `config.json` and writes a
//!   GGUF with one of the [`Recipe`]s, streaming tensor by tensor.
//! * [`shape_from_official_config`] builds the model [`ds4_model::Shape`] from `config.json`.
//! * [`official_to_gguf`] / [`gguf_to_official`] / [`plan_tensors`] are the name mapping and the
//!   GGUF tensor inventory (model-spec §2.3).
//! * [`formats`] decodes the official storage formats (FP8 E4M3 + E8M0 128×128 blocks, packed FP4
//!   E2M1 + E8M0 1×32 blocks, BF16/F16/F32).
//! * [`convert_vocab_only`] writes a tokenizer-only GGUF.
//! * [`synth_gguf`] writes a deterministic synthetic GGUF of any shape (Flash by default) with
//!   ds4's exact tensor inventory and random, well-scaled values (`ds4 synth`).

pub mod builtin;
pub mod checkpoint;
pub mod config;
mod convert;
mod encode;
pub mod error;
pub mod formats;
pub mod imatrix;
pub mod names;
pub mod recipe;
pub mod synth;
pub mod tokenizer_meta;

pub use config::{mtp_layer_count, shape_from_official_config};
pub use convert::{
    CheckpointSummary, ConvertOptions, ConvertProgress, ConvertReport, OutputTensor, RECIPE_KEY,
    convert_checkpoint, convert_vocab_only, inspect_checkpoint,
};
pub use error::{ConvertError, Result};
pub use names::{
    GgufTarget, PlannedTensor, Source, TensorClass, gguf_to_official, official_to_gguf,
    plan_tensors,
};
pub use recipe::Recipe;
pub use synth::{SynthOptions, SynthReport, synth_gguf, synth_vocab_metadata};
