//! CUDA backend for ds4-rs.
//!
//! Built only with the `cuda` feature; without it every entry point returns
//! [`CudaError::NotCompiled`], so callers never need `cfg`.

/// Embedded kernels (cubins built by nvcc at build time, sources for NVRTC).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

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

/// What `probe` found.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub free_memory: usize,
}

#[cfg(feature = "cuda")]
mod device;

#[cfg(feature = "cuda")]
pub use device::probe;

/// Check for a usable CUDA device (not compiled in: always an error).
#[cfg(not(feature = "cuda"))]
pub fn probe(_ordinal: usize) -> Result<DeviceInfo, CudaError> {
    Err(CudaError::NotCompiled)
}

#[cfg(feature = "cuda")]
pub mod gemv;
