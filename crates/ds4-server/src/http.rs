//! The HTTP layer: shared state, router, middleware (API key, CORS), handlers.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ds4_kvstore::KvStore;
use ds4_model::SamplerParams;
use ds4_tokenizer::chat::uses_tool_context;
use ds4_tokenizer::{ThinkMode, Tokenizer, render_chat, render_completion_prompt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutError};

use crate::args::ServeArgs;
use crate::error::{Api, ApiError};
use crate::format::{
    self, ChatStream, CompletionStream, Formatter, MessagesStream, RespMeta, RespState,
    ResponsesStream,
};
use crate::ids::{self, Sequence};
use crate::metrics::Metrics;
use crate::request::{self, DEFAULT_MODEL, GenRequest};
use crate::toolmem::{self, ToolMemory};
use crate::worker::{Ev, Job};

/// State shared by every handler.
pub struct Shared {
    pub args: ServeArgs,
    pub tok: Arc<Tokenizer>,
    /// Model id advertised and echoed.
    pub model_id: String,
    /// Human-readable model name.
    pub display_name: String,
    pub jobs: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
    pub toolmem: Arc<Mutex<ToolMemory>>,
    pub store: Option<Arc<KvStore>>,
    pub chat_seq: Sequence,
    pub cmpl_seq: Sequence,
    pub req_seq: Sequence,
    /// Cancelled when the server starts draining: new requests get 503.
    pub draining: CancellationToken,
    /// Cancelled when in-flight work must stop.
    pub shutdown: CancellationToken,
    pub tracing: bool,
    /// Bounds how many requests are parsed, rendered and tokenized at once (the CPU's
    /// parallelism). Besides not oversubscribing the cores under a burst, this bounds the
    /// number of blocking-pool threads that tokenize, and with it the memory of the
    /// tokenizer's per-thread BPE caches.
    pub prepare_slots: tokio::sync::Semaphore,
}

/// Concurrent request preparations: the available parallelism, 1 to 8.
pub fn prepare_parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

/// Cloneable handle on the shared state.
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The router (all routes, middleware and limits).
pub fn router(state: AppState) -> Router {
    let limit = state.args.max_body_bytes;
    let mut r = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model_one))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit));
    if state.args.body_timeout_secs > 0 {
        r = r.layer(RequestBodyTimeoutLayer::new(Duration::from_secs(
            state.args.body_timeout_secs,
        )));
    }
    r.layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

fn api_of_path(path: &str) -> Api {
    if path.starts_with("/v1/messages") {
        Api::Messages
    } else if path.starts_with("/v1/responses") {
        Api::Responses
    } else if path.starts_with("/v1/completions") {
        Api::Completions
    } else if path.starts_with("/v1/chat") {
        Api::Chat
    } else {
        Api::Other
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = s.args.api_key.as_deref().filter(|k| !k.is_empty())
        && req.method() != Method::OPTIONS
    {
        let h = req.headers();
        let bearer = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let xkey = h
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let ok = [bearer, xkey]
            .into_iter()
            .flatten()
            .any(|k| ct_eq(k.as_bytes(), key.as_bytes()));
        if !ok {
            let api = api_of_path(req.uri().path());
            return ApiError::new(StatusCode::UNAUTHORIZED, api, "invalid or missing API key")
                .into_response();
        }
    }
    next.run(req).await
}

fn cors_headers(h: &mut HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("*"),
    );
}

async fn cors(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if s.args.cors {
            cors_headers(r.headers_mut());
        }
        return r;
    }
    let mut r = next.run(req).await;
    if s.args.cors {
        cors_headers(r.headers_mut());
    }
    r
}

async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        api_of_path(req.uri().path()),
        "unknown endpoint",
    )
    .into_response()
}

/// A known path with the wrong method: 405 in the protocol's error shape (axum's default is an
/// empty body, which SDKs cannot parse), keeping axum's `Allow` header.
async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path();
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        api_of_path(path),
        format!("Invalid method for URL ({} {path})", req.method()),
    )
    .into_response()
}

fn model_object(s: &Shared, id: &str) -> serde_json::Value {
    let ctx = s.args.ctx;
    json!({
        "id": id, "object": "model", "created": 1_767_225_600u64, "owned_by": "ds4-rs",
        "name": s.display_name, "context_length": ctx,
        "top_provider": {"context_length": ctx, "max_completion_tokens": s.args.tokens.min(ctx), "is_moderated": false},
        "supported_parameters": ["tools", "tool_choice", "max_tokens", "temperature", "top_p", "top_k",
                                 "min_p", "stop", "seed", "stream", "reasoning_effort"],
    })
}

async fn models(State(s): State<AppState>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_object(&s, &s.model_id)]})).into_response()
}

async fn model_one(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let known = [
        s.model_id.as_str(),
        DEFAULT_MODEL,
        "deepseek-chat",
        "deepseek-reasoner",
    ];
    if known.contains(&id.as_str()) {
        axum::Json(model_object(&s, &id)).into_response()
    } else {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Api::Other,
            format!("The model '{id}' does not exist"),
        )
        .into_response()
    }
}

async fn health(State(s): State<AppState>) -> Response {
    let draining = s.draining.is_cancelled();
    let body = json!({
        "status": if draining { "shutting_down" } else { "ok" },
        "model": s.model_id,
        "ctx": s.args.ctx,
        "queue_depth": s.metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed).max(0),
        "busy": s.metrics.busy.load(std::sync::atomic::Ordering::Relaxed) > 0,
    });
    let code = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(body)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        s.metrics.render(&s.model_id),
    )
        .into_response()
}

fn body_or_error(api: Api, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let mut status = r.status();
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&r);
        while let Some(e) = src {
            if e.is::<TimeoutError>() {
                status = StatusCode::REQUEST_TIMEOUT;
                break;
            }
            src = e.source();
        }
        let msg = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "request body too large",
            StatusCode::REQUEST_TIMEOUT => "timed out reading the request body",
            _ => "bad HTTP request",
        };
        ApiError::new(status, api, msg)
    })
}

/// A request rendered and tokenized, ready to queue.
pub struct Prepared {
    pub req: GenRequest,
    pub prompt_text: String,
    pub prompt_tokens: Vec<u32>,
    pub think: ThinkMode,
    pub tool_context: bool,
    pub trace_head: Option<String>,
}

/// Parse, apply the replay map, render and tokenize (blocking work).
pub fn prepare(s: &Shared, api: Api, body: &[u8]) -> Result<Prepared, ApiError> {
    let mut req = match api {
        Api::Chat => request::parse_chat(body)?,
        Api::Completions => request::parse_completions(body)?,
        Api::Responses => request::parse_responses(body)?,
        _ => request::parse_messages(body)?,
    };
    let think = req.think_mode(s.args.ctx);
    let mut replay = toolmem::ReplayStats::default();
    if !s.args.disable_exact_dsml_tool_replay && req.completion_prompt.is_none() {
        let missing = match s.toolmem.lock() {
            Ok(m) => toolmem::missing_ids(&m, &req.messages),
            Err(_) => Vec::new(),
        };
        let mut from_disk = Vec::new();
        if !missing.is_empty()
            && let Some(store) = &s.store
        {
            let refs: Vec<&str> = missing.iter().map(String::as_str).collect();
            let found = store.find_tool_ids(&refs);
            if let Ok(mut m) = s.toolmem.lock() {
                for (id, dsml) in found {
                    m.insert(std::slice::from_ref(&id), Arc::from(dsml.as_str()));
                    from_disk.push(id);
                }
            }
        }
        if let Ok(mut m) = s.toolmem.lock() {
            replay = toolmem::attach(&mut m, &mut req.messages, &from_disk);
        }
    }
    let prompt_text = match &req.completion_prompt {
        Some(p) => render_completion_prompt(p, think),
        None => render_chat(&req.messages, &req.tools, think),
    };
    let prompt_tokens = s
        .tok
        .encode_ds4_chat(&prompt_text)
        .map_err(|e| ApiError::bad_request(api, format!("cannot tokenize the prompt: {e}")))?;
    let tool_context = uses_tool_context(&req.messages, &req.tools);
    let trace_head = s.tracing.then(|| {
        format!(
            "kind: {}\nmodel: {}\nstream: {}\ntools: {}\nthink_mode: {}\nprompt_tokens: {}\nmax_tokens: {:?}\ntemperature: {:?}\ntop_k: {:?}\ntop_p: {:?}\nmin_p: {:?}\nseed: {:?}\nstream_include_usage: {}\ntool_replay: mem={} disk={} canonical={} missing_ids={}\n--- raw request json ---\n{}\n--- rendered prompt ---\n{}\n",
            api.name(),
            req.model,
            req.stream,
            req.has_tools(),
            think.name(),
            prompt_tokens.len(),
            req.max_tokens,
            req.temperature,
            req.top_k,
            req.top_p,
            req.min_p,
            req.seed,
            req.include_usage,
            replay.mem,
            replay.disk,
            replay.canonical,
            replay.missing_ids,
            String::from_utf8_lossy(body),
            prompt_text
        )
    });
    Ok(Prepared {
        req,
        prompt_text,
        prompt_tokens,
        think,
        tool_context,
        trace_head,
    })
}

fn count_request(s: &Shared, api: Api) {
    let m = &s.metrics;
    Metrics::inc(match api {
        Api::Chat => &m.requests_chat,
        Api::Completions => &m.requests_completions,
        Api::Responses => &m.requests_responses,
        _ => &m.requests_messages,
    });
}

async fn prepare_async(s: &AppState, api: Api, body: Bytes) -> Result<Prepared, ApiError> {
    let _slot = s
        .prepare_slots
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable(api, "server shutting down", 5))?;
    let st = s.clone();
    match tokio::task::spawn_blocking(move || prepare(&st, api, &body)).await {
        Ok(r) => r,
        Err(e) => Err(ApiError::internal(
            api,
            format!("request preparation failed: {e}"),
        )),
    }
}

async fn generate(s: AppState, api: Api, body: Result<Bytes, BytesRejection>) -> Response {
    count_request(&s, api);
    match generate_inner(&s, api, body).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_client_error() {
                Metrics::inc(&s.metrics.bad_requests);
            }
            e.into_response()
        }
    }
}

async fn generate_inner(
    s: &AppState,
    api: Api,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_or_error(api, body)?;
    if s.draining.is_cancelled() {
        Metrics::inc(&s.metrics.rejected);
        return Err(ApiError::unavailable(api, "server shutting down", 5));
    }
    // A full queue refuses at once, before spending CPU on rendering and tokenizing (the
    // check is repeated when the job is queued).
    if s.jobs.capacity() == 0 {
        Metrics::inc(&s.metrics.rejected);
        return Err(queue_full(s, api));
    }
    let p = prepare_async(s, api, body).await?;
    let ctx = s.args.ctx;
    if p.prompt_tokens.len() >= ctx {
        return Err(ApiError::context_length(api, p.prompt_tokens.len(), ctx));
    }
    let req = p.req;
    let sampler = if p.think.enabled() {
        SamplerParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.05,
        }
    } else {
        SamplerParams {
            temperature: req.temperature.unwrap_or(s.args.temp),
            top_k: req.top_k.unwrap_or(s.args.top_k),
            top_p: req.top_p.unwrap_or(s.args.top_p),
            min_p: req.min_p.unwrap_or(s.args.min_p),
        }
    };
    let seed = req
        .seed
        .or((s.args.seed > 0).then_some(s.args.seed))
        .unwrap_or_else(ids::random_u64);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let job = Job {
        seq: s.req_seq.next(),
        api,
        prompt_text: p.prompt_text,
        prompt_tokens: p.prompt_tokens,
        max_tokens: req.max_tokens.unwrap_or(s.args.tokens),
        think: p.think,
        tools: req.has_tools(),
        tool_context: p.tool_context,
        tool_id_prefix: if api == Api::Messages {
            "toolu_"
        } else {
            "call_"
        },
        raw_output: api == Api::Completions,
        sampler,
        seed,
        stop: req.stop.clone(),
        events: ev_tx,
        cancel: cancel.clone(),
        trace_head: p.trace_head,
    };
    s.metrics
        .queue_depth
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = s.jobs.try_send(job) {
        s.metrics
            .queue_depth
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Metrics::inc(&s.metrics.rejected);
        return Err(match e {
            mpsc::error::TrySendError::Full(_) => queue_full(s, api),
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::unavailable(api, "server shutting down", 5)
            }
        });
    }
    let meta = RespMeta {
        id: match api {
            Api::Completions => format!("cmpl-{}", s.cmpl_seq.next()),
            Api::Responses => ids::item_id("resp_"),
            _ => format!("chatcmpl-{}", s.chat_seq.next()),
        },
        created: ids::unix_now(),
        model: req.model.clone(),
        include_usage: req.include_usage,
    };
    if req.stream {
        let fmt: Box<dyn Formatter> = match api {
            Api::Chat => Box::new(ChatStream::new(meta)),
            Api::Completions => Box::new(CompletionStream { meta }),
            Api::Messages => Box::new(MessagesStream::new(meta)),
            _ => Box::new(ResponsesStream::new(RespState::new(
                meta,
                req.reasoning_summary,
                req.wire_tools.clone(),
            ))),
        };
        Ok(stream_response(s, fmt, ev_rx, cancel))
    } else {
        collect_response(api, &req, meta, ev_rx, cancel).await
    }
}

fn queue_full(s: &Shared, api: Api) -> ApiError {
    ApiError::unavailable(
        api,
        format!(
            "server busy: {} requests are already waiting",
            s.args.queue_max
        ),
        1,
    )
}

struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .streams_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn stream_response(
    s: &AppState,
    mut fmt: Box<dyn Formatter>,
    mut ev_rx: mpsc::UnboundedReceiver<Ev>,
    cancel: CancellationToken,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    s.metrics
        .streams_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let guard = StreamGuard(s.metrics.clone());
    tokio::spawn(async move {
        let _guard = guard;
        // Dropping this cancels the job: the client went away or the stream ended.
        let _cancel = cancel.drop_guard();
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                ev = ev_rx.recv() => {
                    let Some(ev) = ev else { break };
                    let (evs, end) = fmt.on(ev);
                    for e in evs {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    if end {
                        break;
                    }
                }
            }
        }
    });
    let secs = s.args.keepalive_secs.max(1);
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(secs))
                .text("prefill"),
        )
        .into_response()
}

async fn collect_response(
    api: Api,
    req: &GenRequest,
    meta: RespMeta,
    mut ev_rx: mpsc::UnboundedReceiver<Ev>,
    cancel: CancellationToken,
) -> Result<Response, ApiError> {
    let _cancel = cancel.drop_guard();
    let out = loop {
        match ev_rx.recv().await {
            Some(Ev::Done(o)) => break o,
            Some(Ev::Failed(status, msg)) => {
                let code =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return Err(ApiError::new(code, api, msg));
            }
            Some(_) => {}
            None => return Err(ApiError::internal(api, "generation aborted")),
        }
    };
    if api != Api::Responses
        && let crate::worker::Finish::Error(msg) = &out.finish
    {
        return Err(ApiError::internal(api, msg.clone()));
    }
    let body = match api {
        Api::Chat => format::chat_json(&meta, &out),
        Api::Completions => format::completion_json(&meta, &out),
        Api::Messages => format::messages_json(&meta, &out),
        _ => {
            RespState::new(meta, req.reasoning_summary, req.wire_tools.clone()).response(Some(&out))
        }
    };
    Ok(axum::Json(body).into_response())
}

async fn chat(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, Api::Chat, body).await
}

async fn completions(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, Api::Completions, body).await
}

async fn responses(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, Api::Responses, body).await
}

async fn messages(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, Api::Messages, body).await
}

async fn count_tokens(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    Metrics::inc(&s.metrics.requests_count_tokens);
    let api = Api::Messages;
    let r = async {
        let body = body_or_error(api, body)?;
        let p = prepare_async(&s, api, body).await?;
        Ok::<_, ApiError>(
            axum::Json(json!({"input_tokens": p.prompt_tokens.len()})).into_response(),
        )
    }
    .await;
    r.unwrap_or_else(|e| {
        Metrics::inc(&s.metrics.bad_requests);
        e.into_response()
    })
}
