//! Dot products: SIMD kernels against the scalar oracle (proptest), and every dot product against
//! dequantize + f64 dot.

mod common;

use common::{Rng, within_1ulp};
use ds4_quant::act::{quantize_q8_0_act_vec, quantize_q8_k_vec};
use ds4_quant::dot::{Kernels, SCALAR, avx2_kernels};
use ds4_quant::{
    BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8_0Act, BlockQ8K, GgmlType,
    blocks_from_bytes, dequantize_to_vec, f32_to_bf16, f32_to_f16, quantize,
};
use proptest::prelude::*;

fn simd() -> Option<&'static Kernels> {
    let k = avx2_kernels();
    if k.is_none() {
        eprintln!("skipping: this CPU has no AVX2+FMA+F16C");
    }
    k
}

/// A finite f16 scale of magnitude 2^[-14, 4) with a random sign.
fn f16_scale(rng: &mut Rng) -> u16 {
    let m = (rng.uniform() * 18.0 - 14.0).exp2() as f32;
    f32_to_f16(if rng.next_u64() & 1 == 0 { m } else { -m })
}

/// Random weight blocks: random payload bytes, finite f16 scale fields at `scale_offsets`.
fn random_blocks<B: ds4_quant::Block>(rng: &mut Rng, nb: usize, scale_offsets: &[usize]) -> Vec<B> {
    let mut bytes = rng.bytes(nb * B::BYTES);
    for b in 0..nb {
        for &o in scale_offsets {
            let s = f16_scale(rng).to_le_bytes();
            bytes[b * B::BYTES + o..b * B::BYTES + o + 2].copy_from_slice(&s);
        }
    }
    blocks_from_bytes::<B>(&bytes).unwrap().into_owned()
}

/// Random Q8_K blocks with arbitrary qs (−128 included) and unconstrained bsums.
fn random_q8k(rng: &mut Rng, nb: usize) -> Vec<BlockQ8K> {
    let mut v: Vec<BlockQ8K> = random_blocks(rng, nb, &[]);
    for b in &mut v {
        b.d = rng.normal() * 0.01;
    }
    v
}

fn random_q8_0_act(rng: &mut Rng, nb: usize) -> Vec<BlockQ8_0Act> {
    let mut v: Vec<BlockQ8_0Act> = random_blocks(rng, nb, &[]);
    for b in &mut v {
        b.d = rng.normal() * 0.01;
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Quantized dot products: the AVX2 kernels agree with the scalar oracle on arbitrary block
    /// contents (exact integer sums, identical f64 block terms, f64 sums that differ only in
    /// addition order): bit-identical, or 1 ulp apart in a rare rounding tie.
    #[test]
    fn simd_quantized_dots_equal_oracle(seed in any::<u64>(), nb in 0usize..12) {
        let Some(k) = simd() else { return Ok(()); };
        let mut rng = Rng::new(seed);
        let w: Vec<BlockQ8_0> = random_blocks(&mut rng, nb * 8, &[0]);
        let x = random_q8_0_act(&mut rng, nb * 8);
        let (a, b) = ((k.q8_0)(&w, &x), (SCALAR.q8_0)(&w, &x));
        prop_assert!(within_1ulp(a, b), "q8_0 {} vs {}", a, b);

        let y = random_q8k(&mut rng, nb);
        let w2: Vec<BlockQ2K> = random_blocks(&mut rng, nb, &[80, 82]);
        let (a, b) = ((k.q2_k)(&w2, &y), (SCALAR.q2_k)(&w2, &y));
        prop_assert!(within_1ulp(a, b), "q2_k {} vs {}", a, b);

        let w4: Vec<BlockQ4K> = random_blocks(&mut rng, nb, &[0, 2]);
        let (a, b) = ((k.q4_k)(&w4, &y), (SCALAR.q4_k)(&w4, &y));
        prop_assert!(within_1ulp(a, b), "q4_k {} vs {}", a, b);

        let wi: Vec<BlockIq2Xxs> = random_blocks(&mut rng, nb, &[0]);
        let (a, b) = ((k.iq2_xxs)(&wi, &y), (SCALAR.iq2_xxs)(&wi, &y));
        prop_assert!(within_1ulp(a, b), "iq2_xxs {} vs {}", a, b);
    }

    /// Float dots: AVX2 (4-lane f64 accumulators) vs the sequential oracle (f64). Products are
    /// exact in f64, so both f64 sums are within n·2⁻⁵³·Σ|wᵢxᵢ| of the exact sum and after the
    /// one rounding to f32 they are equal or 1 ulp apart.
    #[test]
    fn simd_float_dots_within_rounding_of_oracle(seed in any::<u64>(), n in 0usize..700) {
        let Some(k) = simd() else { return Ok(()); };
        let mut rng = Rng::new(seed);
        let x = rng.normals(n, 1.0);
        let wf = rng.normals(n, 0.1);
        let wh: Vec<u16> = wf.iter().map(|&v| f32_to_f16(v)).collect();
        let wb: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
        let abs_sum = |w: &[f32]| -> f64 { w.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum() };
        let whf: Vec<f32> = wh.iter().map(|&h| ds4_quant::f16_to_f32(h)).collect();
        let wbf: Vec<f32> = wb.iter().map(|&h| ds4_quant::bf16_to_f32(h)).collect();

        // Near-total cancellation can leave a result below 2^-24·Σ|wᵢxᵢ|, where 1 ulp is tiny
        // but the f64 sums may still differ by n·2⁻⁵³·Σ|wᵢxᵢ|: allow that absolute slack too.
        let close = |a: f32, b: f32, s: f64| within_1ulp(a, b) || ((a - b) as f64).abs() <= 2.0 * n as f64 * 2f64.powi(-53) * s;
        let (a, b) = ((k.f16)(&wh, &x), (SCALAR.f16)(&wh, &x));
        prop_assert!(close(a, b, abs_sum(&whf)), "f16 {} vs {}", a, b);
        let (a, b) = ((k.bf16)(&wb, &x), (SCALAR.bf16)(&wb, &x));
        prop_assert!(close(a, b, abs_sum(&wbf)), "bf16 {} vs {}", a, b);
        let (a, b) = ((k.f32)(&wf, &x), (SCALAR.f32)(&wf, &x));
        prop_assert!(close(a, b, abs_sum(&wf)), "f32 {} vs {}", a, b);
    }

    /// ds4 activation quantizers: per-element reconstruction error ≤ |d|/2 (plus one rounding
    /// of the product), bsums consistent, and the max element maps to ∓127.
    #[test]
    fn activation_quantizers_reconstruct(seed in any::<u64>(), nb in 1usize..6, scale in 1e-6f32..1e3) {
        let mut rng = Rng::new(seed);
        let x = rng.normals(nb * 256, scale);
        let q = quantize_q8_k_vec(&x);
        for (b, xb) in q.iter().zip(x.chunks_exact(256)) {
            for (g, s) in b.bsums.iter().enumerate() {
                prop_assert_eq!(*s as i32, b.qs[16 * g..16 * g + 16].iter().map(|&v| v as i32).sum::<i32>());
            }
            let imax = (0..256).fold(0, |m, i| if xb[i].abs() > xb[m].abs() { i } else { m });
            prop_assert_eq!(b.qs[imax], -127);
            for (i, &v) in xb.iter().enumerate() {
                let r = b.d * b.qs[i] as f32;
                prop_assert!((r - v).abs() <= b.d.abs() * 0.5001, "q8k {} vs {}", r, v);
            }
        }
        let a = quantize_q8_0_act_vec(&x);
        for (b, xb) in a.iter().zip(x.chunks_exact(32)) {
            prop_assert!(b.d >= 0.0);
            for (i, &v) in xb.iter().enumerate() {
                let r = b.d * b.qs[i] as f32;
                prop_assert!((r - v).abs() <= b.d * 0.5001, "q8_0 act {} vs {}", r, v);
            }
        }
    }
}

/// Every kernel set, every dot product against dequantize + f64 dot on realistic data
/// (Gaussian weights quantized by this crate, Gaussian activations quantized as ds4 does).
/// The f32 block combination rounds each block term (≤ 3 roundings) and the running sum, so
/// |dot − ref| ≤ (nb + 3)·2⁻²⁴·Σ|wᵢ·xᵢ| + rounding of the dequantized weights
/// (≤ 3·2⁻²⁴·Σ(|d·sc·q| + |dmin·m|)·|xᵢ|), which is below 1e-5·Σ|wᵢ·xᵢ| for these rows
/// (nb ≤ 128; the dmin term is at most ~4× Σ|wᵢ·xᵢ| for Gaussian blocks).
/// Measured worst ratio |dot − ref| / Σ|wᵢ·xᵢ|: 1.0e-7 (printed by the test).
#[test]
fn dots_match_dequantized_f64_dot() {
    let mut rng = Rng::new(11);
    let mut kernel_sets = vec![&SCALAR];
    kernel_sets.extend(avx2_kernels());
    let n = 4096;
    let mut worst = 0.0f64;
    for trial in 0..8 {
        let wf = rng.normals(n, 0.02);
        let xf = rng.normals(n, 1.0 + trial as f32);
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q2_K,
            GgmlType::Q4_K,
            GgmlType::IQ2_XXS,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::F32,
        ] {
            let wq = quantize(ty, &wf, n, None).unwrap();
            let wd = dequantize_to_vec(ty, &wq).unwrap();
            let (xd, results): (Vec<f64>, Vec<f32>) = match ty {
                GgmlType::Q8_0 => {
                    let a = quantize_q8_0_act_vec(&xf);
                    let w = blocks_from_bytes::<BlockQ8_0>(&wq).unwrap();
                    let xd = a
                        .iter()
                        .flat_map(|b| b.qs.iter().map(move |&q| b.d as f64 * q as f64))
                        .collect();
                    (xd, kernel_sets.iter().map(|k| (k.q8_0)(&w, &a)).collect())
                }
                GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
                    let a = quantize_q8_k_vec(&xf);
                    let xd = a
                        .iter()
                        .flat_map(|b| b.qs.iter().map(move |&q| b.d as f64 * q as f64))
                        .collect();
                    let r = kernel_sets
                        .iter()
                        .map(|k| match ty {
                            GgmlType::Q2_K => {
                                (k.q2_k)(&blocks_from_bytes::<BlockQ2K>(&wq).unwrap(), &a)
                            }
                            GgmlType::Q4_K => {
                                (k.q4_k)(&blocks_from_bytes::<BlockQ4K>(&wq).unwrap(), &a)
                            }
                            _ => (k.iq2_xxs)(&blocks_from_bytes::<BlockIq2Xxs>(&wq).unwrap(), &a),
                        })
                        .collect();
                    (xd, r)
                }
                GgmlType::F16 | GgmlType::BF16 => {
                    let w: Vec<u16> = wq
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    let r = kernel_sets
                        .iter()
                        .map(|k| {
                            if ty == GgmlType::F16 {
                                (k.f16)(&w, &xf)
                            } else {
                                (k.bf16)(&w, &xf)
                            }
                        })
                        .collect();
                    (xf.iter().map(|&v| v as f64).collect(), r)
                }
                _ => (
                    xf.iter().map(|&v| v as f64).collect(),
                    kernel_sets.iter().map(|k| (k.f32)(&wf, &xf)).collect(),
                ),
            };
            let reference: f64 = wd.iter().zip(&xd).map(|(a, b)| *a as f64 * b).sum();
            let scale: f64 = wd.iter().zip(&xd).map(|(a, b)| (*a as f64 * b).abs()).sum();
            for (ki, r) in results.iter().enumerate() {
                let ratio = (*r as f64 - reference).abs() / scale;
                worst = worst.max(ratio);
                assert!(
                    ratio <= 1e-5,
                    "{ty} kernels #{ki}: dot {r} vs dequantized f64 {reference} (ratio {ratio:e})"
                );
            }
        }
    }
    eprintln!("worst |dot - ref| / sum|w x| = {worst:e}");
}

#[test]
#[should_panic(expected = "block counts differ")]
fn mismatched_lengths_panic_clearly() {
    let w = vec![bytemuck::Zeroable::zeroed(); 2];
    let x: Vec<BlockQ8_0Act> = vec![bytemuck::Zeroable::zeroed(); 3];
    let _ = ds4_quant::vec_dot_q8_0(&w, &x);
}

#[test]
fn dispatch_reports_a_kernel_set() {
    let level = ds4_quant::simd_level();
    assert!(level == "avx2" || level == "scalar");
    if std::env::var_os("DS4_QUANT_SCALAR").is_none() && avx2_kernels().is_some() {
        assert_eq!(level, "avx2");
    }
}
