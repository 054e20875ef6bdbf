//! Op-level tests: every forward-pass kernel of `kernels/fwd.cu` against its `ds4_model::ops`
//! reference on random inputs. Skipped (with a printed line) without a CUDA device.
//!
//! Tolerances. The kernels accumulate in f64 where the reference does and are compiled without
//! FMA contraction, so element-wise results are expected to equal the reference up to the
//! rounding of a differently ordered f64 sum: `|got − want| ≤ 1e-6 · max(1, |want|)` for
//! every float output (REL below). QAT round trips (FP8, Hadamard+FP4) and selections
//! (top-k, router) must match exactly given those inputs.
#![cfg(feature = "cuda")]

use ds4_cuda::optest::{CompDecIn, GpuOps, IdxKernel, QkvDecIn};
use ds4_model::ops::{self, CompressorGeom, EMPTY_SCORE, RowQat};
use ds4_model::plan::RopeParams;

const REL: f64 = 1e-6;

fn gpu() -> Option<GpuOps> {
    match ds4_cuda::probe(0) {
        Ok(_) => Some(GpuOps::new(0).expect("device opens after a successful probe")),
        Err(e) => {
            eprintln!("SKIP: no CUDA device ({e})");
            None
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unif(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly normal (sum of 4 uniforms), scaled.
    fn normal(&mut self, s: f32) -> f32 {
        ((self.unif() + self.unif() + self.unif() + self.unif()) - 2.0) * 1.7 * s
    }
    fn vec(&mut self, n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(s)).collect()
    }
}

#[track_caller]
fn check(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w as f64).abs() / (w.abs() as f64).max(1.0);
        if d > worst.0 || g.is_nan() != w.is_nan() {
            worst = (
                if g.is_nan() != w.is_nan() {
                    f64::INFINITY
                } else {
                    d
                },
                i,
            );
        }
    }
    println!("{name}: max rel diff {:.3e} (at {})", worst.0, worst.1);
    assert!(
        worst.0 <= REL,
        "{name}: element {} got {} want {} (rel {:.3e} > {REL:e})",
        worst.1,
        got[worst.1],
        want[worst.1],
        worst.0
    );
}

fn flash_rope() -> (RopeParams, RopeParams) {
    (
        RopeParams::plain(64, 10000.0),
        RopeParams::yarn(64, 160000.0, 16.0, 65536.0, 32.0, 1.0),
    )
}

fn cos_sin(r: &RopeParams, pos: usize) -> (Vec<f32>, Vec<f32>) {
    let h = r.n_rot / 2;
    let (mut c, mut s) = (vec![0f32; h], vec![0f32; h]);
    r.cos_sin(pos, &mut c, &mut s);
    (c, s)
}

#[test]
fn rms_norm_rows() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(1);
    // 20000: more than the 16 elements per thread the kernel keeps in registers.
    for dim in [128usize, 1024, 4096, 16384, 20000] {
        let rows = 3;
        let x = r.vec(rows * dim, 2.0);
        let w: Vec<f32> = (0..dim).map(|_| 1.0 + r.normal(0.15)).collect();
        let got = g.rms_norm_rows(&x, dim, Some(&w), 1e-6).unwrap();
        let mut want = vec![0f32; x.len()];
        for (o, xr) in want.chunks_mut(dim).zip(x.chunks(dim)) {
            ops::rms_norm(xr, &w, 1e-6, o);
        }
        check(&format!("rms_norm dim {dim}"), &got, &want);
        let got = g.rms_norm_rows(&x, dim, None, 1e-6).unwrap();
        for (o, xr) in want.chunks_mut(dim).zip(x.chunks(dim)) {
            ops::rms_norm_noweight(xr, 1e-6, o);
        }
        check(&format!("rms_norm_noweight dim {dim}"), &got, &want);
    }
}

#[test]
fn hc_pre_split_collapse_norm() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(2);
    let (hc, e, n, iters) = (4usize, 512usize, 3usize, 20usize);
    let nm = (2 + hc) * hc;
    let mix = r.vec(n * nm, 1.0);
    let scale: Vec<f32> = (0..3).map(|_| 0.5 + r.unif()).collect();
    let base = r.vec(nm, 0.5);
    let x = r.vec(n * hc * e, 1.0);
    let norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
    let out = g
        .hc_pre(&mix, &scale, &base, hc, iters, 1e-6, &x, e, &norm, 1e-6, n)
        .unwrap();
    let (mut pre, mut post, mut comb) =
        (vec![0f32; hc], vec![0f32; n * hc], vec![0f32; n * hc * hc]);
    let (mut xin, mut a) = (vec![0f32; n * e], vec![0f32; n * e]);
    for t in 0..n {
        ops::hc_split(
            &mix[t * nm..(t + 1) * nm],
            &scale,
            &base,
            hc,
            iters,
            1e-6,
            &mut pre,
            &mut post[t * hc..(t + 1) * hc],
            &mut comb[t * hc * hc..(t + 1) * hc * hc],
        );
        ops::hc_collapse(
            &x[t * hc * e..(t + 1) * hc * e],
            &pre,
            &mut xin[t * e..(t + 1) * e],
        );
        let xi = xin[t * e..(t + 1) * e].to_vec();
        ops::rms_norm(&xi, &norm, 1e-6, &mut a[t * e..(t + 1) * e]);
    }
    check("hc_pre post", &out.post, &post);
    check("hc_pre comb", &out.comb, &comb);
    check("hc_pre xin", &out.xin, &xin);
    check("hc_pre a", &out.a, &a);
}

/// The chunk HC pre with `xin` skipped and `a`'s Q8_0 activations fused (the backend's chunk
/// sites): the same `post`, `comb`, `a` as the plain launch (bit for bit), and the bytes
/// quantize_act writes for `a` (bit for bit with ds4_quant). Token counts not a multiple of
/// the 8 tokens per block; widths where some lanes hold no column.
#[test]
fn hc_pre_chunk_fused_q8() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(31);
    let (hc, iters) = (4usize, 20usize);
    for (e, n) in [(4096usize, 19usize), (1024, 9), (256, 3), (2048, 1)] {
        let nm = (2 + hc) * hc;
        let mix = r.vec(n * nm, 1.0);
        let scale: Vec<f32> = (0..3).map(|_| 0.5 + r.unif()).collect();
        let base = r.vec(nm, 0.5);
        let x = r.vec(n * hc * e, 1.0);
        let mut norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
        // An all-zero 32-block (d = 0, q = 0).
        for v in &mut norm[64..96] {
            *v = 0.0;
        }
        let plain = g
            .hc_pre(&mix, &scale, &base, hc, iters, 1e-6, &x, e, &norm, 1e-6, n)
            .unwrap();
        let (out, act) = g
            .hc_pre_q8(&mix, &scale, &base, hc, iters, 1e-6, &x, e, &norm, 1e-6, n)
            .unwrap();
        let tag = format!("hc_pre q8 e {e} n {n}");
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same(&out.post, &plain.post), "{tag}: post");
        assert!(same(&out.comb, &plain.comb), "{tag}: comb");
        assert!(same(&out.a, &plain.a), "{tag}: a");
        let mut a_cpu = vec![0f32; n * e];
        for t in 0..n {
            let (_, _, _, a) = cpu_hc_pre(
                &mix[t * nm..(t + 1) * nm],
                &scale,
                &base,
                hc,
                iters,
                &x[t * hc * e..(t + 1) * hc * e],
                e,
                &norm,
            );
            a_cpu[t * e..(t + 1) * e].copy_from_slice(&a);
        }
        check(&format!("{tag} a vs cpu"), &out.a, &a_cpu);
        check_act_q8_0(&tag, &act, &out.a);
    }
}

/// The chunk HC post with the per-token norm factors (the scaled skinny mix product forms
/// flat from them): the same xo / flat as the plain launch, and (float)(xo·s) = flat bit for
/// bit. Flash width and a narrow one; the FFN site's summed routed rows (k = 1) and k = 3.
#[test]
fn hc_post_norm_factors() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(33);
    let hc = 4usize;
    for (e, n, k) in [(4096usize, 5usize, 1usize), (256, 3, 3), (1024, 2, 0)] {
        let f = r.vec(n * e, 1.0);
        let routed = r.vec(n * k.max(1) * e, 1.0);
        let x = r.vec(n * hc * e, 1.0);
        let post: Vec<f32> = (0..n * hc).map(|_| 2.0 * r.unif()).collect();
        let comb: Vec<f32> = (0..n * hc * hc).map(|_| r.unif()).collect();
        let rt = (k > 0).then_some((&routed[..], k));
        let (xo0, flat0) = g.hc_post(&f, rt, &x, &post, &comb, hc, e, 1e-6, n).unwrap();
        let (xo, flat, fs) = g
            .hc_post_scaled(&f, rt, &x, &post, &comb, hc, e, 1e-6, n)
            .unwrap();
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same(&xo, &xo0), "e {e}: xo");
        assert!(same(&flat, &flat0), "e {e}: flat");
        for (i, (&v, &fl)) in xo.iter().zip(&flat).enumerate() {
            let y = (v as f64 * fs[i / (hc * e)]) as f32;
            assert_eq!(
                y.to_bits(),
                fl.to_bits(),
                "e {e}: element {i}: xo·s {y} flat {fl}"
            );
        }
        println!("hc_post e {e} n {n} k {k}: (float)(xo·s) = flat bit for bit");
    }
}

#[test]
fn hc_post_and_flat() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(3);
    let (hc, e, n, k) = (4usize, 256usize, 2usize, 3usize);
    let f = r.vec(n * e, 1.0);
    let routed = r.vec(n * k * e, 1.0);
    let x = r.vec(n * hc * e, 1.0);
    let post: Vec<f32> = (0..n * hc).map(|_| 2.0 * r.unif()).collect();
    let comb: Vec<f32> = (0..n * hc * hc).map(|_| r.unif()).collect();
    for with_routed in [false, true] {
        let (xo, flat) = g
            .hc_post(
                &f,
                with_routed.then_some((&routed[..], k)),
                &x,
                &post,
                &comb,
                hc,
                e,
                1e-6,
                n,
            )
            .unwrap();
        let mut want = vec![0f32; n * hc * e];
        let mut wflat = vec![0f32; n * hc * e];
        for t in 0..n {
            let ft: Vec<f32> = (0..e)
                .map(|d| {
                    if with_routed {
                        let acc: f64 = (0..k).map(|j| routed[(t * k + j) * e + d] as f64).sum();
                        (acc as f32) + f[t * e + d]
                    } else {
                        f[t * e + d]
                    }
                })
                .collect();
            ops::hc_post(
                &ft,
                &x[t * hc * e..(t + 1) * hc * e],
                &post[t * hc..(t + 1) * hc],
                &comb[t * hc * hc..(t + 1) * hc * hc],
                &mut want[t * hc * e..(t + 1) * hc * e],
            );
            ops::rms_norm_noweight(
                &want[t * hc * e..(t + 1) * hc * e],
                1e-6,
                &mut wflat[t * hc * e..(t + 1) * hc * e],
            );
        }
        check(&format!("hc_post (routed {with_routed})"), &xo, &want);
        check(
            &format!("hc_post flat (routed {with_routed})"),
            &flat,
            &wflat,
        );
    }
}

#[test]
fn hc_head_and_output_norm() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(4);
    let (hc, e, n) = (4usize, 4096usize, 2usize);
    let mix = r.vec(n * hc, 1.0);
    let base = r.vec(hc, 0.5);
    let x = r.vec(n * hc * e, 1.0);
    let norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
    let got = g
        .hc_head(&mix, 0.8, &base, 1e-6, &x, hc, e, &norm, 1e-6, n)
        .unwrap();
    let mut want = vec![0f32; n * e];
    let (mut w, mut y) = (vec![0f32; hc], vec![0f32; e]);
    for t in 0..n {
        ops::hc_head_weights(&mix[t * hc..(t + 1) * hc], 0.8, &base, 1e-6, &mut w);
        ops::hc_collapse(&x[t * hc * e..(t + 1) * hc * e], &w, &mut y);
        ops::rms_norm(&y, &norm, 1e-6, &mut want[t * e..(t + 1) * e]);
    }
    check("hc_head", &got, &want);
}

#[test]
fn q_heads_norm_rope() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(5);
    let (nh, hd, n) = (8usize, 512usize, 3usize);
    let (plain, comp) = flash_rope();
    for (rope, pos0) in [
        (&plain, 0usize),
        (&comp, 7),
        (&comp, 200_000),
        (&plain, 65_530),
    ] {
        let q = r.vec(n * nh * hd, 1.0);
        let got = g
            .head_norm_rope(&q, nh, hd, 64, 1e-6, &rope.inv_freq, pos0, n)
            .unwrap();
        let mut want = q.clone();
        for t in 0..n {
            let (c, s) = cos_sin(rope, pos0 + t);
            let qt = &mut want[t * nh * hd..(t + 1) * nh * hd];
            ops::head_rms_norm_inplace(qt, hd, 1e-6);
            ops::rope_heads(qt, hd, &c, &s, false);
        }
        check(&format!("head_norm_rope pos {pos0}"), &got, &want);
    }
}

#[test]
fn kv_rows_norm_rope_fp8_ring() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(6);
    let (plain, comp) = flash_rope();
    let tiny = RopeParams::yarn(16, 160000.0, 16.0, 65536.0, 32.0, 1.0);
    for (hd, n_rot, rope, pos0, n, qat) in [
        (512usize, 64usize, &comp, 300usize, 5usize, true),
        (512, 64, &plain, 0, 3, false),
        (128, 16, &tiny, 130, 4, true), // n_nope 112: a partial FP8 block
    ] {
        let n_nope = hd - n_rot;
        let raw_cap = 8 + n;
        let kvp = r.vec(n * hd, 3.0);
        let w: Vec<f32> = (0..hd).map(|_| 1.0 + r.normal(0.15)).collect();
        let ring = g
            .kv_finish(
                &kvp,
                &w,
                hd,
                n_rot,
                1e-6,
                &rope.inv_freq,
                pos0,
                qat,
                n_nope,
                raw_cap,
                n,
            )
            .unwrap();
        for t in 0..n {
            let p = pos0 + t;
            let mut want = vec![0f32; hd];
            ops::rms_norm(&kvp[t * hd..(t + 1) * hd], &w, 1e-6, &mut want);
            let (c, s) = cos_sin(rope, p);
            ops::rope_tail(&mut want, &c, &s, false);
            if qat {
                ops::fp8_kv_qat(&mut want, n_nope);
            }
            let row = p % raw_cap;
            check(
                &format!("kv_finish hd {hd} qat {qat} pos {p}"),
                &ring[row * hd..(row + 1) * hd],
                &want,
            );
        }
    }
}

/// The CPU compressor over positions `pos0..pos0+n` (as `ds4_model::cpu`).
#[allow(clippy::too_many_arguments)]
fn cpu_compressor(
    gm: CompressorGeom,
    ckv: &[f32],
    csc: &[f32],
    ape: &[f32],
    st_kv: &mut [f32],
    st_sc: &mut [f32],
    norm: &[f32],
    rope: &RopeParams,
    qat: RowQat,
    rows: &mut Vec<f32>,
    pos0: usize,
    n: usize,
) {
    let w = gm.width();
    for t in 0..n {
        let pos = pos0 + t;
        let slot = pos % gm.ratio;
        let mut score = csc[t * w..(t + 1) * w].to_vec();
        for (v, &a) in score.iter_mut().zip(&ape[slot * w..(slot + 1) * w]) {
            *v += a;
        }
        if ops::compressor_push(gm, st_kv, st_sc, pos, &ckv[t * w..(t + 1) * w], &score) {
            let (c, s) = cos_sin(rope, pos + 1 - gm.ratio);
            let mut row = vec![0f32; gm.d_c];
            ops::compressor_emit(gm, st_kv, st_sc, norm, 1e-6, &c, &s, qat, &mut row);
            rows.extend_from_slice(&row);
            ops::compressor_advance(gm, st_kv, st_sc);
        }
    }
}

#[test]
fn compressor_chunks_match_token_by_token() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(7);
    let (_, comp) = flash_rope();
    let cases = [
        (
            CompressorGeom {
                ratio: 4,
                overlap: true,
                d_c: 512,
            },
            1,
            RowQat::Fp8 { n_nope: 448 },
        ),
        (
            CompressorGeom {
                ratio: 4,
                overlap: true,
                d_c: 128,
            },
            2,
            RowQat::Indexer,
        ),
        (
            CompressorGeom {
                ratio: 16,
                overlap: false,
                d_c: 512,
            },
            1,
            RowQat::Fp8 { n_nope: 448 },
        ),
        (
            CompressorGeom {
                ratio: 128,
                overlap: false,
                d_c: 512,
            },
            0,
            RowQat::Off,
        ),
    ];
    for (gm, qat_mode, qat) in cases {
        let w = gm.width();
        let ape = r.vec(gm.ratio * w, 0.5);
        let norm: Vec<f32> = (0..gm.d_c).map(|_| 1.0 + r.normal(0.15)).collect();
        let (mut ck, mut cs) = (vec![0f32; gm.state_len()], vec![0f32; gm.state_len()]);
        ops::compressor_clear(&mut ck, &mut cs);
        let (mut gk, mut gs) = (ck.clone(), cs.clone());
        let cap = 600 / gm.ratio + 2;
        let mut cpu_rows: Vec<f32> = Vec::new();
        let mut gpu_rows = vec![0f32; cap * gm.d_c];
        let mut pos = 0usize;
        // Chunks of every size class: single steps, within a window, across several windows.
        for n in [1usize, 2, 3, 1, 7, 1, 1, 13, 130, 1, 5, 260, 2, 1] {
            let ckv = r.vec(n * w, 1.0);
            let csc = r.vec(n * w, 1.0);
            cpu_compressor(
                gm,
                &ckv,
                &csc,
                &ape,
                &mut ck,
                &mut cs,
                &norm,
                &comp,
                qat,
                &mut cpu_rows,
                pos,
                n,
            );
            let (rows, k2, s2) = g
                .compressor(
                    gm,
                    64,
                    448,
                    qat_mode,
                    1e-6,
                    &ckv,
                    &csc,
                    &ape,
                    &gk,
                    &gs,
                    &norm,
                    &comp.inv_freq,
                    &gpu_rows,
                    pos,
                    n,
                )
                .unwrap();
            gpu_rows = rows;
            gk = k2;
            gs = s2;
            pos += n;
            let nr = pos / gm.ratio;
            assert_eq!(cpu_rows.len(), nr * gm.d_c);
            let tag = format!("ratio {} d_c {} after {pos}", gm.ratio, gm.d_c);
            check(
                &format!("compressor rows {tag}"),
                &gpu_rows[..nr * gm.d_c],
                &cpu_rows,
            );
            check(&format!("compressor state_kv {tag}"), &gk, &ck);
            check(&format!("compressor state_score {tag}"), &gs, &cs);
        }
        assert_eq!(EMPTY_SCORE, -1e30);
    }
}

#[test]
fn indexer_queries() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(8);
    let (_, comp) = flash_rope();
    let (nih, ihd, n, pos0) = (64usize, 128usize, 2usize, 3000usize);
    let iq = r.vec(n * nih * ihd, 1.0);
    let iw = r.vec(n * nih, 1.0);
    let ws = 1.0 / ((ihd * nih) as f64).sqrt();
    for qat in [false, true] {
        let (gq, gw) = g
            .indexer_q(&iq, &iw, nih, ihd, 64, &comp.inv_freq, pos0, qat, ws, n)
            .unwrap();
        let mut wq = iq.clone();
        let mut ww = iw.clone();
        for t in 0..n {
            let (c, s) = cos_sin(&comp, pos0 + t);
            for h in wq[t * nih * ihd..(t + 1) * nih * ihd].chunks_exact_mut(ihd) {
                ops::rope_tail(h, &c, &s, false);
                if qat {
                    ops::indexer_qat(h);
                }
            }
            for v in &mut ww[t * nih..(t + 1) * nih] {
                *v = (*v as f64 * ws) as f32;
            }
        }
        check(&format!("indexer_q qat {qat}"), &gq, &wq);
        check(&format!("indexer_w qat {qat}"), &gw, &ww);
    }
}

/// `ds4_indexer_q_warp` (warp per head, registers) is bit-identical to the block-per-head
/// `ds4_indexer_q` (queries and weights), QAT on and off, with tiny and large heads.
#[test]
fn indexer_queries_warp_bit_identical() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(29);
    let (_, comp) = flash_rope();
    let (nih, ihd) = (64usize, 128usize);
    let ws = 1.0 / ((ihd * nih) as f64).sqrt();
    for (pos0, n) in [(0usize, 5usize), (30011, 300)] {
        let mut iq = r.vec(n * nih * ihd, 1.0);
        for (i, h) in iq.chunks_exact_mut(ihd).enumerate() {
            match i % 37 {
                1 => h.iter_mut().for_each(|v| *v *= 1e-39),
                2 => h.iter_mut().for_each(|v| *v *= 1e30),
                3 => h.fill(0.0),
                _ => {}
            }
        }
        let iw = r.vec(n * nih, 1.0);
        for qat in [false, true] {
            let [(oq, ow, _), (nq, nw, _)] = [Some(false), Some(true)].map(|warp| {
                g.indexer_q_timed(
                    warp,
                    &iq,
                    &iw,
                    nih,
                    ihd,
                    64,
                    &comp.inv_freq,
                    pos0,
                    qat,
                    ws,
                    n,
                    0,
                )
                .unwrap()
            });
            let dq = oq
                .iter()
                .zip(&nq)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            let dw = ow
                .iter()
                .zip(&nw)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            println!("indexer_q warp pos {pos0} n {n} qat {qat}: {dq} q, {dw} w differ");
            assert_eq!((dq, dw), (0, 0), "indexer_q warp pos {pos0} qat {qat}");
        }
    }
}

#[test]
fn indexer_scores_and_topk() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(9);
    let (nih, ihd, ratio, topk) = (64usize, 128usize, 4usize, 512usize);
    for (pos0, n, zero_rows) in [(4000usize, 2usize, false), (9000, 1, true), (2060, 3, true)] {
        let nrows = (pos0 + n) / ratio;
        let mut keys = r.vec(nrows * ihd, 1.0);
        let mut q = r.vec(n * nih * ihd, 1.0);
        for h in keys.chunks_exact_mut(ihd) {
            ops::indexer_qat(h);
        }
        for h in q.chunks_exact_mut(ihd) {
            ops::indexer_qat(h);
        }
        if zero_rows {
            // Many exact ties: zero keys score exactly 0.
            for (i, k) in keys.chunks_exact_mut(ihd).enumerate() {
                if i % 3 != 0 {
                    k.fill(0.0);
                }
            }
        }
        let w = r.vec(n * nih, 0.02);
        for blocks in [1usize, 37, 1024] {
            let (scores, stride, isel) = g
                .indexer_select(&q, &w, &keys, nih, ihd, ratio, topk, pos0, n, blocks)
                .unwrap();
            for t in 0..n {
                let nv = (pos0 + t + 1) / ratio;
                let mut want = vec![0f32; nv];
                ops::indexer_scores(
                    &q[t * nih * ihd..(t + 1) * nih * ihd],
                    &w[t * nih..(t + 1) * nih],
                    &keys[..nv * ihd],
                    ihd,
                    &mut want,
                );
                let tag = format!("pos {} blocks {blocks}", pos0 + t);
                check(
                    &format!("indexer scores {tag}"),
                    &scores[t * stride..t * stride + nv],
                    &want,
                );
                // Top-k of the GPU's own scores must be exactly the reference selection.
                let gs = &scores[t * stride..t * stride + nv];
                let mut scratch = Vec::new();
                let mut sel = vec![0u32; topk];
                let c = ops::topk_indices(gs, topk, &mut scratch, &mut sel);
                assert_eq!(c, topk);
                let got: Vec<u32> = isel[t * topk..(t + 1) * topk]
                    .iter()
                    .map(|&v| v as u32)
                    .collect();
                assert_eq!(got, sel, "indexer top-k {tag}");
                println!("indexer top-k {tag}: equal ({} of {nv} rows)", topk);
            }
        }
    }
}

/// Every indexer score kernel at Flash size (64 heads × 128, ratio 4) against
/// `ops::indexer_scores`: a 256-token chunk at positions 5888.. (1472..1536 visible rows) and
/// 1-token decode steps at 8k and 32k, on plain random f32 values (dots that really round in f64)
/// and on QAT (Hadamard+FP4) values. Tolerance: REL, and at most 2 scores per case that are
/// not bit-identical (the f64 sums differ only in order, so a different f32 needs a ~1e-8
/// rounding tie).
#[test]
fn indexer_scores_flash_size_all_kernels() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(19);
    let (nih, ihd, ratio, topk) = (64usize, 128usize, 4usize, 512usize);
    for qat in [false, true] {
        // (pos0, n, stride of the backend at its context, row blocks as the backend's idx_blocks)
        for (pos0, n, ctx) in [
            (5888usize, 256usize, 8192usize),
            (8191, 1, 8192),
            (32767, 1, 32768),
        ] {
            let nrows = (pos0 + n) / ratio;
            let stride = (ctx / ratio + 1).next_multiple_of(4);
            let blocks = stride.div_ceil(8).clamp(1, 264);
            let mut keys = r.vec(nrows * ihd, 1.0);
            let mut q = r.vec(n * nih * ihd, 1.0);
            if qat {
                keys.chunks_exact_mut(ihd).for_each(ops::indexer_qat);
                q.chunks_exact_mut(ihd).for_each(ops::indexer_qat);
            }
            let w = r.vec(n * nih, 0.02);
            let mut want = vec![f32::NAN; n * stride];
            for t in 0..n {
                let nv = (pos0 + t + 1) / ratio;
                ops::indexer_scores(
                    &q[t * nih * ihd..(t + 1) * nih * ihd],
                    &w[t * nih..(t + 1) * nih],
                    &keys[..nv * ihd],
                    ihd,
                    &mut want[t * stride..t * stride + nv],
                );
            }
            for kernel in [
                IdxKernel::Auto,
                IdxKernel::Scalar4,
                IdxKernel::Mma32,
                IdxKernel::Mma128,
                IdxKernel::Mma2x64,
            ] {
                let (got, _) = g
                    .indexer_scores_timed(
                        kernel, &q, &w, &keys, nih, ihd, ratio, topk, pos0, n, 0, stride, blocks, 0,
                    )
                    .unwrap();
                let tag = format!("{kernel:?} qat {qat} pos {pos0} n {n}");
                let (mut gs, mut ws, mut differ) = (Vec::new(), Vec::new(), 0usize);
                for t in 0..n {
                    let nv = (pos0 + t + 1) / ratio;
                    let row = t * stride..t * stride + nv;
                    for (a, b) in got[row.clone()].iter().zip(&want[row.clone()]) {
                        differ += (a.to_bits() != b.to_bits()) as usize;
                    }
                    gs.extend_from_slice(&got[row.clone()]);
                    ws.extend_from_slice(&want[row]);
                }
                check(&format!("indexer scores {tag}"), &gs, &ws);
                println!(
                    "indexer scores {tag}: {differ} of {} not bit-identical",
                    ws.len()
                );
                assert!(differ <= 2, "{tag}: {differ} scores not bit-identical");
            }
        }
    }
}

/// The int8 tensor-core indexer path (`IdxKernel::Int8`) on Flash-size QAT inputs (keys
/// f16-rounded as the cache stores them): bit-identical to the CPU reference and to the FP64
/// kernel, without falling back; edge rows: all-zero, a zero block, tiny scales (f16
/// subnormal keys, f32-subnormal query heads), rows whose every dot is ≤ 0, negative head
/// weights. Inputs that are not int8·2^e (QAT off, one plain key row, a wide block-scale spread
/// in one query head) must fall back to the FP64 kernel and match it bit for bit. Batches that
/// start inside the pass (`t0` > 0: the backend's score batches past the first) and every
/// kernel variant (`DS4_CUDA_IDX8_VARIANT`) are checked on the QAT inputs.
#[test]
fn indexer_scores_int8_exact_and_fallback() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(23);
    let (nih, ihd, ratio, topk) = (64usize, 128usize, 4usize, 512usize);
    // (pos0, n, ctx, t0): partial tiles, tokens on both sides of topk, > 512 rows, long
    // context, batches from token t0 (odd counts: 173, 41, 117 tokens).
    let cases = [
        (5888usize, 256usize, 8192usize, 0usize),
        (1900, 300, 8192, 0),
        (30700, 41, 32768, 0),
        (1900, 300, 8192, 127),
        (5888, 256, 8192, 215),
        (2501, 117, 8192, 0),
    ];
    // mode 0: QAT (int8 path); 1: QAT off; 2: one plain key row; 3: wide spread in one head.
    for mode in 0..4 {
        for &(pos0, n, ctx, t0) in &cases {
            // The fallback modes: the (1900, 300) pass whole and from token 127, and an odd
            // token count.
            if (mode > 0 && pos0 != 1900 && pos0 != 2501) || (mode == 3 && pos0 != 1900) {
                continue;
            }
            let nrows = (pos0 + n) / ratio;
            let stride = (ctx / ratio + 1).next_multiple_of(4);
            let blocks = stride.div_ceil(8).clamp(1, 264);
            let mut keys = r.vec(nrows * ihd, 1.0);
            let mut q = r.vec(n * nih * ihd, 1.0);
            if mode != 1 {
                for (i, k) in keys.chunks_exact_mut(ihd).enumerate() {
                    match i % 97 {
                        5 => k.iter_mut().for_each(|v| *v *= 1e-6),
                        11 => k.iter_mut().for_each(|v| *v *= 1e-8),
                        _ => {}
                    }
                    ops::indexer_qat(k);
                    match i % 97 {
                        3 => k.fill(0.0),
                        7 => k[32..64].fill(0.0),
                        _ => {}
                    }
                    k.iter_mut().for_each(|v| *v = ds4_quant::fp::f16_round(*v));
                }
                for (i, h) in q.chunks_exact_mut(ihd).enumerate() {
                    if i % 61 == 9 {
                        h.iter_mut().for_each(|v| *v *= 1e-38);
                    }
                    ops::indexer_qat(h);
                    // Token 200 (position 2100) is scored (token 1, at 1901, is not: the prep
                    // skips the queries of tokens that see ≤ topk rows).
                    if mode == 3 && i == 200 * nih + 13 {
                        // Block scales 2^12 apart: no int8 code row fits the head.
                        h[..32].iter_mut().for_each(|v| *v *= 4096.0);
                    }
                }
                // Rows whose every head dot is ≤ 0: minus the sum of token 0's heads, FP4'd.
                let mut neg = vec![0f32; ihd];
                for h in q[..nih * ihd].chunks_exact(ihd) {
                    neg.iter_mut().zip(h).for_each(|(a, b)| *a -= b);
                }
                ops::fp4_qat(&mut neg);
                for i in (13..nrows).step_by(101) {
                    keys[i * ihd..(i + 1) * ihd].copy_from_slice(&neg);
                }
                if mode == 2 {
                    let i = nrows / 2;
                    for v in &mut keys[i * ihd..(i + 1) * ihd] {
                        *v = r.normal(1.0);
                    }
                }
            }
            let w = r.vec(n * nih, 0.02);
            let mut want = vec![f32::NAN; n * stride];
            for t in 0..n {
                let nv = (pos0 + t + 1) / ratio;
                if nv <= topk {
                    continue;
                }
                ops::indexer_scores(
                    &q[t * nih * ihd..(t + 1) * nih * ihd],
                    &w[t * nih..(t + 1) * nih],
                    &keys[..nv * ihd],
                    ihd,
                    &mut want[t * stride..t * stride + nv],
                );
            }
            let run = |kernel| {
                g.indexer_scores_timed(
                    kernel, &q, &w, &keys, nih, ihd, ratio, topk, pos0, n, t0, stride, blocks, 0,
                )
                .unwrap()
                .0
            };
            let f64s = run(IdxKernel::Mma2x64);
            // Every int8 variant on the QAT inputs, the default one (2) on the others.
            let variants: &[usize] = if mode == 0 { &[0, 1, 2, 3] } else { &[2] };
            for &var in variants {
                g.set_idx8_variant(var);
                let got = run(IdxKernel::Int8);
                let fell_back = g.idx8_fell_back().unwrap();
                let tag = format!("int8 v{var} mode {mode} pos {pos0} n {n} t0 {t0}");
                let (mut vs_cpu, mut vs_f64, mut count) = (0usize, 0usize, 0usize);
                for t in 0..n {
                    let nv = (pos0 + t + 1) / ratio;
                    let row = t * stride..t * stride + nv;
                    if t < t0 {
                        // Rows before the batch stay untouched.
                        assert!(
                            got[row].iter().all(|v| v.is_nan()),
                            "{tag}: row {t} written"
                        );
                        continue;
                    }
                    if nv <= topk {
                        continue;
                    }
                    for ((a, b), c) in got[row.clone()]
                        .iter()
                        .zip(&want[row.clone()])
                        .zip(&f64s[row])
                    {
                        vs_cpu += (a.to_bits() != b.to_bits()) as usize;
                        vs_f64 += (a.to_bits() != c.to_bits()) as usize;
                        count += 1;
                    }
                }
                println!(
                    "indexer scores {tag}: fell back {fell_back}; {vs_cpu} of {count} differ from \
                     the CPU, {vs_f64} from Mma2x64"
                );
                assert!(count > 0, "{tag}: nothing scored");
                assert_eq!(fell_back, mode != 0, "{tag}: fallback");
                assert_eq!(vs_f64, 0, "{tag}: not bit-identical to Mma2x64");
                if mode == 0 {
                    assert_eq!(vs_cpu, 0, "{tag}: not bit-identical to the CPU");
                } else {
                    assert!(vs_cpu <= 2, "{tag}: {vs_cpu} differ from the CPU");
                }
            }
            g.set_idx8_variant(2);
        }
    }
}

#[test]
fn attention_with_sinks_and_inverse_rope() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(10);
    let (plain, comp) = flash_rope();
    let (nh, hd, window, topk) = (16usize, 512usize, 128usize, 32usize);
    // (ratio, has_indexer, pos0, n, rope)
    for (ratio, has_idx, pos0, n, rope) in [
        (0usize, false, 5usize, 3usize, &plain),
        (0, false, 300, 2, &plain),
        (4, true, 200, 2, &comp), // nv ≤ topk: all rows... (200+1)/4 = 50 > 32: selection
        (4, true, 60, 3, &comp),  // nv = 15: every row visible
        (128, false, 700, 4, &comp),
    ] {
        let raw_cap = window + n + 3;
        let ring = r.vec(raw_cap * hd, 1.0);
        let ncomp = (pos0 + n) / ratio.max(1);
        let compr = r.vec(ncomp.max(1) * hd, 1.0);
        let q = r.vec(n * nh * hd, 0.3);
        let sinks = r.vec(nh, 1.0);
        let mut isel = vec![0i32; n * topk];
        for t in 0..n {
            let nv = (pos0 + t + 1).checked_div(ratio).unwrap_or(0);
            if has_idx && nv > topk {
                // Ascending distinct picks.
                let mut picks: Vec<i32> = (0..nv as i32).filter(|i| i % 2 == 1).collect();
                picks.truncate(topk);
                let mut extra = 0;
                while picks.len() < topk {
                    picks.push(extra * 2);
                    extra += 1;
                }
                picks.sort_unstable();
                isel[t * topk..(t + 1) * topk].copy_from_slice(&picks);
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let mut want = vec![0f32; n * nh * hd];
        let (mut b1, mut b2) = (Vec::new(), Vec::new());
        for t in 0..n {
            let p = pos0 + t;
            let lo = (p + 1).saturating_sub(window);
            let mut raw = Vec::new();
            for pp in lo..=p {
                let row = pp % raw_cap;
                raw.extend_from_slice(&ring[row * hd..(row + 1) * hd]);
            }
            let nv = (p + 1).checked_div(ratio).unwrap_or(0);
            let sel: Option<Vec<u32>> = (has_idx && nv > topk).then(|| {
                isel[t * topk..(t + 1) * topk]
                    .iter()
                    .map(|&v| v as u32)
                    .collect()
            });
            let (c, s) = cos_sin(rope, p);
            for h in 0..nh {
                let out = &mut want[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                ops::attention_head(
                    &q[(t * nh + h) * hd..(t * nh + h + 1) * hd],
                    &raw,
                    &compr,
                    nv,
                    sel.as_deref(),
                    sinks[h],
                    scale,
                    &mut b1,
                    &mut b2,
                    out,
                );
                ops::rope_tail(out, &c, &s, true);
            }
        }
        for nsplit in [1usize, 3, 16] {
            let got = g
                .attention(
                    &q,
                    &ring,
                    raw_cap,
                    window,
                    &compr,
                    ratio,
                    has_idx,
                    &isel,
                    topk,
                    &sinks,
                    scale,
                    nh,
                    hd,
                    64,
                    &rope.inv_freq,
                    pos0,
                    n,
                    nsplit,
                )
                .unwrap();
            check(
                &format!("attention ratio {ratio} pos {pos0} n {n} nsplit {nsplit}"),
                &got,
                &want,
            );
        }
    }
}

#[test]
fn router_hash_and_topk() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(11);
    for (ne, k) in [(256usize, 6usize), (8, 3), (100, 6), (600, 8)] {
        let n = 4;
        let mut rlog = r.vec(n * ne, 2.0);
        // Exact ties between experts.
        rlog[3] = rlog[10];
        rlog[ne + 5] = rlog[ne + 1];
        let bias = r.vec(ne, 0.2);
        let tokens: Vec<i32> = vec![3, 0, 7, 1];
        let table: Vec<i32> = (0..8 * k).map(|i| ((i * 5 + 1) % ne) as i32).collect();
        for (hash, with_bias) in [(false, true), (false, false), (true, false)] {
            let (probs, sel, wts) = g
                .router(
                    &rlog,
                    ne,
                    k,
                    hash.then_some(&table[..]),
                    &tokens,
                    with_bias.then_some(&bias[..]),
                    1.5,
                    n,
                )
                .unwrap();
            let mut wp = vec![0f32; ne];
            let mut biased = vec![0f32; ne];
            for t in 0..n {
                ops::router_probs(&rlog[t * ne..(t + 1) * ne], &mut wp);
                check(
                    &format!("router probs ne {ne}"),
                    &probs[t * ne..(t + 1) * ne],
                    &wp,
                );
                let mut ws = vec![0u32; k];
                if hash {
                    let tok = tokens[t] as usize;
                    for j in 0..k {
                        ws[j] = table[tok * k + j] as u32;
                    }
                } else {
                    ops::route_topk(&wp, with_bias.then_some(&bias[..]), &mut biased, &mut ws);
                }
                let gs: Vec<u32> = sel[t * k..(t + 1) * k].iter().map(|&v| v as u32).collect();
                assert_eq!(
                    gs, ws,
                    "router selection ne {ne} hash {hash} bias {with_bias}"
                );
                let mut ww = vec![0f32; k];
                ops::route_weights(&wp, &ws, 1.5, &mut ww);
                check(
                    &format!("router weights ne {ne}"),
                    &wts[t * k..(t + 1) * k],
                    &ww,
                );
            }
        }
    }
}

#[test]
fn swiglu_clamped() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(12);
    let gg = r.vec(5000, 8.0);
    let u = r.vec(5000, 8.0);
    for clamp in [10.0f32, 0.0] {
        let got = g.swiglu(&gg, &u, clamp).unwrap();
        let mut want = vec![0f32; gg.len()];
        ops::swiglu(&gg, &u, clamp, 1.0, &mut want);
        check(&format!("swiglu clamp {clamp}"), &got, &want);
    }
}

#[test]
fn greedy_pick_is_the_host_argmax() {
    use ds4_model::sampler::{argmax, argmax_excluding};
    let Some(g) = gpu() else { return };
    let mut r = Rng(21);
    let special = [f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 3.5];
    // Lengths around the grid's stride (32 blocks × 256), the vocabulary, and tiny ones;
    // values from a small set, so ties are everywhere, plus specials.
    for (case, n) in [1usize, 2, 3, 255, 8191, 8192, 8193, 20000, 129280]
        .into_iter()
        .enumerate()
    {
        for variant in 0..4 {
            let mut x: Vec<f32> = (0..n)
                .map(|_| {
                    let v = r.next();
                    match variant {
                        0 => r.normal(4.0),
                        1 => ((v >> 20) % 7) as f32 - 3.0,
                        _ if v.is_multiple_of(5) => special[(v >> 8) as usize % special.len()],
                        _ => ((v >> 20) % 3) as f32,
                    }
                })
                .collect();
            if variant == 3 {
                // All equal but one NaN somewhere: the host must scan.
                x.iter_mut().for_each(|v| *v = -1.0);
                x[(r.next() % n as u64) as usize] = f32::NAN;
            }
            let [got, again] = g.argmax_pick(&x).unwrap();
            assert_eq!(
                got, again,
                "case {case} n {n} variant {variant}: a second run"
            );
            let nan = x.iter().any(|v| v.is_nan());
            assert_eq!(
                got[2] != 0,
                nan,
                "case {case} n {n} variant {variant}: NaN flag"
            );
            if nan {
                continue;
            }
            let best = argmax(&x);
            let second = if n > 1 {
                argmax_excluding(&x, Some(best))
            } else {
                u32::MAX
            };
            assert_eq!(
                [got[0], got[1]],
                [best, second],
                "case {case} n {n} variant {variant}"
            );
        }
    }
}

#[test]
fn embedding_rows() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(13);
    let (e, vocab, hc) = (256usize, 10usize, 4usize);
    let vals = r.vec(vocab * e, 1.0);
    let tokens = vec![3i32, 0, 9];
    let f16: Vec<u16> = vals.iter().map(|&v| ds4_quant::fp::f32_to_f16(v)).collect();
    let bf16: Vec<u16> = vals
        .iter()
        .map(|&v| ds4_quant::fp::f32_to_bf16(v))
        .collect();
    let q8 = ds4_quant::quantize(ds4_gguf::GgmlType::Q8_0, &vals, e, None).unwrap();
    let tables: [(i32, Vec<u8>, ds4_gguf::GgmlType); 4] = [
        (
            0,
            bytemuck::cast_slice(&vals).to_vec(),
            ds4_gguf::GgmlType::F32,
        ),
        (
            1,
            bytemuck::cast_slice(&f16).to_vec(),
            ds4_gguf::GgmlType::F16,
        ),
        (
            30,
            bytemuck::cast_slice(&bf16).to_vec(),
            ds4_gguf::GgmlType::BF16,
        ),
        (8, q8, ds4_gguf::GgmlType::Q8_0),
    ];
    for (ty, bytes, gty) in tables {
        let rb = bytes.len() / vocab;
        let got = g.embed(&bytes, ty, e, rb, &tokens, hc).unwrap();
        let mut want = Vec::new();
        for &t in &tokens {
            let mut row = vec![0f32; e];
            ds4_quant::dequantize(
                gty,
                &bytes[t as usize * rb..(t as usize + 1) * rb],
                &mut row,
            )
            .unwrap();
            for _ in 0..hc {
                want.extend_from_slice(&row);
            }
        }
        check(&format!("embed type {ty}"), &got, &want);
    }
    assert_eq!(g.advance_pos(41, 7).unwrap(), 48);
}

// ---------------------------------------------------------------------------------------------
// Decode-step kernels (one token). Each is launched twice on the same inputs: the second launch
// checks that the "last block" counters were left at zero (as a replayed CUDA graph needs).

/// The CPU HC pre of one token: `(post, comb, xin, a)`.
#[allow(clippy::too_many_arguments)]
fn cpu_hc_pre(
    mix: &[f32],
    scale: &[f32],
    base: &[f32],
    hc: usize,
    iters: usize,
    x: &[f32],
    e: usize,
    norm: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut pre, mut post, mut comb) = (vec![0f32; hc], vec![0f32; hc], vec![0f32; hc * hc]);
    ops::hc_split(
        mix, scale, base, hc, iters, 1e-6, &mut pre, &mut post, &mut comb,
    );
    let mut xin = vec![0f32; e];
    ops::hc_collapse(x, &pre, &mut xin);
    let mut a = vec![0f32; e];
    ops::rms_norm(&xin, norm, 1e-6, &mut a);
    (post, comb, xin, a)
}

#[test]
fn hc_pre_decode() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(21);
    // hc 4: the Flash path; 2: the generic warp split; 6: the one-thread split (36 > 32).
    // e 20000: more than the 4 elements per thread kept in registers (16384 per cluster).
    for (hc, e) in [
        (4usize, 4096usize),
        (4, 128),
        (4, 1000),
        (2, 2048),
        (6, 300),
        (4, 20000),
    ] {
        let iters = 20;
        let nm = (2 + hc) * hc;
        let mix = r.vec(nm, 1.0);
        let scale: Vec<f32> = (0..3).map(|_| 0.5 + r.unif()).collect();
        let base = r.vec(nm, 0.5);
        let x = r.vec(hc * e, 1.0);
        let norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
        let (post, comb, xin, a) = cpu_hc_pre(&mix, &scale, &base, hc, iters, &x, e, &norm);
        // Run 0: the split on the main stream; runs 1, 2: on the side stream.
        for run in 0..3 {
            let out = g
                .hc_pre_dec(
                    &mix,
                    &scale,
                    &base,
                    hc,
                    iters,
                    1e-6,
                    &x,
                    e,
                    &norm,
                    1e-6,
                    run > 0,
                )
                .unwrap();
            let tag = format!("hc {hc} e {e} run {run}");
            check(&format!("hc_pre_dec post {tag}"), &out.post, &post);
            check(&format!("hc_pre_dec comb {tag}"), &out.comb, &comb);
            check(&format!("hc_pre_dec xin {tag}"), &out.xin, &xin);
            check(&format!("hc_pre_dec a {tag}"), &out.a, &a);
        }
    }
}

/// Compare a one-row device Q8_0 activation layout (qs, then the f32 scales at the next
/// 256-byte boundary) with ds4_quant's quantization of `x`: bit-identical.
fn check_act_q8_0(name: &str, act: &[u8], x: &[f32]) {
    let e = x.len();
    let od = e.div_ceil(256) * 256;
    let want = ds4_quant::act::quantize_q8_0_act_vec(x);
    for (b, w) in want.iter().enumerate() {
        let d = f32::from_le_bytes(act[od + 4 * b..od + 4 * b + 4].try_into().unwrap());
        assert_eq!(d.to_bits(), w.d.to_bits(), "{name}: Q8_0 block {b}: d");
        let qs: Vec<i8> = act[32 * b..32 * b + 32].iter().map(|&v| v as i8).collect();
        assert_eq!(&qs[..], &w.qs[..], "{name}: Q8_0 block {b}: qs");
    }
    println!("{name}: {} Q8_0 blocks bit-identical", want.len());
}

/// The same for a one-row Q8_K layout (qs, d, bsums at 256-byte boundaries).
fn check_act_q8_k(name: &str, act: &[u8], x: &[f32]) {
    let e = x.len();
    let od = e.div_ceil(256) * 256;
    let ob = (od + 4 * (e / 256)).div_ceil(256) * 256;
    let want = ds4_quant::act::quantize_q8_k_vec(x);
    for (b, w) in want.iter().enumerate() {
        let d = f32::from_le_bytes(act[od + 4 * b..od + 4 * b + 4].try_into().unwrap());
        assert_eq!(d.to_bits(), w.d.to_bits(), "{name}: Q8_K block {b}: d");
        let qs: Vec<i8> = act[256 * b..256 * b + 256]
            .iter()
            .map(|&v| v as i8)
            .collect();
        assert_eq!(&qs[..], &w.qs[..], "{name}: Q8_K block {b}: qs");
        for g in 0..16 {
            let o = ob + 2 * (16 * b + g);
            let s = i16::from_le_bytes([act[o], act[o + 1]]);
            assert_eq!(s, w.bsums[g], "{name}: Q8_K block {b}: bsums[{g}]");
        }
    }
    println!("{name}: {} Q8_K blocks bit-identical", want.len());
}

#[test]
fn hc_pre_decode_fused_quant() {
    use ds4_gguf::GgmlType;
    let Some(g) = gpu() else { return };
    let mut r = Rng(23);
    for (hc, e) in [
        (4usize, 4096usize),
        (4, 256),
        (2, 2048),
        (6, 512),
        (4, 16384),
    ] {
        let iters = 20;
        let nm = (2 + hc) * hc;
        let mix = r.vec(nm, 1.0);
        let scale: Vec<f32> = (0..3).map(|_| 0.5 + r.unif()).collect();
        let base = r.vec(nm, 0.5);
        let mut x = r.vec(hc * e, 1.0);
        let mut norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
        if e >= 1024 {
            // An all-zero 256-block (d = 0, q = 0) and, in the next one, a tie of |a| between
            // opposite values (Q8_K takes the first: the sign of every q depends on it).
            for v in &mut norm[256..512] {
                *v = 0.0;
            }
            for h in 0..hc {
                x[h * e + 600] = x[h * e + 520];
            }
            norm[520] = 50.0;
            norm[600] = -50.0;
        }
        let (_, _, _, a_cpu) = cpu_hc_pre(&mix, &scale, &base, hc, iters, &x, e, &norm);
        for (q0, qk) in [
            (Some(GgmlType::Q8_0), Some(GgmlType::IQ2_XXS)),
            (Some(GgmlType::Q8_0), None),
            (None, Some(GgmlType::Q2_K)),
        ] {
            let (a, act0, actk) = g
                .hc_pre_dec_quant(&mix, &scale, &base, hc, 1e-6, &x, e, &norm, 1e-6, q0, qk)
                .unwrap();
            let tag = format!("hc {hc} e {e} q8_0 {} q8_k {}", q0.is_some(), qk.is_some());
            check(&format!("hc_pre_dec_quant a {tag}"), &a, &a_cpu);
            if q0.is_some() {
                check_act_q8_0(&format!("hc_pre_dec_quant {tag}"), &act0, &a);
            }
            if qk.is_some() {
                check_act_q8_k(&format!("hc_pre_dec_quant {tag}"), &actk, &a);
            }
        }
    }
}

#[test]
fn hc_pre_mix_decode_fused() {
    use ds4_gguf::GgmlType;
    use ds4_quant::dot::vec_dot_f16_f32;
    use ds4_quant::f32_to_f16;
    let Some(g) = gpu() else { return };
    let mut r = Rng(31);
    let hc = 4;
    let nm = (2 + hc) * hc;
    for e in [4096usize, 256, 1024, 16384] {
        let he = hc * e;
        let flat = r.vec(he, 1.0);
        let fnw: Vec<u16> = (0..nm * he).map(|_| f32_to_f16(r.normal(0.02))).collect();
        let scale: Vec<f32> = (0..3).map(|_| 0.5 + r.unif()).collect();
        let base = r.vec(nm, 0.5);
        let x = r.vec(he, 1.0);
        let norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
        // CPU: the F16 matvec (f64 accumulation), then the HC pre on that mix.
        let mix: Vec<f32> = (0..nm)
            .map(|row| vec_dot_f16_f32(&fnw[row * he..(row + 1) * he], &flat))
            .collect();
        let (_, _, _, a_cpu) = cpu_hc_pre(&mix, &scale, &base, hc, 20, &x, e, &norm);
        // run 0: the default (cluster-free where it fits), run 1: the cluster kernel always.
        for run in 0..2 {
            g.set_hc_pre_red(run == 0);
            let (gmix, a, act0, actk) = g
                .hc_pre_mix_dec(
                    &mix,
                    Some((&flat, &fnw)),
                    &scale,
                    &base,
                    hc,
                    1e-6,
                    &x,
                    e,
                    &norm,
                    1e-6,
                    Some(GgmlType::Q8_0),
                    Some(GgmlType::IQ2_XXS),
                )
                .unwrap();
            let tag = format!("e {e} run {run}");
            check(&format!("hc_pre_mix_dec mix {tag}"), &gmix, &mix);
            let same = gmix
                .iter()
                .zip(&mix)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            println!("hc_pre_mix_dec mix {tag}: {same}/{nm} bit-identical");
            check(&format!("hc_pre_mix_dec a {tag}"), &a, &a_cpu);
            check_act_q8_0(&format!("hc_pre_mix_dec {tag}"), &act0, &a);
            check_act_q8_k(&format!("hc_pre_mix_dec {tag}"), &actk, &a);
        }
        g.set_hc_pre_red(true);
    }
}

#[test]
fn rms_q8_decode() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(29);
    for dim in [1024usize, 32, 96, 4096, 512] {
        let mut x = r.vec(dim, 1.0);
        if dim >= 96 {
            for v in &mut x[32..64] {
                *v = 0.0; // an all-zero Q8_0 block
            }
        }
        let w: Vec<f32> = (0..dim).map(|_| 1.0 + r.normal(0.15)).collect();
        for (with_w, quant) in [(true, true), (false, true), (true, false)] {
            let mut want = vec![0f32; dim];
            if with_w {
                ops::rms_norm(&x, &w, 1e-6, &mut want);
            } else {
                ops::rms_norm_noweight(&x, 1e-6, &mut want);
            }
            let (out, act) = g
                .rms_q8_dec(&x, if with_w { &w } else { &[] }, 1e-6, quant)
                .unwrap();
            let tag = format!("dim {dim} w {with_w} quant {quant}");
            check(&format!("rms_q8_dec {tag}"), &out, &want);
            if quant {
                check_act_q8_0(&format!("rms_q8_dec {tag}"), &act, &out);
            }
        }
    }
}

#[test]
fn hc_post_decode_and_flat() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(22);
    for (hc, e, k) in [
        (4usize, 4096usize, 1usize),
        (4, 4096, 3),
        (4, 20000, 1),
        (4, 200, 2),
        (3, 1500, 1),
    ] {
        let f = r.vec(e, 1.0);
        let routed = r.vec(k * e, 1.0);
        let x = r.vec(hc * e, 1.0);
        let post: Vec<f32> = (0..hc).map(|_| 2.0 * r.unif()).collect();
        let comb: Vec<f32> = (0..hc * hc).map(|_| r.unif()).collect();
        for with_routed in [false, true] {
            let ft: Vec<f32> = (0..e)
                .map(|d| {
                    if with_routed {
                        let acc: f64 = (0..k).map(|j| routed[j * e + d] as f64).sum();
                        (acc as f32) + f[d]
                    } else {
                        f[d]
                    }
                })
                .collect();
            let mut want = vec![0f32; hc * e];
            ops::hc_post(&ft, &x, &post, &comb, &mut want);
            let mut wflat = vec![0f32; hc * e];
            ops::rms_norm_noweight(&want, 1e-6, &mut wflat);
            for run in 0..2 {
                let (xo, flat) = g
                    .hc_post_dec(
                        &f,
                        with_routed.then_some((&routed[..], k)),
                        &x,
                        &post,
                        &comb,
                        hc,
                        e,
                        1e-6,
                    )
                    .unwrap();
                let tag = format!("hc {hc} e {e} k {k} routed {with_routed} run {run}");
                check(&format!("hc_post_dec {tag}"), &xo, &want);
                check(&format!("hc_post_dec flat {tag}"), &flat, &wflat);
            }
        }
    }
}

/// The wide HC post (no cluster; block partials of Σ xo²) followed by the next site's mix
/// product launch, which finishes the no-weight norm into flat: xo, flat, mix and the site's
/// `a` against the CPU (ops::hc_post, rms_norm_noweight, the F16 matvec, the HC pre).
#[test]
fn hc_post_wide_then_mix() {
    use ds4_quant::dot::vec_dot_f16_f32;
    use ds4_quant::f32_to_f16;
    let Some(g) = gpu() else { return };
    let mut r = Rng(37);
    let hc = 4;
    let nm = (2 + hc) * hc;
    for (e, k) in [(4096usize, 1usize), (4096, 3), (256, 1), (16384, 1)] {
        let he = hc * e;
        let f = r.vec(e, 1.0);
        let routed = r.vec(k * e, 1.0);
        let x = r.vec(he, 1.0);
        let post: Vec<f32> = (0..hc).map(|_| 2.0 * r.unif()).collect();
        let comb: Vec<f32> = (0..hc * hc).map(|_| r.unif()).collect();
        let fnw: Vec<u16> = (0..nm * he).map(|_| f32_to_f16(r.normal(0.02))).collect();
        let scale: Vec<f32> = (0..3).map(|_| 0.5 + r.unif()).collect();
        let base = r.vec(nm, 0.5);
        let norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
        for with_routed in [false, true] {
            let ft: Vec<f32> = (0..e)
                .map(|d| {
                    if with_routed {
                        let acc: f64 = (0..k).map(|j| routed[j * e + d] as f64).sum();
                        (acc as f32) + f[d]
                    } else {
                        f[d]
                    }
                })
                .collect();
            let mut want = vec![0f32; he];
            ops::hc_post(&ft, &x, &post, &comb, &mut want);
            let mut wflat = vec![0f32; he];
            ops::rms_norm_noweight(&want, 1e-6, &mut wflat);
            let mix: Vec<f32> = (0..nm)
                .map(|row| vec_dot_f16_f32(&fnw[row * he..(row + 1) * he], &wflat))
                .collect();
            let (_, _, _, a_cpu) = cpu_hc_pre(&mix, &scale, &base, hc, 20, &want, e, &norm);
            for run in 0..2 {
                let (xo, flat, gmix, a) = g
                    .hc_post_wide_mix(
                        &f,
                        with_routed.then_some((&routed[..], k)),
                        &x,
                        &post,
                        &comb,
                        e,
                        1e-6,
                        &fnw,
                        &scale,
                        &base,
                        &norm,
                    )
                    .unwrap();
                let tag = format!("e {e} k {k} routed {with_routed} run {run}");
                check(&format!("hc_post_wide xo {tag}"), &xo, &want);
                check(&format!("hc_post_wide flat {tag}"), &flat, &wflat);
                check(&format!("hc_post_wide mix {tag}"), &gmix, &mix);
                check(&format!("hc_post_wide a {tag}"), &a, &a_cpu);
                let same = |p: &[f32], q: &[f32]| {
                    p.iter()
                        .zip(q)
                        .filter(|(a, b)| a.to_bits() == b.to_bits())
                        .count()
                };
                println!(
                    "hc_post_wide {tag}: bit-identical xo {}/{he} flat {}/{he} mix {}/{nm} a {}/{e}",
                    same(&xo, &want),
                    same(&flat, &wflat),
                    same(&gmix, &mix),
                    same(&a, &a_cpu)
                );
            }
        }
    }
}

#[test]
fn hc_head_decode() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(23);
    for (hc, e) in [(4usize, 4096usize), (4, 1000), (3, 256), (4, 20000)] {
        let mix = r.vec(hc, 1.0);
        let base = r.vec(hc, 0.5);
        let x = r.vec(hc * e, 1.0);
        let norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
        let (mut w, mut y) = (vec![0f32; hc], vec![0f32; e]);
        ops::hc_head_weights(&mix, 0.8, &base, 1e-6, &mut w);
        ops::hc_collapse(&x, &w, &mut y);
        let mut want = vec![0f32; e];
        ops::rms_norm(&y, &norm, 1e-6, &mut want);
        for run in 0..2 {
            let got = g
                .hc_head_dec(&mix, 0.8, &base, 1e-6, &x, hc, e, &norm, 1e-6)
                .unwrap();
            check(&format!("hc_head_dec hc {hc} e {e} run {run}"), &got, &want);
        }
    }
}

/// One compressor of the decode test: geometry, QAT, weights and the CPU/GPU states.
struct DecComp {
    gm: CompressorGeom,
    qat_mode: i32,
    qat: RowQat,
    ape: Vec<f32>,
    norm: Vec<f32>,
    ck: Vec<f32>,
    cs: Vec<f32>,
    gk: Vec<f32>,
    gs: Vec<f32>,
    cpu_rows: Vec<f32>,
    gpu_rows: Vec<f32>,
}

impl DecComp {
    fn new(r: &mut Rng, gm: CompressorGeom, qat_mode: i32, qat: RowQat, steps: usize) -> DecComp {
        let w = gm.width();
        let (mut ck, mut cs) = (vec![0f32; gm.state_len()], vec![0f32; gm.state_len()]);
        ops::compressor_clear(&mut ck, &mut cs);
        DecComp {
            gm,
            qat_mode,
            qat,
            ape: r.vec(gm.ratio * w, 0.5),
            norm: (0..gm.d_c).map(|_| 1.0 + r.normal(0.15)).collect(),
            gk: ck.clone(),
            gs: cs.clone(),
            ck,
            cs,
            cpu_rows: Vec::new(),
            gpu_rows: vec![0f32; (steps / gm.ratio + 1) * gm.d_c],
        }
    }
}

/// Decode steps 0..steps through `ds4_qkv_dec` against the CPU ops: q heads (norm + RoPE), the
/// KV ring row (norm, RoPE, FP8), both compressors (frontier and emitted rows) and the indexer
/// queries, the state carried from step to step on both sides.
#[allow(clippy::too_many_arguments)]
fn qkv_decode_case(
    g: &GpuOps,
    r: &mut Rng,
    nh: usize,
    hd: usize,
    n_rot: usize,
    qat: bool,
    mut comps: [Option<DecComp>; 2],
    idx: Option<(usize, usize)>,
    steps: usize,
) {
    let (plain, comp_rope) = if n_rot == 64 {
        flash_rope()
    } else {
        (
            RopeParams::plain(n_rot, 10000.0),
            RopeParams::yarn(n_rot, 160000.0, 16.0, 65536.0, 32.0, 1.0),
        )
    };
    let n_nope = hd - n_rot;
    let raw_cap = 8;
    let kv_w: Vec<f32> = (0..hd).map(|_| 1.0 + r.normal(0.15)).collect();
    let mut ring = vec![0f32; raw_cap * hd];
    let (nih, ihd) = idx.unwrap_or((0, 0));
    let wscale = if nih > 0 {
        1.0 / ((ihd * nih) as f64).sqrt()
    } else {
        0.0
    };
    for pos in 0..steps {
        let rope = if pos % 2 == 0 { &plain } else { &comp_rope };
        let q = r.vec(nh * hd, 1.0);
        let kvp = r.vec(hd, 3.0);
        let proj: Vec<(Vec<f32>, Vec<f32>)> = comps
            .iter()
            .map(|c| match c {
                Some(c) => (r.vec(c.gm.width(), 1.0), r.vec(c.gm.width(), 1.0)),
                None => (Vec::new(), Vec::new()),
            })
            .collect();
        let iq = r.vec(nih * ihd, 1.0);
        let iw = r.vec(nih, 1.0);
        let comp_in: Vec<Option<CompDecIn<'_>>> = comps
            .iter()
            .zip(&proj)
            .map(|(c, (ckv, csc))| {
                c.as_ref().map(|c| CompDecIn {
                    g: c.gm,
                    qat_mode: c.qat_mode,
                    ckv,
                    csc,
                    ape: &c.ape,
                    st_kv: &c.gk,
                    st_sc: &c.gs,
                    norm: &c.norm,
                    rows: &c.gpu_rows,
                })
            })
            .collect();
        let out = g
            .qkv_dec(&QkvDecIn {
                pos,
                q: &q,
                nh,
                hd,
                n_rot,
                eps: 1e-6,
                inv: &rope.inv_freq,
                kvp: &kvp,
                kv_w: &kv_w,
                ring: &ring,
                raw_cap,
                qat,
                n_nope,
                comp: [comp_in[0].clone(), comp_in[1].clone()],
                inv_comp: &comp_rope.inv_freq,
                iq: (nih > 0).then_some((&iq[..], &iw[..])),
                nih,
                ihd,
                iqat: qat,
                wscale,
            })
            .unwrap();
        drop(comp_in);
        // q heads.
        let (c, s) = cos_sin(rope, pos);
        let mut wq = q.clone();
        ops::head_rms_norm_inplace(&mut wq, hd, 1e-6);
        ops::rope_heads(&mut wq, hd, &c, &s, false);
        check(&format!("qkv_dec q pos {pos}"), &out.q, &wq);
        // KV ring row.
        let mut want = vec![0f32; hd];
        ops::rms_norm(&kvp, &kv_w, 1e-6, &mut want);
        ops::rope_tail(&mut want, &c, &s, false);
        if qat {
            ops::fp8_kv_qat(&mut want, n_nope);
        }
        let row = pos % raw_cap;
        check(
            &format!("qkv_dec kv pos {pos}"),
            &out.ring[row * hd..(row + 1) * hd],
            &want,
        );
        ring = out.ring;
        // Compressors.
        for (i, (c, (ckv, csc))) in comps.iter_mut().zip(&proj).enumerate() {
            let Some(c) = c else { continue };
            cpu_compressor(
                c.gm,
                ckv,
                csc,
                &c.ape,
                &mut c.ck,
                &mut c.cs,
                &c.norm,
                &comp_rope,
                c.qat,
                &mut c.cpu_rows,
                pos,
                1,
            );
            let (rows, k2, s2) = out.comp[i].clone().expect("compressor output");
            c.gpu_rows = rows;
            c.gk = k2;
            c.gs = s2;
            let nr = (pos + 1) / c.gm.ratio;
            let tag = format!("ratio {} d_c {} pos {pos}", c.gm.ratio, c.gm.d_c);
            check(
                &format!("qkv_dec comp rows {tag}"),
                &c.gpu_rows[..nr * c.gm.d_c],
                &c.cpu_rows,
            );
            check(&format!("qkv_dec comp state_kv {tag}"), &c.gk, &c.ck);
            check(&format!("qkv_dec comp state_score {tag}"), &c.gs, &c.cs);
        }
        // Indexer queries.
        if nih > 0 {
            let (gq, gw) = out.iq.clone().expect("indexer output");
            let (ci, si) = cos_sin(&comp_rope, pos);
            let mut wq = iq.clone();
            for h in wq.chunks_exact_mut(ihd) {
                ops::rope_tail(h, &ci, &si, false);
                if qat {
                    ops::indexer_qat(h);
                }
            }
            let ww: Vec<f32> = iw.iter().map(|&v| (v as f64 * wscale) as f32).collect();
            check(&format!("qkv_dec iq pos {pos}"), &gq, &wq);
            check(&format!("qkv_dec iw pos {pos}"), &gw, &ww);
        }
    }
}

#[test]
fn qkv_decode_csa() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(24);
    let steps = 14;
    let c0 = DecComp::new(
        &mut r,
        CompressorGeom {
            ratio: 4,
            overlap: true,
            d_c: 512,
        },
        1,
        RowQat::Fp8 { n_nope: 448 },
        steps,
    );
    let c1 = DecComp::new(
        &mut r,
        CompressorGeom {
            ratio: 4,
            overlap: true,
            d_c: 128,
        },
        2,
        RowQat::Indexer,
        steps,
    );
    qkv_decode_case(
        &g,
        &mut r,
        16,
        512,
        64,
        true,
        [Some(c0), Some(c1)],
        Some((64, 128)),
        steps,
    );
}

#[test]
fn qkv_decode_hca_and_plain() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(25);
    // HCA: one window of 128 completes at step 127.
    let steps = 131;
    let c0 = DecComp::new(
        &mut r,
        CompressorGeom {
            ratio: 128,
            overlap: false,
            d_c: 512,
        },
        1,
        RowQat::Fp8 { n_nope: 448 },
        steps,
    );
    qkv_decode_case(&g, &mut r, 8, 512, 64, true, [Some(c0), None], None, steps);
    // No compressor, QAT off.
    qkv_decode_case(&g, &mut r, 8, 512, 64, false, [None, None], None, 5);
    // Ratio 16 without QAT.
    let c0 = DecComp::new(
        &mut r,
        CompressorGeom {
            ratio: 16,
            overlap: false,
            d_c: 512,
        },
        0,
        RowQat::Off,
        40,
    );
    qkv_decode_case(&g, &mut r, 4, 512, 64, false, [Some(c0), None], None, 40);
}

#[test]
fn qkv_decode_tiny_shapes() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(26);
    // The tiny fixture: head_dim 128, 16 RoPE dims, indexer heads of 32.
    let steps = 10;
    let c0 = DecComp::new(
        &mut r,
        CompressorGeom {
            ratio: 4,
            overlap: true,
            d_c: 128,
        },
        1,
        RowQat::Fp8 { n_nope: 112 },
        steps,
    );
    let c1 = DecComp::new(
        &mut r,
        CompressorGeom {
            ratio: 4,
            overlap: true,
            d_c: 32,
        },
        2,
        RowQat::Indexer,
        steps,
    );
    qkv_decode_case(
        &g,
        &mut r,
        4,
        128,
        16,
        true,
        [Some(c0), Some(c1)],
        Some((64, 32)),
        steps,
    );
}

#[test]
fn attention_decode() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(27);
    let (plain, comp) = flash_rope();
    let tiny = RopeParams::yarn(16, 160000.0, 16.0, 65536.0, 32.0, 1.0);
    // (nh, hd, n_rot, ratio, has_indexer, pos, rope)
    for (nh, hd, n_rot, ratio, has_idx, pos, rope) in [
        (64usize, 512usize, 64usize, 0usize, false, 5usize, &plain),
        (64, 512, 64, 0, false, 300, &plain),
        (64, 512, 64, 4, true, 12000, &comp), // nv 3000 > topk 512: selection
        (64, 512, 64, 4, true, 1000, &comp),  // nv 250: every row
        (16, 512, 64, 128, false, 5000, &comp),
        (4, 128, 16, 4, true, 200, &tiny),
        (64, 512, 64, 128, false, 200000, &comp), // 1562 compressed rows: many steps per warp
        (12, 192, 64, 4, true, 2500, &comp),      // heads not a multiple of 8, selection
        (20, 64, 16, 4, false, 60, &tiny),        // a short context: idle chunks
    ] {
        let (window, topk) = (128usize, if hd == 512 { 512usize } else { 16 });
        let raw_cap = window + 3;
        let ring = r.vec(raw_cap * hd, 1.0);
        let nv = (pos + 1).checked_div(ratio).unwrap_or(0);
        let compr = r.vec(nv.max(1) * hd, 1.0);
        let q = r.vec(nh * hd, 0.3);
        let sinks = r.vec(nh, 1.0);
        let mut isel = vec![0i32; topk];
        let sel: Option<Vec<u32>> = (has_idx && nv > topk).then(|| {
            let mut picks: Vec<i32> = (0..nv as i32).filter(|i| i % 3 != 1).collect();
            picks.truncate(topk);
            picks.sort_unstable();
            isel.copy_from_slice(&picks);
            picks.iter().map(|&v| v as u32).collect()
        });
        let scale = 1.0 / (hd as f32).sqrt();
        let lo = (pos + 1).saturating_sub(window);
        let mut raw = Vec::new();
        for pp in lo..=pos {
            let row = pp % raw_cap;
            raw.extend_from_slice(&ring[row * hd..(row + 1) * hd]);
        }
        let (c, s) = cos_sin(rope, pos);
        let mut want = vec![0f32; nh * hd];
        let (mut b1, mut b2) = (Vec::new(), Vec::new());
        for h in 0..nh {
            let out = &mut want[h * hd..(h + 1) * hd];
            ops::attention_head(
                &q[h * hd..(h + 1) * hd],
                &raw,
                &compr,
                nv,
                sel.as_deref(),
                sinks[h],
                scale,
                &mut b1,
                &mut b2,
                out,
            );
            ops::rope_tail(out, &c, &s, true);
        }
        let run = |with_q8| {
            g.attention_dec(
                with_q8,
                &q,
                &ring,
                raw_cap,
                window,
                &compr,
                ratio,
                has_idx,
                &isel,
                topk,
                &sinks,
                scale,
                nh,
                hd,
                n_rot,
                &rope.inv_freq,
                pos,
            )
            .unwrap()
        };
        let tag = format!("attention_dec nh {nh} hd {hd} ratio {ratio} pos {pos}");
        let (got, _) = run(false);
        check(&tag, &got, &want);
        println!("{tag}: {} elements differ in bits", bit_diffs(&got, &want));
        // The fused Q8_0 activation: the same heads, and the bytes ds4_quant_q8_0 writes.
        let (got_q8, act) = run(true);
        assert_eq!(bit_diffs(&got_q8, &got), 0, "{tag}: heads with q8");
        check_act_q8_0(&format!("{tag} q8"), &act.unwrap(), &got);
    }
}

/// Elements of `got` that differ from `want` in their bits (printed by the chunk tests: the
/// kernels compute every element with the reference's expressions, so only a differently
/// ordered f64 sum of squares can move a value, by an ulp at a tie).
fn bit_diffs(got: &[f32], want: &[f32]) -> usize {
    got.iter()
        .zip(want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count()
}

/// HC pre at prefill-chunk size and Flash dims (hc 4, e 4096); the token count is not a
/// multiple of the kernel's 8 tokens per block.
#[test]
fn hc_pre_chunk_flash_dims() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(21);
    let (hc, e, n, iters) = (4usize, 4096usize, 2043usize, 20usize);
    let nm = (2 + hc) * hc;
    let mix = r.vec(n * nm, 1.0);
    let scale: Vec<f32> = (0..3).map(|_| 0.5 + r.unif()).collect();
    let base = r.vec(nm, 0.5);
    let x = r.vec(n * hc * e, 1.0);
    let norm: Vec<f32> = (0..e).map(|_| 1.0 + r.normal(0.15)).collect();
    let out = g
        .hc_pre(&mix, &scale, &base, hc, iters, 1e-6, &x, e, &norm, 1e-6, n)
        .unwrap();
    let (mut pre, mut post, mut comb) =
        (vec![0f32; hc], vec![0f32; n * hc], vec![0f32; n * hc * hc]);
    let (mut xin, mut a) = (vec![0f32; n * e], vec![0f32; n * e]);
    for t in 0..n {
        ops::hc_split(
            &mix[t * nm..(t + 1) * nm],
            &scale,
            &base,
            hc,
            iters,
            1e-6,
            &mut pre,
            &mut post[t * hc..(t + 1) * hc],
            &mut comb[t * hc * hc..(t + 1) * hc * hc],
        );
        ops::hc_collapse(
            &x[t * hc * e..(t + 1) * hc * e],
            &pre,
            &mut xin[t * e..(t + 1) * e],
        );
        let xi = xin[t * e..(t + 1) * e].to_vec();
        ops::rms_norm(&xi, &norm, 1e-6, &mut a[t * e..(t + 1) * e]);
    }
    check("hc_pre chunk post", &out.post, &post);
    check("hc_pre chunk comb", &out.comb, &comb);
    check("hc_pre chunk xin", &out.xin, &xin);
    check("hc_pre chunk a", &out.a, &a);
    // post/comb go through f64 exp (CUDA's vs the host libm's may differ by an ulp, which
    // moves the f32 result with probability ~2^-29), so the bit counts are printed only.
    for (name, got, want) in [
        ("post", &out.post, &post),
        ("comb", &out.comb, &comb),
        ("xin", &out.xin, &xin),
        ("a", &out.a, &a),
    ] {
        println!(
            "hc_pre chunk {name}: {} of {} differ in bits",
            bit_diffs(got, want),
            want.len()
        );
    }
}

/// HC post + flat at prefill-chunk size and Flash dims, without and with the routed sum (k = 1
/// as in the FFN sublayer, k = 2).
#[test]
fn hc_post_chunk_flash_dims() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(22);
    let (hc, e, n) = (4usize, 4096usize, 2048usize);
    let f = r.vec(n * e, 1.0);
    let routed = r.vec(n * 2 * e, 1.0);
    let x = r.vec(n * hc * e, 1.0);
    let post: Vec<f32> = (0..n * hc).map(|_| 2.0 * r.unif()).collect();
    let comb: Vec<f32> = (0..n * hc * hc).map(|_| r.unif()).collect();
    for k in [0usize, 1, 2] {
        let (xo, flat) = g
            .hc_post(
                &f,
                (k > 0).then_some((&routed[..n * k * e], k)),
                &x,
                &post,
                &comb,
                hc,
                e,
                1e-6,
                n,
            )
            .unwrap();
        let mut want = vec![0f32; n * hc * e];
        let mut wflat = vec![0f32; n * hc * e];
        let mut ft = vec![0f32; e];
        for t in 0..n {
            for (d, o) in ft.iter_mut().enumerate() {
                *o = if k > 0 {
                    let acc: f64 = (0..k).map(|j| routed[(t * k + j) * e + d] as f64).sum();
                    (acc as f32) + f[t * e + d]
                } else {
                    f[t * e + d]
                };
            }
            ops::hc_post(
                &ft,
                &x[t * hc * e..(t + 1) * hc * e],
                &post[t * hc..(t + 1) * hc],
                &comb[t * hc * hc..(t + 1) * hc * hc],
                &mut want[t * hc * e..(t + 1) * hc * e],
            );
            ops::rms_norm_noweight(
                &want[t * hc * e..(t + 1) * hc * e],
                1e-6,
                &mut wflat[t * hc * e..(t + 1) * hc * e],
            );
        }
        check(&format!("hc_post chunk (k {k})"), &xo, &want);
        check(&format!("hc_post chunk flat (k {k})"), &flat, &wflat);
        assert_eq!(bit_diffs(&xo, &want), 0, "hc_post chunk bits (k {k})");
        println!(
            "hc_post chunk flat (k {k}): {} of {} differ in bits",
            bit_diffs(&flat, &wflat),
            flat.len()
        );
    }
}

/// Q heads at prefill-chunk size and Flash dims (64 heads × 512, rope 64), and a head count
/// that is not a multiple of the kernel's two heads per warp.
#[test]
fn q_heads_norm_rope_chunk_flash_dims() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(23);
    let (_, comp) = flash_rope();
    for (nh, hd, n, pos0) in [
        (64usize, 512usize, 2048usize, 4096usize),
        (7, 512, 5, 3),
        (3, 128, 4, 100),
    ] {
        let q = r.vec(n * nh * hd, 1.0);
        let got = g
            .head_norm_rope(&q, nh, hd, 64, 1e-6, &comp.inv_freq, pos0, n)
            .unwrap();
        let mut want = q.clone();
        for t in 0..n {
            let (c, s) = cos_sin(&comp, pos0 + t);
            let qt = &mut want[t * nh * hd..(t + 1) * nh * hd];
            ops::head_rms_norm_inplace(qt, hd, 1e-6);
            ops::rope_heads(qt, hd, &c, &s, false);
        }
        check(
            &format!("head_norm_rope chunk {nh}x{hd} n {n}"),
            &got,
            &want,
        );
        println!(
            "head_norm_rope chunk {nh}x{hd} n {n}: {} of {} differ in bits",
            bit_diffs(&got, &want),
            got.len()
        );
    }
}

/// RMSNorm rows at prefill-chunk size (2048 rows of the 1024-wide q_a output: the warp-per-row
/// path), a row count that is not a multiple of its 8 rows per block, short rows and a width
/// that is not a multiple of 4 (the block path).
#[test]
fn rms_norm_rows_chunk() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(24);
    for (rows, dim) in [(2048usize, 1024usize), (13, 96), (5, 1022), (9, 4)] {
        let x = r.vec(rows * dim, 2.0);
        let w: Vec<f32> = (0..dim).map(|_| 1.0 + r.normal(0.15)).collect();
        let got = g.rms_norm_rows(&x, dim, Some(&w), 1e-6).unwrap();
        let mut want = vec![0f32; x.len()];
        for (o, xr) in want.chunks_mut(dim).zip(x.chunks(dim)) {
            ops::rms_norm(xr, &w, 1e-6, o);
        }
        check(&format!("rms_norm chunk {rows}x{dim}"), &got, &want);
        println!(
            "rms_norm chunk {rows}x{dim}: {} of {} differ in bits",
            bit_diffs(&got, &want),
            got.len()
        );
        let got = g.rms_norm_rows(&x, dim, None, 1e-6).unwrap();
        for (o, xr) in want.chunks_mut(dim).zip(x.chunks(dim)) {
            ops::rms_norm_noweight(xr, 1e-6, o);
        }
        check(
            &format!("rms_norm_noweight chunk {rows}x{dim}"),
            &got,
            &want,
        );
    }
}

/// Directional steering (`ds4_dir_steer`) against `ops::dir_steer`, bit for bit: the kernel's
/// f64 dot product adds the exact products in the order `ops::steer_dot` defines, and the edit
/// is the same f64 expression rounded once, so no tolerance is needed. Flash width (4096) and
/// widths that are not a multiple of the 256 lanes; 1 to 8 slots of random unit directions
/// (one of them zero) with positive and negative scales; in place (attention site), from a
/// separate input, and with the FFN sum `routed + f` formed first.
#[test]
fn dir_steer_bit_identical() {
    let Some(g) = gpu() else { return };
    let mut r = Rng(31);
    for (e, n, nslot) in [
        (4096usize, 3usize, 1usize),
        (4096, 37, 2),
        (4096, 1, 8),
        (256, 5, 3),
        (300, 4, 8),
        (7, 2, 2),
    ] {
        let f = r.vec(n * e, 1.5);
        let routed = r.vec(n * e, 1.0);
        let mut dirs: Vec<Vec<f32>> = (0..nslot)
            .map(|_| {
                let v = r.vec(e, 1.0);
                let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
                v.iter().map(|&x| (x as f64 / norm) as f32).collect()
            })
            .collect();
        if nslot > 2 {
            dirs[1] = vec![0.0; e];
        }
        let scales: Vec<f32> = (0..nslot)
            .map(|i| [1.0f32, -1.0, 2.5, -0.75, 0.5, 100.0, -100.0, 1.0][i])
            .collect();
        let slots: Vec<(&[f32], f32)> = dirs
            .iter()
            .zip(&scales)
            .map(|(d, &s)| (d.as_slice(), s))
            .collect();
        for (with_routed, in_place) in [(false, true), (false, false), (true, false)] {
            let got = g
                .dir_steer(
                    &f,
                    with_routed.then_some(routed.as_slice()),
                    e,
                    n,
                    &slots,
                    in_place,
                )
                .unwrap();
            let mut want: Vec<f32> = if with_routed {
                routed.iter().zip(&f).map(|(&a, &b)| a + b).collect()
            } else {
                f.clone()
            };
            for row in want.chunks_mut(e) {
                for &(d, s) in &slots {
                    ops::dir_steer(row, d, s);
                }
            }
            let name = format!("dir_steer e {e} n {n} slots {nslot} routed {with_routed}");
            check(&name, &got, &want);
            assert_eq!(bit_diffs(&got, &want), 0, "{name}: bits");
            // The edit did something (so the comparison above can fail).
            assert_ne!(bit_diffs(&got, &f), 0, "{name}: steering changed nothing");
        }
    }
}
