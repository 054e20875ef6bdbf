//! CUDA backend for ds4-rs.
//!
//! Built only with the `cuda` feature; without it every entry point returns
//! [`CudaError::NotCompiled`], so callers never need `cfg`.
//!
//! ```text
//! ds4_cuda::probe(device) -> Result<DeviceInfo, CudaError>
//! CudaBackend::new(model: Arc<ds4_model::Model>, ctx, CudaOptions { device, qat, .. })
//!     -> Result<CudaBackend, CudaError>          // implements ds4_model::Backend
//! ds4_cuda::new_backend(model, ctx, opts) -> Result<Box<dyn Backend>, ModelError>
//! ```
//!
//! Errors reach the `Backend` interface as `ModelError::Backend { backend: "cuda", reason }`.

/// Embedded kernels (cubins built by nvcc at build time, sources for NVRTC).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Kernels (name prefixes as written in `kernels/*.cu`) that may start with `PDL_DEFERRED()`
/// and read weights before their PDL wait (README "Weight prologue"), each reviewed for it:
/// `tests/pdl_entry.rs` allows the marker only on these, and `device::tests` checks their SASS.
#[doc(hidden)]
pub const PDL_DEFERRED_KERNELS: [&str; 4] = [
    "ds4_gemv_",
    "ds4_gate_up_",
    "ds4_moe_gate_up_",
    "ds4_hc_mix_part",
];

use std::sync::Arc;

use ds4_model::{Backend, Model, ModelError};

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("this ds4 was built without CUDA support (rebuild with `--features cuda`)")]
    NotCompiled,
    #[error("no usable CUDA driver: {0}")]
    NoDriver(String),
    #[error("CUDA: {0}")]
    Driver(String),
}

impl From<CudaError> for ModelError {
    fn from(e: CudaError) -> ModelError {
        ModelError::Backend {
            backend: "cuda".into(),
            reason: e.to_string(),
        }
    }
}

/// What `probe` found.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub free_memory: usize,
}

/// Options of [`CudaBackend::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// QAT simulation (FP8 KV rows, Hadamard+FP4 indexer), as `EngineOptions::qat`.
    pub qat: bool,
    /// Most tokens evaluated in one pass (longer evals are split); sizes the scratch buffers
    /// and the raw KV ring (`window + max_chunk` rows per layer).
    pub max_chunk: usize,
    /// Shrink `max_chunk` (halving, not below [`MIN_FIT_PASS_TOKENS`]) until the estimated KV
    /// state and pass scratch fit the device memory left after the weights (the CLI sets it when
    /// `--prefill-chunk` is not given, with `max_chunk` = [`DEFAULT_PASS_TOKENS`]).
    pub fit_chunk: bool,
    /// Capture single-token decode steps as CUDA graphs and replay them.
    pub graphs: bool,
    /// `--quality`: exact decode-style kernels only (every tensor-core prefill route off).
    pub quality: bool,
    /// Tensor-core prefill routes to use (when not `quality`; the `DS4_CUDA_TC_*_DISABLE`
    /// environment switches turn routes off on top of this).
    pub tc: TcRoutes,
    /// Directional steering (`ds4_model::steer`; as `EngineOptions::steering`): the
    /// directions are uploaded once, and each edited sublayer output gets one `ds4_dir_steer`
    /// launch per layer. `None`: the normal path, no extra kernel.
    pub steering: Option<Arc<ds4_model::Steering>>,
}

/// Tensor-core prefill routes (chunks of at least [`TcRoutes::MIN_TOKENS`] tokens). See
/// `src/tc.rs` and the crate README for what each route computes and its numerics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcRoutes {
    /// Dense Q8_0 projections (q_a, q_b, kv, out_b, shared expert, LM head).
    pub dense: bool,
    /// The grouped attention output projection (`attn_output_a`, 8 groups).
    pub attn_out: bool,
    /// F16 projections (HC mixing, router, compressors, indexer).
    pub f16: bool,
    /// Routed-expert gate projection (fused with up: both must be on for the fused kernel).
    pub moe_gate: bool,
    /// Routed-expert up projection (fused with gate).
    pub moe_up: bool,
    /// Routed-expert down projection and the 6-expert sum.
    pub moe_down: bool,
    /// Chunk attention on tensor cores (`src/attn_tc.rs`; head dims 128 and 512).
    pub attn: bool,
    /// How `dense` and `attn_out` compute: ds4's int8 activations with every 32-block's integer
    /// dot exact (`kernels/tc.cu`, the default), or, when true (`DS4_CUDA_TC_DENSE_F16=1`,
    /// opt-in), the weights and those activations rounded to f16 for cuBLAS (`src/tc_f16.rs`:
    /// ~2× faster, but outside the drift gate's relative envelope on two fixtures).
    pub dense_f16: bool,
}

impl TcRoutes {
    /// Smallest chunk (tokens) that uses the routes; shorter chunks run the exact kernels.
    pub const MIN_TOKENS: usize = 16;

    /// Every implemented route on.
    pub const fn all() -> TcRoutes {
        TcRoutes {
            dense: true,
            attn_out: true,
            f16: true,
            moe_gate: true,
            moe_up: true,
            moe_down: true,
            attn: true,
            dense_f16: false,
        }
    }

    /// Every route off (the `--quality` path).
    pub const fn none() -> TcRoutes {
        TcRoutes {
            dense: false,
            attn_out: false,
            f16: false,
            moe_gate: false,
            moe_up: false,
            moe_down: false,
            attn: false,
            dense_f16: false,
        }
    }

    /// Whether any route is on.
    pub fn any(&self) -> bool {
        self.dense
            || self.attn_out
            || self.f16
            || self.moe_gate
            || self.moe_up
            || self.moe_down
            || self.attn
    }

    /// `self` with the routes the environment disables turned off: `DS4_CUDA_TC_DISABLE=1`
    /// (all), `DS4_CUDA_TC_{DENSE,ATTN_OUT,F16,MOE_GATE,MOE_UP,MOE_DOWN,ATTN}_DISABLE=1`;
    /// `DS4_CUDA_TC_DENSE_F16=1` selects the f16 (cuBLAS) form of `dense` / `attn_out`, `=0`
    /// the int8 form.
    pub fn with_env(self) -> TcRoutes {
        self.with_vars(|k| std::env::var(k).ok())
    }

    /// [`TcRoutes::with_env`] with a custom variable lookup (tests).
    pub fn with_vars(mut self, get: impl Fn(&str) -> Option<String>) -> TcRoutes {
        let on = |k: &str| get(k).is_some_and(|v| !v.is_empty() && v != "0");
        if on("DS4_CUDA_TC_DISABLE") {
            return TcRoutes::none();
        }
        let flags: [(&str, &mut bool); 7] = [
            ("DENSE", &mut self.dense),
            ("ATTN_OUT", &mut self.attn_out),
            ("F16", &mut self.f16),
            ("MOE_GATE", &mut self.moe_gate),
            ("MOE_UP", &mut self.moe_up),
            ("MOE_DOWN", &mut self.moe_down),
            ("ATTN", &mut self.attn),
        ];
        for (name, flag) in flags {
            if on(&format!("DS4_CUDA_TC_{name}_DISABLE")) {
                *flag = false;
            }
        }
        match get("DS4_CUDA_TC_DENSE_F16") {
            Some(v) if !v.is_empty() => self.dense_f16 = v != "0",
            _ => {}
        }
        self
    }

    /// One line naming each route's state (the backend prints it at start-up).
    pub fn describe(&self) -> String {
        let f = |b: bool| if b { "on" } else { "off" };
        let mode = |b: bool| match (b, self.dense_f16) {
            (false, _) => "off",
            (true, true) => "on(f16)",
            (true, false) => "on",
        };
        format!(
            "dense={} attn_out={} f16={} moe_gate={} moe_up={} moe_down={} attn={}",
            mode(self.dense),
            mode(self.attn_out),
            f(self.f16),
            f(self.moe_gate),
            f(self.moe_up),
            f(self.moe_down),
            f(self.attn)
        )
    }
}

impl Default for TcRoutes {
    fn default() -> Self {
        TcRoutes::all()
    }
}

/// Default tokens of one prefill pass on CUDA when `--prefill-chunk` is not given: 8192-token
/// passes run the routed MoE in fuller 64-pair tiles and the dense products in fewer, larger
/// launches (+13% prefill at 8k-32k tokens on an H200 over 2048, bench/README.md). Chunking is a
/// speed knob only: the exact path gives bit-identical logits for any pass size, the routes
/// differ by their own rounding (same drift from the exact path).
pub const DEFAULT_PASS_TOKENS: usize = 8192;
/// The smallest pass [`CudaOptions::fit_chunk`] shrinks to (ds4's default prefill chunk).
pub const MIN_FIT_PASS_TOKENS: usize = 2048;

/// The library's defaults keep ds4's 2048-token chunk and no fitting (what a caller that sizes
/// its own passes expects); the `ds4` CLI passes [`DEFAULT_PASS_TOKENS`] with `fit_chunk` on
/// unless `--prefill-chunk` is given.
impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            qat: true,
            max_chunk: 2048,
            fit_chunk: false,
            graphs: true,
            quality: false,
            tc: TcRoutes::all(),
            steering: None,
        }
    }
}

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod fwd;
pub mod pass;
#[cfg(feature = "cuda")]
mod rt;

#[cfg(feature = "cuda")]
pub mod gemv;

/// Tensor-core prefill routes (kernels in `kernels/tc.cu`).
#[cfg(feature = "cuda")]
pub mod tc;

/// The f16 (cuBLAS) form of the `dense` and `attn_out` routes (kernels in `kernels/tc_f16.cu`).
#[cfg(feature = "cuda")]
mod tc_f16;

/// Tensor-core chunk attention, the `attn` route (kernels in `kernels/attn_tc.cu`).
#[cfg(feature = "cuda")]
pub mod attn_tc;

#[cfg(feature = "cuda")]
mod backend;

/// Host-slice entry points to the forward-pass kernels (op-level tests; not a stable API).
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub mod optest;

#[cfg(feature = "cuda")]
pub use backend::CudaBackend;
#[cfg(feature = "cuda")]
pub use device::probe;

/// Check for a usable CUDA device (not compiled in: always an error).
#[cfg(not(feature = "cuda"))]
pub fn probe(_ordinal: usize) -> Result<DeviceInfo, CudaError> {
    Err(CudaError::NotCompiled)
}

/// The CUDA backend (this build has no CUDA support: [`CudaBackend::new`] always fails).
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub struct CudaBackend {
    never: std::convert::Infallible,
}

#[cfg(not(feature = "cuda"))]
impl CudaBackend {
    /// Always [`CudaError::NotCompiled`] in a build without the `cuda` feature.
    pub fn new(
        _model: Arc<Model>,
        _ctx: usize,
        _opts: CudaOptions,
    ) -> Result<CudaBackend, CudaError> {
        Err(CudaError::NotCompiled)
    }
    /// The options the backend was built with.
    pub fn options(&self) -> &CudaOptions {
        match self.never {}
    }
    /// Decode steps served by a CUDA graph replay so far.
    pub fn graph_launches(&self) -> u64 {
        match self.never {}
    }
    /// Device bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        match self.never {}
    }
    /// Device bytes one decode step streams from the weights.
    pub fn decode_read_bytes(&self) -> usize {
        match self.never {}
    }
}

#[cfg(not(feature = "cuda"))]
impl Backend for CudaBackend {
    fn name(&self) -> &str {
        match self.never {}
    }
    fn shape(&self) -> &ds4_model::Shape {
        match self.never {}
    }
    fn ctx(&self) -> usize {
        match self.never {}
    }
    fn n_tokens(&self) -> usize {
        match self.never {}
    }
    fn reset(&mut self) {
        match self.never {}
    }
    fn eval(&mut self, _tokens: &[u32], _all_logits: bool) -> ds4_model::Result<()> {
        match self.never {}
    }
    fn logits(&self) -> &[f32] {
        match self.never {}
    }
    fn chunk_logits(&self) -> &[f32] {
        match self.never {}
    }
    fn export_state(&self) -> ds4_model::Result<ds4_model::KvState> {
        match self.never {}
    }
    fn import_state(&mut self, _state: &ds4_model::KvState) -> ds4_model::Result<()> {
        match self.never {}
    }
    fn set_trace(&mut self, _on: bool) {
        match self.never {}
    }
    fn trace(&self) -> Option<&ds4_model::Trace> {
        match self.never {}
    }
}

/// A boxed CUDA backend for `Session::with_backend`, with errors as `ModelError`.
pub fn new_backend(
    model: Arc<Model>,
    ctx: usize,
    opts: CudaOptions,
) -> Result<Box<dyn Backend>, ModelError> {
    Ok(Box::new(CudaBackend::new(model, ctx, opts)?))
}
