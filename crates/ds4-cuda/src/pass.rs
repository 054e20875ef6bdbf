//! Prefill pass sizing: estimates of the device memory the KV state and a pass's scratch take,
//! and the pass the backend shrinks to when `CudaOptions::fit_chunk` is set (no GPU needed).

use ds4_model::Shape;

/// Estimated device bytes of the KV state for `ctx` tokens (compressed and indexer rows; the raw
/// ring is counted per pass token in [`pass_bytes`]), with the buffers sized by the largest
/// layer's rows: the attention route's f16 hi/lo copy of the visible rows (one scratch shared by
/// the layers) and the int8 indexer's key codes (136 bytes a row).
pub fn kv_bytes(s: &Shape, plan: &ds4_model::Plan, ctx: usize) -> usize {
    let rows = |ratio: usize| ctx.checked_div(ratio).map_or(0, |r| r + 1);
    let state: usize = plan
        .layers
        .iter()
        .map(|l| {
            let idx = if l.attn.has_indexer() {
                s.index_head_dim
            } else {
                0
            };
            rows(l.attn.ratio()) * (s.head_dim + idx) * 4
        })
        .sum();
    let max_rows = |indexed: bool| {
        plan.layers
            .iter()
            .filter(|l| !indexed || l.attn.has_indexer())
            .map(|l| rows(l.attn.ratio()))
            .max()
            .unwrap_or(0)
    };
    // f16 hi + lo of head_dim values a row, its compact copy (hi + lo of one eighth) and flag
    // word; int8 codes + 8 scale bytes of index_head_dim.
    let attn_row = s.head_dim * 4 + (s.head_dim + s.head_dim / 8) * 2 + 4;
    state + max_rows(false) * attn_row + max_rows(true) * (s.index_head_dim + 8)
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
    let idx8 = s.index_heads * (s.index_head_dim + 4); // int8 indexer query codes + exponents
    (f32s * 4 + q8 * 9 / 8 + idx8) * n * 5 / 4
}

/// What a pass of `n` tokens is estimated to need in all: the KV state, the pass's scratch,
/// `fixed` bytes and a reserve of 1.5 GiB (cuBLAS, the decode graph, allocator slack).
pub fn need_bytes(s: &Shape, plan: &ds4_model::Plan, ctx: usize, n: usize, fixed: usize) -> usize {
    kv_bytes(s, plan, ctx) + pass_bytes(s, n) + (3usize << 30) / 2 + fixed
}

/// The largest pass ≤ `want` (halving, not below [`crate::MIN_FIT_PASS_TOKENS`]) whose
/// [`need_bytes`] fit in `free` device memory (`fixed`: buffers of a size independent of the
/// pass, e.g. the indexer scores).
pub fn fit_pass(
    s: &Shape,
    plan: &ds4_model::Plan,
    ctx: usize,
    want: usize,
    free: usize,
    fixed: usize,
) -> usize {
    let mut n = want;
    while n > crate::MIN_FIT_PASS_TOKENS && need_bytes(s, plan, ctx, n, fixed) > free {
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
        // Exactly what 2048 or 4096 need: halved twice or once.
        let free = need_bytes(&s, &plan, 65536, 2048, 0);
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, free, 0), 2048);
        let free = need_bytes(&s, &plan, 65536, 4096, 0);
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, free, 0), 4096);
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, free - 1, 0), 2048);
        // `fixed` counts.
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, free, 1), 2048);
        // Never below the floor, never above the request.
        assert_eq!(fit_pass(&s, &plan, 65536, 8192, 0, 0), 2048);
        assert_eq!(fit_pass(&s, &plan, 65536, 1024, 0, 0), 1024);
        assert_eq!(fit_pass(&s, &plan, 65536, 16384, 0, 0), 2048);
    }
}
