"""The Triton kernels compile for a real GPU (sm_90, ahead of time: Triton ships ptxas), with no GPU.

The interpreter tests check the arithmetic; this checks what only the compiler sees (types, constexpr
branches, int64 paths) for every activation and mode, and that the channels_last / NCHW tiles become
128-bit vector loads and stores when the sizes are multiples of 16 (as Triton specializes them).
Runs in a subprocess because the kernels must be decorated without TRITON_INTERPRET.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

# not imported here: tests/ops/test_triton_kernels.py needs Triton imported in interpreter mode first
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (pip install 'bnkit[triton]')")

SCRIPT = r'''
import itertools, json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bnkit.ops.triton import kernels as K

FLOATS = {"eps", "momentum", "unbias", "slope", "count"}
BLOCKS = {"nhwc": dict(BLOCK_N=1, BLOCK_L=64, BLOCK_C=64, sC=1), "nchw": dict(BLOCK_N=1, BLOCK_L=2048, BLOCK_C=1, sL=1)}


def compile_(fn, **consts):
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.isupper() and name not in ("N", "C", "L"):  # pointers: the other upper-case arguments
            sig[name] = "*bf16" if name in ("X", "Y", "S", "DY", "DX") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
            if name in ("N", "C", "L", "sN", "sC", "sL", "dN", "dC", "dL"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert "cubin" in k.asm
    return k.asm["ptx"]


out = {}
for layout, blocks in BLOCKS.items():
    for int64 in (False, True):
        ptx = compile_(K._stats_kernel, INT64=int64, **blocks)
        out[f"stats/{layout}/int64={int64}"] = "ld.global.v4" in ptx
    for act in range(4):
        ptx = compile_(K._normalize_kernel, STATS=act % 3, HAS_W=act != 1, HAS_B=act != 2, ACT=act,
                       INT64=False, **blocks)
        out[f"normalize/{layout}/act={act}"] = "ld.global.v4" in ptx and "st.global.v4" in ptx
for act, from_output in ((0, True), (1, False), (2, True), (3, False)):
    blocks = dict(BLOCK_N=1, BLOCK_L=64, BLOCK_C=64)
    compile_(K._grad_sums_kernel, HAS_W=True, HAS_B=True, ACT=act, FROM_OUTPUT=from_output, INT64=act == 3,
             **blocks)
    for training, sums in itertools.product((False, True), range(3)):
        compile_(K._grad_input_kernel, TRAINING=training, SUMS=sums, HAS_W=True, HAS_B=True, ACT=act,
                 FROM_OUTPUT=from_output, INT64=sums == 2, **blocks)
compile_(K._finalize_stats_kernel, BLOCK_C=64)
compile_(K._finalize_sums_kernel, BLOCK_C=1)
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90_and_vectorize():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                         env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    vectorized = json.loads(run.stdout.strip().splitlines()[-1])
    assert vectorized and all(vectorized.values()), vectorized
