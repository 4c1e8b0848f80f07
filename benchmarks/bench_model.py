"""A whole training step with torch.nn's batch norm and with bnkit's, side by side in one run.

GPU (default; needs CUDA and torchvision): torchvision ResNet-50, batch 128, 224x224, bfloat16 autocast,
channels_last, SGD (momentum 0.9), cross-entropy on random labels. Rows: torch.nn, bnkit default
(``bnkit.convert(model)``), bnkit ``nonfinite="propagate"``, and with ``--compile`` torch.compile of
torch.nn and of bnkit default. Columns:

* train ms/step: median over 3 runs of the mean of ``--steps`` steps (CUDA events), after warm-up;
* vs torch.nn: train time / torch.nn's;
* eval ms: inference forward (``torch.no_grad``), same batch;
* host reads/step: ``aten._local_scalar_dense`` / ``aten.is_nonzero`` calls during one training step
  (a ``TorchDispatchMode`` counts them: each is a value read back to the host);
* CUDA syncs/step: warnings of ``torch.cuda.set_sync_debug_mode("warn")`` during one step (GPU only);
* CUDA graph: whether ``torch.cuda.graph`` captures one training step (forward, loss, backward, SGD)
  and its replay gives the parameters, running statistics and counters of the same step run eagerly
  from the same state ("exact": bitwise; else the largest relative difference).

    python benchmarks/bench_model.py                   # the GPU table (ResNet-50)
    python benchmarks/bench_model.py --compile         # plus torch.compile rows
    python benchmarks/bench_model.py --cpu --small     # smoke run on CPU: ResNet-18, batch 4, 64x64, fp32

Without CUDA (and without ``--cpu``) it prints "no CUDA device: skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bnkit

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class CountHostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_READS
        return func(*args, **(kwargs or {}))


class Setup:
    """What one run uses: device, model name, batch, image size, autocast dtype, memory format."""

    def __init__(self, cpu: bool, small: bool):
        self.device = torch.device("cpu" if cpu else "cuda")
        self.arch = "resnet18" if small else "resnet50"
        self.batch, self.size = (4, 64) if small else (128, 224)
        self.amp = None if cpu else torch.bfloat16
        self.memory_format = torch.channels_last

    def autocast(self):
        if self.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp)

    def describe(self) -> str:
        amp = "no autocast" if self.amp is None else f"{str(self.amp).split('.')[-1]} autocast"
        return (f"torchvision {self.arch}, batch {self.batch}, {self.size}x{self.size}, {amp}, channels_last, "
                f"SGD(lr=0.01, momentum=0.9)")


def build(setup: Setup, variant: str) -> torch.nn.Module:
    """The same initial weights for every variant (seeded), converted to bnkit where asked."""
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, setup.arch)(num_classes=1000)
    if variant != "torch.nn":
        model = bnkit.convert(model)
        if variant == "bnkit propagate":
            for m in model.modules():
                if isinstance(m, bnkit.BatchNormBase):
                    m.nonfinite = "propagate"
    return model.to(setup.device, memory_format=setup.memory_format).train()


def make_step(setup: Setup, model, optimizer, x, target):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with setup.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss
    return step


def _sync(setup: Setup):
    if setup.device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(setup: Setup, fn, steps: int) -> float:
    """Median over 3 runs of the mean time of ``steps`` calls, in ms (CUDA events on a GPU)."""
    runs = []
    for _ in range(3):
        _sync(setup)
        if setup.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            runs.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(runs)


def count_host_reads(setup: Setup, step) -> tuple[int, int | None]:
    """(host reads, CUDA syncs) during one step."""
    with CountHostReads() as mode:
        step()
    syncs = None
    if setup.device.type == "cuda":
        _sync(setup)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    return mode.count, syncs


def _state(model, optimizer) -> list[torch.Tensor]:
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def graph_check(setup: Setup, model, optimizer, x, target) -> str:
    """Capture one training step in a CUDA graph; compare its replay with the eager step from the same state."""
    if setup.device.type != "cuda":
        return "n/a (CPU)"
    step = make_step(setup, model, optimizer, x, target)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            with setup.autocast():
                loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
    except Exception as e:  # report, do not hide: the table says why
        torch.cuda.synchronize()
        return f"capture fails: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    before = [t.detach().clone() for t in _state(model, optimizer)]
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.detach().clone() for t in _state(model, optimizer)]
    with torch.no_grad():
        for t, saved in zip(_state(model, optimizer), before):
            t.copy_(saved)
    step()
    torch.cuda.synchronize()
    worst = 0.0
    for a, b in zip(replayed, _state(model, optimizer)):
        if not torch.equal(a, b):
            a, b = a.double(), b.detach().double()
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    return "captures, replay exact" if worst == 0.0 else f"captures, replay differs (max rel {worst:.1e})"


def run(setup: Setup, variants, steps: int, out=print):
    gpu = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    out(f"{setup.describe()}; {gpu}; torch {torch.__version__}; bnkit backend {bnkit.get_backend()!r}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    out("")
    out("| model | train ms/step | vs torch.nn | eval ms | host reads/step | CUDA syncs/step | CUDA graph |")
    out("|---|---|---|---|---|---|---|")
    torch.manual_seed(1)
    x = torch.randn(setup.batch, 3, setup.size, setup.size, device=setup.device).to(
        memory_format=setup.memory_format)
    target = torch.randint(0, 1000, (setup.batch,), device=setup.device)
    base = None
    rows = {}
    for variant in variants:
        compiled = variant.startswith("torch.compile")
        model = build(setup, variant.replace("torch.compile ", ""))
        if compiled:
            torch._dynamo.reset()
        run_model = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
        step = make_step(setup, run_model, optimizer, x, target)
        for _ in range(3):  # warm-up (and compilation)
            step()
        train = time_ms(setup, step, steps)
        reads, syncs = count_host_reads(setup, step)
        run_model.eval()
        with torch.no_grad(), setup.autocast():
            infer = functools.partial(run_model, x)
            infer()
            evaluation = time_ms(setup, infer, steps)
        run_model.train()
        graph = "not tried (compiled)" if compiled else graph_check(setup, model, optimizer, x, target)
        base = base or train
        rows[variant] = dict(train=train, eval=evaluation, reads=reads, syncs=syncs, graph=graph)
        out(f"| {variant} | {train:.1f} | {train / base:.2f} | {evaluation:.1f} | {reads} | "
            f"{'-' if syncs is None else syncs} | {graph} |")
        del model, run_model, optimizer, step, infer  # free the memory before the next model
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (no autocast)")
    p.add_argument("--small", action="store_true", help="ResNet-18, batch 4, 64x64 (a smoke run)")
    p.add_argument("--compile", action="store_true", help="also torch.compile of torch.nn and bnkit")
    p.add_argument("--steps", type=int, default=None, help="steps per timing run (default 20 GPU, 2 CPU)")
    args = p.parse_args(argv)
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # a wheel built for another torch fails with RuntimeError, not ImportError
        print(f"torchvision does not import ({type(e).__name__}: {e}): skipped")
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: skipped (use --cpu --small for the CPU smoke run)")
        return 0
    setup = Setup(args.cpu, args.small)
    variants = ["torch.nn", "bnkit default", "bnkit propagate"]
    if args.compile:
        variants += ["torch.compile torch.nn", "torch.compile bnkit default"]
    run(setup, variants, args.steps or (2 if args.cpu else 20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
