mod common;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_chat() {
    let t0 = std::time::Instant::now();
    let s = start(args());
    eprintln!("start {:?}", t0.elapsed());
    let (st, ct, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({"messages":[{"role":"user","content":"Hello"}],"max_tokens":8}),
    )
    .await;
    eprintln!("{st} {ct} {body} {:?}", t0.elapsed());
    let (st, ct, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({"messages":[{"role":"user","content":"Hello"}],"max_tokens":8, "stream": true}),
    )
    .await;
    eprintln!("{st} {ct} {body} {:?}", t0.elapsed());
    let (_, _, m) = get(&s, "/metrics").await;
    eprintln!("{m}");
    s.shutdown(std::time::Duration::from_secs(2)).await;
}
