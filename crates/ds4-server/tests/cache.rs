//! Live prefix reuse and the disk KV cache, asserted from /metrics and usage: a request that
//! extends the previous one prefills only its new tokens — from the live session (token prefix,
//! text prefix, the visible transcript of a thinking turn whose reasoning the client dropped)
//! and, after a restart, from a disk checkpoint; damaged or foreign checkpoint files are
//! ignored.

mod common;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const SYSTEM: &str = "You are a careful assistant. Answer briefly, cite sources, and never invent facts. \
Keep a friendly tone, prefer short sentences, and ask when something is unclear.";

const TOOL_CALL: &str = "I need the file.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"read_file\">\n<｜DSML｜parameter name=\"path\" string=\"true\">src/main.rs</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

fn entries() -> Value {
    json!([
        {"match": "<tool_result>", "text": "The file is short.</think>It prints hello."},
        {"match": "main.rs", "text": TOOL_CALL},
        {"text": "Hello there, friend."},
    ])
}

fn scripted(mut a: ds4_server::ServeArgs) -> (tempfile::TempDir, ds4_server::Server) {
    let (d, p) = script(entries());
    a.test_script = Some(p);
    (d, start(a))
}

fn usage(body: &str) -> (u64, u64, u64) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    let u = &v["usage"];
    if u.get("prompt_tokens").is_some() {
        (
            u["prompt_tokens"].as_u64().unwrap(),
            u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
        )
    } else if u.get("cache_read_input_tokens").is_some() {
        let read = u["cache_read_input_tokens"].as_u64().unwrap();
        let write = u["cache_creation_input_tokens"].as_u64().unwrap();
        (
            u["input_tokens"].as_u64().unwrap() + read + write,
            read,
            u["output_tokens"].as_u64().unwrap(),
        )
    } else {
        (
            u["input_tokens"].as_u64().unwrap(),
            u["input_tokens_details"]["cached_tokens"].as_u64().unwrap(),
            u["output_tokens"].as_u64().unwrap(),
        )
    }
}

async fn prefilled(s: &ds4_server::Server) -> u64 {
    metric(s, "ds4_prefilled_tokens_total").await as u64
}

async fn source(s: &ds4_server::Server, src: &str) -> u64 {
    metric(s, &format!("ds4_cache_lookups_total{{source=\"{src}\"}}")).await as u64
}

fn chat_turn1(think: bool) -> Value {
    json!({"think": think, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Say hello."}]})
}

fn chat_turn2(think: bool) -> Value {
    json!({"think": think, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there, friend."},
        {"role": "user", "content": "And once more, please."}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_request_prefills_only_the_new_tail() {
    let (_d, s) = scripted(args());
    let (_, _, b1) = post(&s, "/v1/chat/completions", &chat_turn1(false)).await;
    let (p1, c1, g1) = usage(&b1);
    assert_eq!(c1, 0);
    assert_eq!(prefilled(&s).await, p1);
    let (_, _, b2) = post(&s, "/v1/chat/completions", &chat_turn2(false)).await;
    let (p2, c2, _) = usage(&b2);
    // Everything the first request left in the live session is reused...
    assert_eq!(c2, p1 + g1, "{b2}");
    // ...and only the new tail is prefilled.
    assert_eq!(prefilled(&s).await - p1, p2 - c2);
    assert!(p2 - c2 < 20, "tail of {} tokens", p2 - c2);
    // Live tokens are a prefix of the new prompt's tokens here (the scripted text tokenizes
    // the same way inside the transcript); otherwise the text-prefix path would take it.
    assert_eq!(
        source(&s, "memory-token").await + source(&s, "memory-text").await,
        1
    );
    assert_eq!(source(&s, "miss").await, 1);
    // The effective prompt equals a fresh tokenization of the rendered transcript here.
    let (_, _, n) = post(
        &s,
        "/v1/messages/count_tokens",
        &json!({"thinking": {"type": "disabled"},
        "system": SYSTEM, "messages": [{"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there, friend."},
        {"role": "user", "content": "And once more, please."}]}),
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&n).unwrap()["input_tokens"]
            .as_u64()
            .unwrap(),
        p2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_the_same_prefix_is_a_token_prefix_hit() {
    let (_d, s) = scripted(args());
    let mut r = chat_turn1(false);
    r["max_tokens"] = 0.into();
    let (_, _, b1) = post(&s, "/v1/chat/completions", &r).await;
    let (p1, _, _) = usage(&b1);
    let (_, _, b2) = post(&s, "/v1/chat/completions", &chat_turn2(false)).await;
    let (_, c2, _) = usage(&b2);
    assert_eq!(c2, p1);
    assert_eq!(source(&s, "memory-token").await, 1);
}

async fn openai_tool_round_trip(echo_reasoning: bool) {
    let (_d, s) = scripted(args());
    let tools = json!([{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]);
    let mut msgs = vec![json!({"role": "user", "content": "Summarize main.rs"})];
    let (_, _, b1) = post(
        &s,
        "/v1/chat/completions",
        &json!({"tools": tools, "messages": msgs}),
    )
    .await;
    let v1: Value = serde_json::from_str(&b1).unwrap();
    let (p1, _, g1) = usage(&b1);
    let msg = &v1["choices"][0]["message"];
    let call = msg["tool_calls"][0].clone();
    assert_eq!(call["function"]["arguments"], r#"{"path":"src/main.rs"}"#);
    let mut asst = json!({"role": "assistant", "content": null, "tool_calls": [call.clone()]});
    if echo_reasoning {
        asst["reasoning_content"] = msg["reasoning_content"].clone();
    }
    msgs.push(asst);
    msgs.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "fn main() { println!(\"hello\"); }"}));
    let before = prefilled(&s).await;
    let (_, _, b2) = post(
        &s,
        "/v1/chat/completions",
        &json!({"tools": tools, "messages": msgs}),
    )
    .await;
    let v2: Value = serde_json::from_str(&b2).unwrap();
    assert_eq!(v2["choices"][0]["message"]["content"], "It prints hello.");
    let (p2, c2, _) = usage(&b2);
    // Everything the tool-call turn left in the live session (the whole DSML block, its
    // closing token included) is reused.
    assert_eq!(c2, p1 + g1, "{b2}");
    assert_eq!(prefilled(&s).await - before, p2 - c2);
    if echo_reasoning {
        let n = source(&s, "memory-token").await + source(&s, "memory-text").await;
        assert_eq!(n, 1, "expected a live hit");
    } else {
        assert_eq!(source(&s, "thinking-visible").await, 1);
    }
    assert_eq!(source(&s, "miss").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_tool_round_trip_with_reasoning_reuses_live_kv() {
    openai_tool_round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_tool_round_trip_without_reasoning_reuses_live_kv() {
    openai_tool_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_tool_round_trip_reuses_live_kv() {
    let (_d, s) = scripted(args());
    let tools = json!([{"name": "read_file", "input_schema": {"type": "object"}}]);
    let mut msgs = vec![json!({"role": "user", "content": "Summarize main.rs"})];
    let (_, _, b1) = post(
        &s,
        "/v1/messages",
        &json!({"max_tokens": 500, "tools": tools, "messages": msgs}),
    )
    .await;
    let v1: Value = serde_json::from_str(&b1).unwrap();
    let (p1, _, g1) = usage(&b1);
    assert_eq!(v1["stop_reason"], "tool_use");
    let id = v1["content"][1]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("toolu_") && id.len() == 38, "{id}");
    msgs.push(json!({"role": "assistant", "content": v1["content"]}));
    msgs.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "fn main() {}"}]}));
    let before = prefilled(&s).await;
    let (_, _, b2) = post(
        &s,
        "/v1/messages",
        &json!({"max_tokens": 500, "tools": tools, "messages": msgs}),
    )
    .await;
    let v2: Value = serde_json::from_str(&b2).unwrap();
    assert_eq!(v2["content"][1]["text"], "It prints hello.", "{b2}");
    let (p2, c2, _) = usage(&b2);
    assert_eq!(c2, p1 + g1);
    assert_eq!(prefilled(&s).await - before, p2 - c2);
}

/// A Responses tool turn (turn 1): returns the tools, turn 2's input (the user message, the
/// function call and its output; no reasoning items sent back) and turn 1's prompt and
/// generated token counts.
async fn responses_tool_turn(s: &ds4_server::Server) -> (Value, Vec<Value>, u64, u64) {
    let tools =
        json!([{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]);
    let mut input = vec![
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Summarize main.rs"}]}),
    ];
    let (_, _, b1) = post(s, "/v1/responses", &json!({"tools": tools, "input": input})).await;
    let v1: Value = serde_json::from_str(&b1).unwrap();
    let (p1, _, g1) = usage(&b1);
    let fc = v1["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap()
        .clone();
    input.push(fc.clone());
    input.push(
        json!({"type": "function_call_output", "call_id": fc["call_id"], "output": "fn main() {}"}),
    );
    (tools, input, p1, g1)
}

/// The client's next Responses turn (the same tools and input): its cached tokens must be the
/// whole first turn (`p1 + g1`). Returns its prompt tokens.
async fn next_responses_turn(
    s: &ds4_server::Server,
    tools: &Value,
    input: &[Value],
    p1: u64,
    g1: u64,
) -> u64 {
    let (_, _, b2) = post(s, "/v1/responses", &json!({"tools": tools, "input": input})).await;
    let (p2, c2, _) = usage(&b2);
    assert_eq!(c2, p1 + g1, "{b2}");
    p2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_tool_round_trip_reuses_live_kv() {
    let (_d, s) = scripted(args());
    let (tools, input, p1, g1) = responses_tool_turn(&s).await;
    let before = prefilled(&s).await;
    let p2 = next_responses_turn(&s, &tools, &input, p1, g1).await;
    assert_eq!(prefilled(&s).await - before, p2 - (p1 + g1));
    // ds4's key for a Responses turn whose reasoning the client did not send back.
    assert_eq!(source(&s, "responses-visible").await, 1);
    assert_eq!(source(&s, "thinking-visible").await, 0);
}

/// A Responses tool turn evicted to disk is found again by the client's visible transcript
/// (no reasoning items sent back): the checkpoint of that text carries ds4's
/// `responses-visible` ext flag (bit 1), not the chat's `thinking-visible` one (bit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_checkpoints_are_keyed_by_the_visible_transcript() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, s) = scripted(disk_args(dir.path()));
    let (tools, input, p1, g1) = responses_tool_turn(&s).await;
    // Another conversation evicts the session: keyed by the live text and by the visible one.
    evict_by_another_conversation(&s).await;
    let flags: Vec<u8> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension().is_some_and(|x| x == "kv")).then(|| std::fs::read(p).unwrap()[6])
        })
        .collect();
    assert_eq!(flags.len(), 2, "{flags:?}");
    assert_eq!(flags.iter().filter(|f| *f & 2 != 0).count(), 1, "{flags:?}");
    assert!(flags.iter().all(|f| f & 4 == 0), "{flags:?}");
    next_responses_turn(&s, &tools, &input, p1, g1).await;
    assert_eq!(source(&s, "disk").await, 1);
    assert_eq!(metric(&s, "ds4_kv_disk_load_failures_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_replay_can_be_disabled() {
    let mut a = args();
    a.disable_exact_dsml_tool_replay = true;
    let (_d, s) = scripted(a);
    let tools = json!([{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]);
    let mut msgs = vec![json!({"role": "user", "content": "Summarize main.rs"})];
    let (_, _, b1) = post(
        &s,
        "/v1/chat/completions",
        &json!({"tools": tools, "messages": msgs}),
    )
    .await;
    let v1: Value = serde_json::from_str(&b1).unwrap();
    let call = v1["choices"][0]["message"]["tool_calls"][0].clone();
    msgs.push(
        json!({"role": "assistant", "content": "", "tool_calls": [call.clone()],
                     "reasoning_content": v1["choices"][0]["message"]["reasoning_content"]}),
    );
    msgs.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "x"}));
    let (_, _, b2) = post(
        &s,
        "/v1/chat/completions",
        &json!({"tools": tools, "messages": msgs}),
    )
    .await;
    // The canonical rendering of this call happens to equal the sampled block, so the live
    // session is still reused; the replay map was simply not consulted.
    assert_eq!(
        serde_json::from_str::<Value>(&b2).unwrap()["choices"][0]["message"]["content"],
        "It prints hello."
    );
    assert_eq!(metric(&s, "ds4_tool_memory_ids").await, 1.0);
}

/// An unrelated request, which evicts the live thinking session to disk under two keys (its
/// live text and its client-visible transcript).
async fn evict_by_another_conversation(s: &ds4_server::Server) {
    post(
        s,
        "/v1/chat/completions",
        &json!({"think": false, "messages": [{"role": "user", "content": "Something else."}]}),
    )
    .await;
    assert_eq!(
        metric(s, "ds4_kv_disk_stores_total{reason=\"evict\"}").await,
        2.0
    );
}

fn disk_args(dir: &std::path::Path) -> ds4_server::ServeArgs {
    let mut a = args();
    a.kv_disk_dir = Some(dir.to_path_buf());
    a.kv_cache_min_tokens = 16;
    a.kv_cache_cold_max_tokens = 0;
    a.kv_cache_continued_interval_tokens = 0;
    a
}

/// Server A answers turn 1 and shuts down (shutdown checkpoint); returns (p1 + g1).
async fn first_life(dir: &std::path::Path) -> u64 {
    let (_d, s) = scripted(disk_args(dir));
    let (_, _, b1) = post(&s, "/v1/chat/completions", &chat_turn1(false)).await;
    let (p1, _, g1) = usage(&b1);
    s.shutdown(Duration::from_secs(5)).await;
    let files: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one shutdown checkpoint");
    p1 + g1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_cache_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let live = first_life(dir.path()).await;
    let (_d, s) = scripted(disk_args(dir.path()));
    let (_, _, b2) = post(&s, "/v1/chat/completions", &chat_turn2(false)).await;
    let (p2, c2, _) = usage(&b2);
    assert_eq!(c2, live, "{b2}");
    assert_eq!(prefilled(&s).await, p2 - c2);
    assert_eq!(source(&s, "disk").await, 1);
    assert_eq!(metric(&s, "ds4_kv_disk_load_failures_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_makes_the_server_ignore_the_file() {
    let dir = tempfile::tempdir().unwrap();
    first_life(dir.path()).await;
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let (_d, s) = scripted(disk_args(dir.path()));
    let (_, _, b2) = post(&s, "/v1/chat/completions", &chat_turn2(false)).await;
    let (p2, c2, _) = usage(&b2);
    assert_eq!(c2, 0, "{b2}");
    assert_eq!(prefilled(&s).await, p2);
    assert_eq!(metric(&s, "ds4_kv_disk_load_failures_total").await, 1.0);
    assert_eq!(source(&s, "disk").await, 0);
    assert!(!file.exists(), "the damaged file is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_another_model_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    first_life(dir.path()).await;
    let (d, p) = script(entries());
    let mut a = disk_args(dir.path());
    a.test_script = Some(p);
    let s = ds4_server::Server::start(a, bundle_with([9; 32])).unwrap();
    let (_, _, b2) = post(&s, "/v1/chat/completions", &chat_turn2(false)).await;
    let (_, c2, _) = usage(&b2);
    assert_eq!(c2, 0);
    assert_eq!(metric(&s, "ds4_kv_disk_load_failures_total").await, 1.0);
    drop(d);
}

/// A thinking chat's checkpoint is keyed by its client-visible transcript (reasoning dropped),
/// so coming back to it after another conversation evicted it, or after a restart, is a disk
/// hit although the live tokens hold the hidden reasoning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_checkpoints_are_keyed_by_the_visible_transcript() {
    let dir = tempfile::tempdir().unwrap();
    let script_entries = json!([
        {"match": "Say hello.", "text": "The user wants a greeting.</think>Hello there, friend."},
        {"match": "once more", "text": "Greet again.</think>Hello again."},
        {"text": "Fine.</think>Fine."},
    ]);
    let start_one = || {
        let (d, p) = script(script_entries.clone());
        let mut a = disk_args(dir.path());
        a.test_script = Some(p);
        (d, start(a))
    };
    let (_d1, s) = start_one();
    let (_, _, b1) = post(&s, "/v1/chat/completions", &chat_turn1(true)).await;
    let v1: Value = serde_json::from_str(&b1).unwrap();
    assert_eq!(
        v1["choices"][0]["message"]["content"],
        "Hello there, friend."
    );
    assert!(
        v1["choices"][0]["message"]["reasoning_content"].is_string(),
        "{b1}"
    );
    let (p1, _, g1) = usage(&b1);
    // Another conversation evicts the thinking session to disk: one checkpoint keyed by the
    // live text (reasoning included), one by the visible transcript.
    evict_by_another_conversation(&s).await;
    // Turn 2 as a client sends it: the assistant's answer without its reasoning.
    let (_, _, b2) = post(&s, "/v1/chat/completions", &chat_turn2(true)).await;
    let v2: Value = serde_json::from_str(&b2).unwrap();
    assert_eq!(v2["choices"][0]["message"]["content"], "Hello again.");
    let (p2, c2, g2) = usage(&b2);
    assert_eq!(c2, p1 + g1, "{b2}");
    assert_eq!(source(&s, "disk").await, 1);
    // The same after a restart: the shutdown checkpoint of turn 2 is keyed the same way.
    s.shutdown(Duration::from_secs(5)).await;
    let (_d2, s2) = start_one();
    let mut turn3 = chat_turn2(true);
    let msgs = turn3["messages"].as_array_mut().unwrap();
    msgs.push(json!({"role": "assistant", "content": "Hello again."}));
    msgs.push(json!({"role": "user", "content": "Thanks."}));
    let (_, _, b3) = post(&s2, "/v1/chat/completions", &turn3).await;
    let (_, c3, _) = usage(&b3);
    // Everything turn 2 left in the live session, its hidden reasoning included.
    assert_eq!(c3, p2 + g2, "{b3}");
    assert_eq!(source(&s2, "disk").await, 1);
    assert_eq!(metric(&s2, "ds4_kv_disk_load_failures_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_continued_and_evict_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = disk_args(dir.path());
    a.kv_cache_cold_max_tokens = 10_000;
    a.kv_cache_continued_interval_tokens = 50;
    a.kv_cache_boundary_align_tokens = 32; // frontiers every 64 tokens
    a.kv_cache_boundary_trim_tokens = 4;
    let (_d, s) = scripted(a);
    let long_user = "Please read this carefully. ".repeat(30);
    let (_, _, b1) = post(
        &s,
        "/v1/chat/completions",
        &json!({"think": false, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": long_user}]}),
    )
    .await;
    let (p1, _, g1) = usage(&b1);
    // Cold: at the chat anchor (the system prompt, >= 16 tokens).
    assert_eq!(
        metric(&s, "ds4_kv_disk_stores_total{reason=\"cold\"}").await,
        1.0
    );
    // Continued: every multiple of 64 the session crossed, prompt and generation.
    let frontiers = (p1 + g1 - 1) / 64;
    assert_eq!(
        metric(&s, "ds4_kv_disk_stores_total{reason=\"continued\"}").await,
        frontiers as f64
    );
    // An unrelated request evicts the live session to disk first.
    let (_, _, _) = post(
        &s,
        "/v1/chat/completions",
        &json!({"think": false, "messages": [
        {"role": "user", "content": "Something else entirely."}]}),
    )
    .await;
    assert_eq!(
        metric(&s, "ds4_kv_disk_stores_total{reason=\"evict\"}").await,
        1.0
    );
    // Coming back to the first conversation restores the longest checkpoint: the evicted one.
    let (_, _, b3) = post(&s, "/v1/chat/completions", &json!({"think": false, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": long_user},
        {"role": "assistant", "content": "Hello there, friend."}, {"role": "user", "content": "Thanks."}]})).await;
    let (_, c3, _) = usage(&b3);
    assert_eq!(c3, p1 + g1);
    assert_eq!(source(&s, "disk").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_tokens_are_reused_through_the_text_prefix() {
    // The model may emit "Hel" + "lo" where the tokenizer would write "Hello": the live tokens
    // are then not a token prefix of the next prompt, but their text is a byte prefix of it, so
    // they are kept and only the suffix is tokenized.
    let tok = tokenizer();
    let mut ids = tok.encode_plain("Hel").unwrap();
    ids.extend(tok.encode_plain("lo").unwrap());
    ids.extend(tok.encode_plain(" world").unwrap());
    assert_ne!(ids, tok.encode_plain("Hello world").unwrap());
    let (d, p) = script(json!([{"tokens": ids}]));
    let mut a = args();
    a.test_script = Some(p);
    let s = start(a);
    let (_, _, b1) = post(&s, "/v1/chat/completions", &chat_turn1(false)).await;
    let (p1, _, g1) = usage(&b1);
    assert_eq!(
        serde_json::from_str::<Value>(&b1).unwrap()["choices"][0]["message"]["content"],
        "Hello world"
    );
    let mut r2 = chat_turn2(false);
    r2["messages"][2]["content"] = "Hello world".into();
    let (_, _, b2) = post(&s, "/v1/chat/completions", &r2).await;
    let (p2, c2, _) = usage(&b2);
    assert_eq!(c2, p1 + g1, "{b2}");
    assert_eq!(source(&s, "memory-text").await, 1);
    assert_eq!(prefilled(&s).await, p1 + (p2 - c2));
    // The effective prompt keeps the live (non-canonical) tokens: one more than a fresh
    // tokenization of the same transcript.
    let (_, _, n) = post(
        &s,
        "/v1/messages/count_tokens",
        &json!({"thinking": {"type": "disabled"},
        "system": SYSTEM, "messages": [{"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello world"},
        {"role": "user", "content": "And once more, please."}]}),
    )
    .await;
    let fresh = serde_json::from_str::<Value>(&n).unwrap()["input_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(p2, fresh + 1);
    drop(d);
}

/// `--trace FILE`: every request's raw JSON, rendered prompt, cache decision and output, so a
/// user can see why a request was (not) a cache hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_prompts_cache_decisions_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.txt");
    let mut a = args();
    a.trace = Some(path.clone());
    let (_d, s) = scripted(a);
    let (_, _, b1) = post(&s, "/v1/chat/completions", &chat_turn1(false)).await;
    let (p1, _, g1) = usage(&b1);
    let (_, _, b2) = post(&s, "/v1/chat/completions", &chat_turn2(false)).await;
    let (p2, c2, _) = usage(&b2);
    // A request that shares nothing with the live session: a miss that is logged.
    let (_, _, _) = post(
        &s,
        "/v1/chat/completions",
        &json!({"think": false, "messages": [{"role": "user", "content": "Unrelated."}]}),
    )
    .await;
    let t = std::fs::read_to_string(&path).unwrap();
    let reqs: Vec<&str> = t.split("===== request ").skip(1).collect();
    assert_eq!(reqs.len(), 3, "{t}");
    for (i, r) in reqs.iter().enumerate() {
        assert!(r.starts_with(&format!("{} ", i + 1)), "{r}");
        for section in [
            "kind: chat\n",
            "think_mode: none\n",
            "--- raw request json ---\n",
            "--- rendered prompt ---\n<｜begin▁of▁sentence｜>",
            "--- generated text ---\nHello there, friend.",
            "--- parsed message ---\nfinish: stop\n",
            "content: Hello there, friend.\n",
            &format!("===== end request {} =====", i + 1),
        ] {
            assert!(
                r.contains(section),
                "request {}: no {section:?} in\n{r}",
                i + 1
            );
        }
    }
    assert!(reqs[0].contains("cache_source: cold\n"), "{}", reqs[0]);
    assert!(reqs[0].contains(&format!(
        "effective_prompt_tokens: {p1}\ncached_tokens: 0\n"
    )));
    assert!(reqs[0].contains(&format!("generated_tokens: {g1}\n")));
    assert!(
        reqs[1].contains("cache_source: memory-token\n"),
        "{}",
        reqs[1]
    );
    assert!(reqs[1].contains(&format!(
        "effective_prompt_tokens: {p2}\ncached_tokens: {c2}\n"
    )));
    assert!(reqs[1].contains("And once more, please.<｜Assistant｜></think>"));
    assert!(
        reqs[2].contains("--- trace: live kv cache miss: live="),
        "{}",
        reqs[2]
    );
    assert!(reqs[2].contains("cache_source: cold\n"));
    drop(s);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// A tool call the model wrote in a non-canonical form: a string argument as a JSON string
/// (`string="false"`). Rendering the call back from the client's JSON gives `string="true"`,
/// so only the exact-DSML replay map can make the next prompt match the live session.
const NON_CANONICAL_CALL: &str = "I need the file.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"read_file\">\n<｜DSML｜parameter name=\"path\" string=\"false\">\"src/main.rs\"</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

fn replay_server(mut a: ds4_server::ServeArgs) -> (tempfile::TempDir, ds4_server::Server) {
    let (d, p) = script(json!([
        {"match": "<tool_result>", "text": "The file is short.</think>It prints hello."},
        {"match": "main.rs", "text": NON_CANONICAL_CALL},
    ]));
    a.test_script = Some(p);
    (d, start(a))
}

fn read_tools() -> Value {
    json!([{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}])
}

/// Turn 1 (the tool call) of a chat; returns its body and the follow-up request carrying the
/// call back as JSON plus its result.
async fn tool_turn1(s: &ds4_server::Server) -> (String, Value) {
    let mut msgs = vec![json!({"role": "user", "content": "Summarize main.rs"})];
    let (_, _, b1) = post(
        s,
        "/v1/chat/completions",
        &json!({"tools": read_tools(), "messages": msgs}),
    )
    .await;
    let v1: Value = serde_json::from_str(&b1).unwrap();
    let msg = &v1["choices"][0]["message"];
    let call = msg["tool_calls"][0].clone();
    assert_eq!(call["function"]["arguments"], r#"{"path":"src/main.rs"}"#);
    msgs.push(
        json!({"role": "assistant", "content": null, "tool_calls": [call.clone()],
                     "reasoning_content": msg["reasoning_content"]}),
    );
    msgs.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "fn main() {}"}));
    (b1, json!({"tools": read_tools(), "messages": msgs}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_dsml_replay_keeps_a_non_canonical_call_cached() {
    for replay in [true, false] {
        let mut a = args();
        a.disable_exact_dsml_tool_replay = !replay;
        let (_d, s) = replay_server(a);
        let (b1, turn2) = tool_turn1(&s).await;
        let (p1, _, g1) = usage(&b1);
        let (_, _, b2) = post(&s, "/v1/chat/completions", &turn2).await;
        let (p2, c2, _) = usage(&b2);
        assert_eq!(
            serde_json::from_str::<Value>(&b2).unwrap()["choices"][0]["message"]["content"],
            "It prints hello."
        );
        if replay {
            // The sampled block is rendered byte for byte: the whole live session is reused.
            assert_eq!(c2, p1 + g1, "{b2}");
            assert_eq!(source(&s, "memory-token").await, 1);
        } else {
            // Rendered canonically, the prompt departs from the live session inside the
            // block: a miss, prefilled from scratch.
            assert_eq!(c2, 0, "{b2}");
            assert_eq!(source(&s, "miss").await, 2);
        }
        assert_eq!(prefilled(&s).await, p1 + p2 - c2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_map_survives_a_restart_in_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.txt");
    let kv = dir.path().join("kv");
    // Life 1: the tool call, then a shutdown checkpoint (text, KV and the call's tool map).
    let (_d1, s) = replay_server(disk_args(&kv));
    let (b1, turn2) = tool_turn1(&s).await;
    let (p1, _, g1) = usage(&b1);
    s.shutdown(Duration::from_secs(5)).await;
    // Life 2: an empty replay map; the call id is found in the checkpoint's tool map, the
    // sampled block is replayed, and the prompt's prefix is the checkpoint's text.
    let mut a = disk_args(&kv);
    a.trace = Some(trace.clone());
    let (_d2, s) = replay_server(a);
    let (_, _, b2) = post(&s, "/v1/chat/completions", &turn2).await;
    let (p2, c2, _) = usage(&b2);
    assert_eq!(c2, p1 + g1, "{b2}");
    assert_eq!(source(&s, "disk").await, 1);
    assert_eq!(prefilled(&s).await, p2 - c2);
    let t = std::fs::read_to_string(&trace).unwrap();
    assert!(
        t.contains("tool_replay: mem=0 disk=1 canonical=0 missing_ids=0"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_file_is_ignored() {
    for half in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        first_life(dir.path()).await;
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        let bytes = std::fs::read(&file).unwrap();
        // Cut inside the 48-byte header, or in the middle of the payload.
        let n = if half { bytes.len() / 2 } else { 20 };
        std::fs::write(&file, &bytes[..n]).unwrap();
        let (_d, s) = scripted(disk_args(dir.path()));
        let (st, _, b2) = post(&s, "/v1/chat/completions", &chat_turn2(false)).await;
        assert_eq!(st, 200, "{b2}");
        let (p2, c2, _) = usage(&b2);
        assert_eq!(c2, 0, "cut to {n} bytes: {b2}");
        assert_eq!(prefilled(&s).await, p2);
        assert_eq!(source(&s, "disk").await, 0);
    }
}
