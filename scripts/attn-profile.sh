#!/usr/bin/env bash
# ncu profile of the tensor-core attention kernels on the GPU host (from the unpacked tarball of
# scripts/attn-prep.sh; needs tc_bench): the Flash CSA chunk at position 8k (2048 tokens, 640
# rows per token), split (hi+lo) and f16 variants, one launch each. Writes $OUT/ncu-attn.txt.
set -uo pipefail
D=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/attn-profile}
mkdir -p "$OUT"
NCU=${NCU:-/usr/local/cuda/bin/ncu}
# tc_bench --tokens 2048 --reps 1 launches, per case, split ×2 then f16 ×2 (warm-up + 1 timed);
# the third case (csa pos8k) holds matches 9..12 of the regex.
timeout "${NCU_TIMEOUT:-200}" "$NCU" --clock-control none --cache-control none \
  --kernel-name regex:'ds4_attn_tc_512_[xh]' --launch-skip 8 --launch-count 3 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section LaunchStats --section Occupancy --section SchedulerStats \
  "$D/tc_bench" --only attn --tokens 2048 --reps 1 > "$OUT/ncu-attn.txt" 2>&1
echo "ncu rc=$?"
grep -E "ds4_attn_tc|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issued Ipc|No Eligible|Shared Memory|L2 Hit|Stall|Warp Cycles Per Issued" "$OUT/ncu-attn.txt" | head -80
