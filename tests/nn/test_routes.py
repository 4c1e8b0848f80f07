"""Which route a call takes, one test per route, and what each route must equal.

Routes (decided in BatchNormBase.forward / _train_route / _eval_route):
  eval      running statistics through torch's batch_norm(training=False)
  composed  eval with example weighing; training with masks, ghost/renorm/sync statistics, the
            biased-variance convention or single_sample="skip_update" (differentiable torch ops)
  aten      plain training through torch's batch_norm kernel + the on-device guard (update) or
            without buffers (no update: frozen statistics, track_running_stats=False)
  kernels   Triton, only for CUDA tensors where the measured table says it wins (tests/ops/)
"""
import threading
from unittest import mock

import pytest
import torch

import bnkit
from bnkit.nn.batchnorm import BatchNormBase

ROUTES = ("_eval_route", "_composed_train", "_composed_eval", "_aten_update", "_aten")


def _ran(layer, x, **kw):
    """The route methods that ran, in order of first call."""
    called = []
    patches = []
    for name in ROUTES:
        original = getattr(BatchNormBase, name)

        def spy(self, *a, _name=name, _original=original, **k):
            called.append(_name)
            return _original(self, *a, **k)
        patches.append(mock.patch.object(BatchNormBase, name, spy))
    for p in patches:
        p.start()
    try:
        layer(x, **kw)
    finally:
        for p in patches:
            p.stop()
    return list(dict.fromkeys(called))


X4 = torch.randn(6, 3, 4, 4)


@pytest.mark.parametrize("make,kw,expected", [
    (lambda: bnkit.BatchNorm2d(3), {}, ["_aten_update", "_aten"]),
    (lambda: bnkit.BatchNorm2d(3, momentum=None), {}, ["_aten_update", "_aten"]),
    (lambda: bnkit.BatchNorm2d(3, track_running_stats=False), {}, ["_aten"]),
    (lambda: bnkit.freeze_stats(bnkit.BatchNorm2d(3)), {}, ["_aten"]),
    (lambda: bnkit.freeze_stats(bnkit.BatchNorm2d(3), use_running=True), {}, ["_eval_route", "_aten"]),
    (lambda: bnkit.BatchNorm2d(3).eval(), {}, ["_eval_route", "_aten"]),
    (lambda: bnkit.BatchNorm2d(3, example_weight=0.5).eval(), {}, ["_eval_route", "_composed_eval"]),
    (lambda: bnkit.BatchNorm2d(3, variance="biased"), {}, ["_composed_train"]),
    (lambda: bnkit.GhostBatchNorm2d(3, virtual_batch_size=2), {}, ["_composed_train"]),
    (lambda: bnkit.BatchRenorm2d(3, rmax=3.0, dmax=5.0), {}, ["_composed_train"]),
    (lambda: bnkit.BatchNorm2d(3), {"mask": torch.ones(6, 4, 4, dtype=torch.bool)}, ["_composed_train"]),
])
def test_route(make, kw, expected):
    assert _ran(make(), X4, **kw) == expected


def test_single_value_routes():
    x = torch.randn(1, 3)
    assert _ran(bnkit.BatchNorm1d(3, single_sample="use_running"), x) == ["_eval_route", "_aten"]
    assert _ran(bnkit.BatchNorm1d(3, single_sample="skip_update"), x) == ["_composed_train"]


@pytest.mark.parametrize("kw", [{}, {"momentum": None}, {"momentum": 0.3}, {"momentum": bnkit.momentum.Decay(0.9)},
                                {"momentum": bnkit.momentum.Schedule("linear", total_steps=4)}])
def test_aten_route_equals_torch_nn_over_steps(kw):
    ours = bnkit.BatchNorm2d(3, **kw)
    momentum = kw.get("momentum", 0.1) if not isinstance(kw.get("momentum"), bnkit.momentum.Decay) else 0.1
    theirs = torch.nn.BatchNorm2d(3, momentum=0.1 if isinstance(momentum, bnkit.momentum.Schedule) else momentum)
    for step in range(5):
        x = torch.randn(4, 3, 5, 5) * (step + 1) + step
        if ours.momentum_schedule is not None:  # the schedule's factor at this step, given to torch by hand
            theirs.momentum = ours.momentum_schedule(step + 1)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-7)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 5


def test_float_momentum_is_torch_bit_for_bit():
    ours, theirs = bnkit.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        y, y_ref = ours(x), theirs(x)
        assert torch.equal(y, y_ref)
        g, = torch.autograd.grad(y.square().sum(), x)
        g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
        assert torch.equal(g, g_ref)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.parametrize("shape,layout", [((8192, 2), None), ((256, 2, 4, 4), torch.channels_last)])
def test_large_mean_statistics_are_stable_where_torch_cpu_cancels(shape, layout):
    """torch's CPU kernel for (N, C) and channels_last input computes E[x^2] - E[x]^2: bnkit shifts."""
    x64 = torch.randn(*shape, dtype=torch.float64) + 1e6
    x = x64.float()
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    make = bnkit.BatchNorm1d if len(shape) == 2 else bnkit.BatchNorm2d
    ours = make(2, momentum=1.0)
    theirs = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(2, momentum=1.0)
    y = ours(x)
    theirs(x)
    dims = [d for d in range(x.dim()) if d != 1]
    truth = x.double().var(dim=dims, unbiased=True)
    ours_err = ((ours.running_var.double() - truth).abs() / truth).max().item()
    torch_err = ((theirs.running_var.double() - truth).abs() / truth).max().item()
    assert ours_err < 1e-3 < torch_err  # torch: ~1e3 relative here
    if layout is None:  # (N, C): shifted, so even the output is right to float32 precision
        mean = x.double().mean(dim=dims, keepdim=True)
        ref = (x.double() - mean) / torch.sqrt(x.double().var(dim=dims, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(y.double(), ref, rtol=1e-3, atol=1e-3)
    else:  # channels_last runs torch's contiguous kernel: its numbers bit for bit, the layout kept
        assert y.is_contiguous(memory_format=layout)
        assert torch.equal(y, torch.nn.BatchNorm2d(2, momentum=1.0)(x.contiguous()))


def test_threads_lose_no_update():
    """Two threads training one layer: every batch is counted and folded, as torch.nn's in-kernel update."""
    for layer in (bnkit.BatchNorm1d(4, momentum=None), bnkit.BatchNorm1d(4, momentum=None, variance="biased")):
        xs = [torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64) + 5]
        layer.double()

        def work(x):
            for _ in range(300):
                layer(x)
        threads = [threading.Thread(target=work, args=(x,)) for x in xs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the cumulative average does not depend on the order, only on every update being there
        assert layer.num_batches_tracked.item() == 600
        torch.testing.assert_close(layer.running_mean, (xs[0].mean(0) + xs[1].mean(0)) / 2, rtol=1e-9, atol=1e-9)


def _batch_norm64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)


@pytest.mark.parametrize("shape,make", [((8192, 2, 1), bnkit.BatchNorm1d), ((8192, 2, 1, 1), bnkit.BatchNorm2d),
                                        ((8192, 2, 1, 1, 1), bnkit.BatchNorm3d)])
def test_large_mean_spatial_size_one_is_as_stable_as_2d(shape, make):
    """torch's CPU kernel takes its E[x^2] - E[x]^2 path for every input with one value per sample and
    channel; (N, C, 1, 1) is what a global pooling (squeeze-excitation, heads) feeds a BatchNorm2d. Without
    the shift: running_var ~9e2 relative off and outputs ~5 off here, as torch.nn."""
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) + 1e6).float()
    layer = make(2, momentum=1.0)
    y = layer(x)
    flat = x.reshape(shape[0], 2).double()
    truth = flat.var(0)
    assert ((layer.running_var.double() - truth).abs() / truth).max() < 1e-3
    assert (y.reshape(shape[0], 2).double() - _batch_norm64(flat)).abs().max() < 1e-3
    assert y.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_2d_input_is_not_shifted(dtype):
    """float16/bfloat16 (N, C) input runs torch's kernel unshifted: ``x - x[0]`` in the input's dtype
    would round at the shift's scale (measured before: running mean error 7e-6..3e-4 where torch.nn's
    is 2e-8; a bfloat16 running mean of 1.56 stored as 0.0 after a large first row) or overflow."""
    torch.manual_seed(0)
    x = (torch.randn(64, 4) * 2 + 3).to(dtype)
    ours, theirs = bnkit.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    big = torch.randn(64, 4)
    big[0] = 1000.0  # one outlying sample first in the batch
    big = big.to(dtype)
    ours, theirs = bnkit.BatchNorm1d(4).to(dtype), torch.nn.BatchNorm1d(4).to(dtype)
    ours(big), theirs(big)
    exact = big.double().mean(0) * 0.1  # ~1.56
    assert ((ours.running_mean.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs()).all()
    assert torch.equal(ours.running_mean, theirs.running_mean)


def test_float16_2d_input_whose_differences_exceed_float16_max():
    """Every value finite, the differences to the first row not (4e4 - -4e4 > 65504): torch.nn's float32
    accumulation is finite, and so is bnkit's output; the batch counts."""
    x = torch.tensor([[4e4], [-4e4], [0.0], [1.0]], dtype=torch.float16)
    ours, theirs = bnkit.BatchNorm1d(1), torch.nn.BatchNorm1d(1)
    y = ours(x)
    torch.testing.assert_close(y, theirs(x), rtol=0, atol=0)
    assert torch.isfinite(y).all() and ours.num_batches_tracked.item() == 1
