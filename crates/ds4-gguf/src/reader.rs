//! GGUF v3 parser. Every count, length and offset read from the file is bounded by the bytes that
//! remain before anything is allocated, so a hostile file can neither panic the parser nor make it
//! allocate more than a small multiple of the file's own size.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::error::{GgufError, Result};
use crate::types::GgmlType;
use crate::value::{MetaType, MetaValue};

/// "GGUF" as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// The only version this crate reads and writes.
pub const GGUF_VERSION: u32 = 3;
/// Alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Key that sets the tensor-data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Deepest array nesting accepted.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most tensor dimensions accepted.
pub const MAX_DIMS: u32 = 8;

/// One tensor's directory entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, `dims[0]` fastest-varying (GGUF `ne` order).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The parsed header of a GGUF file: everything but the tensor data.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

enum Backing {
    Mmap(memmap2::Mmap),
    Bytes(Arc<[u8]>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Bytes(b) => b,
        }
    }
}

/// An open GGUF file: the parsed header plus zero-copy access to the tensor data.
pub struct Gguf {
    header: GgufHeader,
    backing: Backing,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.header.version)
            .field("n_kv", &self.header.metadata.len())
            .field("n_tensors", &self.header.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Memory-map and parse a file. The file must not be modified while it is open.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; GGUF files are treated as immutable while open
        // (the same contract as ds4 and llama.cpp). Every access is bounds-checked against
        // the mapping's length.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let header = parse_header(&mmap)?;
        Ok(Gguf {
            header,
            backing: Backing::Mmap(mmap),
        })
    }

    /// Parse a file held in memory.
    pub fn from_bytes(bytes: impl Into<Arc<[u8]>>) -> Result<Gguf> {
        let bytes: Arc<[u8]> = bytes.into();
        let header = parse_header(&bytes)?;
        Ok(Gguf {
            header,
            backing: Backing::Bytes(bytes),
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// Format version (always 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// Tensor-data alignment.
    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.header.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.header
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// One tensor's directory entry.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// One tensor's bytes (zero-copy).
    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        self.tensor_info(name).map(|t| self.data_of(t))
    }

    /// The bytes of a tensor from this file's directory.
    pub fn data_of(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + info.offset) as usize;
        let end = start + info.n_bytes as usize;
        // Bounds were validated at parse time for every entry of the directory; a foreign
        // `TensorInfo` that does not fit yields an empty slice rather than a panic.
        self.backing.bytes().get(start..end).unwrap_or(&[])
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.backing.bytes().len() as u64
    }

    /// Sum of all tensors' sizes.
    pub fn tensor_bytes_total(&self) -> u64 {
        self.header.tensors.iter().map(|t| t.n_bytes).sum()
    }

    /// Advise the kernel that the whole mapping will be needed soon (no-op for in-memory files).
    pub fn advise_willneed(&self) {
        if let Backing::Mmap(m) = &self.backing {
            let _ = m.advise(memmap2::Advice::WillNeed);
        }
    }

    /// Bring the whole file into memory (ds4's `--warm-weights`): advise `WILLNEED`, then read
    /// one byte of every 4 KiB page (volatile reads, on a few threads so the page faults
    /// overlap). Returns the bytes covered (the file length). Nothing is copied; an in-memory
    /// file is simply read.
    pub fn warm_pages(&self) -> u64 {
        const PAGE: usize = 4096;
        self.advise_willneed();
        let bytes = self.backing.bytes();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        // Whole pages per thread, so no page is touched twice.
        let per = bytes.len().div_ceil(threads).div_ceil(PAGE).max(1) * PAGE;
        let touch = |part: &[u8]| {
            let mut acc = 0u8;
            for i in (0..part.len()).step_by(PAGE) {
                // SAFETY: `i < part.len()`, so the pointer is in bounds of a live slice; a
                // volatile read keeps the page fault from being optimized away.
                acc ^= unsafe { std::ptr::read_volatile(part.as_ptr().add(i)) };
            }
            acc
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = bytes
                .chunks(per)
                .map(|part| s.spawn(move || touch(part)))
                .collect();
            for h in handles {
                let _ = std::hint::black_box(h.join());
            }
        });
        bytes.len() as u64
    }
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len_at = self.pos as u64;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufError::Truncated {
                what: format!("{} (string of {len} bytes)", what()),
                offset: len_at,
                need: len,
                have: self.remaining(),
            });
        }
        let at = self.pos as u64;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 { offset: at })
    }

    /// Read a count and check that `count * min_each` bytes can still follow.
    fn count(&mut self, min_each: u64, what: &dyn Fn() -> String) -> Result<u64> {
        let at = self.pos as u64;
        let count = self.u64(what)?;
        let remaining = self.remaining();
        if count
            .checked_mul(min_each)
            .is_none_or(|need| need > remaining)
        {
            return Err(GgufError::CountTooLarge {
                what: what(),
                offset: at,
                count,
                remaining,
            });
        }
        Ok(count)
    }

    fn value(&mut self, ty: MetaType, key: &str, depth: usize) -> Result<MetaValue> {
        let what = || format!("value of metadata key {key:?}");
        Ok(match ty {
            MetaType::U8 => MetaValue::U8(self.array::<1>(&what)?[0]),
            MetaType::I8 => MetaValue::I8(self.array::<1>(&what)?[0] as i8),
            MetaType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            MetaType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            MetaType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            MetaType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            MetaType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            MetaType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            MetaType::Bool => {
                let at = self.pos as u64;
                match self.array::<1>(&what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(GgufError::BadKeyValue {
                            key: key.to_string(),
                            reason: format!("bool byte {b} at offset {at} is neither 0 nor 1"),
                        });
                    }
                }
            }
            MetaType::String => MetaValue::String(self.string(&what)?),
            MetaType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep {
                        key: key.to_string(),
                        max: MAX_ARRAY_DEPTH,
                    });
                }
                let at = self.pos as u64;
                let item_id = self.u32(&what)?;
                let item_ty = MetaType::from_id(item_id).ok_or(GgufError::UnknownValueType {
                    key: key.to_string(),
                    offset: at,
                    type_id: item_id,
                })?;
                let what_arr = || format!("array items of metadata key {key:?}");
                let n = self.count(item_ty.min_encoded_bytes(), &what_arr)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                MetaValue::Array(item_ty, items)
            }
        })
    }
}

/// Parse the header of a GGUF file held in `buf` (the whole file), validating the tensor
/// directory against the file size. This is the fuzz entry point.
pub fn parse_header(buf: &[u8]) -> Result<GgufHeader> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.u32(&|| "magic".to_string())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(&|| "version".to_string())?;
    if version != GGUF_VERSION {
        return Err(GgufError::UnsupportedVersion { found: version });
    }
    let n_tensors_raw = c.u64(&|| "tensor count".to_string())?;
    let n_kv_raw = c.u64(&|| "metadata count".to_string())?;
    // A metadata record is at least key length (8) + type (4) + 1 byte; a tensor info at least
    // name length (8) + ndim (4) + one dim (8) + type (4) + offset (8).
    let remaining = c.remaining();
    for (what, count, min_each, at) in [
        ("metadata", n_kv_raw, 13u64, 16u64),
        ("tensor", n_tensors_raw, 32u64, 8u64),
    ] {
        if count.checked_mul(min_each).is_none_or(|n| n > remaining) {
            return Err(GgufError::CountTooLarge {
                what: what.to_string(),
                offset: at,
                count,
                remaining,
            });
        }
    }

    let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(n_kv_raw as usize);
    let mut seen_keys: HashSet<String> = HashSet::new();
    for i in 0..n_kv_raw {
        let key_at = c.pos as u64;
        let key = c.string(&|| format!("key of metadata record {i}"))?;
        let ty_at = c.pos as u64;
        let ty_id = c.u32(&|| format!("value type of metadata key {key:?}"))?;
        let ty = MetaType::from_id(ty_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.clone(),
            offset: ty_at,
            type_id: ty_id,
        })?;
        let value = c.value(ty, &key, 0)?;
        if !seen_keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey {
                key,
                offset: key_at,
            });
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::U32(a))) => {
            let a = *a as u64;
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufError::BadKeyValue {
                    key: ALIGNMENT_KEY.to_string(),
                    reason: format!("alignment {a} is not a non-zero power of two"),
                });
            }
            a
        }
        Some((_, v)) => {
            return Err(GgufError::WrongKeyType {
                key: ALIGNMENT_KEY.to_string(),
                expected: "u32".to_string(),
                found: v.meta_type(),
            });
        }
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors_raw as usize);
    let mut seen_names: HashSet<String> = HashSet::new();
    for i in 0..n_tensors_raw {
        let info_at = c.pos as u64;
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let ndim_at = c.pos as u64;
        let ndim = c.u32(&|| format!("dimension count of tensor {name:?}"))?;
        if ndim == 0 || ndim > MAX_DIMS {
            return Err(GgufError::BadDimCount {
                name,
                offset: ndim_at,
                ndim,
            });
        }
        let mut dims = Vec::with_capacity(ndim as usize);
        for _ in 0..ndim {
            dims.push(c.u64(&|| format!("dimensions of tensor {name:?}"))?);
        }
        let ty_at = c.pos as u64;
        let ty_id = c.u32(&|| format!("type of tensor {name:?}"))?;
        let ty = GgmlType::from_id(ty_id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            offset: ty_at,
            type_id: ty_id,
        })?;
        let offset = c.u64(&|| format!("data offset of tensor {name:?}"))?;
        if !dims[0].is_multiple_of(ty.block_size() as u64) {
            return Err(GgufError::BadBlockShape {
                name,
                ne0: dims[0],
                ty,
                block: ty.block_size(),
            });
        }
        let n_bytes = ty
            .tensor_bytes(&dims)
            .ok_or_else(|| GgufError::SizeOverflow { name: name.clone() })?;
        if !seen_names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor {
                name,
                offset: info_at,
            });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_bytes,
        });
    }

    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor {
                name: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(_), Some(e)) if e <= file_len => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                });
            }
        }
    }
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        if w[0].offset + w[0].n_bytes > w[1].offset && w[0].n_bytes > 0 && w[1].n_bytes > 0 {
            return Err(GgufError::TensorsOverlap {
                a: w[0].name.clone(),
                b: w[1].name.clone(),
            });
        }
    }

    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}
