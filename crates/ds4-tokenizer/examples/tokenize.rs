//! Load a tokenizer (tokenizer.json or GGUF) and tokenize files, printing timings.
//!
//! `cargo run --release -p ds4-tokenizer --example tokenize -- TOKENIZER.json|MODEL.gguf [FILE...]`

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: tokenize TOKENIZER.json|MODEL.gguf [FILE...]");
        std::process::exit(2);
    };
    let t0 = Instant::now();
    let tok = if path.ends_with(".gguf") {
        let g = ds4_gguf::Gguf::open(&path)?;
        ds4_tokenizer::Tokenizer::from_gguf(&g)?
    } else {
        ds4_tokenizer::Tokenizer::from_tokenizer_json(&path)?
    };
    println!("loaded {} tokens in {:?}", tok.vocab_size(), t0.elapsed());
    let t1 = Instant::now();
    let again =
        ds4_tokenizer::Tokenizer::from_vocab(tok.tokens().to_vec(), tok.merges().to_vec(), None)?;
    println!("from_vocab (no token types) in {:?}", t1.elapsed());
    drop(again);
    for f in args {
        let text = std::fs::read_to_string(&f)?;
        for pass in 0..2 {
            let t = Instant::now();
            let ids = tok.encode(&text)?;
            let dt = t.elapsed();
            println!(
                "{f} (pass {pass}): {} bytes -> {} tokens in {:?} ({:.2} MB/s)",
                text.len(),
                ids.len(),
                dt,
                text.len() as f64 / dt.as_secs_f64() / 1e6
            );
        }
    }
    Ok(())
}
