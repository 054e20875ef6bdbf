//! `ds4 convert`: official checkpoint → GGUF, or a vocab-only GGUF from a tokenizer.json.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ds4_convert::{ConvertOptions, Recipe};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args)]
pub struct Args {
    /// Official checkpoint folder (config.json + safetensors).
    input: Option<PathBuf>,
    /// Output GGUF file.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Recipe: f32 (exact), f16, q8_0, q2 (ds4's q2), q4 (Q4_K experts).
    #[arg(long = "quant", default_value = "q2")]
    recipe: Recipe,
    /// tokenizer.json whose vocabulary is embedded in the GGUF.
    #[arg(long)]
    tokenizer_json: Option<PathBuf>,
    /// llama.cpp legacy imatrix (.dat) for IQ2_XXS importance.
    #[arg(long)]
    imatrix: Option<PathBuf>,
    /// general.name of the output.
    #[arg(long)]
    name: Option<String>,
    /// Write only the tokenizer metadata (needs --tokenizer-json).
    #[arg(long)]
    vocab_only: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.vocab_only {
        let tj = a
            .tokenizer_json
            .as_ref()
            .context("--vocab-only needs --tokenizer-json PATH")?;
        let n = ds4_convert::convert_vocab_only(tj, &a.output)?;
        eprintln!("ds4: wrote {} ({n} bytes, vocab only)", a.output.display());
        return Ok(());
    }
    let Some(input) = &a.input else {
        bail!("give the checkpoint folder (or --vocab-only --tokenizer-json PATH)");
    };
    let mut opts = ConvertOptions::new(a.recipe);
    opts.tokenizer_json = a.tokenizer_json.clone();
    opts.imatrix = a.imatrix.clone();
    opts.name = a.name.clone();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} ({binary_bytes_per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = ds4_convert::convert_checkpoint(input, &a.output, &opts, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{}/{} {}", p.index + 1, p.n_tensors, p.tensor));
    })?;
    bar.finish_and_clear();
    eprintln!(
        "ds4: wrote {} ({} tensors, {:.3} GB, recipe {})",
        report.output.display(),
        report.n_tensors,
        report.file_bytes as f64 / 1e9,
        report.recipe
    );
    Ok(())
}
