//! `ds4 synth`: a deterministic synthetic GGUF with ds4's exact tensor inventory and types for a
//! shape (Flash by default), random but well-scaled values, written at disk speed.
//!
//! Values (performance.md §5.2):
//! * every matrix has elements of standard deviation `gain / sqrt(ne0)` (`ne0` = fan-in), mean
//!   about 0, with gain 1 except the embedding (std 1), the LM head (2.5) and the compressor /
//!   indexer position biases (std 0.5);
//! * quantized matrices hold random payload bits (uniform quant codes, grid indices, signs and
//!   sub-block scales) with the super-block scale (and min scale) chosen so that the dequantized
//!   elements have that standard deviation;
//! * norms are 1, HC scales are 1, HC bases, sinks and router biases 0; `tid2eid` rows are
//!   `n_expert_used` distinct experts drawn uniformly;
//! * a byte-level vocabulary of `n_vocab` tokens with ds4's 7 special tokens and no merges.
//!
//! Speed: for every (type, fan-in, gain) a pool of up to [`POOL_BYTES`] of random blocks is built
//! once; each tensor is written as a run through its pool starting at a per-tensor pseudo-random
//! block, so generation costs a few hundred milliseconds and writing runs at I/O speed. Output is
//! a function of (shape, recipe, seed, name) only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ds4_gguf::{GgmlType, GgufBuilder, MetaValue};
use ds4_model::Shape;

use crate::convert::ConvertProgress;
use crate::error::{ConvertError, Result, io_err};
use crate::names::{PlannedTensor, TensorClass, plan_tensors};
use crate::recipe::Recipe;

/// Largest random pool per (type, fan-in, gain).
pub const POOL_BYTES: usize = 16 << 20;

/// Version of the generator, recorded in `ds4.synth.version`; bumped whenever the bytes for a
/// given (shape, recipe, seed) change.
pub const SYNTH_VERSION: u32 = 1;

/// Options of [`synth_gguf`].
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Model shape (e.g. `Shape::flash()` or `Shape::flash_layers(36)`).
    pub shape: Shape,
    /// Tensor types.
    pub recipe: Recipe,
    /// RNG seed.
    pub seed: u64,
    /// `general.name` (default "DeepSeek-V4-Flash-synthetic-<recipe>").
    pub name: Option<String>,
    /// Tokenizer metadata to embed (e.g. `Tokenizer::gguf_vocab_metadata()` of the real
    /// tokenizer); `None` writes a synthetic byte-level vocab of `n_vocab` tokens.
    pub vocab: Option<Vec<(String, MetaValue)>>,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            shape: Shape::flash(),
            recipe: Recipe::Q2,
            seed: 0x5eed_d5ee_d4d4_0001,
            name: None,
            vocab: None,
        }
    }
}

/// What [`synth_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct SynthReport {
    pub output: PathBuf,
    pub n_tensors: usize,
    pub file_bytes: u64,
    /// Bytes of random pools generated.
    pub pool_bytes: usize,
}

/// SplitMix64 (seeding and hashing).
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn hash_str(seed: u64, s: &str) -> u64 {
    let mut h = splitmix(seed ^ 0x6a09_e667_f3bc_c908);
    for b in s.bytes() {
        h = splitmix(h ^ b as u64);
    }
    h
}

/// xoshiro256** — fast, deterministic, good enough for synthetic weights.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded from `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            x = splitmix(x);
            *v = x;
        }
        Rng { s }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n) (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fill with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }
}

/// Standard-deviation gain of a matrix class (times `1/sqrt(fan_in)`, except where the value is
/// absolute: see [`target_std`]).
fn target_std(class: TensorClass, ne0: u64) -> f32 {
    let inv = 1.0 / (ne0 as f32).sqrt();
    match class {
        TensorClass::Embedding => 1.0,
        TensorClass::Output => 2.5 * inv,
        TensorClass::Ape => 0.5,
        _ => inv,
    }
}

/// Byte offsets of the f16 `d` and (K-quants) `dmin` fields in a block, and the mean quant code
/// that `dmin` is set against (so that elements are zero-mean on average).
fn scale_fields(ty: GgmlType) -> Option<(usize, Option<(usize, f32)>)> {
    match ty {
        GgmlType::Q8_0 => Some((0, None)),
        GgmlType::IQ2_XXS => Some((0, None)),
        GgmlType::Q2_K => Some((80, Some((82, 1.5)))),
        GgmlType::Q4_K => Some((0, Some((2, 7.5)))),
        _ => None,
    }
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// A pool of `n_blocks` random blocks of `ty` whose dequantized elements have standard deviation
/// `std`.
fn block_pool(ty: GgmlType, n_blocks: usize, std: f32, rng: &mut Rng) -> Result<Vec<u8>> {
    let bb = ty.block_bytes();
    let mut pool = vec![0u8; n_blocks * bb];
    match ty {
        GgmlType::F16 => {
            for c in pool.chunks_exact_mut(2) {
                let v = (rng.normal() as f32) * std;
                c.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
            }
            return Ok(pool);
        }
        GgmlType::F32 => {
            for c in pool.chunks_exact_mut(4) {
                let v = (rng.normal() as f32) * std;
                c.copy_from_slice(&v.to_le_bytes());
            }
            return Ok(pool);
        }
        _ => {}
    }
    let (d_at, dmin) = scale_fields(ty).ok_or_else(|| ConvertError::Encode {
        tensor: "(synthetic pool)".into(),
        ty,
        reason: "no synthetic generator for this type".into(),
    })?;
    rng.fill(&mut pool);
    // Unit scales first, measure the element RMS on a sample, then rescale: the elements are
    // linear in (d, dmin) at a fixed ratio.
    let set = |pool: &mut [u8], k: f32| {
        for b in pool.chunks_exact_mut(bb) {
            put_f16(b, d_at, k);
            if let Some((at, ratio)) = dmin {
                put_f16(b, at, k * ratio);
            }
        }
    };
    set(&mut pool, 1.0);
    let sample = &pool[..bb * n_blocks.min(4096)];
    let vals = ds4_quant::dequantize_to_vec(ty, sample).map_err(|e| ConvertError::Encode {
        tensor: "(synthetic pool)".into(),
        ty,
        reason: e.to_string(),
    })?;
    let rms = (vals.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
    set(&mut pool, (std as f64 / rms) as f32);
    Ok(pool)
}

/// The byte-level synthetic vocabulary: BOS (0), EOS (1), the 256 byte tokens, filler tokens and
/// ds4's other special tokens at the top ids; no merges.
pub fn synth_vocab_metadata(n_vocab: usize) -> Result<Vec<(String, MetaValue)>> {
    use ds4_tokenizer::{BOS_TEXT, DS4_SPECIAL_TEXTS, EOS_TEXT};
    let others: Vec<&str> = DS4_SPECIAL_TEXTS
        .iter()
        .copied()
        .filter(|s| *s != BOS_TEXT && *s != EOS_TEXT)
        .collect();
    let need = 2 + 256 + others.len();
    if n_vocab < need {
        return Err(ConvertError::Tokenizer {
            path: PathBuf::from("(synthetic)"),
            reason: format!(
                "a synthetic vocab needs at least {need} tokens, the shape has {n_vocab}"
            ),
        });
    }
    let mut tokens: Vec<String> = Vec::with_capacity(n_vocab);
    let mut types: Vec<i32> = Vec::with_capacity(n_vocab);
    tokens.push(BOS_TEXT.into());
    types.push(3);
    tokens.push(EOS_TEXT.into());
    types.push(3);
    for b in 0..=255u8 {
        tokens.push(ds4_tokenizer::bytelevel::byte_to_char(b).to_string());
        types.push(1);
    }
    let filler = n_vocab - need;
    for i in 0..filler {
        tokens.push(format!("<synth_{i}>"));
        types.push(1);
    }
    for s in others {
        tokens.push(s.into());
        types.push(3);
    }
    let tok =
        ds4_tokenizer::Tokenizer::from_vocab(tokens, Vec::new(), Some(types)).map_err(|e| {
            ConvertError::Tokenizer {
                path: PathBuf::from("(synthetic)"),
                reason: e.to_string(),
            }
        })?;
    Ok(tok.gguf_vocab_metadata())
}

/// Write all of `buf` at byte offset `off`.
#[cfg(unix)]
fn write_at(file: &std::fs::File, buf: &[u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, off)
}

/// Write all of `buf` at byte offset `off`.
#[cfg(windows)]
fn write_at(file: &std::fs::File, mut buf: &[u8], mut off: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_write(buf, off)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// Values of a 1-D tensor.
fn vector_values(t: &PlannedTensor) -> Vec<f32> {
    let n = t.n_elements() as usize;
    let one = t.name.ends_with("_norm.weight") || t.name.ends_with("_scale.weight");
    vec![if one { 1.0 } else { 0.0 }; n]
}

fn tid2eid_values(n_used: usize, n_vocab: usize, n_expert: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(n_used * n_vocab * 4);
    let mut row = Vec::with_capacity(n_used);
    for _ in 0..n_vocab {
        row.clear();
        while row.len() < n_used.min(n_expert) {
            let e = rng.below(n_expert as u64) as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        while row.len() < n_used {
            row.push(rng.below(n_expert as u64) as i32);
        }
        for e in &row {
            out.extend_from_slice(&e.to_le_bytes());
        }
    }
    out
}

/// Write a synthetic GGUF for `opts.shape` with the recipe's types.
pub fn synth_gguf(
    output: &Path,
    opts: &SynthOptions,
    progress: &mut dyn FnMut(ConvertProgress),
) -> Result<SynthReport> {
    let shape = &opts.shape;
    shape.validate()?;
    if shape.claims_flash() {
        shape.check_flash()?;
    }
    let plan = plan_tensors(shape, &|_| false);
    let types: Vec<GgmlType> = plan
        .iter()
        .map(|t| opts.recipe.tensor_type(t.class))
        .collect();
    for (t, ty) in plan.iter().zip(&types) {
        if !t.ne0().is_multiple_of(ty.block_size() as u64) {
            return Err(ConvertError::BlockSize {
                recipe: opts.recipe.to_string(),
                tensor: t.name.clone(),
                ty: *ty,
                ne0: t.ne0(),
                block: ty.block_size(),
            });
        }
    }
    let vocab_md = match &opts.vocab {
        Some(v) => {
            let n = v
                .iter()
                .find(|(k, _)| k == "tokenizer.ggml.tokens")
                .and_then(|(_, v)| v.as_array())
                .map_or(0, |(_, items)| items.len());
            if n != shape.n_vocab {
                return Err(ConvertError::VocabMismatch {
                    path: PathBuf::from("(synth vocab)"),
                    tokenizer_vocab: n,
                    model_vocab: shape.n_vocab,
                });
            }
            v.clone()
        }
        None => synth_vocab_metadata(shape.n_vocab)?,
    };

    // Pools: one per (type, fan-in, std bits), sized for the largest tensor that uses it.
    type Key = (GgmlType, u64, u32);
    let key_of = |t: &PlannedTensor, ty: GgmlType| -> Option<Key> {
        match t.class {
            TensorClass::Vector | TensorClass::Tid2Eid => None,
            c => Some((ty, t.ne0(), target_std(c, t.ne0()).to_bits())),
        }
    };
    let mut sizes: Vec<(Key, usize)> = Vec::new();
    for (t, &ty) in plan.iter().zip(&types) {
        if let Some(k) = key_of(t, ty) {
            let blocks =
                (t.n_elements() as usize / ty.block_size()).min(POOL_BYTES / ty.block_bytes());
            match sizes.iter_mut().find(|(k2, _)| *k2 == k) {
                Some((_, n)) => *n = (*n).max(blocks),
                None => sizes.push((k, blocks)),
            }
        }
    }
    let mut pools: HashMap<Key, Vec<u8>> = HashMap::new();
    let mut pool_bytes = 0;
    for (i, (k, n)) in sizes.iter().enumerate() {
        let mut rng = Rng::new(splitmix(opts.seed ^ (i as u64 + 1)));
        let pool = block_pool(k.0, (*n).max(1), f32::from_bits(k.2), &mut rng)?;
        pool_bytes += pool.len();
        pools.insert(*k, pool);
    }

    let mut b = GgufBuilder::new();
    for (k, v) in shape.to_metadata() {
        let is_arch = k == ds4_model::shape::keys::ARCH;
        b.add_metadata(k, v)?;
        if is_arch {
            let name = opts
                .name
                .clone()
                .unwrap_or_else(|| format!("DeepSeek-V4-Flash-synthetic-{}", opts.recipe.name()));
            b.add_metadata(ds4_model::shape::keys::NAME, MetaValue::String(name))?;
            b.add_metadata("general.file_type", MetaValue::U32(opts.recipe.file_type()))?;
            if opts.recipe.is_quantized() {
                b.add_metadata("general.quantization_version", MetaValue::U32(2))?;
            }
        }
    }
    b.add_metadata(
        crate::convert::RECIPE_KEY,
        MetaValue::String(opts.recipe.name().into()),
    )?;
    b.add_metadata("ds4.synth.seed", MetaValue::U64(opts.seed))?;
    b.add_metadata("ds4.synth.version", MetaValue::U32(SYNTH_VERSION))?;
    for (k, v) in vocab_md {
        b.add_metadata(k, v)?;
    }
    for (t, ty) in plan.iter().zip(&types) {
        b.add_tensor(t.name.clone(), &t.ne, *ty)?;
    }
    let bytes_total: u64 = b.tensors().iter().map(|t| t.n_bytes).sum();

    let partial = {
        let mut s = output.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    };
    let file = std::fs::File::create(&partial).map_err(io_err(&partial))?;
    let mut guard = crate::convert::PartialFile {
        path: partial.clone(),
        armed: true,
    };
    // Positional writes: the header, then every tensor's pieces in parallel (padding stays the
    // zeros of `set_len`). Tensors are written in order so progress is reported in order.
    let header = b.header_bytes();
    let data_start = header.len() as u64;
    let infos = b.tensors().to_vec();
    file.set_len(b.file_len()).map_err(io_err(&partial))?;
    write_at(&file, &header, 0).map_err(io_err(&partial))?;
    let mut bytes_done = 0u64;
    let n_tensors = plan.len();
    let mut vec_rng = Rng::new(splitmix(opts.seed ^ 0x7e57));
    for (index, ((t, &ty), info)) in plan.iter().zip(&types).zip(&infos).enumerate() {
        let at = data_start + info.offset;
        match key_of(t, ty) {
            None if t.class == TensorClass::Tid2Eid => {
                let data = tid2eid_values(
                    shape.n_expert_used,
                    shape.n_vocab,
                    shape.n_expert,
                    &mut vec_rng,
                );
                write_at(&file, &data, at).map_err(io_err(&partial))?;
            }
            None => {
                let data: Vec<u8> = vector_values(t)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                write_at(&file, &data, at).map_err(io_err(&partial))?;
            }
            Some(k) => {
                let pool = &pools[&k];
                let bb = ty.block_bytes();
                let n_blocks = pool.len() / bb;
                let start = (hash_str(opts.seed, &t.name) % n_blocks as u64) as usize * bb;
                // Pieces: runs through the pool, wrapping around, each at most one pool long.
                let mut pieces = Vec::new();
                let (mut src, mut dst, mut left) = (start, 0usize, info.n_bytes as usize);
                while left > 0 {
                    let n = left.min(pool.len() - src);
                    pieces.push((src, dst, n));
                    dst += n;
                    left -= n;
                    src = 0;
                }
                use rayon::prelude::*;
                pieces
                    .par_iter()
                    .try_for_each(|&(src, dst, n)| {
                        write_at(&file, &pool[src..src + n], at + dst as u64)
                    })
                    .map_err(io_err(&partial))?;
            }
        }
        bytes_done += info.n_bytes;
        progress(ConvertProgress {
            tensor: t.name.clone(),
            index,
            n_tensors,
            ty,
            tensor_done: true,
            bytes_done,
            bytes_total,
        });
    }
    drop(file);
    std::fs::rename(&partial, output).map_err(io_err(output))?;
    guard.armed = false;
    Ok(SynthReport {
        output: output.to_path_buf(),
        n_tensors,
        file_bytes: std::fs::metadata(output).map_err(io_err(output))?.len(),
        pool_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_uniformish() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut r = Rng::new(1);
        let n = 100_000;
        let (mut s, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let x = r.normal();
            s += x;
            s2 += x * x;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        // Standard error of the mean is 1/sqrt(n) ≈ 0.003.
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 1.0).abs() < 0.03, "{var}");
        let mut counts = [0usize; 8];
        for _ in 0..80_000 {
            counts[r.below(8) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn pools_have_the_requested_scale() {
        for ty in [
            GgmlType::F16,
            GgmlType::Q8_0,
            GgmlType::Q2_K,
            GgmlType::Q4_K,
            GgmlType::IQ2_XXS,
        ] {
            let std = 1.0 / 64.0;
            let pool = block_pool(ty, 2048, std, &mut Rng::new(3)).unwrap();
            let v = ds4_quant::dequantize_to_vec(ty, &pool).unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
            let n = v.len() as f64;
            let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
            let rms = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / n).sqrt();
            // The scale is set from a sample (all 2048 blocks here) and rounded to f16.
            assert!(
                (rms / std as f64 - 1.0).abs() < 0.02,
                "{ty}: rms {rms} vs {std}"
            );
            assert!(mean.abs() < 0.1 * std as f64, "{ty}: mean {mean}");
        }
    }
}
