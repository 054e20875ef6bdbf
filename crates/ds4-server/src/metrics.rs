//! Counters behind `GET /metrics` (Prometheus text format 0.0.4).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// One metric family: name, help text, labelled samples.
type Family<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);

/// Server counters. Everything is a plain atomic; the rates are the last request's.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests_chat: AtomicU64,
    pub requests_completions: AtomicU64,
    pub requests_responses: AtomicU64,
    pub requests_messages: AtomicU64,
    pub requests_count_tokens: AtomicU64,
    /// Requests refused with 503 (queue full or shutting down).
    pub rejected: AtomicU64,
    /// Requests answered with a 4xx before reaching the engine.
    pub bad_requests: AtomicU64,
    /// Jobs the worker finished (any finish reason).
    pub completed: AtomicU64,
    /// Jobs abandoned because the client went away.
    pub cancelled: AtomicU64,
    /// Jobs that ended in an engine error.
    pub failed: AtomicU64,
    /// Effective prompt tokens of all jobs.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens reused from the live session or a disk checkpoint.
    pub cached_tokens: AtomicU64,
    /// Tokens actually run through prefill (the cost of the prompts).
    pub prefilled_tokens: AtomicU64,
    /// Generated tokens.
    pub completion_tokens: AtomicU64,
    pub prefill_nanos: AtomicU64,
    pub decode_nanos: AtomicU64,
    /// Jobs waiting for the worker.
    pub queue_depth: AtomicI64,
    /// Whether a job is running.
    pub busy: AtomicI64,
    /// Tokens in the live session.
    pub live_tokens: AtomicU64,
    pub hits_memory_token: AtomicU64,
    pub hits_memory_text: AtomicU64,
    pub hits_thinking_visible: AtomicU64,
    pub hits_responses_visible: AtomicU64,
    pub hits_disk: AtomicU64,
    pub misses: AtomicU64,
    pub kv_stores_cold: AtomicU64,
    pub kv_stores_continued: AtomicU64,
    pub kv_stores_evict: AtomicU64,
    pub kv_stores_shutdown: AtomicU64,
    /// Checkpoint files that failed verification (checksum, fingerprint, format).
    pub kv_load_failures: AtomicU64,
    /// Last request's prefill and decode rates (tokens/s, ×1000 fixed point).
    pub last_prefill_tps_milli: AtomicU64,
    pub last_decode_tps_milli: AtomicU64,
    /// Open SSE streams.
    pub streams_open: AtomicI64,
    pub tool_memory_ids: AtomicU64,
    pub started: Mutex<Option<std::time::Instant>>,
}

fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        add(c, 1);
    }

    pub fn add(c: &AtomicU64, v: u64) {
        add(c, v);
    }

    /// Prefill accounting for one chunk.
    pub fn prefill(&self, tokens: usize, nanos: u64) {
        add(&self.prefilled_tokens, tokens as u64);
        add(&self.prefill_nanos, nanos);
    }

    /// The Prometheus text.
    pub fn render(&self, model: &str) -> String {
        fn head(s: &mut String, name: &str, help: &str, ty: &str) {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} {ty}");
        }
        fn series(s: &mut String, name: &str, labels: &str, v: impl std::fmt::Display) {
            if labels.is_empty() {
                let _ = writeln!(s, "{name} {v}");
            } else {
                let _ = writeln!(s, "{name}{{{labels}}} {v}");
            }
        }
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let gi = |c: &AtomicI64| c.load(Ordering::Relaxed).max(0);
        let secs = |c: &AtomicU64| format!("{:.6}", g(c) as f64 / 1e9);
        let rate = |c: &AtomicU64| format!("{:.3}", g(c) as f64 / 1000.0);
        let mut s = String::new();
        let counters: [Family; 13] = [
            (
                "ds4_requests_total",
                "Requests received per endpoint.",
                vec![
                    ("endpoint=\"chat\"", g(&self.requests_chat).to_string()),
                    (
                        "endpoint=\"completions\"",
                        g(&self.requests_completions).to_string(),
                    ),
                    (
                        "endpoint=\"responses\"",
                        g(&self.requests_responses).to_string(),
                    ),
                    (
                        "endpoint=\"messages\"",
                        g(&self.requests_messages).to_string(),
                    ),
                    (
                        "endpoint=\"count_tokens\"",
                        g(&self.requests_count_tokens).to_string(),
                    ),
                ],
            ),
            (
                "ds4_requests_rejected_total",
                "Requests refused with 503 (queue full or shutting down).",
                vec![("", g(&self.rejected).to_string())],
            ),
            (
                "ds4_requests_invalid_total",
                "Requests refused with a 4xx before reaching the engine.",
                vec![("", g(&self.bad_requests).to_string())],
            ),
            (
                "ds4_jobs_total",
                "Engine jobs by outcome.",
                vec![
                    ("outcome=\"completed\"", g(&self.completed).to_string()),
                    ("outcome=\"cancelled\"", g(&self.cancelled).to_string()),
                    ("outcome=\"failed\"", g(&self.failed).to_string()),
                ],
            ),
            (
                "ds4_prompt_tokens_total",
                "Effective prompt tokens (cached + prefilled).",
                vec![("", g(&self.prompt_tokens).to_string())],
            ),
            (
                "ds4_cached_prompt_tokens_total",
                "Prompt tokens reused from the live session or a disk checkpoint.",
                vec![("", g(&self.cached_tokens).to_string())],
            ),
            (
                "ds4_prefilled_tokens_total",
                "Prompt tokens run through prefill.",
                vec![("", g(&self.prefilled_tokens).to_string())],
            ),
            (
                "ds4_completion_tokens_total",
                "Generated tokens.",
                vec![("", g(&self.completion_tokens).to_string())],
            ),
            (
                "ds4_prefill_seconds_total",
                "Time spent in prefill.",
                vec![("", secs(&self.prefill_nanos))],
            ),
            (
                "ds4_decode_seconds_total",
                "Time spent decoding.",
                vec![("", secs(&self.decode_nanos))],
            ),
            (
                "ds4_cache_lookups_total",
                "Prompt cache decisions by source.",
                vec![
                    (
                        "source=\"memory-token\"",
                        g(&self.hits_memory_token).to_string(),
                    ),
                    (
                        "source=\"memory-text\"",
                        g(&self.hits_memory_text).to_string(),
                    ),
                    (
                        "source=\"thinking-visible\"",
                        g(&self.hits_thinking_visible).to_string(),
                    ),
                    (
                        "source=\"responses-visible\"",
                        g(&self.hits_responses_visible).to_string(),
                    ),
                    ("source=\"disk\"", g(&self.hits_disk).to_string()),
                    ("source=\"miss\"", g(&self.misses).to_string()),
                ],
            ),
            (
                "ds4_kv_disk_stores_total",
                "Disk KV checkpoints written by reason.",
                vec![
                    ("reason=\"cold\"", g(&self.kv_stores_cold).to_string()),
                    (
                        "reason=\"continued\"",
                        g(&self.kv_stores_continued).to_string(),
                    ),
                    ("reason=\"evict\"", g(&self.kv_stores_evict).to_string()),
                    (
                        "reason=\"shutdown\"",
                        g(&self.kv_stores_shutdown).to_string(),
                    ),
                ],
            ),
            (
                "ds4_kv_disk_load_failures_total",
                "Disk KV checkpoints ignored because they failed verification.",
                vec![("", g(&self.kv_load_failures).to_string())],
            ),
        ];
        for (name, help, vals) in &counters {
            head(&mut s, name, help, "counter");
            for (labels, v) in vals {
                series(&mut s, name, labels, v);
            }
        }
        let gauges: [(&str, &str, String); 8] = [
            (
                "ds4_queue_depth",
                "Requests waiting for the engine.",
                gi(&self.queue_depth).to_string(),
            ),
            (
                "ds4_engine_busy",
                "1 while a request is running.",
                gi(&self.busy).to_string(),
            ),
            (
                "ds4_live_tokens",
                "Tokens in the live session.",
                g(&self.live_tokens).to_string(),
            ),
            (
                "ds4_prefill_tokens_per_second",
                "Prefill rate of the last request that prefilled.",
                rate(&self.last_prefill_tps_milli),
            ),
            (
                "ds4_decode_tokens_per_second",
                "Decode rate of the last request that generated.",
                rate(&self.last_decode_tps_milli),
            ),
            (
                "ds4_sse_streams_open",
                "Open streaming responses.",
                gi(&self.streams_open).to_string(),
            ),
            (
                "ds4_tool_memory_ids",
                "Tool ids in the exact-DSML replay map.",
                g(&self.tool_memory_ids).to_string(),
            ),
            (
                "ds4_uptime_seconds",
                "Seconds since the server started.",
                self.uptime().to_string(),
            ),
        ];
        for (name, help, v) in &gauges {
            head(&mut s, name, help, "gauge");
            series(&mut s, name, "", v);
        }
        head(&mut s, "ds4_model_info", "The served model.", "gauge");
        let label = format!(
            "model=\"{}\"",
            model.replace('\\', "\\\\").replace('"', "\\\"")
        );
        series(&mut s, "ds4_model_info", &label, 1);
        s
    }

    fn uptime(&self) -> u64 {
        self.started
            .lock()
            .ok()
            .and_then(|g| g.map(|t| t.elapsed().as_secs()))
            .unwrap_or(0)
    }
}

/// Read one series from Prometheus text (for tests and scripts): `name` or `name{labels}`.
pub fn scrape(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok()).flatten()
    })
}
