//! `ds4 chat`: a multi-turn REPL that keeps the KV state across turns (only the new suffix of
//! the transcript is prefilled each turn). Ctrl+C while a reply is generated ends that reply
//! (what was generated stays in the transcript, closed by EOS) and returns to the prompt;
//! Ctrl+C at the prompt exits with status 130. A failing command (`/read`, `/ctx`) says why and
//! the REPL goes on.

use std::io::{BufRead, IsTerminal, Write};
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
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("{HELP}");
    }
    let mut lines = stdin.lock().lines();
    let mut turn = 0usize;
    watch_ctrl_c();
    loop {
        if interactive {
            eprint!("ds4> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
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
                    eprintln!("Thinking mode: {new:?}.");
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
        // the prefill: before the first token).
        INTERRUPTED.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        let sync = session.sync(&transcript)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        turn += 1;
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
        let mut ended = false;
        for step in 0..budget {
            if INTERRUPTED.load(Ordering::SeqCst) {
                break;
            }
            let next = ds4_model::sample(session.logits(), &params, &mut rng);
            if next == sp.eos {
                ended = true;
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
                session.decode(next)?;
            }
        }
        GENERATING.store(false, Ordering::SeqCst);
        if INTERRUPTED.swap(false, Ordering::SeqCst) {
            eprintln!("\nds4: interrupted");
        }
        // Close the turn: EOS ends the assistant message in the transcript.
        let _ = ended;
        transcript.push(sp.eos);
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
