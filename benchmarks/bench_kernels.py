"""Batch norm + ReLU: PyTorch eager vs torch.compile vs bnkit, side by side in one run.

GPU (default; needs CUDA and Triton): for the issue's ResNet-50 shapes, fp32/bf16, NCHW/NHWC,
"train" (forward + backward of BN+ReLU, statistics and running update included) and "eval"
(inference forward). Time is the median of ``triton.testing.do_bench``; GB/s counts the fewest bytes
a kernel must move (train: 3 passes forward + 5 backward = 8 * N * itemsize; eval: 2 * N * itemsize,
N = elements of the activation); "% copy" divides by a device copy measured in the same run
(read + write). torch.compile is reset before every configuration, so each one really compiles.
bnkit runs with ``nonfinite="propagate"`` (torch's semantics, no host sync: the running update is
fused into the statistics kernel); the default ``"skip"`` adds one host sync per training step.

    python benchmarks/bench_kernels.py                       # everything (long: ~56 compilations)
    python benchmarks/bench_kernels.py --shapes 256,256,56,56 --dtypes bf16 --layouts nhwc
    python benchmarks/bench_kernels.py --no-compile          # eager vs bnkit only (no compilations)
    python benchmarks/bench_kernels.py --check               # bnkit and eager vs float64, full size
    python benchmarks/bench_kernels.py --cpu                 # CPU: bnkit torch path vs torch.nn vs compile
    python benchmarks/bench_kernels.py --host-overhead       # CPU: Python cost of the Triton path per call

Without CUDA the GPU mode prints "no CUDA device: skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone

import torch

import bnkit

GPU_SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14),
              (256, 2048, 7, 7), (32, 64, 56, 56), (8, 256, 7, 7)]
CPU_SHAPES = [(8, 64, 28, 28), (32, 128, 14, 14), (8, 256, 7, 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = {"train": 8, "eval": 2}  # minimal passes over the activation (see docs/kernels.md)
LARGE = 2**24  # elements from which a shape is "large" for the bandwidth targets (64 MB in fp32)


def _torch_layer(c, device, mode):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(c, device=device)
    model = torch.nn.Sequential(bn, torch.nn.ReLU())
    return model.train(mode == "train")


def _bnkit_layer(c, device, mode):
    torch.manual_seed(0)
    return bnkit.BatchNorm2d(c, device=device, activation="relu", nonfinite="propagate").train(mode == "train")


def _inputs(shape, dtype, layout, device, mode):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if layout == "nhwc":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    return x.requires_grad_(mode == "train"), dy


def _step(fn, model, x, dy, mode):
    """One call to time: eval forward, or train forward + backward (grads returned, not accumulated)."""
    if mode == "eval":
        def run():
            with torch.no_grad():
                return fn(x)
        return run
    params = list(model.parameters())

    def run():
        return torch.autograd.grad(fn(x), [x] + params, dy)
    return run


def _implementations(c, device, mode, compile=True):
    """name -> (callable model, module holding the parameters), built fresh per configuration."""
    eager = _torch_layer(c, device, mode)
    impls = {"eager": (eager, eager)}
    if compile:
        compiled_src = _torch_layer(c, device, mode)
        torch._dynamo.reset()  # a fresh cache: no silent fallback to eager after the recompile limit
        impls["compile"] = (torch.compile(compiled_src), compiled_src)
    ours = _bnkit_layer(c, device, mode)
    impls["bnkit"] = (ours, ours)
    return impls


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write."""
    import triton.testing
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def run_gpu(shapes, dtypes, layouts, modes, out=print, compile=True):
    import triton.testing
    device = torch.device("cuda")
    bnkit.set_backend("triton")
    copy_bw = copy_bandwidth(device)
    out(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; device copy {copy_bw / 1e9:.0f} GB/s")
    out("")
    out("| mode | shape | dtype | layout | eager us | compile us | bnkit us | bnkit GB/s | bnkit % copy "
        "| vs eager | vs compile |")
    out("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for mode in modes:
        for shape in shapes:
            for dname in dtypes:
                for layout in layouts:
                    x, dy = _inputs(shape, DTYPES[dname], layout, device, mode)
                    us = {"compile": float("nan")}
                    for name, (fn, model) in _implementations(shape[1], device, mode, compile).items():
                        us[name] = 1e3 * triton.testing.do_bench(_step(fn, model, x, dy, mode), return_mode="median")
                    nbytes = PASSES[mode] * x.numel() * x.element_size()
                    gbs = nbytes / (us["bnkit"] * 1e-6) / 1e9
                    row = dict(mode=mode, shape=shape, dtype=dname, layout=layout, numel=x.numel(), us=us,
                               frac=gbs * 1e9 / copy_bw)
                    rows.append(row)
                    out(f"| {mode} | {'x'.join(map(str, shape))} | {dname} | {layout} | {us['eager']:.1f} "
                        f"| {us['compile']:.1f} | {us['bnkit']:.1f} | {gbs:.0f} | {100 * row['frac']:.0f}% "
                        f"| {us['eager'] / us['bnkit']:.2f}x | {us['compile'] / us['bnkit']:.2f}x |")
                    del x, dy
    out("")
    _targets(rows, out)
    bnkit.set_backend(None)
    return rows


def _targets(rows, out):
    """The issue's targets, each with its measured value."""
    train = [r for r in rows if r["mode"] == "train"]
    evals = [r for r in rows if r["mode"] == "eval"]
    large_train = [r["frac"] for r in train if r["numel"] >= LARGE]
    large_eval = [r["frac"] for r in evals if r["numel"] >= LARGE]
    vs_eager = [r["us"]["eager"] / r["us"]["bnkit"] for r in train]
    vs_compile = [r["us"]["compile"] / r["us"]["bnkit"] for r in train]
    slowest = min(r["us"]["eager"] / r["us"]["bnkit"] for r in rows) if rows else float("nan")
    checks = [("train fwd+bwd, large shapes: min % of copy >= 85%", min(large_train, default=float("nan")), 0.85),
              ("train geomean speedup vs eager >= 1.5x", _geomean(vs_eager), 1.5),
              ("train geomean speedup vs torch.compile >= 1.2x", _geomean(vs_compile), 1.2),
              ("no configuration slower than eager by > 5% (min speedup >= 0.95x)", slowest, 0.95),
              ("eval forward, large shapes: min % of copy >= 90%", min(large_eval, default=float("nan")), 0.90)]
    out("| target | measured | met |")
    out("|---|---|---|")
    for name, value, goal in checks:
        out(f"| {name} | {value:.3f} | {'yes' if value >= goal else 'no'} |")


def _float64_reference(x, dy, eps=1e-5, momentum=0.1):
    """BN+ReLU of a fresh layer (weight 1, bias 0, running stats 0/1) in float64: outputs, gradients,
    running statistics, and the ReLU ties (pre-activation within 1e-4 of 0, where any float32
    implementation may round to either side of the mask and both answers are right)."""
    xd, dyd = x.double(), dy.double()
    dims = [0] + list(range(2, x.dim()))
    mean, var = xd.mean(dims, keepdim=True), xd.var(dims, unbiased=False, keepdim=True)
    n = x.numel() // x.shape[1]
    z = (xd - mean) / (var + eps).sqrt()
    g = dyd * (z > 0)
    dx = (g - g.mean(dims, keepdim=True) - z * (g * z).mean(dims, keepdim=True)) / (var + eps).sqrt()
    ref = dict(y=z.clamp_min(0), dx=dx, dgamma=(g * z).sum(dims), dbeta=g.sum(dims),
               running_mean=momentum * mean.flatten(),
               running_var=1 - momentum + momentum * var.flatten() * n / (n - 1))
    return ref, z.abs() < 1e-4


def _float64_eval(x, bn):
    """Eval BN+ReLU in float64 from the layer's own running statistics and affine parameters."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    rm, rv = bn.running_mean.double().view(view), bn.running_var.double().view(view)
    w, b = bn.weight.detach().double().view(view), bn.bias.detach().double().view(view)
    return (((x.double() - rm) / (rv + bn.eps).sqrt()) * w + b).clamp_min(0)


def _train_call(layer, x, dy):
    """One training forward + backward on a fresh leaf with x's values: y, dx, dgamma, dbeta."""
    xi = x.detach().clone().requires_grad_()
    y = layer(xi)
    dx, dw, db = torch.autograd.grad(y, [xi] + list(layer.parameters()), dy.to(y.dtype))
    return dict(y=y.detach(), dx=dx, dgamma=dw, dbeta=db)


def _max_rel_err(a, b, ties=None):
    diff = (a.double() - b).abs()
    if ties is not None:
        diff = diff.masked_fill(ties, 0)
    return (diff.max() / b.abs().max().clamp_min(1e-12)).item()


def run_check(shapes, dtypes, layouts, out=print, device="cuda"):
    """bnkit (Triton, forced) and torch.nn eager, each against a float64 reference on the same input
    values: y, dx, dgamma, dbeta, running statistics (max error / max |reference|; dx leaves out the
    ReLU ties, see :func:`_float64_reference`), then each layer's eval output against float64 from its
    own running statistics. bnkit passes when its error is within max(tolerance, 2 x eager's error),
    and when its second training call (every launch through the cached compiled-kernel launcher) gives
    the first call's y, dx, dgamma and dbeta bit for bit."""
    device = torch.device(device)
    tol = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
    failures = 0
    out("| shape | dtype | layout | quantity | bnkit err | eager err | ok |")
    out("|---|---|---|---|---|---|---|")
    for shape in shapes:
        for dname in dtypes:
            for layout in layouts:
                x, dy = _inputs(shape, DTYPES[dname], layout, device, "train")
                ref, ties = _float64_reference(x.detach(), dy)
                results, evals, repeat = {}, {}, None
                for name, backend in (("eager", "torch"), ("bnkit", "triton")):
                    bnkit.set_backend(backend)
                    layer = _torch_layer(shape[1], device, "train") if name == "eager" else \
                        _bnkit_layer(shape[1], device, "train")
                    bn = layer if name == "bnkit" else layer[0]
                    results[name] = _train_call(layer, x, dy)
                    results[name].update(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone())
                    if name == "bnkit":  # every launch after a kernel's first goes through the cached launcher
                        again = _train_call(layer, x, dy)
                        repeat = all(torch.equal(again[q], results[name][q]) for q in again)
                    layer.eval()
                    with torch.no_grad():  # the eval kernel against float64 from this layer's running statistics
                        evals[name] = _max_rel_err(layer(x), _float64_eval(x, bn))
                bnkit.set_backend(None)
                label = f"| {'x'.join(map(str, shape))} | {dname} | {layout}"
                for q in ref:
                    mask = ties if q == "dx" else None
                    ours = _max_rel_err(results["bnkit"][q], ref[q], mask)
                    theirs = _max_rel_err(results["eager"][q], ref[q], mask)
                    ok = ours <= max(tol[dname], 2 * theirs)
                    failures += not ok
                    out(f"{label} | {q} | {ours:.2e} | {theirs:.2e} | {'yes' if ok else 'NO'} |")
                ok = evals["bnkit"] <= max(tol[dname], 2 * evals["eager"])
                failures += (not ok) + (not repeat)
                out(f"{label} | eval y | {evals['bnkit']:.2e} | {evals['eager']:.2e} | {'yes' if ok else 'NO'} |")
                out(f"{label} | 2nd call (cached launcher) bitwise = 1st | {'equal' if repeat else 'DIFFERENT'} | - "
                    f"| {'yes' if repeat else 'NO'} |")
                out(f"| {'x'.join(map(str, shape))} | {dname} | {layout} | dx with the {int(ties.sum())} ReLU ties "
                    f"| {_max_rel_err(results['bnkit']['dx'], ref['dx']):.2e} "
                    f"| {_max_rel_err(results['eager']['dx'], ref['dx']):.2e} | (not checked) |")
                del x, dy, results, ref, ties
    out(f"\n{failures} failure(s)")
    return failures


def run_cpu(shapes, modes, out=print):
    """CPU: bnkit's torch path vs torch.nn eager vs torch.compile (inductor), medians of
    torch.utils.benchmark; no Triton involved."""
    from torch.utils.benchmark import Timer
    device = torch.device("cpu")
    bnkit.set_backend("torch")
    out(f"device: CPU ({torch.get_num_threads()} threads); torch {torch.__version__}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    out("")
    out("| mode | shape | torch.nn us | torch.compile us | bnkit (torch path) us | bnkit / torch.nn |")
    out("|---|---|---|---|---|---|")
    for mode in modes:
        for shape in shapes:
            x, dy = _inputs(shape, torch.float32, "nchw", device, mode)
            impls = _implementations(shape[1], device, mode)
            us = {}
            for name, (fn, model) in impls.items():
                step = _step(fn, model, x, dy, mode)
                step()  # compile / warm up outside the timing
                us[name] = 1e6 * Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=0.5).median
            out(f"| {mode} | {'x'.join(map(str, shape))} | {us['eager']:.0f} | {us['compile']:.0f} | "
                f"{us['bnkit']:.0f} | {us['bnkit'] / us['eager']:.2f} |")
    bnkit.set_backend(None)


def run_host_overhead(shape=(8, 16, 7, 7), out=print):
    """Host (Python) time per call of bnkit's Triton path with every kernel launch replaced by a no-op,
    next to torch.nn's whole CPU call on the same tiny tensor: the floor a small GPU shape pays
    before any kernel runs (Triton's own launch cost not included). Rows: the backend interface
    alone (``bnkit.ops.triton.train_forward`` / ``eval_forward``: what the kernels' side costs) and
    the whole layer (checks, running update, non-finite policy). Runs on the CPU, no GPU needed."""
    import os
    from torch.utils.benchmark import Timer
    os.environ["TRITON_INTERPRET"] = "1"  # lets the forced backend take CPU tensors; no kernel runs
    from bnkit.ops import triton as ops
    from bnkit.ops.triton import kernels

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for name in [n for n in vars(kernels) if n.endswith("_kernel")]:
        setattr(kernels, name, NoLaunch())

    def median_us(fn):
        fn()
        return 1e6 * Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median

    x, dy = _inputs(shape, torch.float32, "nchw", "cpu", "train")
    out(f"host time per call, CPU ({torch.get_num_threads()} threads), shape {shape}, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    out("| call | us |")
    out("|---|---|")
    weight, bias = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)
    mean, var = torch.zeros(shape[1]), torch.ones(shape[1])

    def interface_train():
        y = ops.train_forward(x, weight, bias, 1e-5, "relu", 0.01)[0]
        return torch.autograd.grad(y, (x, weight, bias), dy)

    def interface_eval():
        with torch.no_grad():
            return ops.eval_forward(x, mean, var, weight, bias, 1e-5, "relu", 0.01)
    out(f"| backend interface, train fwd+bwd, launches stubbed | {median_us(interface_train):.0f} |")
    out(f"| backend interface, eval fwd, launches stubbed | {median_us(interface_eval):.0f} |")
    bnkit.set_backend("triton")
    for nonfinite in ("propagate", "skip"):
        layer = bnkit.BatchNorm2d(shape[1], activation="relu", nonfinite=nonfinite)
        out(f"| bnkit layer on the Triton path, train fwd+bwd, nonfinite={nonfinite!r}, launches stubbed | "
            f"{median_us(_step(layer, layer, x, dy, 'train')):.0f} |")
    out(f"| bnkit layer on the Triton path, eval fwd, launches stubbed | "
        f"{median_us(_step(layer.eval(), layer, x, dy, 'eval')):.0f} |")
    bnkit.set_backend(None)
    ref = _torch_layer(shape[1], "cpu", "train")
    out(f"| torch.nn BN+ReLU on CPU, train fwd+bwd (whole call) | {median_us(_step(ref, ref, x, dy, 'train')):.0f} |")
    out(f"| torch.nn BN+ReLU on CPU, eval fwd (whole call) | {median_us(_step(ref.eval(), ref, x, dy, 'eval')):.0f} |")


def _shape(text):
    return tuple(int(v) for v in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", type=_shape, help="N,C,H,W ... (default: the issue's list)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--layouts", nargs="+", choices=["nchw", "nhwc"], default=["nchw", "nhwc"])
    p.add_argument("--modes", nargs="+", choices=sorted(PASSES), default=["train", "eval"])
    p.add_argument("--check", action="store_true", help="verify outputs and gradients vs torch at full size")
    p.add_argument("--no-compile", action="store_true", help="GPU table without the torch.compile column")
    p.add_argument("--cpu", action="store_true", help="CPU comparison of the torch path (no GPU needed)")
    p.add_argument("--host-overhead", action="store_true", help="CPU: Python time of the Triton path per call")
    args = p.parse_args(argv)
    if args.cpu:
        run_cpu(args.shapes or CPU_SHAPES, args.modes)
        return 0
    if args.host_overhead:
        run_host_overhead()
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (use --cpu for the CPU comparison)")
        return 0
    if args.check:
        return 1 if run_check(args.shapes or GPU_SHAPES, args.dtypes, args.layouts) else 0
    run_gpu(args.shapes or GPU_SHAPES, args.dtypes, args.layouts, args.modes, compile=not args.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
