//! Shared test helpers: a deterministic RNG and the fixture-file reader.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

/// SplitMix64 with Box-Muller normals (deterministic, no dependencies).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// RMS(a - b) / RMS(b), in f64.
pub fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den).sqrt()
}

pub enum Array {
    U8(Vec<u8>),
    F32(Vec<f32>),
    U32(Vec<u32>),
}

/// A fixture file written by scripts/quant_fixtures.py.
pub struct Fixture(pub HashMap<String, Array>);

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path = data_dir().join(name);
        let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&b[..8], b"DS4QFIX1", "{name}: magic");
        let mut p = 8;
        let u32_at = |p: &mut usize| {
            let v = u32::from_le_bytes(b[*p..*p + 4].try_into().unwrap());
            *p += 4;
            v
        };
        let count = u32_at(&mut p);
        let mut map = HashMap::new();
        for _ in 0..count {
            let nl = u32_at(&mut p) as usize;
            let key = String::from_utf8(b[p..p + nl].to_vec()).unwrap();
            p += nl;
            let dt = b[p];
            p += 1;
            let n = u32_at(&mut p) as usize;
            let arr = match dt {
                0 => {
                    let v = b[p..p + n].to_vec();
                    p += n;
                    Array::U8(v)
                }
                1 => {
                    let v = b[p..p + 4 * n]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    p += 4 * n;
                    Array::F32(v)
                }
                2 => {
                    let v = b[p..p + 4 * n]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    p += 4 * n;
                    Array::U32(v)
                }
                _ => panic!("{name}: bad dtype {dt}"),
            };
            map.insert(key, arr);
        }
        assert_eq!(p, b.len(), "{name}: trailing bytes");
        Fixture(map)
    }
    pub fn u8s(&self, k: &str) -> &[u8] {
        match self.0.get(k) {
            Some(Array::U8(v)) => v,
            _ => panic!("missing u8 array {k}"),
        }
    }
    pub fn f32s(&self, k: &str) -> &[f32] {
        match self.0.get(k) {
            Some(Array::F32(v)) => v,
            _ => panic!("missing f32 array {k}"),
        }
    }
    pub fn opt_f32s(&self, k: &str) -> Option<&[f32]> {
        match self.0.get(k) {
            Some(Array::F32(v)) => Some(v),
            _ => None,
        }
    }
    pub fn u32s(&self, k: &str) -> &[u32] {
        match self.0.get(k) {
            Some(Array::U32(v)) => v,
            _ => panic!("missing u32 array {k}"),
        }
    }
}

/// Bitwise equality, treating any two NaNs as equal.
pub fn same_f32(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

/// Equal, or adjacent f32 values (one rounding of two f64 sums that differ only in the order of
/// their additions can land on either side of a rounding boundary).
#[allow(dead_code)]
pub fn within_1ulp(a: f32, b: f32) -> bool {
    if same_f32(a, b) || a == b {
        return true;
    }
    if a.is_nan() || b.is_nan() || a.signum() != b.signum() {
        return false;
    }
    a.to_bits().abs_diff(b.to_bits()) <= 1
}
