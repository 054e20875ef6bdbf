//! Minimal `.npy` (format 1.0, little-endian, C order) reading and writing for float32,
//! float64, int32, int16 and int8 arrays, plus log-probability helpers.

use std::io::{Read, Write};
use std::path::Path;

/// Errors reading `.npy` data.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a .npy file (bad magic)")]
    BadMagic,
    #[error("unsupported .npy version {0}.{1}")]
    BadVersion(u8, u8),
    #[error("bad .npy header: {0}")]
    BadHeader(String),
    #[error("unsupported dtype {0:?} (supported: <f4 <f8 <f2 <i4 <i2 |i1)")]
    BadDtype(String),
    #[error("Fortran-order arrays are not supported")]
    FortranOrder,
    #[error("data has {got} bytes, the header says {want}")]
    BadLength { want: usize, got: usize },
}

/// The data of an array.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I16(Vec<i16>),
    I8(Vec<i8>),
}

/// An array: shape plus data.
#[derive(Clone, Debug, PartialEq)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl Npy {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The values as f32 (f64 rounded), or `None` for integer data.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        match &self.data {
            NpyData::F32(v) => Some(v.clone()),
            NpyData::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }
    /// The values as f64 (any float data).
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        match &self.data {
            NpyData::F32(v) => Some(v.iter().map(|&x| x as f64).collect()),
            NpyData::F64(v) => Some(v.clone()),
            _ => None,
        }
    }
    /// The values as i64 (any integer data).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        match &self.data {
            NpyData::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            NpyData::I16(v) => Some(v.iter().map(|&x| x as i64).collect()),
            NpyData::I8(v) => Some(v.iter().map(|&x| x as i64).collect()),
            _ => None,
        }
    }
}

/// Element types that can be written.
pub trait NpyElem: Copy {
    const DESCR: &'static str;
    fn put(self, out: &mut Vec<u8>);
}

impl NpyElem for f32 {
    const DESCR: &'static str = "<f4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl NpyElem for f64 {
    const DESCR: &'static str = "<f8";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl NpyElem for i32 {
    const DESCR: &'static str = "<i4";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl NpyElem for i16 {
    const DESCR: &'static str = "<i2";
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}
impl NpyElem for i8 {
    const DESCR: &'static str = "|i1";
    fn put(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
}

/// Serialise an array (format 1.0). Panics never; `shape` must describe `data.len()`
/// elements, otherwise an `InvalidInput` error is returned.
pub fn to_bytes<T: NpyElem>(shape: &[usize], data: &[T]) -> std::io::Result<Vec<u8>> {
    if shape.iter().product::<usize>() != data.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("shape {shape:?} does not hold {} elements", data.len()),
        ));
    }
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_s}, }}",
        T::DESCR
    );
    // Pad so that magic(6) + version(2) + len(2) + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat(total.div_ceil(64) * 64 - total));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 8);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in data {
        v.put(&mut out);
    }
    Ok(out)
}

/// Write an array to a file.
pub fn write<T: NpyElem>(
    path: impl AsRef<Path>,
    shape: &[usize],
    data: &[T],
) -> std::io::Result<()> {
    let bytes = to_bytes(shape, data)?;
    let mut f = std::fs::File::create(path)?;
    f.write_all(&bytes)
}

/// Read an array from a file.
pub fn read(path: impl AsRef<Path>) -> Result<Npy, NpyError> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut buf)?;
    from_bytes(&buf)
}

fn field<'a>(h: &'a str, key: &str) -> Result<&'a str, NpyError> {
    let k = format!("'{key}':");
    let i = h
        .find(&k)
        .ok_or_else(|| NpyError::BadHeader(format!("no {key}")))?;
    Ok(h[i + k.len()..].trim_start())
}

/// Parse an array from bytes.
pub fn from_bytes(b: &[u8]) -> Result<Npy, NpyError> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(NpyError::BadMagic);
    }
    let (major, minor) = (b[6], b[7]);
    let (hlen, hstart) = match major {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10usize),
        2 | 3 => {
            if b.len() < 12 {
                return Err(NpyError::BadMagic);
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        _ => return Err(NpyError::BadVersion(major, minor)),
    };
    let hend = hstart
        .checked_add(hlen)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| NpyError::BadHeader("header longer than the file".into()))?;
    let h = std::str::from_utf8(&b[hstart..hend])
        .map_err(|_| NpyError::BadHeader("not UTF-8".into()))?;
    let descr = field(h, "descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| NpyError::BadHeader("descr".into()))?;
    if field(h, "fortran_order")?.starts_with("True") {
        return Err(NpyError::FortranOrder);
    }
    let sh = field(h, "shape")?;
    let sh = sh
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| NpyError::BadHeader("shape".into()))?;
    let mut shape = Vec::new();
    for part in sh.split(',') {
        let p = part.trim();
        if p.is_empty() {
            continue;
        }
        shape.push(
            p.parse::<usize>()
                .map_err(|_| NpyError::BadHeader(format!("shape entry {p:?}")))?,
        );
    }
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| NpyError::BadHeader("shape overflows".into()))?;
    let body = &b[hend..];
    let esize = match descr {
        "<f4" | "<i4" => 4,
        "<f8" => 8,
        "<i2" | "<f2" => 2,
        "|i1" | "<i1" => 1,
        d => return Err(NpyError::BadDtype(d.into())),
    };
    let want = n
        .checked_mul(esize)
        .ok_or_else(|| NpyError::BadHeader("size overflows".into()))?;
    if body.len() != want {
        return Err(NpyError::BadLength {
            want,
            got: body.len(),
        });
    }
    let data = match descr {
        "<f4" => NpyData::F32(
            body.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        "<f8" => NpyData::F64(
            body.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        "<i4" => NpyData::I32(
            body.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        // f16 (numpy float16 dumps) widens exactly to f32.
        "<f2" => NpyData::F32(
            body.chunks_exact(2)
                .map(|c| ds4_quant::fp::f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        "<i2" => NpyData::I16(
            body.chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        _ => NpyData::I8(body.iter().map(|&x| x as i8).collect()),
    };
    Ok(Npy { shape, data })
}

/// `log Σ exp(logits)` in f64 (non-finite logits are skipped).
pub fn logsumexp(logits: &[f32]) -> f64 {
    let mx = logits
        .iter()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    if !mx.is_finite() {
        return f64::NEG_INFINITY;
    }
    let s: f64 = logits
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| (v as f64 - mx).exp())
        .sum();
    mx + s.ln()
}

/// One entry of [`top_logprobs`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopLogprob {
    pub id: u32,
    pub logit: f32,
    /// `logit − logsumexp(all logits)`, in f64.
    pub logprob: f64,
}

/// The `k` largest logits (descending, lower id first on ties) with their log-probabilities.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<TopLogprob> {
    let lse = logsumexp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize].is_finite())
        .collect();
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter()
        .map(|i| TopLogprob {
            id: i,
            logit: logits[i as usize],
            logprob: logits[i as usize] as f64 - lse,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_dtypes() {
        let b = to_bytes(&[2, 3], &[1.5f32, -2.0, 0.0, 3.25, 1e-8, 7.0]).unwrap();
        assert_eq!((b.len() - 24) % 64, 0, "header padded to 64");
        let a = from_bytes(&b).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, NpyData::F32(vec![1.5, -2.0, 0.0, 3.25, 1e-8, 7.0]));
        let a = from_bytes(&to_bytes(&[2], &[1.0f64, -1.0]).unwrap()).unwrap();
        assert_eq!(a.data, NpyData::F64(vec![1.0, -1.0]));
        let a = from_bytes(&to_bytes(&[3], &[1i32, -5, 9]).unwrap()).unwrap();
        assert_eq!(a.data, NpyData::I32(vec![1, -5, 9]));
        let a = from_bytes(&to_bytes(&[1, 2], &[-1i16, 300]).unwrap()).unwrap();
        assert_eq!(
            (a.shape.clone(), a.data),
            (vec![1, 2], NpyData::I16(vec![-1, 300]))
        );
        let a = from_bytes(&to_bytes(&[2], &[-1i8, 7]).unwrap()).unwrap();
        assert_eq!(a.data, NpyData::I8(vec![-1, 7]));
        assert!(to_bytes(&[4], &[1.0f32]).is_err());
        // float16 is read, widened exactly to f32 (1.5, -2, 65504, -0, inf).
        let mut f16 = to_bytes(&[5], &[0i16; 5]).unwrap();
        let h = f16.len() - 10;
        let descr = f16.windows(4).position(|w| w == b"<i2'").unwrap();
        f16[descr..descr + 3].copy_from_slice(b"<f2");
        for (i, v) in [0x3e00u16, 0xc000, 0x7bff, 0x8000, 0x7c00]
            .iter()
            .enumerate()
        {
            f16[h + 2 * i..h + 2 * i + 2].copy_from_slice(&v.to_le_bytes());
        }
        let a = from_bytes(&f16).unwrap();
        let NpyData::F32(v) = a.data else {
            panic!("f16 not widened to f32")
        };
        assert_eq!(&v[..4], &[1.5, -2.0, 65504.0, -0.0]);
        assert!(v[3].is_sign_negative() && v[4] == f32::INFINITY);
    }

    #[test]
    fn corrupt_inputs_are_errors() {
        let good = to_bytes(&[4], &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        for cut in 0..good.len() {
            assert!(from_bytes(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(matches!(from_bytes(&bad), Err(NpyError::BadMagic)));
    }

    #[test]
    fn logprobs() {
        let l = [0.0f32, (2.0f32).ln(), f32::NEG_INFINITY, (2.0f32).ln()];
        let lse = logsumexp(&l);
        assert!((lse - 5f64.ln()).abs() < 1e-7);
        let t = top_logprobs(&l, 2);
        assert_eq!((t[0].id, t[1].id), (1, 3));
        assert!((t[0].logprob - (0.4f64).ln()).abs() < 1e-7);
    }
}
