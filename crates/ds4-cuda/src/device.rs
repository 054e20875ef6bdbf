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

    /// SASS opcodes of each function of a cuobjdump -sass listing: (name, opcodes in order).
    fn sass_ops(sass: &str) -> Vec<(String, Vec<String>)> {
        sass.split("Function : ")
            .skip(1)
            .map(|f| {
                let name = f.split_whitespace().next().unwrap_or("").to_string();
                let ops = f
                    .lines()
                    .filter_map(|l| {
                        // "        /*0a60*/   @!P5 LDG.E.NA.128.CONSTANT R40, [..] ;"
                        let code = l.trim_start().strip_prefix("/*")?.split_once("*/")?.1;
                        let mut w = code.split_whitespace();
                        let first = w.next()?;
                        let op = if first.starts_with('@') {
                            w.next()?
                        } else {
                            first
                        };
                        Some(op.trim_end_matches(';').to_string())
                    })
                    .collect();
                (name, ops)
            })
            .collect()
    }

    /// What a prologue kernel must issue before `ACQBULK` (`griddepcontrol.wait`), or None
    /// for a kernel without a prologue. `ops` are the opcodes before the wait.
    fn prologue_error(name: &str, before: &[String]) -> Option<String> {
        let count = |f: &dyn Fn(&str) -> bool| before.iter().filter(|o| f(o)).count();
        let weight = count(&|o: &str| o.starts_with("LDG") && o.contains(".NA"));
        let vec_act =
            count(&|o: &str| o.starts_with("LDG") && o.contains(".128") && !o.contains(".NA"));
        if name.starts_with("ds4_gemv_") || name.starts_with("ds4_gate_up_") {
            // Weight tiles stream with ld.global.nc.L1::no_allocate (LDG...NA): RR·U of them per
            // warp (two per row step for Q4_K); activations are 16-byte __ldg loads (no NA).
            let (rr, u) = name.rsplit_once('_')?.1.split_once('x')?;
            let (rr, u): (usize, usize) = (rr.parse().ok()?, u.parse().ok()?);
            let want = rr * u * if name.contains("q4_k") { 2 } else { 1 };
            return (weight != want || vec_act != 0).then(|| {
                format!("{name}: {weight} weight loads (want {want}) and {vec_act} activation loads before ACQBULK")
            });
        }
        if name.starts_with("ds4_moe_gate_up_") {
            // Tables only: the expert ids, hence every weight address, come after the wait.
            let sts = count(&|o: &str| o.starts_with("STS"));
            let tables = !name.contains("iq2_xxs") || sts > 0;
            return (!tables || weight != 0).then(|| {
                format!("{name}: {sts} table stores, {weight} weight loads before ACQBULK")
            });
        }
        if name == "ds4_hc_mix_part" {
            // Its fn slice: 3 rows of 8 halves per thread, nothing else.
            let ldg = count(&|o: &str| o.starts_with("LDG"));
            return (ldg != 3).then(|| format!("{name}: {ldg} loads before ACQBULK (want 3)"));
        }
        None
    }

    /// The weight prologue (README "Weight prologue") as built: each prologue kernel issues its
    /// weight loads (and tables) before `ACQBULK` and no activation load ahead of it. ptxas may
    /// schedule the wait above loads of the same basic block, which would silently undo the
    /// prologue. Needs cuobjdump (+ nvdisasm); skipped without it unless DS4_REQUIRE_NVCC is set
    /// (CI sets it and installs both).
    #[test]
    fn weight_prologue_loads_precede_the_wait() {
        let strict = std::env::var_os("DS4_REQUIRE_NVCC").is_some();
        let skip = |why: String| {
            assert!(!strict, "DS4_REQUIRE_NVCC is set but {why}");
            eprintln!("SKIP: {why}");
        };
        let Some(tool) = cuobjdump() else {
            return skip("no cuobjdump (set CUOBJDUMP, or NVCC with cuobjdump beside it)".into());
        };
        let dir = std::env::temp_dir().join(format!("ds4-sass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut checked = 0;
        let mut bad = Vec::new();
        for module in ["gemv", "fwd"] {
            let Some((_, bin)) = kernels::CUBINS.iter().find(|(n, _)| *n == module) else {
                return skip(format!(
                    "no embedded cubin for {module} (built without nvcc)"
                ));
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
                let err = String::from_utf8_lossy(&out.stderr).to_string();
                return skip(format!("cuobjdump -sass failed: {err}"));
            }
            for (name, ops) in sass_ops(&String::from_utf8_lossy(&out.stdout)) {
                let Some(w) = ops.iter().position(|o| o == "ACQBULK") else {
                    continue;
                };
                if let Some(e) = prologue_error(&name, &ops[..w]) {
                    bad.push(e);
                }
                let deferred = crate::PDL_DEFERRED_KERNELS
                    .iter()
                    .any(|p| name.starts_with(p));
                checked += usize::from(deferred);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            checked > 70,
            "only {checked} prologue kernels found in the cubins"
        );
        assert!(
            bad.is_empty(),
            "weight prologue not as built:\n{}",
            bad.join("\n")
        );
    }
}
