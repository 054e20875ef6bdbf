//! The DeepSeek V4 byte-level BPE tokenizer, built on the HF `tokenizers` crate.
//!
//! Construction paths ([`Tokenizer::from_vocab`], [`Tokenizer::from_tokenizer_json`],
//! [`Tokenizer::from_gguf`]) all end in the same builder: a BPE model over the full token table
//! (every id, added tokens included, so ids are exactly the table indices), the official
//! DeepSeek V4 pre-tokenizer (three isolated regex `Split`s, then `ByteLevel` without regex), a
//! `ByteLevel` decoder, and the added tokens registered as HF added tokens.
//!
//! # Added tokens
//! With a `token_type` table (GGUF convention), type 3 (control) tokens become *special* added
//! tokens and type 4 (user-defined) tokens become *non-special, normalized* added tokens, which is
//! what `tokenizer.json` declares for this model; every other type is a normal BPE token.
//!
//! Without a `token_type` table, a token is recognised as an added token when BPE could never
//! produce it: it is neither a single byte-level code point (one of the 256 GPT-2 byte characters)
//! nor the concatenation `A+B` of some merge `"A B"`. For the DeepSeek V4 table this rule yields
//! exactly the 1283 `added_tokens` of `tokenizer.json` (ids 0, 1, 2 and 128000..129279). Such
//! inferred added tokens are registered as special (not normalized); since the model has no
//! normalizer the special/normalized flags do not change how text is split (checked by a test on
//! the corpus).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, Model, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
};

use crate::bytelevel;
use crate::error::{Result, TokenizerError};

/// The three regexes of the official DeepSeek V4 pre-tokenizer (`tokenizer.json`
/// `pre_tokenizer.pretokenizers[0..3]`), applied in order as isolated splits, followed by
/// `ByteLevel(add_prefix_space=false, trim_offsets=true, use_regex=false)`.
pub const PRE_TOKENIZER_REGEXES: [&str; 3] = [
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// `tokenizer.ggml.pre` values accepted by [`Tokenizer::from_gguf`] (both name the DeepSeek V3/V4
/// regex set in llama.cpp; ds4's files declare `joyai-llm`).
pub const ACCEPTED_GGUF_PRE: [&str; 2] = ["joyai-llm", "deepseek-v3"];

/// `<｜begin▁of▁sentence｜>`
pub const BOS_TEXT: &str = "<｜begin▁of▁sentence｜>";
/// `<｜end▁of▁sentence｜>`
pub const EOS_TEXT: &str = "<｜end▁of▁sentence｜>";
/// `<｜User｜>`
pub const USER_TEXT: &str = "<｜User｜>";
/// `<｜Assistant｜>`
pub const ASSISTANT_TEXT: &str = "<｜Assistant｜>";
/// `<think>`
pub const THINK_START_TEXT: &str = "<think>";
/// `</think>`
pub const THINK_END_TEXT: &str = "</think>";
/// `｜DSML｜`
pub const DSML_TEXT: &str = "｜DSML｜";

/// The seven strings ds4 recognises in rendered chat text, in ds4's `special_token_at` order.
pub const DS4_SPECIAL_TEXTS: [&str; 7] = [
    BOS_TEXT,
    EOS_TEXT,
    USER_TEXT,
    ASSISTANT_TEXT,
    THINK_START_TEXT,
    THINK_END_TEXT,
    DSML_TEXT,
];

/// What kind of entry a token is (GGUF `token_type` conventions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Ordinary BPE token, stored byte-level encoded (GGUF type 1).
    Normal,
    /// Special added token, stored as raw UTF-8 (GGUF type 3, "control").
    Control,
    /// Non-special added token, stored as raw UTF-8 (GGUF type 4, "user defined").
    UserDefined,
}

impl TokenKind {
    /// The GGUF `tokenizer.ggml.token_type` value.
    pub fn gguf_type(self) -> i32 {
        match self {
            TokenKind::Normal => 1,
            TokenKind::Control => 3,
            TokenKind::UserDefined => 4,
        }
    }

    /// Kind for a GGUF `token_type` value (3 control, 4 user-defined, anything else normal).
    pub fn from_gguf_type(t: i32) -> TokenKind {
        match t {
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            _ => TokenKind::Normal,
        }
    }

    /// Whether this is an added token (recognised in text, stored raw).
    pub fn is_added(self) -> bool {
        self != TokenKind::Normal
    }
}

/// Ids of the seven tokens ds4 uses, found by string lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpecialTokens {
    /// `<｜begin▁of▁sentence｜>` (0 in DeepSeek V4)
    pub bos: u32,
    /// `<｜end▁of▁sentence｜>` (1)
    pub eos: u32,
    /// `<｜User｜>` (128803)
    pub user: u32,
    /// `<｜Assistant｜>` (128804)
    pub assistant: u32,
    /// `<think>` (128821)
    pub think_start: u32,
    /// `</think>` (128822)
    pub think_end: u32,
    /// `｜DSML｜` (128825)
    pub dsml: u32,
}

impl SpecialTokens {
    /// The ids in [`DS4_SPECIAL_TEXTS`] order.
    pub fn as_array(&self) -> [u32; 7] {
        [
            self.bos,
            self.eos,
            self.user,
            self.assistant,
            self.think_start,
            self.think_end,
            self.dsml,
        ]
    }
}

/// The DeepSeek V4 tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    merges: Vec<String>,
    /// Decoded bytes of every token, concatenated; token `i` is `bytes[off[i]..off[i+1]]`.
    bytes: Vec<u8>,
    byte_offsets: Vec<u32>,
    specials: SpecialTokens,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("specials", &self.specials)
            .finish()
    }
}

/// Build the official DeepSeek V4 pre-tokenizer.
pub fn official_pre_tokenizer() -> Result<PreTokenizerWrapper> {
    let mut seq: Vec<PreTokenizerWrapper> = Vec::with_capacity(4);
    for re in PRE_TOKENIZER_REGEXES {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(TokenizerError::hf)?;
        seq.push(split.into());
    }
    seq.push(ByteLevel::new(false, true, false).into());
    Ok(Sequence::new(seq).into())
}

fn split_merge(index: usize, m: &str) -> Result<(String, String)> {
    match m.split_once(' ') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
            Ok((a.to_string(), b.to_string()))
        }
        _ => Err(TokenizerError::BadMerge {
            index,
            merge: m.to_string(),
        }),
    }
}

/// Infer which tokens are added tokens when no `token_type` is available (see the module docs).
pub fn infer_token_kinds(tokens: &[String], merges: &[String]) -> Vec<TokenKind> {
    let mut merged: std::collections::HashSet<String> =
        std::collections::HashSet::with_capacity(merges.len());
    for m in merges {
        if let Some((a, b)) = m.split_once(' ') {
            let mut s = String::with_capacity(a.len() + b.len());
            s.push_str(a);
            s.push_str(b);
            merged.insert(s);
        }
    }
    tokens
        .iter()
        .map(|t| {
            let mut chars = t.chars();
            let single_byte_char = match (chars.next(), chars.next()) {
                (Some(c), None) => bytelevel::is_byte_char(c),
                _ => false,
            };
            if single_byte_char || merged.contains(t.as_str()) {
                TokenKind::Normal
            } else {
                TokenKind::Control
            }
        })
        .collect()
}

fn added_token_for(content: &str, kind: TokenKind) -> AddedToken {
    match kind {
        TokenKind::UserDefined => AddedToken::from(content.to_string(), false).normalized(true),
        _ => AddedToken::from(content.to_string(), true).normalized(false),
    }
}

impl Tokenizer {
    /// Build from the token table (index = id; normal tokens byte-level encoded, added tokens raw
    /// UTF-8), the merges (`"A B"`, rank = index) and optionally the GGUF `token_type` table.
    pub fn from_vocab(
        tokens: Vec<String>,
        merges: Vec<String>,
        token_types: Option<Vec<i32>>,
    ) -> Result<Tokenizer> {
        let kinds = match token_types {
            Some(types) => {
                if types.len() != tokens.len() {
                    return Err(TokenizerError::TokenTypeLength {
                        expected: tokens.len(),
                        got: types.len(),
                    });
                }
                types.into_iter().map(TokenKind::from_gguf_type).collect()
            }
            None => infer_token_kinds(&tokens, &merges),
        };
        let added: Vec<(u32, AddedToken)> = kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| k.is_added())
            .map(|(i, &k)| (i as u32, added_token_for(&tokens[i], k)))
            .collect();
        Self::build(tokens, merges, kinds, added)
    }

    /// Build from a HF `tokenizer.json`. The file's pre-tokenizer must be the official DeepSeek V4
    /// one (anything else is refused rather than silently tokenized differently).
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_tokenizer_json_bytes(&bytes)
    }

    /// [`Tokenizer::from_tokenizer_json`] from the file's bytes.
    pub fn from_tokenizer_json_bytes(bytes: &[u8]) -> Result<Tokenizer> {
        use serde_json::Value;
        let bad = |m: &str| TokenizerError::InvalidTokenizerJson(m.to_string());
        let root: Value = serde_json::from_slice(bytes)
            .map_err(|e| TokenizerError::InvalidTokenizerJson(e.to_string()))?;
        let model = root.get("model").ok_or_else(|| bad("missing model"))?;
        if let Some(t) = model.get("type").and_then(Value::as_str)
            && t != "BPE"
        {
            return Err(bad(&format!("model type {t:?} is not BPE")));
        }
        for key in [
            "dropout",
            "unk_token",
            "continuing_subword_prefix",
            "end_of_word_suffix",
        ] {
            if model.get(key).is_some_and(|v| !v.is_null()) {
                return Err(bad(&format!("unsupported BPE option {key}")));
            }
        }
        if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
            return Err(bad("unsupported BPE option byte_fallback"));
        }
        match root.get("normalizer") {
            None | Some(Value::Null) => {}
            Some(n) => {
                let empty_seq = n.get("type").and_then(Value::as_str) == Some("Sequence")
                    && n.get("normalizers")
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.is_empty());
                if !empty_seq {
                    return Err(bad("a normalizer is not supported"));
                }
            }
        }
        check_pre_tokenizer_json(root.get("pre_tokenizer"))?;

        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("model.vocab is not an object"))?;
        let added_json = match root.get("added_tokens") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| bad("added_tokens is not an array"))?
                .clone(),
        };
        let mut max_id: u64 = 0;
        for v in vocab.values() {
            let id = v
                .as_u64()
                .ok_or_else(|| bad("vocab id is not an integer"))?;
            max_id = max_id.max(id);
        }
        let mut added: Vec<(u32, AddedToken)> = Vec::with_capacity(added_json.len());
        for a in &added_json {
            let id = a
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("added token without integer id"))?;
            let content = a
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("added token without content"))?;
            let flag = |k: &str| a.get(k).and_then(Value::as_bool).unwrap_or(false);
            let special = flag("special");
            let tok = AddedToken {
                content: content.to_string(),
                single_word: flag("single_word"),
                lstrip: flag("lstrip"),
                rstrip: flag("rstrip"),
                normalized: a
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(!special),
                special,
            };
            max_id = max_id.max(id);
            let id = u32::try_from(id).map_err(|_| bad("added token id too large"))?;
            added.push((id, tok));
        }
        let n = usize::try_from(max_id)
            .ok()
            .and_then(|m| m.checked_add(1))
            .filter(|&n| n <= u32::MAX as usize && n <= vocab.len() + added.len())
            .ok_or_else(|| bad("token ids are not contiguous"))?;
        let mut table: Vec<Option<String>> = vec![None; n];
        for (s, v) in vocab {
            let id = v.as_u64().unwrap_or(0) as usize;
            if let Some(prev) = &table[id] {
                return Err(bad(&format!("id {id} used by {prev:?} and {s:?}")));
            }
            table[id] = Some(s.clone());
        }
        let mut kinds = vec![TokenKind::Normal; n];
        for (id, tok) in &added {
            let slot = &mut table[*id as usize];
            match slot {
                Some(prev) if *prev != tok.content => {
                    return Err(bad(&format!(
                        "added token {id} is {:?} but the vocab has {prev:?}",
                        tok.content
                    )));
                }
                _ => *slot = Some(tok.content.clone()),
            }
            kinds[*id as usize] = if tok.special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
        }
        let mut tokens = Vec::with_capacity(n);
        for (i, t) in table.into_iter().enumerate() {
            tokens.push(t.ok_or_else(|| bad(&format!("no token has id {i}")))?);
        }
        let merges_json = model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("model.merges is not an array"))?;
        let mut merges = Vec::with_capacity(merges_json.len());
        for m in merges_json {
            match m {
                Value::String(s) => merges.push(s.clone()),
                Value::Array(pair) if pair.len() == 2 => {
                    let a = pair[0].as_str().ok_or_else(|| bad("bad merge"))?;
                    let b = pair[1].as_str().ok_or_else(|| bad("bad merge"))?;
                    merges.push(format!("{a} {b}"));
                }
                _ => return Err(bad("bad merge entry")),
            }
        }
        Self::build(tokens, merges, kinds, added)
    }

    /// Build from a GGUF file's metadata: `tokenizer.ggml.tokens`, `tokenizer.ggml.merges` and
    /// `tokenizer.ggml.token_type` (optional). `tokenizer.ggml.model`, when present, must be
    /// `gpt2`; `tokenizer.ggml.pre`, when present, must be one of [`ACCEPTED_GGUF_PRE`] (ds4 itself
    /// does not read it; a file without it is assumed to be DeepSeek V4).
    pub fn from_gguf(gguf: &ds4_gguf::Gguf) -> Result<Tokenizer> {
        let v = vocab_from_gguf_metadata(|k| gguf.get(k))?;
        Self::from_vocab(v.tokens, v.merges, v.token_types)
    }

    fn build(
        tokens: Vec<String>,
        merges: Vec<String>,
        kinds: Vec<TokenKind>,
        added: Vec<(u32, AddedToken)>,
    ) -> Result<Tokenizer> {
        if tokens.is_empty() {
            return Err(TokenizerError::EmptyVocab);
        }
        if tokens.len() > u32::MAX as usize / 2 {
            return Err(TokenizerError::VocabTooLarge(tokens.len()));
        }
        let mut vocab: Vocab = Vocab::default();
        vocab.reserve(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if let Some(first) = vocab.insert(t.clone(), i as u32) {
                return Err(TokenizerError::DuplicateToken {
                    token: t.clone(),
                    first,
                    second: i as u32,
                });
            }
        }
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            merge_pairs.push(split_merge(i, m)?);
        }
        for (id, _) in &added {
            if *id as usize >= tokens.len() {
                return Err(TokenizerError::AddedTokenOutOfRange {
                    id: *id,
                    size: tokens.len(),
                });
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merge_pairs)
            .build()
            .map_err(TokenizerError::hf)?;
        let mut hf = tokenizers::Tokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(official_pre_tokenizer()?));
        hf.with_decoder(Some(ByteLevel::default()));
        hf.add_tokens(added.into_iter().map(|(_, t)| t))
            .map_err(TokenizerError::hf)?;

        let lookup = |s: &'static str| -> Result<u32> {
            hf.token_to_id(s).ok_or(TokenizerError::MissingSpecial(s))
        };
        let specials = SpecialTokens {
            bos: lookup(BOS_TEXT)?,
            eos: lookup(EOS_TEXT)?,
            user: lookup(USER_TEXT)?,
            assistant: lookup(ASSISTANT_TEXT)?,
            think_start: lookup(THINK_START_TEXT)?,
            think_end: lookup(THINK_END_TEXT)?,
            dsml: lookup(DSML_TEXT)?,
        };

        let mut bytes = Vec::with_capacity(tokens.iter().map(|t| t.len()).sum());
        let mut byte_offsets = Vec::with_capacity(tokens.len() + 1);
        byte_offsets.push(0u32);
        for (t, k) in tokens.iter().zip(&kinds) {
            if k.is_added() || t.contains('\u{FF5C}') {
                bytes.extend_from_slice(t.as_bytes());
            } else {
                bytes.extend(t.chars().filter_map(bytelevel::char_to_byte));
            }
            let off = u32::try_from(bytes.len())
                .map_err(|_| TokenizerError::VocabTooLarge(tokens.len()))?;
            byte_offsets.push(off);
        }
        Ok(Tokenizer {
            hf,
            tokens,
            kinds,
            merges,
            bytes,
            byte_offsets,
            specials,
        })
    }

    /// Encode with HF semantics: every added token occurring in the text is recognised (like the
    /// Python library's `Tokenizer.encode(text, add_special_tokens=False).ids`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .hf
            .encode_fast(text, false)
            .map_err(TokenizerError::hf)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode raw text with no added-token recognition (pre-tokenizer + BPE only).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        self.encode_plain_into(text, &mut out)?;
        Ok(out)
    }

    fn encode_plain_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let mut pts = PreTokenizedString::from(text);
        if let Some(pre) = self.hf.get_pre_tokenizer() {
            pre.pre_tokenize(&mut pts).map_err(TokenizerError::hf)?;
        }
        let model = self.hf.get_model();
        pts.tokenize(|n| model.tokenize(n.get()))
            .map_err(TokenizerError::hf)?;
        let enc = pts
            .into_encoding(None, 0, OffsetType::None)
            .map_err(TokenizerError::hf)?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// Encode rendered chat text the way ds4's `ds4_tokenize_rendered_chat` splits it: only the
    /// seven ds4 special strings ([`DS4_SPECIAL_TEXTS`]) are recognised (first match in that order
    /// at each position, scanning left to right); all other text, other added tokens included, goes
    /// through [`Tokenizer::encode_plain`].
    pub fn encode_ds4_chat(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.specials.as_array();
        let mut out = Vec::new();
        let bytes = text.as_bytes();
        let mut seg_start = 0usize;
        let mut i = 0usize;
        while i < bytes.len() {
            let mut hit = None;
            if bytes[i] == b'<' || bytes[i] == 0xEF {
                for (k, s) in DS4_SPECIAL_TEXTS.iter().enumerate() {
                    if bytes[i..].starts_with(s.as_bytes()) {
                        hit = Some((ids[k], s.len()));
                        break;
                    }
                }
            }
            match hit {
                Some((id, len)) => {
                    self.encode_plain_into(&text[seg_start..i], &mut out)?;
                    out.push(id);
                    i += len;
                    seg_start = i;
                }
                None => i += 1,
            }
        }
        self.encode_plain_into(&text[seg_start..], &mut out)?;
        Ok(out)
    }

    /// Decode ids to bytes with ds4's `ds4_token_text` rule: added tokens and tokens containing
    /// U+FF5C are emitted verbatim, others through the GPT-2 byte map. Out-of-range ids emit
    /// nothing.
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if let Some(b) = self.token_bytes(id) {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// [`Tokenizer::decode`] as a `String`, invalid UTF-8 replaced by U+FFFD.
    pub fn decode_lossy(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode(ids)).into_owned()
    }

    /// The bytes token `id` stands for (see [`Tokenizer::decode`]).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        if i >= self.tokens.len() {
            return None;
        }
        let a = self.byte_offsets[i] as usize;
        let b = self.byte_offsets[i + 1] as usize;
        Some(&self.bytes[a..b])
    }

    /// The vocabulary entry of `id` as stored (byte-level encoded for normal tokens).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The kind of token `id`.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// The id of a vocabulary entry (as stored), added tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }

    /// Number of ids (129280 for DeepSeek V4).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The whole token table.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// The merges (`"A B"`, rank = index).
    pub fn merges(&self) -> &[String] {
        &self.merges
    }

    /// The ids of the seven ds4 specials.
    pub fn specials(&self) -> SpecialTokens {
        self.specials
    }

    /// `<｜begin▁of▁sentence｜>`
    pub fn bos_id(&self) -> u32 {
        self.specials.bos
    }

    /// `<｜end▁of▁sentence｜>`
    pub fn eos_id(&self) -> u32 {
        self.specials.eos
    }

    /// The underlying HF tokenizer.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.hf
    }

    /// GGUF metadata describing this vocabulary, for `ds4 convert --vocab-only`:
    /// `tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre = "joyai-llm"`, `tokens`,
    /// `token_type` (1 normal, 3 control, 4 user-defined), `merges`, `bos_token_id`,
    /// `eos_token_id`.
    pub fn gguf_vocab_metadata(&self) -> Vec<(String, ds4_gguf::MetaValue)> {
        use ds4_gguf::MetaValue;
        let types: Vec<i32> = self.kinds.iter().map(|k| k.gguf_type()).collect();
        vec![
            (
                "tokenizer.ggml.model".into(),
                MetaValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".into(),
                MetaValue::String(ACCEPTED_GGUF_PRE[0].into()),
            ),
            (
                "tokenizer.ggml.tokens".into(),
                MetaValue::string_array(self.tokens.iter().cloned()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                MetaValue::i32_array(&types),
            ),
            (
                "tokenizer.ggml.merges".into(),
                MetaValue::string_array(self.merges.iter().cloned()),
            ),
            (
                "tokenizer.ggml.bos_token_id".into(),
                MetaValue::U32(self.specials.bos),
            ),
            (
                "tokenizer.ggml.eos_token_id".into(),
                MetaValue::U32(self.specials.eos),
            ),
        ]
    }
}

/// The vocabulary arrays of a GGUF file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.tokens`
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges`
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type`, if present.
    pub token_types: Option<Vec<i32>>,
}

/// Read the vocabulary arrays from GGUF-style metadata, given a key lookup (see
/// [`Tokenizer::from_gguf`] for the checks made).
pub fn vocab_from_gguf_metadata<'a>(
    get: impl Fn(&str) -> Option<&'a ds4_gguf::MetaValue>,
) -> Result<GgufVocab> {
    let key_err = |key: &'static str, problem: &str| TokenizerError::GgufKey {
        key,
        problem: problem.to_string(),
    };
    if let Some(v) = get("tokenizer.ggml.model") {
        let m = v
            .as_str()
            .ok_or_else(|| key_err("tokenizer.ggml.model", "not a string"))?;
        if m != "gpt2" {
            return Err(TokenizerError::UnsupportedPreTokenizer(format!(
                "tokenizer.ggml.model = {m:?}"
            )));
        }
    }
    if let Some(v) = get("tokenizer.ggml.pre") {
        let p = v
            .as_str()
            .ok_or_else(|| key_err("tokenizer.ggml.pre", "not a string"))?;
        if !ACCEPTED_GGUF_PRE.contains(&p) {
            return Err(TokenizerError::UnsupportedPreTokenizer(format!(
                "tokenizer.ggml.pre = {p:?}"
            )));
        }
    }
    let strings = |key: &'static str| -> Result<Vec<String>> {
        let v = get(key).ok_or_else(|| key_err(key, "missing"))?;
        let arr = v
            .as_string_array()
            .ok_or_else(|| key_err(key, "not an array of strings"))?;
        Ok(arr.into_iter().map(str::to_string).collect())
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types = match get("tokenizer.ggml.token_type") {
        None => None,
        Some(v) => {
            let arr = v
                .as_i64_array()
                .ok_or_else(|| key_err("tokenizer.ggml.token_type", "not an integer array"))?;
            let mut out = Vec::with_capacity(arr.len());
            for t in arr {
                out.push(
                    i32::try_from(t)
                        .map_err(|_| key_err("tokenizer.ggml.token_type", "value out of range"))?,
                );
            }
            Some(out)
        }
    };
    Ok(GgufVocab {
        tokens,
        merges,
        token_types: types,
    })
}

fn check_pre_tokenizer_json(v: Option<&serde_json::Value>) -> Result<()> {
    use serde_json::Value;
    let unsupported = |m: String| TokenizerError::UnsupportedPreTokenizer(m);
    let v = v.ok_or_else(|| unsupported("tokenizer.json has no pre_tokenizer".into()))?;
    let describe = || v.to_string().chars().take(200).collect::<String>();
    if v.get("type").and_then(Value::as_str) != Some("Sequence") {
        return Err(unsupported(describe()));
    }
    let list = v
        .get("pretokenizers")
        .and_then(Value::as_array)
        .ok_or_else(|| unsupported(describe()))?;
    if list.len() != 4 {
        return Err(unsupported(describe()));
    }
    for (i, re) in PRE_TOKENIZER_REGEXES.iter().enumerate() {
        let p = &list[i];
        let ok = p.get("type").and_then(Value::as_str) == Some("Split")
            && p.get("pattern")
                .and_then(|x| x.get("Regex"))
                .and_then(Value::as_str)
                == Some(re)
            && p.get("behavior").and_then(Value::as_str) == Some("Isolated")
            && p.get("invert").and_then(Value::as_bool) != Some(true);
        if !ok {
            return Err(unsupported(describe()));
        }
    }
    let bl = &list[3];
    let ok = bl.get("type").and_then(Value::as_str) == Some("ByteLevel")
        && bl.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
        && bl.get("use_regex").and_then(Value::as_bool) == Some(false);
    if !ok {
        return Err(unsupported(describe()));
    }
    Ok(())
}

/// Build a map from token string to id (helper for tests and tools).
pub fn token_index(tokens: &[String]) -> HashMap<&str, u32> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect()
}
