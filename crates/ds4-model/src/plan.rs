//! The per-layer plan: attention kind, MoE kind and RoPE parameters of every layer, derived
//! from the [`Shape`] once at load time. Backends walk the plan; they never re-derive it.

use crate::shape::{AttnKind, Shape};

/// How a layer's MoE picks its experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeKind {
    /// `tid2eid[token]` (first `hash_layer_count` layers).
    Hash,
    /// Top-k of `sqrt(softplus(router)) + bias`.
    Routed,
}

/// RoPE parameters of one rotary family (the same for the layer's queries/keys, its
/// compressor rows and its indexer queries/keys).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    /// Number of rotated dims (the tail of every head), even.
    pub n_rot: usize,
    /// Frequency base.
    pub base: f64,
    /// YaRN parameters (compressed layers) or `None` (plain RoPE).
    pub yarn: Option<Yarn>,
    /// Inverse frequency per pair `k in 0..n_rot/2` (YaRN blend folded in), computed in f64.
    pub inv_freq: Vec<f64>,
}

/// YaRN frequency interpolation (magnitude scale cancelled, as in ds4, HF and the official code).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub orig_ctx: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// First pair of the ramp (`max(0, floor(corr_dim(beta_fast)))`).
    pub lo: f64,
    /// End of the ramp (`min(n_rot-1, ceil(corr_dim(beta_slow)))`).
    pub hi: f64,
}

impl RopeParams {
    /// Plain RoPE: `inv_freq[k] = base^(-2k/n_rot)`.
    pub fn plain(n_rot: usize, base: f64) -> RopeParams {
        let inv_freq = (0..n_rot / 2)
            .map(|k| base.powf(-(2.0 * k as f64) / n_rot as f64))
            .collect();
        RopeParams {
            n_rot,
            base,
            yarn: None,
            inv_freq,
        }
    }

    /// YaRN RoPE (model-spec §3.4 and §7.11): pairs below `lo` keep the original frequency,
    /// pairs at or above `hi` are divided by `factor`, pairs in between blend linearly.
    pub fn yarn(
        n_rot: usize,
        base: f64,
        factor: f64,
        orig_ctx: f64,
        beta_fast: f64,
        beta_slow: f64,
    ) -> RopeParams {
        let corr_dim = |b: f64| {
            n_rot as f64 * (orig_ctx / (2.0 * std::f64::consts::PI * b)).ln() / (2.0 * base.ln())
        };
        let lo = corr_dim(beta_fast).floor().max(0.0);
        let hi = corr_dim(beta_slow).ceil().min(n_rot as f64 - 1.0);
        let inv_freq = (0..n_rot / 2)
            .map(|k| {
                let ext = base.powf(-(2.0 * k as f64) / n_rot as f64);
                let int = ext / factor;
                let ramp = 1.0 - ((k as f64 - lo) / (hi - lo).max(0.001)).clamp(0.0, 1.0);
                int * (1.0 - ramp) + ext * ramp
            })
            .collect();
        RopeParams {
            n_rot,
            base,
            yarn: Some(Yarn {
                factor,
                orig_ctx,
                beta_fast,
                beta_slow,
                lo,
                hi,
            }),
            inv_freq,
        }
    }

    /// `cos`/`sin` of every pair at position `pos` (angles in f64, rounded to f32 at the end).
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (k, &f) in self.inv_freq.iter().enumerate() {
            let th = pos as f64 * f;
            cos[k] = th.cos() as f32;
            sin[k] = th.sin() as f32;
        }
    }
}

/// Plan of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerPlan {
    pub attn: AttnKind,
    pub moe: MoeKind,
    /// Which rope family the layer uses (its queries, keys, compressor rows, indexer).
    pub rope: RopeKind,
}

/// The two rope families of DeepSeek V4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    /// Base `rope.freq_base` (10000), no scaling: ratio-0 (sliding-window) layers.
    Plain,
    /// Base `compress_rope_freq_base` (160000) with YaRN: compressed layers.
    Compressed,
}

/// The whole plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub layers: Vec<LayerPlan>,
    pub rope_plain: RopeParams,
    pub rope_compressed: RopeParams,
}

impl Plan {
    /// Derive the plan from a validated shape.
    pub fn new(shape: &Shape) -> Plan {
        let layers = (0..shape.n_layer)
            .map(|il| {
                let attn = shape.attn_kind(il);
                LayerPlan {
                    attn,
                    moe: if shape.is_hash_layer(il) {
                        MoeKind::Hash
                    } else {
                        MoeKind::Routed
                    },
                    rope: if attn.is_compressed() {
                        RopeKind::Compressed
                    } else {
                        RopeKind::Plain
                    },
                }
            })
            .collect();
        Plan {
            layers,
            rope_plain: RopeParams::plain(shape.n_rot, shape.rope_base as f64),
            rope_compressed: RopeParams::yarn(
                shape.n_rot,
                shape.compress_rope_base as f64,
                shape.yarn_factor as f64,
                shape.yarn_orig_ctx as f64,
                shape.yarn_beta_fast as f64,
                shape.yarn_beta_slow as f64,
            ),
        }
    }

    /// RoPE parameters of a family.
    pub fn rope(&self, kind: RopeKind) -> &RopeParams {
        match kind {
            RopeKind::Plain => &self.rope_plain,
            RopeKind::Compressed => &self.rope_compressed,
        }
    }

    /// RoPE parameters of layer `il`.
    pub fn layer_rope(&self, il: usize) -> &RopeParams {
        self.rope(self.layers[il].rope)
    }

    /// The smallest compression ratio of any layer (used for the snapshot's compressed cap);
    /// 4 when no layer is compressed.
    pub fn min_ratio(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.attn.ratio())
            .filter(|&r| r > 0)
            .min()
            .unwrap_or(crate::shape::CSA_RATIO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_plan_and_yarn_range() {
        let s = Shape::flash();
        let p = Plan::new(&s);
        assert_eq!(p.layers[0].moe, MoeKind::Hash);
        assert_eq!(p.layers[2].moe, MoeKind::Hash);
        assert_eq!(p.layers[3].moe, MoeKind::Routed);
        assert_eq!(p.layers[1].rope, RopeKind::Plain);
        assert_eq!(p.layers[2].rope, RopeKind::Compressed);
        assert_eq!(p.layers[3].rope, RopeKind::Compressed);
        let y = p.rope_compressed.yarn.unwrap();
        // model-spec §3.4: lo = 15, hi = 25 for n_rot 64, base 160000, orig 65536.
        assert_eq!((y.lo, y.hi), (15.0, 25.0));
        let ext = |k: usize| 160000f64.powf(-(2.0 * k as f64) / 64.0);
        let f = &p.rope_compressed.inv_freq;
        assert!((f[10] - ext(10)).abs() < 1e-15);
        assert!((f[30] - ext(30) / 16.0).abs() < 1e-15);
        // pair 16: ramp 0.9 (extrapolation weight).
        let want = ext(16) / 16.0 * 0.1 + ext(16) * 0.9;
        assert!((f[16] - want).abs() < 1e-15);
        assert_eq!(p.min_ratio(), 4);
    }

    #[test]
    fn tiny_yarn_range() {
        // model-spec §7.11: n_rot 16 gives lo = 3, hi = 7.
        let r = RopeParams::yarn(16, 160000.0, 16.0, 65536.0, 32.0, 1.0);
        let y = r.yarn.unwrap();
        assert_eq!((y.lo, y.hi), (3.0, 7.0));
    }
}
