//! Construction paths, GGUF round trip, long-context fixtures, official prompt token counts, chat
//! encodings, error cases and round-trip properties.

mod common;

use common::{Varints, data_dir, fixtures_dir, read_corpus, read_ids, tok, tokenizer_json_path};
use ds4_tokenizer::{
    Message, Role, ThinkMode, TokenKind, Tokenizer, TokenizerError, ToolSchemas,
    chat_append_assistant_prefix, chat_append_max_prefix, chat_append_message, chat_begin,
    encode_cli_prompt, render_chat, render_cli_prompt,
};
use proptest::prelude::*;

#[test]
fn long_context_fixtures_match_python() {
    let Some(t) = tok() else { return };
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("fixture_docs.json")).unwrap(),
    )
    .unwrap();
    let ids = std::fs::read(data_dir().join("fixture_docs.ids")).unwrap();
    let mut r = Varints::new(&ids);
    for e in manifest.as_array().unwrap() {
        let want = r.next_ids();
        let path = fixtures_dir().join(e["path"].as_str().unwrap());
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!("SKIP: {} not found", path.display());
            continue;
        };
        assert_eq!(
            bytes.len() as u64,
            e["bytes"].as_u64().unwrap(),
            "{} changed",
            path.display()
        );
        let text = String::from_utf8(bytes).unwrap();
        let got = t.encode(&text).unwrap();
        assert_eq!(got.len(), want.len(), "{}", path.display());
        assert_eq!(got, want, "{}", path.display());
        // ds4 feeds these pre-rendered prompts through the 7-special path; with no other added
        // tokens in them, the ids are the same.
        assert_eq!(t.encode_ds4_chat(&text).unwrap(), want);
    }
}

#[test]
fn official_vector_prompt_token_counts() {
    let Some(t) = tok() else { return };
    // usage.prompt_tokens of the official API for each prompt (fixtures README).
    let cases = [
        ("short_italian_fact.txt", 21),
        ("short_code_completion.txt", 27),
        ("short_reasoning_plain.txt", 18),
        ("long_code_audit.txt", 3844),
        ("long_memory_archive.txt", 3353),
    ];
    for (file, want) in cases {
        let prompt =
            std::fs::read_to_string(data_dir().join("official_prompts").join(file)).unwrap();
        let text = render_cli_prompt("", &prompt, ThinkMode::None);
        let ids = t.encode(&text).unwrap();
        assert_eq!(ids.len(), want, "{file}");
        assert_eq!(
            encode_cli_prompt(t, "", &prompt, ThinkMode::None).unwrap(),
            ids,
            "{file}"
        );
        let chat = render_chat(
            &[Message::user(prompt.clone())],
            &ToolSchemas::new(),
            ThinkMode::None,
        );
        assert_eq!(chat, text);
    }
}

#[test]
fn cli_and_repl_encodings() {
    let Some(t) = tok() else { return };
    let sp = t.specials();
    let ids = encode_cli_prompt(t, "You are a helpful assistant", "Ciao", ThinkMode::Max).unwrap();
    let mut want = vec![sp.bos];
    want.extend(t.encode_plain(ds4_tokenizer::THINK_MAX_PREFIX).unwrap());
    want.extend(t.encode_plain("You are a helpful assistant").unwrap());
    want.push(sp.user);
    want.extend(t.encode_plain("Ciao").unwrap());
    want.extend([sp.assistant, sp.think_start]);
    assert_eq!(ids, want);
    // Already rendered: the seven specials only.
    let pre = "<｜begin▁of▁sentence｜><｜User｜>x<｜tool▁sep｜><｜Assistant｜></think>";
    let ids = encode_cli_prompt(t, "ignored", pre, ThinkMode::High).unwrap();
    assert_eq!(ids, t.encode_ds4_chat(pre).unwrap());
    assert_ne!(ids, t.encode(pre).unwrap());
    assert_eq!(t.encode(pre).unwrap()[3], 128814);

    // REPL transcript: pieces tokenized separately ("Tool: " apart from the content).
    let mut ids = chat_begin(t);
    chat_append_max_prefix(t, &mut ids).unwrap();
    chat_append_message(t, &mut ids, &Role::System, "Sys.").unwrap();
    chat_append_message(t, &mut ids, &Role::User, "hi").unwrap();
    chat_append_message(t, &mut ids, &Role::Assistant, "yo").unwrap();
    chat_append_message(t, &mut ids, &Role::Tool, "out").unwrap();
    chat_append_assistant_prefix(t, &mut ids, ThinkMode::None);
    let mut want = vec![sp.bos];
    want.extend(t.encode_plain(ds4_tokenizer::THINK_MAX_PREFIX).unwrap());
    want.extend(t.encode_plain("Sys.").unwrap());
    want.push(sp.user);
    want.extend(t.encode_plain("hi").unwrap());
    want.extend([sp.assistant, sp.think_end]);
    want.extend(t.encode_plain("yo").unwrap());
    want.push(sp.user);
    want.extend(t.encode_plain("Tool: ").unwrap());
    want.extend(t.encode_plain("out").unwrap());
    want.extend([sp.assistant, sp.think_end]);
    assert_eq!(ids, want);
}

#[test]
fn token_tables() {
    let Some(t) = tok() else { return };
    assert_eq!(t.vocab_size(), 129_280);
    assert_eq!(t.merges().len(), 127_741);
    let kinds: Vec<TokenKind> = (0..t.vocab_size() as u32)
        .map(|i| t.token_kind(i).unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == TokenKind::Control).count(),
        1230
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == TokenKind::UserDefined)
            .count(),
        53
    );
    assert_eq!(t.token_kind(128803), Some(TokenKind::UserDefined));
    assert_eq!(t.token_kind(0), Some(TokenKind::Control));
    assert_eq!(t.token_str(223), Some("Ġ"));
    assert_eq!(t.token_bytes(223), Some(&b" "[..]));
    assert_eq!(t.token_bytes(510), Some(&b";\n"[..]));
    assert_eq!(t.token_str(128825), Some("｜DSML｜"));
    assert_eq!(t.token_bytes(128825), Some("｜DSML｜".as_bytes()));
    assert_eq!(t.token_bytes(129_280), None);
    assert_eq!(t.decode(&[19923, 129_999, 2058]), b"Hello world");
    assert_eq!(t.token_to_id("<think>"), Some(128821));
    assert_eq!(t.bos_id(), 0);
    assert_eq!(t.eos_id(), 1);
    // A token that is only part of a UTF-8 character.
    let e_acute = t.encode("é").unwrap();
    assert_eq!(t.decode(&e_acute), "é".as_bytes());
    assert_eq!(t.decode_lossy(&[t.token_to_id("Ã").unwrap()]), "\u{FFFD}");
}

/// `from_vocab` without token types (added tokens inferred), `from_gguf` (through a GGUF written
/// from `gguf_vocab_metadata`) and the HF library's own `Tokenizer::from_file` all agree with
/// `from_tokenizer_json` on the corpus.
#[test]
fn construction_paths_agree() {
    let Some(t) = tok() else { return };
    let Some(path) = tokenizer_json_path() else {
        return;
    };

    let t0 = std::time::Instant::now();
    let inferred = Tokenizer::from_vocab(t.tokens().to_vec(), t.merges().to_vec(), None).unwrap();
    eprintln!(
        "from_vocab (129280 tokens, inferred kinds) in {:?}",
        t0.elapsed()
    );
    for id in 0..t.vocab_size() as u32 {
        assert_eq!(
            inferred.token_kind(id).unwrap().is_added(),
            t.token_kind(id).unwrap().is_added(),
            "id {id}"
        );
    }
    assert_eq!(inferred.specials(), t.specials());

    let mut b = ds4_gguf::GgufBuilder::new();
    for (k, v) in t.gguf_vocab_metadata() {
        b.add_metadata(k, v).unwrap();
    }
    let gguf = ds4_gguf::Gguf::from_bytes(b.header_bytes()).unwrap();
    assert_eq!(
        gguf.get("tokenizer.ggml.pre").and_then(|v| v.as_str()),
        Some("joyai-llm")
    );
    let from_gguf = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(from_gguf.tokens(), t.tokens());
    assert_eq!(from_gguf.merges(), t.merges());
    for id in 0..t.vocab_size() as u32 {
        assert_eq!(from_gguf.token_kind(id), t.token_kind(id));
    }

    let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
    let docs = read_corpus("corpus");
    let ids = read_ids("corpus.ids");
    for (i, ((cat, text), want)) in docs.iter().zip(&ids).enumerate() {
        if i % 3 != 0 && cat != "specials" && cat != "chat" {
            continue;
        }
        assert_eq!(&inferred.encode(text).unwrap(), want, "inferred, doc {i}");
        assert_eq!(&from_gguf.encode(text).unwrap(), want, "gguf, doc {i}");
        assert_eq!(
            hf.encode_fast(text.as_str(), false).unwrap().get_ids(),
            &want[..],
            "hf, doc {i}"
        );
    }
}

#[test]
fn errors_are_typed() {
    // A toy byte-level vocab: the 256 byte characters, one merge, and the seven specials.
    let mut tokens: Vec<String> = (0..=255u8)
        .map(|b| ds4_tokenizer::bytelevel::byte_to_char(b).to_string())
        .collect();
    tokens.push("ab".to_string());
    let specials = ds4_tokenizer::DS4_SPECIAL_TEXTS;
    let merges = vec!["a b".to_string()];
    let mut full = tokens.clone();
    full.extend(specials.iter().map(|s| s.to_string()));
    let t = Tokenizer::from_vocab(full.clone(), merges.clone(), None).unwrap();
    assert_eq!(t.encode("ab<think>").unwrap(), vec![256, 257 + 4]);
    assert_eq!(t.encode_plain("<think>").unwrap().len(), 7);

    let mut missing = tokens.clone();
    missing.extend(
        specials
            .iter()
            .filter(|s| **s != "｜DSML｜")
            .map(|s| s.to_string()),
    );
    assert!(matches!(
        Tokenizer::from_vocab(missing, merges.clone(), None),
        Err(TokenizerError::MissingSpecial("｜DSML｜"))
    ));
    let mut dup = full.clone();
    dup.push("ab".into());
    assert!(matches!(
        Tokenizer::from_vocab(dup, merges.clone(), None),
        Err(TokenizerError::DuplicateToken { first: 256, .. })
    ));
    assert!(matches!(
        Tokenizer::from_vocab(full.clone(), vec!["ab".into()], None),
        Err(TokenizerError::BadMerge { index: 0, .. })
    ));
    assert!(matches!(
        Tokenizer::from_vocab(full.clone(), merges.clone(), Some(vec![1; 3])),
        Err(TokenizerError::TokenTypeLength { got: 3, .. })
    ));
    assert!(matches!(
        Tokenizer::from_vocab(full.clone(), vec!["a zz".into()], None),
        Err(TokenizerError::Hf(_))
    ));
    assert!(matches!(
        Tokenizer::from_vocab(vec![], vec![], None),
        Err(TokenizerError::EmptyVocab)
    ));

    // GGUF with another pre-tokenizer is refused; without tokens it is a key error.
    let mut b = ds4_gguf::GgufBuilder::new();
    for (k, v) in t.gguf_vocab_metadata() {
        let v = if k == "tokenizer.ggml.pre" {
            ds4_gguf::MetaValue::String("llama-bpe".into())
        } else {
            v
        };
        b.add_metadata(k, v).unwrap();
    }
    let g = ds4_gguf::Gguf::from_bytes(b.header_bytes()).unwrap();
    assert!(matches!(
        Tokenizer::from_gguf(&g),
        Err(TokenizerError::UnsupportedPreTokenizer(_))
    ));
    let g = ds4_gguf::Gguf::from_bytes(ds4_gguf::GgufBuilder::new().header_bytes()).unwrap();
    assert!(matches!(
        Tokenizer::from_gguf(&g),
        Err(TokenizerError::GgufKey {
            key: "tokenizer.ggml.tokens",
            ..
        })
    ));

    // tokenizer.json with a different pre-tokenizer.
    let json = serde_json::json!({
        "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "added_tokens": []
    });
    assert!(matches!(
        Tokenizer::from_tokenizer_json_bytes(json.to_string().as_bytes()),
        Err(TokenizerError::UnsupportedPreTokenizer(_))
    ));
    assert!(matches!(
        Tokenizer::from_tokenizer_json_bytes(b"{not json"),
        Err(TokenizerError::InvalidTokenizerJson(_))
    ));
    assert!(matches!(
        Tokenizer::from_tokenizer_json("/nonexistent/tokenizer.json"),
        Err(TokenizerError::Io { .. })
    ));
}

// Random text mixing scripts, whitespace, digits and special tokens.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("<｜begin▁of▁sentence｜>".to_string()),
        Just("<｜User｜>".to_string()),
        Just("<｜Assistant｜>".to_string()),
        Just("<think>".to_string()),
        Just("</think>".to_string()),
        Just("｜DSML｜".to_string()),
        Just("<｜tool▁sep｜>".to_string()),
        Just("<｜place▁holder▁no▁7｜>".to_string()),
        Just("<|EOT|>".to_string()),
        Just("<｜".to_string()),
        "[ \t\n\r\u{b}\u{c}\u{a0}\u{3000}]{1,20}",
        "[0-9]{1,40}",
        "[a-zA-Z]{1,12}",
        "[àèéìòùçß]{1,5}",
        "[一-龥]{1,6}",
        "[ぁ-ゟ゠-ヿ]{1,6}",
        "[가-힣]{1,4}",
        "[а-яА-Я]{1,8}",
        "[!-/:-@\\[-`{-~]{1,6}",
        Just("😀👨‍👩‍👧🇮🇹".to_string()),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// decode(encode(s)) == s for arbitrary strings, with and without added-token recognition.
    #[test]
    fn decode_encode_roundtrip(parts in prop::collection::vec(piece(), 0..24)) {
        let Some(t) = tok() else { return Ok(()) };
        let s = parts.concat();
        prop_assert_eq!(t.decode(&t.encode(&s).unwrap()), s.as_bytes());
        prop_assert_eq!(t.decode(&t.encode_plain(&s).unwrap()), s.as_bytes());
        prop_assert_eq!(t.decode(&t.encode_ds4_chat(&s).unwrap()), s.as_bytes());
        // Plain encoding never produces an added token; ds4 chat encoding only the seven.
        let sp = t.specials().as_array();
        for id in t.encode_plain(&s).unwrap() {
            prop_assert!(!t.token_kind(id).unwrap().is_added());
        }
        for id in t.encode_ds4_chat(&s).unwrap() {
            prop_assert!(!t.token_kind(id).unwrap().is_added() || sp.contains(&id));
        }
    }
}
