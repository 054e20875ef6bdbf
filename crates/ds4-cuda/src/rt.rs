//! Small runtime helpers: raw device buffers, copies and kernel launches by raw pointer (the
//! backend passes device addresses as plain `u64` kernel arguments, which keeps launches cheap
//! and CUDA-graph friendly).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, result, sys};

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

/// Page-locked host memory (`cuMemHostAlloc` without write-combining: the host reads it), for
/// copies a CUDA graph captures (a graph cannot capture a copy from or to pageable memory) and
/// for full-speed device → host transfers. Elements are `f32`/`i32`-sized plain data.
pub(crate) struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    /// Kept alive (and made current) for the free: the allocation belongs to this context.
    ctx: Arc<cudarc::driver::CudaContext>,
}

/// Element types a [`Pinned`] buffer is viewed as: plain 4-byte numbers, valid for any bits.
pub(crate) trait PinnedElem: Copy {}
impl PinnedElem for f32 {}
impl PinnedElem for i32 {}

// SAFETY: plain host memory owned by this value; every access goes through `&self`/`&mut self`.
unsafe impl Send for Pinned {}

impl Pinned {
    /// `bytes` bytes (at least 16), zeroed, in `stream`'s context.
    pub fn new(stream: &CudaStream, bytes: usize) -> Result<Pinned, CudaError> {
        let bytes = bytes.max(16);
        let ctx = stream.context().clone();
        ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: a fresh allocation of `bytes` bytes; zeroed before any read.
        let ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(|e| {
            CudaError::Driver(format!(
                "cannot allocate {bytes} bytes of pinned host memory: {e}"
            ))
        })? as *mut u8;
        // SAFETY: ptr is a live allocation of `bytes` bytes.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
        Ok(Pinned { ptr, bytes, ctx })
    }

    /// The first `n` elements as `T` (`n · size_of::<T>()` ≤ the size). Only while no copy
    /// into this memory is in flight.
    pub fn slice<T: PinnedElem>(&self, n: usize) -> &[T] {
        assert!(n * std::mem::size_of::<T>() <= self.bytes);
        // SAFETY: in bounds (checked), aligned (page-locked memory is page-aligned; T is a
        // 4-byte PinnedElem), and the caller has synchronized with any copy into it.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, n) }
    }

    /// The first `n` elements as `T`, writable (as [`Pinned::slice`]).
    pub fn slice_mut<T: PinnedElem>(&mut self, n: usize) -> &mut [T] {
        assert!(n * std::mem::size_of::<T>() <= self.bytes);
        // SAFETY: as in `slice`, and `&mut self` excludes other borrows.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, n) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // The backend may be dropped on another thread than the one that made it.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc in `new` (in self.ctx, alive), freed once.
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

/// Host → device copy from pinned memory (capturable into a CUDA graph), not waited for.
pub(crate) fn htod_pinned<T: PinnedElem>(
    stream: &CudaStream,
    dst: u64,
    src: &Pinned,
    n: usize,
) -> Result<(), CudaError> {
    // SAFETY: dst is a live device allocation of at least n elements (callers size it).
    unsafe {
        result::memcpy_htod_async(
            dst as sys::CUdeviceptr,
            src.slice::<T>(n),
            stream.cu_stream(),
        )
    }
    .map_err(drv)
}

/// Device → host copy into pinned memory (capturable into a CUDA graph), not waited for: read
/// `dst` only after synchronizing with the stream.
pub(crate) fn dtoh_pinned<T: PinnedElem>(
    stream: &CudaStream,
    dst: &mut Pinned,
    n: usize,
    src: u64,
) -> Result<(), CudaError> {
    // SAFETY: src is a live device allocation of at least n elements.
    unsafe {
        result::memcpy_dtoh_async(
            dst.slice_mut::<T>(n),
            src as sys::CUdeviceptr,
            stream.cu_stream(),
        )
    }
    .map_err(drv)
}

/// Device → host copy of `n` elements into pinned memory through a shared reference, waited
/// for.
///
/// # Safety
/// No slice of `dst` ([`Pinned::slice`]) may be alive: the caller writes only into memory that
/// nobody has borrowed since its last exclusive access.
pub(crate) unsafe fn dtoh_pinned_shared<T: PinnedElem>(
    stream: &CudaStream,
    dst: &Pinned,
    n: usize,
    src: u64,
) -> Result<(), CudaError> {
    assert!(n * std::mem::size_of::<T>() <= dst.bytes);
    // SAFETY: in bounds (checked) and aligned (page-locked, 4-byte elements); no other borrow of
    // these bytes is alive (the caller's contract), and the copy is waited for before return.
    let d = unsafe { std::slice::from_raw_parts_mut(dst.ptr as *mut T, n) };
    // SAFETY: src is a live device allocation of at least n elements (callers size it).
    unsafe { result::memcpy_dtoh_async(d, src as sys::CUdeviceptr, stream.cu_stream()) }
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

/// Programmatic dependent launch (Hopper): every kernel of this crate starts with
/// `griddepcontrol.wait` (it returns once the previous kernel of the stream has completed and its
/// writes are visible) followed by `griddepcontrol.launch_dependents`, so a kernel launched with
/// the PDL attribute may be scheduled while its predecessor still runs and waits on the SM
/// instead of paying the launch latency after it. Same results either way; on by default,
/// `DS4_CUDA_PDL=0` turns it off.
static PDL: OnceLock<AtomicBool> = OnceLock::new();

fn pdl_flag() -> &'static AtomicBool {
    PDL.get_or_init(|| AtomicBool::new(std::env::var("DS4_CUDA_PDL").map_or(true, |v| v != "0")))
}

/// Turn programmatic dependent launch on or off for every later launch (tests, benchmarks).
#[allow(dead_code)]
pub(crate) fn set_pdl(on: bool) {
    pdl_flag().store(on, Ordering::Relaxed);
}

/// Whether launches carry the programmatic-dependent-launch attribute.
pub(crate) fn pdl() -> bool {
    pdl_flag().load(Ordering::Relaxed)
}

/// `DS4_CUDA_DIAG_SKIP=prefix,prefix,…` — a timing diagnostic, never for results: while a
/// decode graph is captured, kernels whose names start with one of the prefixes are left out of
/// it, so the graph's GPU time (`DS4_CUDA_STEP_TIMING=1`) shows what those kernels cost in the
/// chained decode step (per-kernel profiles time each kernel alone, which misleads under PDL).
/// The skipped kernels' outputs keep the values of the last pass that wrote them (finite, in
/// range), so the step still runs, with wrong logits.
static DIAG_SKIP: OnceLock<Vec<String>> = OnceLock::new();
thread_local! {
    /// Whether this thread is capturing a decode graph (captures are thread-local).
    static DIAG_CAPTURE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The `DS4_CUDA_DIAG_SKIP` prefixes (empty: off).
pub(crate) fn diag_skip() -> &'static [String] {
    DIAG_SKIP.get_or_init(|| {
        std::env::var("DS4_CUDA_DIAG_SKIP")
            .map(|v| {
                v.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Marks this thread as capturing a decode graph for [`diag_skip`] until dropped.
pub(crate) struct DiagCapture;

impl DiagCapture {
    pub(crate) fn start() -> DiagCapture {
        DIAG_CAPTURE.with(|c| c.set(true));
        DiagCapture
    }
}

impl Drop for DiagCapture {
    fn drop(&mut self) {
        DIAG_CAPTURE.with(|c| c.set(false));
    }
}

/// Whether this launch is left out by [`diag_skip`].
fn diag_skipped(f: &CudaFunction) -> bool {
    let pre = diag_skip();
    if pre.is_empty() || !DIAG_CAPTURE.with(|c| c.get()) {
        return false;
    }
    // cuFuncGetName needs a CUDA 12.3+ driver (cudarc loads it on first use and panics where
    // it is missing): only reached with the diagnostic on.
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuFuncGetName writes a pointer to a NUL-terminated string owned by the driver,
    // valid while the function's module is loaded (it is: `f` borrows it).
    let ok = unsafe { sys::cuFuncGetName(&mut name, f.cu_function()) }.result();
    if ok.is_err() || name.is_null() {
        return false;
    }
    // SAFETY: as above.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    pre.iter().any(|p| name.starts_with(p.as_str()))
}

/// Launch a kernel by handle with raw parameter pointers (cuLaunchKernelEx, with the PDL
/// attribute when [`pdl`] is on).
///
/// # Safety
/// `params` must point to values matching the kernel's parameter list, alive for the call.
pub(crate) unsafe fn launch_raw(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<(), CudaError> {
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    if g.0 == 0 || g.1 == 0 || g.2 == 0 || diag_skipped(f) {
        return Ok(());
    }
    // SAFETY: an all-zero CUlaunchAttribute is the "ignore" entry; the union is plain data.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let on = pdl();
    let config = sys::CUlaunchConfig {
        gridDimX: g.0,
        gridDimY: g.1,
        gridDimZ: g.2,
        blockDimX: b.0,
        blockDimY: b.1,
        blockDimZ: b.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: if on { &mut attr } else { std::ptr::null_mut() },
        numAttrs: u32::from(on),
    };
    // SAFETY: config and attr outlive the call; params as promised by the caller.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(|e| CudaError::Driver(format!("kernel launch failed: {e}")))
}

/// Raw parameter pointers for [`launch_raw`]: `kargs![&a, &b, …]`.
macro_rules! kargs {
    ($($a:expr),* $(,)?) => {
        [$(($a) as *const _ as *mut ::std::ffi::c_void),*]
    };
}
pub(crate) use kargs;

/// Launch `f` with the given grid, block, dynamic shared memory and arguments.
pub(crate) fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[A],
) -> Result<(), CudaError> {
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
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    };
    // SAFETY: the argument list matches the kernel's parameter list (every call site names the
    // kernel's parameters in order); the values outlive the launch call, which copies them.
    unsafe { launch_raw(stream, f, cfg, &mut ptrs) }
}
