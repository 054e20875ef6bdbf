//! Response bodies and SSE event sequences of the four protocols (ds4-features §2.3, §2.7,
//! §2.10), built from the worker's protocol-neutral [`Ev`] events.

use std::collections::HashMap;

use axum::response::sse::Event;
use serde_json::{Value, json};

use crate::error::{Api, ApiError};
use crate::ids;
use crate::request::{ToolKind, WireTool};
use crate::worker::{CallOut, Ev, Finish, Outcome, Usage};

/// OpenAI usage object.
pub fn openai_usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": u.completion,
        "total_tokens": u.prompt + u.completion,
        "prompt_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": u.written()},
    })
}

/// Responses usage object.
pub fn responses_usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt,
        "input_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": u.written()},
        "output_tokens": u.completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt + u.completion,
    })
}

/// Anthropic usage object (`input_tokens` counts what is neither read from nor written to the
/// cache, which is nothing: every prompt token is one or the other).
pub fn anthropic_usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt.saturating_sub(u.cached).saturating_sub(u.written()),
        "output_tokens": u.completion,
        "cache_read_input_tokens": u.cached,
        "cache_creation_input_tokens": u.written(),
    })
}

fn anthropic_stop_reason(out: &Outcome) -> &'static str {
    match out.finish {
        Finish::ToolCalls => "tool_use",
        Finish::Length => "max_tokens",
        _ if out.stop_sequence.is_some() => "stop_sequence",
        _ => "end_turn",
    }
}

fn openai_tool_call(c: &CallOut) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

fn tool_input(c: &CallOut) -> Value {
    serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}))
}

/// Per-response identity shared by the body builders.
#[derive(Clone, Debug)]
pub struct RespMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

// ----------------------------------------------------------------------------------------------
// Non-streaming bodies.
// ----------------------------------------------------------------------------------------------

/// `chat.completion`.
pub fn chat_json(m: &RespMeta, out: &Outcome) -> Value {
    let mut msg = json!({"role": "assistant", "content": out.content});
    if let Some(r) = out.reasoning.as_deref().filter(|r| !r.is_empty()) {
        msg["reasoning_content"] = r.into();
    }
    if !out.tool_calls.is_empty() {
        msg["tool_calls"] = out.tool_calls.iter().map(openai_tool_call).collect();
    }
    json!({
        "id": m.id, "object": "chat.completion", "created": m.created, "model": m.model,
        "choices": [{"index": 0, "message": msg, "finish_reason": out.finish.openai()}],
        "usage": openai_usage(&out.usage),
    })
}

/// `text_completion`.
pub fn completion_json(m: &RespMeta, out: &Outcome) -> Value {
    json!({
        "id": m.id, "object": "text_completion", "created": m.created, "model": m.model,
        "choices": [{"text": out.content, "index": 0, "finish_reason": out.finish.openai()}],
        "usage": openai_usage(&out.usage),
    })
}

/// Anthropic `message`.
pub fn messages_json(m: &RespMeta, out: &Outcome) -> Value {
    let mut content = Vec::new();
    if let Some(r) = out.reasoning.as_deref().filter(|r| !r.is_empty()) {
        content.push(json!({"type": "thinking", "thinking": r, "signature": m.id}));
    }
    if !out.content.is_empty() {
        content.push(json!({"type": "text", "text": out.content}));
    }
    for c in &out.tool_calls {
        content
            .push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c)}));
    }
    if !content.iter().any(|b| b["type"] != "thinking") {
        content.push(json!({"type": "text", "text": ""}));
    }
    json!({
        "id": m.id, "type": "message", "role": "assistant", "model": m.model, "content": content,
        "stop_reason": anthropic_stop_reason(out), "stop_sequence": out.stop_sequence,
        "usage": anthropic_usage(&out.usage),
    })
}

/// Ids and wire data of one Responses response.
#[derive(Clone, Debug)]
pub struct RespState {
    pub meta: RespMeta,
    pub rs_id: String,
    pub msg_id: String,
    pub fc_ids: Vec<String>,
    pub summary: bool,
    pub wire: HashMap<String, WireTool>,
}

impl RespState {
    pub fn new(meta: RespMeta, summary: bool, wire: HashMap<String, WireTool>) -> RespState {
        RespState {
            meta,
            rs_id: ids::item_id("rs_"),
            msg_id: ids::item_id("msg_"),
            fc_ids: Vec::new(),
            summary,
            wire,
        }
    }

    fn fc_id(&mut self, i: usize) -> String {
        while self.fc_ids.len() <= i {
            self.fc_ids.push(ids::item_id("fc_"));
        }
        self.fc_ids[i].clone()
    }

    fn reasoning_item(&self, text: &str, status: &str) -> Value {
        json!({"id": self.rs_id, "type": "reasoning", "status": status,
               "summary": [{"type": "summary_text", "text": text}]})
    }

    fn message_item(&self, text: &str, status: &str) -> Value {
        json!({"id": self.msg_id, "type": "message", "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]})
    }

    fn call_item(&mut self, i: usize, c: &CallOut, status: &str, args: &str) -> Value {
        let id = self.fc_id(i);
        let w = self.wire.get(&c.name).cloned();
        match w.as_ref().map(|w| &w.kind) {
            Some(ToolKind::ToolSearch) => json!({
                "id": id, "type": "tool_search_call", "status": status, "call_id": c.id,
                "execution": "client", "arguments": tool_input(c),
            }),
            Some(ToolKind::Custom) => {
                let input = tool_input(c)
                    .get("input")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| c.arguments.clone());
                json!({"id": id, "type": "custom_tool_call", "status": status, "call_id": c.id,
                       "name": w.as_ref().map_or(c.name.as_str(), |w| w.name.as_str()), "input": input})
            }
            _ => {
                let mut v = json!({"id": id, "type": "function_call", "status": status,
                    "name": w.as_ref().map_or(c.name.as_str(), |w| w.name.as_str()),
                    "call_id": c.id, "arguments": args});
                if let Some(ns) = w.and_then(|w| w.namespace) {
                    v["namespace"] = ns.into();
                }
                v
            }
        }
    }

    fn item_status(out: &Outcome) -> &'static str {
        match out.finish {
            Finish::Length => "incomplete",
            _ => "completed",
        }
    }

    /// The `output` array of the finished response.
    pub fn output(&mut self, out: &Outcome) -> Vec<Value> {
        let status = Self::item_status(out);
        let mut items = Vec::new();
        if self.summary
            && let Some(r) = &out.reasoning
        {
            items.push(self.reasoning_item(r, status));
        }
        if !out.content.is_empty() || out.tool_calls.is_empty() {
            items.push(self.message_item(&out.content, status));
        }
        for (i, c) in out.tool_calls.iter().enumerate() {
            items.push(self.call_item(i, c, "completed", &c.arguments));
        }
        items
    }

    /// The `response` object. `out` is `None` while in progress.
    pub fn response(&mut self, out: Option<&Outcome>) -> Value {
        let (status, output, usage, error, incomplete) = match out {
            None => (
                "in_progress",
                Vec::new(),
                Value::Null,
                Value::Null,
                Value::Null,
            ),
            Some(o) => {
                let (status, error, incomplete) = match &o.finish {
                    Finish::Length => (
                        "incomplete",
                        Value::Null,
                        json!({"reason": "max_output_tokens"}),
                    ),
                    Finish::Error(msg) => (
                        "failed",
                        json!({"code": "server_error", "message": msg}),
                        Value::Null,
                    ),
                    _ => ("completed", Value::Null, Value::Null),
                };
                (
                    status,
                    self.output(o),
                    responses_usage(&o.usage),
                    error,
                    incomplete,
                )
            }
        };
        json!({
            "id": self.meta.id, "object": "response", "created_at": self.meta.created,
            "status": status, "model": self.meta.model, "output": output,
            "error": error, "incomplete_details": incomplete, "usage": usage,
            "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
        })
    }
}

// ----------------------------------------------------------------------------------------------
// Streaming.
// ----------------------------------------------------------------------------------------------

fn data(v: Value) -> Event {
    Event::default().data(v.to_string())
}

fn named(name: &str, v: Value) -> Event {
    Event::default().event(name).data(v.to_string())
}

fn done_marker() -> Event {
    Event::default().data("[DONE]")
}

/// Turns worker events into one protocol's SSE events.
pub trait Formatter: Send {
    /// SSE events for one worker event; `true` in the second member ends the stream.
    fn on(&mut self, ev: Ev) -> (Vec<Event>, bool);
}

/// The SSE error event of `api` for a failure after the headers were sent.
pub fn error_event(api: Api, status: u16, message: &str) -> Event {
    let e = ApiError::new(
        axum::http::StatusCode::from_u16(status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
        api,
        message,
    );
    named("error", e.sse_data())
}

/// OpenAI chat completions chunks.
pub struct ChatStream {
    pub meta: RespMeta,
    started: Vec<bool>,
}

impl ChatStream {
    pub fn new(meta: RespMeta) -> ChatStream {
        ChatStream {
            meta,
            started: Vec::new(),
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        data(json!({
            "id": self.meta.id, "object": "chat.completion.chunk", "created": self.meta.created,
            "model": self.meta.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }))
    }
}

impl Formatter for ChatStream {
    fn on(&mut self, ev: Ev) -> (Vec<Event>, bool) {
        match ev {
            Ev::Started(_) => (vec![self.chunk(json!({"role": "assistant"}), None)], false),
            Ev::Reasoning(s) => (
                vec![self.chunk(json!({"reasoning_content": s}), None)],
                false,
            ),
            Ev::Content(s) => (vec![self.chunk(json!({"content": s}), None)], false),
            Ev::ToolStart { index, id, name } => {
                while self.started.len() <= index {
                    self.started.push(false);
                }
                self.started[index] = true;
                let tc = json!([{"index": index, "id": id, "type": "function",
                                 "function": {"name": name, "arguments": ""}}]);
                (vec![self.chunk(json!({"tool_calls": tc}), None)], false)
            }
            Ev::ToolArgs { index, delta } => {
                let tc = json!([{"index": index, "function": {"arguments": delta}}]);
                (vec![self.chunk(json!({"tool_calls": tc}), None)], false)
            }
            Ev::ToolEnd { .. } => (Vec::new(), false),
            Ev::Done(out) => {
                let mut evs = Vec::new();
                for (i, c) in out.tool_calls.iter().enumerate() {
                    if !self.started.get(i).copied().unwrap_or(false) {
                        let mut tc = openai_tool_call(c);
                        tc["index"] = i.into();
                        evs.push(self.chunk(json!({"tool_calls": [tc]}), None));
                    }
                }
                if let Finish::Error(msg) = &out.finish {
                    evs.push(error_event(Api::Chat, 500, msg));
                    return (evs, true);
                }
                evs.push(self.chunk(json!({}), Some(out.finish.openai())));
                if self.meta.include_usage {
                    evs.push(data(json!({
                        "id": self.meta.id, "object": "chat.completion.chunk",
                        "created": self.meta.created, "model": self.meta.model,
                        "choices": [], "usage": openai_usage(&out.usage),
                    })));
                }
                evs.push(done_marker());
                (evs, true)
            }
            Ev::Failed(status, msg) => (vec![error_event(Api::Chat, status, &msg)], true),
        }
    }
}

/// OpenAI legacy completions chunks.
pub struct CompletionStream {
    pub meta: RespMeta,
}

impl CompletionStream {
    fn chunk(&self, text: &str, finish: Option<&str>) -> Event {
        data(json!({
            "id": self.meta.id, "object": "text_completion", "created": self.meta.created,
            "model": self.meta.model,
            "choices": [{"text": text, "index": 0, "finish_reason": finish}],
        }))
    }
}

impl Formatter for CompletionStream {
    fn on(&mut self, ev: Ev) -> (Vec<Event>, bool) {
        match ev {
            Ev::Content(s) | Ev::Reasoning(s) => (vec![self.chunk(&s, None)], false),
            Ev::Done(out) => {
                if let Finish::Error(msg) = &out.finish {
                    return (vec![error_event(Api::Completions, 500, msg)], true);
                }
                let mut evs = vec![self.chunk("", Some(out.finish.openai()))];
                if self.meta.include_usage {
                    evs.push(data(json!({
                        "id": self.meta.id, "object": "text_completion",
                        "created": self.meta.created, "model": self.meta.model,
                        "choices": [], "usage": openai_usage(&out.usage),
                    })));
                }
                evs.push(done_marker());
                (evs, true)
            }
            Ev::Failed(status, msg) => (vec![error_event(Api::Completions, status, &msg)], true),
            _ => (Vec::new(), false),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    Tool,
}

/// Anthropic messages events.
pub struct MessagesStream {
    pub meta: RespMeta,
    open: Option<Block>,
    next_index: usize,
    started_tools: Vec<bool>,
    visible_blocks: usize,
    sent_start: bool,
}

impl MessagesStream {
    pub fn new(meta: RespMeta) -> MessagesStream {
        MessagesStream {
            meta,
            open: None,
            next_index: 0,
            started_tools: Vec::new(),
            visible_blocks: 0,
            sent_start: false,
        }
    }

    fn start_msg(&mut self, usage: &Usage) -> Event {
        self.sent_start = true;
        named(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.meta.id, "type": "message", "role": "assistant", "model": self.meta.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": anthropic_usage(&Usage { completion: 0, ..*usage }),
            }}),
        )
    }

    fn close(&mut self, evs: &mut Vec<Event>) {
        if let Some(b) = self.open.take() {
            let index = self.next_index - 1;
            if b == Block::Thinking {
                evs.push(named(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "signature_delta", "signature": self.meta.id}}),
                ));
            }
            evs.push(named(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open_block(&mut self, evs: &mut Vec<Event>, b: Block, block: Value) {
        self.close(evs);
        evs.push(named(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.next_index, "content_block": block}),
        ));
        self.next_index += 1;
        self.open = Some(b);
        if b != Block::Thinking {
            self.visible_blocks += 1;
        }
    }

    fn delta(&self, delta: Value) -> Event {
        named(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.next_index - 1, "delta": delta}),
        )
    }

    fn tool_block(&mut self, evs: &mut Vec<Event>, id: &str, name: &str) {
        self.open_block(
            evs,
            Block::Tool,
            json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
        );
    }
}

impl Formatter for MessagesStream {
    fn on(&mut self, ev: Ev) -> (Vec<Event>, bool) {
        let mut evs = Vec::new();
        match ev {
            Ev::Started(u) => evs.push(self.start_msg(&u)),
            Ev::Reasoning(s) => {
                if self.open != Some(Block::Thinking) {
                    self.open_block(
                        &mut evs,
                        Block::Thinking,
                        json!({"type": "thinking", "thinking": "", "signature": ""}),
                    );
                }
                evs.push(self.delta(json!({"type": "thinking_delta", "thinking": s})));
            }
            Ev::Content(s) => {
                if self.open != Some(Block::Text) {
                    self.open_block(&mut evs, Block::Text, json!({"type": "text", "text": ""}));
                }
                evs.push(self.delta(json!({"type": "text_delta", "text": s})));
            }
            Ev::ToolStart { index, id, name } => {
                while self.started_tools.len() <= index {
                    self.started_tools.push(false);
                }
                self.started_tools[index] = true;
                self.tool_block(&mut evs, &id, &name);
            }
            Ev::ToolArgs { delta, .. } => {
                if self.open == Some(Block::Tool) {
                    evs.push(
                        self.delta(json!({"type": "input_json_delta", "partial_json": delta})),
                    );
                }
            }
            Ev::ToolEnd { .. } => self.close(&mut evs),
            Ev::Done(out) => {
                if !self.sent_start {
                    evs.push(self.start_msg(&out.usage));
                }
                self.close(&mut evs);
                for (i, c) in out.tool_calls.iter().enumerate() {
                    if !self.started_tools.get(i).copied().unwrap_or(false) {
                        self.tool_block(&mut evs, &c.id, &c.name);
                        evs.push(self.delta(
                            json!({"type": "input_json_delta", "partial_json": c.arguments}),
                        ));
                        self.close(&mut evs);
                    }
                }
                if let Finish::Error(msg) = &out.finish {
                    evs.push(error_event(Api::Messages, 500, msg));
                    return (evs, true);
                }
                if self.visible_blocks == 0 {
                    self.open_block(&mut evs, Block::Text, json!({"type": "text", "text": ""}));
                    self.close(&mut evs);
                }
                evs.push(named(
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": anthropic_stop_reason(&out), "stop_sequence": out.stop_sequence},
                           "usage": {"output_tokens": out.usage.completion}}),
                ));
                evs.push(named("message_stop", json!({"type": "message_stop"})));
                return (evs, true);
            }
            Ev::Failed(status, msg) => {
                evs.push(error_event(Api::Messages, status, &msg));
                return (evs, true);
            }
        }
        (evs, false)
    }
}

/// OpenAI Responses events.
pub struct ResponsesStream {
    pub st: RespState,
    seq: u64,
    created_sent: bool,
    reasoning_open: bool,
    reasoning_text: String,
    message_open: bool,
    message_text: String,
    next_output: usize,
    rs_index: usize,
    msg_index: usize,
}

impl ResponsesStream {
    pub fn new(st: RespState) -> ResponsesStream {
        ResponsesStream {
            st,
            seq: 0,
            created_sent: false,
            reasoning_open: false,
            reasoning_text: String::new(),
            message_open: false,
            message_text: String::new(),
            next_output: 0,
            rs_index: 0,
            msg_index: 0,
        }
    }

    fn ev(&mut self, ty: &str, v: Value) -> Event {
        let mut m = serde_json::Map::new();
        m.insert("type".into(), ty.into());
        m.insert("sequence_number".into(), self.seq.into());
        if let Value::Object(o) = v {
            m.extend(o);
        }
        self.seq += 1;
        named(ty, Value::Object(m))
    }

    fn created(&mut self, evs: &mut Vec<Event>) {
        if !self.created_sent {
            self.created_sent = true;
            let r = self.st.response(None);
            evs.push(self.ev("response.created", json!({"response": r})));
        }
    }

    fn close_reasoning(&mut self, evs: &mut Vec<Event>, status: &str) {
        if !self.reasoning_open {
            return;
        }
        self.reasoning_open = false;
        let (id, oi, text) = (
            self.st.rs_id.clone(),
            self.rs_index,
            self.reasoning_text.clone(),
        );
        evs.push(self.ev(
            "response.reasoning_summary_text.done",
            json!({"item_id": id, "output_index": oi, "summary_index": 0, "text": text}),
        ));
        evs.push(self.ev(
            "response.reasoning_summary_part.done",
            json!({"item_id": id, "output_index": oi, "summary_index": 0,
                   "part": {"type": "summary_text", "text": text}}),
        ));
        let item = self.st.reasoning_item(&text, status);
        evs.push(self.ev(
            "response.output_item.done",
            json!({"output_index": oi, "item": item}),
        ));
    }

    fn open_message(&mut self, evs: &mut Vec<Event>) {
        if self.message_open {
            return;
        }
        self.message_open = true;
        self.msg_index = self.next_output;
        self.next_output += 1;
        let mut item = self.st.message_item("", "in_progress");
        item["content"] = json!([]);
        let (id, oi) = (self.st.msg_id.clone(), self.msg_index);
        evs.push(self.ev(
            "response.output_item.added",
            json!({"output_index": oi, "item": item}),
        ));
        evs.push(self.ev(
            "response.content_part.added",
            json!({"item_id": id, "output_index": oi, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": []}}),
        ));
    }

    fn close_message(&mut self, evs: &mut Vec<Event>, status: &str) {
        if !self.message_open {
            return;
        }
        self.message_open = false;
        let (id, oi, text) = (
            self.st.msg_id.clone(),
            self.msg_index,
            self.message_text.clone(),
        );
        evs.push(self.ev("response.output_text.done",
            json!({"item_id": id, "output_index": oi, "content_index": 0, "text": text, "logprobs": []})));
        evs.push(self.ev(
            "response.content_part.done",
            json!({"item_id": id, "output_index": oi, "content_index": 0,
                   "part": {"type": "output_text", "text": text, "annotations": []}}),
        ));
        let item = self.st.message_item(&text, status);
        evs.push(self.ev(
            "response.output_item.done",
            json!({"output_index": oi, "item": item}),
        ));
    }
}

impl Formatter for ResponsesStream {
    fn on(&mut self, ev: Ev) -> (Vec<Event>, bool) {
        let mut evs = Vec::new();
        match ev {
            Ev::Started(_) => self.created(&mut evs),
            Ev::Reasoning(s) => {
                if !self.st.summary {
                    return (evs, false);
                }
                if !self.reasoning_open && self.reasoning_text.is_empty() {
                    self.reasoning_open = true;
                    self.rs_index = self.next_output;
                    self.next_output += 1;
                    let mut item = self.st.reasoning_item("", "in_progress");
                    item["summary"] = json!([]);
                    let (id, oi) = (self.st.rs_id.clone(), self.rs_index);
                    evs.push(self.ev(
                        "response.output_item.added",
                        json!({"output_index": oi, "item": item}),
                    ));
                    evs.push(self.ev(
                        "response.reasoning_summary_part.added",
                        json!({"item_id": id, "output_index": oi, "summary_index": 0,
                               "part": {"type": "summary_text", "text": ""}}),
                    ));
                }
                if self.reasoning_open {
                    self.reasoning_text.push_str(&s);
                    let (id, oi) = (self.st.rs_id.clone(), self.rs_index);
                    evs.push(self.ev(
                        "response.reasoning_summary_text.delta",
                        json!({"item_id": id, "output_index": oi, "summary_index": 0, "delta": s}),
                    ));
                }
            }
            Ev::Content(s) => {
                self.close_reasoning(&mut evs, "completed");
                self.open_message(&mut evs);
                self.message_text.push_str(&s);
                let (id, oi) = (self.st.msg_id.clone(), self.msg_index);
                evs.push(self.ev("response.output_text.delta",
                    json!({"item_id": id, "output_index": oi, "content_index": 0, "delta": s, "logprobs": []})));
            }
            Ev::ToolStart { .. } | Ev::ToolArgs { .. } | Ev::ToolEnd { .. } => {}
            Ev::Done(out) => {
                self.created(&mut evs);
                let status = RespState::item_status(&out);
                let think_closed = out.text.contains("</think>");
                self.close_reasoning(
                    &mut evs,
                    if think_closed {
                        "completed"
                    } else {
                        "incomplete"
                    },
                );
                if out.tool_calls.is_empty() && !self.message_open && self.message_text.is_empty() {
                    self.open_message(&mut evs);
                }
                self.close_message(&mut evs, status);
                for (i, c) in out.tool_calls.iter().enumerate() {
                    let oi = self.next_output;
                    self.next_output += 1;
                    let item = self.st.call_item(i, c, "in_progress", "");
                    let id = item["id"].clone();
                    evs.push(self.ev(
                        "response.output_item.added",
                        json!({"output_index": oi, "item": item}),
                    ));
                    let done = self.st.call_item(i, c, "completed", &c.arguments);
                    if done["type"] == "function_call" {
                        evs.push(self.ev(
                            "response.function_call_arguments.delta",
                            json!({"item_id": id, "output_index": oi, "delta": c.arguments}),
                        ));
                        let mut d = json!({"item_id": id, "output_index": oi,
                                           "name": done["name"], "arguments": c.arguments});
                        if let Some(ns) = done.get("namespace") {
                            d["namespace"] = ns.clone();
                        }
                        evs.push(self.ev("response.function_call_arguments.done", d));
                    }
                    evs.push(self.ev(
                        "response.output_item.done",
                        json!({"output_index": oi, "item": done}),
                    ));
                }
                let r = self.st.response(Some(&out));
                let ty = match out.finish {
                    Finish::Length => "response.incomplete",
                    Finish::Error(_) => "response.failed",
                    _ => "response.completed",
                };
                evs.push(self.ev(ty, json!({"response": r})));
                return (evs, true);
            }
            Ev::Failed(status, msg) => {
                if status < 500 {
                    evs.push(error_event(Api::Responses, status, &msg));
                    return (evs, true);
                }
                self.created(&mut evs);
                let mut r = self.st.response(None);
                r["status"] = "failed".into();
                r["error"] = json!({"code": "server_error", "message": msg});
                evs.push(self.ev("response.failed", json!({"response": r})));
                return (evs, true);
            }
        }
        (evs, false)
    }
}
