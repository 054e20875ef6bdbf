#!/usr/bin/env python3
"""Generate the ds4-quant test fixtures (crates/ds4-quant/tests/data/*.fix).

Requires: pip install gguf==0.19.0 numpy, and cargo (to build this crate's quantize_file example).

* deq_<TYPE>.fix: random blocks (random payload bytes, f16 scales from a sane finite range, plus
  edge cases) and gguf-py 0.19.0's `gguf.quants.dequantize` of them. gguf-py has no Q8_K, so its
  expected values are computed here as float32(d) * float32(q) (the GGML definition).
* quant_<TYPE>[_<variant>].fix: f32 input rows, this crate's quantized bytes (from
  `cargo run --example quantize_file`) and gguf-py's dequantization of those bytes. For Q8_0, F16
  and BF16 the script also checks that gguf-py's own quantizer produces the same bytes.
  With --ggml-harness PATH (a small C program linked against llama.cpp's ggml-quants.c, same
  arguments as quantize_file) it also checks the bytes against the GGML reference quantizers.

File format (little-endian): b"DS4QFIX1", u32 count, then per array: u32 name length, name
(utf-8), u8 dtype (0 = u8, 1 = f32, 2 = u32), u32 element count, data.

Usage: python3 scripts/quant_fixtures.py [--ggml-harness PATH]
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "ds4-quant", "tests", "data")
SEED = 20250417


def write_fix(path, arrays):
    with open(path, "wb") as f:
        f.write(b"DS4QFIX1")
        f.write(struct.pack("<I", len(arrays)))
        for name, arr in arrays:
            nb = name.encode()
            arr = np.ascontiguousarray(arr)
            if arr.dtype == np.uint8:
                dt = 0
            elif arr.dtype == np.float32:
                dt = 1
            elif arr.dtype == np.uint32:
                dt = 2
            else:
                raise ValueError(arr.dtype)
            f.write(struct.pack("<I", len(nb)) + nb + struct.pack("<BI", dt, arr.size))
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def f16_bits(vals):
    return np.asarray(vals, dtype=np.float16).view(np.uint16)


def sane_f16(rng, n, lo=-14, hi=4):
    """Random finite f16 scales: |d| = 2^U(lo,hi), random sign."""
    mag = np.exp2(rng.uniform(lo, hi, n))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return f16_bits(mag * sign)


# Edge values for f16 scale fields (as bits): +0, -0, min subnormal, max subnormal, min normal,
# 1.0, -1.0, max finite, -max finite, +inf, NaN.
EDGE_F16 = [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF, 0x7C00, 0x7E00]


def blocks_q8_0(rng):
    n = 32
    b = rng.integers(0, 256, (n, 34), dtype=np.uint8)
    d = sane_f16(rng, n)
    d[: len(EDGE_F16)] = EDGE_F16
    b[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    b[1, 2:] = 0x80  # all -128
    b[2, 2:] = 0x7F  # all 127
    return b


def blocks_q2_k(rng):
    n = 16
    b = rng.integers(0, 256, (n, 84), dtype=np.uint8)
    d = sane_f16(rng, n)
    dmin = sane_f16(rng, n)
    d[:6] = [0x0000, 0x0001, 0x7BFF, 0x3C00, 0x7C00, 0x7E00]
    dmin[:6] = [0x3C00, 0x8000, 0x0400, 0x7BFF, 0x3C00, 0x3C00]
    b[:, 80:82] = d.view(np.uint8).reshape(n, 2)
    b[:, 82:84] = dmin.view(np.uint8).reshape(n, 2)
    b[6, :16] = 0xFF  # max scales and mins
    b[6, 16:80] = 0xFF  # all q = 3
    b[7, :80] = 0
    return b


def blocks_q4_k(rng):
    n = 16
    b = rng.integers(0, 256, (n, 144), dtype=np.uint8)
    d = sane_f16(rng, n)
    dmin = sane_f16(rng, n)
    d[:6] = [0x0000, 0x0001, 0x7BFF, 0x3C00, 0x7C00, 0x7E00]
    dmin[:6] = [0x3C00, 0x8000, 0x0400, 0x7BFF, 0x3C00, 0x3C00]
    b[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    b[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    b[6, 4:] = 0xFF  # 6-bit scales/mins all 63, q all 15
    b[7, 4:] = 0
    return b


def blocks_iq2_xxs(rng):
    n = 16
    b = rng.integers(0, 256, (n, 66), dtype=np.uint8)
    d = sane_f16(rng, n)
    d[8:13] = [0x0000, 0x0001, 0x7BFF, 0xBC00, 0x7C00]
    b[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    # Blocks 0..7: every grid index exactly once (8 blocks x 8 groups x 4 indices).
    idx = np.arange(256, dtype=np.uint8).reshape(8, 8, 4)
    for k in range(8):
        qs = b[k, 2:].copy().reshape(8, 8)  # 8 groups x (4 index bytes + 4 sign/scale bytes)
        qs[:, 0:4] = idx[k]
        b[k, 2:] = qs.reshape(-1)
    return b


def blocks_q8_k(rng):
    n = 4
    d = (rng.standard_normal(n) * 0.01).astype(np.float32)
    d[1] = 0.0
    d[2] = -1e-30
    qs = rng.integers(-128, 128, (n, 256), dtype=np.int8)
    qs[3, :] = -128
    bs = qs.astype(np.int32).reshape(n, 16, 16).sum(-1).astype(np.int16)
    raw = np.concatenate(
        [d.view(np.uint8).reshape(n, 4), qs.view(np.uint8), bs.view(np.uint8).reshape(n, 32)], axis=1
    )
    expect = (d[:, None] * qs.astype(np.float32)).astype(np.float32)
    return raw, expect


def special_f16(rng):
    v = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0x3555, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00,
         0x7E00, 0x7C01, 0xFE00]
    r = rng.integers(0, 65536, 1024 - len(v), dtype=np.uint16)
    return np.concatenate([np.array(v, dtype=np.uint16), r])


def special_bf16(rng):
    v = [0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81]
    r = rng.integers(0, 65536, 1024 - len(v), dtype=np.uint16)
    return np.concatenate([np.array(v, dtype=np.uint16), r])


def dequant_fixtures(rng):
    cases = {}
    f32 = rng.standard_normal(256).astype(np.float32)
    f32[:4] = [0.0, -0.0, np.inf, 1e-42]
    cases["F32"] = (T.F32, f32.view(np.uint8))
    cases["F16"] = (T.F16, special_f16(rng).view(np.uint8))
    cases["BF16"] = (T.BF16, special_bf16(rng).view(np.uint8))
    cases["Q8_0"] = (T.Q8_0, blocks_q8_0(rng))
    cases["Q2_K"] = (T.Q2_K, blocks_q2_k(rng))
    cases["Q4_K"] = (T.Q4_K, blocks_q4_k(rng))
    cases["IQ2_XXS"] = (T.IQ2_XXS, blocks_iq2_xxs(rng))
    for name, (qt, raw) in cases.items():
        raw = np.ascontiguousarray(raw).reshape(-1)
        if qt in (T.F32,):
            deq = raw.view(np.float32).copy()
        elif qt in (T.F16,):
            deq = dequantize(raw.view(np.float16), qt).astype(np.float32)
        elif qt == T.BF16:
            deq = dequantize(raw.reshape(-1, 2), qt).reshape(-1)
        else:
            bs = gguf.GGML_QUANT_SIZES[qt][1]
            deq = dequantize(raw.reshape(-1, bs), qt).reshape(-1)
        assert deq.dtype == np.float32, (name, deq.dtype)
        write_fix(os.path.join(OUT, f"deq_{name}.fix"),
                  [("type", np.array([int(qt)], np.uint32)), ("bytes", raw), ("f32", deq.reshape(-1))])
    raw, expect = blocks_q8_k(rng)
    write_fix(os.path.join(OUT, "deq_Q8_K.fix"),
              [("type", np.array([int(T.Q8_K)], np.uint32)), ("bytes", raw.reshape(-1)),
               ("f32", expect.reshape(-1))])


def build_example():
    env = dict(os.environ)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "ds4-quant", "--example", "quantize_file"],
                   cwd=ROOT, check=True, env=env)
    tdir = env.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(tdir, "release", "examples", "quantize_file")


def run_quantizer(exe, ty, ne0, x, imp, tmp):
    xin = os.path.join(tmp, "in.f32")
    out = os.path.join(tmp, "out.bin")
    x.astype("<f4").tofile(xin)
    args = [exe, ty, str(ne0), xin, out]
    if imp is not None:
        ip = os.path.join(tmp, "imp.f32")
        imp.astype("<f4").tofile(ip)
        args.append(ip)
    subprocess.run(args, check=True)
    return np.fromfile(out, dtype=np.uint8)


def quant_inputs(rng, ne0, nrows):
    x = rng.standard_normal((nrows, ne0)).astype(np.float32)
    x[0] *= 0.02  # weight-like scale
    x[1, ::5] = 0.0  # sparse zeros
    x[1, 3::37] *= 30.0  # outliers
    if nrows > 2:
        x[2] = np.abs(x[2]) + 0.5  # all positive (min > 0 path)
    return x


def quant_fixtures(rng, exe, harness):
    ne0, nrows = 512, 2
    specs = [
        ("F16", T.F16, None), ("BF16", T.BF16, None), ("Q8_0", T.Q8_0, None),
        ("Q2_K", T.Q2_K, None), ("Q2_K", T.Q2_K, "imp"),
        ("Q4_K", T.Q4_K, None), ("Q4_K", T.Q4_K, "imp"),
        ("IQ2_XXS", T.IQ2_XXS, None), ("IQ2_XXS", T.IQ2_XXS, "imp"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, qt, variant in specs:
            x = quant_inputs(rng, ne0, nrows)
            if name == "F16":
                x[0, :4] = [65504.0, 65520.0, 1e-8, -3e-5]  # max, overflow to inf, subnormals
            imp = None
            if variant == "imp":
                imp = (rng.random(ne0) * 2.0).astype(np.float32)
                imp[::17] = 0.0
            q = run_quantizer(exe, name, ne0, x.reshape(-1), imp, tmp)
            if qt in (T.Q8_0, T.BF16, T.F16):
                ref = np.ascontiguousarray(quantize(x, qt)).view(np.uint8).reshape(-1)
                assert np.array_equal(ref, q), f"{name}: our quantizer differs from gguf-py's"
            if harness and qt in (T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS):
                himp = imp
                if qt == T.IQ2_XXS and imp is None:
                    himp = (x.astype(np.float64) ** 2).sum(0).astype(np.float32)
                href = run_quantizer(harness, name, ne0, x.reshape(-1), himp, tmp)
                assert np.array_equal(href, q), f"{name}/{variant}: differs from the GGML reference"
            if qt == T.F16:
                deq = dequantize(q.view(np.float16), qt).astype(np.float32)
            elif qt == T.BF16:
                deq = dequantize(q.reshape(-1, 2), qt).reshape(-1)
            else:
                bs = gguf.GGML_QUANT_SIZES[qt][1]
                deq = dequantize(q.reshape(-1, bs), qt).reshape(-1)
            arrays = [("type", np.array([int(qt)], np.uint32)), ("ne0", np.array([ne0], np.uint32)),
                      ("input", x.reshape(-1)), ("bytes", q), ("f32", deq.astype(np.float32))]
            if imp is not None:
                arrays.append(("importance", imp))
            fname = f"quant_{name}" + (f"_{variant}" if variant else "") + ".fix"
            write_fix(os.path.join(OUT, fname), arrays)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ggml-harness", help="C harness over llama.cpp ggml-quants.c (optional check)")
    a = ap.parse_args()
    from importlib.metadata import version
    if version("gguf") != "0.19.0":
        print(f"warning: gguf {version('gguf')} installed; the fixtures are specified against 0.19.0")
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(SEED)
    dequant_fixtures(rng)
    exe = build_example()
    quant_fixtures(rng, exe, a.ggml_harness)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote fixtures to {OUT} ({total} bytes)")


if __name__ == "__main__":
    sys.exit(main())
