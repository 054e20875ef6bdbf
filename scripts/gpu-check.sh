#!/usr/bin/env bash
# CUDA vs CPU on the GPU host (issue 5's acceptance checks), in one device call.
# Prepare here with scripts/gpu-prep.sh, then run with carry [".gpu/check.tar.xz"]:
#   bash scripts/gpu-check.sh [--flash LAYERS] [--bench]
# Prints a pass/fail table last; full logs go to $OUT (or /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
D=/tmp/ds4-check
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT" "$D"
tar -xJf .gpu/check.tar.xz -C "$D"
"$D/gpu_check" convert "$D/fx" "$D/models" > "$OUT/convert.log" 2>&1 || { cat "$OUT/convert.log"; exit 1; }
FLASH=0
BENCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --flash) FLASH=$2; shift 2 ;;
    --bench) BENCH=1; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/card.txt"
declare -a RES
step() { # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  RES+=("$(printf '%-14s %-5s %4ss  %s' "$name" "$([ $rc = 0 ] && echo PASS || echo FAIL)" $(( $(date +%s) - t0 )) "$(grep -E 'test result|^flash|gpu-check:' "$OUT/$name.log" | tail -1)")")
  tail -3 "$OUT/$name.log"
}
step fwd_ops "$D/test_fwd_ops" --test-threads=1
step gemv "$D/test_gemv" --test-threads=1
step tc "$D/test_tc" --test-threads=1
step fixtures "$D/gpu_check" run "$D/models" "$D/prompts.tsv"
sed -n '/^model /,$p' "$OUT/fixtures.log"
if [ "$FLASH" -gt 0 ]; then
  step flash "$D/gpu_check" flash "$FLASH" /dev/shm
  grep -E '^flash' "$OUT/flash.log"
fi
if [ "$BENCH" = 1 ]; then
  step gemv_bench "$D/gemv_bench" --csv "$OUT/gemv_bench.csv"
  tail -40 "$OUT/gemv_bench.log"
fi
echo
echo "== gpu-check on $(head -2 "$OUT/card.txt" | tail -1)"
printf '%s\n' "${RES[@]}"
! printf '%s\n' "${RES[@]}" | grep -q FAIL
