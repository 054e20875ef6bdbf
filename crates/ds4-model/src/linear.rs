//! Thin adapter from bound weights ([`MatRef`], [`ExpertsRef`]) to `ds4_quant::QMatrix`, which
//! implements ds4's matrix-vector numerics per weight type (F32 → f64 accumulation, F16/BF16 →
//! f32 accumulation, Q8_0 → int8 activations per 32, K-quants/IQ2_XXS → Q8_K activations).
//! `QMatrix::matmul` gives exactly the numbers of per-token `matvec` calls, so prefill in one
//! chunk, in several chunks and token by token agree bit for bit.

use ds4_gguf::{GgmlType, Gguf};
use ds4_quant::QMatrix;

use crate::error::{ModelError, Result};
use crate::weights::{ExpertsRef, MatRef};

fn qerr(what: &str, e: ds4_quant::QuantError) -> ModelError {
    ModelError::Backend {
        backend: "cpu".into(),
        reason: format!("{what}: {e}"),
    }
}

/// The `QMatrix` view of a bound matrix.
pub fn qmat<'a>(g: &'a Gguf, m: &MatRef) -> Result<QMatrix<'a>> {
    QMatrix::new(m.t.ty, m.cols, m.rows, m.bytes(g)).map_err(|e| qerr(&m.t.name, e))
}

/// The `QMatrix` view of expert `e` of a stacked expert tensor.
pub fn qexpert<'a>(g: &'a Gguf, m: &ExpertsRef, e: usize) -> Result<QMatrix<'a>> {
    QMatrix::new(m.t.ty, m.cols, m.rows, m.expert(g, e)).map_err(|err| qerr(&m.t.name, err))
}

/// `y = W·x`.
pub fn matvec(g: &Gguf, m: &MatRef, x: &[f32], y: &mut [f32]) -> Result<()> {
    qmat(g, m)?.matvec(x, y).map_err(|e| qerr(&m.t.name, e))
}

/// `ys[t] = W·xs[t]` for `n` tokens (`xs` `[n][cols]`, `ys` `[n][rows]`).
pub fn matmul(g: &Gguf, m: &MatRef, xs: &[f32], n: usize, ys: &mut [f32]) -> Result<()> {
    let q = qmat(g, m)?;
    if n == 1 {
        q.matvec(xs, ys)
    } else {
        q.matmul(xs, n, ys)
    }
    .map_err(|e| qerr(&m.t.name, e))
}

/// Whether the CPU kernels can multiply with a matrix of this type.
pub fn supported(ty: GgmlType) -> bool {
    ds4_quant::matrix::MATRIX_TYPES.contains(&ty)
}

/// Dequantize `n` values of type `ty` (whole data).
pub fn dequantize_all(
    ty: GgmlType,
    data: &[u8],
    n: usize,
) -> std::result::Result<Vec<f32>, String> {
    let mut out = vec![0.0f32; n];
    ds4_quant::dequantize(ty, data, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Dequantize row `r` of a matrix into `out` (`cols` values).
pub fn dequantize_row(g: &Gguf, m: &MatRef, r: usize, out: &mut [f32]) -> Result<()> {
    let rb = m.row_bytes();
    let data = m
        .bytes(g)
        .get(r * rb..(r + 1) * rb)
        .ok_or_else(|| ModelError::BadTensor {
            name: m.t.name.clone(),
            reason: format!("row {r} is outside the matrix ({} rows)", m.rows),
        })?;
    ds4_quant::dequantize(m.t.ty, data, out).map_err(|e| qerr(&m.t.name, e))
}
