//! A session: the token list, the backend's KV state and the next-token logits, with chunked
//! prefill, decode, prefix sync and snapshots.

use crate::backend::{Backend, Trace};
use crate::error::{ModelError, Result};
use crate::plan::Plan;
use crate::snapshot;

/// Default prefill chunk (ds4's `min(prompt, 2048)`).
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;
/// Default context size.
pub const DEFAULT_CTX: usize = 32768;

/// Session options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    /// Most tokens the session can hold.
    pub ctx: usize,
    /// Tokens per prefill chunk.
    pub prefill_chunk: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            ctx: DEFAULT_CTX,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

/// The prefill chunk a snapshot header records: ds4's default `prefill_cap`,
/// `min(ctx, 2048)`, whatever chunk this session prefills with. ds4 refuses a payload whose
/// chunk differs from its own; the state here does not depend on the chunk (prefill in one
/// chunk, in several and token by token give bit-identical states: tests/session.rs), so the
/// header names the schedule ds4 uses by default and a CUDA session's 8192-token passes stay
/// loadable by ds4.
pub fn snapshot_chunk(ctx: usize) -> usize {
    ctx.min(DEFAULT_PREFILL_CHUNK)
}

/// What [`Session::sync`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Tokens of the previous state that were kept.
    pub reused: usize,
    /// Tokens evaluated.
    pub evaluated: usize,
}

/// A session over one backend.
pub struct Session {
    backend: Box<dyn Backend>,
    plan: Plan,
    opts: SessionOptions,
    tokens: Vec<u32>,
    /// The next-token logits of a restored snapshot, until the next evaluation; otherwise the
    /// logits are the backend's own (read in place: no copy per decode step).
    restored: Option<Vec<f32>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("backend", &self.backend.name())
            .field("opts", &self.opts)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl Session {
    /// A session over `backend` (which must be empty and have `ctx() ≥ opts.ctx`).
    pub fn with_backend(mut backend: Box<dyn Backend>, opts: SessionOptions) -> Result<Session> {
        if opts.ctx == 0 || opts.prefill_chunk == 0 {
            return Err(ModelError::BadOption(
                "ctx and prefill_chunk must be at least 1".into(),
            ));
        }
        if backend.ctx() < opts.ctx {
            return Err(ModelError::BadOption(format!(
                "backend context {} is smaller than the session context {}",
                backend.ctx(),
                opts.ctx
            )));
        }
        backend.reset();
        let plan = Plan::new(backend.shape());
        Ok(Session {
            backend,
            plan,
            opts,
            tokens: Vec::new(),
            restored: None,
        })
    }

    pub fn options(&self) -> &SessionOptions {
        &self.opts
    }
    /// The tokens evaluated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Number of tokens evaluated (the position of the next token).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }
    /// Logits for the next token (empty before the first token).
    pub fn logits(&self) -> &[f32] {
        match &self.restored {
            Some(l) => l,
            None => self.backend.logits(),
        }
    }

    /// The greedy next token: the first largest logit other than `exclude`
    /// ([`crate::sampler::argmax_excluding`]), from the backend's own pick where it made one
    /// (the CUDA decode step picks on the device, and the host then reads 16 bytes instead of
    /// the vocabulary's logits), else from [`Session::logits`]. The same token either way.
    pub fn greedy(&self, exclude: Option<u32>) -> u32 {
        if self.restored.is_none()
            && let Some([best, second]) = self.backend.greedy_pick()
        {
            return match exclude {
                Some(e) if e == best => {
                    // u32::MAX: no other logit (a one-token vocabulary).
                    if second == u32::MAX { 0 } else { second }
                }
                _ => best,
            };
        }
        crate::sampler::argmax_excluding(self.logits(), exclude)
    }

    /// The next token under `p`: [`Session::greedy`] at temperature ≤ 0 (as
    /// [`crate::sample`] would pick), else [`crate::sample`] of the logits.
    pub fn next_token(&self, p: &crate::SamplerParams, rng: &mut crate::Rng) -> u32 {
        if p.temperature <= 0.0 {
            self.greedy(None)
        } else {
            crate::sample(self.logits(), p, rng)
        }
    }

    /// Forget everything.
    pub fn reset(&mut self) {
        self.backend.reset();
        self.tokens.clear();
        self.restored = None;
    }

    fn check_room(&self, n: usize) -> Result<()> {
        let needed = self.tokens.len() + n;
        if needed > self.opts.ctx {
            return Err(ModelError::ContextFull {
                ctx: self.opts.ctx,
                needed,
            });
        }
        Ok(())
    }

    fn eval_chunks(
        &mut self,
        tokens: &[u32],
        mut all: Option<&mut Vec<f32>>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<()> {
        self.check_room(tokens.len())?;
        let n_vocab = self.backend.shape().n_vocab;
        if let Some(i) = tokens.iter().position(|&t| t as usize >= n_vocab) {
            return Err(ModelError::TokenOutOfRange {
                token: tokens[i],
                pos: self.tokens.len() + i,
                n_vocab,
            });
        }
        let mut done = 0;
        for chunk in tokens.chunks(self.opts.prefill_chunk) {
            let r = self.backend.eval(chunk, all.is_some());
            if let Err(e) = r {
                // The backend state may be partially updated: start over from a clean state so
                // the session stays consistent (tokens ↔ state).
                self.reset();
                return Err(e);
            }
            self.tokens.extend_from_slice(chunk);
            // The logits are now the backend's (no longer a restored snapshot's).
            self.restored = None;
            if let Some(out) = all.as_deref_mut() {
                out.extend_from_slice(self.backend.chunk_logits());
            }
            done += chunk.len();
            if !progress(done, tokens.len()) && done < tokens.len() {
                // Stopped between chunks: the state holds the tokens evaluated so far.
                return Err(ModelError::Stopped {
                    done,
                    total: tokens.len(),
                });
            }
        }
        Ok(())
    }

    /// Evaluate `tokens` after the current ones, in chunks of `prefill_chunk`.
    ///
    /// Token ids and context room are checked first (an error leaves the session unchanged);
    /// if the backend then fails, the session is reset (empty): a failed chunk may have left
    /// the backend's state half-updated.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.eval_chunks(tokens, None, &mut |_, _| true)
    }

    /// [`Session::prefill`], also returning the logits of every token (`[n][vocab]`).
    pub fn prefill_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut all = Vec::with_capacity(tokens.len() * self.backend.shape().n_vocab);
        self.eval_chunks(tokens, Some(&mut all), &mut |_, _| true)?;
        Ok(all)
    }

    /// Evaluate one token; returns the logits for the next one.
    pub fn decode(&mut self, token: u32) -> Result<&[f32]> {
        self.advance(token)?;
        Ok(self.logits())
    }

    /// Evaluate one token without reading the logits: the generation loops' step. A backend
    /// that picks the greedy token itself (the CUDA graph step) then copies no logits unless
    /// [`Session::logits`] asks for them ([`Session::greedy`] reads the pick).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        self.eval_chunks(&[token], None, &mut |_, _| true)
    }

    /// Bring the session to exactly `tokens`, reusing the current state when the current
    /// tokens are a prefix of them (only the suffix is evaluated); otherwise the state is
    /// rebuilt from scratch. (The compressor frontiers and the sliding window cannot be rewound
    /// in general, so a shorter or diverging token list means a new prefill.)
    pub fn sync(&mut self, tokens: &[u32]) -> Result<SyncOutcome> {
        self.sync_with_progress(tokens, &mut |_, _| true)
    }

    /// [`Session::sync`], calling `progress(done, total)` after every prefill chunk (`total`:
    /// the tokens to evaluate). When it returns false before the last chunk, the sync stops
    /// there with [`ModelError::Stopped`]: the session then holds the tokens evaluated so far
    /// (a prefix of `tokens`) and their logits.
    pub fn sync_with_progress(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<SyncOutcome> {
        let live = self.tokens.len();
        if live <= tokens.len() && self.tokens[..] == tokens[..live] {
            if live == tokens.len() && live > 0 {
                return Ok(SyncOutcome {
                    reused: live,
                    evaluated: 0,
                });
            }
            self.eval_chunks(&tokens[live..], None, progress)?;
            return Ok(SyncOutcome {
                reused: live,
                evaluated: tokens.len() - live,
            });
        }
        self.reset();
        self.eval_chunks(tokens, None, progress)?;
        Ok(SyncOutcome {
            reused: 0,
            evaluated: tokens.len(),
        })
    }

    /// Length of the common prefix of the session's tokens and `tokens`.
    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// The snapshot payload (model-spec §4.5). Needs at least one evaluated token.
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        if self.tokens.is_empty() || self.logits().is_empty() {
            return Err(ModelError::NoLogits);
        }
        let state = self.backend.export_state()?;
        Ok(snapshot::encode(
            self.backend.shape(),
            &self.plan,
            self.opts.ctx,
            snapshot_chunk(self.opts.ctx),
            &self.tokens,
            self.logits(),
            &state,
        )?)
    }

    /// Restore a snapshot payload. A snapshot that does not decode or does not fit this
    /// session is refused and the session is unchanged; if the backend then fails to import a
    /// valid one, the session is reset (empty): its state may be half-imported.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let snap = snapshot::decode(bytes, self.backend.shape(), &self.plan, self.opts.ctx)?;
        if let Err(e) = self.backend.import_state(&snap.state) {
            self.reset();
            return Err(e);
        }
        self.tokens = snap.tokens;
        self.restored = Some(snap.logits);
        Ok(())
    }

    /// Start (clearing) or stop the backend's debug trace.
    pub fn set_trace(&mut self, on: bool) {
        self.backend.set_trace(on);
    }

    /// The trace recorded since `set_trace(true)`.
    pub fn trace(&self) -> Option<&Trace> {
        self.backend.trace()
    }
}
