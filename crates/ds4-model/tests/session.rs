//! Sessions on the converted tiny model: chunking consistency, snapshot/restore bit-exactness,
//! prefix sync, snapshot corruption (proptest), and refusal of corrupted / mismatched GGUFs.

mod common;

use std::sync::Arc;

use common::*;
use ds4_convert::Recipe;
use ds4_gguf::{GgmlType, Gguf, GgufBuilder, MetaValue};
use ds4_model::{
    Engine, EngineOptions, Model, ModelError, Session, SessionOptions, ShapeError, SnapshotError,
    argmax,
};
use proptest::prelude::*;

fn prompt(n: usize) -> Option<Vec<u32>> {
    let rs = RefSet::open("tiny", "ref_plain")?;
    let ids = ints(&rs.npy("memory_archive_500", "input_ids.npy"));
    Some(ids[..n].iter().map(|&x| x as u32).collect())
}

fn session(m: &Arc<Model>, qat: bool, ctx: usize, chunk: usize) -> Session {
    engine(m, qat)
        .new_session(SessionOptions {
            ctx,
            prefill_chunk: chunk,
        })
        .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Prefill in one chunk, in chunks of 37 and token by token: every logit identical (the
/// batched matmul gives exactly the per-token numbers), with QAT off and on.
#[test]
fn chunking_does_not_change_logits() {
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let ids = prompt(300).unwrap();
    for qat in [false, true] {
        let one = session(&m, qat, 512, 2048)
            .prefill_all_logits(&ids)
            .unwrap();
        for chunk in [37, 1] {
            let other = session(&m, qat, 512, chunk)
                .prefill_all_logits(&ids)
                .unwrap();
            let d = one
                .iter()
                .zip(&other)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("qat={qat} chunk {chunk} vs one chunk: max |Δ| = {d:e}");
            assert!(d <= 1e-4, "chunk {chunk}: {d}");
            assert_eq!(bits(&one), bits(&other), "chunk {chunk}: not bit-identical");
        }
    }
}

/// Snapshot after a prefill, restore into a fresh session, continue: bit-identical to the
/// uninterrupted run. Snapshots are deterministic (chunked vs token-by-token prefill).
#[test]
fn snapshot_restore_is_bit_exact() {
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let ids = prompt(301).unwrap();
    let mut a = session(&m, true, 512, 64);
    a.prefill(&ids).unwrap();
    let snap = a.snapshot().unwrap();

    // Determinism: the same state from a token-by-token prefill gives the same payload, header
    // included: field 3 records ds4's default chunk, min(ctx, 2048), not the session's.
    let mut c = session(&m, true, 512, 1);
    c.prefill(&ids).unwrap();
    let snap_c = c.snapshot().unwrap();
    assert_eq!(snap, snap_c, "payload depends on the prefill chunk");
    assert_eq!(u32::from_le_bytes(snap[12..16].try_into().unwrap()), 512);
    let mut e = session(&m, true, 4096, 4096);
    e.prefill(&ids).unwrap();
    let snap_e = e.snapshot().unwrap();
    assert_eq!(u32::from_le_bytes(snap_e[12..16].try_into().unwrap()), 2048);

    // Continue A greedily; restore into B and feed the same tokens.
    let mut toks = Vec::new();
    let mut la = Vec::new();
    for _ in 0..40 {
        let t = argmax(a.logits());
        toks.push(t);
        la.push(bits(a.decode(t).unwrap()));
    }
    let mut b = session(&m, true, 512, 2048);
    b.restore(&snap).unwrap();
    assert_eq!(b.tokens(), &ids[..]);
    assert_eq!(bits(b.logits()), bits(c.logits()));
    for (i, &t) in toks.iter().enumerate() {
        assert_eq!(argmax(b.logits()), t, "greedy step {i}");
        let l = bits(b.decode(t).unwrap());
        assert_eq!(l, la[i], "decode step {i} differs after restore");
    }
    // And a snapshot taken mid-decode restores too.
    let snap2 = b.snapshot().unwrap();
    let mut d = session(&m, true, 512, 7);
    d.restore(&snap2).unwrap();
    let t = argmax(d.logits());
    assert_eq!(bits(d.decode(t).unwrap()), bits(b.decode(t).unwrap()));
}

#[test]
fn snapshot_mismatches_are_refused() {
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let ids = prompt(140).unwrap();
    let mut a = session(&m, false, 512, 2048);
    a.prefill(&ids).unwrap();
    let snap = a.snapshot().unwrap();
    let mut b = session(&m, false, 512, 2048);
    b.prefill(&ids[..3]).unwrap();
    let before = bits(b.logits());
    let check = |b: &mut Session, bytes: &[u8], want: &dyn Fn(&SnapshotError) -> bool| {
        match b.restore(bytes) {
            Err(ModelError::Snapshot(e)) => assert!(want(&e), "unexpected error {e}"),
            other => panic!("expected a snapshot error, got {other:?}"),
        }
        assert_eq!(b.tokens(), &ids[..3], "session changed by a failed restore");
        assert_eq!(bits(b.logits()), before);
    };
    let patch = |field: usize, v: u32| {
        let mut s = snap.clone();
        s[field * 4..field * 4 + 4].copy_from_slice(&v.to_le_bytes());
        s
    };
    check(&mut b, &snap[..snap.len() - 1], &|e| {
        matches!(e, SnapshotError::Truncated { .. })
    });
    let mut long = snap.clone();
    long.push(0);
    check(&mut b, &long, &|e| matches!(e, SnapshotError::Trailing(1)));
    check(&mut b, &patch(0, 0x12345678), &|e| {
        matches!(e, SnapshotError::BadMagic(_))
    });
    check(&mut b, &patch(1, 2), &|e| {
        matches!(e, SnapshotError::BadVersion(2))
    });
    check(&mut b, &patch(11, 4097), &|e| {
        matches!(e, SnapshotError::Mismatch { field: "vocab", .. })
    });
    check(&mut b, &patch(8, 5), &|e| {
        matches!(
            e,
            SnapshotError::Mismatch {
                field: "layer count",
                ..
            }
        )
    });
    check(&mut b, &patch(9, 64), &|e| {
        matches!(
            e,
            SnapshotError::Mismatch {
                field: "head dim",
                ..
            }
        )
    });
    check(&mut b, &patch(2, 4096), &|e| {
        matches!(e, SnapshotError::Mismatch { .. })
    });
    check(&mut b, &patch(12, 100), &|e| {
        matches!(
            e,
            SnapshotError::Mismatch {
                field: "live raw rows",
                ..
            }
        )
    });
    // A smaller session cannot take it.
    let mut small = session(&m, false, 256, 2048);
    assert!(matches!(
        small.restore(&snap),
        Err(ModelError::Snapshot(SnapshotError::Mismatch { .. }))
    ));
    // The first compressed count (layer 2, ratio 4) changed.
    let t = ids.len();
    let off = 13 * 4 + t * 4 + m.shape.n_vocab * 4 + 2 * 4;
    let mut bad = snap.clone();
    bad[off..off + 4].copy_from_slice(&36u32.to_le_bytes());
    check(&mut b, &bad, &|e| matches!(e, SnapshotError::Invalid(_)));
    // Restoring the good payload works after all that.
    b.restore(&snap).unwrap();
    assert_eq!(b.tokens(), &ids[..]);
}

fn tiny_snapshot() -> Option<(Arc<Model>, Vec<u8>)> {
    static S: std::sync::OnceLock<Option<(Arc<Model>, Vec<u8>)>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let m = model("tiny", Recipe::F32)?;
        let ids = prompt(9)?;
        let mut a = session(&m, true, 64, 2048);
        a.prefill(&ids).unwrap();
        Some((m, a.snapshot().unwrap()))
    })
    .clone()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Corrupted payloads never panic; a failed restore leaves the session unchanged; a
    /// payload that loads can be decoded from.
    #[test]
    fn corrupted_snapshots_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        extra in proptest::collection::vec(any::<u8>(), 0..3),
        header in proptest::option::of((0usize..13, any::<u32>())),
    ) {
        let Some((m, snap)) = tiny_snapshot() else { return Ok(()); };
        let mut bytes = snap.clone();
        for (i, v) in &flips {
            let i = i.index(bytes.len());
            bytes[i] ^= v;
        }
        if let Some((f, v)) = header {
            bytes[f * 4..f * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        bytes.extend_from_slice(&extra);
        let mut s = session(&m, true, 64, 2048);
        s.prefill(&[5, 6]).unwrap();
        match s.restore(&bytes) {
            Ok(()) => {
                let t = argmax(s.logits());
                let _ = s.decode(t);
            }
            Err(_) => prop_assert_eq!(s.tokens(), &[5u32, 6][..]),
        }
    }

    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let Some((m, _)) = tiny_snapshot() else { return Ok(()); };
        let mut s = session(&m, true, 64, 2048);
        prop_assert!(s.restore(&bytes).is_err());
    }
}

/// `sync` extends when the live tokens are a prefix, rebuilds otherwise; the logits always
/// equal a fresh prefill's.
#[test]
fn sync_reuses_the_common_prefix() {
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let ids = prompt(200).unwrap();
    let fresh = |toks: &[u32]| {
        let mut s = session(&m, true, 512, 2048);
        s.prefill(toks).unwrap();
        bits(s.logits())
    };
    let mut s = session(&m, true, 512, 32);
    let o = s.sync(&ids[..100]).unwrap();
    assert_eq!((o.reused, o.evaluated), (0, 100));
    let o = s.sync(&ids[..150]).unwrap();
    assert_eq!((o.reused, o.evaluated), (100, 50));
    assert_eq!(bits(s.logits()), fresh(&ids[..150]));
    let o = s.sync(&ids[..150]).unwrap();
    assert_eq!((o.reused, o.evaluated), (150, 0));
    // Shorter: rebuilt.
    let o = s.sync(&ids[..120]).unwrap();
    assert_eq!((o.reused, o.evaluated), (0, 120));
    assert_eq!(bits(s.logits()), fresh(&ids[..120]));
    // Diverging at 80: rebuilt.
    let mut div = ids[..130].to_vec();
    div[80] = (div[80] + 1) % 4096;
    assert_eq!(s.common_prefix(&div), 80);
    let o = s.sync(&div).unwrap();
    assert_eq!((o.reused, o.evaluated), (0, 130));
    assert_eq!(bits(s.logits()), fresh(&div));
    assert_eq!(s.tokens(), &div[..]);
}

#[test]
fn bad_tokens_and_full_context_are_errors() {
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let mut s = session(&m, false, 8, 4);
    s.prefill(&[1, 2, 3]).unwrap();
    let l = bits(s.logits());
    assert!(matches!(
        s.prefill(&[7, 4096]),
        Err(ModelError::TokenOutOfRange {
            token: 4096,
            pos: 4,
            ..
        })
    ));
    assert!(matches!(
        s.prefill(&[1; 6]),
        Err(ModelError::ContextFull { ctx: 8, needed: 9 })
    ));
    assert_eq!(s.tokens(), &[1, 2, 3]);
    assert_eq!(bits(s.logits()), l);
    assert!(matches!(
        engine(&m, false).new_session(SessionOptions {
            ctx: 0,
            prefill_chunk: 1
        }),
        Err(ModelError::BadOption(_))
    ));
}

// ------------------------------------------------------------------------------------------
// Corrupted / mismatched GGUF files.

type TensorEdit<'a> =
    &'a dyn Fn(&str, &[u64], GgmlType, &[u8]) -> Option<(Vec<u64>, GgmlType, Vec<u8>)>;

/// Rebuild `src` with edited metadata and tensors (`None` from `tensor` drops the tensor).
fn rebuild(src: &Gguf, meta: &dyn Fn(&str, &MetaValue) -> MetaValue, tensor: TensorEdit) -> Gguf {
    let mut b = GgufBuilder::new();
    for (k, v) in src.metadata() {
        b.add_metadata(k.clone(), meta(k, v)).unwrap();
    }
    let mut data = Vec::new();
    for t in src.tensors() {
        if let Some((dims, ty, d)) = tensor(&t.name, &t.dims, t.ty, src.data_of(t)) {
            b.add_tensor(t.name.clone(), &dims, ty).unwrap();
            data.push(d);
        }
    }
    let mut dw = b.start(Vec::new()).unwrap();
    for d in &data {
        dw.write_tensor_data(d).unwrap();
    }
    Gguf::from_bytes(dw.finish().unwrap()).unwrap()
}

fn keep_meta(_: &str, v: &MetaValue) -> MetaValue {
    v.clone()
}

fn load(g: Gguf) -> Result<Engine, ModelError> {
    Engine::from_gguf(Arc::new(g), EngineOptions::default())
}

fn f32_to_f16_bytes(d: &[u8]) -> Vec<u8> {
    d.chunks_exact(4)
        .flat_map(|c| {
            half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .to_bits()
                .to_le_bytes()
        })
        .collect()
}

#[test]
fn corrupted_ggufs_fail_with_clear_errors() {
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let src = &*m.gguf;
    // Sanity: an unedited rebuild loads.
    load(rebuild(src, &keep_meta, &|_, d, t, x| {
        Some((d.to_vec(), t, x.to_vec()))
    }))
    .unwrap();

    // Missing tensor.
    let e = load(rebuild(src, &keep_meta, &|n, d, t, x| {
        (n != "blk.1.attn_q_b.weight").then(|| (d.to_vec(), t, x.to_vec()))
    }))
    .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(&e, ModelError::MissingTensor { name } if name == "blk.1.attn_q_b.weight"));

    // Wrong type for a vector.
    let e = load(rebuild(src, &keep_meta, &|n, d, t, x| {
        Some(if n == "blk.0.attn_norm.weight" {
            (d.to_vec(), GgmlType::F16, f32_to_f16_bytes(x))
        } else {
            (d.to_vec(), t, x.to_vec())
        })
    }))
    .unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, ModelError::WrongType { name, found: GgmlType::F16, .. } if name == "blk.0.attn_norm.weight")
    );

    // Gate/up experts of different types.
    let e = load(rebuild(src, &keep_meta, &|n, d, t, x| {
        Some(if n == "blk.3.ffn_up_exps.weight" {
            (d.to_vec(), GgmlType::F16, f32_to_f16_bytes(x))
        } else {
            (d.to_vec(), t, x.to_vec())
        })
    }))
    .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(&e, ModelError::WrongType { name, .. } if name == "blk.3.ffn_up_exps.weight"));

    // Wrong shape.
    let e = load(rebuild(src, &keep_meta, &|n, d, t, x| {
        Some(if n == "blk.2.attn_kv.weight" {
            (vec![d[0], d[1] / 2], t, x[..x.len() / 2].to_vec())
        } else {
            (d.to_vec(), t, x.to_vec())
        })
    }))
    .unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, ModelError::WrongShape { name, expected, found }
        if name == "blk.2.attn_kv.weight" && expected == &vec![128, 128] && found == &vec![128, 64])
    );

    // Metadata lying about a dimension: q_lora_rank 64 while the tensors have 128.
    let e = load(rebuild(
        src,
        &|k, v| {
            if k == "deepseek4.attention.q_lora_rank" {
                MetaValue::U32(64)
            } else {
                v.clone()
            }
        },
        &|_, d, t, x| Some((d.to_vec(), t, x.to_vec())),
    ))
    .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(&e, ModelError::WrongShape { name, .. } if name == "blk.0.attn_q_a.weight"));

    // Claiming to be Flash (embedding_length 4096) with other Flash dimensions wrong.
    let e = load(rebuild(
        src,
        &|k, v| {
            if k == "deepseek4.embedding_length" {
                MetaValue::U32(4096)
            } else {
                v.clone()
            }
        },
        &|_, d, t, x| Some((d.to_vec(), t, x.to_vec())),
    ))
    .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(&e, ModelError::Shape(ShapeError::NotFlash { .. })));

    // tid2eid entry outside [0, n_expert).
    let e = load(rebuild(src, &keep_meta, &|n, d, t, x| {
        let mut x = x.to_vec();
        if n == "blk.1.ffn_gate_tid2eid.weight" {
            x[4 * 7..4 * 8].copy_from_slice(&8i32.to_le_bytes());
        }
        Some((d.to_vec(), t, x))
    }))
    .unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(&e, ModelError::BadTensor { name, .. } if name == "blk.1.ffn_gate_tid2eid.weight")
    );

    // Non-finite norm weight.
    let e = load(rebuild(src, &keep_meta, &|n, d, t, x| {
        let mut x = x.to_vec();
        if n == "output_norm.weight" {
            x[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        Some((d.to_vec(), t, x))
    }))
    .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(&e, ModelError::BadTensor { name, .. } if name == "output_norm.weight"));

    // A missing metadata key.
    let mut b = GgufBuilder::new();
    for (k, v) in src.metadata() {
        if k != "deepseek4.attention.sliding_window" {
            b.add_metadata(k.clone(), v.clone()).unwrap();
        }
    }
    let g = Gguf::from_bytes(b.start(Vec::new()).unwrap().finish().unwrap()).unwrap();
    let e = load(g).unwrap_err();
    eprintln!("{e}");
    assert!(matches!(&e, ModelError::Shape(ShapeError::Missing { .. })));

    // Truncated file: the GGUF reader refuses it.
    let bytes = src.bytes();
    assert!(Gguf::from_bytes(bytes[..bytes.len() - 100].to_vec()).is_err());
}

/// The session's logits are the backend's after every evaluation and a restored snapshot's
/// until the next one; a refused token leaves them alone; reset empties them.
#[test]
fn logits_follow_evaluations_and_restores() {
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let ids = prompt(40).unwrap();
    let n_vocab = m.shape.n_vocab;
    let mut s = session(&m, false, 512, 16);
    assert!(s.logits().is_empty());
    s.prefill(&ids).unwrap();
    let after_prompt = bits(s.logits());
    assert_eq!(after_prompt.len(), n_vocab);
    let snap = s.snapshot().unwrap();
    let t = argmax(s.logits());
    let stepped = bits(s.decode(t).unwrap());
    assert!(stepped != after_prompt, "a step changes the logits");
    assert!(bits(s.logits()) == stepped, "the step's logits");
    // Restored: the snapshot's logits (the backend's imported state holds none).
    s.restore(&snap).unwrap();
    assert!(bits(s.logits()) == after_prompt, "restored logits");
    // A token out of range is refused before any evaluation: nothing changes.
    assert!(s.decode(n_vocab as u32).is_err());
    assert!(
        bits(s.logits()) == after_prompt,
        "logits after a refused token"
    );
    assert_eq!(s.len(), ids.len());
    // An empty evaluation keeps them.
    s.prefill(&[]).unwrap();
    assert!(
        bits(s.logits()) == after_prompt,
        "logits after an empty prefill"
    );
    // The next evaluation replaces the restored logits with the backend's.
    assert!(
        bits(s.decode(t).unwrap()) == stepped,
        "the step again after the restore"
    );
    s.reset();
    assert!(s.logits().is_empty());
    // Reset also forgets restored logits.
    s.restore(&snap).unwrap();
    assert!(!s.logits().is_empty());
    s.reset();
    assert!(s.logits().is_empty(), "restored logits after reset");
}

/// `sync_with_progress` reports every prefill chunk of what it evaluates: the suffix when the
/// live tokens are a prefix, everything after a divergence, nothing when the tokens are live.
#[test]
fn sync_reports_prefill_progress() {
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let ids = prompt(45).unwrap();
    let mut s = session(&m, false, 512, 16);
    let mut calls = Vec::new();
    let sync = |s: &mut Session, t: &[u32], calls: &mut Vec<(usize, usize)>| {
        calls.clear();
        s.sync_with_progress(t, &mut |d, n| {
            calls.push((d, n));
            true
        })
        .unwrap()
    };
    let o = sync(&mut s, &ids[..40], &mut calls);
    assert_eq!((o.reused, o.evaluated), (0, 40));
    assert_eq!(calls, [(16, 40), (32, 40), (40, 40)]);
    let o = sync(&mut s, &ids, &mut calls);
    assert_eq!((o.reused, o.evaluated), (40, 5));
    assert_eq!(calls, [(5, 5)]);
    let o = sync(&mut s, &ids, &mut calls);
    assert_eq!((o.reused, o.evaluated), (45, 0));
    assert!(calls.is_empty());
    let mut other = ids[..20].to_vec();
    other[19] ^= 1;
    let o = sync(&mut s, &other, &mut calls);
    assert_eq!((o.reused, o.evaluated), (0, 20));
    assert_eq!(calls, [(16, 20), (20, 20)]);
    // The same state as a plain sync.
    let mut plain = session(&m, false, 512, 16);
    plain.sync(&other).unwrap();
    assert_eq!(bits(plain.logits()), bits(s.logits()));
    // Stopped after the second chunk: the session holds those 32 tokens and their logits, and
    // a later sync goes on from there.
    let mut s = session(&m, false, 512, 16);
    let r = s.sync_with_progress(&ids[..40], &mut |d, _| d < 32);
    assert!(
        matches!(
            r,
            Err(ModelError::Stopped {
                done: 32,
                total: 40
            })
        ),
        "{r:?}"
    );
    assert_eq!(s.tokens(), &ids[..32]);
    let mut at32 = session(&m, false, 512, 16);
    at32.prefill(&ids[..32]).unwrap();
    assert_eq!(bits(s.logits()), bits(at32.logits()));
    let o = s.sync(&ids[..40]).unwrap();
    assert_eq!((o.reused, o.evaluated), (32, 8));
    // Stopping at the last chunk is not a stop.
    let mut s = session(&m, false, 512, 16);
    assert!(s.sync_with_progress(&ids[..40], &mut |_, _| false).is_err());
    let mut s2 = session(&m, false, 512, 64);
    assert!(s2.sync_with_progress(&ids[..40], &mut |_, _| false).is_ok());
}

/// A CPU backend that reports a fixed greedy pick, as the CUDA graph step reports the one it
/// made on the device.
struct Picky {
    inner: ds4_model::CpuBackend,
    pick: [u32; 2],
}

impl ds4_model::Backend for Picky {
    fn name(&self) -> &str {
        "picky"
    }
    fn shape(&self) -> &ds4_model::Shape {
        self.inner.shape()
    }
    fn ctx(&self) -> usize {
        self.inner.ctx()
    }
    fn n_tokens(&self) -> usize {
        self.inner.n_tokens()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn eval(&mut self, tokens: &[u32], all_logits: bool) -> ds4_model::Result<()> {
        self.inner.eval(tokens, all_logits)
    }
    fn logits(&self) -> &[f32] {
        self.inner.logits()
    }
    fn greedy_pick(&self) -> Option<[u32; 2]> {
        Some(self.pick)
    }
    fn chunk_logits(&self) -> &[f32] {
        self.inner.chunk_logits()
    }
    fn export_state(&self) -> ds4_model::Result<ds4_model::KvState> {
        self.inner.export_state()
    }
    fn import_state(&mut self, state: &ds4_model::KvState) -> ds4_model::Result<()> {
        self.inner.import_state(state)
    }
    fn set_trace(&mut self, on: bool) {
        self.inner.set_trace(on)
    }
    fn trace(&self) -> Option<&ds4_model::Trace> {
        self.inner.trace()
    }
}

/// `Session::greedy` takes the backend's pick where it made one (the exclusion falls to the
/// second), scans the logits where it made none (CPU) and for a restored snapshot's logits;
/// `next_token` is `greedy` at temperature ≤ 0 and `sample` of the logits above it.
#[test]
fn greedy_uses_the_backend_pick_where_there_is_one() {
    use ds4_model::sampler::argmax_excluding;
    use ds4_model::{Rng, SamplerParams, sample};
    let Some(m) = model("tiny", Recipe::F32) else {
        return;
    };
    let ids = prompt(20).unwrap();
    let e = engine(&m, false);
    let opts = SessionOptions {
        ctx: 64,
        prefill_chunk: 8,
    };
    // The CPU backend makes no pick: the session scans the logits.
    let mut plain = e.new_session(opts.clone()).unwrap();
    plain.prefill(&ids).unwrap();
    let best = argmax(plain.logits());
    assert_eq!(plain.greedy(None), best);
    let second = plain.greedy(Some(best));
    assert_eq!(second, argmax_excluding(plain.logits(), Some(best)));
    assert_ne!(second, best);
    // A backend's pick is taken as given (here one the logits do not hold, to see it used).
    let pick = [(best + 1) % 7 + 100, (best + 2) % 7 + 200];
    let b = Picky {
        inner: e.cpu_backend(64).unwrap(),
        pick,
    };
    let mut s = Session::with_backend(Box::new(b), opts).unwrap();
    s.prefill(&ids).unwrap();
    assert_eq!(s.greedy(None), pick[0]);
    assert_eq!(s.greedy(Some(pick[0])), pick[1]);
    assert_eq!(s.greedy(Some(pick[1])), pick[0]);
    let greedy = SamplerParams::greedy();
    let mut rng = Rng::new(1);
    assert_eq!(s.next_token(&greedy, &mut rng), pick[0]);
    let warm = SamplerParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
    };
    let (mut r1, mut r2) = (Rng::new(5), Rng::new(5));
    assert_eq!(
        s.next_token(&warm, &mut r1),
        sample(s.logits(), &warm, &mut r2)
    );
    // A restored snapshot's logits are the session's own: scanned, not the backend's pick.
    let snap = s.snapshot().unwrap();
    s.restore(&snap).unwrap();
    assert_eq!(s.greedy(None), best);
    assert_eq!(s.greedy(Some(best)), second);
    // `advance` is `decode` without reading the logits: the same state and logits after it.
    s.advance(best).unwrap();
    let stepped = bits(plain.decode(best).unwrap());
    assert!(bits(s.logits()) == stepped, "logits after advance");
    assert_eq!(s.tokens(), plain.tokens());
    assert_eq!(
        s.greedy(None),
        pick[0],
        "the backend's pick again after a step"
    );
}
