//! ds4-quant: GGML block formats used by DeepSeek V4 Flash GGUFs, with ds4's CPU numerics.
//!
//! * [`blocks`]: `#[repr(C)]` block structs and safe views of (possibly unaligned) tensor bytes.
//! * [`dequantize`] / [`quantize`]: f32 ↔ F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS (and Q8_K).
//! * [`quantize_q8_0_act`], [`quantize_q8_k`]: ds4's activation quantization.
//! * [`dot`]: dot products (scalar oracle + AVX2/FMA/F16C kernels chosen at run time).
//! * [`QMatrix`]: matrix-vector products with ds4's activation handling per weight type.
//!
//! See the crate README for numerics and measured error bounds.

#[cfg(target_endian = "big")]
compile_error!("ds4-quant assumes a little-endian target (GGUF data is little-endian)");

pub mod act;
pub mod blocks;
pub mod dequant;
pub mod dot;
pub mod fp;
pub mod matrix;
pub mod quant;
pub mod tables;

pub use ds4_gguf::GgmlType;

pub use act::{quantize_q8_0_act, quantize_q8_k};
pub use blocks::{
    Block, BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8_0Act, BlockQ8K, QK_K, QK8_0,
    blocks_as_bytes, blocks_from_bytes,
};
pub use dequant::{dequantize, dequantize_to_vec};
pub use dot::{
    simd_level, vec_dot_bf16_f32, vec_dot_f16_f32, vec_dot_f32, vec_dot_iq2_xxs_q8_k,
    vec_dot_q2_k_q8_k, vec_dot_q4_k_q8_k, vec_dot_q8_0,
};
pub use fp::{bf16_to_f32, f16_round, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use matrix::{Activation, QMatrix, prepare};
pub use quant::{importance_from_rows, quantize};

/// Errors of this crate. Nothing here panics on malformed data; sizes and types are checked.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum QuantError {
    #[error("{op} is not supported for tensor type {ty}")]
    Unsupported { op: &'static str, ty: GgmlType },
    #[error("{what}: byte length {len} is not a multiple of {unit}")]
    BadByteLength {
        what: &'static str,
        len: usize,
        unit: usize,
    },
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{ty}: row length {ne0} is not a multiple of the block size {block}")]
    BadRowLength {
        ty: GgmlType,
        ne0: usize,
        block: usize,
    },
    #[error("{what}: size overflows usize")]
    Overflow { what: &'static str },
    #[error("{what}: non-finite value {value} at index {index}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },
    #[error("a {kind} activation cannot be used with {ty} weights")]
    ActivationMismatch { ty: GgmlType, kind: &'static str },
    #[error("row range {r0}..{r0}+{n} is outside a matrix of {rows} rows")]
    RowRange { r0: usize, n: usize, rows: usize },
}
