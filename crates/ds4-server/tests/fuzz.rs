//! Fuzzed request bodies: the four request parsers, prompt rendering of whatever they accept,
//! the response formatters and the streaming DSML parser never panic.

use ds4_server::format::{
    ChatStream, Formatter, MessagesStream, RespMeta, RespState, ResponsesStream,
};
use ds4_server::request::{parse_chat, parse_completions, parse_messages, parse_responses};
use ds4_server::worker::{CallOut, Ev, Finish, Outcome, Usage};
use ds4_tokenizer::{ParseOptions, StreamParser, ThinkMode, render_chat};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-z_]{0,8}".prop_map(Value::String),
        prop_oneof![
            Just("user"),
            Just("assistant"),
            Just("system"),
            Just("tool"),
            Just("developer"),
            Just("text"),
            Just("tool_use"),
            Just("tool_result"),
            Just("thinking"),
            Just("function_call"),
            Just("function_call_output"),
            Just("reasoning"),
            Just("message"),
            Just("input_text"),
            Just("namespace"),
            Just("custom"),
            Just("tool_search"),
            Just("none"),
            Just("auto"),
            Just("max"),
            Just("enabled"),
            Just("disabled"),
            Just("<｜DSML｜tool_calls>"),
            Just("</think>"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("role"),
                        Just("content"),
                        Just("type"),
                        Just("text"),
                        Just("id"),
                        Just("name"),
                        Just("input"),
                        Just("arguments"),
                        Just("function"),
                        Just("tool_calls"),
                        Just("tool_call_id"),
                        Just("tool_use_id"),
                        Just("call_id"),
                        Just("messages"),
                        Just("tools"),
                        Just("summary"),
                        Just("output"),
                        Just("status"),
                        Just("thinking"),
                        Just("reasoning_content"),
                        Just("namespace"),
                        Just("effort"),
                        Just("x"),
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect::<Map<_, _>>()
            )),
        ]
    })
}

fn request_body() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(json_value(), 0..4),
        json_value(),
        json_value(),
        json_value(),
        json_value(),
    )
        .prop_map(|(msgs, tools, think, max, extra)| {
            json!({
                "messages": msgs, "input": msgs, "prompt": extra.clone(), "tools": tools,
                "thinking": think, "reasoning_effort": extra, "max_tokens": max,
                "stop": max, "tool_choice": think, "system": tools, "reasoning": think,
                "instructions": extra, "stream": true,
            })
        })
}

fn check_all(bytes: &[u8]) {
    for parse in [
        parse_chat,
        parse_completions,
        parse_responses,
        parse_messages,
    ] {
        if let Ok(r) = parse(bytes) {
            let _ = render_chat(&r.messages, &r.tools, r.think_mode(32768));
            let _ = r.think_mode(1 << 20);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_all(&bytes);
    }

    #[test]
    fn structured_bodies_never_panic(body in request_body()) {
        check_all(body.to_string().as_bytes());
    }

    #[test]
    fn message_lists_never_panic(msgs in prop::collection::vec(json_value(), 0..6)) {
        let body = json!({"messages": msgs, "input": msgs});
        check_all(body.to_string().as_bytes());
    }

    #[test]
    fn dsml_stream_parser_never_panics(
        pieces in prop::collection::vec(prop_oneof![
            Just("<｜DSML｜tool_calls>".to_string()), Just("</｜DSML｜tool_calls>".to_string()),
            Just("<｜DSML｜invoke name=\"f\">".to_string()), Just("</｜DSML｜invoke>".to_string()),
            Just("<｜DSML｜parameter name=\"p\" string=\"true\">".to_string()),
            Just("<｜DSML｜parameter name=\"q\" string=\"false\">".to_string()),
            Just("</｜DSML｜parameter>".to_string()), Just("</think>".to_string()),
            Just("<tool_calls>".to_string()), Just("<invoke name=\"g\">".to_string()),
            Just("&amp;".to_string()), Just("&lt".to_string()), Just("\n\n".to_string()),
            "[a-z{}\":, ]{0,6}",
        ], 0..24),
        splits in prop::collection::vec(0usize..8, 0..24),
        thinking in any::<bool>(),
    ) {
        let text = pieces.concat();
        let bytes = text.as_bytes();
        let mut p = StreamParser::new(ParseOptions { thinking, tools: true });
        let mut at = 0;
        for s in splits {
            let end = (at + s).min(bytes.len());
            let _ = p.feed(&bytes[at..end]);
            at = end;
        }
        let _ = p.feed(&bytes[at..]);
        let _ = p.finish();
    }

    #[test]
    fn formatters_accept_any_event_order(
        evs in prop::collection::vec(0u8..8, 0..20),
        finish in 0u8..4,
        n_calls in 0usize..3,
    ) {
        let meta = RespMeta { id: "x".into(), created: 0, model: "m".into(), include_usage: true };
        let mut fmts: Vec<Box<dyn Formatter>> = vec![
            Box::new(ChatStream::new(meta.clone())),
            Box::new(MessagesStream::new(meta.clone())),
            Box::new(ResponsesStream::new(RespState::new(meta.clone(), true, Default::default()))),
        ];
        let usage = Usage { prompt: 3, cached: 1, completion: 2 };
        let out = Outcome {
            finish: match finish { 0 => Finish::Stop, 1 => Finish::Length, 2 => Finish::ToolCalls, _ => Finish::Error("e".into()) },
            stop_sequence: None, reasoning: Some("r".into()), content: "c".into(),
            tool_calls: (0..n_calls).map(|i| CallOut { id: format!("call_{i}"), name: "f".into(), arguments: "{}".into() }).collect(),
            text: "r</think>c".into(), usage,
        };
        for f in fmts.iter_mut() {
            for e in &evs {
                let ev = match e {
                    0 => Ev::Started(usage),
                    1 => Ev::Reasoning("r".into()),
                    2 => Ev::Content("c".into()),
                    3 => Ev::ToolStart { index: 0, id: "call_0".into(), name: "f".into() },
                    4 => Ev::ToolArgs { index: 0, delta: "{".into() },
                    5 => Ev::ToolEnd { index: 0 },
                    6 => Ev::Failed(503, "busy".into()),
                    _ => Ev::ToolStart { index: 7, id: "call_7".into(), name: "g".into() },
                };
                let _ = f.on(ev);
            }
            let _ = f.on(Ev::Done(Box::new(out.clone())));
        }
        let _ = ThinkMode::High;
    }
}
