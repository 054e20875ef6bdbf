//! Operations: API key, CORS, body limit, bounded queue (503 + Retry-After), client disconnect
//! cancelling the job, SSE keep-alives while waiting, errors after the headers, drain and
//! shutdown checkpoint.

mod common;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

fn long_job(max_tokens: u32) -> Value {
    json!({"think": false, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Tell me a long story."}]})
}

async fn wait_metric(s: &ds4_server::Server, series: &str, want: f64) {
    let t0 = Instant::now();
    while metric(s, series).await != want {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{series} never reached {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_on_every_route() {
    let mut a = args();
    a.api_key = Some("sekret".into());
    let s = start(a);
    for path in [
        "/v1/models",
        "/health",
        "/metrics",
        "/v1/models/deepseek-v4-flash",
        "/nope",
    ] {
        let (st, _, body) = get(&s, path).await;
        assert_eq!(st, 401, "{path}");
        assert!(body.contains("invalid or missing API key"), "{body}");
    }
    let (st, _, body) = post(&s, "/v1/messages", &json!({"messages": []})).await;
    assert_eq!(st, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["type"],
        "authentication_error"
    );
    let (st, _, _) = post_raw(
        &s,
        "/v1/chat/completions",
        b"{}".to_vec(),
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(st, 401);
    let ok = |h: (&'static str, &'static str)| {
        let req = Request::get("/v1/models")
            .header(h.0, h.1)
            .body(Body::empty())
            .unwrap();
        send(&s, req)
    };
    assert_eq!(ok(("authorization", "Bearer sekret")).await.0, 200);
    assert_eq!(ok(("x-api-key", "sekret")).await.0, 200);
    // CORS preflights carry no credentials.
    let req = Request::options("/v1/chat/completions")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&s, req).await.0, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_opt_in() {
    let s = start(args());
    let req = Request::options("/v1/chat/completions")
        .body(Body::empty())
        .unwrap();
    let r = s.router().oneshot(req).await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let mut a = args();
    a.cors = true;
    let s = start(a);
    let req = Request::options("/v1/chat/completions")
        .body(Body::empty())
        .unwrap();
    let r = s.router().oneshot(req).await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        r.headers()["access-control-allow-methods"],
        "GET, POST, OPTIONS"
    );
    let r = s
        .router()
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let mut a = args();
    a.max_body_bytes = 1000;
    let s = start(a);
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(2000)}]});
    let (st, _, body) = post(&s, "/v1/chat/completions", &big).await;
    assert_eq!(st, 413);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["message"],
        "request body too large"
    );
    let (st, _, body) = post(&s, "/v1/messages", &big).await;
    assert_eq!(st, 413);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["type"],
        "request_too_large"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let mut a = args();
    a.queue_max = 1;
    let s = start(a);
    let router = s.router();
    let send_job = |body: Value| {
        let r = router.clone();
        tokio::spawn(async move {
            let req = Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let resp = r.oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let _ = resp.into_body().collect().await;
            (status, retry)
        })
    };
    let running = send_job(long_job(120));
    wait_metric(&s, "ds4_engine_busy", 1.0).await;
    let queued = send_job(long_job(1));
    wait_metric(&s, "ds4_queue_depth", 1.0).await;
    let (status, retry) = send_job(long_job(1)).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(running.await.unwrap().0, 200);
    assert_eq!(queued.await.unwrap().0, 200);
    assert_eq!(metric(&s, "ds4_requests_rejected_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_job() {
    let s = start(args());
    let mut body = long_job(2000);
    body["stream"] = true.into();
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = s.router().oneshot(req).await.unwrap();
    let mut b = resp.into_body();
    // Read a few chunks, then hang up.
    let mut n = 0;
    while n < 5 {
        let f = b.frame().await.unwrap().unwrap();
        if f.data_ref().is_some_and(|d| d.starts_with(b"data:")) {
            n += 1;
        }
    }
    drop(b);
    let t0 = Instant::now();
    wait_metric(&s, "ds4_jobs_total{outcome=\"cancelled\"}", 1.0).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(metric(&s, "ds4_completion_tokens_total").await < 200.0);
    // The engine is free for the next request.
    let (st, _, _) = post(&s, "/v1/chat/completions", &long_job(2)).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_get_keepalives_while_waiting() {
    let s = start(args()); // keep-alive every second
    let router = s.router();
    let r = router.clone();
    // The running job must outlast a keep-alive interval by a margin on a fast machine too
    // (150 tokens took 0.8 s on a 2-core box: no keep-alive was due; 1000 take ~3.5 s).
    let running = tokio::spawn(async move {
        let req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(long_job(1000).to_string()))
            .unwrap();
        r.oneshot(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
    });
    wait_metric(&s, "ds4_engine_busy", 1.0).await;
    let mut b = long_job(3);
    b["stream"] = true.into();
    let (st, _, body) = post(&s, "/v1/chat/completions", &b).await;
    running.await.unwrap();
    assert_eq!(st, 200);
    let first_data = body.find("data:").unwrap();
    assert!(
        body[..first_data]
            .lines()
            .any(|l| l.starts_with(':') && l.contains("prefill")),
        "{body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_errors_after_the_headers_are_sse_error_events() {
    // A scripted token id outside the vocabulary makes the session's decode fail mid-stream.
    let (d, p) = script(json!([{"tokens": [19923, 99_999_999]}]));
    let mut a = args();
    a.test_script = Some(p);
    let s = start(a);
    let mut b = long_job(10);
    b["stream"] = true.into();
    let (st, _, body) = post(&s, "/v1/chat/completions", &b).await;
    assert_eq!(st, 200);
    assert!(body.contains("\"content\":\"Hello\""), "{body}");
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{last}");
    let err: Value = serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(err["error"]["type"], "server_error");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside the vocabulary")
    );
    // Anthropic shape.
    let (_, _, body) = post(
        &s,
        "/v1/messages",
        &json!({"max_tokens": 10, "stream": true, "thinking": {"type": "disabled"},
        "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert!(
        body.contains("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\""),
        "{body}"
    );
    // Not streamed: a 500 with the engine's message.
    let (st, _, body) = post(&s, "/v1/chat/completions", &long_job(10)).await;
    assert_eq!(st, 500, "{body}");
    // The session recovers.
    assert_eq!(metric(&s, "ds4_jobs_total{outcome=\"failed\"}").await, 3.0);
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_stops_at_the_context_end() {
    let mut a = args();
    a.ctx = 64;
    let s = start(a);
    let mut b = long_job(1000);
    b["stream"] = true.into();
    let (_, _, body) = post(&s, "/v1/chat/completions", &b).await;
    let data = sse_data(&body);
    let last = &data[data.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let (_, _, body) = post(&s, "/v1/chat/completions", &long_job(1000)).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let u = &v["usage"];
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap(),
        64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_stops_and_writes_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.kv_disk_dir = Some(dir.path().to_path_buf());
    a.kv_cache_min_tokens = 8;
    a.kv_cache_cold_max_tokens = 0;
    a.kv_cache_continued_interval_tokens = 0;
    let s = start(a);
    let router = s.router();
    // A short job in flight finishes during the drain; a very long stream is stopped when the
    // grace period ends and gets an SSE error event.
    let r = router.clone();
    let long = tokio::spawn(async move {
        let mut b = long_job(100_000);
        b["stream"] = true.into();
        let req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(b.to_string()))
            .unwrap();
        let body = r
            .oneshot(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    });
    wait_metric(&s, "ds4_engine_busy", 1.0).await;
    let t0 = Instant::now();
    let state = s.state().clone();
    let stop = tokio::spawn(async move { s.shutdown(Duration::from_secs(1)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // New requests are refused while draining.
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(long_job(1).to_string()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    stop.await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "bounded drain");
    let body = long.await.unwrap();
    assert!(
        body.contains("event: error"),
        "{}",
        &body[body.len().saturating_sub(300)..]
    );
    assert!(body.contains("shutdown requested"));
    assert_eq!(
        state
            .metrics
            .kv_stores_shutdown
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// `/metrics` has what the issue names: requests, tokens, prefill/decode rates, queue depth and
/// cache hits, consistent with the usage the client got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_requests_tokens_rates_queue_and_cache() {
    let s = start(args());
    let (st, _, body) = post(&s, "/v1/chat/completions", &long_job(8)).await;
    assert_eq!(st, 200, "{body}");
    let u = serde_json::from_str::<Value>(&body).unwrap()["usage"].clone();
    let (prompt, completion) = (
        u["prompt_tokens"].as_u64().unwrap() as f64,
        u["completion_tokens"].as_u64().unwrap() as f64,
    );
    assert_eq!(completion, 8.0);
    let (_, _, _) = post(
        &s,
        "/v1/messages",
        &json!({"max_tokens": 2, "thinking": {"type": "disabled"},
        "messages": [{"role": "user", "content": "Hi."}]}),
    )
    .await;
    // The engine worker marks itself idle just after the last response bytes are sent: wait
    // (bounded) for that before reading the counters.
    let mut tries = 0;
    let (st, ct, text) = loop {
        let (st, ct, text) = get(&s, "/metrics").await;
        let busy = ds4_server::metrics::scrape(&text, "ds4_engine_busy");
        if busy != Some(1.0) || tries == 100 {
            break (st, ct, text);
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(st, 200);
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let m = |k: &str| {
        ds4_server::metrics::scrape(&text, k).unwrap_or_else(|| panic!("no {k} in\n{text}"))
    };
    assert_eq!(m("ds4_requests_total{endpoint=\"chat\"}"), 1.0);
    assert_eq!(m("ds4_requests_total{endpoint=\"messages\"}"), 1.0);
    assert_eq!(m("ds4_requests_total{endpoint=\"responses\"}"), 0.0);
    assert_eq!(m("ds4_jobs_total{outcome=\"completed\"}"), 2.0);
    assert!(m("ds4_prompt_tokens_total") > prompt);
    assert_eq!(m("ds4_completion_tokens_total"), completion + 2.0);
    assert_eq!(
        m("ds4_prompt_tokens_total"),
        m("ds4_cached_prompt_tokens_total") + m("ds4_prefilled_tokens_total")
    );
    assert!(m("ds4_prefill_tokens_per_second") > 0.0);
    assert!(m("ds4_decode_tokens_per_second") > 0.0);
    assert!(m("ds4_prefill_seconds_total") > 0.0 && m("ds4_decode_seconds_total") > 0.0);
    assert_eq!(m("ds4_queue_depth"), 0.0);
    assert_eq!(m("ds4_engine_busy"), 0.0);
    assert_eq!(m("ds4_sse_streams_open"), 0.0);
    // Two unrelated prompts: two misses (the second evicts nothing: no disk cache).
    assert_eq!(m("ds4_cache_lookups_total{source=\"miss\"}"), 2.0);
    assert_eq!(m("ds4_cache_lookups_total{source=\"memory-token\"}"), 0.0);
    assert_eq!(m("ds4_cache_lookups_total{source=\"disk\"}"), 0.0);
    assert_eq!(m("ds4_requests_rejected_total"), 0.0);
    assert!(text.contains("ds4_model_info{model=\"deepseek-v4-flash\"} 1"));
    // Every family has HELP and TYPE lines.
    for fam in text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap())
    {
        assert!(text.contains(&format!("# TYPE {fam} ")), "{fam}");
        assert!(text.contains(&format!("# HELP {fam} ")), "{fam}");
    }
}

/// `serve_on` (what `ds4 serve` runs) over a real socket on an ephemeral 127.0.0.1 port.
struct Socket {
    addr: std::net::SocketAddr,
    state: ds4_server::AppState,
    sig: Option<tokio::sync::oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<Result<(), ds4_server::ServerError>>,
}

async fn serve_socket(a: ds4_server::ServeArgs) -> Socket {
    let server = start(a);
    let state = server.state().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sig, sig_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(ds4_server::serve_on(listener, server, async {
        let _ = sig_rx.await;
    }));
    Socket {
        addr,
        state,
        sig: Some(sig),
        serving,
    }
}

impl Socket {
    /// The shutdown signal (SIGINT/SIGTERM for `ds4 serve`).
    fn signal(&mut self) {
        self.sig.take().expect("one signal").send(()).unwrap();
    }
    /// Signal if not yet, then wait for `serve_on` to return Ok (drain included).
    async fn join(mut self) {
        if self.sig.is_some() {
            self.signal();
        }
        let r = tokio::time::timeout(Duration::from_secs(30), self.serving)
            .await
            .expect("serve_on returns")
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
}

/// POST a chat request over a plain socket; the raw response (read to EOF).
fn http_post(addr: std::net::SocketAddr, body: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `serve_on` (what `ds4 serve` runs until SIGINT/SIGTERM) over a real socket: on the signal it
/// stops accepting, lets the in-flight stream finish, writes the shutdown checkpoint, returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_drains_in_flight_work_then_checkpoints_and_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.kv_disk_dir = Some(dir.path().to_path_buf());
    a.kv_cache_min_tokens = 8;
    a.kv_cache_cold_max_tokens = 0;
    a.kv_cache_continued_interval_tokens = 0;
    a.shutdown_grace_secs = 20;
    let mut sock = serve_socket(a).await;
    let addr = sock.addr;
    let state = sock.state.clone();
    let mut b = long_job(48);
    b["stream"] = true.into();
    let body = b.to_string();
    let client = tokio::task::spawn_blocking(move || http_post(addr, &body).unwrap());
    let busy = || {
        state
            .metrics
            .busy
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let t0 = Instant::now();
    while busy() != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the job never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sock.signal();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Draining: no new work (the listener is closed, or the request is refused with 503).
    let late = long_job(1).to_string();
    if let Ok(out) = tokio::task::spawn_blocking(move || http_post(addr, &late))
        .await
        .unwrap()
    {
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 503"), "{out}");
    }
    sock.join().await;
    // The in-flight stream was finished, not cut: 48 tokens, finish_reason length, [DONE].
    let out = client.await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"finish_reason\":\"length\""), "{out}");
    assert!(out.contains("data: [DONE]"), "{out}");
    assert!(!out.contains("event: error"), "{out}");
    assert_eq!(
        state
            .metrics
            .kv_stores_shutdown
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// A client that stalls inside a request head is disconnected after `--header-timeout-secs`
/// (axum's own server never times a head out: the connection was held for as long as the
/// client kept it open), while a complete request on another connection is answered; a head
/// that arrives slowly but within the timeout is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_head_is_disconnected() {
    use std::io::{Read, Write};
    let mut a = args();
    a.header_timeout_secs = 2;
    let sock = serve_socket(a).await;
    let addr = sock.addr;
    let stalled = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            .unwrap();
        let t0 = Instant::now();
        let mut out = Vec::new();
        let r = c.read_to_end(&mut out);
        (
            t0.elapsed(),
            r.map(|_| String::from_utf8_lossy(&out).into_owned()),
        )
    });
    // A head sent in two parts 300 ms apart (well within the timeout) is served.
    let slow = tokio::task::spawn_blocking(move || {
        let body = long_job(1).to_string();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (a, b) = req.as_bytes().split_at(30);
        c.write_all(a).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        c.write_all(b).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let body = long_job(1).to_string();
    let out = tokio::task::spawn_blocking(move || http_post(addr, &body))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = slow.await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (dt, r) = stalled.await.unwrap();
    let got = r.expect("the server closes the stalled connection (not the client's read timeout)");
    assert!(
        dt < Duration::from_secs(10),
        "closed after {dt:?}, expected about 2 s"
    );
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
    sock.join().await;
}

/// Over a real socket (`serve_on`'s accept loop, not `oneshot`): a client that hangs up in the
/// middle of a stream cancels its job, and the engine serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_on_the_socket_cancels_its_job() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::Ordering::Relaxed;
    let sock = serve_socket(args()).await;
    let addr = sock.addr;
    let state = sock.state.clone();
    let mut b = long_job(2000);
    b["stream"] = true.into();
    let body = b.to_string();
    tokio::task::spawn_blocking(move || {
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        // Read a few events, then hang up.
        let mut r = BufReader::new(c);
        let (mut line, mut events) = (String::new(), 0);
        while events < 5 {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "stream ended early");
            if line.starts_with("data:") {
                events += 1;
            }
        }
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    while state.metrics.cancelled.load(Relaxed) != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the job was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(state.metrics.completion_tokens.load(Relaxed) < 200);
    let next = long_job(2).to_string();
    let out = tokio::task::spawn_blocking(move || http_post(addr, &next))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    sock.join().await;
}
