//! `ds4`: the ds4-rs command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod inspect;

/// DeepSeek V4 Flash inference engine (ds4-rs).
#[derive(Parser)]
#[command(name = "ds4", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a GGUF file's metadata and tensor table.
    Inspect(inspect::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line: the error and its causes.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("ds4: error: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}
