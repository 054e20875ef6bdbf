#!/usr/bin/env bash
# The tensor-core attention route on the GPU host, from the tarball of scripts/attn-prep.sh
# (run from the unpacked folder):
#   bash attn-gpu.sh [STEPS]     STEPS: comma list of test,bench,e2e,drift (default: all)
# test: the tc op tests (route vs exact attention kernel among them); bench: tc_bench's attention
# rows (512/2048/8192 tokens); e2e: `ds4 bench` prefill at 2048 and 8192 on a 4-layer synthetic
# Flash q2 model, ATTN on (all routes) vs ATTN off (DS4_CUDA_TC_ATTN_DISABLE=1) vs --quality;
# drift: scripts/drift-gate.sh (fixtures + the same synthetic model, 4096-token long prompt),
# with the f16-operand variant reported as info. A table last. Logs go to $W; after every step
# the key files (at most 8: the device tool's limit) are copied to $OUT, the rest as logs.tar.xz.
set -uo pipefail
D=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/attn-gpu}
W=/tmp/attn-logs
mkdir -p "$OUT" "$W"
KEY="card.txt test_tc.log tc_bench_attn.csv drift.log prefill-attn-on.csv prefill-attn-off.csv prefill-quality.csv"
save() {
  local f
  for f in $KEY; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
  tar -cJf "$OUT/logs.tar.xz" -C "$W" . 2>/dev/null
}
STEPS=${1:-test,bench,e2e,drift}
has() { case ",$STEPS," in *",$1,"*) return 0 ;; esac; return 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv | tee "$W/card.txt"
sed 's/^/commit /' "$D/commit.txt" | tee -a "$W/card.txt"
declare -a RES
step() { # name timeout command...
  local name=$1 to=$2
  shift 2
  local t0=$(date +%s)
  timeout "$to" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  RES+=("$(printf '%-10s %-5s %4ss rc=%s' "$name" "$([ $rc = 0 ] && echo PASS || echo FAIL)" $(( $(date +%s) - t0 )) $rc)")
  printf '%s\n' "${RES[@]}" > "$W/steps.txt"
  save
  return $rc
}
M=/dev/shm/tc-drift-flash4.gguf
if has test; then
  step test_tc 100 "$D/test_tc" --test-threads=1 --nocapture
  grep -E "attention|test result|panicked|FAILED|failed" "$W/test_tc.log" | head -40
fi
if has bench; then
  step bench 150 "$D/tc_bench" --only attn --reps 5 --csv "$W/tc_bench_attn.csv"
fi
if has e2e; then
  [ -f "$M" ] || step synth 90 "$D/ds4" synth --preset flash --quant q2 --layers 4 --seed 7 -o "$M"
  B=(bench -m "$M" --backend cuda --ctx-start 2048 --ctx-max 8192 --step-mul 4 --gen-tokens 4)
  step e2e_on 60 "$D/ds4" "${B[@]}" --csv "$W/prefill-attn-on.csv"
  step e2e_off 60 env DS4_CUDA_TC_ATTN_DISABLE=1 "$D/ds4" "${B[@]}" --csv "$W/prefill-attn-off.csv"
  step e2e_q 90 "$D/ds4" "${B[@]}" --quality --csv "$W/prefill-quality.csv"
  grep -h "tensor-core" "$W"/e2e_*.log | sort -u
fi
if has drift; then
  step convert "${CONVERT_TIMEOUT:-60}" "$D/gpu_check" convert "$D/fx" "$D/models"
  step drift "${DRIFT_TIMEOUT:-240}" env OUT=/tmp/attn-drift ATTN_F16_INFO=1 bash "$D/drift-gate.sh" "$D" "$D/models" "$D/prompts.tsv" 4 4096
  mkdir -p "$W/drift"
  cp /tmp/attn-drift/drift/*.json /tmp/attn-drift/drift/*.log "$W/drift/" 2>/dev/null
  save
fi
echo
[ -f "$W/bench.log" ] && cat "$W/bench.log"
for f in prefill-attn-on prefill-attn-off prefill-quality; do
  [ -f "$W/$f.csv" ] && { echo "== $f"; cut -d, -f1-5 "$W/$f.csv"; }
done
[ -f "$W/drift.log" ] && sed -n '/^== prefill/,$p' "$W/drift.log" | head -150
echo
echo "== attn-gpu on $(sed -n 2p "$W/card.txt")"
printf '%s\n' "${RES[@]}"
