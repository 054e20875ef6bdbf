//! Shared by the benchmark examples (gemv_bench, tc_bench): the tests' splitmix RNG and random GGUF
//! weight tensors with small finite scale fields.

use ds4_gguf::GgmlType;

/// The GPU tests' splitmix64 RNG (one definition for tests and benchmarks).
#[path = "../../tests/common/mod.rs"]
mod test_common;
pub use test_common::Rng;

/// Random GGUF bytes with sane f16 scale fields (random payload bytes; scales set to
/// small finite halves so that no NaN/Inf arithmetic is timed).
pub fn random_tensor(
    rng: &mut Rng,
    ty: GgmlType,
    cols: usize,
    rows: usize,
    n_mat: usize,
) -> Vec<u8> {
    let n = ds4_cuda::gemv::gguf_bytes(ty, cols, rows, n_mat).expect("shape");
    let mut v = vec![0u8; n];
    for c in v.chunks_mut(8) {
        let r = rng.next().to_le_bytes();
        c.copy_from_slice(&r[..c.len()]);
    }
    let half = |rng: &mut Rng| -> [u8; 2] {
        // exponent 0x0c..0x0f (~2^-3..2^0 · 2^-12 region), random mantissa and sign
        let m = (rng.next() & 0x83ff) as u16 | ((0x0c + (rng.next() % 4) as u16) << 10);
        m.to_le_bytes()
    };
    match ty {
        GgmlType::F16 => {
            for c in v.chunks_mut(2) {
                c.copy_from_slice(&half(rng));
            }
        }
        GgmlType::BF16 => {
            for c in v.chunks_mut(2) {
                let b = (0x3c00u16 | (rng.next() & 0x807f) as u16).to_le_bytes();
                c.copy_from_slice(&b);
            }
        }
        GgmlType::F32 => {
            for c in v.chunks_mut(4) {
                let f = ((rng.next() % 2000) as f32 - 1000.0) * 1e-4;
                c.copy_from_slice(&f.to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            for b in v.chunks_mut(34) {
                b[..2].copy_from_slice(&half(rng));
            }
        }
        GgmlType::Q2_K => {
            for b in v.chunks_mut(84) {
                b[80..82].copy_from_slice(&half(rng));
                b[82..84].copy_from_slice(&half(rng));
            }
        }
        GgmlType::Q4_K => {
            for b in v.chunks_mut(144) {
                b[..2].copy_from_slice(&half(rng));
                b[2..4].copy_from_slice(&half(rng));
            }
        }
        GgmlType::IQ2_XXS => {
            for b in v.chunks_mut(66) {
                b[..2].copy_from_slice(&half(rng));
            }
        }
        _ => {}
    }
    v
}
