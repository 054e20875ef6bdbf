//! Device discovery, module loading.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::{CudaError, DeviceInfo, kernels};

fn drv(e: impl std::fmt::Display) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// Open device `ordinal`, or explain why not. Never panics when the driver is absent.
pub fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    // SAFETY: only checks whether the shared library can be loaded.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    if !present {
        return Err(CudaError::NoDriver(
            "libcuda.so could not be loaded (no NVIDIA driver on this machine)".into(),
        ));
    }
    CudaContext::new(ordinal).map_err(|e| CudaError::NoDriver(e.to_string()))
}

/// Load an embedded module by name: the nvcc-built cubin when present, else NVRTC from source.
pub fn load_module(ctx: &Arc<CudaContext>, name: &str) -> Result<Arc<CudaModule>, CudaError> {
    if let Some((_, bin)) = kernels::CUBINS.iter().find(|(n, _)| *n == name) {
        return ctx.load_module(Ptx::from_binary(bin.to_vec())).map_err(drv);
    }
    let (_, src) = kernels::SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| CudaError::Driver(format!("no kernel module {name:?} embedded")))?;
    // SAFETY: only checks whether the shared library can be loaded (cudarc panics otherwise).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Driver(format!(
            "kernel module {name:?} has no embedded cubin and libnvrtc could not be loaded"
        )));
    }
    let fmad_off = src
        .lines()
        .next()
        .is_some_and(|l| l.starts_with("// ds4-nvcc:") && l.contains("-fmad=false"));
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(
        *src,
        cudarc::nvrtc::CompileOptions {
            arch: Some("sm_90a"),
            include_paths: vec!["/usr/local/cuda/include".into()],
            fmad: fmad_off.then_some(false),
            ..Default::default()
        },
    )
    .map_err(|e| CudaError::Driver(format!("NVRTC failed on {name}: {e}")))?;
    ctx.load_module(ptx).map_err(drv)
}

/// Open the device, run the self-test kernel and report what the device is.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    let ctx = open_context(ordinal)?;
    let name = ctx.name().map_err(drv)?;
    let major = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )
        .map_err(drv)?;
    let minor = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        )
        .map_err(drv)?;
    let (free_memory, total_memory) = ctx.mem_get_info().map_err(drv)?;
    let module = load_module(&ctx, "selftest")?;
    let f = module.load_function("ds4_selftest_axpy").map_err(drv)?;
    let stream = ctx.default_stream();
    let n = 1000usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let y0: Vec<f32> = vec![1.0; n];
    let dx = stream.clone_htod(&x).map_err(drv)?;
    let mut dy = stream.clone_htod(&y0).map_err(drv)?;
    let n_i = n as i32;
    let a = 2.0f32;
    let mut b = stream.launch_builder(&f);
    b.arg(&dx).arg(&mut dy).arg(&a).arg(&n_i);
    // SAFETY: the kernel reads n floats of x and writes n floats of y, both allocated with n.
    unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
    let y = stream.clone_dtoh(&dy).map_err(drv)?;
    for (i, v) in y.iter().enumerate() {
        if *v != 1.0 + 2.0 * i as f32 {
            return Err(CudaError::Driver(format!(
                "self-test kernel gave y[{i}] = {v}, expected {}",
                1.0 + 2.0 * i as f32
            )));
        }
    }
    Ok(DeviceInfo {
        name,
        compute_capability: (major, minor),
        total_memory,
        free_memory,
    })
}
