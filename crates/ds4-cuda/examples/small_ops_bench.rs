//! Per-kernel timing of the chunk (prefill) small memory-bound ops (`GpuOps::bench_small_ops`)
//! at DeepSeek V4 Flash dims: `small_ops_bench [TOKENS] [REPS]` (default 2048 tokens, 20 reps).
//! Prints one `name<TAB>µs` line per kernel (median of REPS launches, CUDA events).

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("small_ops_bench needs --features cuda");
}

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use ds4_cuda::optest::{GpuOps, SmallOpsShape};
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(2048), |s| s.parse())?;
    let reps: usize = args.get(2).map_or(Ok(20), |s| s.parse())?;
    let info = ds4_cuda::probe(0)?;
    println!("# device: {} ({} tokens, median of {reps})", info.name, n);
    let g = GpuOps::new(0)?;
    let s = SmallOpsShape {
        n,
        hc: 4,
        e: 4096,
        nh: 64,
        hd: 512,
        n_rot: 64,
        ql: 1024,
    };
    for (name, us) in g.bench_small_ops(s, reps)? {
        println!("{name}\t{us:.1}");
    }
    Ok(())
}
