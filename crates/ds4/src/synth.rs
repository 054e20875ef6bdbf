//! `ds4 synth --preset flash --quant q2|q4 [--layers N] --seed S -o FILE.gguf`: a deterministic
//! GGUF with Flash's exact tensor set, types, shapes and metadata (real tokenizer), random but
//! well-scaled values.

use std::path::PathBuf;

use anyhow::{Result, bail};
use ds4_convert::{Recipe, SynthOptions};
use ds4_model::Shape;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Preset {
    /// DeepSeek V4 Flash.
    Flash,
    /// The tiny built-in model's shape.
    Tiny,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value_t = Preset::Flash)]
    preset: Preset,
    /// Recipe (types per tensor).
    #[arg(long = "quant", default_value = "q2")]
    recipe: Recipe,
    /// Keep only the first N layers (Flash: 1..=43).
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Write a synthetic byte-level vocab instead of the real tokenizer.
    #[arg(long)]
    synthetic_vocab: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut shape = match a.preset {
        Preset::Flash => Shape::flash_layers(a.layers.unwrap_or(43)),
        Preset::Tiny => ds4_convert::builtin::tiny_shape(),
    };
    if let (Preset::Tiny, Some(n)) = (a.preset, a.layers) {
        if n == 0 || n > shape.n_layer {
            bail!("--layers must be 1..={}", shape.n_layer);
        }
        shape.n_layer = n;
        shape.compress_ratios.truncate(n);
        shape.swiglu_clamp.truncate(n);
        shape.n_hash_layer = shape.n_hash_layer.min(n);
    }
    let vocab = if a.synthetic_vocab || shape.n_vocab != 129280 {
        None
    } else {
        let tok = ds4_tokenizer::Tokenizer::from_tokenizer_json_bytes(
            ds4_convert::builtin::TOKENIZER_JSON,
        )?;
        Some(tok.gguf_vocab_metadata())
    };
    let opts = SynthOptions {
        shape,
        recipe: a.recipe,
        seed: a.seed,
        name: None,
        vocab,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} ({binary_bytes_per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = std::time::Instant::now();
    let rep = ds4_convert::synth_gguf(&a.output, &opts, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(p.tensor.clone());
    })?;
    bar.finish_and_clear();
    let s = t0.elapsed().as_secs_f64();
    eprintln!(
        "ds4: wrote {} ({} tensors, {:.2} GB in {s:.1} s, {:.2} GB/s)",
        rep.output.display(),
        rep.n_tensors,
        rep.file_bytes as f64 / 1e9,
        rep.file_bytes as f64 / 1e9 / s.max(1e-9)
    );
    Ok(())
}
