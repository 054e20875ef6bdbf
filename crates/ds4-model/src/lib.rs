//! The DeepSeek V4 Flash model: shape, plan, weights, the CPU reference backend and sessions.

pub mod shape;

pub use shape::{AttnKind, Shape, ShapeError};
