//! [`QMatrix`]: a borrowed weight matrix (GGUF layout: `cols` = ne0 inputs fastest, `rows` =
//! outputs) with ds4's matrix-vector numerics per weight type.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::act::{quantize_q8_0_act_vec, quantize_q8_k_vec};
use crate::blocks::{Block, BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8_0Act, BlockQ8K};
use crate::dequant::dequantize;
use crate::dot::{Kernels, kernels};
use crate::{GgmlType, QuantError};

/// Weight types a [`QMatrix`] supports.
pub const MATRIX_TYPES: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];

/// Work (rows·cols, times tokens for matmul) from which row loops run on the rayon pool.
pub const PAR_THRESHOLD: usize = 1 << 16;

/// A prepared activation vector that several matrices with the same input can share.
#[derive(Clone, Debug, PartialEq)]
pub enum Activation {
    /// For F32/F16/BF16 weights.
    F32(Vec<f32>),
    /// ds4 Q8_0 activation blocks (float scale), for Q8_0 weights.
    Q8_0(Vec<BlockQ8_0Act>),
    /// Q8_K blocks, for Q2_K / Q4_K / IQ2_XXS weights.
    Q8K(Vec<BlockQ8K>),
}

impl Activation {
    /// Prepare `x` for weights of type `ty` (see [`QMatrix::matvec`]). Types without a quantized
    /// activation (and unsupported ones) get `F32`. Never fails: partial blocks are zero-padded.
    pub fn prepare(ty: GgmlType, x: &[f32]) -> Activation {
        match ty {
            GgmlType::Q8_0 => Activation::Q8_0(quantize_q8_0_act_vec(x)),
            GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
                Activation::Q8K(quantize_q8_k_vec(x))
            }
            _ => Activation::F32(x.to_vec()),
        }
    }

    /// Number of activation values covered (block-padded for the quantized kinds).
    pub fn len(&self) -> usize {
        match self {
            Activation::F32(v) => v.len(),
            Activation::Q8_0(v) => v.len() * BlockQ8_0Act::ELEMS,
            Activation::Q8K(v) => v.len() * BlockQ8K::ELEMS,
        }
    }

    /// True when no values are covered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn kind(&self) -> &'static str {
        match self {
            Activation::F32(_) => "F32",
            Activation::Q8_0(_) => "Q8_0",
            Activation::Q8K(_) => "Q8_K",
        }
    }
}

/// [`Activation::prepare`].
pub fn prepare(ty: GgmlType, x: &[f32]) -> Activation {
    Activation::prepare(ty, x)
}

/// A borrowed weight matrix: `rows` rows of `cols` elements of type `ty`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    ty: GgmlType,
    cols: usize,
    rows: usize,
    data: &'a [u8],
}

fn cast_row<B: bytemuck::Pod>(row: &[u8]) -> Cow<'_, [B]> {
    match bytemuck::try_cast_slice::<u8, B>(row) {
        Ok(s) => Cow::Borrowed(s),
        // Misaligned (lengths are validated by QMatrix::new): copy.
        Err(_) => Cow::Owned(crate::blocks::copy_to_aligned::<B>(row)),
    }
}

/// One row's dot product with one prepared activation (already type-checked).
#[inline]
fn row_dot(k: &Kernels, ty: GgmlType, row: &[u8], a: &Activation) -> f32 {
    match (ty, a) {
        (GgmlType::Q8_0, Activation::Q8_0(x)) => (k.q8_0)(&cast_row::<BlockQ8_0>(row), x),
        (GgmlType::Q2_K, Activation::Q8K(x)) => (k.q2_k)(&cast_row::<BlockQ2K>(row), x),
        (GgmlType::Q4_K, Activation::Q8K(x)) => (k.q4_k)(&cast_row::<BlockQ4K>(row), x),
        (GgmlType::IQ2_XXS, Activation::Q8K(x)) => (k.iq2_xxs)(&cast_row::<BlockIq2Xxs>(row), x),
        (GgmlType::F16, Activation::F32(x)) => (k.f16)(&cast_row::<u16>(row), x),
        (GgmlType::BF16, Activation::F32(x)) => (k.bf16)(&cast_row::<u16>(row), x),
        (GgmlType::F32, Activation::F32(x)) => (k.f32)(&cast_row::<f32>(row), x),
        // Excluded by check_activation.
        _ => f32::NAN,
    }
}

impl<'a> QMatrix<'a> {
    /// A matrix over `data`, which must be exactly `rows` rows of `cols` elements of `ty`
    /// (`cols` a multiple of the block size). Supported types: [`MATRIX_TYPES`].
    pub fn new(ty: GgmlType, cols: usize, rows: usize, data: &'a [u8]) -> Result<Self, QuantError> {
        if !MATRIX_TYPES.contains(&ty) {
            return Err(QuantError::Unsupported { op: "QMatrix", ty });
        }
        let bs = ty.block_size();
        if !cols.is_multiple_of(bs) {
            return Err(QuantError::BadRowLength {
                ty,
                ne0: cols,
                block: bs,
            });
        }
        let row_bytes = cols / bs * ty.block_bytes();
        let total = row_bytes
            .checked_mul(rows)
            .ok_or(QuantError::Overflow { what: "QMatrix" })?;
        if data.len() != total {
            return Err(QuantError::LengthMismatch {
                what: "QMatrix data bytes",
                expected: total,
                got: data.len(),
            });
        }
        Ok(QMatrix {
            ty,
            cols,
            rows,
            data,
        })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Inputs per row (GGUF ne0).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Outputs (number of rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.block_bytes()
    }

    /// The whole data slice.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The bytes of row `r`.
    ///
    /// # Panics
    /// If `r >= rows`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert!(r < self.rows, "row {r} out of range ({} rows)", self.rows);
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Rows `r0..r0+n` as a matrix (e.g. expert `e` of a stacked `[cols, rows, n_expert]`
    /// tensor is `sub_rows(e * rows, rows)`).
    pub fn sub_rows(&self, r0: usize, n: usize) -> Result<QMatrix<'a>, QuantError> {
        let end = r0.checked_add(n);
        if end.is_none_or(|e| e > self.rows) {
            return Err(QuantError::RowRange {
                r0,
                n,
                rows: self.rows,
            });
        }
        let rb = self.row_bytes();
        Ok(QMatrix {
            ty: self.ty,
            cols: self.cols,
            rows: n,
            data: &self.data[r0 * rb..(r0 + n) * rb],
        })
    }

    /// Dequantize row `r` into `out` (`out.len() == cols`).
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        let row = self.row(r);
        // Sizes and type were validated in `new`.
        if let Err(e) = dequantize(self.ty, row, out) {
            unreachable!("validated QMatrix failed to dequantize: {e}");
        }
    }

    /// The whole matrix as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row(r, o);
            }
        }
        out
    }

    fn check_activation(&self, a: &Activation) -> Result<(), QuantError> {
        let ok = matches!(
            (self.ty, a),
            (GgmlType::Q8_0, Activation::Q8_0(_))
                | (
                    GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS,
                    Activation::Q8K(_)
                )
                | (
                    GgmlType::F16 | GgmlType::BF16 | GgmlType::F32,
                    Activation::F32(_)
                )
        );
        if !ok {
            return Err(QuantError::ActivationMismatch {
                ty: self.ty,
                kind: a.kind(),
            });
        }
        if a.len() != self.cols {
            return Err(QuantError::LengthMismatch {
                what: "activation length (matrix cols)",
                expected: self.cols,
                got: a.len(),
            });
        }
        Ok(())
    }

    /// `y = W·x` with ds4's activation handling for this weight type: Q8_0 weights → `x`
    /// quantized with [`crate::quantize_q8_0_act`]; Q2_K/Q4_K/IQ2_XXS → `x` quantized to Q8_K;
    /// every type accumulates in f64 (see [`crate::dot`]). Rows run in parallel (rayon) when
    /// `rows·cols ≥` [`PAR_THRESHOLD`]; results do not depend on the thread count.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<(), QuantError> {
        if x.len() != self.cols {
            return Err(QuantError::LengthMismatch {
                what: "matvec input (matrix cols)",
                expected: self.cols,
                got: x.len(),
            });
        }
        if y.len() != self.rows {
            return Err(QuantError::LengthMismatch {
                what: "matvec output (matrix rows)",
                expected: self.rows,
                got: y.len(),
            });
        }
        match self.ty {
            // No copy of x for float weights.
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                self.run_rows(y, |k, row| match self.ty {
                    GgmlType::F16 => (k.f16)(&cast_row::<u16>(row), x),
                    GgmlType::BF16 => (k.bf16)(&cast_row::<u16>(row), x),
                    _ => (k.f32)(&cast_row::<f32>(row), x),
                });
                Ok(())
            }
            _ => self.matvec_prepared(&Activation::prepare(self.ty, x), y),
        }
    }

    /// `y = W·a` for an activation prepared with [`Activation::prepare`]`(self.ty(), x)`.
    pub fn matvec_prepared(&self, a: &Activation, y: &mut [f32]) -> Result<(), QuantError> {
        self.check_activation(a)?;
        if y.len() != self.rows {
            return Err(QuantError::LengthMismatch {
                what: "matvec output (matrix rows)",
                expected: self.rows,
                got: y.len(),
            });
        }
        let ty = self.ty;
        self.run_rows(y, |k, row| row_dot(k, ty, row, a));
        Ok(())
    }

    fn run_rows(&self, y: &mut [f32], f: impl Fn(&Kernels, &[u8]) -> f32 + Sync) {
        let k = kernels();
        let rb = self.row_bytes();
        if rb == 0 {
            y.fill(0.0);
            return;
        }
        let rows = self.data.chunks_exact(rb);
        if self.rows.saturating_mul(self.cols) >= PAR_THRESHOLD {
            y.par_iter_mut()
                .zip(self.data.par_chunks_exact(rb))
                .with_min_len(4)
                .for_each(|(yo, row)| *yo = f(k, row));
        } else {
            for (yo, row) in y.iter_mut().zip(rows) {
                *yo = f(k, row);
            }
        }
    }

    /// `ys[t] = W·xs[t]` for `n` tokens: `xs` is `[n][cols]`, `ys` is `[n][rows]`. Each weight
    /// row is read once and used for every token; rows run in parallel. Gives exactly the same
    /// numbers as `n` calls of [`QMatrix::matvec`].
    pub fn matmul(&self, xs: &[f32], n: usize, ys: &mut [f32]) -> Result<(), QuantError> {
        let in_len = n
            .checked_mul(self.cols)
            .ok_or(QuantError::Overflow { what: "matmul" })?;
        let out_len = n
            .checked_mul(self.rows)
            .ok_or(QuantError::Overflow { what: "matmul" })?;
        if xs.len() != in_len {
            return Err(QuantError::LengthMismatch {
                what: "matmul input (n·cols)",
                expected: in_len,
                got: xs.len(),
            });
        }
        if ys.len() != out_len {
            return Err(QuantError::LengthMismatch {
                what: "matmul output (n·rows)",
                expected: out_len,
                got: ys.len(),
            });
        }
        if n == 0 || self.rows == 0 {
            return Ok(());
        }
        if self.cols == 0 {
            ys.fill(0.0);
            return Ok(());
        }
        let acts: Vec<Activation> = if n * self.cols >= PAR_THRESHOLD {
            xs.par_chunks_exact(self.cols)
                .map(|x| Activation::prepare(self.ty, x))
                .collect()
        } else {
            xs.chunks_exact(self.cols)
                .map(|x| Activation::prepare(self.ty, x))
                .collect()
        };
        self.matmul_prepared(&acts, ys)
    }

    /// [`QMatrix::matmul`] with activations already prepared (one per token); `ys` is
    /// `[acts.len()][rows]`.
    pub fn matmul_prepared(&self, acts: &[Activation], ys: &mut [f32]) -> Result<(), QuantError> {
        let n = acts.len();
        if ys.len() != n * self.rows {
            return Err(QuantError::LengthMismatch {
                what: "matmul output (n·rows)",
                expected: n * self.rows,
                got: ys.len(),
            });
        }
        for a in acts {
            self.check_activation(a)?;
        }
        if n == 0 || self.rows == 0 {
            return Ok(());
        }
        let rb = self.row_bytes();
        if rb == 0 {
            ys.fill(0.0);
            return Ok(());
        }
        let k = kernels();
        let ty = self.ty;
        // Row-major staging buffer [rows][n], then transposed into ys [n][rows].
        let mut tmp = vec![0.0f32; self.rows * n];
        let work = |(out, row): (&mut [f32], &[u8])| match ty {
            GgmlType::Q8_0 => {
                let w = cast_row::<BlockQ8_0>(row);
                for (o, a) in out.iter_mut().zip(acts) {
                    *o = match a {
                        Activation::Q8_0(x) => (k.q8_0)(&w, x),
                        _ => f32::NAN,
                    };
                }
            }
            GgmlType::Q2_K => {
                let w = cast_row::<BlockQ2K>(row);
                for (o, a) in out.iter_mut().zip(acts) {
                    *o = match a {
                        Activation::Q8K(x) => (k.q2_k)(&w, x),
                        _ => f32::NAN,
                    };
                }
            }
            GgmlType::Q4_K => {
                let w = cast_row::<BlockQ4K>(row);
                for (o, a) in out.iter_mut().zip(acts) {
                    *o = match a {
                        Activation::Q8K(x) => (k.q4_k)(&w, x),
                        _ => f32::NAN,
                    };
                }
            }
            GgmlType::IQ2_XXS => {
                let w = cast_row::<BlockIq2Xxs>(row);
                for (o, a) in out.iter_mut().zip(acts) {
                    *o = match a {
                        Activation::Q8K(x) => (k.iq2_xxs)(&w, x),
                        _ => f32::NAN,
                    };
                }
            }
            _ => {
                for (o, a) in out.iter_mut().zip(acts) {
                    *o = row_dot(k, ty, row, a);
                }
            }
        };
        if self.rows.saturating_mul(self.cols).saturating_mul(n) >= PAR_THRESHOLD {
            tmp.par_chunks_mut(n)
                .zip(self.data.par_chunks_exact(rb))
                .for_each(work);
        } else {
            tmp.chunks_mut(n)
                .zip(self.data.chunks_exact(rb))
                .for_each(work);
        }
        for (r, trow) in tmp.chunks_exact(n).enumerate() {
            for (t, &v) in trow.iter().enumerate() {
                ys[t * self.rows + r] = v;
            }
        }
        Ok(())
    }
}
