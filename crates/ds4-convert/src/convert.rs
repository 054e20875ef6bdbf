//! The conversion driver: validate everything, then stream tensor by tensor into the GGUF.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use ds4_gguf::{GgmlType, Gguf, GgufBuilder, MetaValue};
use ds4_model::Shape;
use safetensors::Dtype;

use crate::checkpoint::Checkpoint;
use crate::config::{mtp_layer_count, shape_from_official_config};
use crate::encode;
use crate::error::{ConvertError, Result, io_err};
use crate::formats::{
    FP4_BLOCK, FP8_BLOCK, PlainFloat, decode_plain, dequant_fp4_rows, dequant_fp8_rows,
    e8m0_is_valid, e8m0_to_f32,
};
use crate::imatrix::Imatrix;
use crate::names::{
    GgufTarget, PlannedTensor, Source, TensorClass, expert_official_name, official_to_gguf,
    plan_tensors,
};
use crate::recipe::Recipe;
use crate::tokenizer_meta;

/// Metadata key holding the recipe name.
pub const RECIPE_KEY: &str = "ds4.convert.recipe";

/// Elements decoded per piece of a regular tensor (16 MiB of f32).
const CHUNK_ELEMS: usize = 1 << 22;
/// Values decoded per parallel task.
const PAR_ELEMS: usize = 1 << 16;

/// Options of [`convert_checkpoint`].
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Output types.
    pub recipe: Recipe,
    /// Tokenizer to embed (`tokenizer.ggml.*` keys); none ⇒ no tokenizer keys.
    pub tokenizer_json: Option<PathBuf>,
    /// llama.cpp legacy `.dat` importance matrix for Q2_K / Q4_K / IQ2_XXS.
    pub imatrix: Option<PathBuf>,
    /// `general.name` (default: "DeepSeek-V4-Flash" for the Flash shape, else a name built from
    /// the shape).
    pub name: Option<String>,
    /// Re-open the written file and check its shape and directory (cheap: header only).
    pub verify: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            recipe: Recipe::Q2,
            tokenizer_json: None,
            imatrix: None,
            name: None,
            verify: true,
        }
    }
}

impl ConvertOptions {
    /// Default options with `recipe`.
    pub fn new(recipe: Recipe) -> ConvertOptions {
        ConvertOptions {
            recipe,
            ..Default::default()
        }
    }
}

/// Progress of a conversion, reported after every piece of tensor data written.
#[derive(Clone, Debug)]
pub struct ConvertProgress {
    /// GGUF name of the tensor being written.
    pub tensor: String,
    /// Its index in the file (0-based) and the number of tensors.
    pub index: usize,
    pub n_tensors: usize,
    /// Its GGUF type.
    pub ty: GgmlType,
    /// Whether this tensor is now complete.
    pub tensor_done: bool,
    /// Tensor-data bytes written so far / in total.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What a conversion produced.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub output: PathBuf,
    pub recipe: Recipe,
    pub shape: Shape,
    /// GGUF tensors written.
    pub n_tensors: usize,
    /// Size of the output file.
    pub file_bytes: u64,
    /// Tensor count per GGUF type.
    pub type_counts: BTreeMap<String, usize>,
    /// Checkpoint tensors deliberately not converted (the MTP block, `mtp.*`).
    pub skipped: Vec<String>,
    /// Whether tokenizer metadata was written.
    pub tokenizer: bool,
    /// Tensors (experts counted one by one) quantized with an imatrix entry.
    pub imatrix_hits: usize,
}

/// How a checkpoint tensor is stored.
#[derive(Clone, Debug, PartialEq)]
enum Storage {
    Plain(PlainFloat),
    /// FP8 E4M3 with 128×128 block scales in the named tensor.
    Fp8 {
        scale: String,
        scale_dtype: Dtype,
    },
    /// Packed FP4 E2M1 with 1×32 block scales in the named tensor.
    Fp4 {
        scale: String,
        scale_dtype: Dtype,
    },
    /// I64 or I32 integers.
    Int(Dtype),
}

fn dtype_name(d: Dtype) -> String {
    d.to_string()
}

fn scale_name_of(weight: &str) -> Option<String> {
    weight
        .strip_suffix(".weight")
        .map(|stem| format!("{stem}.scale"))
}

fn check_scale(ckpt: &Checkpoint, scale: &str, gguf: &str, expected: Vec<usize>) -> Result<Dtype> {
    let e = ckpt.get(scale).ok_or_else(|| ConvertError::MissingTensor {
        name: scale.to_string(),
        gguf: gguf.to_string(),
    })?;
    if !matches!(e.dtype, Dtype::F8_E8M0 | Dtype::F32) {
        return Err(ConvertError::WrongDtype {
            name: scale.to_string(),
            expected: "F8_E8M0 (or F32) block scales".into(),
            found: dtype_name(e.dtype),
        });
    }
    if e.shape != expected {
        return Err(ConvertError::ScaleShape {
            name: scale.to_string(),
            expected,
            found: e.shape.clone(),
        });
    }
    Ok(e.dtype)
}

/// Check one source tensor against its expected (unpacked, official-order) shape and return how
/// it is stored.
fn check_source(
    ckpt: &Checkpoint,
    name: &str,
    gguf: &str,
    class: TensorClass,
    expected: &[usize],
) -> Result<Storage> {
    let e = ckpt.get(name).ok_or_else(|| ConvertError::MissingTensor {
        name: name.to_string(),
        gguf: gguf.to_string(),
    })?;
    let wrong_shape = |found: &[usize]| ConvertError::WrongShape {
        name: name.to_string(),
        expected: expected.to_vec(),
        found: found.to_vec(),
    };
    let is_matrix = expected.len() == 2;
    let is_expert = matches!(class, TensorClass::ExpertGateUp | TensorClass::ExpertDown);
    let accepted = if class == TensorClass::Tid2Eid {
        "I64 or I32"
    } else if is_expert {
        "I8 (packed FP4) with .scale, F8_E4M3 with .scale, F32, BF16 or F16"
    } else if is_matrix {
        "F32, BF16, F16, or F8_E4M3 with .scale"
    } else {
        "F32, BF16 or F16"
    };
    let wrong_dtype = || ConvertError::WrongDtype {
        name: name.to_string(),
        expected: accepted.to_string(),
        found: dtype_name(e.dtype),
    };
    let storage = match (class, e.dtype) {
        (TensorClass::Tid2Eid, Dtype::I64 | Dtype::I32) => Storage::Int(e.dtype),
        (TensorClass::Tid2Eid, _) => return Err(wrong_dtype()),
        (_, Dtype::F32) => Storage::Plain(PlainFloat::F32),
        (_, Dtype::F16) => Storage::Plain(PlainFloat::F16),
        (_, Dtype::BF16) => Storage::Plain(PlainFloat::BF16),
        (_, Dtype::F8_E4M3) if is_matrix => {
            let scale = scale_name_of(name).ok_or_else(wrong_dtype)?;
            if e.shape != expected {
                return Err(wrong_shape(&e.shape));
            }
            let want = vec![
                expected[0].div_ceil(FP8_BLOCK),
                expected[1].div_ceil(FP8_BLOCK),
            ];
            let scale_dtype = check_scale(ckpt, &scale, gguf, want)?;
            return Ok(Storage::Fp8 { scale, scale_dtype });
        }
        (_, Dtype::I8) if is_expert && is_matrix => {
            let scale = scale_name_of(name).ok_or_else(wrong_dtype)?;
            let (out, inp) = (expected[0], expected[1]);
            if !inp.is_multiple_of(FP4_BLOCK) {
                return Err(ConvertError::WrongShape {
                    name: name.to_string(),
                    expected: vec![out, inp / 2],
                    found: e.shape.clone(),
                });
            }
            if e.shape != [out, inp / 2] {
                return Err(ConvertError::WrongShape {
                    name: name.to_string(),
                    expected: vec![out, inp / 2],
                    found: e.shape.clone(),
                });
            }
            let scale_dtype = check_scale(ckpt, &scale, gguf, vec![out, inp / FP4_BLOCK])?;
            return Ok(Storage::Fp4 { scale, scale_dtype });
        }
        _ => return Err(wrong_dtype()),
    };
    if e.shape != expected {
        return Err(wrong_shape(&e.shape));
    }
    Ok(storage)
}

fn decode_scales(ckpt: &mut Checkpoint, name: &str, dtype: Dtype) -> Result<Vec<f32>> {
    let bytes = ckpt.bytes(name)?;
    match dtype {
        Dtype::F8_E8M0 => bytes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                if e8m0_is_valid(c) {
                    Ok(e8m0_to_f32(c))
                } else {
                    Err(ConvertError::ValueRange {
                        name: name.to_string(),
                        index: i,
                        value: c as i64,
                        reason: "E8M0 code 255 is NaN".into(),
                    })
                }
            })
            .collect(),
        _ => {
            let mut out = vec![0.0f32; bytes.len() / 4];
            decode_plain(PlainFloat::F32, bytes, &mut out);
            if let Some(i) = out.iter().position(|v| !v.is_finite()) {
                return Err(ConvertError::ValueRange {
                    name: name.to_string(),
                    index: i,
                    value: 0,
                    reason: format!("scale {} is not finite", out[i]),
                });
            }
            Ok(out)
        }
    }
}

/// A float source tensor ready to be read: its storage and decoded block scales.
struct FloatSource<'a> {
    name: &'a str,
    storage: &'a Storage,
    scales: Vec<f32>,
    cols: usize,
}

impl<'a> FloatSource<'a> {
    fn new(
        ckpt: &mut Checkpoint,
        name: &'a str,
        storage: &'a Storage,
        cols: usize,
    ) -> Result<FloatSource<'a>> {
        let scales = match storage {
            Storage::Fp8 { scale, scale_dtype } | Storage::Fp4 { scale, scale_dtype } => {
                decode_scales(ckpt, scale, *scale_dtype)?
            }
            _ => Vec::new(),
        };
        Ok(FloatSource {
            name,
            storage,
            scales,
            cols,
        })
    }

    /// Decode rows `r0..r0+n` (a 1-D tensor is one row) into `out`.
    fn read_rows(&self, ckpt: &mut Checkpoint, r0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        read_rows(
            ckpt,
            self.name,
            self.storage,
            &self.scales,
            self.cols,
            (r0, n),
            out,
        )
    }
}

fn read_rows(
    ckpt: &mut Checkpoint,
    name: &str,
    storage: &Storage,
    scales: &[f32],
    cols: usize,
    (r0, n): (usize, usize),
    out: &mut [f32],
) -> Result<()> {
    let bytes = ckpt.bytes(name)?;
    let decode = |row: usize, o: &mut [f32]| {
        let rows = o.len() / cols;
        match storage {
            Storage::Plain(k) => {
                let sz = k.size();
                decode_plain(*k, &bytes[row * cols * sz..(row + rows) * cols * sz], o);
            }
            Storage::Fp8 { .. } => dequant_fp8_rows(bytes, cols, scales, row, rows, o),
            Storage::Fp4 { .. } => dequant_fp4_rows(bytes, cols, scales, row, rows, o),
            Storage::Int(_) => {}
        }
    };
    if let Storage::Int(_) = storage {
        return Err(ConvertError::Verify(format!(
            "internal: integer tensor {name:?} read as float"
        )));
    }
    let out = &mut out[..n * cols];
    // Decode in parallel pieces of about 64 Ki values (the result does not depend on the split).
    let rows_per_task = (PAR_ELEMS / cols).max(1);
    if n > rows_per_task {
        use rayon::prelude::*;
        out.par_chunks_mut(rows_per_task * cols)
            .enumerate()
            .for_each(|(i, o)| decode(r0 + i * rows_per_task, o));
    } else {
        decode(r0, out);
    }
    Ok(())
}

fn tid2eid_bytes(
    ckpt: &mut Checkpoint,
    name: &str,
    dtype: Dtype,
    n_expert: usize,
) -> Result<Vec<u8>> {
    let bytes = ckpt.bytes(name)?;
    let width = if dtype == Dtype::I64 { 8 } else { 4 };
    let mut out = Vec::with_capacity(bytes.len() / width * 4);
    for (i, b) in bytes.chunks_exact(width).enumerate() {
        let v = if width == 8 {
            i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        } else {
            i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64
        };
        if v < 0 || v >= n_expert as i64 {
            return Err(ConvertError::ValueRange {
                name: name.to_string(),
                index: i,
                value: v,
                reason: format!("expert ids must lie in [0, {n_expert})"),
            });
        }
        out.extend_from_slice(&(v as i32).to_le_bytes());
    }
    Ok(out)
}

fn uses_importance(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS)
}

/// Everything checked and decided before the first byte is written.
struct Prepared {
    shape: Shape,
    plan: Vec<PlannedTensor>,
    types: Vec<GgmlType>,
    storages: HashMap<String, Storage>,
    skipped: Vec<String>,
    ckpt: Checkpoint,
}

fn read_config(input_dir: &Path) -> Result<serde_json::Value> {
    let cfg_path = input_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    serde_json::from_str(&text).map_err(|source| ConvertError::Json {
        path: cfg_path,
        source,
    })
}

fn prepare(input_dir: &Path, recipe: Recipe) -> Result<Prepared> {
    let config = read_config(input_dir)?;
    let shape = shape_from_official_config(&config)?;
    let n_mtp = mtp_layer_count(&config)?;
    let mut ckpt = Checkpoint::open(input_dir)?;

    let plan = plan_tensors(&shape, &|il| {
        ckpt.contains(&format!("layers.{il}.ffn.gate.bias"))
    });
    let planned: HashMap<&str, &PlannedTensor> =
        plan.iter().map(|t| (t.name.as_str(), t)).collect();

    // Every checkpoint tensor must be understood.
    let mut skipped = Vec::new();
    for name in ckpt.names() {
        if name.starts_with("mtp.") && n_mtp > 0 {
            skipped.push(name.to_string());
            continue;
        }
        if let Some(stem) = name.strip_suffix(".scale") {
            let weight = format!("{stem}.weight");
            match ckpt.get(&weight) {
                Some(w) if matches!(w.dtype, Dtype::F8_E4M3 | Dtype::I8) => continue,
                Some(w) => {
                    return Err(ConvertError::UnexpectedScale {
                        name: name.to_string(),
                        weight_dtype: dtype_name(w.dtype),
                    });
                }
                None => {
                    return Err(ConvertError::UnknownTensor {
                        name: name.to_string(),
                    });
                }
            }
        }
        let known = match official_to_gguf(name) {
            Some(GgufTarget::Tensor(g)) => planned
                .get(g.as_str())
                .is_some_and(|t| matches!(t.source, Source::Single(_))),
            Some(GgufTarget::Expert { name: g, expert }) => {
                planned.contains_key(g.as_str()) && expert < shape.n_expert
            }
            None => false,
        };
        if !known {
            return Err(ConvertError::UnknownTensor {
                name: name.to_string(),
            });
        }
    }

    // Every planned source must be present with an accepted dtype and shape.
    let mut storages = HashMap::new();
    for t in &plan {
        let rev: Vec<usize> = t.ne.iter().rev().map(|&d| d as usize).collect();
        match &t.source {
            Source::Single(o) => {
                let s = check_source(&ckpt, o, &t.name, t.class, &rev)?;
                storages.insert(o.clone(), s);
            }
            Source::Experts { layer, w, n_expert } => {
                let expected = [t.ne[1] as usize, t.ne[0] as usize];
                for e in 0..*n_expert {
                    let o = expert_official_name(*layer, e, *w);
                    let s = check_source(&ckpt, &o, &t.name, t.class, &expected)?;
                    storages.insert(o, s);
                }
            }
        }
    }

    // Hash-routing tables are small: check their expert ids now.
    for (name, s) in &storages {
        if let Storage::Int(dtype) = s {
            tid2eid_bytes(&mut ckpt, name, *dtype, shape.n_expert)?;
        }
    }

    // Every tensor must be storable with the recipe's type.
    let mut types = Vec::with_capacity(plan.len());
    for t in &plan {
        let ty = recipe.tensor_type(t.class);
        let block = ty.block_size();
        if !t.ne0().is_multiple_of(block as u64) {
            return Err(ConvertError::BlockSize {
                recipe: recipe.to_string(),
                tensor: t.name.clone(),
                ty,
                ne0: t.ne0(),
                block,
            });
        }
        if !encode::supported(ty) {
            return Err(ConvertError::Encode {
                tensor: t.name.clone(),
                ty,
                reason: "this build cannot quantize to that type".into(),
            });
        }
        types.push(ty);
    }
    Ok(Prepared {
        shape,
        plan,
        types,
        storages,
        skipped,
        ckpt,
    })
}

fn default_name(shape: &Shape) -> String {
    if shape == &Shape::flash() {
        "DeepSeek-V4-Flash".to_string()
    } else {
        format!(
            "DeepSeek-V4-custom-{}L-{}H-{}E",
            shape.n_layer, shape.n_embd, shape.n_expert
        )
    }
}

/// Deletes the partial output unless disarmed.
pub(crate) struct PartialFile {
    pub(crate) path: PathBuf,
    pub(crate) armed: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Convert an official DeepSeek V4 checkpoint folder (`config.json` +
/// `model.safetensors.index.json` and shards, or a single `model.safetensors`) into a GGUF in
/// ds4's layout.
///
/// Everything is validated before the output is created: the config, every checkpoint tensor's
/// name, dtype, shape and block-scale shape, the recipe's block sizes against every tensor, the
/// tokenizer's vocab size and the imatrix. Then tensors are streamed one by one (routed experts
/// one expert at a time, other tensors in pieces of at most 4 Mi values), so memory stays
/// bounded by one expert matrix / one piece. The file is written next to `output` with a
/// `.partial` suffix and renamed at the end; on error the partial file is removed.
pub fn convert_checkpoint(
    input_dir: &Path,
    output: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(ConvertProgress),
) -> Result<ConvertReport> {
    let Prepared {
        shape,
        plan,
        types,
        storages,
        skipped,
        mut ckpt,
    } = prepare(input_dir, opts.recipe)?;

    let tokenizer_md = match &opts.tokenizer_json {
        Some(p) => {
            let md = tokenizer_meta::vocab_metadata(p)?;
            let n = tokenizer_meta::vocab_size(&md);
            if n != shape.n_vocab {
                return Err(ConvertError::VocabMismatch {
                    path: p.clone(),
                    tokenizer_vocab: n,
                    model_vocab: shape.n_vocab,
                });
            }
            Some(md)
        }
        None => None,
    };
    let imatrix = match &opts.imatrix {
        Some(p) => Some(Imatrix::load(p)?),
        None => None,
    };

    // Header.
    let mut b = GgufBuilder::new();
    for (k, v) in shape.to_metadata() {
        let is_arch = k == ds4_model::shape::keys::ARCH;
        b.add_metadata(k, v)?;
        if is_arch {
            let name = opts.name.clone().unwrap_or_else(|| default_name(&shape));
            b.add_metadata(ds4_model::shape::keys::NAME, MetaValue::String(name))?;
            b.add_metadata("general.file_type", MetaValue::U32(opts.recipe.file_type()))?;
            if opts.recipe.is_quantized() {
                b.add_metadata("general.quantization_version", MetaValue::U32(2))?;
            }
        }
    }
    b.add_metadata(RECIPE_KEY, MetaValue::String(opts.recipe.name().into()))?;
    if let Some(im) = &imatrix {
        b.add_metadata(
            "quantize.imatrix.file",
            MetaValue::String(im.path.display().to_string()),
        )?;
        b.add_metadata(
            "quantize.imatrix.entries_count",
            MetaValue::U64(im.len() as u64),
        )?;
        if let Some(d) = &im.dataset {
            b.add_metadata("quantize.imatrix.dataset", MetaValue::String(d.clone()))?;
        }
        if let Some(c) = im.chunks {
            b.add_metadata("quantize.imatrix.chunks_count", MetaValue::U64(c as u64))?;
        }
    }
    if let Some(md) = &tokenizer_md {
        for (k, v) in md {
            b.add_metadata(k.clone(), v.clone())?;
        }
    }
    for (t, ty) in plan.iter().zip(&types) {
        b.add_tensor(t.name.clone(), &t.ne, *ty)?;
    }
    let sizes: Vec<u64> = b.tensors().iter().map(|t| t.n_bytes).collect();
    let bytes_total: u64 = sizes.iter().sum();

    // Data.
    let partial_path = {
        let mut s = output.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    };
    let file = std::fs::File::create(&partial_path).map_err(io_err(&partial_path))?;
    let mut guard = PartialFile {
        path: partial_path.clone(),
        armed: true,
    };
    let mut dw = b.start(std::io::BufWriter::with_capacity(8 << 20, file))?;
    let n_tensors = plan.len();
    let mut bytes_done = 0u64;
    let mut imatrix_hits = 0usize;
    let mut buf: Vec<f32> = Vec::new();
    for (index, (t, &ty)) in plan.iter().zip(&types).enumerate() {
        let mut emit = |bytes_done: u64, tensor_done: bool| {
            progress(ConvertProgress {
                tensor: t.name.clone(),
                index,
                n_tensors,
                ty,
                tensor_done,
                bytes_done,
                bytes_total,
            })
        };
        let cols = t.ne0() as usize;
        let enc_err = |e: String| ConvertError::Encode {
            tensor: t.name.clone(),
            ty,
            reason: e,
        };
        match &t.source {
            Source::Single(o) => {
                let storage = storages
                    .get(o)
                    .ok_or_else(|| ConvertError::Verify(format!("internal: no storage for {o}")))?;
                if let Storage::Int(dtype) = storage {
                    let bytes = tid2eid_bytes(&mut ckpt, o, *dtype, shape.n_expert)?;
                    dw.write_tensor_data(&bytes)?;
                    bytes_done += bytes.len() as u64;
                    emit(bytes_done, true);
                    continue;
                }
                let src = FloatSource::new(&mut ckpt, o, storage, cols)?;
                let rows = (t.n_elements() as usize) / cols;
                let imp = match (&imatrix, uses_importance(ty)) {
                    (Some(im), true) => im.find(&[t.name.as_str(), o.as_str()], cols, None)?,
                    _ => None,
                };
                if imp.is_some() {
                    imatrix_hits += 1;
                }
                // IQ2_XXS without an imatrix takes its importance from all rows at once.
                let chunk_rows = if ty == GgmlType::IQ2_XXS && imp.is_none() {
                    rows
                } else {
                    (CHUNK_ELEMS / cols).clamp(1, rows)
                };
                let mut r0 = 0;
                while r0 < rows {
                    let n = chunk_rows.min(rows - r0);
                    buf.resize(n * cols, 0.0);
                    src.read_rows(&mut ckpt, r0, n, &mut buf)?;
                    let bytes = encode::encode(ty, &buf, cols, imp).map_err(enc_err)?;
                    dw.write_tensor_data(&bytes)?;
                    bytes_done += bytes.len() as u64;
                    r0 += n;
                    emit(bytes_done, r0 == rows);
                }
            }
            Source::Experts { layer, w, n_expert } => {
                let rows = t.ne[1] as usize;
                for e in 0..*n_expert {
                    let o = expert_official_name(*layer, e, *w);
                    let storage = storages.get(&o).ok_or_else(|| {
                        ConvertError::Verify(format!("internal: no storage for {o}"))
                    })?;
                    let src = FloatSource::new(&mut ckpt, &o, storage, cols)?;
                    buf.resize(rows * cols, 0.0);
                    src.read_rows(&mut ckpt, 0, rows, &mut buf)?;
                    let imp = match (&imatrix, uses_importance(ty)) {
                        (Some(im), true) => {
                            im.find(&[t.name.as_str(), o.as_str()], cols, Some((e, *n_expert)))?
                        }
                        _ => None,
                    };
                    if imp.is_some() {
                        imatrix_hits += 1;
                    }
                    let bytes = encode::encode(ty, &buf, cols, imp).map_err(enc_err)?;
                    dw.write_tensor_data(&bytes)?;
                    bytes_done += bytes.len() as u64;
                    emit(bytes_done, e + 1 == *n_expert);
                }
            }
        }
        // Release the big scratch buffer between tensors of very different sizes.
        if buf.capacity() > CHUNK_ELEMS * 4 {
            buf = Vec::new();
        }
    }
    let mut w = dw.finish()?;
    w.flush().map_err(io_err(&partial_path))?;
    drop(w);
    std::fs::rename(&partial_path, output).map_err(io_err(output))?;
    guard.armed = false;

    let file_bytes = std::fs::metadata(output).map_err(io_err(output))?.len();
    let mut type_counts = BTreeMap::new();
    for ty in &types {
        *type_counts.entry(ty.name().to_string()).or_insert(0) += 1;
    }
    if opts.verify {
        verify_output(output, &shape, &plan, &types)?;
    }
    Ok(ConvertReport {
        output: output.to_path_buf(),
        recipe: opts.recipe,
        shape,
        n_tensors,
        file_bytes,
        type_counts,
        skipped,
        tokenizer: tokenizer_md.is_some(),
        imatrix_hits,
    })
}

fn verify_output(
    output: &Path,
    shape: &Shape,
    plan: &[PlannedTensor],
    types: &[GgmlType],
) -> Result<()> {
    let g = Gguf::open(output)?;
    let back = Shape::from_gguf(&g).map_err(|e| ConvertError::Verify(e.to_string()))?;
    if &back != shape {
        return Err(ConvertError::Verify(format!(
            "shape read back differs: {back:?}"
        )));
    }
    if g.tensors().len() != plan.len() {
        return Err(ConvertError::Verify(format!(
            "{} tensors read back, {} written",
            g.tensors().len(),
            plan.len()
        )));
    }
    let mut seen = HashSet::new();
    for ((info, t), ty) in g.tensors().iter().zip(plan).zip(types) {
        if info.name != t.name || info.dims != t.ne || info.ty != *ty || !seen.insert(&info.name) {
            return Err(ConvertError::Verify(format!(
                "tensor {:?} reads back as {:?} {:?} {}",
                t.name, info.name, info.dims, info.ty
            )));
        }
    }
    Ok(())
}

/// One tensor of the file a conversion would write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputTensor {
    pub name: String,
    /// GGUF dims, `ne0` first.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
}

/// What [`inspect_checkpoint`] found.
#[derive(Clone, Debug)]
pub struct CheckpointSummary {
    pub shape: Shape,
    /// The GGUF tensors, in file order.
    pub tensors: Vec<OutputTensor>,
    /// Checkpoint tensors that would not be converted (`mtp.*`).
    pub skipped: Vec<String>,
}

/// Check an official checkpoint folder as [`convert_checkpoint`] would (config, every tensor's
/// name / dtype / shape / scales, the recipe's block sizes), without writing anything.
pub fn inspect_checkpoint(input_dir: &Path, recipe: Recipe) -> Result<CheckpointSummary> {
    let p = prepare(input_dir, recipe)?;
    let tensors = p
        .plan
        .iter()
        .zip(&p.types)
        .map(|(t, ty)| OutputTensor {
            name: t.name.clone(),
            ne: t.ne.clone(),
            ty: *ty,
        })
        .collect();
    Ok(CheckpointSummary {
        shape: p.shape,
        tensors,
        skipped: p.skipped,
    })
}

/// Write a GGUF holding only tokenizer metadata (`ds4 convert --vocab-only`).
pub fn convert_vocab_only(tokenizer_json: &Path, output: &Path) -> Result<u64> {
    let md = tokenizer_meta::vocab_metadata(tokenizer_json)?;
    let mut b = GgufBuilder::new();
    b.add_metadata(
        ds4_model::shape::keys::ARCH,
        MetaValue::String("deepseek4".into()),
    )?;
    b.add_metadata(
        ds4_model::shape::keys::NAME,
        MetaValue::String("DeepSeek-V4 vocab".into()),
    )?;
    for (k, v) in md {
        b.add_metadata(k, v)?;
    }
    let partial_path = {
        let mut s = output.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    };
    let mut guard = PartialFile {
        path: partial_path.clone(),
        armed: true,
    };
    b.write_file(&partial_path, &[])?;
    std::fs::rename(&partial_path, output).map_err(io_err(output))?;
    guard.armed = false;
    Ok(std::fs::metadata(output).map_err(io_err(output))?.len())
}
