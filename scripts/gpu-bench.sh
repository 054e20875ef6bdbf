#!/usr/bin/env bash
# Decode/prefill benchmark of the synthetic q2 Flash model on the GPU host (issues 5 and 6).
# Needs the release `ds4` (--features cuda) at $DS4 (default: unpacked from .gpu/check.tar.xz by
# scripts/gpu-check.sh into /tmp/ds4-check). Writes the CSVs to $OUT and prints them last.
#   [QUALITY_MAX=N] bash scripts/gpu-bench.sh LAYERS [GEN_TOKENS]
# Decode at 2k / 8k / 32k, then whole-prompt prefill (512 … 32768, `--whole-prompt`) with the
# tensor-core routes and with --quality (up to QUALITY_MAX). H200: 43 layers (86.7 GB); H100:
# at most 36.
set -uo pipefail
cd "$(dirname "$0")/.."
L=${1:-43}
GEN=${2:-64}
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
if [ -z "${DS4:-}" ]; then
  mkdir -p /tmp/ds4-check
  [ -x /tmp/ds4-check/ds4 ] || tar -xJf .gpu/check.tar.xz -C /tmp/ds4-check ./ds4 ./COMMIT
  DS4=/tmp/ds4-check/ds4
fi
M=/dev/shm/flash-${L}l-q2.gguf
t0=$(date +%s)
[ -f "$M" ] || "$DS4" synth --preset flash --quant q2 --layers "$L" --seed 1 -o "$M" > "$OUT/synth.log" 2>&1 || { tail "$OUT/synth.log"; exit 1; }
echo "synth $L layers: $(( $(date +%s) - t0 ))s, $(du -h "$M" | cut -f1)"
COMMIT=${COMMIT:-$(cat "$(dirname "$DS4")/COMMIT" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export DS4_COMMIT=$COMMIT
# Decode at 2k / 8k / 32k (ds4-bench frontiers), tensor-core prefill routes on.
"$DS4" bench -m "$M" --backend cuda --ctx-start 2048 --ctx-max 32768 --step-mul 4 \
  --gen-tokens "$GEN" --csv "$OUT/decode-routes.csv" > "$OUT/decode-routes.log" 2>&1 || tail -5 "$OUT/decode-routes.log"
# Prefill of whole prompts of 512 / 2048 / 8192 / 32768 tokens from an empty session
# (performance.md §5.4; --whole-prompt), tensor-core routes on and with --quality (exact kernels;
# QUALITY_MAX caps its largest prompt: the exact path takes minutes at 32k).
"$DS4" bench -m "$M" --backend cuda --whole-prompt --ctx-start 512 --ctx-max 32768 --step-mul 4 \
  --gen-tokens 4 --csv "$OUT/prefill-routes.csv" > "$OUT/prefill-routes.log" 2>&1 || tail -5 "$OUT/prefill-routes.log"
"$DS4" bench -m "$M" --backend cuda --quality --whole-prompt --ctx-start 512 --ctx-max "${QUALITY_MAX:-32768}" --step-mul 4 \
  --gen-tokens 4 --csv "$OUT/prefill-quality.csv" > "$OUT/prefill-quality.log" 2>&1 || tail -5 "$OUT/prefill-quality.log"
for f in decode-routes prefill-routes prefill-quality; do echo "== $f"; cat "$OUT/$f.csv"; done
