//! `ds4 run`: one prompt, generate, print (and the diagnostic dumps).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ds4_model::npy;
use ds4_tokenizer::{ThinkMode, Tokenizer};

use crate::common::{self, ModelArgs, SamplingArgs, ThinkArgs, Utf8Stream};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (rendered with the chat template unless it starts with BOS).
    #[arg(short = 'p', long, group = "source")]
    pub prompt: Option<String>,
    /// Read the prompt text from a file.
    #[arg(long, group = "source")]
    pub prompt_file: Option<PathBuf>,
    /// Prompt as token ids, comma separated (no template).
    #[arg(long, group = "source", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Prompt ids from a JSON array file.
    #[arg(long, group = "source")]
    pub prompt_ids_file: Option<PathBuf>,
    /// System prompt ("" removes it; also `-sys`).
    #[arg(long = "system", visible_alias = "sys", default_value = ds4_tokenizer::chat::DEFAULT_SYSTEM_PROMPT)]
    pub system: String,
    /// Tokens to generate (clamped to the context).
    #[arg(short = 'n', long = "tokens", default_value_t = 50000)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub think: ThinkArgs,
    /// Print one JSON object on stdout (`tokens`, `text`, timings) instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Print the prompt's tokenization and exit.
    #[arg(long)]
    pub dump_tokens: bool,
    /// Write float32 [N, vocab] .npy: row i = the logits that chose generated token i. A path
    /// ending in .json instead writes ds4's `--dump-logits` JSON of the next-token logits
    /// after the prompt and exits without generating (as ds4 does).
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Write float32 [P, vocab] .npy: row i = the logits after prompt token i.
    #[arg(long)]
    pub dump_prompt_logits: Option<PathBuf>,
    /// Greedy continuation with top-k log-probabilities as JSON (ds4's format).
    #[arg(long)]
    pub dump_logprobs: Option<PathBuf>,
    /// Alternatives per step for --dump-logprobs (max 128).
    #[arg(long, default_value_t = 20)]
    pub logprobs_top_k: usize,
    /// Teacher-forced perplexity of a raw text file (no chat template): the first 32 tokens
    /// seed the context, the rest is scored (at most -n tokens and ctx − 32); prints
    /// `tokens= scored= nll= avg_nll= ppl=` on stdout.
    #[arg(long, conflicts_with = "source")]
    pub perplexity_file: Option<PathBuf>,
}

/// Tokens that seed the context before `--perplexity-file` scores (ds4's value).
const PPL_SEED: usize = 32;
/// Tokens evaluated per step while scoring (their logits rows are held at once).
const PPL_CHUNK: usize = 256;

/// `--perplexity-file`: Σ −log p(token | the tokens before it) over the scored tokens, the
/// log-softmax in f64.
fn perplexity(
    a: &Args,
    lm: &common::LoadedModel,
    tok: Option<&Tokenizer>,
    f: &std::path::Path,
) -> Result<()> {
    let tok = tok.context("the model has no tokenizer: --perplexity-file needs one")?;
    let ids = tok.encode(&common::read_text(f)?)?;
    if ids.len() <= PPL_SEED {
        bail!(
            "{} has {} tokens: --perplexity-file needs more than {PPL_SEED}",
            f.display(),
            ids.len()
        );
    }
    let ctx = a.model.ctx;
    if ctx <= PPL_SEED {
        bail!("the context ({ctx}) must exceed {PPL_SEED} tokens for --perplexity-file");
    }
    let scored = (ids.len() - PPL_SEED).min(a.n).min(ctx - PPL_SEED);
    let n_vocab = lm.engine.shape().n_vocab;
    let mut session = common::make_session(&a.model, lm)?;
    session.prefill(&ids[..PPL_SEED])?;
    let nll_of = |logits: &[f32], t: u32| npy::logsumexp(logits) - logits[t as usize] as f64;
    // The seed's logits score ids[PPL_SEED]; evaluating ids[pos..upto] gives the logits that
    // score ids[pos + 1..=upto]. The last scored token is never evaluated.
    let end = PPL_SEED + scored;
    let mut nll = nll_of(session.logits(), ids[PPL_SEED]);
    let mut pos = PPL_SEED;
    while pos + 1 < end {
        let upto = (pos + PPL_CHUNK).min(end - 1);
        let rows = session.prefill_all_logits(&ids[pos..upto])?;
        for (k, row) in rows.chunks_exact(n_vocab).enumerate() {
            nll += nll_of(row, ids[pos + 1 + k]);
        }
        pos = upto;
    }
    let avg = nll / scored as f64;
    println!(
        "tokens={} scored={scored} nll={nll:.9} avg_nll={avg:.9} ppl={:.9}",
        ids.len(),
        avg.exp()
    );
    Ok(())
}

pub fn prompt_ids(a: &Args, tok: Option<&Tokenizer>, think: ThinkMode) -> Result<Vec<u32>> {
    if let Some(ids) = &a.prompt_ids {
        return Ok(ids.clone());
    }
    if let Some(f) = &a.prompt_ids_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let ids: Vec<u32> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON array of token ids", f.display()))?;
        return Ok(ids);
    }
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => common::read_text(f)?,
        (None, None) => {
            bail!("give a prompt: -p TEXT, --prompt-file F, --prompt-ids or --prompt-ids-file")
        }
    };
    let tok = tok.context("the model has no tokenizer: use --prompt-ids")?;
    Ok(ds4_tokenizer::encode_cli_prompt(
        tok, &a.system, &text, think,
    )?)
}

/// Whether a dump path asks for ds4's JSON (`.json`) rather than `.npy`.
fn is_json(p: &std::path::Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

fn token_json(tok: Option<&Tokenizer>, id: u32) -> serde_json::Value {
    let bytes = tok.map(|t| t.decode(&[id])).unwrap_or_default();
    serde_json::json!({
        "id": id,
        "text": String::from_utf8_lossy(&bytes),
        "bytes": bytes,
    })
}

pub fn run(a: Args) -> Result<()> {
    let lm = common::load_model(&a.model.load)?;
    let tok = common::load_tokenizer(&lm.gguf, &lm.path).ok();
    if let Some(f) = &a.perplexity_file {
        return perplexity(&a, &lm, tok.as_ref(), f);
    }
    let think = a.think.mode(a.model.ctx);
    let ids = prompt_ids(&a, tok.as_ref(), think)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let n_vocab = lm.engine.shape().n_vocab;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
        bail!("token id {bad} is outside the model's vocabulary ({n_vocab})");
    }
    if a.dump_tokens {
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        println!("[{}]", list.join(", "));
        for &id in &ids {
            let s = tok.as_ref().and_then(|t| t.token_str(id)).unwrap_or("");
            println!("{id:6}  {s}");
        }
        return Ok(());
    }
    if ids.len() >= a.model.ctx {
        bail!(
            "the prompt has {} tokens but the context is {} (raise --ctx)",
            ids.len(),
            a.model.ctx
        );
    }
    let mut session = common::make_session(&a.model, &lm)?;
    let greedy = a.dump_logprobs.is_some();
    let params = if greedy {
        ds4_model::SamplerParams::greedy()
    } else {
        a.sampling.params()?
    };
    let mut rng = a.sampling.rng();
    let eos = tok.as_ref().map(|t| t.specials().eos);
    let think_end = tok.as_ref().map(|t| t.specials().think_end);
    if a.logprobs_top_k > 128 {
        bail!("--logprobs-top-k is at most 128");
    }

    let t0 = Instant::now();
    if let Some(path) = &a.dump_prompt_logits {
        let all = session.prefill_all_logits(&ids)?;
        npy::write(path, &[ids.len(), n_vocab], &all)
            .with_context(|| format!("cannot write {}", path.display()))?;
    } else {
        session.prefill(&ids)?;
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    if let Some(path) = a.dump_logits.as_ref().filter(|p| is_json(p)) {
        let logits = session.logits();
        let best = common::argmax_finite(logits);
        let json = common::logits_json(
            &[
                ("source", "\"ds4-rs\"".into()),
                (
                    "model",
                    serde_json::Value::from(lm.path.display().to_string()).to_string(),
                ),
                (
                    "backend",
                    serde_json::Value::from(session.backend().name()).to_string(),
                ),
                ("mt", "\"off\"".into()),
                ("quality", a.model.load.quality.to_string()),
                (
                    "quant_bits",
                    Some(common::routed_quant_bits(lm.engine.model()))
                        .filter(|&b| b > 0)
                        .map_or("null".into(), |b| b.to_string()),
                ),
                ("prompt_tokens", ids.len().to_string()),
                ("ctx", a.model.ctx.to_string()),
                ("vocab", logits.len().to_string()),
                (
                    "argmax_token",
                    best.map_or("null".into(), |(i, _)| {
                        token_json(tok.as_ref(), i as u32).to_string()
                    }),
                ),
                (
                    "argmax_logit",
                    best.map_or("null".into(), |(_, v)| common::json_f32(v)),
                ),
            ],
            logits,
        );
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "ds4: wrote the next-token logits after {} prompt tokens to {}",
            ids.len(),
            path.display()
        );
        return Ok(());
    }

    let n = a.n.min(a.model.ctx - ids.len() - 1);
    let mut out_tokens: Vec<u32> = Vec::new();
    let mut dumped: Vec<f32> = Vec::new();
    let mut steps: Vec<serde_json::Value> = Vec::new();
    let mut text_bytes: Vec<u8> = Vec::new();
    let stdout = std::io::stdout();
    let tty = stdout.is_terminal();
    let mut printer = Utf8Stream::default();
    let mut in_reasoning = think.enabled() && a.prompt_ids.is_none() && a.prompt_ids_file.is_none();
    let print = !a.json && a.dump_logprobs.is_none();
    if print && in_reasoning && tty {
        print!("\x1b[90m");
    }
    let t1 = Instant::now();
    for step in 0..n {
        if a.dump_logits.is_some() {
            dumped.extend_from_slice(session.logits());
        }
        // Greedy steps take the backend's own pick where it made one (no logits copied).
        let next = session.next_token(&params, &mut rng);
        if a.dump_logprobs.is_some() {
            let top = npy::top_logprobs(session.logits(), a.logprobs_top_k);
            steps.push(serde_json::json!({
                "step": step,
                "selected": token_json(tok.as_ref(), next),
                "top_logprobs": top.iter().map(|t| serde_json::json!({
                    "token": token_json(tok.as_ref(), t.id),
                    "logit": t.logit,
                    "logprob": t.logprob,
                })).collect::<Vec<_>>(),
            }));
        }
        if Some(next) == eos {
            break;
        }
        out_tokens.push(next);
        if let Some(t) = &tok {
            let bytes = t.decode(&[next]);
            text_bytes.extend_from_slice(&bytes);
            if print {
                let mut lock = stdout.lock();
                if Some(next) == think_end && in_reasoning {
                    in_reasoning = false;
                    if tty {
                        let _ = writeln!(lock, "\x1b[0m");
                    } else {
                        let _ = write!(lock, "{}", printer.push(&bytes));
                    }
                } else {
                    let _ = write!(lock, "{}", printer.push(&bytes));
                }
                let _ = lock.flush();
            }
        }
        if step + 1 < n {
            session.advance(next)?;
        }
    }
    let gen_s = t1.elapsed().as_secs_f64();
    if print {
        let mut lock = stdout.lock();
        let _ = write!(lock, "{}", printer.finish());
        if in_reasoning && tty {
            let _ = write!(lock, "\x1b[0m");
        }
        let _ = writeln!(lock);
    }
    let prefill_tps = ids.len() as f64 / prefill_s.max(1e-9);
    let gen_tps = out_tokens.len() as f64 / gen_s.max(1e-9);
    eprintln!(
        "ds4: prompt {} tokens, prefill: {prefill_tps:.1} t/s, generation: {gen_tps:.1} t/s ({} tokens, backend {})",
        ids.len(),
        out_tokens.len(),
        session.backend().name()
    );
    if let Some(path) = &a.dump_logits {
        let rows = dumped.len() / n_vocab;
        npy::write(path, &[rows, n_vocab], &dumped)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &a.dump_logprobs {
        let doc = serde_json::json!({
            "source": "ds4-rs",
            "prompt_tokens": ids.len(),
            "ctx": a.model.ctx,
            "top_k": a.logprobs_top_k,
            "steps": steps,
        });
        std::fs::write(path, serde_json::to_vec(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if a.json {
        let doc = serde_json::json!({
            "model": lm.path.display().to_string(),
            "builtin_model": lm.builtin,
            "backend": session.backend().name(),
            "prompt_tokens": ids.len(),
            "tokens": out_tokens,
            "text": String::from_utf8_lossy(&text_bytes),
            "prefill_tps": prefill_tps,
            "gen_tps": gen_tps,
        });
        println!("{}", serde_json::to_string(&doc)?);
    }
    Ok(())
}
