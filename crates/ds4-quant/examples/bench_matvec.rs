//! Single-thread matvec time (minimum of 20 runs): `cargo run --release --example bench_matvec`
//! (set DS4_QUANT_SCALAR=1 for the scalar kernels).

use std::time::Instant;

use ds4_quant::{GgmlType, QMatrix, quantize, simd_level};

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let (cols, rows) = (4096usize, 1024usize);
    let mut s = 1u64;
    let w: Vec<f32> = (0..cols * rows)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    let x: Vec<f32> = w[..cols].iter().map(|v| v * 10.0).collect();
    println!("kernels: {}", simd_level());
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q2_K,
        GgmlType::IQ2_XXS,
    ] {
        let data = quantize(ty, &w, cols, None).expect("quantize");
        let m = QMatrix::new(ty, cols, rows, &data).expect("matrix");
        let mut y = vec![0.0f32; rows];
        let iters = 40;
        let t = pool.install(|| {
            m.matvec(&x, &mut y).expect("matvec");
            // Minimum over iterations: robust against a busy machine.
            (0..iters)
                .map(|_| {
                    let t0 = Instant::now();
                    m.matvec(&x, &mut y).expect("matvec");
                    t0.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        });
        println!(
            "{:8} {cols}x{rows}: {:8.3} ms  {:6.2} GB/s  {:6.2} Gelem/s",
            ty.name(),
            t * 1e3,
            data.len() as f64 / t / 1e9,
            (cols * rows) as f64 / t / 1e9
        );
    }
}
