//! `ds4 chat`: a multi-turn REPL that keeps the KV state across turns (only the new suffix of
//! the transcript is prefilled each turn).
//!
//! On a terminal the prompt is a line editor with history (ds4's linenoise REPL:
//! `~/.ds4_history`, at most 512 entries, one per line); Ctrl+C at the prompt is ignored there,
//! Ctrl+D or `/quit` ends the REPL, and each turn's prefill shows ds4's `processing N input
//! tokens: x/N (p%)` on stderr. Without a terminal the lines of stdin are read as they come.
//!
//! Ctrl+C while a reply is generated ends that reply (what was generated stays in the
//! transcript, closed by EOS; a turn interrupted before its first token is dropped, as ds4
//! does) and returns to the prompt; Ctrl+C anywhere else exits with status 130. A failing
//! command (`/read`, `/ctx`) says why and the REPL goes on.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use ds4_tokenizer::{Role, ThinkMode};

use crate::common::{self, ModelArgs, SamplingArgs, ThinkArgs, Utf8Stream};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt ("" removes it; also `-sys`).
    #[arg(long = "system", visible_alias = "sys", default_value = ds4_tokenizer::chat::DEFAULT_SYSTEM_PROMPT)]
    pub system: String,
    /// Most tokens generated per turn.
    #[arg(short = 'n', long = "tokens", default_value_t = 50000)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub think: ThinkArgs,
    /// Say on stderr, every turn, how many transcript tokens were reused from the live KV
    /// state and how many were prefilled.
    #[arg(short = 'v', long)]
    pub verbose: bool,
}

const HELP: &str = "commands: /help  /think  /think-max  /nothink  /ctx N  /read FILE  /quit";

/// Most entries of the REPL history (linenoise's limit in ds4).
pub const HISTORY_MAX: usize = 512;

/// The REPL history file: `.ds4_history` in `home` (`$HOME`), else in the working directory.
pub fn history_path(home: Option<std::ffi::OsString>) -> PathBuf {
    home.filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".ds4_history")
}

/// The entries of a history file (one per line, blank lines skipped; the last
/// [`HISTORY_MAX`]).
pub fn history_entries(text: &str) -> Vec<String> {
    let mut h = Vec::new();
    for l in text.lines() {
        history_push(&mut h, l);
    }
    h
}

/// Add `line` to the history unless it is blank or repeats the last entry, dropping the oldest
/// beyond [`HISTORY_MAX`]. Whether it was added.
pub fn history_push(h: &mut Vec<String>, line: &str) -> bool {
    if line.trim().is_empty() || h.last().is_some_and(|l| l == line) {
        return false;
    }
    h.push(line.to_string());
    if h.len() > HISTORY_MAX {
        h.drain(..h.len() - HISTORY_MAX);
    }
    true
}

/// The file text of a history (one entry per line, as linenoise writes it).
pub fn history_text(h: &[String]) -> String {
    h.iter().map(|l| format!("{l}\n")).collect()
}

/// Where the REPL's lines come from.
enum Input {
    /// A terminal (stdin and stdout): a line editor, its history kept in `path`.
    Editor {
        ed: Box<rustyline::DefaultEditor>,
        path: PathBuf,
        entries: Vec<String>,
    },
    /// Anything else: stdin's lines.
    Lines(std::io::Lines<std::io::StdinLock<'static>>),
}

impl Input {
    fn new(interactive: bool) -> Input {
        // The editor draws on stdout: only where that is the terminal too (a reply redirected
        // to a file gets no escape sequences; the prompt then goes to stderr as before).
        if interactive && std::io::stdout().is_terminal() {
            let config = rustyline::Config::builder()
                .max_history_size(HISTORY_MAX)
                .map(|b| b.auto_add_history(false).build());
            if let Ok(mut ed) = config.and_then(rustyline::DefaultEditor::with_config) {
                let path = history_path(std::env::var_os("HOME"));
                let entries = history_entries(&std::fs::read_to_string(&path).unwrap_or_default());
                for e in &entries {
                    let _ = ed.add_history_entry(e.as_str());
                }
                return Input::Editor {
                    ed: Box::new(ed),
                    path,
                    entries,
                };
            }
        }
        Input::Lines(std::io::stdin().lock().lines())
    }

    /// The next line, or None at the end of the input.
    fn next_line(&mut self) -> Option<std::io::Result<String>> {
        match self {
            Input::Editor { ed, path, entries } => loop {
                match ed.readline("ds4> ") {
                    Ok(line) => {
                        if history_push(entries, &line) {
                            let _ = ed.add_history_entry(line.as_str());
                            if let Err(e) = std::fs::write(&*path, history_text(entries)) {
                                eprintln!("ds4: cannot write {}: {e}", path.display());
                            }
                        }
                        return Some(Ok(line));
                    }
                    // Ctrl+C at the prompt: ignored, as ds4 does.
                    Err(rustyline::error::ReadlineError::Interrupted) => continue,
                    Err(rustyline::error::ReadlineError::Eof) => return None,
                    Err(e) => return Some(Err(std::io::Error::other(e))),
                }
            },
            Input::Lines(lines) => lines.next(),
        }
    }
}

/// Set while a reply is generated: Ctrl+C then interrupts the reply instead of exiting.
static GENERATING: AtomicBool = AtomicBool::new(false);
/// Set by Ctrl+C during a reply; the generation loop stops at the next token.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Watch for Ctrl+C (SIGINT) on a background thread: during a reply it sets [`INTERRUPTED`],
/// otherwise it exits the process with status 130 (the shell's status for SIGINT).
fn watch_ctrl_c() {
    let spawned = std::thread::Builder::new()
        .name("ds4-ctrl-c".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                while tokio::signal::ctrl_c().await.is_ok() {
                    if GENERATING.load(Ordering::SeqCst) {
                        INTERRUPTED.store(true, Ordering::SeqCst);
                    } else {
                        std::process::exit(130);
                    }
                }
            });
        });
    if let Err(e) = spawned {
        eprintln!("ds4: Ctrl+C will end the REPL ({e})");
    }
}

pub fn run(mut a: Args) -> Result<()> {
    let lm = common::load_model(&a.model.load)?;
    let tok = common::load_tokenizer(&lm.gguf, &lm.path)?;
    let params = a.sampling.params()?;
    let mut rng = a.sampling.rng();
    let mut think = a.think.mode(a.model.ctx);
    let mut session = common::make_session(&a.model, &lm)?;
    let sp = tok.specials();
    let begin = |think: ThinkMode| -> Result<Vec<u32>> {
        let mut t = ds4_tokenizer::chat::chat_begin(&tok);
        if think == ThinkMode::Max {
            ds4_tokenizer::chat::chat_append_max_prefix(&tok, &mut t)?;
        }
        ds4_tokenizer::chat::chat_append_message(&tok, &mut t, &Role::System, &a.system)?;
        Ok(t)
    };
    let mut transcript = begin(think)?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("{HELP}");
    }
    let mut input = Input::new(interactive);
    let mut turn = 0usize;
    watch_ctrl_c();
    loop {
        if interactive && matches!(input, Input::Lines(_)) {
            eprint!("ds4> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = input.next_line() else {
            break;
        };
        let line = line?;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let mut user_text = line.clone();
        if let Some(cmd) = trimmed.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" => break,
                "help" => {
                    eprintln!("{HELP}");
                    continue;
                }
                "think" | "nothink" | "think-max" => {
                    let new = match name {
                        "think" => ThinkMode::High,
                        "nothink" => ThinkMode::None,
                        _ => ThinkMode::Max.for_context(a.model.ctx),
                    };
                    if (new == ThinkMode::Max) != (think == ThinkMode::Max) {
                        // The Think Max prefix sits right after BOS: the transcript changes.
                        let tail = transcript.split_off(begin(think)?.len());
                        transcript = begin(new)?;
                        transcript.extend(tail);
                    }
                    think = new;
                    // ds4's words: the mode, and why /think-max gave high.
                    let said = match new {
                        ThinkMode::None => "none",
                        ThinkMode::Max => "max",
                        _ if name == "think-max" => "high (ctx below 393216)",
                        _ => "high",
                    };
                    eprintln!("Thinking mode: {said}.");
                    continue;
                }
                "ctx" => {
                    let Ok(n) = arg.trim().parse::<usize>() else {
                        eprintln!("ds4: usage: /ctx N");
                        continue;
                    };
                    let old = a.model.ctx;
                    a.model.ctx = n;
                    match common::make_session(&a.model, &lm) {
                        Ok(s) => {
                            session = s;
                            eprintln!(
                                "ds4: new session with ctx {n} (the transcript is re-prefilled)"
                            );
                        }
                        Err(e) => {
                            a.model.ctx = old;
                            eprintln!("ds4: /ctx {n}: {e:#} (keeping ctx {old})");
                        }
                    }
                    continue;
                }
                "read" => match std::fs::read_to_string(arg.trim()) {
                    Ok(text) => user_text = text,
                    Err(e) => {
                        eprintln!("ds4: cannot read {}: {e}", arg.trim());
                        continue;
                    }
                },
                _ => {
                    eprintln!("ds4: unknown command");
                    continue;
                }
            }
        }
        let turn_start = transcript.len();
        ds4_tokenizer::chat::chat_append_message(&tok, &mut transcript, &Role::User, &user_text)?;
        ds4_tokenizer::chat::chat_append_assistant_prefix(&tok, &mut transcript, think);
        if transcript.len() >= a.model.ctx {
            eprintln!("ds4: the conversation no longer fits the context (use /ctx N)");
            transcript.truncate(turn_start);
            continue;
        }
        // From here to the end of the reply, Ctrl+C ends the turn instead of the REPL (during
        // the prefill: at the next chunk, and the turn is dropped).
        INTERRUPTED.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        turn += 1;
        // ds4's live prefill progress, where stderr is a terminal.
        let show = std::io::stderr().is_terminal();
        let synced = session.sync_with_progress(&transcript, &mut |done, total| {
            if show {
                eprint!(
                    "\rprocessing {total} input tokens: {done}/{total} ({}%)",
                    100 * done / total.max(1)
                );
                if done == total {
                    eprintln!();
                }
            }
            !INTERRUPTED.load(Ordering::SeqCst)
        });
        let sync = match synced {
            Ok(s) => s,
            Err(ds4_model::ModelError::Stopped { done, total }) => {
                // Ctrl+C during the prefill: the turn is dropped (ds4); the session keeps the
                // part it evaluated, which the next turn's sync reuses where it can.
                GENERATING.store(false, Ordering::SeqCst);
                INTERRUPTED.store(false, Ordering::SeqCst);
                eprintln!("\nds4: interrupted (prefill stopped at {done} of {total} tokens)");
                transcript.truncate(turn_start);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let prefill_s = t0.elapsed().as_secs_f64();
        if a.verbose {
            eprintln!(
                "ds4: turn {turn}: reused {} tokens, prefilled {} tokens",
                sync.reused, sync.evaluated
            );
        }
        let budget = a.n.min(a.model.ctx - transcript.len() - 1);
        let mut printer = Utf8Stream::default();
        let stdout = std::io::stdout();
        let t1 = Instant::now();
        let mut generated = 0usize;
        for step in 0..budget {
            if INTERRUPTED.load(Ordering::SeqCst) {
                break;
            }
            let next = session.next_token(&params, &mut rng);
            if next == sp.eos {
                break;
            }
            generated += 1;
            transcript.push(next);
            {
                let mut out = stdout.lock();
                let _ = write!(out, "{}", printer.push(&tok.decode(&[next])));
                let _ = out.flush();
            }
            if step + 1 < budget {
                session.advance(next)?;
            }
        }
        GENERATING.store(false, Ordering::SeqCst);
        let interrupted = INTERRUPTED.swap(false, Ordering::SeqCst);
        if interrupted {
            eprintln!("\nds4: interrupted");
        }
        if interrupted && generated == 0 {
            // Interrupted before its first token (ds4): the turn is dropped from the
            // transcript. The live state still holds its prompt, so the next turn no longer
            // extends it and is prefilled from scratch.
            transcript.truncate(turn_start);
        } else {
            // Close the turn: EOS ends the assistant message in the transcript.
            transcript.push(sp.eos);
        }
        {
            let mut out = stdout.lock();
            let _ = writeln!(out, "{}", printer.finish());
        }
        eprintln!(
            "ds4: prefill: {:.1} t/s ({} new tokens, {} reused), generation: {:.1} t/s",
            sync.evaluated as f64 / prefill_s.max(1e-9),
            sync.evaluated,
            sync.reused,
            generated as f64 / t1.elapsed().as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_file_is_ds4s() {
        assert_eq!(
            history_path(Some("/h".into())),
            PathBuf::from("/h/.ds4_history")
        );
        assert_eq!(history_path(None), PathBuf::from("./.ds4_history"));
        assert_eq!(
            history_path(Some("".into())),
            PathBuf::from("./.ds4_history")
        );
        // One entry per line; blank lines and repeats of the last entry are not entries.
        let h = history_entries("a\n\nb\nb\n  \na\n");
        assert_eq!(h, ["a", "b", "a"]);
        assert_eq!(history_entries(&history_text(&h)), h);
        // The last HISTORY_MAX.
        let text: String = (0..HISTORY_MAX + 10).map(|i| format!("{i}\n")).collect();
        let h = history_entries(&text);
        assert_eq!(h.len(), HISTORY_MAX);
        assert_eq!(h[0], "10");
        let mut h2 = h.clone();
        assert!(!history_push(&mut h2, &h[HISTORY_MAX - 1].clone()));
        assert!(!history_push(&mut h2, " "));
        assert!(history_push(&mut h2, "new"));
        assert_eq!(h2.len(), HISTORY_MAX);
        assert_eq!(
            (h2[0].as_str(), h2[HISTORY_MAX - 1].as_str()),
            ("11", "new")
        );
    }
}
