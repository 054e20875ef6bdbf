//! `ds4 bench`: ds4-bench's throughput sweep (ds4-features.md §3.1), plus the bandwidth columns
//! of the benchmark protocol (performance.md §5.4), and `ds4 bench --plot` (an SVG of a CSV).
//!
//! Method, as ds4-bench: load the model once; build one fixed token sequence (a text file's
//! tokens repeated to fill, `--chat-prompt-file`'s no-thinking chat rendering, or seeded random
//! ids); walk the frontiers `ctx-start, …, ctx-max`.
//! At each frontier: sync the session to the prefix (only the new interval is prefilled, and
//! timed: `prefill_tps`); snapshot the session (untimed; its size is `kvcache_bytes`); run
//! exactly `--gen-tokens` greedy decode steps with EOS excluded (timed: `gen_tps`); restore the
//! snapshot (untimed); write one CSV row (and, with `--dump-frontier-logits-dir`, the
//! frontier's logits as ds4-bench's JSON, untimed, before the snapshot). With `--whole-prompt` the session is emptied before
//! each frontier, so `prefill_tps` is the cold prefill of the whole prompt (performance.md §5.4).
//! Before the first frontier, one untimed warm-up prefill of the first frontier's prompt and one
//! decode step (then emptied) loads what the backend loads lazily on first use (CUDA modules,
//! cuBLAS kernels, the decode step's CUDA graphs), as llama-bench's warm-up run does.
//!
//! Extra columns: `card` (GPU name or `cpu`), `backend`, `commit`, `decode_bytes_per_token`
//! (weights one decode step reads + the KV rows it reads, averaged over the decoded steps),
//! `gen_gbps` (= bytes × gen_tps / 1e9) and `pct_of_floor` (= 100 · gen_gbps / bandwidth: the
//! share of the card's bandwidth floor reached; empty without a known bandwidth).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ds4_model::{Model, Plan, Session, SessionOptions, Shape};

use crate::common::{self, BackendChoice, LoadArgs};

/// ds4-bench's columns, then ours.
pub const CSV_HEADER: &str = "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes,\
card,backend,commit,decode_bytes_per_token,gen_gbps,pct_of_floor";

/// Spec memory bandwidth by card name, GB/s (performance.md: "NVIDIA H100 80GB (3.35 TB/s)
/// and H200 141GB (4.8 TB/s)"; §1.3 floors use these spec figures, §5.5 targets are % of the
/// spec floor; the H100's measured streaming read is 3.10 TB/s, §1.0 — pass it with
/// `--bandwidth-gbps 3100` to rate against the measured floor).
pub fn default_bandwidth_gbps(card: &str) -> Option<f64> {
    let c = card.to_ascii_uppercase();
    if c.contains("H200") {
        Some(4800.0)
    } else if c.contains("H100") && !c.contains("PCIE") && !c.contains("NVL") {
        // The SXM H100 80GB HBM3; the PCIe (2.0 TB/s) and NVL (3.9 TB/s) parts differ.
        Some(3350.0)
    } else {
        None
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Raw benchmark text (tokenized without template; its tokens are repeated to reach
    /// --ctx-max). Default: seeded random token ids.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Render FILE as one no-thinking chat user message after the system text (--system), as
    /// `ds4 run --nothink --prompt-file FILE` does; the rendered prompt must have at least
    /// --ctx-max tokens (it is not repeated).
    #[arg(long, value_name = "FILE", conflicts_with = "prompt_file")]
    pub chat_prompt_file: Option<PathBuf>,
    /// System text of --chat-prompt-file ("" removes it; also `-sys`) [default: "You are a
    /// helpful assistant." (ds4-bench's, with the period)].
    #[arg(long = "system", value_name = "TEXT", requires = "chat_prompt_file")]
    pub system: Option<String>,
    /// Write DIR/frontier_NNNNNN.logits.json at every frontier (ds4-bench's JSON: the full
    /// next-token logits after the frontier's prefix; `ds4 drift` reads it). DIR must exist.
    #[arg(long, value_name = "DIR")]
    pub dump_frontier_logits_dir: Option<PathBuf>,
    /// Seed of the random token prompt.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// First measured frontier.
    #[arg(long, default_value_t = 2048)]
    pub ctx_start: usize,
    /// Last measured frontier.
    #[arg(long, default_value_t = 32768)]
    pub ctx_max: usize,
    /// Allocated context (default: ctx-max + gen-tokens + 1).
    #[arg(long)]
    pub ctx_alloc: Option<usize>,
    /// Linear step between frontiers (when --step-mul is 1).
    #[arg(long, default_value_t = 2048)]
    pub step_incr: usize,
    /// Geometric step (next = ceil(cur × F)); 1 = linear.
    #[arg(long, default_value_t = 1.0)]
    pub step_mul: f64,
    /// Greedy decode tokens per frontier (EOS excluded).
    #[arg(
        short = 'n',
        long = "gen-tokens",
        visible_alias = "tokens",
        default_value_t = 128
    )]
    pub gen_tokens: usize,
    /// Prefill the whole prompt of each frontier from an empty session (performance.md §5.4's
    /// prefill throughput: `prefill_tps` = frontier / time of a cold prefill) instead of only
    /// the new slice since the previous frontier.
    #[arg(long)]
    pub whole_prompt: bool,
    /// Skip the untimed warm-up prefill (profilers that count every kernel).
    #[arg(long)]
    pub no_warmup: bool,
    /// Tokens per prefill chunk, on CUDA also the tokens of one pass (sizes its scratch).
    /// Default: 8192 on CUDA (smaller if the device memory left after the weights is short),
    /// 2048 on the CPU (ds4's).
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// Write the CSV here instead of stdout.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// The card's memory bandwidth in GB/s for pct_of_floor (default by card name: H200 4800,
    /// H100 3350, the spec figures of performance.md; none for the CPU).
    #[arg(long)]
    pub bandwidth_gbps: Option<f64>,
    /// Plot mode: read these bench CSVs (one series each) and write an SVG; no model is loaded.
    #[arg(long, value_name = "IN.csv", num_args = 1..)]
    pub plot: Vec<PathBuf>,
    /// SVG output of --plot (default: the first CSV with the extension .svg).
    #[arg(short = 'o', long, requires = "plot")]
    pub output: Option<PathBuf>,
    /// Title of the plot.
    #[arg(long, requires = "plot")]
    pub title: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Frontiers

/// The measured frontiers: `start`, then `cur + incr` (when `mul == 1`) or `ceil(cur × mul)`
/// (at least `cur + 1`), capped at `max`, ending with `max` (ds4-bench's `next_frontier`).
pub fn frontiers(start: usize, max: usize, incr: usize, mul: f64) -> Result<Vec<usize>> {
    if start == 0 {
        bail!("--ctx-start must be at least 1");
    }
    if start > max {
        bail!("--ctx-start must be <= --ctx-max");
    }
    if !mul.is_finite() || mul < 1.0 {
        bail!("--step-mul must be >= 1");
    }
    if mul == 1.0 && incr == 0 {
        bail!("--step-incr must be positive when --step-mul is 1");
    }
    let mut out = vec![start];
    let mut cur = start;
    while cur < max {
        let next = if mul == 1.0 {
            cur.saturating_add(incr)
        } else {
            let v = (cur as f64 * mul).ceil();
            let n = if v >= max as f64 { max } else { v as usize };
            n.max(cur + 1)
        };
        cur = next.min(max);
        out.push(cur);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Bytes read per decode step

/// Bytes of weights one decode step reads, from the model's tensor directory: every tensor in
/// full, except the token embedding (one row), the routed experts (`n_expert_used` of
/// `n_expert` per MoE layer, hash-routed layers included) and the hash tables (one token's
/// row).
pub fn decode_weight_bytes(model: &Model) -> u64 {
    let s = &model.shape;
    let w = &model.weights;
    let mut partial: HashMap<&str, u64> = HashMap::new();
    partial.insert(&w.token_embd.t.name, w.token_embd.row_bytes() as u64);
    for l in &w.layers {
        for e in [&l.gate_exps, &l.up_exps, &l.down_exps] {
            partial.insert(&e.t.name, (e.expert_bytes() * s.n_expert_used) as u64);
        }
    }
    let mut total = 0u64;
    for t in model.gguf.tensors() {
        let read = if let Some(&b) = partial.get(t.name.as_str()) {
            b
        } else if t.name.ends_with(".ffn_gate_tid2eid.weight") {
            t.n_bytes / (s.n_vocab.max(1) as u64)
        } else {
            t.n_bytes
        };
        total += read;
    }
    total
}

/// Bytes of KV state one decode step reads with `t` tokens in the context, in the session's
/// layout (f32 rows): every layer its raw window (`min(t, window)` rows of `head_dim`); CSA
/// layers the compressed rows the indexer picks (all `⌊t/ratio⌋` while there are at most
/// `index_topk`) plus, once there are more, a scan of every indexer key (`index_head_dim`);
/// HCA layers every compressed row. For Flash this gives performance.md §1.4's "KV read FP32"
/// column (33.9 MB at 2k, 57.9 MB at 8k, 131.9 MB at 32k, 230.4 MB at 64k).
pub fn decode_kv_bytes(shape: &Shape, t: usize) -> u64 {
    const F32: u64 = 4;
    let plan = Plan::new(shape);
    let hd = shape.head_dim as u64;
    let mut total = 0u64;
    for lp in &plan.layers {
        total += t.min(shape.window) as u64 * hd * F32;
        let ratio = lp.attn.ratio();
        if ratio == 0 {
            continue;
        }
        let n_comp = (t / ratio) as u64;
        if lp.attn.has_indexer() {
            let topk = shape.index_topk as u64;
            total += n_comp.min(topk) * hd * F32;
            if n_comp > topk {
                total += n_comp * shape.index_head_dim as u64 * F32;
            }
        } else {
            total += n_comp * hd * F32;
        }
    }
    total
}

/// Mean KV bytes per step over decode steps at contexts `t0..t0+n`.
pub fn mean_decode_kv_bytes(shape: &Shape, t0: usize, n: usize) -> u64 {
    if n == 0 {
        return decode_kv_bytes(shape, t0);
    }
    let sum: u128 = (t0..t0 + n)
        .map(|t| decode_kv_bytes(shape, t) as u128)
        .sum();
    (sum / n as u128) as u64
}

// ---------------------------------------------------------------------------------------------
// CSV

/// One CSV row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub ctx_tokens: usize,
    pub prefill_tokens: usize,
    pub prefill_tps: f64,
    pub gen_tokens: usize,
    pub gen_tps: f64,
    pub kvcache_bytes: u64,
    pub card: String,
    pub backend: String,
    pub commit: String,
    pub decode_bytes_per_token: u64,
    pub gen_gbps: f64,
    pub pct_of_floor: Option<f64>,
}

/// A CSV field: quoted (with doubled quotes) when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Write the header line.
pub fn write_header(w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(w, "{CSV_HEADER}")
}

/// Write one row (flushed, so a sweep that dies keeps its rows).
pub fn write_row(w: &mut dyn Write, r: &Row) -> std::io::Result<()> {
    writeln!(
        w,
        "{},{},{:.2},{},{:.2},{},{},{},{},{},{:.3},{}",
        r.ctx_tokens,
        r.prefill_tokens,
        r.prefill_tps,
        r.gen_tokens,
        r.gen_tps,
        r.kvcache_bytes,
        csv_field(&r.card),
        csv_field(&r.backend),
        csv_field(&r.commit),
        r.decode_bytes_per_token,
        r.gen_gbps,
        r.pct_of_floor
            .map(|p| format!("{p:.2}"))
            .unwrap_or_default()
    )?;
    w.flush()
}

/// Split one CSV line (RFC 4180 quoting).
pub fn parse_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, '"') if cur.is_empty() => quoted = true,
            (false, ',') => out.push(std::mem::take(&mut cur)),
            (_, c) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// One series of a bench CSV: (ctx_tokens, prefill_tps, gen_tps) per row.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, f64)>,
}

/// Read a bench CSV (ours or ds4-bench's: the columns are found by name).
pub fn read_series(path: &Path) -> Result<Series> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = parse_csv_line(lines.next().unwrap_or(""));
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| format!("{}: no column {name}", path.display()))
    };
    let (cx, cp, cg) = (col("ctx_tokens")?, col("prefill_tps")?, col("gen_tps")?);
    let card = header.iter().position(|h| h.trim() == "card");
    let backend = header.iter().position(|h| h.trim() == "backend");
    let mut points = Vec::new();
    let mut label: Option<String> = None;
    for (i, line) in lines.enumerate() {
        let f = parse_csv_line(line);
        let num = |c: usize| -> Result<f64> {
            let s = f.get(c).map(|s| s.trim()).unwrap_or("");
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .with_context(|| format!("{}: row {}: bad number {s:?}", path.display(), i + 2))
        };
        points.push((num(cx)?, num(cp)?, num(cg)?));
        if label.is_none() {
            let get = |c: Option<usize>| c.and_then(|c| f.get(c)).map(|s| s.trim().to_string());
            if let (Some(c), Some(b)) = (get(card), get(backend)) {
                label = Some(format!("{c} ({b})"));
            }
        }
    }
    if points.is_empty() {
        bail!("{}: no data rows", path.display());
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match label {
        Some(l) => format!("{stem}: {l}"),
        None => stem,
    };
    Ok(Series { name, points })
}

// ---------------------------------------------------------------------------------------------
// SVG plot

/// Escape text for XML character data and attribute values.
fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// "Nice" axis ticks covering `[lo, hi]`: steps of 1, 2 or 5 × 10^k, about `n` of them.
/// Returns (axis min, axis max, step).
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> (f64, f64, f64) {
    let (mut lo, mut hi) = (lo.min(hi), lo.max(hi));
    if hi - lo < 1e-12 {
        let pad = if hi.abs() > 1e-12 {
            hi.abs() * 0.1
        } else {
            1.0
        };
        lo -= pad;
        hi += pad;
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = mag
        * if norm <= 1.0 {
            1.0
        } else if norm <= 2.0 {
            2.0
        } else if norm <= 5.0 {
            5.0
        } else {
            10.0
        };
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

/// A tick label: no more decimals than the step needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let s = format!("{v:.decimals$}");
    if s == "-0" { "0".into() } else { s }
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Two panels side by side (prefill tok/s and generation tok/s against ctx_tokens), one line
/// per series, with axes, ticks, labels, a legend and a `<title>` per point.
pub fn render_svg(series: &[Series], title: &str, width: f64, height: f64) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        width / 2.0,
        xml_escape(title)
    );
    let all_x: Vec<f64> = series
        .iter()
        .flat_map(|se| se.points.iter().map(|p| p.0))
        .collect();
    let xmin = all_x.iter().copied().fold(f64::INFINITY, f64::min);
    let xmax = all_x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let legend_h = 18.0 * series.len() as f64;
    let (top, bottom, left, gap, right) = (44.0, 56.0 + legend_h, 70.0, 80.0, 20.0);
    let panel_w = (width - left - gap - right) / 2.0;
    let panel_h = height - top - bottom;
    type Pick = fn(&(f64, f64, f64)) -> f64;
    let panels: [(&str, Pick); 2] = [("prefill tok/s", |p| p.1), ("generation tok/s", |p| p.2)];
    for (pi, (ylabel, pick)) in panels.iter().enumerate() {
        let x0 = left + pi as f64 * (panel_w + gap);
        let y0 = top;
        let ymax_data = series
            .iter()
            .flat_map(|se| se.points.iter().map(pick))
            .fold(0.0f64, f64::max);
        let (ax_lo, ax_hi, xstep) = nice_ticks(xmin, xmax, 7);
        let (_, ay_hi, ystep) = nice_ticks(0.0, ymax_data.max(1e-9), 8);
        let ay_lo = 0.0;
        let px = |x: f64| x0 + (x - ax_lo) / (ax_hi - ax_lo) * panel_w;
        let py = |y: f64| y0 + panel_h - (y - ay_lo) / (ay_hi - ay_lo) * panel_h;
        let _ = writeln!(s, r#"<g class="panel" id="panel-{pi}">"#);
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{y0:.1}" width="{panel_w:.1}" height="{panel_h:.1}" fill="none" stroke="#888"/>"##
        );
        // Y ticks and grid.
        let mut v = ay_lo;
        while v <= ay_hi + ystep * 1e-6 {
            let y = py(v);
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><line x1="{:.1}" y1="{y:.1}" x2="{x0:.1}" y2="{y:.1}" stroke="#000"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0,
                x0 + panel_w,
                x0 - 5.0,
                x0 - 8.0,
                y + 4.0,
                tick_label(v, ystep)
            );
            v += ystep;
        }
        // X ticks.
        let mut v = ax_lo;
        let yb = y0 + panel_h;
        while v <= ax_hi + xstep * 1e-6 {
            let x = px(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{yb:.1}" x2="{x:.1}" y2="{:.1}" stroke="#000"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                yb + 5.0,
                yb + 18.0,
                tick_label(v, xstep)
            );
            v += xstep;
        }
        // Axis labels.
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">ctx_tokens</text>"#,
            x0 + panel_w / 2.0,
            yb + 36.0
        );
        let (lx, ly) = (x0 - 52.0, y0 + panel_h / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{ylabel}</text>"#
        );
        // Series.
        for (si, se) in series.iter().enumerate() {
            let color = COLORS[si % COLORS.len()];
            let pts: Vec<String> = se
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", px(p.0), py(pick(p))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            for p in &se.points {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}" data-x="{}" data-y="{}"><title>ctx {} : {:.2} {ylabel}</title></circle>"#,
                    px(p.0),
                    py(pick(p)),
                    p.0,
                    pick(p),
                    p.0,
                    pick(p)
                );
            }
        }
        let _ = writeln!(s, "</g>");
    }
    // Legend.
    for (si, se) in series.iter().enumerate() {
        let y = height - legend_h + 18.0 * si as f64 - 2.0;
        let color = COLORS[si % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            left + 24.0,
            left + 30.0,
            y + 4.0,
            xml_escape(&se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn plot(a: &Args) -> Result<()> {
    let series: Vec<Series> = a
        .plot
        .iter()
        .map(|p| read_series(p))
        .collect::<Result<_>>()?;
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| a.plot[0].with_extension("svg"));
    let title = a
        .title
        .clone()
        .unwrap_or_else(|| "ds4 bench: throughput vs context".into());
    let svg = render_svg(&series, &title, 960.0, 540.0);
    std::fs::write(&out, svg).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("ds4: wrote {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The sweep

/// The commit this binary was built from (`DS4_COMMIT` at run time, else captured by build.rs,
/// else `git rev-parse --short HEAD` in the working directory, else "unknown").
pub fn commit() -> String {
    if let Ok(c) = std::env::var("DS4_COMMIT")
        && !c.trim().is_empty()
    {
        return c.trim().to_string();
    }
    if let Some(c) = option_env!("DS4_BUILD_COMMIT") {
        return c.to_string();
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// ds4-bench's default system text for `--chat-prompt-file` (with a period, unlike the CLI's).
pub const BENCH_DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// What a frontier logits file says besides the logits.
pub struct FrontierMeta<'a> {
    pub model: &'a str,
    pub backend: &'a str,
    pub quality: bool,
    /// Routed-expert bits (`null` when unknown).
    pub quant_bits: Option<u8>,
    pub frontier: usize,
    pub prefill_tokens: usize,
    pub ctx: usize,
}

/// ds4-bench's `frontier_%06d.logits.json` (`write_frontier_logits_json`), plus ds4 PR #15's
/// `"mt":"off"` (no Metal Tensor routes here): one field a line, the logits 8 a line,
/// non-finite ones `null`; `prompt_tokens` and `frontier_tokens` are both the frontier, as
/// ds4-bench writes them; `argmax_id` is the first largest finite logit.
pub fn frontier_logits_json(m: &FrontierMeta, logits: &[f32]) -> String {
    let best = common::argmax_finite(logits);
    common::logits_json(
        &[
            ("source", "\"ds4-bench\"".into()),
            ("model", serde_json::Value::from(m.model).to_string()),
            ("backend", serde_json::Value::from(m.backend).to_string()),
            ("mt", "\"off\"".into()),
            ("quality", m.quality.to_string()),
            (
                "quant_bits",
                m.quant_bits.map_or("null".into(), |b| b.to_string()),
            ),
            ("prompt_tokens", m.frontier.to_string()),
            ("frontier_tokens", m.frontier.to_string()),
            ("prefill_tokens", m.prefill_tokens.to_string()),
            ("ctx", m.ctx.to_string()),
            ("vocab", logits.len().to_string()),
            ("argmax_id", best.map_or(0, |(i, _)| i).to_string()),
            (
                "argmax_logit",
                best.map_or("null".into(), |(_, v)| common::json_f32(v)),
            ),
        ],
        logits,
    )
}

/// The fixed token sequence: a text file's tokens repeated, the chat rendering of
/// `--chat-prompt-file` (at least `n` tokens), or seeded random ids.
fn prompt_tokens(
    a: &Args,
    lm: &common::LoadedModel,
    tok: Option<&ds4_tokenizer::Tokenizer>,
    n: usize,
) -> Result<Vec<u32>> {
    let n_vocab = lm.engine.shape().n_vocab;
    if let Some(f) = &a.chat_prompt_file {
        let tok = tok.context("the model has no tokenizer: --chat-prompt-file needs one")?;
        let system = a.system.as_deref().unwrap_or(BENCH_DEFAULT_SYSTEM);
        let text = common::read_text(f)?;
        let ids =
            ds4_tokenizer::encode_cli_prompt(tok, system, &text, ds4_tokenizer::ThinkMode::None)?;
        if ids.len() < n {
            bail!(
                "the chat prompt of {} has {} tokens, need at least --ctx-max={n}",
                f.display(),
                ids.len()
            );
        }
        return Ok(ids);
    }
    let Some(f) = &a.prompt_file else {
        let mut rng = ds4_model::Rng::new(a.seed);
        return Ok((0..n)
            .map(|_| (rng.next_u64() % n_vocab as u64) as u32)
            .collect());
    };
    let Some(tok) = tok else {
        // Say why there is no tokenizer.
        common::load_tokenizer(&lm.gguf, &lm.path)?;
        bail!("{} has no tokenizer", lm.path.display());
    };
    let base = tok.encode(&common::read_text(f)?)?;
    if base.is_empty() {
        bail!("{} has no tokens", f.display());
    }
    Ok(base.iter().copied().cycle().take(n).collect())
}

pub fn run(a: Args) -> Result<()> {
    if !a.plot.is_empty() {
        return plot(&a);
    }
    let fr = frontiers(a.ctx_start, a.ctx_max, a.step_incr, a.step_mul)?;
    if a.gen_tokens == 0 {
        bail!("--gen-tokens must be at least 1");
    }
    if a.prefill_chunk == Some(0) {
        bail!("--prefill-chunk must be at least 1");
    }
    let need = a.ctx_max + a.gen_tokens;
    let ctx = a.ctx_alloc.unwrap_or(need + 1);
    if ctx <= need {
        bail!("--ctx-alloc must be greater than ctx-max + gen-tokens ({need})");
    }
    if let Some(b) = a.bandwidth_gbps
        && !(b.is_finite() && b > 0.0)
    {
        bail!("--bandwidth-gbps must be positive");
    }
    if let Some(d) = &a.dump_frontier_logits_dir
        && !d.is_dir()
    {
        bail!(
            "--dump-frontier-logits-dir {}: not an existing directory",
            d.display()
        );
    }
    let lm = common::load_model(&a.load)?;
    let model = lm.engine.model().clone();
    let tok = common::load_tokenizer(&lm.gguf, &lm.path).ok();
    let prompt = prompt_tokens(&a, &lm, tok.as_ref(), a.ctx_max)?;
    let eos = tok.as_ref().map(|t| t.specials().eos);

    // Backend (the CUDA one directly, for its own count of the bytes a decode step reads).
    let (backend, card, weight_bytes): (Box<dyn ds4_model::Backend>, String, u64) =
        match a.load.backend {
            BackendChoice::Cpu => (
                Box::new(lm.engine.cpu_backend(ctx)?),
                "cpu".into(),
                decode_weight_bytes(&model),
            ),
            BackendChoice::Cuda => {
                let info = ds4_cuda::probe(a.load.device).context("--backend cuda")?;
                let b = ds4_cuda::CudaBackend::new(
                    model.clone(),
                    ctx,
                    common::cuda_options(&a.load, &lm.engine, a.prefill_chunk),
                )
                .context("--backend cuda")?;
                let w = b.decode_read_bytes() as u64;
                (Box::new(b), info.name, w)
            }
        };
    let backend_name = backend.name().to_string();
    let model_name = lm.path.display().to_string();
    let bandwidth = a.bandwidth_gbps.or_else(|| default_bandwidth_gbps(&card));
    if bandwidth.is_none() && a.load.backend == BackendChoice::Cuda {
        eprintln!(
            "ds4: no bandwidth known for {card:?}: pass --bandwidth-gbps for the pct_of_floor column"
        );
    }
    let commit = commit();
    let chunk = common::prefill_chunk(&a.load, a.prefill_chunk);
    let mut session = Session::with_backend(
        backend,
        SessionOptions {
            ctx,
            prefill_chunk: chunk,
        },
    )?;
    eprintln!(
        "ds4: bench {} on {backend_name} ({card}), {} frontiers {}..{}, {} gen tokens, ctx {ctx}, prefill chunk {chunk}, weights read per decode step {:.3} GB",
        lm.path.display(),
        fr.len(),
        a.ctx_start,
        a.ctx_max,
        a.gen_tokens,
        weight_bytes as f64 / 1e9
    );

    let mut out: Box<dyn Write> = match &a.csv {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    write_header(&mut out)?;
    if let Some(&first) = fr.first().filter(|_| !a.no_warmup) {
        session
            .sync(&prompt[..first])
            .with_context(|| format!("warm-up prefill of {first} tokens"))?;
        let next = session.greedy(eos);
        session.advance(next).context("warm-up decode step")?;
        session.reset();
    }
    let mut previous = 0usize;
    for &frontier in &fr {
        if a.whole_prompt {
            session.reset();
            previous = 0;
        }
        let t0 = Instant::now();
        session
            .sync(&prompt[..frontier])
            .with_context(|| format!("prefill to {frontier}"))?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let prefill_tokens = frontier - previous;
        if let Some(dir) = &a.dump_frontier_logits_dir {
            let path = dir.join(format!("frontier_{frontier:06}.logits.json"));
            let meta = FrontierMeta {
                model: &model_name,
                backend: &backend_name,
                quality: a.load.quality,
                quant_bits: Some(common::routed_quant_bits(&model)).filter(|&b| b > 0),
                frontier,
                prefill_tokens,
                ctx,
            };
            std::fs::write(&path, frontier_logits_json(&meta, session.logits()))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let snap = session
            .snapshot()
            .with_context(|| format!("snapshot at {frontier}"))?;
        let t1 = Instant::now();
        for _ in 0..a.gen_tokens {
            let next = session.greedy(eos);
            session.advance(next)?;
        }
        let gen_s = t1.elapsed().as_secs_f64();
        session
            .restore(&snap)
            .with_context(|| format!("restore at {frontier}"))?;
        let prefill_tps = prefill_tokens as f64 / prefill_s.max(1e-9);
        let gen_tps = a.gen_tokens as f64 / gen_s.max(1e-9);
        let bytes = weight_bytes + mean_decode_kv_bytes(&model.shape, frontier, a.gen_tokens);
        let gen_gbps = bytes as f64 * gen_tps / 1e9;
        let row = Row {
            ctx_tokens: frontier,
            prefill_tokens,
            prefill_tps,
            gen_tokens: a.gen_tokens,
            gen_tps,
            kvcache_bytes: snap.len() as u64,
            card: card.clone(),
            backend: backend_name.clone(),
            commit: commit.clone(),
            decode_bytes_per_token: bytes,
            gen_gbps,
            pct_of_floor: bandwidth.map(|b| 100.0 * gen_gbps / b),
        };
        write_row(&mut out, &row)?;
        eprintln!(
            "ds4: ctx {frontier}: prefill {prefill_tokens} tokens at {prefill_tps:.1} t/s, generation {gen_tps:.2} t/s ({gen_gbps:.2} GB/s{})",
            row.pct_of_floor
                .map(|p| format!(", {p:.1}% of floor"))
                .unwrap_or_default()
        );
        previous = frontier;
    }
    if let Some(p) = &a.csv {
        eprintln!("ds4: wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontiers_linear_geometric_and_capped() {
        assert_eq!(
            frontiers(2048, 8192, 2048, 1.0).unwrap(),
            [2048, 4096, 6144, 8192]
        );
        // The last frontier is ctx-max even off the step grid.
        assert_eq!(frontiers(100, 350, 100, 1.0).unwrap(), [100, 200, 300, 350]);
        assert_eq!(
            frontiers(2048, 65536, 0, 2.0).unwrap(),
            [2048, 4096, 8192, 16384, 32768, 65536]
        );
        // ceil(cur × F), at least cur + 1.
        assert_eq!(frontiers(3, 10, 0, 1.5).unwrap(), [3, 5, 8, 10]);
        assert_eq!(frontiers(1, 4, 0, 1.01).unwrap(), [1, 2, 3, 4]);
        assert_eq!(frontiers(64, 64, 1, 1.0).unwrap(), [64]);
        assert!(frontiers(10, 5, 1, 1.0).is_err());
        assert!(frontiers(1, 5, 0, 1.0).is_err());
        assert!(frontiers(1, 5, 1, 0.5).is_err());
        assert!(frontiers(0, 5, 1, 1.0).is_err());
    }

    fn row(card: &str) -> Row {
        Row {
            ctx_tokens: 2048,
            prefill_tokens: 2048,
            prefill_tps: 343.756,
            gen_tokens: 128,
            gen_tps: 26.764,
            kvcache_bytes: 52_184_460,
            card: card.into(),
            backend: "cuda".into(),
            commit: "abc1234".into(),
            decode_bytes_per_token: 9_559_000_000,
            gen_gbps: 255.8,
            pct_of_floor: Some(5.329),
        }
    }

    #[test]
    fn csv_header_and_rows() {
        let mut buf = Vec::new();
        write_header(&mut buf).unwrap();
        write_row(&mut buf, &row("NVIDIA H200")).unwrap();
        let mut r = row("a \"quoted\", card");
        r.pct_of_floor = None;
        write_row(&mut buf, &r).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes,card,backend,commit,decode_bytes_per_token,gen_gbps,pct_of_floor"
        );
        assert!(lines[0].starts_with(
            "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes,"
        ));
        assert_eq!(
            lines[1],
            "2048,2048,343.76,128,26.76,52184460,NVIDIA H200,cuda,abc1234,9559000000,255.800,5.33"
        );
        assert_eq!(
            lines[2],
            "2048,2048,343.76,128,26.76,52184460,\"a \"\"quoted\"\", card\",cuda,abc1234,9559000000,255.800,"
        );
        // Round trip through the parser: 12 fields, the quoted one intact.
        let f = parse_csv_line(lines[2]);
        assert_eq!(f.len(), 12);
        assert_eq!(f[6], "a \"quoted\", card");
        assert_eq!(f[11], "");
        assert_eq!(parse_csv_line(lines[0]).len(), 12);
    }

    #[test]
    fn bandwidth_defaults_by_card() {
        assert_eq!(default_bandwidth_gbps("NVIDIA H200"), Some(4800.0));
        assert_eq!(
            default_bandwidth_gbps("NVIDIA H100 80GB HBM3"),
            Some(3350.0)
        );
        assert_eq!(default_bandwidth_gbps("NVIDIA H100 PCIe"), None);
        assert_eq!(default_bandwidth_gbps("cpu"), None);
    }

    /// Minimal XML well-formedness check: balanced, properly nested tags, quoted attributes,
    /// known entities only. Returns the element names in document order.
    fn check_xml(s: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut names = Vec::new();
        let mut rest = s;
        let check_text = |t: &str| {
            let mut r = t;
            while let Some(i) = r.find('&') {
                let end = r[i..].find(';').expect("unterminated entity") + i;
                let ent = &r[i + 1..end];
                assert!(
                    ["amp", "lt", "gt", "quot", "apos"].contains(&ent),
                    "bad entity &{ent};"
                );
                r = &r[end + 1..];
            }
            assert!(
                !t.contains('<') && !t.contains('>'),
                "stray bracket in {t:?}"
            );
        };
        while let Some(i) = rest.find('<') {
            check_text(&rest[..i]);
            let end = rest[i..].find('>').expect("unterminated tag") + i;
            let tag = &rest[i + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') {
                assert!(tag.ends_with('?'));
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched close"
                );
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
            assert!(!name.is_empty());
            // Attributes: name="value" pairs.
            let mut attrs = body[name.len()..].trim();
            while !attrs.is_empty() {
                let eq = attrs.find('=').expect("attribute without =");
                assert!(!attrs[..eq].trim().is_empty());
                let after = &attrs[eq + 1..];
                assert!(after.starts_with('"'), "unquoted attribute in <{tag}>");
                let close = after[1..].find('"').expect("unterminated attribute") + 1;
                check_text(&after[1..close]);
                attrs = after[close + 1..].trim_start();
            }
            names.push(name.clone());
            if !self_closing {
                stack.push(name);
            }
        }
        check_text(rest.trim());
        assert!(stack.is_empty(), "unclosed {stack:?}");
        names
    }

    #[test]
    fn svg_is_well_formed_and_has_the_points() {
        let a = Series {
            name: "h200 <run> & co".into(),
            points: vec![
                (2048.0, 1383.0, 33.4),
                (4096.0, 1351.0, 32.7),
                (8192.0, 1321.0, 32.0),
            ],
        };
        let b = Series {
            name: "cpu".into(),
            points: vec![(2048.0, 500.0, 10.0), (8192.0, 450.0, 9.5)],
        };
        let svg = render_svg(&[a, b], "t \"x\"", 960.0, 540.0);
        let names = check_xml(&svg);
        assert_eq!(names[0], "svg");
        // Two panels × (3 + 2) points.
        assert_eq!(names.iter().filter(|n| *n == "circle").count(), 10);
        assert_eq!(names.iter().filter(|n| *n == "polyline").count(), 4);
        for (x, p, g) in [(2048, "1383", "33.4"), (4096, "1351", "32.7")] {
            assert!(
                svg.contains(&format!(r#"data-x="{x}" data-y="{p}""#)),
                "{x} {p}"
            );
            assert!(
                svg.contains(&format!(r#"data-x="{x}" data-y="{g}""#)),
                "{x} {g}"
            );
        }
        assert!(svg.contains("prefill tok/s") && svg.contains("generation tok/s"));
        assert!(svg.contains(">ctx_tokens<"));
        assert!(svg.contains("h200 &lt;run&gt; &amp; co"));
        // X ticks over 2048..8192 in steps of 1000; y ticks from 0.
        assert!(svg.contains(">2000<") && svg.contains(">8000<"));
        assert!(svg.contains(">0<"));
        // Points lie inside the panels.
        for cap in svg.split("<circle cx=\"").skip(1) {
            let cx: f64 = cap.split('"').next().unwrap().parse().unwrap();
            let cy: f64 = cap
                .split("cy=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!((0.0..=960.0).contains(&cx) && (0.0..=540.0).contains(&cy));
        }
    }

    #[test]
    fn nice_ticks_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 1383.0, 8), (0.0, 1400.0, 200.0));
        assert_eq!(nice_ticks(0.0, 1383.0, 5), (0.0, 1500.0, 500.0));
        assert_eq!(nice_ticks(2048.0, 8192.0, 7), (2000.0, 9000.0, 1000.0));
        let (lo, hi, st) = nice_ticks(0.0, 0.37, 5);
        assert!(lo == 0.0 && (hi - 0.4).abs() < 1e-12 && (st - 0.1).abs() < 1e-12);
        let (lo, hi, _) = nice_ticks(5.0, 5.0, 5);
        assert!(lo < 5.0 && hi > 5.0);
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(tick_label(4096.0, 1000.0), "4096");
    }

    #[test]
    fn kv_bytes_match_performance_md_for_flash() {
        // performance.md §1.4, "KV read FP32 (ds4)": 33.9 / 57.9 / 131.9 / 230.4 MB.
        let s = Shape::flash();
        for (t, mb) in [(2048, 33.9), (8192, 57.9), (32768, 131.9), (65536, 230.4)] {
            let got = decode_kv_bytes(&s, t) as f64 / 1e6;
            assert!((got - mb).abs() < 0.05, "ctx {t}: {got:.2} MB, doc {mb} MB");
        }
        assert_eq!(decode_kv_bytes(&s, 0), 0);
        // One token: one raw row per layer.
        assert_eq!(decode_kv_bytes(&s, 1), 43 * 512 * 4);
        assert_eq!(
            mean_decode_kv_bytes(&s, 1, 2),
            (decode_kv_bytes(&s, 1) + decode_kv_bytes(&s, 2)) / 2
        );
    }

    #[test]
    fn decode_weight_bytes_of_the_builtin_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = ds4_convert::builtin::tiny_path(Some(dir.path())).unwrap();
        let g = std::sync::Arc::new(ds4_gguf::Gguf::open(&p).unwrap());
        let m = Model::load(g.clone()).unwrap();
        let s = &m.shape;
        let got = decode_weight_bytes(&m);
        // Independently from the directory: all bytes, minus the unread experts, the unread
        // embedding rows and the unread hash-table rows.
        let mut want = g.tensor_bytes_total();
        let mut n_exp_tensors = 0;
        let mut n_tid = 0;
        for t in g.tensors() {
            if t.name.contains("_exps.") {
                n_exp_tensors += 1;
                want -= t.n_bytes / s.n_expert as u64 * (s.n_expert - s.n_expert_used) as u64;
            } else if t.name == "token_embd.weight" {
                want -= t.n_bytes / s.n_vocab as u64 * (s.n_vocab - 1) as u64;
            } else if t.name.contains("tid2eid") {
                n_tid += 1;
                want -= t.n_bytes / s.n_vocab as u64 * (s.n_vocab - 1) as u64;
            }
        }
        assert_eq!(n_exp_tensors, 3 * s.n_layer);
        assert_eq!(n_tid, s.n_hash_layer);
        assert_eq!(got, want);
        // Sanity: well below the file, above the LM head alone.
        assert!(got < g.tensor_bytes_total());
        assert!(got > m.weights.output.t.n_bytes as u64);
    }

    #[test]
    fn frontier_logits_json_has_ds4_benchs_fields() {
        let logits: Vec<f32> = (0..10)
            .map(|i| match i {
                3 => 7.5,
                5 => 7.5,
                6 => f32::NAN,
                7 => f32::INFINITY,
                _ => i as f32 * -0.25,
            })
            .collect();
        let meta = FrontierMeta {
            model: "dir/\"m\".gguf",
            backend: "cpu",
            quality: true,
            quant_bits: Some(2),
            frontier: 48,
            prefill_tokens: 16,
            ctx: 60,
        };
        let text = frontier_logits_json(&meta, &logits);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "source",
                "model",
                "backend",
                "mt",
                "quality",
                "quant_bits",
                "prompt_tokens",
                "frontier_tokens",
                "prefill_tokens",
                "ctx",
                "vocab",
                "argmax_id",
                "argmax_logit",
                "logits"
            ]
        );
        assert_eq!(v["source"], "ds4-bench");
        assert_eq!(v["model"], "dir/\"m\".gguf");
        assert_eq!(v["mt"], "off");
        assert_eq!(v["quality"], true);
        assert_eq!(v["quant_bits"], 2);
        assert_eq!(
            (v["prompt_tokens"].clone(), v["frontier_tokens"].clone()),
            (48.into(), 48.into())
        );
        assert_eq!(v["prefill_tokens"], 16);
        assert_eq!(v["ctx"], 60);
        assert_eq!(v["vocab"], 10);
        // First largest finite logit; non-finite ones are null.
        assert_eq!(v["argmax_id"], 3);
        assert_eq!(v["argmax_logit"], 7.5);
        let l = v["logits"].as_array().unwrap();
        assert_eq!(l.len(), 10);
        assert!(l[6].is_null() && l[7].is_null());
        assert_eq!(l[1].as_f64().unwrap() as f32, -0.25);
        // Eight logits a line.
        assert_eq!(text.lines().filter(|l| l.starts_with("    ")).count(), 2);
        let none = FrontierMeta {
            quant_bits: None,
            ..meta
        };
        let v: serde_json::Value =
            serde_json::from_str(&frontier_logits_json(&none, &[f32::NAN])).unwrap();
        assert!(v["quant_bits"].is_null() && v["argmax_logit"].is_null());
    }
}
