#!/usr/bin/env bash
# Build (here, where Rust is) everything scripts/gpu-check.sh runs on the GPU host and pack it into
# .gpu/check.tar.xz (the device call carries at most 64 MiB): stripped release binaries with the
# `cuda` feature, the op-test executables, the official-format fixtures and their prompts.
# Then one device call: `bash scripts/gpu-check.sh` with carry [".gpu/check.tar.xz"].
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NVCC:=$(python3 -c 'import nvidia.cu13, os; print(os.path.join(nvidia.cu13.__path__[0], "bin", "nvcc"))' 2>/dev/null || command -v nvcc)}"
export NVCC
D=.gpu/check
rm -rf "$D"
mkdir -p "$D/fx/tiny" "$D/fx/flashdims"
T=${CARGO_TARGET_DIR:-target}
cargo build --release -p ds4 --features cuda
cargo build --release -p ds4-cuda --features cuda --examples
cp "$T/release/ds4" "$T/release/examples/gpu_check" "$T/release/examples/gemv_bench" "$T/release/examples/tc_bench" "$D/"
# Op-test executables (the JSON lines name each test binary).
for t in fwd_ops gemv tc; do
  exe=$(cargo test --release -p ds4-cuda --features cuda --test "$t" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
  cp "$exe" "$D/test_$t"
done
# The commit the binaries were built from (gpu-bench.sh passes it to `ds4 bench` as DS4_COMMIT:
# a build script's embedded value can be stale when worktrees share a target dir).
git rev-parse --short HEAD > "$D/COMMIT"
strip "$D"/ds4 "$D"/gpu_check "$D"/gemv_bench "$D"/tc_bench "$D"/test_*
FX=${DS4_FIXTURES:-../shared/fixtures}
cp -r tests/fixtures/tiny/official "$D/fx/tiny/"
cp -r "$FX/flashdims/official" "$D/fx/flashdims/"
python3 - "$FX" > "$D/prompts.tsv" <<'PY'
import json, sys, os
fx = sys.argv[1]
for s in ("tiny", "flashdims"):
    m = json.load(open(os.path.join(fx, s, "ref_plain", "manifest.json")))
    for q in m["sequences"]:
        print(f'{s}\t{q["name"]}\t{",".join(map(str, q["input_ids"]))}')
PY
# -9: its 64 MiB dictionary spans the binaries, which share their embedded cubins (30 MB vs 43 at -6).
XZ_OPT="-T2 -9" tar -cJf .gpu/check.tar.xz -C "$D" .
ls -la .gpu/check.tar.xz
