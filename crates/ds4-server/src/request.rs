//! Request parsing for the four generation protocols into one [`GenRequest`].
//!
//! Parsing is lenient the way clients need it: unknown members are ignored, `max_tokens` and
//! `max_completion_tokens` are both accepted, integers are clamped to `[0, i32::MAX]`, chat
//! content arrays keep only their text parts. It is strict where ds4 is: an unknown thinking
//! effort, an unknown message role, Responses items and content blocks it cannot represent, and
//! forced tool choices on `/v1/responses` are 400s. Nothing here panics on any input (fuzzed).

use std::collections::HashMap;

use ds4_tokenizer::chat::join_anthropic_system;
use ds4_tokenizer::{Message, Role, ThinkMode, ToolCall, ToolSchemas};
use serde_json::{Map, Value, json};

use crate::error::{Api, ApiError};

/// The default model id (ds4's).
pub const DEFAULT_MODEL: &str = "deepseek-v4-flash";

/// How a tool is represented on the wire (Responses needs it to shape output items).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolKind {
    Function,
    /// A Responses `custom` tool: one free-form `input` string.
    Custom,
    /// The Responses hosted `tool_search` tool (executed by the client).
    ToolSearch,
}

/// Wire identity of a tool whose prompt name differs from what the client expects back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireTool {
    pub name: String,
    pub namespace: Option<String>,
    pub kind: ToolKind,
}

/// A parsed generation request, protocol-neutral.
#[derive(Clone, Debug, PartialEq)]
pub struct GenRequest {
    pub api: Api,
    /// Model id to echo back.
    pub model: String,
    pub messages: Vec<Message>,
    /// Tool schemas for the prompt (empty when none or disabled by `tool_choice`).
    pub tools: ToolSchemas,
    /// Prompt tool name → wire identity (Responses namespaces, custom and hosted tools).
    pub wire_tools: HashMap<String, WireTool>,
    /// `/v1/completions` prompt.
    pub completion_prompt: Option<String>,
    /// Thinking mode chosen by explicit controls (`None`: no explicit control).
    pub think: Option<ThinkMode>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    /// Seed (`None` or ≤ 0 in the request: server default).
    pub seed: Option<u64>,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Responses: emit reasoning items (`reasoning.summary` opted in).
    pub reasoning_summary: bool,
}

impl GenRequest {
    fn new(api: Api) -> GenRequest {
        GenRequest {
            api,
            model: DEFAULT_MODEL.into(),
            messages: Vec::new(),
            tools: ToolSchemas::new(),
            wire_tools: HashMap::new(),
            completion_prompt: None,
            think: None,
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            stream: false,
            include_usage: false,
            reasoning_summary: false,
        }
    }

    /// The thinking mode to use: explicit controls, else the model alias (`deepseek-chat` off,
    /// `deepseek-reasoner` on), else on; Think Max only when `ctx` allows it.
    pub fn think_mode(&self, ctx: usize) -> ThinkMode {
        let m = match self.think {
            Some(m) => m,
            None => match self.model.as_str() {
                "deepseek-chat" => ThinkMode::None,
                _ => ThinkMode::High,
            },
        };
        m.for_context(ctx)
    }

    /// Whether tool calls are parsed from the output.
    pub fn has_tools(&self) -> bool {
        !self.tools.is_empty()
    }
}

// ----------------------------------------------------------------------------------------------
// JSON helpers.
// ----------------------------------------------------------------------------------------------

/// The body with every unpaired UTF-16 surrogate escape (`\ud800`…`\udfff` not forming a
/// pair) inside a JSON string replaced by `\ufffd`. JSON's grammar allows such escapes and
/// JavaScript's `JSON.stringify` and Python's `json.dumps` write them for a string cut inside
/// a surrogate pair (a truncated tool output, say), but serde_json refuses them; without this
/// a conversation holding one would fail with "invalid JSON request" on every turn. Borrowed
/// when there is nothing to replace.
pub fn replace_lone_surrogates(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    fn hex4(b: &[u8], at: usize) -> Option<u32> {
        let h = b.get(at..at + 4)?;
        let s = std::str::from_utf8(h).ok()?;
        if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    }
    let is_high = |c: u32| (0xD800..0xDC00).contains(&c);
    let is_low = |c: u32| (0xDC00..0xE000).contains(&c);
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0usize;
    let mut in_str = false;
    let mut i = 0usize;
    while i < body.len() {
        let c = body[i];
        if !in_str {
            in_str = c == b'"';
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_str = false;
                i += 1;
            }
            b'\\' if body.get(i + 1) == Some(&b'u') => {
                let Some(cp) = hex4(body, i + 2) else {
                    i += 2;
                    continue;
                };
                let paired = is_high(cp)
                    && body.get(i + 6) == Some(&b'\\')
                    && body.get(i + 7) == Some(&b'u')
                    && hex4(body, i + 8).is_some_and(is_low);
                if paired {
                    i += 12;
                } else if is_high(cp) || is_low(cp) {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(body.len()));
                    o.extend_from_slice(&body[copied..i]);
                    o.extend_from_slice(b"\\ufffd");
                    i += 6;
                    copied = i;
                } else {
                    i += 6;
                }
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    match out {
        Some(mut o) => {
            o.extend_from_slice(&body[copied..]);
            std::borrow::Cow::Owned(o)
        }
        None => std::borrow::Cow::Borrowed(body),
    }
}

fn parse_body(api: Api, body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ApiError::invalid_json(api)),
    }
}

/// The raw text of the top-level `tools` member, as the client sent it.
fn raw_tools(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        tools: Option<&'a serde_json::value::RawValue>,
    }
    serde_json::from_slice::<Raw<'_>>(body)
        .ok()
        .and_then(|r| r.tools.map(|t| t.get().to_string()))
}

fn clamp_int(v: &Value) -> Option<usize> {
    let f = v.as_f64()?;
    if f.is_nan() {
        return Some(0);
    }
    Some(f.clamp(0.0, i32::MAX as f64) as usize)
}

fn float(v: Option<&Value>) -> Option<f32> {
    v.and_then(Value::as_f64)
        .filter(|f| f.is_finite())
        .map(|f| f as f32)
}

fn string(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_string)
}

fn bool_of(v: Option<&Value>) -> Option<bool> {
    v.and_then(Value::as_bool)
}

fn seed_of(v: Option<&Value>) -> Option<u64> {
    let f = v?.as_f64()?;
    if f >= 1.0 && f.is_finite() {
        Some(if f >= u64::MAX as f64 {
            u64::MAX
        } else {
            f as u64
        })
    } else {
        None
    }
}

/// Chat-style content: a string, null, or an array whose string elements and `text` members
/// are concatenated (other parts, e.g. images, are dropped).
fn chat_content(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match p {
                    Value::String(s) => out.push_str(s),
                    Value::Object(o) => {
                        if let Some(Value::String(t)) = o.get("text") {
                            out.push_str(t);
                        }
                    }
                    _ => {}
                }
            }
            out
        }
        _ => String::new(),
    }
}

/// JSON text of tool-call arguments: a string is taken as the JSON text, anything else is
/// serialized compactly (member order kept).
fn args_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn stop_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

fn effort(api: Api, v: Option<&Value>) -> Result<Option<ThinkMode>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => ThinkMode::from_reasoning_effort(&s.to_ascii_lowercase())
            .map(Some)
            .ok_or_else(|| ApiError::invalid_json(api)),
        Some(_) => Err(ApiError::invalid_json(api)),
    }
}

/// `thinking` as `{"type": "enabled"|"disabled"|"adaptive"}` or a bool.
fn thinking_enabled(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::Object(o) => match o.get("type").and_then(Value::as_str)? {
            "enabled" | "adaptive" => Some(true),
            "disabled" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn combine_think(enabled: Option<bool>, effort: Option<ThinkMode>) -> Option<ThinkMode> {
    match (enabled, effort) {
        (Some(false), _) => Some(ThinkMode::None),
        (_, Some(m)) => Some(m),
        (Some(true), None) => Some(ThinkMode::High),
        (None, None) => None,
    }
}

fn common_sampling(req: &mut GenRequest, o: &Map<String, Value>) {
    req.temperature = float(o.get("temperature"));
    req.top_p = float(o.get("top_p"));
    req.min_p = float(o.get("min_p"));
    req.top_k = o
        .get("top_k")
        .and_then(clamp_int)
        .map(|k| k.min(i32::MAX as usize) as i32);
    req.seed = seed_of(o.get("seed"));
}

/// 400 for an empty `messages` array (as the OpenAI and Anthropic APIs answer): with no turn
/// there is nothing to answer, the prompt would be a bare BOS.
fn no_messages(api: Api) -> ApiError {
    let mut e = ApiError::bad_request(api, "messages: at least one message is required");
    e.param = Some("messages");
    e
}

fn model_of(o: &Map<String, Value>) -> String {
    match o.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => DEFAULT_MODEL.into(),
    }
}

// ----------------------------------------------------------------------------------------------
// OpenAI chat completions.
// ----------------------------------------------------------------------------------------------

fn openai_tool_calls(v: Option<&Value>) -> Vec<ToolCall> {
    let Some(Value::Array(calls)) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for c in calls {
        let Some(o) = c.as_object() else { continue };
        let f = o.get("function").and_then(Value::as_object).unwrap_or(o);
        let (Some(name), Some(args)) = (f.get("name").and_then(Value::as_str), f.get("arguments"))
        else {
            continue;
        };
        let mut call = ToolCall::new(name, args_text(args));
        call.id = string(o.get("id"));
        out.push(call);
    }
    out
}

/// Parse `POST /v1/chat/completions`.
pub fn parse_chat(body: &[u8]) -> Result<GenRequest, ApiError> {
    let body = &*replace_lone_surrogates(body);
    let api = Api::Chat;
    let o = parse_body(api, body)?;
    let mut req = GenRequest::new(api);
    req.model = model_of(&o);
    let Some(Value::Array(msgs)) = o.get("messages") else {
        return Err(ApiError::bad_request(api, "missing messages"));
    };
    // Checked last, so that other errors of the request are reported as before.
    let no_turns = msgs.is_empty();
    for m in msgs {
        let Some(m) = m.as_object() else {
            return Err(ApiError::invalid_json(api));
        };
        let role = match m.get("role") {
            None | Some(Value::Null) => Role::User,
            Some(Value::String(r)) => Role::parse(r),
            Some(_) => return Err(ApiError::invalid_json(api)),
        };
        if let Role::Other(r) = &role {
            return Err(ApiError::bad_request(
                api,
                format!("unknown message role '{r}'"),
            ));
        }
        let mut msg = Message::new(role, chat_content(m.get("content")));
        msg.reasoning = string(m.get("reasoning_content")).or_else(|| string(m.get("reasoning")));
        msg.tool_call_id = string(m.get("tool_call_id"));
        msg.tool_calls = openai_tool_calls(m.get("tool_calls"));
        req.messages.push(msg);
    }
    let tools_off = matches!(o.get("tool_choice"), Some(Value::String(s)) if s == "none");
    if !tools_off && let Some(raw) = raw_tools(body) {
        req.tools = ToolSchemas::from_raw_array(&raw).ok_or_else(|| ApiError::invalid_json(api))?;
    }
    common_sampling(&mut req, &o);
    req.max_tokens = o
        .get("max_completion_tokens")
        .and_then(clamp_int)
        .or_else(|| o.get("max_tokens").and_then(clamp_int));
    req.stop = stop_list(o.get("stop"));
    req.stream = bool_of(o.get("stream")).unwrap_or(false);
    req.include_usage = o
        .get("stream_options")
        .and_then(|s| s.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let enabled = thinking_enabled(o.get("thinking")).or(bool_of(o.get("think")));
    req.think = combine_think(enabled, effort(api, o.get("reasoning_effort"))?);
    if no_turns {
        return Err(no_messages(api));
    }
    Ok(req)
}

// ----------------------------------------------------------------------------------------------
// OpenAI legacy completions.
// ----------------------------------------------------------------------------------------------

/// Parse `POST /v1/completions`.
pub fn parse_completions(body: &[u8]) -> Result<GenRequest, ApiError> {
    let body = &*replace_lone_surrogates(body);
    let api = Api::Completions;
    let o = parse_body(api, body)?;
    let mut req = GenRequest::new(api);
    req.model = model_of(&o);
    let prompt = match o.get("prompt") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => a.iter().find_map(Value::as_str).map(str::to_string),
        _ => None,
    };
    let Some(prompt) = prompt else {
        return Err(ApiError::bad_request(api, "missing prompt"));
    };
    req.completion_prompt = Some(prompt);
    common_sampling(&mut req, &o);
    req.max_tokens = o.get("max_tokens").and_then(clamp_int);
    req.stop = stop_list(o.get("stop"));
    req.stream = bool_of(o.get("stream")).unwrap_or(false);
    req.include_usage = o
        .get("stream_options")
        .and_then(|s| s.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let enabled = thinking_enabled(o.get("thinking")).or(bool_of(o.get("think")));
    req.think = combine_think(enabled, effort(api, o.get("reasoning_effort"))?);
    Ok(req)
}

// ----------------------------------------------------------------------------------------------
// Anthropic messages.
// ----------------------------------------------------------------------------------------------

fn anthropic_text_blocks(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => {
            let mut out = String::new();
            for b in a {
                match b {
                    Value::String(s) => out.push_str(s),
                    Value::Object(o) => {
                        let ty = o.get("type").and_then(Value::as_str).unwrap_or("text");
                        if ty == "text"
                            && let Some(Value::String(t)) = o.get("text")
                        {
                            out.push_str(t);
                        }
                    }
                    _ => {}
                }
            }
            out
        }
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Parse `POST /v1/messages` (also used by `/v1/messages/count_tokens`).
pub fn parse_messages(body: &[u8]) -> Result<GenRequest, ApiError> {
    let body = &*replace_lone_surrogates(body);
    let api = Api::Messages;
    let o = parse_body(api, body)?;
    let mut req = GenRequest::new(api);
    req.model = model_of(&o);
    let system = match o.get("system") {
        Some(Value::String(s)) => join_anthropic_system(&[s.as_str()]),
        Some(Value::Array(parts)) => {
            let texts: Vec<String> = parts
                .iter()
                .filter_map(|p| match p {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => string(o.get("text")),
                    _ => None,
                })
                .collect();
            join_anthropic_system(&texts)
        }
        _ => String::new(),
    };
    if !system.is_empty() {
        req.messages.push(Message::system(system));
    }
    let Some(Value::Array(msgs)) = o.get("messages") else {
        return Err(ApiError::bad_request(api, "missing messages"));
    };
    // Checked last, so that other errors of the request are reported as before.
    let no_turns = msgs.is_empty();
    let mut known_ids: Vec<String> = Vec::new();
    for m in msgs {
        let Some(m) = m.as_object() else {
            return Err(ApiError::invalid_json(api));
        };
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") | None => Role::User,
            Some("assistant") => Role::Assistant,
            Some(r) => {
                return Err(ApiError::bad_request(
                    api,
                    format!("unknown message role '{r}'"),
                ));
            }
        };
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::Array(a)) => a.clone(),
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            _ => Vec::new(),
        };
        if role == Role::Assistant {
            let mut msg = Message::assistant("");
            let mut reasoning: Option<String> = None;
            for b in &blocks {
                let Some(b) = b.as_object() else { continue };
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(t) = b.get("text").and_then(Value::as_str) {
                            msg.content.push_str(t);
                        }
                    }
                    Some("thinking") => {
                        if let Some(t) = b.get("thinking").and_then(Value::as_str) {
                            reasoning.get_or_insert_with(String::new).push_str(t);
                        }
                    }
                    Some("tool_use") | Some("server_tool_use") => {
                        let name = b.get("name").and_then(Value::as_str).unwrap_or("");
                        let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                        let mut call = ToolCall::new(name, args_text(&input));
                        call.id = string(b.get("id"));
                        if let Some(id) = &call.id {
                            known_ids.push(id.clone());
                        }
                        msg.tool_calls.push(call);
                    }
                    _ => {}
                }
            }
            msg.reasoning = reasoning;
            req.messages.push(msg);
        } else {
            let mut text = String::new();
            let mut any_text = false;
            let mut any_tool_result = false;
            for b in &blocks {
                let Some(b) = b.as_object() else { continue };
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(t) = b.get("text").and_then(Value::as_str) {
                            text.push_str(t);
                            any_text = true;
                        }
                    }
                    Some("tool_result") => {
                        if any_text {
                            req.messages.push(Message::user(std::mem::take(&mut text)));
                            any_text = false;
                        }
                        let id = string(b.get("tool_use_id")).unwrap_or_default();
                        if !known_ids.contains(&id) {
                            return Err(ApiError::bad_request(
                                api,
                                format!(
                                    "Anthropic continuation state is not available for tool_use_id {id}; retry by replaying the full message history"
                                ),
                            ));
                        }
                        let content = anthropic_text_blocks(b.get("content"));
                        req.messages
                            .push(Message::tool(content).with_tool_call_id(id));
                        any_tool_result = true;
                    }
                    _ => {}
                }
            }
            // A user turn stays a turn when its blocks are all ones without text (an image,
            // a document): dropping it would leave the prompt without its pending user turn.
            if any_text || !any_tool_result {
                req.messages.push(Message::user(text));
            }
        }
    }
    let tools_off = matches!(
        o.get("tool_choice")
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str),
        Some("none")
    );
    if !tools_off && let Some(raw) = raw_tools(body) {
        req.tools = ToolSchemas::from_raw_array(&raw).ok_or_else(|| ApiError::invalid_json(api))?;
    }
    req.temperature = float(o.get("temperature"));
    req.top_p = float(o.get("top_p"));
    req.top_k = o
        .get("top_k")
        .and_then(clamp_int)
        .map(|k| k.min(i32::MAX as usize) as i32);
    req.max_tokens = o.get("max_tokens").and_then(clamp_int);
    req.stop = stop_list(o.get("stop_sequences"));
    req.stream = bool_of(o.get("stream")).unwrap_or(false);
    req.include_usage = true;
    let mut eff = effort(api, o.get("reasoning_effort"))?;
    if let Some(e) = effort(api, o.get("output_config").and_then(|c| c.get("effort")))? {
        eff = Some(e);
    }
    req.think = combine_think(thinking_enabled(o.get("thinking")), eff);
    if no_turns {
        return Err(no_messages(api));
    }
    Ok(req)
}

// ----------------------------------------------------------------------------------------------
// OpenAI Responses.
// ----------------------------------------------------------------------------------------------

const RESPONSES_TEXT_BLOCKS: [&str; 5] = [
    "input_text",
    "output_text",
    "text",
    "summary_text",
    "reasoning_text",
];

fn responses_content(api: Api, v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(blocks)) => {
            let mut out = String::new();
            for b in blocks {
                let ty = b.get("type").and_then(Value::as_str).unwrap_or("");
                if !RESPONSES_TEXT_BLOCKS.contains(&ty) {
                    return Err(ApiError::bad_request(
                        api,
                        format!("unsupported content block type '{ty}'"),
                    ));
                }
                if let Some(t) = b.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid_json(api)),
    }
}

/// Tool output text: a string, the text parts of an array, or other JSON as text.
fn output_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.iter().all(|p| p.get("text").is_some()) => a
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        Some(other) => other.to_string(),
    }
}

/// Flatten Responses tool definitions into prompt schemas and wire identities.
fn responses_tools(
    api: Api,
    tools: &[Value],
    schemas: &mut ToolSchemas,
    wire: &mut HashMap<String, WireTool>,
    namespace: Option<&str>,
) -> Result<(), ApiError> {
    for t in tools {
        let Some(o) = t.as_object() else {
            return Err(ApiError::invalid_json(api));
        };
        let ty = o.get("type").and_then(Value::as_str).unwrap_or("function");
        match ty {
            "function" => {
                let f = o.get("function").and_then(Value::as_object).unwrap_or(o);
                let Some(name) = f.get("name").and_then(Value::as_str) else {
                    return Err(ApiError::bad_request(api, "function tool without a name"));
                };
                let mut schema = Map::new();
                let prompt_name = match namespace {
                    Some(ns) => format!("{ns}{name}"),
                    None => name.to_string(),
                };
                schema.insert("name".into(), prompt_name.clone().into());
                for k in ["description", "parameters", "strict"] {
                    if let Some(v) = f.get(k) {
                        schema.insert(k.into(), v.clone());
                    }
                }
                schemas.push_value(&Value::Object(schema));
                wire.insert(
                    prompt_name,
                    WireTool {
                        name: name.to_string(),
                        namespace: namespace.map(str::to_string),
                        kind: ToolKind::Function,
                    },
                );
            }
            "namespace" => {
                let ns = o.get("name").and_then(Value::as_str).unwrap_or("");
                if let Some(Value::Array(inner)) = o.get("tools") {
                    responses_tools(api, inner, schemas, wire, Some(ns))?;
                }
            }
            "custom" => {
                let Some(name) = o.get("name").and_then(Value::as_str) else {
                    return Err(ApiError::bad_request(api, "custom tool without a name"));
                };
                let mut schema = Map::new();
                schema.insert("name".into(), name.into());
                if let Some(d) = o.get("description") {
                    schema.insert("description".into(), d.clone());
                }
                schema.insert(
                    "parameters".into(),
                    json!({"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}),
                );
                schemas.push_value(&Value::Object(schema));
                wire.insert(
                    name.to_string(),
                    WireTool {
                        name: name.to_string(),
                        namespace: None,
                        kind: ToolKind::Custom,
                    },
                );
            }
            "tool_search" => {
                let mut schema = Map::new();
                schema.insert("name".into(), "tool_search".into());
                for k in ["description", "parameters"] {
                    if let Some(v) = o.get(k) {
                        schema.insert(k.into(), v.clone());
                    }
                }
                schemas.push_value(&Value::Object(schema));
                wire.insert(
                    "tool_search".into(),
                    WireTool {
                        name: "tool_search".into(),
                        namespace: None,
                        kind: ToolKind::ToolSearch,
                    },
                );
            }
            // Hosted tools the model cannot call here (web_search, file_search, …).
            _ => {}
        }
    }
    Ok(())
}

/// Parse `POST /v1/responses`.
pub fn parse_responses(body: &[u8]) -> Result<GenRequest, ApiError> {
    let body = &*replace_lone_surrogates(body);
    let api = Api::Responses;
    let o = parse_body(api, body)?;
    let mut req = GenRequest::new(api);
    req.model = model_of(&o);
    for key in ["previous_response_id", "conversation"] {
        if o.get(key).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request(
                api,
                format!("{key} is not supported; replay full input instead"),
            ));
        }
    }
    let mut tools_on = true;
    match o.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "auto" => {}
        Some(Value::String(s)) if s == "none" => tools_on = false,
        Some(Value::String(s)) => {
            return Err(ApiError::bad_request(
                api,
                format!("tool_choice={s} not supported"),
            ));
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                api,
                "forced tool_choice not supported",
            ));
        }
    }
    let mut schemas = ToolSchemas::new();
    let mut wire = HashMap::new();
    if let Some(Value::Array(tools)) = o.get("tools") {
        responses_tools(api, tools, &mut schemas, &mut wire, None)?;
    }

    if let Some(instr) = o.get("instructions").and_then(Value::as_str)
        && !instr.is_empty()
    {
        req.messages.push(Message::system(instr));
    }
    let mut call_ids: Vec<String> = Vec::new();
    match o.get("input") {
        Some(Value::String(s)) => req.messages.push(Message::user(s.clone())),
        Some(Value::Array(items)) => {
            parse_responses_items(api, items, &mut req, &mut schemas, &mut wire, &mut call_ids)?
        }
        _ => return Err(ApiError::bad_request(api, "missing input")),
    }
    if tools_on {
        req.tools = schemas;
        req.wire_tools = wire;
    }
    req.temperature = float(o.get("temperature"));
    req.top_p = float(o.get("top_p"));
    req.max_tokens = o
        .get("max_output_tokens")
        .and_then(clamp_int)
        .or_else(|| o.get("max_tokens").and_then(clamp_int));
    req.stream = bool_of(o.get("stream")).unwrap_or(false);
    req.include_usage = true;
    if let Some(r) = o.get("reasoning").and_then(Value::as_object) {
        req.think = effort(api, r.get("effort"))?;
        req.reasoning_summary = matches!(
            r.get("summary").and_then(Value::as_str),
            Some("auto" | "concise" | "detailed")
        );
    }
    Ok(req)
}

fn parse_responses_items(
    api: Api,
    items: &[Value],
    req: &mut GenRequest,
    schemas: &mut ToolSchemas,
    wire: &mut HashMap<String, WireTool>,
    call_ids: &mut Vec<String>,
) -> Result<(), ApiError> {
    let mut reasoning: Option<String> = None;
    // Whether the last message pushed is an assistant turn that a tool call may join.
    let mut assistant_open = false;
    for item in items {
        let Some(it) = item.as_object() else {
            return Err(ApiError::invalid_json(api));
        };
        if let Some(st) = it.get("status")
            && !st.is_null()
            && st.as_str() != Some("completed")
        {
            return Err(ApiError::bad_request(
                api,
                format!("input item status {st} is not supported"),
            ));
        }
        let ty = it.get("type").and_then(Value::as_str).unwrap_or("message");
        let push_call = |req: &mut GenRequest,
                         reasoning: &mut Option<String>,
                         assistant_open: &mut bool,
                         call: ToolCall| {
            if !*assistant_open || reasoning.is_some() {
                let mut m = Message::assistant("");
                m.reasoning = reasoning.take();
                req.messages.push(m);
            }
            if let Some(m) = req.messages.last_mut() {
                m.tool_calls.push(call);
            }
            *assistant_open = true;
        };
        match ty {
            "message" => {
                let role = match it.get("role").and_then(Value::as_str) {
                    Some("user") | None => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some("system") => Role::System,
                    Some("developer") => Role::Developer,
                    Some(r) => {
                        return Err(ApiError::bad_request(
                            api,
                            format!("unknown message role '{r}'"),
                        ));
                    }
                };
                let content = responses_content(api, it.get("content"))?;
                let mut m = Message::new(role.clone(), content);
                if role == Role::Assistant {
                    m.reasoning = reasoning.take();
                    assistant_open = true;
                } else {
                    assistant_open = false;
                }
                req.messages.push(m);
            }
            "reasoning" => {
                let mut text = String::new();
                for key in ["summary", "content"] {
                    if let Some(Value::Array(parts)) = it.get(key) {
                        for p in parts {
                            if let Some(t) = p.get("text").and_then(Value::as_str) {
                                text.push_str(t);
                            }
                        }
                    }
                }
                reasoning.get_or_insert_with(String::new).push_str(&text);
            }
            "function_call" | "custom_tool_call" => {
                let id = string(it.get("call_id"))
                    .or_else(|| string(it.get("id")))
                    .unwrap_or_default();
                let name = it.get("name").and_then(Value::as_str).unwrap_or("");
                let name = match it.get("namespace").and_then(Value::as_str) {
                    Some(ns) if ty == "function_call" => format!("{ns}{name}"),
                    _ => name.to_string(),
                };
                let args = if ty == "function_call" {
                    it.get("arguments")
                        .map(args_text)
                        .unwrap_or_else(|| "{}".into())
                } else {
                    json!({"input": output_text(it.get("input"))}).to_string()
                };
                call_ids.push(id.clone());
                push_call(
                    req,
                    &mut reasoning,
                    &mut assistant_open,
                    ToolCall::new(name, args).with_id(id),
                );
            }
            "local_shell_call"
            | "web_search_call"
            | "tool_search_call"
            | "image_generation_call" => {
                let id = string(it.get("call_id"))
                    .or_else(|| string(it.get("id")))
                    .unwrap_or_default();
                let name = match ty {
                    "local_shell_call" => "local_shell",
                    "tool_search_call" => "tool_search",
                    other => other,
                };
                let args = it
                    .get("action")
                    .or_else(|| it.get("arguments"))
                    .or_else(|| it.get("input"))
                    .map(args_text)
                    .unwrap_or_else(|| "{}".into());
                call_ids.push(id.clone());
                push_call(
                    req,
                    &mut reasoning,
                    &mut assistant_open,
                    ToolCall::new(name, args).with_id(id),
                );
            }
            "function_call_output"
            | "custom_tool_call_output"
            | "local_shell_call_output"
            | "web_search_call_output"
            | "tool_search_output"
            | "tool_search_call_output"
            | "image_generation_call_output" => {
                let id = string(it.get("call_id")).unwrap_or_default();
                if !call_ids.contains(&id) {
                    return Err(ApiError::bad_request(
                        api,
                        format!(
                            "Responses continuation state is not available for call_id {id}; retry by replaying the full input history"
                        ),
                    ));
                }
                if ty == "tool_search_output"
                    && let Some(t) = it.get("tools")
                {
                    let Value::Array(tools) = t else {
                        return Err(ApiError::bad_request(
                            api,
                            "tool_search_output.tools must be an array",
                        ));
                    };
                    responses_tools(api, tools, schemas, wire, None)?;
                }
                let out = output_text(it.get("output"));
                req.messages.push(Message::tool(out).with_tool_call_id(id));
                assistant_open = false;
            }
            "compaction" | "context_compaction" => {}
            other => {
                return Err(ApiError::bad_request(
                    api,
                    format!("unsupported input item type '{other}'"),
                ));
            }
        }
    }
    if let Some(r) = reasoning {
        req.messages.push(Message::assistant("").with_reasoning(r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_is_lenient_and_strict_where_ds4_is() {
        let r = parse_chat(
            br#"{"model":"m","messages":[{"role":"system","content":"s"},{"content":[{"type":"text","text":"a"},{"type":"image_url"},"b"]}],
            "max_completion_tokens": 7.9, "unknown": {"x": 1}, "stop": ["", "X"], "seed": -3,
            "stream": true, "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
        assert_eq!(r.messages[1].content, "ab");
        assert_eq!(r.messages[1].role, Role::User);
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.stop, vec!["X".to_string()]);
        assert_eq!(r.seed, None);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.think, None);
        assert_eq!(r.think_mode(32768), ThinkMode::High);

        let e = parse_chat(br#"{"messages":[{"role":"wizard","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert_eq!(
            parse_chat(b"{nope").unwrap_err().message,
            "invalid JSON request"
        );
        assert_eq!(parse_chat(b"{}").unwrap_err().message, "missing messages");
        let e = parse_chat(br#"{"messages":[],"reasoning_effort":"huge"}"#).unwrap_err();
        assert_eq!(e.message, "invalid JSON request");
    }

    #[test]
    fn thinking_controls() {
        let t = |b: &str| parse_chat(b.as_bytes()).unwrap().think_mode(32768);
        assert_eq!(
            t(r#"{"messages":[{"content":"x"}],"reasoning_effort":"none"}"#),
            ThinkMode::None
        );
        assert_eq!(
            t(r#"{"messages":[{"content":"x"}],"think":false}"#),
            ThinkMode::None
        );
        assert_eq!(
            t(r#"{"messages":[{"content":"x"}],"thinking":{"type":"disabled"}}"#),
            ThinkMode::None
        );
        assert_eq!(
            t(r#"{"messages":[{"content":"x"}],"model":"deepseek-chat"}"#),
            ThinkMode::None
        );
        assert_eq!(
            t(r#"{"messages":[{"content":"x"}],"model":"deepseek-chat","reasoning_effort":"low"}"#),
            ThinkMode::High
        );
        // Max only with a large context.
        assert_eq!(
            t(r#"{"messages":[{"content":"x"}],"reasoning_effort":"max"}"#),
            ThinkMode::High
        );
        let r = parse_chat(br#"{"messages":[{"content":"x"}],"reasoning_effort":"max"}"#).unwrap();
        assert_eq!(r.think_mode(393_216), ThinkMode::Max);
    }

    #[test]
    fn thinking_controls_of_every_protocol() {
        const BIG: usize = 393_216;
        let m = |b: &str, ctx| parse_messages(b.as_bytes()).unwrap().think_mode(ctx);
        let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
        assert_eq!(m(&format!("{{{msgs}}}"), 32768), ThinkMode::High);
        assert_eq!(
            m(
                &format!(r#"{{{msgs},"thinking":{{"type":"disabled"}}}}"#),
                32768
            ),
            ThinkMode::None
        );
        assert_eq!(
            m(
                &format!(r#"{{{msgs},"thinking":{{"type":"adaptive"}}}}"#),
                32768
            ),
            ThinkMode::High
        );
        // output_config.effort wins over reasoning_effort; disabled wins over any effort.
        let both =
            format!(r#"{{{msgs},"reasoning_effort":"none","output_config":{{"effort":"max"}}}}"#);
        assert_eq!(m(&both, BIG), ThinkMode::Max);
        assert_eq!(m(&both, BIG - 1), ThinkMode::High);
        assert_eq!(
            m(
                &format!(r#"{{{msgs},"thinking":{{"type":"disabled"}},"reasoning_effort":"max"}}"#),
                BIG
            ),
            ThinkMode::None
        );
        // The alias applies only without an explicit control.
        assert_eq!(
            m(&format!(r#"{{{msgs},"model":"deepseek-chat"}}"#), BIG),
            ThinkMode::None
        );
        assert_eq!(
            m(
                &format!(r#"{{{msgs},"model":"deepseek-chat","thinking":{{"type":"enabled"}}}}"#),
                BIG
            ),
            ThinkMode::High
        );
        assert_eq!(
            m(&format!(r#"{{{msgs},"model":"deepseek-reasoner"}}"#), BIG),
            ThinkMode::High
        );
        assert!(
            parse_messages(format!(r#"{{{msgs},"output_config":{{"effort":"loud"}}}}"#).as_bytes())
                .is_err()
        );

        let r = |b: &str, ctx| parse_responses(b.as_bytes()).unwrap().think_mode(ctx);
        assert_eq!(r(r#"{"input":"x"}"#, BIG), ThinkMode::High);
        assert_eq!(
            r(r#"{"input":"x","reasoning":{"effort":"none"}}"#, BIG),
            ThinkMode::None
        );
        assert_eq!(
            r(r#"{"input":"x","reasoning":{"effort":"max"}}"#, BIG),
            ThinkMode::Max
        );
        assert_eq!(
            r(r#"{"input":"x","reasoning":{"effort":"max"}}"#, 8192),
            ThinkMode::High
        );
        assert_eq!(
            r(
                r#"{"input":"x","model":"deepseek-chat","reasoning":{"effort":"minimal"}}"#,
                BIG
            ),
            ThinkMode::High
        );
        assert_eq!(
            r(r#"{"input":"x","model":"deepseek-chat"}"#, BIG),
            ThinkMode::None
        );

        let c = |b: &str| parse_completions(b.as_bytes()).unwrap().think_mode(BIG);
        assert_eq!(c(r#"{"prompt":"x"}"#), ThinkMode::High);
        assert_eq!(c(r#"{"prompt":"x","think":false}"#), ThinkMode::None);
        assert_eq!(c(r#"{"prompt":"x","thinking":false}"#), ThinkMode::None);
        assert_eq!(
            c(r#"{"prompt":"x","reasoning_effort":"max"}"#),
            ThinkMode::Max
        );
        // `thinking` wins over `think` when both are sent; null effort changes nothing.
        assert_eq!(
            c(
                r#"{"prompt":"x","thinking":{"type":"enabled"},"think":false,"reasoning_effort":null}"#
            ),
            ThinkMode::High
        );
    }

    #[test]
    fn chat_tools_keep_raw_bytes_and_tool_choice_none_disables() {
        let body = br#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","description":"caf\u00e9"}}]}"#;
        let r = parse_chat(body).unwrap();
        assert_eq!(
            r.tools.as_str(),
            r#"{"name":"f","description":"caf\u00e9"}"#
        );
        let body = br#"{"messages":[{"content":"x"}],"tool_choice":"none","tools":[{"type":"function","function":{"name":"f"}}]}"#;
        assert!(parse_chat(body).unwrap().tools.is_empty());
    }

    #[test]
    fn anthropic_blocks() {
        let body = br#"{"model":"claude","max_tokens":10,"system":[{"type":"text","text":"x-anthropic-billing"},{"type":"text","text":"sys"}],
        "messages":[{"content":"hi","role":"user"},
        {"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"s"},{"type":"text","text":"ok"},{"type":"tool_use","id":"toolu_1","name":"read","input":{"p":"a"}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"data"}]},{"type":"text","text":"more"}]}],
        "thinking":{"type":"enabled","budget_tokens":100}, "stop_sequences":["END"]}"#;
        let r = parse_messages(body).unwrap();
        assert_eq!(r.messages[0], Message::system("sys"));
        assert_eq!(r.messages[2].reasoning.as_deref(), Some("hmm"));
        assert_eq!(r.messages[2].tool_calls[0].arguments, r#"{"p":"a"}"#);
        assert_eq!(r.messages[3].role, Role::Tool);
        assert_eq!(r.messages[3].content, "data");
        assert_eq!(r.messages[4], Message::user("more"));
        assert_eq!(r.think, Some(ThinkMode::High));
        assert_eq!(r.stop, vec!["END".to_string()]);
        let bad = br#"{"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_x","content":"d"}]}]}"#;
        assert!(parse_messages(bad).unwrap_err().message.contains("toolu_x"));
    }

    #[test]
    fn responses_items() {
        let body = br#"{"model":"gpt-5-codex","instructions":"be brief","input":[
            {"type":"message","role":"user","content":[{"type":"input_text","text":"list files"}]},
            {"type":"reasoning","summary":[{"type":"summary_text","text":"think"}]},
            {"type":"function_call","call_id":"call_1","name":"shell","arguments":"{\"cmd\":\"ls\"}"},
            {"type":"function_call_output","call_id":"call_1","output":"a.txt"}],
            "tools":[{"type":"function","name":"shell","parameters":{"type":"object"}},
                     {"type":"namespace","name":"mcp__x__","tools":[{"type":"function","name":"get"}]},
                     {"type":"web_search"}],
            "reasoning":{"effort":"high","summary":"auto"},"stream":true}"#;
        let r = parse_responses(body).unwrap();
        assert_eq!(r.messages[0], Message::system("be brief"));
        assert_eq!(r.messages[2].reasoning.as_deref(), Some("think"));
        assert_eq!(r.messages[2].tool_calls[0].id.as_deref(), Some("call_1"));
        assert_eq!(r.messages[3].role, Role::Tool);
        assert!(r.reasoning_summary);
        assert_eq!(
            r.wire_tools["mcp__x__get"].namespace.as_deref(),
            Some("mcp__x__")
        );
        assert_eq!(r.tools.as_str().lines().count(), 2);

        let e = |b: &str| parse_responses(b.as_bytes()).unwrap_err().message;
        assert!(e(r#"{"input":"x","previous_response_id":"r"}"#).contains("previous_response_id"));
        assert_eq!(
            e(r#"{"input":"x","tool_choice":"required"}"#),
            "tool_choice=required not supported"
        );
        assert!(e(r#"{"input":[{"type":"item_reference","id":"x"}]}"#).contains("item_reference"));
        assert!(
            e(r#"{"input":[{"role":"user","content":[{"type":"input_image"}]}]}"#)
                .contains("input_image")
        );
        assert!(
            e(r#"{"input":[{"type":"function_call_output","call_id":"call_9","output":"x"}]}"#)
                .contains("call_9")
        );
        assert!(
            e(r#"{"input":[{"role":"user","content":"x","status":"in_progress"}]}"#)
                .contains("status")
        );
        assert_eq!(e(r#"{}"#), "missing input");
    }
}
