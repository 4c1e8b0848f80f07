"""A training or eval step reads nothing back to the host, for every option that does not need to.

Guarded with a TorchDispatchMode that sees every aten op a step runs: a read of a tensor's value
into Python (``.item()``, ``bool()``, ``int()``, ``float()``, a data-dependent branch) dispatches
``aten._local_scalar_dense`` (``is_nonzero`` and ``item`` end there too). On a GPU each such read
is a device synchronization; here the op is counted on the CPU, where it shows up all the same.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bnkit

READS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _count(fn) -> list:
    with HostReads() as mode:
        fn()
    return mode.seen


def test_the_counter_sees_host_reads():  # the guard itself can fail
    x = torch.randn(3)
    assert _count(lambda: bool(x.sum() > 0))
    assert _count(lambda: x.sum().item())
    assert _count(lambda: float(x.max()))


def _step(layer, x, **kw):
    def run():
        layer.train()
        y = layer(x, **kw)
        y.square().sum().backward()
    return run


def _eval_step(layer, x, **kw):
    def run():
        with torch.no_grad():
            layer(x, **kw)
    return run


CASES = {
    "plain": (lambda: bnkit.BatchNorm2d(4), (6, 4, 3, 3), {}),
    "momentum=None": (lambda: bnkit.BatchNorm2d(4, momentum=None), (6, 4, 3, 3), {}),
    "decay": (lambda: bnkit.BatchNorm2d(4, momentum=bnkit.momentum.Decay(0.99)), (6, 4, 3, 3), {}),
    "cosine schedule": (lambda: bnkit.BatchNorm2d(4, momentum=bnkit.momentum.Schedule("cosine", total_steps=10)),
                        (6, 4, 3, 3), {}),
    "activation": (lambda: bnkit.BatchNorm2d(4, activation="silu"), (6, 4, 3, 3), {}),
    "channels_last": (lambda: bnkit.BatchNorm2d(4), (6, 4, 3, 3), {"channels_last": True}),
    "1d 2-D input": (lambda: bnkit.BatchNorm1d(4), (6, 4), {}),
    "axis=-1": (lambda: bnkit.BatchNorm1d(4, axis=-1), (6, 5, 4), {}),
    "biased variance": (lambda: bnkit.BatchNorm2d(4, variance="biased"), (6, 4, 3, 3), {}),
    "ghost": (lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=2), (6, 4, 3, 3), {}),
    "renorm": (lambda: bnkit.BatchRenorm2d(4, rmax=3.0, dmax=5.0), (6, 4, 3, 3), {}),
    "renorm warm-up ramps": (lambda: bnkit.BatchRenorm2d(4, **bnkit.renorm_warmup(10, hold=2)), (6, 4, 3, 3), {}),
    "ghost, smaller last chunk": (lambda: bnkit.GhostBatchNorm1d(4, virtual_batch_size=4), (6, 4), {}),
    "ghost, biased variance": (lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=4, variance="biased"),
                               (6, 4, 3, 3), {}),
    "ghost, not tracking": (lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=4, track_running_stats=False),
                            (6, 4, 3, 3), {}),
    "renorm momentum=None": (lambda: bnkit.BatchRenorm2d(4, rmax=3.0, dmax=5.0, momentum=None), (6, 4, 3, 3), {}),
    "renorm ramp and number": (lambda: bnkit.BatchRenorm2d(4, rmax=bnkit.renorm_warmup(10)["rmax"], dmax=5.0),
                               (6, 4, 3, 3), {}),
    "lazy axis=-1": (lambda: bnkit.LazyBatchNorm1d(axis=-1), (6, 5, 4), {}),
    "mask": (lambda: bnkit.BatchNorm1d(4), (6, 4, 5), {"mask": True}),
    "lengths": (lambda: bnkit.BatchNorm1d(4), (6, 4, 5), {"lengths": True}),
    "frozen stats (batch)": (lambda: bnkit.freeze_stats(bnkit.BatchNorm2d(4)), (6, 4, 3, 3), {}),
    "frozen stats (running)": (lambda: bnkit.freeze_stats(bnkit.BatchNorm2d(4), use_running=True), (6, 4, 3, 3), {}),
    "FrozenBatchNorm2d": (lambda: bnkit.FrozenBatchNorm2d(4), (6, 4, 3, 3), {}),
    "not tracking": (lambda: bnkit.BatchNorm2d(4, track_running_stats=False), (6, 4, 3, 3), {}),
    "single sample, use_running": (lambda: bnkit.BatchNorm1d(4, single_sample="use_running"), (1, 4), {}),
    "empty batch": (lambda: bnkit.BatchNorm2d(4), (0, 4, 3, 3), {}),
}


def _inputs(shape, extra):
    x = torch.randn(*shape, requires_grad=True)
    kw = {}
    if extra.get("channels_last"):
        x = torch.randn(*shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    lengths = torch.tensor([5, 3, 4, 5, 1, 2])
    if extra.get("mask"):
        kw["mask"] = torch.arange(shape[2]) < lengths[:, None]
    if extra.get("lengths"):
        kw["lengths"] = lengths
    return x, kw


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_step_reads_nothing(case):
    make, shape, extra = CASES[case]
    layer = make()
    x, kw = _inputs(shape, extra)
    _step(layer, x, **kw)()  # first call outside: lazy set-up is not a step
    assert _count(_step(layer, x, **kw)) == []


@pytest.mark.parametrize("case", ["plain", "activation", "mask", "axis=-1", "FrozenBatchNorm2d", "ghost, not tracking",
                                  "renorm ramp and number"])
def test_eval_step_reads_nothing(case):
    make, shape, extra = CASES[case]
    layer = make().eval()
    x, kw = _inputs(shape, extra)
    assert _count(_eval_step(layer, x, **kw)) == []


def test_domain_batch_norm_step_reads_nothing():
    layer = bnkit.DomainBatchNorm2d(4, num_domains=2)
    x = torch.randn(6, 4, 3, 3, requires_grad=True)
    assert _count(lambda: layer(x, domain=1).sum().backward()) == []


def test_a_nan_batch_is_skipped_without_a_read_and_raise_reads_by_design():
    layer = bnkit.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    x[0, 2, 0, 0] = float("nan")
    assert _count(lambda: layer(x)) == []
    assert torch.equal(layer.running_mean, torch.zeros(4)) and layer.num_batches_tracked.item() == 0
    strict = bnkit.BatchNorm2d(4, nonfinite="raise")
    assert _count(lambda: strict(torch.randn(6, 4, 3, 3)))  # the documented exception


def test_training_on_the_meta_device_works_like_torch():
    ours, theirs = bnkit.BatchNorm2d(4, device="meta"), torch.nn.BatchNorm2d(4, device="meta")
    x = torch.empty(6, 4, 3, 3, device="meta")
    assert ours(x).shape == theirs(x).shape == x.shape
    ours.eval(), theirs.eval()
    assert ours(x).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kw", [{}, {"momentum": None}, {"activation": "relu"}])
def test_default_training_step_is_cuda_graph_capturable(kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnkit.BatchNorm2d(8, **kw)).cuda()
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnkit.BatchNorm2d(8, **kw)).cuda()
    ref.load_state_dict(model.state_dict())
    static_x = torch.randn(4, 3, 8, 8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch's docs do
        for _ in range(2):
            model(static_x).sum().backward()
            ref(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.sum().backward()
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, device="cuda") * (step + 1)
        static_x.copy_(x)
        graph.replay()
        y = ref(x)
        y.sum().backward()
        torch.testing.assert_close(static_y, y)
    bn, bn_ref = model[1], ref[1]
    # capture records without running: both layers ran 2 warm-up steps and 3 steps (replays / eager)
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 5
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_guard_runs_in_every_float_dtype_on_cuda(dtype):
    """The fused non-finite check has no bfloat16 CUDA kernel: bf16 layers must take the isfinite form."""
    torch.manual_seed(0)
    ours, theirs = bnkit.BatchNorm2d(4).to("cuda", dtype), torch.nn.BatchNorm2d(4).to("cuda", dtype)
    x = torch.randn(8, 4, 3, 3, device="cuda", dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    before = ours.running_mean.clone()
    ours(torch.full_like(x, float("nan")))
    assert torch.equal(ours.running_mean, before) and ours.num_batches_tracked.item() == 1
    with pytest.warns(RuntimeWarning, match="1 training batch"):
        assert ours.report_nonfinite() == 1


def test_the_skip_counter_moves_with_the_module_and_stays_float32():
    """.to()/.half()/.to_empty() move the counter with the buffers (no copy left for a training step,
    which a CUDA-graph capture would refuse) and never change its dtype (it counts batches)."""
    bn = bnkit.BatchNorm2d(3)
    bn(torch.full((4, 3, 2, 2), float("nan")))
    bn.half()
    assert bn._nonfinite_skipped.dtype == torch.float32 and bn.running_mean.dtype == torch.float16
    bn.to("meta")
    assert bn._nonfinite_skipped.device.type == "meta"
    bn.to_empty(device="cpu")
    assert bn._nonfinite_skipped.device.type == "cpu" and bn._nonfinite_skipped.item() == 0.0
    bn = bnkit.BatchNorm2d(3)
    bn(torch.full((4, 3, 2, 2), float("nan")))
    bn.double()
    with pytest.warns(RuntimeWarning, match="1 training batch"):
        assert bn.report_nonfinite() == 1  # the count survives a move


def test_an_ema_update_through_state_dict_reads_nothing():
    """timm's ModelEmaV2 zips two state_dict()s every step: that must not read the skip counters."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4), torch.nn.ReLU())
    ema = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4), torch.nn.ReLU())
    model(torch.full((2, 3, 5, 5), float("nan")))  # one skipped batch waiting to be reported

    def ema_step():
        with torch.no_grad():
            for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
                e.copy_(e * 0.9 + m * 0.1 if e.is_floating_point() else m)

    assert _count(ema_step) == []
    with pytest.warns(RuntimeWarning, match="1 training batch"):
        assert bnkit.nonfinite_report(model) == {"1": 1}


def test_the_model_report_reads_the_counters_once():
    model = torch.nn.Sequential(*(bnkit.BatchNorm1d(3) for _ in range(5)))
    model(torch.full((4, 3), float("nan")))
    with pytest.warns(RuntimeWarning, match="1 training batch"):
        # no scalar read per layer (5 here before): the counters come back in one tolist() per device
        assert _count(lambda: bnkit.nonfinite_report(model)) == []
    assert bnkit.nonfinite_report(model) == {}  # reset
