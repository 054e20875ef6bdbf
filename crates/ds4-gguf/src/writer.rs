//! GGUF v3 writer. The header (metadata and tensor directory) is fixed up front, then tensor
//! data is streamed in directory order, so files larger than memory can be written.
//!
//! Layout matches gguf-py's `GGUFWriter`: metadata in insertion order, tensor infos in insertion
//! order with offsets packed at the alignment, zero padding to the alignment after the header and
//! after every tensor's data.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use crate::error::{GgufError, Result};
use crate::reader::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_DIMS, TensorInfo,
};
use crate::types::GgmlType;
use crate::value::{MetaType, MetaValue};

/// The header of a file to be written: metadata plus the tensor directory.
#[derive(Clone, Debug, Default)]
pub struct GgufBuilder {
    metadata: Vec<(String, MetaValue)>,
    keys: HashSet<String>,
    tensors: Vec<TensorInfo>,
    names: HashSet<String>,
    alignment: u64,
    next_offset: u64,
}

fn pad(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

impl GgufBuilder {
    /// An empty header with the default alignment (32).
    pub fn new() -> GgufBuilder {
        GgufBuilder {
            alignment: DEFAULT_ALIGNMENT,
            ..Default::default()
        }
    }

    /// Add a metadata record. Adding `general.alignment` (a u32 power of two) sets the alignment;
    /// it must come before the first tensor.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: MetaValue) -> Result<()> {
        let key = key.into();
        if self.keys.contains(&key) {
            return Err(GgufError::Writer(format!("duplicate metadata key {key:?}")));
        }
        check_value(&key, &value, 0)?;
        if key == ALIGNMENT_KEY {
            let a = match value {
                MetaValue::U32(a) if a > 0 && a.is_power_of_two() => a as u64,
                _ => {
                    return Err(GgufError::Writer(format!(
                        "{ALIGNMENT_KEY} must be a u32 power of two"
                    )));
                }
            };
            if !self.tensors.is_empty() {
                return Err(GgufError::Writer(format!(
                    "{ALIGNMENT_KEY} must be set before adding tensors"
                )));
            }
            self.alignment = a;
        }
        self.keys.insert(key.clone());
        self.metadata.push((key, value));
        Ok(())
    }

    /// Add a tensor to the directory; its data is written later, in this order.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
    ) -> Result<()> {
        let name = name.into();
        if self.names.contains(&name) {
            return Err(GgufError::Writer(format!("duplicate tensor name {name:?}")));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS as usize {
            return Err(GgufError::Writer(format!(
                "tensor {name:?}: {} dimensions (must be 1..=8)",
                dims.len()
            )));
        }
        if !dims[0].is_multiple_of(ty.block_size() as u64) {
            return Err(GgufError::BadBlockShape {
                name,
                ne0: dims[0],
                ty,
                block: ty.block_size(),
            });
        }
        let n_bytes = ty
            .tensor_bytes(dims)
            .ok_or_else(|| GgufError::SizeOverflow { name: name.clone() })?;
        let offset = self.next_offset;
        self.next_offset = offset
            .checked_add(pad(n_bytes, self.alignment))
            .ok_or_else(|| GgufError::SizeOverflow { name: name.clone() })?;
        self.names.insert(name.clone());
        self.tensors.push(TensorInfo {
            name,
            dims: dims.to_vec(),
            ty,
            offset,
            n_bytes,
        });
        Ok(())
    }

    /// The directory so far.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The metadata so far.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// Serialise the header, including the padding up to the data section.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&v.meta_type().id().to_le_bytes());
            put_value(&mut out, v);
        }
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
        }
        let padded = pad(out.len() as u64, self.alignment) as usize;
        out.resize(padded, 0);
        out
    }

    /// Total file size once every tensor is written.
    pub fn file_len(&self) -> u64 {
        self.header_bytes().len() as u64 + self.next_offset
    }

    /// Write the header to `w` and return a writer for the tensor data.
    pub fn start<W: Write>(self, mut w: W) -> Result<GgufDataWriter<W>> {
        w.write_all(&self.header_bytes())?;
        Ok(GgufDataWriter {
            w,
            builder: self,
            current: 0,
            written_in_current: 0,
        })
    }

    /// Write a whole file in one go from in-memory tensor data, in directory order.
    pub fn write_file(self, path: impl AsRef<Path>, data: &[&[u8]]) -> Result<()> {
        let path = path.as_ref();
        let f = std::fs::File::create(path).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut dw = self.start(std::io::BufWriter::new(f))?;
        for d in data {
            dw.write_tensor_data(d)?;
        }
        let mut w = dw.finish()?;
        w.flush()?;
        Ok(())
    }
}

/// Streams tensor data after the header. Tensors must be written in directory order; a tensor may
/// be written in several pieces.
pub struct GgufDataWriter<W: Write> {
    w: W,
    builder: GgufBuilder,
    current: usize,
    written_in_current: u64,
}

impl<W: Write> GgufDataWriter<W> {
    /// The name of the tensor the next bytes belong to, if any remain.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.builder.tensors.get(self.current)
    }

    /// Write the whole data of the next tensor, checking its name.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        match self.next_tensor() {
            Some(t) if t.name == name && self.written_in_current == 0 => {}
            Some(t) => {
                return Err(GgufError::Writer(format!(
                    "expected data of tensor {:?} next, got {name:?}",
                    t.name
                )));
            }
            None => {
                return Err(GgufError::Writer(format!(
                    "tensor {name:?} written after the last tensor"
                )));
            }
        }
        let expected = self.builder.tensors[self.current].n_bytes;
        if data.len() as u64 != expected {
            return Err(GgufError::Writer(format!(
                "tensor {name:?}: {} bytes given, {expected} expected",
                data.len()
            )));
        }
        self.write_tensor_data(data)
    }

    /// Write the next bytes of tensor data; padding is inserted when a tensor completes.
    pub fn write_tensor_data(&mut self, mut data: &[u8]) -> Result<()> {
        // Zero-byte tensors complete immediately.
        self.skip_empty()?;
        while !data.is_empty() {
            let Some(t) = self.builder.tensors.get(self.current) else {
                return Err(GgufError::Writer(
                    "more tensor data than the directory declares".to_string(),
                ));
            };
            let left = t.n_bytes - self.written_in_current;
            let n = left.min(data.len() as u64) as usize;
            self.w.write_all(&data[..n])?;
            self.written_in_current += n as u64;
            data = &data[n..];
            if self.written_in_current == t.n_bytes {
                let padding = pad(t.n_bytes, self.builder.alignment) - t.n_bytes;
                self.w.write_all(&vec![0u8; padding as usize])?;
                self.current += 1;
                self.written_in_current = 0;
                self.skip_empty()?;
            }
        }
        Ok(())
    }

    fn skip_empty(&mut self) -> Result<()> {
        while self
            .builder
            .tensors
            .get(self.current)
            .is_some_and(|t| t.n_bytes == 0 && self.written_in_current == 0)
        {
            self.current += 1;
        }
        Ok(())
    }

    /// Check that every tensor was written and return the inner writer.
    pub fn finish(mut self) -> Result<W> {
        self.skip_empty()?;
        if let Some(t) = self.builder.tensors.get(self.current) {
            return Err(GgufError::Writer(format!(
                "data of tensor {:?} (and {} more) not written",
                t.name,
                self.builder.tensors.len() - self.current - 1
            )));
        }
        Ok(self.w)
    }
}

fn check_value(key: &str, v: &MetaValue, depth: usize) -> Result<()> {
    if let MetaValue::Array(t, items) = v {
        if depth >= crate::reader::MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep {
                key: key.to_string(),
                max: crate::reader::MAX_ARRAY_DEPTH,
            });
        }
        for item in items {
            if item.meta_type() != *t {
                return Err(GgufError::Writer(format!(
                    "metadata key {key:?}: array of {t} holds a {}",
                    item.meta_type()
                )));
            }
            check_value(key, item, depth + 1)?;
        }
        if *t == MetaType::Array && items.is_empty() {
            // Fine: an empty array of arrays.
        }
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(t, items) => {
            out.extend_from_slice(&t.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}
