//! Minimal byte-preserving JSON scanning, mirroring the helpers ds4's server uses when it turns
//! client JSON into prompt text (`json_string`, `json_skip_value`, `json_raw_value`,
//! `json_minify_raw_value`, `json_args_parse`, `json_escape`).
//!
//! The point of not going through `serde_json::Value` here is byte exactness: ds4 keeps raw JSON
//! text (tool schemas, non-string argument values) as the client sent it, only removing whitespace
//! outside strings, so escapes such as `\u00e9` survive unchanged into the prompt.
//!
//! Divergences from ds4's C (all on invalid input): numbers follow the JSON grammar with an optional
//! leading `+` and forms like `1.`/`.5` accepted (ds4 uses `strtod`, which also takes `inf`, `nan`
//! and hex floats); a lone low surrogate escape decodes to U+FFFD (ds4 writes its CESU-8 bytes).

const MAX_NESTING: usize = 256;

/// C `isspace` in the "C" locale.
pub(crate) fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

pub(crate) struct Cursor<'a> {
    pub s: &'a str,
    pub p: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(s: &'a str) -> Self {
        Cursor { s, p: 0 }
    }

    fn b(&self) -> &'a [u8] {
        self.s.as_bytes()
    }

    pub fn peek(&self) -> Option<u8> {
        self.b().get(self.p).copied()
    }

    pub fn ws(&mut self) {
        while self.peek().is_some_and(is_c_space) {
            self.p += 1;
        }
    }

    pub fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.p += 1;
            true
        } else {
            false
        }
    }

    fn lit(&mut self, l: &str) -> bool {
        if self.s[self.p..].starts_with(l) {
            self.p += l.len();
            true
        } else {
            false
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let b = self.b();
        if b.get(self.p) != Some(&b'\\') || b.get(self.p + 1) != Some(&b'u') {
            return None;
        }
        let mut v = 0u32;
        for i in 0..4 {
            let c = *b.get(self.p + 2 + i)?;
            v = (v << 4) | (c as char).to_digit(16)?;
        }
        self.p += 6;
        Some(v)
    }

    /// A JSON string (after optional whitespace), decoded. Raw control characters are accepted
    /// (as ds4 does).
    pub fn string(&mut self) -> Option<String> {
        self.ws();
        if !self.eat(b'"') {
            return None;
        }
        let mut out = String::new();
        loop {
            let rest = &self.s[self.p..];
            let stop = rest.find(['"', '\\'])?;
            out.push_str(&rest[..stop]);
            self.p += stop;
            if self.eat(b'"') {
                return Some(out);
            }
            // Backslash.
            let e = *self.b().get(self.p + 1)?;
            match e {
                b'"' => out.push('"'),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let cp = self.hex4()?;
                    let ch = if (0xD800..=0xDBFF).contains(&cp) {
                        let save = self.p;
                        match self.hex4() {
                            Some(lo) if (0xDC00..=0xDFFF).contains(&lo) => {
                                char::from_u32(0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00))
                            }
                            _ => {
                                self.p = save;
                                None
                            }
                        }
                    } else {
                        char::from_u32(cp)
                    };
                    out.push(ch.unwrap_or('\u{FFFD}'));
                    continue;
                }
                _ => return None,
            }
            self.p += 2;
        }
    }

    fn number(&mut self) -> bool {
        self.ws();
        let b = self.b();
        let start = self.p;
        let mut p = self.p;
        if matches!(b.get(p), Some(b'-') | Some(b'+')) {
            p += 1;
        }
        let int_start = p;
        while b.get(p).is_some_and(u8::is_ascii_digit) {
            p += 1;
        }
        let mut digits = p - int_start;
        if b.get(p) == Some(&b'.') {
            let f = p + 1;
            let mut q = f;
            while b.get(q).is_some_and(u8::is_ascii_digit) {
                q += 1;
            }
            if digits > 0 || q > f {
                digits += q - f;
                p = q;
            }
        }
        if digits == 0 {
            self.p = start;
            return false;
        }
        if matches!(b.get(p), Some(b'e') | Some(b'E')) {
            let mut q = p + 1;
            if matches!(b.get(q), Some(b'-') | Some(b'+')) {
                q += 1;
            }
            let e = q;
            while b.get(q).is_some_and(u8::is_ascii_digit) {
                q += 1;
            }
            if q > e {
                p = q;
            }
        }
        self.p = p;
        true
    }

    fn skip_depth(&mut self, depth: usize) -> bool {
        self.ws();
        match self.peek() {
            Some(b'"') => self.string().is_some(),
            Some(b'{') => {
                if depth >= MAX_NESTING {
                    return false;
                }
                self.p += 1;
                self.ws();
                if self.eat(b'}') {
                    return true;
                }
                loop {
                    if self.string().is_none() {
                        return false;
                    }
                    self.ws();
                    if !self.eat(b':') || !self.skip_depth(depth + 1) {
                        return false;
                    }
                    self.ws();
                    if self.eat(b'}') {
                        return true;
                    }
                    if !self.eat(b',') {
                        return false;
                    }
                }
            }
            Some(b'[') => {
                if depth >= MAX_NESTING {
                    return false;
                }
                self.p += 1;
                self.ws();
                if self.eat(b']') {
                    return true;
                }
                loop {
                    if !self.skip_depth(depth + 1) {
                        return false;
                    }
                    self.ws();
                    if self.eat(b']') {
                        return true;
                    }
                    if !self.eat(b',') {
                        return false;
                    }
                }
            }
            _ => self.lit("true") || self.lit("false") || self.lit("null") || self.number(),
        }
    }

    /// Skip one value (after optional whitespace).
    pub fn skip_value(&mut self) -> bool {
        self.skip_depth(0)
    }

    /// The raw text of one value (leading whitespace skipped).
    pub fn raw_value(&mut self) -> Option<&'a str> {
        self.ws();
        let start = self.p;
        if self.skip_value() {
            Some(&self.s[start..self.p])
        } else {
            None
        }
    }
}

/// ds4 `json_minify_raw_value`: the first JSON value of `json` with whitespace outside strings
/// removed (escapes kept as written); `json` itself, unchanged, when no value can be parsed.
pub fn minify_raw(json: &str) -> String {
    let mut c = Cursor::new(json);
    c.ws();
    let start = c.p;
    if !c.skip_value() {
        return json.to_string();
    }
    minify_span(&json[start..c.p])
}

fn minify_span(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_string = false;
    let mut escape = false;
    for ch in s.chars() {
        if in_string {
            out.push(ch);
            if escape {
                escape = false;
            } else if ch == '\\' {
                escape = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if ch == '"' {
            in_string = true;
            out.push(ch);
        } else if !(ch.is_ascii() && is_c_space(ch as u8)) {
            out.push(ch);
        }
    }
    out
}

/// The value of a `string="false"` DSML parameter as JSON text: `null` when empty, the minified
/// text when it is one complete, valid JSON value (strict RFC 8259, checked with `serde_json`),
/// otherwise the raw text as a JSON string. (ds4 copies invalid text verbatim into the arguments
/// object, which then is not valid JSON; here it becomes a string instead.)
pub fn json_param_value(raw: &str) -> String {
    let t = raw.trim_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
    if t.is_empty() {
        return "null".to_string();
    }
    if serde_json::from_str::<serde_json::Value>(t).is_ok() {
        minify_span(t)
    } else {
        escape(raw)
    }
}

/// One top-level member of an arguments object (ds4 `json_arg`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonArg {
    pub key: String,
    /// Decoded string for string values, minified raw JSON otherwise.
    pub value: String,
    pub is_string: bool,
}

/// ds4 `json_args_parse`: the members of a JSON object, in order (duplicates kept), or `None`
/// if `json` is not an object. Like ds4, commas between members are optional and text after the
/// closing brace is ignored.
pub fn args_parse(json: &str) -> Option<Vec<JsonArg>> {
    let mut c = Cursor::new(json);
    c.ws();
    if !c.eat(b'{') {
        return None;
    }
    c.ws();
    let mut out = Vec::new();
    while let Some(b) = c.peek() {
        if b == b'}' {
            break;
        }
        let key = c.string()?;
        c.ws();
        if !c.eat(b':') {
            return None;
        }
        c.ws();
        let (value, is_string) = if c.peek() == Some(b'"') {
            (c.string()?, true)
        } else {
            let raw = c.raw_value()?;
            (minify_raw(raw), false)
        };
        out.push(JsonArg {
            key,
            value,
            is_string,
        });
        c.ws();
        c.eat(b',');
        c.ws();
    }
    if c.peek() != Some(b'}') {
        return None;
    }
    Some(out)
}

/// Append `s` JSON-escaped the way ds4's `json_escape` does (no quotes): `"` and `\` escaped,
/// `\n`, `\r`, `\t` as short escapes, other bytes below 0x20 as `\u00XX`, everything else raw.
pub fn escape_into(out: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

/// Append `s` as a JSON string literal (ds4 `json_escape`).
pub fn escape_into_quoted(out: &mut String, s: &str) {
    out.push('"');
    escape_into(out, s);
    out.push('"');
}

/// `s` as a JSON string literal (ds4 `json_escape`).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    escape_into(&mut out, s);
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_escapes() {
        let mut c = Cursor::new(r#"  "a\"b\\c\/\n\u00e9\ud83d\ude00\ud800x""#);
        assert_eq!(c.string().unwrap(), "a\"b\\c/\né😀\u{FFFD}x");
        assert!(Cursor::new(r#""\q""#).string().is_none());
        assert!(Cursor::new(r#""abc"#).string().is_none());
    }

    #[test]
    fn minify_keeps_escapes() {
        assert_eq!(
            minify_raw(" { \"a\" : [ 1 , \"x \\u0041 y\" ] } trailing"),
            "{\"a\":[1,\"x \\u0041 y\"]}"
        );
        assert_eq!(minify_raw("nope"), "nope");
    }

    #[test]
    fn args() {
        let a = args_parse(r#"{"path": "a.txt", "n": 3, "o": {"k": [1, 2]} "m": null}"#).unwrap();
        assert_eq!(a.len(), 4);
        assert_eq!(a[0].value, "a.txt");
        assert!(a[0].is_string);
        assert_eq!(a[2].value, r#"{"k":[1,2]}"#);
        assert_eq!(a[3].key, "m");
        assert!(args_parse("[1]").is_none());
        assert!(args_parse("{\"a\":").is_none());
        assert_eq!(args_parse("{}").unwrap(), vec![]);
    }

    #[test]
    fn param_values() {
        assert_eq!(json_param_value(" 12 "), "12");
        assert_eq!(json_param_value(""), "null");
        assert_eq!(json_param_value("{ \"a\": [1, 2] }"), "{\"a\":[1,2]}");
        assert_eq!(json_param_value("hello world"), "\"hello world\"");
        assert_eq!(json_param_value("1 2"), "\"1 2\"");
        assert_eq!(json_param_value("+1"), "\"+1\"");
    }

    #[test]
    fn escape_matches_ds4() {
        assert_eq!(
            escape("a\"\\\n\r\t\u{1}\u{8}é"),
            "\"a\\\"\\\\\\n\\r\\t\\u0001\\u0008é\""
        );
    }
}
