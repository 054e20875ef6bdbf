//! Tokenizer metadata: `--tokenizer-json` on a model conversion and `--vocab-only`.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::*;
use ds4_convert::{ConvertError, ConvertOptions, Recipe, convert_checkpoint, convert_vocab_only};
use ds4_gguf::Gguf;
use ds4_tokenizer::{DS4_SPECIAL_TEXTS, Tokenizer};
use serde_json::Value;

fn real_tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/tokenizer.json")
}

const TEXT: &str = "Hello world! Ciao, come stai? 12345 <｜User｜>x<｜Assistant｜></think>";

/// The real tokenizer cut down to `n` ids: the first regular tokens, the merges among them, and
/// ds4's special tokens moved to the top ids.
fn small_tokenizer_json(n: usize, dir: &Path) -> PathBuf {
    let mut root: Value =
        serde_json::from_str(&std::fs::read_to_string(real_tokenizer()).unwrap()).unwrap();
    let specials: Vec<&str> = DS4_SPECIAL_TEXTS.to_vec();
    let mut added = Vec::new();
    let mut next_top = n;
    for a in root["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        let content = a["content"].as_str().unwrap();
        if id < n - specials.len() {
            added.push(a.clone());
        } else if specials.contains(&content) {
            next_top -= 1;
            let mut a = a.clone();
            a["id"] = next_top.into();
            added.push(a);
        }
    }
    let n_regular = next_top;
    let vocab = root["model"]["vocab"].as_object().unwrap();
    let kept: serde_json::Map<String, Value> = vocab
        .iter()
        .filter(|(_, id)| (id.as_u64().unwrap() as usize) < n_regular)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let names: HashSet<&str> = kept.keys().map(String::as_str).collect();
    let merges: Vec<Value> = root["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let s = m.as_str().unwrap();
            let (a, b) = s.split_once(' ').unwrap();
            names.contains(a) && names.contains(b) && names.contains(format!("{a}{b}").as_str())
        })
        .cloned()
        .collect();
    root["model"]["vocab"] = Value::Object(kept);
    root["model"]["merges"] = Value::Array(merges);
    root["added_tokens"] = Value::Array(added);
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&root).unwrap()).unwrap();
    path
}

#[test]
fn model_with_matching_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let tj = small_tokenizer_json(4096, dir.path());
    let json_tok = Tokenizer::from_tokenizer_json(&tj).unwrap();
    assert_eq!(json_tok.vocab_size(), 4096);
    let out = dir.path().join("tiny.gguf");
    let opts = ConvertOptions {
        tokenizer_json: Some(tj.clone()),
        ..ConvertOptions::new(Recipe::F16)
    };
    let rep = convert_checkpoint(&repo_tiny(), &out, &opts, &mut |_| {}).unwrap();
    assert!(rep.tokenizer);
    let g = Gguf::open(&out).unwrap();
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_string_array()
        .unwrap();
    assert_eq!(tokens.len(), 4096);
    assert_eq!(
        tokens,
        json_tok
            .tokens()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    let gguf_tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(
        gguf_tok.encode(TEXT).unwrap(),
        json_tok.encode(TEXT).unwrap()
    );
    ds4_model::Shape::from_gguf(&g).unwrap();
}

#[test]
fn tokenizer_with_another_vocab_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.gguf");
    let opts = ConvertOptions {
        tokenizer_json: Some(real_tokenizer()),
        ..ConvertOptions::new(Recipe::F32)
    };
    match convert_checkpoint(&repo_tiny(), &out, &opts, &mut |_| {}) {
        Err(ConvertError::VocabMismatch {
            tokenizer_vocab,
            model_vocab,
            ..
        }) => assert_eq!((tokenizer_vocab, model_vocab), (129280, 4096)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // An unreadable tokenizer is a typed error too.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let opts = ConvertOptions {
        tokenizer_json: Some(bad),
        ..ConvertOptions::new(Recipe::F32)
    };
    assert!(matches!(
        convert_checkpoint(&repo_tiny(), &out, &opts, &mut |_| {}),
        Err(ConvertError::Tokenizer { .. })
    ));
    assert!(!out.exists());
}

#[test]
fn vocab_only_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vocab.gguf");
    let n = convert_vocab_only(&real_tokenizer(), &out).unwrap();
    assert_eq!(n, std::fs::metadata(&out).unwrap().len());
    let g = Gguf::open(&out).unwrap();
    assert!(g.tensors().is_empty());
    assert_eq!(
        g.get("tokenizer.ggml.tokens")
            .unwrap()
            .as_string_array()
            .unwrap()
            .len(),
        129280
    );
    let json_tok = Tokenizer::from_tokenizer_json(real_tokenizer()).unwrap();
    let gguf_tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(gguf_tok.vocab_size(), 129280);
    assert_eq!(
        gguf_tok.encode(TEXT).unwrap(),
        json_tok.encode(TEXT).unwrap()
    );
    assert_eq!(
        gguf_tok.specials().as_array(),
        json_tok.specials().as_array()
    );
}
