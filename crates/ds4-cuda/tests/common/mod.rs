//! Helpers shared by the GPU kernel tests (gemv.rs, tc.rs).
#![allow(dead_code)]

/// splitmix64 with uniform and Box–Muller normal draws.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unif().max(1e-300);
        let u2 = self.unif();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// `rows_total` random rows of `cols` weights (normal, scale 1/√cols) quantized to `ty`: GGUF bytes.
pub fn make_weight(
    rng: &mut Rng,
    ty: ds4_gguf::GgmlType,
    cols: usize,
    rows_total: usize,
) -> Vec<u8> {
    let w = rng.vec(cols * rows_total, 1.0 / (cols as f32).sqrt());
    ds4_quant::quantize(ty, &w, cols, None).expect("quantize")
}

/// `n_mat` random matrices of `rows` × `cols` ([`make_weight`]): their GGUF bytes and the device
/// upload.
pub fn upload_random(
    g: &ds4_cuda::gemv::Gemv,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    rng: &mut Rng,
    ty: ds4_gguf::GgmlType,
    cols: usize,
    rows: usize,
    n_mat: usize,
) -> (Vec<u8>, ds4_cuda::gemv::DevWeight) {
    let b = make_weight(rng, ty, cols, rows * n_mat);
    let w = g.upload(stream, ty, cols, rows, n_mat, &b).unwrap();
    (b, w)
}
