"""The compiled Triton path on a GPU: what the interpreter tests (tests/ops/test_triton_kernels.py) cannot
reach. Every launch after a kernel's first goes through Triton's compiled-kernel launcher (cached in
bnkit.ops.triton.launch); CUDA graphs capture the kernels; a tensor on another GPU launches there.

Needs CUDA and Triton imported without the interpreter: tests/conftest.py turns the interpreter on
unless TRITON_INTERPRET is set, so run ``TRITON_INTERPRET=0 python -m pytest tests/ops/test_triton_cuda.py``
(benchmarks/gpu_check.sh does). References: the same layer on bnkit's torch path (torch's own kernel).
"""
import os

import pytest
import torch

import bnkit
from bnkit.ops import backend

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bnkit[triton]')")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                       reason="Triton's interpreter is on: run with TRITON_INTERPRET=0 to test the compiled kernels"),
]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def restore():
    from bnkit.ops.triton import launch
    saved = dict(launch.tuning)
    yield launch
    launch.tuning.update(saved)
    backend.set_backend(None)


def _pair(c, device=DEVICE, **kw):
    torch.manual_seed(0)
    a = bnkit.BatchNorm2d(c, device=device, **kw)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
        a.bias.normal_()
    b = bnkit.BatchNorm2d(c, device=device, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _step(layer, x, dy, name):
    """One forward + backward on backend ``name``: y, dx, dweight, dbias (the gradients not accumulated)."""
    backend.set_backend(name)
    try:
        xi = x.detach().clone().requires_grad_()
        y = layer(xi)
        if not layer.training:
            return (y.detach(),)
        return (y.detach(),) + torch.autograd.grad(y, (xi, layer.weight, layer.bias), dy)
    finally:
        backend.set_backend(None)


def _close(got, want, tol=1e-5):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


# each statistics mode in fp32 NCHW and in bf16 channels_last (each case compiles its own kernels: the
# full dtype x layout matrix runs at full size in `bench_kernels.py --check`)
@pytest.mark.parametrize("dtype,channels_last,stats", [(torch.float32, False, s) for s in ("own", "merge", "finalize")]
                         + [(torch.bfloat16, True, s) for s in ("own", "merge", "finalize")])
def test_repeated_steps_through_the_cached_launcher(restore, stats, dtype, channels_last):
    launch = restore
    if stats == "own":  # one program per channel block
        launch.tuning.update(stats="own", programs=1)
    else:  # small tiles, 4 channel blocks of 36 tiles: 3 splits (merged in the prologue) or 12 (finalize kernels)
        launch.tuning.update(stats=stats, block=(2, 16, 4), programs={"merge": 12, "finalize": 64}[stats])
    x = torch.randn(8, 16, 12, 12, device=DEVICE) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x, dy = x.to(dtype), torch.randn(x.shape, device=DEVICE).to(dtype)
    ours, theirs = _pair(16, activation="relu")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for mode in ("train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        first = _step(ours, x, dy, "triton")
        for _ in range(2):  # later calls: every launch through the cached compiled-kernel launcher
            again = _step(ours, x, dy, "triton")
            assert all(torch.equal(a, b) for a, b in zip(again, first)), mode
        for _ in range(3):
            want = _step(theirs, x, dy, "torch")
        _close(first, want, tol)
    p = launch.plan(x)
    assert p.stats == launch._STATS[stats] and p.splits == {"own": 1, "merge": 3, "finalize": 12}[stats]
    assert any(key[0] is launch.K._normalize_kernel for key in launch._launchers)  # the direct path ran
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    _close((ours.running_mean, ours.running_var), (theirs.running_mean, theirs.running_var), 1e-5)


def test_layers_with_int_and_float_eps_share_a_plan():
    # Triton would compile an int eps=1 in as a constant; the launcher cache is keyed by plan, not by eps
    x, dy = torch.randn(4, 8, 6, 6, device=DEVICE), torch.randn(4, 8, 6, 6, device=DEVICE)
    for eps in (1, 1e-5, 1, 0.5):
        ours, theirs = _pair(8, eps=eps)
        for _ in range(2):
            _close(_step(ours, x, dy, "triton"), _step(theirs, x, dy, "torch"))


@pytest.mark.parametrize("view", ["channel slice", "batch slice", "expanded"])
def test_input_that_is_not_dense(view):
    base = torch.randn(8, 16, 10, 10, device=DEVICE)
    x = {"channel slice": lambda: base[:, 4:12], "batch slice": lambda: base[::2, :8],
         "expanded": lambda: base[:1, :8].expand(4, 8, 10, 10)}[view]()
    before = base.clone()
    ours, theirs = _pair(8, activation="relu")
    dy = torch.randn(x.shape, device=DEVICE)
    for _ in range(2):
        _close(_step(ours, x, dy, "triton"), _step(theirs, x, dy, "torch"))
    torch.cuda.synchronize()
    assert torch.equal(base, before)


def test_memory_efficient_layer_takes_the_kernels_under_auto():
    ours, theirs = _pair(8, activation="leaky_relu")
    ours.memory_efficient = True
    x, dy = torch.randn(4, 8, 6, 6, device=DEVICE), torch.randn(4, 8, 6, 6, device=DEVICE)
    for _ in range(2):
        _close(_step(ours, x, dy, "auto"), _step(theirs, x, dy, "torch"))


def test_training_step_does_not_synchronize():
    ours, _ = _pair(8, activation="relu")
    x, dy = torch.randn(4, 8, 6, 6, device=DEVICE), torch.randn(4, 8, 6, 6, device=DEVICE)
    _step(ours, x, dy, "triton")  # compiles: outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(ours, x, dy, "triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_captures_the_triton_path():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnkit.BatchNorm2d(8, activation="relu")).to(DEVICE)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnkit.BatchNorm2d(8, activation="relu")).to(DEVICE)
    ref.load_state_dict(model.state_dict())
    static_x = torch.randn(4, 3, 10, 10, device=DEVICE)
    backend.set_backend("triton")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation) on a side stream, as torch's docs do
            for _ in range(2):
                model(static_x).sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
            static_y.sum().backward()
    finally:
        backend.set_backend(None)
    for _ in range(2):
        ref(static_x).sum().backward()
    for step in range(3):
        x = torch.randn(4, 3, 10, 10, device=DEVICE) * (step + 1)
        static_x.copy_(x)
        graph.replay()
        y = ref(x)  # bnkit's torch path
        y.sum().backward()
        torch.testing.assert_close(static_y, y, rtol=1e-4, atol=1e-5)
    bn, bn_ref = model[1], ref[1]
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 5
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", ["triton", "auto"])
def test_a_layer_on_the_second_gpu(name):
    # the current device stays 0: the launchers switch to the tensor's device, the guard's cached 1.0 is per device
    ours, theirs = _pair(8, device="cuda:1", activation="relu")
    x, dy = torch.randn(4, 8, 6, 6, device="cuda:1"), torch.randn(4, 8, 6, 6, device="cuda:1")
    assert torch.cuda.current_device() == 0
    for _ in range(2):
        _close(_step(ours, x, dy, name), _step(theirs, x, dy, "torch"))
    _step(ours, torch.full_like(x, float("nan")), dy, name)
    assert ours.num_batches_tracked.item() == 2
    with pytest.warns(RuntimeWarning, match="1 training batch"):
        assert ours.report_nonfinite() == 1
