//! Weights bound to the GGUF tensor directory and validated against the [`Shape`]
//! (model-spec §2.3, generalised to any shape).
//!
//! Matrices are never copied: a [`MatRef`] names a byte range of the (memory-mapped) file;
//! backends build their views on demand. Small F32 vectors (norms, sinks, HC scale/base, router
//! bias), the compressor `ape` tables and the `tid2eid` hash tables are copied at load.
//!
//! Accepted types per tensor class:
//! * matrices: F32, F16, BF16, Q8_0;
//! * routed experts: the matrix types plus Q2_K, Q4_K, IQ2_XXS (gate and up must share a type);
//! * vectors: F32; `ape` tables: F32, F16, BF16;
//! * `tid2eid`: I32 with every entry `< expert_count` (checked here);
//! * `exp_probs_b.bias` is optional.

use ds4_gguf::{GgmlType, Gguf};

use crate::error::{ModelError, Result};
use crate::plan::{MoeKind, Plan};
use crate::shape::Shape;

/// Types accepted for dense matrices.
pub const MATRIX_TYPES: &[GgmlType] =
    &[GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0];
/// Types accepted for routed-expert tensors.
pub const EXPERT_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];
/// Types accepted for small tables that are dequantized at load (`ape`).
pub const TABLE_TYPES: &[GgmlType] = &[GgmlType::F32, GgmlType::F16, GgmlType::BF16];

/// A tensor of the file: name, type, dims and absolute byte range.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub name: String,
    pub ty: GgmlType,
    /// GGUF `ne` order (fastest first).
    pub dims: Vec<u64>,
    /// Absolute offset of the data in the file.
    pub start: usize,
    pub n_bytes: usize,
}

impl TensorRef {
    /// The tensor's bytes in `gguf` (the file it was bound from).
    pub fn bytes<'a>(&self, gguf: &'a Gguf) -> &'a [u8] {
        gguf.bytes()
            .get(self.start..self.start + self.n_bytes)
            .unwrap_or(&[])
    }
}

/// A 2-D weight `[ne0 = cols (input), ne1 = rows (output)]`: `y = W·x`.
#[derive(Clone, Debug, PartialEq)]
pub struct MatRef {
    pub t: TensorRef,
    pub rows: usize,
    pub cols: usize,
}

impl MatRef {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.t.n_bytes / self.rows.max(1)
    }
    /// The matrix's bytes.
    pub fn bytes<'a>(&self, gguf: &'a Gguf) -> &'a [u8] {
        self.t.bytes(gguf)
    }
}

/// A stack of expert matrices `[ne0 = cols, ne1 = rows, ne2 = n_expert]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertsRef {
    pub t: TensorRef,
    pub rows: usize,
    pub cols: usize,
    pub n_expert: usize,
}

impl ExpertsRef {
    /// Bytes of one expert's matrix.
    pub fn expert_bytes(&self) -> usize {
        self.t.n_bytes / self.n_expert.max(1)
    }
    /// The bytes of expert `e`.
    pub fn expert<'a>(&self, gguf: &'a Gguf, e: usize) -> &'a [u8] {
        let b = self.expert_bytes();
        self.t.bytes(gguf).get(e * b..(e + 1) * b).unwrap_or(&[])
    }
}

/// Weights of one mHC site.
#[derive(Clone, Debug, PartialEq)]
pub struct HcWeights {
    /// `[hc_mult·n_embd, (2+hc)·hc]`.
    pub fn_: MatRef,
    /// `[3]`: pre, post, comb scales.
    pub scale: Vec<f32>,
    /// `[(2+hc)·hc]`.
    pub base: Vec<f32>,
}

/// Weights of a KV compressor.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressorWeights {
    /// `ape[m*width + j]`: position bias of window slot `m`, column `j` (f32, `ratio × width`).
    pub ape: Vec<f32>,
    /// `[n_embd, width]`.
    pub kv: MatRef,
    /// `[n_embd, width]`.
    pub gate: MatRef,
    /// `[head_dim]` of the compressed rows.
    pub norm: Vec<f32>,
    /// Output row width (`head_dim` of the rows: 512 attention, 128 indexer in Flash).
    pub d_c: usize,
    /// `coff · d_c`.
    pub width: usize,
}

/// Weights of a lightning indexer.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexerWeights {
    /// `[q_lora_rank, index_heads·index_head_dim]`.
    pub q_b: MatRef,
    /// `[n_embd, index_heads]`.
    pub proj: MatRef,
    pub comp: CompressorWeights,
}

/// Weights of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub hc_attn: HcWeights,
    pub attn_norm: Vec<f32>,
    pub q_a: MatRef,
    pub q_a_norm: Vec<f32>,
    pub q_b: MatRef,
    pub kv: MatRef,
    pub kv_norm: Vec<f32>,
    pub sinks: Vec<f32>,
    pub out_a: MatRef,
    pub out_b: MatRef,
    pub compressor: Option<CompressorWeights>,
    pub indexer: Option<IndexerWeights>,
    pub hc_ffn: HcWeights,
    pub ffn_norm: Vec<f32>,
    pub router: MatRef,
    pub router_bias: Option<Vec<f32>>,
    /// Hash layers: `tid2eid[t*k + j]`, `n_vocab × n_expert_used`.
    pub tid2eid: Option<Vec<u32>>,
    pub gate_exps: ExpertsRef,
    pub up_exps: ExpertsRef,
    pub down_exps: ExpertsRef,
    pub gate_shexp: MatRef,
    pub up_shexp: MatRef,
    pub down_shexp: MatRef,
}

/// All weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// `[n_embd, n_vocab]`: row `t` is the embedding of token `t`.
    pub token_embd: MatRef,
    /// `[hc_mult·n_embd, hc_mult]`.
    pub out_hc_fn: MatRef,
    pub out_hc_scale: f32,
    pub out_hc_base: Vec<f32>,
    pub out_norm: Vec<f32>,
    /// `[n_embd, n_vocab]`.
    pub output: MatRef,
    pub layers: Vec<LayerWeights>,
}

fn type_list(types: &[GgmlType]) -> String {
    let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
    if names.len() == 1 {
        names[0].to_string()
    } else {
        format!("one of {}", names.join(", "))
    }
}

struct Binder<'a> {
    g: &'a Gguf,
}

impl<'a> Binder<'a> {
    fn tensor(&self, name: &str, types: &[GgmlType], dims: &[usize]) -> Result<TensorRef> {
        let info = self
            .g
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        if !types.contains(&info.ty) {
            return Err(ModelError::WrongType {
                name: name.into(),
                expected: type_list(types),
                found: info.ty,
            });
        }
        let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        if info.dims != want {
            return Err(ModelError::WrongShape {
                name: name.into(),
                expected: want,
                found: info.dims.clone(),
            });
        }
        let expect_bytes = info.ty.tensor_bytes(&info.dims);
        let start = self.g.data_offset().checked_add(info.offset);
        let (Some(expect_bytes), Some(start)) = (expect_bytes, start) else {
            return Err(ModelError::BadTensor {
                name: name.into(),
                reason: "size overflows".into(),
            });
        };
        let end = start.checked_add(info.n_bytes);
        if expect_bytes != info.n_bytes || end.is_none_or(|e| e > self.g.file_len()) {
            return Err(ModelError::BadTensor {
                name: name.into(),
                reason: format!(
                    "data of {} bytes at offset {start} does not match its type and shape ({expect_bytes} bytes) or the file",
                    info.n_bytes
                ),
            });
        }
        Ok(TensorRef {
            name: name.into(),
            ty: info.ty,
            dims: info.dims.clone(),
            start: start as usize,
            n_bytes: info.n_bytes as usize,
        })
    }

    fn mat(&self, name: &str, cols: usize, rows: usize) -> Result<MatRef> {
        let t = self.tensor(name, MATRIX_TYPES, &[cols, rows])?;
        Ok(MatRef { t, rows, cols })
    }

    fn experts(&self, name: &str, cols: usize, rows: usize, n: usize) -> Result<ExpertsRef> {
        let t = self.tensor(name, EXPERT_TYPES, &[cols, rows, n])?;
        Ok(ExpertsRef {
            t,
            rows,
            cols,
            n_expert: n,
        })
    }

    fn vec(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.tensor(name, &[GgmlType::F32], &[n])?;
        let v = f32_vec(t.bytes(self.g));
        check_finite(name, &v)?;
        Ok(v)
    }

    fn table(&self, name: &str, cols: usize, rows: usize) -> Result<Vec<f32>> {
        let t = self.tensor(name, TABLE_TYPES, &[cols, rows])?;
        let v = crate::linear::dequantize_all(t.ty, t.bytes(self.g), cols * rows).map_err(|e| {
            ModelError::BadTensor {
                name: name.into(),
                reason: e,
            }
        })?;
        check_finite(name, &v)?;
        Ok(v)
    }

    fn hc(&self, prefix: &str, shape: &Shape) -> Result<HcWeights> {
        Ok(HcWeights {
            fn_: self.mat(
                &format!("{prefix}_fn.weight"),
                shape.hc_dim(),
                shape.hc_mix(),
            )?,
            scale: self.vec(&format!("{prefix}_scale.weight"), 3)?,
            base: self.vec(&format!("{prefix}_base.weight"), shape.hc_mix())?,
        })
    }

    fn compressor(
        &self,
        prefix: &str,
        shape: &Shape,
        d_c: usize,
        coff: usize,
        ratio: usize,
    ) -> Result<CompressorWeights> {
        let width = coff * d_c;
        Ok(CompressorWeights {
            ape: self.table(&format!("{prefix}_ape.weight"), width, ratio)?,
            kv: self.mat(&format!("{prefix}_kv.weight"), shape.n_embd, width)?,
            gate: self.mat(&format!("{prefix}_gate.weight"), shape.n_embd, width)?,
            norm: self.vec(&format!("{prefix}_norm.weight"), d_c)?,
            d_c,
            width,
        })
    }
}

fn f32_vec(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn check_finite(name: &str, v: &[f32]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(ModelError::BadTensor {
            name: name.into(),
            reason: format!("non-finite value {} at index {i}", v[i]),
        });
    }
    Ok(())
}

impl Weights {
    /// Bind and validate every tensor the plan needs.
    pub fn bind(g: &Gguf, shape: &Shape, plan: &Plan) -> Result<Weights> {
        let b = Binder { g };
        let s = shape;
        let hd = s.head_dim;
        let mut layers = Vec::with_capacity(s.n_layer);
        for (il, lp) in plan.layers.iter().enumerate() {
            let p = format!("blk.{il}.");
            let n = |suffix: &str| format!("{p}{suffix}");
            let ratio = lp.attn.ratio();
            let compressor = if lp.attn.is_compressed() {
                Some(b.compressor(&n("attn_compressor"), s, hd, lp.attn.coff(), ratio)?)
            } else {
                None
            };
            let indexer = if lp.attn.has_indexer() {
                Some(IndexerWeights {
                    q_b: b.mat(
                        &n("indexer.attn_q_b.weight"),
                        s.q_lora_rank,
                        s.index_heads * s.index_head_dim,
                    )?,
                    proj: b.mat(&n("indexer.proj.weight"), s.n_embd, s.index_heads)?,
                    comp: b.compressor(&n("indexer_compressor"), s, s.index_head_dim, 2, ratio)?,
                })
            } else {
                None
            };
            let router_bias = if g.tensor_info(&n("exp_probs_b.bias")).is_some() {
                Some(b.vec(&n("exp_probs_b.bias"), s.n_expert)?)
            } else {
                None
            };
            let tid2eid = if lp.moe == MoeKind::Hash {
                let name = n("ffn_gate_tid2eid.weight");
                let t = b.tensor(&name, &[GgmlType::I32], &[s.n_expert_used, s.n_vocab])?;
                let mut table = Vec::with_capacity(s.n_expert_used * s.n_vocab);
                for (i, c) in t.bytes(g).chunks_exact(4).enumerate() {
                    let e = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if e < 0 || e as usize >= s.n_expert {
                        return Err(ModelError::BadTensor {
                            name,
                            reason: format!(
                                "token {} slot {}: expert id {e} is outside [0, {})",
                                i / s.n_expert_used,
                                i % s.n_expert_used,
                                s.n_expert
                            ),
                        });
                    }
                    table.push(e as u32);
                }
                Some(table)
            } else {
                None
            };
            let gate_exps =
                b.experts(&n("ffn_gate_exps.weight"), s.n_embd, s.n_ff_exp, s.n_expert)?;
            let up_exps = b.experts(&n("ffn_up_exps.weight"), s.n_embd, s.n_ff_exp, s.n_expert)?;
            if gate_exps.t.ty != up_exps.t.ty {
                return Err(ModelError::WrongType {
                    name: up_exps.t.name.clone(),
                    expected: format!("{} (the type of {})", gate_exps.t.ty, gate_exps.t.name),
                    found: up_exps.t.ty,
                });
            }
            let down_exps =
                b.experts(&n("ffn_down_exps.weight"), s.n_ff_exp, s.n_embd, s.n_expert)?;
            layers.push(LayerWeights {
                hc_attn: b.hc(&n("hc_attn"), s)?,
                attn_norm: b.vec(&n("attn_norm.weight"), s.n_embd)?,
                q_a: b.mat(&n("attn_q_a.weight"), s.n_embd, s.q_lora_rank)?,
                q_a_norm: b.vec(&n("attn_q_a_norm.weight"), s.q_lora_rank)?,
                q_b: b.mat(&n("attn_q_b.weight"), s.q_lora_rank, s.n_head * hd)?,
                kv: b.mat(&n("attn_kv.weight"), s.n_embd, hd)?,
                kv_norm: b.vec(&n("attn_kv_a_norm.weight"), hd)?,
                sinks: b.vec(&n("attn_sinks.weight"), s.n_head)?,
                out_a: b.mat(
                    &n("attn_output_a.weight"),
                    s.group_in(),
                    s.o_groups * s.o_lora_rank,
                )?,
                out_b: b.mat(
                    &n("attn_output_b.weight"),
                    s.o_groups * s.o_lora_rank,
                    s.n_embd,
                )?,
                compressor,
                indexer,
                hc_ffn: b.hc(&n("hc_ffn"), s)?,
                ffn_norm: b.vec(&n("ffn_norm.weight"), s.n_embd)?,
                router: b.mat(&n("ffn_gate_inp.weight"), s.n_embd, s.n_expert)?,
                router_bias,
                tid2eid,
                gate_exps,
                up_exps,
                down_exps,
                gate_shexp: b.mat(&n("ffn_gate_shexp.weight"), s.n_embd, s.n_ff_exp)?,
                up_shexp: b.mat(&n("ffn_up_shexp.weight"), s.n_embd, s.n_ff_exp)?,
                down_shexp: b.mat(&n("ffn_down_shexp.weight"), s.n_ff_exp, s.n_embd)?,
            });
        }
        let out_hc_scale = b.vec("output_hc_scale.weight", 1)?;
        Ok(Weights {
            token_embd: b.mat("token_embd.weight", s.n_embd, s.n_vocab)?,
            out_hc_fn: b.mat("output_hc_fn.weight", s.hc_dim(), s.hc_mult)?,
            out_hc_scale: out_hc_scale[0],
            out_hc_base: b.vec("output_hc_base.weight", s.hc_mult)?,
            out_norm: b.vec("output_norm.weight", s.n_embd)?,
            output: b.mat("output.weight", s.n_embd, s.n_vocab)?,
            layers,
        })
    }
}
