//! DSML: parsing generated text (three syntaxes, entities, JSON values, nested recovery, think
//! guard, failures), render → parse round trips, and the streaming parser (events, hold-back,
//! chunking invariance, garbage).

use ds4_tokenizer::dsml::{SYNTAX_PLAIN, SYNTAX_SHORT};
use ds4_tokenizer::{
    Message, ParseOptions, ParseOutcome, StreamEvent, StreamParser, ThinkMode, ToolCall,
    ToolSchemas, parse_generated, render_chat, render_tool_calls,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const THINK: ParseOptions = ParseOptions {
    thinking: true,
    tools: true,
};
const NOTHINK: ParseOptions = ParseOptions {
    thinking: false,
    tools: true,
};

fn outcome_json(o: &ParseOutcome) -> Value {
    let (kind, m) = match o {
        ParseOutcome::Ok(m) => ("ok", m),
        ParseOutcome::Malformed(m) => ("malformed", m),
        ParseOutcome::Unterminated(m) => ("unterminated", m),
    };
    json!({
        "outcome": kind,
        "reasoning": m.reasoning,
        "content": m.content,
        "tool_calls": m.tool_calls.iter().map(|c| json!({"name": c.name, "arguments": c.arguments})).collect::<Vec<_>>(),
        "raw_dsml": m.raw_dsml,
    })
}

fn calls(o: &ParseOutcome) -> Vec<(String, String)> {
    o.message()
        .tool_calls
        .iter()
        .map(|c| (c.name.clone(), c.arguments.clone()))
        .collect()
}

const BLOCK: &str = "\n\n<｜DSML｜tool_calls>\n\
<｜DSML｜invoke name=\"read_file\">\n\
<｜DSML｜parameter name=\"path\" string=\"true\">src/a &amp; b.txt</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"limit\" string=\"false\"> 10 </｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"opts\" string=\"false\">{ \"raw\" : true, \"s\": \"\\u00e9\" }</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"run\">\n\
<｜DSML｜parameter name=\"cmd\" string=\"true\">ls -la && echo \"x\" > /dev/null</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n\
</｜DSML｜tool_calls>";

#[test]
fn parse_full_syntax_thinking() {
    let text = format!("I should read it.</think>Let me look.  {BLOCK}");
    let o = parse_generated(&text, THINK);
    assert!(o.is_ok());
    let m = o.message();
    assert_eq!(m.reasoning.as_deref(), Some("I should read it."));
    assert_eq!(m.content, "Let me look.");
    assert_eq!(
        calls(&o),
        vec![
            (
                "read_file".to_string(),
                r#"{"path":"src/a & b.txt","limit":10,"opts":{"raw":true,"s":"\u00e9"}}"#
                    .to_string()
            ),
            (
                "run".to_string(),
                r#"{"cmd":"ls -la && echo \"x\" > /dev/null"}"#.to_string()
            ),
        ]
    );
    assert_eq!(m.raw_dsml.as_deref(), Some(BLOCK));
    insta::assert_json_snapshot!("parse_full_thinking", outcome_json(&o));
}

#[test]
fn parse_short_and_plain_syntaxes() {
    for syn in [SYNTAX_SHORT, SYNTAX_PLAIN] {
        let text = format!(
            "ok\n\n{}\n{} name=\"f\">\n{} name=\"a\" string=\"true\">x&lt;y</{}\n{} name=\"b\" string=\"false\">[1, 2]{}\n{}\n{}tail ignored",
            syn.tool_calls_start,
            syn.invoke_start,
            syn.param_start,
            &syn.param_end[2..],
            syn.param_start,
            syn.param_end,
            syn.invoke_end,
            syn.tool_calls_end,
        );
        let o = parse_generated(&text, NOTHINK);
        assert!(o.is_ok(), "{text}");
        assert_eq!(o.message().content, "ok");
        assert_eq!(
            calls(&o),
            vec![("f".to_string(), r#"{"a":"x<y","b":[1,2]}"#.to_string())]
        );
        assert!(
            o.message()
                .raw_dsml
                .as_deref()
                .unwrap()
                .starts_with("\n\n<")
        );
        assert!(
            o.message()
                .raw_dsml
                .as_deref()
                .unwrap()
                .ends_with(syn.tool_calls_end)
        );
    }
}

#[test]
fn parse_values_and_recovery() {
    let text = "</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\
<｜DSML｜parameter name=\"empty\" string=\"false\"></｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"bad\" string=\"false\">not json &amp;</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"nostr\">a &quot;b&quot; &apos;c&apos; &x;</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"nested\">\n  <｜DSML｜parameter name=\"k\" string=\"true\">v</｜DSML｜parameter>\n  <｜DSML｜parameter name=\"n\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"weird\" string=\"maybe\">[true]</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let o = parse_generated(text, THINK);
    assert!(o.is_ok());
    assert_eq!(o.message().reasoning.as_deref(), Some(""));
    assert_eq!(o.message().content, "");
    let args: Value = serde_json::from_str(&o.message().tool_calls[0].arguments).unwrap();
    assert_eq!(
        args,
        json!({"empty": null, "bad": "not json &amp;", "nostr": "a \"b\" 'c' &x;",
               "nested": {"k": "v", "n": 2}, "weird": [true]})
    );
    insta::assert_json_snapshot!("parse_values_recovery", outcome_json(&o));
}

#[test]
fn dsml_inside_thinking_is_not_a_call() {
    let inside = format!("Maybe call:{BLOCK}\nno.</think>Plain answer.");
    let o = parse_generated(&inside, THINK);
    assert!(o.is_ok());
    assert!(o.message().tool_calls.is_empty());
    assert_eq!(o.message().content, "Plain answer.");
    // Thinking never closed: nothing is a call and the whole text is content (ds4).
    let unclosed = format!("still thinking{BLOCK}");
    let o = parse_generated(&unclosed, THINK);
    assert!(o.is_ok() && o.message().tool_calls.is_empty());
    assert_eq!(o.message().reasoning, None);
    assert_eq!(o.message().content, unclosed);
    // Leading <think> is stripped from reasoning.
    let o = parse_generated("<think>r</think>c", THINK);
    assert_eq!(o.message().reasoning.as_deref(), Some("r"));
    // Tools off: DSML is plain content.
    let o = parse_generated(
        &format!("x{BLOCK}"),
        ParseOptions {
            thinking: false,
            tools: false,
        },
    );
    assert_eq!(o.message().content, format!("x{BLOCK}"));
}

#[test]
fn malformed_and_unterminated() {
    let malformed =
        "</think>text\n\n<｜DSML｜tool_calls>\n<｜DSML｜oops name=\"f\">\n</｜DSML｜tool_calls>";
    let o = parse_generated(malformed, THINK);
    assert!(matches!(o, ParseOutcome::Malformed(_)));
    assert_eq!(o.message().content, malformed);
    assert_eq!(o.message().reasoning, None);
    let unterminated = "</think>text\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">abc";
    let o = parse_generated(unterminated, THINK);
    assert!(matches!(o, ParseOutcome::Unterminated(_)));
    assert_eq!(o.message().content, unterminated);
    // Orphan closer: plain content.
    let orphan = "</think>done </｜DSML｜tool_calls> ok";
    let o = parse_generated(orphan, THINK);
    assert!(o.is_ok());
    assert_eq!(o.message().content, "done </｜DSML｜tool_calls> ok");
    insta::assert_json_snapshot!(
        "parse_malformed",
        outcome_json(&parse_generated(malformed, THINK))
    );
}

fn sample_calls() -> Vec<ToolCall> {
    vec![
        ToolCall::from_value(
            "read_file",
            &json!({"path": "dir with space/ü.txt", "start": 3, "flags": [true, null, 1.5]}),
        ),
        ToolCall::from_value(
            "shell",
            &json!({"cmd": "grep -R \"a&b\" . | head -n 5 > out.txt && echo </｜DSML｜parameter> done\n\ttab",
                    "env": {"A": "1", "B": "<x>"}}),
        ),
        ToolCall::from_value("noargs", &json!({})),
    ]
}

#[test]
fn render_then_parse_round_trip() {
    let calls = sample_calls();
    let dsml = render_tool_calls(&calls);
    for (think, prefix) in [(THINK, "reasoning here</think>"), (NOTHINK, "")] {
        let text = format!("{prefix}Visible.{dsml}");
        let o = parse_generated(&text, think);
        assert!(o.is_ok());
        let m = o.message();
        assert_eq!(m.content, "Visible.");
        assert_eq!(m.raw_dsml.as_deref(), Some(dsml.as_str()));
        assert_eq!(m.tool_calls.len(), calls.len());
        for (got, want) in m.tool_calls.iter().zip(&calls) {
            assert_eq!(got.name, want.name);
            assert_eq!(got.arguments_value(), want.arguments_value());
            // Compact arguments are what ToolCall::from_value serialized.
            assert_eq!(got.arguments, want.arguments);
        }
        // Rendering the parsed calls again gives the same canonical DSML.
        assert_eq!(render_tool_calls(&m.tool_calls), dsml);
    }
    // In a whole conversation: the rendered assistant turn parses back to itself.
    let msgs = [
        Message::user("do it"),
        Message::assistant("Visible.")
            .with_reasoning("why")
            .with_tool_calls(calls.clone()),
    ];
    let rendered = render_chat(&msgs, &ToolSchemas::new(), ThinkMode::High);
    let gen_start = rendered.find("<think>").unwrap() + "<think>".len();
    let generated = rendered[gen_start..].trim_end_matches("<｜end▁of▁sentence｜>");
    let o = parse_generated(generated, THINK);
    assert_eq!(o.message().reasoning.as_deref(), Some("why"));
    let again = Message::assistant(o.message().content.clone())
        .with_reasoning(o.message().reasoning.clone().unwrap())
        .with_tool_calls(o.message().tool_calls.clone());
    assert_eq!(
        render_chat(
            &[msgs[0].clone(), again.clone()],
            &ToolSchemas::new(),
            ThinkMode::High
        ),
        rendered
    );
    let replay = again.with_raw_dsml(o.message().raw_dsml.clone().unwrap());
    assert_eq!(
        render_chat(
            &[msgs[0].clone(), replay],
            &ToolSchemas::new(),
            ThinkMode::High
        ),
        rendered
    );
}

// ------------------------------------------------------------------------------------------
// Streaming.
// ------------------------------------------------------------------------------------------

/// Merge consecutive deltas of the same kind (chunking only changes how they are split).
fn normalize(events: Vec<StreamEvent>) -> Vec<StreamEvent> {
    let mut out: Vec<StreamEvent> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (Some(StreamEvent::Reasoning(a)), StreamEvent::Reasoning(b)) => a.push_str(&b),
            (Some(StreamEvent::Content(a)), StreamEvent::Content(b)) => a.push_str(&b),
            (
                Some(StreamEvent::ToolCallArgs { index: i, delta: a }),
                StreamEvent::ToolCallArgs { index: j, delta: b },
            ) if *i == j => a.push_str(&b),
            (_, e) => out.push(e),
        }
    }
    out
}

fn run_chunks(text: &[u8], cuts: &[usize], opts: ParseOptions) -> (Vec<StreamEvent>, ParseOutcome) {
    let mut p = StreamParser::new(opts);
    let mut events = Vec::new();
    let mut last = 0;
    for &c in cuts {
        let c = c.min(text.len());
        if c < last {
            continue;
        }
        let ev = p.feed(&text[last..c]);
        for e in &ev {
            if let StreamEvent::Content(s) | StreamEvent::Reasoning(s) = e {
                assert!(!s.is_empty());
            }
        }
        events.extend(ev);
        last = c;
    }
    events.extend(p.feed(&text[last..]));
    let (ev, outcome) = p.finish();
    events.extend(ev);
    (events, outcome)
}

fn one_shot(text: &str, opts: ParseOptions) -> (Vec<StreamEvent>, ParseOutcome) {
    run_chunks(text.as_bytes(), &[], opts)
}

fn byte_by_byte(text: &str, opts: ParseOptions) -> (Vec<StreamEvent>, ParseOutcome) {
    let cuts: Vec<usize> = (1..text.len()).collect();
    run_chunks(text.as_bytes(), &cuts, opts)
}

#[test]
fn stream_events_full_example() {
    let text = format!("Need a file.</think>Let me look.  {BLOCK}");
    let (ev, outcome) = byte_by_byte(&text, THINK);
    let ev = normalize(ev);
    assert_eq!(
        ev,
        vec![
            StreamEvent::Reasoning("Need a file.".into()),
            StreamEvent::Content("Let me look.".into()),
            StreamEvent::ToolCallStart {
                index: 0,
                name: "read_file".into()
            },
            StreamEvent::ToolCallArgs {
                index: 0,
                delta: r#"{"path":"src/a & b.txt","limit":10,"opts":{"raw":true,"s":"\u00e9"}}"#
                    .into()
            },
            StreamEvent::ToolCallEnd { index: 0 },
            StreamEvent::ToolCallStart {
                index: 1,
                name: "run".into()
            },
            StreamEvent::ToolCallArgs {
                index: 1,
                delta: r#"{"cmd":"ls -la && echo \"x\" > /dev/null"}"#.into()
            },
            StreamEvent::ToolCallEnd { index: 1 },
            StreamEvent::ToolCallsDone,
        ]
    );
    assert_eq!(outcome, parse_generated(&text, THINK));
    assert_eq!(normalize(one_shot(&text, THINK).0), ev);
}

#[test]
fn stream_incremental_deltas_and_hold_back() {
    let mut p = StreamParser::new(NOTHINK);
    let mut all = Vec::new();
    let feed = |p: &mut StreamParser, s: &[u8], all: &mut Vec<StreamEvent>| {
        let ev = normalize(p.feed(s));
        all.extend(ev.clone());
        ev
    };
    // A partial opener and the whitespace before it are held back.
    assert_eq!(
        feed(&mut p, b"Hello \n\n<\xef\xbd", &mut all),
        vec![StreamEvent::Content("Hello".into())]
    );
    assert_eq!(
        feed(
            &mut p,
            b"\x9cDSML\xef\xbd\x9ctool_calls>\n<\xef\xbd\x9cDSML\xef\xbd\x9cinvoke na",
            &mut all
        ),
        vec![]
    );
    assert_eq!(
        feed(&mut p, b"me=\"w\">\n<\xef\xbd\x9cDSML\xef\xbd\x9cparameter name=\"text\" string=\"true\">caf\xc3", &mut all),
        vec![
            StreamEvent::ToolCallStart {
                index: 0,
                name: "w".into()
            },
            StreamEvent::ToolCallArgs {
                index: 0,
                delta: "{\"text\":\"caf".into()
            },
        ]
    );
    // The UTF-8 char completes; a partial entity and a partial closer are held.
    assert_eq!(
        feed(&mut p, b"\xa9 &am", &mut all),
        vec![StreamEvent::ToolCallArgs {
            index: 0,
            delta: "é ".into()
        }]
    );
    assert_eq!(
        feed(&mut p, "p; x</｜DSML｜para".as_bytes(), &mut all),
        vec![StreamEvent::ToolCallArgs {
            index: 0,
            delta: "& x".into()
        }]
    );
    assert_eq!(
        feed(
            &mut p,
            "meter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>trailing".as_bytes(),
            &mut all
        ),
        vec![
            StreamEvent::ToolCallArgs {
                index: 0,
                delta: "\"}".into()
            },
            StreamEvent::ToolCallEnd { index: 0 },
            StreamEvent::ToolCallsDone,
        ]
    );
    assert!(p.tool_calls_done());
    let (ev, outcome) = p.finish();
    assert!(ev.is_empty());
    assert_eq!(
        calls(&outcome),
        vec![("w".to_string(), r#"{"text":"café & x"}"#.to_string())]
    );
}

#[test]
fn stream_think_tags_held() {
    let mut p = StreamParser::new(THINK);
    assert_eq!(p.feed_str("<thi"), vec![]);
    assert_eq!(
        p.feed_str("nk>abc</th"),
        vec![StreamEvent::Reasoning("abc".into())]
    );
    assert_eq!(p.feed_str("in"), vec![]);
    assert_eq!(
        p.feed_str("k>Answer < 3 <"),
        vec![StreamEvent::Content("Answer < 3".into())]
    );
    let (ev, o) = p.finish();
    assert_eq!(ev, vec![StreamEvent::Content(" <".into())]);
    assert_eq!(o.message().content, "Answer < 3 <");
    assert_eq!(o.message().reasoning.as_deref(), Some("abc"));
}

#[test]
fn stream_malformed_stops_events() {
    let text = "</think>a\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜bogus>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let (ev, o) = byte_by_byte(text, THINK);
    assert_eq!(
        normalize(ev),
        vec![
            StreamEvent::Content("a".into()),
            StreamEvent::ToolCallStart {
                index: 0,
                name: "f".into()
            },
            StreamEvent::ToolCallArgs {
                index: 0,
                delta: "{".into()
            },
        ]
    );
    assert!(matches!(o, ParseOutcome::Malformed(_)));
    let (_, o) = one_shot(&text[..text.len() - 30], THINK);
    assert!(matches!(
        o,
        ParseOutcome::Unterminated(_) | ParseOutcome::Malformed(_)
    ));
}

#[test]
fn stream_nested_params() {
    let text = "</think>\n\n<tool_calls>\n<invoke name=\"f\">\n<parameter name=\"obj\">\n <parameter name=\"a\" string=\"true\">1</parameter>\n <parameter name=\"b\" string=\"false\">[2]</parameter>\n</parameter>\n<parameter name=\"s\"> plain</parameter>\n</invoke>\n</tool_calls>";
    let (ev, o) = byte_by_byte(text, THINK);
    let want = r#"{"obj":{"a":"1","b":[2]},"s":" plain"}"#;
    assert_eq!(calls(&o), vec![("f".to_string(), want.to_string())]);
    let args: String = ev
        .iter()
        .filter_map(|e| match e {
            StreamEvent::ToolCallArgs { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(args, want);
    assert_eq!(normalize(ev), normalize(one_shot(text, THINK).0));
}

// Generated output pieces for the property tests: mostly DSML-ish fragments so that the
// interesting states are reached, plus arbitrary text.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("\n\n".to_string()),
        Just(" ".to_string()),
        Just("<｜DSML｜tool_calls>".to_string()),
        Just("</｜DSML｜tool_calls>".to_string()),
        Just("<｜DSML｜invoke name=\"f\">".to_string()),
        Just("</｜DSML｜invoke>".to_string()),
        Just("<｜DSML｜parameter name=\"p\" string=\"true\">".to_string()),
        Just("<｜DSML｜parameter name=\"q\" string=\"false\">".to_string()),
        Just("<｜DSML｜parameter name=\"n\">".to_string()),
        Just("</｜DSML｜parameter>".to_string()),
        Just("<DSML｜tool_calls>".to_string()),
        Just("<tool_calls><invoke name=\"g\"><parameter name=\"x\">".to_string()),
        Just("</parameter></invoke></tool_calls>".to_string()),
        Just("&amp;".to_string()),
        Just("&lt;".to_string()),
        Just("&".to_string()),
        Just("<".to_string()),
        Just("｜".to_string()),
        Just("{\"a\": [1, 2]}".to_string()),
        Just("é日本😀".to_string()),
        "[a-z <>&\"{}\\[\\]:,0-9\n\t]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(6).collect()),
    ]
}

fn text_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..40).prop_map(|v| v.concat())
}

fn opts_strategy() -> impl Strategy<Value = ParseOptions> {
    (any::<bool>(), any::<bool>()).prop_map(|(thinking, tools)| ParseOptions { thinking, tools })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random chunking (cuts anywhere, even inside UTF-8 characters) gives the same events and
    /// outcome as feeding everything at once.
    #[test]
    fn chunking_invariance(text in text_strategy(), cuts in prop::collection::vec(0usize..400, 0..30), opts in opts_strategy()) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let (ev_chunked, o_chunked) = run_chunks(text.as_bytes(), &cuts, opts);
        let (ev_one, o_one) = one_shot(&text, opts);
        prop_assert_eq!(normalize(ev_chunked), normalize(ev_one));
        prop_assert_eq!(&o_chunked, &o_one);
        prop_assert_eq!(o_one, parse_generated(&text, opts));
    }

    /// Arbitrary bytes (invalid UTF-8 included) never panic, chunked or not.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), cuts in prop::collection::vec(0usize..300, 0..20), opts in opts_strategy()) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let (a, oa) = run_chunks(&bytes, &cuts, opts);
        let (b, ob) = run_chunks(&bytes, &[], opts);
        prop_assert_eq!(normalize(a), normalize(b));
        prop_assert_eq!(oa, ob);
    }

    /// Well-formed generations: streamed content/reasoning/arguments equal the final parse.
    #[test]
    fn stream_matches_final_parse(
        reasoning in "[a-zA-Z ,.<>&é]{0,30}",
        content in "[a-zA-Z ,.<>&é\n]{0,30}",
        args in prop::collection::vec(("[a-z_]{1,8}", prop_oneof![
            "[ -~é日😀\n\t]{0,20}".prop_map(Value::String),
            any::<i32>().prop_map(|n| json!(n)),
            any::<bool>().prop_map(|b| json!(b)),
            Just(json!(null)),
            Just(json!({"k": [1, "x</｜DSML｜parameter>"]})),
        ]), 0..4),
        n_calls in 1usize..3,
        cuts in prop::collection::vec(0usize..600, 0..40),
    ) {
        let mut obj = serde_json::Map::new();
        for (k, v) in args {
            obj.insert(k, v);
        }
        let obj = Value::Object(obj);
        let calls: Vec<ToolCall> = (0..n_calls).map(|i| ToolCall::from_value(format!("tool_{i}"), &obj)).collect();
        let text = format!("{reasoning}</think>{content}{}", render_tool_calls(&calls));
        prop_assume!(!reasoning.contains("</think>"));
        let mut cuts = cuts;
        cuts.sort_unstable();
        let (ev, o) = run_chunks(text.as_bytes(), &cuts, THINK);
        prop_assert!(o.is_ok());
        let m = o.message();
        let ev = normalize(ev);
        let mut got_reasoning = String::new();
        let mut got_content = String::new();
        let mut got_args: Vec<String> = vec![String::new(); n_calls];
        let mut starts = 0;
        let mut done = false;
        for e in &ev {
            match e {
                StreamEvent::Reasoning(s) => got_reasoning.push_str(s),
                StreamEvent::Content(s) => got_content.push_str(s),
                StreamEvent::ToolCallStart { index, name } => {
                    prop_assert_eq!(*index, starts);
                    prop_assert_eq!(name, &format!("tool_{index}"));
                    starts += 1;
                }
                StreamEvent::ToolCallArgs { index, delta } => got_args[*index].push_str(delta),
                StreamEvent::ToolCallEnd { .. } => {}
                StreamEvent::ToolCallsDone => done = true,
            }
        }
        prop_assert!(done);
        prop_assert_eq!(starts, n_calls);
        prop_assert_eq!(Some(got_reasoning.as_str()), m.reasoning.as_deref());
        prop_assert_eq!(&got_content, &m.content);
        for (i, c) in m.tool_calls.iter().enumerate() {
            prop_assert_eq!(&got_args[i], &c.arguments);
            // Same JSON; bytes differ only where the renderer wrote `\u003c` for an embedded
            // parameter closer inside a JSON value.
            prop_assert_eq!(c.arguments_value(), calls[i].arguments_value());
            if !c.arguments.contains("\\u003c") {
                prop_assert_eq!(&c.arguments, &calls[i].arguments);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Arbitrary client JSON text (tool arguments, tool arrays) never panics the renderers, and
    /// object arguments render one parameter per member.
    #[test]
    fn renderers_accept_any_text(args in "[{}\\[\\]\":, a-z0-9\\\\u.+-]{0,60}", name in ".{0,10}") {
        let call = ToolCall::new(name, args.clone());
        let dsml = render_tool_calls(std::slice::from_ref(&call));
        prop_assert!(dsml.starts_with("\n\n<｜DSML｜tool_calls>\n"));
        prop_assert!(dsml.ends_with("</｜DSML｜tool_calls>"));
        let _ = ToolSchemas::from_raw_array(&args);
        let mut t = ToolSchemas::new();
        let _ = t.push_raw(&args);
        // Whatever was rendered parses back (canonical DSML is always well-formed).
        let o = parse_generated(&dsml, NOTHINK);
        prop_assert!(o.is_ok());
        prop_assert_eq!(o.message().tool_calls.len(), 1);
        if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&args) {
            let parsed = o.message().tool_calls[0].arguments_value().unwrap();
            prop_assert_eq!(parsed, Value::Object(m));
        }
    }
}

#[test]
fn types_are_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<ds4_tokenizer::Tokenizer>();
    check::<StreamParser>();
    check::<Message>();
}
