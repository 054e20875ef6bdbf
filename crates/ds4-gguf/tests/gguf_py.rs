//! Interoperability with gguf-py 0.19.0: `tests/data/gguf_py_sample.gguf` was written by
//! `scripts/gguf_fixture.py`. We must read every value and tensor, and our writer must reproduce
//! the file byte for byte from the parsed content.

use ds4_gguf::{GgmlType, Gguf, GgufBuilder, MetaType, MetaValue};

const SAMPLE: &[u8] = include_bytes!("data/gguf_py_sample.gguf");

#[test]
fn reads_every_value_type() {
    let g = Gguf::from_bytes(SAMPLE.to_vec()).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    let get = |k: &str| g.get(k).unwrap_or_else(|| panic!("missing {k}"));
    assert_eq!(get("general.architecture").as_str(), Some("deepseek4"));
    assert_eq!(get("t.u8"), &MetaValue::U8(200));
    assert_eq!(get("t.i8"), &MetaValue::I8(-100));
    assert_eq!(get("t.u16"), &MetaValue::U16(60000));
    assert_eq!(get("t.i16"), &MetaValue::I16(-30000));
    assert_eq!(get("t.u32"), &MetaValue::U32(4_000_000_000));
    assert_eq!(get("t.i32"), &MetaValue::I32(-2_000_000_000));
    assert_eq!(get("t.f32"), &MetaValue::F32(1.5e-6));
    assert_eq!(get("t.bool"), &MetaValue::Bool(true));
    assert_eq!(get("t.string").as_str(), Some("héllo ｜DSML｜ 世界"));
    assert_eq!(get("t.u64"), &MetaValue::U64((1u64 << 63) + 5));
    assert_eq!(get("t.i64"), &MetaValue::I64(-(1i64 << 62)));
    assert_eq!(get("t.f64"), &MetaValue::F64(std::f64::consts::PI));
    assert_eq!(
        get("t.arr_u32").as_i64_array(),
        Some(vec![0, 0, 4, 128, 4, 128])
    );
    assert_eq!(
        get("t.arr_str").as_string_array(),
        Some(vec!["a", "", "Ġworld", "<｜User｜>"])
    );
    assert_eq!(
        get("t.arr_f32").as_f64_array(),
        Some(vec![10.0, 10.0, 0.25])
    );
    let (t, items) = get("t.arr_nested").as_array().unwrap();
    assert_eq!(t, MetaType::Array);
    assert_eq!(items.len(), 2);
    assert_eq!(items[1].as_i64_array(), Some(vec![3]));

    let names: Vec<_> = g.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["f32.weight", "f16.weight", "i32.weight", "q8_0.weight"]
    );
    let t = g.tensor_info("f32.weight").unwrap();
    assert_eq!((t.dims.as_slice(), t.ty), (&[5u64, 3][..], GgmlType::F32));
    assert_eq!(g.tensor_data("f32.weight").unwrap().len(), 60);
    let q = g.tensor_info("q8_0.weight").unwrap();
    assert_eq!(
        (q.dims.as_slice(), q.ty, q.n_bytes),
        (&[64u64, 2][..], GgmlType::Q8_0, 136)
    );
    assert_eq!(g.data_offset() + q.offset, 1376);
}

#[test]
fn writer_reproduces_gguf_py_bytes() {
    let g = Gguf::from_bytes(SAMPLE.to_vec()).unwrap();
    let mut b = GgufBuilder::new();
    for (k, v) in g.metadata() {
        b.add_metadata(k.clone(), v.clone()).unwrap();
    }
    for t in g.tensors() {
        b.add_tensor(t.name.clone(), &t.dims, t.ty).unwrap();
    }
    let data: Vec<&[u8]> = g.tensors().iter().map(|t| g.data_of(t)).collect();
    let mut out = Vec::new();
    let mut w = b.start(&mut out).unwrap();
    for (t, d) in g.tensors().iter().zip(&data) {
        w.write_tensor(&t.name, d).unwrap();
    }
    w.finish().unwrap();
    assert_eq!(out.len(), SAMPLE.len());
    assert!(out == SAMPLE, "writer output differs from gguf-py's bytes");
}
