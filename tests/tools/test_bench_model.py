"""benchmarks/bench_model.py in its small CPU mode (ResNet-18, batch 4, 64x64): the script runs end to
end and its host-read counter sees what it claims to. Needs torchvision; skipped without it."""
import importlib.util
import os

import pytest
import torch

try:
    import torchvision  # noqa: F401
except Exception as e:  # a torchvision wheel built for another torch raises RuntimeError, not ImportError
    pytest.skip(f"torchvision does not import ({type(e).__name__})", allow_module_level=True)


def _bench_model():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "bench_model.py")
    spec = importlib.util.spec_from_file_location("bench_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_cpu_run_prints_one_row_per_model():
    bench = _bench_model()
    lines = []
    rows = bench.run(bench.Setup(cpu=True, small=True), ["torch.nn", "bnkit propagate"], steps=1, out=lines.append)
    assert set(rows) == {"torch.nn", "bnkit propagate"}
    assert sum(line.startswith("| torch.nn |") or line.startswith("| bnkit propagate |") for line in lines) == 2
    # torch.nn's step and bnkit's with nonfinite="propagate" read nothing back to the host
    assert rows["torch.nn"]["reads"] == rows["bnkit propagate"]["reads"] == 0
    assert all(r["train"] > 0 and r["eval"] > 0 and r["graph"] == "n/a (CPU)" for r in rows.values())


def test_host_read_counter_counts_item_and_bool():
    bench = _bench_model()
    t = torch.ones(3)
    with bench.CountHostReads() as mode:
        t.sum().item()
        bool(t.sum() > 0)
        t.mul(2)
    assert mode.count == 2
