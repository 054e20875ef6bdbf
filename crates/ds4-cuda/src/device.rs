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

#[cfg(test)]
mod tests {
    use super::kernels;
    use std::path::PathBuf;
    use std::process::Command;

    /// cuobjdump from `$CUOBJDUMP`, next to `$NVCC`, or on `PATH` (CI installs it with nvcc).
    fn cuobjdump() -> Option<PathBuf> {
        let mut c: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("CUOBJDUMP") {
            c.push(p.into());
        }
        if let Some(n) = std::env::var_os("NVCC") {
            c.push(PathBuf::from(n).with_file_name("cuobjdump"));
        }
        c.push("cuobjdump".into());
        c.into_iter().find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    /// Kernels with a weight prologue (README "Weight prologue"): in the SASS, the prologue's
    /// loads (or, for the routed gate/up, its table stores) come before `ACQBULK`
    /// (`griddepcontrol.wait`). ptxas may schedule the wait above loads of the same basic
    /// block, which would silently undo the prologue; this checks the built cubins.
    #[test]
    fn weight_prologue_loads_precede_the_wait() {
        let Some(tool) = cuobjdump() else {
            eprintln!("SKIP: no cuobjdump (set CUOBJDUMP, or NVCC with cuobjdump beside it)");
            return;
        };
        let dir = std::env::temp_dir().join(format!("ds4-sass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // (module, kernel-name prefix, the op that must precede ACQBULK)
        let rules: [(&str, &str, &str); 4] = [
            ("gemv", "ds4_gemv_", "LDG"),
            ("gemv", "ds4_gate_up_", "LDG"),
            ("gemv", "ds4_moe_gate_up_iq2_xxs", "STS"),
            ("fwd", "ds4_hc_mix_part", "LDG"),
        ];
        let mut checked = 0;
        let mut bad = Vec::new();
        for module in ["gemv", "fwd"] {
            let Some((_, bin)) = kernels::CUBINS.iter().find(|(n, _)| *n == module) else {
                eprintln!("SKIP: no embedded cubin for {module} (built without nvcc)");
                return;
            };
            let path = dir.join(format!("{module}.cubin"));
            std::fs::write(&path, bin).unwrap();
            let out = Command::new(&tool)
                .arg("-sass")
                .arg(&path)
                .output()
                .unwrap();
            if !out.status.success() {
                // cuobjdump needs nvdisasm beside it or on PATH for -sass.
                eprintln!(
                    "SKIP: cuobjdump -sass failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return;
            }
            let sass = String::from_utf8_lossy(&out.stdout);
            for func in sass.split("Function : ").skip(1) {
                let name = func.split_whitespace().next().unwrap_or("");
                let Some(&(_, _, op)) = rules
                    .iter()
                    .find(|(m, p, _)| *m == module && name.starts_with(p))
                else {
                    continue;
                };
                checked += 1;
                let first = |pat: &str| {
                    func.lines().position(|l| {
                        l.split_whitespace()
                            .any(|w| w == pat || w.starts_with(&format!("{pat}.")))
                    })
                };
                match (first(op), first("ACQBULK")) {
                    (Some(o), Some(w)) if o < w => {}
                    (o, w) => bad.push(format!("{name}: first {op} at {o:?}, ACQBULK at {w:?}")),
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            checked > 60,
            "only {checked} prologue kernels found in the cubins"
        );
        assert!(
            bad.is_empty(),
            "prologue loads after the wait:\n{}",
            bad.join("\n")
        );
    }
}
