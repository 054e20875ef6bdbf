//! GGUF metadata values.

/// The type tag of a metadata value, as stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MetaType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl MetaType {
    /// The type with this tag, or `None` for an unknown tag.
    pub fn from_id(id: u32) -> Option<MetaType> {
        use MetaType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The numeric tag.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The smallest number of bytes one value of this type occupies in a file (used to bound
    /// counts read from untrusted input before allocating).
    pub fn min_encoded_bytes(self) -> u64 {
        use MetaType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    /// Lower-case name used in messages ("u32", "string", ...).
    pub fn name(self) -> &'static str {
        use MetaType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

impl std::fmt::Display for MetaType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value. Arrays carry their declared item type so that an empty array round-trips.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaType, Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value's type tag.
    pub fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::String(_) => MetaType::String,
            MetaValue::Array(..) => MetaType::Array,
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
        }
    }

    /// An array of strings.
    pub fn string_array<I, S>(items: I) -> MetaValue
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        MetaValue::Array(
            MetaType::String,
            items
                .into_iter()
                .map(|s| MetaValue::String(s.into()))
                .collect(),
        )
    }

    /// An array of u32.
    pub fn u32_array(items: &[u32]) -> MetaValue {
        MetaValue::Array(
            MetaType::U32,
            items.iter().map(|&v| MetaValue::U32(v)).collect(),
        )
    }

    /// An array of i32.
    pub fn i32_array(items: &[i32]) -> MetaValue {
        MetaValue::Array(
            MetaType::I32,
            items.iter().map(|&v| MetaValue::I32(v)).collect(),
        )
    }

    /// An array of f32.
    pub fn f32_array(items: &[f32]) -> MetaValue {
        MetaValue::Array(
            MetaType::F32,
            items.iter().map(|&v| MetaValue::F32(v)).collect(),
        )
    }

    /// Exactly a u32.
    pub fn as_u32(&self) -> Option<u32> {
        match *self {
            MetaValue::U32(v) => Some(v),
            _ => None,
        }
    }

    /// Any integer type whose value fits in u64 (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type as i64 (u64 values above i64::MAX give `None`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().map(|v| v as i64).or(match *self {
                MetaValue::I8(v) => Some(v as i64),
                MetaValue::I16(v) => Some(v as i64),
                MetaValue::I32(v) => Some(v as i64),
                _ => None,
            }),
        }
    }

    /// Any numeric type as f64 (floats and integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array's declared item type and items.
    pub fn as_array(&self) -> Option<(MetaType, &[MetaValue])> {
        match self {
            MetaValue::Array(t, items) => Some((*t, items)),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn as_string_array(&self) -> Option<Vec<&str>> {
        let (_, items) = self.as_array()?;
        items.iter().map(|v| v.as_str()).collect()
    }

    /// An array of integers, each converted to i64.
    pub fn as_i64_array(&self) -> Option<Vec<i64>> {
        let (_, items) = self.as_array()?;
        items.iter().map(|v| v.as_i64()).collect()
    }

    /// An array of numbers, each converted to f64.
    pub fn as_f64_array(&self) -> Option<Vec<f64>> {
        let (_, items) = self.as_array()?;
        items.iter().map(|v| v.as_f64()).collect()
    }

    /// A short human-readable rendering (arrays abbreviated), for `inspect`.
    pub fn display_short(&self, max_items: usize) -> String {
        match self {
            MetaValue::String(s) => format!("{s:?}"),
            MetaValue::Array(t, items) => {
                let shown: Vec<String> = items
                    .iter()
                    .take(max_items)
                    .map(|v| v.display_short(max_items))
                    .collect();
                let more = if items.len() > max_items {
                    format!(", ... ({} items)", items.len())
                } else {
                    String::new()
                };
                format!("[{t}; {}]{}", shown.join(", "), more)
            }
            MetaValue::U8(v) => v.to_string(),
            MetaValue::I8(v) => v.to_string(),
            MetaValue::U16(v) => v.to_string(),
            MetaValue::I16(v) => v.to_string(),
            MetaValue::U32(v) => v.to_string(),
            MetaValue::I32(v) => v.to_string(),
            MetaValue::U64(v) => v.to_string(),
            MetaValue::I64(v) => v.to_string(),
            MetaValue::F32(v) => v.to_string(),
            MetaValue::F64(v) => v.to_string(),
            MetaValue::Bool(v) => v.to_string(),
        }
    }

    /// JSON form (arrays in full), for `inspect --json`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            MetaValue::String(s) => J::String(s.clone()),
            MetaValue::Array(_, items) => J::Array(items.iter().map(|v| v.to_json()).collect()),
            MetaValue::Bool(v) => J::Bool(*v),
            MetaValue::F32(v) => serde_json::Number::from_f64(*v as f64)
                .map(J::Number)
                .unwrap_or(J::Null),
            MetaValue::F64(v) => serde_json::Number::from_f64(*v)
                .map(J::Number)
                .unwrap_or(J::Null),
            MetaValue::U64(v) => J::from(*v),
            MetaValue::I64(v) => J::from(*v),
            other => other.as_i64().map(J::from).unwrap_or(J::Null),
        }
    }
}
