//! Streaming parser of generated assistant text: reasoning, visible content and DSML tool calls
//! as events, from text fed in arbitrary byte chunks.
//!
//! * Bytes are decoded incrementally; an incomplete UTF-8 sequence at the end of a chunk waits for
//!   the next chunk, invalid bytes become U+FFFD (the same text `String::from_utf8_lossy` gives for
//!   the whole stream), so a character is never split.
//! * Nothing that might be the start of a marker is emitted until it is disambiguated: a partial
//!   `</think>` in reasoning; in content a partial tool-block opener of any syntax, together with
//!   the whitespace before it (content before a tool block is trimmed); in a string parameter a
//!   partial parameter closer or a partial `&…;` entity.
//! * Tool calls: [`StreamEvent::ToolCallStart`] when an invoke tag is complete, then
//!   [`StreamEvent::ToolCallArgs`] deltas whose concatenation is the compact JSON arguments
//!   object (`{` … `"path":"a.txt"` … `}`; string values stream as they come, other values are
//!   emitted whole when their closer arrives), [`StreamEvent::ToolCallEnd`], and
//!   [`StreamEvent::ToolCallsDone`] at the block closer (generation can stop there).
//! * Malformed DSML stops event emission (as ds4's live stream does); [`StreamParser::finish`]
//!   returns the authoritative one-shot [`parse_generated`] outcome of the whole text.
//!
//! The events depend only on the text, not on how it was chunked (up to how consecutive deltas
//! of the same kind are split). For well-formed output the concatenated content, reasoning and
//! argument deltas equal the final outcome's fields; known exceptions, inherited from ds4's
//! separate live and final paths: thinking output that never closes `</think>` streams as
//! reasoning but the final outcome returns it as content; in non-thinking mode a literal
//! `</think>` in the output splits reasoning off in the final outcome only; a second `</think>`
//! moves the final tool-block search after it.

use crate::dsml::{
    self, ParseOptions, ParseOutcome, SYNTAXES, Step, Syntax, parse_generated, skip_ws,
};
use crate::json::{self, is_c_space};

/// One streamed event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// Reasoning text (thinking mode, before `</think>`).
    Reasoning(String),
    /// Visible text.
    Content(String),
    /// An invoke tag completed: tool call `index` (0-based within the block) is `name`.
    ToolCallStart { index: usize, name: String },
    /// A fragment of tool call `index`'s JSON arguments text.
    ToolCallArgs { index: usize, delta: String },
    /// Tool call `index` is complete.
    ToolCallEnd { index: usize },
    /// The tool block closer was seen; generation can stop.
    ToolCallsDone,
}

#[derive(Clone, Debug)]
enum Phase {
    BetweenInvokes,
    BetweenParams,
    /// Streaming a string value.
    StringValue,
    /// Waiting for the closer of a non-string value; `scan` is where to resume the search.
    RawValue {
        string_attr: String,
        scan: usize,
    },
    /// A parameter without `string` attribute: nested parameters or a string.
    Undecided,
}

#[derive(Clone, Debug)]
struct ToolState {
    syn: Syntax,
    phase: Phase,
    index: usize,
    first_param: bool,
    /// Name of the parameter being parsed.
    param: String,
}

#[derive(Clone, Debug)]
enum Mode {
    ThinkPrefix,
    Reasoning,
    Content,
    Tool(ToolState),
    /// Malformed DSML: no more events.
    Suppress,
    /// After the tool block closer: no more events.
    Done,
}

/// Incremental parser; see the module docs.
#[derive(Clone, Debug)]
pub struct StreamParser {
    opts: ParseOptions,
    pending: Vec<u8>,
    text: String,
    pos: usize,
    mode: Mode,
    events: Vec<StreamEvent>,
}

/// Length of the longest suffix of `s` (starting on a char boundary) that is a proper, non-empty
/// prefix of one of `markers`.
fn partial_suffix(s: &str, markers: &[&str]) -> usize {
    let max = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    let upper = s.len().min(max.saturating_sub(1));
    for k in (1..=upper).rev() {
        let start = s.len() - k;
        if !s.is_char_boundary(start) {
            continue;
        }
        let tail = &s[start..];
        if markers.iter().any(|m| m.len() > k && m.starts_with(tail)) {
            return k;
        }
    }
    0
}

/// Where a string value may be cut without splitting a `&…;` entity: the position of a trailing
/// `&` that starts a proper prefix of an entity, else `s.len()`.
fn entity_safe_len(s: &str) -> usize {
    let b = s.as_bytes();
    let lo = b.len().saturating_sub(5);
    for i in (lo..b.len()).rev() {
        if b[i] == b'&' {
            let tail = &s[i..];
            if dsml::ENTITIES
                .iter()
                .any(|(e, _)| e.len() > tail.len() && e.starts_with(tail))
            {
                return i;
            }
            break;
        }
    }
    b.len()
}

enum Flow {
    Continue,
    Wait,
}

impl StreamParser {
    /// A parser for one generation.
    pub fn new(opts: ParseOptions) -> StreamParser {
        StreamParser {
            opts,
            pending: Vec::new(),
            text: String::new(),
            pos: 0,
            mode: if opts.thinking {
                Mode::ThinkPrefix
            } else {
                Mode::Content
            },
            events: Vec::new(),
        }
    }

    /// Feed raw bytes (a token's bytes, say); returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<StreamEvent> {
        self.decode(bytes);
        self.advance(false);
        std::mem::take(&mut self.events)
    }

    /// Feed text.
    pub fn feed_str(&mut self, s: &str) -> Vec<StreamEvent> {
        self.feed(s.as_bytes())
    }

    /// End of generation: flush held-back text and return the last events with the
    /// authoritative parse of the whole text.
    pub fn finish(&mut self) -> (Vec<StreamEvent>, ParseOutcome) {
        if !self.pending.is_empty() {
            self.pending.clear();
            self.text.push('\u{FFFD}');
        }
        self.advance(true);
        let events = std::mem::take(&mut self.events);
        (events, parse_generated(&self.text, self.opts))
    }

    /// The decoded text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the parser is inside a tool block (after the opener, before the closer).
    pub fn in_tool_block(&self) -> bool {
        matches!(self.mode, Mode::Tool(_))
    }

    /// Whether the tool block closer has been seen.
    pub fn tool_calls_done(&self) -> bool {
        matches!(self.mode, Mode::Done)
    }

    /// Whether malformed DSML stopped the event stream.
    pub fn suppressed(&self) -> bool {
        matches!(self.mode, Mode::Suppress)
    }

    fn decode(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    self.text.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let v = e.valid_up_to();
                    if let Ok(s) = std::str::from_utf8(&self.pending[start..start + v]) {
                        self.text.push_str(s);
                    }
                    match e.error_len() {
                        None => {
                            start += v;
                            break;
                        }
                        Some(n) => {
                            self.text.push('\u{FFFD}');
                            start += v + n;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }

    fn emit_text(&mut self, reasoning: bool, end: usize) {
        if end > self.pos {
            let s = self.text[self.pos..end].to_string();
            self.events.push(if reasoning {
                StreamEvent::Reasoning(s)
            } else {
                StreamEvent::Content(s)
            });
        }
    }

    fn emit_args(&mut self, index: usize, delta: String) {
        if !delta.is_empty() {
            self.events.push(StreamEvent::ToolCallArgs { index, delta });
        }
    }

    fn advance(&mut self, final_: bool) {
        loop {
            let flow = match self.mode {
                Mode::ThinkPrefix => {
                    let rest = &self.text[self.pos..];
                    if rest.starts_with("<think>") {
                        self.pos += 7;
                        self.mode = Mode::Reasoning;
                        Flow::Continue
                    } else if !final_ && "<think>".starts_with(rest) {
                        Flow::Wait
                    } else {
                        self.mode = Mode::Reasoning;
                        Flow::Continue
                    }
                }
                Mode::Reasoning => self.step_reasoning(final_),
                Mode::Content => self.step_content(final_),
                Mode::Tool(_) => self.step_tool(final_),
                Mode::Suppress | Mode::Done => {
                    self.pos = self.text.len();
                    Flow::Wait
                }
            };
            if let Flow::Wait = flow {
                return;
            }
        }
    }

    fn step_reasoning(&mut self, final_: bool) -> Flow {
        if let Some(i) = self.text[self.pos..].find("</think>") {
            let end = self.pos + i;
            self.emit_text(true, end);
            self.pos = end + 8;
            self.mode = Mode::Content;
            return Flow::Continue;
        }
        let end = if final_ {
            self.text.len()
        } else {
            self.text.len() - partial_suffix(&self.text[self.pos..], &["</think>"])
        };
        self.emit_text(true, end);
        self.pos = end;
        Flow::Wait
    }

    fn step_content(&mut self, final_: bool) -> Flow {
        let len = self.text.len();
        if !self.opts.tools {
            self.emit_text(false, len);
            self.pos = len;
            return Flow::Wait;
        }
        let rest = &self.text[self.pos..];
        let found = SYNTAXES
            .iter()
            .filter_map(|syn| rest.find(syn.tool_calls_start).map(|i| (i, *syn)))
            .min_by_key(|(i, _)| *i);
        if let Some((i, syn)) = found {
            let marker = self.pos + i;
            let mut end = marker;
            while end > self.pos && is_c_space(self.text.as_bytes()[end - 1]) {
                end -= 1;
            }
            self.emit_text(false, end);
            self.pos = marker + syn.tool_calls_start.len();
            self.mode = Mode::Tool(ToolState {
                syn,
                phase: Phase::BetweenInvokes,
                index: 0,
                first_param: true,
                param: String::new(),
            });
            return Flow::Continue;
        }
        if final_ {
            self.emit_text(false, len);
            self.pos = len;
            return Flow::Wait;
        }
        let starts: Vec<&str> = SYNTAXES.iter().map(|s| s.tool_calls_start).collect();
        let mut end = len - partial_suffix(rest, &starts);
        while end > self.pos && is_c_space(self.text.as_bytes()[end - 1]) {
            end -= 1;
        }
        self.emit_text(false, end);
        self.pos = end;
        Flow::Wait
    }

    fn param_prefix(st: &mut ToolState) -> String {
        let mut s = String::new();
        if !st.first_param {
            s.push(',');
        }
        st.first_param = false;
        json::escape_into_quoted(&mut s, &st.param);
        s.push(':');
        s
    }

    fn step_tool(&mut self, final_: bool) -> Flow {
        let Mode::Tool(mut st) = std::mem::replace(&mut self.mode, Mode::Suppress) else {
            return Flow::Wait;
        };
        match self.step_tool_state(&mut st, final_) {
            ToolStep::Continue => {
                self.mode = Mode::Tool(st);
                Flow::Continue
            }
            ToolStep::Wait => {
                self.mode = Mode::Tool(st);
                Flow::Wait
            }
            ToolStep::Fail => {
                self.mode = Mode::Suppress;
                Flow::Continue
            }
            ToolStep::Done => {
                self.mode = Mode::Done;
                Flow::Continue
            }
        }
    }

    fn step_tool_state(&mut self, st: &mut ToolState, final_: bool) -> ToolStep {
        let syn = st.syn;
        match st.phase.clone() {
            Phase::BetweenInvokes => {
                let p = skip_ws(&self.text, self.pos);
                self.pos = p;
                let rest = &self.text[p..];
                if rest.starts_with(syn.tool_calls_end) {
                    self.pos = p + syn.tool_calls_end.len();
                    self.events.push(StreamEvent::ToolCallsDone);
                    return ToolStep::Done;
                }
                if rest.starts_with(syn.invoke_start) {
                    let Some(te) = rest.find('>') else {
                        return if final_ {
                            ToolStep::Fail
                        } else {
                            ToolStep::Wait
                        };
                    };
                    let Some(name) = dsml::attr(&rest[..=te], "name") else {
                        return ToolStep::Fail;
                    };
                    self.pos = p + te + 1;
                    self.events.push(StreamEvent::ToolCallStart {
                        index: st.index,
                        name,
                    });
                    self.emit_args(st.index, "{".to_string());
                    st.first_param = true;
                    st.phase = Phase::BetweenParams;
                    return ToolStep::Continue;
                }
                if !final_
                    && (syn.tool_calls_end.starts_with(rest) || syn.invoke_start.starts_with(rest))
                {
                    return ToolStep::Wait;
                }
                ToolStep::Fail
            }
            Phase::BetweenParams => {
                let p = skip_ws(&self.text, self.pos);
                self.pos = p;
                let rest = &self.text[p..];
                if rest.starts_with(syn.invoke_end) {
                    self.pos = p + syn.invoke_end.len();
                    self.emit_args(st.index, "}".to_string());
                    self.events
                        .push(StreamEvent::ToolCallEnd { index: st.index });
                    st.index += 1;
                    st.phase = Phase::BetweenInvokes;
                    return ToolStep::Continue;
                }
                if rest.starts_with(syn.param_start) {
                    let Some(te) = rest.find('>') else {
                        return if final_ {
                            ToolStep::Fail
                        } else {
                            ToolStep::Wait
                        };
                    };
                    let tag = &rest[..=te];
                    let Some(name) = dsml::attr(tag, "name") else {
                        return ToolStep::Fail;
                    };
                    let string_attr = dsml::attr(tag, "string");
                    self.pos = p + te + 1;
                    st.param = name;
                    match string_attr {
                        Some(a) if a == "true" => {
                            let prefix = Self::param_prefix(st);
                            self.emit_args(st.index, prefix + "\"");
                            st.phase = Phase::StringValue;
                        }
                        Some(a) => {
                            let prefix = Self::param_prefix(st);
                            self.emit_args(st.index, prefix);
                            st.phase = Phase::RawValue {
                                string_attr: a,
                                scan: self.pos,
                            };
                        }
                        None => st.phase = Phase::Undecided,
                    }
                    return ToolStep::Continue;
                }
                if !final_
                    && (syn.invoke_end.starts_with(rest) || syn.param_start.starts_with(rest))
                {
                    return ToolStep::Wait;
                }
                ToolStep::Fail
            }
            Phase::StringValue => {
                if let Some(i) = self.text[self.pos..].find(syn.param_end) {
                    let raw = &self.text[self.pos..self.pos + i];
                    let mut delta = String::new();
                    json::escape_into(&mut delta, &dsml::unescape(raw));
                    delta.push('"');
                    self.emit_args(st.index, delta);
                    self.pos += i + syn.param_end.len();
                    st.phase = Phase::BetweenParams;
                    return ToolStep::Continue;
                }
                if final_ {
                    return ToolStep::Fail;
                }
                let rest = &self.text[self.pos..];
                let cut = rest.len() - partial_suffix(rest, &[syn.param_end]);
                let cut = entity_safe_len(&rest[..cut]);
                let mut delta = String::new();
                json::escape_into(&mut delta, &dsml::unescape(&rest[..cut]));
                self.emit_args(st.index, delta);
                self.pos += cut;
                ToolStep::Wait
            }
            Phase::RawValue { string_attr, scan } => {
                let from = scan.max(self.pos);
                if let Some(i) = self.text[from..].find(syn.param_end) {
                    let end = from + i;
                    let v = dsml::param_json_pub(&self.text[self.pos..end], Some(&string_attr));
                    self.emit_args(st.index, v);
                    self.pos = end + syn.param_end.len();
                    st.phase = Phase::BetweenParams;
                    return ToolStep::Continue;
                }
                if final_ {
                    return ToolStep::Fail;
                }
                let scan = self
                    .text
                    .len()
                    .saturating_sub(syn.param_end.len())
                    .max(self.pos);
                let mut scan = scan;
                while !self.text.is_char_boundary(scan) {
                    scan -= 1;
                }
                st.phase = Phase::RawValue { string_attr, scan };
                ToolStep::Wait
            }
            Phase::Undecided => {
                let q = skip_ws(&self.text, self.pos);
                let rest = &self.text[q..];
                if rest.starts_with(syn.param_start) {
                    return match dsml::parse_nested(&self.text, self.pos, &syn, final_) {
                        Step::Done((obj, np)) => {
                            let prefix = Self::param_prefix(st);
                            self.emit_args(st.index, prefix + &obj);
                            self.pos = np;
                            st.phase = Phase::BetweenParams;
                            ToolStep::Continue
                        }
                        Step::NeedMore if !final_ => ToolStep::Wait,
                        _ => ToolStep::Fail,
                    };
                }
                if !final_ && syn.param_start.starts_with(rest) {
                    return ToolStep::Wait;
                }
                let prefix = Self::param_prefix(st);
                self.emit_args(st.index, prefix + "\"");
                st.phase = Phase::StringValue;
                ToolStep::Continue
            }
        }
    }
}

enum ToolStep {
    Continue,
    Wait,
    Fail,
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_suffixes() {
        assert_eq!(partial_suffix("abc<｜DS", &["<｜DSML｜tool_calls>"]), 6);
        assert_eq!(partial_suffix("abc<", &["</think>"]), 1);
        assert_eq!(partial_suffix("abc</think>", &["</think>"]), 0);
        assert_eq!(partial_suffix("abc", &["</think>"]), 0);
        assert_eq!(entity_safe_len("a &am"), 2);
        assert_eq!(entity_safe_len("a &amp;"), 7);
        assert_eq!(entity_safe_len("a &x"), 4);
        assert_eq!(entity_safe_len("&&"), 1);
    }
}
