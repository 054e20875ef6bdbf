#!/usr/bin/env bash
# Tensor-core prefill routes on the GPU host, in one device call (prepare with scripts/tc-prep.sh,
# run with carry [".gpu/tc"]): op tests, the route-vs-exact benchmark, the logit-drift gate.
#   bash scripts/tc-gpu.sh [SYNTH_LAYERS [LONG_TOKENS]]
# Logs under $OUT (default /tmp/tc-gpu); a table last.
set -uo pipefail
cd "$(dirname "$0")/.."
D=/tmp/ds4-tc
OUT=${OUT:-/tmp/tc-gpu}
export OUT
chmod -R u+w "$D" 2>/dev/null; rm -rf "$D"
mkdir -p "$OUT" "$D"
tar -xJf .gpu/tc/tc.tar.xz -C "$D"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv | tee "$OUT/card.txt"
cat .gpu/tc/commit.txt 2>/dev/null | sed 's/^/commit /' | tee -a "$OUT/card.txt"
declare -a RES
step() { # name timeout command...
  local name=$1 to=$2; shift 2
  local t0=$(date +%s)
  timeout "$to" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  RES+=("$(printf '%-10s %-5s %4ss rc=%s' "$name" "$([ $rc = 0 ] && echo PASS || echo FAIL)" $(( $(date +%s) - t0 )) $rc)")
}
step convert 40 "$D/gpu_check" convert "$D/fx" "$D/models"
step test_tc 60 "$D/test_tc" --test-threads=1 --nocapture
grep -E "worst normalized|test result|panicked|FAILED|failed" "$OUT/test_tc.log" | head -40
step bench 60 "$D/tc_bench" --csv "$OUT/tc_bench.csv"
step drift 130 bash scripts/drift-gate.sh "$D" "$D/models" "$D/prompts.tsv" "${1:-4}" "${2:-4096}"
echo
cat "$OUT/bench.log"
echo
sed -n '/^== prefill/,$p' "$OUT/drift.log" | head -120
echo
echo "== tc-gpu on $(sed -n 2p "$OUT/card.txt")"
printf '%s\n' "${RES[@]}"
