//! QMatrix: matvec/matmul numerics, determinism, sub-views, alignment and argument checks.

mod common;

use common::{Rng, same_f32};
use ds4_quant::{Activation, GgmlType, QMatrix, QuantError, prepare, quantize};

const TYPES: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];

fn weights(ty: GgmlType, cols: usize, rows: usize, seed: u64) -> Vec<u8> {
    let w = Rng::new(seed).normals(cols * rows, 0.05);
    quantize(ty, &w, cols, None).unwrap()
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_f32(*x, *y))
}

/// matvec = per-row kernel dot with the prepared activation, and close to the f64 product of
/// the dequantized matrix with the dequantized activation.
#[test]
fn matvec_matches_row_dots_and_dequantized_reference() {
    let (cols, rows) = (512, 24);
    for ty in TYPES {
        let data = weights(ty, cols, rows, 1);
        let m = QMatrix::new(ty, cols, rows, &data).unwrap();
        let x = Rng::new(2).normals(cols, 1.0);
        let mut y = vec![0.0; rows];
        m.matvec(&x, &mut y).unwrap();
        let a = prepare(ty, &x);
        let mut y2 = vec![0.0; rows];
        m.matvec_prepared(&a, &mut y2).unwrap();
        assert!(bits_eq(&y, &y2), "{ty}: matvec vs matvec_prepared");
        // Reference: the activation as the kernels see it.
        let xs: Vec<f64> = match &a {
            Activation::F32(v) => v.iter().map(|&v| v as f64).collect(),
            Activation::Q8_0(b) => b
                .iter()
                .flat_map(|b| b.qs.iter().map(move |&q| b.d as f64 * q as f64))
                .collect(),
            Activation::Q8K(b) => b
                .iter()
                .flat_map(|b| b.qs.iter().map(move |&q| b.d as f64 * q as f64))
                .collect(),
        };
        let mut row = vec![0.0f32; cols];
        for (r, &yr) in y.iter().enumerate() {
            m.dequantize_row(r, &mut row);
            let want: f64 = row.iter().zip(&xs).map(|(w, x)| *w as f64 * x).sum();
            let scale: f64 = row
                .iter()
                .zip(&xs)
                .map(|(w, x)| (*w as f64 * x).abs())
                .sum();
            // Same bound as tests/dot.rs (rounding of the f32 block combination).
            assert!(
                (yr as f64 - want).abs() <= 1e-5 * scale,
                "{ty} row {r}: {yr} vs {want}"
            );
        }
    }
}

/// matmul over n tokens gives exactly the numbers of n matvec calls, for small (serial) and
/// large (parallel) shapes.
#[test]
fn matmul_equals_repeated_matvec() {
    for (cols, rows, n) in [(256, 8, 3), (1024, 96, 5)] {
        for ty in TYPES {
            let data = weights(ty, cols, rows, 3);
            let m = QMatrix::new(ty, cols, rows, &data).unwrap();
            let xs = Rng::new(4).normals(cols * n, 0.7);
            let mut ys = vec![0.0; rows * n];
            m.matmul(&xs, n, &mut ys).unwrap();
            for t in 0..n {
                let mut y = vec![0.0; rows];
                m.matvec(&xs[t * cols..(t + 1) * cols], &mut y).unwrap();
                assert!(
                    bits_eq(&y, &ys[t * rows..(t + 1) * rows]),
                    "{ty} {cols}x{rows} token {t}"
                );
            }
        }
    }
}

/// Results do not depend on the rayon thread count (rows ≥ threshold run in parallel).
#[test]
fn results_independent_of_thread_count() {
    let (cols, rows, n) = (2048, 64, 3);
    for ty in [GgmlType::Q8_0, GgmlType::IQ2_XXS, GgmlType::F16] {
        let data = weights(ty, cols, rows, 5);
        let m = QMatrix::new(ty, cols, rows, &data).unwrap();
        let xs = Rng::new(6).normals(cols * n, 1.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![0.0; rows];
                m.matvec(&xs[..cols], &mut y).unwrap();
                let mut ys = vec![0.0; rows * n];
                m.matmul(&xs, n, &mut ys).unwrap();
                (y, ys)
            })
        };
        let (a1, b1) = run(1);
        let (a3, b3) = run(3);
        assert!(bits_eq(&a1, &a3) && bits_eq(&b1, &b3), "{ty}");
    }
}

/// Expert slices of a stacked tensor and misaligned data give the same numbers.
#[test]
fn sub_rows_and_misaligned_data() {
    let (cols, rows, experts) = (256, 16, 4);
    for ty in TYPES {
        let data = weights(ty, cols, rows * experts, 7);
        let all = QMatrix::new(ty, cols, rows * experts, &data).unwrap();
        let x = Rng::new(8).normals(cols, 1.0);
        let mut y_all = vec![0.0; rows * experts];
        all.matvec(&x, &mut y_all).unwrap();
        for e in 0..experts {
            let m = all.sub_rows(e * rows, rows).unwrap();
            assert_eq!(m.rows(), rows);
            assert_eq!(m.row(0), all.row(e * rows));
            let mut y = vec![0.0; rows];
            m.matvec(&x, &mut y).unwrap();
            assert!(
                bits_eq(&y, &y_all[e * rows..(e + 1) * rows]),
                "{ty} expert {e}"
            );
        }
        assert!(all.sub_rows(rows * experts - 1, 2).is_err());
        assert!(all.sub_rows(usize::MAX, 2).is_err());
        assert_eq!(all.sub_rows(rows * experts, 0).unwrap().rows(), 0);
        // Misaligned copy of the bytes.
        let mut shifted = vec![0u8; data.len() + 1];
        shifted[1..].copy_from_slice(&data);
        let mis = QMatrix::new(ty, cols, rows * experts, &shifted[1..]).unwrap();
        let mut y_mis = vec![0.0; rows * experts];
        mis.matvec(&x, &mut y_mis).unwrap();
        assert!(bits_eq(&y_mis, &y_all), "{ty} misaligned");
        let mut ys = vec![0.0; rows * experts * 2];
        let xs = [x.clone(), x.clone()].concat();
        mis.matmul(&xs, 2, &mut ys).unwrap();
        assert!(
            bits_eq(&ys[..rows * experts], &y_all),
            "{ty} misaligned matmul"
        );
    }
}

#[test]
fn argument_errors() {
    let data = weights(GgmlType::Q8_0, 64, 2, 9);
    assert!(matches!(
        QMatrix::new(GgmlType::Q8_0, 64, 3, &data),
        Err(QuantError::LengthMismatch { .. })
    ));
    assert!(matches!(
        QMatrix::new(GgmlType::Q8_0, 48, 2, &data),
        Err(QuantError::BadRowLength { .. })
    ));
    assert!(matches!(
        QMatrix::new(GgmlType::Q5_K, 256, 1, &[0u8; 176]),
        Err(QuantError::Unsupported { .. })
    ));
    assert!(QMatrix::new(GgmlType::Q8_0, 64, usize::MAX, &data).is_err());
    let m = QMatrix::new(GgmlType::Q8_0, 64, 2, &data).unwrap();
    assert_eq!(
        (m.ty(), m.cols(), m.rows(), m.row_bytes()),
        (GgmlType::Q8_0, 64, 2, 68)
    );
    let mut y = vec![0.0; 2];
    assert!(m.matvec(&[0.0; 63], &mut y).is_err());
    assert!(m.matvec(&[0.0; 64], &mut y[..1]).is_err());
    // Wrong activation kind / length.
    assert!(matches!(
        m.matvec_prepared(&prepare(GgmlType::Q4_K, &[0.0; 256]), &mut y),
        Err(QuantError::ActivationMismatch { .. })
    ));
    assert!(
        m.matvec_prepared(&prepare(GgmlType::Q8_0, &[0.0; 96]), &mut y)
            .is_err()
    );
    let mut ys = vec![0.0; 4];
    assert!(m.matmul(&[0.0; 64], 2, &mut ys).is_err());
    assert!(m.matmul(&[0.0; 128], 2, &mut ys[..3]).is_err());
    m.matmul(&[], 0, &mut []).unwrap();
    // Empty matrix.
    let e = QMatrix::new(GgmlType::F16, 0, 3, &[]).unwrap();
    let mut y3 = vec![1.0; 3];
    e.matvec(&[], &mut y3).unwrap();
    assert_eq!(y3, vec![0.0; 3]);
}

#[test]
fn to_f32_and_dequantize_row() {
    let (cols, rows) = (256, 3);
    let w = Rng::new(10).normals(cols * rows, 1.0);
    let data = quantize(GgmlType::F32, &w, cols, None).unwrap();
    let m = QMatrix::new(GgmlType::F32, cols, rows, &data).unwrap();
    assert_eq!(m.to_f32(), w);
}
