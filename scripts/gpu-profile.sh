#!/usr/bin/env bash
# Per-kernel time breakdown of prefill and decode on a small synthetic Flash model (GPU host).
#   DS4=/path/to/ds4 bash scripts/gpu-profile.sh [LAYERS] [PROMPT] [GEN]
# ncu (kernel durations only, clocks not locked) over one `ds4 bench` run; the kernels are split
# into the prefill phase (up to the last launch before the first decode step) and decode, and
# summed per kernel name. Writes $OUT/profile-*.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
L=${1:-4}; P=${2:-2048}; G=${3:-8}
OUT=${OUT:-/tmp/gpu-profile}; mkdir -p "$OUT"
DS4=${DS4:-/tmp/ds4-check/ds4}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
M=/dev/shm/flash-${L}l-q2.gguf
[ -f "$M" ] || "$DS4" synth --preset flash --quant q2 --layers "$L" --seed 1 -o "$M" > "$OUT/synth.log" 2>&1
for mode in routes ${PROFILE_QUALITY:+quality}; do
  extra=""; [ "$mode" = quality ] && extra="--quality"
  # bench once without the profiler to learn the decode launch count is not possible; instead mark phases:
  # run prefill-only (gen 1) and prefill+decode (gen G) and diff the per-name sums.
  for g in 1 $((G+1)); do
    "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --page raw \
      --print-units base "$DS4" bench -m "$M" --backend cuda --no-warmup $extra --ctx-start "$P" --ctx-max "$P" \
      --gen-tokens "$g" > "$OUT/ncu-$mode-g$g.csv" 2> "$OUT/ncu-$mode-g$g.err"
  done
  python3 - "$OUT/ncu-$mode-g1.csv" "$OUT/ncu-$mode-g$((G+1)).csv" "$G" "$L" "$P" > "$OUT/profile-$mode.txt" <<'PY'
import csv, sys, collections
def load(p):
    rows = [l for l in open(p) if l.startswith('"')]
    r = list(csv.reader(rows))
    h = r[0]; data = r[2:] if len(r) > 1 and r[1][0] == '' else r[1:]
    ki = h.index('Kernel Name'); ti = h.index('gpu__time_duration.sum')
    s = collections.defaultdict(float); c = collections.Counter()
    for row in data:
        try: t = float(row[ti].replace(",", ""))
        except: continue
        n = row[ki].split('(')[0]
        s[n] += t; c[n] += 1
    return s, c
a, ac = load(sys.argv[1]); b, bc = load(sys.argv[2]); G = int(sys.argv[3]); L = int(sys.argv[4]); P = int(sys.argv[5])
tot_a = sum(a.values())
print(f"== prefill {P} tokens, {L} layers (gen 1 run): {tot_a/1e6:.2f} ms GPU time, {P/(tot_a/1e9):.0f} tok/s if back to back")
for n, t in sorted(a.items(), key=lambda x: -x[1])[:40]:
    print(f"{t/tot_a*100:6.2f}%  {t/1e3:10.1f} us  n={ac[n]:6d}  {n}")
d = {n: b[n] - a.get(n, 0) for n in b}
dc = {n: bc[n] - ac.get(n, 0) for n in b}
tot_d = sum(v for v in d.values() if v > 0)
print(f"\n== decode: {G} extra steps: {tot_d/1e3/G:.1f} us GPU time per token ({L} layers), {tot_d/1e3/G/L:.1f} us per layer")
for n, t in sorted(d.items(), key=lambda x: -x[1])[:40]:
    if t <= 0: continue
    print(f"{t/tot_d*100:6.2f}%  {t/1e3/G:9.1f} us/tok  calls/tok={dc[n]/G:6.1f}  avg={t/max(dc[n],1)/1e3:7.2f} us  {n}")
PY
  cat "$OUT/profile-$mode.txt"
done
