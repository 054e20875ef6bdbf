//! Test support: the tiny built-in model as an [`EngineBundle`], requests through the router
//! without a socket, and transcript normalisation.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ds4_model::{Engine, EngineOptions};
use ds4_server::{EngineBundle, ServeArgs, Server};
use ds4_tokenizer::Tokenizer;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Path of the built-in tiny model (written once per target dir).
pub fn tiny_model() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        ds4_convert::builtin::tiny_path(Some(&dir)).expect("built-in tiny model")
    })
    .clone()
}

struct Loaded {
    engine: Engine,
    tok: Arc<Tokenizer>,
}

fn loaded() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| {
        let g = Arc::new(ds4_gguf::Gguf::open(tiny_model()).expect("open tiny model"));
        let tok = Arc::new(Tokenizer::from_gguf(&g).expect("tokenizer"));
        let engine = Engine::from_gguf(g, EngineOptions::default()).expect("engine");
        Loaded { engine, tok }
    })
}

/// The tokenizer of the tiny model.
pub fn tokenizer() -> Arc<Tokenizer> {
    loaded().tok.clone()
}

/// The tiny model as an engine bundle with the given fingerprint.
pub fn bundle_with(fingerprint: [u8; 32]) -> EngineBundle {
    let l = loaded();
    let engine = l.engine.clone();
    EngineBundle {
        tokenizer: l.tok.clone(),
        shape: engine.shape().clone(),
        model_name: "deepseek-v4-flash".into(),
        quant_bits: 2,
        fingerprint,
        backend_factory: Box::new(move |ctx| Ok(Box::new(engine.cpu_backend(ctx)?))),
    }
}

pub fn bundle() -> EngineBundle {
    bundle_with([7; 32])
}

/// Test defaults: small context, fixed seed, quick keep-alives.
pub fn args() -> ServeArgs {
    ServeArgs {
        ctx: 4096,
        seed: 1,
        keepalive_secs: 1,
        shutdown_grace_secs: 2,
        ..ServeArgs::default()
    }
}

/// Write a test script and return its path (kept alive by the returned dir).
pub fn script(entries: serde_json::Value) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("script.json");
    std::fs::write(&p, entries.to_string()).unwrap();
    (d, p)
}

pub fn start(args: ServeArgs) -> Server {
    Server::start(args, bundle()).expect("server starts")
}

/// POST a JSON body; returns status, content type and the body text.
pub async fn post(
    server: &Server,
    path: &str,
    body: &serde_json::Value,
) -> (StatusCode, String, String) {
    post_raw(server, path, body.to_string().into_bytes(), &[]).await
}

pub async fn post_raw(
    server: &Server,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String) {
    let mut b = Request::post(path).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(server, b.body(Body::from(body)).unwrap()).await
}

pub async fn get(server: &Server, path: &str) -> (StatusCode, String, String) {
    send(server, Request::get(path).body(Body::empty()).unwrap()).await
}

pub async fn send(server: &Server, req: Request<Body>) -> (StatusCode, String, String) {
    let resp = server.router().oneshot(req).await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8_lossy(&bytes).into_owned())
}

/// A metric value from /metrics.
pub async fn metric(server: &Server, series: &str) -> f64 {
    let (_, _, text) = get(server, "/metrics").await;
    ds4_server::metrics::scrape(&text, series).unwrap_or_else(|| panic!("no series {series}"))
}

/// Replace volatile values (timestamps, random ids, keep-alive comments) with placeholders.
pub fn normalize(s: &str) -> String {
    let mut out = s.to_string();
    for key in ["\"created\":", "\"created_at\":"] {
        out = replace_number_after(&out, key);
    }
    for (prefix, n) in [
        ("call_", 32),
        ("toolu_", 32),
        ("resp_", 24),
        ("rs_", 24),
        ("msg_", 24),
        ("fc_", 24),
    ] {
        out = replace_hex_ids(&out, prefix, n);
    }
    // Drop SSE comment events (keep-alives: their number depends on timing).
    out.split("\n\n")
        .filter(|ev| !ev.lines().all(|l| l.starts_with(':')) || ev.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn replace_number_after(s: &str, key: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(key) {
        out.push_str(&rest[..i + key.len()]);
        rest = &rest[i + key.len()..];
        let ws = rest.bytes().take_while(|b| *b == b' ').count();
        out.push_str(&rest[..ws]);
        rest = &rest[ws..];
        let n = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if n > 0 {
            out.push('0');
        }
        rest = &rest[n..];
    }
    out.push_str(rest);
    out
}

fn replace_hex_ids(s: &str, prefix: &str, n: usize) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(prefix) {
        out.push_str(&rest[..i + prefix.len()]);
        rest = &rest[i + prefix.len()..];
        let h = rest
            .bytes()
            .take_while(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            .count();
        if h == n {
            out.push_str(&"X".repeat(n));
            rest = &rest[n..];
        }
    }
    out.push_str(rest);
    out
}

/// The `data:` payloads of an SSE body (JSON parsed; `[DONE]` as a string).
pub fn sse_data(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|d| serde_json::from_str(d).unwrap_or(serde_json::Value::String(d.to_string())))
        .collect()
}

/// The `event:` names of an SSE body.
pub fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| {
            l.strip_prefix("event: ")
                .or_else(|| l.strip_prefix("event:"))
        })
        .map(str::to_string)
        .collect()
}
