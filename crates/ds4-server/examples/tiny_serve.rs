//! `ds4 serve` stand-in for scripts until the `ds4` binary wires it: serves the built-in tiny
//! model (random weights, real DeepSeek V4 tokenizer) with every `ds4 serve` flag.
//!
//! ```sh
//! cargo run --release -p ds4-server --example tiny_serve -- --port 8000
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ds4_model::{Engine, EngineOptions};
use ds4_server::{EngineBundle, ServeArgs};
use ds4_tokenizer::Tokenizer;

#[derive(Parser)]
#[command(name = "tiny_serve")]
struct Cli {
    /// Model file (default: the built-in tiny model, written to the temp dir on first use).
    #[arg(short = 'm', long)]
    model: Option<std::path::PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let path = match cli.model {
        Some(p) => p,
        None => ds4_convert::builtin::tiny_path(None)?,
    };
    let g = Arc::new(ds4_gguf::Gguf::open(&path)?);
    let tok = Arc::new(Tokenizer::from_gguf(&g)?);
    let engine = Engine::from_gguf(g, EngineOptions::default())?;
    // Fingerprint: the file's identity (name and size) hashed; the real binary hashes metadata.
    let meta = std::fs::metadata(&path)?;
    let mut fp = [0u8; 32];
    let key = format!("{}:{}", path.display(), meta.len());
    for (i, b) in key.bytes().enumerate() {
        fp[i % 32] = fp[i % 32].wrapping_mul(31).wrapping_add(b);
    }
    let bundle = EngineBundle {
        tokenizer: tok,
        shape: engine.shape().clone(),
        model_name: "deepseek-v4-flash".into(),
        quant_bits: 2,
        fingerprint: fp,
        backend_factory: Box::new(move |ctx| Ok(Box::new(engine.cpu_backend(ctx)?))),
    };
    ds4_server::serve(cli.serve, bundle)?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tiny_serve: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
