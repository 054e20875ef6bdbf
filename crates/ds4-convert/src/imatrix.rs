//! Importance matrices in llama.cpp's legacy binary `.dat` format, as ds4's collector writes them
//! and `deepseek4-quantize.c` reads them:
//!
//! ```text
//! i32 n_entries
//! n_entries × { i32 name_len, name bytes, i32 ncall, i32 nval, f32 values[nval] }
//! optional: i32 chunks, i32 dataset_len, dataset bytes
//! ```
//!
//! Values are divided by `ncall` when it is positive. Routed-expert entries are either one
//! vector per expert (`NAME.expert.E` / `NAME.expert_E`) or one packed vector of
//! `n_expert × ncols` values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{ConvertError, Result, io_err};

/// A loaded importance matrix.
#[derive(Clone, Debug, Default)]
pub struct Imatrix {
    pub path: PathBuf,
    entries: HashMap<String, Vec<f32>>,
    pub chunks: Option<u32>,
    pub dataset: Option<String>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: String) -> ConvertError {
        ConvertError::Imatrix {
            path: self.path.to_path_buf(),
            reason,
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.err(format!("truncated at offset {} reading {what}", self.pos)));
        }
        let buf: &'a [u8] = self.buf;
        let s = &buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn i32(&mut self, what: &str) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl Imatrix {
    /// Load and validate a legacy `.dat` imatrix.
    pub fn load(path: &Path) -> Result<Imatrix> {
        let buf = std::fs::read(path).map_err(io_err(path))?;
        Imatrix::parse(&buf, path)
    }

    /// Parse the bytes of a legacy `.dat` imatrix (`path` is used in messages only).
    pub fn parse(buf: &[u8], path: &Path) -> Result<Imatrix> {
        let mut r = Reader { buf, pos: 0, path };
        let n = r.i32("entry count")?;
        if n < 1 {
            return Err(r.err(format!("entry count {n} (must be at least 1)")));
        }
        let mut entries = HashMap::new();
        for i in 0..n {
            let len = r.i32("name length")?;
            if !(1..=4096).contains(&len) {
                return Err(r.err(format!("entry {i}: name length {len}")));
            }
            let name = std::str::from_utf8(r.take(len as usize, "name")?)
                .map_err(|_| r.err(format!("entry {i}: name is not UTF-8")))?
                .to_string();
            let ncall = r.i32("call count")?;
            let nval = r.i32("value count")?;
            if nval < 1 {
                return Err(r.err(format!("entry {name:?}: value count {nval}")));
            }
            let nval = nval as usize;
            if nval > (r.buf.len() - r.pos) / 4 {
                return Err(r.err(format!(
                    "entry {name:?}: {nval} values do not fit in the file"
                )));
            }
            let bytes = r.take(nval * 4, "values")?;
            let mut values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if ncall > 0 {
                for v in &mut values {
                    *v /= ncall as f32;
                }
            }
            if let Some(j) = values.iter().position(|v| !v.is_finite() || *v < 0.0) {
                return Err(r.err(format!(
                    "entry {name:?}: value {} at index {j} is not finite and >= 0",
                    values[j]
                )));
            }
            if entries.insert(name.clone(), values).is_some() {
                return Err(r.err(format!("duplicate entry {name:?}")));
            }
        }
        let mut chunks = None;
        let mut dataset = None;
        if r.buf.len() - r.pos >= 8 {
            let c = r.i32("chunk count")?;
            if c > 0 {
                chunks = Some(c as u32);
            }
            let dlen = r.i32("dataset length")?;
            if dlen > 0 && (dlen as usize) <= r.buf.len() - r.pos {
                dataset = std::str::from_utf8(r.take(dlen as usize, "dataset")?)
                    .ok()
                    .map(str::to_string);
            }
        }
        Ok(Imatrix {
            path: path.to_path_buf(),
            entries,
            chunks,
            dataset,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The importance vector (length `ncols`) for a tensor known under any of `names`, for one
    /// expert of a stacked tensor when `expert` is `Some((e, n_expert))`. `Ok(None)` when the
    /// imatrix has no entry; an entry of the wrong length is an error.
    pub fn find(
        &self,
        names: &[&str],
        ncols: usize,
        expert: Option<(usize, usize)>,
    ) -> Result<Option<&[f32]>> {
        let mismatch = |name: &str, got: usize| ConvertError::Imatrix {
            path: self.path.clone(),
            reason: format!("entry {name:?} has {got} values, expected {ncols}"),
        };
        if let Some((e, _)) = expert {
            for sep in [".", "_"] {
                for n in names {
                    let key = format!("{n}.expert{sep}{e}");
                    if let Some(v) = self.entries.get(&key) {
                        if v.len() != ncols {
                            return Err(mismatch(&key, v.len()));
                        }
                        return Ok(Some(v));
                    }
                }
            }
        }
        for n in names {
            if let Some(v) = self.entries.get(*n) {
                if v.len() == ncols {
                    return Ok(Some(v));
                }
                if let Some((e, n_expert)) = expert
                    && v.len() == ncols * n_expert
                {
                    return Ok(Some(&v[e * ncols..(e + 1) * ncols]));
                }
                return Err(mismatch(n, v.len()));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(out: &mut Vec<u8>, name: &str, ncall: i32, vals: &[f32]) {
        out.extend_from_slice(&(name.len() as i32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&ncall.to_le_bytes());
        out.extend_from_slice(&(vals.len() as i32).to_le_bytes());
        for v in vals {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    #[test]
    fn parse_and_find() {
        let mut b = Vec::new();
        b.extend_from_slice(&3i32.to_le_bytes());
        entry(&mut b, "blk.0.attn_q_a.weight", 2, &[2.0, 4.0]);
        entry(
            &mut b,
            "blk.3.ffn_gate_exps.weight",
            0,
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        );
        entry(
            &mut b,
            "blk.3.ffn_down_exps.weight.expert.1",
            1,
            &[7.0, 8.0],
        );
        b.extend_from_slice(&10i32.to_le_bytes());
        b.extend_from_slice(&4i32.to_le_bytes());
        b.extend_from_slice(b"wiki");
        let im = Imatrix::parse(&b, Path::new("x.dat")).unwrap();
        assert_eq!(im.len(), 3);
        assert_eq!(im.chunks, Some(10));
        assert_eq!(im.dataset.as_deref(), Some("wiki"));
        assert_eq!(
            im.find(&["blk.0.attn_q_a.weight"], 2, None).unwrap(),
            Some(&[1.0f32, 2.0][..])
        );
        // Packed per-expert vector.
        assert_eq!(
            im.find(&["blk.3.ffn_gate_exps.weight"], 2, Some((2, 3)))
                .unwrap(),
            Some(&[5.0f32, 6.0][..])
        );
        assert_eq!(
            im.find(&["blk.3.ffn_down_exps.weight"], 2, Some((1, 3)))
                .unwrap(),
            Some(&[7.0f32, 8.0][..])
        );
        assert_eq!(im.find(&["nothing"], 2, None).unwrap(), None);
        assert!(im.find(&["blk.0.attn_q_a.weight"], 3, None).is_err());
    }

    #[test]
    fn corrupt_files_are_refused() {
        let p = Path::new("x.dat");
        assert!(Imatrix::parse(&[], p).is_err());
        assert!(Imatrix::parse(&0i32.to_le_bytes(), p).is_err());
        let mut b = Vec::new();
        b.extend_from_slice(&1i32.to_le_bytes());
        entry(&mut b, "a", 1, &[1.0, 2.0]);
        b.truncate(b.len() - 2);
        assert!(Imatrix::parse(&b, p).is_err());
        let mut b = Vec::new();
        b.extend_from_slice(&1i32.to_le_bytes());
        entry(&mut b, "a", 1, &[f32::NAN]);
        assert!(Imatrix::parse(&b, p).is_err());
        let mut b = Vec::new();
        b.extend_from_slice(&1i32.to_le_bytes());
        b.extend_from_slice(&1i32.to_le_bytes());
        b.push(b'a');
        b.extend_from_slice(&1i32.to_le_bytes());
        b.extend_from_slice(&i32::MAX.to_le_bytes());
        assert!(Imatrix::parse(&b, p).is_err());
    }
}
