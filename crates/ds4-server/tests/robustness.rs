//! Adversarial and protocol-conformance cases found in review: each request here once got a
//! wrong answer (an empty body, a 200 for a request the official APIs refuse, a dropped turn,
//! a 400 for valid JSON).

mod common;
use axum::body::Body;
use axum::http::Request;
use common::*;
use serde_json::{Value, json};

fn body_json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// A wrong method on a known route is a 405 with the route's protocol error body (and the
/// `Allow` header), not an empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_a_protocol_shaped_405() {
    let s = start(args());
    for (method, path, anthropic, allow) in [
        ("GET", "/v1/chat/completions", false, "POST"),
        ("GET", "/v1/completions", false, "POST"),
        ("DELETE", "/v1/responses", false, "POST"),
        ("GET", "/v1/messages", true, "POST"),
        ("PUT", "/v1/messages/count_tokens", true, "POST"),
        ("POST", "/v1/models", false, "GET"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let resp = tower::ServiceExt::oneshot(s.router(), req).await.unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        let allowed = resp
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(
            allowed.contains(allow),
            "{method} {path}: allow {allowed:?}"
        );
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "{method} {path}: {ct}");
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v = body_json(&String::from_utf8_lossy(&bytes));
        if anthropic {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains(path));
        } else {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains(method));
        }
    }
}

/// An empty `messages` array is a 400 (as the OpenAI and Anthropic APIs answer), not a
/// generation from a bare BOS; count_tokens agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_messages_are_a_400() {
    let s = start(args());
    for (path, body, anthropic) in [
        (
            "/v1/chat/completions",
            json!({"messages": [], "max_tokens": 2}),
            false,
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [], "max_tokens": 2, "stream": true}),
            false,
        ),
        (
            "/v1/messages",
            json!({"messages": [], "max_tokens": 2, "system": "s"}),
            true,
        ),
        (
            "/v1/messages",
            json!({"messages": [], "max_tokens": 2, "stream": true}),
            true,
        ),
        ("/v1/messages/count_tokens", json!({"messages": []}), true),
    ] {
        let (st, ct, text) = post(&s, path, &body).await;
        assert_eq!(st, 400, "{path} {body}: {text}");
        assert!(ct.starts_with("application/json"), "{path}: {ct}");
        let v = body_json(&text);
        let msg = if anthropic {
            assert_eq!(v["type"], "error");
            &v["error"]["message"]
        } else {
            assert_eq!(v["error"]["param"], "messages");
            &v["error"]["message"]
        };
        assert!(
            msg.as_str().unwrap().contains("at least one message"),
            "{v}"
        );
    }
    // One message is enough (a system-only chat is not refused either).
    let (st, _, text) = post(
        &s,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "system", "content": "s"}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200, "{text}");
}

/// An Anthropic user message whose blocks carry no text (an image, a document) is still a user
/// turn: the prompt keeps the turn and the assistant prefix after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_image_only_user_turn_is_kept() {
    let s = start(args());
    let count = |msgs: Value| {
        let s = &s;
        async move {
            let (st, _, text) = post(
                s,
                "/v1/messages/count_tokens",
                &json!({"messages": msgs, "thinking": {"type": "disabled"}}),
            )
            .await;
            assert_eq!(st, 200, "{text}");
            body_json(&text)["input_tokens"].as_u64().unwrap()
        }
    };
    let image = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}});
    let image_only = count(json!([{"role": "user", "content": [image]}])).await;
    let empty_text = count(json!([{"role": "user", "content": ""}])).await;
    // BOS <｜User｜> <｜Assistant｜> </think>: the same prompt as an empty text turn.
    assert_eq!(image_only, empty_text);
    assert!(image_only >= 4, "{image_only}");

    // In a conversation: the image turn after an assistant turn still gets an answer prefix.
    let (_, p) = ds4_server_prompt(
        &s,
        json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [image, {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]},
        ]),
    )
    .await;
    assert!(p.ends_with("<｜User｜><｜Assistant｜></think>"), "{p}");
}

/// Render an Anthropic request's prompt through the same parse and render path the server uses.
async fn ds4_server_prompt(s: &ds4_server::Server, msgs: Value) -> (usize, String) {
    let body = json!({"messages": msgs, "thinking": {"type": "disabled"}}).to_string();
    let p = ds4_server::http::prepare(s.state(), ds4_server::Api::Messages, body.as_bytes())
        .expect("prepare");
    (p.prompt_tokens.len(), p.prompt_text)
}

/// Unpaired UTF-16 surrogate escapes are valid JSON (JavaScript and Python write them for a
/// string cut inside a pair); they become U+FFFD instead of failing the request as invalid
/// JSON. Paired escapes and escaped backslashes are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_surrogate_escapes_are_accepted() {
    let s = start(args());
    let cases: [(&str, &[u8]); 4] = [
        (
            "/v1/chat/completions",
            br#"{"messages":[{"role":"user","content":"cut \ud83d"}],"max_tokens":1}"#,
        ),
        (
            "/v1/messages",
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"\udc00 tail"}]}],"max_tokens":1}"#,
        ),
        (
            "/v1/responses",
            br#"{"input":"x \ud800\ud800","max_output_tokens":1}"#,
        ),
        (
            "/v1/completions",
            br#"{"prompt":"\ud800","max_tokens":1}"#,
        ),
    ];
    for (path, body) in cases {
        let (st, _, text) = post_raw(&s, path, body.to_vec(), &[]).await;
        assert_eq!(st, 200, "{path}: {text}");
    }
    // The replacement is what reaches the prompt; tools (read from the raw body) too.
    let body = br#"{"messages":[{"role":"user","content":"a\ud83dz \ud83d\ude00 \\ud800"}],
        "tools":[{"type":"function","function":{"name":"f","description":"d\udfff"}}]}"#;
    let p = ds4_server::http::prepare(s.state(), ds4_server::Api::Chat, body).expect("prepare");
    assert!(
        p.prompt_text.contains("a\u{fffd}z \u{1f600} \\ud800"),
        "{}",
        p.prompt_text
    );
    assert!(
        p.prompt_text.contains(r#""description":"d\ufffd""#),
        "{}",
        p.prompt_text
    );
    assert!(p.req.has_tools());
    // Still invalid: a broken escape.
    let (st, _, text) = post_raw(
        &s,
        "/v1/chat/completions",
        br#"{"messages":[{"role":"user","content":"\ud8"}]}"#.to_vec(),
        &[],
    )
    .await;
    assert_eq!(st, 400, "{text}");
}

/// A client that announces a body and never sends it gets a 408 in the protocol's shape after
/// `--body-timeout-secs` instead of holding the connection (and a handler) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_times_out() {
    let mut a = args();
    a.body_timeout_secs = 1;
    let s = start(a);
    for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
        let first: Result<axum::body::Bytes, std::io::Error> =
            Ok(axum::body::Bytes::from_static(b"{\"messages\":"));
        let stalled =
            tokio_stream::StreamExt::chain(tokio_stream::iter([first]), tokio_stream::pending());
        let req = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from_stream(stalled))
            .unwrap();
        let t0 = std::time::Instant::now();
        let (st, _, text) = tokio::time::timeout(std::time::Duration::from_secs(20), send(&s, req))
            .await
            .expect("the server answers a stalled body");
        assert!(t0.elapsed() >= std::time::Duration::from_millis(900));
        assert_eq!(st, 408, "{path}: {text}");
        let v = body_json(&text);
        let msg = if anthropic {
            assert_eq!(v["type"], "error");
            &v["error"]["message"]
        } else {
            &v["error"]["message"]
        };
        assert!(msg.as_str().unwrap().contains("timed out"), "{v}");
    }
}
