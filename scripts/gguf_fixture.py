#!/usr/bin/env python3
"""Write a GGUF file with gguf-py 0.19.0 holding every metadata value type and several tensor
types; ds4-gguf's tests read it back and check that our writer reproduces it byte for byte.

    pip install gguf==0.19.0 numpy
    python3 scripts/gguf_fixture.py crates/ds4-gguf/tests/data/gguf_py_sample.gguf
"""
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as T

out = sys.argv[1]
w = gguf.GGUFWriter(out, arch="deepseek4")  # writes general.architecture first
w.add_uint8("t.u8", 200)
w.add_int8("t.i8", -100)
w.add_uint16("t.u16", 60000)
w.add_int16("t.i16", -30000)
w.add_uint32("t.u32", 4000000000)
w.add_int32("t.i32", -2000000000)
w.add_float32("t.f32", 1.5e-6)
w.add_bool("t.bool", True)
w.add_string("t.string", "héllo ｜DSML｜ 世界")
w.add_uint64("t.u64", 2**63 + 5)
w.add_int64("t.i64", -(2**62))
w.add_float64("t.f64", 3.141592653589793)
w.add_array("t.arr_u32", [0, 0, 4, 128, 4, 128])
w.add_array("t.arr_str", ["a", "", "Ġworld", "<｜User｜>"])
w.add_key_value("t.arr_f32", [10.0, 10.0, 0.25], T.ARRAY, sub_type=T.FLOAT32)
w.add_key_value("t.arr_i32", [-1, 2, -3], T.ARRAY, sub_type=T.INT32)
w.add_array("t.arr_nested", [[1, 2], [3]])

rng = np.random.default_rng(7)
w.add_tensor("f32.weight", rng.standard_normal((3, 5)).astype(np.float32))
w.add_tensor("f16.weight", rng.standard_normal((2, 64)).astype(np.float16))
w.add_tensor("i32.weight", rng.integers(-5, 5, size=(7, 6)).astype(np.int32))
# raw quantized blocks: Q8_0 [ne0=64, ne1=2] -> 2 rows x 2 blocks x 34 bytes
q8 = rng.integers(0, 256, size=(2, 68)).astype(np.uint8)
w.add_tensor("q8_0.weight", q8, raw_dtype=Q.Q8_0)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
