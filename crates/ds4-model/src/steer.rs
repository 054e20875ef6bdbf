//! Directional steering (ds4's `--dir-steering-file` / `-ffn` / `-attn`, `dir-steering/README.md`):
//! a runtime edit of the sublayer outputs, not part of the model.
//!
//! A steering file is flat little-endian f32, `n_layer × n_embd`: one direction per layer
//! (normally of unit length; used as given). At layer `l` the edit
//! `y ← y − scale·d[l]·(d[l]·y)` ([`crate::ops::dir_steer`]) is applied to every token's
//! attention output (after the output projection, before the HC post) when the slot's `attn`
//! scale is not 0, and to the FFN output (routed experts' sum + shared expert, before the HC post)
//! when its `ffn` scale is not 0. Positive scales remove the direction, negative ones amplify it.
//!
//! Up to [`MAX_SLOTS`] files (slots), each with its own two scales, are applied in order at
//! every layer. A [`Steering`] only holds slots with a non-zero scale; without one the backends
//! run their normal path unchanged.

use std::path::Path;

use crate::error::{ModelError, Result};
use crate::shape::Shape;

/// Most steering files at once (ds4's limit).
pub const MAX_SLOTS: usize = 8;
/// Largest absolute scale accepted (ds4's range `-100..100`).
pub const MAX_SCALE: f32 = 100.0;

/// The sublayer output a scale applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sublayer {
    /// The attention output (after `attn_output_b`).
    Attn,
    /// The FFN output (routed experts' sum + shared expert).
    Ffn,
}

/// One steering file and its two scales.
#[derive(Clone)]
pub struct SteeringSlot {
    /// Where the directions came from (messages only).
    pub source: String,
    /// `n_layer × n_embd` directions, layer-major.
    pub dirs: Vec<f32>,
    /// Scale of the FFN output edit (0: none).
    pub ffn: f32,
    /// Scale of the attention output edit (0: none).
    pub attn: f32,
}

impl SteeringSlot {
    /// The slot's scale for `which`.
    pub fn scale(&self, which: Sublayer) -> f32 {
        match which {
            Sublayer::Attn => self.attn,
            Sublayer::Ffn => self.ffn,
        }
    }
}

impl std::fmt::Debug for SteeringSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SteeringSlot")
            .field("source", &self.source)
            .field("values", &self.dirs.len())
            .field("ffn", &self.ffn)
            .field("attn", &self.attn)
            .finish()
    }
}

/// Validated steering for one model shape: the slots with a non-zero scale, in order.
#[derive(Clone, Debug)]
pub struct Steering {
    n_layer: usize,
    n_embd: usize,
    slots: Vec<SteeringSlot>,
}

/// Bitwise equality (scales and directions compared by their bits).
impl PartialEq for Steering {
    fn eq(&self, o: &Steering) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        self.n_layer == o.n_layer
            && self.n_embd == o.n_embd
            && self.slots.len() == o.slots.len()
            && self.slots.iter().zip(&o.slots).all(|(a, b)| {
                a.ffn.to_bits() == b.ffn.to_bits()
                    && a.attn.to_bits() == b.attn.to_bits()
                    && bits(&a.dirs) == bits(&b.dirs)
            })
    }
}
impl Eq for Steering {}

fn bad(msg: String) -> ModelError {
    ModelError::Steering(msg)
}

impl Steering {
    /// Read a direction file for `shape`: exactly `n_layer · n_embd` little-endian f32, all
    /// finite. A file of another size is an error naming both sizes.
    pub fn read_directions(path: &Path, shape: &Shape) -> Result<Vec<f32>> {
        let bytes =
            std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        Self::parse_directions(&bytes, shape).map_err(|e| match e {
            ModelError::Steering(m) => bad(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// [`Steering::read_directions`] over the file's bytes.
    pub fn parse_directions(bytes: &[u8], shape: &Shape) -> Result<Vec<f32>> {
        let want = shape.n_layer * shape.n_embd;
        if bytes.len() != want * 4 {
            return Err(bad(format!(
                "{} bytes, expected {} ({} layers × {} f32)",
                bytes.len(),
                want * 4,
                shape.n_layer,
                shape.n_embd
            )));
        }
        let dirs: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(i) = dirs.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "value {} (layer {}, element {}) is not finite",
                dirs[i],
                i / shape.n_embd,
                i % shape.n_embd
            )));
        }
        Ok(dirs)
    }

    /// Steering from `slots` (in application order) for `shape`: at most [`MAX_SLOTS`], scales
    /// finite and within ±[`MAX_SCALE`], directions of `n_layer · n_embd` finite values. Slots
    /// whose two scales are 0 are dropped; `None` when none is left (no edit at all).
    pub fn new(shape: &Shape, slots: Vec<SteeringSlot>) -> Result<Option<Steering>> {
        if slots.len() > MAX_SLOTS {
            return Err(bad(format!(
                "{} steering files, at most {MAX_SLOTS}",
                slots.len()
            )));
        }
        let want = shape.n_layer * shape.n_embd;
        for s in &slots {
            for (name, v) in [("ffn", s.ffn), ("attn", s.attn)] {
                if !v.is_finite() || v.abs() > MAX_SCALE {
                    return Err(bad(format!(
                        "{}: {name} scale {v} is outside [-{MAX_SCALE}, {MAX_SCALE}]",
                        s.source
                    )));
                }
            }
            if s.dirs.len() != want {
                return Err(bad(format!(
                    "{}: {} values, expected {want} ({} layers × {})",
                    s.source,
                    s.dirs.len(),
                    shape.n_layer,
                    shape.n_embd
                )));
            }
            if s.dirs.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "{}: a direction value is not finite",
                    s.source
                )));
            }
        }
        let slots: Vec<SteeringSlot> = slots
            .into_iter()
            .filter(|s| s.ffn != 0.0 || s.attn != 0.0)
            .collect();
        Ok((!slots.is_empty()).then_some(Steering {
            n_layer: shape.n_layer,
            n_embd: shape.n_embd,
            slots,
        }))
    }

    /// The slots (each with at least one non-zero scale), in application order.
    pub fn slots(&self) -> &[SteeringSlot] {
        &self.slots
    }

    /// Layers and width the directions are for.
    pub fn dims(&self) -> (usize, usize) {
        (self.n_layer, self.n_embd)
    }

    /// Whether this steering was built for `shape`.
    pub fn fits(&self, shape: &Shape) -> bool {
        self.n_layer == shape.n_layer && self.n_embd == shape.n_embd
    }

    /// Whether any slot edits `which`.
    pub fn active(&self, which: Sublayer) -> bool {
        self.slots.iter().any(|s| s.scale(which) != 0.0)
    }

    /// Layer `il`'s direction of slot `slot`.
    pub fn dir(&self, slot: usize, il: usize) -> &[f32] {
        &self.slots[slot].dirs[il * self.n_embd..(il + 1) * self.n_embd]
    }

    /// The edits of layer `il` for `which`: `(direction, scale)` of every slot with a non-zero
    /// scale there, in order.
    pub fn edits(&self, which: Sublayer, il: usize) -> impl Iterator<Item = (&[f32], f32)> {
        self.slots
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.scale(which) != 0.0)
            .map(move |(i, s)| (self.dir(i, il), s.scale(which)))
    }

    /// Apply layer `il`'s edits for `which` to one row of `n_embd` values, slot by slot.
    pub fn apply_row(&self, which: Sublayer, il: usize, y: &mut [f32]) {
        for (d, scale) in self.edits(which, il) {
            crate::ops::dir_steer(y, d, scale);
        }
    }

    /// A canonical byte string of the configuration (per slot in order: both scales and every
    /// direction value, little-endian), for cache keys: equal for equal steering.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(16 + self.slots.len() * (8 + 4 * self.n_layer * self.n_embd));
        b.extend_from_slice(b"ds4-rs steering v1\0");
        for v in [self.n_layer, self.n_embd, self.slots.len()] {
            b.extend_from_slice(&(v as u64).to_le_bytes());
        }
        for s in &self.slots {
            b.extend_from_slice(&s.ffn.to_le_bytes());
            b.extend_from_slice(&s.attn.to_le_bytes());
            for v in &s.dirs {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// One line for logs: `N slot(s): SOURCE (ffn F, attn A), ...`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .slots
            .iter()
            .map(|s| format!("{} (ffn {}, attn {})", s.source, s.ffn, s.attn))
            .collect();
        format!(
            "{} slot{}: {}",
            self.slots.len(),
            if self.slots.len() == 1 { "" } else { "s" },
            parts.join(", ")
        )
    }
}

/// `n_layer × n_embd` pseudo-random unit directions (one per layer; xorshift64 from `seed`, the
/// components uniform in [-0.5, 0.5) before normalising): steering files for tests and tools that
/// have no model run to extract a direction from.
pub fn random_unit_directions(shape: &Shape, seed: u64) -> Vec<f32> {
    let mut st = seed | 1;
    let mut out = Vec::with_capacity(shape.n_layer * shape.n_embd);
    for _ in 0..shape.n_layer {
        let v: Vec<f64> = (0..shape.n_embd)
            .map(|_| {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                (st >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        out.extend(v.iter().map(|x| (x / n) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        let mut s = Shape::flash_layers(2);
        s.n_embd = 8;
        s
    }

    fn slot(dirs: Vec<f32>, ffn: f32, attn: f32) -> SteeringSlot {
        SteeringSlot {
            source: "t".into(),
            dirs,
            ffn,
            attn,
        }
    }

    #[test]
    fn file_size_and_values() {
        let s = shape();
        let ok: Vec<u8> = (0..16).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let d = Steering::parse_directions(&ok, &s).unwrap();
        assert_eq!(d[5], 5.0);
        let e = Steering::parse_directions(&ok[..60], &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("60 bytes") && e.contains("expected 64"), "{e}");
        let mut nan = ok.clone();
        nan[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = Steering::parse_directions(&nan, &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 0, element 3"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.f32");
        std::fs::write(&p, &ok[..4]).unwrap();
        let e = Steering::read_directions(&p, &s).unwrap_err().to_string();
        assert!(
            e.contains("d.f32") && e.contains("4 bytes, expected 64"),
            "{e}"
        );
    }

    #[test]
    fn slots_validated_and_inactive_dropped() {
        let s = shape();
        let d = vec![0.5f32; 16];
        assert!(Steering::new(&s, vec![]).unwrap().is_none());
        assert!(
            Steering::new(&s, vec![slot(d.clone(), 0.0, 0.0)])
                .unwrap()
                .is_none()
        );
        let st = Steering::new(
            &s,
            vec![
                slot(d.clone(), 0.0, 0.0),
                slot(d.clone(), 2.0, 0.0),
                slot(d.clone(), 0.0, -1.0),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(st.slots().len(), 2);
        assert!(st.active(Sublayer::Ffn) && st.active(Sublayer::Attn));
        assert_eq!(st.edits(Sublayer::Ffn, 1).count(), 1);
        assert_eq!(st.edits(Sublayer::Attn, 0).next().unwrap().1, -1.0);
        assert!(Steering::new(&s, vec![slot(d.clone(), 100.5, 0.0)]).is_err());
        assert!(Steering::new(&s, vec![slot(d.clone(), f32::NAN, 0.0)]).is_err());
        assert!(Steering::new(&s, vec![slot(vec![0.5; 15], 1.0, 0.0)]).is_err());
        assert!(Steering::new(&s, vec![slot(d.clone(), 1.0, 0.0); MAX_SLOTS + 1]).is_err());
        assert!(Steering::new(&s, vec![slot(d.clone(), 1.0, 0.0); MAX_SLOTS]).is_ok());
    }

    #[test]
    fn rows_edited_slot_by_slot() {
        let s = shape();
        // Slot 0: e1 at layer 0, e2 at layer 1. Slot 1: e1 everywhere (amplify).
        let mut d0 = vec![0f32; 16];
        d0[1] = 1.0;
        d0[8 + 2] = 1.0;
        let mut d1 = vec![0f32; 16];
        d1[1] = 1.0;
        d1[8 + 1] = 1.0;
        let st = Steering::new(&s, vec![slot(d0, 1.0, 0.0), slot(d1, -1.0, 0.0)])
            .unwrap()
            .unwrap();
        let y0: Vec<f32> = (1..=8).map(|v| v as f32).collect();
        // Layer 0: slot 0 zeroes y[1], then slot 1 doubles it (still 0).
        let mut y = y0.clone();
        st.apply_row(Sublayer::Ffn, 0, &mut y);
        assert_eq!(y, [1.0, 0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        // Layer 1: slot 0 zeroes y[2], slot 1 doubles y[1].
        let mut y = y0.clone();
        st.apply_row(Sublayer::Ffn, 1, &mut y);
        assert_eq!(y, [1.0, 4.0, 0.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        // No attention edit.
        let mut y = y0.clone();
        st.apply_row(Sublayer::Attn, 1, &mut y);
        assert_eq!(y, y0);
        // Canonical bytes follow the configuration.
        let st2 = Steering::new(&s, st.slots().iter().rev().cloned().collect())
            .unwrap()
            .unwrap();
        assert_ne!(st.canonical_bytes(), st2.canonical_bytes());
        assert_eq!(st.canonical_bytes(), st.clone().canonical_bytes());
        assert_ne!(st, st2);
        assert_eq!(st, st.clone());
    }
}
