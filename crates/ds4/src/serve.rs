//! `ds4 serve`: the OpenAI / Anthropic compatible HTTP server (crate `ds4-server`) over the
//! binary's model loading (`-m`, the built-in fallback, `--backend cpu|cuda`, `--threads`,
//! `--no-qat`, `--quality`, `--device`, `--dir-steering-*`).
//!
//! The context size (`-c/--ctx`), the prefill chunk and the sampling defaults are the server's
//! own flags ([`ds4_server::ServeArgs`]), so only the loading half of the model options
//! ([`LoadArgs`]) is flattened here.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::common::{self, LoadArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub serve: ds4_server::ServeArgs,
}

/// Log to stderr through `tracing` (`RUST_LOG` filters; default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (never in the binary) would fail; ignore it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn run(mut a: Args) -> Result<()> {
    init_logging();
    a.serve
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid option: {e}"))?;
    let lm = common::load_model(&a.load)?;
    let tok = Arc::new(common::load_tokenizer(&lm.gguf, &lm.path)?);
    // Steering changes the KV state: checkpoints are keyed by it too.
    let fingerprint = common::cache_fingerprint(&lm.gguf, lm.engine.steering());
    let quant_bits = common::routed_quant_bits(lm.engine.model());
    tracing::info!(
        target: "ds4",
        "model {} ({}layers {}, routed experts {}-bit, fingerprint {}), backend {:?}",
        lm.path.display(),
        if lm.builtin { "built-in, " } else { "" },
        lm.engine.shape().n_layer,
        quant_bits,
        &hex(&fingerprint)[..16],
        a.load.backend,
    );
    let kind = a.load.backend;
    let cuda = common::cuda_options(&a.load, &lm.engine, a.serve.prefill_chunk);
    a.serve.prefill_chunk = Some(common::prefill_chunk(&a.load, a.serve.prefill_chunk));
    let engine = lm.engine.clone();
    let bundle = ds4_server::EngineBundle {
        tokenizer: tok,
        shape: lm.engine.shape().clone(),
        model_name: "deepseek-v4-flash".into(),
        quant_bits,
        fingerprint,
        backend_factory: Box::new(move |ctx| common::new_backend(kind, &engine, &cuda, ctx)),
    };
    ds4_server::serve(a.serve, bundle).context("server")?;
    Ok(())
}
