#!/usr/bin/env bash
# Build (here, where Rust is) what scripts/attn-gpu.sh runs on the GPU host for the tensor-core
# attention route (issue 6, ATTN) and pack it with the scripts into ONE tarball (git-ignored):
#   scripts/attn-prep.sh [TARBALL]      (default .gpu/attn.tar.xz)
# Contents: ds4 (--features cuda), gpu_check (fixture conversion), tc_bench, the tc op-test
# executable, the fixture checkpoints and prompts, scripts/drift-gate.sh and scripts/attn-gpu.sh.
# Then one device call with carry [TARBALL] and
#   mkdir -p /tmp/attn && tar -xJf TARBALL -C /tmp/attn && bash /tmp/attn/attn-gpu.sh [STEPS]
# NO_FIXTURES=1 leaves out the fixtures and gpu_check (enough for the steps test,bench,e2e; the
# whole tarball is ~32 MiB, over the 30 MiB a carried file should stay under).
set -euo pipefail
cd "$(dirname "$0")/.."
TAR=${1:-.gpu/attn.tar.xz}
: "${NVCC:=$(python3 -c 'import nvidia.cu13, os; print(os.path.join(nvidia.cu13.__path__[0], "bin", "nvcc"))' 2>/dev/null || command -v nvcc)}"
export NVCC DS4_REQUIRE_NVCC=1
T=${CARGO_TARGET_DIR:-target}
S=$(mktemp -d)
cargo build --release -p ds4 --features ds4/cuda,ds4-cuda/cuda
cargo build --release -p ds4-cuda --features cuda --example tc_bench --example gpu_check
exe=$(cargo test --release -p ds4-cuda --features cuda --test tc --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
cp "$T/release/ds4" "$T/release/examples/gpu_check" "$T/release/examples/tc_bench" "$S/"
cp "$exe" "$S/test_tc"
cp scripts/drift-gate.sh scripts/attn-gpu.sh "$S/"
FX=${DS4_FIXTURES:-../shared/fixtures}
if [ "${NO_FIXTURES:-0}" = 1 ]; then rm -f "$S/gpu_check"; FX=/nonexistent; fi
[ -d "$FX" ] && for s in tiny flashdims; do
  mkdir -p "$S/fx/$s"
  cp -r "$FX/$s/official" "$S/fx/$s/"
done
[ -d "$FX" ] && python3 - "$FX" > "$S/prompts.tsv" <<'PY'
import json, sys, os
fx = sys.argv[1]
for s in ("tiny", "flashdims"):
    m = json.load(open(os.path.join(fx, s, "ref_plain", "manifest.json")))
    for q in m["sequences"]:
        print(f'{s}\t{q["name"]}\t{",".join(map(str, q["input_ids"]))}')
PY
strip "$S"/ds4 "$S"/tc_bench "$S"/test_tc 2>/dev/null || true
[ -f "$S/gpu_check" ] && strip "$S/gpu_check"
git rev-parse --short HEAD > "$S/commit.txt"
git diff --quiet HEAD -- crates scripts || echo "(+ uncommitted changes)" >> "$S/commit.txt"
mkdir -p "$(dirname "$TAR")"
tar -cf - -C "$S" . | xz -T2 -6 > "$TAR"
rm -rf "$S"
ls -la "$TAR"
