//! DSML tool calls: canonical rendering of client tool calls (`append_dsml_tool_calls_text`) and
//! parsing of generated text (`parse_generated_message_ex`), as ds4's server does them.
//!
//! Generated DSML may use three syntaxes: the full one (`<｜DSML｜tool_calls>`,
//! `<｜DSML｜invoke name="…">`, `<｜DSML｜parameter name="…" string="true|false">…`), a short one
//! with the first bar omitted (`<DSML｜…>`) and plain XML (`<tool_calls>`, `<invoke …>`,
//! `<parameter …>`).
//!
//! Parsed arguments are returned as a compact JSON object text, `{"k":"v","n":1}` (what ds4 sends
//! to clients): `string="true"` values (and values without a `string` attribute) are
//! entity-unescaped (`&amp; &lt; &gt; &quot; &apos;`) and become JSON strings; other values are
//! minified JSON (`null` when empty). A non-string value that is not one valid JSON value becomes
//! a JSON string of the raw text (ds4 would paste the invalid text into the object). A parameter
//! without a `string` attribute whose body is made of nested `<parameter>` elements becomes a JSON
//! object of those (ds4's loose-XML recovery).

use crate::chat::ToolCall;
use crate::json::{self, is_c_space};

/// Full-syntax markers.
pub const TOOL_CALLS_START: &str = "<｜DSML｜tool_calls>";
pub const TOOL_CALLS_END: &str = "</｜DSML｜tool_calls>";
pub const INVOKE_START: &str = "<｜DSML｜invoke";
pub const INVOKE_END: &str = "</｜DSML｜invoke>";
pub const PARAM_START: &str = "<｜DSML｜parameter";
pub const PARAM_END: &str = "</｜DSML｜parameter>";

/// The markers of one DSML syntax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Syntax {
    pub tool_calls_start: &'static str,
    pub tool_calls_end: &'static str,
    pub invoke_start: &'static str,
    pub invoke_end: &'static str,
    pub param_start: &'static str,
    pub param_end: &'static str,
}

/// `<｜DSML｜…>`
pub const SYNTAX_FULL: Syntax = Syntax {
    tool_calls_start: TOOL_CALLS_START,
    tool_calls_end: TOOL_CALLS_END,
    invoke_start: INVOKE_START,
    invoke_end: INVOKE_END,
    param_start: PARAM_START,
    param_end: PARAM_END,
};

/// `<DSML｜…>` (first bar omitted)
pub const SYNTAX_SHORT: Syntax = Syntax {
    tool_calls_start: "<DSML｜tool_calls>",
    tool_calls_end: "</DSML｜tool_calls>",
    invoke_start: "<DSML｜invoke",
    invoke_end: "</DSML｜invoke>",
    param_start: "<DSML｜parameter",
    param_end: "</DSML｜parameter>",
};

/// `<tool_calls>` plain XML
pub const SYNTAX_PLAIN: Syntax = Syntax {
    tool_calls_start: "<tool_calls>",
    tool_calls_end: "</tool_calls>",
    invoke_start: "<invoke",
    invoke_end: "</invoke>",
    param_start: "<parameter",
    param_end: "</parameter>",
};

/// All syntaxes, in ds4's order.
pub const SYNTAXES: [Syntax; 3] = [SYNTAX_FULL, SYNTAX_SHORT, SYNTAX_PLAIN];

// ----------------------------------------------------------------------------------------------
// Rendering.
// ----------------------------------------------------------------------------------------------

/// Attribute escaping (`append_dsml_attr_escaped`): `& < > "`.
pub fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// String parameter text (`append_dsml_parameter_text`): only an embedded
/// `</｜DSML｜parameter>` becomes `&lt;/｜DSML｜parameter>`.
pub fn escape_param_text(s: &str) -> String {
    s.replace(PARAM_END, "&lt;/｜DSML｜parameter>")
}

/// Non-string parameter text (`append_dsml_json_literal`): an embedded `</｜DSML｜parameter>`
/// gets its `<` written as `\u003c`.
pub fn escape_param_json(s: &str) -> String {
    s.replace(PARAM_END, "\\u003c/｜DSML｜parameter>")
}

fn push_param(out: &mut String, name: &str, value: &str, is_string: bool) {
    out.push_str("<｜DSML｜parameter name=\"");
    out.push_str(&escape_attr(name));
    out.push_str("\" string=\"");
    out.push_str(if is_string { "true" } else { "false" });
    out.push_str("\">");
    if is_string {
        out.push_str(&escape_param_text(value));
    } else {
        out.push_str(&escape_param_json(value));
    }
    out.push_str(PARAM_END);
    out.push('\n');
}

/// Canonical DSML for client tool calls (`append_dsml_tool_calls_text`); empty for no calls.
///
/// ```text
/// \n\n<｜DSML｜tool_calls>\n
/// <｜DSML｜invoke name="NAME">\n
/// <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>\n   one per member
/// </｜DSML｜invoke>\n
/// </｜DSML｜tool_calls>
/// ```
///
/// Members are rendered in the order of the arguments text (duplicates kept); string values raw,
/// others minified as written. Arguments that are not a JSON object become one `arguments` string
/// parameter holding the raw text.
pub fn render_tool_calls(calls: &[ToolCall]) -> String {
    if calls.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n\n<｜DSML｜tool_calls>\n");
    for c in calls {
        out.push_str("<｜DSML｜invoke name=\"");
        out.push_str(&escape_attr(&c.name));
        out.push_str("\">\n");
        match json::args_parse(&c.arguments) {
            Some(args) => {
                for a in &args {
                    push_param(&mut out, &a.key, &a.value, a.is_string);
                }
            }
            None => push_param(&mut out, "arguments", &c.arguments, true),
        }
        out.push_str("</｜DSML｜invoke>\n");
    }
    out.push_str(TOOL_CALLS_END);
    out
}

// ----------------------------------------------------------------------------------------------
// Parsing.
// ----------------------------------------------------------------------------------------------

/// Undo DSML entities (`dsml_unescape_text`): `&amp; &lt; &gt; &quot; &apos;`; any other `&` is
/// kept.
pub fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let mut matched = false;
        for (ent, ch) in ENTITIES {
            if rest.starts_with(ent) {
                out.push(ch);
                rest = &rest[ent.len()..];
                matched = true;
                break;
            }
        }
        if !matched {
            out.push('&');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

pub(crate) const ENTITIES: [(&str, char); 5] = [
    ("&amp;", '&'),
    ("&lt;", '<'),
    ("&gt;", '>'),
    ("&quot;", '"'),
    ("&apos;", '\''),
];

/// `dsml_attr`: the entity-unescaped value of attribute `name` in a tag (first `name="`
/// occurrence, up to the next `"`).
pub fn attr(tag: &str, name: &str) -> Option<String> {
    let pat = format!("{name}=\"");
    let i = tag.find(&pat)? + pat.len();
    let j = tag[i..].find('"')?;
    Some(unescape(&tag[i..i + j]))
}

pub(crate) fn skip_ws(s: &str, mut p: usize) -> usize {
    let b = s.as_bytes();
    while p < b.len() && is_c_space(b[p]) {
        p += 1;
    }
    p
}

/// How generated text is interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParseOptions {
    /// Thinking mode: the text starts inside reasoning, closed by `</think>`; DSML before the
    /// last `</think>` is not a tool call, and with no `</think>` at all nothing is.
    pub thinking: bool,
    /// Look for DSML tool calls at all (ds4 only does this live when the request has tools).
    pub tools: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            thinking: true,
            tools: true,
        }
    }
}

/// An assistant message parsed from generated text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedMessage {
    /// Text before `</think>` (a leading `<think>` stripped); `None` when there is no `</think>`.
    pub reasoning: Option<String>,
    /// Visible text (before the tool block, trailing whitespace trimmed, when there is one).
    pub content: String,
    /// Parsed calls (ids unset; arguments as compact JSON object text).
    pub tool_calls: Vec<ToolCall>,
    /// The exact tool block (from the `\n\n` before the opener, when present, to the closer),
    /// for replay.
    pub raw_dsml: Option<String>,
}

/// Result of parsing generated text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseOutcome {
    /// Parsed (with or without tool calls).
    Ok(ParsedMessage),
    /// A tool block was found but is malformed: the whole text is returned as content (ds4:
    /// "invalid tool call returned as assistant text", finish `stop`/`length`).
    Malformed(ParsedMessage),
    /// A tool block was opened but never closed (ds4 finish `error`, "unterminated tool call":
    /// partially streamed calls cannot be retracted). The whole text is returned as content.
    Unterminated(ParsedMessage),
}

impl ParseOutcome {
    /// The message, whatever the outcome.
    pub fn message(&self) -> &ParsedMessage {
        match self {
            ParseOutcome::Ok(m) | ParseOutcome::Malformed(m) | ParseOutcome::Unterminated(m) => m,
        }
    }

    /// The message, whatever the outcome.
    pub fn into_message(self) -> ParsedMessage {
        match self {
            ParseOutcome::Ok(m) | ParseOutcome::Malformed(m) | ParseOutcome::Unterminated(m) => m,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, ParseOutcome::Ok(_))
    }
}

/// `split_reasoning_content` over `text[..n]`.
fn split_reasoning(text: &str, n: usize) -> ParsedMessage {
    let s = &text[..n];
    let body = s.strip_prefix("<think>").unwrap_or(s);
    match body.find("</think>") {
        Some(i) => ParsedMessage {
            reasoning: Some(body[..i].to_string()),
            content: body[i + 8..].to_string(),
            ..Default::default()
        },
        None => ParsedMessage {
            content: s.to_string(),
            ..Default::default()
        },
    }
}

/// Find the tool block start as ds4 does: full syntax after `\n\n`, full syntax, short syntax
/// after `\n\n`, short, plain after `\n\n`, plain — the first kind found anywhere wins.
fn find_block_start(text: &str, from: usize) -> Option<(usize, Syntax)> {
    let hay = &text[from..];
    for syn in SYNTAXES {
        let with_nl = format!("\n\n{}", syn.tool_calls_start);
        if let Some(i) = hay.find(&with_nl) {
            return Some((from + i, syn));
        }
        if let Some(i) = hay.find(syn.tool_calls_start) {
            return Some((from + i, syn));
        }
    }
    None
}

/// JSON text of one parameter value (string attribute `None` or `"true"`: unescaped string).
pub(crate) fn param_json_pub(raw: &str, string_attr: Option<&str>) -> String {
    param_json(raw, string_attr)
}

/// JSON text of one parameter value.
fn param_json(raw: &str, string_attr: Option<&str>) -> String {
    if string_attr.unwrap_or("true") == "true" {
        json::escape(&unescape(raw))
    } else {
        json::json_param_value(raw)
    }
}

fn push_member(args: &mut String, name: &str, value_json: &str) {
    if !args.is_empty() {
        args.push(',');
    }
    json::escape_into_quoted(args, name);
    args.push(':');
    args.push_str(value_json);
}

/// Result of trying to parse a piece of DSML that may still be incomplete.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step<T> {
    Done(T),
    /// More text is needed to decide.
    NeedMore,
    Fail,
}

/// Parse a leaf `<parameter …>value</parameter>` at `p` (`dsml_parse_leaf_param_json`).
/// Returns the member text `"name":value` and the position after the closer.
pub(crate) fn parse_leaf(text: &str, p: usize, syn: &Syntax) -> Step<(String, String, usize)> {
    let s = &text[p..];
    if !s.starts_with(syn.param_start) {
        return Step::Fail;
    }
    let Some(te) = s.find('>') else {
        return Step::NeedMore;
    };
    let tag = &s[..=te];
    let Some(name) = attr(tag, "name") else {
        return Step::Fail;
    };
    let is_string = attr(tag, "string");
    let vs = p + te + 1;
    let Some(ve) = text[vs..].find(syn.param_end) else {
        return Step::NeedMore;
    };
    let value = param_json(&text[vs..vs + ve], is_string.as_deref());
    Step::Done((name, value, vs + ve + syn.param_end.len()))
}

/// Parse nested leaf parameters starting at `p` (`dsml_parse_nested_params_object`), then an
/// optional closer of the outer parameter. With `complete` false, returns `NeedMore` whenever
/// the text ends before it is clear that no further leaf (or closer) follows.
pub(crate) fn parse_nested(
    text: &str,
    mut p: usize,
    syn: &Syntax,
    complete: bool,
) -> Step<(String, usize)> {
    let mut members = String::new();
    let mut any = false;
    loop {
        p = skip_ws(text, p);
        let rest = &text[p..];
        if !complete && (rest.is_empty() || syn.param_start.starts_with(rest)) {
            return Step::NeedMore;
        }
        if !rest.starts_with(syn.param_start) {
            break;
        }
        match parse_leaf(text, p, syn) {
            Step::Done((name, value, np)) => {
                push_member(&mut members, &name, &value);
                p = np;
                any = true;
            }
            Step::NeedMore if !complete => return Step::NeedMore,
            _ => return Step::Fail,
        }
    }
    if !any {
        return Step::Fail;
    }
    let q = skip_ws(text, p);
    let rest = &text[q..];
    if rest.starts_with(syn.param_end) {
        p = q + syn.param_end.len();
    } else if !complete && syn.param_end.starts_with(rest) {
        return Step::NeedMore;
    } else {
        p = q;
    }
    Step::Done((format!("{{{members}}}"), p))
}

/// Parse the body of a tool block (after the opener) up to and including its closer. Returns
/// the calls and the end position.
fn parse_block(text: &str, mut p: usize, syn: &Syntax) -> Option<(Vec<ToolCall>, usize)> {
    let mut calls = Vec::new();
    loop {
        p = skip_ws(text, p);
        let rest = &text[p..];
        if rest.starts_with(syn.tool_calls_end) {
            return Some((calls, p + syn.tool_calls_end.len()));
        }
        if !rest.starts_with(syn.invoke_start) {
            return None;
        }
        let te = rest.find('>')?;
        let name = attr(&rest[..=te], "name")?;
        p += te + 1;
        let mut args = String::new();
        loop {
            p = skip_ws(text, p);
            let rest = &text[p..];
            if rest.starts_with(syn.invoke_end) {
                p += syn.invoke_end.len();
                break;
            }
            if !rest.starts_with(syn.param_start) {
                return None;
            }
            let te = rest.find('>')?;
            let tag = &rest[..=te];
            let pname = attr(tag, "name")?;
            let pstring = attr(tag, "string");
            let vs = p + te + 1;
            if pstring.is_none() && text[skip_ws(text, vs)..].starts_with(syn.param_start) {
                match parse_nested(text, vs, syn, true) {
                    Step::Done((obj, np)) => {
                        push_member(&mut args, &pname, &obj);
                        p = np;
                        continue;
                    }
                    _ => return None,
                }
            }
            let ve = vs + text[vs..].find(syn.param_end)?;
            push_member(
                &mut args,
                &pname,
                &param_json(&text[vs..ve], pstring.as_deref()),
            );
            p = ve + syn.param_end.len();
        }
        calls.push(ToolCall::new(name, format!("{{{args}}}")));
    }
}

fn any_tool_end(s: &str) -> bool {
    SYNTAXES.iter().any(|syn| s.contains(syn.tool_calls_end))
}

/// Parse generated assistant text (ds4 `parse_generated_message_ex` plus its failure handling).
pub fn parse_generated(text: &str, opts: ParseOptions) -> ParseOutcome {
    let mut search_from = 0;
    if opts.thinking {
        match text.rfind("</think>") {
            Some(i) => search_from = i + 8,
            None => return ParseOutcome::Ok(split_reasoning(text, text.len())),
        }
    }
    if !opts.tools {
        return ParseOutcome::Ok(split_reasoning(text, text.len()));
    }
    let Some((start, syn)) = find_block_start(text, search_from) else {
        return ParseOutcome::Ok(split_reasoning(text, text.len()));
    };
    let mut content_len = start;
    while content_len > 0 && is_c_space(text.as_bytes()[content_len - 1]) {
        content_len -= 1;
    }
    // `start` may point at the "\n\n" before the opener.
    let opener = start + text[start..].find(syn.tool_calls_start).unwrap_or(0);
    match parse_block(text, opener + syn.tool_calls_start.len(), &syn) {
        Some((calls, end)) => {
            let mut m = split_reasoning(text, content_len);
            m.tool_calls = calls;
            m.raw_dsml = Some(text[start..end].to_string());
            ParseOutcome::Ok(m)
        }
        None => {
            let m = ParsedMessage {
                content: text.to_string(),
                ..Default::default()
            };
            if any_tool_end(&text[opener..]) {
                ParseOutcome::Malformed(m)
            } else {
                ParseOutcome::Unterminated(m)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_entities() {
        assert_eq!(
            unescape("a &amp;&lt;&gt;&quot;&apos; &x &amp"),
            "a &<>\"' &x &amp"
        );
        assert_eq!(
            attr("<x name=\"a&amp;b\" string=\"true\">", "string").unwrap(),
            "true"
        );
        assert_eq!(attr("<x name=\"a&amp;b\">", "name").unwrap(), "a&b");
        assert!(attr("<x name=\"a>", "name").is_none());
    }

    #[test]
    fn render_canonical() {
        let calls = vec![
            ToolCall::new(
                "read",
                r#"{"path": "a.txt", "n": [1, 2], "s": "x</｜DSML｜parameter>y"}"#,
            ),
            ToolCall::new("we\"ird<>", "not json"),
        ];
        assert_eq!(
            render_tool_calls(&calls),
            "\n\n<｜DSML｜tool_calls>\n\
             <｜DSML｜invoke name=\"read\">\n\
             <｜DSML｜parameter name=\"path\" string=\"true\">a.txt</｜DSML｜parameter>\n\
             <｜DSML｜parameter name=\"n\" string=\"false\">[1,2]</｜DSML｜parameter>\n\
             <｜DSML｜parameter name=\"s\" string=\"true\">x&lt;/｜DSML｜parameter>y</｜DSML｜parameter>\n\
             </｜DSML｜invoke>\n\
             <｜DSML｜invoke name=\"we&quot;ird&lt;&gt;\">\n\
             <｜DSML｜parameter name=\"arguments\" string=\"true\">not json</｜DSML｜parameter>\n\
             </｜DSML｜invoke>\n\
             </｜DSML｜tool_calls>"
        );
    }
}
