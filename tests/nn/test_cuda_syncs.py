"""A training step synchronizes nothing on a GPU: beside host reads (tests/nn/test_host_reads.py), a
tensor built from Python data inside a step (``torch.tensor(list, device=...)``) is a host-to-device
copy from pageable memory, which torch follows with a stream synchronization and which a CUDA graph
cannot capture.

CPU: no ``aten.lift_fresh`` (a tensor made from Python data) in a step of any option but ``lengths=``
given as a list (the user's host data, copied without a synchronization). GPU: a step of every option
under ``torch.cuda.set_sync_debug_mode("error")`` (torch's own synchronizing calls raise there).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bnkit

CASES = {
    "plain": (lambda: bnkit.BatchNorm2d(4), (6, 4, 3, 3), {}),
    "momentum=None": (lambda: bnkit.BatchNorm2d(4, momentum=None), (6, 4, 3, 3), {}),
    "cosine schedule": (lambda: bnkit.BatchNorm2d(4, momentum=bnkit.momentum.Schedule("cosine", total_steps=10)),
                        (6, 4, 3, 3), {}),
    "activation": (lambda: bnkit.BatchNorm2d(4, activation="silu"), (6, 4, 3, 3), {}),
    "channels_last": (lambda: bnkit.BatchNorm2d(4), (6, 4, 3, 3), {"channels_last": True}),
    "biased variance": (lambda: bnkit.BatchNorm2d(4, variance="biased"), (6, 4, 3, 3), {}),
    "ghost, uneven chunks": (lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=4), (6, 4, 3, 3), {}),
    "renorm warm-up ramps": (lambda: bnkit.BatchRenorm2d(4, **bnkit.renorm_warmup(10, hold=2)), (6, 4, 3, 3), {}),
    "mask": (lambda: bnkit.BatchNorm1d(4), (6, 4, 5), {"mask": True}),
    "lengths tensor on the CPU": (lambda: bnkit.BatchNorm1d(4), (6, 4, 5), {"lengths": "cpu tensor"}),
    "lengths list": (lambda: bnkit.BatchNorm1d(4), (6, 4, 5), {"lengths": "list"}),
    "frozen stats (running)": (lambda: bnkit.freeze_stats(bnkit.BatchNorm2d(4), use_running=True), (6, 4, 3, 3), {}),
    "domain": (lambda: bnkit.DomainBatchNorm2d(4, num_domains=2), (6, 4, 3, 3), {"domain": 1}),
}
LENGTHS = [5, 3, 4, 5, 1, 2]


def _step(case, device):
    """The layer, and one training step (forward + backward) of it on ``device``."""
    make, shape, extra = CASES[case]
    layer = make().to(device)
    x = torch.randn(shape, device=device)
    if extra.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    kw = {}
    if extra.get("mask"):
        kw["mask"] = torch.arange(shape[2], device=device) < torch.tensor(LENGTHS, device=device)[:, None]
    if extra.get("lengths"):
        kw["lengths"] = LENGTHS if extra["lengths"] == "list" else torch.tensor(LENGTHS)
    if "domain" in extra:
        kw["domain"] = extra["domain"]

    def run():
        layer.train()
        layer(x, **kw).square().sum().backward()
    return layer, run


class TensorsFromHostData(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += func.__name__.startswith("lift_fresh")
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_tensors_made_from_host_data():  # the check itself can fail
    with TensorsFromHostData() as mode:
        torch.tensor([1, 2])
    assert mode.seen == 1


@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "lengths list"))
def test_a_training_step_makes_no_tensor_from_host_data(case):
    _, run = _step(case, "cpu")
    run()  # lazy set-up is not a step
    with TensorsFromHostData() as mode:
        run()
    assert mode.seen == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_step_does_not_synchronize_on_cuda(case):
    layer, run = _step(case, "cuda")
    run()  # the first step moves the skipped-batch counter to the device: a one-time copy
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    counts = [m.num_batches_tracked.item() for m in layer.modules() if getattr(m, "num_batches_tracked", None) is not None]
    assert counts and set(counts) <= {0, 2}  # 0: frozen statistics; else both steps counted
