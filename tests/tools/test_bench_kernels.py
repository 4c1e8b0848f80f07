"""benchmarks/bench_kernels.py --check, run here on CPU tensors through Triton's interpreter at a tiny
shape: the GPU session runs it at full size, so its code must not first fail there. Needs Triton."""
import importlib.util
import os

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bnkit[triton]')")


def _bench_kernels():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(root, "benchmarks", "bench_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_passes_and_prints_every_quantity(monkeypatch):
    if type(triton.language.standard.zeros).__name__ != "InterpretedFunction":
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set; run this file on its own")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the forced backend takes CPU tensors only then
    bench = _bench_kernels()
    lines = []
    assert bench.run_check([(3, 8, 3, 3)], ["bf16"], ["nchw", "nhwc"], out=lines.append, device="cpu") == 0
    rows = [line for line in lines if line.startswith("| 3x8x3x3 |")]
    quantities = {row.split(" | ")[3] for row in rows}
    assert {"y", "dx", "dgamma", "dbeta", "running_mean", "running_var", "eval y",
            "2nd call (cached launcher) bitwise = 1st"} <= quantities
    assert len(rows) == 2 * 9 and not any("| NO |" in row for row in rows)
    assert lines[-1] == "\n0 failure(s)"
