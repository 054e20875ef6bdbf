//! The engine worker: one thread owns the live [`Session`] and runs jobs strictly one at a time.
//!
//! Per job (ds4's `generate_job`, §2.12): pick the longest reusable state — live tokens that are
//! a prefix of the prompt (`memory-token`), the remembered client-visible form of the last
//! thinking turn (`thinking-visible`; `responses-visible` after a `/v1/responses` turn), live
//! text that is a byte prefix of the rendered prompt with only the suffix tokenized
//! (`memory-text`), else save the outgoing session (`evict`) and look for the longest disk
//! checkpoint whose text is a prefix (`disk`), else prefill from scratch (`cold`). Then prefill
//! the rest in chunks (cold and continued checkpoints are cut at their boundaries; cancellation
//! and shutdown are checked between chunks), and decode, feeding the streaming parser and
//! checking stop sequences, cancellation and shutdown between steps.
//! An evict or shutdown checkpoint of a thinking turn is written under both texts, the live one
//! (reasoning included) and the client-visible one (`thinking-visible` or `responses-visible`
//! key, reasoning dropped), so a client finds it after a session switch or a restart whether or
//! not it echoes reasoning.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ds4_kvstore::{
    Checkpoint, EXT_RESPONSES_VISIBLE, EXT_THINKING_VISIBLE, KvEntry, KvError, KvStore, SaveReason,
    sha1_hex,
};
use ds4_model::{Rng, SamplerParams, Session};
use ds4_tokenizer::{
    ParseOptions, ParseOutcome, StreamEvent, StreamParser, THINK_END_TEXT, THINK_START_TEXT,
    ThinkMode, Tokenizer,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::script::Script;
use crate::toolmem::ToolMemory;
use crate::trace::{Tracer, timestamp};

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence or a stop sequence.
    Stop,
    /// `max_tokens` or the context is full.
    Length,
    ToolCalls,
    /// Decode failure, shutdown, unterminated tool call.
    Error(String),
}

impl Finish {
    /// OpenAI name.
    pub fn openai(&self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
            Finish::Error(_) => "error",
        }
    }
}

/// Token accounting of one job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Effective prompt tokens (reused + prefilled).
    pub prompt: usize,
    /// Reused from the live session or disk.
    pub cached: usize,
    /// Generated tokens.
    pub completion: usize,
}

impl Usage {
    /// Newly prefilled prompt tokens.
    pub fn written(&self) -> usize {
        self.prompt.saturating_sub(self.cached)
    }
}

/// A tool call of the result, with its client id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallOut {
    pub id: String,
    pub name: String,
    /// Compact JSON object text.
    pub arguments: String,
}

/// The result of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub finish: Finish,
    /// The stop sequence that ended generation, if one did.
    pub stop_sequence: Option<String>,
    pub reasoning: Option<String>,
    pub content: String,
    pub tool_calls: Vec<CallOut>,
    /// The raw generated text (cut at a stop sequence).
    pub text: String,
    pub usage: Usage,
}

/// Events a job sends to its HTTP handler.
#[derive(Clone, Debug, PartialEq)]
pub enum Ev {
    /// The cache decision is made; prefill starts.
    Started(Usage),
    Reasoning(String),
    Content(String),
    ToolStart {
        index: usize,
        id: String,
        name: String,
    },
    ToolArgs {
        index: usize,
        delta: String,
    },
    ToolEnd {
        index: usize,
    },
    Done(Box<Outcome>),
    /// The job failed: HTTP status and message.
    Failed(u16, String),
}

/// A queued request, ready for the engine.
pub struct Job {
    /// Request number (trace).
    pub seq: u64,
    pub api: crate::error::Api,
    pub prompt_text: String,
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub think: ThinkMode,
    /// Parse DSML tool calls.
    pub tools: bool,
    /// Whether the conversation has tool context (decides the visible form of reasoning).
    pub tool_context: bool,
    /// `call_` or `toolu_`.
    pub tool_id_prefix: &'static str,
    /// `/v1/completions`: the raw text, no parsing.
    pub raw_output: bool,
    pub sampler: SamplerParams,
    pub seed: u64,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<Ev>,
    pub cancel: CancellationToken,
    /// Trace header text (raw request, rendered prompt), when tracing.
    pub trace_head: Option<String>,
}

impl Job {
    fn send(&self, ev: Ev) {
        let _ = self.events.send(ev);
    }

    fn gone(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }
}

/// Worker configuration (from the flags).
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub ctx: usize,
    pub prefill_chunk: usize,
    pub min_tokens: usize,
    pub cold_max: usize,
    /// Continued-save frontier spacing (0: off).
    pub frontier: usize,
    pub trim: usize,
    pub align: usize,
    pub quant_bits: u8,
}

/// The remembered client-visible form of the live session after a thinking turn: a client
/// that drops the hidden reasoning renders `visible`, which stands for the first `live_len`
/// live tokens.
#[derive(Clone, Debug)]
struct Alias {
    visible: String,
    live_len: usize,
    /// Left by a `/v1/responses` turn: ds4's `responses-visible` key (cache source, checkpoint
    /// ext flag [`EXT_RESPONSES_VISIBLE`]); else `thinking-visible` ([`EXT_THINKING_VISIBLE`]).
    responses: bool,
}

impl Alias {
    fn source(&self) -> &'static str {
        if self.responses {
            "responses-visible"
        } else {
            "thinking-visible"
        }
    }
    fn key_flag(&self) -> u8 {
        if self.responses {
            EXT_RESPONSES_VISIBLE
        } else {
            EXT_THINKING_VISIBLE
        }
    }
}

enum Stop {
    Cancelled,
    Shutdown,
    Engine(String),
}

/// The engine worker.
pub struct Worker {
    pub session: Session,
    pub tok: Arc<Tokenizer>,
    pub cfg: WorkerConfig,
    pub store: Option<Arc<KvStore>>,
    pub toolmem: Arc<Mutex<ToolMemory>>,
    pub metrics: Arc<Metrics>,
    pub tracer: Option<Arc<Tracer>>,
    pub script: Option<Script>,
    pub shutdown: CancellationToken,
    pub draining: CancellationToken,
    alias: Option<Alias>,
}

/// Byte offset where a DSML string parameter body is open at the end of `text`, i.e. whether
/// the next token is payload (sampled with the request's settings) rather than structure
/// (sampled greedily), as ds4's DSML-aware decoding does.
fn dsml_in_string_body(text: &str) -> bool {
    let start = text.rfind("tool_calls>").unwrap_or(0);
    let seg = &text[start..];
    let Some(open) = seg.rfind("parameter name=") else {
        return false;
    };
    if seg.rfind("parameter>").is_some_and(|c| c > open) {
        return false;
    }
    match seg[open..].find('>') {
        Some(end) => !seg[open..open + end].contains("string=\"false\""),
        None => false,
    }
}

/// ds4's chat anchor: the last `<｜User｜>` before the first `<｜Assistant｜>`.
fn chat_anchor(tokens: &[u32], user: u32, assistant: u32) -> Option<usize> {
    let fa = tokens.iter().position(|&t| t == assistant)?;
    tokens[..fa].iter().rposition(|&t| t == user)
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        session: Session,
        tok: Arc<Tokenizer>,
        cfg: WorkerConfig,
        store: Option<Arc<KvStore>>,
        toolmem: Arc<Mutex<ToolMemory>>,
        metrics: Arc<Metrics>,
        tracer: Option<Arc<Tracer>>,
        script: Option<Script>,
        shutdown: CancellationToken,
        draining: CancellationToken,
    ) -> Worker {
        Worker {
            session,
            tok,
            cfg,
            store,
            toolmem,
            metrics,
            tracer,
            script,
            shutdown,
            draining,
            alias: None,
        }
    }

    fn trace(&self, s: &str) {
        if let Some(t) = &self.tracer {
            t.write(s);
        }
    }

    /// Run jobs until shutdown; then refuse what is still queued and write the shutdown
    /// checkpoint.
    pub fn run(mut self, mut rx: mpsc::Receiver<Job>, rt: tokio::runtime::Handle) {
        enum Next {
            Job(Box<Job>),
            Stop,
            Recheck,
        }
        loop {
            if self.draining.is_cancelled() && rx.is_empty() {
                break;
            }
            let (shutdown, draining) = (self.shutdown.clone(), self.draining.clone());
            let next = rt.block_on(async {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => Next::Stop,
                    j = rx.recv() => j.map_or(Next::Stop, |j| Next::Job(Box::new(j))),
                    _ = draining.cancelled() => Next::Recheck,
                }
            });
            let job = match next {
                Next::Job(j) => *j,
                Next::Stop => break,
                Next::Recheck => continue,
            };
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if job.gone() {
                Metrics::inc(&self.metrics.cancelled);
                continue;
            }
            self.metrics.busy.store(1, Ordering::Relaxed);
            self.run_job(job);
            self.metrics.busy.store(0, Ordering::Relaxed);
            self.metrics
                .live_tokens
                .store(self.session.len() as u64, Ordering::Relaxed);
        }
        rx.close();
        while let Ok(job) = rx.try_recv() {
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            Metrics::inc(&self.metrics.rejected);
            job.send(Ev::Failed(503, "server shutting down".into()));
        }
        self.save(SaveReason::Shutdown);
        tracing::info!(target: "ds4_server", "engine worker stopped");
    }

    /// Store the live session as a checkpoint (if a store is configured and the session is
    /// long enough), keyed by its text. Returns whether a file was written. When the
    /// remembered client-visible form of a thinking turn covers the whole live session, a
    /// second checkpoint of the same state is keyed by that text (ds4's `thinking-visible` key,
    /// ext flag [`EXT_THINKING_VISIBLE`], or after a `/v1/responses` turn its
    /// `responses-visible` key, [`EXT_RESPONSES_VISIBLE`]): a client that echoes the reasoning renders the first,
    /// one that drops it the second, so either finds the conversation after a session switch or
    /// a restart.
    fn save(&mut self, reason: SaveReason) -> bool {
        let n = self.session.len();
        if self.store.is_none() || n < self.cfg.min_tokens.max(1) {
            return false;
        }
        let visible = self
            .alias
            .as_ref()
            .filter(|a| a.live_len == n)
            .map(|a| (a.visible.as_bytes().to_vec(), a.key_flag()));
        let live = self.tok.decode(self.session.tokens());
        let mut wrote = self.save_as(reason, &live, 0);
        if let Some((v, flag)) = visible.filter(|(v, _)| *v != live) {
            wrote |= self.save_as(reason, &v, flag);
        }
        wrote
    }

    /// [`Worker::save`] of the live session under `text` with the extra ext flags `key_flags`
    /// (the store and the session length are checked there).
    fn save_as(&mut self, reason: SaveReason, text: &[u8], key_flags: u8) -> bool {
        let Some(store) = self.store.clone() else {
            return false;
        };
        let n = self.session.len();
        if matches!(reason, SaveReason::Evict | SaveReason::Shutdown)
            && store.dir().join(format!("{}.kv", sha1_hex(text))).exists()
        {
            return false;
        }
        let payload = match self.session.snapshot() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(target: "kvcache", "cannot snapshot the session: {e}");
                return false;
            }
        };
        let tool_map = self
            .toolmem
            .lock()
            .map(|m| m.recent(256))
            .unwrap_or_default();
        let cp = Checkpoint {
            text,
            payload: &payload,
            tokens: n as u32,
            ctx: self.cfg.ctx as u32,
            quant_bits: self.cfg.quant_bits,
            reason,
            key_flags,
            tool_map: &tool_map,
        };
        match store.store(&cp) {
            Ok(e) => {
                let c = match reason {
                    SaveReason::Cold => &self.metrics.kv_stores_cold,
                    SaveReason::Continued => &self.metrics.kv_stores_continued,
                    SaveReason::Evict => &self.metrics.kv_stores_evict,
                    _ => &self.metrics.kv_stores_shutdown,
                };
                Metrics::inc(c);
                tracing::info!(target: "kvcache", "stored {} checkpoint: {} tokens, {} bytes, {}", reason.name(), n, e.file_bytes, e.path.display());
                self.trace(&format!(
                    "--- trace: kv store {} tokens={} file={} ---\n",
                    reason.name(),
                    n,
                    e.path.display()
                ));
                true
            }
            Err(e) => {
                tracing::warn!(target: "kvcache", "{} checkpoint not stored: {e}", reason.name());
                false
            }
        }
    }

    /// Load the longest valid disk checkpoint whose text prefixes `prompt`. Damaged or foreign
    /// files are skipped (and counted); the next candidate is tried.
    fn disk_lookup(&mut self, prompt: &str) -> Option<(Vec<u32>, KvEntry)> {
        let store = self.store.clone()?;
        let o = store.options().clone();
        let p = prompt.as_bytes();
        let mut cands: Vec<KvEntry> = store
            .entries()
            .into_iter()
            .filter(|e| {
                e.header.tokens as usize >= self.cfg.min_tokens
                    && e.header.ctx as usize <= self.cfg.ctx
                    && (e.text_bytes as usize) <= p.len()
                    && prompt.is_char_boundary(e.text_bytes as usize)
                    && (!o.reject_different_quant || e.header.quant_bits == o.quant_bits)
                    && sha1_hex(&p[..e.text_bytes as usize]) == e.sha1
            })
            .collect();
        cands.sort_by_key(|e| std::cmp::Reverse(e.text_bytes));
        for e in cands {
            let loaded = match store.load(&e) {
                Ok(l) => l,
                Err(err) => {
                    Metrics::inc(&self.metrics.kv_load_failures);
                    self.trace(&format!("--- trace: kv file ignored: {err} ---\n"));
                    if matches!(err, KvError::Foreign { .. }) {
                        tracing::warn!(target: "kvcache", "ignoring checkpoint of another model: {}", e.path.display());
                    }
                    continue;
                }
            };
            if loaded.text.as_slice() != &p[..loaded.text.len()] {
                continue;
            }
            if let Err(err) = self.session.restore(&loaded.payload) {
                Metrics::inc(&self.metrics.kv_load_failures);
                tracing::warn!(target: "kvcache", "ignoring {}: cannot restore the payload: {err}", e.path.display());
                store.remove(&e);
                self.session.reset();
                continue;
            }
            // A thinking- or responses-visible checkpoint's text is the client's form of its
            // tokens (the hidden reasoning dropped), not their decoding; the checksum vouches
            // for both.
            if e.header.ext_flags & (EXT_THINKING_VISIBLE | EXT_RESPONSES_VISIBLE) == 0
                && self.tok.decode(self.session.tokens()) != loaded.text
            {
                Metrics::inc(&self.metrics.kv_load_failures);
                tracing::warn!(target: "kvcache", "ignoring {}: payload tokens do not match its text", e.path.display());
                store.remove(&e);
                self.session.reset();
                continue;
            }
            if !loaded.tool_map.is_empty()
                && let Ok(mut m) = self.toolmem.lock()
            {
                for (id, dsml) in &loaded.tool_map {
                    m.insert(std::slice::from_ref(id), Arc::from(dsml.as_str()));
                }
            }
            if self.cfg.cold_max > 0 && e.header.tokens as usize > self.cfg.cold_max {
                store.remove(&e);
            } else {
                let _ = store.touch(&e);
            }
            tracing::info!(target: "kvcache", "disk hit: {} tokens from {}", e.header.tokens, e.path.display());
            return Some((self.session.tokens().to_vec(), e));
        }
        None
    }

    fn encode_suffix(&self, base: &[u32], rest: &str) -> Option<Vec<u32>> {
        let mut t = base.to_vec();
        t.extend(self.tok.encode_ds4_chat(rest).ok()?);
        Some(t)
    }

    /// The cache decision: target tokens, reused count, source name.
    fn prepare(&mut self, job: &Job) -> (Vec<u32>, usize, &'static str) {
        let live = self.session.tokens().to_vec();
        let prompt = &job.prompt_tokens;
        let alias = self.alias.take();
        if !live.is_empty() && live.len() <= prompt.len() && prompt[..live.len()] == live[..] {
            Metrics::inc(&self.metrics.hits_memory_token);
            return (prompt.clone(), live.len(), "memory-token");
        }
        if !live.is_empty() {
            let text = &job.prompt_text;
            if let Some(a) = &alias
                && a.live_len == live.len()
                && text.starts_with(&a.visible)
                && let Some(t) = self.encode_suffix(&live, &text[a.visible.len()..])
            {
                Metrics::inc(if a.responses {
                    &self.metrics.hits_responses_visible
                } else {
                    &self.metrics.hits_thinking_visible
                });
                return (t, live.len(), a.source());
            }
            let live_text = self.tok.decode(&live);
            if text.as_bytes().starts_with(&live_text)
                && text.is_char_boundary(live_text.len())
                && let Some(t) = self.encode_suffix(&live, &text[live_text.len()..])
            {
                Metrics::inc(&self.metrics.hits_memory_text);
                return (t, live.len(), "memory-text");
            }
            let common = self.session.common_prefix(prompt);
            let reason = format!(
                "--- trace: live kv cache miss: live={} prompt={} common={} ---\n",
                live.len(),
                prompt.len(),
                common
            );
            self.trace(&reason);
            // The evict checkpoint is keyed by the visible form when it covers the session.
            self.alias = alias;
            self.save(SaveReason::Evict);
            self.alias = None;
        }
        self.session.reset();
        if let Some((tokens, e)) = self.disk_lookup(&job.prompt_text)
            && let Some(t) = self.encode_suffix(&tokens, &job.prompt_text[e.text_bytes as usize..])
        {
            Metrics::inc(&self.metrics.hits_disk);
            self.trace(&format!(
                "--- trace: disk hit {} tokens file={} ---\n",
                tokens.len(),
                e.path.display()
            ));
            return (t, tokens.len(), "disk");
        }
        self.session.reset();
        Metrics::inc(&self.metrics.misses);
        (prompt.clone(), 0, "cold")
    }

    /// Where a cold prompt of `tokens` gets its checkpoint, if it qualifies.
    fn cold_point(&self, tokens: &[u32]) -> Option<usize> {
        let c = &self.cfg;
        if self.store.is_none() || c.cold_max == 0 {
            return None;
        }
        let n = tokens.len();
        if n < c.min_tokens || n > c.cold_max {
            return None;
        }
        let sp = self.tok.specials();
        let point = match chat_anchor(tokens, sp.user, sp.assistant) {
            Some(a) if a >= c.min_tokens => a,
            _ => {
                let t = n.saturating_sub(c.trim);
                t.checked_div(c.align).map_or(t, |q| q * c.align)
            }
        };
        (point >= c.min_tokens.max(1) && point <= n).then_some(point)
    }

    /// Prefill `target` from the current length, cutting chunks at the cold point and the
    /// continued frontiers, checking cancellation between chunks.
    fn prefill(&mut self, job: &Job, target: &[u32], cold: Option<usize>) -> Result<(), Stop> {
        let f = self.cfg.frontier;
        while self.session.len() < target.len() {
            let pos = self.session.len();
            let mut end = (pos + self.cfg.prefill_chunk).min(target.len());
            if let Some(c) = cold
                && pos < c
                && c < end
            {
                end = c;
            }
            if let Some(q) = pos.checked_div(f) {
                end = end.min((q + 1) * f);
            }
            let t0 = Instant::now();
            self.session
                .prefill(&target[pos..end])
                .map_err(|e| Stop::Engine(e.to_string()))?;
            self.metrics
                .prefill(end - pos, t0.elapsed().as_nanos() as u64);
            if Some(end) == cold {
                self.save(SaveReason::Cold);
            } else if f > 0 && end.is_multiple_of(f) {
                self.save(SaveReason::Continued);
            }
            if job.gone() {
                return Err(Stop::Cancelled);
            }
            if self.shutdown.is_cancelled() {
                return Err(Stop::Shutdown);
            }
        }
        Ok(())
    }

    fn run_job(&mut self, job: Job) {
        let t_start = Instant::now();
        if let Some(h) = &job.trace_head {
            self.trace(&format!(
                "===== request {} {} =====\n{h}",
                job.seq,
                timestamp()
            ));
        }
        let (target, cached, source) = self.prepare(&job);
        self.trace(&format!(
            "cache_source: {source}\nprompt_tokens: {}\neffective_prompt_tokens: {}\ncached_tokens: {cached}\n",
            job.prompt_tokens.len(),
            target.len()
        ));
        tracing::info!(target: "ds4_server", "request {}: {} prompt tokens, {} cached ({source})", job.seq, target.len(), cached);
        if target.len() >= self.cfg.ctx {
            job.send(Ev::Failed(
                400,
                format!(
                    "Prompt has {} tokens, but the configured context size is {} tokens",
                    target.len(),
                    self.cfg.ctx
                ),
            ));
            self.trace(&format!("===== end request {} =====\n", job.seq));
            return;
        }
        let mut usage = Usage {
            prompt: target.len(),
            cached,
            completion: 0,
        };
        Metrics::add(&self.metrics.prompt_tokens, target.len() as u64);
        Metrics::add(&self.metrics.cached_tokens, cached as u64);
        job.send(Ev::Started(usage));

        let cold = if source == "cold" {
            self.cold_point(&target)
        } else {
            None
        };
        let t_prefill = Instant::now();
        let prefill_n = target.len() - self.session.len();
        match self.prefill(&job, &target, cold) {
            Ok(()) => {}
            Err(stop) => {
                self.end_early(&job, stop, usage);
                return;
            }
        }
        if prefill_n > 0 {
            let s = t_prefill.elapsed().as_secs_f64().max(1e-9);
            self.metrics
                .last_prefill_tps_milli
                .store((prefill_n as f64 / s * 1000.0) as u64, Ordering::Relaxed);
        }

        // ---- decode ----
        let t_decode = Instant::now();
        let eos = self.tok.eos_id();
        let max_new = job
            .max_tokens
            .min(self.cfg.ctx.saturating_sub(self.session.len()));
        let opts = if job.raw_output {
            ParseOptions {
                thinking: false,
                tools: false,
            }
        } else {
            ParseOptions {
                thinking: job.think.enabled(),
                tools: job.tools,
            }
        };
        let mut parser = StreamParser::new(opts);
        let mut raw: Vec<u8> = Vec::new();
        let mut fed = 0usize;
        let max_stop = job.stop.iter().map(String::len).max().unwrap_or(0);
        let mut rng = Rng::new(job.seed);
        let mut script: Option<std::vec::IntoIter<u32>> = self
            .script
            .as_ref()
            .and_then(|s| s.pick(&job.prompt_text))
            .map(|e| match &e.tokens {
                Some(t) => t.clone().into_iter(),
                None => self
                    .tok
                    .encode_ds4_chat(&e.text)
                    .unwrap_or_default()
                    .into_iter(),
            });
        let mut ids: Vec<String> = Vec::new();
        let mut streamed_content = String::new();
        let mut finish = Finish::Length;
        let mut stop_sequence = None;
        // Bytes of the last sampled token that were not decoded into the session.
        let mut undecoded = 0usize;
        let mut n_gen = 0usize;
        let mut decoded_gen = 0usize;
        let emit = |job: &Job,
                    evs: Vec<StreamEvent>,
                    ids: &mut Vec<String>,
                    streamed: &mut String,
                    tracer: Option<&Tracer>| {
            for ev in evs {
                let e = match ev {
                    StreamEvent::Reasoning(s) => Ev::Reasoning(s),
                    StreamEvent::Content(s) => {
                        streamed.push_str(&s);
                        Ev::Content(s)
                    }
                    StreamEvent::ToolCallStart { index, name } => {
                        while ids.len() <= index {
                            ids.push(crate::ids::tool_id(job.tool_id_prefix));
                        }
                        if let Some(t) = tracer {
                            t.write(&format!("\n--- trace: tool call {index} {name} ---\n"));
                        }
                        Ev::ToolStart {
                            index,
                            id: ids[index].clone(),
                            name,
                        }
                    }
                    StreamEvent::ToolCallArgs { index, delta } => Ev::ToolArgs { index, delta },
                    StreamEvent::ToolCallEnd { index } => Ev::ToolEnd { index },
                    StreamEvent::ToolCallsDone => continue,
                };
                job.send(e);
            }
        };
        if max_new > 0 {
            if self.tracer.is_some() {
                self.trace("--- generated text ---\n");
            }
            loop {
                if job.gone() {
                    self.end_early(&job, Stop::Cancelled, usage);
                    return;
                }
                if self.shutdown.is_cancelled() {
                    finish = Finish::Error("shutdown requested".into());
                    break;
                }
                let tok = match script.as_mut() {
                    Some(it) => it.next().unwrap_or(eos),
                    None => {
                        let mut p = job.sampler;
                        if job.tools
                            && parser.in_tool_block()
                            && !dsml_in_string_body(parser.text())
                        {
                            p.temperature = 0.0;
                        }
                        self.session.next_token(&p, &mut rng)
                    }
                };
                if tok == eos {
                    finish = Finish::Stop;
                    break;
                }
                n_gen += 1;
                let bytes = self.tok.token_bytes(tok).unwrap_or(&[]).to_vec();
                if let Some(t) = &self.tracer {
                    t.write(&String::from_utf8_lossy(&bytes));
                }
                raw.extend_from_slice(&bytes);
                undecoded = bytes.len();
                if max_stop > 0 {
                    let from = fed.saturating_sub(max_stop);
                    let hit = job
                        .stop
                        .iter()
                        .filter_map(|s| {
                            raw[from..]
                                .windows(s.len())
                                .position(|w| w == s.as_bytes())
                                .map(|i| (from + i, s))
                        })
                        .min_by_key(|(i, _)| *i);
                    if let Some((at, s)) = hit {
                        if at > fed {
                            let evs = parser.feed(&raw[fed..at]);
                            emit(
                                &job,
                                evs,
                                &mut ids,
                                &mut streamed_content,
                                self.tracer.as_deref(),
                            );
                        }
                        fed = at.max(fed);
                        raw.truncate(fed);
                        stop_sequence = Some(s.clone());
                        finish = Finish::Stop;
                        break;
                    }
                }
                let safe = if max_stop > 0 {
                    raw.len().saturating_sub(max_stop - 1)
                } else {
                    raw.len()
                };
                if safe > fed {
                    let evs = parser.feed(&raw[fed..safe]);
                    fed = safe;
                    emit(
                        &job,
                        evs,
                        &mut ids,
                        &mut streamed_content,
                        self.tracer.as_deref(),
                    );
                }
                if parser.tool_calls_done() {
                    finish = Finish::ToolCalls;
                    // Run the closing token too: the live session then holds the whole DSML
                    // block, so the next turn reuses all of it, and a checkpoint's text
                    // contains the block, which keeps its tool-id mapping in the checkpoint
                    // (exact replay after a restart). One decode step, which the next turn
                    // would otherwise prefill.
                    let t0 = Instant::now();
                    match self.session.advance(tok) {
                        Ok(_) => {
                            undecoded = 0;
                            decoded_gen += 1;
                            Metrics::add(
                                &self.metrics.decode_nanos,
                                t0.elapsed().as_nanos() as u64,
                            );
                        }
                        Err(e) => {
                            tracing::warn!(target: "ds4_server", "cannot run the tool-calls closer: {e}")
                        }
                    }
                    break;
                }
                if n_gen >= max_new {
                    finish = Finish::Length;
                    break;
                }
                let t0 = Instant::now();
                if let Err(e) = self.session.advance(tok) {
                    finish = Finish::Error(e.to_string());
                    break;
                }
                undecoded = 0;
                decoded_gen += 1;
                Metrics::add(&self.metrics.decode_nanos, t0.elapsed().as_nanos() as u64);
                let f = self.cfg.frontier;
                if f > 0 && self.session.len().is_multiple_of(f) && !parser.in_tool_block() {
                    self.save(SaveReason::Continued);
                }
            }
        }
        if fed < raw.len() {
            let evs = parser.feed(&raw[fed..]);
            emit(
                &job,
                evs,
                &mut ids,
                &mut streamed_content,
                self.tracer.as_deref(),
            );
        }
        let (evs, outcome) = parser.finish();
        emit(
            &job,
            evs,
            &mut ids,
            &mut streamed_content,
            self.tracer.as_deref(),
        );
        usage.completion = n_gen;
        Metrics::add(&self.metrics.completion_tokens, n_gen as u64);
        if n_gen > 0 {
            let s = t_decode.elapsed().as_secs_f64().max(1e-9);
            self.metrics
                .last_decode_tps_milli
                .store((n_gen as f64 / s * 1000.0) as u64, Ordering::Relaxed);
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let thinking = opts.thinking;
        let split = |t: &str| -> (Option<String>, String) {
            if thinking && let Some(i) = t.find(THINK_END_TEXT) {
                let r = t[..i].strip_prefix(THINK_START_TEXT).unwrap_or(&t[..i]);
                return (
                    Some(r.to_string()),
                    t[i + THINK_END_TEXT.len()..].to_string(),
                );
            }
            (None, t.to_string())
        };
        let mut out = Outcome {
            finish,
            stop_sequence,
            reasoning: None,
            content: String::new(),
            tool_calls: Vec::new(),
            text: text.clone(),
            usage,
        };
        let mut raw_dsml = None;
        if job.raw_output {
            out.content = text.clone();
        } else {
            match outcome {
                ParseOutcome::Ok(m) => {
                    if thinking && !text.contains(THINK_END_TEXT) {
                        // Still thinking when generation ended: it is reasoning (as streamed).
                        let r = text.strip_prefix(THINK_START_TEXT).unwrap_or(&text);
                        out.reasoning = Some(r.to_string());
                    } else {
                        out.reasoning = m.reasoning;
                        out.content = m.content;
                    }
                    for (i, c) in m.tool_calls.into_iter().enumerate() {
                        while ids.len() <= i {
                            ids.push(crate::ids::tool_id(job.tool_id_prefix));
                        }
                        out.tool_calls.push(CallOut {
                            id: ids[i].clone(),
                            name: c.name,
                            arguments: c.arguments,
                        });
                    }
                    if !out.tool_calls.is_empty() {
                        out.finish = Finish::ToolCalls;
                        raw_dsml = m.raw_dsml;
                    }
                }
                ParseOutcome::Malformed(_) | ParseOutcome::Unterminated(_) => {
                    let unterminated = matches!(outcome, ParseOutcome::Unterminated(_));
                    tracing::warn!(target: "tool", "invalid tool call returned as assistant text");
                    let (r, c) = split(&text);
                    out.reasoning = r;
                    out.content = c;
                    if let Some(tail) = out.content.strip_prefix(streamed_content.as_str())
                        && !tail.is_empty()
                    {
                        job.send(Ev::Content(tail.to_string()));
                    }
                    if unterminated && out.finish != Finish::Length {
                        out.finish = Finish::Error("unterminated tool call".into());
                    }
                }
            }
        }
        if let Some(dsml) = &raw_dsml {
            let ids: Vec<String> = out.tool_calls.iter().map(|c| c.id.clone()).collect();
            if let Ok(mut m) = self.toolmem.lock() {
                m.insert(&ids, Arc::from(dsml.as_str()));
                self.metrics
                    .tool_memory_ids
                    .store(m.len() as u64, Ordering::Relaxed);
            }
        }
        // Remember the client-visible form of a thinking turn: the same transcript with the
        // hidden reasoning dropped, standing for the live tokens. Only when the reasoning was
        // closed: the visible form renders `</think>`, which the live tokens must then hold.
        if thinking
            && !job.raw_output
            && out.reasoning.is_some()
            && text.contains(THINK_END_TEXT)
            && out.stop_sequence.is_none()
            && !matches!(out.finish, Finish::Error(_))
            && self.session.len() == target.len() + decoded_gen
        {
            let mut vis = out.content.clone();
            if let Some(d) = &raw_dsml {
                vis.push_str(d);
            }
            let p = &job.prompt_text;
            let prefix = if job.tool_context {
                Some(format!("{p}{THINK_END_TEXT}"))
            } else {
                p.strip_suffix(THINK_START_TEXT)
                    .map(|s| format!("{s}{THINK_END_TEXT}"))
            };
            if let Some(prefix) = prefix
                && raw.ends_with(vis.as_bytes())
                && vis.len() >= undecoded
                && vis.is_char_boundary(vis.len() - undecoded)
            {
                self.alias = Some(Alias {
                    visible: format!("{prefix}{}", &vis[..vis.len() - undecoded]),
                    live_len: self.session.len(),
                    responses: job.api == crate::error::Api::Responses,
                });
            }
        }
        if matches!(out.finish, Finish::Error(_)) {
            Metrics::inc(&self.metrics.failed);
        } else {
            Metrics::inc(&self.metrics.completed);
        }
        if self.tracer.is_some() {
            let mut s = format!(
                "\n--- parsed message ---\nfinish: {}\ngenerated_tokens: {}\nelapsed: {:.3}s\n",
                out.finish.openai(),
                n_gen,
                t_start.elapsed().as_secs_f64()
            );
            if let Some(r) = &out.reasoning {
                s.push_str(&format!("reasoning: {r}\n"));
            }
            s.push_str(&format!("content: {}\n", out.content));
            for (i, c) in out.tool_calls.iter().enumerate() {
                s.push_str(&format!(
                    "tool_call[{i}]: id={} name={} arguments={}\n",
                    c.id, c.name, c.arguments
                ));
            }
            s.push_str(&format!("===== end request {} =====\n", job.seq));
            self.trace(&s);
        }
        job.send(Ev::Done(Box::new(out)));
    }

    fn end_early(&mut self, job: &Job, stop: Stop, usage: Usage) {
        match stop {
            Stop::Cancelled => {
                Metrics::inc(&self.metrics.cancelled);
                tracing::info!(target: "ds4_server", "request {} cancelled by the client", job.seq);
                self.trace(&format!(
                    "--- trace: cancelled ---\n===== end request {} =====\n",
                    job.seq
                ));
            }
            Stop::Shutdown => {
                Metrics::inc(&self.metrics.failed);
                job.send(Ev::Failed(503, "server shutting down".into()));
                self.trace(&format!(
                    "--- trace: shutdown ---\n===== end request {} =====\n",
                    job.seq
                ));
            }
            Stop::Engine(msg) => {
                Metrics::inc(&self.metrics.failed);
                tracing::error!(target: "ds4_server", "request {} failed: {msg}", job.seq);
                job.send(Ev::Failed(500, msg.clone()));
                self.trace(&format!(
                    "--- trace: engine error {msg} ---\n===== end request {} =====\n",
                    job.seq
                ));
            }
        }
        let _ = usage;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_body_detection() {
        let t = "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"p\" string=\"true\">ab";
        assert!(dsml_in_string_body(t));
        assert!(!dsml_in_string_body(&format!("{t}</｜DSML｜parameter>\n")));
        let j = "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"p\" string=\"false\">{\"a\"";
        assert!(!dsml_in_string_body(j));
        assert!(!dsml_in_string_body(
            "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"p\" str"
        ));
    }

    #[test]
    fn anchor_is_last_user_before_first_assistant() {
        // bos sys U a U b A c E U d A
        let (u, a) = (10, 11);
        let t = [0, 5, u, 6, u, 7, a, 8, 1, u, 9, a];
        assert_eq!(chat_anchor(&t, u, a), Some(4));
        assert_eq!(chat_anchor(&[0, 5], u, a), None);
    }
}
