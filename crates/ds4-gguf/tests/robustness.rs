//! Round trips of random files through the writer and reader, and malformed input of every kind:
//! the reader must return a typed error (naming the offset / key / tensor) and never panic.

use ds4_gguf::{GgmlType, Gguf, GgufBuilder, GgufError, MetaType, MetaValue, parse_header};
use proptest::prelude::*;

fn scalar_value() -> impl Strategy<Value = MetaValue> {
    prop_oneof![
        any::<u8>().prop_map(MetaValue::U8),
        any::<i8>().prop_map(MetaValue::I8),
        any::<u16>().prop_map(MetaValue::U16),
        any::<i16>().prop_map(MetaValue::I16),
        any::<u32>().prop_map(MetaValue::U32),
        any::<i32>().prop_map(MetaValue::I32),
        any::<u64>().prop_map(MetaValue::U64),
        any::<i64>().prop_map(MetaValue::I64),
        any::<bool>().prop_map(MetaValue::Bool),
        // Compare floats by bits: NaN payloads must survive too.
        any::<u32>().prop_map(|b| MetaValue::F32(f32::from_bits(b))),
        any::<u64>().prop_map(|b| MetaValue::F64(f64::from_bits(b))),
        ".{0,12}".prop_map(MetaValue::String),
    ]
}

fn value() -> impl Strategy<Value = MetaValue> {
    prop_oneof![
        3 => scalar_value(),
        1 => prop::collection::vec(any::<u32>(), 0..20).prop_map(|v| MetaValue::u32_array(&v)),
        1 => prop::collection::vec(".{0,6}", 0..10).prop_map(MetaValue::string_array),
        1 => prop::collection::vec(prop::collection::vec(any::<i32>(), 0..4), 0..4).prop_map(|vv| {
            MetaValue::Array(MetaType::Array, vv.iter().map(|v| MetaValue::i32_array(v)).collect())
        }),
    ]
}

fn same(a: &MetaValue, b: &MetaValue) -> bool {
    match (a, b) {
        (MetaValue::F32(x), MetaValue::F32(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::F64(x), MetaValue::F64(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::Array(ta, xa), MetaValue::Array(tb, xb)) => {
            ta == tb && xa.len() == xb.len() && xa.iter().zip(xb).all(|(x, y)| same(x, y))
        }
        _ => a == b,
    }
}

const TYPES: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
    GgmlType::I32,
];

type TensorSpec = (GgmlType, u64, u64);

fn tensor_spec() -> impl Strategy<Value = TensorSpec> {
    (0..TYPES.len(), 1u64..3, 1u64..4).prop_map(|(t, blocks, rows)| {
        let ty = TYPES[t];
        (ty, blocks * ty.block_size() as u64, rows)
    })
}

fn build(
    kvs: &[(String, MetaValue)],
    tensors: &[TensorSpec],
    alignment: Option<u32>,
) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut b = GgufBuilder::new();
    if let Some(a) = alignment {
        b.add_metadata("general.alignment", MetaValue::U32(a))
            .unwrap();
    }
    for (k, v) in kvs {
        b.add_metadata(k.clone(), v.clone()).unwrap();
    }
    let mut datas = Vec::new();
    for (i, &(ty, ne0, ne1)) in tensors.iter().enumerate() {
        b.add_tensor(format!("t{i}"), &[ne0, ne1], ty).unwrap();
        let n = ty.tensor_bytes(&[ne0, ne1]).unwrap() as usize;
        datas.push((0..n).map(|j| (j * 31 + i * 7) as u8).collect::<Vec<u8>>());
    }
    let mut out = Vec::new();
    let mut w = b.start(&mut out).unwrap();
    for d in &datas {
        w.write_tensor_data(d).unwrap();
    }
    w.finish().unwrap();
    (out, datas)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn write_then_read_round_trips(
        kvs in prop::collection::vec(value(), 0..8),
        tensors in prop::collection::vec(tensor_spec(), 0..5),
        align in prop::option::of(prop::sample::select(vec![8u32, 16, 32, 64, 128])),
    ) {
        let kvs: Vec<(String, MetaValue)> =
            kvs.into_iter().enumerate().map(|(i, v)| (format!("k.{i}"), v)).collect();
        let (bytes, datas) = build(&kvs, &tensors, align);
        let g = Gguf::from_bytes(bytes).unwrap();
        let skip = usize::from(align.is_some());
        prop_assert_eq!(g.metadata().len(), kvs.len() + skip);
        for ((k, v), (k2, v2)) in kvs.iter().zip(&g.metadata()[skip..]) {
            prop_assert_eq!(k, k2);
            prop_assert!(same(v, v2), "{:?} != {:?}", v, v2);
        }
        prop_assert_eq!(g.alignment(), align.unwrap_or(32) as u64);
        for (i, d) in datas.iter().enumerate() {
            let name = format!("t{i}");
            prop_assert_eq!(g.tensor_data(&name).unwrap(), &d[..]);
            prop_assert_eq!(g.tensor_info(&name).unwrap().offset % g.alignment(), 0);
        }
    }

    #[test]
    fn corrupted_files_never_panic(
        tensors in prop::collection::vec(tensor_spec(), 1..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let kvs = vec![
            ("a.name".to_string(), MetaValue::String("x".into())),
            ("a.arr".to_string(), MetaValue::u32_array(&[1, 2, 3])),
        ];
        let (mut bytes, _) = build(&kvs, &tensors, None);
        for (idx, val) in &flips {
            let i = idx.index(bytes.len());
            bytes[i] ^= *val;
        }
        let _ = parse_header(&bytes);
        let n = cut.index(bytes.len());
        let _ = parse_header(&bytes[..n]);
    }

    #[test]
    fn random_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_header(&bytes);
        if bytes.len() >= 8 {
            bytes[..4].copy_from_slice(b"GGUF");
            bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
            let _ = parse_header(&bytes);
        }
    }
}

/// Assemble a header by hand.
struct Raw(Vec<u8>);

impl Raw {
    fn new(n_tensors: u64, n_kv: u64) -> Raw {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&n_tensors.to_le_bytes());
        v.extend_from_slice(&n_kv.to_le_bytes());
        Raw(v)
    }
    fn u32(mut self, x: u32) -> Raw {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Raw {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn str(self, s: &str) -> Raw {
        let mut r = self.u64(s.len() as u64);
        r.0.extend_from_slice(s.as_bytes());
        r
    }
    fn pad_to(mut self, n: usize) -> Raw {
        self.0.resize(n, 0);
        self
    }
}

fn err(bytes: &[u8]) -> GgufError {
    parse_header(bytes).expect_err("must be refused")
}

#[test]
fn bad_magic_and_version() {
    assert!(matches!(err(b"GGUX\x03\0\0\0"), GgufError::BadMagic { .. }));
    let mut v = Raw::new(0, 0).0;
    v[4] = 2;
    assert!(matches!(
        err(&v),
        GgufError::UnsupportedVersion { found: 2 }
    ));
    assert!(matches!(err(b"GG"), GgufError::Truncated { offset: 0, .. }));
    assert!(matches!(
        err(b"GGUF\x03\0\0\0\0"),
        GgufError::Truncated { offset: 8, .. }
    ));
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    let e = err(&Raw::new(0, u64::MAX).0);
    assert!(
        matches!(e, GgufError::CountTooLarge { ref what, .. } if what == "metadata"),
        "{e}"
    );
    let e = err(&Raw::new(1 << 40, 0).0);
    assert!(
        matches!(e, GgufError::CountTooLarge { ref what, .. } if what == "tensor"),
        "{e}"
    );
    // A string claiming 2^60 bytes.
    let e = err(&Raw::new(0, 1).u64(1 << 60).pad_to(64).0);
    assert!(matches!(e, GgufError::Truncated { offset: 24, .. }), "{e}");
    // An array claiming 2^62 u32 items.
    let e = err(&Raw::new(0, 1)
        .str("k")
        .u32(9)
        .u32(4)
        .u64(1 << 62)
        .pad_to(80)
        .0);
    assert!(
        matches!(e, GgufError::CountTooLarge { offset: 41, .. }),
        "{e}"
    );
}

#[test]
fn unknown_types_name_key_and_offset() {
    let e = err(&Raw::new(0, 1).str("my.key").u32(13).pad_to(64).0);
    assert!(
        matches!(e, GgufError::UnknownValueType { ref key, offset: 38, type_id: 13 } if key == "my.key"),
        "{e}"
    );
    let e = err(&Raw::new(1, 0)
        .str("w")
        .u32(1)
        .u64(32)
        .u32(99)
        .u64(0)
        .pad_to(128)
        .0);
    assert!(
        matches!(e, GgufError::UnknownTensorType { ref name, type_id: 99, .. } if name == "w"),
        "{e}"
    );
}

#[test]
fn invalid_utf8_bool_and_nesting() {
    let mut v = Raw::new(0, 1).str("k").u32(8).u64(2).0;
    v.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(err(&v), GgufError::InvalidUtf8 { offset: 45 }));
    let mut v = Raw::new(0, 1).str("k").u32(7).0;
    v.push(2);
    assert!(matches!(err(&v), GgufError::BadKeyValue { .. }));
    // 9 nested arrays.
    let mut r = Raw::new(0, 1).str("deep").u32(9);
    for _ in 0..9 {
        r = r.u32(9).u64(1);
    }
    let r = r.u32(4).u64(0).pad_to(400);
    assert!(matches!(err(&r.0), GgufError::ArrayTooDeep { .. }));
}

#[test]
fn duplicate_keys_and_tensors() {
    let r = Raw::new(0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(2);
    assert!(matches!(err(&r.0), GgufError::DuplicateKey { ref key, offset: 41 } if key == "k"));
    let r = Raw::new(2, 0)
        .str("w")
        .u32(1)
        .u64(8)
        .u32(0)
        .u64(0)
        .str("w")
        .u32(1)
        .u64(8)
        .u32(0)
        .u64(32)
        .pad_to(256);
    assert!(matches!(err(&r.0), GgufError::DuplicateTensor { ref name, .. } if name == "w"));
}

#[test]
fn tensor_directory_checks() {
    // ndim 0 and 9.
    for nd in [0u32, 9] {
        let r = Raw::new(1, 0).str("w").u32(nd).pad_to(256);
        assert!(matches!(err(&r.0), GgufError::BadDimCount { ndim, .. } if ndim == nd));
    }
    // Q8_0 with ne0 = 33.
    let r = Raw::new(1, 0)
        .str("w")
        .u32(1)
        .u64(33)
        .u32(8)
        .u64(0)
        .pad_to(256);
    assert!(matches!(
        err(&r.0),
        GgufError::BadBlockShape { ne0: 33, .. }
    ));
    // Overflowing size.
    let r = Raw::new(1, 0)
        .str("w")
        .u32(2)
        .u64(u64::MAX / 2)
        .u64(4)
        .u32(0)
        .u64(0)
        .pad_to(256);
    assert!(matches!(err(&r.0), GgufError::SizeOverflow { .. }));
    // Misaligned offset.
    let r = Raw::new(1, 0)
        .str("w")
        .u32(1)
        .u64(4)
        .u32(0)
        .u64(4)
        .pad_to(256);
    assert!(matches!(
        err(&r.0),
        GgufError::MisalignedTensor {
            offset: 4,
            alignment: 32,
            ..
        }
    ));
    // Out of the file: header is 24+8+1+4+8+4+8 = 57 bytes -> data at 64; 8 f32 = 32 bytes needs 96.
    let r = Raw::new(1, 0)
        .str("w")
        .u32(1)
        .u64(8)
        .u32(0)
        .u64(0)
        .pad_to(95);
    assert!(matches!(
        err(&r.0),
        GgufError::TensorOutOfBounds {
            end: 96,
            file_len: 95,
            ..
        }
    ));
    let r = Raw::new(1, 0)
        .str("w")
        .u32(1)
        .u64(8)
        .u32(0)
        .u64(0)
        .pad_to(96);
    assert!(parse_header(&r.0).is_ok());
    // Overlap.
    let r = Raw::new(2, 0)
        .str("a")
        .u32(1)
        .u64(16)
        .u32(0)
        .u64(0)
        .str("b")
        .u32(1)
        .u64(16)
        .u32(0)
        .u64(32)
        .pad_to(512);
    assert!(matches!(err(&r.0), GgufError::TensorsOverlap { .. }));
}

#[test]
fn bad_alignment_values() {
    let r = Raw::new(0, 1).str("general.alignment").u32(4).u32(48);
    assert!(matches!(err(&r.0), GgufError::BadKeyValue { .. }));
    let r = Raw::new(0, 1).str("general.alignment").u32(10).u64(32);
    assert!(matches!(err(&r.0), GgufError::WrongKeyType { .. }));
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let kvs = vec![
        ("s".to_string(), MetaValue::String("hello".into())),
        ("a".to_string(), MetaValue::string_array(["x", "yy"])),
    ];
    let (bytes, _) = build(
        &kvs,
        &[(GgmlType::Q8_0, 64, 2), (GgmlType::F32, 4, 1)],
        None,
    );
    assert!(parse_header(&bytes).is_ok());
    for n in 0..bytes.len() {
        let r = parse_header(&bytes[..n]);
        // Cutting only trailing padding of the last tensor is still a valid file.
        let last = Gguf::from_bytes(bytes.clone()).unwrap();
        let t = &last.tensors()[1];
        let data_end = (last.data_offset() + t.offset + t.n_bytes) as usize;
        if n >= data_end {
            assert!(r.is_ok());
        } else {
            assert!(r.is_err(), "prefix of {n} bytes accepted");
        }
    }
}

#[test]
fn writer_refuses_inconsistent_input() {
    let mut b = GgufBuilder::new();
    b.add_metadata("k", MetaValue::U8(1)).unwrap();
    assert!(b.add_metadata("k", MetaValue::U8(2)).is_err());
    assert!(b.add_tensor("q", &[33], GgmlType::Q8_0).is_err());
    assert!(b.add_tensor("e", &[], GgmlType::F32).is_err());
    b.add_tensor("w", &[4], GgmlType::F32).unwrap();
    assert!(b.add_tensor("w", &[4], GgmlType::F32).is_err());
    assert!(
        b.add_metadata("general.alignment", MetaValue::U32(64))
            .is_err()
    );
    assert!(
        b.add_metadata(
            "bad",
            MetaValue::Array(MetaType::U32, vec![MetaValue::U8(1)])
        )
        .is_err()
    );
    let mut out = Vec::new();
    let mut w = b.start(&mut out).unwrap();
    assert!(w.write_tensor("x", &[0; 16]).is_err());
    assert!(w.write_tensor("w", &[0; 15]).is_err());
    w.write_tensor_data(&[0; 10]).unwrap();
    assert!(w.finish().is_err());
}

#[test]
fn warm_pages_covers_the_file_and_changes_nothing() {
    // A file of several pages (F32 rows), mapped and in memory.
    let (bytes, datas) = build(
        &[],
        &[(GgmlType::F32, 1024, 9), (GgmlType::Q8_0, 64, 3)],
        None,
    );
    assert!(bytes.len() > 4 * 4096);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.gguf");
    std::fs::write(&p, &bytes).unwrap();
    for g in [
        Gguf::open(&p).unwrap(),
        Gguf::from_bytes(bytes.clone()).unwrap(),
    ] {
        assert_eq!(g.warm_pages(), bytes.len() as u64);
        assert_eq!(g.bytes(), &bytes[..]);
        assert_eq!(g.tensor_data("t0").unwrap(), &datas[0][..]);
    }
}
