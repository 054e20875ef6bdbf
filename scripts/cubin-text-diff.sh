#!/usr/bin/env bash
# Compare the generated machine code of two cubins kernel by kernel.
#
#   scripts/cubin-text-diff.sh BEFORE.cubin AFTER.cubin [KERNEL_PREFIX]
#
# For every kernel (a `.text.<name>` ELF section) of either cubin whose name starts with
# KERNEL_PREFIX (default: every kernel), compares the bytes of its `.text.<name>` (SASS),
# `.nv.info.<name>` (registers, parameters, barriers, exit offsets...), `.nv.shared.<name>`
# (static shared memory) and `.nv.constant0.<name>` sections, and prints one line per kernel:
# `identical` or `DIFFERENT (sections)`, or `only in BEFORE/AFTER`; then one line for the
# module's data (`.nv.global*`, `.nv.constantN`: __device__ / __constant__ tables). Exits 1 if
# anything differs or a kernel is missing on one side, 2 on a usage or file error, 0 otherwise.
#
# Line tables (-lineinfo: .debug_line, .nv_debug_line_sass) and the embedded PTX text are not
# compared: they change with any edit of the source, even a comment. Typical use for a
# refactor that must not change the generated code (flags as crates/ds4-cuda/build.rs):
#   NVCC=.../nvcc; F="-cubin -arch=sm_90a -O3 -std=c++17 -lineinfo -I crates/ds4-cuda/kernels"
#   git stash; $NVCC $F -o /tmp/a.cubin crates/ds4-cuda/kernels/tc.cu; git stash pop
#   $NVCC $F -o /tmp/b.cubin crates/ds4-cuda/kernels/tc.cu
#   scripts/cubin-text-diff.sh /tmp/a.cubin /tmp/b.cubin ds4_tc_
# Needs only python3 (the ELF section table is read directly; no binutils or CUDA tools).
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 BEFORE.cubin AFTER.cubin [KERNEL_PREFIX]" >&2
    exit 2
fi
exec python3 - "$@" <<'PY'
import struct, sys

def sections(path):
    """{name: bytes} of every section of a 64-bit little-endian ELF file."""
    try:
        data = open(path, "rb").read()
    except OSError as e:
        sys.exit(print(f"cubin-text-diff: {e}", file=sys.stderr) or 2)
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        sys.exit(print(f"cubin-text-diff: {path}: not a 64-bit little-endian ELF file", file=sys.stderr) or 2)
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    hdrs = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        hdrs.append((name, typ, off, size))
    stroff = hdrs[shstrndx][2]
    out = {}
    for name, typ, off, size in hdrs:
        end = data.index(b"\0", stroff + name)
        sname = data[stroff + name:end].decode("ascii", "replace")
        # SHT_NOBITS (8, e.g. .nv.shared): no bytes in the file, compare the size.
        out[sname] = size.to_bytes(8, "little") if typ == 8 else data[off:off + size]
    return out

before, after = sys.argv[1], sys.argv[2]
prefix = sys.argv[3] if len(sys.argv) > 3 else ""
a, b = sections(before), sections(after)
kinds = (".text.", ".nv.info.", ".nv.shared.", ".nv.constant0.")
kernels = sorted({n[len(".text."):] for n in list(a) + list(b) if n.startswith(".text.")})
kernels = [k for k in kernels if k.startswith(prefix)]
if not kernels:
    sys.exit(print(f"cubin-text-diff: no kernel matches prefix {prefix!r}", file=sys.stderr) or 2)
bad = 0
width = max(len(k) for k in kernels)
for k in kernels:
    if ".text." + k not in b:
        print(f"{k:<{width}}  only in BEFORE"); bad += 1; continue
    if ".text." + k not in a:
        print(f"{k:<{width}}  only in AFTER"); bad += 1; continue
    diff = [s + k for s in kinds if a.get(s + k) != b.get(s + k)]
    size = len(a[".text." + k])
    if diff:
        bad += 1
        print(f"{k:<{width}}  DIFFERENT ({', '.join(diff)}; .text {size} -> {len(b['.text.' + k])} bytes)")
    else:
        print(f"{k:<{width}}  identical ({size} bytes of SASS)")
def is_data(n):
    return n.startswith(".nv.global") or (n.startswith(".nv.constant") and n[len(".nv.constant"):].isdigit())
data = sorted({n for n in list(a) + list(b) if is_data(n)})
ddiff = [n for n in data if a.get(n) != b.get(n)]
if ddiff:
    print(f"{'[module data]':<{width}}  DIFFERENT ({', '.join(ddiff)})")
else:
    print(f"{'[module data]':<{width}}  identical ({', '.join(data) or 'none'})")
print(f"{len(kernels) - bad} of {len(kernels)} kernels identical" + ("; module data differs" if ddiff else ""))
sys.exit(1 if bad or ddiff else 0)
PY
