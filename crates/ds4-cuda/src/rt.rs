//! Small runtime helpers: raw device buffers, copies and kernel launches by raw pointer (the
//! backend passes device addresses as plain `u64` kernel arguments, which keeps launches cheap
//! and CUDA-graph friendly).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, result, sys};

use crate::CudaError;

pub(crate) fn drv(e: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// A plain device allocation (`cuMemAlloc`), addressed by its raw pointer.
pub(crate) struct DBuf {
    _s: CudaSlice<u8>,
    pub ptr: u64,
    pub bytes: usize,
}

impl std::fmt::Debug for DBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DBuf({:#x}, {} B)", self.ptr, self.bytes)
    }
}

impl DBuf {
    /// A zeroed allocation of `bytes` bytes (at least 16).
    pub fn zeroed(stream: &Arc<CudaStream>, bytes: usize) -> Result<DBuf, CudaError> {
        let n = bytes.max(16).next_multiple_of(16);
        let s = stream.alloc_zeros::<u8>(n).map_err(|e| {
            CudaError::Driver(format!(
                "cannot allocate {bytes} bytes of device memory: {e}"
            ))
        })?;
        let ptr = {
            let (p, _sync) = s.device_ptr(stream);
            p
        };
        Ok(DBuf { _s: s, ptr, bytes })
    }

    /// A device copy of `data`.
    pub fn from_slice<T: Copy>(stream: &Arc<CudaStream>, data: &[T]) -> Result<DBuf, CudaError> {
        let b = DBuf::zeroed(stream, std::mem::size_of_val(data))?;
        htod(stream, b.ptr, data)?;
        Ok(b)
    }

    /// Address of f32 element `i`.
    pub fn f(&self, i: usize) -> u64 {
        self.ptr + 4 * i as u64
    }
}

/// Host → device copy (asynchronous on `stream`; pageable sources are staged by the driver).
pub(crate) fn htod<T: Copy>(stream: &CudaStream, dst: u64, src: &[T]) -> Result<(), CudaError> {
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: dst is a live device allocation of at least size_of_val(src) bytes (callers size
    // every buffer from the same shape numbers).
    unsafe { result::memcpy_htod_async(dst as sys::CUdeviceptr, src, stream.cu_stream()) }
        .map_err(drv)
}

/// Device → host copy, completed before returning.
pub(crate) fn dtoh<T: Copy>(stream: &CudaStream, dst: &mut [T], src: u64) -> Result<(), CudaError> {
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: src is a live device allocation of at least size_of_val(dst) bytes.
    unsafe { result::memcpy_dtoh_async(dst, src as sys::CUdeviceptr, stream.cu_stream()) }
        .map_err(drv)?;
    stream.synchronize().map_err(drv)
}

/// A kernel argument.
#[derive(Clone, Copy, Debug)]
pub(crate) enum A {
    /// Device pointer (0 = null).
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    D(f64),
}

/// Launch `f` with the given grid, block, dynamic shared memory and arguments.
pub(crate) fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[A],
) -> Result<(), CudaError> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let mut ptrs: Vec<*mut c_void> = args
        .iter()
        .map(|a| match a {
            A::P(v) => v as *const u64 as *mut c_void,
            A::I(v) => v as *const i32 as *mut c_void,
            A::L(v) => v as *const i64 as *mut c_void,
            A::F(v) => v as *const f32 as *mut c_void,
            A::D(v) => v as *const f64 as *mut c_void,
        })
        .collect();
    // SAFETY: the argument list matches the kernel's parameter list (every call site names the
    // kernel's parameters in order); the values outlive the launch call, which copies them.
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            grid,
            (block, 1, 1),
            smem,
            stream.cu_stream(),
            &mut ptrs,
        )
    }
    .map_err(|e| CudaError::Driver(format!("kernel launch failed: {e}")))
}
