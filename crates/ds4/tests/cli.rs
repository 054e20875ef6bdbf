//! End-to-end tests of the `ds4` binary on tiny models: the built-in model (random weights, real
//! tokenizer) and the 6-layer official-format fixture converted to f32.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ds4_model::npy;

const BIN: &str = env!("CARGO_BIN_EXE_ds4");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One directory for the built-in model and the converted fixture, under Cargo's scratch
/// directory for integration tests (reused across runs, nothing left in /tmp). The binary finds
/// the built-in model there through `TMPDIR`, so parallel tests never race to write it.
fn shared_tmp() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ds4-cli");
        std::fs::create_dir_all(&d).unwrap();
        // The name `ds4_convert::builtin::tiny_path` uses; the file is written aside and
        // renamed in, so a run killed mid-write leaves no truncated model, and an unreadable
        // leftover is replaced.
        let name = format!(
            "ds4-rs-builtin-tiny-v{}-{:x}.gguf",
            ds4_convert::synth::SYNTH_VERSION,
            ds4_convert::builtin::SEED
        );
        if ds4_gguf::Gguf::open(d.join(&name)).is_err() {
            let fresh = d.join(format!("fresh-{}", std::process::id()));
            std::fs::create_dir_all(&fresh).unwrap();
            let p = ds4_convert::builtin::tiny_path(Some(&fresh)).unwrap();
            assert_eq!(p.file_name().unwrap().to_str(), Some(name.as_str()));
            std::fs::rename(&p, d.join(&name)).unwrap();
            let _ = std::fs::remove_dir_all(&fresh);
        }
        d
    })
}

fn builtin() -> PathBuf {
    let p = ds4_convert::builtin::tiny_path(Some(shared_tmp())).unwrap();
    assert!(p.is_file());
    p
}

/// The tiny official fixture converted with `ds4 convert --quant f32` (once per run).
fn tiny_f32() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = shared_tmp().join("tiny-f32.gguf");
        let tmp = shared_tmp().join(format!("tiny-f32.gguf.{}", std::process::id()));
        let o = ds4(
            &[
                "convert",
                repo()
                    .join("tests/fixtures/tiny/official")
                    .to_str()
                    .unwrap(),
                "--quant",
                "f32",
                "-o",
                tmp.to_str().unwrap(),
            ],
            None,
        );
        assert!(o.status.success(), "convert failed: {}", stderr(&o));
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
}

/// A single-instance lock path of its own for every spawned `ds4` (`DS4_LOCK_FILE`), so tests
/// running in parallel never refuse each other: `<shared tmp>/locks/<test pid>/<n>.lock`.
fn own_lock_file() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    // One directory per test process (a concurrent test process must not remove another's);
    // a leftover of an earlier process with the same pid goes.
    let dir = DIR.get_or_init(|| {
        let d = shared_tmp()
            .join("locks")
            .join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    let n = N.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{n}.lock"))
}

/// A `ds4` command: TMPDIR at the shared directory, no DS4_MODEL from the environment, a lock
/// file of its own (`.env("DS4_LOCK_FILE", …)` after this overrides it).
fn cmd(args: &[&str], cwd: Option<&Path>) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("TMPDIR", shared_tmp())
        .env("DS4_LOCK_FILE", own_lock_file())
        .env_remove("DS4_MODEL")
        .env_remove("RUST_LOG")
        .env("DS4_THREADS", "2");
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c
}

fn ds4(args: &[&str], cwd: Option<&Path>) -> Output {
    cmd(args, cwd).stdin(Stdio::null()).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit and exactly one line on stderr, `ds4: error: ...`.
fn assert_one_line_failure(o: &Output, what: &str) -> String {
    assert!(!o.status.success(), "{what}: should fail");
    let e = stderr(o);
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: stderr should be one line: {e:?}");
    assert!(lines[0].starts_with("ds4: error: "), "{what}: {e:?}");
    lines[0].to_string()
}

/// `-m M -p Hello --nothink --temp 0 -c 256`: a short greedy one-shot on model `m`.
fn greedy_hello(m: &Path) -> Vec<&str> {
    vec![
        "-m",
        p(m),
        "-p",
        "Hello",
        "--nothink",
        "--temp",
        "0",
        "-c",
        "256",
    ]
}

/// `bench -m M --ctx-start 8 --ctx-max 8 -n 1`: the smallest bench run on model `m`.
fn one_bench_step(m: &Path) -> Vec<&str> {
    vec![
        "bench",
        "-m",
        p(m),
        "--ctx-start",
        "8",
        "--ctx-max",
        "8",
        "-n",
        "1",
    ]
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn tokenize_json_prints_only_the_ids() {
    let text = "Hello world! Ciao, mondo — 你好 <｜User｜> 12345";
    let m = builtin();
    let o = ds4(&["tokenize", "-m", p(&m), "-p", text, "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "one line: {out:?}");
    let ids: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    let g = ds4_gguf::Gguf::open(&m).unwrap();
    let tok = ds4_tokenizer::Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(ids, tok.encode(text).unwrap());
    assert!(!ids.is_empty());
}

#[test]
fn vocab_only_convert_then_tokenize() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = dir.path().join("vocab.gguf");
    let tj = repo().join("tests/fixtures/tokenizer/tokenizer.json");
    let o = ds4(
        &[
            "convert",
            "--vocab-only",
            "--tokenizer-json",
            p(&tj),
            "-o",
            p(&vocab),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = "fn main() { println!(\"DeepSeek V4 Flash\"); } // ds4-rs";
    let o = ds4(&["tokenize", "-m", p(&vocab), "-p", text, "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<u32> = serde_json::from_str(stdout(&o).trim()).unwrap();
    let tok =
        ds4_tokenizer::Tokenizer::from_tokenizer_json_bytes(&std::fs::read(&tj).unwrap()).unwrap();
    assert_eq!(ids, tok.encode(text).unwrap());
    // The same ids through the built-in model's embedded tokenizer.
    let o = ds4(
        &["tokenize", "-m", p(&builtin()), "-p", text, "--json"],
        None,
    );
    let ids2: Vec<u32> = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(ids, ids2);
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn convert_f32_then_run_with_every_dump() {
    let m = tiny_f32();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.npy"),
        dir.path().join("b.npy"),
        dir.path().join("c.json"),
    );
    let ids = "0,17,401,9,2203,88,3071,12";
    let n_prompt = 8;
    let o = ds4(
        &[
            "run",
            "-m",
            p(m),
            "--prompt-ids",
            ids,
            "-n",
            "4",
            "--temp",
            "0",
            "-c",
            "256",
            "--json",
            "--dump-logits",
            p(&a),
            "--dump-prompt-logits",
            p(&b),
            "--dump-logprobs",
            p(&c),
            "--logprobs-top-k",
            "3",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "--json prints one object: {out:?}");
    let doc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(doc["tokens"].clone()).unwrap();
    assert_eq!(tokens.len(), 4);
    assert_eq!(doc["prompt_tokens"], n_prompt);

    let la = npy::read(&a).unwrap();
    let lb = npy::read(&b).unwrap();
    let vocab = 4096;
    assert_eq!(la.shape, [4, vocab]);
    assert_eq!(lb.shape, [n_prompt, vocab]);
    let (ra, rb) = (la.to_f32().unwrap(), lb.to_f32().unwrap());
    // Row 0 of the generation dump is the logits after the last prompt token: bit-identical.
    assert_eq!(&rb[(n_prompt - 1) * vocab..], &ra[..vocab]);
    // Greedy: every generated token is the argmax of its row.
    for (i, &t) in tokens.iter().enumerate() {
        assert_eq!(argmax(&ra[i * vocab..(i + 1) * vocab]), t, "row {i}");
    }
    assert!(ra.iter().chain(&rb).all(|v| v.is_finite()));

    let lp: serde_json::Value = serde_json::from_slice(&std::fs::read(&c).unwrap()).unwrap();
    assert_eq!(lp["top_k"], 3);
    let steps = lp["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["selected"]["id"], tokens[i]);
        let top = s["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"]["id"], tokens[i]);
        let l0 = top[0]["logprob"].as_f64().unwrap();
        assert!(l0 <= 0.0 && l0 >= top[1]["logprob"].as_f64().unwrap());
        let logit = top[0]["logit"].as_f64().unwrap();
        assert_eq!(logit as f32, ra[i * vocab + tokens[i] as usize]);
    }

    // --dump-tokens prints the prompt ids and exits.
    let o = ds4(
        &["run", "-m", p(m), "--prompt-ids", ids, "--dump-tokens"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).lines().next().unwrap(),
        "[0, 17, 401, 9, 2203, 88, 3071, 12]"
    );
}

#[test]
fn builtin_fallback_is_announced() {
    let cwd = tempfile::tempdir().unwrap();
    let o = ds4(
        &[
            "run", "-p", "Hi", "-n", "2", "--temp", "0", "--json", "-c", "512",
        ],
        Some(cwd.path()),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("using the tiny built-in model"),
        "{}",
        stderr(&o)
    );
    let doc: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(doc["builtin_model"], true);
    assert_eq!(doc["tokens"].as_array().unwrap().len(), 2);
}

/// `--perplexity-file` equals the NLL computed from `--dump-prompt-logits` of the same tokens.
#[test]
fn perplexity_file_matches_the_prompt_logits() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(12),
    )
    .unwrap();
    let m = builtin();
    let (m, t) = (m.to_str().unwrap(), text.to_str().unwrap());
    let o = ds4(&["run", "-m", m, "--perplexity-file", t, "-n", "40"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let field = |k: &str| -> f64 {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {out:?}"))
            .parse()
            .unwrap()
    };
    let o = ds4(&["tokenize", "-m", m, "--text-file", t, "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<u32> = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(field("tokens") as usize, ids.len());
    assert_eq!(field("scored"), 40.0, "-n caps the scored tokens");
    // Reference: the logits after each of the first 32 + 39 tokens, in one prompt.
    let evaluated: Vec<String> = ids[..32 + 39].iter().map(|i| i.to_string()).collect();
    let dump = dir.path().join("p.npy");
    let o = ds4(
        &[
            "run",
            "-m",
            m,
            "--prompt-ids",
            &evaluated.join(","),
            "-n",
            "1",
            "--dump-prompt-logits",
            dump.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let d = npy::read(&dump).unwrap();
    let vocab = d.shape[1];
    let rows = d.to_f32().unwrap();
    let nll: f64 = (32..32 + 40)
        .map(|j| {
            let row = &rows[(j - 1) * vocab..j * vocab];
            npy::logsumexp(row) - row[ids[j] as usize] as f64
        })
        .sum();
    assert!(
        (field("nll") - nll).abs() <= 1e-6 * nll,
        "{} vs {nll}",
        field("nll")
    );
    let avg = field("avg_nll");
    assert!((avg - nll / 40.0).abs() <= 1e-6 * avg);
    assert!((field("ppl") - avg.exp()).abs() <= 1e-6 * avg.exp());
    // Too short a text is a one-line error.
    std::fs::write(&text, "Too short.").unwrap();
    let o = ds4(&["run", "-m", m, "--perplexity-file", t], None);
    assert_one_line_failure(&o, "short perplexity text");
}

/// `ds4 chat` with `args` on the built-in model, all three streams piped.
fn spawn_chat(args: &[&str], cwd: &Path) -> std::process::Child {
    let mut a = vec!["chat"];
    a.extend_from_slice(args);
    cmd(&a, Some(cwd))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `ds4 chat` (greedy, `-n n`, 1024-token context, no thinking, `--verbose`) fed `input` on
/// stdin (then closed); its output once it exits.
fn chat_with_input(n: &str, input: &[u8]) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    let args = [
        "--temp",
        "0",
        "-n",
        n,
        "-c",
        "1024",
        "--nothink",
        "--verbose",
    ];
    let mut child = spawn_chat(&args, cwd.path());
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn chat_reuses_the_kv_across_turns() {
    let o = chat_with_input("3", b"Hello there\nAnd a second question\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    let turns: Vec<(usize, usize)> = e
        .lines()
        .filter_map(|l| l.strip_prefix("ds4: turn "))
        .map(|l| {
            let nums: Vec<usize> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|s| s.parse().ok())
                .collect();
            (nums[1], nums[2]) // (reused, prefilled); nums[0] is the turn
        })
        .collect();
    assert_eq!(turns.len(), 2, "{e}");
    assert_eq!(turns[0].0, 0, "first turn starts cold");
    assert!(turns[0].1 > 0);
    // Second turn: the whole first exchange (system, user, the reply up to its last sampled
    // token) is reused; only the new tail is prefilled.
    assert!(turns[1].0 >= turns[0].1, "{turns:?}");
    assert!(turns[1].1 > 0 && turns[1].1 < turns[1].0, "{turns:?}");
    assert!(!stdout(&o).trim().is_empty());
}

#[test]
fn chat_survives_failing_commands() {
    let o = chat_with_input(
        "3",
        b"/read /nonexistent/ds4-test-file\n/ctx abc\n/ctx 0\nHello there\n",
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("ds4: cannot read /nonexistent/ds4-test-file"),
        "{e}"
    );
    assert!(e.contains("ds4: usage: /ctx N"), "{e}");
    // The turn after the failed commands still runs, on the original context.
    assert!(e.contains("ds4: turn 1:"), "{e}");
    assert!(!stdout(&o).trim().is_empty());
}

/// Ctrl+C during a reply ends the reply and returns to the prompt; at the prompt it exits 130.
#[cfg(unix)]
#[test]
fn chat_ctrl_c_ends_the_reply_not_the_repl() {
    use std::sync::mpsc;
    let cwd = tempfile::tempdir().unwrap();
    let args = ["--temp", "0", "-n", "100000", "-c", "4096", "--nothink"];
    let mut child = spawn_chat(&args, cwd.path());
    let pid = child.id().to_string();
    let sigint = || {
        let st = Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(st.success());
    };
    // Both streams are read on threads; their events arrive here.
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let mut out = child.stdout.take().unwrap();
    let txo = tx.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0
                || txo
                    .send((true, String::from_utf8_lossy(&buf[..n]).into()))
                    .is_err()
            {
                break;
            }
        }
    });
    let err = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            if tx.send((false, l)).is_err() {
                break;
            }
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Tell me a long story\n").unwrap();
    stdin.flush().unwrap();
    let mut log = String::new();
    let mut wait_for = |what: &dyn Fn(bool, &str) -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while let Ok((is_out, text)) =
            rx.recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            log.push_str(&text);
            log.push('\n');
            if what(is_out, &text) {
                return true;
            }
        }
        false
    };
    // The reply has started (tokens on stdout), well inside its ~4000-token budget.
    assert!(
        wait_for(&|is_out, t| is_out && !t.trim().is_empty()),
        "no reply: {log}"
    );
    sigint();
    assert!(
        wait_for(&|is_out, t| !is_out && t.contains("ds4: interrupted")),
        "{log}"
    );
    // The turn closes (its timing line) and the REPL takes the next line.
    assert!(
        wait_for(&|is_out, t| !is_out && t.starts_with("ds4: prefill:")),
        "{log}"
    );
    stdin.write_all(b"/nothink\n").unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_for(&|is_out, t| !is_out && t == "Thinking mode: none."),
        "{log}"
    );
    // Idle at the prompt: Ctrl+C exits with 130.
    sigint();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "{log}");
}

/// Ctrl+C before the first token of a reply (here during a long prefill) stops the prefill at
/// its next chunk and drops the turn, as ds4 does: the next turn no longer extends the live
/// state (it is prefilled from scratch: reused 0).
#[cfg(unix)]
#[test]
fn chat_ctrl_c_before_the_first_token_drops_the_turn() {
    let cwd = tempfile::tempdir().unwrap();
    // ~12000 tokens: a prefill of seconds on the built-in model in this profile.
    let big: String = (0..6000).map(|i| format!("word{} ", i % 500)).collect();
    std::fs::write(cwd.path().join("big.txt"), big).unwrap();
    let args = ["--temp", "0", "-n", "4", "-c", "16384", "--nothink", "-v"];
    let mut child = ChildGuard(spawn_chat(&args, cwd.path()));
    let pid = child.0.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let err = BufReader::new(child.0.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut out = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while matches!(out.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut log = String::new();
    let mut wait_for = |what: &dyn Fn(&str) -> bool| {
        let end = Instant::now() + Duration::from_secs(180);
        while let Ok(l) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            log.push_str(&l);
            log.push('\n');
            if what(&l) {
                return Some(l);
            }
        }
        None
    };
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(b"/read big.txt\n").unwrap();
    stdin.flush().unwrap();
    // The turn starts (its sync runs for seconds); Ctrl+C lands inside the prefill.
    std::thread::sleep(Duration::from_millis(1500));
    let st = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(st.success());
    // The prefill stops at its next chunk: turn 1 never reaches its verbose line.
    let stopped = wait_for(&|l| l.starts_with("ds4: turn 1:") || l.contains("ds4: interrupted"))
        .unwrap_or_default();
    assert!(
        stopped.contains("ds4: interrupted (prefill stopped at"),
        "the prefill stopped: {stopped:?}"
    );
    stdin.write_all(b"hi\n").unwrap();
    stdin.flush().unwrap();
    let turn2 = wait_for(&|l| l.starts_with("ds4: turn 2:")).unwrap_or_default();
    assert!(
        turn2.contains("reused 0 tokens"),
        "turn 2: {turn2:?}\n{log}"
    );
    assert!(
        wait_for(&|l| l.starts_with("ds4: prefill:")).is_some(),
        "{log}"
    );
    stdin.write_all(b"/quit\n").unwrap();
    stdin.flush().unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "chat did not end: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.0.wait().unwrap().success(), "{log}");
}

/// `ds4 drift` reads antirez/ds4's `--dump-logits` JSON (one row, `null` = non-finite) against
/// an .npy row.
#[test]
fn drift_reads_ds4_json_dumps() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = 64usize;
    let r: Vec<f32> = (0..vocab)
        .map(|i| ((i * 37) % 61) as f32 * 0.25 - 7.0)
        .collect();
    let pr = dir.path().join("r.npy");
    npy::write(&pr, &[1, vocab], &r).unwrap();
    let json = |logits: Vec<serde_json::Value>| {
        serde_json::json!({"source": "ds4", "model": "x", "backend": "metal", "prompt_tokens": 5,
            "ctx": 4096, "vocab": vocab, "argmax_logit": 0.0, "logits": logits})
        .to_string()
    };
    let pj = dir.path().join("ds4.json");
    std::fs::write(&pj, json(r.iter().map(|&v| serde_json::json!(v)).collect())).unwrap();
    let o = ds4(&["drift", p(&pr), p(&pj), "--max-abs", "0", "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["summary"]["rows"], 1);
    assert_eq!(doc["summary"]["worst_max_abs"], 0.0);
    // A null logit is a non-finite one: the comparison fails and says so.
    let mut with_null: Vec<serde_json::Value> = r.iter().map(|&v| serde_json::json!(v)).collect();
    with_null[3] = serde_json::Value::Null;
    std::fs::write(&pj, json(with_null)).unwrap();
    let o = ds4(&["drift", p(&pj), p(&pr)], None);
    let line = assert_one_line_failure(&o, "null logit");
    assert!(line.contains("non-finite"), "{line}");
    // Not a dump at all: a one-line error.
    std::fs::write(&pj, "{\"source\": \"ds4\"}").unwrap();
    let o = ds4(&["drift", p(&pr), p(&pj)], None);
    assert_one_line_failure(&o, "JSON without logits");
}

#[test]
fn drift_passes_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, vocab) = (3usize, 64usize);
    let r: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % 101) as f32 * 0.1 - 5.0)
        .collect();
    let mut c = r.clone();
    // Row 1: push the top-1 down by 20 (top-1 changes).
    let row1 = &mut c[vocab..2 * vocab];
    let top = argmax(row1) as usize;
    row1[top] -= 20.0;
    let small: Vec<f32> = r.iter().map(|v| v + 1e-4).collect();
    let (pr, pc, ps) = (
        dir.path().join("r.npy"),
        dir.path().join("c.npy"),
        dir.path().join("s.npy"),
    );
    npy::write(&pr, &[rows, vocab], &r).unwrap();
    npy::write(&pc, &[rows, vocab], &c).unwrap();
    npy::write(&ps, &[rows, vocab], &small).unwrap();

    let o = ds4(&["drift", p(&pr), p(&pr), "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["summary"]["pass"], true);
    assert_eq!(doc["summary"]["worst_rms"], 0.0);

    let o = ds4(&["drift", p(&pr), p(&ps), "--max-rms", "1e-3"], None);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = ds4(&["drift", p(&pr), p(&pc), "--max-rms", "1e-3"], None);
    let line = assert_one_line_failure(&o, "perturbed drift");
    assert!(line.contains("row 1") && line.contains("top-1"), "{line}");
    // Tolerating the top-1 change but not the rms still fails; a wide envelope passes.
    let o = ds4(
        &[
            "drift",
            p(&pr),
            p(&pc),
            "--allow-top1-mismatch",
            "--max-rms",
            "1e-3",
        ],
        None,
    );
    assert!(!o.status.success());
    let o = ds4(
        &[
            "drift",
            p(&pr),
            p(&pc),
            "--allow-top1-mismatch",
            "--max-rms",
            "10",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // An empty dump compares nothing: an error, not a pass.
    let pe = dir.path().join("e.npy");
    npy::write(&pe, &[0, vocab], &[] as &[f32]).unwrap();
    let o = ds4(&["drift", p(&pr), p(&pe)], None);
    let line = assert_one_line_failure(&o, "empty dump");
    assert!(line.contains("no rows"), "{line}");
}

#[test]
fn bench_writes_the_csv_and_plots_it() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("b.csv");
    let o = ds4(
        &[
            "bench",
            "-m",
            p(tiny_f32()),
            "--ctx-start",
            "32",
            "--ctx-max",
            "80",
            "--step-incr",
            "32",
            "--gen-tokens",
            "3",
            "--csv",
            p(&csv),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes,card,backend,commit,decode_bytes_per_token,gen_gbps,pct_of_floor"
    );
    assert_eq!(lines.len(), 4, "{text}");
    let mut prev_kv = 0u64;
    for (line, (ctx, pre)) in lines[1..].iter().zip([(32, 32), (64, 32), (80, 16)]) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 12, "{line}");
        assert_eq!(f[0].parse::<usize>().unwrap(), ctx);
        assert_eq!(f[1].parse::<usize>().unwrap(), pre);
        assert!(f[2].parse::<f64>().unwrap() > 0.0);
        assert_eq!(f[3], "3");
        assert!(f[4].parse::<f64>().unwrap() > 0.0);
        let kv: u64 = f[5].parse().unwrap();
        assert!(kv > prev_kv, "the snapshot grows with the context");
        prev_kv = kv;
        assert_eq!((f[6], f[7]), ("cpu", "cpu"));
        assert!(!f[8].is_empty());
        assert!(f[9].parse::<u64>().unwrap() > 0);
        assert!(f[10].parse::<f64>().unwrap() > 0.0);
        assert_eq!(f[11], "", "no bandwidth known for the CPU");
    }
    // With a bandwidth, pct_of_floor = 100 · gen_gbps / bandwidth; CSV on stdout.
    let o = ds4(
        &[
            "bench",
            "-m",
            p(tiny_f32()),
            "--ctx-start",
            "16",
            "--ctx-max",
            "16",
            "-n",
            "2",
            "--bandwidth-gbps",
            "10",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let row: Vec<&str> = out.lines().nth(1).unwrap().split(',').collect();
    let (gbps, pct): (f64, f64) = (row[10].parse().unwrap(), row[11].parse().unwrap());
    assert!(
        (pct - 10.0 * gbps).abs() <= 0.01 + 1e-3 * pct,
        "{gbps} {pct}"
    );

    let svg = dir.path().join("b.svg");
    let o = ds4(&["bench", "--plot", p(&csv), "-o", p(&svg)], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<?xml") && s.trim_end().ends_with("</svg>"));
    assert_eq!(s.matches("<circle").count(), 6);
}

#[test]
fn bench_whole_prompt_prefills_each_frontier_from_empty() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("w.csv");
    let o = ds4(
        &[
            "bench",
            "-m",
            p(tiny_f32()),
            "--whole-prompt",
            "--ctx-start",
            "16",
            "--ctx-max",
            "48",
            "--step-incr",
            "16",
            "--gen-tokens",
            "2",
            "--csv",
            p(&csv),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    for (f, ctx) in rows.iter().zip([16usize, 32, 48]) {
        assert_eq!(f[0].parse::<usize>().unwrap(), ctx);
        assert_eq!(
            f[1].parse::<usize>().unwrap(),
            ctx,
            "the whole prompt is prefilled"
        );
        assert!(f[2].parse::<f64>().unwrap() > 0.0);
    }
}

#[test]
fn bench_prompt_file_on_the_builtin_model() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.txt");
    std::fs::write(&f, "Quel ramo del lago di Como, che volge a mezzogiorno. ").unwrap();
    let o = ds4(
        &[
            "bench",
            "-m",
            p(&builtin()),
            "--prompt-file",
            p(&f),
            "--ctx-start",
            "40",
            "--ctx-max",
            "80",
            "--step-mul",
            "2",
            "-n",
            "2",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let ctxs: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(ctxs, ["40", "80"]);
}

#[test]
fn cuda_backend_without_cuda_fails_in_one_line() {
    let o = ds4(
        &[
            "run",
            "-m",
            p(&builtin()),
            "--backend",
            "cuda",
            "-p",
            "hi",
            "-n",
            "1",
        ],
        None,
    );
    if o.status.success() {
        eprintln!("a CUDA device is present: nothing to check");
        return;
    }
    let line = assert_one_line_failure(&o, "--backend cuda");
    assert!(line.contains("CUDA"), "{line}");
    // Also through bench and serve.
    let o = ds4(
        &[
            "bench",
            "-m",
            p(&builtin()),
            "--backend",
            "cuda",
            "--ctx-start",
            "8",
            "--ctx-max",
            "8",
        ],
        None,
    );
    assert!(assert_one_line_failure(&o, "bench --backend cuda").contains("CUDA"));
    let o = ds4(
        &[
            "serve",
            "-m",
            p(&builtin()),
            "--backend",
            "cuda",
            "--port",
            "0",
        ],
        None,
    );
    assert!(assert_one_line_failure(&o, "serve --backend cuda").contains("CUDA"));
}

#[test]
fn bad_inputs_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let o = ds4(&["run", "-m", p(&missing), "-p", "hi"], None);
    let l = assert_one_line_failure(&o, "missing model");
    assert!(l.contains("missing.gguf"), "{l}");

    let corrupt = dir.path().join("corrupt.gguf");
    let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
    bytes.extend_from_slice(&u64::MAX.to_le_bytes()); // absurd tensor count
    bytes.extend_from_slice(&[0xAB; 100]);
    std::fs::write(&corrupt, &bytes).unwrap();
    for args in [
        vec!["run", "-m", p(&corrupt), "-p", "hi"],
        vec!["inspect", p(&corrupt)],
        vec!["tokenize", "-m", p(&corrupt), "-p", "hi"],
        vec![
            "bench",
            "-m",
            p(&corrupt),
            "--ctx-start",
            "8",
            "--ctx-max",
            "8",
        ],
        vec!["serve", "-m", p(&corrupt), "--port", "0"],
    ] {
        let l = assert_one_line_failure(&ds4(&args, None), &args.join(" "));
        assert!(l.contains("corrupt.gguf"), "{l}");
    }
    // A truncated copy of a real model.
    let real = std::fs::read(builtin()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    assert_one_line_failure(&ds4(&["run", "-m", p(&cut), "-p", "hi"], None), "truncated");
    // Bad prompt ids and a missing prompt file.
    let l = assert_one_line_failure(
        &ds4(
            &["run", "-m", p(tiny_f32()), "--prompt-ids", "1,99999"],
            None,
        ),
        "id out of range",
    );
    assert!(l.contains("99999"), "{l}");
    let l = assert_one_line_failure(
        &ds4(
            &[
                "run",
                "-m",
                p(&builtin()),
                "--prompt-file",
                p(&dir.path().join("nope.txt")),
            ],
            None,
        ),
        "missing prompt file",
    );
    assert!(l.contains("nope.txt"), "{l}");
    // drift on a missing file.
    assert_one_line_failure(
        &ds4(&["drift", p(&missing), p(&missing)], None),
        "drift missing",
    );
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, rest) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut r = rest;
        while let Some((len, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n.min(tail.len())]);
            r = tail.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        rest.to_string()
    };
    (status, body)
}

/// Kills and reaps the child when dropped (also when a test panics).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn serve_smoke() {
    let cwd = tempfile::tempdir().unwrap();
    let mut guard = ChildGuard(
        cmd(&["serve", "--port", "0", "--ctx", "1024"], Some(cwd.path()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut guard.0;
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    let mut port = None;
    while port.is_none() && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                if let Some(rest) = l.split("listening on http://127.0.0.1:").nth(1) {
                    port = rest
                        .trim()
                        .trim_end_matches(|c: char| !c.is_ascii_digit())
                        .parse::<u16>()
                        .ok();
                }
                log.push(l);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("serve exited early ({st}): {log:?}");
                }
            }
            Err(_) => break,
        }
    }
    let Some(port) = port else {
        panic!("serve did not start: {log:?}");
    };
    assert!(
        log.iter().any(|l| l.contains("tiny built-in model")),
        "{log:?}"
    );
    let result = std::panic::catch_unwind(|| {
        let (st, body) = http(port, "GET", "/health", None);
        assert_eq!(st, 200, "{body}");
        let (st, body) = http(port, "GET", "/v1/models", None);
        assert_eq!(st, 200, "{body}");
        assert!(body.contains("deepseek-v4-flash"), "{body}");
        let req = r#"{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"temperature":0,"thinking":{"type":"disabled"}}"#;
        let (st, body) = http(port, "POST", "/v1/chat/completions", Some(req));
        assert_eq!(st, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 2);
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    });
    // SIGTERM: the server drains and exits cleanly.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = None;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(guard); // kills and reaps the server if SIGTERM did not stop it
    let _ = reader.join();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    let status = status.expect("serve did not exit within 20 s of SIGTERM");
    assert!(
        status.success(),
        "serve exit status after SIGTERM: {status}"
    );
}

#[test]
fn help_of_every_subcommand() {
    for sc in [
        "run", "chat", "serve", "bench", "drift", "convert", "synth", "tokenize", "inspect",
    ] {
        let o = ds4(&[sc, "--help"], None);
        assert!(o.status.success(), "{sc} --help: {}", stderr(&o));
        assert!(stdout(&o).contains("Usage: ds4 "), "{sc}");
    }
    let o = ds4(&["serve", "--help"], None);
    let h = stdout(&o);
    for flag in [
        "--ctx",
        "--model",
        "--backend",
        "--threads",
        "--no-qat",
        "--port",
        "--kv-disk-dir",
    ] {
        assert!(h.contains(flag), "serve --help lacks {flag}");
    }
}

/// ds4's single-instance lock: while `ds4 chat` runs, every other engine process on the same
/// lock file (run, bench, serve, a subcommand-less line) exits 2 with ds4's line and nothing
/// else; tools that load no model for inference, another lock file, and the same lock file
/// once the holder has exited all run.
#[test]
fn single_instance_lock() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("ds4.lock");
    let m = builtin();
    let mut holder = ChildGuard(
        cmd(
            &["chat", "-m", p(&m), "-c", "256", "--temp", "0", "-n", "1"],
            Some(dir.path()),
        )
        .env("DS4_LOCK_FILE", &lock)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    // The holder writes its pid into the lock file.
    let pid = holder.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != pid.to_string() {
        assert!(Instant::now() < deadline, "the lock file never got the pid");
        assert!(holder.0.try_wait().unwrap().is_none(), "chat exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let want =
        format!("ds4: another ds4 process is already running (pid {pid}); refusing to start\n");
    let with_lock = |args: &[&str]| {
        cmd(args, Some(dir.path()))
            .env("DS4_LOCK_FILE", &lock)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for args in [
        &["run", "-m", p(&m), "-p", "hi", "-n", "1"][..],
        &["-m", p(&m), "-p", "hi", "-n", "1"],
        &["chat", "-m", p(&m)],
        &one_bench_step(&m),
        &["serve", "-m", p(&m), "--port", "0"],
    ] {
        let o = with_lock(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), want, "{args:?}");
        assert!(o.stdout.is_empty());
    }
    // Not engine processes: no lock.
    let o = with_lock(&["tokenize", "-m", p(&m), "-p", "hi"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with_lock(&["inspect", p(&m)]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Another lock file: no collision.
    let o = ds4(
        &["run", "-m", p(&m), "-p", "hi", "-n", "1", "-c", "64"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The holder ends (EOF on stdin): the lock is free again.
    drop(holder.0.stdin.take());
    let st = holder.0.wait().unwrap();
    assert!(st.success(), "{st}");
    let o = with_lock(&["run", "-m", p(&m), "-p", "hi", "-n", "1", "-c", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // It wrote its own pid over the holder's.
    let after: u32 = std::fs::read_to_string(&lock)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(after, pid);
    // A lock file that cannot be opened: one warning, and the run goes on.
    let o = cmd(
        &["run", "-m", p(&m), "-p", "hi", "-n", "1", "-c", "64"],
        None,
    )
    .env("DS4_LOCK_FILE", dir.path().join("no/such/dir/ds4.lock"))
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(
        e.matches("ds4: warning: cannot open the lock file").count(),
        1,
        "{e}"
    );
}

/// `--warm-weights` on run, chat, serve and bench: one note with the bytes (the whole file) and
/// the seconds, and the same greedy tokens as without it.
#[test]
fn warm_weights_touches_the_file_and_changes_nothing() {
    let m = builtin();
    let size = std::fs::metadata(&m).unwrap().len();
    let mut base = vec!["run"];
    base.extend(greedy_hello(&m));
    base.extend(["-n", "6", "--json"]);
    let tokens = |o: &Output| -> Vec<u32> {
        assert!(o.status.success(), "{}", stderr(o));
        let doc: serde_json::Value = serde_json::from_str(stdout(o).trim()).unwrap();
        serde_json::from_value(doc["tokens"].clone()).unwrap()
    };
    let cold = ds4(&base, None);
    let mut args = base.to_vec();
    args.push("--warm-weights");
    let warm = ds4(&args, None);
    assert_eq!(tokens(&warm), tokens(&cold));
    assert_eq!(tokens(&warm).len(), 6);
    let note = |o: &Output| -> String {
        let e = stderr(o);
        let notes: Vec<&str> = e
            .lines()
            .filter(|l| l.starts_with("ds4: warm weights: "))
            .collect();
        assert_eq!(notes.len(), 1, "{e}");
        notes[0].to_string()
    };
    let n = note(&warm);
    assert!(
        n.contains(&format!("touched {size} bytes")) && n.contains(" s "),
        "{n}"
    );
    assert!(!stderr(&cold).contains("warm weights"));
    // chat and bench take it too.
    let o = cmd(&["chat", "-m", p(&m), "--warm-weights", "-c", "64"], None)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    note(&o);
    let mut args = one_bench_step(&m);
    args.push("--warm-weights");
    let o = ds4(&args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    note(&o);
    for sc in ["run", "chat", "serve", "bench"] {
        let o = ds4(&[sc, "--help"], None);
        assert!(stdout(&o).contains("--warm-weights"), "{sc} --help");
    }
}

/// ds4's invocation without a subcommand: a prompt makes it `ds4 run`, no prompt (or no
/// argument at all) the REPL; `-sys` is `--system` on run, chat and bench; the top-level help
/// and version are clap's.
#[test]
fn no_subcommand_and_sys_spellings() {
    let m = builtin();
    let mut one_shot = greedy_hello(&m);
    one_shot.extend(["-n", "4", "--json"]);
    let bare = ds4(&one_shot, None);
    assert!(bare.status.success(), "{}", stderr(&bare));
    let mut run = vec!["run"];
    run.extend_from_slice(&one_shot);
    let sub = ds4(&run, None);
    let tokens = |o: &Output| {
        let doc: serde_json::Value = serde_json::from_str(stdout(o).trim()).unwrap();
        doc["tokens"].clone()
    };
    assert_eq!(tokens(&bare), tokens(&sub));
    assert_eq!(tokens(&bare).as_array().unwrap().len(), 4);
    // The one-shot diagnostics too.
    let o = ds4(&["-m", p(&m), "-p", "Hello", "--dump-tokens"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with('['));
    // Flags without a prompt: the REPL.
    let o = cmd(
        &[
            "-m",
            p(&m),
            "--nothink",
            "--temp",
            "0",
            "-n",
            "2",
            "-c",
            "256",
            "--verbose",
        ],
        None,
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .and_then(|mut c| {
        c.stdin.take().unwrap().write_all(b"Hello there\n")?;
        c.wait_with_output()
    })
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("ds4: turn 1:"), "{}", stderr(&o));
    // No arguments at all: the REPL on the default model (the built-in one here); EOF ends it.
    let cwd = tempfile::tempdir().unwrap();
    let o = ds4(&[], Some(cwd.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("tiny built-in model"), "{}", stderr(&o));
    // Help and version are the top level's.
    for h in ["-h", "--help"] {
        let o = ds4(&[h], None);
        assert!(o.status.success());
        let out = stdout(&o);
        assert!(
            out.contains("Commands:") && out.contains("Without a subcommand"),
            "{out}"
        );
    }
    let o = ds4(&["-V"], None);
    assert_eq!(
        stdout(&o).trim(),
        format!("ds4 {}", env!("CARGO_PKG_VERSION"))
    );
    // -sys TEXT is --system TEXT: same prompt tokens, which differ from the default system's.
    let dump = |sys: &[&str]| -> String {
        let mut a = vec!["run", "-m", p(&m), "-p", "Hi", "--dump-tokens"];
        a.extend_from_slice(sys);
        let o = ds4(&a, None);
        assert!(o.status.success(), "{sys:?}: {}", stderr(&o));
        stdout(&o)
    };
    let long = dump(&["--system", "Be brief."]);
    assert_eq!(dump(&["-sys", "Be brief."]), long);
    assert_ne!(dump(&[]), long);
    assert_eq!(dump(&["-sys", ""]), dump(&["--system", ""]));
    let o = cmd(
        &["chat", "-m", p(&m), "-sys", "Be brief.", "-c", "64"],
        None,
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `ds4 bench --chat-prompt-file` renders the file as `ds4 run --nothink` does (same tokens,
/// same logits), `--dump-frontier-logits-dir` writes ds4-bench's JSON at every frontier, and
/// `ds4 drift` reads those files.
#[test]
fn bench_chat_prompt_and_frontier_logits() {
    let m = builtin();
    let dir = tempfile::tempdir().unwrap();
    let text = "Quel ramo del lago di Como, che volge a mezzogiorno, tra due catene non \
                interrotte di monti, tutto a seni e a golfi.";
    let f = dir.path().join("chat.txt");
    std::fs::write(&f, text).unwrap();
    let g = ds4_gguf::Gguf::open(&m).unwrap();
    let tok = ds4_tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let ids =
        ds4_tokenizer::encode_cli_prompt(&tok, "Be brief.", text, ds4_tokenizer::ThinkMode::None)
            .unwrap();
    let n = ids.len();
    assert!(n > 32, "{n}");
    let out = dir.path().join("logits");
    std::fs::create_dir(&out).unwrap();
    let n_s = n.to_string();
    let o = ds4(
        &[
            "bench",
            "-m",
            p(&m),
            "--chat-prompt-file",
            p(&f),
            "-sys",
            "Be brief.",
            "--ctx-start",
            "16",
            "--ctx-max",
            &n_s,
            "--step-incr",
            "16",
            "-n",
            "1",
            "--dump-frontier-logits-dir",
            p(&out),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let frontiers: Vec<usize> = stdout(&o)
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(frontiers, [16, 32, n]);
    // The reference: `ds4 run` on the same text, system and no thinking.
    let pl = dir.path().join("prompt.npy");
    let o = ds4(
        &[
            "run",
            "-m",
            p(&m),
            "--prompt-file",
            p(&f),
            "--system",
            "Be brief.",
            "--nothink",
            "--temp",
            "0",
            "-n",
            "1",
            "-c",
            "256",
            "--dump-prompt-logits",
            p(&pl),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = npy::read(&pl).unwrap();
    assert_eq!(rows.shape[0], n, "run renders the same prompt");
    let vocab = rows.shape[1];
    let rows = rows.to_f32().unwrap();
    let mut previous = 0;
    for &fr in &frontiers {
        let path = out.join(format!("frontier_{fr:06}.logits.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["source"], "ds4-bench");
        assert_eq!(v["model"], p(&m));
        assert_eq!(v["backend"], "cpu");
        assert_eq!(v["mt"], "off");
        assert_eq!(v["quality"], false);
        assert_eq!(v["quant_bits"], 2);
        assert_eq!(v["prompt_tokens"], fr);
        assert_eq!(v["frontier_tokens"], fr);
        assert_eq!(v["prefill_tokens"], fr - previous);
        assert_eq!(v["ctx"], n + 2);
        assert_eq!(v["vocab"], vocab);
        let row = &rows[(fr - 1) * vocab..fr * vocab];
        assert_eq!(v["argmax_id"], argmax(row));
        assert_eq!(v["logits"].as_array().unwrap().len(), vocab);
        // drift reads the file against run's row: the same logits up to the rounding of another
        // prefill chunking (about 1e-6 here).
        let rp = dir.path().join(format!("row{fr}.npy"));
        npy::write(&rp, &[1, vocab], row).unwrap();
        let o = ds4(
            &[
                "drift",
                p(&rp),
                p(&path),
                "--max-abs",
                "1e-4",
                "--min-top5-overlap",
                "5",
                "--json",
            ],
            None,
        );
        assert!(
            o.status.success(),
            "frontier {fr}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        let d: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(d["summary"]["rows"], 1);
        previous = fr;
    }
    // Two frontier files against each other: a real difference is seen.
    let a = out.join("frontier_000016.logits.json");
    let b = out.join(format!("frontier_{n:06}.logits.json"));
    let o = ds4(&["drift", p(&a), p(&a), "--max-abs", "0"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ds4(&["drift", p(&a), p(&b), "--max-rms", "1e-6"], None);
    assert_one_line_failure(&o, "different frontiers");

    // Bad inputs: one line each.
    let bench = |extra: &[&str]| {
        let mut a = vec!["bench", "-m", p(&m), "--ctx-start", "8", "-n", "1"];
        a.extend_from_slice(extra);
        ds4(&a, None)
    };
    let missing = dir.path().join("missing");
    let l = assert_one_line_failure(
        &bench(&["--ctx-max", "8", "--dump-frontier-logits-dir", p(&missing)]),
        "missing dump dir",
    );
    assert!(
        l.contains("missing") && l.contains("not an existing directory"),
        "{l}"
    );
    // Too short a rendering; without -sys the system text is ds4-bench's, with its period.
    let n_default = ds4_tokenizer::encode_cli_prompt(
        &tok,
        "You are a helpful assistant.",
        text,
        ds4_tokenizer::ThinkMode::None,
    )
    .unwrap()
    .len();
    let big = (n_default + 1).to_string();
    let l = assert_one_line_failure(
        &bench(&["--ctx-max", &big, "--chat-prompt-file", p(&f)]),
        "short chat prompt",
    );
    assert!(
        l.contains(&format!(
            "has {n_default} tokens, need at least --ctx-max={big}"
        )),
        "{l}"
    );
    // Usage errors (clap, status 2): both prompt sources; --system without a chat prompt.
    let o = bench(&[
        "--ctx-max",
        "8",
        "--chat-prompt-file",
        p(&f),
        "--prompt-file",
        p(&f),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = bench(&["--ctx-max", "8", "-sys", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let h = stdout(&ds4(&["bench", "--help"], None));
    for flag in [
        "--chat-prompt-file",
        "--system",
        "--dump-frontier-logits-dir",
        "--warm-weights",
    ] {
        assert!(h.contains(flag), "bench --help lacks {flag}");
    }
    let flat = h.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("\"You are a helpful assistant.\""), "{h}");
}

/// `n_layer × n_embd` random unit directions of the built-in model, as a steering file's bytes.
fn steering_file(path: &Path, seed: u64, zero: bool) -> Vec<f32> {
    let g = ds4_gguf::Gguf::open(builtin()).unwrap();
    let s = ds4_model::Shape::from_gguf(&g).unwrap();
    let mut dirs = ds4_model::steer::random_unit_directions(&s, seed);
    if zero {
        dirs.fill(0.0);
    }
    let bytes: Vec<u8> = dirs.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
    dirs
}

const STEER_IDS: &str = "0,19923,14,3300,2,77,1001";

/// `ds4 run --prompt-ids STEER_IDS -n 1 --dump-prompt-logits` on the built-in model with
/// `extra` flags: the logits rows.
fn steered_logits(dir: &Path, tag: &str, extra: &[&str]) -> Vec<f32> {
    let dump = dir.join(format!("{tag}.npy"));
    let m = builtin();
    let mut args = vec![
        "run",
        "-m",
        p(&m),
        "--prompt-ids",
        STEER_IDS,
        "-n",
        "1",
        "--temp",
        "0",
        "--dump-prompt-logits",
        dump.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = ds4(&args, None);
    assert!(o.status.success(), "{tag}: {}", stderr(&o));
    npy::read(&dump).unwrap().to_f32().unwrap()
}

/// `--dir-steering-*` on `ds4 run`: zero scales and zero directions leave the logits bit for
/// bit; a file alone steers the FFN with scale 1; the scale flags bind to the latest file, and
/// the result equals the library's CPU backend with those slots.
#[test]
fn run_dir_steering_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, z) = (
        dir.path().join("a.f32"),
        dir.path().join("b.f32"),
        dir.path().join("z.f32"),
    );
    let da = steering_file(&a, 1, false);
    let db = steering_file(&b, 2, false);
    steering_file(&z, 3, true);
    let (a, b, z) = (p(&a), p(&b), p(&z));
    let base = steered_logits(dir.path(), "base", &[]);
    let zero_scales = steered_logits(
        dir.path(),
        "zs",
        &[
            "--dir-steering-file",
            a,
            "--dir-steering-ffn",
            "0",
            "--dir-steering-attn",
            "0",
        ],
    );
    assert!(zero_scales == base, "zero scales changed the logits");
    let zero_dirs = steered_logits(
        dir.path(),
        "zd",
        &["--dir-steering-file", z, "--dir-steering-attn", "3"],
    );
    assert!(zero_dirs == base, "zero directions changed the logits");
    let file_only = steered_logits(dir.path(), "fo", &["--dir-steering-file", a]);
    assert!(file_only != base, "steering changed nothing");
    let ffn1 = steered_logits(
        dir.path(),
        "f1",
        &["--dir-steering-ffn", "1", "--dir-steering-file", a],
    );
    assert!(file_only == ffn1, "a file alone is --dir-steering-ffn 1");
    let slots = [
        "--dir-steering-file",
        a,
        "--dir-steering-ffn",
        "2",
        "--dir-steering-file",
        b,
        "--dir-steering-attn",
        "-1",
    ];
    let two = steered_logits(dir.path(), "two", &slots);
    let swapped = steered_logits(
        dir.path(),
        "sw",
        &[
            "--dir-steering-file",
            a,
            "--dir-steering-attn",
            "-1",
            "--dir-steering-file",
            b,
            "--dir-steering-ffn",
            "2",
        ],
    );
    assert!(two != swapped && two != base && two != file_only);
    // The library with slots (a: ffn 2) then (b: attn -1).
    let g = std::sync::Arc::new(ds4_gguf::Gguf::open(builtin()).unwrap());
    let model = std::sync::Arc::new(ds4_model::Model::load(g).unwrap());
    let slot = |dirs: Vec<f32>, ffn: f32, attn: f32| ds4_model::SteeringSlot {
        source: String::new(),
        dirs,
        ffn,
        attn,
    };
    let st = ds4_model::Steering::new(&model.shape, vec![slot(da, 2.0, 0.0), slot(db, 0.0, -1.0)])
        .unwrap()
        .map(std::sync::Arc::new);
    let eng = ds4_model::Engine::from_model(
        model,
        ds4_model::EngineOptions {
            threads: Some(2),
            steering: st,
            ..Default::default()
        },
    )
    .unwrap();
    let mut sess = eng
        .new_session(ds4_model::SessionOptions {
            ctx: 64,
            prefill_chunk: 3,
        })
        .unwrap();
    let ids: Vec<u32> = STEER_IDS.split(',').map(|s| s.parse().unwrap()).collect();
    let want = sess.prefill_all_logits(&ids).unwrap();
    assert!(two == want, "CLI slots differ from the library's");
}

/// Steering errors: a file of the wrong size is one line naming both sizes; an out-of-range
/// scale and a ninth file are usage errors (exit 2, clap's message naming the flag).
#[test]
fn run_dir_steering_errors() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("short.f32");
    let m = builtin();
    let g = ds4_gguf::Gguf::open(&m).unwrap();
    let s = ds4_model::Shape::from_gguf(&g).unwrap();
    let want = s.n_layer * s.n_embd * 4;
    std::fs::write(&f, vec![0u8; want - 4]).unwrap();
    let run = |extra: &[&str]| {
        let mut a = vec!["run", "-m", p(&m), "--prompt-ids", "1,2", "-n", "1"];
        a.extend_from_slice(extra);
        ds4(&a, None)
    };
    let o = run(&["--dir-steering-file", p(&f)]);
    let line = assert_one_line_failure(&o, "short steering file");
    assert!(
        line.contains(&format!("{} bytes", want - 4))
            && line.contains(&format!("expected {want}"))
            && line.contains("short.f32"),
        "{line}"
    );
    let o = run(&["--dir-steering-file", "/nonexistent/d.f32"]);
    assert_one_line_failure(&o, "missing steering file");
    for (flag, v) in [
        ("--dir-steering-ffn", "101"),
        ("--dir-steering-attn", "-100.5"),
    ] {
        let o = run(&["--dir-steering-file", p(&f), flag, v]);
        assert_eq!(o.status.code(), Some(2), "{flag} {v}: {}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.starts_with("ds4: ") && e.contains(flag) && e.contains(v),
            "{e}"
        );
    }
    let mut many = Vec::new();
    for _ in 0..9 {
        many.extend(["--dir-steering-file", p(&f)]);
    }
    let o = run(&many);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("at most 8"), "{}", stderr(&o));
}

/// Every engine subcommand takes the steering flags.
#[test]
fn dir_steering_flags_on_every_engine_subcommand() {
    for sub in ["run", "chat", "serve", "bench"] {
        let o = ds4(&[sub, "--help"], None);
        assert!(o.status.success(), "{sub}: {}", stderr(&o));
        let h = stdout(&o);
        for f in [
            "--dir-steering-file",
            "--dir-steering-ffn",
            "--dir-steering-attn",
        ] {
            assert!(h.contains(f), "{sub} --help lacks {f}");
        }
    }
}

/// A usage error (bad flag value, unknown flag or subcommand) is one line on stderr,
/// `ds4: ...`, and exit status 2, as in ds4; help still goes to stdout with status 0.
#[test]
fn usage_errors_are_one_line() {
    for args in [
        &["run", "--dir-steering-ffn", "200", "-p", "x"][..],
        &["run", "--no-such-flag"],
        &["no-such-subcommand"],
        &["bench", "--ctx-max", "many"],
        &["drift", "only-one.npy"],
        &["run", "--backend", "tpu"],
    ] {
        let o = ds4(args, None);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with("ds4: "), "{args:?}: {err}");
        assert!(stdout(&o).is_empty(), "{args:?}");
        // The part that says what to fix survives the joining.
        if args[0] == "drift" {
            assert!(lines[0].contains('<'), "{err}");
        }
        if args.contains(&"tpu") {
            assert!(lines[0].contains("cuda"), "{err}");
        }
    }
    let o = ds4(&["run", "--help"], None);
    assert!(o.status.success() && stdout(&o).contains("Usage: ds4 run"));
    // Options before the subcommand (`ds4 -m F serve …`) are the subcommand's.
    let o = ds4(&["-m", "x.gguf", "--port", "9", "serve", "--help"], None);
    assert!(
        o.status.success() && stdout(&o).contains("Usage: ds4 serve"),
        "{}",
        stderr(&o)
    );
    let o = ds4(&["-m", "x.gguf", "bench", "--ctx-max", "many"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("many"), "{}", stderr(&o));
    // ds4's spellings without a subcommand: --server is refused, --inspect inspects the model.
    let o = ds4(&["--server", "-m", "x.gguf"], None);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o).trim(),
        "ds4: use `ds4 serve` for the HTTP server"
    );
    let m = builtin();
    let o = ds4(
        &["--inspect", "-m", m.to_str().unwrap(), "--ctx", "64"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("token_embd"), "{}", stdout(&o));
}

/// `ds4 run --dump-logits F.json` writes ds4's `--dump-logits` JSON (the header fields, then the
/// next-token logits after the prompt, 8 a line) and exits without generating; the logits are
/// the last row of `--dump-prompt-logits`, bit for bit, and `ds4 drift` reads the file.
#[test]
fn dump_logits_json_is_ds4s_format() {
    let dir = tempfile::tempdir().unwrap();
    let (j, n) = (dir.path().join("l.json"), dir.path().join("p.npy"));
    let m = builtin();
    let mut base = vec!["run"];
    base.extend(greedy_hello(&m));
    let mut args = base.to_vec();
    args.extend(["--dump-logits", p(&j)]);
    let o = ds4(&args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).trim().is_empty(),
        "generated text: {}",
        stdout(&o)
    );
    let mut args = base.to_vec();
    args.extend(["-n", "1", "--dump-prompt-logits", p(&n)]);
    let o = ds4(&args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&j).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompt = npy::read(&n).unwrap();
    let vocab = prompt.shape[1];
    let rows = prompt.to_f32().unwrap();
    let want = &rows[(prompt.shape[0] - 1) * vocab..];
    assert_eq!(v["source"], "ds4-rs");
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["mt"], "off");
    assert_eq!(v["vocab"].as_u64(), Some(vocab as u64));
    assert_eq!(v["prompt_tokens"].as_u64(), Some(prompt.shape[0] as u64));
    assert_eq!(v["ctx"].as_u64(), Some(256));
    let got: Vec<f32> = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert!(
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the JSON logits differ from the last prompt-logits row"
    );
    let (best, _) = want
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        });
    assert_eq!(v["argmax_token"]["id"].as_u64(), Some(best as u64));
    assert_eq!(
        v["argmax_logit"].as_f64().map(|x| x as f32),
        Some(want[best])
    );
    // ds4's layout: one header field a line, the logits 8 a line.
    assert!(text.starts_with("{\n  \"source\":\"ds4-rs\",\n"));
    assert_eq!(
        text.lines().filter(|l| l.starts_with("    ")).count(),
        vocab.div_ceil(8)
    );
    let o = ds4(&["drift", p(&j), p(&j), "--max-abs", "0"], None);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// On a terminal `ds4 chat` reads its lines with a line editor and keeps ds4's history file
/// (`$HOME/.ds4_history`, one entry per line, the last 512), Ctrl+C at the prompt is ignored
/// and the prefill shows its progress (ds4's REPL). Driven through a pseudo-terminal by util-linux `script` (the test says
/// so and passes where `script` is missing).
#[test]
fn chat_on_a_terminal_edits_lines_and_keeps_history() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` (a pseudo-terminal) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hist = dir.path().join(".ds4_history");
    let old: String = (0..600).map(|i| format!("old {i}\n")).collect();
    std::fs::write(&hist, &old).unwrap();
    let m = builtin();
    let line = format!("'{BIN}' chat -m '{}' -c 256 --temp 0 -n 2", p(&m));
    let mut child = ChildGuard(
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("HOME", dir.path())
            .env("TMPDIR", shared_tmp())
            .env("DS4_LOCK_FILE", own_lock_file())
            .env("DS4_THREADS", "2")
            .env("TERM", "xterm")
            .env_remove("DS4_MODEL")
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The terminal's output, read as it comes.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut out = child.0.stdout.take().unwrap();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let prompts = |seen: &std::sync::Mutex<String>| seen.lock().unwrap().matches("ds4> ").count();
    let wait_prompts = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while prompts(&seen) < n {
            assert!(
                Instant::now() < deadline,
                "no prompt {n}: {:?}",
                seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut stdin = child.0.stdin.take().unwrap();
    wait_prompts(1);
    stdin.write_all(b"\x03").unwrap(); // Ctrl+C at the prompt: a new prompt, nothing else
    stdin.flush().unwrap();
    wait_prompts(2);
    stdin.write_all(b"/think-max\n").unwrap();
    stdin.flush().unwrap();
    wait_prompts(3);
    stdin.write_all(b"hello there\n").unwrap();
    stdin.flush().unwrap();
    wait_prompts(4);
    stdin.write_all(b"/quit\n").unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "chat did not end after /quit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}: {:?}", seen.lock().unwrap());
    let text = seen.lock().unwrap().clone();
    assert!(
        text.contains("ds4: prefill:"),
        "one turn answered: {text:?}"
    );
    // ds4's live prefill progress (stderr is the terminal here).
    assert!(
        text.contains("processing ") && text.contains(" input tokens: ") && text.contains("(100%)"),
        "prefill progress: {text:?}"
    );
    // ds4's words for /think-max below its context.
    assert!(
        text.contains("Thinking mode: high (ctx below 393216)."),
        "{text:?}"
    );
    // The last 512 entries, one per line: old 91..599, then the three new lines.
    let want: String = (91..600)
        .map(|i| format!("old {i}\n"))
        .chain(["/think-max\n", "hello there\n", "/quit\n"].map(String::from))
        .collect();
    assert_eq!(std::fs::read_to_string(&hist).unwrap(), want);
}
