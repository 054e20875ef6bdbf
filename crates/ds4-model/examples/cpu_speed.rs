//! CPU speed of the reference backend: prefill and decode tokens/s.
//!
//! `cargo run --release -p ds4-model --example cpu_speed -- <official-dir|file.gguf>
//!  [--recipe f32] [--prompt 512] [--decode 64] [--threads N] [--no-qat] [--chunk 2048]`
//!
//! An official checkpoint folder is converted first (to a temporary file) with the recipe.

use std::sync::Arc;
use std::time::Instant;

use ds4_model::{Engine, EngineOptions, SessionOptions, argmax};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = args
        .next()
        .ok_or("usage: cpu_speed <official-dir|file.gguf> [options]")?;
    let (mut recipe, mut prompt, mut decode, mut threads, mut qat, mut chunk) =
        ("f32".to_string(), 512usize, 64usize, None, true, 2048usize);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--recipe" => recipe = val()?,
            "--prompt" => prompt = val()?.parse()?,
            "--decode" => decode = val()?.parse()?,
            "--threads" => threads = Some(val()?.parse()?),
            "--chunk" => chunk = val()?.parse()?,
            "--no-qat" => qat = false,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let tmp = tempfile::tempdir()?;
    let path = if std::path::Path::new(&input).is_dir() {
        let out = tmp.path().join("model.gguf");
        let t = Instant::now();
        ds4_convert::convert_checkpoint(
            std::path::Path::new(&input),
            &out,
            &ds4_convert::ConvertOptions::new(recipe.parse()?),
            &mut |_| {},
        )?;
        eprintln!("converted ({recipe}) in {:.2}s", t.elapsed().as_secs_f64());
        out
    } else {
        input.into()
    };
    let g = Arc::new(ds4_gguf::Gguf::open(&path)?);
    let engine = Engine::from_gguf(
        g,
        EngineOptions {
            qat,
            threads,
            ..Default::default()
        },
    )?;
    let s = engine.shape().clone();
    let mut seed = 0x1234_5678u64;
    let ids: Vec<u32> = (0..prompt)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 33) % s.n_vocab as u64) as u32
        })
        .collect();
    let mut sess = engine.new_session(SessionOptions {
        ctx: prompt + decode + 1,
        prefill_chunk: chunk,
    })?;
    let t = Instant::now();
    sess.prefill(&ids)?;
    let tp = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..decode {
        let tok = argmax(sess.logits());
        sess.advance(tok)?;
    }
    let td = t.elapsed().as_secs_f64();
    println!(
        "layers={} embd={} qat={qat} threads={} prompt={prompt} chunk={chunk}: prefill {:.1} tok/s ({:.2}s), decode {:.1} tok/s ({:.3}s for {decode})",
        s.n_layer,
        s.n_embd,
        engine.pool().current_num_threads(),
        prompt as f64 / tp,
        tp,
        decode as f64 / td,
        td
    );
    Ok(())
}
