//! Typed errors. Every parse error names the byte offset (and key or tensor where known).

use crate::value::MetaType;

/// Errors from reading or writing GGUF files.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error while writing: {0}")]
    Write(#[from] std::io::Error),
    #[error("not a GGUF file: magic at offset 0 is {found:#010x}, expected 0x46554747 (\"GGUF\")")]
    BadMagic { found: u32 },
    #[error("unsupported GGUF version {found} at offset 4 (only version 3 is supported)")]
    UnsupportedVersion { found: u32 },
    #[error("truncated file: {what} at offset {offset} needs {need} bytes, {have} remain")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        have: u64,
    },
    #[error(
        "{what} count {count} at offset {offset} cannot fit in the {remaining} bytes that remain"
    )]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
        remaining: u64,
    },
    #[error("string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: u64 },
    #[error("metadata key {key:?} at offset {offset}: unknown value type {type_id}")]
    UnknownValueType {
        key: String,
        offset: u64,
        type_id: u32,
    },
    #[error("metadata key {key:?}: arrays nested deeper than {max} levels")]
    ArrayTooDeep { key: String, max: usize },
    #[error("duplicate metadata key {key:?} at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongKeyType {
        key: String,
        expected: String,
        found: MetaType,
    },
    #[error("metadata key {key:?} has invalid value: {reason}")]
    BadKeyValue { key: String, reason: String },
    #[error("tensor {name:?} at offset {offset}: {ndim} dimensions (must be 1..=8)")]
    BadDimCount {
        name: String,
        offset: u64,
        ndim: u32,
    },
    #[error("tensor {name:?} at offset {offset}: unknown tensor type id {type_id}")]
    UnknownTensorType {
        name: String,
        offset: u64,
        type_id: u32,
    },
    #[error(
        "tensor {name:?}: first dimension {ne0} is not a multiple of the {ty} block size {block}"
    )]
    BadBlockShape {
        name: String,
        ne0: u64,
        ty: crate::GgmlType,
        block: usize,
    },
    #[error("tensor {name:?}: size overflows")]
    SizeOverflow { name: String },
    #[error("duplicate tensor name {name:?} at offset {offset}")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("tensor {name:?}: data offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        name: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {name:?}: data [{start}, {end}) lies outside the file ({file_len} bytes)")]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("tensors {a:?} and {b:?} overlap in the data section")]
    TensorsOverlap { a: String, b: String },
    #[error("writer: {0}")]
    Writer(String),
}

/// Result alias.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;
