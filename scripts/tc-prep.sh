#!/usr/bin/env bash
# Build (here, where Rust is) what scripts/tc-gpu.sh runs on the GPU host and pack it into
# .gpu/tc/tc.tar.xz (git-ignored): ds4 and gpu_check (fixture conversion) with --features cuda,
# the tc op-test executable, tc_bench, the fixture checkpoints and prompts. Then one device call:
# `bash scripts/tc-gpu.sh` with carry [".gpu/tc"].
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NVCC:=$(python3 -c 'import nvidia.cu13, os; print(os.path.join(nvidia.cu13.__path__[0], "bin", "nvcc"))' 2>/dev/null || command -v nvcc)}"
export NVCC
T=${CARGO_TARGET_DIR:-target}
S=$(mktemp -d)
cargo build --release -p ds4 --features cuda
cargo build --release -p ds4-cuda --features cuda --example tc_bench --example gpu_check
exe=$(cargo test --release -p ds4-cuda --features cuda --test tc --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
cp "$T/release/ds4" "$T/release/examples/gpu_check" "$T/release/examples/tc_bench" "$S/"
cp "$exe" "$S/test_tc"
FX=${DS4_FIXTURES:-../shared/fixtures}
mkdir -p "$S/fx"
for s in tiny flashdims; do
  mkdir -p "$S/fx/$s"
  cp -r "$FX/$s/official" "$S/fx/$s/"
done
python3 - "$FX" > "$S/prompts.tsv" <<'PY'
import json, sys, os
fx = sys.argv[1]
for s in ("tiny", "flashdims"):
    m = json.load(open(os.path.join(fx, s, "ref_plain", "manifest.json")))
    for q in m["sequences"]:
        print(f'{s}\t{q["name"]}\t{",".join(map(str, q["input_ids"]))}')
PY
strip "$S"/ds4 "$S"/gpu_check "$S"/tc_bench "$S"/test_tc 2>/dev/null || true
mkdir -p .gpu/tc
tar -cJf .gpu/tc/tc.tar.xz -C "$S" .
rm -rf "$S"
git rev-parse --short HEAD > .gpu/tc/commit.txt
du -sh .gpu/tc
