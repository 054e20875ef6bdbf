//! Prefill pass sizing: estimates of the device memory the KV state and a pass's scratch take,
//! and the pass the backend shrinks to when `CudaOptions::fit_chunk` is set (no GPU needed).

use ds4_model::Shape;

/// Estimated device bytes of the KV state for `ctx` tokens (compressed and indexer rows; the raw
/// ring is counted per pass token in [`pass_bytes`]).
pub fn kv_bytes(s: &Shape, plan: &ds4_model::Plan, ctx: usize) -> usize {
    plan.layers
        .iter()
        .map(|l| {
            let rows = ctx.checked_div(l.attn.ratio()).map_or(0, |r| r + 1);
            let idx = if l.attn.has_indexer() {
                s.index_head_dim
            } else {
                0
            };
            // f32 rows, plus the attention route's f16 hi/lo copy of the visible rows.
            rows * (2 * s.head_dim + idx) * 4
        })
        .sum()
}

/// Estimated device bytes that scale with the pass size `n`: the chunk scratch (the f32
/// activations of every sublayer), the raw KV rings, the routed-MoE partial sums, the Q8_0
/// activations, with a quarter more for what is not itemised (tensor-core staging, picks).
pub fn pass_bytes(s: &Shape, n: usize) -> usize {
    let hcd = s.hc_dim();
    let (e, nh, hd, k) = (s.n_embd, s.n_head, s.head_dim, s.n_expert_used);
    let f32s = 3 * hcd
        + 7 * e
        + 2 * s.q_lora_rank
        + 2 * nh * hd
        + 5 * hd
        + 4 * s.index_head_dim
        + s.index_heads * (s.index_head_dim + 1)
        + s.index_topk
        + s.o_groups * s.o_lora_rank
        + 2 * s.n_expert
        + k * s.n_ff_exp
        + s.n_ff_exp
        + k * e // tc MoE per-pair partial sums
        + s.n_layer * hd; // raw rings
    let q8 = nh * hd + e + k * s.n_ff_exp; // int8 activations (+ scales below)
    (f32s * 4 + q8 * 9 / 8) * n * 5 / 4
}

/// The largest pass ≤ `want` (halving, not below [`crate::MIN_FIT_PASS_TOKENS`]) whose estimated
/// KV state and scratch leave 1.5 GiB of `free` device memory beyond `fixed` bytes (buffers of
/// a size independent of the pass, e.g. the indexer scores).
pub fn fit_pass(
    s: &Shape,
    plan: &ds4_model::Plan,
    ctx: usize,
    want: usize,
    free: usize,
    fixed: usize,
) -> usize {
    let reserve = (3usize << 30) / 2 + fixed;
    let kv = kv_bytes(s, plan, ctx);
    let mut n = want;
    while n > crate::MIN_FIT_PASS_TOKENS && kv + pass_bytes(s, n) + reserve > free {
        n = (n / 2).max(crate::MIN_FIT_PASS_TOKENS);
    }
    n.min(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_pass_estimate_and_fit() {
        let s = Shape::flash();
        let plan = ds4_model::Plan::new(&s);
        let per_tok = pass_bytes(&s, 1);
        // ~1 MiB of scratch per pass token on Flash (f32 activations of 64 heads × 512 twice,
        // the 4 HC streams three times, the 6 experts' mid rows and partial sums).
        assert!((900 << 10..1600 << 10).contains(&per_tok), "{per_tok}");
        assert_eq!(pass_bytes(&s, 8192), 8192 * per_tok);
        let kv = kv_bytes(&s, &plan, 1 << 20);
        // 1M context: compressed rows of 21 CSA (ratio 4) + 20 HCA (ratio 128) layers, with
        // the indexer rows and the f16 copies: tens of GiB, not hundreds.
        assert!(kv > 10 << 30 && kv < 40 << 30, "{kv}");
        let gib = 1usize << 30;
        // Plenty of room: the pass stays as asked.
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, 60 * gib, 0), 8192);
        // Room for ~3 GiB of scratch: 2048 (the floor) after halving twice.
        let free = kv_bytes(&s, &plan, 65536) + pass_bytes(&s, 2048) + 2 * gib;
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, free, 0), 2048);
        let free = kv_bytes(&s, &plan, 65536) + pass_bytes(&s, 4096) + 2 * gib;
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, free, 0), 4096);
        // Never below the floor, never above the request.
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, 0, 0), 2048);
        assert_eq!(fit_pass(&s, &plan, 65536, 1024, 0, 0), 1024);
        assert_eq!(fit_pass(&s, &plan, 65536, 16384, 0, 0), 2048);
    }
}
