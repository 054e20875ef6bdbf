//! Quantize a raw little-endian f32 file: `quantize_file TYPE NE0 IN.f32 OUT.bin [IMPORTANCE.f32]`.
//! Used by `scripts/quant_fixtures.py` to obtain this crate's quantizer output.

use std::process::ExitCode;

use ds4_quant::{GgmlType, quantize};

fn read_f32(path: &str) -> Result<Vec<f32>, String> {
    let b = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    if b.len() % 4 != 0 {
        return Err(format!("{path}: length {} is not a multiple of 4", b.len()));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn run(args: &[String]) -> Result<(), String> {
    if args.len() < 4 {
        return Err("usage: quantize_file TYPE NE0 IN.f32 OUT.bin [IMPORTANCE.f32]".into());
    }
    let ty = GgmlType::from_name(&args[0]).ok_or_else(|| format!("unknown type {}", args[0]))?;
    let ne0: usize = args[1].parse().map_err(|e| format!("NE0: {e}"))?;
    let x = read_f32(&args[2])?;
    let imp = match args.get(4) {
        Some(p) => Some(read_f32(p)?),
        None => None,
    };
    let q = quantize(ty, &x, ne0, imp.as_deref()).map_err(|e| e.to_string())?;
    std::fs::write(&args[3], q).map_err(|e| format!("{}: {e}", args[3]))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
