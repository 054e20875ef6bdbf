//! Op-level tests: every forward-pass kernel of `kernels/fwd.cu` against its `ds4_model::ops`
//! reference on random inputs. Skipped (with a printed line) without a CUDA device.
//!
//! Tolerances. The kernels accumulate in f64 where the reference does and are compiled without
//! FMA contraction, so element-wise results are expected to equal the reference up to the
//! rounding of a differently ordered f64 sum: `|got − want| ≤ 1e-6 · max(1, |want|)` for
//! every float output (REL below). QAT round trips (FP8, Hadamard+FP4) and selections
//! (top-k, router) must match exactly given those inputs.
#![cfg(feature = "cuda")]

use ds4_cuda::optest::GpuOps;
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
    for dim in [128usize, 1024, 4096, 16384] {
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
    for (ne, k) in [(256usize, 6usize), (8, 3)] {
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
