//! Transcripts of every protocol's JSON bodies and SSE event sequences (insta snapshots),
//! through the router without a socket. Generation is scripted (see `ds4_server::script`):
//! the tiny model's random weights never produce a tool call, so the worker emits these
//! texts token by token through the real session, parser and stream path.

mod common;
use common::*;
use serde_json::{Value, json};

const TOOL_CALL: &str = "The user wants the weather, so I call the tool.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris &amp; Lyon</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

fn script_entries() -> Value {
    json!([
        {"match": "<tool_result>", "text": "The tool answered.</think>It is sunny in Paris."},
        {"match": "weather", "text": TOOL_CALL},
        {"match": "count", "text": "one two three END four</think>five"},
        {"match": "plain", "text": "A plain answer."},
        {"text": "Let me think about it.</think>Hello! How can I help?"},
    ])
}

fn server() -> (tempfile::TempDir, ds4_server::Server) {
    let (d, p) = script(script_entries());
    let mut a = args();
    a.test_script = Some(p);
    (d, start(a))
}

fn weather_tools_openai() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}])
}

fn weather_tools_anthropic() -> Value {
    json!([{"name": "get_weather", "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}])
}

fn weather_tools_responses() -> Value {
    json!([{"type": "function", "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}])
}

fn pretty(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    normalize(&serde_json::to_string_pretty(&v).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_reasoning_content_usage() {
    let (_d, s) = server();
    let (st, ct, body) = post(&s, "/v1/chat/completions", &json!({
        "model": "deepseek-v4-flash", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}]})).await;
    assert_eq!(st, 200);
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    insta::assert_snapshot!(normalize(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_json_reasoning_content() {
    let (_d, s) = server();
    let (st, _, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(st, 200);
    insta::assert_snapshot!(pretty(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_tool_call() {
    let (_d, s) = server();
    let (st, _, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({
        "stream": true, "tools": weather_tools_openai(),
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}),
    )
    .await;
    assert_eq!(st, 200);
    // The streamed argument fragments build the same JSON as the final parse.
    let args: String = sse_data(&body)
        .iter()
        .filter_map(|d| {
            d["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(args, r#"{"city":"Paris & Lyon","days":2}"#);
    insta::assert_snapshot!(normalize(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_json_tool_call() {
    let (_d, s) = server();
    let (st, _, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({
        "tools": weather_tools_openai(),
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}),
    )
    .await;
    assert_eq!(st, 200);
    insta::assert_snapshot!(pretty(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stop_sequence_inside_reasoning() {
    let (_d, s) = server();
    let (_, _, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({
        "stop": ["END"], "messages": [{"role": "user", "content": "count please"}]}),
    )
    .await;
    insta::assert_snapshot!(pretty(&body));
    let (_, _, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({
        "stop": "END", "stream": true, "messages": [{"role": "user", "content": "count again"}]}),
    )
    .await;
    insta::assert_snapshot!("chat_stop_sequence_stream", normalize(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_max_tokens_length() {
    let (_d, s) = server();
    let (_, _, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({
        "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let (_, _, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({
        "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_raw_text() {
    let (_d, s) = server();
    let (st, _, body) = post(
        &s,
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 100}),
    )
    .await;
    assert_eq!(st, 200);
    insta::assert_snapshot!(pretty(&body));
    let (_, _, body) = post(
        &s,
        "/v1/completions",
        &json!({
        "prompt": ["plain question", "ignored"], "stream": true, "think": false,
        "stream_options": {"include_usage": true}}),
    )
    .await;
    insta::assert_snapshot!("completions_stream", normalize(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stream_thinking_text() {
    let (_d, s) = server();
    let (st, _, body) = post(&s, "/v1/messages", &json!({
        "model": "claude-sonnet-4-5", "max_tokens": 1000, "stream": true,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: 1"}, {"type": "text", "text": "Be nice."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})).await;
    assert_eq!(st, 200);
    insta::assert_snapshot!(normalize(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stream_tool_use() {
    let (_d, s) = server();
    let (_, _, body) = post(
        &s,
        "/v1/messages",
        &json!({
        "max_tokens": 1000, "stream": true, "tools": weather_tools_anthropic(),
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}),
    )
    .await;
    let partial: String = sse_data(&body)
        .iter()
        .filter_map(|d| d["delta"]["partial_json"].as_str().map(str::to_string))
        .collect();
    assert_eq!(partial, r#"{"city":"Paris & Lyon","days":2}"#);
    insta::assert_snapshot!(normalize(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_json_tool_use_and_thinking_only() {
    let (_d, s) = server();
    let (_, _, body) = post(
        &s,
        "/v1/messages",
        &json!({
        "max_tokens": 1000, "tools": weather_tools_anthropic(),
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}),
    )
    .await;
    insta::assert_snapshot!(pretty(&body));
    // Cut off while thinking: a thinking block and an empty text block.
    let (_, _, body) = post(
        &s,
        "/v1/messages",
        &json!({
        "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    insta::assert_snapshot!("messages_json_thinking_only", pretty(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_summary_and_tool() {
    let (_d, s) = server();
    let (st, _, body) = post(&s, "/v1/responses", &json!({
        "model": "gpt-5-codex", "stream": true, "tools": weather_tools_responses(),
        "reasoning": {"effort": "high", "summary": "auto"},
        "instructions": "You are a coding agent.",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]}]})).await;
    assert_eq!(st, 200);
    let seqs: Vec<u64> = sse_data(&body)
        .iter()
        .map(|d| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    insta::assert_snapshot!(normalize(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_text_without_summary() {
    let (_d, s) = server();
    let (_, _, body) = post(
        &s,
        "/v1/responses",
        &json!({
        "stream": true, "input": "hi"}),
    )
    .await;
    insta::assert_snapshot!(normalize(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_json_tool_call() {
    let (_d, s) = server();
    let (_, _, body) = post(
        &s,
        "/v1/responses",
        &json!({
        "tools": weather_tools_responses(), "reasoning": {"summary": "detailed"},
        "input": "What is the weather in Paris?"}),
    )
    .await;
    insta::assert_snapshot!(pretty(&body));
    let (_, _, body) = post(
        &s,
        "/v1/responses",
        &json!({"input": "hi", "max_output_tokens": 4}),
    )
    .await;
    insta::assert_snapshot!("responses_json_incomplete", pretty(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies() {
    let (_d, s) = server();
    let mut out = String::new();
    let mut record = |name: &str, r: (axum::http::StatusCode, String, String)| {
        out.push_str(&format!("{name}: {} {}\n", r.0.as_u16(), r.2));
    };
    record(
        "chat bad json",
        post_raw(&s, "/v1/chat/completions", b"{nope".to_vec(), &[]).await,
    );
    record(
        "messages bad json",
        post_raw(&s, "/v1/messages", b"[1,2]".to_vec(), &[]).await,
    );
    record(
        "chat missing messages",
        post(&s, "/v1/chat/completions", &json!({"model": "x"})).await,
    );
    record(
        "chat unknown role",
        post(
            &s,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "wizard", "content": "x"}]}),
        )
        .await,
    );
    record(
        "chat bad effort",
        post(
            &s,
            "/v1/chat/completions",
            &json!({"messages": [], "reasoning_effort": "ultra"}),
        )
        .await,
    );
    record(
        "completions missing prompt",
        post(&s, "/v1/completions", &json!({})).await,
    );
    record(
        "responses forced tool",
        post(
            &s,
            "/v1/responses",
            &json!({"input": "x", "tool_choice": {"type": "function", "name": "f"}}),
        )
        .await,
    );
    record(
        "responses previous id",
        post(
            &s,
            "/v1/responses",
            &json!({"input": "x", "previous_response_id": "resp_1"}),
        )
        .await,
    );
    record("responses unknown call id", post(&s, "/v1/responses", &json!({"input": [{"type": "function_call_output", "call_id": "call_zz", "output": "1"}]})).await);
    let long = "word ".repeat(5000);
    record(
        "chat context",
        post(
            &s,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": long}]}),
        )
        .await,
    );
    record(
        "responses context",
        post(&s, "/v1/responses", &json!({"input": long})).await,
    );
    record(
        "completions context",
        post(&s, "/v1/completions", &json!({"prompt": long})).await,
    );
    record(
        "messages context",
        post(
            &s,
            "/v1/messages",
            &json!({"max_tokens": 5, "messages": [{"role": "user", "content": long}]}),
        )
        .await,
    );
    record("unknown path", get(&s, "/v2/nothing").await);
    record("unknown model", get(&s, "/v1/models/gpt-4").await);
    insta::assert_snapshot!(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_count_tokens() {
    let (_d, s) = server();
    let (st, _, body) = get(&s, "/v1/models").await;
    assert_eq!(st, 200);
    insta::assert_snapshot!(pretty(&body));
    let (st, _, body) = get(&s, "/v1/models/deepseek-v4-flash").await;
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["id"],
        "deepseek-v4-flash"
    );
    let (st, _, body) = get(&s, "/health").await;
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let req = json!({"model": "claude", "messages": [{"role": "user", "content": "Hello"}],
                     "thinking": {"type": "disabled"}});
    let (st, _, body) = post(&s, "/v1/messages/count_tokens", &req).await;
    assert_eq!(st, 200);
    // <｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>
    let tok = tokenizer();
    let want = tok
        .encode_ds4_chat("<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>")
        .unwrap()
        .len();
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["input_tokens"],
        want
    );
}
