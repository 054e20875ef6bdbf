//! TEST ONLY: scripted generations (`--test-script FILE`, env `DS4_SERVER_TEST_SCRIPT`).
//!
//! The tiny built-in model has random weights, so it never produces a tool call or a clean
//! reasoning/answer split by itself. A script makes the worker *emit* a given text instead of
//! sampling: the text is tokenized (ds4 specials and DSML markers recognised) and the tokens are
//! fed one by one through the real path — the live session decodes each of them, the streaming
//! parser splits reasoning, content and tool calls, stop sequences, `max_tokens`, cancellation,
//! the replay map and the disk cache all work as for sampled tokens. After the scripted tokens
//! the worker emits end-of-sequence.
//!
//! The file is a JSON array of entries, tried in order against the rendered prompt:
//!
//! ```json
//! [
//!   {"match": "<tool_result>", "text": "It worked.</think>The file holds 42."},
//!   {"text": "Let me look.</think>\n\n<｜DSML｜tool_calls>\n…</｜DSML｜tool_calls>"}
//! ]
//! ```
//!
//! `match` (optional) must occur in the text after the rendered prompt's last `<｜User｜>`; the
//! first entry that matches is used; a prompt no entry matches is sampled normally. Never use
//! this in production: the server logs a warning at startup when a script is loaded.

use std::path::Path;

use ds4_tokenizer::USER_TEXT;

/// One scripted generation.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ScriptEntry {
    #[serde(default, rename = "match")]
    pub matches: Option<String>,
    /// The text to emit (tokenized with ds4's chat tokenization).
    #[serde(default)]
    pub text: String,
    /// Or exact token ids to emit (e.g. a non-canonical tokenization).
    #[serde(default)]
    pub tokens: Option<Vec<u32>>,
}

/// The loaded script.
#[derive(Clone, Debug, Default)]
pub struct Script {
    pub entries: Vec<ScriptEntry>,
}

impl Script {
    pub fn load(path: &Path) -> Result<Script, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        Script::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Script, String> {
        let entries: Vec<ScriptEntry> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(Script { entries })
    }

    /// The entry to emit for `prompt`, if one matches.
    pub fn pick(&self, prompt: &str) -> Option<&ScriptEntry> {
        let tail = match prompt.rfind(USER_TEXT) {
            Some(i) => &prompt[i..],
            None => prompt,
        };
        self.entries
            .iter()
            .find(|e| e.matches.as_deref().is_none_or(|m| tail.contains(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_first_matching_entry_against_the_last_user_turn() {
        let s = Script::parse(
            br#"[{"match":"<tool_result>","text":"answer"},{"match":"weather","text":"call"},{"text":"default"}]"#,
        )
        .unwrap();
        let text = |p: &str| s.pick(p).map(|e| e.text.clone());
        assert_eq!(
            text("<｜User｜>weather?<｜Assistant｜>").as_deref(),
            Some("call")
        );
        assert_eq!(
            text("<｜User｜>weather?<｜Assistant｜>x<｜User｜><tool_result>1</tool_result>")
                .as_deref(),
            Some("answer")
        );
        assert_eq!(
            text("<｜User｜><tool_result>1</tool_result><｜User｜>hi").as_deref(),
            Some("default")
        );
        assert!(Script::parse(b"{}").is_err());
    }
}
