//! The DeepSeek V4 Flash model: shape, plan, weights, the CPU reference backend, sessions,
//! snapshots and sampling.
//!
//! * [`Shape`] (from GGUF metadata, Flash preset check) → [`Plan`] (per-layer attention/MoE
//!   kind and RoPE) → [`Weights`] (bound, validated, zero-copy tensor views).
//! * [`Engine`] = loaded [`Model`] + [`EngineOptions`]; it creates [`CpuBackend`]s and
//!   [`Session`]s.
//! * [`Backend`]: the step-level interface (evaluate a chunk at the current position, read
//!   logits, export/import the backend-neutral [`KvState`], reset, debug [`Trace`]).
//! * [`ops`]: every operation of the forward pass as a plain slice function (the reference the
//!   CUDA kernels are tested against).
//! * [`snapshot`]: ds4's session payload; [`sampler`]: ds4's sampler; [`npy`]: `.npy` I/O.
//! * [`steer`]: directional steering (an optional edit of the sublayer outputs, both backends).

pub mod backend;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod linear;
pub mod npy;
pub mod ops;
pub mod plan;
pub mod sampler;
pub mod session;
pub mod shape;
pub mod snapshot;
pub mod steer;
pub mod weights;

pub use backend::{Backend, KvState, LayerState, Trace};
pub use cpu::CpuBackend;
pub use engine::{BackendKind, Engine, EngineOptions, Model};
pub use error::{ModelError, Result};
pub use plan::{LayerPlan, MoeKind, Plan, RopeKind, RopeParams};
pub use sampler::{Rng, SamplerParams, argmax, sample};
pub use session::{Session, SessionOptions, SyncOutcome};
pub use shape::{AttnKind, Shape, ShapeError};
pub use snapshot::SnapshotError;
pub use steer::{Steering, SteeringSlot, Sublayer};
pub use weights::Weights;
