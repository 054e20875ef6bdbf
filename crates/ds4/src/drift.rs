//! `ds4 drift A.npy B.npy`: compare two logit dumps row by row with the metrics of ds4 PR #15
//! (`compare_logit_drift.py`): whole-vocab rms, max_abs, top-20 max_abs, top-5 / top-20 overlap,
//! same top-1, max rank delta of the reference's top-20, non-finite count; pass/fail against an
//! envelope given on the command line. Either file may also be antirez/ds4's `--dump-logits`
//! JSON (one row: the logits after the prompt, `null` for non-finite values), or a ds4-bench /
//! `ds4 bench --dump-frontier-logits-dir` `frontier_NNNNNN.logits.json` (the same `logits`
//! array), so a ds4-rs dump can be held against ds4's own.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ds4_model::npy;

#[derive(clap::Args)]
pub struct Args {
    /// Reference logits (.npy, float32 [rows, vocab] or [vocab]; or ds4's `--dump-logits`
    /// JSON or a bench frontier_NNNNNN.logits.json, one row).
    reference: PathBuf,
    /// Candidate logits (same shape).
    candidate: PathBuf,
    /// Print JSON (per-row metrics and the summary) instead of a table.
    #[arg(long)]
    json: bool,
    /// Fail if any row's rms exceeds this.
    #[arg(long)]
    max_rms: Option<f64>,
    /// Fail if any row's top-20 max_abs exceeds this.
    #[arg(long)]
    max_top20_abs: Option<f64>,
    /// Fail if any row's max_abs exceeds this.
    #[arg(long)]
    max_abs: Option<f64>,
    /// Fail if any row's top-20 overlap is below this.
    #[arg(long)]
    min_top20_overlap: Option<usize>,
    /// Fail if any row's top-5 overlap is below this.
    #[arg(long)]
    min_top5_overlap: Option<usize>,
    /// Allow top-1 mismatches (by default any mismatch fails).
    #[arg(long)]
    allow_top1_mismatch: bool,
}

/// Drift metrics of one row.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RowDrift {
    pub row: usize,
    pub same_top1: bool,
    pub top5_overlap: usize,
    pub top20_overlap: usize,
    pub max_rank_delta: usize,
    pub rms: f64,
    pub max_abs: f64,
    pub top20_max_abs: f64,
    pub nonfinite: usize,
}

/// Ids of the k largest finite logits, descending (ties: lower id first).
fn topk(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).filter(|&i| x[i].is_finite()).collect();
    let cmp = |a: &usize, b: &usize| x[*b].total_cmp(&x[*a]).then(a.cmp(b));
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx
}

/// Compare one row.
pub fn compare_row(row: usize, r: &[f32], c: &[f32]) -> RowDrift {
    let mut ss = 0.0f64;
    let mut max_abs = 0.0f64;
    let mut nonfinite = 0;
    for (a, b) in r.iter().zip(c) {
        if a.is_finite() && b.is_finite() {
            let d = (*b as f64) - (*a as f64);
            ss += d * d;
            max_abs = max_abs.max(d.abs());
        } else {
            nonfinite += 1;
        }
    }
    let rms = (ss / r.len().max(1) as f64).sqrt();
    let tr = topk(r, 20);
    let tc = topk(c, 20);
    let overlap = |k: usize| {
        tr.iter()
            .take(k)
            .filter(|i| tc.iter().take(k).any(|j| j == *i))
            .count()
    };
    let mut max_rank_delta = 0;
    for (rank_r, id) in tr.iter().enumerate() {
        if let Some(rank_c) = tc.iter().position(|j| j == id) {
            max_rank_delta = max_rank_delta.max(rank_r.abs_diff(rank_c));
        }
    }
    let mut top20_max_abs = 0.0f64;
    for &i in tr.iter().chain(&tc) {
        if r[i].is_finite() && c[i].is_finite() {
            top20_max_abs = top20_max_abs.max(((c[i] as f64) - (r[i] as f64)).abs());
        }
    }
    RowDrift {
        row,
        same_top1: tr.first() == tc.first(),
        top5_overlap: overlap(5),
        top20_overlap: overlap(20),
        max_rank_delta,
        rms,
        max_abs,
        top20_max_abs,
        nonfinite,
    }
}

/// ds4's `--dump-logits` JSON: `{"source":"ds4", …, "vocab":V, "logits":[V numbers or null]}`.
fn load_ds4_json(p: &std::path::Path, bytes: &[u8]) -> Result<(usize, usize, Vec<f32>)> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .with_context(|| format!("{} is neither .npy nor JSON", p.display()))?;
    let arr = v["logits"].as_array().with_context(|| {
        format!(
            "{}: no \"logits\" array (ds4 --dump-logits JSON)",
            p.display()
        )
    })?;
    let data: Vec<f32> = arr
        .iter()
        .map(|x| match x {
            serde_json::Value::Null => Ok(f32::NAN),
            x => x
                .as_f64()
                .map(|f| f as f32)
                .context("a logit that is not a number"),
        })
        .collect::<Result<_>>()
        .with_context(|| format!("{}: bad \"logits\"", p.display()))?;
    if let Some(vocab) = v["vocab"].as_u64()
        && vocab as usize != data.len()
    {
        bail!(
            "{}: \"vocab\" {vocab} but {} logits",
            p.display(),
            data.len()
        );
    }
    Ok((1, data.len(), data))
}

fn load(p: &PathBuf) -> Result<(usize, usize, Vec<f32>)> {
    let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
    if bytes.first() == Some(&b'{') {
        return load_ds4_json(p, &bytes);
    }
    let a = npy::from_bytes(&bytes).with_context(|| format!("cannot read {}", p.display()))?;
    let data = a
        .to_f32()
        .with_context(|| format!("{}: not a float array", p.display()))?;
    let (rows, cols) = match a.shape.as_slice() {
        [v] => (1, *v),
        [r, v] => (*r, *v),
        s => bail!("{}: expected 1 or 2 dimensions, got {s:?}", p.display()),
    };
    Ok((rows, cols, data))
}

pub fn run(a: Args) -> Result<()> {
    let (rr, rv, r) = load(&a.reference)?;
    let (cr, cv, c) = load(&a.candidate)?;
    if rv != cv {
        bail!("vocab sizes differ: {rv} vs {cv}");
    }
    if rr.min(cr) == 0 {
        bail!("no rows to compare ({rr} vs {cr})");
    }
    if rr != cr {
        eprintln!(
            "ds4: warning: row counts differ ({rr} vs {cr}); comparing the first {}",
            rr.min(cr)
        );
    }
    let rows = rr.min(cr);
    let per: Vec<RowDrift> = (0..rows)
        .map(|i| compare_row(i, &r[i * rv..(i + 1) * rv], &c[i * rv..(i + 1) * rv]))
        .collect();
    let mut failures: Vec<String> = Vec::new();
    for d in &per {
        let mut f = |why: String| failures.push(format!("row {}: {why}", d.row));
        if d.nonfinite > 0 {
            f(format!("{} non-finite logits", d.nonfinite));
        }
        if !a.allow_top1_mismatch && !d.same_top1 {
            f("top-1 differs".into());
        }
        if a.max_rms.is_some_and(|m| d.rms > m) {
            f(format!("rms {:.4}", d.rms));
        }
        if a.max_abs.is_some_and(|m| d.max_abs > m) {
            f(format!("max_abs {:.4}", d.max_abs));
        }
        if a.max_top20_abs.is_some_and(|m| d.top20_max_abs > m) {
            f(format!("top20_max_abs {:.4}", d.top20_max_abs));
        }
        if a.min_top20_overlap.is_some_and(|m| d.top20_overlap < m) {
            f(format!("top20 overlap {}/20", d.top20_overlap));
        }
        if a.min_top5_overlap.is_some_and(|m| d.top5_overlap < m) {
            f(format!("top5 overlap {}/5", d.top5_overlap));
        }
    }
    let worst = |g: fn(&RowDrift) -> f64| per.iter().map(g).fold(0.0f64, f64::max);
    let summary = serde_json::json!({
        "rows": rows,
        "vocab": rv,
        "top1_mismatch": per.iter().filter(|d| !d.same_top1).count(),
        "min_top5_overlap": per.iter().map(|d| d.top5_overlap).min().unwrap_or(5),
        "min_top20_overlap": per.iter().map(|d| d.top20_overlap).min().unwrap_or(20),
        "worst_rank_delta": per.iter().map(|d| d.max_rank_delta).max().unwrap_or(0),
        "worst_rms": worst(|d| d.rms),
        "worst_max_abs": worst(|d| d.max_abs),
        "worst_top20_max_abs": worst(|d| d.top20_max_abs),
        "nonfinite": per.iter().map(|d| d.nonfinite).sum::<usize>(),
        "pass": failures.is_empty(),
        "failures": failures,
    });
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "summary": summary, "rows": per }))?
        );
    } else {
        println!(
            "{:>5} {:>5} {:>5} {:>6} {:>5} {:>10} {:>10} {:>12}",
            "row", "top1", "top5", "top20", "rankΔ", "rms", "max_abs", "top20_abs"
        );
        for d in &per {
            println!(
                "{:>5} {:>5} {:>5} {:>6} {:>5} {:>10.5} {:>10.5} {:>12.5}",
                d.row,
                if d.same_top1 { "same" } else { "DIFF" },
                d.top5_overlap,
                d.top20_overlap,
                d.max_rank_delta,
                d.rms,
                d.max_abs,
                d.top20_max_abs
            );
        }
        println!("summary: {summary}");
    }
    if !failures.is_empty() {
        bail!("drift outside the envelope: {}", failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_rows_have_no_drift() {
        let r: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let d = compare_row(0, &r, &r);
        assert!(d.same_top1 && d.top20_overlap == 20 && d.top5_overlap == 5);
        assert_eq!(
            (d.rms, d.max_abs, d.max_rank_delta, d.nonfinite),
            (0.0, 0.0, 0, 0)
        );
    }

    #[test]
    fn metrics_of_a_swap() {
        let mut r: Vec<f32> = (0..50).map(|i| -(i as f32)).collect();
        let mut c = r.clone();
        c.swap(0, 1); // top-1 and top-2 swap: rank delta 1, |Δ| = 1 on two ids
        let d = compare_row(3, &r, &c);
        assert!(!d.same_top1);
        assert_eq!(d.max_rank_delta, 1);
        assert_eq!(d.top20_overlap, 20);
        assert!((d.max_abs - 1.0).abs() < 1e-12 && (d.top20_max_abs - 1.0).abs() < 1e-12);
        assert!((d.rms - (2.0f64 / 50.0).sqrt()).abs() < 1e-12);
        r[7] = f32::NAN;
        assert_eq!(compare_row(0, &r, &c).nonfinite, 1);
        // A token pushed out of the top 20.
        let mut c2 = r.clone();
        c2[19] = -100.0;
        let d2 = compare_row(0, &r, &c2);
        assert_eq!(d2.top20_overlap, 19);
    }
}
