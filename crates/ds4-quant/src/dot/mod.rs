//! Dot products used by the CPU forward pass, with run-time kernel selection.
//!
//! [`scalar`] is the oracle. On x86/x86_64 with AVX2, FMA and F16C (detected once with
//! `is_x86_feature_detected!`, cached in a `OnceLock`), the AVX2 kernels are used. Setting the
//! environment variable `DS4_QUANT_SCALAR=1` before the first call forces the scalar kernels.
//!
//! Results (the numerics contract shared with the CUDA kernels): exact integer block sums, per-block
//! terms formed in f64 with a fixed operation order, all accumulation in f64, one rounding to f32.
//! Kernels differ only in the order of f64 additions, so their f32 results agree bit for bit except
//! in rare ties (at most 1 ulp then).

use std::sync::OnceLock;

use crate::blocks::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8_0Act, BlockQ8K};

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2;
pub mod scalar;

/// A set of dot-product kernels (all safe to call once obtained).
#[derive(Clone, Copy)]
pub struct Kernels {
    pub name: &'static str,
    pub q8_0: fn(&[BlockQ8_0], &[BlockQ8_0Act]) -> f32,
    pub q2_k: fn(&[BlockQ2K], &[BlockQ8K]) -> f32,
    pub q4_k: fn(&[BlockQ4K], &[BlockQ8K]) -> f32,
    pub iq2_xxs: fn(&[BlockIq2Xxs], &[BlockQ8K]) -> f32,
    pub f16: fn(&[u16], &[f32]) -> f32,
    pub bf16: fn(&[u16], &[f32]) -> f32,
    pub f32: fn(&[f32], &[f32]) -> f32,
}

/// The scalar oracle kernels.
pub static SCALAR: Kernels = Kernels {
    name: "scalar",
    q8_0: scalar::vec_dot_q8_0,
    q2_k: scalar::vec_dot_q2_k_q8_k,
    q4_k: scalar::vec_dot_q4_k_q8_k,
    iq2_xxs: scalar::vec_dot_iq2_xxs_q8_k,
    f16: scalar::vec_dot_f16_f32,
    bf16: scalar::vec_dot_bf16_f32,
    f32: scalar::vec_dot_f32,
};

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2_entry {
    //! Safe wrappers. SAFETY (all): these functions are only reachable through
    //! [`super::avx2_kernels`], which returns them only after `is_x86_feature_detected!` has
    //! confirmed AVX2, FMA and F16C on this CPU.
    use super::*;
    pub fn q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0Act]) -> f32 {
        unsafe { avx2::vec_dot_q8_0(w, x) }
    }
    pub fn q2_k(w: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
        unsafe { avx2::vec_dot_q2_k_q8_k(w, y) }
    }
    pub fn q4_k(w: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        unsafe { avx2::vec_dot_q4_k_q8_k(w, y) }
    }
    pub fn iq2_xxs(w: &[BlockIq2Xxs], y: &[BlockQ8K]) -> f32 {
        unsafe { avx2::vec_dot_iq2_xxs_q8_k(w, y) }
    }
    pub fn f16(w: &[u16], x: &[f32]) -> f32 {
        unsafe { avx2::vec_dot_f16_f32(w, x) }
    }
    pub fn bf16(w: &[u16], x: &[f32]) -> f32 {
        unsafe { avx2::vec_dot_bf16_f32(w, x) }
    }
    pub fn f32(w: &[f32], x: &[f32]) -> f32 {
        unsafe { avx2::vec_dot_f32(w, x) }
    }
    pub static AVX2: Kernels = Kernels {
        name: "avx2",
        q8_0,
        q2_k,
        q4_k,
        iq2_xxs,
        f16,
        bf16,
        f32,
    };
}

/// The AVX2+FMA+F16C kernels, if this CPU has those features.
pub fn avx2_kernels() -> Option<&'static Kernels> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Some(&avx2_entry::AVX2);
        }
    }
    None
}

/// The kernels in use (chosen once per process).
pub fn kernels() -> &'static Kernels {
    static K: OnceLock<&'static Kernels> = OnceLock::new();
    K.get_or_init(|| {
        let force_scalar = std::env::var_os("DS4_QUANT_SCALAR").is_some_and(|v| v != "0");
        if force_scalar {
            return &SCALAR;
        }
        avx2_kernels().unwrap_or(&SCALAR)
    })
}

/// Name of the kernel set in use: `"avx2"` or `"scalar"`.
pub fn simd_level() -> &'static str {
    kernels().name
}

/// Q8_0 weights · ds4 Q8_0 activation: `Σ_b f16(w.d)·x.d·Σ_i w.qs·x.qs` (f32, block order).
///
/// # Panics
/// If the block counts differ.
pub fn vec_dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0Act]) -> f32 {
    (kernels().q8_0)(w, x)
}

/// Q2_K weights · Q8_K activation (ds4 `ds4_vec_dot_q2_K_q8_K`). Panics if block counts differ.
pub fn vec_dot_q2_k_q8_k(w: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    (kernels().q2_k)(w, y)
}

/// Q4_K weights · Q8_K activation. Panics if block counts differ.
pub fn vec_dot_q4_k_q8_k(w: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    (kernels().q4_k)(w, y)
}

/// IQ2_XXS weights · Q8_K activation (ds4 `ds4_vec_dot_iq2_xxs_q8_K`). Panics if block counts
/// differ.
pub fn vec_dot_iq2_xxs_q8_k(w: &[BlockIq2Xxs], y: &[BlockQ8K]) -> f32 {
    (kernels().iq2_xxs)(w, y)
}

/// F16 weights (IEEE half bits) · f32, f64 accumulation. Panics if lengths differ.
pub fn vec_dot_f16_f32(w: &[u16], x: &[f32]) -> f32 {
    (kernels().f16)(w, x)
}

/// BF16 weights (bits) · f32, f64 accumulation. Panics if lengths differ.
pub fn vec_dot_bf16_f32(w: &[u16], x: &[f32]) -> f32 {
    (kernels().bf16)(w, x)
}

/// f32 · f32 accumulated in f64 (ds4 `matvec_f32`). Panics if lengths differ.
pub fn vec_dot_f32(w: &[f32], x: &[f32]) -> f32 {
    (kernels().f32)(w, x)
}
