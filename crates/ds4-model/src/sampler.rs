//! Token sampling exactly as ds4 does it (`sample_top_p_min_p`, `sample_full_vocab`,
//! `sample_argmax`; ds4-features.md §1.4), so a seed reproduces ds4's choices.

/// Sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerParams {
    /// `≤ 0`: greedy (first maximum).
    pub temperature: f32,
    /// `≤ 0`: full vocabulary; otherwise capped at 1024.
    pub top_k: i32,
    /// Outside `(0, 1]` means 1 (no nucleus cut).
    pub top_p: f32,
    /// Relative probability floor (`< 0` means 0).
    pub min_p: f32,
}

impl SamplerParams {
    /// Greedy decoding.
    pub fn greedy() -> SamplerParams {
        SamplerParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    }
}

/// ds4's RNG: xorshift64* (zero state replaced by `0x9e3779b97f4a7c15`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// Next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        if x == 0 {
            x = 0x9e37_79b9_7f4a_7c15;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`: `((x >> 40) & 0xffffff) / 2^24`.
    pub fn next_f32(&mut self) -> f32 {
        let x = self.next_u64();
        ((x >> 40) & 0xff_ffff) as f32 / 16_777_216.0
    }
}

/// Index of the first maximum (`logits[i] > best`; NaNs never win, a NaN at index 0 stays).
pub fn argmax(logits: &[f32]) -> u32 {
    match logits.first() {
        Some(v) if !v.is_nan() => {
            first_max_where(logits, |v| !v.is_nan(), None).map_or(0, |(i, _)| i as u32)
        }
        _ => 0,
    }
}

/// The first index of the largest non-NaN logit other than `exclude` (0 when there is none);
/// with no exclusion, [`argmax`].
pub fn argmax_excluding(logits: &[f32], exclude: Option<u32>) -> u32 {
    match exclude {
        None => argmax(logits),
        Some(e) => {
            first_max_where(logits, |v| !v.is_nan(), Some(e as usize)).map_or(0, |(i, _)| i as u32)
        }
    }
}

/// The first index (and value) of the largest value among those `keep` accepts, never
/// `exclude`; None when no value is accepted. `keep` must reject NaN (a NaN is no maximum). The same result as the left-to-right scan
/// `if keep(v) && (best is none || v > best) { best = (i, v) }` (ties: the lower index; `-0.0`
/// and `0.0` are equal), in two passes that vectorize: a lane-wise maximum, then the first
/// accepted index holding it. A decode step scans the whole vocabulary (129280 logits) once per
/// token: ~15 µs instead of ~130 µs for the scan.
pub fn first_max_where(
    xs: &[f32],
    keep: impl Fn(f32) -> bool + Copy,
    exclude: Option<usize>,
) -> Option<(usize, f32)> {
    let e = exclude.filter(|&e| e < xs.len());
    let (m, any) = match e {
        None => lane_max(xs, keep),
        Some(e) => {
            let (a, x) = lane_max(&xs[..e], keep);
            let (b, y) = lane_max(&xs[e + 1..], keep);
            (if b > a { b } else { a }, x || y)
        }
    };
    if !any {
        return None;
    }
    let hit = |s: &[f32]| s.iter().position(|&v| keep(v) && v == m);
    match e {
        None => hit(xs),
        Some(e) => hit(&xs[..e]).or_else(|| hit(&xs[e + 1..]).map(|i| i + e + 1)),
    }
    .map(|i| (i, xs[i]))
}

/// The largest accepted value of `xs` (−∞ when none) and whether any was accepted: 16
/// independent lanes (compare-and-select, no branches), then the lanes and the tail.
fn lane_max(xs: &[f32], keep: impl Fn(f32) -> bool + Copy) -> (f32, bool) {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    let mut any = [false; L];
    let chunks = xs.chunks_exact(L);
    let rem = chunks.remainder();
    for c in chunks {
        for j in 0..L {
            let v = c[j];
            let k = keep(v);
            let w = if k { v } else { f32::NEG_INFINITY };
            m[j] = if w > m[j] { w } else { m[j] };
            any[j] |= k;
        }
    }
    let (mut mm, mut a) = (f32::NEG_INFINITY, false);
    for j in 0..L {
        if m[j] > mm {
            mm = m[j];
        }
        a |= any[j];
    }
    for &v in rem {
        if keep(v) {
            a = true;
            if v > mm {
                mm = v;
            }
        }
    }
    (mm, a)
}

/// Sample a token id from `logits` (ds4's `sample_top_p_min_p`).
pub fn sample(logits: &[f32], p: &SamplerParams, rng: &mut Rng) -> u32 {
    if logits.is_empty() {
        return 0;
    }
    let temp = p.temperature;
    if temp <= 0.0 {
        return argmax(logits);
    }
    let top_p = if p.top_p <= 0.0 || p.top_p > 1.0 {
        1.0
    } else {
        p.top_p
    };
    let min_p = p.min_p.max(0.0);
    if p.top_k <= 0 {
        return sample_full_vocab(logits, temp, top_p, min_p, rng);
    }
    let top_k = (p.top_k.min(1024) as usize).min(logits.len());
    // Partial insertion sort of the top_k finite logits (descending, first index on ties).
    let mut ids: Vec<u32> = Vec::with_capacity(top_k);
    let mut vals: Vec<f32> = Vec::with_capacity(top_k);
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        let n = vals.len();
        if n == top_k && v <= vals[n - 1] {
            continue;
        }
        let mut j = if n < top_k {
            vals.push(v);
            ids.push(i as u32);
            n
        } else {
            n - 1
        };
        while j > 0 && vals[j - 1] < v {
            vals[j] = vals[j - 1];
            ids[j] = ids[j - 1];
            j -= 1;
        }
        vals[j] = v;
        ids[j] = i as u32;
    }
    if vals.is_empty() {
        return argmax(logits);
    }
    let max_logit = vals[0];
    let probs: Vec<f32> = vals
        .iter()
        .map(|&v| ((v - max_logit) / temp).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    if sum <= 0.0 || !sum.is_finite() {
        return ids[0];
    }
    let min_prob = (probs[0] / sum) * min_p;
    let mut filtered_sum = 0.0f32;
    let mut filtered = 0usize;
    for (i, &pr) in probs.iter().enumerate() {
        if i > 0 && pr / sum < min_prob {
            break;
        }
        filtered_sum += pr;
        filtered += 1;
        if filtered_sum / sum >= top_p {
            break;
        }
    }
    if filtered == 0 {
        return ids[0];
    }
    let mut r = rng.next_f32() * filtered_sum;
    for i in 0..filtered {
        r -= probs[i];
        if r <= 0.0 {
            return ids[i];
        }
    }
    ids[filtered - 1]
}

fn sample_full_vocab(logits: &[f32], temp: f32, top_p: f32, min_p: f32, rng: &mut Rng) -> u32 {
    // ds4's scan: the largest finite logit above -1e30 (first index on ties), else (0, -1e30).
    let Some((bi, bv)) = first_max_where(logits, f32::is_finite, None) else {
        return argmax(logits);
    };
    let (best, max_logit) = if bv > -1e30 { (bi, bv) } else { (0, -1e30f32) };
    let weight = |v: f32| ((v - max_logit) / temp).exp();
    // `below(c)`: a logit-space bound under which a weight is certainly below e^c: v < max +
    // (c − 2)·T, compared exactly in f64 (two nats of margin for every rounding of the f32
    // weight). Tokens under such a bound are skipped without computing their weight exactly
    // where ds4's loops would skip them or add nothing; everything else is computed as ds4
    // does, in the same order, so the result and the random draws are ds4's.
    let (m64, t64) = (max_logit as f64, temp as f64);
    let below = |c: f64| m64 + (c - 2.0) * t64;
    // exp(x) is 0.0 in f32 for x < −104: adding it changes no sum.
    let zero_below = below(-110.0);
    // For an f32 accumulator a ≥ 2^e (normal, > 0): a weight under 2^(e−25) is under half an
    // ulp of a, so a ± weight rounds back to a. The bound depends on a's exponent only.
    let absorb = |a: f32| -> f64 {
        if a.is_finite() && a >= 1e-30 {
            let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
            below((e - 25) as f64 * std::f64::consts::LN_2)
        } else {
            f64::NEG_INFINITY
        }
    };
    // ds4's pass in token-id order over the weights it keeps (finite logits, weight not below
    // `keep_min`): `step(i, p)` sees each kept weight and returns true to stop. Tokens under
    // `floor`, or under the bound at which `acc()` (the loop's accumulator) cannot change, are
    // skipped: ds4 drops them or they leave its accumulator (and so its stop test) as it was.
    let walk = |floor: f64,
                keep_min: f32,
                acc: &dyn Fn() -> f32,
                step: &mut dyn FnMut(usize, f32) -> bool| {
        let mut ebits = acc().to_bits() >> 23;
        let mut skip = floor.max(absorb(acc()));
        for (i, &v) in logits.iter().enumerate() {
            if !v.is_finite() || (v as f64) < skip {
                continue;
            }
            let p = weight(v);
            if p < keep_min {
                continue;
            }
            if step(i, p) {
                return Some(i);
            }
            if acc().to_bits() >> 23 != ebits {
                ebits = acc().to_bits() >> 23;
                skip = floor.max(absorb(acc()));
            }
        }
        None
    };
    // ds4's f32 sum of the kept weights, in token-id order.
    let sum_kept = |floor: f64, keep_min: f32| -> f32 {
        let sum = std::cell::Cell::new(0.0f32);
        walk(floor, keep_min, &|| sum.get(), &mut |_, p| {
            sum.set(sum.get() + p);
            false
        });
        sum.get()
    };
    if top_p >= 1.0 {
        // Token-id order, no sort. With min_p > 0 a weight < min_p is dropped; with min_p = 0
        // every finite token counts (exact zeros change nothing).
        let floor = if min_p > 0.0 {
            below((min_p as f64).ln())
        } else {
            zero_below
        };
        let sum = sum_kept(floor, min_p);
        if sum <= 0.0 || !sum.is_finite() {
            return best as u32;
        }
        let r = std::cell::Cell::new(rng.next_f32() * sum);
        if r.get() <= 0.0 && min_p <= 0.0 {
            // ds4 returns the first token it keeps, which here may be one of weight 0.
            return logits.iter().position(|v| v.is_finite()).unwrap_or(best) as u32;
        }
        let hit = walk(floor, min_p, &|| r.get(), &mut |_, p| {
            r.set(r.get() - p);
            r.get() <= 0.0
        });
        return hit.unwrap_or(best) as u32;
    }
    // Nucleus: the sum of every finite weight in token-id order, as ds4 forms it (min_p does
    // not filter it), without the weights it cannot change.
    let sum = sum_kept(zero_below, 0.0);
    if sum <= 0.0 || !sum.is_finite() {
        return best as u32;
    }
    // ds4 sorts every finite token by logit (descending, stable: lower id first on ties) and
    // walks that order until a weight falls under the min-p floor or the mass reaches top_p;
    // the walk only ever visits a prefix of the order. So sort only the tokens above a bound
    // (a prefix of the same order), walk them, and widen the bound in the rare case the walk
    // runs out before it stops — unless every token below the bound is under the min-p floor,
    // where ds4's walk would stop at the first of them anyway. That floor is relative to the
    // first token's weight, 1 when it holds the maximum (not when every logit is ≤ -1e30: then
    // no floor); a min_p above 1 floors at the maximum itself (ds4 keeps only its ties).
    let floor_below = if min_p > 0.0 && bv > -1e30 {
        below((min_p as f64).ln().min(0.0))
    } else {
        f64::NEG_INFINITY
    };
    let mut nats = 8.0f64;
    loop {
        let bound = if nats.is_finite() {
            below(-nats).max(floor_below)
        } else {
            f64::NEG_INFINITY
        };
        let mut cand: Vec<(u32, f32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|&(_, &v)| v.is_finite() && (v as f64) >= bound)
            .map(|(i, &v)| (i as u32, v, weight(v)))
            .collect();
        if cand.is_empty() {
            // Every token under the bound (the maximum is not the first weight's reference
            // point, or the bound is not finite): widen up to all finite tokens, never empty.
            nats = f64::INFINITY;
            continue;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        let min_prob = (cand[0].2 / sum) * min_p;
        let mut filtered_sum = 0.0f32;
        let mut filtered = 0usize;
        let mut stopped = false;
        for (i, c) in cand.iter().enumerate() {
            let p = c.2 / sum;
            if i > 0 && p < min_prob {
                stopped = true;
                break;
            }
            filtered_sum += c.2;
            filtered += 1;
            if filtered_sum / sum >= top_p {
                stopped = true;
                break;
            }
        }
        if !stopped && bound > floor_below && nats.is_finite() {
            nats = if nats < 64.0 {
                nats * 2.0
            } else {
                f64::INFINITY
            };
            continue;
        }
        if filtered == 0 {
            return best as u32;
        }
        let mut r = rng.next_f32() * filtered_sum;
        for c in &cand[..filtered] {
            r -= c.2;
            if r <= 0.0 {
                return c.0;
            }
        }
        return cand[filtered - 1].0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_matches_xorshift64_star() {
        // Reference values computed by hand from the C definition.
        let mut r = Rng::new(1);
        let x1 = {
            let mut x: u64 = 1;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x
        };
        assert_eq!(r.next_u64(), x1.wrapping_mul(0x2545F4914F6CDD1D));
        assert_eq!(r.state, x1);
        let mut z = Rng::new(0);
        let mut s = Rng::new(0x9e3779b97f4a7c15);
        assert_eq!(z.next_u64(), s.next_u64());
        let mut u = Rng::new(42);
        for _ in 0..1000 {
            let f = u.next_f32();
            assert!((0.0..1.0).contains(&f));
        }
    }

    /// A random logit row of `n` values: one in `every` from `special`, the rest small integers
    /// `-spread/2 ..= spread/2` (ties on purpose).
    fn random_row(rng: &mut Rng, n: usize, special: &[f32], every: u64, spread: u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let r = rng.next_u64();
                if r.is_multiple_of(every) {
                    special[(r >> 8) as usize % special.len()]
                } else {
                    ((r >> 20) % spread) as f32 - (spread / 2) as f32
                }
            })
            .collect()
    }

    #[test]
    fn argmax_excluding_follows_from_the_best_two() {
        assert_eq!(argmax_excluding(&[0.0, 3.0, 2.0], None), 1);
        assert_eq!(argmax_excluding(&[0.0, 3.0, 2.0], Some(1)), 2);
        assert_eq!(argmax_excluding(&[1.0, f32::NAN, 1.0], None), 0);
        assert_eq!(argmax_excluding(&[f32::NAN, 1.0], None), 0);
        assert_eq!(argmax_excluding(&[f32::NAN, 1.0], Some(7)), 1);
        // What `Session::greedy` does with a backend's pick [best, second] (rows without NaN):
        // excluding any id gives best, or second when best is the one excluded.
        let mut rng = Rng::new(11);
        let special = [f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 2.0];
        for _ in 0..2000 {
            let n = 2 + (rng.next_u64() % 40) as usize;
            let xs = random_row(&mut rng, n, &special, 4, 5);
            let best = argmax(&xs);
            let second = argmax_excluding(&xs, Some(best));
            assert_ne!(best, second);
            for e in 0..n as u32 + 1 {
                let want = if e == best { second } else { best };
                assert_eq!(argmax_excluding(&xs, Some(e)), want, "{xs:?} {e}");
            }
        }
    }

    #[test]
    fn first_max_where_is_the_scan() {
        // The scan it replaces, for every kind of value a logit row can hold.
        fn scan(xs: &[f32], keep: impl Fn(f32) -> bool, ex: Option<usize>) -> Option<(usize, f32)> {
            let mut best: Option<(usize, f32)> = None;
            for (i, &v) in xs.iter().enumerate() {
                if Some(i) == ex || !keep(v) {
                    continue;
                }
                if best.is_none_or(|(_, b)| v > b) {
                    best = Some((i, v));
                }
            }
            best
        }
        fn naive_argmax(xs: &[f32]) -> u32 {
            let mut best = 0usize;
            for (i, &v) in xs.iter().enumerate().skip(1) {
                if v > xs[best] {
                    best = i;
                }
            }
            best as u32
        }
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1.0,
            2.0,
        ];
        let mut rng = Rng::new(7);
        for case in 0..3000 {
            let n = (rng.next_u64() % 70) as usize;
            let xs = random_row(&mut rng, n, &special, 3, 9);
            let ex = (case % 2 == 0).then(|| (rng.next_u64() % (n as u64 + 2)) as usize);
            let same = |a: Option<(usize, f32)>, b: Option<(usize, f32)>| {
                a.map(|x| (x.0, x.1.to_bits())) == b.map(|x| (x.0, x.1.to_bits()))
            };
            let keep_nn = |v: f32| !v.is_nan();
            assert!(
                same(first_max_where(&xs, keep_nn, ex), scan(&xs, keep_nn, ex)),
                "{xs:?} {ex:?}"
            );
            let fin = |v: f32| v.is_finite();
            assert!(
                same(first_max_where(&xs, fin, ex), scan(&xs, fin, ex)),
                "{xs:?} {ex:?}"
            );
            assert_eq!(argmax(&xs), naive_argmax(&xs), "{xs:?}");
        }
        // Long rows: the lane-wise pass and the tail.
        for n in [129280usize, 1000, 17] {
            let mut xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32).collect();
            xs[n / 3] = f32::NAN;
            assert_eq!(argmax(&xs), naive_argmax(&xs));
            let best = scan(&xs, |v| !v.is_nan(), None).unwrap().0;
            assert_eq!(
                first_max_where(&xs, |v| !v.is_nan(), Some(best)),
                scan(&xs, |v| !v.is_nan(), Some(best))
            );
        }
    }

    /// ds4's `sample_full_vocab` as first written here (a scan, a full sort): the fast one must
    /// give the same token and leave the generator in the same state.
    fn sample_full_vocab_ref(
        logits: &[f32],
        temp: f32,
        top_p: f32,
        min_p: f32,
        rng: &mut Rng,
    ) -> u32 {
        let mut max_logit = -1e30f32;
        let mut best = 0usize;
        let mut finite = 0usize;
        for (i, &v) in logits.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            finite += 1;
            if v > max_logit {
                max_logit = v;
                best = i;
            }
        }
        if finite == 0 {
            return argmax(logits);
        }
        if top_p >= 1.0 {
            // Token-id order, no sort.
            let weight = |v: f32| ((v - max_logit) / temp).exp();
            let mut sum = 0.0f32;
            for &v in logits {
                if !v.is_finite() {
                    continue;
                }
                let p = weight(v);
                if p < min_p {
                    continue;
                }
                sum += p;
            }
            if sum <= 0.0 || !sum.is_finite() {
                return best as u32;
            }
            let mut r = rng.next_f32() * sum;
            for (i, &v) in logits.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let p = weight(v);
                if p < min_p {
                    continue;
                }
                r -= p;
                if r <= 0.0 {
                    return i as u32;
                }
            }
            return best as u32;
        }
        // Nucleus: candidates sorted by descending logit (stable: lower id first on ties).
        let mut cand: Vec<(u32, f32, f32)> = Vec::with_capacity(finite);
        let mut sum = 0.0f32;
        for (i, &v) in logits.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let p = ((v - max_logit) / temp).exp();
            cand.push((i as u32, v, p));
            sum += p;
        }
        if sum <= 0.0 || !sum.is_finite() {
            return best as u32;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        let min_prob = (cand[0].2 / sum) * min_p;
        let mut filtered_sum = 0.0f32;
        let mut filtered = 0usize;
        for (i, c) in cand.iter().enumerate() {
            let p = c.2 / sum;
            if i > 0 && p < min_prob {
                break;
            }
            filtered_sum += c.2;
            filtered += 1;
            if filtered_sum / sum >= top_p {
                break;
            }
        }
        if filtered == 0 {
            return best as u32;
        }
        let mut r = rng.next_f32() * filtered_sum;
        for c in &cand[..filtered] {
            r -= c.2;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[filtered - 1].0
    }

    /// `draws` samples from generator states taken from `g` (well mixed: a small seed's first
    /// draws are near 0): the same token and the same generator state as the reference.
    fn same_as_reference(
        logits: &[f32],
        temp: f32,
        top_p: f32,
        min_p: f32,
        draws: usize,
        g: &mut Rng,
        what: &str,
    ) {
        for _ in 0..draws {
            let mut a = Rng::new(g.next_u64());
            let mut b = a;
            let fast = sample_full_vocab(logits, temp, top_p, min_p, &mut a);
            let slow = sample_full_vocab_ref(logits, temp, top_p, min_p, &mut b);
            assert_eq!(
                (fast, a.state),
                (slow, b.state),
                "{what} T {temp} top_p {top_p} min_p {min_p}"
            );
        }
    }

    #[test]
    fn full_vocab_sampling_is_the_reference() {
        let mut g = Rng::new(2024);
        for n in [1usize, 2, 7, 64, 1000, 20000] {
            for shape in 0..7 {
                let logits: Vec<f32> = (0..n)
                    .map(|i| {
                        let u = g.next_f32();
                        match shape {
                            0 => u * 30.0 - 10.0,                                        // flat-ish
                            1 => -(u * u) * 60.0 + if i % 97 == 3 { 25.0 } else { 0.0 }, // peaked
                            2 => (u * 8.0).floor(), // many ties
                            3 => {
                                if u < 0.1 {
                                    f32::NEG_INFINITY
                                } else if u < 0.12 {
                                    f32::NAN
                                } else {
                                    u * 5.0
                                }
                            }
                            4 => {
                                if u < 0.5 {
                                    0.0
                                } else {
                                    -0.0
                                }
                            } // signed zeros
                            5 => u * 1e4 - 5e3, // huge spread
                            // one token 12-13 logits above a large low cluster: the nucleus walk must look past its
                            // first bound (8 + 2 nats at T = 1)
                            _ => {
                                if i == n / 2 {
                                    10.0
                                } else {
                                    -2.0 - u
                                }
                            }
                        }
                    })
                    .collect();
                for &temp in &[0.05f32, 0.6, 1.0, 3.0, 10.0] {
                    for &top_p in &[1.0f32, 0.99999, 0.999, 0.95, 0.5, 0.01] {
                        for &min_p in &[0.0f32, 0.05, 0.5] {
                            let what = format!("n {n} shape {shape}");
                            same_as_reference(&logits, temp, top_p, min_p, 4, &mut g, &what);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn full_vocab_sampling_extremes_are_the_reference() {
        // Parameters a request can carry (the server takes any finite number, and f32 casts
        // of large ones are infinite) and logits at or below ds4's -1e30 floor for the maximum.
        let mut g = Rng::new(77);
        let rows: Vec<Vec<f32>> = vec![
            vec![-3.303e30, -3.81e30],
            (0..50).map(|_| -1e30 - g.next_f32() * 3e30).collect(),
            (0..50).map(|_| -1e30 + g.next_f32() * 2e30).collect(),
            (0..300).map(|_| g.next_f32() * 20.0 - 10.0).collect(),
            vec![f32::MAX, -f32::MAX, 0.0, f32::MAX],
            vec![f32::NAN, 1.0, f32::INFINITY, -f32::INFINITY, 1.0],
        ];
        let temps = [1e-45f32, 1e-20, 0.3, 1e29, 1e30, f32::INFINITY, f32::NAN];
        let top_ps = [1.0f32, 0.9, 0.3, f32::NAN];
        let min_ps = [0.0f32, 0.5, 1.0, 5.0, 10.0, f32::INFINITY, f32::NAN];
        for logits in &rows {
            for &temp in &temps {
                for &top_p in &top_ps {
                    for &min_p in &min_ps {
                        let what = format!("{logits:?}");
                        same_as_reference(logits, temp, top_p, min_p, 3, &mut g, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn greedy_takes_first_max() {
        let l = [1.0, 3.0, 3.0, -1.0];
        assert_eq!(argmax(&l), 1);
        let mut rng = Rng::new(7);
        assert_eq!(sample(&l, &SamplerParams::greedy(), &mut rng), 1);
        assert_eq!(rng.state, 7, "greedy must not consume randomness");
    }

    #[test]
    fn full_vocab_min_p_and_order() {
        // With min_p = 0.5 only tokens whose weight exp((l-max)/T) >= 0.5 survive.
        let l = [0.0f32, 10.0, 9.9, 1.0, f32::NAN];
        let p = SamplerParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
        };
        let mut rng = Rng::new(123);
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[sample(&l, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3] + seen[4], 0);
        assert!(seen[1] > seen[2] && seen[2] > 700, "{seen:?}");
        // Reproduce one draw by hand: token-id-order accumulation.
        let mut a = Rng::new(99);
        let mut b = Rng::new(99);
        let got = sample(&l, &p, &mut a);
        let w1 = 1.0f32;
        let w2 = ((9.9f32 - 10.0) / 1.0).exp();
        let r = b.next_f32() * (w1 + w2);
        let want = if r - w1 <= 0.0 { 1 } else { 2 };
        assert_eq!(got, want);
    }

    #[test]
    fn top_p_and_top_k_paths() {
        let l = [1.0f32, 5.0, 4.0, 0.0, 4.5];
        // top_p tiny: only the best token.
        let p = SamplerParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.01,
            min_p: 0.0,
        };
        let mut rng = Rng::new(5);
        for _ in 0..50 {
            assert_eq!(sample(&l, &p, &mut rng), 1);
        }
        // top_k 2: only tokens 1 and 4.
        let p = SamplerParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
        };
        let mut seen = [0usize; 5];
        for _ in 0..1000 {
            seen[sample(&l, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[3], 0);
        assert!(seen[1] > 0 && seen[4] > 0);
        // Same draw by hand for top_k.
        let mut a = Rng::new(77);
        let mut b = Rng::new(77);
        let got = sample(&l, &p, &mut a);
        let pr = [1.0f32, (4.5f32 - 5.0).exp()];
        let r = b.next_f32() * (pr[0] + pr[1]);
        assert_eq!(got, if r - pr[0] <= 0.0 { 1 } else { 4 });
    }
}
