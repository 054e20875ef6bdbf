//! `ds4 inspect FILE.gguf [--json]`: metadata and tensor table.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ds4_gguf::Gguf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file to inspect.
    file: PathBuf,
    /// Print one JSON object (metadata with arrays in full, tensors) instead of tables.
    #[arg(long)]
    json: bool,
    /// Array items shown per metadata value in the text form.
    #[arg(long, default_value_t = 8)]
    max_items: usize,
}

pub fn run(a: Args) -> Result<()> {
    let g = Gguf::open(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    if a.json {
        let metadata: serde_json::Map<String, serde_json::Value> = g
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        let tensors: Vec<serde_json::Value> = g
            .tensors()
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "type": t.ty.name(),
                    "dims": t.dims,
                    "offset": g.data_offset() + t.offset,
                    "bytes": t.n_bytes,
                })
            })
            .collect();
        let out = serde_json::json!({
            "file": a.file.display().to_string(),
            "version": g.version(),
            "alignment": g.alignment(),
            "file_bytes": g.file_len(),
            "tensor_bytes": g.tensor_bytes_total(),
            "metadata": metadata,
            "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{}: GGUF v{}, {} metadata keys, {} tensors, {:.3} GB of tensor data, alignment {}",
        a.file.display(),
        g.version(),
        g.metadata().len(),
        g.tensors().len(),
        g.tensor_bytes_total() as f64 / 1e9,
        g.alignment()
    );
    println!("\nmetadata:");
    let wk = g.metadata().iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in g.metadata() {
        println!("  {k:<wk$}  {}", v.display_short(a.max_items));
    }
    println!("\ntensors:");
    let wn = g.tensors().iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in g.tensors() {
        let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
        println!(
            "  {:<wn$}  {:<8} [{}]  {} bytes",
            t.name,
            t.ty.name(),
            dims.join(", "),
            t.n_bytes
        );
    }
    Ok(())
}
