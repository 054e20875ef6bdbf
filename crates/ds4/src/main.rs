//! `ds4`: the ds4-rs command line.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod argv;
mod bench;
mod chat;
mod common;
mod convert;
mod drift;
mod inspect;
mod lock;
mod run;
mod serve;
mod synth;
mod tokenize;

/// DeepSeek V4 Flash inference engine (ds4-rs).
#[derive(Parser)]
#[command(
    name = "ds4",
    version,
    about,
    propagate_version = true,
    after_help = "Without a subcommand (ds4's invocation): `ds4 -p TEXT [FLAGS]` (or any other flag \
only `run` has: --prompt-file, --perplexity-file, --dump-tokens, --dump-logprobs, ...) is \
`ds4 run ...`; `ds4 [FLAGS]` without one, or `ds4` alone, is the interactive REPL, `ds4 chat ...`. \
`-sys TEXT` is `--system TEXT` (run, chat, bench).\n\n\
run, chat, serve and bench hold a single-instance lock (flock on /tmp/ds4.lock, DS4_LOCK_FILE \
overrides the path): a second one exits with status 2."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt (and the diagnostic dumps).
    Run(run::Args),
    /// Interactive multi-turn chat reusing the KV state across turns.
    Chat(chat::Args),
    /// OpenAI / Anthropic compatible HTTP server (coding agents).
    Serve(serve::Args),
    /// Throughput sweep over context frontiers (ds4-bench's CSV plus bandwidth columns), or
    /// `--plot` a CSV as SVG.
    Bench(bench::Args),
    /// Compare two logit dumps (.npy) with ds4 PR #15's drift metrics.
    Drift(drift::Args),
    /// Convert an official checkpoint (or a tokenizer.json) to GGUF.
    Convert(convert::Args),
    /// Write a deterministic synthetic model (Flash shapes, random weights).
    Synth(synth::Args),
    /// Tokenize text with a GGUF file's tokenizer.
    Tokenize(tokenize::Args),
    /// Print a GGUF file's metadata and tensor table.
    Inspect(inspect::Args),
}

/// Parse the command line after [`argv::rewrite`] (ds4's spellings).
fn parse_cli() -> Cli {
    let mut cmd = Cli::command();
    let sub = |name: &str| cmd.find_subcommand(name).cloned();
    let run_only = match (sub("run"), sub("chat")) {
        (Some(run), Some(chat)) => argv::RunOnly::from_commands(&run, &chat),
        _ => argv::RunOnly::default(),
    };
    let subs = argv::Subcommands::from_command(&cmd);
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(why) = argv::refusal(&args, &subs) {
        eprintln!("ds4: {why}");
        std::process::exit(2);
    }
    let args = argv::rewrite(args, &run_only, &subs);
    let matches = cmd
        .try_get_matches_from_mut(args)
        .unwrap_or_else(|e| usage_exit(e));
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| usage_exit(e.format(&mut cmd)))
}

/// Help and version go to stdout as clap writes them; a usage error is one line on stderr,
/// `ds4: <what clap says>` (its first paragraph, joined), and exit status 2, as ds4 does.
fn usage_exit(e: clap::Error) -> ! {
    if !e.use_stderr() {
        e.exit();
    }
    // clap's first paragraph (the error and, on the next lines, e.g. the missing arguments or
    // the possible values), joined into one line.
    let text = e.render().to_string();
    let para: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = para.join(" ");
    let line = line.trim_start_matches("error: ");
    eprintln!(
        "ds4: {}",
        if line.is_empty() {
            "invalid arguments"
        } else {
            line
        }
    );
    std::process::exit(2);
}

fn main() -> ExitCode {
    let cli = parse_cli();
    // ds4's single-instance lock, for the life of every process that loads a model for
    // inference (taken before the model is mapped; the kernel drops it at exit).
    let _lock = match &cli.command {
        Command::Run(_) | Command::Chat(_) | Command::Serve(_) => Some(lock::acquire_or_exit()),
        Command::Bench(b) if b.plot.is_empty() => Some(lock::acquire_or_exit()),
        _ => None,
    };
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Drift(a) => drift::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Inspect(a) => inspect::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ds4: error: {}", error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// One clear line: the error and its causes, skipping a cause whose text the line already
/// holds (errors that print their source), newlines flattened.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if line.contains(&c) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&c);
    }
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags that make a subcommand-less line `ds4 run` come from clap's definitions: run's
    /// prompt and diagnostic flags, none of the flags chat shares.
    #[test]
    fn run_only_flags_from_the_subcommands() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        let chat = cmd.find_subcommand("chat").unwrap();
        let r = argv::RunOnly::from_commands(run, chat);
        for l in [
            "prompt",
            "prompt-file",
            "prompt-ids",
            "prompt-ids-file",
            "perplexity-file",
            "dump-tokens",
            "dump-logits",
            "dump-prompt-logits",
            "dump-logprobs",
            "json",
        ] {
            assert!(r.longs.iter().any(|x| x == l), "{l}: {r:?}");
        }
        for l in [
            "system",
            "sys",
            "model",
            "temp",
            "nothink",
            "ctx",
            "tokens",
            "warm-weights",
        ] {
            assert!(!r.longs.iter().any(|x| x == l), "{l}: {r:?}");
        }
        assert_eq!(r.shorts, ['p']);
        Cli::command().debug_assert();
    }

    /// Every subcommand is found after options, and the options' values are known to clap's
    /// definitions (so a value is never taken for a subcommand).
    #[test]
    fn subcommands_and_value_options_from_clap() {
        let s = argv::Subcommands::from_command(&Cli::command());
        for n in [
            "run", "chat", "serve", "bench", "drift", "inspect", "synth", "tokenize",
        ] {
            assert!(s.names.iter().any(|x| x == n), "{n}: {s:?}");
        }
        for l in ["model", "prompt", "port", "ctx", "tokens", "system", "temp"] {
            assert!(s.value_longs.iter().any(|x| x == l), "{l}: {s:?}");
        }
        for l in ["nothink", "warm-weights", "quality"] {
            assert!(!s.value_longs.iter().any(|x| x == l), "{l}: {s:?}");
        }
        for c in ['m', 'p', 'n', 'c'] {
            assert!(s.value_shorts.contains(&c), "{c}: {s:?}");
        }
    }
}
