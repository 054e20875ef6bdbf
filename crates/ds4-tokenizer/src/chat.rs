//! Prompt rendering exactly as ds4 does it: the server's `render_chat_prompt_text` (and the live
//! tool-result tail `render_live_tool_tail`), the `/v1/completions` form, the CLI single prompt
//! (`encode_chat_prompt`) and the REPL/agent transcript form (`ds4_chat_append_message`).
//!
//! The rendered text is what the model is prompted with and what ds4's disk KV cache keys on, so
//! every byte matters; the strings below are copied from ds4.

use crate::dsml;
use crate::error::Result;
use crate::json;
use crate::tokenizer::{
    ASSISTANT_TEXT, BOS_TEXT, EOS_TEXT, THINK_END_TEXT, THINK_START_TEXT, Tokenizer, USER_TEXT,
};

/// ds4 `DS4_REASONING_EFFORT_MAX_PREFIX`, inserted right after BOS in Think Max mode.
pub const THINK_MAX_PREFIX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// The CLI's default system prompt (`-sys`), also used by `/v1/completions`.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant";

/// Text before the tool schemas in the tools block (`append_tools_prompt_text`).
pub const TOOLS_PROMPT_HEADER: &str = "## Tools\n\n\
You have access to a set of tools to help answer the user question. \
You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n\
<｜DSML｜tool_calls>\n\
<｜DSML｜invoke name=\"$TOOL_NAME\">\n\
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n\
...\n\
</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"$TOOL_NAME2\">\n\
...\n\
</｜DSML｜invoke>\n\
</｜DSML｜tool_calls>\n\n\
String parameters should be specified as raw text and set `string=\"true\"`. \
Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string characters with XML or HTML entity escapes. \
Only if a string value itself contains the exact closing parameter tag `</｜DSML｜parameter>`, write that tag as `&lt;/｜DSML｜parameter>` inside the value. \
For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n\
If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n\
Otherwise, output directly after </think> with tool calls or final response.\n\n\
### Available Tool Schemas\n\n";

/// Text after the tool schemas in the tools block.
pub const TOOLS_PROMPT_FOOTER: &str = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls. \
Use the exact parameter names from the schemas.";

/// ds4 think modes (`ds4_think_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ThinkMode {
    /// Thinking off: the assistant prefix ends with `</think>`.
    None,
    /// Thinking on: the assistant prefix ends with `<think>`.
    #[default]
    High,
    /// Thinking on, with [`THINK_MAX_PREFIX`] after BOS.
    Max,
}

impl ThinkMode {
    /// `DS4_THINK_MAX_MIN_CONTEXT`: Max needs at least this context, else it becomes High.
    pub const MAX_MIN_CONTEXT: usize = 393_216;

    /// ds4 `ds4_think_mode_for_context`: Max is downgraded to High when `ctx` < 393216.
    pub fn for_context(self, ctx: usize) -> ThinkMode {
        if self == ThinkMode::Max && ctx < Self::MAX_MIN_CONTEXT {
            ThinkMode::High
        } else {
            self
        }
    }

    /// Whether the model thinks (High or Max).
    pub fn enabled(self) -> bool {
        self != ThinkMode::None
    }

    /// `none`, `high` or `max`.
    pub fn name(self) -> &'static str {
        match self {
            ThinkMode::None => "none",
            ThinkMode::High => "high",
            ThinkMode::Max => "max",
        }
    }

    /// ds4 `parse_reasoning_effort_name`: `max` → Max; `xhigh`, `high`, `medium`, `low`,
    /// `minimal` → High; `none` → None; anything else → `Option::None` (invalid).
    pub fn from_reasoning_effort(s: &str) -> Option<ThinkMode> {
        match s {
            "max" => Some(ThinkMode::Max),
            "xhigh" | "high" | "medium" | "low" | "minimal" => Some(ThinkMode::High),
            "none" => Some(ThinkMode::None),
            _ => None,
        }
    }

    /// The tag that ends an assistant prefix: `<think>` or `</think>`.
    pub fn assistant_tag(self) -> &'static str {
        if self.enabled() {
            THINK_START_TEXT
        } else {
            THINK_END_TEXT
        }
    }
}

/// A chat message role. Unknown roles are kept and ignored by the renderers, as in ds4.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
    Other(String),
}

impl Role {
    /// Role from its wire name.
    pub fn parse(s: &str) -> Role {
        match s {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            "function" => Role::Function,
            other => Role::Other(other.to_string()),
        }
    }

    /// Wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function => "function",
            Role::Other(s) => s,
        }
    }

    /// `system` or `developer`.
    pub fn is_system(&self) -> bool {
        matches!(self, Role::System | Role::Developer)
    }

    /// `tool` or `function`.
    pub fn is_tool_result(&self) -> bool {
        matches!(self, Role::Tool | Role::Function)
    }

    /// `user`, `tool` or `function` (ds4 `role_is_user_like`).
    pub fn is_user_like(&self) -> bool {
        matches!(self, Role::User) || self.is_tool_result()
    }
}

/// A tool call of an assistant message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolCall {
    /// Client-visible id (`call_…`, `toolu_…`), if any.
    pub id: Option<String>,
    pub name: String,
    /// The arguments as raw JSON text, as the client sent it (normally an object). Kept as text
    /// so that rendering is byte-exact (escapes and member order as sent); non-object text is
    /// rendered as a single `arguments` string parameter.
    pub arguments: String,
}

impl ToolCall {
    /// A call with raw JSON argument text.
    pub fn new(name: impl Into<String>, arguments: impl Into<String>) -> ToolCall {
        ToolCall {
            id: None,
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    /// A call whose arguments are serialized compactly from a JSON value (member order kept).
    pub fn from_value(name: impl Into<String>, arguments: &serde_json::Value) -> ToolCall {
        ToolCall::new(name, arguments.to_string())
    }

    /// Set the id.
    pub fn with_id(mut self, id: impl Into<String>) -> ToolCall {
        self.id = Some(id.into());
        self
    }

    /// The arguments parsed as JSON, if they are valid JSON.
    pub fn arguments_value(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.arguments).ok()
    }
}

/// One chat message as ds4 models it (`chat_msg`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Assistant reasoning (`reasoning_content` / Anthropic thinking).
    pub reasoning: Option<String>,
    /// Assistant tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// For tool results: the call id answered.
    pub tool_call_id: Option<String>,
    /// Exact sampled DSML block to replay instead of the canonical rendering of `tool_calls`
    /// (ds4's tool-id → DSML replay map). Rendered verbatim when present and non-empty.
    pub raw_dsml: Option<String>,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            reasoning: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            raw_dsml: None,
        }
    }

    pub fn system(content: impl Into<String>) -> Message {
        Message::new(Role::System, content)
    }

    pub fn developer(content: impl Into<String>) -> Message {
        Message::new(Role::Developer, content)
    }

    pub fn user(content: impl Into<String>) -> Message {
        Message::new(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new(Role::Assistant, content)
    }

    /// A tool result.
    pub fn tool(content: impl Into<String>) -> Message {
        Message::new(Role::Tool, content)
    }

    pub fn with_reasoning(mut self, reasoning: impl Into<String>) -> Message {
        self.reasoning = Some(reasoning.into());
        self
    }

    pub fn with_tool_calls(mut self, calls: Vec<ToolCall>) -> Message {
        self.tool_calls = calls;
        self
    }

    pub fn with_tool_call_id(mut self, id: impl Into<String>) -> Message {
        self.tool_call_id = Some(id.into());
        self
    }

    pub fn with_raw_dsml(mut self, raw: impl Into<String>) -> Message {
        self.raw_dsml = Some(raw.into());
        self
    }
}

/// The tool schemas of a request, as the text ds4 puts under `### Available Tool Schemas`: one
/// JSON function schema per line. OpenAI tools (`{"type":"function","function":{…}}`) are
/// unwrapped to their `function` object; other objects (e.g. Anthropic `{"name":…,
/// "input_schema":…}`) are used as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolSchemas {
    text: String,
}

impl ToolSchemas {
    /// No tools.
    pub fn new() -> ToolSchemas {
        ToolSchemas::default()
    }

    /// From parsed tool definitions, each serialized compactly (member order kept). Byte-exact
    /// with ds4 when the client sent compact JSON; use [`ToolSchemas::from_raw_array`] to keep
    /// the client's exact bytes.
    pub fn from_values(tools: &[serde_json::Value]) -> ToolSchemas {
        let mut s = ToolSchemas::new();
        for t in tools {
            s.push_value(t);
        }
        s
    }

    /// Add one parsed tool definition.
    pub fn push_value(&mut self, tool: &serde_json::Value) {
        let schema = match tool.get("function") {
            Some(f) => f.to_string(),
            None => tool.to_string(),
        };
        self.push_line(&schema);
    }

    /// Add one tool definition from its raw JSON text, as ds4 does (`parse_tools_value`): the raw
    /// text of its `function` member if it has one, else the whole raw value. Returns false (and
    /// adds nothing) if `raw` is not a JSON value.
    pub fn push_raw(&mut self, raw: &str) -> bool {
        let mut c = json::Cursor::new(raw);
        let Some(value) = c.raw_value() else {
            return false;
        };
        let schema = openai_function_raw(value).unwrap_or(value);
        self.push_line(schema);
        true
    }

    /// From the raw JSON text of a request's `tools` member (an array, or `null`), keeping the
    /// client's bytes exactly as ds4 does. `None` if the text is not an array of JSON values.
    pub fn from_raw_array(raw: &str) -> Option<ToolSchemas> {
        let mut c = json::Cursor::new(raw);
        c.ws();
        let mut s = ToolSchemas::new();
        if c.s[c.p..].starts_with("null") {
            return Some(s);
        }
        if !c.eat(b'[') {
            return None;
        }
        c.ws();
        while let Some(b) = c.peek() {
            if b == b']' {
                break;
            }
            let v = c.raw_value()?;
            s.push_raw(v);
            c.ws();
            c.eat(b',');
            c.ws();
        }
        if c.peek() != Some(b']') {
            return None;
        }
        Some(s)
    }

    fn push_line(&mut self, json: &str) {
        if json.is_empty() {
            return;
        }
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(json);
    }

    /// Whether there are no tools (no tools block is rendered).
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The schema lines.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

fn openai_function_raw(raw: &str) -> Option<&str> {
    let mut c = json::Cursor::new(raw);
    c.ws();
    if !c.eat(b'{') {
        return None;
    }
    c.ws();
    while let Some(b) = c.peek() {
        if b == b'}' {
            break;
        }
        let key = c.string()?;
        c.ws();
        if !c.eat(b':') {
            return None;
        }
        if key == "function" {
            return c.raw_value();
        }
        if !c.skip_value() {
            return None;
        }
        c.ws();
        c.eat(b',');
        c.ws();
    }
    None
}

/// The tools block (`append_tools_prompt_text`); empty when there are no tools.
pub fn render_tools_block(tools: &ToolSchemas) -> String {
    if tools.is_empty() {
        return String::new();
    }
    let mut s = String::with_capacity(
        TOOLS_PROMPT_HEADER.len() + tools.as_str().len() + TOOLS_PROMPT_FOOTER.len(),
    );
    s.push_str(TOOLS_PROMPT_HEADER);
    s.push_str(tools.as_str());
    s.push_str(TOOLS_PROMPT_FOOTER);
    s
}

/// Tool result text escaping (`append_tool_result_text`): only the exact `</tool_result>` is
/// changed, to `&lt;/tool_result>`.
pub fn escape_tool_result(s: &str) -> String {
    s.replace("</tool_result>", "&lt;/tool_result>")
}

/// Join Anthropic `system` parts the way ds4 does (`append_anthropic_system_part`): empty parts
/// and parts starting with `x-anthropic-` are skipped; a `\n` separates parts unless the text so
/// far already ends with one. The result becomes a leading system message.
pub fn join_anthropic_system<S: AsRef<str>>(parts: &[S]) -> String {
    let mut out = String::new();
    for p in parts {
        let p = p.as_ref();
        if p.is_empty() || p.starts_with("x-anthropic-") {
            continue;
        }
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(p);
    }
    out
}

/// ds4 `chat_history_uses_tool_context`: tools declared, or an assistant message with tool calls,
/// or a tool/function message.
pub fn uses_tool_context(messages: &[Message], tools: &ToolSchemas) -> bool {
    !tools.is_empty()
        || messages.iter().any(|m| {
            (m.role == Role::Assistant && !m.tool_calls.is_empty()) || m.role.is_tool_result()
        })
}

fn push_assistant_tool_calls(out: &mut String, m: &Message) {
    match &m.raw_dsml {
        Some(raw) if !raw.is_empty() => out.push_str(raw),
        _ => out.push_str(&dsml::render_tool_calls(&m.tool_calls)),
    }
}

/// Render a chat request as ds4's server does (`render_chat_prompt_text`):
///
/// ```text
/// <｜begin▁of▁sentence｜> [THINK_MAX_PREFIX]
/// [tools block] ["\n\n"] system/developer contents joined by "\n\n"
/// user:      <｜User｜>content
/// tool:      [<｜User｜> unless the previous message was a tool result]<tool_result>escaped</tool_result>
/// assistant: [<｜Assistant｜> + (<think>reasoning</think> | </think>) if a user/tool message is pending]
///            content + DSML tool calls + <｜end▁of▁sentence｜>
/// end:       <｜Assistant｜><think> | <｜Assistant｜></think>   if a user/tool message is pending
/// ```
///
/// In thinking mode an assistant turn keeps its reasoning only when the conversation has tool
/// context or the turn comes after the last user/tool message; other roles are ignored. `think`
/// is the effective mode (apply [`ThinkMode::for_context`] first).
pub fn render_chat(messages: &[Message], tools: &ToolSchemas, think: ThinkMode) -> String {
    let thinking = think.enabled();
    let tool_context = uses_tool_context(messages, tools);
    let mut system = render_tools_block(tools);
    for m in messages.iter().filter(|m| m.role.is_system()) {
        if !system.is_empty() {
            system.push_str("\n\n");
        }
        system.push_str(&m.content);
    }
    let last_user_idx = messages.iter().rposition(|m| m.role.is_user_like());

    let mut out = String::new();
    out.push_str(BOS_TEXT);
    if think == ThinkMode::Max {
        out.push_str(THINK_MAX_PREFIX);
    }
    out.push_str(&system);
    let keep = |i: usize| tool_context || last_user_idx.is_none_or(|l| i > l);
    render_turns(&mut out, messages.iter().enumerate(), thinking, keep, think);
    out
}

/// The message turns shared by [`render_chat`] and [`render_chat_tail`]: user / tool-result /
/// assistant turns (system messages and other roles skipped), then the assistant prefix if a
/// user/tool message is pending. An assistant turn keeps its reasoning when `thinking` and
/// `keep(index)`.
fn render_turns<'a>(
    out: &mut String,
    messages: impl Iterator<Item = (usize, &'a Message)>,
    thinking: bool,
    keep: impl Fn(usize) -> bool,
    think: ThinkMode,
) {
    let mut pending_assistant = false;
    let mut pending_tool_result = false;
    for (i, m) in messages {
        match &m.role {
            r if r.is_system() => {}
            Role::User => {
                out.push_str(USER_TEXT);
                out.push_str(&m.content);
                pending_assistant = true;
                pending_tool_result = false;
            }
            r if r.is_tool_result() => {
                if !pending_tool_result {
                    out.push_str(USER_TEXT);
                }
                out.push_str("<tool_result>");
                out.push_str(&escape_tool_result(&m.content));
                out.push_str("</tool_result>");
                pending_assistant = true;
                pending_tool_result = true;
            }
            Role::Assistant => {
                if pending_assistant {
                    out.push_str(ASSISTANT_TEXT);
                    if thinking && keep(i) {
                        out.push_str(THINK_START_TEXT);
                        out.push_str(m.reasoning.as_deref().unwrap_or(""));
                        out.push_str(THINK_END_TEXT);
                    } else {
                        out.push_str(THINK_END_TEXT);
                    }
                }
                out.push_str(&m.content);
                push_assistant_tool_calls(out, m);
                out.push_str(EOS_TEXT);
                pending_assistant = false;
                pending_tool_result = false;
            }
            _ => {}
        }
    }
    if pending_assistant {
        out.push_str(ASSISTANT_TEXT);
        out.push_str(think.assistant_tag());
    }
}

/// The suffix ds4 appends to a live session for a tool-result continuation
/// (`render_live_tool_tail`): `<｜end▁of▁sentence｜>`, then `messages[start..]` rendered like
/// [`render_chat`] (system messages skipped, reasoning always kept in thinking mode), then the
/// next assistant prefix if a user/tool message is pending.
pub fn render_chat_tail(messages: &[Message], start: usize, think: ThinkMode) -> String {
    let thinking = think.enabled();
    let mut out = String::from(EOS_TEXT);
    render_turns(
        &mut out,
        messages.iter().enumerate().skip(start),
        thinking,
        |_| true,
        think,
    );
    out
}

/// The `/v1/completions` prompt: `BOS [MAXPREFIX] "You are a helpful assistant<｜User｜>" prompt
/// "<｜Assistant｜>" (<think> | </think>)`.
pub fn render_completion_prompt(prompt: &str, think: ThinkMode) -> String {
    let mut out = String::from(BOS_TEXT);
    if think == ThinkMode::Max {
        out.push_str(THINK_MAX_PREFIX);
    }
    out.push_str(DEFAULT_SYSTEM_PROMPT);
    out.push_str(USER_TEXT);
    out.push_str(prompt);
    out.push_str(ASSISTANT_TEXT);
    out.push_str(think.assistant_tag());
    out
}

/// The CLI single-prompt form as text: `BOS [MAXPREFIX] system <｜User｜>prompt<｜Assistant｜>
/// (<think>|</think>)`. A prompt that starts with `<｜begin▁of▁sentence｜>` is an already-rendered
/// transcript and is returned unchanged.
pub fn render_cli_prompt(system: &str, prompt: &str, think: ThinkMode) -> String {
    if prompt.starts_with(BOS_TEXT) {
        return prompt.to_string();
    }
    let mut out = String::from(BOS_TEXT);
    if think == ThinkMode::Max {
        out.push_str(THINK_MAX_PREFIX);
    }
    out.push_str(system);
    out.push_str(USER_TEXT);
    out.push_str(prompt);
    out.push_str(ASSISTANT_TEXT);
    out.push_str(think.assistant_tag());
    out
}

/// The CLI single prompt as ids, built piecewise the way ds4's `encode_chat_prompt` does (each
/// text piece BPE-tokenized on its own with no special-token recognition, specials pushed as
/// ids). A prompt starting with `<｜begin▁of▁sentence｜>` is tokenized as rendered chat text with
/// the seven ds4 specials recognised ([`Tokenizer::encode_ds4_chat`]).
pub fn encode_cli_prompt(
    tok: &Tokenizer,
    system: &str,
    prompt: &str,
    think: ThinkMode,
) -> Result<Vec<u32>> {
    if prompt.starts_with(BOS_TEXT) {
        return tok.encode_ds4_chat(prompt);
    }
    let sp = tok.specials();
    let mut ids = vec![sp.bos];
    if think == ThinkMode::Max {
        ids.extend(tok.encode_plain(THINK_MAX_PREFIX)?);
    }
    ids.extend(tok.encode_plain(system)?);
    ids.push(sp.user);
    ids.extend(tok.encode_plain(prompt)?);
    ids.push(sp.assistant);
    ids.push(if think.enabled() {
        sp.think_start
    } else {
        sp.think_end
    });
    Ok(ids)
}

/// REPL/agent transcripts (`ds4_chat_begin`): a transcript starts with BOS.
pub fn chat_begin(tok: &Tokenizer) -> Vec<u32> {
    vec![tok.specials().bos]
}

/// `ds4_chat_append_max_effort_prefix`: append the Think Max prefix text.
pub fn chat_append_max_prefix(tok: &Tokenizer, ids: &mut Vec<u32>) -> Result<()> {
    ids.extend(tok.encode_plain(THINK_MAX_PREFIX)?);
    Ok(())
}

/// `ds4_chat_append_message`: system/developer → the text; assistant → `<｜Assistant｜>`, then
/// `</think>` unless the content starts with `<think>` or `</think>`, then the text; any other
/// role → `<｜User｜>`, then `Tool: ` for tool/function, then the text. Text is BPE-tokenized with
/// no special-token recognition.
pub fn chat_append_message(
    tok: &Tokenizer,
    ids: &mut Vec<u32>,
    role: &Role,
    content: &str,
) -> Result<()> {
    let sp = tok.specials();
    match role {
        r if r.is_system() => {}
        Role::Assistant => {
            ids.push(sp.assistant);
            if !content.starts_with(THINK_START_TEXT) && !content.starts_with(THINK_END_TEXT) {
                ids.push(sp.think_end);
            }
        }
        r => {
            ids.push(sp.user);
            if r.is_tool_result() {
                ids.extend(tok.encode_plain("Tool: ")?);
            }
        }
    }
    ids.extend(tok.encode_plain(content)?);
    Ok(())
}

/// `ds4_chat_append_assistant_prefix`: `<｜Assistant｜>` then `<think>` or `</think>`.
pub fn chat_append_assistant_prefix(tok: &Tokenizer, ids: &mut Vec<u32>, think: ThinkMode) {
    let sp = tok.specials();
    ids.push(sp.assistant);
    ids.push(if think.enabled() {
        sp.think_start
    } else {
        sp.think_end
    });
}

/// The text [`chat_append_message`] appends (for logs and tests).
pub fn chat_message_text(role: &Role, content: &str) -> String {
    let mut out = String::new();
    match role {
        r if r.is_system() => {}
        Role::Assistant => {
            out.push_str(ASSISTANT_TEXT);
            if !content.starts_with(THINK_START_TEXT) && !content.starts_with(THINK_END_TEXT) {
                out.push_str(THINK_END_TEXT);
            }
        }
        r => {
            out.push_str(USER_TEXT);
            if r.is_tool_result() {
                out.push_str("Tool: ");
            }
        }
    }
    out.push_str(content);
    out
}
