//! `ds4 tokenize -m FILE.gguf (-p TEXT | --text-file F) [--json]`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ds4_gguf::Gguf;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file whose tokenizer metadata is used (a full model or a vocab-only file).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Text to tokenize.
    #[arg(short = 'p', long, group = "src", required = true)]
    prompt: Option<String>,
    /// File holding the text to tokenize.
    #[arg(long, group = "src")]
    text_file: Option<PathBuf>,
    /// Print a JSON array of ids on stdout and nothing else.
    #[arg(long)]
    json: bool,
    /// Do not recognise added/special tokens inside the text.
    #[arg(long)]
    no_special: bool,
}

pub fn run(a: Args) -> Result<()> {
    let g = Gguf::open(&a.model).with_context(|| format!("cannot open {}", a.model.display()))?;
    let tok = crate::common::load_tokenizer(&g, &a.model)?;
    let text = match (&a.prompt, &a.text_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => crate::common::read_text(f)?,
        (None, None) => unreachable!("clap requires a source"),
    };
    let ids = if a.no_special {
        tok.encode_plain(&text)?
    } else {
        tok.encode(&text)?
    };
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
        return Ok(());
    }
    for id in &ids {
        let s = tok.token_str(*id).unwrap_or("");
        println!("{id:6}  {s}");
    }
    eprintln!("{} tokens", ids.len());
    Ok(())
}
