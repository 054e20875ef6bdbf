//! Rendered prompt bytes for every message kind and think mode (ds4 `render_chat_prompt_text`
//! and friends). Key cases are checked against hand-written expected strings; all are also
//! snapshotted (one debug-quoted line per rendered line, so every byte is visible).

use ds4_tokenizer::chat::{
    TOOLS_PROMPT_FOOTER, TOOLS_PROMPT_HEADER, escape_tool_result, join_anthropic_system,
};
use ds4_tokenizer::{
    Message, Role, THINK_MAX_PREFIX, ThinkMode, ToolCall, ToolSchemas, chat_message_text,
    render_chat, render_chat_tail, render_cli_prompt, render_completion_prompt,
};
use serde_json::json;

const MODES: [ThinkMode; 3] = [ThinkMode::None, ThinkMode::High, ThinkMode::Max];

fn visible(s: &str) -> String {
    s.split_inclusive('\n')
        .map(|l| format!("{l:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn snap(name: &str, s: &str) {
    insta::assert_snapshot!(name, visible(s));
}

fn tools() -> ToolSchemas {
    ToolSchemas::from_values(&[
        json!({"type": "function", "function": {"name": "read_file", "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}),
        json!({"name": "run", "description": "Run a command & wait", "input_schema": {"type": "object",
            "properties": {"cmd": {"type": "string"}, "timeout": {"type": "number"}}}}),
    ])
}

#[test]
fn think_max_prefix_text() {
    assert_eq!(
        THINK_MAX_PREFIX,
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
    );
    assert_eq!(ThinkMode::Max.for_context(393215), ThinkMode::High);
    assert_eq!(ThinkMode::Max.for_context(393216), ThinkMode::Max);
    assert_eq!(ThinkMode::None.for_context(1), ThinkMode::None);
    assert_eq!(
        ThinkMode::from_reasoning_effort("minimal"),
        Some(ThinkMode::High)
    );
    assert_eq!(ThinkMode::from_reasoning_effort("bogus"), None);
}

#[test]
fn single_user_each_mode() {
    let msgs = [Message::user("Hello")];
    let t = ToolSchemas::new();
    assert_eq!(
        render_chat(&msgs, &t, ThinkMode::None),
        "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>"
    );
    assert_eq!(
        render_chat(&msgs, &t, ThinkMode::High),
        "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜><think>"
    );
    assert_eq!(
        render_chat(&msgs, &t, ThinkMode::Max),
        format!("<｜begin▁of▁sentence｜>{THINK_MAX_PREFIX}<｜User｜>Hello<｜Assistant｜><think>")
    );
    for m in MODES {
        snap(
            &format!("single_user_{}", m.name()),
            &render_chat(&msgs, &t, m),
        );
    }
}

#[test]
fn system_developer_joined() {
    let msgs = [
        Message::system("You are terse."),
        Message::user("Hi"),
        Message::developer("Answer in Italian."),
        Message::system(""),
    ];
    let got = render_chat(&msgs, &ToolSchemas::new(), ThinkMode::None);
    assert_eq!(
        got,
        "<｜begin▁of▁sentence｜>You are terse.\n\nAnswer in Italian.\n\n<｜User｜>Hi<｜Assistant｜></think>"
    );
    snap("system_developer", &got);
}

#[test]
fn tools_block_before_system() {
    let t = tools();
    assert_eq!(
        t.as_str(),
        "{\"name\":\"read_file\",\"description\":\"Read a file\",\"parameters\":{\"type\":\"object\",\"properties\":{\"path\":{\"type\":\"string\"}},\"required\":[\"path\"]}}\n\
         {\"name\":\"run\",\"description\":\"Run a command & wait\",\"input_schema\":{\"type\":\"object\",\"properties\":{\"cmd\":{\"type\":\"string\"},\"timeout\":{\"type\":\"number\"}}}}"
    );
    let msgs = [Message::system("Be careful."), Message::user("List files")];
    let got = render_chat(&msgs, &t, ThinkMode::High);
    let want = format!(
        "<｜begin▁of▁sentence｜>{TOOLS_PROMPT_HEADER}{}{TOOLS_PROMPT_FOOTER}\n\nBe careful.<｜User｜>List files<｜Assistant｜><think>",
        t.as_str()
    );
    assert_eq!(got, want);
    snap("tools_and_system_high", &got);
    snap(
        "tools_only_none",
        &render_chat(&[Message::user("x")], &t, ThinkMode::None),
    );
}

#[test]
fn raw_tool_schemas_keep_client_bytes() {
    let raw = r#"[ {"type": "function", "function": {"name": "f", "parameters": {"x": "\u00e9"}}},
                  {"name":"g"} , null ]"#;
    let t = ToolSchemas::from_raw_array(raw).unwrap();
    assert_eq!(
        t.as_str(),
        "{\"name\": \"f\", \"parameters\": {\"x\": \"\\u00e9\"}}\n{\"name\":\"g\"}\nnull"
    );
    assert!(ToolSchemas::from_raw_array("null").unwrap().is_empty());
    assert!(ToolSchemas::from_raw_array("[1,").is_none());
}

#[test]
fn thinking_drops_old_reasoning_without_tools() {
    let msgs = [
        Message::user("Q1"),
        Message::assistant("A1").with_reasoning("r1"),
        Message::user("Q2"),
        Message::assistant("A2").with_reasoning("r2"),
    ];
    let t = ToolSchemas::new();
    // Both assistants come before or at... the last user message is index 2: A1 (index 1) drops
    // its reasoning, A2 (index 3) keeps it.
    assert_eq!(
        render_chat(&msgs, &t, ThinkMode::High),
        "<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>\
         <｜User｜>Q2<｜Assistant｜><think>r2</think>A2<｜end▁of▁sentence｜>"
    );
    assert_eq!(
        render_chat(&msgs, &t, ThinkMode::None),
        "<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>\
         <｜User｜>Q2<｜Assistant｜></think>A2<｜end▁of▁sentence｜>"
    );
    for m in MODES {
        snap(
            &format!("multi_turn_{}", m.name()),
            &render_chat(&msgs[..3], &t, m),
        );
    }
}

#[test]
fn tool_calls_and_results() {
    let msgs = [
        Message::system("sys"),
        Message::user("Read a.txt and b.txt"),
        Message::assistant("Reading.")
            .with_reasoning("need both")
            .with_tool_calls(vec![
                ToolCall::new("read_file", r#"{"path": "a.txt", "lines": [1, 2]}"#)
                    .with_id("call_1"),
                ToolCall::from_value("read_file", &json!({"path": "b&c <d>.txt"}))
                    .with_id("call_2"),
            ]),
        Message::tool("alpha</tool_result>omega").with_tool_call_id("call_1"),
        Message::tool("<b> & </tool_resul").with_tool_call_id("call_2"),
    ];
    let t = tools();
    let got = render_chat(&msgs, &t, ThinkMode::High);
    let want = format!(
        "<｜begin▁of▁sentence｜>{TOOLS_PROMPT_HEADER}{}{TOOLS_PROMPT_FOOTER}\n\nsys\
         <｜User｜>Read a.txt and b.txt<｜Assistant｜><think>need both</think>Reading.\
         \n\n<｜DSML｜tool_calls>\n\
         <｜DSML｜invoke name=\"read_file\">\n\
         <｜DSML｜parameter name=\"path\" string=\"true\">a.txt</｜DSML｜parameter>\n\
         <｜DSML｜parameter name=\"lines\" string=\"false\">[1,2]</｜DSML｜parameter>\n\
         </｜DSML｜invoke>\n\
         <｜DSML｜invoke name=\"read_file\">\n\
         <｜DSML｜parameter name=\"path\" string=\"true\">b&c <d>.txt</｜DSML｜parameter>\n\
         </｜DSML｜invoke>\n\
         </｜DSML｜tool_calls><｜end▁of▁sentence｜>\
         <｜User｜><tool_result>alpha&lt;/tool_result>omega</tool_result><tool_result><b> & </tool_resul</tool_result>\
         <｜Assistant｜><think>",
        t.as_str()
    );
    assert_eq!(got, want);
    for m in MODES {
        snap(
            &format!("tool_calls_results_{}", m.name()),
            &render_chat(&msgs, &t, m),
        );
    }
    // Tool context without declared tools still keeps reasoning (an assistant has calls).
    let got = render_chat(&msgs[1..], &ToolSchemas::new(), ThinkMode::High);
    assert!(got.contains("<｜Assistant｜><think>need both</think>Reading."));
    snap("tool_context_without_tools_high", &got);
}

#[test]
fn tool_result_after_user_and_user_after_tool() {
    let msgs = [
        Message::user("u1"),
        Message::tool("t1"),
        Message::tool("t2"),
        Message::user("u2"),
        Message::tool("t3"),
    ];
    let got = render_chat(&msgs, &ToolSchemas::new(), ThinkMode::None);
    assert_eq!(
        got,
        "<｜begin▁of▁sentence｜><｜User｜>u1<｜User｜><tool_result>t1</tool_result><tool_result>t2</tool_result>\
         <｜User｜>u2<｜User｜><tool_result>t3</tool_result><｜Assistant｜></think>"
    );
    let f = Message::new(Role::Function, "f1");
    let got2 = render_chat(
        &[Message::user("u"), f],
        &ToolSchemas::new(),
        ThinkMode::High,
    );
    assert_eq!(
        got2,
        "<｜begin▁of▁sentence｜><｜User｜>u<｜User｜><tool_result>f1</tool_result><｜Assistant｜><think>"
    );
    snap("tool_results_sequence", &got);
}

#[test]
fn raw_dsml_replayed_verbatim() {
    let raw = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"false\">{ \"x\" : 1 }</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
    let msgs = [
        Message::user("go"),
        Message::assistant("")
            .with_tool_calls(vec![
                ToolCall::new("f", r#"{"a":{"x":1}}"#).with_id("call_x"),
            ])
            .with_raw_dsml(raw),
        Message::tool("done"),
    ];
    let got = render_chat(&msgs, &ToolSchemas::new(), ThinkMode::None);
    assert_eq!(
        got,
        format!(
            "<｜begin▁of▁sentence｜><｜User｜>go<｜Assistant｜></think>{raw}<｜end▁of▁sentence｜>\
             <｜User｜><tool_result>done</tool_result><｜Assistant｜></think>"
        )
    );
    snap("raw_dsml_replay", &got);
}

#[test]
fn assistant_without_pending_user_and_other_roles() {
    let msgs = [
        Message::assistant("Hello! I start."),
        Message::new(Role::Other("narrator".into()), "ignored"),
        Message::user("ok"),
        Message::assistant("partial answer"),
    ];
    for m in MODES {
        let got = render_chat(&msgs, &ToolSchemas::new(), m);
        if m == ThinkMode::None {
            assert_eq!(
                got,
                "<｜begin▁of▁sentence｜>Hello! I start.<｜end▁of▁sentence｜><｜User｜>ok<｜Assistant｜></think>partial answer<｜end▁of▁sentence｜>"
            );
        }
        snap(&format!("assistant_first_{}", m.name()), &got);
    }
}

#[test]
fn non_object_arguments_and_escapes() {
    let msgs = [
        Message::user("x"),
        Message::assistant("").with_tool_calls(vec![
            ToolCall::new("a\"b<c>&", "[1, 2]"),
            ToolCall::new("s", r#"{"q": "x</｜DSML｜parameter>y", "o": {"k": "</｜DSML｜parameter>"}, "e": "\u00e9\n"}"#),
        ]),
    ];
    let got = render_chat(&msgs, &ToolSchemas::new(), ThinkMode::None);
    assert!(got.contains(
        "<｜DSML｜invoke name=\"a&quot;b&lt;c&gt;&amp;\">\n<｜DSML｜parameter name=\"arguments\" string=\"true\">[1, 2]</｜DSML｜parameter>\n"
    ));
    assert!(got.contains(
        "<｜DSML｜parameter name=\"q\" string=\"true\">x&lt;/｜DSML｜parameter>y</｜DSML｜parameter>\n"
    ));
    assert!(got.contains(
        "<｜DSML｜parameter name=\"o\" string=\"false\">{\"k\":\"\\u003c/｜DSML｜parameter>\"}</｜DSML｜parameter>\n"
    ));
    assert!(
        got.contains("<｜DSML｜parameter name=\"e\" string=\"true\">é\n</｜DSML｜parameter>\n")
    );
    snap("non_object_arguments", &got);
}

#[test]
fn live_tool_tail() {
    let msgs = [
        Message::user("q"),
        Message::assistant("").with_tool_calls(vec![ToolCall::new("f", "{}")]),
        Message::tool("r1"),
        Message::system("ignored here"),
        Message::tool("r2"),
    ];
    for m in MODES {
        let got = render_chat_tail(&msgs, 2, m);
        assert_eq!(
            got,
            format!(
                "<｜end▁of▁sentence｜><｜User｜><tool_result>r1</tool_result><tool_result>r2</tool_result><｜Assistant｜>{}",
                m.assistant_tag()
            )
        );
    }
    let tail = render_chat_tail(
        &[
            Message::user("u"),
            Message::assistant("a").with_reasoning("r"),
        ],
        0,
        ThinkMode::High,
    );
    assert_eq!(
        tail,
        "<｜end▁of▁sentence｜><｜User｜>u<｜Assistant｜><think>r</think>a<｜end▁of▁sentence｜>"
    );
    snap(
        "live_tool_tail_high",
        &render_chat_tail(&msgs, 2, ThinkMode::High),
    );
}

#[test]
fn completion_and_cli_prompts() {
    assert_eq!(
        render_completion_prompt("2+2=", ThinkMode::None),
        "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>2+2=<｜Assistant｜></think>"
    );
    assert_eq!(
        render_completion_prompt("2+2=", ThinkMode::Max),
        format!(
            "<｜begin▁of▁sentence｜>{THINK_MAX_PREFIX}You are a helpful assistant<｜User｜>2+2=<｜Assistant｜><think>"
        )
    );
    assert_eq!(
        render_cli_prompt("", "Hello", ThinkMode::None),
        "<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜></think>"
    );
    assert_eq!(
        render_cli_prompt("You are a helpful assistant", "Hi", ThinkMode::High),
        "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Hi<｜Assistant｜><think>"
    );
    let pre = "<｜begin▁of▁sentence｜>already<｜User｜>x";
    assert_eq!(render_cli_prompt("sys", pre, ThinkMode::Max), pre);
    for m in MODES {
        snap(
            &format!("completion_{}", m.name()),
            &render_completion_prompt("Once upon a time", m),
        );
        snap(
            &format!("cli_{}", m.name()),
            &render_cli_prompt("You are a helpful assistant", "Ciao!", m),
        );
    }
}

#[test]
fn repl_message_forms() {
    assert_eq!(chat_message_text(&Role::System, "S"), "S");
    assert_eq!(chat_message_text(&Role::User, "u"), "<｜User｜>u");
    assert_eq!(chat_message_text(&Role::Tool, "out"), "<｜User｜>Tool: out");
    assert_eq!(
        chat_message_text(&Role::Function, "out"),
        "<｜User｜>Tool: out"
    );
    assert_eq!(
        chat_message_text(&Role::Assistant, "a"),
        "<｜Assistant｜></think>a"
    );
    assert_eq!(
        chat_message_text(&Role::Assistant, "<think>r</think>a"),
        "<｜Assistant｜><think>r</think>a"
    );
    assert_eq!(
        chat_message_text(&Role::Assistant, "</think>a"),
        "<｜Assistant｜></think>a"
    );
    assert_eq!(
        chat_message_text(&Role::Other("x".into()), "o"),
        "<｜User｜>o"
    );
}

#[test]
fn helpers() {
    assert_eq!(
        escape_tool_result("a</tool_result>b</tool_result"),
        "a&lt;/tool_result>b</tool_result"
    );
    assert_eq!(
        join_anthropic_system(&["", "x-anthropic-billing", "A", "B\n", "C"]),
        "A\nB\nC"
    );
}
